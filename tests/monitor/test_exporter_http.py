"""The exporter's HTTP server (``closewait.exporter.http``): HTTP semantics and the limits that keep
a local user from exhausting it.

Two kinds of test, both on real loopback sockets:

- the server in this process (``MetricsServer`` with short timeouts and a small connection limit),
  for methods and status codes, gzip, keep-alive, malformed requests, each timeout, the connection
  limit and a clean stop;
- a real ``closewait exporter`` process attacked from user nobody (``setpriv``, the system python3
  with only the standard library): endless header lines and hundreds of silent connections, with
  the exporter's RSS read from /proc/PID/status and its descriptors from /proc/PID/fd.

No timing is asserted: waits are bounded by deadlines, and each limit is checked by its effect.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import closing

import pytest
import requests
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from closewait.errors import UsageError
from closewait.exporter import CloseWaitCollector, ScanResult
from closewait.exporter.http import _ACCEPT_BATCH, LIMITS_ENV, HttpLimits, MetricsServer, accepts_gzip
from tests.conftest import AS_NOBODY
from tests.monitor.conftest import stop_process
from tests.monitor.leakers import CLOSEWAIT
from tests.util import wait_for

#: Short limits so that every timeout fires within a second or two.
FAST = HttpLimits(
    max_connections=4,
    request_timeout=0.5,
    idle_timeout=0.5,
    write_timeout=0.5,
    linger_timeout=0.5,
    stop_grace=2,
)


# -- helpers ----------------------------------------------------------------------------------------


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


class Client:
    """A raw HTTP/1.1 client on one socket: exact bytes out, responses read by Content-Length."""

    def __init__(self, address: tuple[str, int], timeout: float = 10) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the server closed the connection")
        self.pending += chunk

    def response(self, *, head: bool = False) -> Response:
        while b"\r\n\r\n" not in self.pending:
            self._fill()
        raw, _, self.pending = self.pending.partition(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        version, status, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        length = 0 if head else int(headers["content-length"])
        while len(self.pending) < length:
            self._fill()
        body, self.pending = self.pending[:length], self.pending[length:]
        return Response(int(status), headers, body)

    def closed_by_server(self, timeout: float = 10) -> bool:
        """True once the server has closed (EOF or reset) within ``timeout``; data received is dropped."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
        return False

    def close(self) -> None:
        self.sock.close()


def request(address: tuple[str, int], data: bytes, *, head: bool = False) -> Response:
    with closing(Client(address)) as client:
        client.send(data)
        return client.response(head=head)


