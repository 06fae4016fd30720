"""Benchmark ``closewait exporter``: scrape time and exporter memory on a host with many sockets.

Builds the host with ``bench/scan_fixture.py`` (E established pairs = 2E sockets, C CLOSE_WAIT sockets
spread over worker processes, filler processes holding descriptors so /proc looks like a busy host),
then starts ``closewait exporter --min-interval 0`` (so every scrape scans) on a loopback port 0 and
measures:

- scrape time: wall time of ``GET /metrics`` (median, min, max over ``--scrapes`` scrapes) and the
  exporter's own ``closewait_scan_duration_seconds``;
- exporter memory: VmRSS after the scrapes and VmHWM (peak RSS) from /proc/PID/status;
- where the time goes, measured in this process on the same host: the per-state count
  (``netlink.count_by_state``, no tcp_info, no owners), the CLOSE_WAIT dump with tcp_info, the
  owner lookup (``closewait.scan``: the BPF iterator as root, else the /proc walk), and for
  comparison a dump of every state with tcp_info (what a naive exporter would do);
- optionally node_exporter's tcpstat collector (Debian's prometheus-node-exporter, per-state counts
  only, no processes) scraped the same way, when the binary is installed.

Every process started here is ended by pid (the fixture tears its children down by pid; the
exporters get SIGTERM, then SIGKILL). Only 127.0.0.0/8 is used.

Usage::

    python bench/bench_exporter.py --established 500 --close-wait 200        # quick check
    python bench/bench_exporter.py --established 50000 --close-wait 5000     # 100,000+ sockets
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.scan_fixture import running  # noqa: E402
from closewait.model import TcpState  # noqa: E402
from closewait.scanning import scan  # noqa: E402
from closewait.sources import netlink  # noqa: E402

CLOSEWAIT = str(Path(sys.executable).with_name("closewait"))


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop_process(proc: subprocess.Popen[str]) -> None:
    """SIGTERM by pid, then SIGKILL after 15 s; always reaped (bench_exporter_http uses it too)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@contextlib.contextmanager
