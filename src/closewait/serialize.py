"""The model as plain JSON-ready dicts: the names programs outside closewait rely on.

Used by ``scan --json``, ``watch --jsonl`` and the pytest plugin's report; the names are
documented in docs/json.md and only ever added to, never renamed.
"""

from __future__ import annotations

import json
from typing import Any

from closewait.model import Diagnosis, Endpoint, Finding, Owner, Snapshot


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
    sock = finding.socket
    return {
        "state": sock.state.name,
        "family": sock.family.value,
        "local": endpoint_dict(sock.local),
        "remote": endpoint_dict(sock.remote),
        "inode": sock.inode,
        "cookie": sock.cookie,
        "uid": sock.uid,
        "recv_q": sock.recv_q,
        "send_q": sock.send_q,
        "unread_bytes": sock.unread_bytes,
        "eof_read": sock.eof_read,
        "idle_ms": sock.idle_ms,
        "role": finding.role.value,
        "owners": [owner_dict(o) for o in finding.owners],
        "diagnosis": diagnosis_dict(finding.diagnosis),
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
    the pure-Python encoder, ~10x slower on thousands of sockets.
    """
    return json.dumps(snapshot_dict(snapshot), separators=(",", ":")) + "\n"
