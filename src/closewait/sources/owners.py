"""Which processes hold which sockets: socket inode -> every (process, fd) referring to it.

The kernel keeps no socket -> process index, so this walks /proc/PID/fd like ``ss -p`` and ``lsof``
do. The walk is the expensive part of a scan, so it does the least it can:

- it resolves only the inodes it is asked for (a socket may have owners in several processes, so
  every process is visited), or only the pids the caller names;
- it lists each fd directory through one directory descriptor and ``readlinkat`` on it, so the
  kernel does not re-resolve ``/proc/PID/fd`` for every link;
- it compares link text before converting anything, and reads a process's stat and cmdline only
  when that process holds a wanted socket.

Processes that exit mid-walk are skipped. Directories it may not read are counted and reported as
one line ("owner unknown: permission denied ..."), never raised.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field

from closewait.errors import AccessDenied, KernelDataError, NoSuchProcess, UsageError
from closewait.model import Owner, Process

_SOCKET_PREFIX = "socket:["

#: How owners can be found: ``auto`` (bpf when the kernel allows it, else procfs), ``bpf`` (one
#: kernel pass over every fd table, ``sources/bpf.py``) or ``procfs`` (the /proc/PID/fd walk).
OWNER_SOURCES = ("auto", "bpf", "procfs")


def check_owner_source(method: str) -> str:
    """``method`` if it is one of ``OWNER_SOURCES``, else UsageError."""
    if method not in OWNER_SOURCES:
        raise UsageError(f"unknown owner source {method!r} (one of {', '.join(OWNER_SOURCES)})")
    return method


@dataclass
class OwnerMap:
    """The result of a walk: owners by inode, and what could not be read."""

    owners: dict[int, list[Owner]] = field(default_factory=dict)
    denied_pids: list[int] = field(default_factory=list)
    #: Every process that holds at least one wanted socket, by pid.
    processes: dict[int, Process] = field(default_factory=dict)
    #: How the owners were found: "bpf" or "procfs".
    method: str = "procfs"
    #: Why the BPF iterator was not used, when ``auto`` fell back to procfs (None otherwise).
    bpf_unavailable: str | None = None

    def errors(self) -> list[str]:
        if not self.denied_pids:
            return []
        n = len(self.denied_pids)
        processes = f"{n} process{'es' if n != 1 else ''}"
        if os.geteuid() == 0:
            # Root is refused too by processes the ptrace access check protects from this one
            # (another user namespace's init, an LSM policy): say so instead of "run as root".
            shown = ", ".join(str(pid) for pid in self.denied_pids[:5]) + (", ..." if n > 5 else "")
            return [
                f"owner unknown: the kernel refused to show the descriptors of {processes} even to root (pid {shown})"
            ]
        return [
            f"owner unknown: permission denied, run as root (cannot read the descriptors of {processes} of other users)"
        ]


def descriptors_denied(pid: int) -> str:
    """The one-line reason a process's descriptors could not be read, with the fix that applies."""
    if os.geteuid() == 0:
        return f"cannot read the descriptors of pid {pid}: the kernel refuses it even to root (a protected process)"
    return f"cannot read the descriptors of pid {pid}: permission denied, run as root"


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def parse_stat(text: str) -> tuple[str, int]:
    """(comm, start time in clock ticks) from the text of /proc/PID/stat.

    comm may contain spaces and parentheses, so it runs to the *last* ')'.
    """
    open_paren = text.find("(")
    close_paren = text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise KernelDataError(f"malformed /proc/PID/stat: {text[:80]!r}")
    comm = text[open_paren + 1 : close_paren]
    rest = text[close_paren + 2 :].split()
    # rest[0] is field 3 (state); starttime is field 22.
    if len(rest) < 20:
        raise KernelDataError(f"malformed /proc/PID/stat: {len(rest) + 2} fields")
    try:
        return comm, int(rest[19])
    except ValueError:
        raise KernelDataError(f"malformed start time in /proc/PID/stat: {rest[19]!r}") from None