class Blocking(Collector):
    """A collector whose collect() waits for ``release``: keeps render slots busy on demand."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls = 0

    def collect(self) -> Iterable[Metric]:
        self.calls += 1
        self.entered.release()
        self.release.wait(30)
        family = GaugeMetricFamily("blocking_ready", "1 once released")
        family.add_metric([], 1)
        return [family]


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Gauge("closewait_test_value", "a value to serve", registry=registry).set(42)
    return registry


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    running = MetricsServer(_registry(), "127.0.0.1", 0, FAST)
    running.start()
    yield running
    running.stop()


GET_METRICS = b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n"


# -- methods, paths and status codes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/metrics", 200),
        ("HEAD", "/metrics", 200),
        ("GET", "/", 200),
        ("HEAD", "/", 200),
        ("GET", "/metrics?name[]=closewait_test_value", 200),
        ("POST", "/metrics", 405),
        ("DELETE", "/", 405),
        ("PUT", "/metrics", 405),
        ("OPTIONS", "/metrics", 405),
        ("GET", "/nope", 404),
        ("HEAD", "/nope", 404),
        ("DELETE", "/nope", 404),
        ("GET", "/metrics/", 404),
    ],
)
def test_methods_and_paths(server: MetricsServer, method: str, path: str, status: int) -> None:
    head = method == "HEAD"
    with closing(Client(server.address)) as client:
        client.send(f"{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        response = client.response(head=head)
        assert response.status == status
        if status == 405:
            assert response.headers["allow"] == "GET, HEAD"
        if head:
            # HEAD: the GET's headers, Content-Length included, no body: the next response on the same
            # connection starts right after the head.
            get = request(server.address, f"GET {path} HTTP/1.1\r\n\r\n".encode())
            assert int(response.headers["content-length"]) == len(get.body) > 0
            assert response.headers["content-type"] == get.headers["content-type"]
            client.send(GET_METRICS)
            assert client.response().status == 200
        elif path.startswith("/metrics") and status == 200:
            assert b"closewait_test_value 42.0" in response.body


def test_metrics_are_gzipped_when_the_client_accepts_it(server: MetricsServer) -> None:
    plain = request(server.address, GET_METRICS)
    assert "content-encoding" not in plain.headers
    assert plain.headers["vary"] == "Accept-Encoding"
    zipped = request(server.address, b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\n")
    assert zipped.headers["content-encoding"] == "gzip"
    assert gzip.decompress(zipped.body) == plain.body
    refused = request(server.address, b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip;q=0, identity\r\n\r\n")
    assert "content-encoding" not in refused.headers
    # What Prometheus sends: gzip, and OpenMetrics negotiated from Accept.
    prom = request(
        server.address,
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.1\r\n"
        b"Accept-Encoding: gzip\r\n\r\n",
    )
    assert prom.headers["content-type"].startswith("application/openmetrics-text")
    assert gzip.decompress(prom.body).endswith(b"# EOF\n")


def test_odd_but_valid_requests_are_served(server: MetricsServer) -> None:
    # prometheus_client's choose_encoder raises on this Accept; the server falls back to text.
    odd = request(server.address, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=abc\r\n\r\n")
    assert (odd.status, odd.headers["content-type"]) == (200, "text/plain; version=0.0.4; charset=utf-8")
    # 6,000 digits would overflow int(): the body is not read, the connection is closed.
    long = request(server.address, b"POST /metrics HTTP/1.1\r\nContent-Length: " + b"9" * 6000 + b"\r\n\r\n")
    assert (long.status, long.headers["connection"]) == (405, "close")
    absolute = request(server.address, b"GET http://localhost/metrics HTTP/1.1\r\n\r\n")
    assert absolute.status == 200
    assert request(server.address, b"GET http://[::1/metrics HTTP/1.1\r\n\r\n").status == 400
    # Empty lines before the request line are ignored (RFC 9112, 2.2).
    assert request(server.address, b"\r\n\r\nGET / HTTP/1.1\r\n\r\n").status == 200


@pytest.mark.parametrize(
    ("header", "expected"),
    [("gzip", True), ("deflate, gzip;q=0.8", True), ("GZIP", True), ("*", True), ("gzip;q=0", False), ("", False)],
)
def test_accept_encoding(header: str, expected: bool) -> None:
    assert accepts_gzip(header) is expected


def test_keep_alive_sequential_and_pipelined(server: MetricsServer) -> None:
    with closing(Client(server.address)) as client:
        for _ in range(3):
            client.send(GET_METRICS)
            response = client.response()
            assert response.status == 200
            assert "connection" not in response.headers
        client.send(GET_METRICS + b"HEAD /metrics HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert client.response().status == 200
        assert client.response(head=True).status == 200
        last = client.response()
        assert (last.status, last.headers["connection"]) == (200, "close")
        assert client.closed_by_server()


def test_http_1_0_closes_unless_asked_to_keep_alive(server: MetricsServer) -> None:
    with closing(Client(server.address)) as client:
        client.send(b"GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert client.response().headers["connection"] == "keep-alive"
        client.send(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert client.response().headers["connection"] == "close"
        assert client.closed_by_server()


def test_a_request_with_a_body_is_answered_then_closed(server: MetricsServer) -> None:
    with closing(Client(server.address)) as client:
        client.send(b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
        response = client.response()
        assert (response.status, response.headers["connection"]) == (405, "close")
        assert client.closed_by_server()


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
        (b"GET /metrics HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTX/1.1\r\n\r\n", 400),
        (b"\xff\xfe /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /m\xc3\xa9trics HTTP/1.1\r\n\r\n", 400),
        (b"GET metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nNoColon\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + (b"X: " + b"a" * 8000 + b"\r\n") * 5 + b"\r\n", 431),
    ],
    ids=lambda v: v.decode("latin-1")[:30] if isinstance(v, bytes) else str(v),
)
def test_malformed_requests_get_a_status_and_the_connection_is_closed(
    server: MetricsServer, data: bytes, status: int
) -> None:
    with closing(Client(server.address)) as client:
        client.send(data)
        response = client.response()
        assert response.status == status
        assert response.headers["connection"] == "close"
        assert client.closed_by_server()
    # and the server still serves
    assert request(server.address, GET_METRICS).status == 200


def test_a_long_valid_head_is_served(server: MetricsServer) -> None:
    """The buffer starts small and grows for a head up to max_head_bytes (here ~21 KiB)."""
    headers = b"".join(b"X-Big-%d: " % n + b"v" * 7000 + b"\r\n" for n in range(3))
    with closing(Client(server.address)) as client:
        for _ in range(2):  # and keeps serving on the same connection after shrinking back
            client.send(b"GET /metrics HTTP/1.1\r\n" + headers + b"\r\n")
            assert client.response().status == 200


def test_the_connection_limit_leaves_descriptors_for_the_collector() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (400, hard))
    try:
        running = MetricsServer(_registry(), "127.0.0.1", 0)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    running.stop()
    assert running.max_connections == 400 - _ACCEPT_BATCH - 64


# -- timeouts ---------------------------------------------------------------------------------------


def test_a_silent_connection_is_closed_after_the_request_timeout(server: MetricsServer) -> None:
    with closing(Client(server.address)) as client:
        assert client.closed_by_server(timeout=10)
    wait_for(lambda: server.connections == 0, timeout=10)


def test_a_slow_request_head_gets_408(server: MetricsServer) -> None:
    with closing(Client(server.address)) as client:
        client.send(b"GET /metrics HTTP/1.1\r\nHost: slow")
        response = client.response()
        assert response.status == 408
        assert client.closed_by_server()


def test_an_idle_keep_alive_connection_is_closed(server: MetricsServer) -> None:
    with closing(Client(server.address)) as client:
        client.send(GET_METRICS)
        assert client.response().status == 200
        assert client.closed_by_server(timeout=10)


def test_a_client_that_does_not_read_its_response_is_dropped() -> None:
    registry = CollectorRegistry()
    big = Gauge("closewait_test_big", "many series", ["n"], registry=registry)
    for n in range(60_000):
        big.labels(str(n)).set(n)
    running = MetricsServer(registry, "127.0.0.1", 0, FAST)
    running.start()
    try:
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(running.address)
            client.sendall(GET_METRICS)  # and never read the ~3 MB answer
            wait_for(lambda: running.connections == 1, timeout=10)
            wait_for(lambda: running.connections == 0, timeout=30)
    finally:
        running.stop()


# -- the connection limit ---------------------------------------------------------------------------


def test_silent_connections_are_evicted_to_serve_a_real_scrape(server: MetricsServer) -> None:
    silent = [Client(server.address) for _ in range(12)]
    try:
        wait_for(lambda: server.connections == FAST.max_connections, timeout=10)
        assert request(server.address, GET_METRICS).status == 200
        assert server.connections <= FAST.max_connections
        assert all(client.closed_by_server(timeout=10) for client in silent)
    finally:
        for client in silent:
            client.close()


class _PeakSet(set):  # type: ignore[type-arg]
    """A set that remembers its largest size: the server's accepted sockets, counted at every add."""

    peak = 0

    def add(self, item: object) -> None:
        super().add(item)
        self.peak = max(self.peak, len(self))


