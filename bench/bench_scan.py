"""Time ``closewait scan`` against ss, netstat, lsof and psutil on one big loopback fixture.

Every tool is run as a whole command (a subprocess, interpreter start-up and imports included,
output written to a file), round-robin so that a burst of load from elsewhere hits all tools
alike, after one discarded warm-up run each (the first walk of /proc/PID/fd instantiates the
kernel's dentries for every descriptor; later walks of any tool find them cached). For each tool
it records the median and best wall time, the median CPU time (user + system) and the peak RSS
(``ru_maxrss`` from ``os.wait4``), and counts the fixture's CLOSE_WAIT sockets in the tool's
output (sockets whose local port is one of the fixture's listening ports), which must equal what
``ss -tan`` counts right before (``--close-wait``, unless something else on the host destroyed one
of them meanwhile): a fast tool that misses sockets is not faster.

Results go to ``bench/results/scan_E<pairs>_C<close_wait>.json``; ``docs/benchmarks-scan.md`` is
regenerated from every results file there, so a full-scale and a small run each keep their row.

    python bench/bench_scan.py --quick                 # 2,000 pairs, 200 CLOSE_WAIT, 3 runs
    python bench/bench_scan.py --established 10000 --close-wait 1000
    python bench/bench_scan.py                         # 100,000 pairs (200,000 sockets), 5,000 CLOSE_WAIT
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scan_fixture  # the sibling module, found through the path above

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks-scan.md"
#: Hand-written analysis appended to the generated tables.
NOTES = ROOT / "bench" / "scan_notes.md"
VENV_BIN = ROOT / ".venv" / "bin"
#: No tool may run longer than this (netstat -tanp at full scale takes ~25 s).
TOOL_TIMEOUT_S = 180.0
GNU_TIME = "/usr/bin/time"

PSUTIL_ONE_LINER = (
    "import psutil,sys;p=set(map(int,sys.argv[1:]));"
    "c=[x for x in psutil.net_connections('tcp') if x.status=='CLOSE_WAIT'];"
    "print(len(c),sum(1 for x in c if x.laddr.port in p))"
)


@dataclass
class Tool:
    """One command to time, and how to count the fixture's CLOSE_WAIT sockets in its output."""

    name: str
    argv: list[str]
    counter: str  # which parser in COUNTERS
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    name: str
    command: str
    wall_s: list[float]
    cpu_s: list[float]
    max_rss_kib: int
    counted: int
    exit_codes: list[int]
    #: The fixture's CLOSE_WAIT sockets as ``ss -tan`` counted them right before this tool's
    #: counted run: other programs on the host may destroy one (``ss -K``, a reaper test).
    reference: int = -1

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall_s)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu_s)


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def count_closewait(text: str, ports: set[int]) -> int:
    data = json.loads(text)
    return sum(1 for s in data["sockets"] if s["state"] == "CLOSE_WAIT" and s["local"]["port"] in ports)


def count_ss(text: str, ports: set[int]) -> int:
    # With "state close-wait" ss prints no State column: Recv-Q Send-Q Local:Port Peer:Port [Process]
    n = 0
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 4 and _port(fields[2]) in ports:
            n += 1
    return n


def count_netstat(text: str, ports: set[int]) -> int:
    n = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[0].startswith("tcp") and fields[5] == "CLOSE_WAIT" and _port(fields[3]) in ports:
            n += 1
    return n


_LSOF_NAME = re.compile(r"(\S+):(\d+)->(\S+):(\d+) \(CLOSE_WAIT\)")


def count_lsof(text: str, ports: set[int]) -> int:
    # lsof prints one line per (process, fd); a socket shared by two processes would appear twice.
    seen = {m.group(0) for m in _LSOF_NAME.finditer(text) if int(m.group(2)) in ports}
    return len(seen)


def count_psutil(text: str, ports: set[int]) -> int:
    return int(text.split()[1])


COUNTERS = {
    "closewait": count_closewait,
    "ss": count_ss,
    "netstat": count_netstat,
    "lsof": count_lsof,
    "psutil": count_psutil,
}


