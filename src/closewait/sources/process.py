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
scan reads the kernel.

Pitfall: pids are reused, so two reads of /proc/PID/... by number may be of two processes. A
descriptor on the directory (``open_process``) stays bound to the process it was opened on: files
read through it (``read_process_at``, its ``fd`` directory) are that process's, and once it has
exited they fail with ESRCH (``NoSuchProcess``) even when the pid names a new process.

Failures are ``errors.from_os_error``'s: a process that is gone is ``NoSuchProcess``, one whose
files this user may not read is ``AccessDenied``. A walk over every process (``owners.find_owners``,
``child_pids``) skips processes that exit while it runs instead. The host-wide descriptor walk itself
lives in ``owners.py``: it is the hot loop of a scan.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

from closewait.errors import (
    ClosewaitError,
    KernelDataError,
    NoSuchProcess,
    UsageError,
    access_denied,
    from_os_error,
)
from closewait.model import Process
from closewait.sources._procread import read_at

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


def parse_start_time(stat: bytes) -> int | None:
    """Only the start time (field 22) of a /proc/PID/stat line, read as ``parse_stat`` reads it;
    None when the line is malformed. For a caller that reads every process's stat for it alone
    (``owners._started_since``): a fifth of ``parse_stat``'s cost."""
    open_paren = stat.find(b"(")
    close_paren = stat.rfind(b")")
    if open_paren < 0 or close_paren < open_paren:
        return None
    rest = stat[close_paren + 2 :].split(None, 20)
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


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


def open_process(pid: int, proc_root: str = "/proc") -> int:
    """A descriptor on /proc/PID, bound to the process that has ``pid`` now (the caller closes it)."""
    try:
        return os.open(f"{proc_root}/{pid}", _DIRECTORY_FLAGS)
    except OSError as err:
        raise from_os_error(err, f"reading {proc_root}/{pid}", pid=pid) from err


def _read_at(dir_fd: int, pid: int, name: str) -> bytes:
    try:
        return read_at(dir_fd, name)
    except OSError as err:
        raise from_os_error(err, f"reading /proc/{pid}/{name}", pid=pid) from err


def read_process_at(dir_fd: int, pid: int) -> Process:
    """``read_process`` through ``open_process``'s descriptor: the process it was opened on, or
    NoSuchProcess if that one has exited (whatever process has its pid now)."""
    stat = _read_at(dir_fd, pid, "stat")
    cmdline = _read_at(dir_fd, pid, "cmdline")
    try:
        uid: int | None = os.fstat(dir_fd).st_uid
    except OSError:
        uid = None
    return process_from(pid, stat, cmdline, uid)


def process_from(pid: int, stat: bytes, cmdline: bytes, uid: int | None) -> Process:
    """The Process whose /proc/PID/stat and cmdline are these bytes, owned by ``uid``: what
    ``read_process_at`` read, or what a child process read for ``owner_check``. KernelDataError when
    the stat line cannot be parsed."""
    parsed = parse_stat(stat.decode("utf-8", "replace"))
    args = tuple(part.decode("utf-8", "replace") for part in cmdline.split(b"\0") if part)
    return Process(pid=pid, start_time=parsed.start_time, name=parsed.comm, cmdline=args, uid=uid)


def read_process(pid: int, proc_root: str = "/proc") -> Process:
    """Name, cmdline, start time and uid of ``pid``. Raises NoSuchProcess if it is gone.

    Its files are read through one ``open_process`` descriptor, so they are all one process's.
    """
    dir_fd = open_process(pid, proc_root)
    try:
        return read_process_at(dir_fd, pid)
    finally:
        os.close(dir_fd)


def hidepid_option(proc_root: str = "/proc") -> str | None:
    """The ``hidepid=`` option ``proc_root`` is mounted with (``hidepid=invisible``, ``hidepid=2``),
    None when it has none or is no mount point: why another user's process may not show under it."""
    try:
        root = os.path.realpath(proc_root)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    found: str | None = None
    for line in lines:  # the last mount on the path is the one seen there
        fields = line.split()
        if len(fields) < 5 or fields[4] != root or " - proc " not in line:
            continue
        options = line.split(" - ", 1)[1].split()[-1].split(",")
        found = next((option for option in options if option.startswith("hidepid=")), None)
    return found


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
    """Check each pid exists now, has not exited, and its descriptors can be read (``identify_pids``)."""
    return frozenset(identify_pids(pids, proc_root))


def identify_pids(pids: Iterable[int], proc_root: str = "/proc") -> dict[int, int]:
    """Check each pid exists now and its descriptors can be read; pid -> its start time.

    Raises NoSuchProcess for the first that does not exist or has exited (a zombie: its descriptors
    are closed, it only waits for its parent), AccessDenied for the first whose /proc/PID/fd this
    user may not read (another user's process, without root): checked before the kernel's socket
    table is read, so the answer does not depend on whether any socket matched. The start times let
    a later walk tell these processes from new ones given the same pid.
    """
    result: dict[int, int] = {}
    for pid in sorted(frozenset(pids)):
        if pid <= 0:
            raise UsageError(f"pid {pid} is not a process id")
        stat = read_stat(pid, proc_root)
        if stat.state in _EXITED_STATES:
            raise NoSuchProcess(pid, f"pid {pid} has exited (a zombie: its descriptors are closed)")
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
        result[pid] = stat.start_time
    return result


#: /proc/PID/stat states of a process that has exited: Z (zombie), X (dead, being removed).
_EXITED_STATES = frozenset({"Z", "X", "x"})


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
    "hidepid_option",
    "identify_pids",
    "list_pids",
    "ns_inode",
    "open_process",
    "parse_stat",
    "parse_tgid",
    "read_cmdline",
    "read_comm",
    "read_process",
    "read_process_at",
    "read_stat",
    "read_tgid",
    "read_uid",
    "set_child_subreaper",
    "socket_fds",
    "socket_inode",
    "validate_pids",
]
