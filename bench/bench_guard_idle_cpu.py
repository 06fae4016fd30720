"""Server CPU while 19,000 connections sit idle: timing-wheel reaper vs no reaper vs a naive sweep.

    .venv/bin/python bench/bench_guard_idle_cpu.py --connections 19000 --seconds 10

The project's target is stated for ~20,000; the hard RLIMIT_NOFILE here is 20,000 per process and the server also
needs its listening socket, epoll, pipes and stdio, so one server holds 19,000 (the client sockets
are spread over two client processes of 9,500 each). For each server mode (see
bench_guard_common.py: ``bare`` asyncio without any reaper, ``guarded-no-idle`` serve() without a
timeout, ``guarded`` serve() with a 60 s idle timeout on the timing wheel, ``naive`` a task that
walks every connection once a second) it opens the connections, lets the server settle for 2 s,
then reads the server's utime+stime from /proc/PID/stat over ``--seconds`` of idleness.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_guard_common as common

MODES = ("bare", "guarded-no-idle", "guarded", "naive")


def client(port: int, connections: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, connections + 100), hard))
    socks = []
    for index in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(sock)
        if index % 500 == 499 or index == connections - 1:
            sock.sendall(b"p")
            if sock.recv(1) != b"p":
                raise RuntimeError("no echo")
    print("ready", flush=True)
    sys.stdin.read()  # hold the connections until the driver closes our stdin
    for sock in socks:
        sock.close()


def measure(mode: str, connections: int, seconds: float) -> dict[str, Any]:
    server, port = common.start_server_process(mode, idle_timeout=60.0, max_connections=connections)
    clients: list[subprocess.Popen[str]] = []
    try:
        share = [connections // 2, connections - connections // 2]
        for count in share:
            clients.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--role", "client", "--port", str(port), "--connections", str(count)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in clients:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("client failed")
        fds = len(list(Path(f"/proc/{server.pid}/fd").iterdir()))
        time.sleep(2.0)
        before = common.cpu_seconds(server.pid)
        started = time.monotonic()
        time.sleep(seconds)
        cpu = common.cpu_seconds(server.pid) - before
        elapsed = time.monotonic() - started
    finally:
        for proc in clients:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in clients:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        common.stop_server_process(server)
    return {"server_fds": fds, "cpu_s": cpu, "seconds": elapsed, "cpu_pct": 100 * cpu / elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["driver", "client"], default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, default=19_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.role == "client":
        client(args.port, args.connections)
        return 0
    if not 2 <= args.connections <= 19_000 or args.seconds <= 0 or args.rounds < 1:
        parser.error("need 2 <= --connections <= 19000, positive --seconds and --rounds")
    results: dict[str, Any] = {"machine": common.machine(), "args": vars(args)}
    for round_index in range(args.rounds):
        for mode in MODES if round_index % 2 == 0 else tuple(reversed(MODES)):
            r = measure(mode, args.connections, args.seconds)
            results.setdefault(mode, []).append(r)
            print(
                f"round {round_index + 1} {mode:>16}: {r['server_fds']} fds, server CPU {r['cpu_s']:.3f} s "
                f"in {r['seconds']:.1f} s ({r['cpu_pct']:.2f} %)",
                file=sys.stderr,
                flush=True,
            )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