def tools(ports: list[int], baseline_src: str | None) -> list[Tool]:
    closewait = str(VENV_BIN / "closewait")
    python = str(VENV_BIN / "python")
    found = [
        Tool("closewait scan --json", [closewait, "scan", "--json"], "closewait"),
        Tool(
            "closewait scan --json --owners-from procfs",
            [closewait, "scan", "--json", "--owners-from", "procfs"],
            "closewait",
        ),
        Tool("closewait scan --json --no-owners", [closewait, "scan", "--json", "--no-owners"], "closewait"),
        Tool("ss -tan state close-wait", ["ss", "-tan", "state", "close-wait"], "ss"),
        Tool("ss -tanp state close-wait", ["ss", "-tanp", "state", "close-wait"], "ss"),
        Tool("netstat -tanp", ["netstat", "-tanp"], "netstat"),
        Tool("lsof -n -P -iTCP -sTCP:CLOSE_WAIT", ["lsof", "-n", "-P", "-iTCP", "-sTCP:CLOSE_WAIT"], "lsof"),
        Tool(
            "psutil.net_connections('tcp')",
            [python, "-c", PSUTIL_ONE_LINER, *map(str, ports)],
            "psutil",
        ),
    ]
    if baseline_src:
        # What the console script runs: closewait._console.main (the scan --json fast path), or
        # closewait.cli.main for a closewait older than the fast path.
        entry = (
            "import sys\ntry:\n from closewait._console import main\nexcept ImportError:\n"
            " from closewait.cli import main\nsys.argv[0]='closewait';main()"
        )
        env = {"PYTHONPATH": baseline_src}
        found[3:3] = [
            Tool("closewait scan --json (before)", [python, "-c", entry, "scan", "--json"], "closewait", env),
            Tool(
                "closewait scan --json --no-owners (before)",
                [python, "-c", entry, "scan", "--json", "--no-owners"],
                "closewait",
                env,
            ),
        ]
    return found


