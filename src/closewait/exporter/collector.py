"""The exporter's Collector: one scan becomes Prometheus metric families. No HTTP here
(``closewait.exporter.http`` serves a registry).

Nothing is registered at import. Build a ``CloseWaitCollector`` and register it on the registry you
choose (``registry`` and the ``/proc`` root are injected, as in prometheus_client's own
process_collector)::

    registry = CollectorRegistry()
    registry.register(CloseWaitCollector(top_n=20, min_interval=5))

``describe()`` returns the metric families without samples, so registering never scans.

How a scrape is made (docs/monitoring.md has the metric reference):

- **State counts** (``closewait_tcp_sockets{state}``, every state, zeros included): one netlink
  dump of all states per family *without* tcp_info and without owners, reading only each message's
  state byte (``netlink.count_by_state``; without sock_diag, counted from /proc/net/tcp). This is
  what node_exporter's tcpstat gives, minus its gap: states with no sockets still emit 0, so
  ``rate()`` and alerts do not see series vanish. With the recorder (one namespace) they come from
  its per-transition counters instead: one map read, no dump (``recording.StateResync`` re-pins them
  to a count outside the scrapes).
- **CLOSE_WAIT per process**: ``closewait.scan`` of CLOSE_WAIT (plus listeners, for the role) with
  owners. Only CLOSE_WAIT sockets are dumped with tcp_info and only their inodes are looked for in
  /proc/PID/fd, so 100,000 established connections cost one cheap count, not 100,000 owner lookups.
  The collector keeps the last full owner pass (``OwnerCache``): a scan within
  ``OWNER_CACHE_MAX_AGE_S`` of it re-checks its answer (cookie, process, fd) instead of reading
  every fd table again, unless a CLOSE_WAIT socket it has not seen appeared.
  Nothing a scan computes that no series uses: no CLOSE_WAIT ages (the histogram comes from the
  recorder), and the cyclic garbage collector waits while the scan's short-lived objects are made.
- **Minimum interval**: a scan younger than ``min_interval`` seconds is reused, and scrapes that
  arrive while a scan runs wait for it, so two Prometheus servers (HA pairs) or a dashboard refresh
  storm cost one scan. ``min_interval=0`` rescans for every scrape that arrives when no scan is
  running (benchmarks); scrapes that waited for a scan are served the first scan that started after
  they arrived, so a burst costs at most two scans.
- **Workload labels**: the per-process series are labelled by the workload that holds the sockets
  (``namespace``, ``pod``, ``container`` on Kubernetes; ``container`` for other containers; ``unit``
  for systemd units and for the service a container runs under) and the process name
  (``process``), each ``""`` where it does not apply, so a fleet can ``sum by (namespace, pod)``.
  Owners are named by one ``WorkloadResolver`` that lives as long as the collector (its cache, per
  pid and start time, serves every scan). The ``pid`` label is opt-in (``pid_label=True``,
  ``--pid-label``): without it, the processes of one name in one workload are one series, which does
  not churn when they restart.
- **Bounded cardinality** (``fold_rows``): the ``top_n`` workloads with the most CLOSE_WAIT keep
  their series, and within each of them its ``top_n`` process rows; a kept workload's other process
  rows are summed into its ``process="other"`` row, and every folded workload into one
  ``process="other"`` row with empty workload labels (per netns). Sockets with no owner are
  ``process="unowned"``. ``closewait_workloads_folded`` and ``closewait_processes_folded`` say how
  many were folded. At most ``top_n * (top_n + 1)`` rows, plus one ``other`` and one ``unowned`` row
  per namespace, whatever the host does.
- **Errors are counted, never swallowed**: ``closewait_scan_errors_total{kind}`` with ``kind`` one
  of ``scan`` (the scan failed; the last good values are not re-served, only the counters and
  ``closewait_scan_success 0``), ``netns`` (per scan, each namespace skipped: gone, not enterable,
  or with ``all_netns`` only processes this user may not read are in it),
  ``owners`` (some /proc/PID/fd were unreadable: run as root or with CAP_SYS_PTRACE) and
  ``owners_bpf`` (the BPF owner lookup could not run, so owners came from the slower /proc walk;
  the reason is logged once).
- **Sockets come from the one kernel source** (``closewait.sources.get_source``, asked for
  per-state counts and, with namespaces, the inode -> namespace map): a backend added there is used
  here too.
- **Failures are logged once**, not per scrape: a failed scan's reason when it changes (and when
  scans succeed again), each skipped namespace when it is first skipped (and when it is covered
  again).
- **One other namespace** (``netns="/run/netns/NAME"`` or a pid): scanned instead of the exporter's
  own, with no extra label (an exporter in a sidecar, or a test's private namespace). It is pinned
  (``netns.pin``: a descriptor held open) so a pid that exits and is reused, or a /run/netns name
  deleted and created again, is reported as gone instead of followed; from then on every scrape
  answers ``closewait_scan_success 0`` and counts ``kind="netns"`` (and ``kind="scan"``). ``close()``
  releases the descriptor.
- **All namespaces** (``all_netns=True``): every network namespace any process is in
  (``netns.discover()``, deduplicated by inode) is counted and scanned through a netlink socket
  opened inside it, and the series get a ``netns`` label naming the lowest pid in it and its name
  (``"4711/nginx"``). Socket inodes are unique host-wide, so owners are found with ONE /proc walk
  for all namespaces. Pitfall: the "local port has a listener" role fallback then sees listeners of
  every namespace, so in a rare case a client socket whose local port some other namespace listens
  on is called server. Coverage is reported: namespaces that could not be read (without root,
  other users' processes hide theirs; ``netns.survey``) or entered count as ``kind="netns"`` errors,
  ``closewait_netns_covered`` / ``closewait_netns_skipped`` say how many of each the last scan had.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from closewait.errors import ClosewaitError, NetnsError, NetnsGone, NotSupported, UsageError
from closewait.exporter.series import OTHER, UNOWNED, RowKey, label_names, workload_labels
from closewait.model import Process, Snapshot, Socket, TcpState
from closewait.scanning import scan
from closewait.sources import get_source
from closewait.sources import netns as netns_mod
from closewait.sources.attribution import WorkloadResolver
from closewait.sources.kubernetes import PodApi
from closewait.sources.owner_cache import OwnerCache
from closewait.sources.owners import start_check

if TYPE_CHECKING:
    from closewait.exporter.recording import DwellReader, RecorderReading, RecorderSetup, StateResync

log = logging.getLogger(__name__)

DEFAULT_TOP_N = 20
DEFAULT_MIN_INTERVAL = 5.0
ERROR_KINDS = ("scan", "netns", "owners", "owners_bpf", "kubernetes_api", "recorder")
#: How often the recorder's per-state counts are pinned again to one sock_diag count.
RECORDER_RESYNC_S = 300.0
#: How long after a full owner pass a scan may re-check its answer instead of a new pass
#: (``sources/owner_cache.py``). The one thing a re-check cannot see, a running process that was
#: handed a socket another still holds (SCM_RIGHTS), is missing from the rows for at most this long;
#: longer than the one-shot CLI's 10 s so that scrapes every 15-30 s reuse a pass.
OWNER_CACHE_MAX_AGE_S = 60.0
_CLOSE_WAIT = frozenset({TcpState.CLOSE_WAIT})


def state_label(state: TcpState) -> str:
    """The ``state`` label value: the kernel's name in lower case (``close_wait``), as node_exporter spells it."""
    return state.name.lower()


