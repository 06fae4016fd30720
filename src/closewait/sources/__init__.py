"""Where sockets come from. A source is a small interface, ``SocketSource``: give it states, get
Socket records. Two real ones read the kernel (netlink sock_diag, /proc/net/tcp); ``StaticSource``
is a fake that ships publicly so users can test code built on closewait without a kernel scenario.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from closewait.errors import ClosewaitError, UsageError
from closewait.model import Socket, TcpState
from closewait.sources import netlink, procfs

BACKENDS = ("auto", "netlink", "procfs")


class SocketSource(Protocol):
    """Anything that lists TCP sockets by state."""

    name: str

    def sockets(self, states: frozenset[TcpState]) -> Iterable[Socket]: ...


class NetlinkSource:
    """sock_diag over netlink: kernel-side state filter, tcp_info included."""

    name = "netlink"

    def sockets(self, states: frozenset[TcpState]) -> Iterable[Socket]:
        return netlink.dump(states)


class ProcfsSource:
    """/proc/net/tcp and tcp6 of the calling thread's namespace; no tcp_info."""

    name = "procfs"

    def __init__(self, proc_net: str | None = None) -> None:
        self.proc_net = proc_net

    def sockets(self, states: frozenset[TcpState]) -> Iterable[Socket]:
        return procfs.dump(states, proc_net=self.proc_net)


class AutoSource:
    """netlink when the kernel offers it, /proc/net/tcp otherwise."""

    def __init__(self) -> None:
        self.name = "netlink"

    def sockets(self, states: frozenset[TcpState]) -> Iterable[Socket]:
        try:
            nl = netlink.open_socket()
        except ClosewaitError:
            self.name = "procfs"
            return procfs.dump(states)
        try:
            return list(netlink.dump(states, sock=nl))
        finally:
            nl.close()


class StaticSource:
    """A fixed list of sockets, filtered by state: a stand-in for the kernel in users' tests."""

    name = "static"

    def __init__(self, sockets: Sequence[Socket]) -> None:
        self._sockets = tuple(sockets)

    def sockets(self, states: frozenset[TcpState]) -> Iterable[Socket]:
        return [s for s in self._sockets if s.state in states]


def get_source(backend: str) -> SocketSource:
    """The source named by ``--backend``."""
    if backend == "auto":
        return AutoSource()
    if backend == "netlink":
        return NetlinkSource()
    if backend == "procfs":
        return ProcfsSource()
    raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "AutoSource",
    "NetlinkSource",
    "ProcfsSource",
    "SocketSource",
    "StaticSource",
    "get_source",
]
