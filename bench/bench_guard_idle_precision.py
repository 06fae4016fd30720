"""Idle-timeout precision: closewait.guard.serve (timing wheel) vs Redis's ``timeout``.

    .venv/bin/python bench/bench_guard_idle_precision.py --connections 200 --timeout 2

Starts Debian's ``redis-server`` on a free loopback port (``--timeout 2 --save '' --appendonly no``)
and a guarded echo server (``idle_timeout=2``, default tick ``timeout/16`` = 0.125 s), each in
its own process. Opens ``--connections`` connections to each, spread at random over 1.5 s so
they land at every phase of Redis's cron and of the wheel's ticks; on each it does one round trip
(``PING``/``+PONG`` for Redis, one echoed byte for ours) and records when the answer arrived:
the connection's last activity. Then it waits (epoll, no polling) for each server to close each
connection and reports how long after timeout + last activity the close came.

Redis checks idle clients in ``clientsCron`` (about once a second for each client, at the default
``hz 10``), and compares whole seconds, so it closes between the timeout and about two seconds
after it; the wheel closes between the timeout and timeout + tick.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_guard_common as common


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_redis(timeout: float) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    for _ in range(5):  # the free port can be taken between probe and bind; try another
        port = free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--timeout",
                str(int(timeout)),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                probe.sendall(b"PING\r\n")
                if probe.recv(7) == b"+PONG\r\n":
                    return proc, port
            time.sleep(0.05)
        stop(proc)
    raise SystemExit("redis-server did not start")


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def measure(targets: dict[str, tuple[int, bytes, bytes]], connections: int, timeout: float) -> dict[str, list[float]]:
    """For each target (port, request, reply): idle time at close minus the timeout, per connection."""
    plan = [(name, random.uniform(0, 1.5)) for name in targets for _ in range(connections)]
    plan.sort(key=lambda item: item[1])
    selector = selectors.DefaultSelector()
    last: dict[socket.socket, tuple[str, float]] = {}
    began = time.monotonic()
    for name, offset in plan:
        time.sleep(max(0.0, began + offset - time.monotonic()))
        port, request, reply = targets[name]
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(request)
        got = b""
        while len(got) < len(reply):
            got += sock.recv(len(reply) - len(got))
        last[sock] = (name, time.monotonic())
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    overshoot: dict[str, list[float]] = {name: [] for name in targets}
    deadline = time.monotonic() + timeout + 10
    while last and time.monotonic() < deadline:
        for key, _ in selector.select(1.0):
            now = time.monotonic()
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            if data:
                continue
            name, at = last.pop(sock)
            overshoot[name].append(now - at - timeout)
            selector.unregister(sock)
            sock.close()
    for sock in last:
        sock.close()
    selector.close()
    return overshoot


def summarise(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "min_s": min(values),
        "p50_s": common.percentile(values, 50),
        "p99_s": common.percentile(values, 99),
        "max_s": max(values),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=200, help="connections to each server (200)")
    parser.add_argument("--timeout", type=int, default=2, help="idle timeout in whole seconds (2)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.connections <= 5000 or args.timeout < 1:
        parser.error("need 1 <= --connections <= 5000 and --timeout >= 1")
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False).stdout
    redis, redis_port = start_redis(args.timeout)
    guarded, guarded_port = common.start_server_process("guarded", idle_timeout=float(args.timeout))
    try:
        overshoot = measure(
            {
                "redis": (redis_port, b"PING\r\n", b"+PONG\r\n"),
                "closewait.guard": (guarded_port, b"x", b"x"),
            },
            args.connections,
            args.timeout,
        )
    finally:
        common.stop_server_process(guarded)
        stop(redis)
    results: dict[str, Any] = {
        "machine": common.machine(),
        "redis_version": version.strip(),
        "args": vars(args),
        "tick_s": args.timeout / 16,
    }
    for name, values in overshoot.items():
        if not values:
            print(f"{name}: no connection was closed", file=sys.stderr)
            continue
        results[name] = summary = summarise(values)
        print(
            f"{name:>16}: {summary['n']} closed after timeout + "
            f"min {summary['min_s']:+.3f} s, p50 {summary['p50_s']:+.3f} s, p99 {summary['p99_s']:+.3f} s, "
            f"max {summary['max_s']:+.3f} s",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
