"""Benchmark the exporter's HTTP server: scrape latency under concurrent clients, with and without an
attack running in parallel.

Builds a moderate host with ``bench/scan_fixture.py`` (a few thousand sockets, CLOSE_WAIT held by
worker processes, filler processes holding descriptors), starts ``closewait exporter`` on a loopback
port 0, and runs for ``--seconds`` per phase:

- 2 **Prometheus-like clients**: one keep-alive connection each, ``Accept: application/openmetrics-text``
  and ``Accept-Encoding: gzip`` (what Prometheus sends), one scrape every ``--prom-period`` seconds;
- 8 **dashboard clients**: a new connection per request (a browser or curl refresh), plain text,
  one request every ``--dash-period`` seconds;

and records each request's latency (connect, when new, through the last body byte). Phases: for each
``--min-interval`` given (default 5, the exporter's default, and 0, a scan per request), once quiet
and once with an attack in parallel: 40 connections sending endless 65 KB header lines and 200
silent connections, both reopened as soon as the server drops them, from user nobody when run as
root (``setpriv``; the system python3, standard library only). Reported: p50, p99 and max latency,
failed requests, and the exporter's peak RSS and descriptors (from /proc/PID/status and /proc/PID/fd,
sampled every 50 ms).

Every process started here is ended by pid: the exporter and the attackers get SIGTERM then SIGKILL,
the fixture tears its children down by pid. Only 127.0.0.0/8 is used.

Usage::

    python bench/bench_exporter_http.py                       # ~2 minutes
    python bench/bench_exporter_http.py --seconds 5 --established 500 --close-wait 100   # quick check
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.bench_exporter import stop_process  # noqa: E402
from bench.scan_fixture import running  # noqa: E402
from closewait.model import TcpState  # noqa: E402
from closewait.sources import netlink  # noqa: E402

CLOSEWAIT = str(Path(sys.executable).with_name("closewait"))
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.1"
)

#: A sustained attack from one process: FLOODERS connections sending endless 65 KB header lines and
#: SILENT connections sending nothing, each reopened as soon as the server drops it, until SIGTERM.
ATTACK = r"""
import selectors, signal, socket, sys, threading, time
host, port, flooders, silent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
line = b"X-Flood: " + b"a" * 65000 + b"\r\n"
def flood():
    while not stop.is_set():
        try:
            with socket.create_connection((host, port), timeout=1) as sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                while not stop.is_set():
                    try:
                        sock.sendall(line)
                    except socket.timeout:
                        pass
        except OSError:
            time.sleep(0.01)
def hold_silent():
    sel = selectors.DefaultSelector()
    held = 0
    while not stop.is_set():
        while held < silent and not stop.is_set():
            try:
                sock = socket.create_connection((host, port), timeout=1)
            except OSError:
                time.sleep(0.01)
                continue
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
            held += 1
        for key, _ in sel.select(timeout=0.1):
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(key.fileobj)
                key.fileobj.close()
                held -= 1