def read_process(pid: int, proc_root: str = "/proc") -> Process:
    """Name, cmdline, start time and uid of ``pid``. Raises NoSuchProcess if it is gone."""
    base = f"{proc_root}/{pid}"
    try:
        comm, start_time = parse_stat(_read_bytes(f"{base}/stat").decode("utf-8", "replace"))
        raw_cmdline = _read_bytes(f"{base}/cmdline")
        uid: int | None
        try:
            uid = os.stat(base).st_uid
        except OSError:
            uid = None
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(pid) from None
    except PermissionError as err:
        raise AccessDenied(f"cannot read {base}: permission denied") from err
    cmdline = tuple(part.decode("utf-8", "replace") for part in raw_cmdline.split(b"\0") if part)
    return Process(pid=pid, start_time=start_time, name=comm, cmdline=cmdline, uid=uid)


def thread_group_leader(pid: int, proc_root: str = "/proc") -> int | None:
    """The process (Tgid in /proc/PID/status) that ``pid`` belongs to: ``pid`` itself for a process,
    another pid for a thread id. None when the status cannot be read (no such pid, hidepid)."""
    try:
        status = _read_bytes(f"{proc_root}/{pid}/status")
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(b"Tgid:"):
            value = line[5:].strip()
            return int(value) if value.isdigit() else None
    return None


def list_pids(proc_root: str = "/proc") -> list[int]:
    return [int(name) for name in os.listdir(proc_root) if name.isdigit()]


def socket_inode(link: str) -> int | None:
    """The inode of a ``/proc/PID/fd`` link's text when it names a socket (``socket:[INODE]``)."""
    if link.startswith(_SOCKET_PREFIX) and link.endswith("]"):
        return int(link[len(_SOCKET_PREFIX) : -1])
    return None


def socket_fds(pid: int, proc_root: str = "/proc") -> dict[int, int]:
    """fd -> socket inode for every socket descriptor of ``pid``.

    Raises NoSuchProcess if the process is gone and AccessDenied if its fds cannot be read.
    """
    try:
        dir_fd = os.open(f"{proc_root}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(pid) from None
    except PermissionError as err:
        raise AccessDenied(descriptors_denied(pid)) from err
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
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(pid) from None
    finally:
        os.close(dir_fd)
    return result


def find_owners(
    inodes: Collection[int],
    *,
    pids: Iterable[int] | None = None,
    proc_root: str = "/proc",
    method: str = "auto",
) -> OwnerMap:
    """Every (process, fd) holding one of ``inodes``.

    ``pids`` restricts the lookup to those processes (a /proc walk of just them: much faster when
    the caller knows them). ``method`` is one of ``OWNER_SOURCES``: ``auto`` asks the kernel
    through a BPF iterator when it can (root, a kernel with BTF; see ``sources/bpf.py``) and walks
    /proc otherwise; ``bpf`` raises ``BpfUnavailable`` instead of falling back; ``procfs`` always
    walks. Only the walk can meet processes it may not read (``denied_pids``): the iterator runs as
    root and sees every fd table.

    A full walk reads one link per open descriptor on the host (210,000 on a busy one), and each
    readlink costs the kernel a few microseconds (a dentry lookup, a ptrace access check and a
    d_path). The syscalls release the GIL, so on a machine with two or more usable CPUs the walk
    runs in ``_walk_threads(n)`` threads pulling pids from one shared list.
    """
    check_owner_source(method)
    wanted = frozenset(i for i in inodes if i)
    result = OwnerMap()
    if not wanted:
        return result
    found: list[tuple[int, list[tuple[int, int]]]] = []
    if method != "procfs" and pids is None and proc_root == "/proc":
        from closewait.sources import bpf

        try:
            holders = bpf.socket_holders(wanted)
        except bpf.BpfUnavailable as err:
            if method == "bpf":
                raise
            result.bpf_unavailable = str(err)
        else:
            result.method = "bpf"
            by_pid: dict[int, list[tuple[int, int]]] = {}
            for inode, pairs in holders.items():
                for pid, fd in pairs:
                    by_pid.setdefault(pid, []).append((fd, inode))
            found = sorted((pid, sorted(hits)) for pid, hits in by_pid.items())
    elif method == "bpf":
        raise UsageError("the BPF owner lookup reads the whole host: it cannot be combined with --pid")
    if result.method == "procfs":
        if pids is None:
            try:
                pids = list_pids(proc_root)
            except OSError as err:
                raise AccessDenied(f"cannot list {proc_root}: {err.strerror}") from err
        pid_list = list(pids)
        # Compare the link text itself: one hash lookup per descriptor, no parsing of the
        # 200,000 links that are other sockets.
        wanted_links = {f"{_SOCKET_PREFIX}{inode}]": inode for inode in wanted}
        _walk_parallel(iter(pid_list), proc_root, wanted_links, found, result.denied_pids, _walk_threads(len(pid_list)))
        found.sort()
        result.denied_pids.sort()
    for pid, hits in found:
        try:
            process = read_process(pid, proc_root)
        except NoSuchProcess:
            continue
        except AccessDenied:
            process = Process(pid=pid, start_time=0, name="?", cmdline=())
        result.processes[pid] = process
        for fd, inode in hits:
            result.owners.setdefault(inode, []).append(Owner(process, fd))
    for owner_list in result.owners.values():
        owner_list.sort(key=lambda o: (o.process.pid, o.fd))
    return result


#: Below this many processes a second thread costs more than it saves.
_PARALLEL_MIN_PIDS = 64
_MAX_WALK_THREADS = 2


def _walk_threads(n_pids: int) -> int:
    if n_pids < _PARALLEL_MIN_PIDS:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(_MAX_WALK_THREADS, cpus))


