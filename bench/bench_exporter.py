"""Benchmark ``closewait exporter`` against node_exporter's tcpstat: scrape time side by side, in one run.

Three exporters run at once on loopback, and are scraped in rounds (one scrape of each per round,
their order rotated every round, so load from elsewhere hits them alike):

- node_exporter with only its tcpstat collector (Debian's ``prometheus-node-exporter``: per-state
  counts from /proc/net/tcp and tcp6, no processes), when the binary is installed;
- ``closewait exporter --min-interval 0 --recorder off``: every scrape scans (a per-state count by
  sock_diag, the CLOSE_WAIT dump with tcp_info, the owner lookup, rows);
- ``closewait exporter --min-interval 0 --recorder on``: the same, with the per-state counts from
  the recorder (no dump of every socket per scrape). Its recorder is pinned on a bpffs of its own
  under a temporary directory, so it shares nothing with a recorder already running here.

Scrape time is the wall time of ``GET /metrics`` (median, min, max). Then, in this process on the
same host: where one scrape's time goes (the per-state count, the CLOSE_WAIT dump, ``closewait.scan``
as the exporter calls it, a whole in-process scrape of a collector without HTTP), and the exporters'
memory.

The host is ``bench/scan_fixture.py`` (E established pairs = 2E sockets, C CLOSE_WAIT sockets spread
over worker processes, filler processes holding descriptors so /proc looks like a busy host), or,
with ``--no-fixture``, the host as it is (a fixture someone else already runs; two fixtures at once
collide on their source addresses).

Every process started here is ended by pid (the fixture tears its children down by pid; the
exporters get SIGTERM, then SIGKILL). Only 127.0.0.0/8 is used.

Usage::

    python bench/bench_exporter.py --established 500 --close-wait 200        # quick check
    python bench/bench_exporter.py --established 100000 --close-wait 5000 --scrapes 15
    python bench/bench_exporter.py --no-fixture --scrapes 15                 # a fixture already runs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.scan_fixture import host_counts, running  # noqa: E402
from closewait.model import TcpState  # noqa: E402
from closewait.scanning import scan  # noqa: E402
from closewait.sources import netlink  # noqa: E402

CLOSEWAIT = str(Path(sys.executable).with_name("closewait"))


def _status_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/{pid}/status")


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
def closewait_exporter(
    top: int, src: str | None = None, args: tuple[str, ...] = ()
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``closewait exporter --min-interval 0`` on a free loopback port, with ``args``; ``src`` runs
    another closewait's src/ instead."""
    env = dict(os.environ, PYTHONPATH=src) if src else None
    proc = subprocess.Popen(
        [CLOSEWAIT, "exporter", "--listen", "127.0.0.1:0", "--min-interval", "0", "--top", str(top), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        said: list[str] = []  # what it logged before serving (a recorder that could not attach, say)
        line = proc.stderr.readline()
        while line and "serving " not in line:
            said.append(line)
            line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"exporter did not start: {''.join(said)!r}")
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


def scrape(url: str) -> tuple[float, str]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=300) as response:
        body = response.read().decode()
    return time.perf_counter() - started, body


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


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


@dataclass
class Contender:
    """One exporter scraped in the rounds."""

    name: str
    proc: subprocess.Popen[str]
    url: str
    times: list[float] = field(default_factory=list)
    body: str = ""

    def summary(self) -> str:
        t = self.times
        return f"median {_ms(statistics.median(t))} (min {_ms(min(t))}, max {_ms(max(t))}, n={len(t)})"


@contextlib.contextmanager
def _host(args: argparse.Namespace) -> Iterator[None]:
    """The fixture this run builds, or (``--no-fixture``) the host as it is."""
    if args.no_fixture:
        counts = host_counts()
        print(f"host as it is (--no-fixture): {counts.processes} processes, {counts.fds} open descriptors")
        yield
        return
    with running(args.established, args.close_wait, procs=args.procs, fds=args.fds, log=False) as fixture:
        print(f"fixture: {fixture.describe()}")
        for note in fixture.notes:
            print(f"  note: {note}")
        yield


