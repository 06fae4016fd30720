"""One dump request for both address families (TCPDIAG_GETSOCK), against one per family.

The kernel walks its whole TCP table for every dump request, so ``netlink.dump`` asks for IPv4
and IPv6 at once with the original inet_diag request, and falls back to SOCK_DIAG_BY_FAMILY per
family when the kernel refuses it. Checked here on real IPv4 and IPv6 sockets: both ways list the
same sockets, and a request the kernel refuses (a message type it does not serve) falls back.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from closewait.model import Family, Socket, TcpState
from closewait.sources import netlink
from tests.scan.kit import ipv6_loopback
from tests.util import wait_for

STATES = frozenset({TcpState.CLOSE_WAIT, TcpState.LISTEN})


@pytest.fixture
def both_families() -> Iterator[list[int]]:
    """A listener and a CLOSE_WAIT socket on 127.0.0.1 and on ::1 (if it exists); their ports."""
    held: list[socket.socket] = []
    ports: list[int] = []
    hosts = [(socket.AF_INET, "127.0.0.1")] + ([(socket.AF_INET6, "::1")] if ipv6_loopback() else [])
    try:
        for af, host in hosts:
            server = socket.socket(af)
            held.append(server)
            server.bind((host, 0))
            server.listen()
            client = socket.create_connection(server.getsockname()[:2])
            accepted, _ = server.accept()
            held.append(accepted)
            client.close()  # the accepted end goes to CLOSE_WAIT
            ports.append(server.getsockname()[1])
        yield ports
    finally:
        for sock in held:
            sock.close()


def _mine(sockets: Iterator[Socket] | list[Socket], ports: list[int]) -> set[tuple[Family, str, int, TcpState, int]]:
    return {
        (s.family, s.local.address, s.local.port, s.state, s.inode)
        for s in sockets
        if s.local.port in ports or s.remote.port in ports
    }


def test_one_request_lists_both_families(both_families: list[int]) -> None:
    ports = both_families
    expected_count = 2 * len(ports)  # a listener and a CLOSE_WAIT socket per family
    per_family = wait_for(
        lambda: (
            found
            if len(found := _mine([*netlink.dump(STATES, [Family.IPV4]), *netlink.dump(STATES, [Family.IPV6])], ports))
            == expected_count
            else None
        )
    )
    # The request dump() sends by default, read by hand: one reply with both families in it.
    request = netlink.build_request_both(STATES)
    with netlink._channel(None) as nl:
        direct = list(
            netlink.parse_reply(netlink._replies(nl, request), netlink._seq_of(request), None, netlink.TCPDIAG_GETSOCK)
        )
    assert _mine(direct, ports) == per_family
    assert {family for family, *_ in per_family} == ({Family.IPV4, Family.IPV6} if len(ports) == 2 else {Family.IPV4})
    assert _mine(netlink.dump(STATES), ports) == per_family
    counts = netlink.count_by_state()
    assert counts[TcpState.LISTEN] >= len(ports)
    assert counts[TcpState.CLOSE_WAIT] >= len(ports)


def test_a_refused_two_family_request_falls_back_to_one_per_family(
    both_families: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = both_families
    reference = wait_for(lambda: found if len(found := _mine(netlink.dump(STATES), ports)) == 2 * len(ports) else None)
    reference_counts = netlink.count_by_state()
    # Message type 19 (DCCPDIAG_GETSOCK) is one this kernel answers with an error of its own, as a
    # kernel without the original inet_diag request would answer TCPDIAG_GETSOCK.
    monkeypatch.setattr(netlink, "TCPDIAG_GETSOCK", 19)
    request = netlink.build_request_both(STATES)
    with netlink._channel(None) as nl, pytest.raises(netlink.NetlinkError) as refused:
        list(netlink.parse_reply(netlink._replies(nl, request), netlink._seq_of(request), None, 19))
    assert netlink.both_refused(refused.value)
    assert _mine(netlink.dump(STATES), ports) == reference
    counts = netlink.count_by_state()
    assert counts[TcpState.LISTEN] >= len(ports)
    assert set(counts) == set(reference_counts)
