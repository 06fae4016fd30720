"""Helpers for a test suite: fail a test that leaves sockets in CLOSE_WAIT.

The pytest plugin (``closewait.pytest_plugin``) is a thin layer over this module, and everything
here works without pytest (this module never imports it)::

    from closewait.testing import assert_no_close_wait, no_new_close_wait

    with no_new_close_wait(grace=0.5):   # fails if the block leaves a CLOSE_WAIT socket behind
        run_the_code_under_test()

    assert_no_close_wait()               # fails if this process holds any CLOSE_WAIT socket now

A failure raises ``CloseWaitLeak`` (an ``AssertionError``) whose message lists each socket with its
diagnosis and, when ``closewait.trace`` is on, the line that created it.

For a whole test suite, ``Horizon`` is what the pytest plugin uses instead: no waiting per block. It
takes a cheap snapshot of this process's TCP sockets at each test boundary, attributes each socket
to the test during which it appeared, and reports a socket only when it is still in CLOSE_WAIT a
horizon (default 10 s) after that test ended, checked at later boundaries and once at the end.

How a check works, and what it costs: the cheap part runs every time. For this process it lists
``/proc/self/fd`` and asks each descriptor its TCP state (``getsockopt(TCP_INFO)``), so the cost
depends on the process's descriptors, not on how many sockets the host has; for another process it
walks ``/proc/PID/fd`` and intersects with one sock_diag dump of the host's CLOSE_WAIT sockets. Only
when that finds something new does it run a full ``scan(pids=[pid])`` for owners, role and
diagnosis.

Pitfalls:

- "New" means: in CLOSE_WAIT now and not in CLOSE_WAIT at the baseline. A pooled connection opened
  earlier that the server closes while this block runs counts as this block's leak.
- Asynchronous closes (a transport closed on the next loop iteration, a thread that has not run yet)
  get ``grace`` seconds; the check polls during it. It never calls ``gc.collect()``: an asyncio
  transport that nothing closed is kept alive by a reference cycle until the collector happens to
  run, and collecting here would hide exactly that leak. For the same reason a ``Guard`` pauses
  the automatic collector between its baseline and its check (``pause_gc=False`` to keep it).
- The role a scan infers (server/client) needs the listener to be open. When tracing is on and the
  socket came from ``accept()``, the role is taken from the trace instead, so a server whose
  listener is already closed is still diagnosed as a server.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from closewait import trace
from closewait.diagnosis import diagnose
from closewait.model import Finding, Role, TcpState
from closewait.scanning import CLOSE_WAIT_ONLY, scan
from closewait.sources.probe import close_wait_inodes, own_socket_states, own_tcp_sockets
from closewait.sources.process import socket_fds

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_HORIZON",
    "CloseWaitLeak",
    "DueSocket",
    "Guard",
    "Horizon",
    "Leak",
    "assert_no_close_wait",
    "close_wait_inodes",
    "close_wait_sockets",
    "find_leaks",
    "format_leak",
    "format_leaks",
    "format_traceback",
    "leak_of",
    "no_new_close_wait",
    "own_socket_snapshot",
]

#: Seconds a check waits for asynchronous closes before reporting.
DEFAULT_GRACE = 0.5
#: Seconds a socket may stay in CLOSE_WAIT after its test ended before ``Horizon`` reports it: longer
#: than common keep-alive timers (5 s in hypercorn/uvicorn/gunicorn), so a test server's own ends
#: closing on their timer are not reported.
DEFAULT_HORIZON = 10.0
_POLL_INTERVAL = 0.02


def close_wait_sockets(pid: int | None = None) -> tuple[Finding, ...]:
    """Findings (owners, role, diagnosis) for the CLOSE_WAIT sockets ``pid`` holds (default: this process)."""
    return scan(CLOSE_WAIT_ONLY, pids=[os.getpid() if pid is None else pid]).findings


@dataclass(frozen=True, slots=True)
class Leak:
    """One socket left in CLOSE_WAIT, with where it was created when tracing was on."""

    finding: Finding
    traceback: trace.Traceback | None = None
    #: The role came from the trace (an accepted socket), not from the scan's listener match.
    role_from_trace: bool = False

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(owner.fd for owner in self.finding.owners)


class CloseWaitLeak(AssertionError):
    """A check found sockets left in CLOSE_WAIT. ``leaks`` has them; ``str()`` explains each."""

    def __init__(self, leaks: Collection[Leak], *, grace: float = 0.0, hint: str | None = None) -> None:
        self.leaks = tuple(leaks)
        self.grace = grace
        super().__init__(format_leaks(self.leaks, grace=grace, hint=hint))


def _with_trace(finding: Finding, pid: int) -> Leak:
    if pid != os.getpid() or not trace.is_tracing():
        return Leak(finding)
    tb = trace.get_traceback(finding)
    if tb is not None and tb.kind == "accept" and finding.role != Role.SERVER:
        sock = finding.socket
        finding = dataclasses.replace(finding, role=Role.SERVER, diagnosis=diagnose(sock, finding.owners, Role.SERVER))
        return Leak(finding, tb, role_from_trace=True)
    return Leak(finding, tb)


def leak_of(finding: Finding) -> Leak:
    """A finding of this process as a ``Leak``, with its creation trace when tracing (and the
    server role for a socket the trace saw accepted)."""
    return _with_trace(finding, os.getpid())


def find_leaks(
    baseline: Collection[int] = (),
    *,
    pid: int | None = None,
    grace: float = 0.0,
) -> tuple[Leak, ...]:
    """CLOSE_WAIT sockets of ``pid`` whose inode is not in ``baseline``, after up to ``grace`` seconds.

    Polls every 20 ms during the grace period and returns as soon as none is left; never collects
    garbage (see the module docstring).
    """
    target = os.getpid() if pid is None else pid
    known = frozenset(baseline)
    deadline = time.monotonic() + max(grace, 0.0)
    while True:
        new = set(close_wait_inodes(target)) - known
        if not new or time.monotonic() >= deadline:
            break
        time.sleep(_POLL_INTERVAL)
    if not new:
        return ()
    findings = [f for f in scan(CLOSE_WAIT_ONLY, pids=[target]).findings if f.socket.inode in new]
    return tuple(_with_trace(f, target) for f in findings)


def assert_no_close_wait(
    pid: int | None = None,
    *,
    grace: float = 0.0,
    ignore: Collection[int] = (),
    hint: str | None = None,
) -> None:
    """Raise ``CloseWaitLeak`` if ``pid`` (default: this process) holds CLOSE_WAIT sockets.

    ``ignore`` holds inodes to leave out (for example those from ``close_wait_inodes()`` taken
    earlier); ``grace`` gives asynchronous closes that many seconds.
    """
    leaks = find_leaks(ignore, pid=pid, grace=grace)
    if leaks:
        raise CloseWaitLeak(leaks, grace=grace, hint=hint)


class Guard:
    """A baseline taken now, checked later: what ``no_new_close_wait`` and the pytest plugin use.

    ``pause_gc`` (default) turns off the automatic garbage collector from the baseline until the
    check, so the check sees what an idle production process would see: an asyncio transport that
    nobody closed stays in CLOSE_WAIT until the collector runs, and in a busy test the collector
    runs by chance (the check's own allocations are enough), which would make the leak come and
    go. Explicit ``gc.collect()`` calls in the code under test still work.
    """

    def __init__(self, *, grace: float = DEFAULT_GRACE, pid: int | None = None, pause_gc: bool = True) -> None:
        if not grace >= 0:
            raise ValueError(f"grace must be >= 0 seconds, not {grace!r}")
        self.grace = grace
        self.pid = os.getpid() if pid is None else pid
        self.baseline: frozenset[int] = frozenset(close_wait_inodes(self.pid))
        self._resume_gc = pause_gc and gc.isenabled()
        if self._resume_gc:
            gc.disable()

    def resume_gc(self) -> None:
        """Turn the automatic garbage collector back on if this guard paused it (idempotent)."""
        if self._resume_gc:
            self._resume_gc = False
            gc.enable()

    def leaks(self) -> tuple[Leak, ...]:
        """Sockets in CLOSE_WAIT now (after the grace period) that were not at the baseline.

        Resumes the garbage collector afterwards (see ``pause_gc``).
        """
        try:
            return find_leaks(self.baseline, pid=self.pid, grace=self.grace)
        finally:
            self.resume_gc()

    def check(self, *, hint: str | None = None) -> None:
        """Raise ``CloseWaitLeak`` if there are new CLOSE_WAIT sockets."""
        leaks = self.leaks()
        if leaks:
            raise CloseWaitLeak(leaks, grace=self.grace, hint=hint)


@contextmanager
def no_new_close_wait(
    grace: float = DEFAULT_GRACE, *, pid: int | None = None, pause_gc: bool = True
) -> Iterator[Guard]:
    """Fail (``CloseWaitLeak``) if the block leaves ``pid`` holding CLOSE_WAIT sockets it did not
    hold before. When the block itself raises, that exception propagates and no check is made.
    The automatic garbage collector is paused inside the block (see ``Guard``)."""
    guard = Guard(grace=grace, pid=pid, pause_gc=pause_gc)
    try:
        yield guard
    except BaseException:
        guard.resume_gc()
        raise
    guard.check()


def format_leaks(leaks: Collection[Leak], *, grace: float = 0.0, hint: str | None = None) -> str:
    """The failure message: one block per socket (endpoints, fd, role, diagnosis, creation site)."""
    n = len(leaks)
    waited = f" (still there after a {grace:g} s grace period)" if grace > 0 else ""
    lines = [f"closewait: {n} socket{'s' if n != 1 else ''} left in CLOSE_WAIT{waited}"]
    for number, leak in enumerate(leaks, 1):
        lines.extend(format_leak(leak, number))
    if not any(leak.traceback is not None for leak in leaks) and hint:
        lines.append(hint)
    return "\n".join(lines)


def format_leak(leak: Leak, number: int, *, test_file: str | None = None, frames: int = 5) -> list[str]:
    """The lines for one socket: endpoints, fd, role, diagnosis, then (traced) where and in which
    thread it was created, the test's own line when ``test_file`` is on the stack (even when
    ``frames`` application frames would not reach it, e.g. the code under test installed
    editable) and up to ``frames`` application frames."""
    finding = leak.finding
    sock = finding.socket
    fds = ",".join(str(fd) for fd in leak.fds) or "?"
    role = f"{finding.role.value}{' (accepted, from the trace)' if leak.role_from_trace else ''}"
    code = finding.diagnosis.code if finding.diagnosis else "-"
    lines = [f"  {number}) fd {fds}  {sock.local} <- {sock.remote}  role {role}  Recv-Q {sock.recv_q}  [{code}]"]
    if finding.diagnosis is not None:
        lines.append(f"     {finding.diagnosis.summary}")
        lines.append(f"     fix: {finding.diagnosis.remedy}")
    if leak.traceback is not None:
        lines.extend(format_traceback(leak.traceback, test_file=test_file, frames=frames))
    return lines


def format_traceback(tb: trace.Traceback, *, test_file: str | None = None, frames: int = 5) -> list[str]:
    """Where a socket was created (see ``format_leak``), indented for a failure message."""
    verb = "accepted" if tb.kind == "accept" else "created"
    lines = [f"     {tb.describe()}", f"     {verb} in thread {tb.thread!r}"]
    app_frames = tb.application_frames
    shown = app_frames[:frames] if len(app_frames) > 1 else ()
    if test_file is not None:
        own = next((f for f in tb.frames if f.filename == test_file), None)
        if own is not None and own != tb.origin and own not in shown:
            lines.append(f"     the test's own line: {own}")
    if shown:
        lines.append("     application frames, most recent call first:")
        lines.extend(f"       {frame}" for frame in shown)
    return lines


def own_socket_snapshot() -> dict[int, tuple[int, bool]]:
    """inode -> (fd, in CLOSE_WAIT now) for this process's TCP sockets: one ``getsockopt`` and one
    ``fstat`` per descriptor (``sources.probe``); without libc, every socket from /proc/self/fd
    with CLOSE_WAIT from the kernel's table."""
    sockets = own_tcp_sockets()
    if sockets is not None:
        close_wait = int(TcpState.CLOSE_WAIT)
        return {inode: (fd, state == close_wait) for inode, (fd, state) in sockets.items()}
    in_close_wait = close_wait_inodes()
    return {inode: (fd, inode in in_close_wait) for fd, inode in socket_fds(os.getpid()).items()}


