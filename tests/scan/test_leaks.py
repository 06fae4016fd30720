"""Real leaking servers and clients in child processes: each CLOSE_WAIT code, IPv4 and IPv6, both roles.

The three codes rest on one kernel fact: in CLOSE_WAIT the peer's FIN counts as one byte of Recv-Q
until the owner reads EOF. So the tests make the kernel produce Recv-Q 0 (EOF read, socket kept),
1 (nothing read) and N+1 (N bytes of data unread) and check the scan reports exactly that.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest

import closewait
from closewait.model import Family, Role, TcpState
from tests.conftest import Spawn
from tests.scan.kit import LEAKING_CLIENT, LEAKING_SERVER, close_wait_of, ipv6_loopback, python_argv

FAMILIES = [
    pytest.param("127.0.0.1", Family.IPV4, id="ipv4"),
    pytest.param(
        "::1", Family.IPV6, id="ipv6", marks=pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 on loopback")
    ),
]
#: (server mode, bytes the peer sends before closing, expected Recv-Q, expected code)
CASES = [
    pytest.param("eof", 0, 0, "eof-not-closed", id="eof-not-closed"),
    pytest.param("keep", 0, 1, "not-reading", id="not-reading"),
    pytest.param("keep", 1234, 1235, "unread-data", id="unread-data"),
]


def _check(finding: closewait.Finding, *, recv_q: int, code: str, sent: int, role: Role, family: Family) -> None:
    sock = finding.socket
    assert sock.state == TcpState.CLOSE_WAIT
    assert sock.family == family
    assert sock.recv_q == recv_q
    assert sock.unread_bytes == sent
    assert sock.eof_read is (recv_q == 0)
    assert finding.role == role
    assert finding.diagnosis is not None
    assert finding.diagnosis.code == code
    if code == "unread-data":
        assert f"{sent} bytes" in finding.diagnosis.summary
    assert sock.idle_ms is not None  # netlink (auto) gives tcp_info


@pytest.mark.parametrize(("host", "family"), FAMILIES)
@pytest.mark.parametrize(("mode", "sent", "recv_q", "code"), CASES)
def test_leaking_server(spawn: Spawn, host: str, family: Family, mode: str, sent: int, recv_q: int, code: str) -> None:
    server = spawn(argv=python_argv(LEAKING_SERVER, host, mode))
    assert server.stdout is not None
    port = int(server.stdout.readline())
    client = socket.create_connection((host, port))
    client_port = client.getsockname()[1]
    client.sendall(b"x" * sent)
    client.close()
    # "accepted" comes after the accept, and in "eof" mode after recv() returned b"" (Recv-Q now 0).
    assert server.stdout.readline().strip() == "accepted"

    (finding,) = close_wait_of(server.pid, port)
    _check(finding, recv_q=recv_q, code=code, sent=sent, role=Role.SERVER, family=family)
    assert finding.socket.local == closewait.Endpoint(host, port)
    assert finding.socket.remote == closewait.Endpoint(host, client_port)
    (owner,) = finding.owners
    assert owner.process.pid == server.pid
    assert owner.process.name == os.path.basename(sys.executable)[:15]
    assert owner.process.cmdline[:2] == (sys.executable, "-c")
    assert owner.fd > 2


@pytest.mark.parametrize(("host", "family"), FAMILIES)
@pytest.mark.parametrize(("mode", "sent", "recv_q", "code"), CASES)
def test_leaking_client(spawn: Spawn, host: str, family: Family, mode: str, sent: int, recv_q: int, code: str) -> None:
    """The server (this test) answers and closes; the client child keeps its socket: role client."""
    listener = socket.socket(socket.AF_INET6 if family == Family.IPV6 else socket.AF_INET)
    listener.bind((host, 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = spawn(argv=python_argv(LEAKING_CLIENT, host, port, mode))
    assert client.stdout is not None
    conn, _ = listener.accept()
    local_port = int(client.stdout.readline())
    conn.sendall(b"y" * sent)
    conn.close()
    listener.close()
    if mode == "eof":
        assert client.stdout.readline().strip() == "eof"

    (finding,) = close_wait_of(client.pid, port)
    _check(finding, recv_q=recv_q, code=code, sent=sent, role=Role.CLIENT, family=family)
    assert finding.socket.local.port == local_port
    assert finding.socket.remote == closewait.Endpoint(host, port)
    assert [o.process.pid for o in finding.owners] == [client.pid]
