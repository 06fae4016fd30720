"""``snapshot_json`` writes findings with a template; it must print exactly json.dumps of snapshot_dict.

Generated snapshots cover what a template can get wrong: strings json must escape (quotes,
backslashes, control and non-ASCII characters), None where the model allows it (no cookie, no
tcp_info, no diagnosis), owners, every state and role, 64-bit cookies.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from closewait.model import (
    Age,
    AgeSource,
    Diagnosis,
    Endpoint,
    Family,
    Finding,
    Owner,
    Process,
    Role,
    Snapshot,
    Socket,
    TcpInfo,
    TcpState,
)
from closewait.serialize import SocketJson, snapshot_dict, snapshot_json, snapshot_json_chunks
from closewait.workload import Workload, WorkloadSelector

u32 = st.integers(0, 2**32 - 1)
text = st.text(max_size=12)
endpoints = st.builds(Endpoint, text, st.integers(0, 65535))
tcp_infos = st.builds(
    TcpInfo, *[u32] * 11, bytes_acked=st.none() | st.integers(0, 2**64 - 1), bytes_received=st.none() | u32
)
sockets = st.builds(
    Socket,
    st.sampled_from(TcpState),
    st.sampled_from(Family),
    endpoints,
    endpoints,
    u32,
    u32,
    u32,
    u32,
    cookie=st.none() | st.integers(0, 2**64 - 1),
    tcp_info=st.none() | tcp_infos,
    source=st.sampled_from(["netlink", "procfs"]),
)
workloads = st.builds(
    Workload,
    st.sampled_from(["container", "pod", "unit", "host", "unknown"]),
    text,
    text,
    runtime=st.none() | text,
    container=st.none() | text,
    pod=st.none() | text,
    namespace=st.none() | text,
    pod_uid=st.none() | text,
    qos=st.none() | st.sampled_from(["guaranteed", "burstable", "besteffort"]),
    unit=st.none() | text,
    cgroup=text,
    labels=st.lists(st.tuples(text, text), max_size=2).map(tuple),
    error=st.none() | text,
    monitor=st.booleans(),
)
processes = st.builds(
    Process,
    st.integers(1, 2**22),
    u32,
    text,
    st.lists(text, max_size=3).map(tuple),
    workload=st.none() | workloads,
)
owners = st.lists(st.builds(Owner, processes, st.integers(0, 4096)), max_size=2).map(tuple)
ages = st.builds(Age, st.floats(0, 4e9), st.integers(0, 2**40), st.sampled_from(AgeSource))
findings = st.builds(
    Finding,
    sockets,
    owners,
    st.sampled_from(Role),
    st.none() | st.builds(Diagnosis, text, text, text),
    st.none() | ages,
)
snapshots = st.builds(
    Snapshot,
    st.lists(findings, max_size=4).map(tuple),
    st.frozensets(st.sampled_from(TcpState)),
    st.floats(0, 2e9),
    st.sampled_from(["netlink", "procfs", "static"]),
    netns=st.none() | text,
    owners_resolved=st.booleans(),
    errors=st.lists(text, max_size=2).map(tuple),
    owners_via=st.none() | st.sampled_from(["bpf", "procfs"]),
    owners_fallback_reason=st.none() | text,
    state_counts=st.dictionaries(st.sampled_from(TcpState), st.integers(0, 10**6)),
    recorder_used=st.booleans(),
    recorder_unavailable=st.none() | text,
    selection=st.none() | st.builds(WorkloadSelector, st.none() | text, st.none() | text, st.none() | text),
)


@settings(max_examples=300, deadline=None)
@given(snapshots)
def test_snapshot_json_is_json_dumps_of_snapshot_dict(snapshot: Snapshot) -> None:
    expected = json.dumps(snapshot_dict(snapshot), separators=(",", ":")) + "\n"
    assert snapshot_json(snapshot) == expected


@settings(max_examples=200, deadline=None)
@given(snapshots, st.data())
def test_sockets_written_ahead_change_no_byte(snapshot: Snapshot, data: st.DataObject) -> None:
    """The console writes some sockets' JSON while the dump arrives (SocketJson); any subset of the
    findings' sockets, in any batches, with sockets that found no finding among them, gives the
    same bytes."""
    ahead = SocketJson()
    found = [f.socket for f in snapshot.findings]
    for _ in range(data.draw(st.integers(0, 3))):
        batch = data.draw(st.lists(st.sampled_from(found), max_size=3)) if found else []
        ahead.add([*batch, *data.draw(st.lists(sockets, max_size=1))])
    expected = json.dumps(snapshot_dict(snapshot), separators=(",", ":")) + "\n"
    assert "".join(snapshot_json_chunks(snapshot, ahead)) == expected


def test_snapshot_json_of_an_empty_scan() -> None:
    snapshot = Snapshot((), frozenset({TcpState.CLOSE_WAIT}), 1.5, "netlink", state_counts={TcpState.CLOSE_WAIT: 0})
    assert json.loads(snapshot_json(snapshot))["sockets"] == []
    assert snapshot_json(snapshot) == json.dumps(snapshot_dict(snapshot), separators=(",", ":")) + "\n"


def test_snapshot_json_across_chunk_boundaries() -> None:
    """Hundreds of findings span several of snapshot_json_chunks' pieces; the joins must not show."""
    info = TcpInfo(8, 0, 0, 0, 200000, 5, 6, 7, 30, 0, 0, None, None)
    findings = tuple(
        Finding(
            Socket(
                TcpState.CLOSE_WAIT,
                Family.IPV4,
                Endpoint("127.0.0.1", 80),
                Endpoint("127.0.0.2", port),
                port,
                0,
                1,
                0,
                port,
                info,
            ),
            (),
            Role.UNKNOWN,
            Diagnosis("not-reading", f"peer {port} closed", "read it"),
        )
        for port in range(1, 452)
    )
    snapshot = Snapshot(findings, frozenset({TcpState.CLOSE_WAIT}), 2.0, "netlink", owners_resolved=False)
    text = snapshot_json(snapshot)
    assert text == json.dumps(snapshot_dict(snapshot), separators=(",", ":")) + "\n"
    assert [s["remote"]["port"] for s in json.loads(text)["sockets"]] == list(range(1, 452))


