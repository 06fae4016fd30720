"""Where sockets come from. A source is a small interface, ``SocketSource``: give it states, get
Socket records. Two real ones read the kernel (netlink sock_diag, /proc/net/tcp); ``StaticSource``
is a fake that ships publicly so users can test code built on closewait without a kernel scenario.
"""

from __future__ import annotations

from closewait.errors import ClosewaitError, UsageError

# Nothing heavy is imported here: netlink and procfs (and through them the model) by the methods
# that use them, SocketSource (a typing.Protocol) on first access, so importing
# closewait.sources.prefetch stays cheap: the console starts the kernel's dump with it before the
# model is imported.
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from closewait.model import Socket, TcpState
    from closewait.sources.base import SocketSource


def __getattr__(name: str) -> object:
    if name == "SocketSource":
        from closewait.sources.base import SocketSource

        return SocketSource
    raise AttributeError(f"module 'closewait.sources' has no attribute {name!r}")


BACKENDS = ("auto", "netlink", "procfs")


class NetlinkSource:
    """sock_diag over netlink: kernel-side state filter, tcp_info included."""

    name = "netlink"

    def sockets(self, states: frozenset[TcpState]) -> Iterable[Socket]:
        from closewait.sources import netlink

        return netlink.dump(states)


class ProcfsSource:
    """/proc/net/tcp and tcp6 of the calling thread's namespace; no tcp_info."""

    name = "procfs"

    def __init__(self, proc_net: str | None = None) -> None:
        self.proc_net = proc_net

    def sockets(self, states: frozenset[TcpState]) -> Iterable[Socket]:
        from closewait.sources import procfs

        return procfs.dump(states, proc_net=self.proc_net)


class AutoSource:
    """netlink when the kernel offers it, /proc/net/tcp otherwise."""

    def __init__(self) -> None:
        self.name = "netlink"

    def sockets(self, states: frozenset[TcpState]) -> Iterable[Socket]:
        from closewait.sources import netlink, procfs

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
