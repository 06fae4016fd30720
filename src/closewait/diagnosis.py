"""Why a socket is where it is: pure rules from a Socket, its owners and its role to a Diagnosis.

Nothing here reads the kernel; the rules rest on facts the scan gathered:

- In CLOSE_WAIT the kernel counts the peer's FIN as one byte of Recv-Q until the owner reads EOF.
  Recv-Q 0: read() returned 0 and the owner still did not close (``eof-not-closed``).
  Recv-Q 1: nobody has read the socket since the FIN arrived (``not-reading``).
  Recv-Q N>1: N-1 bytes the peer sent before closing were never read (``unread-data``).
- The role says which end the owner is: a server leaks by not closing accepted connections, a
  client usually through a connection pool that keeps idle connections the server has closed.

Codes are stable: programs match on them (docs/diagnoses.md lists them).
"""

from __future__ import annotations

from collections.abc import Collection

from closewait._records import make_diagnosis
from closewait.display import format_address, format_duration, plural
from closewait.model import Diagnosis, Endpoint, Owner, Role, Socket, TcpState

EOF_NOT_CLOSED = "eof-not-closed"
NOT_READING = "not-reading"
UNREAD_DATA = "unread-data"
ORPHAN_FIN_WAIT2 = "orphan-fin-wait-2"
HALF_CLOSED = "half-closed"
PEER_NOT_READING = "peer-not-reading"
LAST_ACK = "last-ack"
TIME_WAIT = "time-wait"
CLOSING = "closing"

# Module constants for what the per-socket rules compare with: a member read from an Enum class goes
# through its metaclass (~70 ns), a module global is one dict lookup; a scan runs these per socket.
_LISTEN = TcpState.LISTEN
_CLOSE_WAIT = TcpState.CLOSE_WAIT
_SERVER = Role.SERVER
_CLIENT = Role.CLIENT
_UNKNOWN = Role.UNKNOWN

#: Every code ``diagnose`` can return, with the states it applies to.
CODES: dict[str, str] = {
    EOF_NOT_CLOSED: "CLOSE_WAIT, Recv-Q 0: the owner read EOF and did not close",
    NOT_READING: "CLOSE_WAIT, Recv-Q 1: nobody read the socket since the peer's FIN",
    UNREAD_DATA: "CLOSE_WAIT, Recv-Q > 1: data the peer sent before closing is unread",
    ORPHAN_FIN_WAIT2: "FIN_WAIT2 with no owner: closed here, the peer has not closed yet",
    HALF_CLOSED: "FIN_WAIT2 with an owner: shutdown(SHUT_WR) here, the peer has not closed yet",
    PEER_NOT_READING: "FIN_WAIT1 with data queued behind the FIN: the peer does not read what was sent",
    LAST_ACK: "LAST_ACK: closed after the peer did; waiting for the final ACK",
    TIME_WAIT: "TIME_WAIT: the normal end of the side that closed first",
    CLOSING: "CLOSING: both sides closed at once; waiting for the final ACK",
}


def role_of(
    socket: Socket,
    owners: Collection[Owner],
    listening: Collection[tuple[int, Endpoint]],
    host_listening_ports: Collection[int] = (),
) -> Role:
    """Server when one of the socket's owner processes listens on its local port, client otherwise.

    ``listening`` holds (pid, local endpoint) for every listening socket whose owner is known.
    ``host_listening_ports`` catches the accept-in-one-process, serve-in-another design (the
    connection is handed over a unix socket, so its owner holds no listener): a connection whose
    local port some listener on the host uses is still the server's end.
    """
    if socket.state == _LISTEN:
        return _SERVER
    if not owners:
        return _UNKNOWN
    # The host-wide port test first: one set lookup answers most server ends (it runs once per
    # socket in a scan), before the owners' pids are gathered for the per-listener test.
    local = socket.local
    if local.port in host_listening_ports:
        return _SERVER
    pids = {owner.process.pid for owner in owners}
    for pid, endpoint in listening:
        if pid in pids and endpoint.port == local.port and _covers(endpoint, local):
            return _SERVER
    return _CLIENT


def _covers(listener: Endpoint, local: Endpoint) -> bool:
    if listener.address in ("0.0.0.0", "::"):
        return True
    if listener.address == local.address:
        return True
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
    return local.address == f"::ffff:{listener.address}" or listener.address == f"::ffff:{local.address}"


#: " 4.7 min ago" by milliseconds. The sockets of one leak closed in bursts, so a scan's thousands of
#: summaries share a few dozen ages, and ``format_duration`` is a third of a summary's cost.
_AGO_PHRASES: dict[int, str] = {}


def _ago_phrase(ms: int | None) -> str:
    """`` 4.7 min ago`` (empty when the time is unknown), each distinct ``ms`` formatted once."""
    if ms is None:
        return ""
    phrase = _AGO_PHRASES.get(ms)
    if phrase is None:
        if len(_AGO_PHRASES) >= 4096:  # a long-running exporter sees ever new ages: stay small
            _AGO_PHRASES.clear()
        phrase = _AGO_PHRASES[ms] = f" {format_duration(ms)} ago"
    return phrase


