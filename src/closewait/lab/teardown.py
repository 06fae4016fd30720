"""The article's close()/shutdown() table, row by row, as experiments on the running kernel.

Each experiment uses fresh sockets on 127.0.0.1 port 0, captures its segments on ``lo`` when it
can (``sources.capture``), and also gathers evidence that needs no privilege: TCP states and queues
from sock_diag (an exact 4-tuple lookup, cheap on busy hosts), and what the peer application saw (data, EOF, ECONNRESET,
EAGAIN). ``fin_sent``/``rst_sent`` come from the packets when they were captured, else from that
second kind of evidence (``evidence`` says which). Verdicts are computed from what happened, never
written in advance.

Experiment ids (stable, listed in docs/lab.md): shutdown-rd, shutdown-wr, close-fin,
close-fd-vs-connection, close-send-buffer, close-unread-rst, linger-zero, shared-fd,
closewait-close-unread.

Pitfalls handled here:

- "Queued" must really mean queued: the receiver gets a small SO_RCVBUF (set on the listener before
  listen(), so the accepted socket and its window scale inherit it) and does not read until after
  the close/shutdown, and the sender gets a large SO_SNDBUF so megabytes fit in its send queue.
- Sockets still open when an experiment ends (or is interrupted) are aborted with SO_LINGER {1, 0}
  after the capture stopped, so they leave no FIN_WAIT/TIME_WAIT behind. Only connections an
  experiment closes on purpose go through TIME_WAIT (60 s, owned by no process).
- The fd check after close() runs before anything else can open a descriptor and reuse the number.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import logging
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from closewait.lab import evidence
from closewait.lab.model import Experiment, LabContext, Measurement, Verdict, unfinished
from closewait.lab.report import PART_IDS
from closewait.model import Endpoint, Socket, TcpState
from closewait.sources import netlink
from closewait.sources.capture import Capture, Segment
from closewait.sources.process import descriptor_after_close

log = logging.getLogger(__name__)

PART = "teardown"
HOST = "127.0.0.1"
#: Receive buffer of the side that must not drain the sender's queue too fast.
SMALL_RCVBUF = 16 * 1024
SO_SNDBUFFORCE = 32
#: Send buffer big enough to hold MEGABYTES (the kernel doubles it; capped at wmem_max unless root).
BIG_SNDBUF = 4 * 1024 * 1024
MEGABYTES = 3 * 1024 * 1024
#: How long "nothing was sent" is watched for.
QUIET_S = 0.1
WAIT_S = 3.0

#: The experiments' ids, in the article's table order (the reports' list; EXPERIMENTS follows it).
IDS = PART_IDS["teardown"]

#: The article's table, row by row, with the experiments that test each row (for the reports).
ARTICLE_TABLE: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("what it closes", "read side, write side, or both", "both", ("shutdown-rd", "shutdown-wr")),
    ("sends FIN", "yes", "yes", ("close-fin", "close-unread-rst", "shared-fd", "closewait-close-unread")),
    (
        "releases resources",
        "no, not until the four-way close finishes",
        "yes, immediately",
        ("close-fd-vs-connection",),
    ),
    (
        "send buffer",
        "if the write side is shut, queued data is still sent",
        "if shutdown did not shut the write side, close forces it shut and discards the data left in the send buffer",
        ("shutdown-wr", "close-send-buffer", "linger-zero"),
    ),
)


def _poll(predicate: Callable[[], Any], timeout: float = WAIT_S, interval: float = 0.01) -> Any:
    """Bounded polling: the predicate's first truthy value, or its last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def lookup(local: Endpoint, remote: Endpoint) -> Socket | None:
    """One connection's record from sock_diag, by exact 4-tuple (no dump), or None if it is gone.

    A full dump costs seconds on a host with tens of thousands of sockets; see
    ``netlink.lookup_connection`` for the exact request and its listener pitfall.
    """
    return netlink.lookup_connection(local, remote)


def _endpoint(address: Any) -> Endpoint:
    return Endpoint(str(address[0]), int(address[1]))


def _abort(sock: socket.socket) -> None:
    """Close with SO_LINGER {1, 0}: RST, no TIME_WAIT. For cleanup only."""
    with contextlib.suppress(OSError):
        if sock.fileno() >= 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _peer_read(sock: socket.socket, wait: float = 0.0) -> tuple[str, bytes]:
    """What the application on ``sock`` sees now: ("data", bytes), ("eof", b""), ("reset", b"") or
    ("nothing", b"") when a read would block (after waiting up to ``wait`` seconds for readiness)."""
    if wait:
        select.select([sock], [], [], wait)
    try:
        data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return "nothing", b""
    except ConnectionResetError:
        return "reset", b""
    return ("data", data) if data else ("eof", b"")


