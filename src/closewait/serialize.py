"""The model as plain JSON-ready dicts: the names programs outside closewait rely on.

Used by ``scan --json``, ``watch --jsonl`` and the pytest plugin's report; the names are
documented in docs/json.md and only ever added to, never renamed.

``snapshot_dict`` is the definition. ``snapshot_json`` prints exactly ``json.dumps`` of it, but
writes each finding with two templates (``_socket_json`` for the socket's own fields,
``_finding_json`` for the rest) instead of building ~5 dicts per socket and having the encoder walk
them: on 5,000 sockets ~40 ms instead of ~100 ms in a fresh process. The strings findings repeat
(addresses, codes, remedies) are escaped once per call. The socket's part can be written ahead,
while the kernel's dump is still arriving (``SocketJson``, used by the console). A field added to
``finding_dict`` must be added to one of the templates too; tests/scanperf/test_serialize_fast.py
compares them with json.dumps on generated snapshots, with and without sockets written ahead.
"""

from __future__ import annotations

from _json import encode_basestring_ascii as _json_str
from _json import make_encoder as _make_encoder
from collections.abc import Iterator

from closewait.display import format_utc
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
    TcpState,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5 ms); mypy knows the name
if TYPE_CHECKING:
    from typing import Any

    from closewait import reap
    from closewait.watch import Event

# An enum's .name and .value are Python-level descriptors, a dict lookup is one C call: the names
# below are read once per socket.
_STATE_NAMES: dict[TcpState, str] = {state: state.name for state in TcpState}
_FAMILY_VALUES: dict[Family, str] = {family: family.value for family in Family}
_ROLE_VALUES: dict[Role, str] = {role: role.value for role in Role}
_AGE_SOURCES: dict[AgeSource, str] = {source: source.value for source in AgeSource}
#: Whole seconds -> their ISO 8601 text: a scan's thousands of ages fall in a few hundred seconds.
#: Emptied when it reaches ``_UTC_SECONDS_MAX``: a long-running user (``watch --jsonl``, the
#: exporter's process) meets new seconds forever.
_UTC_SECONDS: dict[int, str] = {}
_UTC_SECONDS_MAX = 4096
#: The millisecond tails of ``utc_text``, ".000Z" to ".999Z": an index instead of a format per age.
_MILLIS: tuple[str, ...] = tuple(f".{ms:03d}Z" for ms in range(1000))


def _utc_second(whole: int) -> str:
    """``format_utc(whole)`` without ".000Z", remembered in ``_UTC_SECONDS``."""
    if len(_UTC_SECONDS) >= _UTC_SECONDS_MAX:
        _UTC_SECONDS.clear()  # cheaper than evicting one by one; a scan refills what it uses
    text = _UTC_SECONDS[whole] = format_utc(whole)[:-5]
    return text


def utc_text(seconds: float) -> str:
    """``display.format_utc(seconds)``, with the date and time of each whole second written once."""
    total_ms = round(seconds * 1000)
    whole = total_ms // 1000  # floor, as divmod: the tail is always 0-999
    return (_UTC_SECONDS.get(whole) or _utc_second(whole)) + _MILLIS[total_ms - whole * 1000]


def age_dict(age: Age | None) -> dict[str, Any]:
    """The three age fields of a socket (docs/json.md): all null when its age is unknown."""
    if age is None:
        return {"close_wait_since": None, "close_wait_age_ms": None, "age_source": None}
    return {
        "close_wait_since": utc_text(age.since),
        "close_wait_age_ms": age.ms,
        "age_source": _AGE_SOURCES[age.source],
    }


def endpoint_dict(endpoint: Endpoint) -> dict[str, Any]:
    return {"address": endpoint.address, "port": endpoint.port}


def owner_dict(owner: Owner) -> dict[str, Any]:
    process = owner.process
    return {
        "pid": process.pid,
        "fd": owner.fd,
        "name": process.name,
        "cmdline": list(process.cmdline),
        "start_time": process.start_time,
        "workload": process.workload.as_dict() if process.workload is not None else None,
    }


