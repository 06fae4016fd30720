"""Workloads: which container, Kubernetes pod or systemd unit a process belongs to, from its cgroup.

Pure: no kernel access, no files. ``sources/cgroup.py`` reads /proc/PID/cgroup and
``sources/attribution.py`` composes the reads into ``Workload`` records; this module only names
cgroup paths, so every layout can be tested from a string.

The names recognised are the ones the managers write (innermost wins, so nested layouts such as a
kind node's ``/docker/<node>/kubelet.slice/...`` name the pod, not the node container):

    systemd            /system.slice/nginx.service                      unit nginx.service
                       /user.slice/user-1000.slice/session-3.scope      unit session-3.scope
                       /user.slice/.../user@1000.service/app.slice/foo.service   unit foo.service
    podman             /machine.slice/libpod-<id>.scope (systemd),  /libpod_parent/libpod-<id> (cgroupfs),
                       libpod-conmon-<id>.scope (its monitor),  <unit>/libpod-payload-<id> (--cgroups=split)
    docker             /system.slice/docker-<id>.scope,  /docker/<id>
    containerd (CRI)   cri-containerd-<id>.scope
    CRI-O              crio-<id>.scope,  crio-conmon-<id>.scope (its monitor)
    kubelet, systemd   /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, - as _>.slice/<ctr>
      driver           (besteffort alike; Guaranteed pods sit in kubepods-pod<uid>.slice; any cgroup root,
                       e.g. kind's kubelet.slice/kubelet-kubepods.slice/...)
    kubelet, cgroupfs  /kubepods/burstable/pod<uid>/<container id>  (/kubepods/pod<uid>/... for Guaranteed)

kubelet's side of this is ``pkg/kubelet/cm/cgroup_manager_linux.go`` (``CgroupName.ToSystemd``: each
component's ``-`` becomes ``_``, components are joined by ``-`` and expanded into nested slices) and
``qos_container_manager_linux.go`` (Guaranteed pods directly under kubepods, the other two classes
under ``burstable`` and ``besteffort``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import lru_cache

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5 ms on scan's fast path)
if TYPE_CHECKING:
    from typing import Final, Literal

    #: What a workload is. ``unknown``: the cgroup could not be read or parsed (``error`` says why).
    WorkloadKind = Literal["container", "pod", "unit", "host", "unknown"]
KINDS: Final = ("container", "pod", "unit", "host", "unknown")

#: Kubernetes QoS classes as kubelet names their cgroups (lower case); Guaranteed has no cgroup of its own.
QOS_CLASSES: Final = ("guaranteed", "burstable", "besteffort")


@dataclass(frozen=True, slots=True)
class Workload:
    """What a process runs as: a container, a Kubernetes pod's container, a systemd unit, or the host.

    ``name`` is what a person calls it (container name, pod name, unit name, ``host``); ``id`` is the
    most specific identifier the runtime uses (the full container id; the pod UID for a process of a
    pod outside any container; the cgroup path for a unit; empty for the host). The other fields are
    set where known and None otherwise: a container found by its cgroup alone has ``id`` and
    ``runtime`` but its ``name`` is the short id until the runtime's metadata names it.
    """

    kind: WorkloadKind
    name: str
    id: str = ""
    #: "podman", "docker", "containerd", "cri-o", or None when the cgroup does not say.
    runtime: str | None = None
    #: The container's name (kind container and pod).
    container: str | None = None
    pod: str | None = None
    namespace: str | None = None
    pod_uid: str | None = None
    #: "guaranteed", "burstable" or "besteffort" (kind pod).
    qos: str | None = None
    #: The systemd unit: the workload itself (kind unit), or the service a container runs under.
    unit: str | None = None
    #: The cgroup path the workload was named from (one line of /proc/PID/cgroup).
    cgroup: str = ""
    #: The pod's labels from the API server, sorted by key (empty when not asked for or not reachable).
    labels: tuple[tuple[str, str], ...] = ()
    #: Why the workload is ``unknown`` (None otherwise).
    error: str | None = None
    #: True for the runtime's monitor of the container (conmon: ``libpod-conmon-<id>``,
    #: ``crio-conmon-<id>``), which runs beside the container, not in it.
    monitor: bool = False

    def as_dict(self) -> dict[str, object]:
        """The fields a view shows: kind, name, id, then every other field that is known."""
        data: dict[str, object] = {"kind": self.kind, "name": self.name, "id": self.id}
        for key in ("runtime", "container", "pod", "namespace", "pod_uid", "qos", "unit", "error"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        if self.monitor:
            data["monitor"] = True
        if self.cgroup:
            data["cgroup"] = self.cgroup
        if self.labels:
            data["labels"] = dict(self.labels)
        return data

    def label(self) -> str:
        """What a person calls it, in a few words: ``container web``, ``pod payments/api-7d9f container
        web``, ``unit nginx.service``, ``host``, ``unknown``. Views name a workload with this."""
        if self.kind == "container":
            return f"container {self.name}"
        if self.kind == "pod":
            if self.pod is not None:
                words = f"pod {self.namespace + '/' if self.namespace else ''}{self.pod}"
            else:
                words = f"pod uid {self.pod_uid}"
            if self.container is not None:
                return f"{words} container {self.container}"
            if self.id and self.id != self.pod_uid:
                return f"{words} container {self.id[:12]}"
            return words
        if self.kind == "unit":
            return f"unit {self.name}"
        return self.kind

    def describe(self) -> str:
        """``label()`` with the details a heading shows: ``container web (podman 3f2a9c1b2d4e)``,
        ``pod payments/api-7d9f container web (burstable)``, ``unknown (cannot read ...)``."""
        details: list[str] = []
        if self.kind == "container":
            details.append(" ".join(part for part in (self.runtime, self.id[:12]) if part))
            if self.unit:
                details.append(f"in {self.unit}")
        elif self.kind == "pod" and self.qos:
            details.append(self.qos)
        if self.monitor:
            details.append("its runtime's monitor")
        if self.error:
            details.append(self.error)
        return f"{self.label()} ({', '.join(details)})" if details else self.label()


HOST: Final = Workload("host", "host")


def unknown(error: str, cgroup: str = "") -> Workload:
    """The workload of a process whose cgroup could not be read or parsed."""
    return Workload("unknown", "unknown", cgroup=cgroup, error=error)


# ---- naming one cgroup path ------------------------------------------------------------------

#: prefix of a container's cgroup -> runtime (the pattern below tries the longer prefixes first).
_RUNTIME_OF_PREFIX: Final = {
    "libpod-conmon": "podman",
    "libpod-payload": "podman",
    "libpod": "podman",
    "docker": "docker",
    "cri-containerd": "containerd",
    "crio-conmon": "cri-o",
    "crio": "cri-o",
}
_MONITOR_PREFIXES: Final = frozenset({"libpod-conmon", "crio-conmon"})
# The patterns are compiled on first use (re's own cache keeps them), and only for a part that could
# match: every scan that names an owner imports this module, and most hosts' cgroup paths need none
# of them (compiling them all costs ~0.7 ms).
_CONTAINER_SCOPE = (
    r"(?P<prefix>libpod-conmon|libpod-payload|libpod|docker|cri-containerd|crio-conmon|crio)"
    r"-(?P<id>[0-9a-f]{12,64})(?:\.scope)?"
)
_BARE_ID = r"[0-9a-f]{64}"
# kubelet, systemd driver: [<root>-]kubepods[-<qos>]-pod<uid with _ for ->.slice
_POD_SLICE = r"(?:.+-)?kubepods(?:-(?P<qos>burstable|besteffort))?-pod(?P<uid>[0-9a-fA-F_]{32,36})\.slice"
# kubelet, cgroupfs driver: pod<uid>, under kubepods or kubepods/<qos>
_POD_DIR = r"pod(?P<uid>[0-9a-fA-F-]{32,36})"
_UNIT_SUFFIXES: Final = (".service", ".scope")


def _find_pod(parts: list[str]) -> tuple[int, str, str] | None:
    """The innermost pod cgroup among ``parts`` (either kubelet driver): where in the path, its UID
    and QoS class."""
    for index in range(len(parts) - 1, -1, -1):
        part = parts[index]
        if part.endswith(".slice"):
            match = re.fullmatch(_POD_SLICE, part) if "kubepods" in part else None
            if match:
                return index, match["uid"].replace("_", "-"), match["qos"] or "guaranteed"
            continue
        match = re.fullmatch(_POD_DIR, part) if part.startswith("pod") else None
        if match and index >= 1:
            parent = parts[index - 1]
            if parent == "kubepods":
                return index, match["uid"], "guaranteed"
            if parent in ("burstable", "besteffort") and index >= 2 and parts[index - 2] == "kubepods":
                return index, match["uid"], parent
    return None


def _container_at(parts: list[str], index: int, *, in_pod: bool) -> tuple[str, str | None, bool] | None:
    """(id, runtime, is_monitor) if ``parts[index]`` is a container's cgroup, else None."""
    part = parts[index]
    match = re.fullmatch(_CONTAINER_SCOPE, part) if "-" in part else None
    if match:
        prefix = match["prefix"]
        return match["id"], _RUNTIME_OF_PREFIX[prefix], prefix in _MONITOR_PREFIXES
    if len(part) == 64 and re.fullmatch(_BARE_ID, part):
        # cgroupfs drivers name the directory by the bare id: docker under /docker, kubelet's
        # runtimes (containerd, docker) under the pod's directory.
        if in_pod:
            return part, None, False
        if index >= 1 and parts[index - 1] == "docker":
            return part, "docker", False
    return None