def test_a_burst_on_a_starved_loop_holds_at_most_one_batch_beyond_the_limit() -> None:
    """200 connects queue while the loop is busy (as on a loaded host): the server holds at most
    max_connections + one batch of accepted sockets, whichever turn connection_made and the closes of
    evicted ones run in, and leaves the rest in the kernel's queue until sockets close."""
    running = MetricsServer(_registry(), "127.0.0.1", 0, FAST)
    held = _PeakSet()
    running._held = held  # the count the bound is enforced on
    running.start()
    busy, connected = threading.Event(), threading.Event()
    running.loop.call_soon_threadsafe(lambda: (busy.set(), connected.wait(30)))
    assert busy.wait(10)
    burst: list[Client] = []
    try:
        try:
            for _ in range(200):  # connects complete in the kernel's accept queue
                burst.append(Client(running.address))
        finally:
            connected.set()
        assert all(client.closed_by_server(timeout=10) for client in burst)  # evicted or timed out
        assert held.peak == running.max_held == FAST.max_connections + _ACCEPT_BATCH
        assert request(running.address, GET_METRICS).status == 200
    finally:
        for client in burst:
            client.close()
        running.stop()
    assert len(held) == 0


def test_more_connections_than_the_limit_are_refused_quickly() -> None:
    """Every slot is busy with a response in flight: a new connection gets 503 (or a reset) at once.
    Identical scrapes that arrive while a render runs share the next render."""
    registry = CollectorRegistry()
    blocking = Blocking()
    registry.register(blocking)
    running = MetricsServer(registry, "127.0.0.1", 0, FAST)
    running.start()
    busy = [Client(running.address, timeout=30) for _ in range(FAST.max_connections)]
    try:
        for client in busy:
            client.send(GET_METRICS)
        assert blocking.entered.acquire(timeout=10)
        wait_for(lambda: running.statistics()["rendering"] == FAST.max_connections, timeout=10)
        for _ in range(3):
            with closing(Client(running.address, timeout=10)) as extra:
                try:
                    extra.send(GET_METRICS)
                    response = extra.response()
                    assert (response.status, response.headers["retry-after"]) == (503, "1")
                except (ConnectionResetError, BrokenPipeError, EOFError):
                    pass  # refused before the 503 could be read
        assert running.connections == FAST.max_connections
        blocking.release.set()
        for client in busy:
            assert client.response().status == 200
        # The four identical scrapes shared renders: the first, then one for the three that waited.
        assert blocking.calls == 2
    finally:
        blocking.release.set()
        for client in busy:
            client.close()
        running.stop()


