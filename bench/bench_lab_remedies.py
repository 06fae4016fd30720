"""Benchmark the lab's remedy servers: how long CLOSE_WAIT lasts under each remedy, over many trials.

``closewait lab remedies`` runs five trials per remedy, all remedies at once, to stay fast; its
figures say "it works" more than "how fast". This script measures the detection latency properly:
one remedy at a time, ``--trials`` sequential trials each (the lab's own scenario and measurement,
``closewait.lab.remedies._trial``: connect, send a line, close; milliseconds from the client's
``close()`` to the server's ``close()``, both CLOCK_MONOTONIC), then median, p90 and max, plus the
share of trials where the fd was released and the connection left the TCP table.

keepalive is not in the table: it does not close within tcp_fin_timeout (see docs/lab-remedies.md).
Every server is a child started through ``LabContext`` and ended by pid. Only 127.0.0.1 is used.

Usage::

    python bench/bench_lab_remedies.py --trials 5                 # quick check
    python bench/bench_lab_remedies.py --trials 200 --write docs/benchmarks-lab-remedies.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from closewait.lab import remedies
from closewait.lab.model import LabContext
from closewait.lab.servers import start_remedy

CLOSING = ("read-close", "multiplex-read-close", "nonblocking-read-close", "send-sigpipe", "idle-timeout")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench(strategy: str, trials: int, ctx: LabContext) -> dict[str, object]:
    server, port = start_remedy(ctx, strategy)
    waits: list[float] = []
    released = left = 0
    try:
        for _ in range(trials):
            trial = remedies._trial(server, port, remedies.CLOSE_DEADLINE_S + remedies.IDLE_TIMEOUT_S)
            if trial.close_wait_ms is not None:
                waits.append(trial.close_wait_ms)
            released += bool(trial.fd_released)
            left += bool(trial.left_tcp_table)
    finally:
        server.stop()
    return {
        "strategy": strategy,
        "trials": trials,
        "closed": len(waits),
        "median": statistics.median(waits) if waits else None,
        "p90": quantile(waits, 0.9) if waits else None,
        "max": max(waits) if waits else None,
        "released": released,
        "left": left,
    }


def machine() -> str:
    mem_kib = 0
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs, {mem_kib / 1024 / 1024:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average {load[0]:.1f} at the start"
    )


def fmt(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--write", type=Path, help="write the results as markdown to this file")
    args = parser.parse_args()
    header = machine()
    start = time.monotonic()
    rows = []
    with LabContext(capture=False) as ctx:
        for strategy in CLOSING:
            rows.append(bench(strategy, args.trials, ctx))
            print(rows[-1], file=sys.stderr, flush=True)
    took = time.monotonic() - start
    table = [
        "| remedy | trials | closed | median ms | p90 ms | max ms | fd released | left TCP table |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        table.append(
            f"| {row['strategy']} | {row['trials']} | {row['closed']} | {fmt(row['median'])} | {fmt(row['p90'])} "
            f"| {fmt(row['max'])} | {row['released']} | {row['left']} |"
        )
    text = "\n".join(table)
    print(header)
    print(text)
    print(f"({took:.0f} s)")
    if args.write:
        args.write.write_text(
            "# Benchmark: how long CLOSE_WAIT lasts under each remedy\n\n"
            "`python bench/bench_lab_remedies.py --trials "
            f"{args.trials} --write {args.write}`: one remedy server at a time, sequential trials of the "
            "lab's scenario (connect, send a line, close); milliseconds from the client's close() to the "
            "server's close(), both CLOCK_MONOTONIC. Settings as in the lab: idle timeout 1 s (wheel tick "
            "62.5 ms), heartbeat 100 ms, poll 10 ms.\n\n"
            f"Machine: {header}, {os.getloadavg()[0]:.1f} at the end. {RUN_NOTE}\n\n{text}\n\nTook {took:.0f} s.\n",
            encoding="utf-8",
        )
    return 0


RUN_NOTE = (
    "The remedy servers mostly sleep, so the load average is other work (or the tail of what ran in the"
    " minutes before); other work shows up mostly in the maxima."
)


if __name__ == "__main__":
    sys.exit(main())