def _breakdown(top: int, repeat: int) -> None:
    """Where one scrape's time goes, in this process (no HTTP), median of ``repeat``."""
    from prometheus_client.exposition import generate_latest

    from closewait.errors import ClosewaitError
    from closewait.exporter import CloseWaitCollector, build_registry
    from closewait.exporter.collector import OWNER_CACHE_MAX_AGE_S
    from closewait.sources.owner_cache import OwnerCache

    print(f"\nwhere a scrape's time goes (in this process, median of {repeat}):")
    count_s = _time(netlink.count_by_state, repeat)
    print(f"  per-state count by sock_diag (recorder off only):      {_ms(count_s):>9}")
    cw_s = _time(lambda: list(netlink.dump({TcpState.CLOSE_WAIT, TcpState.LISTEN})), repeat)
    print(f"  CLOSE_WAIT + LISTEN dump with tcp_info:                {_ms(cw_s):>9}")
    no_owners_s = _time(lambda: scan(recorder_pins=None, owners=False), repeat)
    print(f"  closewait.scan(owners=False): dump, findings:          {_ms(no_owners_s):>9}")
    full_s = _time(lambda: scan(recorder_pins=None), repeat)
    print(f"  closewait.scan(), owners by a full BPF pass each time: {_ms(full_s):>9}")
    cache = OwnerCache(max_age=OWNER_CACHE_MAX_AGE_S)
    scan(recorder_pins=None, owner_cache=cache)  # fills it
    cached_s = _time(lambda: scan(recorder_pins=None, owner_cache=cache), repeat)
    print(f"  closewait.scan() as the exporter calls it (its cache): {_ms(cached_s):>9}")
    for mode in ("off", "on"):
        with tempfile.TemporaryDirectory(prefix="closewait-bench-") as pins:
            try:
                collector = CloseWaitCollector(
                    min_interval=0, top_n=top, recorder=mode, recorder_pin_dir=os.path.join(pins, "b", "closewait")
                )
            except ClosewaitError as err:  # a recorder that cannot attach here: say so, go on
                print(f"  a whole scrape, --recorder {mode}: cannot run here: {err}")
                continue
            try:
                registry = build_registry(collector)
                generate_latest(registry)  # the first scan reads the BTF layout, fills the caches
                scrape_s = _time(lambda: generate_latest(registry), repeat)  # noqa: B023 (used at once)
            finally:
                collector.close()
        print(f"  a whole scrape, --recorder {mode}, without HTTP:         {_ms(scrape_s):>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--established", type=int, default=100_000, help="established pairs (2 sockets each)")
    parser.add_argument("--close-wait", type=int, default=5_000)
    parser.add_argument("--procs", type=int, default=380, help="processes on the host to reach with fillers")
    parser.add_argument("--fds", type=int, default=210_000, help="open descriptors on the host to reach")
    parser.add_argument("--no-fixture", action="store_true", help="measure the host as it is (a fixture already runs)")
    parser.add_argument("--scrapes", type=int, default=15, help="rounds: one scrape of each exporter per round")
    parser.add_argument("--gap", type=float, default=0.5, help="seconds of pause before each scrape")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument(
        "--leak-every",
        type=float,
        default=0.0,
        help="seconds between new CLOSE_WAIT sockets of a leaking server during the rounds (0: none)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs of each in-process measurement")
    parser.add_argument(
        "--baseline-src",
        help="a src/ directory of an older closewait: its exporter is scraped in the same rounds",
    )
    parser.add_argument(
        "--baseline-args", default="--recorder off", help="its exporter's extra arguments (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.scrapes <= 200:
        parser.error("--scrapes must be 1..200")

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    commit = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        f"machine: {os.cpu_count()} cpus, {mem_gib:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}; commit {commit or '?'}; {now}; "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    with _host(args):
        _rounds(args)
        _breakdown(args.top, args.repeat)  # after the exporters stopped: they do not compete with it
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")
    return 0


#: A server that accepts and never reads nor closes: each connection its client closes stays in
#: CLOSE_WAIT for as long as the server runs. It prints its port.
LEAKER = """
import socket, sys
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1024)
print(server.getsockname()[1], flush=True)
kept = []
while True:
    kept.append(server.accept()[0])
"""


@contextlib.contextmanager
def leaking_server(every: float) -> Iterator[None]:
    """A leak in progress: a server that starts with 20 CLOSE_WAIT sockets and gains one every
    ``every`` seconds (a thread connects and closes), so each scrape meets sockets that the
    exporter's owner cache has not seen. The server is ended by its pid; the thread stops with it."""
    import threading

    proc = subprocess.Popen([sys.executable, "-c", LEAKER], stdout=subprocess.PIPE, text=True)
    stop = threading.Event()
    made = 0

    def leak_one(port: int) -> None:
        nonlocal made
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        made += 1

    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        for _ in range(20):
            leak_one(port)

        def run() -> None:
            while not stop.wait(every):
                leak_one(port)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield
        stop.set()
        thread.join(timeout=10)
        print(f"leaking server: {made} CLOSE_WAIT sockets made ({made - 20} during the rounds)")
    finally:
        stop.set()
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def _rounds(args: argparse.Namespace) -> None:
    """Start the exporters, scrape them in rounds, print the figures, stop them."""
    with contextlib.ExitStack() as stack:
        counts = netlink.count_by_state()
        print(
            f"host sockets now: {sum(counts.values())} TCP ({counts[TcpState.ESTABLISHED]} established, "
            f"{counts[TcpState.CLOSE_WAIT]} close_wait, {counts[TcpState.FIN_WAIT2]} fin_wait2, "
            f"{counts[TcpState.TIME_WAIT]} time_wait, {counts[TcpState.LISTEN]} listen)"
        )
        contenders: list[Contender] = []
        ne = stack.enter_context(node_exporter())
        if ne is None:
            print("node_exporter: not installed (apt-get install prometheus-node-exporter), skipped")
        else:
            contenders.append(Contender("node_exporter tcpstat", *ne))
        off = stack.enter_context(closewait_exporter(args.top, args=("--recorder", "off")))
        contenders.append(Contender("closewait --recorder off", *off))
        # A bpffs of its own (mounted by the exporter on a directory that does not exist yet, so it
        # removes it again on stop), never the shared /sys/fs/bpf/closewait.
        pin_root = stack.enter_context(tempfile.TemporaryDirectory(prefix="closewait-bench-"))
        pin_dir = os.path.join(pin_root, "bpffs", "closewait")
        try:
            on = stack.enter_context(
                closewait_exporter(args.top, args=("--recorder", "on", "--recorder-pin-dir", pin_dir))
            )
        except RuntimeError as err:
            print(f"closewait --recorder on: cannot run here, skipped: {err}")
        else:
            contenders.append(Contender("closewait --recorder on", *on))
        if args.baseline_src:
            extra_args = tuple(shlex.split(args.baseline_args))
            before = stack.enter_context(closewait_exporter(args.top, args.baseline_src, extra_args))
            contenders.append(Contender(f"closewait (before: {args.baseline_src})", *before))

        if args.leak_every > 0:
            stack.enter_context(leaking_server(args.leak_every))
        for contender in contenders:
            scrape(contender.url)  # warm-up: BTF layout, first workload names, Go's first GC
        for round_no in range(args.scrapes):
            shift = round_no % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                # A pause first, as between Prometheus' scrapes: what the last exporter does after its
                # answer (Go's garbage collector in node_exporter, say) does not land in this scrape.
                time.sleep(args.gap)
                seconds, contender.body = scrape(contender.url)
                contender.times.append(seconds)

        print(f"\nscrape wall time, GET /metrics, {args.scrapes} rounds, {args.gap:g} s apart (--min-interval 0):")
        reference = contenders[0] if ne is not None else None
        for contender in contenders:
            ratio_text = ""
            if reference is not None and contender is not reference:
                ratio = statistics.median(contender.times) / statistics.median(reference.times)
                ratio_text = f"  = {ratio:.2f}x node_exporter"
            print(f"  {contender.name:32s} {contender.summary()}{ratio_text}")
        print("\nexporters after the rounds:")
        for contender in contenders:
            rss = _status_kib(contender.proc.pid, "VmRSS") / 1024
            hwm = _status_kib(contender.proc.pid, "VmHWM") / 1024
            samples = sum(1 for line in contender.body.splitlines() if line and not line.startswith("#"))
            extra = ""
            if contender.name.startswith("closewait"):
                scan_ms = _gauge(contender.body, "closewait_scan_duration_seconds") * 1000
                extra = f", last closewait_scan_duration_seconds {scan_ms:.0f} ms"
                with contextlib.suppress(RuntimeError):  # only with the recorder
                    source = _gauge(contender.body, "closewait_state_counts_source")
                    extra += f", closewait_state_counts_source {source:.0f}"
            print(
                f"  {contender.name:32s} RSS {rss:.1f} MiB (peak {hwm:.1f}); {len(contender.body):,} bytes, "
                f"{samples} samples{extra}"
            )
        if ne is not None:
            established = _gauge(contenders[0].body, 'node_tcp_connection_states{state="established"}')
            print(f'  node_tcp_connection_states{{state="established"}} = {established:.0f}')


if __name__ == "__main__":
    sys.exit(main())
