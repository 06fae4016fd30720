"""closewait's exceptions, in one tree. Foreign errors (``OSError`` and kin) are translated where a
backend starts, with ``raise ... from err``, so callers catch these and nothing else.

    ClosewaitError                    every error closewait raises on purpose
    ├── UsageError                    a bad argument: unknown state, port out of range, bad address
    ├── NoSuchProcess                 a pid that does not exist (or no longer is the process planned)
    ├── AccessDenied                  the kernel said EPERM/EACCES; the message says what to run as
    ├── NotSupported                  the kernel lacks a feature (ENOSYS, no SOCK_DESTROY, no sock_diag)
    ├── NetnsError                    a path or pid that does not name a network namespace
    │   └── NetnsGone                 the namespace a long-running command pinned is gone
    └── KernelDataError               the kernel (or a file posing as it) said something malformed
        └── NetlinkError              a netlink reply that is truncated, malformed, or an NLMSG_ERROR

Each class carries ``exit_code``: what the CLI exits with when it reaches the user (documented in
docs/cli.md). Internal bugs are not ClosewaitErrors; they surface as tracebacks.

``from_os_error()`` is the one place an ``OSError`` becomes one of these: every module of
``closewait.sources`` calls it where it meets the kernel, so the same errno always gets the same class
and the same kind of message.
"""

from __future__ import annotations

import errno as _errno
import os as _os


class ClosewaitError(Exception):
    """Base of every error closewait raises on purpose. ``str(err)`` is one line for a person."""

    exit_code = 2


class UsageError(ClosewaitError, ValueError):
    """A bad argument value."""


class NoSuchProcess(ClosewaitError, LookupError):
    """The pid does not exist, or is a different process than the one planned (pid reused)."""

    def __init__(self, pid: int, message: str | None = None) -> None:
        self.pid = pid
        super().__init__(message or f"no process with pid {pid}")


class AccessDenied(ClosewaitError, PermissionError):
    """The kernel refused; the message says which privilege is needed."""


class NotSupported(ClosewaitError):
    """This kernel lacks what the operation needs."""


class NetnsError(ClosewaitError):
    """Not a network namespace, or one that cannot be entered."""


class NetnsGone(NetnsError):
    """The namespace a long-running command was given is gone: its process exited, or its path was
    deleted or now names another namespace. It never comes back: a new one is another namespace."""


class KernelDataError(ClosewaitError):
    """Malformed data from the kernel (or from a file given in its place)."""


class NetlinkError(KernelDataError):
    """A netlink reply that is malformed, truncated, or reports an error."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        self.errno = errno
        super().__init__(message)


#: errno values that mean "not allowed": a missing privilege, an LSM policy, the ptrace access check.
ACCESS_ERRNOS = frozenset({_errno.EPERM, _errno.EACCES})
#: errno values that mean the kernel lacks the call, the option, the protocol or the address family.
UNSUPPORTED_ERRNOS = frozenset({_errno.ENOSYS, _errno.EOPNOTSUPP, _errno.EPROTONOSUPPORT, _errno.EAFNOSUPPORT})
#: errno values that say a path given by the user names nothing usable.
BAD_PATH_ERRNOS = frozenset({_errno.ENOENT, _errno.ENOTDIR, _errno.ELOOP, _errno.ENAMETOOLONG})
#: errno values of a pid that is not (or no longer) there: ESRCH from pidfd_open/kill, ENOENT under /proc.
GONE_ERRNOS = frozenset({_errno.ESRCH, _errno.ENOENT})
#: errno values of a limit reached: descriptors (per process, system-wide) or kernel memory.
EXHAUSTED_ERRNOS = {
    _errno.EMFILE: "this process's open-file limit (ulimit -n)",
    _errno.ENFILE: "the system's open-file limit (fs.file-max)",
    _errno.ENOMEM: "kernel memory",
}


def access_denied(what: str, *, needs: str | None = None) -> AccessDenied:
    """The one wording of a refusal. ``needs`` names the privilege when it is known.

    Root is never told to run as root: when this process's euid is 0, the message says the kernel
    refused even root (a protected process, another user namespace, an LSM policy, a capability
    dropped from the bounding set).
    """
    message = f"{what}: permission denied"
    if needs:
        message += f" (needs {needs})"
    if _os.geteuid() == 0:
        message += ", refused even to root"
    elif not needs:
        message += ", run as root"
    return AccessDenied(message)


def from_os_error(
    err: OSError,
    what: str,
    *,
    pid: int | None = None,
    path: str | None = None,
    needs: str | None = None,
    path_error: type[ClosewaitError] = UsageError,
) -> ClosewaitError:
    """THE mapping of an ``OSError`` met at a kernel boundary to this tree (``raise ... from err``).

    ``what`` says what was being done, for the message ("reading /proc/42/stat", "creating a BPF
    map"). ``pid``: the call was about that process, so ENOENT/ESRCH mean it is gone
    (``NoSuchProcess``). ``path``: a path the user gave, so ENOENT, ENOTDIR, ELOOP, ENAMETOOLONG (and
    EINVAL, a file of the wrong kind) are a bad argument, raised as ``path_error`` (``UsageError``, or
    ``NetnsError`` for a namespace path). ``needs``: the privilege an EPERM/EACCES means is missing.

    ========================================  ===============================================
    errno                                      error (every one exits 2, docs/cli.md)
    ========================================  ===============================================
    EPERM, EACCES                              AccessDenied
    ESRCH, ENOENT with ``pid``                 NoSuchProcess
    ENOENT, ENOTDIR, ELOOP, ENAMETOOLONG,      ``path_error`` (UsageError or NetnsError)
    EINVAL with ``path``
    ENOSYS, EOPNOTSUPP, EPROTONOSUPPORT,       NotSupported
    EAFNOSUPPORT; ENOENT of a kernel file
    EMFILE, ENFILE, ENOMEM                     ClosewaitError naming the resource that ran out
    anything else                              KernelDataError with the kernel's strerror
    ========================================  ===============================================
    """
    code = err.errno or 0
    reason = err.strerror or (_os.strerror(code) if code else str(err))
    if code in ACCESS_ERRNOS:
        return access_denied(what, needs=needs)
    if pid is not None and code in GONE_ERRNOS:
        return NoSuchProcess(pid)
    if path is not None and (code in BAD_PATH_ERRNOS or code == _errno.EINVAL):
        return path_error(f"{what}: {reason}")
    if code in UNSUPPORTED_ERRNOS:
        return NotSupported(f"{what}: not supported by this kernel ({reason})")
    if code == _errno.ENOENT:
        # A file the kernel provides is missing: a kernel built without it, or /proc not mounted.
        return NotSupported(f"{what}: {reason} (not provided by this kernel, or /proc not mounted)")
    if code in EXHAUSTED_ERRNOS:
        return ClosewaitError(f"{what}: {reason}: {EXHAUSTED_ERRNOS[code]} ran out")
    return KernelDataError(f"{what}: {reason}")