def _read_all(sock: socket.socket, timeout: float = 10.0) -> tuple[int, str]:
    """Read until EOF or error; (bytes read, how it ended: "eof", "reset" or "timeout")."""
    total = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], min(0.5, max(deadline - time.monotonic(), 0)))
        if not ready:
            continue
        try:
            data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            return total, "reset"
        if not data:
            return total, "eof"
        total += len(data)
    return total, "timeout"


def _fill(sock: socket.socket, limit: int) -> int:
    """Queue up to ``limit`` bytes without blocking; returns how many the kernel accepted."""
    chunk = b"q" * 65536
    sent = 0
    while sent < limit:
        try:
            sent += sock.send(chunk[: min(len(chunk), limit - sent)], socket.MSG_DONTWAIT)
        except BlockingIOError:
            # The send queue is full; give the loopback a moment, then stop if it stays full.
            if not select.select([], [sock], [], 0.05)[1]:
                break
    return sent


@dataclass
class _Bench:
    """One experiment's sockets, listener, capture and evidence helpers."""

    ctx: LabContext
    listener_rcvbuf: int | None = None
    sockets: list[socket.socket] = field(default_factory=list)
    actors: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    cap: Capture | None = None
    port: int = 0
    #: fin_sent/rst_sent (and kin) as told by states and errno alone; see _sent_flag.
    without_packets: dict[str, Measurement] = field(default_factory=dict)

    def __post_init__(self) -> None:
        listener = self.track(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        if self.listener_rcvbuf:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.listener_rcvbuf)
        listener.bind((HOST, 0))
        listener.listen(8)
        self.listener = listener
        self.port = listener.getsockname()[1]
        self.cap = Capture([self.port], enabled=self.ctx.capture).start()

    def track(self, sock: socket.socket) -> socket.socket:
        self.sockets.append(sock)
        return sock

    def pair(
        self, *, sndbuf: int | None = None, label: str = ""
    ) -> tuple[socket.socket, socket.socket, Endpoint, Endpoint]:
        """A connected (client, server) pair and their local endpoints; the client's send buffer
        set before connecting. Every experiment needs the endpoints: kernel lookups and packets
        are by endpoint, and every server side shares the listener's address."""
        client = self.track(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        if sndbuf:
            try:
                client.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, sndbuf)
            except OSError:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        client.settimeout(WAIT_S)
        client.connect((HOST, self.port))
        client.settimeout(None)
        self.listener.settimeout(WAIT_S)
        server, _ = self.listener.accept()
        server.settimeout(None)
        self.track(server)
        client_ep, server_ep = _endpoint(client.getsockname()), _endpoint(server.getsockname())
        suffix = f" {label}" if label else ""
        self.actors[str(client_ep)] = f"client{suffix}"
        # Every server side shares the listener's address: one label for all of them.
        self.actors[str(server_ep)] = "server"
        return client, server, client_ep, server_ep

    @property
    def captured(self) -> bool:
        return self.cap is not None and self.cap.active

    def sync(self) -> tuple[Segment, ...]:
        if self.cap is None or not self.cap.active:
            return ()
        self.cap.sync()
        return self.cap.segments()

    def quiet(self) -> None:
        """Let QUIET_S pass so that a segment the kernel would send has been sent."""
        time.sleep(QUIET_S)

    def state_of(self, local: Endpoint, remote: Endpoint) -> Socket | None:
        """The kernel's record of one connection, seen from ``local`` (None once it is gone)."""
        return lookup(local, remote)

    def close(self) -> None:
        if self.cap is not None:
            self.cap.stop()
        while self.sockets:
            _abort(self.sockets.pop())

    def result(
        self,
        exp_id: str,
        *,
        title: str,
        claim: str,
        observed: str,
        verdict: Verdict,
        measurements: Mapping[str, Measurement],
        notes: tuple[str, ...] = (),
    ) -> Experiment:
        if self.cap is not None:
            self.cap.stop()
        packets = self.cap.segments() if self.cap is not None else ()
        extra: dict[str, Measurement] = {
            **self.without_packets,
            "evidence": "packets" if self.captured else "states-and-errno",
        }
        if not self.captured and self.cap is not None and self.cap.reason:
            notes = (*notes, self.cap.reason)
        if self.cap is not None and self.cap.drops:
            extra["capture_drops"] = self.cap.drops
        return Experiment(
            id=exp_id,
            part=PART,
            title=title,
            claim=claim,
            observed=observed,
            verdict=verdict,
            measurements={**measurements, **extra},
            packets=packets,
            packets_captured=self.captured,
            actors=dict(self.actors),
            notes=notes,
            duration_s=round(time.monotonic() - self.started, 3),
        )


@contextlib.contextmanager
def _bench(ctx: LabContext, *, listener_rcvbuf: int | None = None) -> Iterator[_Bench]:
    bench = _Bench(ctx, listener_rcvbuf=listener_rcvbuf)
    try:
        yield bench
    finally:
        bench.close()


