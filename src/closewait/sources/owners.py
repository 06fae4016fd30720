"""Which processes hold which sockets: socket inode -> every (process, fd) referring to it.

The kernel keeps no socket -> process index, so this walks /proc/PID/fd like ``ss -p`` and ``lsof``
do. The walk is the expensive part of a scan, so it does the least it can:

- it resolves only the inodes it is asked for (a socket may have owners in several processes, so
  every process is visited), or only the pids the caller names;
- it lists each fd directory through one directory descriptor and ``readlinkat`` on it, so the
  kernel does not re-resolve ``/proc/PID/fd`` for every link;
- it compares link text before converting anything, and reads a process's stat and cmdline only
  when that process holds a wanted socket.

Pitfall: pids are reused. A process's stat and cmdline are read through the descriptor its fd
directory was walked with (``..`` of it is that process's /proc/PID), which stays bound to the
process it was opened on: a process that exits between its fd walk and its name is skipped, never
shown under the name of a new process that got its pid. Owners from the BPF iterator come with the
start time the kernel saw for their process, and are kept only if the process whose name is read
through /proc/PID has that start time: one stat read per process instead of a readlink per fd.

Processes that exit mid-walk are skipped (a pid the caller named raises ``NoSuchProcess``).
Directories it may not read are counted and reported as one line ("owner unknown: permission
denied ..."), never raised. One process's files (stat, cmdline, a single fd directory) are read by
``process.py``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from closewait._records import make_owner
from closewait.errors import AccessDenied, ClosewaitError, KernelDataError, NoSuchProcess, UsageError
from closewait.model import Owner, Process
from closewait.sources.owner_cache import OwnerCache, boot_ticks
from closewait.sources.process import (
    SOCKET_LINK_PREFIX,
    descriptors_denied,
    list_pids,
    parse_start_time,
    process_from,
    read_process_at,
    socket_inode,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from closewait.sources.owner_cache import Verified
    from closewait.sources.owner_check import Reads

# descriptors_denied and socket_inode are imported by callers from here too.
__all__ = [
    "OWNER_SOURCES",
    "OwnerMap",
    "check_owner_source",
    "descriptors_denied",
    "find_owners",
    "socket_inode",
]

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
    #: How the owners were found: "bpf", "procfs", or "cache" (a recent full pass, re-checked).
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


def find_owners(
    inodes: Collection[int],
    *,
    pids: Iterable[int] | None = None,
    proc_root: str = "/proc",
    method: str = "auto",
    start_times: Mapping[int, int] | None = None,
    cookies: Mapping[int, int] | None = None,
    cache: OwnerCache | None = None,
    name: Callable[[Process], Process] | None = None,
) -> OwnerMap:
    """Every (process, fd) holding one of ``inodes``.

    ``name``, when given, is called once per holding process found and its answer is the
    ``Owner.process`` of that process's owners (``scan`` names each process's workload this way,
    once per process instead of once per socket).

    ``pids`` restricts the lookup to those processes (a /proc walk of just them: much faster when
    the caller knows them). ``method`` is one of ``OWNER_SOURCES``: ``auto`` asks the kernel
    through a BPF iterator when it can (root, a kernel with BTF; see ``sources/bpf.py``) and walks
    /proc otherwise; ``bpf`` raises ``BpfUnavailable`` instead of falling back; ``procfs`` always
    walks. Only the walk can meet processes it may not read (``denied_pids``): the iterator runs as
    root and sees every fd table.

    ``start_times`` (pid -> start time, from ``process.identify_pids``) are the processes the caller
    named in ``pids``: one that has exited, or whose pid now names a process with another start
    time, raises ``NoSuchProcess`` instead of being skipped (an empty answer for it would be wrong).

    A full walk reads one link per open descriptor on the host (210,000 on a busy one), and each
    readlink costs the kernel a few microseconds (a dentry lookup, a ptrace access check and a
    d_path). The syscalls release the GIL, so on a machine with two or more usable CPUs the walk
    runs in ``_walk_threads(n)`` threads pulling pids from one shared list.

    ``cache`` (with ``cookies``, inode -> socket cookie from the dump) lets ``auto`` answer from
    what a full BPF pass found less than ``cache.max_age`` seconds ago, re-checked first
    (``_from_cache``; ``method`` "cache"; a few sockets it has not seen are looked for in the fd
    tables of the processes it names, ``_new_holders``), and keeps what a full pass finds, and those
    new sockets. ``bpf`` and ``procfs`` always look afresh.
    """
    check_owner_source(method)
    wanted = frozenset(inodes)
    if 0 in wanted:
        wanted = wanted - {0}
    result = OwnerMap()
    if cache is not None:
        _wait_for_check(cache)  # a re-check started meanwhile (a thread, a child): ended, whatever is used
    if not wanted:
        return result
    found: list[_Found] | None = None
    whole_host = pids is None and proc_root == "/proc"
    wanted_cookies: Mapping[int, int] = {}
    if cookies and cookies.keys() == wanted:
        wanted_cookies = cookies  # the usual case, without a copy
    elif cookies:
        wanted_cookies = {inode: cookies[inode] for inode in wanted if inode in cookies}
    if cache is not None and method == "auto" and whole_host and len(wanted_cookies) == len(wanted):
        split = cache.split(wanted_cookies)
        checked = None
        if split is not None and split[0] and len(split[1]) <= _NEW_MAX_SOCKETS:
            checked = _from_cache(split[0], cache, frozenset(split[1]))
        if checked is not None:
            found, grew = checked
            result.method = "cache"
            # Keep only what is asked about now, the new sockets too; the age stays the last full pass's.
            if grew or len(cache.sockets) != len(wanted_cookies):
                cache.remember(cache.pass_ticks, wanted_cookies, _kept(found))
                cache.save()
    if found is None and method != "procfs" and whole_host:
        from closewait.sources import bpf

        try:
            asked_at = boot_ticks()
            holders = bpf.socket_holders(wanted)
        except bpf.BpfUnavailable as err:
            if method == "bpf":
                raise
            result.bpf_unavailable = str(err)
        else:
            result.method = "bpf"
            found = _identify_holders(holders, proc_root)
            if cache is not None and len(wanted_cookies) == len(wanted):
                kept = _kept(found)
                # A socket the kernel saw holders of, none of which could be identified (they
                # exited, or their stat may not be read), is not kept as "held by nobody".
                cache.remember(
                    asked_at, {i: c for i, c in wanted_cookies.items() if i in kept or i not in holders}, kept
                )
                cache.save()
    elif method == "bpf" and not whole_host:
        raise UsageError("the BPF owner lookup reads the whole host: it cannot be combined with --pid")
    if found is None:
        found = []
        if pids is None:
            pids = list_pids(proc_root)
        pid_list = list(pids)
        # Compare the link text itself: one hash lookup per descriptor, no parsing of the
        # 200,000 links that are other sockets.
        wanted_links = {f"{SOCKET_LINK_PREFIX}{inode}]": inode for inode in wanted}
        walk = _Walk(proc_root, wanted_links, frozenset(start_times or ()), found, result.denied_pids, [])
        _walk_parallel(iter(pid_list), walk, _walk_threads(len(pid_list)))
        result.denied_pids.sort()
        _check_named(start_times or {}, walk)
    result.owners = _owners_by_inode(found, name)
    return result


def _owners_by_inode(found: list[_Found], name: Callable[[Process], Process] | None) -> dict[int, list[Owner]]:
    """inode -> its owners in (pid, fd) order, from what a walk, the pass or the cache found, each
    process passed through ``name`` once first.

    This runs once per owner fd (5,000 on the benchmark host): the Owners come from the fast
    constructor, and only a socket with several owners is sorted (one owner is in order already).
    """
    owners: dict[int, list[Owner]] = {}
    get = owners.get
    for _pid, found_process, hits in sorted(found, key=lambda item: item[0]):
        process = name(found_process) if name is not None and hits else found_process
        for fd, inode in hits:
            owner_list = get(inode)
            if owner_list is None:
                owners[inode] = [make_owner(process, fd)]
            else:
                owner_list.append(make_owner(process, fd))
    for owner_list in owners.values():
        if len(owner_list) > 1:
            owner_list.sort(key=lambda o: (o.process.pid, o.fd))
    return owners


#: What the walk found in one process: (pid, the process, [(fd, inode), ...]).
_Found = tuple[int, Process, list[tuple[int, int]]]


@dataclass
class _Walk:
    """What a walk reads with, and where its threads put what they find (list.append is atomic)."""

    proc_root: str
    wanted_links: dict[str, int]
    #: Pids whose identity is read even when they hold no wanted socket (the named ones).
    identify: frozenset[int]
    found: list[_Found]
    denied: list[int]
    #: Pids that exited while the walk ran.
    gone: list[int]


def _check_named(start_times: Mapping[int, int], walk: _Walk) -> None:
    """A named pid that exited during the walk, or names another process than the one validated,
    is NoSuchProcess: skipping it would answer "holds no such socket" for a process not looked at."""
    if not start_times:
        return
    seen = {pid: process for pid, process, _ in walk.found}
    for pid in sorted(start_times):
        process = seen.get(pid)
        if process is None and pid in walk.denied:
            continue  # the caller reports the refusal
        if process is None:
            raise NoSuchProcess(pid, f"pid {pid} has exited")
        if process.start_time and process.start_time != start_times[pid]:
            raise NoSuchProcess(
                pid, f"pid {pid} has exited and its pid now names another process ({process.name}): scan again"
            )


def _identified(dir_fd: int, pid: int) -> Process | None:
    """The process ``dir_fd`` (its /proc/PID) was opened on; None if it has exited since."""
    try:
        return read_process_at(dir_fd, pid)
    except NoSuchProcess:
        return None
    except AccessDenied:
        return Process(pid=pid, start_time=0, name="?", cmdline=())


def _identify_holders(holders: Mapping[int, Iterable[tuple[int, int, int]]], proc_root: str) -> list[_Found]:
    """The BPF iterator's owners (inode -> [(pid, fd, start time)]), each process read through one
    descriptor on its /proc/PID and kept only if it has the start time the kernel saw.

    Pitfall: a pid may be reused between the kernel's pass and this read; the new process must not
    be given the old one's sockets. Pid and start time identify a process, so one stat read per
    process decides for all its descriptors. A process whose stat may not be read (start time 0
    here) cannot be identified: its sockets show without that owner rather than under a process
    that may not hold them.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    found: list[_Found] = []
    for (pid, start_time), hits in sorted(_by_process(holders).items()):
        try:
            dir_fd = os.open(f"{proc_root}/{pid}", flags)
        except OSError:
            continue  # exited since the iterator ran
        try:
            process = _identified(dir_fd, pid)
        finally:
            os.close(dir_fd)
        if process is not None and process.start_time == start_time:
            found.append((pid, process, sorted(hits)))
    return found


