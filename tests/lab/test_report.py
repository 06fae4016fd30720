"""The report renderers on a real teardown run: JSON schema, terminal text, HTML structure and
escaping, and the ladder summarising."""

from __future__ import annotations

import html.parser
import io
import json
import re

from rich.console import Console

from closewait.cli.render.lab import ladder_lines, print_report, sparkline
from closewait.lab.html import render_html
from closewait.lab.model import Experiment, Status, Verdict
from closewait.lab.report import LabReport, ladder_rows, report_dict
from closewait.lab.teardown import IDS
from closewait.model import Endpoint
from closewait.sources.capture import Segment

REQUIRED_KEYS = {"id", "part", "claim", "observed", "verdict", "measurements"}
VOID = {"meta", "br", "img", "input", "hr", "link", "col", "area", "base", "source", "wbr"}
SVG_LEAVES = {"path", "line", "rect", "polyline", "circle"}


class _Balance(html.parser.HTMLParser):
    """Checks that every element is closed in order (self-closing SVG leaves allowed)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tags: dict[str, int] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()


def check_html(page: str) -> _Balance:
    parser = _Balance()
    parser.feed(page)
    parser.close()
    assert parser.problems == []
    assert parser.stack == []
    return parser


def test_json_has_the_schema(teardown_report: LabReport) -> None:
    data = json.loads(json.dumps(report_dict(teardown_report)))
    assert [e["id"] for e in data["experiments"]] == list(IDS)
    for exp in data["experiments"]:
        assert exp.keys() >= REQUIRED_KEYS
        assert exp["verdict"] in {v.value for v in Verdict}
        m = exp["measurements"]
        assert isinstance(m["fin_sent"], bool)
        assert isinstance(m["rst_sent"], bool)
        assert m["peer_saw"] in {"eof", "reset", "nothing", "data"}
        for packet in exp["packets"]:
            assert set(packet) == {"t", "src", "dst", "flags", "seq", "ack", "length"}
    assert data["ok"] is True
    assert isinstance(data["duration_s"], float)


def test_terminal_report(teardown_report: LabReport) -> None:
    buffer = io.StringIO()
    print_report(teardown_report, Console(file=buffer, width=200, color_system=None))
    text = buffer.getvalue()
    for exp_id in IDS:
        assert exp_id in text
    if teardown_report.packets_captured:
        assert "ladder diagrams" in text
        assert "SYN" in text
    else:
        assert "packets not captured" in text


def test_text_ladder_draws_direction(teardown_report: LabReport) -> None:
    exp = teardown_report.get("close-unread-rst")
    assert exp is not None
    if not exp.packets:
        return
    lines = [line.plain for line in ladder_lines(exp)]
    syn = next(line for line in lines if " SYN " in line)
    rst = next(line for line in lines if "RST" in line)
    assert syn.rstrip().endswith(">|")  # client to server
    assert "|<" in rst  # the server reset the client


def test_html_is_well_formed_self_contained_and_complete(teardown_report: LabReport) -> None:
    page = render_html(teardown_report)
    parser = check_html(page)
    assert "<script" not in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "http://" not in page
    assert "https://" not in page
    for exp_id in IDS:
        assert f'id="exp-{exp_id}"' in page
    with_packets = sum(1 for e in teardown_report.experiments if e.packets)
    assert parser.tags.get("svg", 0) == with_packets
    assert 'class="article"' in page  # the article's table with this kernel's verdicts
    assert page.count('href="#exp-') >= 10


def _segment(t: float, src: Endpoint, dst: Endpoint, flags: tuple[str, ...], length: int = 0) -> Segment:
    return Segment(t=t, src=src, dst=dst, flags=flags, seq=0, ack=0, length=length)


def test_hostile_text_is_escaped() -> None:
    evil = '<script>alert("x")</script>&"\''
    client, server = Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2)
    exp = Experiment(
        id='x"><img src=y>',
        part="teardown",
        title=evil,
        claim=evil,
        observed=evil,
        verdict=Verdict.HOLDS,
        measurements={evil: evil},
        packets=(_segment(0.0, client, server, ("SYN",)),),
        packets_captured=True,
        actors={str(client): evil, str(server): "server"},
        notes=(evil,),
    )
    page = render_html(LabReport(experiments=(exp,), parts=("teardown",), duration_s=1.0, started_at=0.0))
    check_html(page)
    assert "<script" not in page
    assert "<img" not in page
    assert "&lt;script&gt;" in page


def test_charts_for_remedies_and_churn() -> None:
    remedies = [
        Experiment(
            id=name,
            part="remedies",
            title=name,
            claim="c",
            observed="o",
            verdict=Verdict.HOLDS,
            measurements={"close_wait_ms": value, "close_wait_ms_max": None if value is None else value * 2},
        )
        for name, value in (("read-close", 0.5), ("idle-timeout", 1000.0), ("keepalive", None))
    ]
    churn = Experiment(
        id="churn",
        part="remedies",
        title="churn",
        claim="c",
        observed="o",
        verdict=Verdict.HOLDS,
        measurements={},
        series={"leaking": [(0.0, 0.0), (1.0, 20.0)], "read-close": [(0.0, 0.0), (1.0, 0.0)]},
    )
    report = LabReport(experiments=(*remedies, churn), parts=("remedies",), duration_s=1.0, started_at=0.0)
    page = render_html(report)
    parser = check_html(page)
    assert parser.tags["svg"] == 2  # the bar chart and the line chart
    assert parser.tags["polyline"] == 2
    assert "never closed within the run" in page
    assert "leaking (20)" in page
    buffer = io.StringIO()
    print_report(report, Console(file=buffer, width=200, color_system=None))
    assert "CLOSE_WAIT count over time" in buffer.getvalue()


def test_long_runs_of_data_become_one_arrow_per_direction(teardown_report: LabReport) -> None:
    exp = teardown_report.get("shutdown-wr")
    assert exp is not None
    if not exp.packets:
        return
    rows = ladder_rows(exp)
    assert len(rows) < len(exp.packets)
    summary = [r for r in rows if r.count > 1]
    assert any(r.from_client and "MiB data" in r.label for r in summary)
    assert any(not r.from_client and "ACKs" in r.label for r in summary)
    assert sum(r.count for r in rows) == len(exp.packets)
    fin = next(r for r in rows if r.kind == "fin")
    data = next(r for r in rows if r.kind == "data" and r.from_client)
    assert fin.t >= data.t_end


def test_sparkline_scales_to_the_maximum() -> None:
    assert sparkline([0, 5, 10]) == "▁▅█"
    assert sparkline([0, 0]) == "▁▁"
    assert sparkline([]) == ""
    # A shared scale: a small count is low but not confused with zero.
    assert sparkline([0, 1, 80], top=80) == "▁▂█"


def test_skipped_and_error_cards() -> None:
    skipped = Experiment("a", "reproduce", "a", "", "", None, {}, status=Status.SKIPPED, reason="not built yet")
    failed = Experiment("b", "teardown", "b", "", "", None, {}, status=Status.ERROR, reason="OSError: boom")
    report = LabReport(experiments=(skipped, failed), parts=("reproduce", "teardown"), duration_s=0, started_at=0)
    assert not report.ok
    page = render_html(report)
    check_html(page)
    assert "not built yet" in page
    assert "OSError: boom" in page
    assert report_dict(report)["experiments"][0]["verdict"] is None
