"""Kubernetes names for a container id: kubelet's log links on the node, and the API server.

- **Log links** (no credentials, always there on a node): kubelet links
  ``/var/log/containers/<pod>_<namespace>_<container>-<container id>.log`` to
  ``/var/log/pods/<namespace>_<pod>_<pod uid>/<container>/<restart>.log``, the convention Fluent Bit
  and fluentd read. ``PodLogIndex`` lists the directory at most once per ``min_refresh`` seconds, and
  only when a container id is asked for that it has not seen.
- **The API server** (optional, in-cluster): the pod's labels. ``PodApi`` lists the pods of this node
  (``GET /api/v1/pods?fieldSelector=spec.nodeName=<node>``) with the service account's token and CA,
  at most once per ``interval`` seconds, with the standard library's ssl and http.client. A failure
  (refused, slow, garbage) is logged once as a warning until the next success, counted in
  ``errors``, and the last good list (or none) is used: it never raises into a scan.

What they say is parsed by pure functions (``parse_container_log_name``, ``parse_pod_list``) into
``PodContainer`` and ``PodMeta`` records, which ``with_pod`` applies to a pod's ``Workload``. All of
it is here, not in ``closewait.workload``, so that a scan imports it only when it meets a pod's
process (``WorkloadResolver`` imports this module then): most hosts run none, and making these
records' classes is most of what importing the module costs.
"""

from __future__ import annotations

import _thread  # its Lock is threading.Lock; importing threading itself costs a few ms per scan
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from closewait.workload import Workload

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    import logging


def _log() -> logging.Logger:
    """This module's logger, importing logging only when there is something to log: every scan
    imports this module, and logging (~6 ms) is otherwise not on ``scan --json``'s fast path."""
    import logging

    return logging.getLogger(__name__)


# ---- kubelet's links and the API server's pod list, parsed (pure) ---------------------------


@dataclass(frozen=True, slots=True)
class PodContainer:
    """One container of a pod as kubelet's log links or the API server name it."""

    namespace: str
    pod: str
    container: str
    container_id: str
    pod_uid: str | None = None


# kubelet's /var/log/containers/<pod>_<namespace>_<container>-<container id>.log, the convention
# Fluent Bit's kubernetes filter parses (pod names are DNS subdomains, namespaces have no "_").
# Compiled on first use (re's own cache keeps them), as closewait.workload's cgroup patterns: only
# hosts with kubelet's links need them.
_LOG_NAME = (
    r"(?P<pod>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*)"
    r"_(?P<namespace>[^_]+)_(?P<container>.+)-(?P<id>[0-9a-f]{64})\.log"
)
# its target: /var/log/pods/<namespace>_<pod>_<uid>/<container>/<restart>.log
_POD_LOG_DIR = r"[^_/]+_[^_/]+_(?P<uid>[0-9a-fA-F-]{32,36})"


def parse_container_log_name(filename: str, target: str | None = None) -> PodContainer | None:
    """Parse one /var/log/containers entry name (and its link target, for the pod UID); None if not one."""
    match = re.fullmatch(_LOG_NAME, filename)
    if match is None:
        return None
    uid = None
    if target:
        for part in target.split("/"):
            found = re.fullmatch(_POD_LOG_DIR, part)
            if found:
                uid = found["uid"]
                break
    return PodContainer(match["namespace"], match["pod"], match["container"], match["id"], uid)


@dataclass(frozen=True, slots=True)
class PodMeta:
    """A pod as the API server describes it (the parts closewait uses)."""

    uid: str
    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...] = ()
    #: container id (without the ``containerd://`` scheme) -> container name
    containers: tuple[tuple[str, str], ...] = ()


