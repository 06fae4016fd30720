"""Network namespaces: name one, enter it for the length of a ``with`` block, list the host's.

A namespace is named by a path to its nsfs file: ``/proc/PID/ns/net`` (a container's process) or
``/run/netns/NAME`` (``ip netns add``). ``resolve("1234")`` and ``resolve("/run/netns/x")`` both work.

``entered(ns)`` moves only the *calling thread* into the namespace (setns(2) is per thread) and
always moves it back. Sockets opened inside keep the namespace they were opened in, which is how
a netlink socket dumps another namespace's TCP table.

A long-running caller (``watch``, the exporter) ``pin()``s the namespace it was given: an open
descriptor keeps that namespace alive, so its inode cannot be handed to a new namespace, and each
``entered()`` checks that the path still names it. A pid that exited (and was maybe reused), or
/run/netns/NAME deleted and created again, is then "gone" (``NetnsGone``), never silently followed.

``survey()`` lists the namespaces processes are in, and also those it could not read: without
root the /proc/PID/ns/net links of other users' processes are behind the ptrace access check, but
/proc/PID/net/dev is not, and its inode is one per namespace, so the namespaces skipped can still be
counted (the exporter reports partial ``--all-netns`` coverage with it).

Python 3.11 has no ``os.setns``, so setns(2) and statfs(2) are called through ``_libc``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import field

from closewait.errors import (
    ACCESS_ERRNOS,
    AccessDenied,
    ClosewaitError,
    NetnsError,
    NetnsGone,
    NoSuchProcess,
    from_os_error,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from dataclasses import dataclass
else:
    # Every scan imports this module and uses none of its classes: their dataclass code is
    # compiled on first use (closewait/_frozen.py), not at import (~1.5 ms).
    from closewait._frozen import dataclass

# ctypes is imported (by ``_libc``) only when a namespace is really entered or checked: every
# ``closewait scan`` imports this module, and the import costs milliseconds of a command that
# should finish in tens of milliseconds.

_NAMES = "give a pid, /proc/PID/ns/net or /run/netns/NAME"

CLONE_NEWNET = 0x40000000
NSFS_MAGIC = 0x6E736673


@dataclass(frozen=True, slots=True)
class Netns:
    """A network namespace: the path that names it and its inode (what /proc/PID/ns/net links show).

    ``fd`` is set on a pinned copy (``pin()``): a descriptor open on the namespace itself.
    """

    path: str
    inode: int
    fd: int | None = field(default=None, compare=False, repr=False)

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
        if err.errno in ACCESS_ERRNOS:
            # A namespace that exists but may not be looked at: say so, not "not a network namespace".
            raise from_os_error(err, f"--netns {spec[:80]}: reading {path[:120]}") from err
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


def pin(ns: Netns) -> Netns:
    """``ns`` with a descriptor open on the namespace it resolved to (close it with ``unpin``).

    Raises ``NetnsGone`` if the path already names another namespace than ``ns.inode``.
    """
    fd = _open_checked(ns)
    return Netns(path=ns.path, inode=ns.inode, fd=fd)


def unpin(ns: Netns | None) -> None:
    """Close the descriptor of a pinned namespace (no-op for None or an unpinned one)."""
    if ns is not None and ns.fd is not None:
        os.close(ns.fd)


def _gone(ns: Netns, why: str) -> NetnsGone:
    return NetnsGone(f"{ns.path}: the namespace is gone ({why})")


def _open_checked(ns: Netns) -> int:
    """A descriptor on the namespace ``ns.path`` names now, which must be the one of ``ns.inode``."""
    try:
        fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _gone(ns, "its process exited or it was deleted") from None
    except OSError as err:
        raise from_os_error(err, f"opening network namespace {ns.path}", path=ns.path, path_error=NetnsError) from err
    # Pinned by inode: the path names whatever namespace is there now. A pid that exited and was
    # reused, or /run/netns/NAME deleted and created again, must not be followed silently.
    if os.fstat(fd).st_ino != ns.inode:
        os.close(fd)
        raise _gone(
            ns, "the path now names another namespace: its process exited and the pid was reused, or it was recreated"
        )
    return fd


def _check_pinned(ns: Netns) -> None:
    """The path of pinned ``ns`` still names it. The pin keeps the namespace (and so its inode) alive,
    so an equal inode is the same namespace, not a new one that inherited the number."""
    try:
        inode = os.stat(ns.path).st_ino
    except FileNotFoundError:
        raise _gone(ns, "its process exited or it was deleted") from None
    except OSError as err:
        raise from_os_error(err, f"checking network namespace {ns.path}", path=ns.path, path_error=NetnsError) from err
    if inode != ns.inode:
        raise _gone(
            ns, "the path now names another namespace: its process exited and the pid was reused, or it was recreated"
        )


@contextmanager
def entered(ns: Netns | None) -> Iterator[None]:
    """Run the block with the calling thread inside ``ns`` (no-op for None or the current one).

    Raises ``NetnsGone`` when the path no longer names ``ns.inode``.
    """
    if ns is None:
        yield
        return
    if ns.fd is not None:
        _check_pinned(ns)
    own_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(own_fd).st_ino == ns.inode:
            yield
            return
        if ns.fd is not None:
            _setns(ns.fd, ns.path)
        else:
            target_fd = _open_checked(ns)
            try:
                _setns(target_fd, ns.path)
            finally:
                os.close(target_fd)
        try:
            yield
        finally:
            _setns(own_fd, "/proc/thread-self/ns/net")
    finally:
        os.close(own_fd)


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A network namespace only processes this user may not read are in."""

    #: The lowest pid in it.
    pid: int
    #: The inode of that pid's /proc/PID/net/dev: tells namespaces apart, is no nsfs inode.
    key: int
    #: Why its /proc/PID/ns/net could not be read (the kernel's refusal, worded by ``from_os_error``).
    reason: str


