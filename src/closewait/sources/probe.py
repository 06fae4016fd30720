"""This process's own CLOSE_WAIT sockets, asked of each descriptor directly: the cheap check behind
``closewait.testing`` and ``closewait.sentinel``.

``own_close_wait_fds()`` lists ``/proc/self/fd`` and calls ``getsockopt(fd, SOL_TCP, TCP_INFO)``
through libc on each bare descriptor (no socket object, no dup): the first byte of ``struct
tcp_info`` is ``tcpi_state``. Non-sockets and non-TCP sockets fail the call and are skipped. The cost
is a microsecond or two per descriptor of this process, whatever the host holds.

For another process, ``close_wait_inodes(pid)`` walks ``/proc/PID/fd`` and intersects it with one
dump of the host's CLOSE_WAIT sockets (sock_diag, filtered in the kernel, no tcp_info; /proc/net/tcp
when there is no sock_diag).

``shutdown_socket(fd, inode)`` shuts down one of this process's sockets through a duplicate, after
checking the descriptor still refers to the expected socket.
"""

from __future__ import annotations

import os
import socket
import threading

from closewait.errors import ClosewaitError
from closewait.model import TcpState
from closewait.sources import pidfd
from closewait.sources.process import socket_fds

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from typing import Any

_CLOSE_WAIT_ONLY = frozenset({TcpState.CLOSE_WAIT})


class _TcpStateProbe:
    """One reusable ``tcp_info`` buffer and libc's ``getsockopt``, guarded by a lock."""

    def __init__(self) -> None:
        import ctypes

        from closewait.sources import _libc

        self._getsockopt: Any = _libc.getsockopt()
        self._buffer = (ctypes.c_uint8 * 8)()
        self._length = ctypes.c_uint32(8)
        self._length_ref = ctypes.byref(self._length)
        self._lock = threading.Lock()

    def close_wait_fds(self) -> dict[int, int]:
        close_wait = int(TcpState.CLOSE_WAIT)
        return {inode: fd for inode, (fd, state) in self.tcp_sockets().items() if state == close_wait}

    def tcp_sockets(self) -> dict[int, tuple[int, int]]:
        result: dict[int, tuple[int, int]] = {}
        getsockopt, buffer, length, length_ref = self._getsockopt, self._buffer, self._length, self._length_ref
        level, option = int(socket.IPPROTO_TCP), int(socket.TCP_INFO)
        fstat = os.fstat
        with self._lock:
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                length.value = 8
                if getsockopt(fd, level, option, buffer, length_ref) != 0:
                    continue
                state = buffer[0]
                try:
                    result[fstat(fd).st_ino] = (fd, state)
                except OSError:
                    continue  # closed since
        return result

    def states_of(self, fds: dict[int, int]) -> dict[int, int] | None:
        result: dict[int, int] = {}
        getsockopt, buffer, length, length_ref = self._getsockopt, self._buffer, self._length, self._length_ref
        level, option = int(socket.IPPROTO_TCP), int(socket.TCP_INFO)
        fstat = os.fstat
        # Never waits: it runs from a gc.callbacks hook, and a collection can start inside the
        # probe's own loop (holding the lock) in this very thread.
        if not self._lock.acquire(blocking=False):
            return None
        try:
            for inode, fd in fds.items():
                length.value = 8
                if getsockopt(fd, level, option, buffer, length_ref) != 0:
                    continue
                state = buffer[0]
                try:
                    if fstat(fd).st_ino == inode:
                        result[inode] = state
                except OSError:
                    continue
        finally:
            self._lock.release()
        return result


_probe: _TcpStateProbe | None = None
_probe_failed = False


def _forget_probe() -> None:
    global _probe
    _probe = None  # its lock may have been held by another thread at fork()


os.register_at_fork(after_in_child=_forget_probe)


def own_close_wait_fds() -> dict[int, int] | None:
    """inode -> fd for each of this process's sockets in CLOSE_WAIT now; None where libc's
    getsockopt cannot be reached (then ``close_wait_inodes`` walks /proc/self/fd instead)."""
    probe = _get_probe()
    return None if probe is None else probe.close_wait_fds()


def _get_probe() -> _TcpStateProbe | None:
    global _probe, _probe_failed
    if _probe_failed:
        return None
    if _probe is None:
        try:
            _probe = _TcpStateProbe()
        except (OSError, AttributeError):
            _probe_failed = True
            return None
    return _probe


def own_tcp_sockets() -> dict[int, tuple[int, int]] | None:
    """inode -> (fd, TCP state number) for every TCP socket this process holds now (one
    ``getsockopt`` and one ``fstat`` per socket descriptor); None where libc's getsockopt cannot be
    reached. What the pytest plugin records at each test boundary."""
    probe = _get_probe()
    return None if probe is None else probe.tcp_sockets()


def own_socket_states(fds: dict[int, int]) -> dict[int, int] | None:
    """For ``{inode: fd}`` pairs of this process: inode -> TCP state number of those whose ``fd`` is
    still open, still that socket (same inode) and still TCP. A missing inode was closed. Costs one
    ``getsockopt`` and one ``fstat`` per pair; None without libc's getsockopt, or when another probe
    is running (it never waits: safe to call from a ``gc.callbacks`` hook)."""
    probe = _get_probe()
    return None if probe is None else probe.states_of(fds)


def _kernel_close_wait_inodes() -> set[int]:
    """The inodes of every CLOSE_WAIT socket in this namespace, through the one source chain
    (``get_source``: netlink, else /proc/net/tcp). No tcp_info: only inodes are compared."""
    from closewait.sources import get_source

    return {s.inode for s in get_source(with_info=False).sockets(_CLOSE_WAIT_ONLY)}


def close_wait_inodes(pid: int | None = None) -> dict[int, int]:
    """inode -> fd for every socket of ``pid`` (default: this process) that is in CLOSE_WAIT now.

    Raises NoSuchProcess for a pid that does not exist, AccessDenied when its descriptors cannot be
    read.
    """
    if pid is None or pid == os.getpid():
        own = own_close_wait_fds()
        if own is not None:
            return own
    fds = socket_fds(os.getpid() if pid is None else pid)
    if not fds:
        return {}
    in_close_wait = _kernel_close_wait_inodes()
    return {inode: fd for fd, inode in fds.items() if inode in in_close_wait}


def shutdown_socket(fd: int, inode: int) -> bool:
    """``shutdown(SHUT_RDWR)`` the socket behind this process's ``fd`` if it still has ``inode``.

    Works on a duplicate so the application's descriptor is never closed. False when the fd is
    closed, now refers to another socket, or the kernel refuses the shutdown.
    """
    try:
        dup = os.dup(fd)
    except OSError:
        return False
    try:
        if pidfd.socket_inode_of(dup) != inode:
            return False
        pidfd.shutdown(dup)
        return True
    except ClosewaitError:
        return False
    finally:
        os.close(dup)


__all__ = ["close_wait_inodes", "own_close_wait_fds", "own_socket_states", "own_tcp_sockets", "shutdown_socket"]
