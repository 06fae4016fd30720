"""The loopback capture on real traffic: directions, flags, ports added late, tshark agreeing,
and the unprivileged path (no capture, a reason, no exception)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from closewait.lab.evidence import between, sent
from closewait.model import Endpoint
from closewait.sources.capture import DISABLED_REASON, NO_ROOT_REASON, capture, parse_frame
from tests.conftest import Nobody
from tests.lab.kit import pair

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="AF_PACKET needs CAP_NET_RAW")


def _ep(sock: socket.socket, peer: bool = False) -> Endpoint:
    host, port = (sock.getpeername() if peer else sock.getsockname())[:2]
    return Endpoint(host, port)


@root_only
def test_handshake_fin_and_rst_are_seen_with_their_direction() -> None:
    listener, client, server = pair()
    port = listener.getsockname()[1]
    first_server, first_client = _ep(server), _ep(server, peer=True)
    with listener, capture([port]) as cap:
        assert cap.active
        assert cap.reason is None
        # A second connection made inside the capture, so its handshake is seen too.
        client2 = socket.create_connection(("127.0.0.1", port), timeout=5)
        server2, _ = listener.accept()
        c, s = _ep(client2), _ep(server2)
        client2.sendall(b"hello")
        assert server2.recv(5) == b"hello"
        client2.close()  # FIN from the client
        assert server2.recv(10) == b""
        server2.close()  # FIN from the server, the client's orphan goes to TIME_WAIT
        client.sendall(b"unread")
        time.sleep(0.05)
        server.close()  # unread data: RST from the server
        assert cap.wait_for(lambda segs: sent(segs, "RST"), timeout=3)
        segments = cap.segments()
    client.close()
    conn = between(segments, c, s)
    kinds = [(seg.src, seg.flags) for seg in conn[:3]]
    assert kinds == [(c, ("SYN",)), (s, ("SYN", "ACK")), (c, ("ACK",))]
    data = [seg for seg in conn if seg.length]
    assert [(seg.src, seg.length) for seg in data] == [(c, 5)]
    assert sent(conn, "FIN", by=c)
    assert sent(conn, "FIN", by=s)
    assert not sent(conn, "RST")
    # The first connection (established before the capture): only the RST side of it.
    first = between(segments, first_server, first_client)
    assert sent(first, "RST", by=first_server)
    assert not sent(first, "FIN")
    # Each packet once, although a packet socket sees loopback packets twice.
    keys = [(seg.src, seg.dst, seg.seq, seg.ack, seg.flags, seg.length) for seg in conn]
    assert len(keys) == len(set(keys))
    assert [seg.t for seg in segments] == sorted(seg.t for seg in segments)


@root_only
def test_ipv6_and_a_port_added_after_start() -> None:
    listener = socket.socket(socket.AF_INET6)
    listener.bind(("::1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    with listener, capture([]) as cap:
        client = socket.create_connection(("::1", port), timeout=5)
        server, _ = listener.accept()
        client_end = _ep(client)
        assert cap.active
        assert cap.sync()
        assert cap.segments() == ()  # no port asked for yet: the handshake was filtered out
        cap.add_port(port)
        client.close()
        assert cap.wait_for(lambda segs: sent(segs, "FIN"), timeout=3)
        server.close()
        segments = cap.segments()
    assert segments
    assert all(seg.src.address == "::1" for seg in segments)
    assert not any("SYN" in seg.flags for seg in segments)
    assert sent(segments, "FIN", by=client_end)
    assert segments[0].src == client_end  # the client's FIN is the first segment kept


@root_only
def test_megabytes_are_counted_not_copied() -> None:
    """64 KiB loopback segments: only headers are read, payload lengths still add up."""
    listener, client, server = pair()
    port = listener.getsockname()[1]
    total = 4 * 1024 * 1024
    with listener, client, server, capture([port]) as cap:
        sender = _sender(client, total)
        received = 0
        while received < total:
            chunk = server.recv(1 << 20)
            assert chunk
            received += len(chunk)
        sender.join(timeout=10)
        cap.sync()
        segments = cap.segments()
    payload = sum(seg.length for seg in segments if seg.src.port != port)
    assert payload >= total  # retransmissions could only add


def _sender(sock: socket.socket, total: int) -> threading.Thread:
    thread = threading.Thread(target=sock.sendall, args=(b"z" * total,), daemon=True)
    thread.start()
    return thread


@root_only
@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_sees_the_same_segments() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    tshark = subprocess.Popen(
        [
            "tshark",
            "-l",
            "-n",
            "-i",
            "lo",
            "-f",
            f"tcp port {port}",
            "-T",
            "fields",
            "-e",
            "tcp.srcport",
            "-e",
            "tcp.dstport",
            "-e",
            "tcp.flags",
            "-e",
            "tcp.len",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert tshark.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = tshark.stderr.readline()
            if not line or "Capture started" in line:
                break
        time.sleep(0.5)  # dumpcap reports readiness just before its capture loop runs
        with listener, capture([port]) as cap:
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            server, _ = listener.accept()
            client.sendall(b"abc" * 10)
            server.recv(100)
            server.sendall(b"back")
            client.recv(10)
            client.close()
            server.recv(10)
            server.sendall(b"x")  # to a closed peer: answered with RST
            cap.wait_for(lambda segs: sent(segs, "RST"), timeout=3)
            server.close()
            ours = cap.segments()
        time.sleep(0.5)
    finally:
        os.kill(tshark.pid, signal.SIGINT)
        out, _ = tshark.communicate(timeout=30)
    names = {0x02: "SYN", 0x10: "ACK", 0x01: "FIN", 0x04: "RST"}
    theirs = []
    for line in out.splitlines():
        src, dst, flags, length = line.split("\t")
        value = int(flags, 16)
        theirs.append((int(src), int(dst), frozenset(n for b, n in names.items() if value & b), int(length)))
    mine = [(s.src.port, s.dst.port, frozenset(f for f in s.flags if f != "PSH"), s.length) for s in ours]
    assert sorted(mine, key=repr) == sorted(theirs, key=repr)
    assert any("RST" in f for _, _, f, _ in mine)


def test_disabled_capture_says_why() -> None:
    with capture([1], enabled=False) as cap:
        assert not cap.active
        assert cap.reason == DISABLED_REASON
        assert not cap.sync()
    assert cap.segments() == ()


@root_only
def test_stored_segments_are_capped() -> None:
    listener, client, server = pair()
    port = listener.getsockname()[1]
    with listener, client, server, capture([port], max_segments=3) as cap:
        for _ in range(5):
            client.sendall(b"ping")
            server.recv(10)
        cap.sync()
    assert len(cap.segments()) == 3
    assert cap.truncated
    assert cap.overflow >= 7


def test_without_root_there_is_no_capture_and_no_exception(nobody: Nobody) -> None:
    code = (
        "from closewait.sources.capture import capture\n"
        "with capture([9]) as cap:\n"
        "    print(cap.active, cap.reason, sep='|')\n"
    )
    result = subprocess.run(
        [*nobody.argv, "-c", code], env=nobody.env, capture_output=True, text=True, timeout=60, check=False, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"False|{NO_ROOT_REASON}"


def _frame(ethertype: int, ip: bytes) -> bytes:
    return b"\0" * 12 + struct.pack("!H", ethertype) + ip


def test_parse_frame_ignores_what_is_not_tcp() -> None:
    assert parse_frame(b"", 0, 0.0) is None
    assert parse_frame(_frame(0x0806, b"\0" * 28), 42, 0.0) is None  # ARP
    udp = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0]) + socket.inet_aton("127.0.0.1") * 2 + b"\0" * 8
    assert parse_frame(_frame(0x0800, udp), 42, 0.0) is None
    truncated_tcp = bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0]) + socket.inet_aton("127.0.0.1") * 2 + b"\0" * 6
    assert parse_frame(_frame(0x0800, truncated_tcp), 54, 0.0) is None


def test_parse_frame_reads_an_ipv4_tcp_header() -> None:
    tcp = struct.pack("!HHIIHHHH", 1111, 2222, 7, 9, (5 << 12) | 0x11, 0, 0, 0)  # FIN|ACK
    ip = bytes([0x45, 0, 0, 20 + 20 + 3, 0, 0, 0x40, 0, 64, 6, 0, 0]) + socket.inet_aton("127.0.0.2")
    ip += socket.inet_aton("127.0.0.3")
    seg = parse_frame(_frame(0x0800, ip + tcp + b"abc"), 14 + 43, 1.5)
    assert seg is not None
    assert (seg.src, seg.dst) == (Endpoint("127.0.0.2", 1111), Endpoint("127.0.0.3", 2222))
    assert (seg.flags, seg.seq, seg.ack, seg.length, seg.t) == (("ACK", "FIN"), 7, 9, 3, 1.5)
