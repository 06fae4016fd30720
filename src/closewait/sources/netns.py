"""Network namespaces: name one, enter it for the length of a ``with`` block, list the host's.

A namespace is named by a path to its nsfs file: ``/proc/PID/ns/net`` (a container's process) or
``/run/netns/NAME`` (``ip netns add``). ``resolve("1234")`` and ``resolve("/run/netns/x")`` both work.

``entered(ns)`` moves only the *calling thread* into the namespace (setns(2) is per thread) and
always moves it back. Sockets opened inside keep the namespace they were opened in, which is how
a netlink socket dumps another namespace's TCP table.

Python 3.11 has no ``os.setns``, so setns(2) is called through ctypes.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from closewait.errors import AccessDenied, NetnsError, NoSuchProcess

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5 ms); mypy knows the name
if TYPE_CHECKING:
    import ctypes

# ctypes (and ctypes.util, which pulls in subprocess and tempfile) is imported only when a
# namespace is really entered or checked: every ``closewait scan`` imports this module, and the
# import alone costs ~10 ms of a command that should finish in tens of milliseconds.

CLONE_NEWNET = 0x40000000
NSFS_MAGIC = 0x6E736673


@dataclass(frozen=True, slots=True)
class Netns:
    """A network namespace: the path that names it and its inode (what /proc/PID/ns/net links show)."""

    path: str
    inode: int

    @property
    def label(self) -> str:
        return self.path


def _libc() -> ctypes.CDLL:
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    import ctypes

    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise AccessDenied("entering a network namespace needs root (CAP_SYS_ADMIN)")
        raise NetnsError(f"setns failed: {os.strerror(err)}")


def resolve(spec: str, *, proc_root: str = "/proc") -> Netns:
    """Turn ``--netns`` input (a pid, ``/proc/PID/ns/net`` or ``/run/netns/NAME``, or a bare name
    under /run/netns) into a Netns, or raise a one-line error."""
    hint = "(give a pid, /proc/PID/ns/net or /run/netns/NAME)"
    pid = int(spec) if spec.isascii() and spec.isdigit() else None
    if pid is not None:
        path = f"{proc_root}/{pid}/ns/net"
        if not os.path.exists(f"{proc_root}/{pid}"):
            raise NoSuchProcess(pid)
    elif spec and "/" not in spec and _exists(f"/run/netns/{spec}"):
        path = f"/run/netns/{spec}"
    else:
        path = spec
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if pid is not None and _exited(pid, proc_root):
            raise NoSuchProcess(pid, f"pid {pid} has exited: no network namespace left to scan") from None
        raise NetnsError(f"{spec}: no such network namespace {hint}") from None
    except PermissionError as err:
        if os.geteuid() == 0:
            raise AccessDenied(
                f"{path}: access refused even to root (a protected process, or a namespace owned by another "
                "user namespace)"
            ) from err
        raise AccessDenied(f"{path}: permission denied, run as root") from err
    except OSError as err:
        # NotADirectoryError (/etc/hostname/x), ELOOP (a symlink loop), ENAMETOOLONG, ...
        raise NetnsError(f"{spec[:80]}: {err.strerror or err}: not a network namespace {hint}") from None
    if stat.S_ISDIR(st.st_mode) or not _is_netns(path):
        if pid is not None and _exited(pid, proc_root):
            raise NoSuchProcess(pid, f"pid {pid} has exited: no network namespace left to scan")
        raise NetnsError(f"{spec} is not a network namespace {hint}")
    return Netns(path=path, inode=st.st_ino)


def _exists(path: str) -> bool:
    try:
        return os.path.exists(path)
    except ValueError:  # an embedded NUL
        return False


def _exited(pid: int, proc_root: str) -> bool:
    """True when ``pid`` is gone or a zombie: its namespaces went with it, the pid still shows."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as handle:
            stat_line = handle.read()
    except OSError:
        return True
    fields = stat_line[stat_line.rfind(b")") + 2 :].split()
    return not fields or fields[0] in (b"Z", b"X")


def _is_netns(path: str) -> bool:
    """True when ``path`` is an nsfs file for a *network* namespace."""
    if _statfs_type(path) != NSFS_MAGIC:
        return False
    try:
        target = os.readlink(path)
    except OSError:
        # /run/netns/NAME is a bind mount of the nsfs file, not a link: it is a netns if it is one.
        return not path.startswith("/proc/") or path.endswith("/ns/net")
    return target.startswith("net:[")


def _statfs_type(path: str) -> int:
    import ctypes

    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    buf = StatFs()
    if _libc().statfs(path.encode(), ctypes.byref(buf)) != 0:
        return 0
    return int(buf.f_type)


def current(proc_root: str = "/proc") -> Netns:
    path = f"{proc_root}/thread-self/ns/net"
    return Netns(path=f"{proc_root}/self/ns/net", inode=os.stat(path).st_ino)


@contextmanager
def entered(ns: Netns | None) -> Iterator[None]:
    """Run the block with the calling thread inside ``ns`` (no-op for None or the current one)."""
    if ns is None:
        yield
        return
    own_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(own_fd).st_ino == ns.inode:
            yield
            return
        try:
            target_fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError as err:
            if os.geteuid() == 0:
                raise AccessDenied(f"{ns.path}: access refused even to root") from err
            raise AccessDenied(f"{ns.path}: permission denied, run as root") from err
        except FileNotFoundError:
            raise NetnsError(f"{ns.path}: the namespace is gone") from None
        try:
            _setns(target_fd)
        finally:
            os.close(target_fd)
        try:
            yield
        finally:
            _setns(own_fd)
    finally:
        os.close(own_fd)


def discover(proc_root: str = "/proc") -> list[tuple[Netns, int]]:
    """Every network namespace some process is in: (namespace, lowest pid in it), deduplicated.

    Processes that vanish or cannot be read are skipped.
    """
    seen: dict[int, tuple[Netns, int]] = {}
    for name in os.listdir(proc_root):
        if not name.isdigit():
            continue
        path = f"{proc_root}/{name}/ns/net"
        try:
            inode = os.stat(path).st_ino
        except OSError:
            continue
        pid = int(name)
        if inode not in seen or pid < seen[inode][1]:
            seen[inode] = (Netns(path=path, inode=inode), pid)
    return sorted(seen.values(), key=lambda item: item[1])
