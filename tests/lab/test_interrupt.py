"""Ctrl+C: ``closewait lab`` exits promptly with 130 and leaves no process and no live connection.

The lab runs under ``tests/lab/subreaper.py``, which adopts any process the lab leaks (a child
subreaper) and records the lab's process tree and TCP connections before sending SIGINT.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from closewait.model import ALL_STATES, TcpState
from closewait.scan import scan
from tests.lab.kit import CLOSEWAIT, REPO, env

#: States that need a process to hold the socket; after the lab is gone none may remain.
LIVE = {TcpState.LISTEN, TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.SYN_SENT, TcpState.SYN_RECV}


def _interrupt(args: list[str], wait_s: float) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.lab.subreaper", str(wait_s), "--", *CLOSEWAIT, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env(),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "wait_s"),
    [
        pytest.param(["lab"], 3.0, id="all-parts-with-servers-running"),
        pytest.param(["lab", "teardown"], 0.6, id="teardown-mid-capture"),
    ],
)
def test_ctrl_c_exits_130_and_leaves_nothing(args: list[str], wait_s: float) -> None:
    result = _interrupt(args, wait_s)
    stderr = str(result["stderr"])
    assert result["running_at_sigint"] is True, stderr
    assert result["returncode"] == 130, stderr
    assert "interrupted" in stderr
    assert "Traceback" not in stderr
    assert result["seconds"] < 20  # a hang bound, not a timing measurement  # type: ignore[operator]
    assert result["leftover"] == [], f"processes left behind: {result['leftover']}"
    if args == ["lab"]:
        assert result["descendants"], "the lab should have started server processes by then"
    connections = [tuple(c) for c in result["connections"]]  # type: ignore[union-attr]
    assert connections, "the lab should have held connections by then"
    wanted = {(local, remote) for _, local, remote in connections}
    ports = {int(local.rsplit(":", 1)[1]) for local, _ in wanted}
    still = [
        f.socket
        for f in scan(ALL_STATES, ports=ports, owners=False).findings
        if (str(f.socket.local), str(f.socket.remote)) in wanted and f.socket.state in LIVE
    ]
    assert still == [], f"connections left open: {still}"
