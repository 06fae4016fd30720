"""Where sockets come from. A source is a small interface, ``SocketSource``: give it states, get
Socket records.

``KernelSource`` (what ``get_source`` returns) is THE reader of the kernel's TCP tables, used by
scan, the exporter, reap and the test helpers alike. It walks a chain of backends (``BACKENDS``:
netlink sock_diag first, /proc/net/tcp when netlink cannot be opened), optionally over several
network namespaces, optionally counting every state too, and records what it actually did: the
backend it used (``name``), the counts, which namespace each socket came from and the namespaces it
had to skip. A caller that needs something only some backends give (socket cookies, tcp_info)
says so with ``needs``, and the chain keeps only the backends that give it. A new backend is a
class with ``name``, ``gives`` and ``read()`` and one entry in ``_CHAIN``: ``--backend`` offers it
and every caller reaches it.

``StaticSource`` is a fake that ships publicly so users can test code built on closewait without a
kernel scenario.
"""

from __future__ import annotations

from closewait.errors import ClosewaitError, UsageError

# Nothing heavy is imported here: netlink, procfs and netns (and through them the model) by the
# methods that use them, SocketSource (a typing.Protocol) on first access, so importing
# closewait.sources.prefetch stays cheap: the console starts the kernel's dump with it before the
# model is imported.
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    import logging
    import socket
    from collections.abc import Iterable, Sequence
    from typing import ClassVar

    from closewait.model import Socket, TcpState
    from closewait.sources.base import Backend, SocketSource
    from closewait.sources.netns import Netns


def __getattr__(name: str) -> object:
    if name == "SocketSource":
        from closewait.sources.base import SocketSource

        return SocketSource
    raise AttributeError(f"module 'closewait.sources' has no attribute {name!r}")


#: What a caller can ask a backend's records to carry (``needs``): the socket cookie (an exact
#: identity, what reap re-verifies with) and tcp_info (idle time, unread bytes).
COOKIE = "cookie"
TCP_INFO = "tcp_info"


class _Netlink:
    """sock_diag over netlink: kernel-side state filter, tcp_info and cookies included."""

    name: ClassVar[str] = "netlink"
    gives: ClassVar[frozenset[str]] = frozenset({COOKIE, TCP_INFO})

    def __init__(self) -> None:
        from closewait.sources import netlink

        # Opened in the caller's (entered) namespace: a netlink socket keeps the namespace it was
        # opened in. Raises ClosewaitError when sock_diag is not available: the chain moves on.
        self._nl: socket.socket = netlink.open_socket()

    def read(
        self, states: frozenset[TcpState], *, with_info: bool, count: bool
    ) -> tuple[dict[TcpState, int] | None, list[Socket]]:
        from closewait.sources import netlink

        try:
            counts = netlink.count_by_state(sock=self._nl) if count else None
            return counts, list(netlink.dump(states, with_info=with_info, sock=self._nl))
        finally:
            self._nl.close()


class _Procfs:
    """/proc/net/tcp and tcp6 of the calling thread's namespace; no tcp_info, no cookies."""

    name: ClassVar[str] = "procfs"
    gives: ClassVar[frozenset[str]] = frozenset()

    def read(
        self, states: frozenset[TcpState], *, with_info: bool, count: bool
    ) -> tuple[dict[TcpState, int] | None, list[Socket]]:
        from closewait.model import TcpState
        from closewait.sources import procfs

        if not count:
            return None, list(procfs.dump(states))
        # No state filter in the kernel here: one read of every state gives both answers.
        every = list(procfs.dump(TcpState))
        counts = dict.fromkeys(sorted(TcpState), 0)
        for sock in every:
            counts[sock.state] += 1
        return counts, [s for s in every if s.state in states]


#: The backends in the order ``auto`` tries them. Opening one (its constructor) raises
#: ClosewaitError when it cannot run here; the next one is then tried. An error while reading is
#: not a reason to fall back: it is the answer.
_CHAIN: tuple[type[Backend], ...] = (_Netlink, _Procfs)

#: What ``--backend`` accepts: ``auto`` walks the chain, a backend's name uses only that one.
BACKENDS: tuple[str, ...] = ("auto", *(backend.name for backend in _CHAIN))