def diagnosis_dict(diagnosis: Diagnosis | None) -> dict[str, str] | None:
    if diagnosis is None:
        return None
    return {"code": diagnosis.code, "summary": diagnosis.summary, "remedy": diagnosis.remedy}


def finding_dict(finding: Finding) -> dict[str, Any]:
    # Called once per socket by scan --json: endpoint_dict and diagnosis_dict are written out
    # inline (same keys, same order) to save two calls each time.
    sock = finding.socket
    local = sock.local
    remote = sock.remote
    owners = finding.owners
    diagnosis = finding.diagnosis
    return {
        "state": _STATE_NAMES[sock.state],
        "family": _FAMILY_VALUES[sock.family],
        "local": {"address": local.address, "port": local.port},
        "remote": {"address": remote.address, "port": remote.port},
        "inode": sock.inode,
        "cookie": sock.cookie,
        "uid": sock.uid,
        "recv_q": sock.recv_q,
        "send_q": sock.send_q,
        "unread_bytes": sock.unread_bytes,
        "eof_read": sock.eof_read,
        "idle_ms": sock.idle_ms,
        "role": _ROLE_VALUES[finding.role],
        "owners": [owner_dict(o) for o in owners] if owners else [],
        "diagnosis": None
        if diagnosis is None
        else {"code": diagnosis.code, "summary": diagnosis.summary, "remedy": diagnosis.remedy},
        **age_dict(finding.age),
    }


def snapshot_dict(snapshot: Snapshot) -> dict[str, Any]:
    return {"sockets": [finding_dict(f) for f in snapshot.findings], **_snapshot_fields(snapshot)}


def _snapshot_fields(snapshot: Snapshot) -> dict[str, Any]:
    """Every key of ``snapshot_dict`` after "sockets", in order (``selection`` only when the scan was
    narrowed to some workloads)."""
    fields: dict[str, Any] = {
        "errors": list(snapshot.errors),
        "backend": snapshot.backend,
        "netns": snapshot.netns,
        "owners_resolved": snapshot.owners_resolved,
        "owners_via": snapshot.owners_via,
        "owners_fallback_reason": snapshot.owners_fallback_reason,
        "taken_at": snapshot.taken_at,
        "state_counts": {state.name: count for state, count in snapshot.state_counts.items()},
        "recorder_used": snapshot.recorder_used,
        "recorder_unavailable": snapshot.recorder_unavailable,
    }
    if snapshot.selection is not None:
        fields["selection"] = snapshot.selection.as_dict()
    return fields


#: id(process) -> (the process, its owner JSON before the fd, after the fd): one scan's owners are a few
#: hundred processes shared by thousands of sockets, so each process's name, cmdline and workload are
#: encoded once per ``snapshot_json`` call, not once per socket. The process is kept so its id cannot
#: be reused while the cache lives.
_OwnerCache = dict[int, tuple[Process, str, str]]
#: text -> its JSON string, for the strings findings repeat: addresses (a server's own address is in
#: every connection it holds), diagnosis codes and remedies (a dozen constants of up to 200
#: characters). A lookup of a string, whose hash the string keeps, is a fraction of escaping it again.
#: Summaries differ per socket and are escaped each time. One per ``snapshot_json`` call.
_StringCache = dict[str, str]

_NO_AGE = ',"close_wait_since":null,"close_wait_age_ms":null,"age_source":null}'
#: The JSON after ``close_wait_age_ms``'s value, by age source (compared by identity: an Enum's hash
#: is computed in Python).
_AGE_SOURCE_TAILS: dict[AgeSource, str] = {source: f',"age_source":"{source.value}"}}' for source in AgeSource}
_LOWER_BOUND = AgeSource.LAST_ACK_LOWER_BOUND
_LOWER_BOUND_TAIL = _AGE_SOURCE_TAILS[_LOWER_BOUND]


def _json_text(value: str, strings: _StringCache) -> str:
    """``_json_str(value)``, remembered in ``strings``."""
    text = strings[value] = _json_str(value)
    return text


