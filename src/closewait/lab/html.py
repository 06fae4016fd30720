"""The lab report as one self-contained HTML page: inline CSS and inline SVG, no scripts, no
external resources (it opens offline and from a mail attachment).

What it shows: a summary with verdict counts; the article's close()/shutdown() table with this
kernel's verdicts beside each row; per part, one card per experiment (claim, observed, verdict
badge, measurements, notes) with an SVG ladder diagram of its packets; a bar chart of
``close_wait_ms`` per remedy; a line chart of the churn run's CLOSE_WAIT counts per server.

Every piece of text that comes from an experiment goes through ``html.escape`` (quotes too), and SVG
ids are derived from experiment ids through a whitelist, so a hostile string cannot break out.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import re
from collections.abc import Iterable, Sequence

from closewait.display import format_decimal, plural
from closewait.lab.model import PARTS, Experiment, Measurement, Status, Verdict
from closewait.lab.report import PART_IDS, LabReport, ladder_rows
from closewait.lab.teardown import ARTICLE_TABLE

#: The remedies charted side by side (churn is a series of its own).
REMEDY_IDS = tuple(i for i in PART_IDS["remedies"] if i != "churn")

PART_TITLES = {
    "reproduce": "Reproduce: the article's leaking server",
    "remedies": "Remedies: the five ways out, plus SO_KEEPALIVE",
    "teardown": "Teardown: the close() / shutdown() table on this kernel",
}
PART_INTROS = {
    "reproduce": "A server that accepts one client and never closes it; the client is killed. "
    "The server's end stays in CLOSE_WAIT, the client's end in FIN_WAIT2 until tcp_fin_timeout.",
    "remedies": "Each remedy is a real server under the same client scenario, several trials each: "
    "the time from the client's close() to the server's close(), and what the application saw.",
    "teardown": "Each row of the article's table as an experiment with fresh sockets on 127.0.0.1. "
    "Arrows are the segments captured on the loopback; client on the left, server on the right.",
}

KIND_COLOR = {"syn": "#0e7490", "fin": "#15803d", "rst": "#dc2626", "data": "#2563eb", "ack": "#94a3b8"}
SERIES_COLORS = ("#dc2626", "#2563eb", "#16a34a", "#9333ea", "#0891b2", "#db2777", "#a16207", "#475569", "#ea580c")
#: Dash patterns, so series that overlap exactly (the leak and keepalive) stay tellable apart.
SERIES_DASHES = ("", "", "", "", "8 4", "3 3", "10 4 2 4", "6 2", "2 6")

CSS = """
:root { --fg:#0f172a; --muted:#64748b; --line:#e2e8f0; --bg:#f8fafc; --card:#ffffff;
  --holds:#15803d; --nothold:#b91c1c; --caveat:#b45309; --skip:#64748b; --err:#7f1d1d; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif;
  color:var(--fg); background:var(--bg); }