def diagnose_close_wait(socket: Socket, role: Role, ago_ms: int | None) -> Diagnosis:
    """``diagnose`` for a socket known to be in CLOSE_WAIT (scan's per-socket loop knows the state).

    ``ago_ms`` is how long ago the peer closed, as the summary says it: the exact age when the
    recorder knows it, else the socket's ``idle_ms`` (a lower bound), None when neither is known.
    """
    remote = socket.remote
    peer = format_address(remote.address, remote.port)  # str(remote), without the calls in between
    recv_q = socket.recv_q
    if recv_q == 0:
        summary = f"read() returned 0 (EOF) after {peer} closed{_ago_phrase(ago_ms)}, but it has not been closed"
        if role == _SERVER:
            remedy = (
                "close the connection when read()/recv() returns 0 (b'' in Python; in asyncio, "
                "call writer.close() when reader.read() returns b'')"
            )
        elif role == _CLIENT:
            remedy = (
                "the client saw the server close and kept the socket: close it on EOF, or have its "
                "connection pool discard connections it finds closed"
            )
        else:
            remedy = "the owner read EOF and kept the socket: close it when read() returns 0"
        return make_diagnosis(EOF_NOT_CLOSED, summary, remedy)
    if recv_q == 1:
        summary = f"{peer} closed{_ago_phrase(ago_ms)} and nothing has read this socket since"
        if role == _SERVER:
            remedy = (
                "nothing reads this connection: watch it with epoll/selectors (or asyncio) so the EOF "
                "is seen, then close; add an idle timeout for connections no code is waiting on"
            )
        elif role == _CLIENT:
            remedy = (
                "an idle pooled connection the server closed: set the pool's idle timeout shorter than "
                "the server's keep-alive timeout, or close the pool/session when done with it"
            )
        else:
            remedy = "nothing reads this socket: read it until EOF and close, or add an idle timeout"
        return make_diagnosis(NOT_READING, summary, remedy)
    unread = socket.unread_bytes
    summary = f"{plural(unread, 'byte')} sent by {peer} before it closed were never read"
    if role == _CLIENT:
        remedy = (
            "the response was never consumed: read it to the end (or discard it) and close, and check "
            "for a stuck or abandoned consumer"
        )
    else:
        remedy = (
            "the code that should read this connection is stuck or gone: find it (py-spy dump, jstack, "
            "gdb), read to EOF and close"
        )
    return make_diagnosis(UNREAD_DATA, summary, remedy)


def diagnose(
    socket: Socket, owners: Collection[Owner], role: Role, close_wait_age_ms: int | None = None
) -> Diagnosis | None:
    """The diagnosis for a socket in a teardown state; None for states that need none.

    ``close_wait_age_ms`` is the exact time since the peer closed, when the recorder knows it;
    without it "closed N ago" is ``tcpi_last_ack_recv`` (a lower bound)."""
    state = socket.state
    if state == _CLOSE_WAIT:
        return diagnose_close_wait(socket, role, socket.idle_ms if close_wait_age_ms is None else close_wait_age_ms)
    if state == TcpState.FIN_WAIT2:
        if not owners:
            return make_diagnosis(
                ORPHAN_FIN_WAIT2,
                f"closed here; {socket.remote} has not closed its side",
                "the peer is likely stuck in CLOSE_WAIT: fix the peer; the kernel drops this socket after "
                "net.ipv4.tcp_fin_timeout",
            )
        return make_diagnosis(
            HALF_CLOSED,
            f"shut down for writing here; {socket.remote} has not closed its side",
            "the peer must close (it may be in CLOSE_WAIT); or close this end if no more data is expected",
        )
    # In FIN_WAIT1 Send-Q counts this side's FIN (one sequence number) until the peer ACKs it, so
    # Send-Q 1 is only the FIN in flight; more means data the peer has not taken.
    if state == TcpState.FIN_WAIT1 and socket.send_q > 1:
        queued = socket.send_q - 1
        return make_diagnosis(
            PEER_NOT_READING,
            f"{plural(queued, 'byte')} still queued for {socket.remote}, which is not reading",
            "the peer's receive window is closed: fix the peer's reader, or use SO_LINGER/TCP_USER_TIMEOUT "
            "to bound how long the kernel keeps trying",
        )
    if state == TcpState.LAST_ACK:
        return make_diagnosis(
            LAST_ACK,
            f"closed after {socket.remote} did; waiting for its final ACK",
            "normal and short-lived; many of them mean the peer vanished without acknowledging",
        )
    if state == TcpState.TIME_WAIT:
        return make_diagnosis(
            TIME_WAIT,
            "this side closed first; the kernel keeps the connection for 60 s to absorb stray segments",
            "normal; if ports run out, reuse connections (keep-alive) rather than tuning TIME_WAIT away",
        )
    if state == TcpState.CLOSING:
        return make_diagnosis(
            CLOSING,
            "both sides closed at the same time; waiting for the final ACK",
            "normal and short-lived",
        )
    return None