def _sent_flag(
    bench: _Bench, flag: str, by: Endpoint, to: Endpoint, fallback: bool, since: int = 0, key: str | None = None
) -> bool:
    """Did ``by`` send ``to`` a segment with ``flag`` (after the first ``since`` segments)? Packets
    when captured, else ``fallback`` (the state/errno evidence).

    Both ends are needed: every server side shares the listener's address and port. With ``key``,
    the state/errno answer is also kept as measurement ``<key>_without_packets``, so a root run
    shows both kinds of evidence side by side (and the tests check they agree)."""
    if key is not None:
        bench.without_packets[f"{key}_without_packets"] = fallback
    if bench.captured:
        return evidence.sent(evidence.between(bench.sync()[since:], by, to), flag, by=by)
    return fallback


def _seg_count(bench: _Bench) -> int:
    return len(bench.sync())


def _yes(value: bool) -> str:
    return "yes" if value else "no"


# -- the experiments ----------------------------------------------------------------------------


def shutdown_rd(ctx: LabContext) -> Experiment:
    with _bench(ctx) as bench:
        client, server, c_ep, s_ep = bench.pair()
        mark = _seg_count(bench)
        server.shutdown(socket.SHUT_RD)
        bench.quiet()
        client_sock = bench.state_of(c_ep, s_ep)
        client_state = client_sock.state.ss_name if client_sock else "gone"
        peer_saw, _ = _peer_read(client)
        anything = bench.captured and any(s.src == s_ep for s in bench.sync()[mark:])
        sent_anything = anything if bench.captured else client_state != "established"
        payload = b"sent after SHUT_RD\n" * 100
        client.sendall(payload)
        _poll(lambda: (s := bench.state_of(s_ep, c_ep)) is not None and s.recv_q >= len(payload))
        server_sock = bench.state_of(s_ep, c_ep)
        queued = server_sock.recv_q if server_sock else 0
        got = b""
        while len(got) < len(payload):
            kind, data = _peer_read(server, wait=0.5)
            if kind != "data":
                break
            got += data
        after_drain, _ = _peer_read(server)
        rst = _sent_flag(bench, "RST", s_ep, c_ep, fallback=client_state == "gone", key="rst_sent")
        fin = _sent_flag(bench, "FIN", s_ep, c_ep, fallback=sent_anything, key="fin_sent")
        accepted = len(got) == len(payload)
        verdict = Verdict.HOLDS_WITH_CAVEAT if not sent_anything and accepted else Verdict.HOLDS
        if sent_anything:
            verdict = Verdict.DOES_NOT_HOLD
        how = "no segment left the socket" if bench.captured else f"the peer stayed {client_state}"
        observed = (
            f"shutdown(SHUT_RD) sent nothing ({how}; the peer read: {peer_saw}). The peer then sent "
            f"{len(payload)} bytes: send() succeeded, the kernel queued {queued} bytes (Recv-Q) and "
            f"recv() on the shut socket returned {len(got)} of them. Once drained, recv() returned "
            f"{'0 (EOF)' if after_drain == 'eof' else after_drain}."
        )
        return bench.result(
            "shutdown-rd",
            title="shutdown(SHUT_RD)",
            claim="Shutting the read side only marks a state in the kernel; the peer is not told that it may "
            "not send any more.",
            observed=observed,
            verdict=verdict,
            measurements={
                "fin_sent": fin,
                "rst_sent": rst,
                "segments_sent_by_shutdown": sent_anything,
                "peer_saw": peer_saw,
                "peer_state": client_state,
                "bytes_sent": len(payload),
                "bytes_delivered": len(got),
                "recv_q_after_shut_rd": queued,
                "read_when_drained": after_drain,
            },
            notes=(
                "The table says shutdown closes 'the read side', but on Linux data that arrives after "
                "SHUT_RD is still acknowledged, queued and readable; only an empty queue reads as EOF. "
                "Other systems may discard it.",
            ),
        )


