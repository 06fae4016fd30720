"""``serve()``: an asyncio stream server that cannot leak CLOSE_WAIT.

This module owns the guarded server: accepting (with a connection limit), per-connection socket
options (TCP keepalive), the handler's lifetime, and closing every connection for a counted
reason. It takes the same ``handler(reader, writer)`` as ``asyncio.start_server``::

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        # no writer.close() needed: serve() closes the connection when the handler returns

    ready: asyncio.Future[GuardedServer] = loop.create_future()
    task = asyncio.create_task(serve(echo, idle_timeout=30, max_connections=1000, ready=ready))
    server = await ready                       # listening now; server.address is the bound (host, port)
    print(server.statistics())                 # open, accepted, peak, closed by reason
    task.cancel()                              # or: async with await start_server(echo) as server: ...

The pitfalls a plain ``asyncio.start_server`` leaves to every handler, and what serve() does:

- **A handler that returns without ``writer.close()``.** asyncio does not close the transport
  when the handler's task ends. Until the garbage collector happens to collect the transport (the
  ``StreamWriter.__del__`` that closes it only exists from Python 3.13), the socket sits in
  CLOSE_WAIT after the peer's FIN: minutes on an idle process, forever if something keeps a
  reference. serve() closes the writer in ``finally`` and awaits ``wait_closed()``.
- **A peer that closes while the handler waits on something else.** asyncio's stream protocol
  answers EOF by keeping the socket half-open (``eof_received`` returns True), so the FIN is not
  answered until the handler reads the EOF and returns. With ``close_on_eof=True`` (default)
  serve() closes the connection when the FIN arrives (after flushing what was already written);
  the handler's reads see EOF and its next ``drain()`` raises. Protocols where the client
  half-closes and then waits for the answer (``shutdown(SHUT_WR)``, then read) want
  ``close_on_eof=False``: the connection is then closed when the handler returns, or by the idle
  timeout if it never does.
- **A peer that vanishes (cable pulled, host rebooted) or stops talking.** No FIN ever comes.
  The idle timeout (a ``TimingWheel`` touched on every read and write, checked once per slot)
  closes connections with no I/O; TCP keepalive (``SO_KEEPALIVE`` with ``TCP_KEEPIDLE``,
  ``TCP_KEEPINTVL``, ``TCP_KEEPCNT``) lets the kernel notice a dead peer even without a timeout.
- **A peer that stops reading.** ``transport.close()`` waits for the write buffer to drain, which
  never happens; idle connections are shut down and aborted instead.
- **Too many connections.** Above ``max_connections`` the server stops accepting (the kernel's
  backlog holds new clients until a slot frees) or, with ``when_full="refuse"``, accepts and
  resets them at once, counted as ``limit``. Running out of descriptors (EMFILE) pauses
  accepting briefly instead of spinning on the listening socket.
- **Handler tasks collected mid-flight.** asyncio keeps only weak references to tasks; serve()
  holds every connection until it is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TypedDict

from closewait.errors import UsageError
from closewait.guard.reaper import CloseReason, TransportReaper, close_transport

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.12; only the type checker needs it

__all__ = [
    "GuardedServer",
    "Handler",
    "ServerOptions",
    "ServerStatistics",
    "enable_keepalive",
    "serve",
    "start_server",
]

logger = logging.getLogger(__name__)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

_ACCEPT_RETRY_DELAY = 0.1  # seconds to pause accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """The server at one instant. Every accepted connection is open or closed for exactly one reason."""

    open: int
    accepted: int
    peak: int
    closed_eof: int
    closed_idle: int
    closed_error: int
    closed_limit: int
    closed_handler: int
    closed_shutdown: int
    #: How many times accepting paused because ``max_connections`` were open.
    paused: int
    #: accept() failures (EMFILE and kin) that paused accepting.
    accept_errors: int

    @property
    def closed(self) -> int:
        return (
            self.closed_eof
            + self.closed_idle
            + self.closed_error
            + self.closed_limit
            + self.closed_handler
            + self.closed_shutdown
        )

    def closed_by_reason(self) -> dict[CloseReason, int]:
        return {
            CloseReason.EOF: self.closed_eof,
            CloseReason.IDLE: self.closed_idle,
            CloseReason.ERROR: self.closed_error,
            CloseReason.LIMIT: self.closed_limit,
            CloseReason.HANDLER: self.closed_handler,
            CloseReason.SHUTDOWN: self.closed_shutdown,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerOptions:
    """How a guarded server treats its connections: the one options type ``start_server()`` and
    ``serve()`` take (``options=ServerOptions(...)``, or its fields as keyword arguments).

    Checked when made: a bad value is a one-line UsageError, before any socket is opened.
    """

    #: Seconds without a read or write before a connection is closed; None: never.
    idle_timeout: float | None = 300.0
    #: The timing wheel's resolution in seconds; None: ``idle_timeout / 16``.
    tick: float | None = None
    #: TCP keepalive on every accepted connection, and its timing (see ``enable_keepalive``).
    keepalive: bool = True
    keepalive_idle: int = 60
    keepalive_interval: int = 10
    keepalive_count: int = 5
    #: Open connections at most (None: unbounded); above it ``when_full`` stops accepting
    #: (``pause``) or accepts and resets (``refuse``).
    max_connections: int | None = 10_000
    when_full: Literal["pause", "refuse"] = "pause"
    #: Close a connection when the peer's FIN arrives (see the module docstring).
    close_on_eof: bool = True
    #: The listening socket's accept queue.
    backlog: int = 1024
    #: The StreamReader's buffer limit (``asyncio.StreamReader(limit=...)``).
    stream_limit: int = 2**16

    def __post_init__(self) -> None:
        if self.max_connections is not None and self.max_connections < 1:
            raise UsageError(f"max_connections must be at least 1, not {self.max_connections}")
        if self.when_full not in ("pause", "refuse"):
            raise UsageError(f"when_full must be 'pause' or 'refuse', not {self.when_full!r}")
        for name, value in (("keepalive_idle", self.keepalive_idle), ("keepalive_interval", self.keepalive_interval)):
            if value < 1:
                raise UsageError(f"{name} must be at least 1 second, not {value}")
        if self.keepalive_count < 1:
            raise UsageError(f"keepalive_count must be at least 1, not {self.keepalive_count}")


class _OptionFields(TypedDict, total=False):
    """``ServerOptions``' fields as keyword arguments, so ``start_server(handler, idle_timeout=5)``
    type-checks like ``start_server(handler, options=ServerOptions(idle_timeout=5))``."""

    idle_timeout: float | None
    tick: float | None
    keepalive: bool
    keepalive_idle: int
    keepalive_interval: int
    keepalive_count: int
    max_connections: int | None
    when_full: Literal["pause", "refuse"]
    close_on_eof: bool
    backlog: int
    stream_limit: int


def enable_keepalive(sock: socket.socket, *, idle: int = 60, interval: int = 10, count: int = 5) -> None:
    """Turn on TCP keepalive: first probe after ``idle`` s of silence, then every ``interval`` s,
    give up (the connection is reset, the reader gets an error) after ``count`` unanswered probes.

    Linux's defaults (7200 s, 75 s, 9) notice a dead peer after more than two hours; these notice
    it after ``idle + interval * count`` seconds (110 s by default).
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


