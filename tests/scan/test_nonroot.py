"""``closewait scan`` as an unprivileged user against a root-owned leak.

sock_diag answers anyone, so the socket is still listed; /proc/PID/fd of root's processes is not
readable, so the owner is unknown: one warning on stderr says so and how to fix it, the exit code
is 0. Naming a root process with --pid, or entering a namespace, is refused (exit 2).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import rich

import closewait
from tests.conftest import Spawn
from tests.scan.kit import LEAKING_SERVER, close_wait_of, python_argv, run_cli

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed"),
]

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
IMPORT_CHECK = "import closewait.cli.scan, closewait.cli.render.scan, click, rich.console"


def _works_as_nobody(python: str, pythonpath: str) -> bool:
    result = subprocess.run(
        [*AS_NOBODY, python, "-c", IMPORT_CHECK],
        env={"PYTHONPATH": pythonpath, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        check=False,
        cwd="/",
    )
    return result.returncode == 0


@pytest.fixture(scope="module")
def nobody() -> Iterator[tuple[list[str], dict[str, str]]]:
    """(argv prefix, env) that run this checkout's closewait as user nobody.

    The venv's interpreter may live under /root (mode 0700), and pytest's tmp_path under
    /tmp/pytest-of-root (0700): nobody can reach neither. So try this interpreter and the system
    python3 with PYTHONPATH at the package and its dependencies; if nobody cannot read those either,
    copy them into a world-readable temporary directory.
    """
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    packages = [Path(closewait.__file__).parent, Path(click.__file__).parent, Path(rich.__file__).parent]
    for name in ("markdown_it", "mdurl", "pygments"):
        module = __import__(name)
        packages.append(Path(module.__file__).parent)
    pythons = [p for p in (sys.executable, "/usr/bin/python3") if os.path.exists(p)]
    direct = os.pathsep.join(sorted({str(p.parent) for p in packages}))
    copy_dir = None
    try:
        chosen = next(((py, direct) for py in pythons if _works_as_nobody(py, direct)), None)
        if chosen is None:
            copy_dir = tempfile.mkdtemp(prefix="closewait-nobody-")
            os.chmod(copy_dir, 0o755)
            for package in packages:
                shutil.copytree(package, Path(copy_dir) / package.name, ignore=shutil.ignore_patterns("__pycache__"))
            subprocess.run(["chmod", "-R", "a+rX", copy_dir], check=True)
            chosen = next(((py, copy_dir) for py in pythons if _works_as_nobody(py, copy_dir)), None)
        if chosen is None:
            pytest.skip("no Python interpreter that user nobody can run with closewait importable")
        python, pythonpath = chosen
        env = {"PYTHONPATH": pythonpath, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "COLUMNS": "200"}
        yield [*AS_NOBODY, python, "-m", "closewait"], env
    finally:
        if copy_dir is not None:
            shutil.rmtree(copy_dir, ignore_errors=True)


def _root_leak(spawn: Spawn) -> tuple[int, int]:
    leaker = spawn(argv=python_argv(LEAKING_SERVER, "127.0.0.1", "keep"))
    assert leaker.stdout is not None
    port = int(leaker.stdout.readline())
    with socket.create_connection(("127.0.0.1", port)):
        pass
    assert leaker.stdout.readline().strip() == "accepted"
    close_wait_of(leaker.pid, port)
    return leaker.pid, port


def test_nobody_sees_the_socket_but_not_its_owner(spawn: Spawn, nobody: tuple[list[str], dict[str, str]]) -> None:
    argv0, env = nobody
    pid, port = _root_leak(spawn)

    table = run_cli("scan", "--port", str(port), argv0=argv0, env=env)
    assert table.returncode == 0, table.stderr
    assert "Traceback" not in table.stderr
    (warning,) = table.stderr.splitlines()
    assert warning.startswith("warning: owner unknown: permission denied, run as root")
    assert "owner unknown" not in table.stdout.replace("owner unknown (permission denied, run as root)", "")
    assert table.stdout.startswith("1 socket in CLOSE_WAIT, no owning process found")
    assert "owner unknown (permission denied, run as root)" in table.stdout
    assert f"127.0.0.1:{port} " in table.stdout
    assert f"pid {pid}" not in table.stdout

    document = run_cli("scan", "--port", str(port), "--json", argv0=argv0, env=env)
    assert document.returncode == 0, document.stderr
    parsed = json.loads(document.stdout)
    (sock,) = parsed["sockets"]
    assert (sock["role"], sock["owners"], sock["uid"]) == ("unknown", [], 0)
    assert sock["diagnosis"]["code"] == "not-reading"
    (error,) = parsed["errors"]
    assert error.startswith("owner unknown: permission denied, run as root")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pid", "{pid}"], "cannot read the descriptors of pid {pid}: permission denied, run as root"),
        (["--netns", "1"], "permission denied, run as root"),
    ],
)
def test_nobody_naming_root_things_is_refused(
    spawn: Spawn, nobody: tuple[list[str], dict[str, str]], args: list[str], message: str
) -> None:
    argv0, env = nobody
    pid, port = _root_leak(spawn)
    result = run_cli("scan", "--port", str(port), *(a.format(pid=pid) for a in args), argv0=argv0, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("closewait")
    assert message.format(pid=pid) in line


def test_listable_but_unreadable_links_are_reported_not_dropped(
    spawn: Spawn, nobody: tuple[list[str], dict[str, str]]
) -> None:
    """With CAP_DAC_READ_SEARCH alone, root's /proc/PID/fd can be listed but every readlink in it is
    refused (ptrace access check): that process's sockets must be reported as owner unknown, with
    the permission warning, not silently shown as ownerless."""
    argv0, env = nobody
    if not _setpriv_supports_ambient():
        pytest.skip("setpriv cannot grant an ambient capability here")
    _, port = _root_leak(spawn)
    python_and_args = argv0[len(AS_NOBODY) :]
    with_dac = [*AS_NOBODY, "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", *python_and_args]
    result = run_cli("scan", "--port", str(port), "--json", argv0=with_dac, env=env)
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout)
    (sock,) = parsed["sockets"]
    assert sock["owners"] == []
    (error,) = parsed["errors"]
    assert error.startswith("owner unknown: permission denied, run as root")


def _setpriv_supports_ambient() -> bool:
    help_text = subprocess.run(["setpriv", "--help"], capture_output=True, text=True, check=False).stdout
    return "--ambient-caps" in help_text
