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
    idle hook, chained after the caller's (which still sees every batch), and takes it off when the
    dump ends; this test's two sockets get the roles and diagnoses a scan through netlink gives."""
    kept, server_port, client_port = _ends()
    try:
        wait_for(lambda: {server_port, client_port} <= {s.local.port for s in _dump()[0]})
        early = prefetch.start((prefetch.TCP_CLOSE_WAIT, prefetch.TCP_LISTEN))
        assert early is not None
        seen: list[int] = []

        def callers_hook(batch: list[Socket]) -> None:
            seen.append(len(batch))

        early.while_waiting = callers_hook
        snapshot = scanning.scan(backend=early)
        assert early.while_waiting is callers_hook  # the caller's hook is back
        ours = (server_port, client_port)
        prefetched = {
            f.socket.local.port: (f.role, f.diagnosis) for f in snapshot.findings if f.socket.local.port in ours
        }
        assert prefetched[server_port][0] == Role.SERVER
        assert prefetched[client_port][0] == Role.CLIENT
        again = scanning.scan(backend="netlink")
        plain = {f.socket.local.port: (f.role, f.diagnosis) for f in again.findings if f.socket.local.port in ours}
        assert {port: (role, d and d.code) for port, (role, d) in prefetched.items()} == {
            port: (role, d and d.code) for port, (role, d) in plain.items()
        }

        # The chain itself (a dump may arrive whole before any wait, so it is driven here): the
        # caller's hook sees each batch, then the preparation does.
        targets, listeners = _dump()
        prepared = scanning._Prepared.install(early, time.time())
        assert prepared is not None
        early.while_waiting(listeners + targets)
        assert seen[-1] == len(listeners) + len(targets)
        assert {id(s) for s in targets} == set(prepared.ready)
        prepared.uninstall(early)
        assert early.while_waiting is callers_hook
    finally:
        for sock in kept:
            sock.close()