def shutdown_wr(ctx: LabContext) -> Experiment:
    with _bench(ctx, listener_rcvbuf=SMALL_RCVBUF) as bench:
        client, server, c_ep, s_ep = bench.pair(sndbuf=BIG_SNDBUF)
        isn = next((s.seq for s in bench.sync() if s.src == c_ep and "SYN" in s.flags), None)
        queued = _fill(client, MEGABYTES)
        before = bench.state_of(c_ep, s_ep)
        send_q = before.send_q if before else 0
        client.shutdown(socket.SHUT_WR)
        bench.quiet()
        fin_early = _sent_flag(bench, "FIN", c_ep, s_ep, fallback=False)
        delivered, ending = _read_all(server)
        # The connection is half-closed, not closed: the client can still read.
        server.sendall(b"still open the other way\n")
        back, reply = _peer_read(client, wait=1.0)
        segments = bench.sync()
        fins = [s for s in segments if s.src == c_ep and "FIN" in s.flags]
        data_segs = [i for i, s in enumerate(segments) if s.src == c_ep and s.length]
        fin_index = next((i for i, s in enumerate(segments) if s.src == c_ep and "FIN" in s.flags), None)
        fin_after_data = bool(fin_index is not None and (not data_segs or fin_index >= data_segs[-1]))
        fin_seq_ok: bool | None = None
        if fins and isn is not None:
            fin_seq_ok = (fins[0].seq + fins[0].length - isn - 1) % 2**32 == queued
        fin = _sent_flag(bench, "FIN", c_ep, s_ep, fallback=ending == "eof", key="fin_sent")
        rst = _sent_flag(bench, "RST", c_ep, s_ep, fallback=ending == "reset", key="rst_sent")
        all_delivered = delivered == queued and ending == "eof"
        verdict = Verdict.HOLDS if all_delivered and fin and not rst else Verdict.DOES_NOT_HOLD
        packet_part = (
            f" The FIN left {'after' if fin_after_data else 'BEFORE'} the last data segment"
            + (f", its sequence number right after byte {queued}" if fin_seq_ok else "")
            + f"; no FIN was on the wire while data was queued: {_yes(not fin_early)}."
            if bench.captured
            else ""
        )
        observed = (
            f"{queued} bytes were queued ({send_q} in Send-Q, the receiver not reading) when "
            f"shutdown(SHUT_WR) ran. The receiver then read {delivered} bytes and then "
            f"{'EOF' if ending == 'eof' else ending}.{packet_part} The other direction still worked: "
            f"the client read {len(reply) if back == 'data' else back}."
        )
        return bench.result(
            "shutdown-wr",
            title="shutdown(SHUT_WR) with megabytes queued",
            claim="shutdown sends FIN; if the write side is shut, the data queued in the send buffer is still sent.",
            observed=observed,
            verdict=verdict,
            measurements={
                "fin_sent": fin,
                "rst_sent": rst,
                "peer_saw": ending,
                "bytes_sent": queued,
                "bytes_delivered": delivered,
                "send_q_at_shutdown": send_q,
                "fin_after_all_data": fin_after_data if bench.captured else all_delivered,
                "fin_while_queued": fin_early if bench.captured else None,
                "reverse_direction_open": back == "data",
            },
            notes=(
                "shutdown(SHUT_WR) acts on the connection, not on the descriptor: it sends FIN even while other "
                "descriptors (dup, fork) still refer to the socket (see shared-fd).",
                "It releases nothing: the fd stays open and must still be closed.",
            ),
        )


def close_fin(ctx: LabContext) -> Experiment:
    with _bench(ctx) as bench:
        client, server, c_ep, s_ep = bench.pair()
        client.sendall(b"hello\n")
        first, _ = _peer_read(server, wait=1.0)
        client.close()
        server_sock = _poll(
            lambda: (s := bench.state_of(s_ep, c_ep)) is not None and s.state == TcpState.CLOSE_WAIT and s
        )
        state = server_sock.state.ss_name if server_sock else "not close-wait"
        recv_q = server_sock.recv_q if server_sock else None
        peer_saw, _ = _peer_read(server, wait=1.0)
        fin = _sent_flag(bench, "FIN", c_ep, s_ep, fallback=bool(server_sock), key="fin_sent")
        rst = _sent_flag(bench, "RST", c_ep, s_ep, fallback=peer_saw == "reset", key="rst_sent")
        verdict = Verdict.HOLDS if fin and not rst and peer_saw == "eof" else Verdict.DOES_NOT_HOLD
        observed = (
            f"After the server read everything ({first}), the client's close() sent "
            f"{'FIN' if fin else 'no FIN'}{' and RST' if rst else ''}. The server's socket went to {state} "
            f"(Recv-Q {recv_q}: the FIN counts as one byte until read) and its recv() returned "
            f"{'0 (EOF)' if peer_saw == 'eof' else peer_saw}."
        )
        return bench.result(
            "close-fin",
            title="close() with nothing unread",
            claim="close() closes both directions and sends FIN.",
            observed=observed,
            verdict=verdict,
            measurements={
                "fin_sent": fin,
                "rst_sent": rst,
                "peer_saw": peer_saw,
                "peer_state": state,
                "peer_recv_q": recv_q,
            },
            notes=(
                "Only when nothing received is left unread: see close-unread-rst.",
                "The peer now sits in CLOSE_WAIT until its application closes: that is the leak this project is about.",
            ),
        )


