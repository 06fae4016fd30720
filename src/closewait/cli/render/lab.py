"""The terminal view of a lab run: a verdict table, ladder diagrams as text, a churn sparkline."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from closewait.cli.render import console
from closewait.display import plural
from closewait.lab.model import PARTS, Experiment, Status, Verdict
from closewait.lab.report import LabReport, LadderRow, ladder_rows

VERDICT_STYLE: dict[str, str] = {
    Verdict.HOLDS.value: "bold green",
    Verdict.DOES_NOT_HOLD.value: "bold red",
    Verdict.HOLDS_WITH_CAVEAT.value: "bold yellow",
    Status.SKIPPED.value: "dim",
    Status.ERROR.value: "bold white on red",
}
KIND_STYLE = {"syn": "cyan", "fin": "green", "rst": "bold red", "data": "blue", "ack": "dim"}
LADDER_WIDTH = 44
SPARK = "▁▂▃▄▅▆▇█"
PART_TITLES = {
    "reproduce": "reproduce: the article's leaking server",
    "remedies": "remedies: the five ways out, plus SO_KEEPALIVE",
    "teardown": "teardown: the close()/shutdown() table on this kernel",
}


def verdict_text(exp: Experiment) -> Text:
    if exp.status != Status.OK or exp.verdict is None:
        return Text(exp.status.value, style=VERDICT_STYLE.get(exp.status.value, ""))
    return Text(exp.verdict.value, style=VERDICT_STYLE[exp.verdict.value])


def _observed(exp: Experiment) -> Text:
    if exp.status != Status.OK:
        return Text(exp.reason or "", style="dim" if exp.status == Status.SKIPPED else "red")
    return Text(exp.observed)


def _table(experiments: tuple[Experiment, ...]) -> Table:
    table = Table(show_lines=True, expand=False, pad_edge=False)
    table.add_column("id", style="bold", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("claim", ratio=2, overflow="fold")
    table.add_column("observed on this kernel", ratio=5, overflow="fold")
    for exp in experiments:
        table.add_row(exp.id, verdict_text(exp), exp.claim, _observed(exp))
    return table


def ladder_lines(exp: Experiment, width: int = LADDER_WIDTH) -> list[Text]:
    """A ladder diagram as text lines: time, then an arrow between the client and server columns."""
    rows = ladder_rows(exp)
    if not rows:
        return []
    lines = [Text(f"{'ms':>9}  client{' ' * (width - 4)}server", style="bold")]
    for row in rows:
        lines.append(_arrow(row, width))
    return lines


def _arrow(row: LadderRow, width: int) -> Text:
    label = f" {row.label}{' ' + row.connection if row.connection else ''} "
    inner = width - 2
    if len(label) > inner - 4:
        label = label[: inner - 5] + "… "
    left = (inner - len(label)) // 2
    right = inner - len(label) - left
    body = "-" * left + label + "-" * right
    text = Text(f"{row.t * 1000:9.3f}  ")
    if row.from_client:
        text.append("|" + body + ">|", style=KIND_STYLE.get(row.kind, ""))
    else:
        text.append("|<" + body + "|", style=KIND_STYLE.get(row.kind, ""))
    if row.count > 1 and row.t_end > row.t:
        text.append(f"  until {row.t_end * 1000:.3f}", style="dim")
    return text


def sparkline(values: list[float], top: float | None = None) -> str:
    """One block character per value, scaled to ``top`` (default: the largest value).

    Zero is the lowest block; any positive value is at least the second lowest, so "a few" stays
    visibly different from "none" when a series shares its scale with a much larger one.
    """
    if not values:
        return ""
    top = max(values) if top is None else top
    if top <= 0:
        return SPARK[0] * len(values)
    last = len(SPARK) - 1
    return "".join(SPARK[0] if v <= 0 else SPARK[min(max(int(v / top * last + 0.5), 1), last)] for v in values)


def _churn(out: Console, exp: Experiment) -> None:
    if not exp.series:
        return
    out.print(Text("CLOSE_WAIT count over time (churn)", style="bold"))
    name_width = max(len(n) for n in exp.series)
    # One scale for all servers, so the leak's 80 and a remedy's 1 do not look alike.
    top = max((v for points in exp.series.values() for _, v in points), default=0.0)
    for name, points in exp.series.items():
        values = [v for _, v in points]
        span = f"{points[-1][0]:.1f} s" if points else ""
        line = Text(f"  {name:<{name_width}}  ")
        line.append(sparkline(values, top), style="red" if values and values[-1] > 0 else "green")
        line.append(f"  max {max(values, default=0):g}, last {values[-1] if values else 0:g} over {span}", style="dim")
        out.print(line)


def print_report(report: LabReport, out: Console | None = None) -> None:
    out = out or console()
    head = Text("closewait lab", style="bold")
    head.append(
        f"  kernel {report.kernel}  {plural(len(report.experiments), 'experiment')} in {report.duration_s:.1f} s"
    )
    out.print(head)
    if report.packets_captured:
        out.print(Text("packets captured on lo (AF_PACKET)", style="dim"))
    else:
        reason = report.capture_reason or "packets were not captured"
        out.print(Text(f"{reason}; evidence is TCP states and errno only", style="yellow"))
    for part in PARTS:
        experiments = report.part(part)
        if not experiments:
            continue
        out.print()
        out.print(Text(PART_TITLES.get(part, part), style="bold underline"))
        out.print(_table(experiments))
        for exp in experiments:
            if exp.id == "churn":
                _churn(out, exp)
    diagrams = [e for e in report.part("teardown") if e.packets]
    if diagrams:
        out.print()
        out.print(Text("ladder diagrams (client left, server right)", style="bold underline"))
        for exp in diagrams:
            out.print()
            title = Text(f"{exp.id}", style="bold")
            title.append("  ")
            title.append_text(verdict_text(exp))
            title.append(f"  {exp.title}", style="dim")
            out.print(title)
            for line in ladder_lines(exp):
                out.print(line)
    counts: dict[str, int] = {}
    for exp in report.experiments:
        key = exp.verdict.value if exp.status == Status.OK and exp.verdict else exp.status.value
        counts[key] = counts.get(key, 0) + 1
    summary = Text("\n")
    for key, n in counts.items():
        summary.append(f"{n} {key}", style=VERDICT_STYLE.get(key, ""))
        summary.append("  ")
    out.print(summary)


__all__ = ["ladder_lines", "print_report", "sparkline", "verdict_text"]