def test_with_min_interval_0_scrapes_that_waited_share_the_next_scan() -> None:
    """The first scrape's scan is held until five more scrapes have arrived and wait for the lock:
    they are served one more scan (started after they arrived), not five."""
    first_scanning = threading.Event()
    release = threading.Event()
    arrivals = threading.Semaphore(0)

    def clock() -> float:
        if threading.current_thread().name.startswith("late"):
            arrivals.release()
        return time.monotonic()

    class Held(CloseWaitCollector):
        def scan_once(self) -> ScanResult:
            if not first_scanning.is_set():
                first_scanning.set()
                release.wait(30)
            return super().scan_once()

    collector = Held(min_interval=0, clock=clock)
    first = threading.Thread(target=collector.collect)
    first.start()
    assert first_scanning.wait(30)
    late = [threading.Thread(target=collector.collect, name=f"late-{n}") for n in range(5)]
    for thread in late:
        thread.start()
    for _ in late:
        assert arrivals.acquire(timeout=30)  # each has read the clock on arrival
    release.set()
    for thread in (first, *late):
        thread.join(timeout=60)
    scans = {m.name: m for m in collector.collect()}["closewait_scans"].samples[0].value
    assert scans == 3  # the first, one for the five late ones, and this last sequential scrape


# -- stopping ---------------------------------------------------------------------------------------


def test_stop_closes_every_connection_and_ends_every_thread() -> None:
    threads_before = {t.name for t in threading.enumerate()}
    fds_before = _fds()
    running = MetricsServer(_registry(), "127.0.0.1", 0, HttpLimits(stop_grace=2))
    running.start()
    address = running.address
    idle = Client(address)
    idle.send(GET_METRICS)
    assert idle.response().status == 200
    partial = Client(address)
    partial.send(b"GET /metrics HTTP/1.1\r\n")
    silent = Client(address)
    wait_for(lambda: running.connections == 3, timeout=10)
    running.stop()
    try:
        assert all(c.closed_by_server(timeout=10) for c in (idle, partial, silent))
    finally:
        for client in (idle, partial, silent):
            client.close()
    assert _fds() == fds_before
    assert {t.name for t in threading.enumerate()} == threads_before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5).close()
    running.stop()  # idempotent


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs iproute2's ss")
def test_the_listen_backlog_is_the_configured_one(server: MetricsServer) -> None:
    """asyncio would listen() with its accept batch; the kernel queue must stay at ``backlog``."""
    port = server.address[1]
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    (line,) = out.splitlines()
    with open("/proc/sys/net/core/somaxconn", encoding="ascii") as handle:
        somaxconn = int(handle.read())
    assert int(line.split()[2]) == min(FAST.backlog, somaxconn)  # Send-Q of a listener: its backlog