def close_fd_vs_connection(ctx: LabContext) -> Experiment:
    with _bench(ctx, listener_rcvbuf=SMALL_RCVBUF) as bench:
        client, server, c_ep, s_ep = bench.pair(sndbuf=BIG_SNDBUF)
        queued = _fill(client, 1024 * 1024)
        fd = client.fileno()
        client.close()
        # First thing after close(): nothing in this thread has had a chance to reuse the number.
        fd_errno, in_proc = descriptor_after_close(fd)
        fd_released = fd_errno == "EBADF" and not in_proc
        after = bench.state_of(c_ep, s_ep)
        states_seen: list[str] = []
        if after:
            states_seen.append(after.state.ss_name)
        send_q_after = after.send_q if after else 0
        orphan = after is not None and after.inode == 0
        delivered, ending = _read_all(server)
        fw2 = _poll(lambda: (s := bench.state_of(c_ep, s_ep)) is not None and s.state == TcpState.FIN_WAIT2 and s)
        if fw2:
            states_seen.append(fw2.state.ss_name)
        server.close()
        tw = _poll(lambda: (s := bench.state_of(c_ep, s_ep)) is not None and s.state == TcpState.TIME_WAIT and s)
        if tw:
            states_seen.append(tw.state.ss_name)
        left = bench.state_of(c_ep, s_ep) is None
        fin = _sent_flag(bench, "FIN", c_ep, s_ep, fallback=ending == "eof", key="fin_sent")
        rst = _sent_flag(bench, "RST", c_ep, s_ep, fallback=ending == "reset", key="rst_sent")
        kept = bool(after) and send_q_after > 0
        if fd_released and kept and delivered == queued:
            verdict = Verdict.HOLDS_WITH_CAVEAT
        elif fd_released and not kept:
            verdict = Verdict.HOLDS
        else:
            verdict = Verdict.DOES_NOT_HOLD
        observed = (
            f"Right after close(), fcntl(F_GETFD) on fd {fd} failed with {fd_errno} and /proc/self/fd/{fd} "
            f"{'was gone' if not in_proc else 'still existed'}: the descriptor was freed at once. But the kernel "
            f"kept the connection: {' -> '.join(states_seen) or 'no state seen'}, owned by "
            f"{'no process' if orphan else 'a process'}, with {send_q_after} bytes still in its Send-Q, and the "
            f"receiver then read all {delivered} of {queued} bytes and {ending}."
        )
        return bench.result(
            "close-fd-vs-connection",
            title="close() frees the fd, not the connection",
            claim="close() releases resources immediately (shutdown does not until the four-way close finishes).",
            observed=observed,
            verdict=verdict,
            measurements={
                "fd_released": fd_released,
                "fd_errno_after_close": fd_errno,
                "left_tcp_table": left,
                "states_after_close": states_seen,
                "send_q_after_close": send_q_after,
                "orphan": orphan,
                "fin_sent": fin,
                "rst_sent": rst,
                "peer_saw": ending,
                "bytes_sent": queued,
                "bytes_delivered": delivered,
            },
            notes=(
                "The connection, its buffers and its port stay in the kernel (an orphan: no fd, no owner) until the "
                "teardown ends; TIME_WAIT then holds the 4-tuple for 60 s (net.ipv4.tcp_fin_timeout does not change "
                "that). Orphans are capped by net.ipv4.tcp_max_orphans.",
                "FIN_WAIT2 of an orphan lasts net.ipv4.tcp_fin_timeout; the article's killed nc shows this.",
            ),
        )


def close_send_buffer(ctx: LabContext) -> Experiment:
    with _bench(ctx, listener_rcvbuf=SMALL_RCVBUF) as bench:
        client, server, c_ep, s_ep = bench.pair(sndbuf=BIG_SNDBUF)
        queued = _fill(client, MEGABYTES)
        before = bench.state_of(c_ep, s_ep)
        send_q = before.send_q if before else 0
        client.close()
        delivered, ending = _read_all(server)
        segments = bench.sync()
        fin = _sent_flag(bench, "FIN", c_ep, s_ep, fallback=ending == "eof", key="fin_sent")
        rst = _sent_flag(bench, "RST", c_ep, s_ep, fallback=ending == "reset", key="rst_sent")
        data_bytes = evidence.payload_bytes(segments, by=c_ep) if bench.captured else None
        discarded = queued - delivered
        verdict = Verdict.DOES_NOT_HOLD if discarded == 0 and ending == "eof" and not rst else Verdict.HOLDS
        wire = ""
        if data_bytes is not None:
            wire = (
                f" {data_bytes} payload bytes crossed the loopback (retransmissions included), then "
                f"{'FIN' if fin else 'no FIN'}, {'RST' if rst else 'no RST'}."
            )
        observed = (
            f"close() ran with {queued} bytes queued ({send_q} still in Send-Q, the receiver had not read). "
            f"The receiver then read {delivered} bytes and {ending}: {discarded} bytes were discarded.{wire}"
        )
        return bench.result(
            "close-send-buffer",
            title="close() with megabytes queued",
            claim="If shutdown did not shut the write side, close() forces it shut and discards the data left in "
            "the send buffer.",
            observed=observed,
            verdict=verdict,
            measurements={
                "fin_sent": fin,
                "rst_sent": rst,
                "peer_saw": ending,
                "bytes_sent": queued,
                "bytes_delivered": delivered,
                "send_q_at_close": send_q,
                "bytes_discarded": discarded,
            },
            notes=(
                "Linux keeps sending queued data after close() and appends the FIN. Data is discarded only when "
                "received data is unread at close() (close-unread-rst), with SO_LINGER {1, 0} (linger-zero), or "
                "when the orphan gives up (retries, tcp_max_orphans).",
                "close() returning does not mean the peer got the data; shutdown(SHUT_WR) then read() until EOF does.",
            ),
        )


