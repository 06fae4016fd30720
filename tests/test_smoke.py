"""The smallest end-to-end check: a leaked CLOSE_WAIT in a child process is found and diagnosed."""

from __future__ import annotations

import socket

import closewait
from tests.conftest import Spawn
from tests.util import EOF_LEAKER, wait_for


def test_leaked_socket_is_found_with_owner_and_diagnosis(spawn: Spawn) -> None:
    child = spawn(EOF_LEAKER)
    assert child.stdout is not None
    port = int(child.stdout.readline())
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"hello")
    client.close()

    def leaked() -> tuple[closewait.Finding, ...]:
        return closewait.scan(ports=[port], pids=[child.pid]).findings

    (finding,) = wait_for(lambda: [f for f in leaked() if f.socket.recv_q == 0])
    assert finding.socket.state == closewait.TcpState.CLOSE_WAIT
    assert finding.role == closewait.Role.SERVER
    assert finding.diagnosis is not None
    assert finding.diagnosis.code == "eof-not-closed"
    assert [o.process.pid for o in finding.owners] == [child.pid]
    assert finding.socket.local == closewait.Endpoint("127.0.0.1", port)