def test_an_unstarted_server_releases_its_port_and_descriptors() -> None:
    fds_before = _fds()
    running = MetricsServer(_registry(), "127.0.0.1", 0)
    running.stop()
    assert _fds() == fds_before


def test_limits_parse() -> None:
    assert HttpLimits.parse("request_timeout=1.5, max_connections=8") == HttpLimits(
        request_timeout=1.5, max_connections=8
    )
    assert HttpLimits.parse("") == HttpLimits()
    for bad in ("nope=1", "max_connections=1.5", "request_timeout=nan", "idle_timeout=0", "backlog=-1", "x"):
        with pytest.raises(UsageError):
            HttpLimits.parse(bad)


# -- a real exporter attacked by user nobody --------------------------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3"),
    reason="attacking as user nobody needs root, setpriv and /usr/bin/python3",
)

#: Each of N connections sends a request line, then 65 KB header lines without end, until the server
#: drops it or the deadline passes. Prints {"dropped": D, "open": O}.
HEADER_FLOOD = r"""
import json, socket, sys, threading, time
host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
line = b"X-Flood: " + b"a" * 65000 + b"\r\n"
dropped = []
def flood():
    deadline = time.monotonic() + seconds
    sock = socket.create_connection((host, port))
    sock.settimeout(0.5)
    try:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() < deadline:
            try:
                sock.sendall(line)
            except socket.timeout:
                pass
    except OSError:
        dropped.append(1)
    finally:
        sock.close()
threads = [threading.Thread(target=flood) for _ in range(count)]
for t in threads: t.start()
print("started", flush=True)
for t in threads: t.join()
print(json.dumps({"dropped": len(dropped), "open": count - len(dropped)}), flush=True)
"""

#: N connections that send nothing; prints "ready N" once connected, then how many the server closed
#: before the deadline: {"closed": C, "open": O}.
SILENT = r"""
import json, selectors, socket, sys, time
host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socks = [socket.create_connection((host, port)) for _ in range(count)]
print("ready", len(socks), flush=True)
sel = selectors.DefaultSelector()
for s in socks:
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
closed = 0
deadline = time.monotonic() + seconds
while closed < count and time.monotonic() < deadline:
    for key, _ in sel.select(timeout=0.2):
        try:
            data = key.fileobj.recv(4096)
        except OSError:
            data = b""
        if not data:
            sel.unregister(key.fileobj)
            closed += 1
for s in socks: s.close()
print(json.dumps({"closed": closed, "open": count - closed}), flush=True)
"""


#: The exporter's connection limit in the attack tests: below the 200 silent connections.
ATTACK_LIMIT = 64


class ExporterProcess:
    """``closewait exporter`` on a loopback port 0 with limits from the environment; ended by pid."""

    def __init__(self, limits: str = "") -> None:
        env = dict(os.environ)
        env[LIMITS_ENV] = limits
        self.proc = subprocess.Popen(
            [CLOSEWAIT, "exporter", "--listen", "127.0.0.1:0", "--recorder", "off"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert line.startswith("closewait exporter: serving http://127.0.0.1:"), line
        self.url = line.split("serving ", 1)[1].strip()
        host, port = self.url.removeprefix("http://").removesuffix("/metrics").rsplit(":", 1)
        self.host, self.port = host, int(port)

    def status_kib(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"{field} missing")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def attack(self, script: str, *args: object) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*AS_NOBODY, "/usr/bin/python3", "-c", script, self.host, str(self.port), *map(str, args)],
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "HOME": "/"},
        )

    def stop(self) -> None:
        stop_process(self.proc)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def exporter_process() -> Iterator[ExporterProcess]:
    running = ExporterProcess(f"request_timeout=2,linger_timeout=1,max_connections={ATTACK_LIMIT}")
    yield running
    running.stop()


