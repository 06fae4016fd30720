"""scanning._Prepared: each CLOSE_WAIT socket's role, age and diagnosis made while the kernel's walk
keeps the dump waiting. The findings must be the ones made without it, whatever order the sockets
arrived in, on real sockets this test holds (a server's end and a client's end in CLOSE_WAIT) and
on everything else the kernel has in CLOSE_WAIT meanwhile.
"""

from __future__ import annotations

import socket
import time

from closewait import scanning
from closewait.model import Finding, Role, Socket, TcpState
from closewait.sources import netlink, prefetch
from closewait.sources.owners import OwnerMap, find_owners
from tests.util import wait_for


def _ends() -> tuple[list[socket.socket], int, int]:
    """A server's end and a client's end in CLOSE_WAIT, both held here: (the sockets to keep open,
    the server end's local port, the client end's local port)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    gone = socket.create_connection(server.getsockname())
    server_end, _ = server.accept()
    gone.close()  # the peer of server_end left: server_end is in CLOSE_WAIT, the server's end
    client_end = socket.create_connection(server.getsockname())
    served, _ = server.accept()
    served.close()  # the server left: client_end is in CLOSE_WAIT, the client's end
    return [server, server_end, client_end], server.getsockname()[1], client_end.getsockname()[1]


def _dump() -> tuple[list[Socket], list[Socket]]:
    sockets = list(netlink.dump(frozenset({TcpState.CLOSE_WAIT, TcpState.LISTEN})))
    return [s for s in sockets if s.state == TcpState.CLOSE_WAIT], [s for s in sockets if s.state == TcpState.LISTEN]


def test_prepared_findings_are_the_findings_made_after_the_dump() -> None:
    kept, server_port, client_port = _ends()
    try:
        wait_for(lambda: {server_port, client_port} <= {s.local.port for s in _dump()[0]})
        targets, listeners = _dump()
        taken_at = time.time()
        owner_map = find_owners({s.inode for s in targets})
        plain = scanning._findings(targets, listeners, owner_map, {}, None, taken_at, with_roles=True)
        roles = {f.socket.local.port: f.role for f in plain}
        assert roles[server_port] == Role.SERVER
        assert roles[client_port] == Role.CLIENT

        # The kernel's order: every listener first. Each of this test's sockets is prepared, and
        # the findings are the same objects' equals.
        in_order = scanning._Prepared(taken_at)
        in_order.add(listeners)
        for start in range(0, len(targets), 7):  # in batches, as replies arrive
            in_order.add(targets[start : start + 7])
        assert not in_order.spoiled
        ours = [s for s in targets if s.local.port in (server_port, client_port)]
        assert all(id(s) in in_order.ready for s in ours)
        with_prepared = scanning._findings(
            targets, listeners, owner_map, {}, None, taken_at, with_roles=True, prepared=in_order
        )
        assert with_prepared == plain

        # A listener after a prepared socket could change its role: nothing prepared is used.
        late = scanning._Prepared(taken_at)
        late.add(targets)
        late.add(listeners)
        assert late.spoiled
        assert _same(targets, listeners, owner_map, taken_at, late, plain)

        # Prepared with other listeners, or at another time: not used either.
        no_listeners = scanning._Prepared(taken_at)
        no_listeners.add(targets)
        assert not no_listeners.spoiled
        assert _same(targets, listeners, owner_map, taken_at, no_listeners, plain)
        other_time = scanning._Prepared(taken_at - 60)
        other_time.add(listeners + targets)
        assert _same(targets, listeners, owner_map, taken_at, other_time, plain)
    finally:
        for sock in kept:
            sock.close()


def _same(
    targets: list[Socket],
    listeners: list[Socket],
    owner_map: OwnerMap,
    taken_at: float,
    prepared: scanning._Prepared,
    plain: tuple[Finding, ...],
) -> bool:
    made = scanning._findings(targets, listeners, owner_map, {}, None, taken_at, with_roles=True, prepared=prepared)
    return made == plain


def test_a_scan_through_the_prefetched_source_prepares_while_it_waits() -> None:
    """The console's path: scan() on a prefetched source installs its preparation in the source's
    idle hook, chained after the caller's, and takes it off when the dump ends."""
    kept, server_port, client_port = _ends()
    try:
        wait_for(lambda: {server_port, client_port} <= {s.local.port for s in _dump()[0]})
        early = prefetch.start((prefetch.TCP_CLOSE_WAIT, prefetch.TCP_LISTEN))
        assert early is not None
        seen: list[int] = []
        early.while_waiting = lambda batch: seen.append(len(batch))
        snapshot = scanning.scan(backend=early)
        assert early.while_waiting is not None
        assert early.while_waiting.__name__ == "<lambda>"  # the caller's hook is back
        roles = {f.socket.local.port: f.role for f in snapshot.findings}
        assert roles[server_port] == Role.SERVER
        assert roles[client_port] == Role.CLIENT
        again = scanning.scan(backend="netlink")
        before = {f.socket.inode: (f.role, f.diagnosis, len(f.owners)) for f in snapshot.findings}
        after = {f.socket.inode: (f.role, f.diagnosis and f.diagnosis.code, len(f.owners)) for f in again.findings}
        for inode in before.keys() & after.keys():
            role, diagnosis, owners = before[inode]
            assert (role, diagnosis and diagnosis.code, owners) == after[inode]
    finally:
        for sock in kept:
            sock.close()
