"""Time ``closewait scan --wide --state teardown`` on 20,000 CLOSE_WAIT sockets, before and after.

The table view used to lay out its socket table through rich, which measures every cell (~0.65 ms
a row) and prints nothing until the whole table is done: 19,000 rows took 14-27 s. The target is
20,000 rows in under 2 s, with the table still aligned.

Fixture: ``bench/scan_fixture.py`` with no established pairs and ``--close-wait`` sockets (three
kinds, so three diagnoses appear), split over worker processes (RLIMIT_NOFILE's hard limit is
20,000 a process) and ended by pid. Each CLOSE_WAIT socket's peer (the closed client) is an
orphaned FIN_WAIT2 socket, also a teardown state, until ``net.ipv4.tcp_fin_timeout`` (60 s) ends
it: the benchmark waits for those to go, so the table has the CLOSE_WAIT rows and nothing that
changes during the runs.

"Before" is closewait at ``--before`` (default: the commit before the new renderer) checked out
into a temporary git worktree that is removed afterwards; "after" is this checkout. Both run the
same way: this interpreter, ``PYTHONPATH`` at the ``src/`` directory, byte code compiled first,
stdout a pipe read to the end (COLUMNS=200, what a pipe gets). Each run records the time to the
first byte of output and to the end, and the number of the fixture's rows; the after runs also
check that every row of the big table has the header's width (aligned).

    python bench/bench_scan_wide.py                   # 20,000 CLOSE_WAIT, 2 runs before, 5 after
    python bench/bench_scan_wide.py --close-wait 2000 --runs 3 --no-doc
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scan_fixture  # the sibling module, found through the path above

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks-scan-wide.md"
#: The last commit with rich's table for every socket table (the base of this branch).
DEFAULT_BEFORE = "ed2cc0b"
COMMAND = ["scan", "--wide", "--state", "teardown"]
ENTRY = "import sys;from closewait.cli import main;sys.argv[0]='closewait';main()"
RUN_TIMEOUT_S = 300.0
TARGET_S = 2.0


@dataclass
class Runs:
    name: str
    src: Path
    first_byte_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    aligned: list[bool] = field(default_factory=list)


def run_once(src: Path, ports: set[int]) -> tuple[float, float, float, int, bool]:
    """(seconds to the first byte, seconds to the end, CPU seconds (user + system), the fixture's
    rows, every table aligned)."""
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "200", "LC_ALL": "C.UTF-8"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", ENTRY, *COMMAND], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    first_byte = time.perf_counter() - started
    rest = proc.stdout.read()
    proc.wait(timeout=RUN_TIMEOUT_S)
    total = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime - usage_before.ru_utime + usage.ru_stime - usage_before.ru_stime
    proc.stdout.close()
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"closewait {' '.join(COMMAND)} exited {proc.returncode}")
    text = (first + rest).decode()
    rows, aligned = _fixture_rows(text, ports)
    return first_byte, total, cpu, rows, aligned


def _fixture_rows(text: str, ports: set[int]) -> tuple[int, bool]:
    """Rows whose LOCAL is a fixture listener, and whether each table's lines have its header's width."""
    suffixes = tuple(f":{port}" for port in ports)
    rows = 0
    aligned = True
    width: int | None = None
    for line in text.splitlines():
        cells = line.split()
        if line.startswith("  ") and cells[:2] in (["LOCAL", "REMOTE"], ["STATE", "LOCAL"]):
            width = len(line)
            continue
        if width is not None and line.startswith("  ") and len(cells) >= 6:
            aligned = aligned and len(line) == width
            local = cells[1] if cells[0].isalpha() or "-" in cells[0] else cells[0]
            rows += local.endswith(suffixes)
        else:
            width = None
    return rows, aligned


def wait_orphans_gone(ports: set[int], timeout_s: float) -> int:
    """Wait until no FIN_WAIT2 socket has a fixture listener as its peer; returns how many remain."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(["ss", "-Htan", "state", "fin-wait-2"], capture_output=True, text=True, check=True).stdout
        left = sum(1 for line in out.splitlines() if line.split() and int(line.split()[-1].rsplit(":", 1)[1]) in ports)
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(2)


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """``rev``'s ``src/`` in a temporary git worktree, removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="closewait-bench-before-"))
    tree = tmp / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
    try:
        yield tree / "src"
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def _loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def _first(path: str, key: str) -> str:
    with contextlib.suppress(OSError), open(path) as handle:
        for line in handle:
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return "?"


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def render_doc(runs: list[Runs], info: dict[str, str]) -> str:
    lines = [
        "# Benchmark: `closewait scan --wide --state teardown` with thousands of rows",
        "",
        "Generated by `bench/bench_scan_wide.py` (do not edit by hand; rerun the script). Each run is the",
        "whole command as a subprocess (interpreter start-up and imports included) with stdout a pipe read",
        "to the end (COLUMNS=200). Fixture: `bench/scan_fixture.py` with only CLOSE_WAIT sockets (three",
        "kinds: eof-not-closed, not-reading, unread-data) held by worker processes; the benchmark waits for",
        "their orphaned FIN_WAIT2 peers to expire (`tcp_fin_timeout`) so every run sees the same table.",
        "`CPU` is the command's user + system time, which the load from other jobs on the machine does not",
        "inflate the way it does wall time. `rows` is the fixture's rows in the output; `aligned` says every",
        "row of each table has its header line's width (a few fewer rows than the fixture made means some of its",
        "connections did not survive set-up; both versions print the same sockets). Target: under 2 s with the",
        "table aligned.",
        "",
        f"## {info['close_wait']} CLOSE_WAIT ({info['date']})",
        "",
        f"Machine: {info['cpu']}, {info['nproc']} CPUs, {info['memory']}; kernel {info['kernel']}; "
        f"Python {info['python']}.",
        f"Fixture: {info['fixture']}. Load average before/after: {info['load_before']} / {info['load_after']} "
        "(the machine is shared with other sessions' test runs).",
        "",
        "| closewait | runs | first byte (median) | total (median) | best | worst | CPU (median) | rows | aligned |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.name} | {len(r.total_s)} | {_fmt(statistics.median(r.first_byte_s))} | "
            f"{_fmt(statistics.median(r.total_s))} | {_fmt(min(r.total_s))} | {_fmt(max(r.total_s))} | "
            f"{_fmt(statistics.median(r.cpu_s))} | "
            f"{max(r.rows):,} | {'yes' if all(r.aligned) else 'NO'} |"
        )
    lines += [
        "",
        "What changed: the socket table is no longer a rich `Table`. The renderer computes each column's",
        "width once (the cells are ASCII: addresses, numbers, state and diagnosis names), pads every cell",
        "with `str.ljust`/`rjust` and writes the rows as plain lines, 1,000 rows per console write, so output",
        "starts before a long table is formatted to its end. The layout is the one rich printed (two",
        "spaces of indent, two between columns, numbers right-aligned, header dim). A table wider than the",
        "terminal with at most 200 rows still goes through rich, which folds ROLE and DIAGNOSIS; a wider",
        "and longer one is printed as whole lines that the terminal wraps (nothing is cut).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--close-wait", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5, help="runs of this checkout")
    parser.add_argument("--runs-before", type=int, default=2, help="runs of --before (each may take 20 s)")
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="git revision timed as 'before'")
    parser.add_argument("--no-doc", action="store_true", help=f"do not write {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.runs_before < 0 or args.close_wait < 1:
        parser.error("need --runs >= 1, --runs-before >= 0 and --close-wait >= 1")
    fin_timeout = int(Path("/proc/sys/net/ipv4/tcp_fin_timeout").read_text())
    scan_fixture.install_signal_handlers()
    load_before = _loadavg()
    with contextlib.ExitStack() as stack:
        before_src = stack.enter_context(checkout(args.before)) if args.runs_before else None
        after = Runs("after (this checkout)", ROOT / "src")
        before = Runs(f"before ({args.before})", before_src) if before_src else None
        for runs in (after, before):
            if runs is not None:
                compileall.compile_dir(str(runs.src), quiet=1)
        try:
            fixture = stack.enter_context(scan_fixture.running(0, args.close_wait, procs=0, fds=0))
        except KeyboardInterrupt:
            return 130
        ports = set(fixture.listen_ports)
        print(f"waiting up to {fin_timeout + 30} s for the clients' orphaned FIN_WAIT2 to expire", file=sys.stderr)
        left = wait_orphans_gone(ports, fin_timeout + 30)
        if left:
            print(f"warning: {left} orphaned FIN_WAIT2 peers still there", file=sys.stderr)
        run_once(after.src, ports)  # warm-up: dentries of every /proc/PID/fd, page cache
        # Interleaved: a burst of load from elsewhere hits both alike.
        schedule = _interleave(after, args.runs, before, args.runs_before)
        for runs in schedule:
            first_byte, total, cpu, rows, aligned = run_once(runs.src, ports)
            runs.first_byte_s.append(first_byte)
            runs.total_s.append(total)
            runs.cpu_s.append(cpu)
            runs.rows.append(rows)
            runs.aligned.append(aligned)
            print(
                f"{runs.name}: first byte {_fmt(first_byte)}, total {_fmt(total)}, CPU {_fmt(cpu)}, {rows} rows",
                file=sys.stderr,
            )
        description = fixture.describe()
    load_after = _loadavg()
    results = [r for r in (before, after) if r is not None]
    info = {
        "close_wait": f"{args.close_wait:,}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": _first("/proc/cpuinfo", "model name"),
        "nproc": str(os.cpu_count()),
        "memory": _first("/proc/meminfo", "MemTotal").replace(" kB", " kB RAM"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fixture": description,
        "load_before": load_before,
        "load_after": load_after,
    }
    doc = render_doc(results, info)
    print(doc)
    if not args.no_doc:
        DOC.write_text(doc + "\n")
    met = statistics.median(after.total_s) < TARGET_S and all(after.aligned)
    return 0 if met else 1


def _interleave(after: Runs, n_after: int, before: Runs | None, n_before: int) -> list[Runs]:
    schedule: list[Runs] = []
    for i in range(max(n_after, n_before)):
        if before is not None and i < n_before:
            schedule.append(before)
        if i < n_after:
            schedule.append(after)
    return schedule


if __name__ == "__main__":
    sys.exit(main())