class _GuardedWriter(asyncio.StreamWriter):
    """A StreamWriter whose writes count as activity for the idle timeout."""

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        protocol: _GuardedProtocol,
        reader: asyncio.StreamReader,
        loop: asyncio.AbstractEventLoop,
        touch: Callable[[asyncio.BaseTransport], None],
    ) -> None:
        super().__init__(transport, protocol, reader, loop)
        self._touch = touch

    def write(self, data: bytes | bytearray | memoryview) -> None:
        transport = self.transport
        self._touch(transport)
        transport.write(data)

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        transport = self.transport
        self._touch(transport)
        transport.writelines(data)


class _GuardedProtocol(asyncio.StreamReaderProtocol):
    """One connection: feeds a StreamReader, runs the handler, closes for a counted reason."""

    def __init__(self, server: GuardedServer, reader: asyncio.StreamReader) -> None:
        super().__init__(reader, loop=server._loop)
        self._server = server
        self._reader = reader  # StreamReaderProtocol keeps only a weak reference
        self._guarded_transport: asyncio.Transport | None = None
        self._handler_task: asyncio.Task[None] | None = None
        self.reason: CloseReason | None = None
        self._touch = server._touch

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.Transport)
        self._guarded_transport = transport
        server = self._server
        server._connections[transport] = self
        if server._reaper is not None:
            server._reaper.add(transport)
        writer = _GuardedWriter(transport, self, self._reader, server._loop, self._touch)
        self._handler_task = server._loop.create_task(self._run(writer))
        server._tasks.add(self._handler_task)
        self._handler_task.add_done_callback(server._tasks.discard)

    def data_received(self, data: bytes) -> None:
        # Hot path: one stamp in the wheel, then straight to the reader we hold.
        self._touch(self._guarded_transport)  # type: ignore[arg-type]
        self._reader.feed_data(data)

    def eof_received(self) -> bool:
        if self.reason is None:
            self.reason = CloseReason.EOF
        keep_open = bool(super().eof_received())
        # Returning False makes the transport close itself (after flushing) right away.
        return keep_open and not self._server._close_on_eof

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reason is None:
            self.reason = CloseReason.ERROR if exc is not None else CloseReason.HANDLER
        super().connection_lost(exc)
        self._server._connection_closed(self)

    def closed_idle(self) -> None:
        if self.reason is None:
            self.reason = CloseReason.IDLE
        if self._guarded_transport is not None:
            close_transport(self._guarded_transport)

    def abort(self, reason: CloseReason) -> None:
        if self.reason is None:
            self.reason = reason
        if self._guarded_transport is not None:
            close_transport(self._guarded_transport)

    async def _run(self, writer: _GuardedWriter) -> None:
        try:
            await self._server._handler(self._reader, writer)
        except asyncio.CancelledError:
            if self.reason is None:
                self.reason = CloseReason.SHUTDOWN
            raise
        except (ConnectionError, TimeoutError) as err:
            if self.reason is None:
                self.reason = CloseReason.ERROR
            logger.debug("connection from %s ended: %r", writer.get_extra_info("peername"), err)
        except Exception:
            if self.reason is None:
                self.reason = CloseReason.ERROR
            logger.exception("handler failed for %s", writer.get_extra_info("peername"))
        finally:
            # The point of this server: whatever the handler did, the connection is closed.
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()