def parse_pod_list(document: object) -> dict[str, PodMeta]:
    """Pods by UID from a decoded ``/api/v1/pods`` reply (a ``PodList``). ValueError if it is not one."""
    if not isinstance(document, dict) or document.get("kind") not in ("PodList", None):
        raise ValueError("not a PodList")
    items = document.get("items")
    if not isinstance(items, list):
        raise ValueError("PodList without items")
    pods: dict[str, PodMeta] = {}
    for item in items:
        meta = item.get("metadata") if isinstance(item, dict) else None
        if not isinstance(meta, dict):
            raise ValueError("pod without metadata")
        uid, namespace, name = meta.get("uid"), meta.get("namespace"), meta.get("name")
        if not (isinstance(uid, str) and isinstance(namespace, str) and isinstance(name, str)):
            raise ValueError("pod metadata without uid, namespace or name")
        raw_labels = meta.get("labels") or {}
        labels = tuple(sorted((str(k), str(v)) for k, v in raw_labels.items())) if isinstance(raw_labels, dict) else ()
        containers: list[tuple[str, str]] = []
        status = item.get("status")
        if isinstance(status, dict):
            for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
                for entry in status.get(key) or ():
                    if isinstance(entry, dict) and isinstance(entry.get("containerID"), str):
                        containers.append((entry["containerID"].partition("://")[2], str(entry.get("name", ""))))
        pods[uid] = PodMeta(uid, namespace, name, labels, tuple(containers))
    return pods


def with_pod(workload: Workload, entry: PodContainer | None, meta: PodMeta | None) -> Workload:
    """``workload`` (kind pod) with what kubelet's log links and the API server say about it."""
    if workload.kind != "pod":
        return workload
    namespace, pod, container = workload.namespace, workload.pod, workload.container
    labels = workload.labels
    if entry is not None:
        namespace, pod = entry.namespace, entry.pod
        if entry.container_id == workload.id:  # else another container of the same pod
            container = entry.container
    if meta is not None:
        namespace, pod, labels = meta.namespace, meta.name, meta.labels
        if container is None:
            container = dict(meta.containers).get(workload.id)
    if pod is None:
        return workload
    return replace(workload, name=pod, pod=pod, namespace=namespace, container=container, labels=labels)


# ---- reading them ------------------------------------------------------------------------------

CONTAINER_LOG_DIR = "/var/log/containers"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_MAX_LIST_BYTES = 64 << 20


