"""Monitoring-plugin logic for ``closewait check``: a Snapshot and thresholds in, a status and perfdata out.

It follows the Nagios/Icinga plugin conventions (Monitoring Plugins Development Guidelines): exit
status 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN, and one line of output::

    CLOSEWAIT WARNING - 12 sockets in CLOSE_WAIT (worst: pid 4711 python3 12) | close_wait=12;10;50;0 ...

With ``per_workload`` the worst container, pod or unit is named instead, and each of the worst
``perfdata_top`` workloads gets a perfdata item of its own (``'close_wait container web'=12;10;50;0``),
plus ``workloads=N``: the output stays bounded on a host with hundreds of containers.

Perfdata is ``label=value[UOM];warn;crit;min;max`` with the thresholds echoed so graphs can draw
them. Thresholds are plain "alert above N" numbers (the guideline's ``N`` form, meaning outside
0..N): a count equal to the threshold is still OK.

Everything here is pure: ``evaluate`` does not scan, ``Thresholds`` validates itself, and the CLI
only prints ``Result.line()`` and exits with ``Result.status``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from closewait.display import format_decimal, plural
from closewait.errors import UsageError
from closewait.model import ProcessGroup, Snapshot, TcpState, WorkloadGroup


class Status(enum.IntEnum):
    """Plugin exit statuses."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Alert when the CLOSE_WAIT count (host total, or the worst process with ``per_process``) is above
    ``warning``/``critical``, or when the oldest socket has been idle longer than ``max_age_s``
    (WARNING) / ``max_age_critical_s`` (CRITICAL). None disables a threshold."""

    warning: int | None = None
    critical: int | None = None
    per_process: bool = False
    max_age_s: float | None = None
    max_age_critical_s: float | None = None
    #: Apply warning/critical to the workload (container, pod, unit, host) holding the most sockets.
    per_workload: bool = False
    #: With ``per_workload``: perfdata for this many workloads, the worst first (the rest are counted).
    perfdata_top: int = 10

    def __post_init__(self) -> None:
        if self.per_process and self.per_workload:
            raise UsageError("give either --per-process or --per-workload, not both")
        if self.perfdata_top < 0:
            raise UsageError(f"--perfdata-top must not be negative, got {self.perfdata_top}")
        for name in ("warning", "critical", "max_age_s", "max_age_critical_s"):
            value = getattr(self, name)
            if value is not None and value < 0:
                flag = "--" + name.removesuffix("_s").replace("_", "-")
                raise UsageError(f"{flag} must not be negative, got {value}")
        if self.warning is not None and self.critical is not None and self.warning > self.critical:
            raise UsageError(f"--warning ({self.warning}) is above --critical ({self.critical})")
        if (
            self.max_age_s is not None
            and self.max_age_critical_s is not None
            and self.max_age_s > self.max_age_critical_s
        ):
            raise UsageError(
                f"--max-age ({self.max_age_s:g}) is above --max-age-critical ({self.max_age_critical_s:g})"
            )


@dataclass(frozen=True, slots=True)
class Result:
    status: Status
    summary: str
    perfdata: tuple[str, ...]

    def line(self) -> str:
        """The plugin's one line of output: ``CLOSEWAIT STATUS - summary | perfdata``."""
        text = f"CLOSEWAIT {self.status.name} - {self.summary}"
        if self.perfdata:
            text += " | " + " ".join(self.perfdata)
        return text


def _threshold(value: float | None) -> str:
    """A threshold echoed in perfdata as the user gave it (``%g``: ``2.5``, ``10``); empty when unset."""
    if value is None:
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _perf(label: str, value: float, uom: str = "", warn: float | None = None, crit: float | None = None) -> str:
    shown = format_decimal(value) if isinstance(value, float) else str(value)
    return f"{label}={shown}{uom};{_threshold(warn)};{_threshold(crit)};0"


def _who(group: ProcessGroup) -> str:
    if group.process is None:
        return "no owning process"
    return f"pid {group.process.pid} {group.process.name}"


def _workload_who(group: WorkloadGroup) -> str:
    if group.workload is None:
        if group.processes and group.processes[0].process is not None:
            return _who(group.processes[0])  # its workload was not looked up
        return "no owning process"
    return group.workload.label()


def perfdata_label(text: str) -> str:
    """``text`` as a perfdata label: quoted (it may hold spaces), without the two characters the
    plugin guidelines forbid in one (``'`` and ``=``), at most 100 characters."""
    cleaned = text.replace("'", "_").replace("=", "_")[:100]
    return f"'{cleaned}'"