@dataclass(slots=True)
class Tracked:
    """One socket of this process as the ``Horizon`` knows it."""

    inode: int
    fd: int
    #: The test it is attributed to (the one during which it was first seen); None for sockets
    #: that existed before the first test or appeared during an unchecked one.
    test: str | None
    first_seen: float
    #: When a boundary first saw it in CLOSE_WAIT (it has been in CLOSE_WAIT at least since then).
    close_wait_since: float | None = None
    #: When a garbage collection closed it while it was in CLOSE_WAIT (nothing else did).
    closed_by_gc_at: float | None = None
    traceback: trace.Traceback | None = None


@dataclass(frozen=True, slots=True)
class DueSocket:
    """A socket the ``Horizon`` reports: still in CLOSE_WAIT a horizon after its test ended, or
    closed only by the garbage collector."""

    tracked: Tracked
    test: str
    test_ended_at: float
    seen_at: float
    #: Closed by a garbage collection while in CLOSE_WAIT (``seen_at`` is when), not still open.
    closed_by_gc: bool = False

    @property
    def after_test(self) -> float:
        """Seconds from the end of the test to the moment this was established."""
        return self.seen_at - self.test_ended_at


class Horizon:
    """Attribute this process's CLOSE_WAIT sockets to tests and report those still in CLOSE_WAIT a
    horizon after their test ended, without waiting in any test.

    Call ``begin(test)`` before a test's setup and ``end(test)`` after its teardown: each takes one
    snapshot (``own_socket_snapshot``). A socket first seen at ``end(T)`` is T's; one first seen at
    ``begin(T)`` appeared after the previous test's end (a server thread accepting late) and is the
    previous test's. Sockets seen at ``start()`` belong to nobody. A socket is due when it is in
    CLOSE_WAIT now and ``horizon`` seconds have passed both since its test ended and since a
    boundary first saw it in CLOSE_WAIT (a socket cannot leave CLOSE_WAIT and come back, so it has
    been in CLOSE_WAIT all along). ``finish()`` waits, at most ``horizon`` seconds and only while
    some candidate is still in CLOSE_WAIT, for the youngest candidate to come due.

    ``watch_gc()`` also catches a socket that nothing closes but the garbage collector (an asyncio
    transport nobody closed): a ``gc.callbacks`` hook that, only while candidates exist, asks each
    candidate's descriptor its state before and after a collection (two syscalls per candidate).
    """

    def __init__(self, horizon: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not horizon >= 0:
            raise ValueError(f"horizon must be >= 0 seconds, not {horizon!r}")
        self.horizon = horizon
        self._clock = clock
        self.sockets: dict[int, Tracked] = {}
        self.ended: dict[str, float] = {}
        self.horizons: dict[str, float] = {}
        self._previous: str | None = None
        self._candidates: dict[int, int] = {}  # inode -> fd: owned, unreported, in CLOSE_WAIT
        self._open_at_gc_start: set[int] = set()
        self._gc_hooked = False
        self._with_trace = False

    # -- boundaries --------------------------------------------------------------------------
    def start(self) -> None:
        now = self._clock()
        self._with_trace = trace.is_tracing()
        for inode, (fd, in_close_wait) in own_socket_snapshot().items():
            self.sockets[inode] = Tracked(inode, fd, None, now, now if in_close_wait else None)

    def begin(self, test: str) -> list[DueSocket]:
        self._observe(self._previous)
        return self.due()

    def end(self, test: str | None, *, horizon: float | None = None) -> list[DueSocket]:
        """After ``test``'s teardown (None: an unchecked test, its new sockets are nobody's)."""
        self._observe(test)
        if test is not None:
            self.ended[test] = self._clock()
            if horizon is not None:
                self.horizons[test] = horizon
        self._previous = test
        return self.due()

    def _observe(self, owner: str | None) -> None:
        now = self._clock()
        # No collection inside the snapshot: the gc hook would find the probe busy and miss a close.
        collecting = gc.isenabled()
        gc.disable()
        try:
            snapshot = own_socket_snapshot()
        finally:
            if collecting:
                gc.enable()
        sockets = self.sockets
        for inode in [i for i in sockets if i not in snapshot]:
            tracked = sockets[inode]
            if tracked.closed_by_gc_at is None:
                del sockets[inode]
        candidates: dict[int, int] = {}
        for inode, (fd, in_close_wait) in snapshot.items():
            known = sockets.get(inode)
            tracked = known if known is not None else Tracked(inode, fd, owner, now)
            if known is None:
                sockets[inode] = tracked
            if in_close_wait and tracked.test is not None and tracked.closed_by_gc_at is None:
                if tracked.close_wait_since is None:
                    tracked.close_wait_since = now
                    if self._with_trace:
                        tracked.traceback = trace.get_traceback_for_inode(inode)
                candidates[inode] = tracked.fd
        self._candidates = candidates

    # -- what is due -------------------------------------------------------------------------
    def _due_at(self, tracked: Tracked) -> float | None:
        if tracked.test is None or tracked.test not in self.ended:
            return None
        if tracked.closed_by_gc_at is not None:
            return tracked.closed_by_gc_at
        if tracked.close_wait_since is None:
            return None
        horizon = self.horizons.get(tracked.test, self.horizon)
        return max(self.ended[tracked.test], tracked.close_wait_since) + horizon

    def due(self) -> list[DueSocket]:
        """Sockets due now, each returned once (and forgotten by the tracker)."""
        now = self._clock()
        found: list[DueSocket] = []
        for tracked in list(self.sockets.values()):
            at = self._due_at(tracked)
            if at is None or at > now:
                continue
            assert tracked.test is not None
            by_gc = tracked.closed_by_gc_at
            seen = by_gc if by_gc is not None else now
            found.append(DueSocket(tracked, tracked.test, self.ended[tracked.test], seen, by_gc is not None))
            tracked.test = None  # reported once; the socket stays known so it is not re-attributed
            self._candidates.pop(tracked.inode, None)
            if by_gc is not None:
                del self.sockets[tracked.inode]
        return found

    def finish(self, *, poll: float = 0.1, sleep: Callable[[float], None] = time.sleep) -> list[DueSocket]:
        """The session's last check: waits (at most ``horizon`` s, polling every ``poll`` s) while a
        candidate is still in CLOSE_WAIT and not yet due, then returns everything due."""
        self._observe(self._previous)
        found = self.due()
        limit = self._clock() + max([self.horizon, *self.horizons.values()])
        while True:
            pending = [at for t in self.sockets.values() if (at := self._due_at(t)) is not None]
            now = self._clock()
            if not pending or now >= limit:
                break
            sleep(max(0.0, min(poll, min(pending) - now, limit - now)))
            self._observe(self._previous)
            found.extend(self.due())
        # Whatever is still pending at the bound is reported with the time it has had.
        for tracked in list(self.sockets.values()):
            if self._due_at(tracked) is not None and tracked.test is not None:
                found.append(DueSocket(tracked, tracked.test, self.ended[tracked.test], self._clock()))
                tracked.test = None
        return found

    # -- the garbage collector ---------------------------------------------------------------
    def watch_gc(self) -> None:
        if not self._gc_hooked:
            gc.callbacks.append(self._gc_callback)
            self._gc_hooked = True

    def unwatch_gc(self) -> None:
        if self._gc_hooked:
            gc.callbacks.remove(self._gc_callback)
            self._gc_hooked = False

    def _gc_callback(self, phase: str, info: dict[str, int]) -> None:
        candidates = self._candidates
        if not candidates:
            return
        states = own_socket_states(candidates)
        if states is None:
            self._open_at_gc_start = set()
            return
        close_wait = int(TcpState.CLOSE_WAIT)
        still = {inode for inode, state in states.items() if state == close_wait}
        if phase == "start":
            self._open_at_gc_start = still
            return
        closed = self._open_at_gc_start - set(states)
        self._open_at_gc_start = set()
        if closed:
            now = self._clock()
            for inode in closed:
                tracked = self.sockets.get(inode)
                if tracked is not None and tracked.test is not None:
                    tracked.closed_by_gc_at = now
                candidates.pop(inode, None)