def _innermost_unit(parts: Iterable[str]) -> str | None:
    unit = None
    slice_ = None
    for part in parts:
        if part.endswith(_UNIT_SUFFIXES):
            unit = part
        elif part.endswith(".slice") and part != "-.slice":
            slice_ = part
    return unit or slice_


@lru_cache(maxsize=8192)
def workload_of_cgroup(path: str) -> Workload:
    """Name the workload whose cgroup is ``path`` (a path from /proc/PID/cgroup, e.g. ``/system.slice/x.service``).

    Never raises: a path no manager wrote is the host, as is ``/``. ``..`` components (a cgroup
    outside the reader's cgroup namespace) are dropped before naming. Cached per path: the answer
    is immutable and most processes share a handful of paths.
    """
    parts = [part for part in path.split("/") if part and part != ".."]
    if not parts:
        return replace(HOST, cgroup=path)
    pod = _find_pod(parts)
    if pod is not None:
        pod_index, pod_uid, qos = pod
        container = None
        for index in range(len(parts) - 1, pod_index, -1):
            container = _container_at(parts, index, in_pod=True)
            if container is not None:
                break
        container_id, runtime, monitor = container if container is not None else (pod_uid, None, False)
        return Workload(
            "pod",
            f"pod{pod_uid}",
            container_id,
            runtime=runtime,
            pod_uid=pod_uid,
            qos=qos,
            cgroup=path,
            monitor=monitor,
        )
    for index in range(len(parts) - 1, -1, -1):
        container = _container_at(parts, index, in_pod=False)
        if container is not None:
            container_id, runtime, monitor = container
            return Workload(
                "container",
                container_id[:12],
                container_id,
                runtime=runtime,
                unit=_service_around(parts[:index]),
                cgroup=path,
                monitor=monitor,
            )
    unit = _innermost_unit(parts)
    if unit is not None:
        return Workload("unit", unit, path, unit=unit, cgroup=path)
    return replace(HOST, cgroup=path)