def _workload_perfdata(groups: list[WorkloadGroup], thresholds: Thresholds) -> list[str]:
    """One perfdata item per workload, the worst ``perfdata_top`` (by count), and the number of
    workloads holding CLOSE_WAIT sockets: bounded however many containers the host runs."""
    owned = [g for g in groups if g.workload is not None or (g.processes and g.processes[0].process is not None)]
    warn, crit = thresholds.warning, thresholds.critical
    items = [
        _perf(perfdata_label(f"close_wait {_workload_who(g)}"), g.count, warn=warn, crit=crit)
        for g in owned[: thresholds.perfdata_top]
    ]
    items.append(_perf("workloads", len(owned)))
    return items


def evaluate(snapshot: Snapshot, thresholds: Thresholds) -> Result:
    """The status for ``snapshot``'s CLOSE_WAIT sockets against ``thresholds``.

    The worst condition wins. An age threshold on sockets without tcp_info (the procfs backend)
    gives UNKNOWN rather than OK. Owner-lookup errors (no root) do not change the status by themselves,
    but with ``per_process`` they make it UNKNOWN when the count is not already alarming, because a
    per-process check that cannot see owners cannot say OK.
    """
    close_wait = snapshot.in_state(TcpState.CLOSE_WAIT)
    total = len(close_wait)
    groups = snapshot.by_process(TcpState.CLOSE_WAIT)
    owned = [g for g in groups if g.process is not None]
    worst = owned[0] if owned else None
    idles = [f.socket.idle_ms for f in close_wait if f.socket.idle_ms is not None]
    oldest_s = max(idles) / 1000 if idles else None
    unread = sum(f.socket.unread_bytes for f in close_wait)

    by_workload = snapshot.by_workload(TcpState.CLOSE_WAIT) if thresholds.per_workload else []
    owned_workloads = [g for g in by_workload if g.processes and g.processes[0].process is not None]
    worst_workload = owned_workloads[0] if owned_workloads else None
    if thresholds.per_process:
        measured = worst.count if worst else 0
    elif thresholds.per_workload:
        measured = worst_workload.count if worst_workload else 0
    else:
        measured = total
    status = Status.OK
    reasons: list[str] = []
    if thresholds.critical is not None and measured > thresholds.critical:
        status = Status.CRITICAL
        reasons.append(f"count {measured} > {thresholds.critical}")
    elif thresholds.warning is not None and measured > thresholds.warning:
        status = Status.WARNING
        reasons.append(f"count {measured} > {thresholds.warning}")
    if oldest_s is not None:
        if thresholds.max_age_critical_s is not None and oldest_s > thresholds.max_age_critical_s:
            status = max(status, Status.CRITICAL)
            reasons.append(f"oldest idle {oldest_s:.0f}s > {thresholds.max_age_critical_s:g}s")
        elif thresholds.max_age_s is not None and oldest_s > thresholds.max_age_s:
            status = max(status, Status.WARNING)
            reasons.append(f"oldest idle {oldest_s:.0f}s > {thresholds.max_age_s:g}s")
    age_asked = thresholds.max_age_s is not None or thresholds.max_age_critical_s is not None
    if age_asked and len(idles) < total and status == Status.OK:
        # An age threshold that cannot be evaluated must not read as OK.
        status = Status.UNKNOWN
        reasons.append("socket ages unknown: no tcp_info from this backend (use netlink)")
    if (thresholds.per_process or thresholds.per_workload) and snapshot.errors and status == Status.OK:
        status = Status.UNKNOWN
        reasons.append(snapshot.errors[0])

    summary = f"{plural(total, 'socket')} in CLOSE_WAIT"
    if thresholds.per_workload:
        if worst_workload is not None:
            summary += f" (worst: {_workload_who(worst_workload)} holds {worst_workload.count}"
            summary += f", {len(owned_workloads)} workloads)" if len(owned_workloads) > 1 else ")"
    elif worst is not None:
        summary += f" (worst: {_who(worst)} holds {worst.count}"
        summary += f", {len(owned)} processes)" if len(owned) > 1 else ")"
    if oldest_s is not None:
        summary += f", oldest idle {oldest_s:.0f}s"
    if reasons:
        summary += ": " + "; ".join(reasons)

    count_label = (
        "close_wait_max_process"
        if thresholds.per_process
        else "close_wait_max_workload"
        if thresholds.per_workload
        else "close_wait"
    )
    perfdata = [_perf(count_label, measured, warn=thresholds.warning, crit=thresholds.critical)]
    if thresholds.per_process or thresholds.per_workload:
        perfdata.append(_perf("close_wait", total))
    perfdata.append(
        _perf("oldest_age", oldest_s or 0.0, "s", warn=thresholds.max_age_s, crit=thresholds.max_age_critical_s)
    )
    perfdata.append(_perf("unread_bytes", unread, "B"))
    perfdata.append(_perf("processes", len(owned)))
    if thresholds.per_workload:
        perfdata.extend(_workload_perfdata(by_workload, thresholds))
    return Result(status, summary, tuple(perfdata))