def _process_json(process: Process, cache: _OwnerCache) -> tuple[Process, str, str]:
    """The process's owner JSON before and after its fd, encoded once per ``cache``."""
    cached = cache.get(id(process))
    if cached is None or cached[0] is not process:
        workload = process.workload
        cached = cache[id(process)] = (
            process,
            f'{{"pid":{process.pid},"fd":',
            f',"name":{_json_str(process.name)},"cmdline":{_compact(list(process.cmdline))},'
            f'"start_time":{process.start_time},'
            f'"workload":{"null" if workload is None else _compact(workload.as_dict())}}}',
        )
    return cached


def _owners_json(owners: tuple[Owner, ...], cache: _OwnerCache) -> str:
    """``_compact([owner_dict(o) for o in owners])``, each process's part encoded once. (A socket's
    one owner, nearly every socket's, is written by ``_finding_json`` itself.)"""
    parts = []
    for owner in owners:
        _, head, tail = _process_json(owner.process, cache)
        parts.append(f"{head}{owner.fd}{tail}")
    return f"[{','.join(parts)}]"


class SocketJson:
    """Each socket's own fields as JSON, written ahead: while the kernel's dump is still arriving.

    The console's ``scan --json`` waits on the kernel for part of its dump (the kernel walks its
    whole TCP table at the speed it walks it, whatever Python does); ``add`` is what it does with
    that time: the part of each socket's JSON that only the socket decides (``state`` to
    ``idle_ms``, about half the template's work), kept by the socket's identity.
    ``snapshot_json_chunks(snapshot, ahead)`` then uses it for the findings of those very sockets
    and writes the rest as usual. The sockets are kept too, so an id is never reused while this
    lives. The bytes are the same either way (tests/scanperf/test_serialize_fast.py). On the
    5,000-socket fixture the JSON left after the scan went from ~17-22 to ~8-12 ms of CPU
    (``bench/bench_scan_steps.py``), as much as the kernel's walk left the main thread waiting.
    """

    def __init__(self) -> None:
        self.texts: dict[int, str] = {}
        self.strings: _StringCache = {}
        self._kept: list[Socket] = []

    def add(self, sockets: list[Socket]) -> None:
        texts, strings = self.texts, self.strings
        for sock in sockets:
            texts[id(sock)] = _socket_json(sock, strings)
        self._kept.extend(sockets)


#: (state, recv_q, send_q) -> the JSON of the two queues, ``unread_bytes`` and ``eof_read``: both
#: properties are functions of the state and Recv-Q alone (``model.Socket``; tests/scanperf's
#: test_serialize_fast checks sockets alike in these three and in nothing else), and a scan's thousands
#: of sockets have a few such triples. Written from the properties themselves, once per triple.
#: Emptied at ``_QUEUES_MAX`` (``watch --jsonl`` meets new queue lengths forever).
_QUEUES: dict[tuple[TcpState, int, int], str] = {}
_QUEUES_MAX = 4096


def _queues_json(sock: Socket) -> str:
    if len(_QUEUES) >= _QUEUES_MAX:
        _QUEUES.clear()
    text = _QUEUES[(sock.state, sock.recv_q, sock.send_q)] = (
        f'"recv_q":{sock.recv_q},"send_q":{sock.send_q},'
        f'"unread_bytes":{sock.unread_bytes},"eof_read":{"true" if sock.eof_read else "false"},'
    )
    return text


def _socket_json(sock: Socket, strings: _StringCache) -> str:
    """The start of a finding's JSON: the socket's own fields, through ``"idle_ms":...,`` (a comma
    ends it). Strings go through json's own C escaper (ensure_ascii, as json.dumps does), the
    repeated ones once per ``strings``; the enum names and values are plain ASCII words; an ``int``
    field formats as json writes it (``str(int)``; the model types them ``int``, never bool; no
    format spec, which costs a call to ``int.__format__``)."""
    local = sock.local
    remote = sock.remote
    cookie = sock.cookie
    idle_ms = sock.idle_ms
    local_address = local.address
    remote_address = remote.address
    return (
        f'{{"state":"{_STATE_NAMES[sock.state]}","family":"{_FAMILY_VALUES[sock.family]}",'
        f'"local":{{"address":{strings.get(local_address) or _json_text(local_address, strings)},'
        f'"port":{local.port}}},'
        f'"remote":{{"address":{strings.get(remote_address) or _json_text(remote_address, strings)},'
        f'"port":{remote.port}}},'
        f'"inode":{sock.inode},"cookie":{"null" if cookie is None else f"{cookie}"},"uid":{sock.uid},'
        f"{_QUEUES.get((sock.state, sock.recv_q, sock.send_q)) or _queues_json(sock)}"
        f'"idle_ms":{"null" if idle_ms is None else f"{idle_ms}"},'
    )


