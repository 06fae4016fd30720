"""``closewait lab`` from the command line: exit codes, bad input, --no-capture, a real failure."""

from __future__ import annotations

import json
import resource
import subprocess
from pathlib import Path

import pytest

from tests.lab.kit import CLOSEWAIT, env


def _run(*args: str, limit_fds: int | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if limit_fds is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_fds, limit_fds))

    return subprocess.run(
        [*CLOSEWAIT, "lab", *args],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
        check=False,
        preexec_fn=limit if limit_fds is not None else None,
    )


def _one_line_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0]
    assert proc.stdout == ""


def test_unknown_part_is_a_usage_error() -> None:
    _one_line_error(_run("teardwon"), 2, "teardwon")


def test_trials_must_be_positive() -> None:
    _one_line_error(_run("teardown", "--trials", "0"), 2, "--trials")


def test_html_into_a_missing_directory_fails_before_running(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "report.html"
    _one_line_error(_run("teardown", "--html", str(target)), 2, "does not exist")
    assert not target.exists()


def test_html_onto_a_directory_is_refused(tmp_path: Path) -> None:
    proc = _run("teardown", "--html", str(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_no_capture_uses_states_and_errno_and_exits_0(tmp_path: Path) -> None:
    html = tmp_path / "r.html"
    proc = _run("teardown", "--no-capture", "--json", "--html", str(html))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["packets_captured"] is False
    assert "--no-capture" in report["capture_reason"]
    assert {e["measurements"]["evidence"] for e in report["experiments"]} == {"states-and-errno"}
    assert all(e["packets"] == [] for e in report["experiments"])
    assert all(e["status"] == "ok" for e in report["experiments"])
    assert html.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert f"wrote {html}" in proc.stderr


def test_terminal_report_of_a_teardown_run() -> None:
    proc = _run("teardown")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for exp_id in ("shutdown-rd", "close-send-buffer", "linger-zero", "closewait-close-unread"):
        assert exp_id in out
    assert "does-not-hold" in out
    assert "holds-with-caveat" in out
    assert "ladder diagrams" in out
    assert "SYN,ACK" in out
    assert "|<" in out  # an arrow from the server
    assert ">|" in out  # an arrow from the client


def test_a_failing_experiment_exits_1_with_a_reason_and_no_traceback() -> None:
    """Too few descriptors: sockets cannot be created, some experiments fail for real."""
    proc = _run("teardown", "--no-capture", "--json", limit_fds=8)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    errors = [e for e in report["experiments"] if e["status"] == "error"]
    assert errors
    assert all("Too many open files" in e["reason"] for e in errors)
    assert report["ok"] is False


def test_skipped_is_not_an_error() -> None:
    """A part that cannot run is skipped (exit 0): the JSON carries status and reason."""
    from closewait.lab.model import Status
    from closewait.lab.report import LabReport, placeholders

    skipped = placeholders("reproduce", Status.SKIPPED, "not built yet")
    report = LabReport(experiments=tuple(skipped), parts=("reproduce",), duration_s=0.0, started_at=0.0)
    assert report.ok
    assert [e.id for e in skipped] == ["reproduce"]
    assert skipped[0].reason == "not built yet"


def test_a_part_that_cannot_run_is_an_error_with_its_reason() -> None:
    """A part whose module fails (here: cannot even be imported) is reported as an error with the
    reason, not a traceback; and once the run's context is closing, no part can start another process."""
    from closewait.lab import _run_part, _RunContext

    ctx = _RunContext()
    try:
        results = _run_part("no_such_part", ctx)
    finally:
        ctx.close()
    assert [(e.id, e.status.value, e.reason) for e in results] == [
        ("no_such_part", "error", "ModuleNotFoundError: No module named 'closewait.lab.no_such_part'")
    ]
    with pytest.raises(RuntimeError, match="no new child"):
        ctx.spawn(["true"])
