"""Watching CLOSE_WAIT over time: per-process counts, growth rate, socket ages and a leak verdict.

``closewait watch`` (and anything else that samples repeatedly) feeds Snapshots into a ``Tracker``;
each ``Tracker.observe(snapshot)`` returns an immutable ``Sample``. The tracker does no I/O, so
it can be tested with hand-made Snapshots and reused by other views; ``sample_forever`` is the
thin loop that scans the kernel at an interval.

What the numbers mean (docs/monitoring.md repeats this for users):

- **count**: CLOSE_WAIT sockets the process holds now. A socket shared by several processes (fork,
  SCM_RIGHTS) counts under each.
- **change**: count now minus the count in the tracker's first sample (0 if the process was not
  there yet): "change since start".
- **rate per minute**: the least-squares slope of count over time across the leak window (the last
  ``window`` samples), times 60. A least-squares slope is used, not (last - first) / time, so one
  burst or one early close does not swing it.
- **oldest age**: two clocks, because each alone misleads.
  ``first_seen``: how long ago this tracker first saw the oldest socket still open (a socket is
  known by its inet_diag cookie, or by its inode when the backend has no cookie; both are unique
  while the socket lives). It starts at 0 for sockets that were already there when watching began.
  ``idle``: tcp_info's time since the peer last sent anything (``Socket.idle_ms``): for CLOSE_WAIT
  that is at least the age of the peer's FIN, so it also covers sockets older than the watch. The
  procfs backend has no tcp_info; then only first-seen is known.
- **leak verdict** (``Trend.LEAKING``): the process has been seen in at least ``window`` consecutive
  samples, its count never decreased across the last ``window`` samples (monotonic non-decreasing),
  and it grew by at least ``min_growth`` sockets over them. A pool that holds a steady 40 sockets,
  or one that climbs and drops back, is not a leak; a count that ratchets up by ``min_growth`` or
  more without ever going down is. ``GROWING``: grew over the window but not (yet) a leak.
  ``SHRINKING``: fell over the window. ``STEADY``: otherwise. ``NEW``: fewer samples than the window.

Pitfall: processes are keyed by (pid, start time), not pid, so a pid reused by a new process starts
a fresh history instead of inheriting the old one's count.

``Tracker(by="workload")`` keeps the same numbers per workload (container, pod, unit, the host)
instead of per process, keyed by the workload's kind, name and id: a container whose worker
processes are replaced keeps one history, which per process would restart with every new pid.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

from closewait.errors import UsageError
from closewait.events import Transition, wall_time
from closewait.model import Finding, Process, ProcessGroup, Snapshot, TcpState

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from closewait.sources.recorder import Recorder
    from closewait.workload import Workload

log = logging.getLogger(__name__)

#: Leak window (samples) and minimum growth (sockets) used when the caller gives none.
DEFAULT_WINDOW = 5
DEFAULT_MIN_GROWTH = 3


class Trend(enum.StrEnum):
    NEW = "new"
    STEADY = "steady"
    GROWING = "growing"
    SHRINKING = "shrinking"
    LEAKING = "leaking"


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """One process's CLOSE_WAIT in one sample. ``process`` is None for sockets with no known owner."""

    process: Process | None
    count: int
    change: int
    rate_per_minute: float | None
    oldest_first_seen_s: float | None
    oldest_idle_s: float | None
    unread_bytes: int
    #: Diagnosis code -> number of sockets, most frequent first.
    diagnoses: tuple[tuple[str, int], ...]
    trend: Trend
    #: The counts over the leak window, oldest first (what the verdict was computed from).
    window_counts: tuple[int, ...]
    #: The process's workload; in a sample by workload, the workload of the row (None: not known).
    workload: Workload | None = None
    #: How many processes the row covers (1 by process; by workload, the workload's processes).
    process_count: int = 1

    @property
    def leaking(self) -> bool:
        return self.trend == Trend.LEAKING

    @property
    def oldest_age_s(self) -> float | None:
        """The larger of the two clocks: the best lower bound for how long the oldest socket has been stuck."""
        ages = [a for a in (self.oldest_first_seen_s, self.oldest_idle_s) if a is not None]
        return max(ages) if ages else None

    @property
    def diagnosis(self) -> str:
        """The most frequent diagnosis code ('-' when there is none)."""
        return self.diagnoses[0][0] if self.diagnoses else "-"