def _service_around(parts: list[str]) -> str | None:
    """The innermost .service around a container (podman under a systemd service, e.g. quadlet)."""
    for part in reversed(parts):
        if part.endswith(".service"):
            return part
    return None


# ---- choosing among the lines of /proc/PID/cgroup --------------------------------------------

_RANK: Final = {"pod": 3, "container": 3, "unit": 2, "host": 1, "unknown": 0}


def pick_workload(paths: Iterable[tuple[str, str]]) -> Workload:
    """The most specific workload among ``(controllers, path)`` pairs, one per line of /proc/PID/cgroup.

    cgroup v2 has one line (controllers ``""``); v1 has one per hierarchy, and a hybrid host both.
    The managers do not always place a process in every hierarchy (runc under cgroupfs may skip the
    unified one; a test may use one hierarchy), so every line is named and the most specific wins
    (a container or pod over a unit over the host); among equals the v2 line, then ``name=systemd``,
    then the file's order.
    """
    best: Workload | None = None
    best_key: tuple[int, int] = (-1, 0)
    seen: set[str] = set()
    for position, (controllers, path) in enumerate(paths):
        if path in seen:
            continue
        seen.add(path)
        workload = workload_of_cgroup(path)
        preference = 2 if controllers == "" else 1 if controllers == "name=systemd" else 0
        key = (_RANK[workload.kind], preference * 10_000 - position)
        if key > best_key:
            best, best_key = workload, key
    return best if best is not None else unknown("no cgroup lines")