def _finding_json(finding: Finding, cache: _OwnerCache, strings: _StringCache, ahead: dict[int, str]) -> str:
    """``json.dumps(finding_dict(finding), separators=(",", ":"))``, written with two templates:
    the socket's (``_socket_json``, or its text from ``ahead``) and this one, for what the scan
    added (role, owners, diagnosis, age), written out in one function, ``utc_text`` included: this
    runs once per socket.
    """
    sock = finding.socket
    owners = finding.owners
    diagnosis = finding.diagnosis
    age = finding.age
    if age is None:
        ages = _NO_AGE
    else:
        total_ms = round(age.since * 1000)  # utc_text(age.since), inline
        whole = total_ms // 1000
        source = age.source
        ages = (
            f',"close_wait_since":"{_UTC_SECONDS.get(whole) or _utc_second(whole)}{_MILLIS[total_ms - whole * 1000]}"'
            f',"close_wait_age_ms":{age.ms}'
            f"{_LOWER_BOUND_TAIL if source is _LOWER_BOUND else _AGE_SOURCE_TAILS[source]}"
        )
    diagnosed = (
        "null"
        if diagnosis is None
        else f'{{"code":{strings.get(diagnosis.code) or _json_text(diagnosis.code, strings)},'
        f'"summary":{_json_str(diagnosis.summary)},'
        f'"remedy":{strings.get(diagnosis.remedy) or _json_text(diagnosis.remedy, strings)}}}'
    )
    if len(owners) == 1:  # nearly every socket: _owners_json's first case, without its two calls
        owner = owners[0]
        process = owner.process
        known = cache.get(id(process))
        if known is None or known[0] is not process:
            known = _process_json(process, cache)
        return (  # one f-string: each + of the whole would copy it once more
            f'{ahead.get(id(sock)) or _socket_json(sock, strings)}"role":"{_ROLE_VALUES[finding.role]}",'
            f'"owners":[{known[1]}{owner.fd}{known[2]}],"diagnosis":{diagnosed}{ages}'
        )
    return (
        f'{ahead.get(id(sock)) or _socket_json(sock, strings)}"role":"{_ROLE_VALUES[finding.role]}",'
        f'"owners":{_owners_json(owners, cache) if owners else "[]"},"diagnosis":{diagnosed}{ages}'
    )


def _compact(value: Any) -> str:
    """``json.dumps(value, separators=(",", ":"))`` of a dict or list, by the very encoder it uses.

    For these options json.dumps runs the C encoder of ``_json`` (``json.encoder.c_make_encoder``):
    made here from ``_json`` directly, because ``import json`` also imports its decoder and scanner,
    ~1 ms of every ``scan --json`` that nothing here uses. The arguments are JSONEncoder's for
    ``separators=(",", ":")`` and every other option at its default; tests/scanperf/test_serialize_fast
    compares the output with json.dumps.
    """
    encode = _make_encoder({}, _not_serializable, _json_str, None, ":", ",", False, False, True)
    return "".join(encode(value, 0))


def _not_serializable(value: object) -> object:
    """``JSONEncoder.default``: what json.dumps raises for a value it cannot write."""
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")


def snapshot_json(snapshot: Snapshot) -> str:
    """``snapshot_dict`` as one compact JSON line (what ``scan --json`` prints), newline included.

    The bytes of ``json.dumps(snapshot_dict(snapshot), separators=(",", ":"))``: the findings are
    written by ``_finding_json``, everything after them by json.dumps' C encoder (``_compact``;
    never json.dump, whose pure-Python encoder is ~10x slower).
    """
    return "".join(snapshot_json_chunks(snapshot))


#: Findings per chunk of ``snapshot_json_chunks``: ~100 KiB of text, below glibc's mmap threshold.
_CHUNK_FINDINGS = 200


