"""The labels of the exporter's per-process series, one type for both kinds: the CLOSE_WAIT gauges
(``collector.py``, a row per owner of sockets now) and the close-time histogram (``recording.py``,
a series per closer of sockets so far).

A series is named by ``RowKey``: the workload's labels (``workload_labels``), the process name, the
pid (``""`` unless ``--pid-label``) and the network namespace (``""`` unless ``--all-netns``). Rows
no single process fills have reserved process names: ``other`` (rows summed to bound cardinality),
``unowned`` (sockets no process holds), ``exited`` (a closer that exited before it was named).
"""

from __future__ import annotations

from typing import NamedTuple

from closewait.workload import Workload

#: The workload labels of the per-process series, in the order they are emitted (docs/monitoring.md).
WORKLOAD_LABELS = ("namespace", "pod", "container", "unit")
#: How many characters of a container id name a container no runtime metadata named (as ``podman ps``).
SHORT_ID = 12
OTHER = "other"
UNOWNED = "unowned"
EXITED = "exited"


def workload_labels(workload: Workload | None) -> tuple[str, str, str, str]:
    """The ``namespace``, ``pod``, ``container`` and ``unit`` label values of ``workload``; ``""`` where
    one does not apply (the host, a process whose cgroup could not be read, no workload looked up).

    A pod kubelet's log links did not name keeps ``pod="pod<UID>"``, and a container its runtime did
    not name its id's first 12 characters, so two such workloads never share a series.
    """
    if workload is None:
        return ("", "", "", "")
    if workload.kind == "pod":
        container = workload.container
        if container is None and workload.id and workload.id != workload.pod_uid:
            container = workload.id[:SHORT_ID]
        return (workload.namespace or "", workload.pod or workload.name, container or "", workload.unit or "")
    if workload.kind == "container":
        return ("", "", workload.container or workload.name, workload.unit or "")
    if workload.kind == "unit":
        return ("", "", "", workload.unit or workload.name)
    return ("", "", "", "")


def label_names(*, netns: bool, pid: bool) -> list[str]:
    """The label names of a per-process series, in emission order: ``netns`` and ``pid`` only when on."""
    return [*(["netns"] if netns else []), *WORKLOAD_LABELS, "process", *(["pid"] if pid else [])]


class RowKey(NamedTuple):
    """The labels of one per-process series (see the module docstring)."""

    namespace: str
    pod: str
    container: str
    unit: str
    process: str
    pid: str = ""
    netns: str = ""

    @property
    def workload(self) -> tuple[str, str, str, str, str]:
        """The workload part of the key (netns included: one workload per namespace)."""
        return (self.netns, self.namespace, self.pod, self.container, self.unit)

    def label_values(self, *, netns: bool, pid: bool) -> list[str]:
        """The values in the order of ``label_names(netns=, pid=)``."""
        values = [self.namespace, self.pod, self.container, self.unit, self.process]
        return [*([self.netns] if netns else []), *values, *([self.pid] if pid else [])]


__all__ = ["EXITED", "OTHER", "SHORT_ID", "UNOWNED", "WORKLOAD_LABELS", "RowKey", "label_names", "workload_labels"]