class GuardedServer:
    """A listening guarded server. Make one with ``start_server()`` (or let ``serve()`` do it).

    ``address`` is the bound ``(host, port)`` (port 0 was replaced by the kernel's choice);
    ``statistics()`` is a snapshot; ``aclose()`` stops accepting, cancels handlers and closes every
    connection (reason ``shutdown``).
    """

    def __init__(self, handler: Handler, listener: socket.socket, options: ServerOptions) -> None:
        self._loop = asyncio.get_running_loop()
        self._handler = handler
        self._listener = listener
        self._keepalive = (
            (options.keepalive_idle, options.keepalive_interval, options.keepalive_count) if options.keepalive else None
        )
        self._max = options.max_connections
        self._when_full = options.when_full
        self._close_on_eof = options.close_on_eof
        self._stream_limit = options.stream_limit
        self._reaper: TransportReaper | None = None
        self._touch: Callable[[asyncio.BaseTransport], None] = _no_touch
        if options.idle_timeout is not None:
            self._reaper = TransportReaper(
                options.idle_timeout, tick=options.tick, on_idle=self._on_idle, loop=self._loop
            )
            self._touch = self._reaper.touch
        self._connections: dict[asyncio.BaseTransport, _GuardedProtocol] = {}
        self._pending: set[asyncio.Task[object]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._open = 0
        self._accepted = 0
        self._peak = 0
        self._paused = 0
        self._accept_errors = 0
        self._closed: Counter[CloseReason] = Counter()
        self._accepting = False
        self._closing = False
        self._closed_future: asyncio.Future[None] = self._loop.create_future()
        self._resume_handle: asyncio.TimerHandle | None = None
        self.address: tuple[str, int] = listener.getsockname()[:2]
        self._resume_accepting()

    # -- accepting --------------------------------------------------------------------------------
    def _resume_accepting(self) -> None:
        self._resume_handle = None
        if not self._accepting and not self._closing:
            self._loop.add_reader(self._listener.fileno(), self._on_acceptable)
            self._accepting = True

    def _pause_accepting(self) -> None:
        if self._accepting:
            self._loop.remove_reader(self._listener.fileno())
            self._accepting = False

    def _full(self) -> bool:
        return self._max is not None and self._open >= self._max

    def _on_acceptable(self) -> None:
        for _ in range(128):  # bounded, like asyncio's own accept loop, so other callbacks get a turn
            if self._full() and self._when_full == "pause":
                self._pause_accepting()
                self._paused += 1
                return
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as err:
                self._accept_errors += 1
                if err.errno in _RESOURCE_ERRNOS:
                    logger.warning("accept() failed (%s); pausing accepting for %.1f s", err, _ACCEPT_RETRY_DELAY)
                    self._pause_accepting()
                    self._resume_handle = self._loop.call_later(_ACCEPT_RETRY_DELAY, self._resume_accepting)
                    return
                logger.warning("accept() failed: %s", err)
                return
            self._accepted += 1
            if self._full():  # when_full == "refuse"
                self._refuse(conn)
                continue
            self._open += 1
            self._peak = max(self._peak, self._open)
            try:
                conn.setblocking(False)
                if self._keepalive is not None:
                    idle, interval, count = self._keepalive
                    enable_keepalive(conn, idle=idle, interval=interval, count=count)
            except OSError as err:  # e.g. the peer already reset it
                logger.debug("setting up an accepted socket failed: %s", err)
                conn.close()
                self._count_closed(CloseReason.ERROR)
                continue
            task = self._loop.create_task(self._start_connection(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def _refuse(self, conn: socket.socket) -> None:
        # SO_LINGER 0: close() sends RST, so the client learns at once and no TIME_WAIT stays here.
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()
        self._closed[CloseReason.LIMIT] += 1

    async def _start_connection(self, conn: socket.socket) -> None:
        reader = asyncio.StreamReader(limit=self._stream_limit, loop=self._loop)
        protocol = _GuardedProtocol(self, reader)
        try:
            await self._loop.connect_accepted_socket(lambda: protocol, conn)
        except BaseException as err:
            reason = CloseReason.SHUTDOWN if isinstance(err, asyncio.CancelledError) else CloseReason.ERROR
            if protocol._guarded_transport is not None:
                protocol.abort(reason)  # connection_lost will count it
            else:
                conn.close()
                self._count_closed(reason)
            if not isinstance(err, Exception):
                raise
            logger.debug("could not start a transport: %r", err)
            return
        if self._closing:
            protocol.abort(CloseReason.SHUTDOWN)

    # -- closing ----------------------------------------------------------------------------------
    def _on_idle(self, transport: asyncio.BaseTransport) -> None:
        protocol = self._connections.get(transport)
        if protocol is not None:
            protocol.closed_idle()
        else:
            close_transport(transport)

    def _connection_closed(self, protocol: _GuardedProtocol) -> None:
        transport = protocol._guarded_transport
        if transport is not None:
            self._connections.pop(transport, None)
            if self._reaper is not None:
                self._reaper.discard(transport)
        self._count_closed(protocol.reason or CloseReason.ERROR)

    def _count_closed(self, reason: CloseReason) -> None:
        self._closed[reason] += 1
        self._open -= 1
        if not self._accepting and self._resume_handle is None and not self._full():
            self._resume_accepting()

    # -- public -----------------------------------------------------------------------------------
    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening socket(s)."""
        return (self._listener,)

    def statistics(self) -> ServerStatistics:
        closed = self._closed
        return ServerStatistics(
            open=self._open,
            accepted=self._accepted,
            peak=self._peak,
            closed_eof=closed[CloseReason.EOF],
            closed_idle=closed[CloseReason.IDLE],
            closed_error=closed[CloseReason.ERROR],
            closed_limit=closed[CloseReason.LIMIT],
            closed_handler=closed[CloseReason.HANDLER],
            closed_shutdown=closed[CloseReason.SHUTDOWN],
            paused=self._paused,
            accept_errors=self._accept_errors,
        )

    def is_serving(self) -> bool:
        return not self._closing

    async def serve_forever(self) -> None:
        """Wait until the server is closed (cancelling this closes it)."""
        try:
            await asyncio.shield(self._closed_future)
        except asyncio.CancelledError:
            await asyncio.shield(self.aclose())
            raise

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop accepting, cancel handlers, close every connection; wait up to ``timeout`` s for them."""
        if not self._closing:
            self._closing = True
            self._pause_accepting()
            if self._resume_handle is not None:
                self._resume_handle.cancel()
                self._resume_handle = None
            self._listener.close()
            for protocol in list(self._connections.values()):
                protocol.abort(CloseReason.SHUTDOWN)
            for task in list(self._tasks) + list(self._pending):
                task.cancel()
        deadline = time.monotonic() + timeout
        while (self._tasks or self._pending or self._open > 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._reaper is not None:
            self._reaper.close()
        if not self._closed_future.done():
            self._closed_future.set_result(None)

    async def __aenter__(self) -> GuardedServer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _no_touch(transport: asyncio.BaseTransport) -> None:
    return None


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise UsageError(f"port {port} is out of range (0-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UsageError(f"cannot listen on {host!r}: {err.strerror}") from err
    family, socktype, proto, _, sockaddr = infos[0]
    listener = socket.socket(family, socktype, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(sockaddr)
        listener.listen(backlog)
        listener.setblocking(False)
    except OSError as err:
        listener.close()
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror}") from err
    return listener


async def start_server(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    options: ServerOptions | None = None,
    **fields: Unpack[_OptionFields],
) -> GuardedServer:
    """Listen on ``host:port`` (port 0: the kernel picks; read ``server.address``) and return the server.

    ``options`` says how connections are treated (``ServerOptions``: idle timeout, keepalive,
    connection limit, close on EOF). Its fields may also be given as keyword arguments, which
    override ``options``: ``start_server(echo, idle_timeout=5)``. Bad arguments raise UsageError.
    """
    chosen = _options(options, fields)
    listener = _listen(host, port, chosen.backlog)
    try:
        return GuardedServer(handler, listener, chosen)
    except BaseException:
        listener.close()
        raise


async def serve(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ready: asyncio.Future[GuardedServer] | Callable[[GuardedServer], object] | None = None,
    options: ServerOptions | None = None,
    **fields: Unpack[_OptionFields],
) -> None:
    """Run a guarded server until cancelled; then close every connection and return.

    Readiness, trio-style: once listening, ``ready`` (a future, or a callable) receives the
    ``GuardedServer``, whose ``address`` is the bound ``(host, port)`` and whose ``statistics()``
    can be read at any time. ``options`` and keyword arguments: as for ``start_server``.
    """
    server = await start_server(handler, host, port, options=options, **fields)
    async with server:
        if isinstance(ready, asyncio.Future):
            if not ready.done():
                ready.set_result(server)
        elif ready is not None:
            ready(server)
        await server.serve_forever()


def _options(options: ServerOptions | None, fields: _OptionFields) -> ServerOptions:
    """``options`` (default: ``ServerOptions()``) with ``fields`` replacing its values; validated."""
    if options is None:
        return ServerOptions(**fields)
    return replace(options, **fields) if fields else options
