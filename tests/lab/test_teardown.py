"""Each teardown experiment's result, checked against the kernel by this test's own sockets.

For every experiment the test redoes the essential step with its own sockets and reads the result
with an independent tool (``ss`` from iproute2, errno, /proc), then asserts the lab reported the
same thing. The lab's own run is ``teardown_report`` (one run for the whole module).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import subprocess
import sys
import time

import pytest

from closewait.lab.evidence import between, sent
from closewait.lab.model import Experiment, Status, Verdict
from closewait.lab.report import LabReport
from closewait.lab.teardown import IDS
from closewait.model import Endpoint
from tests.lab.kit import holds_inode, pair, ss_tuple
from tests.util import wait_for

ROOT = os.geteuid() == 0


def _parse_endpoint(text: str) -> Endpoint:
    host, port = text.rsplit(":", 1)
    return Endpoint(host.strip("[]"), int(port))


def _exp(report: LabReport, exp_id: str) -> Experiment:
    exp = report.get(exp_id)
    assert exp is not None, f"{exp_id} missing"
    assert exp.status == Status.OK, exp.reason
    return exp


def _read_all(sock: socket.socket, timeout: float = 10.0) -> tuple[int, str]:
    total, deadline = 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([sock], [], [], 0.5)[0]:
            continue
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return total, "reset"
        if not chunk:
            return total, "eof"
        total += len(chunk)
    return total, "timeout"


def _fill(sock: socket.socket, limit: int) -> int:
    sock.setblocking(False)
    sent_bytes = 0
    try:
        while sent_bytes < limit:
            sent_bytes += sock.send(b"t" * min(65536, limit - sent_bytes))
    except BlockingIOError:
        pass
    sock.setblocking(True)
    return sent_bytes


def _ends(client: socket.socket, server: socket.socket) -> tuple[tuple[str, int], tuple[str, int]]:
    return client.getsockname()[:2], server.getsockname()[:2]


def test_every_experiment_ran(teardown_report: LabReport) -> None:
    assert [e.id for e in teardown_report.experiments] == list(IDS)
    for exp in teardown_report.experiments:
        assert exp.status == Status.OK, (exp.id, exp.reason)
        assert exp.verdict is not None
        assert exp.claim
        assert exp.observed
        assert exp.part == "teardown"
        assert exp.measurements["evidence"] == ("packets" if ROOT else "states-and-errno")
        assert exp.packets_captured == ROOT
        assert bool(exp.packets) == ROOT


def test_shutdown_rd_sends_nothing_and_data_is_still_accepted(teardown_report: LabReport) -> None:
    listener, client, server = pair()
    with listener, client, server:
        c, s = _ends(client, server)
        server.shutdown(socket.SHUT_RD)
        time.sleep(0.1)
        row = ss_tuple(c, s)
        assert row is not None
        assert row.state == "ESTAB"  # the peer was told nothing: no FIN, no RST
        client.sendall(b"x" * 1234)
        wait_for(lambda: (r := ss_tuple(s, c)) is not None and r.recv_q == 1234)
        assert server.recv(4096) == b"x" * 1234  # Linux: accepted and readable
        assert server.recv(10) == b""  # once drained, reads as EOF
    exp = _exp(teardown_report, "shutdown-rd")
    m = exp.measurements
    assert m["fin_sent"] is False
    assert m["rst_sent"] is False
    assert m["peer_saw"] == "nothing"
    assert m["peer_state"] == "established"
    assert m["bytes_delivered"] == m["bytes_sent"]
    assert m["read_when_drained"] == "eof"
    assert exp.verdict == Verdict.HOLDS_WITH_CAVEAT


def test_shutdown_wr_delivers_everything_queued_then_fin(teardown_report: LabReport) -> None:
    listener, client, server = pair(rcvbuf=16 * 1024)
    with listener, client, server:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        queued = _fill(client, 2 * 1024 * 1024)
        c, s = _ends(client, server)
        row = ss_tuple(c, s)
        assert row is not None
        assert row.send_q > 1024 * 1024  # megabytes really queued
        client.shutdown(socket.SHUT_WR)
        delivered, ending = _read_all(server)
        assert (delivered, ending) == (queued, "eof")
    exp = _exp(teardown_report, "shutdown-wr")
    m = exp.measurements
    assert isinstance(m["bytes_sent"], int)
    assert m["bytes_sent"] >= 1024 * 1024
    assert isinstance(m["send_q_at_shutdown"], int)
    assert m["send_q_at_shutdown"] > 1024 * 1024
    assert m["bytes_delivered"] == m["bytes_sent"]
    assert m["peer_saw"] == "eof"
    assert m["fin_sent"] is True
    assert m["rst_sent"] is False
    assert m["fin_after_all_data"] is True
    assert m["reverse_direction_open"] is True
    assert exp.verdict == Verdict.HOLDS
    if ROOT:
        assert m["fin_while_queued"] is False
        fins = [p for p in exp.packets if "FIN" in p.flags]
        assert fins
        last_data = max(i for i, p in enumerate(exp.packets) if p.length and p.src == fins[0].src)
        assert exp.packets.index(fins[0]) >= last_data


def test_close_with_nothing_unread_sends_fin(teardown_report: LabReport) -> None:
    listener, client, server = pair()
    with listener, server:
        c, s = _ends(client, server)
        client.close()
        row = wait_for(lambda: (r := ss_tuple(s, c)) is not None and r.state == "CLOSE-WAIT" and r)
        assert row.recv_q == 1  # the FIN, not yet read
        assert server.recv(10) == b""
    exp = _exp(teardown_report, "close-fin")
    m = exp.measurements
    assert (m["fin_sent"], m["rst_sent"], m["peer_saw"], m["peer_state"]) == (True, False, "eof", "close-wait")
    assert m["peer_recv_q"] == 1
    assert exp.verdict == Verdict.HOLDS


def test_close_frees_the_fd_but_the_kernel_keeps_the_connection(teardown_report: LabReport) -> None:
    listener, client, server = pair(rcvbuf=16 * 1024)
    with listener, server:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        queued = _fill(client, 1024 * 1024)
        c, s = _ends(client, server)
        fd = client.fileno()
        client.close()
        with pytest.raises(OSError, match="Bad file descriptor") as info:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        assert info.value.errno == errno.EBADF
        assert not os.path.exists(f"/proc/self/fd/{fd}")
        row = ss_tuple(c, s)
        assert row is not None
        assert row.state == "FIN-WAIT-1"
        assert row.send_q > 0
        assert row.inode == 0  # an orphan: no process holds it
        assert _read_all(server) == (queued, "eof")
        server.close()
        assert wait_for(lambda: (r := ss_tuple(c, s)) is not None and r.state == "TIME-WAIT")
    exp = _exp(teardown_report, "close-fd-vs-connection")
    m = exp.measurements
    assert m["fd_released"] is True
    assert m["fd_errno_after_close"] == "EBADF"
    assert m["orphan"] is True
    assert m["left_tcp_table"] is False
    assert m["states_after_close"] == ["fin-wait-1", "fin-wait-2", "time-wait"]
    assert isinstance(m["send_q_after_close"], int)
    assert m["send_q_after_close"] > 0
    assert m["bytes_delivered"] == m["bytes_sent"]
    assert exp.verdict == Verdict.HOLDS_WITH_CAVEAT


def test_close_with_megabytes_queued_delivers_them_all(teardown_report: LabReport) -> None:
    listener, client, server = pair(rcvbuf=16 * 1024)
    with listener, server:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        queued = _fill(client, 3 * 1024 * 1024)
        assert queued > 2 * 1024 * 1024
        client.close()
        assert _read_all(server) == (queued, "eof")
    exp = _exp(teardown_report, "close-send-buffer")
    m = exp.measurements
    assert isinstance(m["bytes_sent"], int)
    assert m["bytes_sent"] > 2 * 1024 * 1024
    assert m["bytes_delivered"] == m["bytes_sent"]
    assert m["bytes_discarded"] == 0
    assert (m["fin_sent"], m["rst_sent"], m["peer_saw"]) == (True, False, "eof")
    assert exp.verdict == Verdict.DOES_NOT_HOLD


def test_close_with_unread_data_resets(teardown_report: LabReport) -> None:
    listener, client, server = pair()
    with listener, client:
        c, s = _ends(client, server)
        client.sendall(b"u" * 300)
        wait_for(lambda: (r := ss_tuple(s, c)) is not None and r.recv_q == 300)
        server.close()
        select.select([client], [], [], 2)
        with pytest.raises(ConnectionResetError):
            client.recv(10)
        assert ss_tuple(s, c) is None  # no TIME_WAIT, no FIN_WAIT: gone
    exp = _exp(teardown_report, "close-unread-rst")
    m = exp.measurements
    assert (m["rst_sent"], m["fin_sent"], m["peer_saw"]) == (True, False, "reset")
    assert m["unread_bytes"] == m["bytes_sent"]
    assert m["peer_next_send"] == "EPIPE"
    assert m["left_tcp_table"] is True
    assert exp.verdict == Verdict.DOES_NOT_HOLD


def test_linger_zero_resets_and_leaves_no_time_wait(teardown_report: LabReport) -> None:
    listener, client, server = pair(rcvbuf=16 * 1024)
    with listener, server:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        queued = _fill(client, 1024 * 1024)
        c, s = _ends(client, server)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        delivered, ending = _read_all(server)
        assert ending == "reset"
        assert delivered < queued
        assert ss_tuple(c, s) is None
    exp = _exp(teardown_report, "linger-zero")
    m = exp.measurements
    assert (m["rst_sent"], m["fin_sent"], m["peer_saw"], m["time_wait"]) == (True, False, "reset", False)
    assert isinstance(m["bytes_delivered"], int)
    assert isinstance(m["bytes_sent"], int)
    assert m["bytes_delivered"] < m["bytes_sent"]
    assert exp.verdict == Verdict.HOLDS


def test_close_of_one_of_two_descriptors_sends_nothing_shutdown_sends_fin(teardown_report: LabReport) -> None:
    # dup()
    listener, client, server = pair()
    with listener, server:
        c, s = _ends(client, server)
        other = socket.socket(fileno=os.dup(client.fileno()))
        client.close()
        time.sleep(0.1)
        row = ss_tuple(s, c)
        assert row is not None
        assert row.state == "ESTAB"
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.recv(10)
        other.shutdown(socket.SHUT_WR)
        assert wait_for(lambda: (r := ss_tuple(s, c)) is not None and r.state == "CLOSE-WAIT")
        other.close()
    # fork(): a child holds the descriptor.
    listener, client, server = pair()
    with listener, server:
        c, s = _ends(client, server)
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], pass_fds=[client.fileno()], stdin=subprocess.PIPE
        )
        try:
            client.close()
            time.sleep(0.1)
            row = ss_tuple(s, c)
            assert row is not None
            assert row.state == "ESTAB"
            client_row = ss_tuple(c, s)
            assert client_row is not None
            assert holds_inode(child.pid, client_row.inode)  # the child still holds the socket
        finally:
            os.kill(child.pid, 9)
            child.wait(timeout=10)
        # The child's exit closed the last descriptor: now the FIN goes out.
        assert wait_for(lambda: (r := ss_tuple(s, c)) is not None and r.state == "CLOSE-WAIT")
    exp = _exp(teardown_report, "shared-fd")
    m = exp.measurements
    assert m["dup_close_sent_fin"] is False
    assert m["fork_close_sent_fin"] is False
    assert m["dup_shutdown_sent_fin"] is True
    assert m["fork_shutdown_sent_fin"] is True
    assert m["peer_saw_after_close"] == "nothing"
    assert exp.verdict == Verdict.HOLDS_WITH_CAVEAT


def test_close_of_close_wait_with_unread_data_sends_rst(teardown_report: LabReport) -> None:
    listener, client, server = pair()
    with listener, client:
        c, s = _ends(client, server)
        client.sendall(b"w" * 100)
        client.shutdown(socket.SHUT_WR)
        row = wait_for(lambda: (r := ss_tuple(s, c)) is not None and r.state == "CLOSE-WAIT" and r)
        assert row.recv_q == 101  # 100 bytes + the FIN
        server.close()
        select.select([client], [], [], 2)
        with pytest.raises(ConnectionResetError):
            client.recv(10)
    exp = _exp(teardown_report, "closewait-close-unread")
    m = exp.measurements
    assert (m["rst_sent"], m["fin_sent"], m["peer_saw"]) == (True, False, "reset")
    assert m["recv_q_in_close_wait"] == m["unread_bytes"] + 1  # type: ignore[operator]
    assert m["after_reading_all_fin_sent"] is True
    assert m["after_reading_all_peer_saw"] == "eof"
    assert exp.verdict == Verdict.DOES_NOT_HOLD


@pytest.mark.skipif(not ROOT, reason="packets are captured only as root")
def test_ladder_packets_agree_with_the_flags(teardown_report: LabReport) -> None:
    """fin_sent/rst_sent were read from the captured packets: check them against the packets."""
    exp = _exp(teardown_report, "close-unread-rst")
    ends = {label: _parse_endpoint(key) for key, label in exp.actors.items()}
    server, client = ends["server"], ends["client"]
    conn = between(exp.packets, client, server)
    assert sent(conn, "RST", by=server)
    assert not sent(conn, "FIN", by=server)
    assert [p.flags for p in conn[:2]] == [("SYN",), ("SYN", "ACK")]


@pytest.mark.skipif(not ROOT, reason="packets are captured only as root")
def test_packets_and_states_errno_tell_the_same_story(teardown_report: LabReport) -> None:
    """Every flag the lab read from packets was also read from TCP states and errno: they agree."""
    compared = 0
    for exp in teardown_report.experiments:
        for key, value in exp.measurements.items():
            if key.endswith("_without_packets"):
                assert exp.measurements[key.removesuffix("_without_packets")] == value, (exp.id, key)
                compared += 1
    assert compared >= 2 * len(IDS)
