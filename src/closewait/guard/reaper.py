"""Idle-connection reapers on the timing wheel, for selectors loops and for asyncio.

This module owns closing connections that went quiet: it keeps them in a
``closewait.guard.wheel.TimingWheel``, is told about I/O with ``touch()`` (one dict store), and
closes what the wheel reports. It also owns how closewait closes a connection on purpose
(``close_socket``/``close_transport``) and the vocabulary of why (``CloseReason``).

Two front ends share the wheel:

- ``SelectorReaper`` for a hand-written ``selectors`` loop::

      reaper = SelectorReaper(selectors.DefaultSelector(), idle_timeout=30)
      reaper.register(conn)                      # instead of selector.register
      while True:
          for key, _ in reaper.selector.select(reaper.timeout()):
              data = key.fileobj.recv(65536)
              if not data:
                  reaper.close(key.fileobj, CloseReason.EOF)
              else:
                  reaper.touch(key.fileobj)      # O(1): stamps the time, nothing moves
          reaper.reap()                           # closes the ones idle >= 30 s

- ``TransportReaper`` for asyncio: ``add(transport)``, ``touch(transport)`` on I/O,
  ``discard(transport)`` in ``connection_lost``. It arms one loop timer for the next non-empty
  wheel slot instead of running a task that wakes every tick, so 20,000 idle connections cost
  one wake-up per slot that holds due connections, and an empty reaper costs nothing.

Pitfalls avoided:

- ``close()`` alone only drops this process's reference to the socket; if a forked child or a
  ``dup()`` still holds it, no FIN is sent and the peer waits forever. ``shutdown(SHUT_RDWR)``
  first acts on the connection itself: the FIN goes out now and any thread blocked in ``recv()``
  on it wakes up with EOF.
- asyncio's ``transport.close()`` waits for the write buffer to drain; a peer that stopped
  reading never drains it, so the socket would stay open forever. An idle transport is shut down
  and then ``abort()``-ed: nothing the peer was not reading is lost that it would have read.
- A loop timer per read (``loop.call_later`` re-armed on every ``data_received``) allocates and
  cancels a handle per read; the wheel stamps a float instead and looks once per timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import selectors
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from closewait.guard.wheel import TimingWheel

__all__ = [
    "CloseReason",
    "ReaperStatistics",
    "SelectorReaper",
    "TransportReaper",
    "close_socket",
    "close_transport",
]

logger = logging.getLogger(__name__)


class CloseReason(enum.StrEnum):
    """Why closewait closed a connection (the first reason that applied wins)."""

    #: The peer closed or half-closed (we read EOF), and we closed our side.
    EOF = "eof"
    #: No I/O for the idle timeout.
    IDLE = "idle"
    #: A socket error (reset by peer, broken pipe) or the handler raised.
    ERROR = "error"
    #: Refused because the connection limit was reached.
    LIMIT = "limit"
    #: The handler returned while the peer still had its side open; the server closed it.
    HANDLER = "handler"
    #: The server was shutting down.
    SHUTDOWN = "shutdown"


@dataclass(frozen=True, slots=True)
class ReaperStatistics:
    """A reaper at one instant: connections watched, and how many it closed for which reason.

    ``closed`` is a read-only mapping; reasons never counted are absent (``closed.get(r, 0)``).
    ``callback_errors`` counts ``on_idle`` callbacks that raised (TransportReaper only).
    """

    watched: int
    closed: Mapping[CloseReason, int]
    callback_errors: int = 0

    @property
    def closed_idle(self) -> int:
        return self.closed.get(CloseReason.IDLE, 0)

    @property
    def closed_total(self) -> int:
        return sum(self.closed.values())


def close_socket(sock: socket.socket) -> None:
    """Close a connection for sure: ``shutdown(SHUT_RDWR)`` (FIN now, readers woken), then ``close()``.

    Errors from shutdown (already reset, not connected) are ignored; the descriptor is always closed.
    """
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def close_transport(transport: asyncio.BaseTransport) -> None:
    """Close an asyncio transport now, even if its peer stopped reading: shutdown, then ``abort()``."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()  # close() would wait for a write buffer the peer may never drain
    else:
        transport.close()


