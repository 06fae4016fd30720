"""The exporter's side of the CLOSE_WAIT recorder (``closewait.sources.recorder``): attaching it,
turning its per-(cgroup, tgid) histograms into per-workload series that only grow, and detaching
what the exporter set up.

- **Attaching** (``RecorderMode``): ``off`` never tries; ``auto`` tries and, when it cannot (not root,
  no BTF, locked down, old kernel), leaves the exporter as it was, with the reason logged once and
  counted once as ``closewait_scan_errors_total{kind="recorder"}``; ``on`` fails the start with the
  reason. The recorder is pinned in ``pin_dir`` (default /sys/fs/bpf/closewait; a bpffs is
  mounted on its parent if none is there) so ``closewait scan`` reads the same maps for exact ages;
  a recorder already pinned there (another exporter, ``closewait record``) is shared. ``close()``
  unpins and unmounts only what this process pinned and mounted.
- **Attribution**: the kernel keys each dwell histogram by the (cgroup id, tgid) of the task that
  closed the socket. ``DwellReader`` names the tgid's process (its comm) and workload (the
  collector's ``WorkloadResolver``) the first time it sees the key, and keeps those labels after the
  process exits (a process that closed its sockets and exited before any scrape saw it is
  ``process="exited"`` with empty workload labels). With ``--all-netns`` it also names the network
  namespace the process is in (its ``/proc/PID/ns/net`` among the namespaces the scrape scans; ``""``
  when it cannot), so the series carry the ``netns`` label the CLOSE_WAIT gauges have.
- **Monotonic series** (``DwellTotals``): each scrape adds what each kernel histogram gained since the
  last one into the per-label totals; a kernel histogram whose process has exited is then deleted
  (``forget_histograms``) to free its slot, and its counts stay in the totals. Label sets get a
  series of their own in the order they first close a socket, up to ``top_n`` workloads and
  ``top_n`` process names within each; later ones are summed into their workload's
  ``process="other"`` series, or, beyond ``top_n`` workloads, into the one ``process="other"``
  series with empty workload labels (and no netns). A label set never moves between series, so no
  series ever goes down. The labels are ``series.RowKey``, the type the CLOSE_WAIT rows use.
- **Per-state counts** (``StateResync``): re-pinned to a sock_diag count at start and then in a
  thread after a scrape, never inside one.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from closewait.errors import ClosewaitError
from closewait.events import Counters, Histogram, HistogramKey, LeaveReason
from closewait.exporter.series import EXITED, OTHER, RowKey, workload_labels
from closewait.model import TcpState
from closewait.sources import recorder as recorder_mod
from closewait.sources.attribution import WorkloadResolver
from closewait.sources.process import ns_inode, read_comm, read_stat
from closewait.sources.recorder import DEFAULT_PIN_DIR, Recorder, RecorderUnavailable

log = logging.getLogger(__name__)


class RecorderMode(enum.Enum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


#: Where dwells of workloads beyond ``top_n`` go: one series, whatever their namespace.
_GLOBAL_OTHER = RowKey("", "", "", "", OTHER)


class DwellTotals:
    """Per-series dwell histograms that only grow, at most ``top_n * (top_n + 1) + 1`` series."""

    def __init__(self, top_n: int) -> None:
        self.top_n = top_n
        self.totals: dict[RowKey, Histogram] = {}
        self._processes: dict[tuple[str, str, str, str, str], int] = {}  # kept workload -> process series kept

    def series_of(self, key: RowKey) -> RowKey:
        """The series ``key``'s dwells are counted in (itself, or an ``other`` one); decided on first sight."""
        if key in self.totals:
            return key
        workload = key.workload
        kept = self._processes.get(workload)
        if kept is None:
            if len(self._processes) >= self.top_n:
                return _GLOBAL_OTHER
            kept = self._processes[workload] = 0
        if kept >= self.top_n:
            return key._replace(process=OTHER, pid="")
        self._processes[workload] = kept + 1
        return key

    def add(self, key: RowKey, delta: Histogram) -> None:
        series = self.series_of(key)
        self.totals[series] = self.totals.get(series, Histogram.empty()) + delta

    @property
    def folded(self) -> int:
        return sum(1 for key in self.totals if key.process == OTHER)


@dataclass(frozen=True, slots=True)
class _Owner:
    start_time: int | None
    key: RowKey