header { background:#0f172a; color:#f8fafc; padding:28px 40px 24px; }
header h1 { margin:0 0 4px; font-size:26px; letter-spacing:-0.01em; }
header p { margin:2px 0; color:#cbd5e1; }
header .counts { margin-top:12px; display:flex; gap:8px; flex-wrap:wrap; }
main { max-width:1180px; margin:0 auto; padding:8px 32px 48px; }
h2 { font-size:21px; margin:36px 0 6px; padding-bottom:6px; border-bottom:2px solid var(--line); }
h3 { margin:0; font-size:16px; }
p.intro { color:var(--muted); margin:4px 0 16px; }
.badge { display:inline-block; padding:2px 10px; border-radius:999px; font-size:12.5px; font-weight:650;
  color:#fff; white-space:nowrap; vertical-align:middle; }
.b-holds { background:var(--holds); } .b-does-not-hold { background:var(--nothold); }
.b-holds-with-caveat { background:var(--caveat); } .b-skipped { background:var(--skip); }
.b-error { background:var(--err); }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:16px 20px;
  margin:14px 0; box-shadow:0 1px 2px rgba(15,23,42,.04); }
.card .top { display:flex; align-items:center; gap:10px; flex-wrap:wrap; }
.card code.id { color:var(--muted); font-size:13px; }
.grid { display:grid; grid-template-columns: minmax(0,1fr) minmax(0,1fr); gap:18px; margin-top:10px; }
.grid.one { grid-template-columns: minmax(0,1fr); }
.claim { border-left:4px solid #cbd5e1; padding:2px 12px; color:#334155; margin:8px 0; font-style:italic; }
.observed { margin:8px 0; }
.label { font-size:11.5px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); font-weight:650; }
table.m { border-collapse:collapse; font-size:13px; width:100%; }
table.m td { border-top:1px solid var(--line); padding:3px 6px; vertical-align:top; }
table.m td:first-child { color:var(--muted); font-family:ui-monospace,SFMono-Regular,Menlo,monospace;
  white-space:nowrap; width:1%; }
ul.notes { margin:6px 0 0; padding-left:20px; color:#334155; font-size:13.5px; }
.reason { color:var(--muted); }
.error .reason { color:var(--nothold); }
table.article { border-collapse:collapse; width:100%; background:var(--card); font-size:14px;
  border:1px solid var(--line); border-radius:10px; overflow:hidden; }
table.article th, table.article td { padding:9px 12px; border-bottom:1px solid var(--line); text-align:left;
  vertical-align:top; }
table.article th { background:#f1f5f9; font-size:12.5px; text-transform:uppercase; letter-spacing:.05em;
  color:#475569; }
table.article td.kernel div { margin:2px 0; white-space:nowrap; }
table.article td.kernel code { font-size:12.5px; }
.chart { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 16px; margin:14px 0; }
.nocap { background:#fef3c7; color:#78350f; border:1px solid #fcd34d; padding:8px 14px; border-radius:8px; }
svg { max-width:100%; height:auto; }
svg text { font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; }
footer { color:var(--muted); font-size:13px; text-align:center; padding:20px; }
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _safe_id(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", value)


def _verdict_key(exp: Experiment) -> str:
    if exp.status != Status.OK or exp.verdict is None:
        return exp.status.value
    return exp.verdict.value


def badge(exp: Experiment) -> str:
    key = _verdict_key(exp)
    return f'<span class="badge b-{esc(key)}">{esc(key)}</span>'


def _fmt(value: Measurement) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format_decimal(value) if abs(value) < 1e6 else f"{value:.0f}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    if value is None:
        return "—"
    return str(value)


# -- SVG pieces -----------------------------------------------------------------------------------


def ladder_svg(exp: Experiment, width: int = 560) -> str:
    """Two vertical lines (client, server) and one arrow per segment (or summarised run)."""
    rows = ladder_rows(exp)
    if not rows:
        return ""
    sid = _safe_id(exp.id)
    left, right = 150, width - 40
    top, step, slope = 44, 30, 8
    height = top + step * len(rows) + 16
    parts = [
        f'<svg role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" aria-label="ladder diagram of {esc(exp.id)}">',
        "<defs>",
    ]
    for kind, color in KIND_COLOR.items():
        parts.append(
            f'<marker id="ah-{sid}-{kind}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{color}"/></marker>'
        )
    parts.append("</defs>")
    parts.append(f'<text x="{left}" y="18" text-anchor="middle" font-size="13" font-weight="700">client</text>')
    parts.append(f'<text x="{right}" y="18" text-anchor="middle" font-size="13" font-weight="700">server</text>')
    parts.append('<text x="8" y="18" font-size="11" fill="#64748b">time (ms)</text>')
    for x in (left, right):
        parts.append(f'<line x1="{x}" y1="26" x2="{x}" y2="{height - 6}" stroke="#334155" stroke-width="2"/>')
    for i, row in enumerate(rows):
        y = top + i * step
        color = KIND_COLOR.get(row.kind, "#334155")
        x1, x2 = (left, right) if row.from_client else (right, left)
        dash = ' stroke-dasharray="5 3"' if row.count > 1 else ""
        weight = "2.4" if row.kind in ("fin", "rst", "syn") else "1.6"
        parts.append(
            f'<line x1="{x1}" y1="{y}" x2="{x2}" y2="{y + slope}" stroke="{color}" stroke-width="{weight}"{dash} '
            f'marker-end="url(#ah-{sid}-{row.kind})"/>'
        )
        label = row.label + (f" {row.connection}" if row.connection else "")
        fw = "700" if row.kind in ("fin", "rst", "syn") else "400"
        parts.append(
            f'<text x="{(left + right) / 2}" y="{y - 3}" text-anchor="middle" font-size="12" fill="{color}" '
            f'font-weight="{fw}">{esc(label)}</text>'
        )
        t = (
            f"{row.t * 1000:.2f}"
            if row.count == 1 or row.t_end <= row.t
            else f"{row.t * 1000:.1f}–{row.t_end * 1000:.1f}"
        )
        parts.append(f'<text x="8" y="{y + 5}" font-size="11" fill="#64748b">{esc(t)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def remedy_bars_svg(experiments: Sequence[Experiment], width: int = 860) -> str:
    """Horizontal bars of close_wait_ms (median) per remedy on a log scale, max as a whisker."""
    items: list[tuple[str, float | None, float | None, str]] = []
    for exp in experiments:
        median = exp.measurements.get("close_wait_ms")
        worst = exp.measurements.get("close_wait_ms_max")
        items.append(
            (
                exp.id,
                float(median) if isinstance(median, int | float) and not isinstance(median, bool) else None,
                float(worst) if isinstance(worst, int | float) and not isinstance(worst, bool) else None,
                _verdict_key(exp),
            )
        )
    if not items:
        return ""
    values = [v for _, m, w, _ in items for v in (m, w) if v is not None and v > 0]
    lo_exp = math.floor(math.log10(min(values))) if values else -1
    hi_exp = math.ceil(math.log10(max(values))) if values else 4
    lo_exp = min(lo_exp, -1)
    hi_exp = max(hi_exp, lo_exp + 2)
    label_w, right_pad, top, bar_h, gap = 190, 150, 34, 22, 14
    plot_w = width - label_w - right_pad
    height = top + len(items) * (bar_h + gap) + 30

    def x_of(v: float) -> float:
        v = max(v, 10.0**lo_exp)
        return label_w + (math.log10(v) - lo_exp) / (hi_exp - lo_exp) * plot_w

    colors = {"holds": "#15803d", "does-not-hold": "#b91c1c", "holds-with-caveat": "#b45309"}
    out = [
        f'<svg role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" aria-label="close_wait_ms per remedy">',
        f'<text x="{label_w}" y="16" font-size="12" fill="#64748b">milliseconds from the client\'s close() to the '
        "server's close() (median bar, max whisker; log scale)</text>",
    ]
    for e in range(lo_exp, hi_exp + 1):
        x = x_of(10.0**e)
        tick = f"{10.0**e:g}"
        out.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{height - 24}" stroke="#e2e8f0"/>')
        out.append(
            f'<text x="{x:.1f}" y="{height - 8}" font-size="11" text-anchor="middle" fill="#64748b">{tick}</text>'
        )
    for i, (name, median, worst, key) in enumerate(items):
        y = top + i * (bar_h + gap)
        out.append(
            f'<text x="{label_w - 10}" y="{y + bar_h / 2 + 4}" font-size="13" text-anchor="end">{esc(name)}</text>'
        )
        color = colors.get(key, "#64748b")
        if median is None:
            out.append(
                f'<rect x="{label_w}" y="{y}" width="{plot_w}" height="{bar_h}" fill="#fee2e2" stroke="#b91c1c" '
                'stroke-dasharray="4 3"/>'
            )
            out.append(
                f'<text x="{label_w + 8}" y="{y + bar_h / 2 + 4}" font-size="12" fill="#7f1d1d">never closed '
                "within the run</text>"
            )
            continue
        x = x_of(median)
        out.append(
            f'<rect x="{label_w}" y="{y}" width="{max(x - label_w, 2):.1f}" height="{bar_h}" fill="{color}" rx="3"/>'
        )
        if worst is not None and worst > median:
            xw = x_of(worst)
            mid = y + bar_h / 2
            out.append(f'<line x1="{x:.1f}" y1="{mid}" x2="{xw:.1f}" y2="{mid}" stroke="#0f172a" stroke-width="1.5"/>')
            out.append(
                f'<line x1="{xw:.1f}" y1="{y + 4}" x2="{xw:.1f}" y2="{y + bar_h - 4}" '
                'stroke="#0f172a" stroke-width="1.5"/>'
            )
        end = max(x, x_of(worst) if worst else x)
        text = f"{_fmt(round(median, 2))} ms" + (f" (max {_fmt(round(worst, 1))})" if worst is not None else "")
        out.append(f'<text x="{end + 8:.1f}" y="{y + bar_h / 2 + 4}" font-size="12">{esc(text)}</text>')
    out.append("</svg>")
    return "".join(out)


def series_svg(series: dict[str, list[tuple[float, float]]], width: int = 860, height: int = 300) -> str:
    """One line per server: CLOSE_WAIT count (y) over seconds (x)."""
    points = [(t, v) for pts in series.values() for t, v in pts]
    if not points:
        return ""
    t_max = max(t for t, _ in points) or 1.0
    v_max = max([v for _, v in points] + [1.0])
    v_top = _nice_ceiling(v_max)
    left, right, top, bottom = 52, 250, 20, 40
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(t: float, v: float) -> tuple[float, float]:
        return left + t / t_max * plot_w, top + plot_h - v / v_top * plot_h

    out = [
        f'<svg role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" aria-label="CLOSE_WAIT count over time per server">'
    ]
    for i in range(5):
        v = v_top * i / 4
        _, y = xy(0, v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e2e8f0"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" fill="#64748b">{v:g}</text>')
    for i in range(6):
        t = t_max * i / 5
        x, _ = xy(t, 0)
        out.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 16}" font-size="11" text-anchor="middle" '
            f'fill="#64748b">{t:.1f}</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2}" y="{height - 6}" font-size="12" text-anchor="middle" fill="#64748b">'
        "seconds since the churn started</text>"
    )
    out.append(
        f'<text x="14" y="{top + plot_h / 2}" font-size="12" fill="#64748b" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">CLOSE_WAIT sockets</text>'
    )
    out.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#334155"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#334155"/>'
    )
    for i, (name, pts) in enumerate(series.items()):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(t, v) for t, v in pts))
        dash = SERIES_DASHES[i % len(SERIES_DASHES)]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        if coords:
            out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2.4"{dash_attr}/>')
        ly = top + 8 + i * 20
        out.append(
            f'<line x1="{left + plot_w + 12}" y1="{ly - 6}" x2="{left + plot_w + 34}" y2="{ly - 6}" '
            f'stroke="{color}" stroke-width="3"{dash_attr}/>'
        )
        last = pts[-1][1] if pts else 0
        out.append(f'<text x="{left + plot_w + 40}" y="{ly - 2}" font-size="12">{esc(name)} ({last:g})</text>')
    out.append("</svg>")
    return "".join(out)


def _nice_ceiling(v: float) -> float:
    exp = 10.0 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return float(m * exp)
    return float(10 * exp)


# -- HTML pieces ----------------------------------------------------------------------------------


def _measurements_table(exp: Experiment) -> str:
    if not exp.measurements:
        return ""
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(_fmt(v))}</td></tr>" for k, v in exp.measurements.items())
    return f'<div class="label">measurements</div><table class="m">{rows}</table>'


def experiment_card(exp: Experiment) -> str:
    head = (
        f'<div class="top">{badge(exp)}<h3>{esc(exp.title or exp.id)}</h3><code class="id">{esc(exp.id)}</code></div>'
    )
    if exp.status != Status.OK:
        cls = "error" if exp.status == Status.ERROR else "skipped"
        reason = esc(exp.reason or "")
        return f'<section class="card {cls}" id="exp-{_safe_id(exp.id)}">{head}<p class="reason">{reason}</p></section>'
    left = [
        f'<div class="label">the claim</div><p class="claim">{esc(exp.claim)}</p>' if exp.claim else "",
        f'<div class="label">what this kernel did</div><p class="observed">{esc(exp.observed)}</p>',
    ]
    if exp.notes:
        left.append('<div class="label">what the table leaves out</div><ul class="notes">')
        left.extend(f"<li>{esc(n)}</li>" for n in exp.notes)
        left.append("</ul>")
    ladder = ladder_svg(exp)
    right = [ladder] if ladder else []
    right.append(_measurements_table(exp))
    if exp.series:
        # A time series (the churn run): the chart first, full width, then the words and numbers.
        return (
            f'<section class="card" id="exp-{_safe_id(exp.id)}">{head}'
            '<div class="label" style="margin-top:10px">CLOSE_WAIT count over time per server</div>'
            f"{series_svg(dict(exp.series))}"
            f'<div class="grid"><div>{"".join(left)}</div><div>{"".join(right)}</div></div></section>'
        )
    return (
        f'<section class="card" id="exp-{_safe_id(exp.id)}">{head}<div class="grid">'
        f"<div>{''.join(left)}</div><div>{''.join(right)}</div></div></section>"
    )


def article_table(report: LabReport) -> str:
    rows = []
    for aspect, shutdown_says, close_says, ids in ARTICLE_TABLE:
        cells = []
        for exp_id in ids:
            exp = report.get(exp_id)
            if exp is None:
                continue
            cells.append(f'<div>{badge(exp)} <a href="#exp-{_safe_id(exp_id)}"><code>{esc(exp_id)}</code></a></div>')
        kernel = "".join(cells) or '<span class="reason">not run</span>'
        rows.append(
            f"<tr><td><b>{esc(aspect)}</b></td><td>{esc(shutdown_says)}</td><td>{esc(close_says)}</td>"
            f'<td class="kernel">{kernel}</td></tr>'
        )
    return (
        '<table class="article"><thead><tr><th>aspect</th><th>shutdown (article)</th><th>close (article)</th>'
        f"<th>this kernel</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _counts(experiments: Iterable[Experiment]) -> str:
    counts: dict[str, int] = {}
    for exp in experiments:
        key = _verdict_key(exp)
        counts[key] = counts.get(key, 0) + 1
    order = [v.value for v in Verdict] + [Status.SKIPPED.value, Status.ERROR.value]
    return "".join(
        f'<span class="badge b-{esc(key)}">{counts[key]} {esc(key)}</span>' for key in order if key in counts
    )


def render_html(report: LabReport) -> str:
    """The whole page as one string."""
    when = dt.datetime.fromtimestamp(report.started_at, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    capture_line = (
        "Packets captured on lo with an AF_PACKET socket."
        if report.packets_captured
        else f"{report.capture_reason or 'Packets were not captured'}: evidence is TCP states and errno only."
    )
    body = [
        "<header><h1>closewait lab</h1>",
        f"<p>Linux {esc(report.kernel)} · {esc(when)} · {plural(len(report.experiments), 'experiment')} in "
        f"{report.duration_s:.1f} s · {report.trials} trials per remedy{' · full run' if report.full else ''}</p>",
        f"<p>{esc(capture_line)}</p>",
        f'<div class="counts">{_counts(report.experiments)}</div></header><main>',
    ]
    if not report.packets_captured:
        body.append(f'<p class="nocap">{esc(capture_line)}</p>')
    if report.part("teardown"):
        body.append("<h2>The article's table, checked</h2>")
        body.append(
            '<p class="intro">What the article says about close() and shutdown(), and the verdict this kernel gave '
            "for each experiment that tests the row.</p>"
        )
        body.append(article_table(report))
    for part in PARTS:
        experiments = report.part(part)
        if not experiments:
            continue
        body.append(f'<h2 id="part-{_safe_id(part)}">{esc(PART_TITLES.get(part, part))}</h2>')
        body.append(f'<p class="intro">{esc(PART_INTROS.get(part, ""))}</p>')
        if part == "remedies":
            remedies = [e for e in experiments if e.id in REMEDY_IDS and e.status == Status.OK]
            chart = remedy_bars_svg(remedies)
            if chart:
                body.append(f'<div class="chart"><div class="label">close_wait_ms per remedy</div>{chart}</div>')
        body.extend(experiment_card(exp) for exp in experiments)
    body.append("</main><footer>closewait lab · generated offline · no scripts, no external resources</footer>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>closewait lab report</title>"
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )


__all__ = ["ARTICLE_TABLE", "esc", "ladder_svg", "remedy_bars_svg", "render_html", "series_svg"]
