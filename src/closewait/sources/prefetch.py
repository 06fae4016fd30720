"""Start the kernel's sock_diag dump before the model is imported, for the one-shot ``scan --json``.

On a big host most of ``closewait scan --json`` is the kernel walking its TCP hash table during
the netlink dump (~0.13 s for 200,000 connections: the walk ``ss`` waits for too). The console's
fast path (``closewait._console``) calls ``start()`` first thing: one netlink socket, sent the
two-family TCPDIAG_GETSOCK dump request (one walk of the kernel's table for IPv4 and IPv6, see
``netlink.dump``) and read by a thread of its own, and while the kernel walks, the main thread
imports the rest of closewait and parses each reply as it arrives. The Python work hides behind
the kernel's instead of following it.

This module only moves bytes. ``PrefetchedSource.sockets`` hands each recv() to
``netlink.parse_messages``, as ``netlink.parse_reply`` does: the same checks and errors as
``netlink.dump`` (the IPv6-disabled rule is for one-family requests; this one asks for both). It
imports only C modules and struct, so it runs before the model is imported, and duplicates the
few numbers of the dump request (tests/scanperf/test_prefetch.py checks its requests are the bytes
``netlink.build_request`` sends). It is meant for a process that scans once: its threads end with
the kernel's reply, or with the process.
"""

from __future__ import annotations

import _queue
import _socket
import _thread
import struct

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterator

    from closewait.model import Socket, TcpState

#: TCP states by the kernel's numbers (include/net/tcp_states.h), for ``start``.
TCP_CLOSE_WAIT = 8
TCP_LISTEN = 10

# The numbers of a TCPDIAG_GETSOCK dump request, as in closewait.sources.netlink.
_NETLINK_SOCK_DIAG = 4
_TCPDIAG_GETSOCK = 18
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_INET_DIAG_INFO_EXT = 1 << (2 - 1)  # ask for INET_DIAG_INFO (struct tcp_info)
_NLMSGHDR = struct.Struct("=IHHII")
_NLMSGHDR_LEN_TYPE = struct.Struct("=IH")
_INET_DIAG_REQ_HEAD = struct.Struct("=BBBB")
_INET_DIAG_REQ_TAIL = struct.Struct("=II")
#: inet_diag_sockid of a dump: no ports, addresses or interface; cookie INET_DIAG_NOCOOKIE.
_ANY_SOCKID = bytes(40) + b"\xff" * 8
_RECV_BUFFER = 65536
#: How long the main thread runs before handing the GIL to a reader whose recv() returned: the
#: readers need it for microseconds per 32 KiB reply, and the default 5 ms would hold the kernel's
#: walk back for that long after each one while the main thread imports or parses.
_SWITCH_INTERVAL = 0.0005


def dump_request(state_numbers: Collection[int], seq: int) -> bytes:
    """The two-family dump request ``netlink.build_request_both`` sends (with tcp_info)."""
    mask = 0
    for number in state_numbers:
        mask |= 1 << number
    body = _INET_DIAG_REQ_HEAD.pack(0, 0, 0, _INET_DIAG_INFO_EXT) + _ANY_SOCKID + _INET_DIAG_REQ_TAIL.pack(mask, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), _TCPDIAG_GETSOCK, _NLM_F_REQUEST_DUMP, seq, 0) + body


class _Failed:
    """An OSError a reader thread met, for the main thread to raise as netlink.dump would."""

    def __init__(self, sending: bool, error: OSError) -> None:
        self.sending = sending
        self.error = error


def _ends_reply(data: bytes) -> bool:
    """Whether this recv() holds the end of the dump's reply (NLMSG_DONE or NLMSG_ERROR).

    Only the headers are read; the parser checks everything. A header too short to step over
    ends the reading too: the parser will reject it.
    """
    offset = 0
    end = len(data)
    while end - offset >= _NLMSGHDR.size:
        length, msg_type = _NLMSGHDR_LEN_TYPE.unpack_from(data, offset)
        if msg_type in (_NLMSG_DONE, _NLMSG_ERROR) or length < _NLMSGHDR.size:
            return True
        offset += (length + 3) & ~3  # NLMSG_ALIGN (netlink.nlmsg_align)
    return False


