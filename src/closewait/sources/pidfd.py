"""Another process's descriptor, borrowed: pidfd_open, pidfd_getfd, and what is done with the copy.

Everything ``closewait.reap`` asks of the kernel to act on a socket another process holds:

- ``open_pidfd(pid)``: a pidfd pins the process. If it exits, calls through the pidfd fail with
  ESRCH instead of reaching whatever process gets the pid next (a pidfd cannot be re-targeted).
- ``borrow(pidfd, pid, fd)``: ``pidfd_getfd`` duplicates descriptor ``fd`` of that process into this
  one (Linux 5.6+, close-on-exec; needs ptrace rights, PTRACE_MODE_ATTACH_REALCREDS, over it).
  Python 3.11 has ``os.pidfd_open`` but no ``pidfd_getfd``: it is a raw syscall through ``_libc``.
- ``socket_inode_of(fd)``, ``tcp_state(fd)``: what the copy is now (fds are reused: compare the
  inode with the planned one before acting) and its TCP state (the first byte of ``tcp_info``).
- ``shutdown(fd)``: ``shutdown(SHUT_RDWR)`` through the copy, which affects every holder of the
  socket; the copy is then the caller's to ``os.close``.

Errors are ``errors.from_os_error``'s (``NoSuchProcess``, ``AccessDenied``, ``NotSupported``, ...).
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from closewait.errors import NotSupported, from_os_error

#: (pidfd_open, pidfd_getfd): the generic syscall table numbers, shared since Linux 5.1 by x86_64,
#: aarch64, i386, arm, riscv, powerpc, s390 and loongarch. alpha, ia64 and mips number them differently.
_SYSCALL_NUMBERS: dict[str, tuple[int, int]] = dict.fromkeys(
    (
        "x86_64",
        "amd64",
        "aarch64",
        "arm64",
        "i386",
        "i686",
        "armv7l",
        "armv6l",
        "armv8l",
        "riscv64",
        "ppc64le",
        "ppc64",
        "s390x",
        "loongarch64",
    ),
    (434, 438),
)

_PTRACE = "root or CAP_SYS_PTRACE over it"


def _numbers() -> tuple[int, int]:
    import platform

    machine = platform.machine().lower()
    numbers = _SYSCALL_NUMBERS.get(machine)
    if numbers is None:
        raise NotSupported(f"pidfd syscall numbers are not known for {machine}")
    return numbers


def pidfd_open(pid: int) -> int:
    """A pidfd for ``pid`` (os.pidfd_open where Python has it, the raw syscall otherwise). Raises OSError."""
    opener = getattr(os, "pidfd_open", None)
    if opener is not None:
        fd: int = opener(pid, 0)
        return fd
    from closewait.sources import _libc

    return _libc.syscall(_numbers()[0], pid, 0)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """Duplicate descriptor ``target_fd`` of the process behind ``pidfd``. Raises OSError."""
    from closewait.sources import _libc

    return _libc.syscall(_numbers()[1], pidfd, target_fd, 0)


def open_pidfd(pid: int, *, required: bool = True) -> int | None:
    """A pidfd pinning ``pid`` (the caller closes it); None when the kernel has none and it is not
    ``required``. Raises NoSuchProcess when the process has exited."""
    try:
        return pidfd_open(pid)
    except NotSupported:
        if required:
            raise
        return None
    except OSError as err:
        error = from_os_error(err, f"pidfd_open of pid {pid}", pid=pid, needs=_PTRACE)
        if isinstance(error, NotSupported):
            if not required:
                return None
            error = NotSupported("pidfd_open is not available on this kernel (Linux 5.3+ needed)")
        raise error from err


def alive(pid: int, pidfd: int | None = None) -> bool:
    """Whether the process behind ``pidfd`` (else whatever process has ``pid`` now) still exists,
    even when this user may not look at it or signal it: signal 0 checks existence and permission,
    and EPERM means it exists. For choosing what to say, never for deciding to act."""
    import signal

    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, 0)
        else:
            os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False  # no pidfd_send_signal here: the caller says the process has exited, as before
    return True


def borrow(pidfd: int, pid: int, fd: int) -> int | None:
    """A duplicate of descriptor ``fd`` of the process behind ``pidfd`` (process ``pid``), or None when
    that descriptor is no longer open. Raises NoSuchProcess when the process has exited meanwhile."""
    try:
        return pidfd_getfd(pidfd, fd)
    except OSError as err:
        if err.errno == errno.EBADF:
            return None
        error = from_os_error(err, f"pidfd_getfd of fd {fd} of pid {pid}", pid=pid, needs=_PTRACE)
        if isinstance(error, NotSupported):
            error = NotSupported("pidfd_getfd is not available on this kernel (Linux 5.6+ needed)")
        raise error from err


def socket_inode_of(fd: int) -> int | None:
    """The inode of the socket descriptor ``fd`` of this process refers to, None if it is no socket."""
    try:
        info = os.fstat(fd)
    except OSError as err:
        raise from_os_error(err, f"fstat of fd {fd}") from err
    return info.st_ino if stat.S_ISSOCK(info.st_mode) else None


def tcp_state(fd: int) -> int:
    """``tcpi_state`` of TCP socket ``fd`` (the first byte of ``struct tcp_info``): a TcpState number."""
    from closewait.sources import _libc

    try:
        return _libc.getsockopt_bytes(fd, socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError as err:
        raise from_os_error(err, f"reading tcp_info of fd {fd}") from err


def shutdown(fd: int) -> None:
    """``shutdown(SHUT_RDWR)`` the socket behind ``fd``: a FIN to the peer, EOF to every holder's next
    read. ``fd`` itself stays open (close it with ``os.close``)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise from_os_error(err, f"fd {fd}") from err
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError as err:
        raise from_os_error(err, "shutdown()") from err
    finally:
        sock.detach()


__all__ = [
    "alive",
    "borrow",
    "open_pidfd",
    "pidfd_getfd",
    "pidfd_open",
    "shutdown",
    "socket_inode_of",
    "tcp_state",
]