def _by_process(holders: Mapping[int, Iterable[tuple[int, int, int]]]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """inode -> [(pid, fd, start time)] turned around: (pid, start time) -> [(fd, inode)]."""
    by_process: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for inode, found in holders.items():
        for pid, fd, start_time in found:
            by_process.setdefault((pid, start_time), []).append((fd, inode))
    return by_process


def _kept(found: list[_Found]) -> dict[int, list[tuple[int, int, int]]]:
    """inode -> [(pid, fd, start time)] of identified owners, as the cache keeps them."""
    holders: dict[int, list[tuple[int, int, int]]] = {}
    for pid, process, hits in found:
        for fd, inode in hits:
            holders.setdefault(inode, []).append((pid, fd, process.start_time))
    return holders


def check_cache(cache: OwnerCache) -> None:
    """Re-check every holder in ``cache`` now, in this process (``verify_in_process``), for
    ``find_owners`` to use (if the cache was not refilled since).

    The expensive part of answering from the cache, a readlink per fd, does not depend on the dump:
    ``start_check`` runs this in a thread while the caller dumps (the exporter), and the console
    has a child process read the same (``owner_check.fork_check``). Nothing is checked when the
    cache is empty or too old.
    """
    everything = cache.by_process()
    cache.verified = (cache.pass_ticks, verify_in_process(everything)) if everything else None


def start_check(cache: OwnerCache) -> None:
    """``check_cache`` in a thread of its own, for a caller whose dump runs meanwhile in this one.

    A long-running caller (the exporter) calls this right before ``scan()``: the readlinks of the
    re-check and the kernel's walk of its TCP table for the dump are both system time, so on two
    CPUs they overlap. ``find_owners`` waits for the thread before it reads the result; a re-check
    that failed leaves no result, and ``find_owners`` re-checks itself.
    """
    _wait_for_check(cache)  # one re-check at a time

    def run() -> None:
        try:
            check_cache(cache)
        except Exception:  # find_owners re-checks itself; this thread must not die loudly
            cache.verified = None

    cache.checking = threading.Thread(target=run, name="closewait-owner-check", daemon=True)
    cache.checking.start()


def _wait_for_check(cache: OwnerCache) -> None:
    checking = cache.checking
    if checking is not None:
        checking.join()
        cache.checking = None


def _from_cache(
    cached: Mapping[int, Sequence[tuple[int, int, int]]], cache: OwnerCache, new: frozenset[int] = frozenset()
) -> tuple[list[_Found], bool] | None:
    """The cached owners (inode -> holders), each re-checked, plus what processes started since the
    pass that filled the cache hold, and the holders of the ``new`` sockets (inodes the cache has not
    seen, ``_new_holders``), and whether any of those were added; None when a full pass is needed
    instead.

    Pitfall: a cached answer may be wrong in four ways, and each is checked:
    - the socket is another one: the caller matched the dump's cookie, unique per boot;
    - the process is another one (its pid reused): its start time is read, once per process;
    - the fd no longer holds the socket (closed, or moved with dup2): one readlink per fd, and a
      failure means a full pass, because someone else must hold the socket now;
    - another process holds it too: a process started since the pass (a fork inherits every fd) is
      walked here, up to ``_BORN_MAX_PIDS`` processes and ``_BORN_MAX_FDS`` descriptors (beyond, a
      full pass, whose cost does not grow with them); one that was running already and was
      handed the socket (SCM_RIGHTS) is seen by the next full pass, ``cache.max_age`` seconds after
      the last one at most.
    A socket whose every cached holder has exited needs a full pass too (someone else holds it now);
    one the pass found no holder for (a kernel socket) is taken as it was, like any other entry.
    """
    checked = cache.verified
    cache.verified = None
    if checked is None or checked[0] != cache.pass_ticks:
        verified, failed = _verify_holders(cached)
    else:
        verified, failed = checked[1]
    if not failed.isdisjoint(cached):
        return None
    found: list[_Found] = []
    # The processes that are the cached ones, pid -> start time: the others (exited, or their pid
    # now names a new process) are looked at by _started_since like any process started since the
    # pass.
    known = {pid: process.start_time for pid, process, _ in verified}
    held: set[int] = set()
    for _, _, hits in verified:
        held.update(map(_inode_of, hits))
    if held <= cached.keys():
        # Every fd re-checked holds a socket asked about (the usual case: the same sockets as the
        # pass's), so none is dropped; and a holder for each cached socket shows in the counts.
        found = [entry for entry in verified if entry[2]]
        if len(held) != len(cached) and not held.issuperset([inode for inode, holders in cached.items() if holders]):
            return None
    else:
        for pid, process, hits in verified:
            kept = [hit for hit in hits if hit[1] in cached]
            if kept:
                found.append((pid, process, kept))
        if not _holds_all(found, cached):
            return None
    born = _started_since(cache.pass_ticks, known)
    if born is None or not _within_budget(born):
        return None
    # The console verifies before the dump, and this runs 50-130 ms later: a verified holder may
    # have exited since and its pid now name a new process (a fork of another holder, which holds
    # the socket too). That one is walked as born, and the exited one is not listed.
    reborn = known.keys() & born
    if reborn:
        found = [entry for entry in found if entry[0] not in reborn]
        if not _holds_all(found, cached):
            return None
    verified_count = len(found)
    if born:
        # The new sockets too: a process started since the pass that holds only those is one of
        # the processes _new_holders looks at.
        wanted_links = {f"{SOCKET_LINK_PREFIX}{inode}]": inode for inode in (*cached, *new)}
        walk = _Walk("/proc", wanted_links, frozenset(), found, [], [])
        _walk(iter(born), walk)
        if walk.denied:
            return None
    if new:
        with_new = _new_holders(found, new)
        if with_new is None:
            return None
        return with_new, True
    return found, len(found) > verified_count


#: The most sockets the cache has not seen that ``_new_holders`` looks for (more: a full pass), and
#: the most processes and descriptors it reads for them. Its BPF iterator costs about what the full
#: pass does per descriptor (~0.35 us), plus ~1 ms to load the program and a link per process:
#: 32,768 descriptors are about a sixth of the full pass on the 210,000-descriptor benchmark host.
_NEW_MAX_SOCKETS = 256
_CANDIDATES_MAX_PIDS = 64
_CANDIDATES_MAX_FDS = 32_768


def _new_holders(found: list[_Found], new: frozenset[int]) -> list[_Found] | None:
    """``found`` (the cached holders, re-checked, and the processes started since the pass that hold
    something) with every holder of the ``new`` sockets added; None when one cannot be told for sure.

    Pitfall: a socket the cache has not seen is not necessarily younger than the pass: it may have
    been established then (not asked about) and shared by a fork before the pass with a process
    that holds no cached socket. So its holders are looked for in the processes of ``found`` (in a
    leak, the leaker holds the older sockets too), with the BPF iterator over their fd tables only,
    which also reads each socket file's reference count: a socket with a reference outside the fds
    found there (another process's fd table, a message in flight), or not found at all, means a
    full pass. A process that was already running and is handed the socket later is seen by the next
    full pass, as for a cached socket (``max_age``).
    """
    # The smallest fd tables first, within the budget: a leaker is often not the biggest holder
    # (on the benchmark host twelve workers hold 17,500 fds each), and a socket held outside the
    # tables read shows in its reference count, so reading fewer can cost a full pass, never a
    # wrong answer.
    sizes: list[tuple[int, int]] = []
    for pid in {pid for pid, _, _ in found}:
        try:
            sizes.append((os.stat(f"/proc/{pid}/fd").st_size, pid))
        except OSError:
            continue  # exited: nothing to read there
    candidates: list[int] = []
    fds = 0
    for size, pid in sorted(sizes):
        if fds + size > _CANDIDATES_MAX_FDS or len(candidates) == _CANDIDATES_MAX_PIDS:
            break
        fds += size
        candidates.append(pid)
    if not candidates:
        return None
    candidates.sort()
    from closewait.sources import bpf

    try:
        holders, elsewhere = bpf.holders_in_processes(new, candidates)
    except bpf.BpfUnavailable:
        return None
    if elsewhere or not new.issubset(holders):
        return None
    wanted = {inode: holders[inode] for inode in new}
    identified = _identify_holders(wanted, "/proc")
    if sum(len(hits) for _, _, hits in identified) != sum(len(h) for h in wanted.values()):
        return None  # a holder exited or cannot be identified: not an answer without it
    by_pid = {pid: (process, [hit for hit in hits if hit[1] not in new]) for pid, process, hits in found}
    for pid, process, hits in identified:
        entry = by_pid.get(pid)
        if entry is None:
            by_pid[pid] = (process, hits)
        elif entry[0].start_time != process.start_time:
            return None  # the pid names another process than the one checked: look again
        else:
            entry[1].extend(hits)
    return [(pid, process, sorted(hits)) for pid, (process, hits) in sorted(by_pid.items()) if hits]


def _verify_holders(cached: Mapping[int, Sequence[tuple[int, int, int]]]) -> tuple[list[_Found], set[int]]:
    """The cached holders (inode -> [(pid, fd, start time)]) that are still there, by process, and
    the inodes some fd of which no longer holds them (closed, moved, unreadable)."""
    return verify_in_process(sorted(_by_process(cached).items()))


def verify_in_process(by_process: list[tuple[tuple[int, int], list[tuple[int, int]]]]) -> Verified:
    """``_verify_holders`` of holders already by process: [((pid, start time), [(fd, inode), ...])],
    read in this process (``owner_check.read_process``, what the console's forked child reads) and
    judged by ``verified_from_reads``. Reads that cannot be judged (a process file that could not be
    read or parsed) fail every socket: a full pass answers, never a guess."""
    from closewait.sources.owner_check import read_process

    reads: list[Reads | None] = [None] * len(by_process)
    todo = iter(enumerate(by_process))

    def read_all() -> None:
        for index, ((pid, _), hits) in todo:
            reads[index] = read_process(pid, hits)

    # One readlink per fd is most of the cost (~4 us each): two threads halve it on a big cache.
    n_fds = sum(len(hits) for _, hits in by_process)
    _run_parallel(read_all, 1 if n_fds < 1000 else _walk_threads(_PARALLEL_MIN_PIDS))
    done = [read for read in reads if read is not None]
    verified = verified_from_reads(by_process, done) if len(done) == len(reads) else None
    if verified is None:
        return [], {inode for _, hits in by_process for _, inode in hits}
    return verified


def verified_from_reads(
    by_process: list[tuple[tuple[int, int], list[tuple[int, int]]]], reads: Sequence[Reads]
) -> Verified | None:
    """The re-check's answer from what was read of each process (``owner_check.read_process``: one
    ``Reads`` per entry of ``by_process``, in order, by the console's forked child or in this
    process); None when something cannot be judged (a process file that could not be read, a stat
    line that cannot be parsed, a read missing).

    The rules: a process that is gone is skipped (its sockets need another holder, which the caller
    checks); one that may not be read (another user's, to a user with CAP_BPF and CAP_PERFMON; any,
    to root under an LSM that refuses), or whose start time cannot be read, is still there and may
    still hold its sockets, so every inode of its holders fails (a full pass) rather than letting
    another holder answer without it; one whose pid now names a process with another start time is
    skipped (the caller walks processes started since the pass); an fd whose link is no longer its
    socket's fails that socket."""
    from closewait.sources import owner_check as child

    found: list[_Found] = []
    failed: set[int] = set()
    for ((pid, start_time), hits), read in zip(by_process, reads, strict=True):
        kind, stat, cmdline, uid, moved = read
        if kind == child.GONE:
            continue  # exited: its sockets need another holder, which the caller checks
        if kind == child.REFUSED:
            failed.update([inode for _, inode in hits])
            continue
        if kind != child.READ:
            return None
        try:
            process = process_from(pid, stat, cmdline, uid if uid >= 0 else None)
        except KernelDataError:
            return None
        if not process.start_time:  # who it is cannot be told
            failed.update([inode for _, inode in hits])
            continue
        if process.start_time != start_time:
            continue  # exited, and its pid now names a process started since (walked by the caller)
        if moved:
            gone_fds = set(moved)
            failed.update([inode for fd, inode in hits if fd in gone_fds])
            still = [hit for hit in hits if hit[0] not in gone_fds]
        else:
            still = list(hits)
        still.sort()  # in fd order, whatever order the holders came in (nearly always that one already)
        found.append((pid, process, still))
    return found, failed


def _inode_of(hit: tuple[int, int]) -> int:
    return hit[1]


def _holds_all(found: list[_Found], cached: Mapping[int, Sequence[tuple[int, int, int]]]) -> bool:
    """Whether every socket the pass found a holder for has one in ``found``."""
    held = {inode for _, _, hits in found for _, inode in hits}
    return held.issuperset([inode for inode, holders in cached.items() if holders])


def _started_since(ticks: int, known: Mapping[int, int]) -> list[int] | None:
    """The pids of processes started at or after ``ticks``, or that cannot be told apart, other than
    the ``known`` ones (pid -> start time); None when /proc cannot be listed.

    A known pid is skipped only while it names the process with that start time: one that names
    another process now (the known one exited and its pid was reused) is in the answer.

    One /proc/PID/stat read per process on the host (~380 on the benchmark host, ~9 us each in the
    kernel): two threads share them, and only the start time is taken from each line.
    """
    try:
        pids = list_pids("/proc")
    except ClosewaitError:
        return None
    born: list[int] = []
    todo = iter(pids)

    def run() -> None:
        open_, read, close, flags, add = os.open, os.read, os.close, os.O_RDONLY | os.O_CLOEXEC, born.append
        for pid in todo:
            try:
                fd = open_(f"/proc/{pid}/stat", flags)
            except OSError:
                continue  # exited
            try:
                text = read(fd, 4096)
            except OSError:
                continue
            finally:
                close(fd)
            start = parse_start_time(text)
            if start is None:
                start = ticks  # unreadable: walked, to be safe
            same = known.get(pid)
            if same is not None and start == same:
                continue
            if start >= ticks or same is not None:
                add(pid)

    _run_parallel(run, _walk_threads(len(pids)))
    born.sort()
    return born


#: The most processes started since the pass, and descriptors of theirs, that ``_from_cache`` walks;
#: beyond either a full pass runs instead. Each of their descriptors costs a readlink (~4-6 us) and
#: each process an open, a listing and a stat (~15 us), where a full pass costs ~0.35 us per
#: descriptor on the host: 4,096 readlinks (~16-25 ms) and 256 processes (~4 ms) are about a fifth
#: of the full pass on the 210,000-descriptor benchmark host, on top of re-checking the cached fds.
_BORN_MAX_PIDS = 256
_BORN_MAX_FDS = 4096


def _within_budget(born: Sequence[int]) -> bool:
    """Whether walking ``born`` stays within ``_BORN_MAX_PIDS`` and ``_BORN_MAX_FDS``: one stat of
    each one's fd directory (its ``st_size`` is its number of fds since Linux 6.2; on older kernels
    the directory is listed, which reads no link)."""
    if len(born) > _BORN_MAX_PIDS:
        return False
    fds = 0
    for pid in born:
        path = f"/proc/{pid}/fd"
        try:
            fds += os.stat(path).st_size or len(os.listdir(path))
        except OSError:
            continue  # exited, or refused: the walk sorts it out (a refusal is a full pass)
        if fds > _BORN_MAX_FDS:
            return False
    return True


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


def _walk_parallel(pids: Iterator[int], walk: _Walk, threads: int) -> None:
    """Run ``_walk`` in ``threads`` threads (the caller's included) over one shared pid iterator.

    ``next()`` on a list iterator and ``list.append`` are atomic under the GIL, so the threads
    share them without a lock. An unexpected exception in a helper thread is re-raised here.
    """
    if threads <= 1:
        _walk(pids, walk)
        return
    # Biggest fd tables first, so no thread is left with one huge process at the end.
    pids = iter(_largest_first(pids, walk.proc_root))
    _run_parallel(lambda: _walk(pids, walk), threads)


def _run_parallel(work: Callable[[], None], threads: int) -> None:
    """Run ``work`` in ``threads`` threads (the caller's included); the first exception a helper
    thread raised is re-raised here. ``work`` pulls its items from a shared iterator."""
    if threads <= 1:
        work()
        return
    failures: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as err:  # re-raised in the caller's thread below
            failures.append(err)

    helpers = [threading.Thread(target=run, name=f"closewait-walk-{i}", daemon=True) for i in range(threads - 1)]
    for helper in helpers:
        helper.start()
    try:
        work()
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


def _walk(pids: Iterator[int], walk: _Walk) -> None:
    """Read every fd link of each pid; record (pid, process, [(fd, inode), ...]) for wanted sockets.

    The process is read through its fd directory's descriptor (``..`` of it is its /proc/PID), after
    the links: that descriptor is bound to the process it was opened on, so the name is the one of
    the process whose links were read, or the process has exited and is skipped, even if its pid was
    reused meanwhile. Processes holding nothing wanted cost no extra open.
    """
    open_ = os.open
    close = os.close
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    proc_root, identify, found, denied, gone = walk.proc_root, walk.identify, walk.found, walk.denied, walk.gone
    for pid in pids:
        try:
            dir_fd = open_(f"{proc_root}/{pid}/fd", flags)
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            gone.append(pid)  # exited since listing
            continue
        except PermissionError:
            denied.append(pid)
            continue
        try:
            hits = _links(dir_fd, pid, walk)
            if hits is None or not (hits or pid in identify):
                continue
            process = _identified_through(dir_fd, pid)
            if process is None:
                gone.append(pid)  # exited after its links were read: its name is not known
                continue
            found.append((pid, process, hits))
        finally:
            close(dir_fd)


def _identified_through(fd_dir: int, pid: int) -> Process | None:
    """The process whose /proc/PID/fd ``fd_dir`` is; None if it has exited since it was opened."""
    try:
        pid_fd = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd_dir)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:
        return Process(pid=pid, start_time=0, name="?", cmdline=())
    try:
        return _identified(pid_fd, pid)
    finally:
        os.close(pid_fd)


def _links(dir_fd: int, pid: int, walk: _Walk) -> list[tuple[int, int]] | None:
    """[(fd, inode), ...] of the wanted sockets among the descriptors in ``dir_fd`` (a /proc/PID/fd);
    None when they cannot be read (``walk.denied``) or the process has exited (``walk.gone``)."""
    readlink = os.readlink  # locals: the loop below runs once per descriptor on the host
    wanted_get = walk.wanted_links.get
    hits: list[tuple[int, int]] = []
    try:
        for name in os.listdir(dir_fd):
            try:
                inode = wanted_get(readlink(name, dir_fd=dir_fd))
            except PermissionError:
                # The directory was listable (CAP_DAC_READ_SEARCH) but the links are behind the
                # ptrace access check, which refuses every link of this process alike.
                walk.denied.append(pid)
                return None
            except OSError:
                continue  # closed since listing
            if inode is not None:
                hits.append((int(name), inode))
    except (FileNotFoundError, ProcessLookupError):
        walk.gone.append(pid)
        return None
    except PermissionError:
        walk.denied.append(pid)
        return None
    return hits
