"""Helpers for a test suite: fail a test that leaves sockets in CLOSE_WAIT.

The pytest plugin (``closewait.pytest_plugin``) is a thin layer over this module, and everything
here works without pytest (this module never imports it)::

    from closewait.testing import assert_no_close_wait, no_new_close_wait

    with no_new_close_wait(grace=0.5):   # fails if the block leaves a CLOSE_WAIT socket behind
        run_the_code_under_test()

    assert_no_close_wait()               # fails if this process holds any CLOSE_WAIT socket now

A failure raises ``CloseWaitLeak`` (an ``AssertionError``) whose message lists each socket with its
diagnosis and, when ``closewait.trace`` is on, the line that created it.

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
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from closewait import trace
from closewait.diagnosis import diagnose
from closewait.model import Finding, Role
from closewait.scanning import CLOSE_WAIT_ONLY, scan
from closewait.sources.probe import close_wait_inodes

__all__ = [
    "DEFAULT_GRACE",
    "CloseWaitLeak",
    "Guard",
    "Leak",
    "assert_no_close_wait",
    "close_wait_inodes",
    "close_wait_sockets",
    "find_leaks",
    "format_leaks",
    "no_new_close_wait",
]

#: Seconds a check waits for asynchronous closes before reporting.
DEFAULT_GRACE = 0.5
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
    traced = False
    for number, leak in enumerate(leaks, 1):
        finding = leak.finding
        sock = finding.socket
        fds = ",".join(str(fd) for fd in leak.fds) or "?"
        role = f"{finding.role.value}{' (accepted, from the trace)' if leak.role_from_trace else ''}"
        code = finding.diagnosis.code if finding.diagnosis else "-"
        lines.append(
            f"  {number}) fd {fds}  {sock.local} <- {sock.remote}  role {role}  Recv-Q {sock.recv_q}  [{code}]"
        )
        if finding.diagnosis is not None:
            lines.append(f"     {finding.diagnosis.summary}")
            lines.append(f"     fix: {finding.diagnosis.remedy}")
        if leak.traceback is not None:
            traced = True
            lines.append(f"     {leak.traceback.describe()}")
            app_frames = leak.traceback.application_frames
            if len(app_frames) > 1:
                lines.append("     application frames, most recent call first:")
                lines.extend(f"       {frame}" for frame in app_frames[:5])
    if not traced and hint:
        lines.append(hint)
    return "\n".join(lines)
