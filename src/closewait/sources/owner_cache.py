"""Owners remembered between scans: socket (cookie, inode) -> [(pid, fd, start time)], from the
last full BPF pass, for ``find_owners`` to re-check instead of walking every fd table again.

A full pass reads every descriptor on the host (210,000 on the benchmark host: ~70 ms in the
kernel); a scan that runs every few seconds mostly asks about the same CLOSE_WAIT sockets again.
This module only keeps the answer; ``owners.find_owners`` decides whether it may still be used
and re-checks every part of it before it does (see ``owners._from_cache``):

- the socket is the same object: the dump's socket cookie (unique per boot, never reused) and
  inode are the cached ones; a few sockets the cache has not seen are looked for in the fd tables
  of the processes the answer names, and every reference to each must be found there
  (``owners._new_holders``), else a full pass;
- each holder is the same process (pid and start time, one stat read per process) and its fd still
  holds that socket (one readlink per fd); a failure means a full pass;
- a process started since the full pass may have inherited a socket (fork) or been handed one:
  every such process's descriptors are walked (usually a few);
- what no cheap check can see, a process that was already running and received the socket later
  (SCM_RIGHTS, pidfd_getfd), is caught by the next full pass: the cache is used for at most
  ``max_age`` seconds after the pass that filled it.

Only a full BPF pass fills it (it sees every fd table; a /proc walk as a user may not). The
one-shot ``closewait scan --json`` keeps it in ``CACHE_PATH`` between runs, as root only: a file
0600 in a root-owned directory nobody else may write, written atomically, bounded in size, and
ignored (never an error) unless its format version, the boot it was written in
(``/proc/sys/kernel/random/boot_id``), the pid namespace it was written in, its owner and its
mode are right. A long-running caller (the exporter's collector) keeps an ``OwnerCache`` in
memory and passes it to every ``scan()``, one scan at a time (it is not meant to be shared by
scans running at once).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from itertools import repeat

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from typing import Protocol

    from closewait.model import Process
    from closewait.sources.bpf import Holder

    class Joinable(Protocol):
        """A re-check running meanwhile: ``join()`` waits for it to end."""

        def join(self) -> None: ...

    #: What a re-check found (``owners.check_cache``, ``owner_check.ForkedCheck.join``): the holders
    #: still there by process, and the failed inodes.
    Verified = tuple[list[tuple[int, Process, list[tuple[int, int]]]], set[int]]

#: Where the one-shot CLI keeps the cache (a tmpfs, emptied at boot).
CACHE_PATH = "/run/closewait/owners.bin"
#: How long after a full pass its answer may be re-checked instead of a new pass, in seconds.
DEFAULT_MAX_AGE = 10.0
#: The most owner fds kept (and records in a file: 400 KB, and 16 bytes per process): re-checking
#: each costs a readlink (~4 us), so beyond this many a full pass (~0.35 us per fd on the host)
#: costs about the same, and a bigger answer is not kept.
MAX_RECORDS = 20_000

_MAGIC = b"closewait-owners"
_VERSION = 2
#: magic, format version, boot id (16 bytes), pid namespace (its inode), the pass's start (clock
#: ticks since boot), processes, records.
_HEADER = struct.Struct("<16sI16sQQII")
#: One per holding process, by (pid, start time): pid, its records, its start time (clock ticks
#: since boot). Sockets nobody held (kernel sockets) are the records of pid 0, which no process has.
_PROCESS = struct.Struct("<IIQ")
#: Then the records, the processes' in their order (each one's by fd), as three columns: the
#: sockets' cookies, their inodes (8 bytes each) and the fds (4 bytes each). Laid out so, reading
#: 5,000 records is three ``struct`` calls, and the re-check (``by_process``) needs no regrouping.
_RECORD_SIZE = 8 + 8 + 4
_NOBODY = 0
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_ticks() -> int:
    """Now, in the unit and clock of /proc/PID/stat's start time: clock ticks since boot."""
    import time

    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


