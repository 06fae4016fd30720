"""``closewait scan`` as an unprivileged user against a root-owned leak.

sock_diag answers anyone, so the socket is still listed; /proc/PID/fd of root's processes is not
readable, so the owner is unknown: one warning on stderr says so and how to fix it, the exit code
is 0. Naming a root process with --pid, or entering a namespace, is refused (exit 2).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest

from tests.conftest import AS_NOBODY, Nobody, Spawn
from tests.scan.kit import LEAKING_SERVER, close_wait_of, python_argv, run_cli

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed"),
]


def _closewait_as(nobody: Nobody, *setpriv_extra: str) -> tuple[list[str], dict[str, str]]:
    """argv prefix and env that run ``python -m closewait`` as nobody (with extra setpriv options)."""
    setpriv, python = nobody.argv[: len(AS_NOBODY)], nobody.argv[len(AS_NOBODY) :]
    return [*setpriv, *setpriv_extra, *python, "-m", "closewait"], nobody.env


def _root_leak(spawn: Spawn) -> tuple[int, int]:
    leaker = spawn(argv=python_argv(LEAKING_SERVER, "127.0.0.1", "keep"))
    assert leaker.stdout is not None
    port = int(leaker.stdout.readline())
    with socket.create_connection(("127.0.0.1", port)):
        pass
    assert leaker.stdout.readline().strip() == "accepted"
    close_wait_of(leaker.pid, port)
    return leaker.pid, port


def test_nobody_sees_the_socket_but_not_its_owner(spawn: Spawn, nobody: Nobody) -> None:
    argv0, env = _closewait_as(nobody)
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
def test_nobody_naming_root_things_is_refused(spawn: Spawn, nobody: Nobody, args: list[str], message: str) -> None:
    argv0, env = _closewait_as(nobody)
    pid, port = _root_leak(spawn)
    result = run_cli("scan", "--port", str(port), *(a.format(pid=pid) for a in args), argv0=argv0, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("closewait")
    assert message.format(pid=pid) in line


def test_listable_but_unreadable_links_are_reported_not_dropped(spawn: Spawn, nobody: Nobody) -> None:
    """With CAP_DAC_READ_SEARCH alone, root's /proc/PID/fd can be listed but every readlink in it is
    refused (ptrace access check): that process's sockets must be reported as owner unknown, with
    the permission warning, not silently shown as ownerless."""
    if not _setpriv_supports_ambient():
        pytest.skip("setpriv cannot grant an ambient capability here")
    _, port = _root_leak(spawn)
    with_dac, env = _closewait_as(nobody, "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search")
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
