"""The CPU of each step of one ``closewait scan --json``, in fresh processes, for several source trees.

``bench_scan.py`` times the whole command; this one says where its main thread's time goes. Each run
is a fresh interpreter that does what ``closewait._console`` does, as far as the tree can (prefetch
started first, the owner cache's re-check forked right after, inspect deferred, no garbage
collection, the console's work while the dump arrives: the socket JSON, the resolver's import), with
``scanning``'s steps wrapped in timers: the main thread's CPU time (``time.thread_time``) of the
imports, ``_dump`` (the parse of the prefetched reply, and what is done while waiting for it),
``_owners`` (workloads named), ``_attribute`` (older trees), ``_ages``, ``_findings`` and the JSON
after the scan, then the wall time at which the scan and the output ended. The output goes to
/dev/null. Trees take turns, run after run; the medians are printed side by side. Measure
against the host's fixture (``bench/scan_fixture.py``), e.g. the tree before a change against this one:

    python bench/bench_scan_steps.py --tree /tmp/before/src --tree src --runs 11
    python bench/bench_scan_steps.py --tree /tmp/before/src --tree src --no-owners
    python bench/bench_scan_steps.py --tree /tmp/before/src --tree src --owner-cache   # cache hits

With ``--owner-cache`` (as root) each run re-checks an owner cache first, as the console does, and
answers from it: a full pass fills it before each tree's turn, so every timed run is a cache hit
(``answered from the cache`` says so, 1.0). The files are in a directory of this run's own, mode 0700
(the cache ignores a file in a directory others may write, such as /tmp), one per tree, so trees
whose cache formats differ do not empty each other's; the directory is removed at the end.

Each tree is imported once untimed first, with bytecode writing allowed: a worktree made with
``PYTHONDONTWRITEBYTECODE`` set has no ``.pyc`` files, and its imports would cost twice main's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ONE_RUN = r"""
import gc, json, os, sys, time
cpu, wall = time.thread_time, time.perf_counter
owners = sys.argv[1] == "owners"
cache_path = sys.argv[2] if len(sys.argv) > 2 else ""
gc.disable()
wall0, cpu0 = wall(), cpu()
from closewait.sources import prefetch
early = prefetch.start((prefetch.TCP_CLOSE_WAIT, prefetch.TCP_LISTEN) if owners else (prefetch.TCP_CLOSE_WAIT,))
owner_cache = None
forked = False
steps = {}
if cache_path:  # the console's order: a tree that can forks the re-check before the imports
    start = cpu()
    from closewait.sources.owner_cache import file_cache
    owner_cache = file_cache(cache_path)
    try:
        from closewait.sources.owner_check import fork_check
    except ImportError:
        pass
    else:
        owner_cache.checking = fork_check(owner_cache)
        forked = True
    steps["check_cache"] = (cpu() - start) * 1000
import closewait._console as console
console._defer_inspect()
from closewait import scanning, serialize
ahead = serialize.SocketJson() if hasattr(serialize, "SocketJson") else None
if ahead is not None and early is not None:
    waiting = getattr(console, "_while_waiting", None)
    early.while_waiting = waiting(ahead, warm_up=owners) if waiting is not None else ahead.add
steps["imports"] = (cpu() - cpu0) * 1000 - steps.get("check_cache", 0.0)
if cache_path and not forked:  # a tree before the fork: the re-check after the imports, in line
    from closewait.sources.owners import check_cache
    start = cpu()
    check_cache(owner_cache)
    steps["check_cache"] = (cpu() - start) * 1000
def timed(name):
    step = getattr(scanning, name)
    def run(*args, **kwargs):
        start = cpu()
        try:
            return step(*args, **kwargs)
        finally:
            steps[name] = steps.get(name, 0.0) + (cpu() - start) * 1000
    setattr(scanning, name, run)
for name in ("_dump", "_owners", "_resolver", "_attribute", "_ages", "_findings"):
    if hasattr(scanning, name):  # _attribute: trees before its work moved into _owners
        timed(name)
kwargs = {"owner_cache": owner_cache} if owner_cache is not None else {}
backend = early if early is not None else "auto"
snapshot = scanning.scan(scanning.CLOSE_WAIT_ONLY, owners=owners, backend=backend, **kwargs)
steps["scan ends at (wall)"] = (wall() - wall0) * 1000
start = cpu()
with open(os.devnull, "w") as out:
    for chunk in serialize.snapshot_json_chunks(snapshot, *([ahead] if ahead is not None else [])):
        out.write(chunk)
steps["json after the scan"] = (cpu() - start) * 1000
steps["output ends at (wall)"] = (wall() - wall0) * 1000
steps["main thread CPU"] = (cpu() - cpu0) * 1000
steps["process CPU"] = time.process_time() * 1000
steps["sockets"] = len(snapshot.findings)
steps["answered from the cache"] = float(snapshot.owners_via == "cache")
print(json.dumps(steps))
sys.stdout.flush()
os._exit(0)
"""

FILL = r"""
import sys
from closewait import scanning
from closewait.sources.owner_cache import file_cache
cache = file_cache(sys.argv[1])
cache.max_age = -1.0  # never fresh: answered by a full pass, which fills it
scanning.scan(scanning.CLOSE_WAIT_ONLY, owner_cache=cache)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", required=True, help="a src/ directory (repeat to compare)")
    parser.add_argument("--runs", type=int, default=9, help="runs per tree (default 9)")
    parser.add_argument("--no-owners", action="store_true", help="time scan --json --no-owners")
    parser.add_argument("--owner-cache", action="store_true", help="re-check and answer from an owner cache")
    args = parser.parse_args()
    mode = "no-owners" if args.no_owners else "owners"
    results: dict[str, list[dict[str, float]]] = {tree: [] for tree in args.tree}
    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    envs = [dict(base, PYTHONPATH=os.path.abspath(tree)) for tree in args.tree]
    for env in envs:  # untimed: writes the tree's .pyc files
        subprocess.run([sys.executable, "-c", "import closewait._console, closewait.scanning"], env=env, check=True)
    with tempfile.TemporaryDirectory(prefix="bench-steps-") as private:  # mode 0700
        for _ in range(args.runs):
            for index, tree in enumerate(args.tree):
                cache = os.path.join(private, f"owners-{index}.bin") if args.owner_cache and not args.no_owners else ""
                if cache:  # a full pass fills it, untimed: the timed run is then a cache hit
                    fill = [sys.executable, "-c", FILL, cache]
                    subprocess.run(fill, env=envs[index], capture_output=True, check=True)
                done = subprocess.run(
                    [sys.executable, "-c", ONE_RUN, mode, cache],
                    env=envs[index],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                results[tree].append(json.loads(done.stdout))
    names = list(dict.fromkeys(name for runs in results.values() for run in runs for name in run))
    print(f"scan --json{' --no-owners' if args.no_owners else ''}: medians of {args.runs} runs, ms")
    print(f"{'':24}" + "".join(f"{tree[-28:]:>30}" for tree in args.tree))
    for name in names:
        cells = []
        for tree in args.tree:
            values = [run[name] for run in results[tree] if name in run]
            cells.append(f"{statistics.median(values):30.1f}" if values else f"{'-':>30}")
        print(f"{name:24}" + "".join(cells))


if __name__ == "__main__":
    main()