threads = [threading.Thread(target=flood, daemon=True) for _ in range(flooders)]
threads.append(threading.Thread(target=hold_silent, daemon=True))
for t in threads: t.start()
print("attacking", flush=True)
stop.wait()
"""


@contextlib.contextmanager
def exporter(min_interval: float) -> Iterator[tuple[subprocess.Popen[str], str, int]]:
    proc = subprocess.Popen(
        [CLOSEWAIT, "exporter", "--listen", "127.0.0.1:0", "--min-interval", str(min_interval)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        if "serving " not in line:
            raise RuntimeError(f"exporter did not start: {line!r}")
        host, port = line.split("serving http://", 1)[1].strip().removesuffix("/metrics").rsplit(":", 1)
        yield proc, host, int(port)
    finally:
        stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()


@contextlib.contextmanager
def attack(host: str, port: int) -> Iterator[str]:
    as_nobody = os.geteuid() == 0 and shutil.which("setpriv") is not None and os.path.exists("/usr/bin/python3")
    prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if as_nobody else []
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    proc = subprocess.Popen(
        [*prefix, python, "-c", ATTACK, host, str(port), "40", "200"],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "HOME": "/"},
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "attacking":
            raise RuntimeError("the attacker did not start")
        yield "user nobody" if as_nobody else f"uid {os.geteuid()}"
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class Results:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"prometheus": [], "dashboard": []})
    failures: dict[str, int] = field(default_factory=lambda: {"prometheus": 0, "dashboard": 0})
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, seconds: float | None) -> None:
        with self.lock:
            if seconds is None:
                self.failures[kind] += 1
            else:
                self.latencies[kind].append(seconds)


def prometheus_client(host: str, port: int, period: float, until: float, results: Results) -> None:
    """Like Prometheus's Go transport: one kept-alive connection, and a GET that fails on a reused
    connection (the server closed it while idle) is retried once on a new one."""
    conn: http.client.HTTPConnection | None = None
    headers = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip", "User-Agent": "Prometheus/bench"}
    while time.monotonic() < until:
        started = time.perf_counter()
        ok = False
        for _attempt in range(2):
            reused = conn is not None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, port, timeout=10)
                conn.request("GET", "/metrics", headers=headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
                if response.will_close:
                    conn.close()
                    conn = None
                break
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
                if not reused:
                    break
        results.add("prometheus", time.perf_counter() - started if ok else None)
        time.sleep(max(0.0, period - (time.perf_counter() - started)))
    if conn is not None:
        conn.close()


def dashboard_client(host: str, port: int, period: float, until: float, results: Results) -> None:
    while time.monotonic() < until:
        started = time.perf_counter()
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            response.read()
            ok = response.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
        finally:
            conn.close()
        results.add("dashboard", time.perf_counter() - started if ok else None)
        time.sleep(max(0.0, period - (time.perf_counter() - started)))


def listen_overflows() -> int:
    """TcpExtListenOverflows, host-wide: connects dropped because an accept queue was full."""
    with open("/proc/net/netstat", encoding="ascii") as handle:
        lines = handle.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    return 0


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler:
    """Peak VmRSS (KiB) and descriptor count of a process, sampled every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.rss_kib, self.fds = pid, 0, 0
        self.started = time.monotonic()
        self.cpu_start = _cpu_seconds(pid)
        self.cpu_share = 0.0
        self.overflows = listen_overflows()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            with contextlib.suppress(OSError):
                with open(f"/proc/{self.pid}/status", encoding="ascii") as handle:
                    for line in handle:
                        if line.startswith("VmRSS:"):
                            self.rss_kib = max(self.rss_kib, int(line.split()[1]))
                self.fds = max(self.fds, len(os.listdir(f"/proc/{self.pid}/fd")))
            self._done.wait(0.05)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self.cpu_share = (_cpu_seconds(self.pid) - self.cpu_start) / (time.monotonic() - self.started)
        self.overflows = listen_overflows() - self.overflows


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_phase(host: str, port: int, pid: int, args: argparse.Namespace) -> tuple[Results, Sampler]:
    results = Results()
    sampler = Sampler(pid)
    until = time.monotonic() + args.seconds
    threads = [
        threading.Thread(target=prometheus_client, args=(host, port, args.prom_period, until, results))
        for _ in range(2)
    ] + [
        threading.Thread(target=dashboard_client, args=(host, port, args.dash_period, until, results)) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sampler.stop()
    return results, sampler


def report(title: str, results: Results, sampler: Sampler) -> None:
    every = results.latencies["prometheus"] + results.latencies["dashboard"]
    print(f"\n{title}")
    for kind in ("prometheus", "dashboard", "all"):
        values = every if kind == "all" else results.latencies[kind]
        failed = sum(results.failures.values()) if kind == "all" else results.failures[kind]
        if not values:
            print(f"  {kind:10} no successful request, {failed} failed")
            continue
        print(
            f"  {kind:10} n={len(values):4}  p50 {statistics.median(values) * 1000:7.1f} ms  "
            f"p99 {_pct(values, 0.99) * 1000:7.1f} ms  max {max(values) * 1000:7.1f} ms  failed {failed}"
        )
    print(
        f"  exporter: peak RSS {sampler.rss_kib / 1024:.1f} MiB, peak {sampler.fds} descriptors, "
        f"CPU {sampler.cpu_share * 100:.0f}% of one core; host ListenOverflows +{sampler.overflows}"
    )


def scan_seconds(host: str, port: int) -> float:
    """The exporter's own closewait_scan_duration_seconds (the last scan)."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("GET", "/metrics")
        for line in conn.getresponse().read().decode().splitlines():
            if line.startswith("closewait_scan_duration_seconds "):
                return float(line.split()[1])
    finally:
        conn.close()
    raise RuntimeError("closewait_scan_duration_seconds not in the scrape")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--established", type=int, default=2_000, help="established pairs (2 sockets each)")
    parser.add_argument("--close-wait", type=int, default=500)
    parser.add_argument("--procs", type=int, default=200, help="processes on the host to reach with fillers")
    parser.add_argument("--fds", type=int, default=20_000, help="open descriptors on the host to reach")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each phase")
    parser.add_argument("--prom-period", type=float, default=0.25, help="seconds between a Prometheus client's scrapes")
    parser.add_argument("--dash-period", type=float, default=0.5, help="seconds between a dashboard client's requests")
    parser.add_argument("--min-interval", type=float, action="append", help="exporter --min-interval (repeatable)")
    args = parser.parse_args(argv)
    intervals = args.min_interval or [5.0, 0.0]

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(
        f"machine: {os.cpu_count()} cpus, {mem_gib:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average {os.getloadavg()[0]:.2f} at start"
    )
    with running(args.established, args.close_wait, procs=args.procs, fds=args.fds, log=False) as fixture:
        print(f"fixture: {fixture.describe()}")
        counts = netlink.count_by_state()
        print(
            f"host sockets now: {sum(counts.values())} TCP ({counts[TcpState.ESTABLISHED]} established, "
            f"{counts[TcpState.CLOSE_WAIT]} close_wait)"
        )
        print(
            f"clients: 2 Prometheus-like (keep-alive, gzip, every {args.prom_period} s) + 8 dashboards "
            f"(new connection, every {args.dash_period} s), {args.seconds:.0f} s per phase"
        )
        for interval in intervals:
            with exporter(interval) as (proc, host, port):
                results, sampler = run_phase(host, port, proc.pid, args)
                report(f"--min-interval {interval:g}, quiet", results, sampler)
                print(f"  last scan: {scan_seconds(host, port) * 1000:.0f} ms")
                with attack(host, port) as who:
                    results, sampler = run_phase(host, port, proc.pid, args)
                report(
                    f"--min-interval {interval:g}, under attack from {who} "
                    "(40 endless-header + 200 silent connections, reopened when dropped)",
                    results,
                    sampler,
                )
                print(f"  last scan: {scan_seconds(host, port) * 1000:.0f} ms")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
