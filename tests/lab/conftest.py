"""Fixtures for the lab's tests: one real teardown run in-process, one real full run of the CLI."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from closewait import lab
from closewait.lab.report import LabReport
from tests.lab.kit import CLOSEWAIT, env


@pytest.fixture(scope="session")
def teardown_report() -> LabReport:
    """The teardown part, run once in this process (about a second)."""
    return lab.run(["teardown"])


@dataclass(frozen=True)
class CliRun:
    returncode: int
    report: dict[str, Any]
    stderr: str
    html: Path
    seconds: float


@pytest.fixture(scope="session")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    """``closewait lab --json --html FILE``: every part, as a user runs it."""
    html = tmp_path_factory.mktemp("lab") / "report.html"
    start = time.monotonic()
    proc = subprocess.run(
        [*CLOSEWAIT, "lab", "--json", "--html", str(html)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=240,
        check=False,
    )
    seconds = time.monotonic() - start
    report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return CliRun(proc.returncode, report, proc.stderr, html, seconds)
