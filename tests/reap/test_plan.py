"""plan() is pure: hand-built Snapshots in, ReapPlans out. Also the small parsers the CLI relies on."""

from __future__ import annotations

import pytest

from closewait import reap
from closewait.errors import UsageError
from closewait.model import Endpoint, Family, Finding, Owner, Process, Role, Snapshot, Socket, TcpInfo, TcpState

APP = Process(pid=4242, start_time=777, name="app", cmdline=("app",))
CHILD = Process(pid=4243, start_time=778, name="app", cmdline=("app", "--worker"))


def make_socket(state: TcpState, inode: int, remote_port: int, *, idle_ms: int | None = 60_000) -> Socket:
    info = None
    if idle_ms is not None:
        info = TcpInfo(int(state), 0, 0, 0, 0, idle_ms, idle_ms, idle_ms, 0, 0, 0)
    return Socket(
        state=state,
        family=Family.IPV4,
        local=Endpoint("10.1.1.1", 8080),
        remote=Endpoint("10.2.2.2", remote_port),
        inode=inode,
        uid=0,
        recv_q=0,
        send_q=0,
        cookie=inode * 10,
        tcp_info=info,
    )


def snapshot(*findings: Finding) -> Snapshot:
    return Snapshot(findings=findings, states=frozenset(TcpState), taken_at=1.0, backend="static")


def finding(sock: Socket, *owners: Owner) -> Finding:
    return Finding(sock, owners, Role.SERVER, None)


def test_only_close_wait_sockets_become_targets() -> None:
    snap = snapshot(
        finding(make_socket(TcpState.LISTEN, 1, 0), Owner(APP, 3)),
        finding(make_socket(TcpState.ESTABLISHED, 2, 5001), Owner(APP, 4)),
        finding(make_socket(TcpState.CLOSE_WAIT, 3, 5002), Owner(APP, 5)),
    )
    plan = reap.plan(snap, pids=[APP.pid])
    assert [(t.socket.inode, t.fd) for t in plan.targets] == [(3, 5)]
    assert {e.socket.inode for e in plan.excluded} == {1, 2}
    assert all("only CLOSE_WAIT sockets are ever touched" in e.reason for e in plan.excluded)
    assert plan.as_dict()["targets"][0]["start_time"] == APP.start_time


def test_shared_sockets_name_their_other_holders_and_all_fds() -> None:
    sock = make_socket(TcpState.CLOSE_WAIT, 9, 5003)
    snap = snapshot(finding(sock, Owner(APP, 7), Owner(APP, 11), Owner(CHILD, 7)))
    (target,) = reap.plan(snap, pids=[APP.pid]).targets
    assert (target.process, target.fds, target.fd) == (APP, (7, 11), 7)
    assert target.other_holders == (Owner(CHILD, 7),)
    (via_child,) = reap.plan(snap, pids=[CHILD.pid]).targets
    assert via_child.process == CHILD


def test_filters_and_exclusions() -> None:
    young = make_socket(TcpState.CLOSE_WAIT, 20, 6000, idle_ms=500)
    old = make_socket(TcpState.CLOSE_WAIT, 21, 6001, idle_ms=120_000)
    ageless = make_socket(TcpState.CLOSE_WAIT, 22, 6002, idle_ms=None)
    orphan = make_socket(TcpState.CLOSE_WAIT, 23, 6003)
    unknown = Process(pid=99, start_time=0, name="?", cmdline=())
    snap = snapshot(
        finding(young, Owner(APP, 20)),
        finding(old, Owner(APP, 21)),
        finding(ageless, Owner(APP, 22)),
        finding(orphan),
        finding(make_socket(TcpState.CLOSE_WAIT, 24, 6004), Owner(unknown, 3)),
    )
    aged = reap.plan(snap, pids=[APP.pid], older_than_ms=60_000)
    assert [t.socket.inode for t in aged.targets] == [21]
    assert [(e.socket.inode, e.reason.split(" (")[0]) for e in aged.excluded] == [(22, "idle time unknown")]

    everyone = reap.plan(snap, all_processes=True, remote="10.2.0.0/16")
    assert [t.socket.inode for t in everyone.targets] == [20, 21, 22]
    assert {e.socket.inode: e.reason.split(" ")[0] for e in everyone.excluded} == {23: "no", 24: "start"}

    by_port = reap.plan(snap, pids=[APP.pid], remote="10.2.2.2:6001")
    assert [t.socket.inode for t in by_port.targets] == [21]
    assert reap.plan(snap, pids=[APP.pid], ports=[6000]).targets[0].socket.inode == 20
    assert reap.plan(snap, pids=[12345]).targets == ()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "say whose sockets to reap"),
        ({"all_processes": True}, "--all reaps every process's sockets"),
        ({"pids": [1], "all_processes": True, "ports": [80]}, "either --pid or --all"),
        ({"pids": [1], "method": "nuke"}, "unknown method 'nuke'"),
        ({"pids": [1], "ports": [70000]}, "port 70000 is out of range"),
    ],
)
def test_plan_refuses_ambiguous_requests(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        reap.plan(snapshot(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "ms"),
    [("30s", 30_000), ("5m", 300_000), ("1h", 3_600_000), ("500ms", 500), ("1m30s", 90_000), ("1.5s", 1500)],
)
def test_durations(text: str, ms: int) -> None:
    assert reap.parse_duration(text) == ms


@pytest.mark.parametrize("text", ["", "30", "s", "5 m", "-1s", "1x", "1h-"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UsageError, match="bad duration"):
        reap.parse_duration(text)


@pytest.mark.parametrize(
    ("text", "endpoint", "expected"),
    [
        ("127.0.0.1", Endpoint("127.0.0.1", 4000), True),
        ("127.0.0.1:4000", Endpoint("127.0.0.1", 4001), False),
        ("10.0.0.0/8", Endpoint("10.9.9.9", 1), True),
        ("10.0.0.0/8", Endpoint("::ffff:10.9.9.9", 1), True),
        ("::1", Endpoint("::1", 1), True),
        ("[::1]:4000", Endpoint("::1", 4000), True),
        ("[::1]:4000", Endpoint("127.0.0.1", 4000), False),
        ("2001:db8::/32", Endpoint("2001:db8::5", 9), True),
    ],
)
def test_remote_filter(text: str, endpoint: Endpoint, expected: bool) -> None:
    assert reap.RemoteFilter.parse(text).matches(endpoint) is expected