def _finish(attacker: subprocess.Popen[str], timeout: float) -> dict[str, int]:
    # Not communicate(): it reads the pipe itself, losing what the readline() of "started"/"ready"
    # already buffered, e.g. the result line of an attacker the server dropped at once.
    assert attacker.stdout is not None
    try:
        attacker.wait(timeout=timeout)  # it prints two short lines: the pipe cannot fill up
        out = attacker.stdout.read()
    finally:
        stop_process(attacker)
        attacker.stdout.close()
    result: dict[str, int] = json.loads(out.splitlines()[-1])
    return result


def test_real_exporter_http_semantics(exporter_process: ExporterProcess) -> None:
    url = exporter_process.url
    response = requests.get(url, timeout=30)  # requests asks for gzip, as Prometheus does
    assert (response.status_code, response.headers["Content-Encoding"]) == (200, "gzip")
    assert any(f.name == "closewait_tcp_sockets" for f in text_string_to_metric_families(response.text))
    head = requests.head(url, timeout=30)
    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["Content-Length"]) > 0
    root = url.removesuffix("metrics")
    assert requests.get(root, timeout=10).status_code == 200
    for method, target, status in (("POST", url, 405), ("DELETE", root, 405), ("GET", root + "x", 404)):
        answer = requests.request(method, target, timeout=10)
        assert answer.status_code == status, (method, target)
        if status == 405:
            assert answer.headers["Allow"] == "GET, HEAD"


@needs_root
def test_endless_header_lines_from_nobody_keep_memory_bounded(exporter_process: ExporterProcess) -> None:
    """40 connections sending endless 65 KB header lines (the issue: 49 -> 272 MB with wsgiref)."""
    assert requests.get(exporter_process.url, timeout=30).status_code == 200
    rss_before = exporter_process.status_kib("VmRSS")
    attacker = exporter_process.attack(HEADER_FLOOD, 40, 8)
    peak = rss_before
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "started"
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            peak = max(peak, exporter_process.status_kib("VmRSS"))
            time.sleep(0.05)
        assert requests.get(exporter_process.url, timeout=30).status_code == 200  # still serving
        result = _finish(attacker, timeout=60)
    finally:
        stop_process(attacker)
    assert result == {"dropped": 40, "open": 0}
    # 40 x 32 KiB of request buffers = 1.25 MiB; allow for allocator noise.
    assert peak - rss_before < 8 * 1024, (rss_before, peak)
    wait_for(lambda: exporter_process.fds() <= 8, timeout=10)


@needs_root
def test_200_silent_connections_from_nobody_are_bounded_and_closed(exporter_process: ExporterProcess) -> None:
    assert requests.get(exporter_process.url, timeout=30).status_code == 200
    fds_before = exporter_process.fds()
    rss_before = exporter_process.status_kib("VmRSS")
    limits = HttpLimits(max_connections=ATTACK_LIMIT)
    attacker = exporter_process.attack(SILENT, 200, 30)
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(exporter_process.fds())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline().split() == ["ready", "200"]
        # Once the burst is accepted: one descriptor per admitted connection, the rest were evicted.
        wait_for(lambda: exporter_process.fds() <= fds_before + limits.max_connections, timeout=10)
        # a normal scrape still answers while they are held
        assert requests.get(exporter_process.url, timeout=30).status_code == 200
        rss_during = exporter_process.status_kib("VmRSS")
        result = _finish(attacker, timeout=60)
    finally:
        done.set()
        sampler.join()
        stop_process(attacker)
    # During the burst, at most one batch of accepted sockets beyond the limit is open (waiting for
    # connection_made or closing after an eviction): the server stops accepting at that count.
    assert max(samples) <= fds_before + limits.max_connections + _ACCEPT_BATCH, (fds_before, max(samples))
    assert rss_during - rss_before < 8 * 1024, (rss_before, rss_during)
    # every silent connection was closed: evicted, or after the 2 s request timeout
    assert result == {"closed": 200, "open": 0}
    wait_for(lambda: exporter_process.fds() <= fds_before, timeout=10)