class SelectorReaper:
    """A ``selectors`` selector plus an idle timeout: register, touch on I/O, ``reap()``.

    ``selector`` stays yours to ``select()`` on (pass ``timeout()`` as its timeout); the reaper
    only adds and removes registrations. Sockets are the wheel's keys. Not thread-safe.
    """

    def __init__(
        self,
        selector: selectors.BaseSelector,
        idle_timeout: float,
        *,
        tick: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.selector = selector
        self._clock = clock
        self._wheel: TimingWheel[socket.socket] = TimingWheel(idle_timeout, tick=tick, clock=clock)
        self._closed: Counter[CloseReason] = Counter()

    @property
    def idle_timeout(self) -> float:
        return self._wheel.timeout

    def register(
        self, sock: socket.socket, events: int = selectors.EVENT_READ, data: Any = None
    ) -> selectors.SelectorKey:
        """Register ``sock`` with the selector and start its idle clock."""
        key = self.selector.register(sock, events, data)
        self._wheel.add(sock)
        return key

    def touch(self, sock: socket.socket) -> None:
        """Record I/O on ``sock`` (call it after each successful recv/send)."""
        self._wheel.touch(sock)

    def unregister(self, sock: socket.socket) -> None:
        """Stop watching ``sock`` without closing it (you take it over)."""
        self._wheel.discard(sock)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def close(self, sock: socket.socket, reason: CloseReason = CloseReason.EOF) -> None:
        """Unregister, shut down and close ``sock``, counting ``reason``."""
        self.unregister(sock)
        close_socket(sock)
        self._closed[reason] += 1

    def timeout(self) -> float | None:
        """Seconds until the wheel next needs ``reap()`` (None: nothing to watch), for ``select()``."""
        deadline = self._wheel.next_deadline()
        if deadline is None:
            return None
        return max(0.0, deadline - self._clock())

    def reap(self) -> list[socket.socket]:
        """Close every socket idle for the timeout; return them (closed, for logging)."""
        expired = self._wheel.expired()
        for sock in expired:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(sock)
            close_socket(sock)
        self._closed[CloseReason.IDLE] += len(expired)
        if expired:
            logger.debug("closed %d connections idle for %.3g s", len(expired), self._wheel.timeout)
        return expired

    def __len__(self) -> int:
        return len(self._wheel)

    def __contains__(self, sock: object) -> bool:
        return sock in self._wheel

    def statistics(self) -> ReaperStatistics:
        return ReaperStatistics(len(self._wheel), MappingProxyType(dict(self._closed)))


class TransportReaper:
    """Closes asyncio transports with no I/O for ``idle_timeout`` seconds.

    ``add()`` when a connection is made, ``touch()`` on each read/write, ``discard()`` in
    ``connection_lost``. ``on_idle`` is called for each idle transport (default:
    ``close_transport``, shutdown + abort); an exception from it is logged and the next transport
    is still handled. Must be used from the loop's thread; ``close()`` stops its timer.
    """

    def __init__(
        self,
        idle_timeout: float,
        *,
        tick: float | None = None,
        on_idle: Callable[[asyncio.BaseTransport], object] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._wheel: TimingWheel[asyncio.BaseTransport] = TimingWheel(idle_timeout, tick=tick, clock=time.monotonic)
        self._on_idle = on_idle if on_idle is not None else close_transport
        self._timer: asyncio.TimerHandle | None = None
        self._closed_idle = 0
        self._callback_errors = 0
        self._stopped = False
        # Bound once: touch() runs on every read and write.
        self.touch = self._wheel.touch

    @property
    def idle_timeout(self) -> float:
        return self._wheel.timeout

    def add(self, transport: asyncio.BaseTransport) -> None:
        self._wheel.add(transport)
        if self._timer is None and not self._stopped:
            self._arm()

    def discard(self, transport: asyncio.BaseTransport) -> None:
        self._wheel.discard(transport)

    def _arm(self) -> None:
        deadline = self._wheel.next_deadline()
        if deadline is None:
            self._timer = None
            return
        # A new key's deadline is never earlier than the slot already armed, so one timer suffices.
        self._timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        for transport in self._wheel.expired():
            self._closed_idle += 1
            try:
                self._on_idle(transport)
            except Exception:
                self._callback_errors += 1
                logger.exception("closing an idle transport failed")
        if not self._stopped:
            self._arm()

    def close(self) -> None:
        """Stop the timer. Transports are left as they are."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __len__(self) -> int:
        return len(self._wheel)

    def __contains__(self, transport: object) -> bool:
        return transport in self._wheel

    def statistics(self) -> ReaperStatistics:
        closed = {CloseReason.IDLE: self._closed_idle} if self._closed_idle else {}
        return ReaperStatistics(len(self._wheel), MappingProxyType(closed), self._callback_errors)