def snapshot_json_chunks(snapshot: Snapshot, ahead: SocketJson | None = None) -> Iterator[str]:
    """``snapshot_json(snapshot)`` in pieces of ~100 KiB, for writing as they are made.

    The console writes these instead of one string: 5,000 sockets make 2.5 MB of JSON, and each
    copy of that much (the joined text, its UTF-8 encoding) is fresh memory from the kernel,
    a page fault per 4 KiB; chunks reuse the same memory. ``ahead`` holds the JSON of some of the
    findings' sockets, written earlier (``SocketJson``): the same bytes, sooner.
    """
    findings = snapshot.findings
    cache: _OwnerCache = {}
    strings: _StringCache = ahead.strings if ahead is not None else {}
    texts = ahead.texts if ahead is not None else {}
    yield '{"sockets":['
    for start in range(0, len(findings), _CHUNK_FINDINGS):
        text = ",".join([_finding_json(f, cache, strings, texts) for f in findings[start : start + _CHUNK_FINDINGS]])
        yield f",{text}" if start else text
    yield f"],{_compact(_snapshot_fields(snapshot))[1:]}\n"


# -- reap --json (docs/reap.md) ------------------------------------------------------------------------


def _reap_socket_dict(sock: Socket) -> dict[str, Any]:
    return {
        "state": sock.state.name,
        "local": endpoint_dict(sock.local),
        "remote": endpoint_dict(sock.remote),
        "inode": sock.inode,
        "cookie": sock.cookie,
        "recv_q": sock.recv_q,
        "idle_ms": sock.idle_ms,
    }


def _target_dict(target: reap.ReapTarget) -> dict[str, Any]:
    return {
        **_reap_socket_dict(target.socket),
        "pid": target.process.pid,
        "start_time": target.process.start_time,
        "name": target.process.name,
        "workload": target.process.workload.as_dict() if target.process.workload is not None else None,
        "fd": target.fd,
        "fds": list(target.fds),
        "other_holders": [owner_dict(o) for o in target.other_holders],
        "netns": target.netns,
    }


def _excluded_dict(excluded: reap.Excluded) -> dict[str, Any]:
    return {
        **_reap_socket_dict(excluded.socket),
        "owners": [owner_dict(o) for o in excluded.owners],
        "reason": excluded.reason,
        "netns": excluded.netns,
    }


def reap_plan_dict(plan: reap.ReapPlan) -> dict[str, Any]:
    """``closewait reap --json`` without ``--yes``: the plan."""
    return {
        "method": plan.method.value,
        "criteria": plan.criteria.describe(),
        "taken_at": plan.taken_at,
        "targets": [_target_dict(t) for t in plan.targets],
        "excluded": [_excluded_dict(e) for e in plan.excluded],
        "errors": list(plan.errors),
        "namespaces": list(plan.namespaces),
    }


def reap_result_dict(result: reap.ReapResult) -> dict[str, Any]:
    """The plan's JSON plus one entry per outcome and the counts."""
    return {
        **reap_plan_dict(result.plan),
        "outcomes": [
            {**_target_dict(o.target), "outcome": o.outcome.value, "code": o.code, "reason": o.reason}
            for o in result.outcomes
        ],
        "done": len(result.done),
        "skipped": len(result.skipped),
        "failed": len(result.failed),
    }


# -- watch --events --json (docs/json.md) ----------------------------------------------------------


def event_dict(event: Event) -> dict[str, Any]:
    """One transition into or out of CLOSE_WAIT, as ``watch --events --json`` prints it."""
    t = event.transition
    return {
        "time": utc_text(event.at),
        "event": "enter" if t.entered else "leave",
        "old_state": t.old_state.name,
        "new_state": t.new_state.name,
        "local": endpoint_dict(t.local),
        "remote": endpoint_dict(t.remote),
        "cookie": t.cookie,
        "reason": t.reason.name.lower() if t.reason is not None else None,
        "dwell_ms": t.dwell_ns / 1e6 if t.dwell_ns is not None else None,
        "pid": t.tgid,
        "comm": t.comm,
        "cgroup_id": t.cgroup_id,
    }
