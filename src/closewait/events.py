"""What the CLOSE_WAIT recorder counts, as plain values: no kernel, no BPF, no I/O.

The recorder (``closewait.sources.recorder``) watches the kernel's ``sock:inet_sock_set_state``
tracepoint. For each TCP socket it sees

- entering CLOSE_WAIT (the peer's FIN arrived): it keeps the entry time, keyed by socket cookie;
- leaving CLOSE_WAIT: it adds the time spent there (the *dwell*) to a histogram keyed by who left it
  and how (``LeaveReason``), and counts the leave;
- any transition: it moves one socket between per-state counters (``StateCounts``).

This module owns the shapes the views read (``Histogram``, ``Counters``, ``HistogramKey``), the bucket
bounds shared by the kernel program and the Prometheus histogram, and the arithmetic that turns the
kernel's per-state deltas into counts that never drift (``StateCountSync``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from closewait.model import Endpoint, TcpState

#: Upper bounds of the dwell histogram's buckets, in seconds (Prometheus ``le`` labels), 1 ms to 1 h.
#: The kernel program compares each dwell against these (in nanoseconds); a last bucket takes the rest.
BUCKET_BOUNDS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip
BUCKET_BOUNDS_NS: tuple[int, ...] = tuple(round(bound * 1e9) for bound in BUCKET_BOUNDS)
#: Buckets the kernel keeps: one per bound, then +Inf.
N_BUCKETS = len(BUCKET_BOUNDS) + 1

#: The kernel's per-state counters are indexed by state number; index 0 is unused.
N_STATE_SLOTS = 13


class LeaveReason(enum.IntEnum):
    """How a socket left CLOSE_WAIT; the numbers are the kernel program's.

    CLOSED  The owner closed it: close() or shutdown(SHUT_WR) moved it to LAST_ACK, or close() of
            a socket with unread data (or SO_LINGER 0) moved it straight to CLOSE, sending an RST.
            Runs in the closing task's context, so the histogram's (cgroup, tgid) is the closer's.
    EXITED  The same kernel path, but the current task was exiting (PF_EXITING): the process never
            closed it; the kernel closed its descriptors at exit. Attributed to the exiting process.
    RESET   Straight to CLOSE without the owner: an RST from the peer, SOCK_DESTROY (``ss -K``,
            ``closewait reap``), a timeout. Runs in softirq or another task: no owner is recorded
            (cgroup id 0, tgid 0).
    """

    CLOSED = 0
    EXITED = 1
    RESET = 2


@dataclass(frozen=True, slots=True)
class HistogramKey:
    """Who left CLOSE_WAIT: the cgroup v2 id and process id (tgid) of the task that did, and how."""

    cgroup_id: int
    tgid: int
    reason: LeaveReason


@dataclass(frozen=True, slots=True)
class Histogram:
    """Dwell times in CLOSE_WAIT, as the kernel bucketed them.

    ``counts[i]`` is the number of dwells in bucket i alone (not cumulative): ``<= bounds[0]``, then
    ``(bounds[i-1], bounds[i]]``, the last one above every bound (+Inf). ``sum_seconds`` is their sum.
    """

    counts: tuple[int, ...]
    sum_seconds: float
    bounds: tuple[float, ...] = BUCKET_BOUNDS

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"{len(self.counts)} bucket counts for {len(self.bounds)} bounds (need one more)")

    @classmethod
    def empty(cls) -> Histogram:
        return cls((0,) * N_BUCKETS, 0.0)

    @classmethod
    def from_kernel(cls, buckets: Sequence[int], sum_ns: int) -> Histogram:
        return cls(tuple(buckets), sum_ns / 1e9)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``[(le, count of dwells <= le), ...]`` ending with ``(inf, count)``: Prometheus buckets."""
        total = 0
        out: list[tuple[float, int]] = []
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    def __add__(self, other: Histogram) -> Histogram:
        if self.bounds != other.bounds:
            raise ValueError("histograms with different bucket bounds")
        counts = tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        return Histogram(counts, self.sum_seconds + other.sum_seconds, self.bounds)

    def __sub__(self, other: Histogram) -> Histogram:
        """What was added since ``other`` (an earlier reading of the same histogram)."""
        if self.bounds != other.bounds:
            raise ValueError("histograms with different bucket bounds")
        counts = tuple(a - b for a, b in zip(self.counts, other.counts, strict=True))
        return Histogram(counts, self.sum_seconds - other.sum_seconds, self.bounds)

    def quantile(self, q: float) -> float:
        """An estimate of the q-quantile in seconds, interpolated inside its bucket as PromQL's
        ``histogram_quantile`` does (the +Inf bucket answers with the highest bound). NaN when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} is not between 0 and 1")
        total = self.count
        if total == 0:
            return math.nan
        rank = q * total
        below = 0
        lower = 0.0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            if n and below + n >= rank:
                return lower + (bound - lower) * (rank - below) / n
            below += n
            lower = bound
        return self.bounds[-1]


@dataclass(frozen=True, slots=True)
class Transition:
    """One socket entering or leaving CLOSE_WAIT, as the recorder's feed reports it.

    ``time_ns`` is CLOCK_MONOTONIC (``time.clock_gettime_ns(time.CLOCK_MONOTONIC)``). An entry
    (``entered``) happens in softirq when the peer's FIN arrives: it has no process, so ``reason``,
    ``dwell_ns``, ``tgid``, ``comm`` and ``cgroup_id`` are None. A leave carries how (``reason``),
    the time spent in CLOSE_WAIT, and, unless ``reason`` is RESET, the task that closed it.
    """

    time_ns: int
    cookie: int
    old_state: TcpState
    new_state: TcpState
    local: Endpoint
    remote: Endpoint
    reason: LeaveReason | None = None
    dwell_ns: int | None = None
    tgid: int | None = None
    comm: str | None = None
    cgroup_id: int | None = None

    @property
    def entered(self) -> bool:
        return self.reason is None


def age_seconds(entry_ns: int, now_ns: int) -> float:
    """How long a socket has been in CLOSE_WAIT: ``now_ns`` is CLOCK_MONOTONIC read by the caller
    (``time.clock_gettime_ns(time.CLOCK_MONOTONIC)``), the clock the kernel stamped ``entry_ns`` with."""
    return max(0, now_ns - entry_ns) / 1e9


def wall_time(entry_ns: int, now_ns: int, wall_now: float) -> float:
    """The wall-clock time (seconds since the epoch) of a monotonic ``entry_ns``, given one pair of
    readings of both clocks taken together (``now_ns`` monotonic, ``wall_now`` = ``time.time()``)."""
    return wall_now - (now_ns - entry_ns) / 1e9


def bucket_index(dwell_ns: int, bounds_ns: Sequence[int] = BUCKET_BOUNDS_NS) -> int:
    """The bucket the kernel program puts a dwell of ``dwell_ns`` in (``le``: a bound is inclusive)."""
    for index, bound in enumerate(bounds_ns):
        if dwell_ns <= bound:
            return index
    return len(bounds_ns)


def merge_histograms(histograms: Iterable[Histogram]) -> Histogram:
    total = Histogram.empty()
    for histogram in histograms:
        total = total + histogram
    return total


@dataclass(frozen=True, slots=True)
class Counters:
    """The recorder's counters since it was attached (they only grow).

    ``entered`` sockets entered CLOSE_WAIT; each one that left did so in one of ``left_closed``,
    ``left_exited``, ``left_reset`` (see ``LeaveReason``), or in ``left_untracked`` when it had no
    entry time: it entered before the recorder was attached, or when the entries map was full
    (``entries_dropped``). So ``entered - entries_dropped - left`` is how many tracked sockets are
    in CLOSE_WAIT now. ``histogram_dropped`` leaves found no free histogram slot (more
    (cgroup, tgid, reason) keys than the map holds); they are counted, not bucketed.
    ``transitions`` counts every TCP state change seen; ``missed`` counts the program's runs the
    kernel skipped because it was already running on that CPU (a softirq interrupting it), whose
    transitions are lost: the per-state counts are resynchronised for that, the other counters are not.
    """

    entered: int
    left_closed: int
    left_exited: int
    left_reset: int
    left_untracked: int
    histogram_dropped: int
    entries_dropped: int
    transitions: int
    missed: int

    @property
    def left(self) -> int:
        return self.left_closed + self.left_exited + self.left_reset

    def left_by(self, reason: LeaveReason) -> int:
        return (self.left_closed, self.left_exited, self.left_reset)[reason]

    def __sub__(self, other: Counters) -> Counters:
        return Counters(*(getattr(self, name) - getattr(other, name) for name in self.__slots__))


#: States whose every entry and exit the tracepoint reports, so their counts can be kept from the
#: events alone. TIME_WAIT and NEW_SYN_RECV live in lightweight socks that never pass through the
#: tracepoint, and CLOSE is where a socket is unhashed (sock_diag does not list it any more): those
#: three are counted by the resynchronisation only.
TRACKED_STATES: frozenset[TcpState] = frozenset(TcpState) - {TcpState.TIME_WAIT, TcpState.NEW_SYN_RECV, TcpState.CLOSE}


class StateCountSync:
    """Per-state counts from the kernel's running deltas, pinned to a sock_diag count.

    The kernel program adds 1 to the new state and subtracts 1 from the old one on every transition
    (birth, CLOSE -> SYN_SENT/LISTEN, and death, X -> CLOSE, only move one side; a passive open is
    reported as LISTEN -> SYN_RECV and counted as a birth). Those deltas start at 0 when the program
    is attached, so they miss every socket that existed before. A resync takes one sock_diag count
    ``C`` and the kernel deltas ``D`` around it and keeps ``offset = C - D``; from then on
    ``count = D_now + offset`` for the tracked states. Transitions during the dump make ``C``
    ambiguous: ``resync`` is given the deltas read before and after, and when they differ the caller
    retries (``consistent`` False); after the last try it keeps the midpoint (off by at most half the
    transitions that raced the dump, corrected at the next resync). Missed program runs (see
    ``Counters.missed``) are the only way the deltas drift; any resync removes that drift.
    """

    def __init__(self) -> None:
        # One resync's result, replaced by one assignment: ``counts()`` in another thread (a scrape
        # while the exporter's resync thread runs) reads either the old pin or the new one, whole.
        self._pin: _Pin | None = None

    @property
    def synced(self) -> bool:
        return self._pin is not None

    def resync(
        self, diag_counts: Mapping[TcpState, int], deltas_before: Sequence[int], deltas_after: Sequence[int]
    ) -> bool:
        """Pin the offsets to ``diag_counts``; True when no transition raced the dump."""
        offsets: dict[TcpState, int] = {}
        for state in TRACKED_STATES:
            middle = (deltas_before[state] + deltas_after[state]) // 2
            offsets[state] = diag_counts.get(state, 0) - middle
        untracked = {state: diag_counts.get(state, 0) for state in TcpState if state not in TRACKED_STATES}
        self._pin = _Pin(offsets, untracked)
        return list(deltas_before) == list(deltas_after)

    def counts(self, deltas: Sequence[int]) -> dict[TcpState, int]:
        """Every state's count: the tracked ones from ``deltas``, the others as of the last resync."""
        pin = self._pin
        if pin is None:
            raise RuntimeError("resync() first")
        out: dict[TcpState, int] = {}
        for state in sorted(TcpState):
            if state in TRACKED_STATES:
                out[state] = max(0, deltas[state] + pin.offsets[state])
            else:
                out[state] = pin.untracked[state]
        return out


@dataclass(frozen=True, slots=True)
class _Pin:
    """What one resync decided: the tracked states' offsets and the untracked states' counts."""

    offsets: dict[TcpState, int]
    untracked: dict[TcpState, int]
