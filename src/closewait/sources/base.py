"""``SocketSource``, the interface every source of sockets implements (re-exported by
``closewait.sources``). Its own module because defining a Protocol imports typing (~15 ms of
modules), which ``closewait.sources`` must not do on import: the console starts the kernel's dump
through ``closewait.sources.prefetch`` before anything heavy is imported.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from closewait.model import Socket, TcpState


class SocketSource(Protocol):
    """Anything that lists TCP sockets by state."""

    name: str

    def sockets(self, states: frozenset[TcpState]) -> Iterable[Socket]: ...