def _walk_parallel(
    pids: Iterator[int],
    proc_root: str,
    wanted_links: dict[str, int],
    found: list[tuple[int, list[tuple[int, int]]]],
    denied: list[int],
    threads: int,
) -> None:
    """Run ``_walk`` in ``threads`` threads (the caller's included) over one shared pid iterator.

    ``next()`` on a list iterator and ``list.append`` are atomic under the GIL, so the threads
    share them without a lock. An unexpected exception in a helper thread is re-raised here.
    """
    if threads <= 1:
        _walk(pids, proc_root, wanted_links, found, denied)
        return
    import threading

    # Biggest fd tables first, so no thread is left with one huge process at the end.
    pids = iter(_largest_first(pids, proc_root))

    failures: list[BaseException] = []

    def run() -> None:
        try:
            _walk(pids, proc_root, wanted_links, found, denied)
        except BaseException as err:  # re-raised in the caller's thread below
            failures.append(err)

    helpers = [threading.Thread(target=run, name=f"closewait-walk-{i}", daemon=True) for i in range(threads - 1)]
    for helper in helpers:
        helper.start()
    try:
        _walk(pids, proc_root, wanted_links, found, denied)
    finally:
        for helper in helpers:
            helper.join()
    if failures:
        raise failures[0]


def _largest_first(pids: Iterable[int], proc_root: str) -> list[int]:
    """``pids`` by descending number of open fds (``st_size`` of /proc/PID/fd, Linux >= 6.2; on older
    kernels it is 0 and the order is kept). One stat per process, no fd is read here."""
    sized: list[tuple[int, int]] = []
    for pid in pids:
        try:
            size = os.stat(f"{proc_root}/{pid}/fd").st_size
        except OSError:
            size = 0  # walked anyway; _walk sorts out vanished and unreadable processes
        sized.append((-size, pid))
    sized.sort()
    return [pid for _, pid in sized]


def _walk(
    pids: Iterator[int],
    proc_root: str,
    wanted_links: dict[str, int],
    found: list[tuple[int, list[tuple[int, int]]]],
    denied: list[int],
) -> None:
    """Read every fd link of each pid; record (pid, [(fd, inode), ...]) for wanted sockets."""
    readlink = os.readlink
    listdir = os.listdir
    open_ = os.open
    close = os.close
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    wanted_get = wanted_links.get
    for pid in pids:
        try:
            dir_fd = open_(f"{proc_root}/{pid}/fd", flags)
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            continue  # exited since listing
        except PermissionError:
            denied.append(pid)
            continue
        hits: list[tuple[int, int]] = []
        try:
            for name in listdir(dir_fd):
                try:
                    inode = wanted_get(readlink(name, dir_fd=dir_fd))
                except PermissionError:
                    # The directory was listable (CAP_DAC_READ_SEARCH) but the links are behind the
                    # ptrace access check, which refuses every link of this process alike.
                    denied.append(pid)
                    break
                except OSError:
                    continue  # closed since listing
                if inode is not None:
                    hits.append((int(name), inode))
        except (FileNotFoundError, ProcessLookupError):
            continue
        except PermissionError:
            denied.append(pid)
            continue
        finally:
            close(dir_fd)
        if hits:
            found.append((pid, hits))
