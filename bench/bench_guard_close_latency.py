"""Time from a peer's close to the server's close, with 10,000 connections open (target p99 < 5 ms).

    .venv/bin/python bench/bench_guard_close_latency.py --connections 10000 --samples 2000

For each server (``guarded``: closewait.guard.serve; ``bare``: asyncio.start_server with a handler
that closes its writer when it reads EOF) in its own process, a client process opens
``--connections`` connections (the 10,000 client sockets live there, the server holds the other
10,000: the hard RLIMIT_NOFILE is 20,000 per process), checks each answers, then closes
``--samples`` of them one at a time: ``shutdown(SHUT_WR)`` sends its FIN, and the time until the
server's FIN arrives (``recv()`` returns b"") is the server's reaction time. The client then
closes its socket and waits 1 ms before the next sample, so the samples do not queue behind each
other.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_guard_common as common


def client(port: int, connections: int, samples: int) -> dict[str, Any]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, connections + 100), hard))
    socks: list[socket.socket] = []
    for index in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(sock)
        if index % 500 == 499:  # let the server catch up with accepting
            sock.sendall(b"p")
            if sock.recv(1) != b"p":
                raise RuntimeError("no echo")
    for sock in socks[-10:]:
        sock.sendall(b"q")
        if sock.recv(1) != b"q":
            raise RuntimeError("no echo")
    time.sleep(1.0)
    latencies = []
    for sock in random.sample(socks, samples):
        started = time.perf_counter()
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass
        latencies.append(time.perf_counter() - started)
        sock.close()
        time.sleep(0.001)
    for sock in socks:
        sock.close()
    return {
        "open_during_samples": connections,
        "samples": samples,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": common.percentile(latencies, 99) * 1e3,
        "max_ms": max(latencies) * 1e3,
        "mean_ms": statistics.fmean(latencies) * 1e3,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["driver", "client"], default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.samples <= args.connections <= 19_000:
        parser.error("need 1 <= --samples <= --connections <= 19000")
    if args.role == "client":
        print(json.dumps(client(args.port, args.connections, args.samples)))
        return 0
    results: dict[str, Any] = {"machine": common.machine(), "args": vars(args)}
    for mode in ("guarded", "bare"):
        server, port = common.start_server_process(mode, idle_timeout=600.0, max_connections=19_000)
        try:
            run = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--role",
                    "client",
                    "--port",
                    str(port),
                    "--connections",
                    str(args.connections),
                    "--samples",
                    str(args.samples),
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            )
        finally:
            common.stop_server_process(server)
        results[mode] = json.loads(run.stdout)
        r = results[mode]
        print(
            f"{mode:>8}: {r['open_during_samples']} open, {r['samples']} closes: p50 {r['p50_ms']:.3f} ms  "
            f"p99 {r['p99_ms']:.3f} ms  max {r['max_ms']:.3f} ms",
            file=sys.stderr,
            flush=True,
        )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