@dataclass
class _Row:
    """One row of per-process series (a workload's processes of one name, or one process), summed over its sockets."""

    by_role_diagnosis: dict[tuple[str, str], int] = field(default_factory=dict)
    oldest_idle_s: float = 0.0
    unread_bytes: int = 0

    @property
    def count(self) -> int:
        return sum(self.by_role_diagnosis.values())

    def add(self, other: _Row) -> None:
        for key, n in other.by_role_diagnosis.items():
            self.by_role_diagnosis[key] = self.by_role_diagnosis.get(key, 0) + n
        self.oldest_idle_s = max(self.oldest_idle_s, other.oldest_idle_s)
        self.unread_bytes += other.unread_bytes


class Folded(NamedTuple):
    """``fold_rows``' answer: the rows to serve, and how many process rows and workloads were folded."""

    rows: dict[RowKey, _Row]
    processes: int
    workloads: int


class Namespaces(NamedTuple):
    """The network namespaces one scan reads and those it cannot."""

    #: (namespace, label) pairs to read: None is the collector's own namespace, "" its label when it
    #: is the only one (no ``netns`` label), else "PID/COMM" of the lowest pid in it.
    scanned: list[tuple[netns_mod.Netns | None, str]]
    #: Namespaces known to exist that cannot be read: label -> why (only processes this user may not
    #: read are in them).
    unreadable: dict[str, str]


