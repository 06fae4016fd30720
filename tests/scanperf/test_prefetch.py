"""closewait.sources.prefetch: the console's early sock_diag dump, read on threads.

Its requests must be the bytes closewait.sources.netlink sends, and what it returns must be what
netlink.dump returns for the same sockets: checked on real CLOSE_WAIT sockets this test holds.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from closewait.model import Socket, TcpState
from closewait.sources import netlink, prefetch
from tests.util import wait_for


def test_requests_are_the_bytes_netlink_sends() -> None:
    for states in ({TcpState.CLOSE_WAIT}, {TcpState.CLOSE_WAIT, TcpState.LISTEN}):
        expected = netlink.build_request_both(states)
        seq = netlink.NLMSGHDR.struct.unpack_from(expected)[3]
        assert prefetch.dump_request([int(s) for s in states], seq) == expected
    assert (prefetch.TCP_CLOSE_WAIT, prefetch.TCP_LISTEN) == (TcpState.CLOSE_WAIT, TcpState.LISTEN)


def _close_wait_pair() -> tuple[socket.socket, socket.socket, int]:
    """A server socket with one accepted connection whose client has closed: CLOSE_WAIT here."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    port = client.getsockname()[1]
    client.close()
    return server, accepted, port


def test_prefetched_source_returns_what_netlink_dump_returns() -> None:
    server, accepted, port = _close_wait_pair()
    try:

        def mine(sockets: list[Socket]) -> list[Socket]:
            return [s for s in sockets if s.remote.port == port]

        wait_for(lambda: len(mine(list(netlink.dump({TcpState.CLOSE_WAIT})))) == 1)
        early = prefetch.start([prefetch.TCP_CLOSE_WAIT])
        assert early is not None
        assert early.name == "netlink"
        found = early.sockets(frozenset({TcpState.CLOSE_WAIT}))
        reference = list(netlink.dump({TcpState.CLOSE_WAIT}))
        (sock,) = mine(found)
        assert sock.state == TcpState.CLOSE_WAIT
        assert sock.recv_q == 1  # the peer's FIN, unread
        # tcp_info times move between the two dumps; everything else is the same record.
        assert [(s.key, s.cookie, s.inode) for s in mine(found)] == [
            (s.key, s.cookie, s.inode) for s in mine(reference)
        ]
        assert all(s.state == TcpState.CLOSE_WAIT for s in found)
        # Asked again, or for other states, it reads the kernel afresh.
        again = early.sockets(frozenset({TcpState.CLOSE_WAIT, TcpState.LISTEN}))
        assert any(s.state == TcpState.LISTEN and s.local.port == server.getsockname()[1] for s in again)
    finally:
        accepted.close()
        server.close()


def test_console_fast_path_reports_our_socket() -> None:
    """``scan --json --no-owners`` (which reads the kernel through the prefetch) finds our socket."""
    server, accepted, port = _close_wait_pair()
    try:
        code = "from closewait._console import main\nmain(['scan', '--json', '--no-owners'])\n"
        wait_for(lambda: any(s.remote.port == port for s in netlink.dump({TcpState.CLOSE_WAIT})))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        snapshot = json.loads(done.stdout)
        assert snapshot["backend"] == "netlink"
        (mine,) = [s for s in snapshot["sockets"] if s["remote"]["port"] == port]
        assert mine["local"]["port"] == server.getsockname()[1]
        assert mine["diagnosis"]["code"] == "not-reading"
    finally:
        accepted.close()
        server.close()


def test_while_waiting_is_given_each_parsed_socket_once_in_order() -> None:
    """The hook the console writes JSON with sees only sockets ``sockets()`` returns, each once, in order."""
    server, accepted, port = _close_wait_pair()
    try:
        wait_for(lambda: any(s.remote.port == port for s in netlink.dump({TcpState.CLOSE_WAIT, TcpState.LISTEN})))
        early = prefetch.start([prefetch.TCP_CLOSE_WAIT, prefetch.TCP_LISTEN])
        assert early is not None
        batches: list[list[Socket]] = []
        early.while_waiting = batches.append
        found = early.sockets(frozenset({TcpState.CLOSE_WAIT, TcpState.LISTEN}))
        given = [sock for batch in batches for sock in batch]
        assert all(batch for batch in batches)
        assert [id(s) for s in given] == [id(s) for s in found[: len(given)]]
        assert any(s.remote.port == port for s in found)
    finally:
        accepted.close()
        server.close()
