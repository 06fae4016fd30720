"""What the closewait.guard benchmarks share: the servers they compare, CPU and machine readings.

Run as a program it is one of the servers, in its own process (the benchmarks start it and end
it by pid)::

    python bench/bench_guard_common.py server --mode guarded --idle-timeout 60

and prints one JSON line ``{"port": ..., "pid": ...}`` once listening. It stops when its stdin
closes. Modes:

- ``bare``: ``asyncio.start_server`` with an echo handler that closes its writer in ``finally``
  (the correct hand-written server, the baseline);
- ``guarded``: ``closewait.guard.serve`` with the same echo handler minus the close (serve() does
  it), idle timeout on the timing wheel, TCP keepalive, a connection limit;
- ``guarded-no-idle``: serve() without an idle timeout (no reaper at all);
- ``naive``: the bare server plus the reaper people often write first: a task that wakes every
  second and walks every connection's last-activity time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import time
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/PID/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # After the ")" that ends comm: state is field 3, utime field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine() -> dict[str, Any]:
    with open("/proc/meminfo") as handle:
        mem_kib = int(handle.readline().split()[1])
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[:3]
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": " ".join(load),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def _echo_closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop_tasks: list[asyncio.Task[Any]] = []
    if args.mode in ("bare", "naive"):
        last_activity: dict[asyncio.StreamWriter, float] = {}

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if args.mode == "naive":
                last_activity[writer] = time.monotonic()
            try:
                await _echo_closing(reader, writer)
            finally:
                last_activity.pop(writer, None)

        server = await asyncio.start_server(handler, "127.0.0.1", 0, backlog=4096)
        port = server.sockets[0].getsockname()[1]
        if args.mode == "naive":

            async def sweep() -> None:
                while True:
                    await asyncio.sleep(1.0)
                    now = time.monotonic()
                    for writer, last in list(last_activity.items()):
                        if now - last >= args.idle_timeout:
                            writer.close()

            stop_tasks.append(asyncio.create_task(sweep()))
    else:
        from closewait.guard import start_server

        guarded = await start_server(
            _echo,
            idle_timeout=args.idle_timeout if args.mode == "guarded" else None,
            max_connections=args.max_connections,
            backlog=4096,
        )
        port = guarded.address[1]
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        pass  # commands are not needed; EOF on stdin stops the server
    for task in stop_tasks:
        task.cancel()


#: Every server process gets the same fixed glibc mmap threshold. asyncio's transports recv() into a
#: fresh 256 KiB bytes object per read; with glibc's *dynamic* threshold, whether that buffer costs an
#: mmap + mremap + munmap per request or comes from the heap depends on the process's allocation
#: history (the threshold rises only after a large mmapped block is freed). Under strace one server
#: made three extra syscalls per request and the other none, which alone made one look twice as fast.
#: A fixed threshold above 256 KiB puts every server on the heap path, so the comparison is of the code.
SERVER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}

#: With two or more CPUs the server runs on the last one and load generators on the others, so the
#: scheduler moving the two between cores does not add noise to a few-percent comparison.
SERVER_CPU = max(os.sched_getaffinity(0))
LOAD_CPUS = set(os.sched_getaffinity(0)) - {SERVER_CPU} or {SERVER_CPU}


def pin_server() -> None:
    """preexec_fn for a server process."""
    os.sched_setaffinity(0, {SERVER_CPU})


def pin_load() -> None:
    """preexec_fn for a load-generator process."""
    os.sched_setaffinity(0, LOAD_CPUS)


def start_server_process(mode: str, *, idle_timeout: float = 300.0, max_connections: int = 20_000) -> Any:
    """Start a server process; return (Popen, port). End it with ``stop_server_process``."""
    import subprocess

    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "server",
            "--mode",
            mode,
            "--idle-timeout",
            str(idle_timeout),
            "--max-connections",
            str(max_connections),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **SERVER_ENV},
        preexec_fn=pin_server,  # noqa: PLW1509 (the benchmark runs no threads when it starts servers)
    )
    assert proc.stdout is not None
    hello = json.loads(proc.stdout.readline())
    return proc, int(hello["port"])


def stop_server_process(proc: Any) -> None:
    import signal
    import subprocess

    with contextlib.suppress(BrokenPipeError, OSError):
        proc.stdin.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="a benchmark server for closewait.guard")
    parser.add_argument("role", choices=["server"])
    parser.add_argument("--mode", choices=["bare", "guarded", "guarded-no-idle", "naive"], required=True)
    parser.add_argument("--idle-timeout", type=float, default=300.0)
    parser.add_argument("--max-connections", type=int, default=20_000)
    args = parser.parse_args()
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