class DwellReader:
    """Reads a recorder's histograms into ``DwellTotals`` (see the module docstring)."""

    def __init__(
        self,
        recorder: Recorder,
        resolver: WorkloadResolver,
        *,
        top_n: int,
        pid_label: bool,
        netns_labelled: bool = False,
    ) -> None:
        self.recorder = recorder
        #: Series carry a ``netns`` label (``--all-netns``): a closer is labelled only by a read
        #: that was given the namespaces.
        self.netns_labelled = netns_labelled
        self.resolver = resolver
        self.pid_label = pid_label
        self.proc_root = resolver.proc_root
        self.totals = DwellTotals(top_n)
        self._seen: dict[HistogramKey, Histogram] = {}
        self._owners: dict[tuple[int, int], _Owner] = {}
        self.forgotten = 0

    def _start_time(self, tgid: int) -> int | None:
        try:
            return read_stat(tgid, self.proc_root).start_time
        except ClosewaitError:
            return None

    def _owner(self, cgroup: int, tgid: int, netns_labels: Mapping[int, str] | None) -> tuple[RowKey | None, bool]:
        """The labels of (cgroup, tgid), and whether that process is still running. The labels are
        None when they need the namespaces and ``netns_labels`` is None: a key is kept for good (a
        series never moves), so it is not made without its ``netns``."""
        start = self._start_time(tgid)
        known = self._owners.get((cgroup, tgid))
        if known is not None and (start is None or start == known.start_time):
            return known.key, start is not None
        alive = start is not None and recorder_mod.cgroup_id(tgid, self.proc_root) == cgroup
        pid = str(tgid) if self.pid_label else ""
        if not alive:
            return RowKey("", "", "", "", EXITED, pid), False
        try:
            name = read_comm(tgid, self.proc_root).strip() or "?"
        except ClosewaitError:
            return RowKey("", "", "", "", EXITED, pid), False
        if netns_labels is None and self.netns_labelled:
            return None, True
        workload = self.resolver.workload_of_pid(tgid, start)
        netns = self._netns_label(tgid, netns_labels) if netns_labels is not None else ""
        key = RowKey(*workload_labels(workload), name, pid, netns)
        self._owners[(cgroup, tgid)] = _Owner(start, key)
        return key, True

    def _netns_label(self, tgid: int, netns_labels: Mapping[int, str]) -> str:
        """The label of the network namespace ``tgid`` is in, ``""`` if it cannot be read or is not
        one of ``netns_labels`` (namespace inode -> label, the namespaces the scan covers)."""
        try:
            return netns_labels.get(ns_inode(tgid, "net", self.proc_root), "")
        except ClosewaitError:
            return ""

    def read(self, netns_labels: Mapping[int, str] | None = None) -> None:
        """Add what every kernel histogram gained since the last read; free the slots of processes
        that exited (their counts stay in the totals). RecorderUnavailable if the maps cannot be read.

        ``netns_labels`` (network namespace inode -> label; ``--all-netns``) gives each closer's
        series the ``netns`` label of the namespace it is in, when first seen. With
        ``netns_labelled`` and no ``netns_labels`` (the scan failed before its survey), a closer
        not labelled yet is left for the next read: what it gained is counted then, under its labels."""
        items = self.recorder.histogram_items()
        gone: list[HistogramKey] = []
        for hkey, histogram in items.items():
            if hkey.reason == LeaveReason.RESET:
                continue  # one key, no owner: counted by closewait_close_wait_left_total{how="reset"}
            if hkey.reason == LeaveReason.CLOSED:
                previous = self._seen.get(hkey)
                # Fewer than last time: another reader (a second exporter on the same pin) forgot it.
                delta = histogram if previous is None or previous.count > histogram.count else histogram - previous
                known = self._owners.get((hkey.cgroup_id, hkey.tgid))
                if delta.count and known is not None:
                    # It closed a socket since the last read: it is very likely running still, and
                    # its labels are known; whether it exited is asked once it closes nothing more.
                    key, alive = known.key, True
                else:
                    owner, alive = self._owner(hkey.cgroup_id, hkey.tgid, netns_labels)
                    if owner is None:
                        continue  # its labels and this delta wait for a read that has the namespaces
                    key = owner
                if delta.count:
                    self.totals.add(key, delta)
                self._seen[hkey] = histogram
            else:
                alive = self._start_time(hkey.tgid) is not None
            if not alive:
                gone.append(hkey)
        if gone:
            self.forgotten += self.recorder.forget_histograms(gone)
            for hkey in gone:
                self._seen.pop(hkey, None)
                self._owners.pop((hkey.cgroup_id, hkey.tgid), None)
        for hkey in self._seen.keys() - items.keys():
            del self._seen[hkey]  # forgotten by someone else