def test_the_remembered_seconds_stay_bounded_and_correct() -> None:
    """``utc_text`` remembers each whole second's text; a long-running user (watch --jsonl) meets
    new seconds forever, so what is remembered is bounded, and every text is format_utc's."""
    from closewait import serialize
    from closewait.display import format_utc

    start = 1_700_000_000
    for second in range(start, start + 3 * serialize._UTC_SECONDS_MAX):
        assert serialize.utc_text(second + 0.25) == format_utc(second + 0.25)
        assert len(serialize._UTC_SECONDS) <= serialize._UTC_SECONDS_MAX


def test_sockets_alike_in_state_and_queues_only() -> None:
    """``_socket_json`` writes the queues, ``unread_bytes`` and ``eof_read`` once per (state, Recv-Q,
    Send-Q): sockets alike in those and different in everything else still print as json.dumps says."""
    info = TcpInfo(8, 0, 0, 0, 200000, 5, 6, 7, 30, 0, 0, None, None)
    findings = tuple(
        Finding(
            Socket(
                state, family, Endpoint(address, 80), Endpoint(address, 40000 + n), n, n, recv_q, 3, cookie, tcp_info
            ),
            (),
            Role.UNKNOWN,
            None,
        )
        for n, (state, recv_q) in enumerate((s, q) for s in TcpState for q in (0, 1, 2, 7))
        for family, address, cookie, tcp_info in (
            (Family.IPV4, "127.0.0.1", None, None),
            (Family.IPV6, "::1", 99, info),
        )
    )
    snapshot = Snapshot(findings, frozenset(TcpState), 2.0, "netlink", owners_resolved=False)
    for _ in range(2):  # the second time, every triple is remembered
        assert snapshot_json(snapshot) == json.dumps(snapshot_dict(snapshot), separators=(",", ":")) + "\n"


def test_compact_is_json_dumps() -> None:
    """``serialize._compact`` makes json.dumps' own C encoder from ``_json``: the same text for what
    json.dumps takes, and the same error for what it refuses."""
    from closewait import serialize

    values: list[object] = [
        {"a": [1, 2.5, None, True, False, 'é\n"\\', float("nan"), float("inf"), -float("inf")]},
        {1: "int key", 2.5: "float key", False: "bool key", None: "none key"},
        ["nested", {"list": [[], {}], "tuple": (1, 2)}, 10**30, -0.0, 1e-300],
        {"huge": 2**64, "text": "\u2028\U0001f600\x00"},
    ]
    for value in values:
        assert serialize._compact(value) == json.dumps(value, separators=(",", ":"))
    for refused in ({"set": {1}}, [object()], {(1, 2): "tuple key"}):
        with pytest.raises(TypeError) as ours:
            serialize._compact(refused)
        with pytest.raises(TypeError) as theirs:
            json.dumps(refused, separators=(",", ":"))
        assert str(ours.value) == str(theirs.value)
    looped: list[object] = []
    looped.append(looped)
    with pytest.raises(ValueError, match="Circular reference"):
        serialize._compact(looped)