def close_unread_rst(ctx: LabContext) -> Experiment:
    with _bench(ctx) as bench:
        client, server, c_ep, s_ep = bench.pair()
        payload = b"never read by the server\n" * 40
        client.sendall(payload)
        unread = _poll(lambda: (s := bench.state_of(s_ep, c_ep)) is not None and s.recv_q >= len(payload) and s.recv_q)
        server.close()
        peer_saw, _ = _peer_read(client, wait=1.0)
        try:
            client.send(b"x")
            second = "send ok"
        except OSError as err:
            second = errno_mod.errorcode.get(err.errno or 0, str(err))
        gone = _poll(lambda: bench.state_of(s_ep, c_ep) is None and bench.state_of(c_ep, s_ep) is None)
        rst = _sent_flag(bench, "RST", s_ep, c_ep, fallback=peer_saw == "reset", key="rst_sent")
        fin = _sent_flag(bench, "FIN", s_ep, c_ep, fallback=peer_saw == "eof", key="fin_sent")
        verdict = Verdict.DOES_NOT_HOLD if rst and not fin else Verdict.HOLDS
        observed = (
            f"The server close()d with {unread or 0} bytes unread. It sent {'RST' if rst else 'no RST'} and "
            f"{'FIN' if fin else 'no FIN'}. The client's next recv() saw "
            f"{'ECONNRESET' if peer_saw == 'reset' else peer_saw}, a send() after that: {second}. Both ends "
            f"{'left the TCP table at once (no TIME_WAIT)' if gone else 'were still in the TCP table'}."
        )
        return bench.result(
            "close-unread-rst",
            title="close() with unread received data",
            claim="close() sends FIN.",
            observed=observed,
            verdict=verdict,
            measurements={
                "fin_sent": fin,
                "rst_sent": rst,
                "peer_saw": peer_saw,
                "unread_bytes": unread or 0,
                "bytes_sent": len(payload),
                "bytes_delivered": 0,
                "peer_next_send": second,
                "left_tcp_table": bool(gone),
            },
            notes=(
                "RFC 2525 section 2.17: closing with unread data must reset the connection so the peer learns "
                "its data was lost. The table's 'close sends FIN' holds only when everything received was read.",
                "The RST also discards whatever the closing side still had queued to send.",
            ),
        )


def linger_zero(ctx: LabContext) -> Experiment:
    with _bench(ctx, listener_rcvbuf=SMALL_RCVBUF) as bench:
        client, server, c_ep, s_ep = bench.pair(sndbuf=BIG_SNDBUF)
        queued = _fill(client, 1024 * 1024)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        delivered, ending = _read_all(server)
        client_entry = bench.state_of(c_ep, s_ep)
        client_state = client_entry.state.ss_name if client_entry else "gone"
        rst = _sent_flag(bench, "RST", c_ep, s_ep, fallback=ending == "reset", key="rst_sent")
        fin = _sent_flag(bench, "FIN", c_ep, s_ep, fallback=ending == "eof", key="fin_sent")
        no_time_wait = client_entry is None
        discarded = queued - delivered
        verdict = Verdict.HOLDS if rst and discarded > 0 and no_time_wait else Verdict.DOES_NOT_HOLD
        observed = (
            f"With SO_LINGER {{1, 0}} and {queued} bytes queued, close() sent {'RST' if rst else 'no RST'}"
            f"{' and a FIN' if fin else ', no FIN'}. The receiver read {delivered} bytes, then "
            f"{'ECONNRESET' if ending == 'reset' else ending}: {discarded} bytes were discarded. The closing "
            f"side's connection: {client_state} (no TIME_WAIT: {_yes(no_time_wait)})."
        )
        return bench.result(
            "linger-zero",
            title="close() with SO_LINGER {1, 0}",
            claim="close() discards the data left in the send buffer (true only for this abortive close).",
            observed=observed,
            verdict=verdict,
            measurements={
                "fin_sent": fin,
                "rst_sent": rst,
                "peer_saw": ending,
                "bytes_sent": queued,
                "bytes_delivered": delivered,
                "bytes_discarded": discarded,
                "time_wait": not no_time_wait,
                "left_tcp_table": no_time_wait,
            },
            notes=(
                "The table does not mention SO_LINGER. {1, 0} is the abortive close: RST, queued data dropped, "
                "no TIME_WAIT. {1, N>0} makes close() block up to N seconds for the data to be acknowledged.",
            ),
        )


