"""The exporter's HTTP server: /metrics for Prometheus, hardened so no local user can exhaust it.

Why a purpose-built server. The exporter serves two URLs to a handful of clients (a Prometheus HA
pair, a federation, the odd curl or dashboard), but it often runs as root on every node, so any local
user can connect to it. wsgiref's ThreadingWSGIServer (what prometheus_client's own
``start_http_server`` uses, and what closewait used before) starts one thread per connection with no
limit, has no timeouts, a listen backlog of 5 and no bound on header size: 40 connections sending
endless header lines took a root exporter from 49 MB to 272 MB, 200 silent connections each held a
thread forever. No maintained pure-Python server in the dependency set offers all the bounds below,
and the whole protocol needed here (GET/HEAD, no request bodies, Content-Length responses,
keep-alive) is small enough to own and test: about 600 lines with every limit explicit.

Design: **asyncio in one thread with its own event loop, plus a small bounded thread pool for
rendering.** asyncio (standard library) gives non-blocking accept/read/write, timers for every
timeout and flow-control callbacks, so one thread holds every connection and a silent connection
costs a buffer, not a thread. Connections are ``asyncio.BufferedProtocol`` objects: the kernel reads
straight into one fixed buffer per connection (``recv_into``), so a connection can never make the
server hold more than that buffer, however much it sends (a stream reader would grow by up to a
256 KiB read at a time). Rendering ``/metrics`` runs the collector, which may scan /proc for
hundreds of ms, so it runs in a ``ThreadPoolExecutor`` of ``render_workers`` threads (default 2).
Renders are coalesced per (Accept, Accept-Encoding, query): a scrape arriving while an identical
render runs waits for the next one, which starts when the running one ends, so a burst of N scrapes
costs at most two renders, and never serves data older than the request. (The collector also
shares one scan between scrapes, but only between those already inside ``collect()``.) The pool's
queue is bounded by the number of distinct keys in flight, itself bounded by the connection limit,
since a connection has at most one request in flight (the next one is not parsed before the answer
is written).

The limits (``HttpLimits``; docs/monitoring.md "The HTTP server" has the table):

- **Connections**: at most ``max_connections`` (512, and never more than RLIMIT_NOFILE leaves
  after one accept batch of 128 and 64 descriptors for the collector) open at once. Node exporters built on Go
  do not limit connections at all; a limit is kept here, with eviction so an attacker cannot use it
  against real scrapes: a connection beyond the limit closes the best evictable connection (one
  lingering after its last response, else the longest idle keep-alive, else the oldest still sending
  its request head), so silent or slow clients cannot hold every slot against a real scrape, whose
  request arrives right after its connect; only if every slot is rendering or writing a response is
  the newcomer refused (``503``, closed at once). Listen backlog ``backlog`` (1024, capped by
  net.core.somaxconn), so bursts from HA pairs and dashboards, or an attacker's connection churn
  while a scan holds the GIL, do not overflow the accept queue (a dropped SYN costs a client 1 s);
  connections are accepted 128 per loop turn, and only while fewer than ``max_connections`` + 128
  accepted sockets are open (see Descriptors).
- **Request size**: request line and each header line at most ``max_line`` (8 KiB, else 414/431),
  at most ``max_headers`` (100) header lines, the whole head at most ``max_head_bytes`` (32 KiB,
  else 431). Requests with a body (Content-Length > 0 or Transfer-Encoding) are answered (405/404)
  and the connection is closed.
- **Time**: the request head must arrive within ``request_timeout`` (10 s) of the connection or of
  its first byte after an idle keep-alive (slowloris: then 408 and close; a connection that sent
  nothing is just closed); an idle keep-alive connection is closed after ``idle_timeout`` (30 s); a
  response the client does not read within ``write_timeout`` (30 s) aborts the connection; after a
  final response the server shuts down its side and discards input for at most ``linger_timeout``
  (2 s) and ``max_head_bytes``, so the kernel does not reset the connection before the client has
  read the answer, and a client that keeps sending gets no free reads.
- **Memory**: the request buffer starts at 4 KiB and doubles only while a valid head is longer
  (lines are kept as offsets into it, copied only once the head is complete), so a connection
  holds at most ``max_head_bytes`` + ~4 KiB of asyncio objects: at most 512 x 36 KiB = 18 MiB for
  all of them (measured: a silent connection adds 6.7 KiB of RSS, one with a 28 KB head 35.5 KiB),
  plus one response per connection being written (a /metrics body is ~5 KB at ``--top 20``, less
  gzipped).
- **Descriptors**: listener + epoll + the loop's wake-up pair + at most ``max_connections`` + 128
  accepted sockets, whatever the scheduling. The server accepts in its own reader callback and counts
  every socket from ``accept()`` until its descriptor is closed: admitted connections, ones whose
  ``connection_made`` has not run yet (asyncio builds a transport in a task and calls it a turn
  later) and evicted or refused ones whose close is still scheduled (``abort()`` closes the
  descriptor a turn later). While that count is at ``max_connections`` + 128 the listener is not
  read, so further connects wait in the kernel's queue, costing no descriptor; it is read again as
  soon as one closes. (asyncio's own accept path bounds none of this: a starved loop accepted a
  200-connection burst in two turns before admitting any.)

HTTP: ``GET``/``HEAD`` on ``/metrics`` (HEAD: the same headers, Content-Length included, no body)
and on ``/`` (a small page); ``404`` for other paths, ``405`` with ``Allow: GET, HEAD`` for other
methods; the exposition format is negotiated from ``Accept`` like prometheus_client does
(OpenMetrics for Prometheus), ``name[]`` query parameters restrict the families, and the body is
gzipped when ``Accept-Encoding`` allows it (Prometheus always asks). HTTP/1.1 keep-alive with
Content-Length on every response; HTTP/1.0 closes unless asked to keep alive.

``stop()`` closes the listener, closes idle connections at once, lets responses in flight finish
for up to ``stop_grace`` seconds, aborts the rest, ends the loop thread and the render threads: no
descriptor or thread is left.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import errno
import gzip
import logging
import os
import re
import resource
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.registry import CollectorRegistry

from closewait.display import format_address
from closewait.errors import UsageError

log = logging.getLogger(__name__)

#: Environment variable read by ``closewait exporter`` to override limits (tests, tuning):
#: comma-separated ``name=value`` pairs of ``HttpLimits`` fields, e.g. ``request_timeout=1,max_connections=8``.
LIMITS_ENV = "CLOSEWAIT_EXPORTER_HTTP"


@dataclass(frozen=True)
class HttpLimits:
    """Every bound the server enforces. The defaults suit a node exporter; tests shorten the timeouts."""

    max_connections: int = 512
    backlog: int = 1024
    max_line: int = 8192
    max_headers: int = 100
    max_head_bytes: int = 32768
    request_timeout: float = 10.0
    idle_timeout: float = 30.0
    write_timeout: float = 30.0
    linger_timeout: float = 2.0
    render_workers: int = 2
    stop_grace: float = 5.0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not value > 0 or value == float("inf"):  # also refuses NaN
                raise UsageError(f"{LIMITS_ENV}: {item.name} must be a positive finite number, got {value!r}")
        if self.max_line > self.max_head_bytes:
            raise UsageError(f"{LIMITS_ENV}: max_line ({self.max_line}) exceeds max_head_bytes ({self.max_head_bytes})")

    @classmethod
    def parse(cls, text: str) -> HttpLimits:
        """``"request_timeout=1,max_connections=8"`` -> HttpLimits; UsageError with one line otherwise."""
        kinds = {item.name: item.type for item in fields(cls)}
        values: dict[str, Any] = {}
        for pair in filter(None, (part.strip() for part in text.split(","))):
            name, sep, raw = pair.partition("=")
            name = name.strip()
            if not sep or name not in kinds:
                raise UsageError(f"{LIMITS_ENV}: expected NAME=VALUE with NAME one of {', '.join(kinds)}, got {pair!r}")
            raw = raw.strip()
            if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", raw, flags=re.ASCII):
                raise UsageError(f"{LIMITS_ENV}: {name}={raw!r} is not a decimal number")
            values[name] = int(raw) if kinds[name] == "int" and raw.isdigit() else float(raw)
            if kinds[name] == "int" and not isinstance(values[name], int):
                raise UsageError(f"{LIMITS_ENV}: {name} must be a whole number, got {raw!r}")
        return cls(**values)

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> HttpLimits:
        text = (os.environ if environ is None else environ).get(LIMITS_ENV, "")
        return cls.parse(text)


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HTTP_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]")
_INDEX = (
    b"<html><head><title>closewait exporter</title></head><body>"
    b'<h1>closewait exporter</h1><a href="/metrics">/metrics</a></body></html>\n'
)
_ALLOW = "GET, HEAD"


DEFAULT_LISTEN = "127.0.0.1:9947"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port). Port 0 asks the kernel for a free port.

    Raises UsageError with one line for anything else.
    """
    value = text.strip()
    host, sep, port_text = value.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()):
        raise UsageError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9947 or [::1]:9947")
    port = int(port_text)
    if port > 65535:
        raise UsageError(f"--listen {text!r}: port {port} is out of range (0-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise UsageError(f"--listen {text!r}: give a host (0.0.0.0 to listen on every interface)")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV)
    except socket.gaierror as err:
        raise UsageError(f"--listen {text!r}: cannot resolve {host!r}: {err.strerror}") from None
    return host, port


def accepts_gzip(accept_encoding: str) -> bool:
    """True if ``Accept-Encoding`` lists gzip (or ``*``) with a non-zero q-value."""
    for item in accept_encoding.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        if coding.lower() not in ("gzip", "x-gzip", "*"):
            continue
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            return True
    return False


def render_metrics(
    registry: CollectorRegistry, accept: str, accept_encoding: str, query: str
) -> tuple[list[tuple[str, str]], bytes]:
    """Headers and body of a /metrics response (runs in a render thread: it may scan the host)."""
    try:
        encoder, content_type = choose_encoder(accept)
    except (TypeError, ValueError, IndexError):  # prometheus_client 0.26 fails on e.g. "version=abc"
        encoder, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
    params = parse_qs(query)
    target = registry.restricted_registry(params["name[]"]) if "name[]" in params else registry
    body = encoder(target)
    headers = [("Content-Type", content_type), ("Vary", "Accept-Encoding")]
    if accepts_gzip(accept_encoding):
        body = gzip.compress(body, compresslevel=6)
        headers.append(("Content-Encoding", "gzip"))
    return headers, body


_Rendered = tuple[list[tuple[str, str]], bytes]
_RenderKey = tuple[str, str, str]  # Accept, Accept-Encoding, query string


@dataclass
class _RenderJob:
    """One render shared by every request attached to it (each gets the same immutable answer)."""

    waiters: list[Callable[[_Rendered | BaseException], None]]
    pending: _RenderJob | None = None  # requests that arrived while this one ran: served by the next


class _State(enum.Enum):
    IDLE = "idle"  # between requests on a keep-alive connection, nothing received yet
    READING = "reading"  # receiving a request head (a new connection starts here)
    RENDERING = "rendering"  # the response is being made; reading is paused
    WRITING = "writing"  # the response is in the transport's buffer
    CLOSING = "closing"  # final response sent, our side shut down, discarding input until EOF


#: A connection's first request buffer; it doubles up to max_head_bytes only for a large request head.
_FIRST_BUFFER = 4096
#: Connections accepted per loop turn, and how many accepted sockets may be open beyond the limit
#: (waiting to be admitted, or closing after an eviction or a refusal).
_ACCEPT_BATCH = 128
#: Descriptors kept free for the collector (netlink sockets, /proc files, namespaces) and stdio.
_FD_RESERVE = 64

#: States whose connection may be closed to make room for a new one, best victim first.
_EVICTABLE = {_State.CLOSING: 0, _State.IDLE: 1, _State.READING: 2}


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    keep_alive: bool
    http10: bool


def _parse_head(lines: list[bytes]) -> _Request:
    """The request line and header lines (without line ends) -> _Request, or _BadRequest."""
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise _BadRequest(400, "malformed request line")
    raw_method, raw_target, raw_version = parts
    version = raw_version.decode("ascii", "replace")
    if not _HTTP_VERSION.fullmatch(version):
        raise _BadRequest(400, "malformed HTTP version")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(505, f"{version} is not supported; use HTTP/1.1")
    if not _TOKEN.fullmatch(raw_method):
        raise _BadRequest(400, "malformed method")
    try:
        target = raw_target.decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(400, "non-ASCII request target") from None
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in target):
        raise _BadRequest(400, "control character in request target")
    if target.startswith("/"):
        path, _, query = target.partition("?")
    elif target.startswith(("http://", "https://")):  # absolute form (proxies)
        try:
            split = urlsplit(target)
        except ValueError:  # e.g. a bad [IPv6] authority
            raise _BadRequest(400, "malformed request target") from None
        path, query = split.path or "/", split.query
    else:
        raise _BadRequest(400, "malformed request target")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):  # also refuses obsolete line folding
            raise _BadRequest(400, "malformed header line")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    http10 = version == "HTTP/1.0"
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "keep-alive" in tokens if http10 else "close" not in tokens
    if "transfer-encoding" in headers:
        keep_alive = False  # a body we do not read: answer, then close
    elif "content-length" in headers:
        length = headers["content-length"]
        if not length.isascii() or not length.isdigit():
            raise _BadRequest(400, "malformed Content-Length")
        if length.strip("0"):  # not int(): a header line may hold 8,000 digits
            keep_alive = False
    return _Request(raw_method.decode("ascii"), path, query, headers, keep_alive, http10)


