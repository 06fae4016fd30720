"""Prevention in the owner's own code: the remedies as reusable pieces (idle reaper, guarded asyncio server).

- ``TimingWheel`` (``guard.wheel``): idle-timeout bookkeeping, O(1) touch, amortised O(1) per connection.
- ``SelectorReaper``/``TransportReaper`` (``guard.reaper``): close idle connections in a selectors
  loop or in asyncio; ``close_socket``/``close_transport`` close for sure (shutdown, then close).
- ``serve``/``start_server`` (``guard.server``): an asyncio stream server that closes on EOF and
  when the handler returns, applies an idle timeout and TCP keepalive, limits connections and
  counts every close by reason (``ServerStatistics``); both take one ``ServerOptions``.

Finding leaks rather than preventing them lives elsewhere: ``closewait.trace`` records where
sockets were created, ``closewait.sentinel`` watches a running process for CLOSE_WAIT.
"""

from __future__ import annotations

from closewait.guard.reaper import (
    CloseReason,
    ReaperStatistics,
    SelectorReaper,
    TransportReaper,
    close_socket,
    close_transport,
)
from closewait.guard.server import (
    GuardedServer,
    Handler,
    ServerOptions,
    ServerStatistics,
    enable_keepalive,
    serve,
    start_server,
)
from closewait.guard.wheel import TimingWheel

__all__ = [
    "CloseReason",
    "GuardedServer",
    "Handler",
    "ReaperStatistics",
    "SelectorReaper",
    "ServerOptions",
    "ServerStatistics",
    "TimingWheel",
    "TransportReaper",
    "close_socket",
    "close_transport",
    "enable_keepalive",
    "serve",
    "start_server",
]
