"""Packet capture on the loopback: the TCP segments of chosen ports, as ``Segment`` records.

The lab's ladder diagrams and packet evidence come from here (``lab/evidence.py`` reads them);
like every other read of the kernel, the packet socket lives in ``sources/``.

``capture(ports)`` opens an AF_PACKET raw socket (``ETH_P_ALL``) bound to ``lo`` and reads it in a
background thread. It keeps only TCP segments whose source or destination port is one of
``ports`` (a userspace filter: no BPF, so ports can be added after start with ``add_port``, because
experiments often learn their client's ephemeral port late). Each kept packet becomes a
``Segment`` (flags, seq, ack, payload length, time since the capture started).

    with capture([server_port]) as cap:
        ...                      # the experiment
        cap.sync()               # everything sent so far has been parsed
    cap.segments()               # tuple[Segment, ...]

Pitfalls this module handles:

- Without CAP_NET_RAW the socket cannot be opened. ``cap.active`` is then False and ``cap.reason``
  says why ("packets not captured: needs root (CAP_NET_RAW)"); the experiment still runs and falls
  back to evidence from states and errno. Nothing raises.
- A packet on ``lo`` is seen twice by a packet socket: once leaving (``PACKET_OUTGOING``) and once
  arriving (``PACKET_HOST``). Only the outgoing copy is kept (``sll_pkttype`` from ``recvfrom``).
- Segments on ``lo`` can be 64 KiB (TSO); only the headers are copied to userspace (``MSG_TRUNC``
  gives the real length), and the receive buffer is enlarged so megabyte transfers are not dropped.
  Kernel drops are still counted (``PACKET_STATISTICS``) and reported in ``cap.drops``.
- Packets are queued in the kernel before the thread parses them: call ``sync()`` before reading
  ``segments()`` mid-experiment. It sends one UDP datagram to a socket of ours on 127.0.0.1 and waits
  until the thread has seen it, so every earlier packet has been parsed too.
- Bounded: the thread wakes at least every 50 ms to check for stop, stored segments are capped
  (``max_segments``; ``cap.truncated`` tells), and leaving the ``with`` block joins the thread.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass

from closewait.model import Endpoint

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_HOST = 0
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS = 35  # SO_TIMESTAMPNS_OLD: 64-bit timespec on 64-bit platforms
IPPROTO_TCP = 6

#: Bytes copied per packet: 14 (Ethernet) + 60 (IPv4 max) or 40 (IPv6) + 60 (TCP max), with room.
SNAP_BYTES = 192
#: How often the reader thread checks whether it should stop.
POLL_INTERVAL_S = 0.05
#: The receive buffer asked for (as root SO_RCVBUFFORCE can exceed rmem_max).
RCVBUF_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_SEGMENTS = 20_000

NO_ROOT_REASON = "packets not captured: needs root (CAP_NET_RAW)"
DISABLED_REASON = "packets not captured: capture turned off (--no-capture)"

# TCP flag bits (byte 13 of the header) in the order Segment.flags lists them.
_FLAG_BITS: tuple[tuple[str, int], ...] = (("SYN", 0x02), ("ACK", 0x10), ("FIN", 0x01), ("RST", 0x04), ("PSH", 0x08))


@dataclass(frozen=True, slots=True)
class Segment:
    """One TCP segment seen on the loopback.

    ``t`` is seconds since the capture started; ``flags`` is a tuple of flag names in the order
    SYN, ACK, FIN, RST, PSH (only those set), e.g. ("SYN", "ACK").
    """

    t: float
    src: Endpoint
    dst: Endpoint
    flags: tuple[str, ...]
    seq: int
    ack: int
    length: int


def parse_frame(frame: bytes | memoryview, wire_length: int, t: float) -> Segment | None:
    """One Ethernet frame (loopback: 14-byte zero header) as a TCP Segment, or None if not TCP.

    ``wire_length`` is the frame's real length (the buffer may hold only its first bytes); it gives
    the payload length when the IP header's length field is 0 (BIG TCP segments over 64 KiB).
    """
    data = memoryview(frame)
    if len(data) < 14:
        return None
    (ethertype,) = struct.unpack_from("!H", data, 12)
    offset = 14
    if ethertype == ETH_P_IP:
        if len(data) < offset + 20:
            return None
        version_ihl = data[offset]
        if version_ihl >> 4 != 4:
            return None
        ihl = (version_ihl & 0x0F) * 4
        (total_length,) = struct.unpack_from("!H", data, offset + 2)
        if data[offset + 9] != IPPROTO_TCP:
            return None
        (frag,) = struct.unpack_from("!H", data, offset + 6)
        if frag & 0x1FFF:
            return None  # a later fragment carries no TCP header
        src_ip = socket.inet_ntop(socket.AF_INET, bytes(data[offset + 12 : offset + 16]))
        dst_ip = socket.inet_ntop(socket.AF_INET, bytes(data[offset + 16 : offset + 20]))
        ip_payload = (total_length or (wire_length - offset)) - ihl
        offset += ihl
    elif ethertype == ETH_P_IPV6:
        if len(data) < offset + 40:
            return None
        if data[offset] >> 4 != 6 or data[offset + 6] != IPPROTO_TCP:
            return None  # extension headers are not used on loopback TCP; skip rather than guess
        (payload_length,) = struct.unpack_from("!H", data, offset + 4)
        src_ip = socket.inet_ntop(socket.AF_INET6, bytes(data[offset + 8 : offset + 24]))
        dst_ip = socket.inet_ntop(socket.AF_INET6, bytes(data[offset + 24 : offset + 40]))
        ip_payload = payload_length or (wire_length - offset - 40)
        offset += 40
    else:
        return None
    if len(data) < offset + 20:
        return None
    src_port, dst_port, seq, ack, off_flags = struct.unpack_from("!HHIIH", data, offset)
    header = (off_flags >> 12) * 4
    bits = off_flags & 0xFF
    flags = tuple(name for name, bit in _FLAG_BITS if bits & bit)
    return Segment(
        t=t,
        src=Endpoint(src_ip, src_port),
        dst=Endpoint(dst_ip, dst_port),
        flags=flags,
        seq=seq,
        ack=ack,
        length=max(ip_payload - header, 0),
    )


class Capture:
    """A running (or finished, or never started) loopback capture. Build it with ``capture()``."""

    def __init__(self, ports: Iterable[int], *, enabled: bool = True, max_segments: int = DEFAULT_MAX_SEGMENTS):
        self._ports: frozenset[int] = frozenset(ports)
        self._lock = threading.Lock()
        self._segments: list[Segment] = []
        self._max = max_segments
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._marker: socket.socket | None = None
        self._marker_port = 0
        self._marker_seen = threading.Condition(self._lock)
        self._markers_received = 0
        self._markers_sent = 0
        self._start_wall = 0.0
        self._start = time.monotonic()
        self.active = False
        self.reason: str | None = None if enabled else DISABLED_REASON
        #: Segments not stored because ``max_segments`` was reached.
        self.overflow = 0
        #: Packets the kernel dropped because the reader fell behind (PACKET_STATISTICS).
        self.drops = 0
        self._enabled = enabled

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Capture:
        if not self._enabled:
            return self
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.htons(ETH_P_ALL))
        except PermissionError:
            self.reason = NO_ROOT_REASON
            return self
        except (OSError, AttributeError) as err:  # AttributeError: no AF_PACKET on this platform
            self.reason = f"packets not captured: cannot open a packet socket ({err})"
            return self
        try:
            sock.bind(("lo", 0))
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.settimeout(POLL_INTERVAL_S)
            marker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            marker.bind(("127.0.0.1", 0))
        except OSError as err:
            sock.close()
            self.reason = f"packets not captured: cannot listen on lo ({err})"
            return self
        self._sock = sock
        self._marker = marker
        self._marker_port = marker.getsockname()[1]
        self._start = time.monotonic()
        self._start_wall = time.time()
        self.active = True
        self._thread = threading.Thread(target=self._run, name="closewait-lab-capture", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Parse what is queued, stop the thread and close the sockets. Safe to call twice."""
        if self._thread is not None:
            with contextlib.suppress(Exception):
                self.sync(timeout=0.5)
            self._stop.set()
            self._thread.join(timeout=2.0)
            self._thread = None
        if self._sock is not None:
            self._read_drops()
            self._sock.close()
            self._sock = None
        if self._marker is not None:
            self._marker.close()
            self._marker = None

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what callers use ------------------------------------------------------------------------

    def add_port(self, port: int) -> None:
        """Also keep segments to or from ``port`` from now on."""
        with self._lock:
            self._ports = self._ports | {port}

    @property
    def ports(self) -> frozenset[int]:
        return self._ports

    @property
    def truncated(self) -> bool:
        return self.overflow > 0

    def elapsed(self) -> float:
        """Seconds since the capture started (the clock Segment.t uses)."""
        return time.monotonic() - self._start

    def segments(self) -> tuple[Segment, ...]:
        """The segments kept so far, in the order the kernel sent them."""
        with self._lock:
            return tuple(self._segments)

    def sync(self, timeout: float = 1.0) -> bool:
        """Wait until every packet sent before this call has been parsed. False on timeout."""
        if not self.active or self._marker is None or self._thread is None:
            return False
        with self._lock:
            self._markers_sent += 1
            target = self._markers_sent
        self._marker.sendto(b"closewait-lab-sync", ("127.0.0.1", self._marker_port))
        with self._marker_seen:
            ok = self._marker_seen.wait_for(lambda: self._markers_received >= target, timeout)
        # Drain our own datagrams so the marker socket's queue stays empty.
        with contextlib.suppress(OSError):
            for _ in range(self._markers_sent):
                self._marker.recv(64, socket.MSG_DONTWAIT)
        return ok

    def wait_for(self, predicate: Callable[[tuple[Segment, ...]], bool], timeout: float = 1.0) -> bool:
        """Poll until ``predicate(segments)`` is true, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.sync(timeout=max(0.05, min(0.5, deadline - time.monotonic())))
            if predicate(self.segments()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    # -- the reader thread -----------------------------------------------------------------------

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        buffer = bytearray(SNAP_BYTES)
        view = memoryview(buffer)
        ancillary = socket.CMSG_SPACE(16)
        while not self._stop.is_set():
            try:
                nbytes, ancdata, _flags, address = sock.recvmsg_into([view], ancillary, socket.MSG_TRUNC)
            except TimeoutError:
                continue
            except OSError as err:
                if err.errno in (errno_mod.EINTR, errno_mod.EAGAIN):
                    continue
                log.warning("packet capture stopped: %s", err)
                break
            # address = (ifname, proto, pkttype, hatype, hwaddr)
            if len(address) > 2 and address[2] != PACKET_OUTGOING:
                continue
            frame = view[: min(nbytes, SNAP_BYTES)]
            if self._is_marker(frame):
                with self._marker_seen:
                    self._markers_received += 1
                    self._marker_seen.notify_all()
                continue
            segment = parse_frame(frame, nbytes, self._timestamp(ancdata))
            if segment is not None:
                self._keep(segment)

    def _is_marker(self, frame: memoryview) -> bool:
        """Our own sync() datagram: IPv4, UDP, to the marker socket's port."""
        if len(frame) < 14 + 28 or bytes(frame[12:14]) != b"\x08\x00" or frame[14 + 9] != socket.IPPROTO_UDP:
            return False
        ihl = (frame[14] & 0x0F) * 4
        if len(frame) < 14 + ihl + 4:
            return False
        (dst_port,) = struct.unpack_from("!H", frame, 14 + ihl + 2)
        return bool(dst_port == self._marker_port)

    def _timestamp(self, ancdata: list[tuple[int, int, bytes]]) -> float:
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                sec, nsec = struct.unpack_from("@qq", data)
                return max(float(sec) + float(nsec) / 1e9 - self._start_wall, 0.0)
        return time.monotonic() - self._start

    def _keep(self, segment: Segment) -> None:
        with self._lock:
            if segment.src.port not in self._ports and segment.dst.port not in self._ports:
                return
            if len(self._segments) >= self._max:
                self.overflow += 1
                return
            self._segments.append(segment)

    def _read_drops(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            _packets, drops = struct.unpack("II", raw)
            self.drops += drops


@contextlib.contextmanager
def capture(
    ports: Collection[int], *, enabled: bool = True, max_segments: int = DEFAULT_MAX_SEGMENTS
) -> Iterator[Capture]:
    """Capture TCP segments to or from ``ports`` on ``lo`` for the duration of the block.

    Never raises for lack of privilege: check ``cap.active`` / ``cap.reason``.
    """
    cap = Capture(ports, enabled=enabled, max_segments=max_segments)
    cap.start()
    try:
        yield cap
    finally:
        cap.stop()


__all__ = [
    "DISABLED_REASON",
    "NO_ROOT_REASON",
    "Capture",
    "Segment",
    "capture",
    "parse_frame",
]