def closewait_exporter(top: int, src: str | None = None) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``closewait exporter`` on a free loopback port; ``src`` runs another closewait's src/ instead."""
    env = dict(os.environ, PYTHONPATH=src) if src else None
    proc = subprocess.Popen(
        [CLOSEWAIT, "exporter", "--listen", "127.0.0.1:0", "--min-interval", "0", "--top", str(top)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        if "serving " not in line:
            raise RuntimeError(f"exporter did not start: {line!r}")
        yield proc, line.split("serving ", 1)[1].strip()
    finally:
        stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()


@contextlib.contextmanager
def node_exporter() -> Iterator[tuple[subprocess.Popen[str], str] | None]:
    binary = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if binary is None:
        yield None
        return
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--collector.disable-defaults", "--collector.tcpstat", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("node_exporter did not start") from None
                time.sleep(0.2)
        yield proc, url
    finally:
        stop_process(proc)


def scrape_times(url: str, n: int) -> tuple[list[float], str]:
    times: list[float] = []
    body = ""
    for _ in range(n):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=300) as response:
            body = response.read().decode()
        times.append(time.perf_counter() - started)
    return times, body


def _gauge(body: str, name: str) -> float:
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError(f"{name} not in the scrape")


def _time(fn: Callable[[], object], repeat: int) -> float:
    results = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        results.append(time.perf_counter() - started)
    return statistics.median(results)


def _fmt(seconds: list[float]) -> str:
    return (
        f"median {statistics.median(seconds) * 1000:.0f} ms "
        f"(min {min(seconds) * 1000:.0f}, max {max(seconds) * 1000:.0f}, n={len(seconds)})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--established", type=int, default=50_000, help="established pairs (2 sockets each)")
    parser.add_argument("--close-wait", type=int, default=5_000)
    parser.add_argument("--procs", type=int, default=380, help="processes on the host to reach with fillers")
    parser.add_argument("--fds", type=int, default=210_000, help="open descriptors on the host to reach")
    parser.add_argument("--scrapes", type=int, default=7)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument(
        "--baseline-src",
        help="a src/ directory of an older closewait: its exporter is scraped in the same rounds, as '(before)'",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.scrapes <= 100:
        parser.error("--scrapes must be 1..100")

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(
        f"machine: {os.cpu_count()} cpus, {mem_gib:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average {os.getloadavg()[0]:.2f} at start"
    )
    with running(args.established, args.close_wait, procs=args.procs, fds=args.fds, log=False) as fixture:
        print(f"fixture: {fixture.describe()}")
        for note in fixture.notes:
            print(f"  note: {note}")
        counts = netlink.count_by_state()
        total = sum(counts.values())
        print(
            f"host sockets now: {total} TCP ({counts[TcpState.ESTABLISHED]} established, "
            f"{counts[TcpState.CLOSE_WAIT]} close_wait, {counts[TcpState.FIN_WAIT2]} fin_wait2, "
            f"{counts[TcpState.TIME_WAIT]} time_wait, {counts[TcpState.LISTEN]} listen)"
        )

        print("\nwhere a scan's time goes (in-process, median of 3):")
        count_s = _time(netlink.count_by_state, 3)
        print(f"  per-state count (no tcp_info, no owners):  {count_s * 1000:8.0f} ms")
        cw_s = _time(lambda: list(netlink.dump({TcpState.CLOSE_WAIT, TcpState.LISTEN})), 3)
        print(f"  CLOSE_WAIT + LISTEN dump with tcp_info:     {cw_s * 1000:8.0f} ms")
        scan_s = _time(scan, 3)
        print(f"  closewait.scan() (dump + owner lookup):     {scan_s * 1000:8.0f} ms")
        every_s = _time(lambda: list(netlink.dump(TcpState)), 3)
        print(f"  for comparison, every state with tcp_info:  {every_s * 1000:8.0f} ms")

        with contextlib.ExitStack() as stack:
            proc, url = stack.enter_context(closewait_exporter(args.top))
            before = stack.enter_context(closewait_exporter(args.top, args.baseline_src)) if args.baseline_src else None
            # Round-robin, one scrape of each per round, so load from elsewhere hits both alike.
            times: list[float] = []
            before_times: list[float] = []
            body = ""
            for _ in range(args.scrapes):
                round_times, body = scrape_times(url, 1)
                times.extend(round_times)
                if before is not None:
                    before_times.extend(scrape_times(before[1], 1)[0])
            scan_duration = _gauge(body, "closewait_scan_duration_seconds")
            rss = _status_kib(proc.pid, "VmRSS")
            hwm = _status_kib(proc.pid, "VmHWM")
            series = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
            print(f"\nclosewait exporter (--min-interval 0, --top {args.top}):")
            print(f"  scrape wall time: {_fmt(times)}")
            print(f"  closewait_scan_duration_seconds (last): {scan_duration * 1000:.0f} ms")
            print(f"  response: {len(body)} bytes, {series} samples")
            print(f"  exporter memory: RSS {rss / 1024:.1f} MiB, peak RSS {hwm / 1024:.1f} MiB")
            if before is not None:
                print(f"closewait exporter (before: {args.baseline_src}), same rounds:")
                print(f"  scrape wall time: {_fmt(before_times)}")
                print(f"  exporter memory: peak RSS {_status_kib(before[0].pid, 'VmHWM') / 1024:.1f} MiB")

        with node_exporter() as ne:
            if ne is None:
                print("\nnode_exporter: not installed (apt-get install prometheus-node-exporter), skipped")
            else:
                ne_proc, ne_url = ne
                ne_times, ne_body = scrape_times(ne_url, args.scrapes)
                ne_rss = _status_kib(ne_proc.pid, "VmRSS")
                ne_hwm = _status_kib(ne_proc.pid, "VmHWM")
                established = _gauge(ne_body, 'node_tcp_connection_states{state="established"}')
                ne_states = [line for line in ne_body.splitlines() if line.startswith("node_tcp_connection_states{")]
                print("\nnode_exporter --collector.disable-defaults --collector.tcpstat (per-state counts only):")
                print(f"  scrape wall time: {_fmt(ne_times)}")
                print(f'  node_tcp_connection_states{{state="established"}} = {established:.0f}')
                print(f"  states exported: {len(ne_states)} (closewait_tcp_sockets: always {len(TcpState)})")
                print(f"  memory: RSS {ne_rss / 1024:.1f} MiB, peak RSS {ne_hwm / 1024:.1f} MiB")
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