@dataclass(frozen=True)
class ScanResult:
    """What one scan produced, before it becomes metric families."""

    counts: dict[str, dict[TcpState, int]]
    rows: dict[RowKey, _Row]
    folded: int
    duration_s: float
    finished_at: float
    #: Network namespaces read, and namespaces known but skipped (label -> why).
    netns_covered: int = 1
    netns_skipped: dict[str, str] = field(default_factory=dict)
    workloads_folded: int = 0


def _worst_first(item: tuple[object, _Row]) -> tuple[int, object]:
    return (-item[1].count, item[0])


def fold_rows(rows: dict[RowKey, _Row], top_n: int) -> Folded:
    """Bound the rows: keep the ``top_n`` workloads with the most CLOSE_WAIT and, in each, its ``top_n``
    process rows.

    A kept workload's other rows are summed into its own ``process="other"`` row (``pid=""``); each
    folded workload is summed into the row with empty workload labels and ``process="other"`` of its
    namespace (where the host's own folded processes also go). ``process="unowned"`` rows are kept
    whatever ``top_n`` is (one per namespace). Ties are broken by the labels, so the choice is stable
    between scrapes. ``processes`` counts the process rows folded (kept workloads' and folded
    workloads' alike), ``workloads`` the workloads folded.
    """
    result = {key: row for key, row in rows.items() if key.process == UNOWNED}
    by_workload: dict[tuple[str, str, str, str, str], dict[RowKey, _Row]] = {}
    for key, row in rows.items():
        if key.process != UNOWNED:
            by_workload.setdefault(key.workload, {})[key] = row
    totals = {workload: sum(row.count for row in members.values()) for workload, members in by_workload.items()}
    ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
    folded_processes = 0
    for workload, _total in ranked[:top_n]:
        members = sorted(by_workload[workload].items(), key=_worst_first)
        for key, row in members[:top_n]:
            result.setdefault(key, _Row()).add(row)
        for key, row in members[top_n:]:
            result.setdefault(key._replace(process=OTHER, pid=""), _Row()).add(row)
            folded_processes += 1
    for workload, _total in ranked[top_n:]:
        other = result.setdefault(RowKey("", "", "", "", OTHER, netns=workload[0]), _Row())
        for row in by_workload[workload].values():
            other.add(row)
            folded_processes += 1
    return Folded(result, folded_processes, max(0, len(ranked) - top_n))


def rows_from_snapshot(
    snapshot: Snapshot, netns_of: Mapping[int, str] | Callable[[Socket], str], *, pid_label: bool = False
) -> dict[RowKey, _Row]:
    """Per-row sums of one snapshot's CLOSE_WAIT sockets, a row per (netns, workload, process name), or
    per process with ``pid_label``. A shared socket counts under each owner (once per row).
    ``netns_of``: the source's ``netns_of`` (a socket's namespace label), or a map of inode -> label
    (the sockets not accepted yet, inode 0, of every namespace then share one label).

    Runs once per CLOSE_WAIT socket on every scrape: each process's row key is made once per scan
    (a few hundred processes hold thousands of sockets), and each socket's idle time and unread bytes
    are read once, whatever the number of rows it counts in.
    """
    rows: dict[RowKey, _Row] = {}
    key_of: dict[tuple[str, int, int], RowKey] = {}  # (netns, pid, start time) -> its row
    close_wait = TcpState.CLOSE_WAIT
    label_of: Callable[[Socket], str]
    if isinstance(netns_of, Mapping):
        by_inode = netns_of
        label_of = lambda sock: by_inode.get(sock.inode, "")  # noqa: E731
    else:
        label_of = netns_of

    def key_for(process: Process, ns_label: str) -> RowKey:
        known = (ns_label, process.pid, process.start_time)
        key = key_of.get(known)
        if key is None:
            pid = str(process.pid) if pid_label else ""
            key = key_of[known] = RowKey(*workload_labels(process.workload), process.name, pid, ns_label)
        return key

    for finding in snapshot.findings:
        sock = finding.socket
        if sock.state != close_wait:
            continue
        ns_label = label_of(sock) if netns_of else ""
        owners = finding.owners
        keys: Iterable[RowKey]
        if len(owners) == 1:  # the common case: one holder, one row
            keys = (key_for(owners[0].process, ns_label),)
        elif owners:
            keys = {key_for(owner.process, ns_label) for owner in owners}  # once per row
        else:
            keys = (RowKey("", "", "", "", UNOWNED, netns=ns_label),)
        diagnosis = finding.diagnosis
        role_diag = (finding.role.value, diagnosis.code if diagnosis is not None else "")
        idle_ms = sock.idle_ms
        idle_s = idle_ms / 1000 if idle_ms is not None else None
        unread = sock.unread_bytes
        for key in keys:
            row = rows.get(key)
            if row is None:
                row = rows[key] = _Row()
            counts = row.by_role_diagnosis
            counts[role_diag] = counts.get(role_diag, 0) + 1
            if idle_s is not None and idle_s > row.oldest_idle_s:
                row.oldest_idle_s = idle_s
            row.unread_bytes += unread
    return rows


