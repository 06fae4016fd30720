"""One process as /proc shows it: one parser per file, the procfs root a parameter everywhere.

    /proc/PID/stat      parse_stat, read_stat -> ProcStat (comm, state, ppid, start time)
    /proc/PID/comm      read_comm
    /proc/PID/cmdline   read_cmdline
    /proc/PID/status    parse_tgid, read_tgid (the process a thread id belongs to)
    /proc/PID/fd        socket_fds, fd_link, socket_inode (the text of a link to a socket)
    /proc/PID/ns/*      ns_inode
    /proc/PID itself    read_uid (its owner)
    /proc               list_pids, child_pids

``read_process`` composes a ``model.Process``; ``validate_pids`` checks pids a user named before a
scan reads the kernel. Failures are ``errors.from_os_error``'s: a process that is gone is
``NoSuchProcess``, one whose files this user may not read is ``AccessDenied``. A walk over every
process (``owners.find_owners``, ``child_pids``) skips processes that exit while it runs instead.
The host-wide descriptor walk itself lives in ``owners.py``: it is the hot loop of a scan.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

from closewait.errors import ClosewaitError, KernelDataError, UsageError, access_denied, from_os_error
from closewait.model import Process

SOCKET_LINK_PREFIX = "socket:["
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of /proc/PID/stat closewait uses (proc(5) numbers them 2, 3, 4 and 22)."""

    comm: str
    state: str
    ppid: int
    #: Clock ticks after boot: with the pid, what identifies a process (pids are reused).
    start_time: int


def parse_stat(text: str) -> ProcStat:
    """/proc/PID/stat's text. comm may contain spaces and parentheses, so it runs to the *last* ')'."""
    open_paren = text.find("(")
    close_paren = text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise KernelDataError(f"malformed /proc/PID/stat: {text[:80]!r}")
    comm = text[open_paren + 1 : close_paren]
    rest = text[close_paren + 2 :].split()
    # rest[0] is field 3 (state), rest[1] field 4 (ppid); starttime is field 22.
    if len(rest) < 20:
        raise KernelDataError(f"malformed /proc/PID/stat: {len(rest) + 2} fields")
    try:
        return ProcStat(comm=comm, state=rest[0], ppid=int(rest[1]), start_time=int(rest[19]))
    except ValueError:
        raise KernelDataError(f"malformed /proc/PID/stat: {' '.join(rest[:20])[:80]!r}") from None


def _read(pid: int, name: str, proc_root: str) -> bytes:
    path = f"{proc_root}/{pid}/{name}"
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise from_os_error(err, f"reading {path}", pid=pid) from err


def read_stat(pid: int, proc_root: str = "/proc") -> ProcStat:
    return parse_stat(_read(pid, "stat", proc_root).decode("utf-8", "replace"))


def read_comm(pid: int, proc_root: str = "/proc") -> str:
    """The process's name (at most 15 bytes, what ``ps -o comm`` shows)."""
    return _read(pid, "comm", proc_root).decode("utf-8", "replace").rstrip("\n")


def read_cmdline(pid: int, proc_root: str = "/proc") -> tuple[str, ...]:
    """argv; empty for a kernel thread or a zombie."""
    raw = _read(pid, "cmdline", proc_root)
    return tuple(part.decode("utf-8", "replace") for part in raw.split(b"\0") if part)


def parse_tgid(text: str) -> int:
    """The ``Tgid:`` line of /proc/PID/status: the process a thread id belongs to."""
    for line in text.splitlines():
        if line.startswith("Tgid:"):
            try:
                return int(line[5:])
            except ValueError:
                break
    raise KernelDataError(f"no Tgid in /proc/PID/status: {text[:80]!r}")


def read_tgid(pid: int, proc_root: str = "/proc") -> int:
    """The process id of ``pid``, which may be any of its threads' ids."""
    return parse_tgid(_read(pid, "status", proc_root).decode("utf-8", "replace"))


def read_uid(pid: int, proc_root: str = "/proc") -> int:
    """The (real) uid that owns ``pid``: the owner of its /proc directory."""
    try:
        return os.stat(f"{proc_root}/{pid}").st_uid
    except OSError as err:
        raise from_os_error(err, f"reading {proc_root}/{pid}", pid=pid) from err


def read_process(pid: int, proc_root: str = "/proc") -> Process:
    """Name, cmdline, start time and uid of ``pid``. Raises NoSuchProcess if it is gone."""
    stat = read_stat(pid, proc_root)
    cmdline = read_cmdline(pid, proc_root)
    uid: int | None
    try:
        uid = read_uid(pid, proc_root)
    except ClosewaitError:
        uid = None
    return Process(pid=pid, start_time=stat.start_time, name=stat.comm, cmdline=cmdline, uid=uid)


def list_pids(proc_root: str = "/proc") -> list[int]:
    """Every process id under ``proc_root``."""
    try:
        names = os.listdir(proc_root)
    except OSError as err:
        raise from_os_error(err, f"listing {proc_root}", path=proc_root) from err
    return [int(name) for name in names if name.isdigit()]