@dataclass(frozen=True, slots=True)
class Survey:
    """The network namespaces processes are in, as far as this user can tell.

    ``found``: (namespace, lowest pid in it) for each namespace whose /proc/PID/ns/net could be read.
    ``unreadable``: each further namespace that only processes this user may not read are in: it
    exists, but cannot be named, entered or scanned from here.
    """

    found: list[tuple[Netns, int]]
    unreadable: list[Unreadable]


def survey(proc_root: str = "/proc") -> Survey:
    """Every network namespace some process is in: readable ones deduplicated by inode, the others by
    the inode of their /proc/PID/net/dev (one per namespace, and readable without the ptrace check).

    Each is named by its ``/run/netns/NAME`` when ``ip netns add`` gave it one (``named_namespaces``),
    else by ``/proc/PID/ns/net`` of the lowest pid in it. Processes that vanish are skipped.
    """
    from closewait.sources.process import list_pids, ns_inode

    seen: dict[int, tuple[Netns, int]] = {}
    names: dict[int, str] | None = None  # read when a namespace is first seen
    pids_in: dict[int, list[int]] = {}
    refused: list[tuple[int, str]] = []
    for pid in sorted(list_pids(proc_root)):
        try:
            inode = ns_inode(pid, "net", proc_root)
        except AccessDenied as err:
            refused.append((pid, str(err)))
            continue
        except ClosewaitError:
            continue
        if inode not in seen:
            if names is None:
                names = named_namespaces(proc_root)
            path = names.get(inode) or f"{proc_root}/{pid}/ns/net"
            seen[inode] = (Netns(path=path, inode=inode), pid)
        pids_in.setdefault(inode, []).append(pid)
    unreadable: list[Unreadable] = []
    if refused:
        covered = {key for pids in pids_in.values() if (key := _net_key(pids, proc_root)) is not None}
        hidden: dict[int, Unreadable] = {}
        for pid, why in refused:  # lowest pid first
            key = _net_key([pid], proc_root)
            if key is not None and key not in covered and key not in hidden:
                hidden[key] = Unreadable(pid=pid, key=key, reason=why)
        unreadable = sorted(hidden.values(), key=lambda item: item.pid)
    return Survey(found=sorted(seen.values(), key=lambda item: item[1]), unreadable=unreadable)


#: Where ``ip netns add NAME`` keeps its names: a bind mount of the namespace's nsfs file each.
NAMED_DIR = "/run/netns"


def named_namespaces(proc_root: str = "/proc") -> dict[int, str]:
    """inode -> ``/run/netns/NAME`` of each named network namespace (the first name in sort order
    when one has several).

    A name is taken only when it is on the namespaces' own filesystem (nsfs, the device of this
    process's ``/proc/self/ns/net``): a file ``ip netns add`` created but failed to mount over, or
    anything else put there, is a tmpfs file whose inode number means nothing here. Nothing is an
    error: a host without names (or /run/netns unreadable) gives an empty map.
    """
    try:
        nsfs = os.stat(f"{proc_root}/self/ns/net").st_dev
        entries = sorted(os.listdir(NAMED_DIR))
    except OSError:
        return {}
    names: dict[int, str] = {}
    for entry in entries:
        path = f"{NAMED_DIR}/{entry}"
        try:
            info = os.stat(path)
        except OSError:
            continue  # deleted meanwhile, or not a namespace we may look at
        if info.st_dev == nsfs and stat.S_ISREG(info.st_mode):
            names.setdefault(info.st_ino, path)
    return names


def _net_key(pids: list[int], proc_root: str) -> int | None:
    """The inode of /proc/PID/net/dev of the first of ``pids`` still there: the same for every process
    of one network namespace, different between namespaces (None if all are gone)."""
    for pid in pids:
        try:
            return os.stat(f"{proc_root}/{pid}/net/dev").st_ino
        except OSError:
            continue
    return None


def discover(proc_root: str = "/proc") -> list[tuple[Netns, int]]:
    """Every network namespace some process is in that this user can read: (namespace, lowest pid
    in it), deduplicated. Processes that vanish or cannot be read are skipped (``survey()`` counts them)."""
    return survey(proc_root).found
