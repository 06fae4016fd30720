"""The one libc loader: the calls Python 3.11's ``os`` and ``socket`` lack, through ctypes.

``ctypes.CDLL(None, use_errno=True)`` is opened once, on first use (importing ctypes costs a few
milliseconds that ``closewait scan`` should not pay when it enters no namespace and borrows no fd).
Symbols are looked up in the process's global scope, so an ``LD_PRELOAD`` shim over ``syscall()``
(tests/reap/enosys_shim.c stands in for an old kernel that way) is honoured.

Every wrapper raises ``OSError`` with the call's errno, as ``os`` functions do; the modules of
``closewait.sources`` turn that into a closewait error with ``errors.from_os_error``.
"""

from __future__ import annotations

import os
import threading

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    import ctypes
    from typing import Any, NoReturn

_lock = threading.Lock()
_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library of this process (opened on the first call)."""
    global _libc
    if _libc is None:
        with _lock:
            if _libc is None:
                import ctypes

                loaded = ctypes.CDLL(None, use_errno=True)
                loaded.syscall.restype = ctypes.c_long
                getsockopt = loaded.getsockopt
                getsockopt.argtypes = [
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_void_p,
                    ctypes.POINTER(ctypes.c_uint32),
                ]
                getsockopt.restype = ctypes.c_int
                _libc = loaded
    return _libc


def _raise_errno() -> NoReturn:
    import ctypes

    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code))


def syscall(number: int, *args: Any) -> int:
    """``syscall(number, *args)``; int arguments are passed as C longs, ctypes objects as they are."""
    import ctypes

    converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = int(libc().syscall(ctypes.c_long(number), *converted))
    if result < 0:
        _raise_errno()
    return result


def getsockopt() -> Any:
    """libc's ``getsockopt(fd, level, option, buffer, length*)`` with its argument types set, for a
    hot loop over bare descriptors (no socket object, no dup). Returns 0, or -1 with errno set."""
    return libc().getsockopt


def getsockopt_bytes(fd: int, level: int, option: int, size: int) -> bytes:
    """``getsockopt`` on a bare descriptor: the first ``size`` bytes of the option's value."""
    import ctypes

    buffer = (ctypes.c_uint8 * size)()
    length = ctypes.c_uint32(size)
    if getsockopt()(fd, level, option, buffer, ctypes.byref(length)) != 0:
        _raise_errno()
    return bytes(buffer[: length.value])


def setns(fd: int, nstype: int) -> None:
    """Move the calling thread into the namespace ``fd`` refers to (setns(2); ``os.setns`` is 3.12+)."""
    if libc().setns(fd, nstype) != 0:
        _raise_errno()


def statfs_type(path: str) -> int:
    """``f_type`` of the filesystem ``path`` is on (statfs(2)), for example NSFS_MAGIC."""
    import ctypes

    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    buf = StatFs()
    if libc().statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        _raise_errno()
    return int(buf.f_type)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2) with integer arguments."""
    import ctypes

    result = int(
        libc().prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(arg4), ctypes.c_ulong(arg5))
    )
    if result < 0:
        _raise_errno()
    return result


def _forget_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # it may have been held by another thread at fork()


os.register_at_fork(after_in_child=_forget_after_fork)
