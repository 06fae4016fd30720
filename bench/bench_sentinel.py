"""What one closewait.sentinel check costs, by how many sockets the process holds.

Run: ``.venv/bin/python bench/bench_sentinel.py`` (or ``--quick``). The process opens N loopback
connections to itself (2N descriptors, all ESTABLISHED), and optionally leaks some into CLOSE_WAIT,
then times ``Sentinel.check_now()`` (wall clock and CPU). docs/benchmarks-trace.md has a full run.

A check with no CLOSE_WAIT socket of its own is the /proc/self/fd walk plus one sock_diag dump of
the host's CLOSE_WAIT sockets (kernel-filtered by state); a check that finds some adds a full
``scan(pids=[own pid])`` for diagnoses. The host's own CLOSE_WAIT count is printed because the dump
is proportional to it.
"""

from __future__ import annotations

import argparse
import logging
import resource
import socket
import statistics
import sys
import time

from closewait import sentinel
from closewait.model import TcpState
from closewait.sources import netlink


def connections(n: int, leak: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """n connected pairs; the first ``leak`` have their client closed (server end in CLOSE_WAIT)."""
    kept: list[socket.socket] = []
    closed: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0), backlog=1024) as listener:
        address = listener.getsockname()
        for i in range(n):
            client = socket.create_connection(address)
            server_side, _ = listener.accept()
            kept.append(server_side)
            if i < leak:
                client.close()
                closed.append(client)
            else:
                kept.append(client)
    return kept, closed


def measure(watcher: sentinel.Sentinel, runs: int) -> tuple[float, float]:
    walls: list[float] = []
    cpus: list[float] = []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        watcher.check_now()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few runs: checks it runs")
    args = parser.parse_args()
    sizes = [0, 100, 1000] if args.quick else [0, 100, 1000, 5000]
    runs = 5 if args.quick else 30
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    host_close_wait = sum(1 for _ in netlink.dump({TcpState.CLOSE_WAIT}, with_info=False))
    print(f"Host CLOSE_WAIT sockets (all processes) at start: {host_close_wait}; {runs} checks per row, median.\n")
    print("| connections held (fds) | of them in CLOSE_WAIT | check wall ms | check CPU ms |")
    print("|---:|---:|---:|---:|")
    quiet = logging.getLogger("bench.sentinel")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    for n in sizes:
        for leak in (0, 10) if n else (0,):
            kept, _closed = connections(n, leak)
            try:
                watcher = sentinel.Sentinel(interval=3600, logger=quiet)
                if leak:
                    deadline = time.monotonic() + 5
                    while len(watcher.check_now().findings) < leak and time.monotonic() < deadline:
                        time.sleep(0.01)
                wall, cpu = measure(watcher, runs)
                print(f"| {n:,} ({len(kept):,}) | {leak} | {wall:.2f} | {cpu:.2f} |", flush=True)
            finally:
                for sock in kept:
                    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
