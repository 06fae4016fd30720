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
"""

from __future__ import annotations

import _thread  # its Lock is threading.Lock; importing threading itself costs a few ms per scan
import json
import os
import time
from collections.abc import Callable

from closewait.workload import PodContainer, PodMeta, parse_container_log_name, parse_pod_list

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    import logging


def _log() -> logging.Logger:
    """This module's logger, importing logging only when there is something to log: every scan
    imports this module, and logging (~6 ms) is otherwise not on ``scan --json``'s fast path."""
    import logging

    return logging.getLogger(__name__)


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