def _read(sock: _socket.socket, request: bytes, replies: _queue.SimpleQueue[bytes | _Failed]) -> None:
    """Send ``request``, queue every recv() up to the end of the reply, close ``sock``."""
    try:
        try:
            sock.sendto(request, (0, 0))
        except OSError as err:
            replies.put(_Failed(True, err))
            return
        while True:
            try:
                data = sock.recv(_RECV_BUFFER)
            except OSError as err:
                replies.put(_Failed(False, err))
                return
            replies.put(data)
            if not data or _ends_reply(data):
                return
    finally:
        sock.close()


class PrefetchedSource:
    """A SocketSource whose dump was started by ``start()``: the netlink backend, read early.

    ``sockets()`` returns the prefetched reply when asked for the states ``start`` requested (once);
    any other call, or a kernel that refused the two-family request, reads the kernel again
    through ``netlink.dump``.

    ``while_waiting``, when set, is called with the sockets parsed since its last call each time
    the main thread has parsed every reply that arrived and would otherwise wait for the kernel's
    next one: the console writes their JSON then (``serialize.SocketJson.add``), in time the
    kernel's walk leaves idle. It never delays a reply that is already there.
    """

    name = "netlink"

    def __init__(self, state_numbers: frozenset[int], seq: int, replies: _queue.SimpleQueue[bytes | _Failed]):
        self._state_numbers = state_numbers
        self._seq = seq
        self._replies: _queue.SimpleQueue[bytes | _Failed] | None = replies
        self.while_waiting: Callable[[list[Socket]], None] | None = None

    def sockets(self, states: frozenset[TcpState]) -> list[Socket]:
        from closewait.errors import NetlinkError
        from closewait.sources import netlink

        replies, self._replies = self._replies, None
        if replies is None or frozenset(int(state) for state in states) != self._state_numbers:
            return list(netlink.dump(states))
        found: list[Socket] = []
        hook = self.while_waiting
        given = 0

        def idle() -> None:
            nonlocal given
            if hook is not None and given < len(found):
                batch = found[given:]
                given = len(found)
                hook(batch)

        try:
            # parse_reply's steps, a recv()'s sockets at a time: no generator hop per socket.
            for data in _received(replies, idle):
                batch, done = netlink.parse_messages(data, self._seq, netlink.TCPDIAG_GETSOCK)
                found += batch
                if done:
                    return found
        except NetlinkError as err:
            if not netlink.both_refused(err):
                raise
        return list(netlink.dump(states))


def _received(replies: _queue.SimpleQueue[bytes | _Failed], idle: Callable[[], None]) -> Iterator[bytes]:
    """The reader's recv()s in order; its errors raised as ``netlink.dump`` raises them. ``idle()``
    runs whenever the next one has not arrived yet."""
    from closewait.errors import NetlinkError

    while True:
        if replies.empty():
            idle()
        item = replies.get()
        if isinstance(item, _Failed):
            err = item.error
            what = "request" if item.sending else "receive"
            raise NetlinkError(f"sock_diag {what} failed: {err.strerror}", errno=err.errno) from err
        if not item:
            raise NetlinkError("sock_diag reply ended before NLMSG_DONE")
        yield item


def start(state_numbers: Collection[int]) -> PrefetchedSource | None:
    """Send the two-family dump request for ``state_numbers`` and start reading the reply.

    None when a netlink sock_diag socket cannot be opened: the caller then scans as usual (which
    falls back to /proc/net/tcp, or reports why it cannot). Lowers the interpreter's switch
    interval (see ``_SWITCH_INTERVAL``): call it only in a process that exists to scan.
    """
    import sys

    numbers = frozenset(state_numbers)
    try:
        sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG)
    except OSError:
        return None
    sys.setswitchinterval(min(sys.getswitchinterval(), _SWITCH_INTERVAL))
    seq = 1
    replies: _queue.SimpleQueue[bytes | _Failed] = _queue.SimpleQueue()
    _thread.start_new_thread(_read, (sock, dump_request(numbers, seq), replies))
    return PrefetchedSource(numbers, seq, replies)
