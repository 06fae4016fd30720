"""``scanning._findings`` against the plain loop it speeds up: the same findings, in the same order.

The loop builds the sort keys as it goes and writes the lower-bound age without calling ``_age``;
the reference below is the plain way (``Finding(...)``, ``_age`` for every CLOSE_WAIT socket, a sort
by ``_finding_order``). Generated scans cover what the shortcuts can get wrong: ties in the sort
key (the order must stay stable), sockets without tcp_info or cookie, a recorder that knows some
sockets, none, or is absent, the pid filter, roles on and off.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from closewait import diagnosis as rules
from closewait.model import Endpoint, Family, Finding, Owner, Process, Role, Socket, TcpInfo, TcpState
from closewait.scanning import _age, _finding_order, _findings
from closewait.sources.owners import OwnerMap
from closewait.sources.pinned import EntryTimes

PROCESSES = [Process(pid, 1000 + pid, f"p{pid}", (f"p{pid}",)) for pid in (10, 11, 12)]
ADDRESSES = ["127.0.0.1", "127.0.0.2", "::1", "0.0.0.0", "::ffff:127.0.0.1"]


def _tcp_info(idle_ms: int) -> TcpInfo:
    return TcpInfo(8, 0, 0, 0, 200_000, 5, idle_ms, 7, 30, 0, 0, None, None)


#: targets, listeners, owners, pid filter, recorder's entry times, with roles: _findings' arguments.
Scan = tuple[list[Socket], list[Socket], OwnerMap | None, dict[int, int], EntryTimes | None, bool]
STATES = [TcpState.CLOSE_WAIT, TcpState.CLOSE_WAIT, TcpState.FIN_WAIT2, TcpState.LAST_ACK]


@st.composite
def scans(draw: st.DrawFn) -> Scan:
    n = draw(st.integers(0, 40))
    targets = []
    for inode in range(1, n + 1):
        idle = draw(st.none() | st.sampled_from([0, 5, 5, 1200, 90_000, 4_000_000]))  # ties on purpose
        targets.append(
            Socket(
                draw(st.sampled_from(STATES)),
                Family.IPV4,
                Endpoint(draw(st.sampled_from(ADDRESSES)), draw(st.sampled_from([80, 8080, 40000]))),
                Endpoint("127.0.0.9", draw(st.sampled_from([80, 50000, 50001]))),
                inode,
                0,
                draw(st.integers(0, 3)),
                draw(st.integers(0, 3)),
                draw(st.none() | st.just(inode * 7)),
                None if idle is None else _tcp_info(idle),
            )
        )
    listeners = [
        Socket(TcpState.LISTEN, Family.IPV4, Endpoint(address, port), Endpoint("0.0.0.0", 0), 1000 + i, 0, 0, 128)
        for i, (address, port) in enumerate(
            draw(st.lists(st.tuples(st.sampled_from(ADDRESSES), st.sampled_from([80, 8080])), max_size=3))
        )
    ]
    owner_map: OwnerMap | None = None
    if draw(st.booleans()):
        owners = {}
        for sock in [*targets, *listeners]:
            holders = draw(st.lists(st.sampled_from(PROCESSES), max_size=2, unique=True))
            if holders:
                owners[sock.inode] = [Owner(p, sock.inode % 50 + 3) for p in holders]
        owner_map = OwnerMap(owners, method="bpf")
    pid_filter = {PROCESSES[0].pid: PROCESSES[0].start_time} if draw(st.booleans()) else {}
    entries: EntryTimes | None = None
    choice = draw(st.sampled_from(["none", "empty", "some"]))
    if choice == "empty":
        entries = EntryTimes({}, 5_000_000_000, 1_700_000_000.25, "no recorder is pinned")
    elif choice == "some":
        known = {s.cookie: 4_000_000_000 - s.inode * 1_000_000 for s in targets if s.cookie is not None and s.inode % 2}
        entries = EntryTimes(known, 5_000_000_000, 1_700_000_000.25)
    with_roles = owner_map is not None and draw(st.booleans())
    return targets, listeners, owner_map, pid_filter, entries, with_roles


def _plain_findings(
    targets: list[Socket],
    listeners: list[Socket],
    owner_map: OwnerMap | None,
    pid_filter: dict[int, int],
    entries: EntryTimes | None,
    taken_at: float,
    with_roles: bool,
) -> tuple[Finding, ...]:
    """The loop ``_findings`` replaced, written plainly."""
    index = owner_map.owners if owner_map is not None else {}
    listening = [(o.process.pid, s.local) for s in listeners for o in index.get(s.inode, ())]
    host_ports = {s.local.port for s in listeners}
    findings = []
    for sock in targets:
        owners = tuple(index.get(sock.inode, ()))
        if pid_filter and not owners:
            continue
        role = rules.role_of(sock, owners, listening, host_ports) if with_roles else Role.UNKNOWN
        age = _age(sock, entries, taken_at) if sock.state == TcpState.CLOSE_WAIT else None
        exact_ms = age.ms if age is not None and age.source.value == "exact" else None
        findings.append(Finding(sock, owners, role, rules.diagnose(sock, owners, role, exact_ms), age))
    findings.sort(key=_finding_order)
    return tuple(findings)


@settings(max_examples=300, deadline=None)
@given(scans())
def test_findings_are_the_plain_loops(scan: Scan) -> None:
    targets, listeners, owner_map, pid_filter, entries, with_roles = scan
    taken_at = 1_700_000_000.5
    fast = _findings(targets, listeners, owner_map, pid_filter, entries, taken_at, with_roles=with_roles)
    plain = _plain_findings(targets, listeners, owner_map, pid_filter, entries, taken_at, with_roles)
    assert fast == plain
    # Equal findings can still be different sockets (ties in the key): the order must be the same objects'.
    assert [f.socket.inode for f in fast] == [f.socket.inode for f in plain]
