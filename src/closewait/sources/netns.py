"""Network namespaces: name one, enter it for the length of a ``with`` block, list the host's.

A namespace is named by a path to its nsfs file: ``/proc/PID/ns/net`` (a container's process) or
``/run/netns/NAME`` (``ip netns add``). ``resolve("1234")`` and ``resolve("/run/netns/x")`` both work.

``entered(ns)`` moves only the *calling thread* into the namespace (setns(2) is per thread) and
always moves it back. Sockets opened inside keep the namespace they were opened in, which is how
a netlink socket dumps another namespace's TCP table.

Python 3.11 has no ``os.setns``, so setns(2) and statfs(2) are called through ``_libc``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from closewait.errors import ClosewaitError, NetnsError, NoSuchProcess, from_os_error

# ctypes is imported (by ``_libc``) only when a namespace is really entered or checked: every
# ``closewait scan`` imports this module, and the import costs milliseconds of a command that
# should finish in tens of milliseconds.

_NAMES = "give a pid, /proc/PID/ns/net or /run/netns/NAME"

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


def _setns(fd: int, path: str) -> None:
    from closewait.sources import _libc

    try:
        _libc.setns(fd, CLONE_NEWNET)
    except OSError as err:
        raise from_os_error(
            err, "entering a network namespace needs root (CAP_SYS_ADMIN)", path=path, path_error=NetnsError
        ) from err


def resolve(spec: str, *, proc_root: str = "/proc") -> Netns:
    """Turn ``--netns`` input (a pid, ``/proc/PID/ns/net`` or ``/run/netns/NAME``, or a bare name
    under /run/netns) into a Netns, or raise a one-line error."""
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
        # The common mistake gets the namespace's own words; every other errno is from_os_error's.
        raise NetnsError(f"{spec}: no such network namespace ({_NAMES})") from None
    except OSError as err:
        raise from_os_error(
            err, f"{spec[:80]}: not a network namespace ({_NAMES})", path=path, path_error=NetnsError
        ) from err
    if stat.S_ISDIR(st.st_mode) or not _is_netns(path):
        if pid is not None and _exited(pid, proc_root):
            raise NoSuchProcess(pid, f"pid {pid} has exited: no network namespace left to scan")
        raise NetnsError(f"{spec} is not a network namespace ({_NAMES})")
    return Netns(path=path, inode=st.st_ino)


def _exists(path: str) -> bool:
    try:
        return os.path.exists(path)
    except ValueError:  # an embedded NUL
        return False


def _exited(pid: int, proc_root: str) -> bool:
    """True when ``pid`` is gone or a zombie: its namespaces went with it, the pid still shows."""
    from closewait.sources.process import read_stat

    try:
        return read_stat(pid, proc_root).state in ("Z", "X")
    except ClosewaitError:
        return True


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
    from closewait.sources import _libc

    try:
        return _libc.statfs_type(path)
    except OSError:
        return 0  # not a namespace either way


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
        except FileNotFoundError:
            raise NetnsError(f"{ns.path}: the namespace is gone (its process exited or it was deleted)") from None
        except OSError as err:
            raise from_os_error(
                err, f"opening network namespace {ns.path}", path=ns.path, path_error=NetnsError
            ) from err
        try:
            # Pinned by inode: the path names whatever namespace is there now. A pid that exited and
            # was reused, or /run/netns/NAME deleted and created again, must not be followed silently.
            if os.fstat(target_fd).st_ino != ns.inode:
                raise NetnsError(
                    f"{ns.path}: the namespace is gone (the path now names another namespace: "
                    "its process exited and the pid was reused, or it was recreated)"
                )
            _setns(target_fd, ns.path)
        finally:
            os.close(target_fd)
        try:
            yield
        finally:
            _setns(own_fd, "/proc/thread-self/ns/net")
    finally:
        os.close(own_fd)


def discover(proc_root: str = "/proc") -> list[tuple[Netns, int]]:
    """Every network namespace some process is in: (namespace, lowest pid in it), deduplicated.

    Processes that vanish or cannot be read are skipped.
    """
    from closewait.sources.process import list_pids, ns_inode

    seen: dict[int, tuple[Netns, int]] = {}
    for pid in list_pids(proc_root):
        try:
            inode = ns_inode(pid, "net", proc_root)
        except ClosewaitError:
            continue
        if inode not in seen or pid < seen[inode][1]:
            seen[inode] = (Netns(path=f"{proc_root}/{pid}/ns/net", inode=inode), pid)
    return sorted(seen.values(), key=lambda item: item[1])