class _ForkedHolder:
    """A fork()ed child that holds an inherited socket and calls shutdown(SHUT_WR) on request.

    A real fork, as in the article's servers, not fork+exec: no interpreter has to be found or be
    executable by the current user. The child only reads a pipe, calls shutdown() and _exit()s:
    no Python cleanup runs in it, so it is safe although this process has threads (the capture).
    Ctrl+C on a terminal reaches the child too; its ``finally`` then exits at once.
    """

    def __init__(self, sock: socket.socket) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._ack_r, ack_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            try:
                os.close(self._cmd_w)
                os.close(self._ack_r)
                while os.read(cmd_r, 16) == b"shutdown":
                    sock.shutdown(socket.SHUT_WR)
                    os.write(ack_w, b"done")
            finally:
                os._exit(0)
        os.close(cmd_r)
        os.close(ack_w)
        self.pid = pid

    def shutdown(self) -> bool:
        os.write(self._cmd_w, b"shutdown")
        ready, _, _ = select.select([self._ack_r], [], [], WAIT_S)
        return bool(ready) and os.read(self._ack_r, 16) == b"done"

    def end(self) -> None:
        """Kill by pid and reap; safe to call twice."""
        for fd in (self._cmd_w, self._ack_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0


def shared_fd(ctx: LabContext) -> Experiment:
    with _bench(ctx) as bench:
        # dup(): two descriptors in this process.
        client, server, c_ep, s_ep = bench.pair(label="(dup)")
        second = bench.track(socket.socket(fileno=os.dup(client.fileno())))
        mark = _seg_count(bench)
        client.close()
        bench.quiet()
        dup_close_seen, _ = _peer_read(server)
        dup_close_fin = _sent_flag(
            bench, "FIN", c_ep, s_ep, fallback=dup_close_seen == "eof", since=mark, key="dup_close_sent_fin"
        )
        mark = _seg_count(bench)
        second.shutdown(socket.SHUT_WR)
        dup_shut_seen, _ = _peer_read(server, wait=1.0)
        dup_shut_fin = _sent_flag(
            bench, "FIN", c_ep, s_ep, fallback=dup_shut_seen == "eof", since=mark, key="dup_shutdown_sent_fin"
        )

        # fork(): the descriptor inherited by a child process.
        client2, server2, c2_ep, s2_ep = bench.pair(label="(fork)")
        child = _ForkedHolder(client2)
        ctx.on_close(child.end)
        try:
            mark = _seg_count(bench)
            client2.close()
            bench.quiet()
            fork_close_seen, _ = _peer_read(server2)
            fork_close_fin = _sent_flag(
                bench, "FIN", c2_ep, s2_ep, fallback=fork_close_seen == "eof", since=mark, key="fork_close_sent_fin"
            )
            mark = _seg_count(bench)
            done = child.shutdown()
            fork_shut_seen, _ = _peer_read(server2, wait=1.0)
            fork_shut_fin = _sent_flag(
                bench, "FIN", c2_ep, s2_ep, fallback=fork_shut_seen == "eof", since=mark, key="fork_shutdown_sent_fin"
            )
        finally:
            child.end()
        rst = bench.captured and evidence.sent(evidence.between(bench.sync(), c_ep, s_ep), "RST", by=c_ep)
        close_silent = not dup_close_fin and not fork_close_fin and dup_close_seen == fork_close_seen == "nothing"
        shut_fins = dup_shut_fin and fork_shut_fin and done
        verdict = Verdict.HOLDS_WITH_CAVEAT if close_silent and shut_fins else Verdict.DOES_NOT_HOLD
        observed = (
            f"dup(): close() of one of two descriptors sent {'FIN' if dup_close_fin else 'nothing'} (the peer "
            f"read: {dup_close_seen}); shutdown(SHUT_WR) on the other sent {'FIN' if dup_shut_fin else 'nothing'} "
            f"(peer: {dup_shut_seen}). fork(): the parent's close() sent {'FIN' if fork_close_fin else 'nothing'} "
            f"(peer: {fork_close_seen}) while the child held the socket; the child's shutdown(SHUT_WR) sent "
            f"{'FIN' if fork_shut_fin else 'nothing'} (peer: {fork_shut_seen})."
        )
        return bench.result(
            "shared-fd",
            title="close() vs shutdown() on a shared socket",
            claim="close() sends FIN (the table does not say: only when the last descriptor is closed).",
            observed=observed,
            verdict=verdict,
            measurements={
                "fin_sent": dup_shut_fin and fork_shut_fin,
                "rst_sent": rst,
                "peer_saw": "eof" if dup_shut_seen == fork_shut_seen == "eof" else dup_shut_seen,
                "dup_close_sent_fin": dup_close_fin,
                "dup_shutdown_sent_fin": dup_shut_fin,
                "fork_close_sent_fin": fork_close_fin,
                "fork_shutdown_sent_fin": fork_shut_fin,
                "peer_saw_after_close": fork_close_seen,
            },
            notes=(
                "close() drops one reference to the open file; TCP sees nothing until the last one goes. A child "
                "that inherited a socket (fork without CLOEXEC, a daemon's helper) keeps a connection open after the "
                "parent closed it, and that is a common CLOSE_WAIT leak on the other side.",
                "shutdown() acts on the socket itself: it sends FIN whatever the reference count.",
            ),
        )


def closewait_close_unread(ctx: LabContext) -> Experiment:
    with _bench(ctx) as bench:
        client, server, c_ep, s_ep = bench.pair(label="(unread)")
        payload = b"left unread in CLOSE_WAIT\n" * 20
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        cw = _poll(lambda: (s := bench.state_of(s_ep, c_ep)) is not None and s.state == TcpState.CLOSE_WAIT and s)
        recv_q = cw.recv_q if cw else None
        server.close()
        peer_saw, _ = _peer_read(client, wait=1.0)
        rst = _sent_flag(bench, "RST", s_ep, c_ep, fallback=peer_saw == "reset", key="rst_sent")
        fin = _sent_flag(bench, "FIN", s_ep, c_ep, fallback=peer_saw == "eof", key="fin_sent")

        # The contrast: the same CLOSE_WAIT socket, but read to EOF before close().
        client2, server2, c2_ep, s2_ep = bench.pair(label="(read)")
        client2.sendall(payload)
        client2.shutdown(socket.SHUT_WR)
        read2, _ = _read_all(server2, timeout=2.0)
        server2.close()
        contrast_saw, _ = _peer_read(client2, wait=1.0)
        contrast_fin = _sent_flag(
            bench, "FIN", s2_ep, c2_ep, fallback=contrast_saw == "eof", key="after_reading_all_fin_sent"
        )
        contrast_rst = _sent_flag(bench, "RST", s2_ep, c2_ep, fallback=contrast_saw == "reset")
        verdict = Verdict.DOES_NOT_HOLD if rst and not fin and contrast_fin else Verdict.HOLDS_WITH_CAVEAT
        observed = (
            f"A server socket in {cw.state.ss_name if cw else 'an unexpected state'} with Recv-Q {recv_q} "
            f"({len(payload)} unread bytes + the FIN) was close()d: it sent {'RST' if rst else 'no RST'} and "
            f"{'FIN' if fin else 'no FIN'}; the client read {'ECONNRESET' if peer_saw == 'reset' else peer_saw}. "
            f"The same socket read to EOF first ({read2} bytes) sent {'FIN' if contrast_fin else 'no FIN'}"
            f"{' and RST' if contrast_rst else ''} on close(); the client read {contrast_saw}."
        )
        return bench.result(
            "closewait-close-unread",
            title="close() of a CLOSE_WAIT socket with unread data",
            claim="close() sends FIN (here: ending CLOSE_WAIT).",
            observed=observed,
            verdict=verdict,
            measurements={
                "fin_sent": fin,
                "rst_sent": rst,
                "peer_saw": peer_saw,
                "recv_q_in_close_wait": recv_q,
                "unread_bytes": len(payload),
                "bytes_sent": len(payload),
                "bytes_delivered": 0,
                "after_reading_all_fin_sent": contrast_fin,
                "after_reading_all_peer_saw": contrast_saw,
            },
            notes=(
                "A leaking server that never reads (the article's reproduction) and is then fixed by closing the "
                "socket resets the connection; the peer sees ECONNRESET, not a clean end. Read to EOF, then close.",
                "In CLOSE_WAIT, Recv-Q counts the FIN as one byte until the application reads EOF.",
            ),
        )


EXPERIMENTS: tuple[tuple[str, Callable[[LabContext], Experiment]], ...] = (
    ("shutdown-rd", shutdown_rd),
    ("shutdown-wr", shutdown_wr),
    ("close-fin", close_fin),
    ("close-fd-vs-connection", close_fd_vs_connection),
    ("close-send-buffer", close_send_buffer),
    ("close-unread-rst", close_unread_rst),
    ("linger-zero", linger_zero),
    ("shared-fd", shared_fd),
    ("closewait-close-unread", closewait_close_unread),
)


def run(ctx: LabContext) -> list[Experiment]:
    """Every teardown experiment, in the order of the article's table. A failing one is an error
    result with the reason; KeyboardInterrupt propagates (the sockets are aborted on the way)."""
    results: list[Experiment] = []
    for exp_id, func in EXPERIMENTS:
        start = time.monotonic()
        try:
            results.append(func(ctx))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:
            log.exception("teardown experiment %s failed", exp_id)
            results.append(unfinished(exp_id, PART, exp_id, "", err, start))
    return results


__all__ = ["ARTICLE_TABLE", "EXPERIMENTS", "IDS", "run"]