def run_once(tool: Tool, out_path: str) -> tuple[float, float, int]:
    """(wall s, cpu s, exit code) of one run, its stdout written to ``out_path``."""
    env = {**os.environ, "LC_ALL": "C", **tool.env}
    with open(out_path, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(tool.argv, stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
        deadline = started + TOOL_TIMEOUT_S
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.kill(proc.pid, 9)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.0005)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def reference_count(ports: set[int], out_path: str) -> int:
    """The fixture's CLOSE_WAIT sockets right now, by ``ss -tan`` (no /proc walk, so it is quick)."""
    with open(out_path, "wb") as out:
        subprocess.run(["ss", "-tan", "state", "close-wait"], stdout=out, timeout=TOOL_TIMEOUT_S, check=True)
    with open(out_path, encoding="utf-8") as handle:
        return count_ss(handle.read(), ports)


def measure(tool_list: list[Tool], runs: int, ports: set[int], log: bool = True) -> list[Result]:
    results = {t.name: Result(t.name, " ".join(t.argv[:6]), [], [], 0, -1, []) for t in tool_list}
    with tempfile.TemporaryDirectory(prefix="bench-scan-") as tmp:
        for round_ in range(runs + 1):  # round 0 warms the dentry cache and is not counted
            for tool in tool_list:
                out_path = os.path.join(tmp, "out")
                wall, cpu, code = run_once(tool, out_path)
                res = results[tool.name]
                if round_ == 0:
                    res.reference = reference_count(ports, os.path.join(tmp, "ref"))
                    with open(out_path, encoding="utf-8", errors="replace") as handle:
                        res.counted = COUNTERS[tool.counter](handle.read(), ports)
                    if log:
                        print(
                            f"  warm-up {tool.name}: {wall:.3f} s, counted {res.counted} (ss: {res.reference})",
                            file=sys.stderr,
                        )
                    continue
                res.wall_s.append(wall)
                res.cpu_s.append(cpu)
                res.exit_codes.append(code)
            if log and round_:
                print(f"  round {round_}/{runs} done", file=sys.stderr)
        # Peak RSS in a separate round under GNU time: ru_maxrss of a child forked straight from
        # this Python process would include this process's own RSS, copied at fork before exec.
        for tool in tool_list:
            results[tool.name].max_rss_kib = peak_rss_kib(tool, os.path.join(tmp, "out"), os.path.join(tmp, "rss"))
    return list(results.values())


def peak_rss_kib(tool: Tool, out_path: str, rss_path: str) -> int:
    """Peak RSS of one run of ``tool`` as GNU time reports it (its child is forked from a small process)."""
    env = {**os.environ, "LC_ALL": "C", **tool.env}
    with open(out_path, "wb") as out:
        subprocess.run(
            [GNU_TIME, "-f", "%M", "-o", rss_path, *tool.argv],
            stdout=out,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=env,
            timeout=TOOL_TIMEOUT_S,
            check=False,
        )
    with open(rss_path) as handle:
        return int(handle.read().split()[-1])


def machine() -> dict[str, str]:
    def first(path: str, key: str) -> str:
        with contextlib.suppress(OSError), open(path) as handle:
            for line in handle:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        return "?"

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "?"
        return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else "?"

    psutil_version = version([str(VENV_BIN / "python"), "-c", "import psutil;print(psutil.__version__)"])
    lsof_revision = next(
        (line.split(":", 1)[1].strip() for line in version_lines(["lsof", "-v"]) if "revision" in line), "?"
    )
    return {
        "cpu": first("/proc/cpuinfo", "model name"),
        "nproc": str(os.cpu_count()),
        "memory": first("/proc/meminfo", "MemTotal"),
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
        "ss": version(["ss", "-V"]),
        "netstat": version(["netstat", "--version"]),
        "lsof": lsof_revision,
        "psutil": psutil_version,
    }


def version_lines(argv: list[str]) -> list[str]:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return []
    return (out.stdout + out.stderr).splitlines()


def _os_release() -> str:
    with contextlib.suppress(OSError), open("/etc/os-release") as handle:
        for line in handle:
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return "?"


def evaluate(results: list[Result]) -> list[tuple[str, float, float, bool]]:
    """The project's targets as (what, measured ratio or MB, limit, met)."""
    by = {r.name: r for r in results}
    checks: list[tuple[str, float, float, bool]] = []
    owners = by.get("closewait scan --json")
    no_owners = by.get("closewait scan --json --no-owners")
    ssp = by.get("ss -tanp state close-wait")
    ss = by.get("ss -tan state close-wait")
    ps = by.get("psutil.net_connections('tcp')")
    if owners and ssp:
        ratio = owners.median_wall / ssp.median_wall
        checks.append(("scan --json time / ss -tanp time", ratio, 0.5, ratio <= 0.5))
    if owners and ps:
        ratio = owners.median_wall / ps.median_wall
        checks.append(("scan --json time / psutil time", ratio, 0.1, ratio <= 0.1))
    if owners:
        mb = owners.max_rss_kib / 1024
        checks.append(("scan --json peak RSS (MB)", mb, 64.0, mb < 64.0))
    if no_owners and ss:
        ratio = no_owners.median_wall / ss.median_wall
        checks.append(("scan --json --no-owners time / ss -tan time", ratio, 2.0, ratio <= 2.0))
    return checks


def render_doc(result_files: list[Path]) -> str:
    runs = []
    for path in result_files:
        with open(path) as handle:
            runs.append(json.load(handle))
    runs.sort(key=lambda r: -r["established_pairs"])
    lines = [
        "# Benchmark: `closewait scan` against ss, netstat, lsof and psutil",
        "",
        "Generated by `bench/bench_scan.py` (do not edit by hand; rerun the script). Each row is a whole",
        "command run as a subprocess (interpreter start-up and imports included, stdout to a file) on the",
        "fixture of `bench/scan_fixture.py`: E established loopback connection pairs (2E sockets) and C",
        "sockets in CLOSE_WAIT held by worker processes, plus idle filler processes so the host has about",
        "380 processes and about 2E + C + 5,000 open descriptors, like the reference host the project's",
        "targets were set on.",
        "Tools run round-robin after one discarded warm-up round; wall times are the median and the best",
        "of the counted runs,",
        "CPU is user + system time of the command, RSS is its peak (`ru_maxrss`). `counted` is how many",
        "of the fixture's CLOSE_WAIT sockets the tool reported (must equal what `ss -tan` counted just",
        "before it: C, unless another program on the host destroyed one meanwhile).",
        "",
    ]
    for run in runs:
        m = run["machine"]
        lines += [
            f"## {2 * run['established_pairs']:,} established + {run['close_wait']:,} CLOSE_WAIT "
            f"({run['runs']} runs, {run['date']})",
            "",
            f"Host during the run: {run['host']['processes']} processes, {run['host']['fds']:,} open descriptors; "
            f"fixture: {run['fixture']}.",
            f"Load average before/after: {run['load_before']} / {run['load_after']}.",
            "",
            "| command | median wall | best wall | median CPU | peak RSS | counted |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in run["results"]:
            walls = r["wall_s"]
            cpus = r["cpu_s"]
            if "reference" in r:
                ok = "" if r["counted"] == r["reference"] else f" (MISMATCH: ss saw {r['reference']})"
            else:  # results written before the per-tool ss reference existed
                ok = "" if r["counted"] == run["close_wait"] else " (not C: see the notes below)"
            lines.append(
                f"| `{r['name']}` | {_fmt_s(statistics.median(walls))} | {_fmt_s(min(walls))} | "
                f"{_fmt_s(statistics.median(cpus))} | {r['max_rss_kib'] / 1024:.1f} MB | {r['counted']:,}{ok} |"
            )
        scale = "" if run["established_pairs"] >= 100_000 else " (set for full scale; shown for comparison)"
        lines += ["", f"The project's targets{scale}:", ""]
        for what, value, limit, met in run["targets"]:
            unit = " MB" if "MB" in what else "x"
            lines.append(
                f"- {what}: {value:.2f}{unit} (target {'<' if 'MB' in what else '<='} {limit:g}{unit}): "
                f"**{'met' if met else 'NOT met'}**"
            )
        lines += [
            "",
            f"Machine: {m['cpu']}, {m['nproc']} CPUs, {_gib(m['memory'])} RAM, {m['os']}, kernel {m['kernel']}, "
            f"Python {m['python']}; {m['ss']}, {m['netstat']}, lsof {m['lsof']}, psutil {m['psutil']}.",
            "",
        ]
    if NOTES.exists():
        lines += ["", NOTES.read_text().rstrip("\n")]
    return "\n".join(lines)


def _gib(meminfo: str) -> str:
    """'24683656 kB' -> '23.5 GiB'."""
    try:
        return f"{int(meminfo.split(maxsplit=1)[0]) / 1024 / 1024:.1f} GiB"
    except (ValueError, IndexError):
        return meminfo


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--established", type=int, default=100_000, help="established pairs (2 sockets each)")
    parser.add_argument("--close-wait", type=int, default=5_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2,000 pairs, 200 CLOSE_WAIT, 3 runs")
    parser.add_argument("--procs", type=int, default=380, help="processes on the host (fillers top it up)")
    parser.add_argument("--fds", type=int, default=None, help="descriptors on the host (default 2E + C + 5,000)")
    parser.add_argument("--skip", action="append", default=[], help="skip tools whose name contains this")
    parser.add_argument("--baseline-src", help="a src/ directory of an older closewait, timed as '(before)' rows")
    parser.add_argument("--no-doc", action="store_true", help="do not write results or docs/benchmarks-scan.md")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the doc from bench/results/")
    args = parser.parse_args(argv)
    if args.render_only:
        DOC.write_text(render_doc(sorted(RESULTS_DIR.glob("scan_E*_C*.json"))) + "\n")
        return 0
    if args.quick:
        args.established, args.close_wait, args.runs = 2_000, 200, 3
    if args.runs < 1 or args.established < 0 or args.close_wait < 1:
        parser.error("need --runs >= 1, --established >= 0 and --close-wait >= 1")
    for tool in ("ss", "netstat", "lsof", GNU_TIME):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    fds = args.fds if args.fds is not None else 2 * args.established + args.close_wait + 5_000
    # An installed package runs from bytecode compiled at install time; a checkout run with
    # PYTHONDONTWRITEBYTECODE set would compile every module on every run (10-25 ms). Compile once.
    compileall.compile_dir(str(ROOT / "src"), quiet=1)
    if args.baseline_src:
        compileall.compile_dir(args.baseline_src, quiet=1)
    scan_fixture.install_signal_handlers()
    load_before = _loadavg()
    try:
        with scan_fixture.running(args.established, args.close_wait, procs=args.procs, fds=fds) as fixture:
            ports = set(fixture.listen_ports)
            tool_list = [t for t in tools(sorted(ports), args.baseline_src) if not any(s in t.name for s in args.skip)]
            host = scan_fixture.host_counts()
            results = measure(tool_list, args.runs, ports)
            description = fixture.describe()
    except KeyboardInterrupt:
        print("interrupted; fixture torn down", file=sys.stderr)
        return 130
    load_after = _loadavg()
    targets = evaluate(results)
    print(f"\n{description}\nload average before/after: {load_before} / {load_after}\n")
    print(f"{'command':46} {'median':>9} {'best':>9} {'cpu':>9} {'rss MB':>7} counted")
    for r in results:
        flag = "" if r.counted == r.reference else f"  MISMATCH (ss saw {r.reference})"
        print(
            f"{r.name:46} {_fmt_s(r.median_wall):>9} {_fmt_s(min(r.wall_s)):>9} {_fmt_s(r.median_cpu):>9} "
            f"{r.max_rss_kib / 1024:7.1f} {r.counted}{flag}"
        )
    print()
    for what, value, limit, met in targets:
        print(f"{what}: {value:.2f} (limit {limit:g}) {'met' if met else 'NOT met'}")
    if not args.no_doc:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        record = {
            "established_pairs": args.established,
            "close_wait": args.close_wait,
            "runs": args.runs,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "fixture": description,
            "host": {"processes": host.processes, "fds": host.fds},
            "load_before": load_before,
            "load_after": load_after,
            "machine": machine(),
            "results": [asdict(r) for r in results],
            "targets": targets,
        }
        path = RESULTS_DIR / f"scan_E{args.established}_C{args.close_wait}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        DOC.write_text(render_doc(sorted(RESULTS_DIR.glob("scan_E*_C*.json"))) + "\n")
        print(f"wrote {path.relative_to(ROOT)} and {DOC.relative_to(ROOT)}", file=sys.stderr)
    bad = [r.name for r in results if r.counted != r.reference]
    if bad:
        print(f"count mismatch for: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
