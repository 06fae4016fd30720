"""Soak serve(): churn many connections with random client behaviour, then check nothing leaked.

A bounded reliability run, not a test (the short version lives in tests/guard/test_soak.py)::

    .venv/bin/python bench/soak_serve.py --connections 1000000 --max-seconds 1800

Three kinds of process, all started and ended (by pid) here:

- one server: ``closewait.guard.serve()`` with a short idle timeout and a connection limit below
  the clients' concurrency (so accepting pauses and resumes), running a handler whose behaviour
  the client picks with its first byte: ``E`` echo until EOF, ``R`` answer once and return
  without ``writer.close()`` (the classic leak), ``X`` raise, ``B`` send 256 KiB, ``S`` send
  1 MiB through a small send buffer;
- ``--clients`` client processes, each ``--concurrency`` asyncio workers that connect over
  loopback and behave at random: ``close`` (echo, then close), ``rst`` (echo, then SO_LINGER 0
  abort), ``half`` (echo, then shutdown(SHUT_WR) and read to EOF), ``forget`` (the server's handler
  returns without closing), ``error`` (the handler raises), ``slow`` (a slow reader that drains
  256 KiB in small reads), ``idle`` (never sends; the idle timeout closes it), ``stall`` (asks for
  1 MiB with a 4 KiB receive buffer and never reads; the idle timeout aborts the blocked writer);
- this driver, which records the server's descriptor count before the first connection, waits
  for the clients, waits until the server reports no open connection, then scans the server's
  pid for CLOSE_WAIT with ``closewait.scan`` and counts its descriptors again.

Pass means: zero CLOSE_WAIT sockets held by the server, its descriptor count back where it
started, every accepted connection closed, and every client connection accounted for. Exit 0 on
pass, 1 on fail, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

BEHAVIOURS: dict[str, int] = {  # weights out of 100
    "close": 40,
    "rst": 15,
    "half": 15,
    "forget": 10,
    "error": 5,
    "slow": 5,
    "idle": 5,
    "stall": 5,
}
BIG = 256 * 1024
OP_TIMEOUT = 60.0


# --- server ------------------------------------------------------------------------------------


class _DropHandlerFailures(logging.Filter):
    """The ``X`` handler raises on purpose; keep stderr for unexpected warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("handler failed")


