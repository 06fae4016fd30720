"""The terminal view of ``closewait watch``: a table refreshed in place, or plain lines for pipes and logs."""

from __future__ import annotations

import time
from collections.abc import Iterable

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from closewait.cli.render import console
from closewait.display import format_duration
from closewait.watch import Event, ProcessSample, Sample, Trend

_TREND_STYLE = {
    Trend.LEAKING: "bold red",
    Trend.GROWING: "yellow",
    Trend.SHRINKING: "green",
    Trend.STEADY: "",
    Trend.NEW: "dim",
}


def _who(row: ProcessSample) -> tuple[str, str]:
    if row.process is None:
        return "-", "(no owner)"
    return str(row.process.pid), row.process.name


def _workload_who(row: ProcessSample) -> tuple[str, str]:
    """(WORKLOAD, PROCS) of a row of a sample by workload."""
    if row.workload is not None:
        return row.workload.label(), str(row.process_count)
    if row.process is not None:
        return f"pid {row.process.pid} {row.process.name}", "1"
    return "(no owner)", "-"


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(int(seconds * 1000))


def _rate(row: ProcessSample) -> str:
    return "-" if row.rate_per_minute is None else f"{row.rate_per_minute:+.1f}"


def _verdict(row: ProcessSample) -> str:
    return "LEAK" if row.leaking else row.trend.value


def _header(sample: Sample, window: int) -> str:
    clock = time.strftime("%H:%M:%S", time.localtime(sample.taken_at))
    where = f" in {sample.netns}" if sample.netns else ""
    return (
        f"{clock}  sample {sample.index + 1}  CLOSE_WAIT total {sample.total} ({sample.total_change:+d} since start)"
        f"{where}  leak window {window} samples"
    )


def sample_table(sample: Sample, window: int) -> Group:
    """The live view of one sample: a header line and one row per process."""
    table = Table(box=None, padding=(0, 2), pad_edge=False, header_style="dim")
    by_workload = sample.grouping == "workload"
    who = _workload_who if by_workload else _who
    for name, justify in (
        ("WORKLOAD" if by_workload else "PID", "left" if by_workload else "right"),
        ("PROCS" if by_workload else "PROCESS", "right" if by_workload else "left"),
        ("COUNT", "right"),
        ("CHANGE", "right"),
        ("RATE/MIN", "right"),
        ("OLDEST SEEN", "right"),
        ("OLDEST IDLE", "right"),
        ("DIAGNOSIS", "left"),
        ("VERDICT", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in sample.processes:
        pid, name = who(row)
        table.add_row(
            escape(pid),
            escape(name),
            str(row.count),
            f"{row.change:+d}",
            _rate(row),
            _age(row.oldest_first_seen_s),
            _age(row.oldest_idle_s),
            escape(row.diagnosis),
            Text(_verdict(row), style=_TREND_STYLE[row.trend]),
        )
    parts: list[Text | Table] = [Text(_header(sample, window), style="bold")]
    if sample.processes:
        parts.append(table)
    else:
        parts.append(Text("no sockets in CLOSE_WAIT", style="green"))
    parts.extend(Text(f"warning: {message}", style="yellow") for message in sample.errors)
    return Group(*parts)


def plain_lines(sample: Sample, window: int) -> list[str]:
    """The same content as lines of text, for output that is not a terminal."""
    lines = [_header(sample, window)]
    for row in sample.processes:
        if sample.grouping == "workload":
            workload, processes = _workload_who(row)
            who = f"{workload} ({processes} {'process' if processes == '1' else 'processes'})"
        else:
            pid, name = _who(row)
            who = f"pid {pid} {name}"
        lines.append(
            f"  {who}: count {row.count} ({row.change:+d}), rate {_rate(row)}/min,"
            f" oldest seen {_age(row.oldest_first_seen_s)}, idle {_age(row.oldest_idle_s)},"
            f" {row.diagnosis}, {_verdict(row)}"
        )
    lines.extend(f"  warning: {message}" for message in sample.errors)
    return lines


def show(samples: Iterable[Sample], window: int, *, live: bool, out: Console | None = None) -> None:
    """Print every sample: refreshed in place when ``live`` (a terminal), else as plain lines."""
    out = out or console()
    if not live:
        for sample in samples:
            # Written as is: a pipe or log file gets whole lines, never wrapped at the console width.
            out.file.write("".join(line + "\n" for line in plain_lines(sample, window)))
            out.file.flush()
        return
    with Live(console=out, auto_refresh=False, transient=False) as view:
        for sample in samples:
            view.update(sample_table(sample, window), refresh=True)


def event_line(event: Event) -> str:
    """One transition as a line, like bcc's tcpstates but for CLOSE_WAIT only::

    12:00:01.123  ENTER  127.0.0.1:8080  127.0.0.1:51234  ESTABLISHED -> CLOSE_WAIT
    12:00:04.456  LEAVE  127.0.0.1:8080  127.0.0.1:51234  CLOSE_WAIT -> LAST_ACK  after 3.3 s, closed by pid 12 (nc)
    """
    t = event.transition
    clock = time.strftime("%H:%M:%S", time.localtime(event.at)) + f".{int(event.at * 1000) % 1000:03d}"
    kind = "ENTER" if t.entered else "LEAVE"
    line = f"{clock}  {kind}  {t.local!s:<22} {t.remote!s:<22} {t.old_state.name} -> {t.new_state.name}"
    if t.entered:
        return line
    after = f"  after {format_duration((t.dwell_ns or 0) // 1_000_000)}"
    reason = t.reason.name.lower() if t.reason is not None else "left"
    if t.tgid is None:
        return f"{line}{after}, {reason} (no process: the peer's RST, a timeout, or ss -K)"
    return f"{line}{after}, {reason} by pid {t.tgid} ({t.comm})"


def show_events(events: Iterable[Event], out: Console | None = None) -> None:
    """A line per transition, written as it arrives."""
    out = out or console()
    for event in events:
        out.file.write(event_line(event) + "\n")
        out.file.flush()
