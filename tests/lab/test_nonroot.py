"""``closewait lab teardown`` as user nobody: no packet capture, a line saying so, and the same
verdicts from states and errno as root's run with packets."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from closewait.lab.report import LabReport
from closewait.sources.capture import NO_ROOT_REASON
from tests.conftest import Nobody

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to user nobody needs root")

LAB = ["-c", "import sys; from closewait.cli import main; sys.exit(main())", "lab", "teardown"]


def _as_nobody(nobody: Nobody, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*nobody.argv, *LAB, *args],
        env=nobody.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd="/",
    )


def test_teardown_as_nobody_reports_evidence_from_states_and_errno(nobody: Nobody, teardown_report: LabReport) -> None:
    proc = _as_nobody(nobody, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["packets_captured"] is False
    assert report["capture_reason"] == NO_ROOT_REASON
    for exp in report["experiments"]:
        assert exp["status"] == "ok", exp
        assert exp["packets"] == []
        assert exp["measurements"]["evidence"] == "states-and-errno"
        assert NO_ROOT_REASON in exp["notes"]
    # Same kernel, same behaviour: without packets the verdicts and the flags agree with root's run.
    root = {e.id: e for e in teardown_report.experiments}
    for exp in report["experiments"]:
        theirs = root[exp["id"]]
        assert exp["verdict"] == (theirs.verdict.value if theirs.verdict else None), exp["id"]
        for key in ("fin_sent", "rst_sent", "peer_saw"):
            assert exp["measurements"][key] == theirs.measurements[key], (exp["id"], key)


def test_terminal_says_packets_were_not_captured(nobody: Nobody) -> None:
    proc = _as_nobody(nobody)
    assert proc.returncode == 0, proc.stderr
    assert "packets not captured: needs root (CAP_NET_RAW)" in proc.stdout
    assert "evidence is TCP states and errno only" in proc.stdout
    assert "ladder diagrams" not in proc.stdout
    assert "Traceback" not in proc.stderr
