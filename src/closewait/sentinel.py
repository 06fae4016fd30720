"""An in-process watchdog: a daemon thread that logs this process's CLOSE_WAIT sockets.

One call starts it, for the life of an application::

    import closewait.sentinel
    sentinel = closewait.sentinel.start(interval=30.0)                 # log only
    sentinel = closewait.sentinel.start(action="shutdown", idle_limit=300.0, trace=True)
    ...
    sentinel.stop()                                                    # or use it as a context manager

Every ``interval`` seconds it checks the process's own sockets and, when some are in CLOSE_WAIT,
logs one WARNING with the count and the diagnoses (``closewait.sentinel`` logger unless one is
given), plus one WARNING per socket the first time it is seen (endpoints, fd, diagnosis, and the
line that created it when ``trace=True`` started ``closewait.trace``). Records carry ``extra``
fields (``closewait_count``, ``closewait_diagnoses``; per socket ``closewait_inode``, ``closewait_fd``)
for structured logging.

With ``action="shutdown"`` it also shuts down the CLOSE_WAIT sockets idle longer than ``idle_limit``
seconds (idle = since anything arrived from the peer, from tcp_info). It never closes the
application's descriptor: it duplicates it, checks the duplicate still refers to the same socket
(same inode: the application may have closed the fd and reused the number since the scan), calls
``shutdown(SHUT_RDWR)`` on the duplicate and closes the duplicate. The shutdown sends our FIN, the
connection leaves the TCP table (LAST_ACK, then gone), and the application's next ``recv`` returns
``b''``, so code that handles EOF closes it; the descriptor itself stays the application's to close.

Cost, bounded: a check is one walk of ``/proc/self/fd`` asking each descriptor its TCP state
(``getsockopt(TCP_INFO)``, ``closewait.sources.probe``; where libc cannot be reached, a ``readlink``
per descriptor and one sock_diag dump of the host's CLOSE_WAIT sockets). Only when that finds a
socket in CLOSE_WAIT does it run the full ``scan(pids=[own pid])`` for diagnoses.
docs/prevention.md has measured figures; ``statistics()`` reports the cost of the last and the
slowest check.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Literal

from closewait import trace as trace_mod
from closewait.display import format_duration
from closewait.errors import ClosewaitError, UsageError
from closewait.model import Finding
from closewait.scanning import CLOSE_WAIT_ONLY, scan
from closewait.sources import probe
from closewait.sources.probe import shutdown_socket

__all__ = [
    "DEFAULT_IDLE_LIMIT",
    "DEFAULT_INTERVAL",
    "Sentinel",
    "SentinelReport",
    "SentinelStatistics",
    "shutdown_socket",
    "start",
]

DEFAULT_INTERVAL = 30.0
DEFAULT_IDLE_LIMIT = 300.0
#: Per-socket records logged at most per check (the summary record always gives the full count).
MAX_SOCKETS_LOGGED = 20

log = logging.getLogger(__name__)

Action = Literal["shutdown"] | None


@dataclass(frozen=True, slots=True)
class SentinelStatistics:
    """What the sentinel has done since it started. Times are seconds of wall clock."""

    running: bool
    checks: int
    errors: int
    close_wait_last: int
    close_wait_max: int
    shutdowns: int
    last_check_seconds: float
    max_check_seconds: float
    total_check_seconds: float


@dataclass(frozen=True, slots=True)
class SentinelReport:
    """The result of one check: the CLOSE_WAIT findings and the inodes shut down."""

    findings: tuple[Finding, ...]
    shut_down: tuple[int, ...] = ()
    seconds: float = 0.0
    #: diagnosis code -> how many sockets have it (read-only).
    diagnoses: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


class Sentinel:
    """The watchdog thread. Build it with ``start()``; ``stop()`` ends it (bounded join)."""

    def __init__(
        self,
        interval: float = DEFAULT_INTERVAL,
        *,
        action: Action = None,
        idle_limit: float = DEFAULT_IDLE_LIMIT,
        logger: logging.Logger | None = None,
        trace: bool = False,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval > 0:
            raise UsageError(f"sentinel interval must be a positive number of seconds, not {interval!r}")
        if action not in (None, "shutdown"):
            raise UsageError(f"sentinel action must be None or 'shutdown', not {action!r}")
        if isinstance(idle_limit, bool) or not isinstance(idle_limit, int | float) or not idle_limit >= 0:
            raise UsageError(f"sentinel idle_limit must be 0 or more seconds, not {idle_limit!r}")
        self.interval = float(interval)
        self.action: Action = action
        self.idle_limit = float(idle_limit)
        self.logger = logger if logger is not None else log
        self.trace = trace
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started_trace = False
        self._reported: set[int] = set()
        self._checks = 0
        self._errors = 0
        self._close_wait_last = 0
        self._close_wait_max = 0
        self._shutdowns = 0
        self._last_seconds = 0.0
        self._max_seconds = 0.0
        self._total_seconds = 0.0

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> Sentinel:
        """Start the thread (and tracing, when asked). Starting a running sentinel does nothing."""
        with self._lock:
            if self._thread is not None:
                return self
            if self.trace and not trace_mod.is_tracing():
                trace_mod.start()
                self._started_trace = True
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="closewait-sentinel", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread and wait at most ``timeout`` seconds for it. Returns True once it has ended.

        A check in progress finishes first (checks take milliseconds). Tracing started by this
        sentinel is stopped. Idempotent.
        """
        with self._lock:
            thread = self._thread
            self._stop.set()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                self.logger.warning("thread did not stop within %.1f s", timeout)
                return False
        with self._lock:
            self._thread = None
            if self._started_trace:
                trace_mod.stop()
                self._started_trace = False
        return True

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def __enter__(self) -> Sentinel:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def statistics(self) -> SentinelStatistics:
        with self._lock:
            return SentinelStatistics(
                running=self.running,
                checks=self._checks,
                errors=self._errors,
                close_wait_last=self._close_wait_last,
                close_wait_max=self._close_wait_max,
                shutdowns=self._shutdowns,
                last_check_seconds=self._last_seconds,
                max_check_seconds=self._max_seconds,
                total_check_seconds=self._total_seconds,
            )

    # -- the work --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_now()
            except ClosewaitError as err:
                with self._lock:
                    self._errors += 1
                self.logger.warning("check failed: %s", err)
            except Exception:  # a bug in closewait must not kill the application's thread silently
                with self._lock:
                    self._errors += 1
                self.logger.exception("check failed unexpectedly")

    def check_now(self) -> SentinelReport:
        """Run one check in the calling thread: log, and shut down idle sockets if the action says so."""
        with self._check_lock:
            started = time.perf_counter()
            held = probe.close_wait_inodes(self._pid)
            findings: tuple[Finding, ...] = ()
            if held:
                snapshot = scan(CLOSE_WAIT_ONLY, pids=[self._pid])
                findings = tuple(f for f in snapshot.findings if f.socket.inode in held)
            shut_down = self._shutdown_idle(findings) if self.action == "shutdown" else ()
            seconds = time.perf_counter() - started
            diagnoses: dict[str, int] = {}
            for finding in findings:
                code = finding.diagnosis.code if finding.diagnosis else "-"
                diagnoses[code] = diagnoses.get(code, 0) + 1
            with self._lock:
                self._checks += 1
                self._close_wait_last = len(findings)
                self._close_wait_max = max(self._close_wait_max, len(findings))
                self._shutdowns += len(shut_down)
                self._last_seconds = seconds
                self._max_seconds = max(self._max_seconds, seconds)
                self._total_seconds += seconds
            self._log(findings, diagnoses, shut_down)
            return SentinelReport(findings, shut_down, seconds, MappingProxyType(diagnoses))

    def _log(self, findings: tuple[Finding, ...], diagnoses: dict[str, int], shut_down: tuple[int, ...]) -> None:
        current = {f.socket.inode for f in findings}
        self._reported &= current
        if not findings:
            return
        summary = ", ".join(f"{code}: {n}" for code, n in sorted(diagnoses.items()))
        shut = f"; shut down {len(shut_down)} idle longer than {self.idle_limit:g} s" if shut_down else ""
        self.logger.warning(
            "%d socket%s in CLOSE_WAIT in this process (%s)%s",
            len(findings),
            "" if len(findings) == 1 else "s",
            summary,
            shut,
            extra={"closewait_count": len(findings), "closewait_diagnoses": dict(diagnoses)},
        )
        new = [f for f in findings if f.socket.inode not in self._reported]
        for finding in new[:MAX_SOCKETS_LOGGED]:
            sock = finding.socket
            fds = ",".join(str(o.fd) for o in finding.owners if o.process.pid == self._pid) or "?"
            code = finding.diagnosis.code if finding.diagnosis else "-"
            summary_line = finding.diagnosis.summary if finding.diagnosis else ""
            site = ""
            if trace_mod.is_tracing():
                tb = trace_mod.get_traceback(finding)
                if tb is not None:
                    site = f"; {tb.describe()}"
            idle = f", idle {format_duration(sock.idle_ms)}" if sock.idle_ms is not None else ""
            self.logger.warning(
                "CLOSE_WAIT fd %s %s <- %s role %s [%s]%s: %s%s",
                fds,
                sock.local,
                sock.remote,
                finding.role.value,
                code,
                idle,
                summary_line,
                site,
                extra={"closewait_inode": sock.inode, "closewait_fd": fds, "closewait_diagnosis": code},
            )
        self._reported |= {f.socket.inode for f in new[:MAX_SOCKETS_LOGGED]}

    def _shutdown_idle(self, findings: tuple[Finding, ...]) -> tuple[int, ...]:
        limit_ms = self.idle_limit * 1000.0
        done: list[int] = []
        for finding in findings:
            sock = finding.socket
            if sock.idle_ms is None or sock.idle_ms < limit_ms:
                continue  # no tcp_info (procfs backend) means no idle time: never act on a guess
            fd = next((o.fd for o in finding.owners if o.process.pid == self._pid), None)
            if fd is None:
                continue
            if shutdown_socket(fd, sock.inode):
                done.append(sock.inode)
                self.logger.info(
                    "shut down fd %d %s <- %s (CLOSE_WAIT, idle %s)",
                    fd,
                    sock.local,
                    sock.remote,
                    format_duration(sock.idle_ms),
                )
        return tuple(done)


def start(
    interval: float = DEFAULT_INTERVAL,
    *,
    action: Action = None,
    idle_limit: float = DEFAULT_IDLE_LIMIT,
    logger: logging.Logger | None = None,
    trace: bool = False,
) -> Sentinel:
    """Start a sentinel thread for this process and return it (see the module docstring)."""
    return Sentinel(interval, action=action, idle_limit=idle_limit, logger=logger, trace=trace).start()
