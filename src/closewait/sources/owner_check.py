"""The owner cache's re-check in a child process, for the one-shot ``scan --json`` (the console).

Re-checking a cached answer (``owners.verify_in_process``) reads each holder's identity and one link
per cached fd: 5,000 readlinks on the benchmark host, ~17 ms of system time. In a thread they would
overlap the main thread's imports and parsing, but each readlink returns to a thread that must wait
for the interpreter's lock while the main thread holds it (the console lowers the switch interval
to 0.5 ms, and even so the thread runs a few hundred readlinks a second): slower than doing them in
line. A child process has no such lock. ``fork()`` is called first thing, before the model is
imported (this module imports only the standard library's C modules and ``owner_cache``): the
child is small, its copy of the cache is the parent's memory, and it runs on the CPU the kernel's
walk leaves free while the parent imports.

The child only reads the kernel and writes what it read, raw, to a pipe: for each cached process
((pid, start time), [(fd, inode)]), how opening it went and, when it could be read, its stat and
cmdline bytes, its owner uid and the fds whose link is no longer that socket's. ``join()`` turns
that into the very answer ``owners.check_cache`` makes (``owners.verified_from_reads``: the same
parsers, the same rules), and an answer the child could not give (it failed, was killed, or met an
error the in-process check would raise) is made in-process instead: the fork is a speed-up, never
another behaviour.

Pitfalls:
- The parent has a thread (the prefetch's reader). The child runs no Python code that takes a lock
  that thread could hold: ``os`` calls, list appends and ``marshal`` only, then ``os._exit`` (no
  atexit handler, no flush of the parent's buffered stdout).
- Ctrl+C reaches the child too (same process group): its SIGINT is the default action, so it
  dies without a traceback; the parent reads EOF and re-checks in-process (or is itself exiting).
- The child is always reaped by its pid: by ``join()`` when its answer is used, else by ``cancel()``
  (SIGKILL first), which the console calls on every way out (a scan that found no socket to look
  up never joins it).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal without its enum (not loaded yet here)
import marshal
import os

from closewait.sources._procread import read_at

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from typing import NoReturn

    from closewait.sources.owner_cache import OwnerCache

#: How opening a cached process went: it could be read; it has exited; it refused (another user's,
#: an LSM); or an error the in-process check would raise (the parent then re-checks in-process).
READ, GONE, REFUSED, FAILED = 0, 1, 2, 3

#: One process's reads: (kind, stat bytes, cmdline bytes, owner uid or -1, the fds whose link is no
#: longer their cached socket's).
Reads = tuple[int, bytes, bytes, int, list[int]]

_SOCKET_LINK_PREFIX = "socket:["  # owners.SOCKET_LINK_PREFIX, which this module must not import


class ForkedCheck:
    """A re-check running in a child process; ``join()`` (by ``owners.find_owners``) collects it."""

    def __init__(
        self,
        cache: OwnerCache,
        by_process: list[tuple[tuple[int, int], list[tuple[int, int]]]],
        pid: int,
        read_fd: int,
    ) -> None:
        self._cache = cache
        self._pid = pid
        self._read_fd: int | None = read_fd
        #: The pass whose holders the child re-checks: a cache refilled meanwhile is not answered.
        self._pass_ticks = cache.pass_ticks
        #: What the child re-checks, in its order.
        self._by_process = by_process

    @property
    def pid(self) -> int:
        return self._pid

    def cancel(self) -> None:
        """End the child if it was not joined (its answer is not needed: the scan found no socket to
        look up, or failed): SIGKILL by its pid, then reap it. Nothing when it was joined."""
        read_fd, self._read_fd = self._read_fd, None
        if read_fd is None:
            return
        try:
            os.kill(self._pid, _signal.SIGKILL)
        except ProcessLookupError:
            pass  # a zombie already: reaped below
        finally:
            os.close(read_fd)
            _reap(self._pid)

    def join(self) -> None:
        """Wait for the child, reap it, and set ``cache.verified`` from what it read (re-checking
        in-process when it could not answer)."""
        read_fd, self._read_fd = self._read_fd, None
        if read_fd is None:
            return
        try:
            chunks = []
            while chunk := os.read(read_fd, 1 << 16):
                chunks.append(chunk)
        finally:
            os.close(read_fd)
            status = _reap(self._pid)
        from closewait.sources import owners

        reads: list[Reads] | None = None
        if status == 0:
            try:
                loaded = marshal.loads(b"".join(chunks))
            except (EOFError, ValueError, TypeError):
                loaded = None
            if isinstance(loaded, list) and len(loaded) == len(self._by_process):
                reads = loaded
        if self._cache.pass_ticks != self._pass_ticks:
            return  # refilled since: its own holders were never checked; find_owners does it
        verified = owners.verified_from_reads(self._by_process, reads) if reads is not None else None
        if verified is None:
            verified = owners.verify_in_process(self._by_process)
        self._cache.verified = (self._pass_ticks, verified)


def fork_check(cache: OwnerCache) -> ForkedCheck | None:
    """Start re-checking every holder in ``cache`` in a child process; None when there is nothing to
    check (an empty or stale cache) or no child could be made (then check in-process, as before)."""
    by_process = cache.by_process()
    if not by_process:
        return None
    try:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        return None
    if pid == 0:  # the child: never returns
        _child(by_process, read_fd, write_fd)
    os.close(write_fd)
    return ForkedCheck(cache, by_process, pid, read_fd)


def _child(by_process: list[tuple[tuple[int, int], list[tuple[int, int]]]], read_fd: int, write_fd: int) -> NoReturn:
    code = 1
    try:
        # The built-in module the parent has loaded already: nothing is imported in the child.
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
        _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
        os.close(read_fd)
        view = memoryview(marshal.dumps([read_process(pid, hits) for (pid, _), hits in by_process]))
        while view:
            view = view[os.write(write_fd, view) :]
        code = 0
    finally:
        os._exit(code)


def read_process(pid: int, hits: list[tuple[int, int]]) -> Reads:
    """What the re-check reads of one cached process: through one descriptor on its /proc/PID/fd (and
    its parent directory, /proc/PID), so every read is of the one process that was opened."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        fd_dir = os.open(f"/proc/{pid}/fd", flags)
    except (FileNotFoundError, ProcessLookupError):
        return (GONE, b"", b"", -1, [])
    except OSError:
        return (REFUSED, b"", b"", -1, [])
    try:
        try:
            pid_dir = os.open("..", flags, dir_fd=fd_dir)
        except (FileNotFoundError, ProcessLookupError):
            return (GONE, b"", b"", -1, [])
        except PermissionError:
            return (REFUSED, b"", b"", -1, [])
        try:
            stat = read_at(pid_dir, "stat")
            cmdline = read_at(pid_dir, "cmdline")
            try:
                uid = os.fstat(pid_dir).st_uid
            except OSError:
                uid = -1
        except (FileNotFoundError, ProcessLookupError):
            return (GONE, b"", b"", -1, [])
        except PermissionError:
            return (REFUSED, b"", b"", -1, [])
        except OSError:
            return (FAILED, b"", b"", -1, [])
        finally:
            os.close(pid_dir)
        readlink = os.readlink
        moved = []
        for fd, inode in hits:
            try:
                link = readlink(str(fd), dir_fd=fd_dir)
            except OSError:  # closed, or its links may not be read
                link = ""
            if link != f"{_SOCKET_LINK_PREFIX}{inode}]":
                moved.append(fd)
        return (READ, stat, cmdline, uid, moved)
    finally:
        os.close(fd_dir)


def _reap(pid: int) -> int:
    """Wait for the child ``pid``; its exit code (-1 when it was killed or cannot be waited for)."""
    try:
        _, status = os.waitpid(pid, 0)  # retried on EINTR by Python itself (PEP 475)
    except ChildProcessError:
        return -1
    return os.waitstatus_to_exitcode(status)