@dataclass(frozen=True, slots=True)
class Sample:
    """What the tracker knows after one more snapshot."""

    index: int
    taken_at: float
    elapsed_s: float
    total: int
    total_change: int
    processes: tuple[ProcessSample, ...]
    errors: tuple[str, ...]
    netns: str | None
    #: "process" or "workload": what each row of ``processes`` stands for.
    grouping: str = "process"

    @property
    def leaking(self) -> tuple[ProcessSample, ...]:
        return tuple(p for p in self.processes if p.leaking)


def slope_per_minute(points: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of count over time, in sockets per minute (None for < 2 points or no time spread)."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_c = sum(c for _, c in points) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in points)
    if var_t <= 0:
        return None
    cov = sum((t - mean_t) * (c - mean_c) for t, c in points)
    return cov / var_t * 60.0


def classify(counts: list[int], window: int, min_growth: int) -> Trend:
    """The verdict for a process whose counts over its consecutive samples are ``counts`` (oldest first)."""
    if len(counts) < window:
        return Trend.NEW
    recent = counts[-window:]
    growth = recent[-1] - recent[0]
    monotonic = all(b >= a for a, b in itertools.pairwise(recent))
    if monotonic and growth >= min_growth:
        return Trend.LEAKING
    if growth > 0:
        return Trend.GROWING
    if growth < 0:
        return Trend.SHRINKING
    return Trend.STEADY


def _socket_key(finding: Finding) -> tuple[int, int]:
    sock = finding.socket
    # The cookie is unique for the socket's life; inode too, and procfs has no cookie.
    return (sock.cookie or 0, sock.inode)


_ProcessKey = tuple[object, ...] | None
#: How a Tracker groups sockets into rows.
GROUPINGS = ("process", "workload")


@dataclass(frozen=True, slots=True)
class _Row:
    key: _ProcessKey
    group: ProcessGroup
    workload: Workload | None
    process_count: int


def _process_rows(snapshot: Snapshot) -> list[_Row]:
    rows = []
    for group in snapshot.by_process(TcpState.CLOSE_WAIT):
        process = group.process
        key = process.identity if process is not None else None
        rows.append(_Row(key, group, process.workload if process is not None else None, int(process is not None)))
    return rows


def _workload_rows(snapshot: Snapshot) -> list[_Row]:
    """One row per workload; a socket several of its processes share counts once."""
    rows = []
    for group in snapshot.by_workload(TcpState.CLOSE_WAIT):
        owned = [g.process for g in group.processes if g.process is not None]
        workload = group.workload
        key: _ProcessKey
        if workload is not None:
            key = ("workload", workload.kind, workload.name, workload.id)
        elif owned:
            key = owned[0].identity  # a process whose workload was not looked up: by process
        else:
            key = None
        findings = tuple({id(f): f for g in group.processes for f in g.findings}.values())
        process = owned[0] if len(owned) == 1 else None
        rows.append(_Row(key, ProcessGroup(process, findings), workload, len(owned)))
    return rows


@dataclass
class _History:
    points: deque[tuple[float, int]]
    baseline: int


class Tracker:
    """Turns a stream of Snapshots into Samples. Pure: no clock, no kernel (time comes from the snapshots).

    ``window`` (>= 2) samples and ``min_growth`` (>= 1) sockets define the leak verdict (module docstring).
    """

    def __init__(
        self, *, window: int = DEFAULT_WINDOW, min_growth: int = DEFAULT_MIN_GROWTH, by: str = "process"
    ) -> None:
        if by not in GROUPINGS:
            raise UsageError(f"unknown grouping {by!r}: choose process or workload")
        self.by = by
        if window < 2:
            raise UsageError(f"leak window must be at least 2 samples, got {window}")
        if min_growth < 1:
            raise UsageError(f"leak growth must be at least 1 socket, got {min_growth}")
        self.window = window
        self.min_growth = min_growth
        self._first_seen: dict[tuple[int, int], float] = {}
        self._history: dict[_ProcessKey, _History] = {}
        self._started_at: float | None = None
        self._first_total: int | None = None
        self._index = 0

    def observe(self, snapshot: Snapshot) -> Sample:
        """Account for one more snapshot (its CLOSE_WAIT sockets only) and return the resulting sample."""
        now = snapshot.taken_at
        first = self._started_at is None
        if self._started_at is None:
            self._started_at = now
        close_wait = snapshot.in_state(TcpState.CLOSE_WAIT)

        alive: set[tuple[int, int]] = set()
        for finding in close_wait:
            key = _socket_key(finding)
            alive.add(key)
            self._first_seen.setdefault(key, now)
        for key in set(self._first_seen) - alive:
            del self._first_seen[key]  # closed (or left CLOSE_WAIT): forget it

        present: set[_ProcessKey] = set()
        rows: list[ProcessSample] = []
        for row in _workload_rows(snapshot) if self.by == "workload" else _process_rows(snapshot):
            group, pkey = row.group, row.key
            present.add(pkey)
            history = self._history.get(pkey)
            if history is None:
                history = _History(deque(maxlen=self.window), baseline=group.count if first else 0)
                self._history[pkey] = history
            history.points.append((now, group.count))
            counts = [c for _, c in history.points]
            first_seen = min(self._first_seen[_socket_key(f)] for f in group.findings)
            idle = group.oldest_idle_ms
            diagnoses = sorted(group.diagnosis_counts().items(), key=lambda item: (-item[1], item[0]))
            rows.append(
                ProcessSample(
                    process=group.process,
                    count=group.count,
                    change=group.count - history.baseline,
                    rate_per_minute=slope_per_minute(list(history.points)),
                    oldest_first_seen_s=now - first_seen,
                    oldest_idle_s=idle / 1000 if idle is not None else None,
                    unread_bytes=group.unread_bytes,
                    diagnoses=tuple(diagnoses),
                    trend=classify(counts, self.window, self.min_growth),
                    window_counts=tuple(counts),
                    workload=row.workload,
                    process_count=row.process_count,
                )
            )
        # A process that dropped to zero CLOSE_WAIT is not in by_process(): its history records the 0
        # (so a later climb is measured from there), but it leaves the view; a gone process is forgotten.
        for pkey in set(self._history) - present:
            history = self._history[pkey]
            history.points.append((now, 0))
            if all(c == 0 for _, c in history.points):
                del self._history[pkey]

        total = len(close_wait)
        if self._first_total is None:
            self._first_total = total
        sample = Sample(
            index=self._index,
            taken_at=now,
            elapsed_s=now - self._started_at,
            total=total,
            total_change=total - self._first_total,
            processes=tuple(rows),
            errors=snapshot.errors,
            netns=snapshot.netns,
            grouping=self.by,
        )
        self._index += 1
        return sample


def sample_forever(
    take: Callable[[], Snapshot],
    tracker: Tracker,
    *,
    interval: float,
    count: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Sample]:
    """Scan with ``take()`` every ``interval`` seconds (``count`` times, or until the caller stops).

    The interval is measured start to start, so a slow scan does not stretch it; a scan longer than
    the interval starts the next one at once.
    """
    if interval <= 0:
        raise UsageError(f"interval must be positive, got {interval}")
    if count is not None and count < 1:
        raise UsageError(f"count must be at least 1, got {count}")
    done = 0
    while count is None or done < count:
        started = time.monotonic()
        yield tracker.observe(take())
        done += 1
        if count is not None and done >= count:
            return
        sleep(max(0.0, interval - (time.monotonic() - started)))


def sample_dict(sample: Sample) -> dict[str, object]:
    """A Sample as JSON-ready data (``watch --jsonl``; names documented in docs/monitoring.md)."""
    return {
        "sample": sample.index,
        "taken_at": sample.taken_at,
        "elapsed_s": round(sample.elapsed_s, 3),
        "total": sample.total,
        "total_change": sample.total_change,
        "netns": sample.netns,
        "errors": list(sample.errors),
        "by": sample.grouping,
        "processes": [
            {
                "pid": p.process.pid if p.process else None,
                "name": p.process.name if p.process else None,
                "cmdline": list(p.process.cmdline) if p.process else None,
                "count": p.count,
                "change": p.change,
                "rate_per_minute": None if p.rate_per_minute is None else round(p.rate_per_minute, 3),
                "oldest_first_seen_s": None if p.oldest_first_seen_s is None else round(p.oldest_first_seen_s, 3),
                "oldest_idle_s": None if p.oldest_idle_s is None else round(p.oldest_idle_s, 3),
                "oldest_age_s": None if p.oldest_age_s is None else round(p.oldest_age_s, 3),
                "unread_bytes": p.unread_bytes,
                "diagnosis": p.diagnosis,
                "diagnoses": dict(p.diagnoses),
                "trend": p.trend.value,
                "leaking": p.leaking,
                "window_counts": list(p.window_counts),
                "workload": p.workload.as_dict() if p.workload is not None else None,
                "process_count": p.process_count,
            }
            for p in sample.processes
        ],
    }


# -- watch --events: the recorder's feed of transitions into and out of CLOSE_WAIT -----------------


@dataclass(frozen=True, slots=True)
class Event:
    """One transition from the recorder's feed (``Transition``), and its wall-clock time ``at``
    (seconds since the epoch; the feed stamps CLOCK_MONOTONIC)."""

    transition: Transition
    at: float


def watch_events(
    *, netns: str | None = None, ports: Collection[int] = (), count: int | None = None, poll: float = 0.25
) -> Iterator[Event]:
    """Every socket entering or leaving CLOSE_WAIT from now on, as it happens (within ``poll``
    seconds), until ``count`` events or the caller stops iterating.

    Opens a recorder of its own with a feed (``Recorder.open(feed=True)``: root, BTF); it is
    detached when the iteration ends. RecorderUnavailable (one line) when it cannot run. ``netns``
    (a namespace path) records only that namespace; ``ports`` keeps events whose local or remote
    port is one of them. An entry happens in softirq and has no process; a leave carries the pid
    and comm of the task that closed the socket (``reason`` closed or exited), none for a reset.
    A socket that entered CLOSE_WAIT before the call has no entry time, so its leave is not reported.
    """
    from closewait.sources.recorder import Recorder

    # Opened here, not in the generator: a recorder that cannot run fails the call, not the first next().
    recorder = Recorder.open(netns=netns, feed=True, capacity=EVENTS_CAPACITY)
    return _events(recorder, frozenset(ports), count, poll)


#: Sockets whose entry the events recorder keeps at once (a leave is reported only for those).
EVENTS_CAPACITY = 1 << 16


def _events(recorder: Recorder, wanted: frozenset[int], count: int | None, poll: float) -> Iterator[Event]:
    seen = 0
    with recorder:
        feed = recorder.feed()
        while count is None or seen < count:
            batch = feed.read(timeout=poll)
            if not batch:
                continue
            now_ns, wall_now = time.clock_gettime_ns(time.CLOCK_MONOTONIC), time.time()
            for transition in batch:
                if wanted and transition.local.port not in wanted and transition.remote.port not in wanted:
                    continue
                yield Event(transition, wall_time(transition.time_ns, now_ns, wall_now))
                seen += 1
                if count is not None and seen >= count:
                    return