class OwnerCache:
    """What the last full pass found, for the sockets it was asked about, and when it started.

    ``path`` None keeps it in memory only (a long-running caller); with a path it is read from
    there on first use and written back by ``save()`` (the one-shot CLI, as root).
    """

    def __init__(self, *, max_age: float = DEFAULT_MAX_AGE, path: str | None = None) -> None:
        self.max_age = max_age
        self.path = path
        #: When the full pass that filled it was asked for, in clock ticks since boot (0: never).
        self.pass_ticks = 0
        #: cookie -> (inode, holders)
        self.sockets: dict[int, tuple[int, tuple[Holder, ...]]] = {}
        #: inode -> cookie of every socket in ``sockets``, while that is a one-to-one map (else None).
        self._cookie_of: dict[int, int] | None = {}
        #: The holders in ``sockets`` by process, as the file lays them out: [((pid, start time),
        #: [(fd, inode), ...])], or None until ``by_process`` makes them.
        self._by_process: list[tuple[tuple[int, int], list[tuple[int, int]]]] | None = []
        self._loaded = path is None
        self._dirty = False
        #: What a re-check of every holder found (``owners.check_cache``, ``owner_check.ForkedCheck.join``):
        #: (pass_ticks, result).
        self.verified: tuple[int, Verified] | None = None
        #: A re-check running meanwhile (``owners.start_check``'s thread, ``owner_check.fork_check``'s
        #: child); ``find_owners`` joins it, which sets ``verified``.
        self.checking: Joinable | None = None

    def holders_of(self, cookies: Mapping[int, int] | None) -> dict[int, tuple[Holder, ...]] | None:
        """inode -> the cached holders, for every (inode -> cookie) in ``cookies`` (None: every
        socket kept); None when the cache is empty, older than ``max_age`` or has not seen one of
        these sockets."""
        if cookies is not None:
            split = self.split(cookies)
            return split[0] if split is not None and not split[1] else None
        return dict(self.sockets.values()) if self._fresh() else None

    def by_process(self) -> list[tuple[tuple[int, int], list[tuple[int, int]]]] | None:
        """Every holder kept, by process: [((pid, start time), [(fd, inode), ...])] in (pid, start
        time) order, each one's fds in order; None when the cache is empty or older than ``max_age``."""
        if not self._fresh() or not self.sockets:
            return None
        return self._grouped()

    def _grouped(self) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
        if self._by_process is None:
            grouped: dict[tuple[int, int], list[tuple[int, int]]] = {}
            for inode, holders in self.sockets.values():
                for pid, fd, start in holders:
                    grouped.setdefault((pid, start), []).append((fd, inode))
            self._by_process = sorted((process, sorted(hits)) for process, hits in grouped.items())
        return self._by_process

    def split(self, cookies: Mapping[int, int]) -> tuple[dict[int, tuple[Holder, ...]], set[int]] | None:
        """The cached holders of the sockets in ``cookies`` (inode -> cookie) it has seen (inode ->
        holders), and the inodes of those it has not; None when the cache is empty or older than
        ``max_age``, or a cookie it knows names another inode now."""
        if not cookies or not self._fresh():
            return None
        if cookies == self._cookie_of:
            # The very sockets kept (a loop's usual case): one comparison instead of one look-up each.
            return dict(self.sockets.values()), set()
        known: dict[int, tuple[Holder, ...]] = {}
        new: set[int] = set()
        get = self.sockets.get
        for inode, cookie in cookies.items():
            entry = get(cookie)
            if entry is None:
                new.add(inode)
            elif entry[0] != inode:
                return None
            else:
                known[inode] = entry[1]
        return known, new

    def _fresh(self) -> bool:
        """Whether it holds a pass's answer younger than ``max_age``."""
        self._load()
        if not self.pass_ticks:
            return False
        return 0 <= boot_ticks() - self.pass_ticks <= self.max_age * os.sysconf("SC_CLK_TCK")

    def remember(self, pass_ticks: int, cookies: Mapping[int, int], holders: Mapping[int, Iterable[Holder]]) -> None:
        """Keep ``holders`` (inode -> holders) for the sockets in ``cookies`` (inode -> cookie); an
        answer of more than ``MAX_RECORDS`` owner fds empties the cache instead."""
        self.pass_ticks = pass_ticks
        self.sockets = {cookie: (inode, tuple(holders.get(inode, ()))) for inode, cookie in cookies.items()}
        if sum(len(found) or 1 for _, found in self.sockets.values()) > MAX_RECORDS:
            self.pass_ticks = 0
            self.sockets = {}
        self._cookie_of = {inode: cookie for cookie, (inode, _) in self.sockets.items()}
        if len(self._cookie_of) != len(self.sockets):
            self._cookie_of = None
        self._by_process = None
        self._loaded = True
        self._dirty = True

    def save(self) -> None:
        """Write the cache to ``path`` if it changed; skipped silently when that cannot be done safely."""
        if self.path is None or not self._dirty:
            return
        self._dirty = False
        processes: list[bytes] = []
        cookies: list[int] = []
        inodes: list[int] = []
        fds: list[int] = []
        nobody = [(cookie, inode) for cookie, (inode, holders) in self.sockets.items() if not holders]
        if nobody:
            processes.append(_PROCESS.pack(_NOBODY, len(nobody), 0))
            cookies.extend(cookie for cookie, _ in nobody)
            inodes.extend(inode for _, inode in nobody)
            fds.extend(0 for _ in nobody)
        cookie_of = {inode: cookie for cookie, (inode, _) in self.sockets.items()}
        for (pid, start), hits in self._grouped():
            processes.append(_PROCESS.pack(pid, len(hits), start))
            for fd, inode in hits:
                fds.append(fd)
                inodes.append(inode)
                cookies.append(cookie_of[inode])
        boot_id = _boot_id()
        pid_ns = _pid_namespace()
        if boot_id is None or not pid_ns or os.geteuid() != 0:
            return
        n = len(cookies)
        data = b"".join(
            [
                _HEADER.pack(_MAGIC, _VERSION, boot_id, pid_ns, self.pass_ticks, len(processes), n),
                *processes,
                struct.pack(f"<{n}Q", *cookies),
                struct.pack(f"<{n}Q", *inodes),
                struct.pack(f"<{n}I", *fds),
            ]
        )
        _write_private(self.path, data)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        assert self.path is not None
        data = _read_private(self.path)
        if data is None or len(data) < _HEADER.size:
            return
        magic, version, boot_id, pid_ns, pass_ticks, n_processes, n = _HEADER.unpack_from(data)
        # Pids are the pid namespace's, and start times and the pass's time the boot's.
        if magic != _MAGIC or version != _VERSION or boot_id != _boot_id() or pid_ns != _pid_namespace():
            return
        offset = _HEADER.size + n_processes * _PROCESS.size
        if n > MAX_RECORDS or n_processes > n or len(data) != offset + n * _RECORD_SIZE:
            return
        cookies = struct.unpack_from(f"<{n}Q", data, offset)
        inodes = struct.unpack_from(f"<{n}Q", data, offset + 8 * n)
        fds = struct.unpack_from(f"<{n}I", data, offset + 16 * n)
        sockets: dict[int, tuple[int, tuple[Holder, ...]]] = {}
        by_process: list[tuple[tuple[int, int], list[tuple[int, int]]]] = []
        inode_of = dict(zip(cookies, inodes, strict=True))
        # One cookie, one socket: a file with two inodes for a cookie is not one this module wrote.
        if len(inode_of) != n and len(set(zip(cookies, inodes, strict=True))) != len(inode_of):
            return
        # Each socket held by one fd (a leak's usual case): its entry made without a Python loop.
        one_each = len(inode_of) == n
        start = 0
        table = data[_HEADER.size : _HEADER.size + n_processes * _PROCESS.size]
        for pid, count, started in _PROCESS.iter_unpack(table):
            end = start + count
            if not count or end > n:
                return
            block = slice(start, end)
            if pid == _NOBODY:
                for cookie, inode in zip(cookies[block], inodes[block], strict=True):
                    sockets.setdefault(cookie, (inode, ()))
                start = end
                continue
            hits = list(zip(fds[block], inodes[block], strict=True))
            by_process.append(((pid, started), hits))
            if one_each:
                holders = zip(zip(repeat(pid), fds[block], repeat(started)))
                sockets.update(zip(cookies[block], zip(inodes[block], holders, strict=True), strict=True))
            else:
                for cookie, (fd, inode) in zip(cookies[block], hits, strict=True):
                    entry = sockets.get(cookie)
                    sockets[cookie] = (inode, (*entry[1], (pid, fd, started)) if entry else ((pid, fd, started),))
            start = end
        if start != n:
            return
        cookie_of = dict(zip(inodes, cookies, strict=True))
        self.pass_ticks = pass_ticks
        self.sockets = sockets
        self._cookie_of = cookie_of if len(cookie_of) == len(sockets) else None
        self._by_process = sorted(by_process)


