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
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.util import wait_for

__all__ = ["AS_NOBODY", "Nobody", "wait_for"]

Spawn = Callable[..., subprocess.Popen[str]]


@dataclass(frozen=True)
class _TempDirs:
    """The session's own temp dir, and the system's as it was when the session started."""

    private: str
    system: str
    system_before: frozenset[str]
    saved_tmpdir: str | None


_TEMP_DIRS = pytest.StashKey[_TempDirs]()


def _names(directory: str) -> frozenset[str]:
    # pytest's own base for tmp_path (pytest-of-USER) is kept on purpose: pytest keeps the last
    # three runs' directories there so a failure can be looked at, and removes older ones itself.
    own = f"pytest-of-{pwd.getpwuid(os.getuid()).pw_name}"
    return frozenset(name for name in os.listdir(directory) if name != own)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Give the session a temp dir of its own: ``tempfile`` here and ``TMPDIR`` for every child.

    What a test leaves there is this run's alone (other programs on the machine, other test runs
    included, write to the system's temp dir), so the check at the end can fail the run without
    false alarms. pytest's tmp_path base stays in the system's temp dir.
    """
    system = tempfile.gettempdir()
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", system)
    private = tempfile.mkdtemp(prefix="closewait-tests-")
    os.chmod(private, 0o1777)  # like /tmp: tests that switch to user nobody write there too
    session.config.stash[_TEMP_DIRS] = _TempDirs(
        private, system, _names(system) - {os.path.basename(private)}, os.environ.get("TMPDIR")
    )
    os.environ["TMPDIR"] = private
    tempfile.tempdir = private


def _report(session: pytest.Session, message: str, *, red: bool) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        print(message, file=sys.stderr)
        return
    reporter.write("\n")  # after pytest's progress line, which has no newline yet
    reporter.write_line(message, red=red, yellow=not red, bold=red)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if the tests left anything in the session's temp dir (files, directories,
    sockets), then remove it; name what appeared in the system's temp dir meanwhile."""
    dirs = session.config.stash.get(_TEMP_DIRS, None)
    if dirs is None:
        return
    left = sorted(os.listdir(dirs.private))
    shutil.rmtree(dirs.private, ignore_errors=True)
    tempfile.tempdir = None
    if dirs.saved_tmpdir is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = dirs.saved_tmpdir
    if left:
        _report(session, f"the tests left {len(left)} entries in their temp dir: {', '.join(left[:20])}", red=True)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    # A child started with an environment of its own (no TMPDIR) or a hard-coded /tmp path writes
    # here; so does every other program on the machine, which is why this only warns.
    appeared = sorted(_names(dirs.system) - dirs.system_before - {os.path.basename(dirs.private)})
    if appeared:
        shown = ", ".join(appeared[:20])
        _report(session, f"new in {dirs.system} during the run (maybe not from these tests): {shown}", red=False)


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


@contextlib.contextmanager
def _network_namespace() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"cwtest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def netns_name() -> Iterator[str]:
    """A fresh network namespace (``ip netns add``) with loopback up, deleted afterwards: the one
    fixture every test that needs a namespace of its own uses."""
    with _network_namespace() as name:
        yield name


@pytest.fixture
def other_netns_name() -> Iterator[str]:
    """A second fresh namespace, for tests that show one namespace's sockets are left alone."""
    with _network_namespace() as name:
        yield name
