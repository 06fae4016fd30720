"""Issue 12's three speed goals, measured side by side in one run (results in docs/benchmarks.md).

1. ``closewait scan --json`` (with owners) against ``ss -tan state close-wait`` (which finds no
   owners) on the 100k-pair fixture: the goal is at most 1.5x. ``--no-owners`` is timed alongside.
2. One scrape of ``closewait exporter --min-interval 0`` (every scrape scans afresh), with the recorder
   off and on, against node_exporter's tcpstat collector on the same fixture: the goal is at most
   0.25x node_exporter.
3. The recorder's overhead on a loopback connection-churn benchmark (``bench/bench_recorder.py``:
   connect, request, close as fast as the machine goes, recorder off and on in interleaved rounds):
   the goal is at most 2% of throughput. It runs after the fixture is torn down, in the same run.

Order: the fixture is built (``bench/scan_fixture.py``), the commands are timed round-robin with one
discarded warm-up round (``bench_scan.measure``: wall and CPU time of the whole command, and each
tool's CLOSE_WAIT count checked against ``ss``), then the three exporters are started and scraped
round-robin (one discarded warm-up scrape each), then the fixture is torn down by pid and the churn
benchmark runs. Nothing else should run on the machine meanwhile: ``loadavg`` is recorded at each
phase.

    python bench/bench_events_goals.py                       # 100,000 pairs, 5,000 CLOSE_WAIT
    python bench/bench_events_goals.py --quick               # 2,000 pairs, 200 CLOSE_WAIT, short churn

Writes ``bench/results/events_goals.json`` and the section between the ``events-goals`` markers in
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_scan  # noqa: E402  (siblings, found through the path above)
import scan_fixture  # noqa: E402

ROOT = HERE.parent
RESULTS = HERE / "results" / "events_goals.json"
DOC = ROOT / "docs" / "benchmarks.md"
START_MARK = "<!-- events-goals:start -->"
END_MARK = "<!-- events-goals:end -->"
CLOSEWAIT = str(bench_scan.VENV_BIN / "closewait")
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
STARTUP_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by pid, SIGKILL after 15 s; always reaped."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=15)


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                response.read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up") from None
            time.sleep(0.2)


@contextlib.contextmanager
def exporters() -> Iterator[dict[str, str]]:
    """name -> /metrics URL of node_exporter (tcpstat only) and closewait's exporter, recorder off and on."""
    started: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}
    commands = {
        "node_exporter tcpstat": [
            NODE_EXPORTER,
            "--collector.disable-defaults",
            "--collector.tcpstat",
            "--web.listen-address=127.0.0.1:{port}",
        ],
        **{
            f"closewait exporter --recorder {recorder}": [
                CLOSEWAIT,
                "exporter",
                "--listen",
                "127.0.0.1:{port}",
                "--min-interval",
                "0",
                "--recorder",
                recorder,
            ]
            for recorder in ("off", "on")
        },
    }
    try:
        for name, argv in commands.items():
            port = _free_port()
            proc = subprocess.Popen(
                [part.format(port=port) for part in argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            started.append(proc)
            url = f"http://127.0.0.1:{port}/metrics"
            _wait_ready(url, proc)
            urls[name] = url
        yield urls
    finally:
        for proc in reversed(started):
            _stop(proc)


def _close_wait_in(body: str) -> float:
    """CLOSE_WAIT sockets a scrape reports (node_exporter's or closewait's state gauge)."""
    for line in body.splitlines():
        if line.startswith('node_tcp_connection_states{state="close_wait"}') or line.startswith(
            'closewait_tcp_sockets{state="CLOSE_WAIT"}'
        ):
            return float(line.rsplit(" ", 1)[1])
    return -1.0


def scrape_rounds(urls: dict[str, str], scrapes: int) -> dict[str, dict[str, Any]]:
    walls: dict[str, list[float]] = {name: [] for name in urls}
    seen: dict[str, float] = {}
    for round_ in range(scrapes + 1):  # round 0 warms up and is not counted
        for name, url in urls.items():
            started = time.perf_counter()
            with urllib.request.urlopen(url, timeout=300) as response:
                body = response.read().decode()
            wall = time.perf_counter() - started
            if round_:
                walls[name].append(wall)
            seen[name] = _close_wait_in(body)
    return {name: {"wall_s": walls[name], "close_wait_reported": seen[name]} for name in urls}


def churn(rounds: int, seconds: float, quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-goals-") as tmp:
        out = os.path.join(tmp, "recorder.json")
        argv = [sys.executable, str(HERE / "bench_recorder.py"), "--out", out]
        argv += ["--quick"] if quick else ["--rounds", str(rounds), "--seconds", str(seconds), "--compare-rounds", "6"]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=3600)
        with open(out) as handle:
            result: dict[str, Any] = json.load(handle)
    return result


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def render(result: dict[str, Any]) -> str:
    machine = result["machine"]
    scans = {row["name"]: row for row in result["commands"]}
    ss = statistics.median(scans["ss -tan state close-wait"]["wall_s"])
    lines = [
        START_MARK,
        "## Issue 12's speed goals, one run (`bench/bench_events_goals.py`)",
        "",
        f"Run {result['date']} on {machine['cpu']}, {machine['nproc']} CPUs, {machine['memory']} of memory, "
        f"Linux {machine['kernel']}, Python {machine['python']}, commit {result['commit']}. "
        f"Fixture: {result['fixture']}. Load average at the start of each phase: "
        + ", ".join(f"{phase} {load}" for phase, load in result["loadavg"].items())
        + ". Raw figures: `bench/results/events_goals.json`.",
        "",
        "| goal | measured | ratio | target | met |",
        "|---|---|---:|---:|---|",
    ]
    for name in ("closewait scan --json", "closewait scan --json --no-owners"):
        row = scans[name]
        wall = statistics.median(row["wall_s"])
        target = 1.5 if name == "closewait scan --json" else 2.0
        lines.append(
            f"| `{name}` vs `ss -tan state close-wait` (whole command, median of {len(row['wall_s'])}) | "
            f"{_ms(wall)} ms vs {_ms(ss)} ms (CPU {_ms(statistics.median(row['cpu_s']))} ms) | "
            f"{wall / ss:.2f}x | {target}x | {'yes' if wall / ss <= target else 'no'} |"
        )
    scrapes = result["scrapes"]
    node = statistics.median(scrapes["node_exporter tcpstat"]["wall_s"])
    for name in ("closewait exporter --recorder on", "closewait exporter --recorder off"):
        wall = statistics.median(scrapes[name]["wall_s"])
        lines.append(
            f"| one scrape of `{name} --min-interval 0` vs node_exporter tcpstat "
            f"(median of {len(scrapes[name]['wall_s'])}) | {_ms(wall)} ms vs {_ms(node)} ms | "
            f"{wall / node:.2f}x | 0.25x | {'yes' if wall / node <= 0.25 else 'no'} |"
        )
    rec = result["recorder"]
    tp = rec["throughput"]
    cost = rec["program_cost"]
    loss = 1 - tp["median_ratio"]
    lines.append(
        f"| recorder on a loopback churn: throughput with/without, median of {len(tp['ratios'])} interleaved "
        f"rounds | {tp['median_on']:.0f} vs {tp['median_off']:.0f} connections/s (per-round ratio median "
        f"{tp['median_ratio']:.3f}, spread {min(tp['ratios']):.3f}..{max(tp['ratios']):.3f}; the program "
        f"{cost['recorder_us_per_connection']:.2f} µs per connection by the kernel's run statistics, "
        f"{cost['share_of_cpu'] * 100:.1f}% of the churn's CPU) | throughput {-loss * 100:+.1f}% | at most -2% | "
        f"{'yes' if loss <= 0.02 else 'no'} |"
    )
    lines.append("")
    lines.append(
        "Every tool's count of the fixture's CLOSE_WAIT sockets was checked against `ss` in the "
        "warm-up round: " + ", ".join(f"{row['name']} {row['counted']}" for row in result["commands"]) + "."
    )
    lines.append(END_MARK)
    return "\n".join(lines) + "\n"


def write_doc(section: str) -> None:
    text = DOC.read_text()
    if START_MARK in text and END_MARK in text:
        before = text.split(START_MARK, 1)[0]
        after = text.split(END_MARK, 1)[1].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--established", type=int, default=100_000, help="established pairs (2 sockets each)")
    parser.add_argument("--close-wait", type=int, default=5_000)
    parser.add_argument("--runs", type=int, default=9, help="timed rounds of the commands")
    parser.add_argument("--scrapes", type=int, default=9, help="timed scrapes of each exporter")
    parser.add_argument("--churn-rounds", type=int, default=20)
    parser.add_argument("--churn-seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="2,000 pairs, 200 CLOSE_WAIT, 3 runs, quick churn")
    parser.add_argument("--no-doc", action="store_true", help="do not write the results or docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.established, args.close_wait, args.runs, args.scrapes = 2_000, 200, 3, 3
    if os.geteuid() != 0:
        print("bench_events_goals: needs root (the recorder and the BPF owner lookup)", file=sys.stderr)
        return 2
    scan_fixture.install_signal_handlers()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "machine": bench_scan.machine(),
        "loadavg": {"start": loadavg()},
    }
    procs = 380
    fds = 2 * args.established + args.close_wait + 5_000
    with scan_fixture.running(args.established, args.close_wait, procs=procs, fds=fds) as fixture:
        result["fixture"] = (
            f"{2 * args.established:,} established sockets ({args.established:,} pairs), "
            f"{args.close_wait:,} CLOSE_WAIT, ~{procs} processes, ~{fds:,} descriptors"
        )
        ports = set(fixture.listen_ports)
        tools = [
            bench_scan.Tool("ss -tan state close-wait", ["ss", "-tan", "state", "close-wait"], "ss"),
            bench_scan.Tool("closewait scan --json", [CLOSEWAIT, "scan", "--json"], "closewait"),
            bench_scan.Tool(
                "closewait scan --json --no-owners", [CLOSEWAIT, "scan", "--json", "--no-owners"], "closewait"
            ),
        ]
        result["loadavg"]["commands"] = loadavg()
        print("timing the commands", file=sys.stderr)
        measured = bench_scan.measure(tools, args.runs, ports)
        result["commands"] = [
            {"name": r.name, "wall_s": r.wall_s, "cpu_s": r.cpu_s, "counted": r.counted, "reference": r.reference}
            for r in measured
        ]
        result["loadavg"]["scrapes"] = loadavg()
        print("scraping the exporters", file=sys.stderr)
        with exporters() as urls:
            result["scrapes"] = scrape_rounds(urls, args.scrapes)
    result["loadavg"]["churn"] = loadavg()
    print("churn benchmark (recorder off/on)", file=sys.stderr)
    result["recorder"] = churn(args.churn_rounds, args.churn_seconds, args.quick)
    section = render(result)
    print(section)
    if not args.no_doc:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        write_doc(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
