"""What closewait.trace costs: socket creation, accept and create_connection rates with and without it.

Run: ``.venv/bin/python bench/bench_trace.py`` (full scale) or ``--quick`` (a few seconds, to check it
works). Prints a markdown table; docs/benchmarks-trace.md has a full run.

Each workload runs in this process on loopback, ``--repeat`` times per mode, alternating modes so
noise from other load lands on all of them; the table gives the median CPU time per operation
(``time.process_time``: user + system time of this process, so the kernel work of the syscalls
counts, and time spent waiting for a CPU another program holds does not; on a shared machine wall
clock rates swing by 2x between runs, CPU time by about 20%). Modes: tracing off,
tracing with ``limit=1`` and with the default ``limit=16`` frames. The call stack is made 20 frames
deep first, like an application's, so ``limit`` matters as it would there.

Connections are closed with SO_LINGER {1, 0} (RST) so that no TIME_WAIT sockets pile up and exhaust
ephemeral ports during the run; the close path is the same Python code either way.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import platform
import socket
import statistics
import struct
import sys
import time
import tracemalloc
from collections.abc import Callable

from closewait import trace

LINGER_RST = struct.pack("ii", 1, 0)
MODES: list[tuple[str, int | None]] = [("off", None), ("limit=1", 1), ("limit=16 (default)", 16)]


def socket_create_close(n: int) -> None:
    for _ in range(n):
        sock = socket.socket()
        sock.close()


def accept_cycle(n: int) -> None:
    """connect() + accept() + close both: the server's accepted socket is the traced event of interest."""
    with socket.create_server(("127.0.0.1", 0), backlog=128) as listener:
        address = listener.getsockname()
        for _ in range(n):
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            client.connect(address)
            conn, _ = listener.accept()
            conn.close()
            client.close()


def create_connection_cycle(n: int) -> None:
    """socket.create_connection() + accept + close both."""
    with socket.create_server(("127.0.0.1", 0), backlog=128) as listener:
        address = listener.getsockname()
        for _ in range(n):
            client = socket.create_connection(address)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            conn, _ = listener.accept()
            conn.close()
            client.close()


def asyncio_cycle(n: int) -> None:
    """asyncio.open_connection() to an asyncio server (selector loop: sock.accept()), then close."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0, backlog=128)
        port = server.sockets[0].getsockname()[1]
        for _ in range(n):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            await reader.read()
            writer.close()
            await writer.wait_closed()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


WORKLOADS: list[tuple[str, Callable[[int], None], int]] = [
    ("socket() + close()", socket_create_close, 20_000),
    ("connect + accept() + close", accept_cycle, 4_000),
    ("create_connection() + accept() + close", create_connection_cycle, 4_000),
    ("asyncio open_connection + server accept + close", asyncio_cycle, 1_500),
]


def deep(depth: int, fn: Callable[[], float]) -> float:
    """Run ``fn`` under ``depth`` extra frames, as code deep inside an application would."""
    if depth == 0:
        return fn()
    return deep(depth - 1, fn)


def timed(work: Callable[[int], None], n: int, limit: int | None) -> float:
    """CPU microseconds per operation."""
    if limit is None:
        trace.stop()
    else:
        trace.start(limit=limit)
    try:
        gc.collect()
        started = time.process_time()
        work(n)
        return (time.process_time() - started) / n * 1e6
    finally:
        trace.stop()


def memory_per_record(count: int) -> tuple[float, int]:
    """Bytes of Python memory per traced socket (limit=16, stack 20 deep), measured with tracemalloc."""
    sockets: list[socket.socket] = []

    def make() -> float:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            sockets.append(socket.socket())
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return float(after - before)

    trace.start(limit=16)
    try:
        with_trace = deep(20, make)
    finally:
        for sock in sockets:
            sock.close()
        sockets.clear()
        trace.stop()
    without = deep(20, make)
    for sock in sockets:
        sock.close()
    return (with_trace - without) / count, count


def machine() -> str:
    with open("/proc/meminfo") as handle:
        mem_kb = int(handle.readline().split()[1])
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs, {mem_kb / 1024 / 1024:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average at start {load[0]:.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the work, 3 repeats: checks it runs")
    parser.add_argument("--repeat", type=int, default=7, help="runs per workload and mode (default 7)")
    args = parser.parse_args()
    if args.repeat < 1:
        print("bench_trace: --repeat must be at least 1", file=sys.stderr)
        return 2
    scale = 0.1 if args.quick else 1.0
    repeat = 3 if args.quick else args.repeat
    print(f"Machine: {machine()}")
    print(f"Scale {scale:g}, {repeat} runs per cell, median shown; the stack is 20 frames deep.\n")
    print("| workload | n | " + " | ".join(f"{name} (CPU µs/op)" for name, _ in MODES) + " | overhead, limit=16 |")
    print("|---|---:|" + "---:|" * len(MODES) + "---:|")
    for title, work, base_n in WORKLOADS:
        n = max(int(base_n * scale), 10)
        costs: dict[str, list[float]] = {name: [] for name, _ in MODES}
        for _ in range(repeat):
            for name, limit in MODES:
                costs[name].append(deep(20, functools.partial(timed, work, n, limit)))
        medians = {name: statistics.median(values) for name, values in costs.items()}
        off = medians["off"]
        traced = medians["limit=16 (default)"]
        cells = " | ".join(f"{medians[name]:,.1f}" for name, _ in MODES)
        overhead = f"{(traced / off - 1) * 100:+.0f}% ({traced - off:+.1f} µs/op)"
        print(f"| {title} | {n:,} | {cells} | {overhead} |", flush=True)
    per_record, count = memory_per_record(max(int(5_000 * scale), 100))
    print(f"\nMemory: {per_record:,.0f} bytes per traced socket (limit=16, {count:,} sockets, tracemalloc).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
