"""Ctrl+C: ``closewait lab`` exits promptly with 130 and leaves no process and no live connection.

The lab runs under ``tests/lab/subreaper.py``, which adopts any process the lab leaks (a child
subreaper), records the lab's process tree and socket inodes before sending SIGINT, and after the
exit checks that no socket with one of those inodes still exists.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.lab.kit import CLOSEWAIT, REPO, env


def _interrupt(args: list[str], until: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.lab.subreaper", until, "--", *CLOSEWAIT, *args],
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
    ("args", "until"),
    [
        pytest.param(["lab"], "children", id="all-parts-with-servers-running"),
        pytest.param(["lab", "teardown"], "sockets", id="teardown-mid-experiment"),
    ],
)
def test_ctrl_c_exits_130_and_leaves_nothing(args: list[str], until: str) -> None:
    result = _interrupt(args, until)
    stderr = str(result["stderr"])
    assert result["running_at_sigint"] is True, stderr
    assert result["returncode"] == 130, stderr
    assert "interrupted" in stderr
    assert "Traceback" not in stderr
    assert result["seconds"] < 20  # a hang bound, not a timing measurement  # type: ignore[operator]
    assert result["leftover"] == [], f"processes left behind: {result['leftover_cmdlines']}"
    if until == "children":
        assert result["descendants"], "the lab should have started server processes by then"
    assert result["inodes"], "the lab should have held sockets by then"
    assert result["still_open"] == [], f"sockets left open: {result['still_open']}"
