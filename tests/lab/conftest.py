"""Fixtures for the lab's tests: one real teardown run in-process, one real full run of the CLI."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
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


AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
_IMPORTS = "import closewait.cli.lab, closewait.cli.render.lab, closewait.lab.teardown, click, rich.console"


@dataclass(frozen=True)
class Nobody:
    """How to run this checkout's Python code as user nobody (argv prefix and environment)."""

    argv: list[str]
    env: dict[str, str]


def _importable(python: str, path: str) -> bool:
    result = subprocess.run(
        [*AS_NOBODY, python, "-c", _IMPORTS],
        env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin", "HOME": "/"},
        capture_output=True,
        check=False,
        cwd="/",
        timeout=60,
    )
    return result.returncode == 0


@pytest.fixture(scope="session")
def nobody(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nobody]:
    """The venv's interpreter may sit under /root (0700) and pytest's tmp under a 0700 directory,
    so try this interpreter and the system python3 with PYTHONPATH at the packages, then a
    world-readable copy of the packages in /tmp (removed afterwards)."""
    import os
    import pwd
    import shutil
    import sys
    import tempfile

    import click
    import rich

    import closewait

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("switching to user nobody needs root and setpriv")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    packages = [Path(closewait.__file__).parent, Path(click.__file__).parent, Path(rich.__file__).parent]
    for name in ("markdown_it", "mdurl", "pygments"):
        module = __import__(name)
        assert module.__file__ is not None
        packages.append(Path(module.__file__).parent)
    pythons = [p for p in (sys.executable, "/usr/bin/python3") if os.path.exists(p)]
    direct = os.pathsep.join(sorted({str(p.parent) for p in packages}))
    copy_dir: str | None = None
    try:
        chosen = next(((py, direct) for py in pythons if _importable(py, direct)), None)
        if chosen is None:
            copy_dir = tempfile.mkdtemp(prefix="closewait-lab-nobody-")
            os.chmod(copy_dir, 0o755)
            for package in packages:
                shutil.copytree(package, Path(copy_dir) / package.name, ignore=shutil.ignore_patterns("__pycache__"))
            subprocess.run(["chmod", "-R", "a+rX", copy_dir], check=True)
            chosen = next(((py, copy_dir) for py in pythons if _importable(py, copy_dir)), None)
        if chosen is None:
            pytest.skip("no interpreter that user nobody can run with closewait importable")
        python, path = chosen
        yield Nobody(
            [*AS_NOBODY, python],
            {"PYTHONPATH": path, "PATH": "/usr/bin:/bin", "HOME": "/", "COLUMNS": "200"},
        )
    finally:
        if copy_dir is not None:
            shutil.rmtree(copy_dir, ignore_errors=True)
