"""Fixtures every test area shares: child processes ended by pid, and bounded waiting."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.util import wait_for

__all__ = ["AS_NOBODY", "Nobody", "wait_for"]

Spawn = Callable[..., subprocess.Popen[str]]

#: The names in the temp dir when the session started (see pytest_sessionfinish).
_TMP_BEFORE = pytest.StashKey[frozenset[str]]()


def _tmp_names() -> frozenset[str]:
    # pytest's own base for tmp_path (pytest-of-USER) is kept on purpose: pytest keeps the last
    # three runs' directories there so a failure can be looked at, and removes older ones itself.
    own = f"pytest-of-{pwd.getpwuid(os.getuid()).pw_name}"
    return frozenset(name for name in os.listdir(tempfile.gettempdir()) if name != own)


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_TMP_BEFORE] = _tmp_names()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if the tests left anything new in the temp dir (files, directories, sockets).

    Another program writing to the same temp dir during the run shows up here too: the message
    names what appeared, so such a run can be told apart.
    """
    before = session.config.stash.get(_TMP_BEFORE, None)
    if before is None:
        return
    left = sorted(_tmp_names() - before)
    if not left:
        return
    where = tempfile.gettempdir()
    message = f"the tests left {len(left)} new entries in {where}: {', '.join(left[:20])}"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")  # after pytest's progress line, which has no newline yet
        reporter.write_line(message, red=True, bold=True)
    else:
        print(message, file=sys.stderr)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start child processes that are always ended (SIGKILL by pid, then reaped) after the test.

    ``spawn(code)`` runs a Python snippet (dedented) with this interpreter; ``spawn(argv=[...])``
    runs a command. The child's stdout is a pipe in text mode, so a child can report readiness
    and its bound port with one ``print(..., flush=True)`` that the test reads with
    ``proc.stdout.readline()``.
    """
    children: list[subprocess.Popen[str]] = []

    def _spawn(code: str | None = None, *, argv: list[str] | None = None, **kwargs: Any) -> subprocess.Popen[str]:
        if (code is None) == (argv is None):
            raise ValueError("give code or argv")
        command = [sys.executable, "-c", textwrap.dedent(code)] if code is not None else argv
        assert command is not None
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("text", True)
        proc = subprocess.Popen(command, **kwargs)
        children.append(proc)
        return proc

    yield _spawn
    for proc in children:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


#: Run a command as user nobody (needs root): no supplementary groups, nothing inherited.
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
#: What the unprivileged runs import: the CLI and the modules behind scan and lab.
_NOBODY_IMPORTS = (
    "import closewait.cli.scan, closewait.cli.render.scan, closewait.cli.lab, closewait.cli.render.lab, "
    "closewait.lab.teardown, click, rich.console"
)


@dataclass(frozen=True)
class Nobody:
    """How to run this checkout's Python code as user nobody: ``[*argv, "-m", "closewait", ...]``."""

    argv: list[str]
    env: dict[str, str]


def _importable_as_nobody(python: str, path: str) -> bool:
    result = subprocess.run(
        [*AS_NOBODY, python, "-c", _NOBODY_IMPORTS],
        env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin", "HOME": "/"},
        capture_output=True,
        check=False,
        cwd="/",
        timeout=60,
    )
    return result.returncode == 0


@pytest.fixture(scope="session")
def nobody() -> Iterator[Nobody]:
    """An interpreter and PYTHONPATH with which user nobody can run this checkout.

    The venv's interpreter may sit under /root (mode 0700) and pytest's tmp under a 0700 directory,
    so try this interpreter and the system python3 with PYTHONPATH at the packages, then a
    world-readable copy of the packages in /tmp (removed afterwards).
    """
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
        chosen = next(((py, direct) for py in pythons if _importable_as_nobody(py, direct)), None)
        if chosen is None:
            copy_dir = tempfile.mkdtemp(prefix="closewait-nobody-")
            os.chmod(copy_dir, 0o755)
            for package in packages:
                shutil.copytree(package, Path(copy_dir) / package.name, ignore=shutil.ignore_patterns("__pycache__"))
            subprocess.run(["chmod", "-R", "a+rX", copy_dir], check=True)
            chosen = next(((py, copy_dir) for py in pythons if _importable_as_nobody(py, copy_dir)), None)
        if chosen is None:
            pytest.skip("no interpreter that user nobody can run with closewait importable")
        python, path = chosen
        yield Nobody(
            [*AS_NOBODY, python],
            {"PYTHONPATH": path, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/", "COLUMNS": "200"},
        )
    finally:
        if copy_dir is not None:
            shutil.rmtree(copy_dir, ignore_errors=True)
