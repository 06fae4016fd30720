"""The workload of a process: its cgroup named (``closewait.workload``), then its names looked up.

``WorkloadResolver.workload_of(process)`` is what scan, the exporter and reap call per owner. A scan
of 200,000 sockets has far fewer owning processes, and the answer is cached per (pid, start time),
so the cost is one read of /proc/PID/cgroup (and one of /proc/PID/stat, to prove the pid still is
that process) per process, plus a ``stat`` of each runtime's metadata file per new container.

It never raises for one process: an unreadable or malformed cgroup file is a ``Workload`` of kind
``unknown`` with the reason in ``error``; a process that exited (or whose pid was reused) before its
cgroup was read is ``unknown`` with ``error`` = ``EXITED``. The first answer for a process is kept for
``ttl`` seconds, so a process that moves to another cgroup mid-scan is attributed to one of them,
the same one everywhere in that scan.
"""

from __future__ import annotations

import _thread  # its Lock is threading.Lock; importing threading itself costs a few ms per scan
import errno
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from closewait.errors import ClosewaitError, KernelDataError
from closewait.model import Process
from closewait.sources.cgroup import parse_cgroup_lines, read_proc_file
from closewait.sources.process import list_pids, read_stat
from closewait.sources.runtimes import ContainerNames
from closewait.workload import Workload, pick_workload, unknown, with_container_name

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from closewait.sources.kubernetes import PodApi, PodLogIndex

#: ``Workload.error`` of a process that was gone (or its pid reused) when its cgroup was read.
EXITED = "process exited"


@dataclass(frozen=True, slots=True)
class ResolverStats:
    """What a resolver did since it was made (immutable snapshot; ``WorkloadResolver.statistics()``)."""

    lookups: int
    cache_hits: int
    cgroup_reads: int
    unknown: int
    #: Failed API server list calls (0 without an API server).
    api_errors: int
    #: The last API server failure, one line.
    api_last_error: str | None


