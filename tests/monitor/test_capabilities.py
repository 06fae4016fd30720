"""The capabilities deploy/ asks for, checked against the kernel: the exporter's collector runs as root
with every capability dropped except the ones under test (setpriv), next to a CLOSE_WAIT leaker that
runs as another user (nobody) and one inside a network namespace the test creates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import Spawn
from tests.monitor.leakers import LEAKER, close_wait_count
from tests.util import wait_for

SETPRIV = shutil.which("setpriv")
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody, unlike a venv under /root

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root, setpriv (util-linux) and /usr/bin/python3",
)

# Scrape the collector once and print what the test needs, as JSON.
SCRAPE = """
import json, sys
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from closewait.exporter import CloseWaitCollector, build_registry
netns = sys.argv[1] or None
registry = build_registry(CloseWaitCollector(min_interval=0, netns=netns, pid_label=True))
out = {"rows": [], "errors": {}, "success": None}
for family in text_string_to_metric_families(generate_latest(registry).decode()):
    for s in family.samples:
        if s.name == "closewait_close_wait_sockets":
            out["rows"].append([s.labels["pid"], s.labels["process"], s.value, s.labels.get("role")])
        elif s.name == "closewait_scan_errors_total":
            out["errors"][s.labels["kind"]] = s.value
        elif s.name == "closewait_scan_success":
            out["success"] = s.value
print(json.dumps(out))
"""


def _scrape_with(caps: list[str], netns: str = "") -> dict[str, object]:
    assert SETPRIV is not None
    bounding = ",".join(["-all", *(f"+{c.lower().removeprefix('cap_')}" for c in caps)])
    result = subprocess.run(
        [SETPRIV, f"--bounding-set={bounding}", "--inh-caps=-all", sys.executable, "-c", SCRAPE, netns],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    data["stderr"] = result.stderr
    return data


def _rows_for(data: dict[str, object], port_owner: str) -> list[list[object]]:
    rows = data["rows"]
    assert isinstance(rows, list)
    return [r for r in rows if r[0] == port_owner]


def test_owners_of_other_users_need_sys_ptrace_and_dac_read_search(spawn: Spawn) -> None:
    other = spawn(
        argv=[
            SETPRIV or "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            SYSTEM_PYTHON,
            "-c",
            LEAKER,
            "2",
            "0",
            "0",
        ]
    )
    assert other.stdout is not None
    other.stdout.readline()
    wait_for(lambda: close_wait_count(other.pid) == 2, timeout=10)

    # No capability: the socket tables are still read (sock_diag needs none), owners are not.
    bare = _scrape_with([])
    assert bare["success"] == 1
    assert _rows_for(bare, str(other.pid)) == []
    errors = bare["errors"]
    assert isinstance(errors, dict)
    assert errors["owners"] == 1
    # Without CAP_BPF the BPF owner lookup cannot run: counted, and why is logged.
    assert errors["owners_bpf"] == 1
    assert "owners found by the /proc walk, not the BPF iterator: " in str(bare["stderr"])
    assert any(r[1] == "unowned" for r in bare["rows"])  # type: ignore[attr-defined]

    # SYS_PTRACE alone is not enough for another user's 0500 fd directory...
    ptrace_only = _scrape_with(["CAP_SYS_PTRACE"])
    assert _rows_for(ptrace_only, str(other.pid)) == []
    # ...DAC_READ_SEARCH alone lists it but may not read the links...
    dac_only = _scrape_with(["CAP_DAC_READ_SEARCH"])
    assert _rows_for(dac_only, str(other.pid)) == []
    # ...both together find the owner: what the systemd unit and the DaemonSet grant.
    both = _scrape_with(["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"])
    assert [r[2:] for r in _rows_for(both, str(other.pid))] == [[2.0, "server"]]
    # CAP_BPF + CAP_PERFMON alone find it too, without reading any /proc/PID/fd: the BPF iterator
    # (the systemd unit grants both; CAP_SYS_ADMIN, which the DaemonSet has, implies them).
    bpf_only = _scrape_with(["CAP_BPF", "CAP_PERFMON"])
    assert [r[2:] for r in _rows_for(bpf_only, str(other.pid))] == [[2.0, "server"]]
    bpf_errors = bpf_only["errors"]
    assert isinstance(bpf_errors, dict)
    assert bpf_errors["owners"] == 0
    assert bpf_errors["owners_bpf"] == 0
    admin_only = _scrape_with(["CAP_SYS_ADMIN"])
    assert [r[2:] for r in _rows_for(admin_only, str(other.pid))] == [[2.0, "server"]]


def test_another_namespace_needs_sys_admin(spawn: Spawn, netns_name: str) -> None:
    child = spawn(argv=["ip", "netns", "exec", netns_name, sys.executable, "-c", LEAKER, "3", "0", "0"])
    assert child.stdout is not None
    child.stdout.readline()
    ns = f"/proc/{child.pid}/ns/net"
    without = _scrape_with(["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"], ns)
    # The scrape still answers: the failure is counted and logged, not raised.
    assert without["success"] == 0
    assert without["errors"] == {"scan": 1, "netns": 0, "owners": 0, "owners_bpf": 0, "kubernetes_api": 0}
    assert "entering a network namespace needs root (CAP_SYS_ADMIN)" in str(without["stderr"])
    granted = _scrape_with(["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_SYS_ADMIN"], ns)
    assert [r[2:] for r in _rows_for(granted, str(child.pid))] == [[3.0, "server"]]