def child_pids(parent: int, proc_root: str = "/proc") -> list[int]:
    """The processes whose parent is ``parent`` now (processes that exit meanwhile are skipped)."""
    children = []
    for pid in list_pids(proc_root):
        try:
            if read_stat(pid, proc_root).ppid == parent:
                children.append(pid)
        except ClosewaitError:
            continue
    return children


def descriptors_denied(pid: int) -> str:
    """The one-line refusal to read ``pid``'s descriptors, worded as ``from_os_error`` words every refusal."""
    return str(access_denied(f"cannot read the descriptors of pid {pid}"))


def socket_inode(link: str) -> int | None:
    """The inode of a ``/proc/PID/fd`` link's text when it names a socket (``socket:[INODE]``)."""
    if link.startswith(SOCKET_LINK_PREFIX) and link.endswith("]"):
        return int(link[len(SOCKET_LINK_PREFIX) : -1])
    return None


def _open_fd_dir(pid: int, proc_root: str) -> int:
    try:
        return os.open(f"{proc_root}/{pid}/fd", _DIRECTORY_FLAGS)
    except OSError as err:
        raise from_os_error(err, f"cannot read the descriptors of pid {pid}", pid=pid) from err


def socket_fds(pid: int, proc_root: str = "/proc") -> dict[int, int]:
    """fd -> socket inode for every socket descriptor of ``pid``.

    Raises NoSuchProcess if the process is gone and AccessDenied if its fds cannot be read.
    """
    dir_fd = _open_fd_dir(pid, proc_root)
    result: dict[int, int] = {}
    try:
        for name in os.listdir(dir_fd):
            try:
                link = os.readlink(name, dir_fd=dir_fd)
            except OSError:
                continue  # closed since listing
            inode = socket_inode(link)
            if inode is not None:
                result[int(name)] = inode
    except OSError as err:
        raise from_os_error(err, f"cannot read the descriptors of pid {pid}", pid=pid) from err
    finally:
        os.close(dir_fd)
    return result


def fd_link(pid: int, fd: int, proc_root: str = "/proc") -> str | None:
    """What descriptor ``fd`` of ``pid`` refers to (``socket:[123]``, a path), None if it is not open."""
    try:
        return os.readlink(f"{proc_root}/{pid}/fd/{fd}")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as err:
        raise from_os_error(err, f"cannot read the descriptors of pid {pid}", pid=pid) from err


def ns_inode(pid: int, kind: str = "net", proc_root: str = "/proc") -> int:
    """The inode of the ``kind`` namespace ``pid`` is in (what ``/proc/PID/ns/KIND`` links show)."""
    path = f"{proc_root}/{pid}/ns/{kind}"
    try:
        return os.stat(path).st_ino
    except OSError as err:
        raise from_os_error(err, f"reading {path}", pid=pid) from err


def validate_pids(pids: Iterable[int], proc_root: str = "/proc") -> frozenset[int]:
    """Check each pid exists now and its descriptors can be read.

    Raises NoSuchProcess for the first that does not exist, AccessDenied for the first whose
    /proc/PID/fd this user may not read (another user's process, without root): checked before the
    kernel's socket table is read, so the answer does not depend on whether any socket matched.
    """
    result = frozenset(pids)
    for pid in sorted(result):
        if pid <= 0:
            raise UsageError(f"pid {pid} is not a process id")
        read_stat(pid, proc_root)
        dir_fd = _open_fd_dir(pid, proc_root)
        try:
            # Listing may be allowed (root, CAP_DAC_READ_SEARCH) while every link is behind the
            # ptrace access check: read one link too. A link closed since listing is fine.
            for name in os.listdir(dir_fd)[:1]:
                with contextlib.suppress(FileNotFoundError):
                    os.readlink(name, dir_fd=dir_fd)
        except OSError as err:
            raise from_os_error(err, f"cannot read the descriptors of pid {pid}", pid=pid) from err
        finally:
            os.close(dir_fd)
    return result


def set_child_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (PR_SET_CHILD_SUBREAPER): a grandchild
    whose parent dies is re-parented here instead of to init, so it can still be found and ended."""
    from closewait.sources import _libc

    try:
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)
    except OSError as err:
        raise from_os_error(err, "becoming a child subreaper") from err


_PR_SET_CHILD_SUBREAPER = 36


def descriptor_after_close(fd: int) -> tuple[str, bool]:
    """What the kernel says of this process's ``fd`` (just closed by the caller): the errno name
    ``fcntl(F_GETFD)`` fails with (``"none (fd still valid)"`` if it does not), and whether
    ``/proc/self/fd/FD`` still exists. The lab's proof that close() frees the descriptor at once."""
    import errno
    import fcntl

    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
        fd_errno = "none (fd still valid)"
    except OSError as err:
        fd_errno = errno.errorcode.get(err.errno or 0, str(err.errno))
    return fd_errno, os.path.exists(f"/proc/self/fd/{fd}")


__all__ = [
    "ProcStat",
    "child_pids",
    "descriptor_after_close",
    "descriptors_denied",
    "fd_link",
    "list_pids",
    "ns_inode",
    "parse_stat",
    "parse_tgid",
    "read_cmdline",
    "read_comm",
    "read_process",
    "read_stat",
    "read_tgid",
    "read_uid",
    "set_child_subreaper",
    "socket_fds",
    "socket_inode",
    "validate_pids",
]
