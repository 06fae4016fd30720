"""What the CLOSE_WAIT recorder costs: loopback connection churn with and without it, and its memory.

    python bench/bench_recorder.py                 # 12 interleaved rounds of 3 s per mode
    python bench/bench_recorder.py --quick         # 4 rounds of 1 s (a smoke run)

Needs root (the recorder) and a C compiler: the churn is ``bench/churn.c`` (connect, request,
response, close, as fast as it goes), so the per-connection work is the kernel's, not Python's, and
the recorder's share of it is as large as it gets. ``--workers`` server processes accept on a
listener each (each reads to EOF, so the server end passes through CLOSE_WAIT, then close()s), and
``--clients`` client processes connect, send, read the answer and close first. One port per worker:
connect() reuses a loopback TIME_WAIT port only once a second, which caps one destination at
~14,000 connections/s, below what the machine can do.

Four measurements:

1. The program against the one before it: today's (the entries table, an open-addressed array)
   and the preallocated hash it replaced (``bench/recorder_hash.py``), attached in alternating
   order on the same churn with the kernel's BPF run statistics on (BPF_ENABLE_STATS): per
   variant, the median over ``--compare-rounds`` of ns per program run and µs per connection.
   ``--only-compare`` stops after this (the quick loop while changing the program).
2. Throughput: rounds alternate the order (off, on) / (on, off); each mode runs ``--seconds`` and
   counts completed connections. A fresh recorder (default capacity) is attached before each "on"
   run, outside the timed window. Reported: median connections/s per mode, and the median of the
   per-round on/off ratios (a shared, busy machine drifts between rounds; the pairs cancel it); the
   same for the churn processes' CPU time per connection.
3. The program's own cost: with the run statistics on, the average nanoseconds per program run
   and the runs per connection, so the CPU the recorder adds per connection, and that as a share
   of the CPU the churn's processes spent per connection (their user + system time, which includes
   loopback's softirq work done in their context). The same with the feed on
   (``Recorder.open(feed=True)``, as ``watch --events`` uses it) and a thread reading it.
4. Memory: ``memlock`` from /proc/self/fdinfo of each map and the program, for 64k slots and the
   default (2M slots, for 1M sockets), and the old hash's for 1M (the table is an array,
   allocated whole: checked by writing 100,000 slots from user space).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from closewait.sources import bpf_asm
from closewait.sources.recorder import DEFAULT_CAPACITY, Recorder, enable_run_stats

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # recorder_hash, the program before the entries table


def build_churn(directory: str) -> str:
    binary = os.path.join(directory, "churn")
    subprocess.run(["cc", "-O2", "-Wall", "-o", binary, str(HERE / "churn.c")], check=True)
    return binary


def run_clients(
    binary: str, ports: list[int], clients: int, seconds: float, workers: list[int] | None = None
) -> tuple[int, int, float]:
    """(connections done, failed, CPU seconds the churn used: the clients' and the ``workers``').
    Client i connects to ``ports[i % len(ports)]``."""
    cpu_before = _children_cpu() + _cpu_of(workers or [])
    procs = [
        subprocess.Popen(
            [binary, "client", str(ports[index % len(ports)]), str(seconds)], stdout=subprocess.PIPE, text=True
        )
        for index in range(clients)
    ]
    done = failed = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 30)
        ok, bad = out.split()
        done += int(ok)
        failed += int(bad)
    return done, failed, _children_cpu() + _cpu_of(workers or []) - cpu_before


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_of(pids: list[int]) -> float:
    """User + system CPU seconds of running processes (loopback's softirq work is mostly charged to
    the process that sent the packet, so the churn's kernel work is in here too)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks


def server_workers(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def throughput(binary: str, ports: list[int], workers: list[int], args: argparse.Namespace) -> dict[str, Any]:
    per_mode: dict[str, list[float]] = {"off": [], "on": []}
    cpu_per_mode: dict[str, list[float]] = {"off": [], "on": []}
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    for round_index in range(args.rounds):
        order = ("off", "on") if round_index % 2 == 0 else ("on", "off")
        rates: dict[str, float] = {}
        cpu_us: dict[str, float] = {}
        for mode in order:
            recorder = Recorder.open(capacity=args.capacity) if mode == "on" else None
            try:
                done, failed, churn_cpu = run_clients(binary, ports, args.clients, args.seconds, workers)
            finally:
                if recorder is not None:
                    recorder.close()
            if failed:
                print(f"round {round_index} {mode}: {failed} failed connections", file=sys.stderr)
            rates[mode] = done / args.seconds
            cpu_us[mode] = churn_cpu / done * 1e6
            per_mode[mode].append(rates[mode])
            cpu_per_mode[mode].append(cpu_us[mode])
        ratios.append(rates["on"] / rates["off"])
        cpu_ratios.append(cpu_us["on"] / cpu_us["off"])
        print(
            f"round {round_index}: off {rates['off']:.0f}/s {cpu_us['off']:.1f} us CPU/conn, "
            f"on {rates['on']:.0f}/s {cpu_us['on']:.1f} us CPU/conn",
            file=sys.stderr,
        )
    return {
        "median_off": statistics.median(per_mode["off"]),
        "median_on": statistics.median(per_mode["on"]),
        "median_ratio": statistics.median(ratios),
        "ratios": ratios,
        "off": per_mode["off"],
        "on": per_mode["on"],
        "median_cpu_us_per_connection_off": statistics.median(cpu_per_mode["off"]),
        "median_cpu_us_per_connection_on": statistics.median(cpu_per_mode["on"]),
        "median_cpu_ratio": statistics.median(cpu_ratios),
        "cpu_ratios": cpu_ratios,
    }


def program_cost(
    binary: str, ports: list[int], workers: list[int], args: argparse.Namespace, *, feed: bool = False
) -> dict[str, Any]:
    """The program's own time per run; with ``feed``, a thread drains the ring buffer meanwhile (as
    ``watch --events`` would)."""
    import threading

    received = 0
    stop = threading.Event()
    with enable_run_stats(), Recorder.open(capacity=args.capacity, feed=feed) as recorder:

        def drain() -> None:
            nonlocal received
            events = recorder.feed()
            while not stop.is_set():
                received += len(events.read(0.05))

        reader = threading.Thread(target=drain) if feed else None
        if reader is not None:
            reader.start()
        counters_before = recorder.counters()
        time_before, runs_before = recorder.program_stats()
        done, _failed, churn_cpu = run_clients(binary, ports, args.clients, args.seconds, workers)
        time_after, runs_after = recorder.program_stats()
        changed = recorder.counters() - counters_before
        stop.set()
        if reader is not None:
            reader.join()
        lost = recorder.feed_lost()
    runs = runs_after - runs_before
    ns_per_run = (time_after - time_before) / runs if runs else 0.0
    cpu_per_connection_us = churn_cpu / done * 1e6
    recorder_per_connection_us = ns_per_run * runs / done / 1e3
    return {
        "feed": feed,
        "connections": done,
        "program_runs": runs,
        "runs_per_connection": runs / done,
        "ns_per_run": ns_per_run,
        "entered_per_connection": changed.entered / done,
        "recorder_us_per_connection": recorder_per_connection_us,
        "churn_cpu_us_per_connection": cpu_per_connection_us,
        "share_of_cpu": recorder_per_connection_us / cpu_per_connection_us,
        "missed": changed.missed,
        "feed_records_read": received,
        "feed_lost": lost,
    }


def compare_programs(binary: str, ports: list[int], workers: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """The program's own time, today's (``table``: the open-addressed array) against the one before
    it (``hash``: ``recorder_hash.py``), in alternating order on the same churn, with the kernel's run
    statistics on. Per variant: the median over rounds of ns per run and of µs per connection."""
    from recorder_hash import HashRecorder

    openers: dict[str, Callable[[], Any]] = {
        "table": lambda: Recorder.open(capacity=args.capacity),
        "hash": lambda: HashRecorder(args.capacity),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in openers}
    with enable_run_stats():
        for round_index in range(args.compare_rounds):
            order = list(openers) if round_index % 2 == 0 else list(reversed(openers))
            for name in order:
                with openers[name]() as recorder:
                    time_before, runs_before = recorder.program_stats()
                    done, _failed, churn_cpu = run_clients(binary, ports, args.clients, args.seconds, workers)
                    time_after, runs_after = recorder.program_stats()
                count = runs_after - runs_before
                ns_per_run = (time_after - time_before) / count if count else 0.0
                per_connection_us = ns_per_run * count / done / 1e3
                runs[name].append(
                    {
                        "ns_per_run": ns_per_run,
                        "runs_per_connection": count / done,
                        "recorder_us_per_connection": per_connection_us,
                        "churn_cpu_us_per_connection": churn_cpu / done * 1e6,
                        "share_of_cpu": per_connection_us / (churn_cpu / done * 1e6),
                    }
                )
            print(
                f"compare round {round_index}: "
                + ", ".join(f"{name} {runs[name][-1]['ns_per_run']:.0f} ns/run" for name in openers),
                file=sys.stderr,
            )
    out: dict[str, Any] = {"rounds": runs}
    for name, values in runs.items():
        out[name] = {key: statistics.median(run[key] for run in values) for key in values[0]}
    return out


def memory() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for capacity in (1 << 16, DEFAULT_CAPACITY):
        with Recorder.open(capacity=capacity) as recorder:
            out[str(capacity)] = recorder.memory()
    # The table is an array, allocated whole when the recorder attaches: filling it changes nothing.
    with Recorder.open(capacity=DEFAULT_CAPACITY) as recorder:
        entries = bpf_asm.MapAccess(recorder._bpf, recorder._fds["entries"], 4, 16)
        for slot in range(100_000):
            entries.update(slot.to_bytes(4, "little"), struct.pack("<QQ", 1 << 62 | slot, 1))
        out[f"{DEFAULT_CAPACITY}_after_100k_slots_written"] = recorder.memory()
    from recorder_hash import HashRecorder

    with HashRecorder(1 << 20) as before:
        out["hash_before_1048576"] = before.memory()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY)
    parser.add_argument("--compare-rounds", type=int, default=10, help="rounds of the table/hash comparison")
    parser.add_argument("--only-compare", action="store_true", help="only the table/hash comparison (no memory)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "recorder.json"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.compare_rounds = 4, 1.0, 2
    result: dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}",
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "loadavg_start": loadavg(),
        "args": vars(args),
    }
    with tempfile.TemporaryDirectory() as directory:
        binary = build_churn(directory)
        server = subprocess.Popen(
            [binary, "server", str(args.workers)], stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            assert server.stdout is not None
            ready, *port_texts = server.stdout.readline().split()
            if ready != "ready":
                raise SystemExit("the churn server did not start")
            ports = [int(text) for text in port_texts]
            run_clients(binary, ports, args.clients, 1.0)  # warm up
            workers = server_workers(server.pid)
            result["compare"] = compare_programs(binary, ports, workers, args)
            if not args.only_compare:
                result["throughput"] = throughput(binary, ports, workers, args)
                result["program_cost"] = program_cost(binary, ports, workers, args)
                result["program_cost_with_feed"] = program_cost(binary, ports, workers, args, feed=True)
        finally:
            os.killpg(server.pid, signal.SIGKILL)  # the server and the workers it forked
            server.wait()
    if not args.only_compare:
        result["memory"] = memory()
    result["loadavg_end"] = loadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