# ---- names from the outside: the runtimes' metadata (sources/runtimes.py) -------------------


def with_container_name(workload: Workload, name: str | None) -> Workload:
    """``workload`` (kind container) named ``name`` by its runtime's metadata."""
    if not name or workload.kind != "container":
        return workload
    return replace(workload, name=name, container=name)


# ---- selecting workloads -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkloadSelector:
    """Which workloads a command is about (``--container``, ``--pod [NS/]NAME``, ``--namespace``, ``--unit``).

    Every given criterion must match. ``container`` matches a container's name, its full id, or a
    prefix of its id of at least 4 characters (as ``docker``/``podman`` accept); ``pod`` matches the
    pod's name or UID.
    """

    container: str | None = None
    pod: str | None = None
    namespace: str | None = None
    unit: str | None = None

    @classmethod
    def parse(
        cls,
        *,
        container: str | None = None,
        pod: str | None = None,
        namespace: str | None = None,
        unit: str | None = None,
    ) -> WorkloadSelector:
        """From command-line values; ``pod`` may be ``NAMESPACE/NAME``. ValueError on a bad value."""
        if pod is not None and "/" in pod:
            pod_namespace, _, pod = pod.partition("/")
            if not pod_namespace or not pod or "/" in pod:
                raise ValueError(f"bad pod {pod_namespace}/{pod}: expected NAME or NAMESPACE/NAME")
            if namespace is not None and namespace != pod_namespace:
                raise ValueError(f"--pod {pod_namespace}/{pod} contradicts --namespace {namespace}")
            namespace = pod_namespace
        for label, value in (("container", container), ("pod", pod), ("namespace", namespace), ("unit", unit)):
            if value is not None and not value:
                raise ValueError(f"empty {label} name")
            if value is not None and not value.isprintable():
                raise ValueError(f"a {label} name has no control characters (a newline, a tab)")
        return cls(container, pod, namespace, unit)

    def as_dict(self) -> dict[str, str]:
        """The criteria given, for JSON (``scan --json``'s ``selection``)."""
        data = {"container": self.container, "pod": self.pod, "namespace": self.namespace, "unit": self.unit}
        return {key: value for key, value in data.items() if value is not None}

    def names_of(self, workload: Workload) -> list[str]:
        """The names ``workload`` could be selected by for this selector's first criterion (for
        "did you mean" hints): container names and short ids, pod names, namespaces or units."""
        if self.container is not None:
            names = [workload.container or (workload.name if workload.kind == "container" else None)]
            return [n for n in names if n]
        if self.pod is not None:
            return [n for n in (workload.pod,) if n]
        if self.namespace is not None:
            return [n for n in (workload.namespace,) if n]
        if self.unit is not None:
            return [n for n in (workload.unit,) if n]
        return []

    @property
    def empty(self) -> bool:
        return self.container is None and self.pod is None and self.namespace is None and self.unit is None

    def matches(self, workload: Workload) -> bool:
        if self.container is not None:
            wanted = self.container
            named = workload.container == wanted or (workload.kind == "container" and workload.name == wanted)
            by_id = workload.kind in ("container", "pod") and (
                workload.id == wanted or (len(wanted) >= 4 and workload.id.startswith(wanted))
            )
            if not (named or by_id):
                return False
        if self.pod is not None and self.pod not in (workload.pod, workload.pod_uid):
            return False
        if self.namespace is not None and workload.namespace != self.namespace:
            return False
        return self.unit is None or workload.unit in (self.unit, self.unit + ".service")

    def describe(self) -> str:
        """The criteria as the command line spelled them, for "no such workload" messages."""
        words = []
        if self.container is not None:
            words.append(f"container {self.container}")
        if self.pod is not None:
            words.append(f"pod {self.namespace + '/' if self.namespace else ''}{self.pod}")
        elif self.namespace is not None:
            words.append(f"namespace {self.namespace}")
        if self.unit is not None:
            words.append(f"unit {self.unit}")
        return ", ".join(words) or "any workload"