class WorkloadResolver:
    """Process -> Workload, cached per (pid, start time).

    ``proc_root`` is where /proc is; ``host_root`` prefixes the runtimes' metadata paths (the host's
    / mounted into closewait's own container, or a test's temp directory); ``container_log_dir`` is
    kubelet's link directory; ``pod_api`` adds pod labels (``PodApi.from_environment()`` in a pod),
    None leaves them out. ``names=False`` skips every name lookup (the cgroup alone).

    ``verify`` re-reads /proc/PID/stat after the cgroup to prove the pid is still the process asked
    about (start time), so a pid reused in between is not attributed to the newcomer; it is about
    as costly as the cgroup read itself (the kernel builds the whole stat line), and a caller that
    read the start time a moment ago may turn it off. ``ttl`` bounds how long an answer is kept
    (an exporter's resolver lives for many scans; processes rarely change cgroups).
    """

    def __init__(
        self,
        *,
        proc_root: str = "/proc",
        host_root: str = "/",
        container_log_dir: str | None = None,
        pod_api: PodApi | None = None,
        names: bool = True,
        verify: bool = True,
        ttl: float = 60.0,
        max_entries: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc_root = proc_root
        self.names = names
        self.verify = verify
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self.container_names = ContainerNames(host_root)
        self._host_root = host_root
        self._container_log_dir = container_log_dir
        self._pod_logs: PodLogIndex | None = None
        self.pod_api = pod_api
        self._cache: dict[tuple[int, int], tuple[Workload, float]] = {}
        # The cgroup file's text -> its workload before names: most processes share a few texts.
        self._by_text: dict[bytes, Workload] = {}
        self._lock = _thread.allocate_lock()
        self._lookups = self._hits = self._reads = self._unknown = 0

    @property
    def pod_logs(self) -> PodLogIndex:
        """kubelet's log links (``container_log_dir``), made on first use: only a pod's process needs
        them, and until then ``sources/kubernetes.py`` is not imported (most hosts run no pod)."""
        if self._pod_logs is None:
            from closewait.sources.kubernetes import CONTAINER_LOG_DIR, PodLogIndex

            directory = self._container_log_dir
            if directory is None:
                directory = self._host_root.rstrip("/") + CONTAINER_LOG_DIR
            with self._lock:  # one index, however many threads meet their first pod at once
                if self._pod_logs is None:
                    self._pod_logs = PodLogIndex(directory, clock=self._clock)
        return self._pod_logs

    def workload_of(self, process: Process) -> Workload:
        """The workload ``process`` runs in. Never raises for a process that vanished or is unreadable."""
        return self.workload_of_pid(process.pid, process.start_time)

    def workload_of_pid(self, pid: int, start_time: int | None = None) -> Workload:
        """The workload of ``pid``; with ``start_time``, only if the pid still is that process."""
        self._lookups += 1
        now = self._clock()
        key = (pid, start_time if start_time is not None else -1)
        cached = self._cache.get(key) if start_time is not None else None
        if cached is not None and now - cached[1] < self.ttl:
            self._hits += 1
            return cached[0]
        workload = self._resolve(pid, start_time)
        if workload.kind == "unknown":
            self._unknown += 1
        if start_time is not None:
            with self._lock:
                if len(self._cache) >= self.max_entries:
                    self._prune(now)
                self._cache[key] = (workload, now)
        return workload

    def workloads_of(self, processes: Iterable[Process]) -> dict[tuple[int, int], Workload]:
        """The workload of each process, by ``Process.identity`` (what a view groups owners by)."""
        return {process.identity: self.workload_of(process) for process in processes}

    def running_workloads(self) -> list[Workload]:
        """The workload of every process on the host now, one entry per distinct workload.

        For "is there such a container at all?" when a selection matched no socket: one cgroup read
        per process (a few thousand on a busy host), so callers ask only then, never per scan.
        Processes that exit meanwhile are skipped.
        """
        found: dict[tuple[str, str, str], Workload] = {}
        for pid in list_pids(self.proc_root):
            workload = self.workload_of_pid(pid)
            if workload.kind != "unknown":
                found.setdefault((workload.kind, workload.name, workload.id), workload)
        return list(found.values())

    def statistics(self) -> ResolverStats:
        api = self.pod_api
        return ResolverStats(
            self._lookups,
            self._hits,
            self._reads,
            self._unknown,
            api.errors if api else 0,
            api.last_error if api else None,
        )

    def forget(self) -> None:
        """Drop every cached answer (the next lookup of each process reads its cgroup again)."""
        with self._lock:
            self._cache.clear()

    def _prune(self, now: float) -> None:
        expired = [key for key, (_, at) in self._cache.items() if now - at >= self.ttl]
        for key in expired:
            del self._cache[key]
        if len(self._cache) >= self.max_entries:
            self._cache.clear()

    # -- one process --------------------------------------------------------------------------

    def _resolve(self, pid: int, start_time: int | None) -> Workload:
        self._reads += 1
        try:
            text = read_proc_file(f"{self.proc_root}/{pid}/cgroup")
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ESRCH):
                return unknown(EXITED)
            return unknown(f"cannot read /proc/{pid}/cgroup: {err.strerror or err}")
        if start_time is not None and self.verify and not self._same_process(pid, start_time):
            return unknown(EXITED)
        workload = self._by_text.get(text)
        if workload is None:
            try:
                lines = parse_cgroup_lines(text.decode("utf-8", "surrogateescape"))
            except KernelDataError as err:
                return unknown(str(err).replace("/proc/PID/", f"/proc/{pid}/"))
            workload = pick_workload((controllers, path) for _, controllers, path in lines)
            if len(self._by_text) >= 4096:
                self._by_text.clear()
            self._by_text[text] = workload
        if self.names:
            workload = self._named(workload)
        return workload

    def _same_process(self, pid: int, start_time: int) -> bool:
        """Whether ``pid`` still has ``start_time``: read after the cgroup, a pid reused in between shows."""
        try:
            return read_stat(pid, self.proc_root).start_time == start_time
        except ClosewaitError:
            return False

    def _named(self, workload: Workload) -> Workload:
        if workload.kind == "container":
            return with_container_name(workload, self.container_names.name(workload.runtime, workload.id))
        if workload.kind == "pod":
            from closewait.sources.kubernetes import with_pod

            entry = self.pod_logs.lookup(workload.id) if workload.id != workload.pod_uid else None
            if entry is None and workload.pod_uid:
                entry = self.pod_logs.lookup_pod(workload.pod_uid)
            meta = self.pod_api.pod(workload.pod_uid) if self.pod_api is not None and workload.pod_uid else None
            return with_pod(workload, entry, meta)
        return workload


_default: dict[str, WorkloadResolver] = {}
_default_lock = _thread.allocate_lock()


def default_resolver(proc_root: str = "/proc") -> WorkloadResolver:
    """One resolver per /proc root for the whole program, so its cache (pid, start time -> workload)
    serves every scan: ``scan(workloads=True)`` uses it."""
    with _default_lock:
        resolver = _default.get(proc_root)
        if resolver is None:
            resolver = _default[proc_root] = WorkloadResolver(proc_root=proc_root)
        return resolver