class RecorderSetup:
    """The exporter's recorder: attached (or shared) in ``pin_dir``, and what to undo on ``close()``."""

    def __init__(
        self, recorder: Recorder, *, pinned_here: str | None, mounted_here: str | None, created_here: bool = False
    ) -> None:
        self.recorder = recorder
        self.pinned_here = pinned_here
        self.mounted_here = mounted_here
        #: The mount point's directory did not exist before: close() removes it after unmounting.
        self.created_here = created_here

    @classmethod
    def attach(cls, pin_dir: str = DEFAULT_PIN_DIR, *, netns: str | None = None) -> RecorderSetup:
        """Mount a bpffs on ``pin_dir``'s parent if needed, then share the recorder pinned there or
        attach and pin one. RecorderUnavailable says why not."""
        pin_dir = os.path.abspath(pin_dir)
        parent = os.path.dirname(pin_dir)
        mounted: str | None = None
        created = not os.path.exists(parent)  # mount_bpffs makes it: then close() removes it again
        try:
            on_bpffs = recorder_mod.is_bpffs(pin_dir) or recorder_mod.is_bpffs(parent)
            if not on_bpffs and recorder_mod.mount_bpffs(parent):
                mounted = parent
        except OSError as err:
            raise RecorderUnavailable(f"cannot mount a bpffs at {parent}: {err.strerror or err}") from err
        except RecorderUnavailable as err:
            if os.geteuid() != 0:
                raise RecorderUnavailable(f"not root (the recorder needs CAP_SYS_ADMIN or CAP_BPF): {err}") from err
            raise
        existed = os.path.exists(os.path.join(pin_dir, "link"))
        try:
            recorder = Recorder.attach_or_open_pinned(pin_dir, netns=netns)
        except BaseException:
            if mounted is not None and recorder_mod.unmount_bpffs(mounted) and created:
                with contextlib.suppress(OSError):
                    os.rmdir(mounted)
            raise
        pinned = None if existed or recorder.pin_dir is None else pin_dir
        return cls(recorder, pinned_here=pinned, mounted_here=mounted, created_here=created)

    def close(self) -> None:
        """Detach what this process set up: unpin its recorder, unmount its bpffs."""
        self.recorder.close()
        if self.pinned_here is not None:
            recorder_mod.unpin(self.pinned_here)
            self.pinned_here = None
        if self.mounted_here is not None:
            try:
                if recorder_mod.unmount_bpffs(self.mounted_here) and self.created_here:
                    with contextlib.suppress(OSError):
                        os.rmdir(self.mounted_here)
            except RecorderUnavailable as err:
                log.warning("%s", err)
            self.mounted_here = None


class StateResync:
    """Re-pins the recorder's per-state counts to a sock_diag count (``Recorder.resync``) every
    ``every`` seconds, in a thread of its own, so that no scrape waits for that count.

    The count reads every socket of the host (~0.25 s for 200,000 on 2 CPUs) and is what a scrape
    with the recorder avoids; made inline, one scrape in every ``every`` seconds would pay it.
    ``start_if_due()`` is called after a scrape is built: the count then runs in the gap before the
    next scrape. A scrape meanwhile reads the deltas with the offsets of the last resync (each
    resync replaces them at once, never half). Failures go to ``on_error`` (counted as
    ``kind="recorder"``) and the next scrape after ``every`` seconds tries again.
    """

    def __init__(self, recorder: Recorder, every: float, on_error: Callable[[str], None]) -> None:
        self.recorder = recorder
        self.every = every
        self.on_error = on_error
        self.resyncs = 0
        self._last = time.monotonic()
        self._thread: threading.Thread | None = None

    def now(self) -> None:
        """Resync in the caller's thread (start-up: before the first scrape)."""
        self._last = time.monotonic()
        self._resync()

    def start_if_due(self) -> bool:
        """Start a resync in the background if ``every`` seconds passed since the last one started
        and none is running; True when one was started."""
        if self._thread is not None and self._thread.is_alive():
            return False
        if time.monotonic() - self._last < self.every:
            return False
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._resync, name="closewait-resync", daemon=True)
        self._thread.start()
        return True

    def wait(self) -> None:
        """Wait for a running resync to finish (``close()``, tests)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _resync(self) -> None:
        try:
            self.recorder.resync()
        except ClosewaitError as err:
            self.on_error(f"the recorder's per-state counts cannot be re-counted: {err}")
        else:
            self.resyncs += 1


@dataclass(frozen=True, slots=True)
class RecorderReading:
    """One scrape's reading of the recorder."""

    counters: Counters
    state_counts: dict[TcpState, int] | None


def histogram_buckets(histogram: Histogram) -> list[tuple[str, float]]:
    """Prometheus ``(le, cumulative count)`` pairs, ``+Inf`` last."""
    return [("+Inf" if math.isinf(le) else repr(le), float(n)) for le, n in histogram.cumulative()]


__all__ = [
    "EXITED",
    "DwellReader",
    "DwellTotals",
    "RecorderMode",
    "RecorderReading",
    "RecorderSetup",
    "StateResync",
    "histogram_buckets",
]
