"""The remedies part: each remedy server checked against the kernel with ss and /proc/PID/fd.

The servers are the lab's own programs (``servers/remedy.py``), started by the test; what is
asserted is what the kernel shows (socket states, timers, descriptors), not what the servers or
the Experiment say.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time

import psutil
import pytest

from closewait.lab import remedies
from closewait.lab.model import LabContext, Status, Verdict
from closewait.lab.servers import REMEDY
from tests.conftest import Spawn
from tests.lab_experiments.conftest import StartServer
from tests.lab_experiments.kernel import alive, client_end, server_end, socket_inodes, ss_port
from tests.util import wait_for

LINE = b"hello from the test\n"


def _open_and_wait_accepted(pid: int, port: int) -> tuple[socket.socket, int, int]:
    """Connect and send; wait until the server holds a second socket. (conn, client port, its inode)."""
    listener = socket_inodes(pid)
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(LINE)
    new = wait_for(lambda: socket_inodes(pid) - listener, timeout=10)
    (inode,) = new
    return conn, int(conn.getsockname()[1]), inode


@pytest.mark.parametrize(
    ("strategy", "args"),
    [
        ("read-close", ()),
        ("multiplex-read-close", ()),
        ("nonblocking-read-close", ()),
        # A heartbeat slower than the test's own steps, so the client has read nothing when it closes.
        ("send-sigpipe", ("--heartbeat", "0.5")),
        ("idle-timeout", ("--idle-timeout", "5")),  # long enough for ss on a busy host
    ],
)
def test_remedy_server_releases_fd_and_connection(remedy_server: StartServer, strategy: str, args: tuple[str]) -> None:
    pid, port = remedy_server(strategy, *args)
    conn, client_port, inode = _open_and_wait_accepted(pid, port)
    row = server_end(port, client_port)
    assert row is not None
    assert row.state == "ESTAB"
    conn.close()
    if strategy == "idle-timeout":
        # The server reads EOF and ignores it: the kernel shows CLOSE_WAIT, Recv-Q 0, fd held,
        # until the timing wheel's reaper closes it.
        row = server_end(port, client_port)
        assert row is not None
        assert row.state == "CLOSE-WAIT"
        assert inode in socket_inodes(pid)
    wait_for(lambda: inode not in socket_inodes(pid), timeout=10)
    wait_for(lambda: server_end(port, client_port) is None, timeout=10)
    client = client_end(port, client_port)
    # The client closed first: TIME_WAIT, or nothing if the send-sigpipe RST ended it.
    assert client is None or client.state == "TIME-WAIT"
    assert alive(pid)  # the server survived and still serves
    assert len(socket_inodes(pid)) == 1


def test_send_sigpipe_misses_a_half_closed_peer(remedy_server: StartServer) -> None:
    pid, port = remedy_server("send-sigpipe", "--heartbeat", "0.1")
    conn, client_port, inode = _open_and_wait_accepted(pid, port)
    with conn:
        conn.shutdown(socket.SHUT_WR)  # FIN sent, but this end still reads
        time.sleep(1.0)  # ten heartbeats
        row = server_end(port, client_port)
        assert row is not None
        assert row.state == "CLOSE-WAIT"
        assert inode in socket_inodes(pid)
        # The heartbeats were delivered and acknowledged: nothing failed on the server's side.
        conn.settimeout(5)
        assert conn.recv(5) == b"ping\n"


def test_send_after_peer_closed_rst_then_epipe_and_fd_still_held(spawn: Spawn) -> None:
    proc = spawn(argv=[sys.executable, str(REMEDY), "send-sigpipe", "--heartbeat", "0.2", "--close-on-sigusr1"])
    assert proc.stdout is not None
    port = json.loads(proc.stdout.readline())["port"]
    conn, client_port, inode = _open_and_wait_accepted(proc.pid, port)
    conn.close()
    # The first send drew an RST: the server's end left the TCP table...
    wait_for(lambda: server_end(port, client_port) is None, timeout=10)
    saw = wait_for(lambda: _event(proc, "saw"), timeout=10)
    assert saw["errno"] == "EPIPE"
    # ...but the descriptor stays until the application closes it.
    assert inode in socket_inodes(proc.pid)
    proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: inode not in socket_inodes(proc.pid), timeout=10)


def _event(proc: object, kind: str) -> dict[str, object] | None:
    stdout = getattr(proc, "stdout", None)
    assert stdout is not None
    line = stdout.readline()
    while line:
        event = json.loads(line)
        if event["ev"] == kind:
            return dict(event)
        line = stdout.readline()
    return None


def test_sigpipe_at_its_c_default_kills_the_server(spawn: Spawn) -> None:
    proc = spawn(argv=[sys.executable, str(REMEDY), "send-sigpipe", "--heartbeat", "0.2", "--sigpipe-default"])
    assert proc.stdout is not None
    port = json.loads(proc.stdout.readline())["port"]
    conn, _client_port, _inode = _open_and_wait_accepted(proc.pid, port)
    conn.close()
    assert proc.wait(timeout=10) == -signal.SIGPIPE


def test_keepalive_alone_keeps_close_wait_and_the_fd(remedy_server: StartServer) -> None:
    pid, port = remedy_server("keepalive", "--keepidle", "1", "--keepintvl", "1", "--keepcnt", "2")
    conn, client_port, inode = _open_and_wait_accepted(pid, port)
    conn.close()
    closed_at = time.monotonic()
    row = wait_for(lambda: (r := server_end(port, client_port)) is not None and r.state == "CLOSE-WAIT" and r)
    assert "timer:(keepalive" in row.extra
    # With idle 1 s, interval 1 s and 2 probes, unanswered probes would have reset the connection
    # by now; it is still in CLOSE_WAIT because the peer's FIN_WAIT2 answers every probe.
    time.sleep(max(0.0, 4.5 - (time.monotonic() - closed_at)))
    row = server_end(port, client_port)
    assert row is not None
    assert row.state == "CLOSE-WAIT"
    client = client_end(port, client_port)
    assert client is not None
    assert client.state == "FIN-WAIT-2"
    assert not client.owned
    assert inode in socket_inodes(pid)


def test_remedies_run_reports_every_remedy_and_leaves_nothing_behind() -> None:
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    with LabContext(trials=3) as ctx:
        experiments = remedies.run(ctx)
    ids = [e.id for e in experiments]
    expected = [
        "idle-timeout",
        "send-sigpipe",
        "read-close",
        "multiplex-read-close",
        "nonblocking-read-close",
        "keepalive",
        "churn",
    ]
    assert ids == expected
    by_id = {e.id: e for e in experiments}
    for exp in experiments:
        assert exp.part == "remedies"
        assert exp.status == Status.OK, (exp.id, exp.reason)
    for name in expected[:6]:
        m = by_id[name].measurements
        assert isinstance(m["fd_released"], bool)
        assert isinstance(m["left_tcp_table"], bool)
        assert isinstance(m["app_saw"], str)
        assert isinstance(m["caveat"], str)
        assert m["caveat"]
        assert "close_wait_ms" in m
        assert "close_wait_ms_max" in m
    for name in ("idle-timeout", "read-close", "multiplex-read-close", "nonblocking-read-close", "send-sigpipe"):
        m = by_id[name].measurements
        assert m["trials"] == 3
        assert isinstance(m["close_wait_ms"], float)
        assert isinstance(m["close_wait_ms_max"], float)
        assert m["close_wait_ms"] <= m["close_wait_ms_max"]
        assert m["fd_released"] is True
        assert m["left_tcp_table"] is True
    for name in ("read-close", "multiplex-read-close", "nonblocking-read-close", "idle-timeout"):
        assert by_id[name].verdict == Verdict.HOLDS
    assert by_id["read-close"].measurements["app_saw"] == "eof"
    assert by_id["idle-timeout"].measurements["app_saw"] == "idle-timeout"
    assert by_id["idle-timeout"].measurements["close_wait_ms"] >= 1000.0 * remedies.IDLE_TIMEOUT_S * 0.5
    sigpipe = by_id["send-sigpipe"]
    assert sigpipe.verdict == Verdict.HOLDS_WITH_CAVEAT
    assert sigpipe.measurements["app_saw"] == "epipe"
    assert sigpipe.measurements["half_close_detected"] is False
    assert sigpipe.measurements["after_epipe_fd_held"] is True
    assert sigpipe.measurements["sigpipe_kills_process"] is True
    keepalive = by_id["keepalive"]
    assert keepalive.verdict == Verdict.HOLDS_WITH_CAVEAT
    assert keepalive.measurements["fd_released"] is False
    assert keepalive.measurements["state_after_probes"] == "CLOSE_WAIT"
    assert keepalive.measurements["needs_full"] is True

    assert {p.pid for p in me.children(recursive=True)} <= before
    ports = {
        int(address.rsplit(":", 1)[1])
        for exp in experiments
        for address, role in exp.actors.items()
        if role == "server"
    }
    assert len(ports) == 6
    for port in ports:
        # No process is left, so nothing may remain but TIME_WAIT (the kernel's, holding no fd).
        wait_for(lambda port=port: all(row.state == "TIME-WAIT" for row in ss_port(port)), timeout=10)


def test_a_remedy_that_cannot_run_is_an_error_with_one_line() -> None:
    bogus = remedies.Remedy("no-such-strategy", "bogus", "a claim", "a caveat")
    with LabContext(trials=1) as ctx:
        exp = remedies._guarded(bogus, ctx, 60)
    assert exp.status == Status.ERROR
    assert exp.reason is not None
    assert "\n" not in exp.reason
    assert exp.verdict is None