class KernelSource:
    """The kernel's TCP tables through the first backend of the chain that opens, per namespace.

    ``namespaces`` lists (namespace, label) pairs to read, None for the caller's own namespace
    (the default: only that one). A namespace with an empty label is required: failing to read it
    raises. Labelled ones (a sweep of the host's namespaces) that fail are skipped, one line each in
    ``failures``. After ``sockets()``:

    - ``name``: the backend used (the one furthest down the chain that any namespace needed);
    - ``counts``: label -> every TCP state's count (zeros included), when ``count_states``;
    - ``netns_of(sock)``: the label of the namespace a socket was read in ("" for unlabelled ones),
      by its cookie (unique per boot) where the backend gives one;
    - ``netns_of_inode``: socket inode -> label, for sockets of labelled namespaces (every socket
      not accepted yet has inode 0, in every namespace: ask ``netns_of`` for those);
    - ``failures``: the namespaces skipped, with why, one line each (``skipped``: label -> why).

    Each call starts these afresh, so one source can serve a loop (``watch``).
    """

    def __init__(
        self,
        backend: str = "auto",
        *,
        namespaces: Sequence[tuple[Netns | None, str]] | None = None,
        needs: Iterable[str] = (),
        with_info: bool = True,
        count_states: bool = False,
    ) -> None:
        if backend not in BACKENDS:
            raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        wanted = frozenset(needs)
        chain = [b for b in _CHAIN if backend in ("auto", b.name)]
        able = [b for b in chain if wanted <= b.gives]
        if not able:
            missing = ", ".join(sorted(wanted - chain[0].gives))
            giving = " or ".join(b.name for b in _CHAIN if wanted <= b.gives)
            raise UsageError(f"the {backend} backend gives no {missing}: use {giving or 'another backend'}")
        self._chain = able
        self.namespaces: list[tuple[Netns | None, str]] = list(namespaces) if namespaces is not None else [(None, "")]
        self.with_info = with_info
        self.count_states = count_states
        self.name: str = able[0].name
        self._used = 0
        self.counts: dict[str, dict[TcpState, int]] = {}
        self.netns_of_inode: dict[int, str] = {}
        self._netns_of: dict[object, str] = {}
        self.failures: list[str] = []
        self.skipped: dict[str, str] = {}

    def sockets(self, states: frozenset[TcpState]) -> list[Socket]:
        self.name = self._chain[0].name
        self._used = 0
        self.counts = {}
        self.netns_of_inode = {}
        self._netns_of = {}
        self.failures = []
        self.skipped = {}
        if len(self.namespaces) == 1 and self.namespaces[0] == (None, ""):
            return self._read(frozenset(states), "")  # the common case: no namespace machinery
        found: list[Socket] = []
        for ns, label in self.namespaces:
            try:
                found.extend(self._read_in(ns, frozenset(states), label))
            except ClosewaitError as err:
                if not label:
                    raise  # the one namespace asked for: the scan as a whole has failed
                self.failures.append(f"{label}: {err}")
                self.skipped[label] = str(err)
                _log().info("skipping network namespace %s: %s", label, err)
        return found

    def _read_in(self, ns: Netns | None, states: frozenset[TcpState], label: str) -> list[Socket]:
        from closewait.sources import netns

        # Read inside: a netlink socket keeps the namespace it was opened in, and
        # /proc/thread-self/net follows this thread into the namespace.
        with netns.entered(ns):
            sockets = self._read(states, label)
        if label:
            for sock in sockets:
                self.netns_of_inode[sock.inode] = label
                self._netns_of[_identity(sock)] = label
        return sockets

    def netns_of(self, sock: Socket) -> str:
        """The label of the namespace ``sock`` was read in by the last ``sockets()``; "" for an
        unlabelled namespace's (the caller's own). Keyed by the socket's cookie, unique per boot;
        without one (procfs), by its inode and endpoints, which two namespaces' sockets not
        accepted yet (inode 0) share only if their addresses and ports are the same too."""
        return self._netns_of.get(_identity(sock), "") if self._netns_of else ""

    def _read(self, states: frozenset[TcpState], label: str) -> list[Socket]:
        position, backend = self._open()
        if position > self._used:
            self._used = position
            self.name = backend.name
        counts, sockets = backend.read(states, with_info=self.with_info, count=self.count_states)
        if counts is not None:
            self.counts[label] = counts
        return sockets

    def _open(self) -> tuple[int, Backend]:
        """The first backend of the chain that opens here, and its place in the chain."""
        last = len(self._chain) - 1
        for position, backend in enumerate(self._chain):
            try:
                return position, backend()
            except ClosewaitError:
                if position == last:
                    raise
        raise AssertionError("unreachable: the chain is never empty")


def _identity(sock: Socket) -> object:
    """What tells one socket from every other on the host: its cookie, else its inode and endpoints."""
    return sock.cookie or (sock.inode, sock.family, sock.local, sock.remote)


def _log() -> logging.Logger:
    import logging

    return logging.getLogger(__name__)


class StaticSource:
    """A fixed list of sockets, filtered by state: a stand-in for the kernel in users' tests."""

    name = "static"

    def __init__(self, sockets: Sequence[Socket]) -> None:
        self._sockets = tuple(sockets)

    def sockets(self, states: frozenset[TcpState]) -> Iterable[Socket]:
        return [s for s in self._sockets if s.state in states]


def get_source(
    backend: str = "auto",
    *,
    namespaces: Sequence[tuple[Netns | None, str]] | None = None,
    needs: Iterable[str] = (),
    with_info: bool = True,
    count_states: bool = False,
) -> KernelSource:
    """The source named by ``--backend`` (``auto``: the chain), with the options of ``KernelSource``.

    ``needs`` (``COOKIE``, ``TCP_INFO``) keeps only the backends whose records carry them; a
    backend named outright that lacks one is a UsageError.
    """
    return KernelSource(backend, namespaces=namespaces, needs=needs, with_info=with_info, count_states=count_states)


__all__ = [
    "BACKENDS",
    "COOKIE",
    "TCP_INFO",
    "KernelSource",
    "SocketSource",
    "StaticSource",
    "get_source",
]
