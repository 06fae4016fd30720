"""The two socket sources against each other and against ``ss``, on the same real sockets; the
teardown states whose sockets no process holds (inode 0); IPv4 clients of a dual-stack listener."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess

import pytest

import closewait
from closewait.model import Endpoint, Family, Role, TcpState
from closewait.sources import netlink, procfs
from tests.conftest import Spawn
from tests.scan.kit import (
    LEAKING_SERVER,
    close_wait_of,
    ipv6_loopback,
    parse_ss,
    python_argv,
    without_netlink_fields,
)
from tests.util import wait_for

HOSTS = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6"))]


def _three_leaks(spawn: Spawn, host: str) -> tuple[int, int, list[socket.socket]]:
    """A server holding one socket per CLOSE_WAIT code; returns (pid, port, the test's closed clients)."""
    server = spawn(argv=python_argv(LEAKING_SERVER, host, "eof,keep,keep"))
    assert server.stdout is not None
    port = int(server.stdout.readline())
    clients = []
    for payload in (b"", b"", b"z" * 777):
        client = socket.create_connection((host, port))
        client.sendall(payload)
        client.close()
        assert server.stdout.readline().strip() == "accepted"
        clients.append(client)
    close_wait_of(server.pid, port, count=3)
    return server.pid, port, clients


@pytest.mark.parametrize("host", HOSTS)
def test_netlink_and_procfs_agree(spawn: Spawn, host: str) -> None:
    pid, port, _ = _three_leaks(spawn, host)
    states = frozenset({TcpState.LISTEN, TcpState.CLOSE_WAIT, TcpState.FIN_WAIT2})

    def mine(sockets: object) -> list[closewait.Socket]:
        assert not isinstance(sockets, str)
        return sorted(
            (s for s in sockets if port in (s.local.port, s.remote.port)),  # type: ignore[attr-defined]
            key=lambda s: (s.state, s.local, s.remote),
        )

    # The test's closed clients pass FIN_WAIT1 -> FIN_WAIT2 when the server's (possibly delayed) ACK comes.
    expected = [TcpState.FIN_WAIT2] * 3 + [TcpState.CLOSE_WAIT] * 3 + [TcpState.LISTEN]
    wait_for(lambda: [s.state for s in mine(netlink.dump(states))] == expected)
    by_netlink = mine(netlink.dump(states))
    by_procfs = mine(procfs.dump(states))
    # listener + 3 CLOSE_WAIT (the server's) + 3 orphaned FIN_WAIT2 (the test's closed clients)
    assert [s.state for s in by_netlink] == expected
    # A listener's Send-Q is its backlog limit; only sock_diag reports it (/proc/net/tcp prints 0).
    listener_nl, listener_pf = by_netlink.pop(), by_procfs.pop()
    assert listener_nl.send_q == socket.SOMAXCONN or listener_nl.send_q > 0
    assert listener_pf.send_q == 0
    assert without_netlink_fields(listener_nl) == dataclasses.replace(
        without_netlink_fields(listener_pf), send_q=listener_nl.send_q
    )
    assert [without_netlink_fields(s) for s in by_netlink] == [without_netlink_fields(s) for s in by_procfs]
    assert all(s.source == "netlink" and s.cookie for s in by_netlink)
    # Orphaned FIN_WAIT2 sockets are timewait minisockets in the kernel: no tcp_info for them.
    assert [s.tcp_info is not None for s in by_netlink] == [False] * 3 + [True] * 3
    assert all(s.source == "procfs" and s.tcp_info is None and s.cookie is None for s in by_procfs)
    assert sorted(s.recv_q for s in by_procfs if s.state == TcpState.CLOSE_WAIT) == [0, 1, 778]

    # Through scan(): same findings, same diagnoses, idle time only from netlink.
    nl = close_wait_of(pid, port, count=3, backend="netlink")
    pf = close_wait_of(pid, port, count=3, backend="procfs")
    assert [(without_netlink_fields(a.socket), a.owners, a.role, a.diagnosis and a.diagnosis.code) for a in nl] == [
        (without_netlink_fields(b.socket), b.owners, b.role, b.diagnosis and b.diagnosis.code)
        for b in sorted(pf, key=lambda f: [x.socket.inode for x in nl].index(f.socket.inode))
    ]
    assert all(f.socket.idle_ms is not None for f in nl)
    assert all(f.socket.idle_ms is None for f in pf)


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed")
@pytest.mark.parametrize("host", HOSTS)
def test_scan_matches_ss(spawn: Spawn, host: str) -> None:
    pid, port, _ = _three_leaks(spawn, host)
    findings = close_wait_of(pid, port, count=3)
    output = subprocess.run(
        ["ss", "-tanpie", "state", "close-wait", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {(r.local, r.remote): r for r in parse_ss(output)}
    assert len(rows) == 3, output
    for finding in findings:
        sock = finding.socket
        row = rows[(sock.local, sock.remote)]
        assert (row.recv_q, row.send_q) == (sock.recv_q, sock.send_q)
        assert row.inode == sock.inode
        assert set(row.users) == {(o.process.name, o.process.pid, o.fd) for o in finding.owners}
        assert sock.tcp_info is not None
        assert row.bytes_received == sock.tcp_info.bytes_received
    assert sorted(r.recv_q for r in rows.values()) == [0, 1, 778]


#: Closes each connection properly when it reads EOF: the side that closed first ends in TIME_WAIT.
CLOSING_SERVER = """
import socket, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
while conn.recv(4096):
    pass
conn.close()
print("closed", flush=True)
time.sleep(120)
"""


def test_time_wait_and_fin_wait_2_without_owner(spawn: Spawn) -> None:
    """inode 0: nobody holds these; the scan lists them with no owner and the kernel's diagnosis."""
    closer = spawn(argv=python_argv(CLOSING_SERVER))
    assert closer.stdout is not None
    closer_port = int(closer.stdout.readline())
    client = socket.create_connection(("127.0.0.1", closer_port))
    client_end = client.getsockname()
    client.close()
    assert closer.stdout.readline().strip() == "closed"

    leaker = spawn(argv=python_argv(LEAKING_SERVER, "127.0.0.1", "keep"))
    assert leaker.stdout is not None
    leak_port = int(leaker.stdout.readline())
    orphan = socket.create_connection(("127.0.0.1", leak_port))
    orphan_end = orphan.getsockname()
    orphan.close()
    # --port matches a local or a remote port, and a port the kernel just gave a listener may be the
    # remote port of a stale TIME_WAIT from an earlier test: keep only this test's two connections.
    ours = {
        (Endpoint("127.0.0.1", client_end[1]), Endpoint("127.0.0.1", closer_port)),
        (Endpoint("127.0.0.1", orphan_end[1]), Endpoint("127.0.0.1", leak_port)),
    }

    def mine(snap: closewait.Snapshot) -> list[closewait.Finding]:
        return [f for f in snap.findings if (f.socket.local, f.socket.remote) in ours]

    def settled() -> dict[TcpState, closewait.Finding] | None:
        snap = closewait.scan(closewait.parse_states(["time-wait", "fin-wait-2"]), ports=[closer_port, leak_port])
        findings = mine(snap)
        by_state = {f.socket.state: f for f in findings}
        return by_state if len(findings) == 2 and len(by_state) == 2 else None

    found = wait_for(settled)
    time_wait, fin_wait = found[TcpState.TIME_WAIT], found[TcpState.FIN_WAIT2]
    assert time_wait.socket.remote.port == closer_port
    assert fin_wait.socket.remote.port == leak_port
    for finding, code in ((time_wait, "time-wait"), (fin_wait, "orphan-fin-wait-2")):
        assert finding.socket.inode == 0
        assert finding.owners == ()
        assert finding.role == Role.UNKNOWN
        assert finding.diagnosis is not None
        assert finding.diagnosis.code == code
    # The procfs backend sees the same two.
    snap = closewait.scan(closewait.parse_states(["teardown"]), ports=[closer_port, leak_port], backend="procfs")
    assert {(f.socket.state, f.socket.inode) for f in mine(snap)} >= {
        (TcpState.TIME_WAIT, 0),
        (TcpState.FIN_WAIT2, 0),
    }


#: shutdown(SHUT_WR) on a live socket: FIN_WAIT2 with an owner, the peer (server) never closes.
HALF_CLOSER = """
import socket, sys, time
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
conn.shutdown(socket.SHUT_WR)
print(conn.getsockname()[1], flush=True)
time.sleep(120)
"""


def test_half_closed_client_is_fin_wait_2_with_owner(spawn: Spawn) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = spawn(argv=python_argv(HALF_CLOSER, port))
    assert client.stdout is not None
    conn, _ = listener.accept()
    with listener, conn:
        int(client.stdout.readline())
        (finding,) = wait_for(
            lambda: closewait.scan(closewait.parse_states(["fin-wait-2"]), ports=[port], pids=[client.pid]).findings
        )
        assert finding.role == Role.CLIENT
        assert finding.diagnosis is not None
        assert finding.diagnosis.code == "half-closed"
        # This test's own end, never closed, is in CLOSE_WAIT and held by this process.
        (mine,) = closewait.scan(ports=[port], pids=[os.getpid()]).findings
        assert mine.role == Role.SERVER
        assert mine.diagnosis is not None
        assert mine.diagnosis.code == "not-reading"


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 on loopback")
def test_ipv4_client_of_dual_stack_listener_is_server_role(spawn: Spawn) -> None:
    """A listener on :: with IPV6_V6ONLY off accepts IPv4 clients as ::ffff:127.0.0.1."""
    server = spawn(
        argv=python_argv(
            """
            import socket, time
            server = socket.socket(socket.AF_INET6)
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            server.bind(("::", 0))
            server.listen()
            print(server.getsockname()[1], flush=True)
            conn, _ = server.accept()
            time.sleep(120)
            """
        )
    )
    assert server.stdout is not None
    port = int(server.stdout.readline())
    with socket.create_connection(("127.0.0.1", port)) as client:
        client_port = client.getsockname()[1]
    for backend in ("netlink", "procfs"):
        (finding,) = close_wait_of(server.pid, port, backend=backend)
        assert finding.socket.family == Family.IPV6
        assert finding.socket.local == Endpoint("::ffff:127.0.0.1", port)
        assert finding.socket.remote == Endpoint("::ffff:127.0.0.1", client_port)
        assert finding.role == Role.SERVER


#: Fills the peer's buffers, then closes: the FIN waits behind data the peer never reads.
FLOODER = """
import socket, sys, time
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
conn.setblocking(False)
sent = 0
try:
    while True:
        sent += conn.send(b"x" * 65536)
except BlockingIOError:
    pass
print(conn.getsockname()[1], sent, flush=True)
conn.close()   # orphaned FIN_WAIT1: data and FIN queued
time.sleep(120)
"""


def test_peer_not_reading_counts_data_queued_behind_the_fin(spawn: Spawn) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    flooder = spawn(argv=python_argv(FLOODER, port))
    assert flooder.stdout is not None
    conn, _ = listener.accept()  # never read
    with listener, conn:
        local_port, sent = map(int, flooder.stdout.readline().split())
        states = closewait.parse_states(["fin-wait-1", "established"])

        last: list[tuple[int, int]] = []

        def settled() -> dict[TcpState, closewait.Finding] | None:
            """Both ends seen, with the same queues as in the scan before: bytes still moving from the
            orphan's send queue to the reader's receive queue between the dump's reads of the two
            would break the sum below (the reader never reads: its window closes, and they stop)."""
            found = {f.socket.state: f for f in closewait.scan(states, ports=[local_port]).findings}
            if set(found) != {TcpState.FIN_WAIT1, TcpState.ESTABLISHED}:
                return None
            queues = (found[TcpState.FIN_WAIT1].socket.send_q, found[TcpState.ESTABLISHED].socket.recv_q)
            stable = bool(last) and last[-1] == queues
            last.append(queues)
            return found if stable else None

        found = wait_for(settled)
        orphan, reader = found[TcpState.FIN_WAIT1], found[TcpState.ESTABLISHED]
        assert orphan.owners == ()
        assert orphan.diagnosis is not None
        assert orphan.diagnosis.code == "peer-not-reading"
        queued = orphan.socket.send_q - 1  # Send-Q counts the FIN too
        # Every byte sent is in the reader's Recv-Q or still queued here (both, for bytes the reader
        # holds but has not acknowledged yet, so the sum can exceed what was sent).
        assert sent - reader.socket.recv_q <= queued <= sent
        assert queued > 0
        assert orphan.diagnosis.summary.startswith(f"{queued} bytes still queued for 127.0.0.1:{port}")