class CloseWaitCollector(Collector):
    """The exporter's Collector: ``collect()`` scans (at most once per ``min_interval``), ``describe()`` never does."""

    def __init__(
        self,
        *,
        proc_root: str = "/proc",
        top_n: int = DEFAULT_TOP_N,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        all_netns: bool = False,
        netns: str | netns_mod.Netns | None = None,
        pid_label: bool = False,
        resolver: WorkloadResolver | None = None,
        clock: Callable[[], float] = time.monotonic,
        recorder: str = "off",
        recorder_pin_dir: str | None = None,
        recorder_resync_s: float = RECORDER_RESYNC_S,
    ) -> None:
        if top_n < 0:
            raise UsageError(f"--top must not be negative, got {top_n}")
        if min_interval < 0:
            raise UsageError(f"--min-interval must not be negative, got {min_interval}")
        self.proc_root = proc_root
        self.top_n = top_n
        self.min_interval = min_interval
        if all_netns and netns is not None:
            raise UsageError("give --all-netns or --netns, not both")
        self.all_netns = all_netns
        resolved = netns_mod.resolve(netns, proc_root=proc_root) if isinstance(netns, str) else netns
        # Pinned: a long-running exporter must not follow the path to another namespace later.
        self.netns = netns_mod.pin(resolved) if resolved is not None and resolved.fd is None else resolved
        self._pinned = self.netns is not resolved
        self._netns_gone: NetnsGone | None = None
        self.pid_label = pid_label
        # One resolver for the collector's life: its cache (pid, start time -> workload) serves every scan.
        if resolver is None:
            # In a cluster (a service account token and KUBERNETES_SERVICE_HOST), pods are labelled from
            # one list call per interval; elsewhere PodApi.from_environment() is None and nothing is asked.
            resolver = WorkloadResolver(proc_root=proc_root, pod_api=PodApi.from_environment())
        self.resolver = resolver
        # What the last full owner pass found (the BPF iterator over every fd table), kept for the
        # collector's life: a scan re-checks it (socket cookie, process, fd) instead of a new pass.
        self.owner_cache = OwnerCache(max_age=OWNER_CACHE_MAX_AGE_S)
        self._api_errors_seen = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: list[Metric] | None = None
        self._cached_at = 0.0
        self._cached_started = float("-inf")
        self._errors = dict.fromkeys(ERROR_KINDS, 0)
        self._scans = 0
        self._last_duration = 0.0
        self._owner_fallback_logged: str | None = None
        self._failure_logged: str | None = None
        self._skipped_logged: set[str] = set()
        self._recorder: RecorderSetup | None = None
        self._dwell: DwellReader | None = None
        self._reading: RecorderReading | None = None
        self._recorder_read = False  # tried in this scrape (once, whether it worked or not)
        self._recorder_logged: str | None = None
        self._recorder_mode = recorder
        self.recorder_resync_s = recorder_resync_s
        self._resync: StateResync | None = None
        self._start_recorder(recorder, recorder_pin_dir)

    def _start_recorder(self, mode_name: str, pin_dir: str | None) -> None:
        """Attach the recorder as ``mode_name`` (auto, on, off) says; see ``closewait.exporter.recording``."""
        from closewait.exporter.recording import DwellReader, RecorderMode, RecorderSetup, StateResync
        from closewait.sources.recorder import DEFAULT_PIN_DIR, RecorderUnavailable

        try:
            mode = RecorderMode(mode_name)
        except ValueError:
            raise UsageError(f"--recorder must be auto, on or off, not {mode_name!r}") from None
        if mode is RecorderMode.OFF:
            return
        try:
            setup = RecorderSetup.attach(
                pin_dir or DEFAULT_PIN_DIR, netns=self.netns.path if self.netns is not None else None
            )
        except RecorderUnavailable as err:
            if mode is RecorderMode.ON:
                self.close()
                raise RecorderUnavailable(f"--recorder on: the recorder cannot run: {err}") from err
            self._note_recorder_failure(f"recorder off: {err}")
            return
        self._recorder = setup
        self._dwell = DwellReader(
            setup.recorder, self.resolver, top_n=self.top_n, pid_label=self.pid_label, netns_labelled=self.all_netns
        )
        if self.recorder_counts_states:
            # The first count before any scrape, the later ones after a scrape, in the background.
            self._resync = StateResync(setup.recorder, self.recorder_resync_s, self._note_recorder_failure)
            self._resync.now()

    def _note_recorder_failure(self, reason: str) -> None:
        self._errors["recorder"] += 1
        if reason != self._recorder_logged:
            self._recorder_logged = reason
            log.warning("%s", reason)

    @property
    def recorder_counts_states(self) -> bool:
        """Whether the per-state counts come from the recorder (no per-scrape dump): it runs, it
        records the namespace this collector scans, and there is one namespace to count."""
        if self._recorder is None or self.all_netns:
            return False
        return self._recorder.recorder.netns == (self.netns.path if self.netns is not None else None)

    def _read_recorder(self, namespaces: Namespaces | None) -> None:
        """One reading of the recorder (counters, histograms, state counts) for the scrape being built.
        With ``all_netns``, a closer seen for the first time gets the label of its network namespace
        among ``namespaces`` (the ones this scrape scans); None (the scan failed before its survey)
        leaves new closers' labels, and their dwells, to the next scrape that has them."""
        from closewait.exporter.recording import RecorderReading
        from closewait.sources.recorder import RecorderUnavailable

        self._recorder_read = True
        if self._recorder is None or self._dwell is None:
            return
        netns_labels: dict[int, str] | None = None
        if self.all_netns and namespaces is not None:
            netns_labels = {ns.inode: label for ns, label in namespaces.scanned if ns is not None}
        try:
            self._dwell.read(netns_labels)
            counters = self._recorder.recorder.counters()
            # Never re-counted here (StateResync does it after a scrape), unless never counted yet.
            states = (
                self._recorder.recorder.state_counts(resync_every=math.inf) if self.recorder_counts_states else None
            )
        except ClosewaitError as err:
            if not isinstance(err, RecorderUnavailable):
                err = RecorderUnavailable(str(err))
            self._note_recorder_failure(f"the recorder cannot be read: {err}")
            self._reading = None
            return
        self._reading = RecorderReading(counters, states)

    def close(self) -> None:
        """Release the namespace this collector pinned (``netns=``); scans after this fail as gone.
        Detach the recorder: unpin and unmount what this collector pinned and mounted."""
        if self._resync is not None:
            self._resync.wait()
            self._resync = None
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None
            self._dwell = None
        if self._pinned and self.netns is not None and self._netns_gone is None:
            netns_mod.unpin(self.netns)
            self._netns_gone = NetnsGone(f"{self.netns.path}: no longer pinned (the collector was closed)")

    # -- scanning ----------------------------------------------------------------------------------

    def _namespaces(self) -> Namespaces:
        """The namespaces a scan reads, with their labels, and those it cannot."""
        if self.netns is not None:
            # One namespace asked for by name: a failure to read it fails the scan, like the host's own.
            return Namespaces([(self.netns, "")], {})
        if not self.all_netns:
            return Namespaces([(None, "")], {})
        survey = netns_mod.survey(self.proc_root)
        unreadable = {f"{u.pid}/{_comm(self.proc_root, u.pid)}": u.reason for u in survey.unreadable}
        return Namespaces([(ns, f"{pid}/{_comm(self.proc_root, pid)}") for ns, pid in survey.found], unreadable)

    def scan_once(self) -> ScanResult:
        """One full scan (no caching). Raises ClosewaitError if the host's own tables cannot be read."""
        with _gc_paused():
            return self._scan_once()

    def _scan_once(self) -> ScanResult:
        started = time.perf_counter()
        if self._netns_gone is not None:
            raise self._netns_gone  # a new namespace under the old name is another one: never followed
        namespaces, unreadable = self._namespaces()
        if not self._recorder_read:
            # Read here, after the survey: with all_netns the closers are labelled with its namespaces.
            self._read_recorder(Namespaces(namespaces, unreadable))
        from_recorder = self.recorder_counts_states
        source = get_source(namespaces=namespaces, count_states=not from_recorder)
        try:
            # recorder_pins=None: no series uses a socket's age (oldest idle is tcp_info's, close times come
            # from the recorder's histograms), and looking up each CLOSE_WAIT cookie in a pinned recorder
            # costs a bpf(2) call per socket (~25 ms for 5,000).
            # The cache's re-check (a readlink per cached fd) does not depend on the dump: it runs in
            # a thread while this one waits for the kernel's walk of its TCP table.
            start_check(self.owner_cache)
            snapshot = scan(
                _CLOSE_WAIT,
                backend=source,
                proc_root=self.proc_root,
                workloads=self.resolver,
                recorder_pins=None,
                owner_cache=self.owner_cache,
            )
            self._count_api_errors()
        except NetnsGone as gone:
            if self._pinned:
                self._netns_gone = gone  # released now: it never comes back
                netns_mod.unpin(self.netns)
            raise
        skipped = {**unreadable, **source.skipped}
        self._errors["netns"] += len(skipped)
        self._note_coverage(skipped, covered={label for _, label in namespaces} - skipped.keys())
        if snapshot.errors:
            self._errors["owners"] += 1
        self._note_owner_fallback(snapshot.owners_fallback_reason)
        folded = fold_rows(
            rows_from_snapshot(snapshot, source.netns_of if self.all_netns else {}, pid_label=self.pid_label),
            self.top_n,
        )
        counts = source.counts
        if from_recorder:
            if self._reading is None or self._reading.state_counts is None:
                raise NotSupported("the recorder's per-state counts cannot be read")
            counts = {"": self._reading.state_counts}
        return ScanResult(
            counts=counts,
            rows=folded.rows,
            folded=folded.processes,
            duration_s=time.perf_counter() - started,
            finished_at=time.time(),
            netns_covered=len(namespaces) - len(source.skipped),
            netns_skipped=skipped,
            workloads_folded=folded.workloads,
        )

    def _note_coverage(self, skipped: dict[str, str], covered: set[str]) -> None:
        """Log each skipped namespace once while it stays skipped, and say so when it is read again."""
        for label in sorted(skipped.keys() - self._skipped_logged):
            log.warning("network namespace %s not covered: %s", label, skipped[label])
        for label in sorted(self._skipped_logged & covered):
            log.warning("network namespace %s covered again", label)
        self._skipped_logged = set(skipped)

    def _note_failure(self, err: ClosewaitError | None) -> None:
        """Count a failed scan (``None``: a scan that succeeded); log its reason when it changes, not per scrape."""
        if err is None:
            if self._failure_logged is not None:
                log.warning("scans succeed again")
                self._failure_logged = None
            return
        self._errors["scan"] += 1
        if isinstance(err, NetnsError) and self.netns is not None:
            self._errors["netns"] += 1  # the one namespace asked for is gone or cannot be entered
        if str(err) != self._failure_logged:
            self._failure_logged = str(err)
            log.warning("scan failed: %s", err)

    def _note_owner_fallback(self, reason: str | None) -> None:
        """Count a scan whose owners came from the /proc walk because the BPF lookup could not run;
        log why once (and again only if the reason changes), not on every scrape."""
        if reason is None:
            return
        self._errors["owners_bpf"] += 1
        if reason != self._owner_fallback_logged:
            self._owner_fallback_logged = reason
            log.warning("owners found by the /proc walk, not the BPF iterator: %s", reason)

    # -- the Collector interface -------------------------------------------------------------------

    def _count_api_errors(self) -> None:
        """Failed calls to the Kubernetes API server since the last scan, as ``kind="kubernetes_api"``:
        the scan goes on without pod labels, and the client logs each failure once."""
        api = self.resolver.pod_api
        if api is not None and api.errors > self._api_errors_seen:
            self._errors["kubernetes_api"] += api.errors - self._api_errors_seen
            self._api_errors_seen = api.errors

    def describe(self) -> Iterable[Metric]:
        """The families with no samples: lets ``registry.register()`` check names without a scan."""
        return self._families(None, describe_only=True)

    def collect(self) -> Iterable[Metric]:
        arrived = self._clock()
        with self._lock:
            now = self._clock()
            # A scan that started after this scrape arrived (while it waited for the lock) is as fresh
            # as one of its own: so with min_interval=0 a burst of scrapes costs two scans, not one each.
            fresh = self._cached_started > arrived
            if self._cached is None or (now - self._cached_at >= self.min_interval and not fresh):
                self._cached_started = self._clock()
                result: ScanResult | None
                self._reading = None  # read by the scan, after its survey of the namespaces
                self._recorder_read = False
                try:
                    result = self.scan_once()
                except ClosewaitError as err:
                    self._note_failure(err)
                    result = None
                else:
                    self._note_failure(None)
                if not self._recorder_read:
                    self._read_recorder(None)  # the scan failed before it: the recorder's series are still served
                self._scans += 1
                self._cached = self._families(result)
                self._cached_at = self._clock()
                if self._resync is not None:
                    self._resync.start_if_due()
            return list(self._cached)

    # -- building the families ---------------------------------------------------------------------

    def _families(self, result: ScanResult | None, *, describe_only: bool = False) -> list[Metric]:
        ns = ["netns"] if self.all_netns else []
        owner = label_names(netns=self.all_netns, pid=self.pid_label)
        tcp = GaugeMetricFamily(
            "closewait_tcp_sockets", "TCP sockets per state (every state, zeros included).", labels=[*ns, "state"]
        )
        per_role = GaugeMetricFamily(
            "closewait_close_wait_sockets",
            "CLOSE_WAIT sockets per workload, process, role and diagnosis"
            ' (top workloads and processes; the rest in process="other").',
            labels=[*owner, "role", "diagnosis"],
        )
        oldest = GaugeMetricFamily(
            "closewait_close_wait_oldest_idle_seconds",
            "Longest time since the peer sent anything (tcp_info last_ack_recv) among a row's CLOSE_WAIT sockets.",
            labels=owner,
        )
        unread = GaugeMetricFamily(
            "closewait_close_wait_unread_bytes",
            "Bytes the peer sent before closing that a row's CLOSE_WAIT sockets never read.",
            labels=owner,
        )
        duration = GaugeMetricFamily("closewait_scan_duration_seconds", "How long the last scan took.")
        success = GaugeMetricFamily("closewait_scan_success", "1 if the last scan read the host's tables, else 0.")
        last = GaugeMetricFamily("closewait_last_scan_timestamp_seconds", "When the last scan finished (Unix time).")
        folded = GaugeMetricFamily(
            "closewait_processes_folded",
            'Process rows (one per process with --pid-label) whose CLOSE_WAIT series were summed into process="other".',
        )
        workloads_folded = GaugeMetricFamily(
            "closewait_workloads_folded",
            'Workloads beyond --top whose CLOSE_WAIT series were summed into the process="other" row with no workload.',
        )
        errors = CounterMetricFamily(
            "closewait_scan_errors",
            "Scan problems by kind: scan (failed), netns (skipped), owners, owners_bpf (BPF lookup unavailable)"
            + (", recorder (cannot attach or be read)." if self._recorder_mode != "off" else "."),
            labels=["kind"],
        )
        scans = CounterMetricFamily("closewait_scans", "Scans made (scrapes within the minimum interval share one).")
        covered = GaugeMetricFamily("closewait_netns_covered", "Network namespaces the last scan read.")
        skipped = GaugeMetricFamily(
            "closewait_netns_skipped",
            "Network namespaces the last scan knew of but could not read (gone, not enterable, not readable).",
        )
        families: list[Metric] = [
            tcp,
            per_role,
            oldest,
            unread,
            duration,
            success,
            last,
            folded,
            workloads_folded,
            errors,
            scans,
            covered,
            skipped,
        ]
        recorded = self._recorder_families(describe_only=describe_only)
        families.extend(recorded)
        if describe_only:
            return families

        for kind in ERROR_KINDS:
            if kind != "recorder" or self._recorder_mode != "off":
                errors.add_metric([kind], self._errors[kind])
        scans.add_metric([], self._scans)
        success.add_metric([], 0 if result is None else 1)
        if result is None:
            return families
        duration.add_metric([], result.duration_s)
        last.add_metric([], result.finished_at)
        folded.add_metric([], result.folded)
        covered.add_metric([], result.netns_covered)
        skipped.add_metric([], len(result.netns_skipped))
        workloads_folded.add_metric([], result.workloads_folded)
        for label, counts in result.counts.items():
            prefix = [label] if self.all_netns else []
            for state, n in counts.items():
                tcp.add_metric([*prefix, state_label(state)], n)
        for key, row in sorted(result.rows.items(), key=_worst_first):
            values = key.label_values(netns=self.all_netns, pid=self.pid_label)
            for (role, diagnosis), n in sorted(row.by_role_diagnosis.items()):
                per_role.add_metric([*values, role, diagnosis], n)
            oldest.add_metric(values, row.oldest_idle_s)
            unread.add_metric(values, row.unread_bytes)
        return families

    def _recorder_families(self, *, describe_only: bool) -> list[Metric]:
        """The recorder's families (none when it does not run): the dwell histogram per workload,
        the entered/left counters, and where the per-state counts came from."""
        if not describe_only and (self._recorder is None or self._dwell is None):
            return []
        from closewait.exporter.recording import histogram_buckets

        dwell = HistogramMetricFamily(
            "closewait_close_wait_duration_seconds",
            "Time from the peer's FIN (entering CLOSE_WAIT) to the owner's close(), per workload and process"
            ' of the closer (top workloads and processes; the rest in process="other"). From the recorder.',
            labels=label_names(netns=self.all_netns, pid=self.pid_label),
        )
        entered = CounterMetricFamily(
            "closewait_close_wait_entered", "Sockets that entered CLOSE_WAIT since the recorder was attached."
        )
        left = CounterMetricFamily(
            "closewait_close_wait_left",
            "Sockets that left CLOSE_WAIT, by how: closed (by the owner), exited (closed by the kernel at the"
            " owner's exit), reset (RST, SOCK_DESTROY, timeout), untracked (entered before the recorder).",
            labels=["how"],
        )
        source = GaugeMetricFamily(
            "closewait_state_counts_source",
            "1: closewait_tcp_sockets comes from the recorder's event counts (no dump per scrape; TIME_WAIT,"
            f" NEW_SYN_RECV and CLOSE and any drift are re-counted every {self.recorder_resync_s:g} s);"
            " 0: from a sock_diag dump at each scan.",
        )
        families: list[Metric] = [dwell, entered, left, source]
        if describe_only or self._dwell is None:
            return families  # described whatever the mode: registering never attaches
        source.add_metric([], 1 if self.recorder_counts_states else 0)
        for key, histogram in sorted(self._dwell.totals.totals.items()):
            values = key.label_values(netns=self.all_netns, pid=self.pid_label)
            dwell.add_metric(values, histogram_buckets(histogram), histogram.sum_seconds)
        reading = self._reading
        if reading is not None:
            counters = reading.counters
            entered.add_metric([], counters.entered)
            for how, n in (
                ("closed", counters.left_closed),
                ("exited", counters.left_exited),
                ("reset", counters.left_reset),
                ("untracked", counters.left_untracked),
            ):
                left.add_metric([how], n)
        return families


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for one scan.

    A scan allocates ~20 objects per CLOSE_WAIT socket (records, owners, findings, rows), all freed by
    reference counting when the scan's result is dropped: they hold no cycles. With the collector
    running, 5,000 sockets trigger ~85 young and some full collections that find nothing to free,
    8-18 ms of a ~100 ms scrape (bench/bench_exporter.py).

    The switch is process-wide: every thread of the process (the application the collector is
    registered in, too) runs without cyclic collection while a scan runs. Only what this changed is
    restored: if the collector was already disabled when the first of the scans running at once
    began, it stays disabled; otherwise it is enabled again when the last of them ends (two
    collectors scanning at once do not re-enable it under each other's feet).
    """
    global _gc_pauses, _gc_reenable
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_reenable = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_reenable:
                _gc_reenable = False
                gc.enable()


_gc_lock = threading.Lock()
_gc_pauses = 0  # scans running in _gc_paused()
_gc_reenable = False  # the first of them found the collector enabled


def _comm(proc_root: str, pid: int) -> str:
    from closewait.sources.process import read_comm

    try:
        return read_comm(pid, proc_root).strip() or "?"
    except ClosewaitError:
        return "?"


def build_registry(collector: CloseWaitCollector) -> CollectorRegistry:
    """A fresh registry holding only ``collector`` (no process/platform collectors: one job, one set of names)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    return registry


__all__ = [
    "DEFAULT_MIN_INTERVAL",
    "DEFAULT_TOP_N",
    "ERROR_KINDS",
    "CloseWaitCollector",
    "Folded",
    "Namespaces",
    "ScanResult",
    "build_registry",
    "fold_rows",
    "rows_from_snapshot",
    "state_label",
]
