"""The result of one lab run (``LabReport``) and its JSON form (docs/lab.md describes the schema).

``report_dict`` is the ``--json`` output: ``{"experiments": [{"id", "part", "claim", "observed",
"verdict", "measurements", ...}], ...}``. The required keys are always present (``verdict`` is null
for a skipped or failed experiment); extra keys (status, reason, packets, notes, series, ...) may be
added but are never renamed.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from closewait.display import format_bytes
from closewait.lab.model import PARTS, Experiment, Status
from closewait.sources.capture import Segment

#: Every experiment id each part produces, in report order (skipped placeholders use these).
PART_IDS: dict[str, tuple[str, ...]] = {
    "reproduce": ("reproduce",),
    "remedies": (
        "idle-timeout",
        "send-sigpipe",
        "read-close",
        "multiplex-read-close",
        "nonblocking-read-close",
        "keepalive",
        "churn",
    ),
    "teardown": (
        "shutdown-rd",
        "shutdown-wr",
        "close-fin",
        "close-fd-vs-connection",
        "close-send-buffer",
        "close-unread-rst",
        "linger-zero",
        "shared-fd",
        "closewait-close-unread",
    ),
}

#: Ids the issue requires in a full run (churn is an extra of the remedies part).
REQUIRED_IDS: tuple[str, ...] = tuple(i for part in PARTS for i in PART_IDS[part] if i != "churn")


@dataclass(frozen=True, slots=True)
class LabReport:
    """Experiments of one run, in part order, plus what the run was."""

    experiments: tuple[Experiment, ...]
    parts: tuple[str, ...]
    duration_s: float
    started_at: float
    full: bool = False
    trials: int = 5
    #: Why packets were not captured (None when the capture worked or was not tried).
    capture_reason: str | None = None
    kernel: str = field(default_factory=platform.release)

    @property
    def ok(self) -> bool:
        """No experiment failed (skipped ones are not failures)."""
        return not any(e.status == Status.ERROR for e in self.experiments)

    @property
    def errors(self) -> tuple[Experiment, ...]:
        return tuple(e for e in self.experiments if e.status == Status.ERROR)

    def part(self, name: str) -> tuple[Experiment, ...]:
        return tuple(e for e in self.experiments if e.part == name)

    def get(self, exp_id: str) -> Experiment | None:
        return next((e for e in self.experiments if e.id == exp_id), None)

    @property
    def packets_captured(self) -> bool:
        """The capture worked in this run (experiments that use it have packets)."""
        return self.capture_reason is None


def segment_dict(segment: Segment) -> dict[str, Any]:
    return {
        "t": round(segment.t, 6),
        "src": str(segment.src),
        "dst": str(segment.dst),
        "flags": list(segment.flags),
        "seq": segment.seq,
        "ack": segment.ack,
        "length": segment.length,
    }


def experiment_dict(exp: Experiment) -> dict[str, Any]:
    return {
        "id": exp.id,
        "part": exp.part,
        "title": exp.title,
        "claim": exp.claim,
        "observed": exp.observed,
        "verdict": exp.verdict.value if exp.verdict is not None else None,
        "status": exp.status.value,
        "reason": exp.reason,
        "measurements": {k: _jsonable(v) for k, v in exp.measurements.items()},
        "notes": list(exp.notes),
        "packets_captured": exp.packets_captured,
        "packets": [segment_dict(s) for s in exp.packets],
        "actors": dict(exp.actors),
        "series": {name: [[t, v] for t, v in points] for name, points in exp.series.items()},
        "duration_s": exp.duration_s,
    }


def report_dict(report: LabReport) -> dict[str, Any]:
    return {
        "experiments": [experiment_dict(e) for e in report.experiments],
        "parts": list(report.parts),
        "ok": report.ok,
        "duration_s": round(report.duration_s, 3),
        "started_at": report.started_at,
        "full": report.full,
        "trials": report.trials,
        "kernel": report.kernel,
        "packets_captured": report.packets_captured,
        "capture_reason": report.capture_reason,
    }


@dataclass(frozen=True, slots=True)
class LadderRow:
    """One arrow of a ladder diagram: a segment, or a summary of a run of data/ACK segments."""

    t: float
    t_end: float
    #: True when the client side sent it (arrow left to right).
    from_client: bool
    label: str
    #: "syn", "fin", "rst", "data" or "ack": what colours the arrow.
    kind: str
    count: int = 1
    #: Which connection, when the experiment had several ("(dup)", "(fork)"), else "".
    connection: str = ""


#: Runs of plain data/ACK segments longer than this are summarised in one arrow per direction.
LADDER_RUN = 4


def _kind(segment: Segment) -> str:
    if "RST" in segment.flags:
        return "rst"
    if "SYN" in segment.flags:
        return "syn"
    if "FIN" in segment.flags:
        return "fin"
    return "data" if segment.length else "ack"


def _label(segment: Segment) -> str:
    order = ("SYN", "FIN", "RST", "ACK")
    flags = ",".join(f for f in order if f in segment.flags) or "-"
    return f"{flags} len={segment.length}" if segment.length else flags


def ladder_rows(exp: Experiment) -> list[LadderRow]:
    """The experiment's packets as ladder arrows; long data/ACK runs become one arrow per direction.

    The client side is every endpoint whose actor label does not start with "server" (all server
    ends of one listener share its address); without actors, the sender of the first SYN.
    """
    if not exp.packets:
        return []
    actors = dict(exp.actors)
    first_syn = next((s for s in exp.packets if s.flags == ("SYN",)), exp.packets[0])

    def is_client(endpoint: str) -> bool:
        label = actors.get(endpoint)
        if label is not None:
            return not label.startswith("server")
        return endpoint != str(first_syn.dst)

    multi = len({v for v in actors.values() if not v.startswith("server")}) > 1

    def connection(segment: Segment) -> str:
        if not multi:
            return ""
        client = str(segment.src) if is_client(str(segment.src)) else str(segment.dst)
        label = actors.get(client, "")
        return label.removeprefix("client").strip()

    rows: list[LadderRow] = []
    run: list[Segment] = []

    def flush() -> None:
        if len(run) <= LADDER_RUN:
            for seg in run:
                rows.append(
                    LadderRow(seg.t, seg.t, is_client(str(seg.src)), _label(seg), _kind(seg), 1, connection(seg))
                )
        else:
            for from_client in (True, False):
                part = [s for s in run if is_client(str(s.src)) == from_client]
                if not part:
                    continue
                data = [s for s in part if s.length]
                nbytes = sum(s.length for s in data)
                label = f"{len(part)} segments, {format_bytes(nbytes)} data" if data else f"{len(part)} ACKs"
                rows.append(
                    LadderRow(
                        part[0].t,
                        part[-1].t,
                        from_client,
                        label,
                        "data" if data else "ack",
                        len(part),
                        connection(part[0]),
                    )
                )
        run.clear()

    for seg in exp.packets:
        if _kind(seg) in ("data", "ack"):
            run.append(seg)
            continue
        flush()
        rows.append(LadderRow(seg.t, seg.t, is_client(str(seg.src)), _label(seg), _kind(seg), 1, connection(seg)))
    flush()
    rows.sort(key=lambda r: r.t)
    return rows


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def placeholders(part: str, status: Status, reason: str, ids: Iterable[str] | None = None) -> list[Experiment]:
    """Skipped (or failed) stand-ins for a part that produced no experiments."""
    return [
        Experiment(
            id=exp_id,
            part=part,
            title=exp_id,
            claim="",
            observed="",
            verdict=None,
            measurements={},
            status=status,
            reason=reason,
        )
        for exp_id in (PART_IDS.get(part, (part,)) if ids is None else ids)
    ]


__all__ = [
    "PART_IDS",
    "REQUIRED_IDS",
    "LabReport",
    "LadderRow",
    "experiment_dict",
    "ladder_rows",
    "placeholders",
    "report_dict",
    "segment_dict",
]
