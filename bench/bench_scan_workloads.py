"""What naming workloads costs a whole ``closewait scan --json``: with attribution (the default),
with ``--no-workloads``, and, with ``--baseline-src``, the code from before workloads existed.

The fixture is ``bench/scan_fixture.py``'s (E established loopback pairs, C sockets in CLOSE_WAIT held
by worker processes, idle fillers up to ~380 processes). With ``--place`` (root, a writable cgroup v2
hierarchy), each worker is first moved into a podman-style container cgroup of its own
(``machine.slice/libpod-<id>.scope``, made under this process's own cgroup with
``tests/workload/realcg.CgroupTree``), so attribution names containers, not the host; the fillers hold
no CLOSE_WAIT and are never looked up. Workers are moved back and the directories removed at the end.

Each command runs as a whole process (start-up included), round-robin after a discarded warm-up,
through ``bench_scan.measure`` (median and best wall time, median CPU, peak RSS, and the fixture's
CLOSE_WAIT sockets counted in the output). Prints a markdown table; figures for docs/benchmarks.md.

    python bench/bench_scan_workloads.py --established 100000 --close-wait 5000 --runs 7 --place \\
        --baseline-src /tmp/closewait-before-workloads/src
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_scan  # noqa: E402 (the sibling modules, found through the path above)
import scan_fixture  # noqa: E402

#: The target: attribution keeps the scan within this factor of its time without it.
TARGET_RATIO = 1.10


def tools(python_bin: Path, src: Path, baseline_src: str | None) -> list[bench_scan.Tool]:
    closewait = str(python_bin / "closewait")
    env = {"PYTHONPATH": str(src)}
    found = [
        bench_scan.Tool("closewait scan --json", [closewait, "scan", "--json"], "closewait", env),
        bench_scan.Tool(
            "closewait scan --json --no-workloads", [closewait, "scan", "--json", "--no-workloads"], "closewait", env
        ),
        bench_scan.Tool(
            "closewait scan --json --owners-from procfs",
            [closewait, "scan", "--json", "--owners-from", "procfs"],
            "closewait",
            env,
        ),
        bench_scan.Tool(
            "closewait scan --json --owners-from procfs --no-workloads",
            [closewait, "scan", "--json", "--owners-from", "procfs", "--no-workloads"],
            "closewait",
            env,
        ),
    ]
    if baseline_src:
        entry = "import sys;from closewait._console import main;sys.argv[0]='closewait';main()"
        python = str(python_bin / "python")
        before = {"PYTHONPATH": baseline_src}
        found.append(
            bench_scan.Tool(
                "closewait scan --json (before workloads)", [python, "-c", entry, "scan", "--json"], "closewait", before
            )
        )
    return found


@contextlib.contextmanager
def placed_in_containers(pids: list[int]) -> Iterator[str]:
    """Each pid in a podman-style container cgroup of its own; a description of what was done."""
    from tests.workload.realcg import CgroupTree, hierarchies, usable

    unified = hierarchies().get("unified")
    if unified is None or not usable(unified):
        raise SystemExit("--place needs root and a writable cgroup v2 hierarchy")
    ids = [uuid.uuid4().hex + uuid.uuid4().hex for _ in pids]
    with CgroupTree(unified, f"machine.slice/libpod-{ids[0]}.scope") as tree:
        tree.move(pids[0])
        for pid, container_id in zip(pids[1:], ids[1:], strict=True):
            tree.move(pid, tree.sibling(f"machine.slice/libpod-{container_id}.scope"))
        yield f"{len(pids)} workers in podman-style cgroups (cgroup v2, machine.slice/libpod-<id>.scope)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--established", type=int, default=100_000)
    parser.add_argument("--close-wait", type=int, default=5_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--procs", type=int, default=380)
    parser.add_argument("--place", action="store_true", help="move each worker into a container cgroup first")
    parser.add_argument("--baseline-src", help="src/ of closewait before workloads, timed as '(before workloads)'")
    parser.add_argument("--json-out", help="write the results here as JSON")
    parser.add_argument("--skip", action="append", default=[], help="skip tools whose name contains this")
    args = parser.parse_args(argv)
    python_bin = Path(sys.executable).parent
    # As bench_scan does: an installed package runs from bytecode compiled at install time; a tree run
    # with PYTHONDONTWRITEBYTECODE would compile every module on every run. Both trees, the same way.
    for tree in (HERE.parent / "src", *([Path(args.baseline_src)] if args.baseline_src else [])):
        compileall.compile_dir(str(tree), quiet=1)
    scan_fixture.install_signal_handlers()
    fds = 2 * args.established + args.close_wait + 5_000
    load_before = bench_scan._loadavg()
    started = time.time()
    try:
        with scan_fixture.running(args.established, args.close_wait, procs=args.procs, fds=fds) as fixture:
            ports = set(fixture.listen_ports)
            workers = [proc.pid for proc in fixture.workers]
            with (
                placed_in_containers(workers) if args.place else contextlib.nullcontext("workers on the host") as where
            ):
                every = tools(python_bin, HERE.parent / "src", args.baseline_src)
                tool_list = [t for t in every if not any(skip in t.name for skip in args.skip)]
                host = scan_fixture.host_counts()
                results = bench_scan.measure(tool_list, args.runs, ports)
                description = f"{fixture.describe()}; {where}"
    except KeyboardInterrupt:
        print("interrupted; fixture torn down", file=sys.stderr)
        return 130
    load_after = bench_scan._loadavg()
    by = {r.name: r for r in results}
    print(f"\n{description}\nhost: {host.processes} processes, {host.fds:,} fds")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    print(f"load average before/after: {load_before} / {load_after}; {when}\n")
    print("| command | median wall | best wall | median CPU | peak RSS | counted |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        flag = "" if r.counted == r.reference else f" (MISMATCH: ss saw {r.reference})"
        print(
            f"| `{r.name}` | {bench_scan._fmt_s(r.median_wall)} | {bench_scan._fmt_s(min(r.wall_s))} | "
            f"{bench_scan._fmt_s(r.median_cpu)} | {r.max_rss_kib / 1024:.1f} MB | {r.counted:,}{flag} |"
        )
    print()
    for with_, without in (
        ("closewait scan --json", "closewait scan --json --no-workloads"),
        ("closewait scan --json --owners-from procfs", "closewait scan --json --owners-from procfs --no-workloads"),
        ("closewait scan --json", "closewait scan --json (before workloads)"),
    ):
        if with_ in by and without in by:
            wall = by[with_].median_wall / by[without].median_wall
            cpu = by[with_].median_cpu / by[without].median_cpu
            print(
                f"- `{with_}` / `{without}`: wall {wall:.3f}x, CPU {cpu:.3f}x "
                f"(target <= {TARGET_RATIO:g}x: {'met' if wall <= TARGET_RATIO else 'NOT met'})"
            )
    if args.json_out:
        record = {
            "established_pairs": args.established,
            "close_wait": args.close_wait,
            "runs": args.runs,
            "fixture": description,
            "host": {"processes": host.processes, "fds": host.fds},
            "load_before": load_before,
            "load_after": load_after,
            "machine": bench_scan.machine(),
            "results": [asdict(r) for r in results],
            "medians": {r.name: [statistics.median(r.wall_s), statistics.median(r.cpu_s)] for r in results},
        }
        Path(args.json_out).write_text(json.dumps(record, indent=1) + "\n")
    return 0 if all(r.counted == r.reference for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
