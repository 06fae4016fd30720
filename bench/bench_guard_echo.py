"""Guarded echo server vs bare asyncio echo server: throughput and latency (target: within 5 %).

    .venv/bin/python bench/bench_guard_echo.py --rounds 5 --seconds 8 --connections 50

Each round starts each server (``bench_guard_common.py server --mode bare|guarded``) in its own
process, then a load generator in another process: ``--connections`` asyncio connections over
loopback, each sending a 64-byte message and waiting for its echo, back to back, for
``--seconds`` after a 1 s warm-up. It reports requests per second and per-request latency
percentiles. The order of the servers alternates between rounds and the medians over rounds are
compared, so drift in the machine's load hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_guard_common as common


class _Pinger(asyncio.Protocol):
    def __init__(self, message: bytes, latencies: list[float], state: dict[str, Any]) -> None:
        self.message = message
        self.latencies = latencies
        self.state = state
        self.pending = 0
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if self.state["stop"]:
            self.transport.close()
            return
        self.pending = len(self.message)
        self.sent_at = time.perf_counter()
        self.transport.write(self.message)

    def data_received(self, data: bytes) -> None:
        self.pending -= len(data)
        if self.pending <= 0:
            if self.state["measuring"]:
                self.latencies.append(time.perf_counter() - self.sent_at)
            self._send()


async def _load(port: int, connections: int, seconds: float, warmup: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    state = {"stop": False, "measuring": False}
    message = b"x" * 64
    transports = []
    for _ in range(connections):
        transport, _ = await loop.create_connection(lambda: _Pinger(message, latencies, state), "127.0.0.1", port)
        transports.append(transport)
    await asyncio.sleep(warmup)
    state["measuring"] = True
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    state["measuring"] = False
    elapsed = time.perf_counter() - started
    state["stop"] = True
    await asyncio.sleep(0.2)
    for transport in transports:
        transport.close()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_us": common.percentile(latencies, 50) * 1e6,
        "p99_us": common.percentile(latencies, 99) * 1e6,
    }


def run_round(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    server, port = common.start_server_process(mode, idle_timeout=60.0)
    try:
        cpu_before = common.cpu_seconds(server.pid)
        load = subprocess.run(
            [
                sys.executable,
                __file__,
                "--role",
                "load",
                "--port",
                str(port),
                "--connections",
                str(args.connections),
                "--seconds",
                str(args.seconds),
            ],
            capture_output=True,
            preexec_fn=common.pin_load,
            text=True,
            timeout=args.seconds + 60,
            check=True,
        )
        result: dict[str, Any] = json.loads(load.stdout)
        result["server_cpu_s"] = common.cpu_seconds(server.pid) - cpu_before
    finally:
        common.stop_server_process(server)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["driver", "load"], default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0 or args.connections < 1:
        parser.error("--rounds, --seconds and --connections must be positive")
    if args.role == "load":
        print(json.dumps(asyncio.run(_load(args.port, args.connections, args.seconds, 1.0))))
        return 0

    machine = common.machine()
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "guarded": []}
    for index in range(args.rounds):
        order = ["bare", "guarded"] if index % 2 == 0 else ["guarded", "bare"]
        for mode in order:
            result = run_round(mode, args)
            runs[mode].append(result)
            print(
                f"round {index + 1} {mode:>8}: {result['rps']:9.0f} req/s  p50 {result['p50_us']:7.0f} us  "
                f"p99 {result['p99_us']:7.0f} us  server cpu {result['server_cpu_s']:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    summary: dict[str, Any] = {"machine": machine, "args": vars(args), "runs": runs}
    for mode, results in runs.items():
        summary[mode] = {
            key: statistics.median(r[key] for r in results) for key in ("rps", "p50_us", "p99_us", "server_cpu_s")
        }
    # Paired by round (the two runs of a round are back to back), which cancels slow drift in load.
    summary["paired_throughput_change_pct"] = 100 * (
        statistics.median(g["rps"] / b["rps"] for g, b in zip(runs["guarded"], runs["bare"], strict=True)) - 1
    )
    summary["paired_p99_change_pct"] = 100 * (
        statistics.median(g["p99_us"] / b["p99_us"] for g, b in zip(runs["guarded"], runs["bare"], strict=True)) - 1
    )
    bare, guarded = summary["bare"], summary["guarded"]
    summary["throughput_change_pct"] = 100 * (guarded["rps"] / bare["rps"] - 1)
    summary["p99_change_pct"] = 100 * (guarded["p99_us"] / bare["p99_us"] - 1)
    summary["cpu_per_request_change_pct"] = 100 * (
        (guarded["server_cpu_s"] / guarded["rps"]) / (bare["server_cpu_s"] / bare["rps"]) - 1
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"machine: {machine}")
        for mode in ("bare", "guarded"):
            m = summary[mode]
            print(
                f"{mode:>8} (median of {args.rounds}): {m['rps']:9.0f} req/s  p50 {m['p50_us']:7.0f} us  "
                f"p99 {m['p99_us']:7.0f} us"
            )
        print(
            f"paired by round: throughput {summary['paired_throughput_change_pct']:+.1f} %, "
            f"p99 {summary['paired_p99_change_pct']:+.1f} %"
        )
        print(
            f"guarded vs bare: throughput {summary['throughput_change_pct']:+.1f} %, "
            f"p99 {summary['p99_change_pct']:+.1f} %, server CPU per request "
            f"{summary['cpu_per_request_change_pct']:+.1f} %"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