class _Connection(asyncio.BufferedProtocol):
    """One client connection: a state machine driven by the event loop (never blocks)."""

    def __init__(self, server: MetricsServer) -> None:
        self._server = server
        self._limits = server.limits
        self._loop = server.loop
        self._buffer = bytearray(min(_FIRST_BUFFER, self._limits.max_head_bytes))
        self._view = memoryview(self._buffer)
        self._filled = 0
        self._discard_budget = 0  # bytes still read and dropped while CLOSING
        self._line_start = 0  # where the head's current (incomplete) line starts
        self._lines: list[tuple[int, int]] = []  # (start, end) in the buffer: no copies until dispatch
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._keep_alive = True
        self._peer_eof = False
        self.state = _State.READING
        self.since = self._loop.time()

    # -- asyncio callbacks -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        # pause_writing() whenever anything is left unsent, resume_writing() when all of it is.
        transport.set_write_buffer_limits(high=0)
        if not self._server.admit(self):
            self._keep_alive = False
            transport.write(self._response_bytes(503, [("Retry-After", "1")], b"too many connections\n"))
            transport.close()
            return
        self._arm(self._limits.request_timeout, self._on_request_timeout)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.state is _State.CLOSING:
            self._filled = 0  # discard
        return self._view[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self.state is _State.CLOSING:
            self._filled = 0
            self._discard_budget -= nbytes
            if self._discard_budget < 0:  # a client that keeps sending gets no more reads for free
                self._abort()
            return
        if self.state is _State.IDLE:
            self.state = _State.READING
            self.since = self._loop.time()
            self._arm(self._limits.request_timeout, self._on_request_timeout)
        if self.state is _State.READING:
            self._parse()

    def eof_received(self) -> bool:
        self._peer_eof = True
        self._keep_alive = False
        # Keep our side open only to finish a response already being made.
        return self.state in (_State.RENDERING, _State.WRITING)

    def pause_writing(self) -> None:
        if self.state is _State.WRITING:
            self._arm(self._limits.write_timeout, self._abort)

    def resume_writing(self) -> None:
        if self.state is _State.WRITING:
            self._written()

    def connection_lost(self, exc: Exception | None) -> None:
        # The transport closes the descriptor right after this returns, in the same callback.
        self._disarm()
        self._server.forget(self)
        self._transport = None

    # -- reading and parsing -----------------------------------------------------------------------

    def _parse(self) -> None:
        """Advance over complete lines; dispatch when the head is complete, refuse when a bound is hit."""
        buffer, limits = self._buffer, self._limits
        while True:
            end = buffer.find(b"\n", self._line_start, self._filled)
            if end < 0:
                if self._filled - self._line_start > limits.max_line:
                    self._refuse(414 if not self._lines else 431, "line too long")
                elif self._filled == len(buffer):
                    if len(buffer) >= limits.max_head_bytes:
                        self._refuse(431, "request head too large")
                    else:
                        self._grow()
                return
            start, stop = self._line_start, end - 1 if end > self._line_start and buffer[end - 1] == 13 else end
            self._line_start = end + 1
            if stop - start > limits.max_line:
                self._refuse(414 if not self._lines else 431, "line too long")
                return
            if stop == start:
                if not self._lines:
                    continue  # empty lines before a request line are allowed (RFC 9112, 2.2)
                self._dispatch()
                return
            self._lines.append((start, stop))
            if len(self._lines) > limits.max_headers + 1:
                self._refuse(431, "too many header lines")
                return

    def _grow(self) -> None:
        """Double the buffer (a new one: the transport may hold a view of the old), up to max_head_bytes."""
        bigger = bytearray(min(2 * len(self._buffer), self._limits.max_head_bytes))
        bigger[: self._filled] = self._buffer[: self._filled]
        self._buffer, self._view = bigger, memoryview(bigger)

    def _take_head(self) -> list[bytes]:
        """The parsed lines; bytes after the head (a pipelined request) move to the buffer's start,
        which shrinks back to its first size if it grew."""
        lines = [bytes(self._buffer[start:stop]) for start, stop in self._lines]
        rest = self._filled - self._line_start
        if len(self._buffer) > _FIRST_BUFFER and rest <= _FIRST_BUFFER:
            smaller = bytearray(_FIRST_BUFFER)
            smaller[:rest] = self._buffer[self._line_start : self._filled]
            self._buffer, self._view = smaller, memoryview(smaller)
        else:
            self._buffer[:rest] = self._buffer[self._line_start : self._filled]
        self._filled, self._line_start, self._lines = rest, 0, []
        return lines

    def _dispatch(self) -> None:
        assert self._transport is not None
        self._disarm()
        self._transport.pause_reading()
        lines = self._take_head()
        try:
            request = _parse_head(lines)
        except _BadRequest as err:
            self._keep_alive = False
            self._send(err.status, [], f"{err}\n".encode(), head_only=False)
            return
        self._keep_alive = request.keep_alive and not self._server.stopping
        self._http10_keep_alive = request.http10 and self._keep_alive
        head_only = request.method == "HEAD"
        log.debug("%s %s", request.method, request.path)
        if request.path not in ("/", "/metrics"):
            self._send(404, [], b"not found: the metrics are at /metrics\n", head_only=head_only)
        elif request.method not in ("GET", "HEAD"):
            body = f"method {request.method} not allowed; use GET or HEAD\n".encode()
            self._send(405, [("Allow", _ALLOW)], body, head_only=head_only)
        elif request.path == "/":
            self._send(200, [("Content-Type", "text/html; charset=utf-8")], _INDEX, head_only=head_only)
        else:
            self.state = _State.RENDERING
            self.since = self._loop.time()
            key = (request.headers.get("accept", ""), request.headers.get("accept-encoding", ""), request.query)
            self._server.render(key, lambda outcome: self._rendered(outcome, head_only))

    def _rendered(self, outcome: _Rendered | BaseException, head_only: bool) -> None:
        if self._transport is None:
            return
        if isinstance(outcome, RuntimeError) and self._server.stopping:
            self._keep_alive = False
            self._send(503, [], b"stopping\n", head_only=head_only)
        elif isinstance(outcome, BaseException):
            self._keep_alive = False
            self._send(500, [], b"rendering the metrics failed; see the exporter's log\n", head_only=head_only)
        else:
            headers, body = outcome
            self._send(200, headers, body, head_only=head_only)

    def _refuse(self, status: int, reason: str) -> None:
        assert self._transport is not None
        self._disarm()
        self._transport.pause_reading()
        self._keep_alive = False
        self._send(status, [], f"{reason}\n".encode(), head_only=False)

    # -- writing -----------------------------------------------------------------------------------

    _http10_keep_alive = False

    def _response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes, length: int = -1) -> bytes:
        lines = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            f"Date: {formatdate(usegmt=True)}",
            f"Content-Length: {len(body) if length < 0 else length}",
            *(f"{name}: {value}" for name, value in headers),
        ]
        if status != 200 and not any(name == "Content-Type" for name, _ in headers):
            lines.append("Content-Type: text/plain; charset=utf-8")
        if not self._keep_alive:
            lines.append("Connection: close")
        elif self._http10_keep_alive:
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, *, head_only: bool) -> None:
        transport = self._transport
        assert transport is not None
        if self._server.stopping:
            self._keep_alive = False
        data = self._response_bytes(status, headers, b"" if head_only else body, len(body))
        self.state = _State.WRITING
        self.since = self._loop.time()
        transport.write(data)  # calls pause_writing() (arming the write timeout) if not all sent
        if transport.get_write_buffer_size() == 0:
            self._written()

    def _written(self) -> None:
        """The response left our buffer: wait for the next request, or close."""
        transport = self._transport
        assert transport is not None
        self._disarm()
        if not self._keep_alive or self._peer_eof:
            self._linger()
            return
        self.state = _State.IDLE
        self.since = self._loop.time()
        self._arm(self._limits.idle_timeout, self.close)
        transport.resume_reading()
        if self._filled:  # a pipelined request is already here
            self.buffer_updated(0)

    def _linger(self) -> None:
        """Shut down our side and read until the client closes (at most linger_timeout), so that
        unread request bytes do not make the kernel reset the connection before the answer is read."""
        transport = self._transport
        assert transport is not None
        self.state = _State.CLOSING
        self.since = self._loop.time()
        if self._peer_eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._filled = 0
        self._discard_budget = self._limits.max_head_bytes
        self._arm(self._limits.linger_timeout, self.close)
        transport.resume_reading()

    # -- timers and closing ------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self._loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_request_timeout(self) -> None:
        self._timer = None
        if self._transport is None:
            return
        if self._filled == 0 and not self._lines:
            self._abort()  # a silent connection gets nothing
            return
        self._keep_alive = False
        self._transport.pause_reading()
        self._transport.write(self._response_bytes(408, [], b"request not received in time\n"))
        self._transport.close()
        # close() waits for the answer to be sent: a client that also does not read is aborted.
        self._timer = self._loop.call_later(self._limits.write_timeout, self._abort)

    def close(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.close()

    def _abort(self) -> None:
        self._disarm()
        if self._transport is not None:
            self._transport.abort()

    def evict(self) -> None:
        self._abort()

    def stop(self) -> None:
        """The server is stopping: close unless a response is on its way (it closes after it)."""
        if self.state in _EVICTABLE:
            self._abort()
        else:
            self._keep_alive = False


class MetricsServer:
    """Serves ``registry`` at /metrics over HTTP within ``limits``. Binding (and listening) happens in
    the constructor, so a bad address or a port in use raises UsageError before anything starts."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, limits: HttpLimits | None = None) -> None:
        self.registry = registry
        self.limits = limits or HttpLimits()
        self.stopping = False
        self._connections: set[_Connection] = set()  # admitted: counted against the limit
        self._held: set[_Connection] = set()  # every accepted socket whose descriptor is open
        self._accepting = False  # the listener is being read
        self._serving = False
        self._renders: dict[_RenderKey, _RenderJob] = {}
        where = format_address(host, port)
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        except (socket.gaierror, UnicodeError) as err:
            raise UsageError(f"cannot listen on {where}: {getattr(err, 'strerror', None) or err}") from None
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(sockaddr)
            listener.listen(self.limits.backlog)
        except OSError as err:
            listener.close()
            raise UsageError(f"cannot listen on {where}: {err.strerror or err}") from None
        listener.setblocking(False)
        self._listener = listener
        self._address = listener.getsockname()[:2]
        # Never let connections (plus one accept burst) take the descriptors the collector needs.
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        room = self.limits.max_connections
        if soft != resource.RLIM_INFINITY:
            room = soft - _ACCEPT_BATCH - _FD_RESERVE
        self.max_connections = max(1, min(self.limits.max_connections, room))
        #: Accepted sockets open at once, at most: the limit + one batch (waiting for connection_made,
        #: or evicted and closing). Reaching it pauses accepting.
        self.max_held = self.max_connections + _ACCEPT_BATCH
        if self.max_connections < self.limits.max_connections:
            log.warning(
                "serving at most %d connections, not %d: RLIMIT_NOFILE is %d",
                self.max_connections,
                self.limits.max_connections,
                soft,
            )
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_log_loop_error)
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.limits.render_workers, thread_name_prefix="closewait-render"
        )
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._address
        return str(host), int(port)

    @property
    def url(self) -> str:
        return f"http://{format_address(*self.address)}/metrics"

    @property
    def connections(self) -> int:
        """Connections open now (read from another thread: a snapshot for tests and benchmarks)."""
        return len(self._connections)

    def statistics(self) -> dict[str, int]:
        """Open connections per state (``idle``, ``reading``, ``rendering``, ``writing``, ``closing``)
        and ``renders`` running, taken on the loop thread; a snapshot for tests and benchmarks."""

        async def take() -> dict[str, int]:
            counts = {state.value: 0 for state in _State}
            for connection in self._connections:
                counts[connection.state.value] += 1
            counts["renders"] = len(self._renders)
            return counts

        if self._thread is not None and self._thread.is_alive():
            return asyncio.run_coroutine_threadsafe(take(), self.loop).result(timeout=10)
        return {state.value: 0 for state in _State} | {"renders": 0}

    def start(self) -> None:
        """Start serving in a thread named closewait-exporter; returns once connections are accepted."""
        # Not loop.create_server(): its accept path cannot be bounded (see the module docstring).
        self._serving = True
        self._resume_accepting()
        self._thread = threading.Thread(target=self.loop.run_forever, name="closewait-exporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the listener and every connection (responses in flight get ``stop_grace`` seconds),
        end the loop and render threads. Idempotent."""
        if self._thread is not None and self._thread.is_alive():
            done = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
            done.result(timeout=self.limits.stop_grace + 10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        elif self._serving and not self.loop.is_closed():
            self.loop.run_until_complete(self._shutdown())
        self._listener.close()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if not self.loop.is_closed() and not self.loop.is_running():
            self.loop.close()

    async def _shutdown(self) -> None:
        self.stopping = True
        self._pause_accepting()
        self._listener.close()
        for connection in list(self._connections):
            connection.stop()
        deadline = self.loop.time() + self.limits.stop_grace
        while self._held and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        # Every accepted socket, admitted or not, is closed before the loop ends: abort() closes the
        # descriptor a turn later, and one still waiting for connection_made is refused there.
        while self._held:
            for connection in list(self._held):
                connection.evict()
            await asyncio.sleep(0)

    # -- rendering (called on the loop thread) ----------------------------------------------------

    def render(self, key: _RenderKey, waiter: Callable[[_Rendered | BaseException], None]) -> None:
        """Render /metrics for ``key`` in the pool and call ``waiter`` with the answer on the loop.

        Requests are coalesced: a request arriving while a render for the same key runs waits for
        the next one, which starts when the running one ends, so its data is never older than the
        request, and a burst of N scrapes costs at most two renders (two scans at --min-interval 0)
        instead of N queued one after the other.
        """
        running = self._renders.get(key)
        if running is None:
            self._start_render(key, _RenderJob([waiter]))
        elif running.pending is None:
            running.pending = _RenderJob([waiter])
        else:
            running.pending.waiters.append(waiter)

    def _start_render(self, key: _RenderKey, job: _RenderJob) -> None:
        self._renders[key] = job
        try:
            future = self.loop.run_in_executor(self.executor, render_metrics, self.registry, *key)
        except RuntimeError as err:  # the pool is shut down: stopping
            self._finish_render(key, job, err)
            return
        future.add_done_callback(lambda done: self._rendered(key, job, done))

    def _rendered(self, key: _RenderKey, job: _RenderJob, future: asyncio.Future[_Rendered]) -> None:
        outcome: _Rendered | BaseException
        if future.cancelled():
            outcome = RuntimeError("stopping")
        elif future.exception() is not None:
            outcome = future.exception() or RuntimeError()
            log.error("rendering /metrics failed", exc_info=outcome)
        else:
            outcome = future.result()
        self._finish_render(key, job, outcome)

    def _finish_render(self, key: _RenderKey, job: _RenderJob, outcome: _Rendered | BaseException) -> None:
        # The next job takes the key before any waiter runs: a waiter may dispatch a pipelined request.
        if job.pending is not None:
            self._start_render(key, job.pending)
        elif self._renders.get(key) is job:
            del self._renders[key]
        for waiter in job.waiters:
            try:
                waiter(outcome)
            except Exception:
                log.exception("answering a scrape failed")

    # -- accepting (called on the loop thread) ----------------------------------------------------

    def _accept(self) -> None:
        """The listener is readable: accept up to one batch, never holding more than ``max_held``
        accepted sockets; at ``max_held`` stop reading the listener until one of them is closed."""
        for _ in range(_ACCEPT_BATCH):
            if len(self._held) >= self.max_held:
                self._pause_accepting()
                return
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # the queue is empty, or that client gave up
            except OSError as err:
                if err.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise  # the loop logs it through _log_loop_error
                # Linux keeps the listener readable: wait a second instead of spinning.
                log.warning("accepting connections paused for 1 s: %s", err)
                self._pause_accepting()
                self.loop.call_later(1.0, self._resume_accepting)
                return
            self._connect(sock)

    def _connect(self, sock: socket.socket) -> None:
        """Give an accepted socket its transport and connection, counting it in ``_held`` at once.

        The transport (made by a public API, unlike create_server's) is made in a task and calls
        connection_made a turn later; a socket whose transport never starts is closed here."""
        connection = _Connection(self)
        self._held.add(connection)

        def started(task: asyncio.Task[Any]) -> None:
            if task.cancelled() or task.exception() is not None:
                log.debug("an accepted connection did not start: %r", None if task.cancelled() else task.exception())
                sock.close()  # a no-op if its transport closed it already
                self.forget(connection)

        task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: connection, sock))
        task.add_done_callback(started)

    def _pause_accepting(self) -> None:
        if self._accepting:
            self._accepting = False
            self.loop.remove_reader(self._listener)

    def _resume_accepting(self) -> None:
        if not self._accepting and self._serving and not self.stopping and len(self._held) < self.max_held:
            self._accepting = True
            self.loop.add_reader(self._listener, self._accept)

    # -- connection accounting (called on the loop thread) ----------------------------------------

    def admit(self, connection: _Connection) -> bool:
        """Count ``connection`` in; over the limit, close the best evictable one or refuse it (False)."""
        if self.stopping:
            return False
        if len(self._connections) >= self.max_connections:
            victims = [c for c in self._connections if c.state in _EVICTABLE]
            if not victims:
                log.debug("refusing a connection: %d responses in flight", len(self._connections))
                return False
            victim = min(victims, key=lambda c: (_EVICTABLE[c.state], c.since))
            log.debug("evicting a %s connection to make room", victim.state.value)
            self._connections.discard(victim)
            victim.evict()
        self._connections.add(connection)
        return True

    def forget(self, connection: _Connection) -> None:
        """``connection``'s descriptor is closed (or about to be, in the same callback)."""
        self._connections.discard(connection)
        self._held.discard(connection)
        if not self._accepting:
            self._resume_accepting()


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Errors the loop cannot hand to a protocol (accept failures such as EMFILE): logged, not fatal."""
    error = context.get("exception")
    if isinstance(error, (ConnectionError, TimeoutError)):
        log.debug("%s: %s", context.get("message"), error)
    else:
        log.warning("%s: %s", context.get("message"), error or "")


__all__ = [
    "DEFAULT_LISTEN",
    "LIMITS_ENV",
    "HttpLimits",
    "MetricsServer",
    "accepts_gzip",
    "parse_listen",
    "render_metrics",
]
