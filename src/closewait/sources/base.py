"""``SocketSource``, the interface every source of sockets implements (re-exported by
``closewait.sources``). Its own module because defining a Protocol imports typing (~15 ms of
modules), which ``closewait.sources`` must not do on import: the console starts the kernel's dump
through ``closewait.sources.prefetch`` before anything heavy is imported.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from closewait.model import Socket, TcpState


class SocketSource(Protocol):
    """Anything that lists TCP sockets by state."""

    name: str

    def sockets(self, states: frozenset[TcpState]) -> Iterable[Socket]: ...


class Backend(Protocol):
    """One way to read the calling thread's namespace's TCP table: a link of ``KernelSource``'s chain.

    Constructing one opens it where the calling thread is (a netlink socket keeps that namespace);
    it raises ClosewaitError when it cannot run there, and the chain tries the next backend.
    """

    #: The ``--backend`` name.
    name: ClassVar[str]
    #: What its records carry: ``sources.COOKIE``, ``sources.TCP_INFO``.
    gives: ClassVar[frozenset[str]]

    def read(
        self, states: frozenset[TcpState], *, with_info: bool, count: bool
    ) -> tuple[dict[TcpState, int] | None, list[Socket]]:
        """The sockets in ``states``, and with ``count`` every state's count (zeros included)."""
        ...
