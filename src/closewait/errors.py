"""closewait's exceptions, in one tree. Foreign errors (``OSError`` and kin) are translated where a
backend starts, with ``raise ... from err``, so callers catch these and nothing else.

    ClosewaitError                    every error closewait raises on purpose
    ├── UsageError                    a bad argument: unknown state, port out of range, bad address
    ├── NoSuchProcess                 a pid that does not exist (or no longer is the process planned)
    ├── AccessDenied                  the kernel said EPERM/EACCES; the message says what to run as
    ├── NotSupported                  the kernel lacks a feature (ENOSYS, no SOCK_DESTROY, no sock_diag)
    ├── NetnsError                    a path or pid that does not name a network namespace
    └── KernelDataError               the kernel (or a file posing as it) said something malformed
        └── NetlinkError              a netlink reply that is truncated, malformed, or an NLMSG_ERROR

Each class carries ``exit_code``: what the CLI exits with when it reaches the user (documented in
docs/cli.md). Internal bugs are not ClosewaitErrors; they surface as tracebacks.
"""

from __future__ import annotations


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


class KernelDataError(ClosewaitError):
    """Malformed data from the kernel (or from a file given in its place)."""


class NetlinkError(KernelDataError):
    """A netlink reply that is malformed, truncated, or reports an error."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        self.errno = errno
        super().__init__(message)
