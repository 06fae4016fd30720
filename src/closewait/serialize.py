"""The model as plain JSON-ready dicts: the names programs outside closewait rely on.

Used by ``scan --json``, ``watch --jsonl`` and the pytest plugin's report; the names are
documented in docs/json.md and only ever added to, never renamed.
"""

from __future__ import annotations

import json
from typing import Any

from closewait.model import Diagnosis, Endpoint, Family, Finding, Owner, Role, Snapshot, TcpState

# An enum's .name and .value are Python-level descriptors, a dict lookup is one C call: the names
# below are read once per socket.
_STATE_NAMES: dict[TcpState, str] = {state: state.name for state in TcpState}
_FAMILY_VALUES: dict[Family, str] = {family: family.value for family in Family}
_ROLE_VALUES: dict[Role, str] = {role: role.value for role in Role}


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
    }


def snapshot_dict(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "sockets": [finding_dict(f) for f in snapshot.findings],
        "errors": list(snapshot.errors),
        "backend": snapshot.backend,
        "netns": snapshot.netns,
        "owners_resolved": snapshot.owners_resolved,
        "owners_via": snapshot.owners_via,
        "taken_at": snapshot.taken_at,
        "state_counts": {state.name: count for state, count in snapshot.state_counts.items()},
    }


def snapshot_json(snapshot: Snapshot) -> str:
    """``snapshot_dict`` as one compact JSON line (what ``scan --json`` prints), newline included.

    json.dumps, not json.dump: only the one-shot encoder is the C one; json.dump to a stream runs
    the pure-Python encoder, ~10x slower on thousands of sockets. ``check_circular=False``: the dict
    was built just above and holds no cycle, and tracking every container costs ~15% of the dump.
    """
    return json.dumps(snapshot_dict(snapshot), separators=(",", ":"), check_circular=False) + "\n"