class PodLogIndex:
    """Container id -> (namespace, pod, container, pod uid) from kubelet's /var/log/containers links."""

    def __init__(
        self,
        directory: str = CONTAINER_LOG_DIR,
        *,
        min_refresh: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.min_refresh = min_refresh
        self._clock = clock
        self._entries: dict[str, PodContainer] = {}
        self._listed_at: float | None = None
        #: How many times the directory was listed.
        self.listings = 0

    def refresh(self) -> None:
        """List the directory now."""
        self._listed_at = self._clock()
        self.listings += 1
        entries: dict[str, PodContainer] = {}
        try:
            scandir = os.scandir(self.directory)
        except OSError:
            self._entries = entries
            return
        with scandir:
            for entry in scandir:
                if not entry.name.endswith(".log"):
                    continue
                try:
                    target: str | None = os.readlink(entry.path)
                except OSError:
                    target = None  # a plain file (some setups copy), or removed meanwhile
                parsed = parse_container_log_name(entry.name, target)
                if parsed is not None:
                    entries[parsed.container_id] = parsed
        self._entries = entries

    def lookup_pod(self, pod_uid: str) -> PodContainer | None:
        """Any container of the pod with this UID (for its namespace and name), from the last listing."""
        for entry in self._entries.values():
            if entry.pod_uid == pod_uid:
                return entry
        return None

    def lookup(self, container_id: str) -> PodContainer | None:
        """The pod container with this id, listing the directory again if it is unknown and may be new."""
        found = self._entries.get(container_id)
        if found is None and (self._listed_at is None or self._clock() - self._listed_at >= self.min_refresh):
            self.refresh()
            found = self._entries.get(container_id)
        return found


class PodApi:
    """This node's pods from the Kubernetes API server, listed at most once per ``interval`` seconds.

    ``from_environment()`` builds one from what a pod's service account provides
    (KUBERNETES_SERVICE_HOST/PORT, the mounted token and CA) or returns None outside a cluster.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        token_path: str = f"{SERVICE_ACCOUNT_DIR}/token",
        ca_path: str = f"{SERVICE_ACCOUNT_DIR}/ca.crt",
        node_name: str | None = None,
        interval: float = 60.0,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.port = port
        self.token_path = token_path
        self.ca_path = ca_path
        self.node_name = node_name
        self.interval = interval
        self.timeout = timeout
        self._clock = clock
        self._pods: dict[str, PodMeta] = {}
        self._fetched_at: float | None = None
        self._failing = False
        self._lock = _thread.allocate_lock()
        #: Failed list calls since creation (a metric for the exporter).
        self.errors = 0
        #: List calls made.
        self.requests = 0
        #: The last failure, one line (None after a success).
        self.last_error: str | None = None

    @classmethod
    def from_environment(
        cls,
        environ: dict[str, str] | None = None,
        *,
        service_account_dir: str = SERVICE_ACCOUNT_DIR,
        **kwargs: object,
    ) -> PodApi | None:
        """A client for the API server of the cluster this process runs in, or None when not in one."""
        env = os.environ if environ is None else environ
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        token, ca = f"{service_account_dir}/token", f"{service_account_dir}/ca.crt"
        if not host or not port.isdigit() or not os.path.exists(token):
            return None
        node = env.get("NODE_NAME") or env.get("KUBE_NODE_NAME")
        return cls(host, int(port), token_path=token, ca_path=ca, node_name=node, **kwargs)  # type: ignore[arg-type]

    def pods(self) -> dict[str, PodMeta]:
        """Pods by UID: the last list, fetched again if it is older than ``interval`` (never raises)."""
        with self._lock:
            now = self._clock()
            if self._fetched_at is None or now - self._fetched_at >= self.interval:
                self._fetched_at = now
                self._fetch()
            return self._pods

    def pod(self, uid: str) -> PodMeta | None:
        return self.pods().get(uid)

    def _fetch(self) -> None:
        self.requests += 1
        try:
            self._pods = self._list()
        except Exception as err:  # any failure of a remote service: one warning, a counter, no crash
            self.errors += 1
            self.last_error = f"{type(err).__name__}: {err}"[:300]
            if not self._failing:
                _log().warning(
                    "Kubernetes API server %s:%s: cannot list pods (%s); pod labels are left out until it answers",
                    self.host,
                    self.port,
                    self.last_error,
                )
            self._failing = True
            return
        if self._failing:
            _log().warning("Kubernetes API server %s:%s answers again", self.host, self.port)
        self._failing = False
        self.last_error = None

    def _list(self) -> dict[str, PodMeta]:
        # Imported here, not at the top: every scan imports this module (through the resolver), and
        # http.client with ssl and email costs more than the whole ``scan --json`` fast path's
        # other imports; only a resolver with an API server ever lists pods.
        import http.client
        import ssl
        from urllib.parse import quote

        with open(self.token_path, encoding="utf-8") as handle:
            token = handle.read().strip()
        # Imported here, not at the top: every scan imports this module, few ever talk to an API server.

        context = ssl.create_default_context(cafile=self.ca_path)
        path = "/api/v1/pods"
        if self.node_name:
            path += "?fieldSelector=" + quote(f"spec.nodeName={self.node_name}", safe="=")
        # ``timeout`` bounds each socket operation; the deadline bounds the whole call, so a server
        # that trickles bytes cannot hold a scan longer than that either.
        deadline = time.monotonic() + self.timeout
        connection = http.client.HTTPSConnection(self.host, self.port, context=context, timeout=self.timeout)
        try:
            connection.request("GET", path, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise OSError(f"HTTP {response.status} {response.reason}")
            chunks, size = [], 0
            while chunk := response.read1(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > _MAX_LIST_BYTES:
                    raise ValueError(f"pod list larger than {_MAX_LIST_BYTES >> 20} MiB")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pod list not complete after {self.timeout:g} s")
        finally:
            connection.close()
        return parse_pod_list(json.loads(b"".join(chunks)))