async def soak_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    kind = await reader.read(1)
    if kind == b"E":
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    elif kind == b"R":
        writer.write(await reader.read(100))
        await writer.drain()
        # returns without writer.close(): serve() must close it
    elif kind == b"X":
        raise RuntimeError("the soak's handler fails on purpose")
    elif kind == b"B":
        chunk = b"b" * 16384
        for _ in range(BIG // len(chunk)):
            writer.write(chunk)
            await writer.drain()
    elif kind == b"S":
        # A fixed, small send buffer (no autotuning), so a peer that does not read blocks drain()
        # after some 100 KiB instead of the kernel swallowing megabytes.
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        chunk = b"s" * 16384
        for _ in range(64):  # 1 MiB, far more than the buffers hold
            writer.write(chunk)
            await writer.drain()


async def run_server(args: argparse.Namespace) -> None:
    from closewait.guard import GuardedServer, serve

    logging.basicConfig(level=logging.WARNING, format="server: %(levelname)s %(name)s: %(message)s")
    logging.getLogger("closewait.guard.server").addFilter(_DropHandlerFailures())
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[GuardedServer] = loop.create_future()
    task = asyncio.create_task(
        serve(
            soak_handler,
            ready=ready,
            idle_timeout=args.idle_timeout,
            max_connections=args.max_connections,
            backlog=4096,
        )
    )
    server = await ready
    print(json.dumps({"port": server.address[1], "pid": os.getpid()}), flush=True)
    # Commands on stdin, one a line: "stats" prints the statistics as JSON; "quit" (or EOF) stops.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while (line := await reader.readline()) and line.strip() != b"quit":
        if line.strip() == b"stats":
            print(json.dumps(asdict(server.statistics())), flush=True)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# --- clients -----------------------------------------------------------------------------------


async def one_connection(port: int, behaviour: str, idle_timeout: float) -> None:
    if behaviour == "stall":
        # A small receive buffer (set before connect, so the window is small from the start).
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", port))
        except BaseException:
            raw.close()
            raise
        reader, writer = await asyncio.open_connection(sock=raw)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if behaviour in ("close", "rst", "half"):
            payload = os.urandom(random.randint(1, 2048))
            writer.write(b"E" + payload)
            if await reader.readexactly(len(payload)) != payload:
                raise AssertionError("echo mismatch")
            if behaviour == "rst":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            if behaviour == "half":
                writer.write_eof()
                if await reader.read() != b"":
                    raise AssertionError("data after half-close")
        elif behaviour == "forget":
            writer.write(b"Rhello")
            if await reader.readexactly(5) != b"hello" or await reader.read() != b"":
                raise AssertionError("forgetful handler's reply")
        elif behaviour == "error":
            writer.write(b"X")
            await reader.read()
        elif behaviour == "slow":
            writer.write(b"B")
            received = 0
            while chunk := await reader.read(8192):
                received += len(chunk)
                await asyncio.sleep(0.001)
            if received != BIG:
                raise AssertionError(f"slow reader got {received} bytes")
        elif behaviour == "idle":
            if await reader.read() != b"":
                raise AssertionError("idle connection got data")
        elif behaviour == "stall":
            writer.write(b"S")
            sock = writer.get_extra_info("socket")
            # Never read: the server's writes block; its idle timeout must abort the connection.
            # We cannot see that without reading, so wait past the timeout, then go (RST: unread data).
            await asyncio.sleep(idle_timeout * 2 + 0.1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def run_client(args: argparse.Namespace) -> None:
    random.seed(args.seed)
    names = list(BEHAVIOURS)
    weights = list(BEHAVIOURS.values())
    done: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    remaining = args.connections
    deadline = time.monotonic() + args.max_seconds

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            behaviour = random.choices(names, weights)[0]
            began = time.monotonic()
            try:
                await asyncio.wait_for(one_connection(args.port, behaviour, args.idle_timeout), OP_TIMEOUT)
            except (OSError, asyncio.IncompleteReadError, AssertionError, TimeoutError) as err:
                errors[f"{behaviour}: {type(err).__name__}: {err}"[:120]] += 1
            done[behaviour] += 1
            seconds[behaviour] += time.monotonic() - began

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    mean_ms = {name: round(1000 * seconds[name] / done[name], 1) for name in done}
    print(json.dumps({"done": dict(done), "errors": dict(errors), "mean_ms": mean_ms}), flush=True)


# --- driver ------------------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def server_stats(server: subprocess.Popen[str]) -> dict[str, Any]:
    assert server.stdin is not None
    assert server.stdout is not None
    server.stdin.write("stats\n")
    server.stdin.flush()
    result: dict[str, Any] = json.loads(server.stdout.readline())
    return result


def close_wait_count(pid: int, port: int) -> int:
    import closewait

    snapshot = closewait.scan(pids=[pid], ports=[port])
    return sum(1 for f in snapshot.findings if f.socket.local.port == port)


def end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def drive(args: argparse.Namespace) -> dict[str, Any]:
    script = str(Path(__file__).resolve())
    common = ["--idle-timeout", str(args.idle_timeout)]
    server = subprocess.Popen(
        [sys.executable, script, "--role", "server", "--max-connections", str(args.max_connections), *common],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    clients: list[subprocess.Popen[str]] = []
    try:
        assert server.stdout is not None
        hello = json.loads(server.stdout.readline())
        port, pid = int(hello["port"]), int(hello["pid"])
        fds_before = fd_count(pid)
        per_client = [args.connections // args.clients] * args.clients
        per_client[0] += args.connections - sum(per_client)
        started = time.monotonic()
        for index, count in enumerate(per_client):
            clients.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        script,
                        "--role",
                        "client",
                        "--port",
                        str(port),
                        "--connections",
                        str(count),
                        "--concurrency",
                        str(args.concurrency),
                        "--seed",
                        str(args.seed + index),
                        "--max-seconds",
                        str(args.max_seconds),
                        *common,
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        # Sample CLOSE_WAIT mid-run: serve() answers a FIN at once, so this should stay near zero.
        mid_run_close_wait: list[int] = []
        progress_at = time.monotonic() + args.progress
        hard_deadline = started + args.max_seconds + OP_TIMEOUT + 30
        while any(c.poll() is None for c in clients) and time.monotonic() < hard_deadline:
            time.sleep(0.2)
            if time.monotonic() >= progress_at:
                progress_at += args.progress
                stats = server_stats(server)
                mid_run_close_wait.append(close_wait_count(pid, port))
                print(
                    f"soak: {time.monotonic() - started:6.0f} s  accepted {stats['accepted']:>9}  "
                    f"open {stats['open']:>4}  close-wait now {mid_run_close_wait[-1]}  fds {fd_count(pid)}",
                    file=sys.stderr,
                    flush=True,
                )
        client_results = []
        for client in clients:
            if client.poll() is None:
                end(client)
                client_results.append({"done": {}, "errors": {"client killed at the hard deadline": 1}})
                continue
            assert client.stdout is not None
            client_results.append(json.loads(client.stdout.read()))
        elapsed = time.monotonic() - started
        # Every connection the clients made is gone from their side; the server must follow.
        settle_deadline = time.monotonic() + 30
        stats = server_stats(server)
        while stats["open"] > 0 and time.monotonic() < settle_deadline:
            time.sleep(0.1)
            stats = server_stats(server)
        close_wait = close_wait_count(pid, port)
        fds_after = fd_count(pid)
    finally:
        for client in clients:
            end(client)
        if server.poll() is None and server.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                server.stdin.write("quit\n")
                server.stdin.flush()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=10)
        end(server)

    done: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    mean_ms: dict[str, float] = {}
    for result in client_results:
        done.update(result["done"])
        errors.update(result["errors"])
        for name, ms in result.get("mean_ms", {}).items():
            mean_ms[name] = max(mean_ms.get(name, 0.0), ms)
    total = sum(done.values())
    closed_total = sum(v for k, v in stats.items() if k.startswith("closed_"))
    ok = (
        close_wait == 0
        and fds_after == fds_before
        and stats["open"] == 0
        and stats["accepted"] == closed_total
        and total == args.connections
        and stats["accepted"] >= total - sum(errors.values())
    )
    return {
        "ok": ok,
        "connections": total,
        "seconds": round(elapsed, 1),
        "connections_per_second": round(total / elapsed, 1) if elapsed else None,
        "close_wait_at_end": close_wait,
        "close_wait_mid_run_max": max(mid_run_close_wait, default=0),
        "fds_before": fds_before,
        "fds_after": fds_after,
        "behaviours": dict(sorted(done.items())),
        "client_mean_ms": dict(sorted(mean_ms.items())),
        "client_errors": dict(errors.most_common(10)),
        "client_error_total": sum(errors.values()),
        "server": stats,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["driver", "server", "client"], default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, default=1_000_000, help="total connections (default 1,000,000)")
    parser.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--concurrency", type=int, default=100, help="connections in flight per client (100)")
    parser.add_argument("--max-connections", type=int, default=150, help="server's limit (150: it pauses)")
    parser.add_argument("--idle-timeout", type=float, default=0.5, help="the server's idle timeout, s (0.5)")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="stop starting connections after (1800)")
    parser.add_argument("--progress", type=float, default=10.0, help="seconds between progress lines (10)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    for name in ("connections", "clients", "concurrency", "max_connections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.idle_timeout <= 0 or args.max_seconds <= 0 or args.progress <= 0:
        parser.error("--idle-timeout, --max-seconds and --progress must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "server":
        asyncio.run(run_server(args))
        return 0
    if args.role == "client":
        asyncio.run(run_client(args))
        return 0
    result = drive(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