def file_cache(path: str = CACHE_PATH, max_age: float = DEFAULT_MAX_AGE) -> OwnerCache | None:
    """The one-shot CLI's cache at ``path``: root only (None otherwise), read on first use."""
    if os.geteuid() != 0:
        return None
    return OwnerCache(max_age=max_age, path=path)


def _boot_id() -> bytes | None:
    try:
        with open(_BOOT_ID, "rb") as handle:
            return bytes.fromhex(handle.read().decode("ascii").strip().replace("-", ""))[:16].ljust(16, b"\0")
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _pid_namespace() -> int:
    """The inode of this process's pid namespace (0 if it cannot be read)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _safe_directory(directory: str) -> bool:
    """Whether ``directory`` is a real directory of this user (root) that nobody else may write."""
    try:
        info = os.lstat(directory)
    except OSError:
        return False
    import stat

    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022


def _read_private(path: str) -> bytes | None:
    """The bytes of ``path`` if it is a regular file of this user that only it may read or write,
    in a directory only it may write, and no bigger than the largest cache; else None."""
    import stat

    if not _safe_directory(os.path.dirname(path)):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        limit = _HEADER.size + MAX_RECORDS * (_PROCESS.size + _RECORD_SIZE)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            return None
        if info.st_size > limit:
            return None
        chunks = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks) if size <= limit else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _write_private(path: str, data: bytes) -> None:
    """Write ``path`` atomically (a new file renamed over it), 0600 in a 0700 directory made if
    missing; nothing when the directory is not safe or anything fails, and no new file left behind.

    Pitfall: the new file's name must be one no earlier write left behind. A name made of the pid
    alone was taken for good by a write that was interrupted (killed between create and rename): every
    later process with that pid failed its exclusive create and never saved again. The name has 64
    random bits too, and the file is removed on any failure or interruption of this function.
    """
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError:
        return
    if not _safe_directory(directory):
        return
    temporary = f"{path}.{os.getpid()}.{os.urandom(8).hex()}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException as err:  # an OSError, or an interruption (KeyboardInterrupt), re-raised below
        try:  # noqa: SIM105 (contextlib is not imported on the fast path)
            os.unlink(temporary)
        except OSError:
            pass
        if not isinstance(err, OSError):
            raise
