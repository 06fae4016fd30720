"""A pid that has exited but is still listed (a zombie waiting for its parent) is refused by every
command with one line and exit 2: its descriptors and its namespaces are gone, so an empty answer
("no sockets in CLOSE_WAIT") would be a lie."""

from __future__ import annotations

import time

import pytest

from tests.conftest import Spawn
from tests.scan.kit import run_cli

#: Forks a child that exits at once and is never waited for: a zombie for as long as this runs.
ZOMBIE_PARENT = """
import os, time
child = os.fork()
if child == 0:
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


@pytest.fixture
def zombie(spawn: Spawn) -> int:
    parent = spawn(ZOMBIE_PARENT)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    for _ in range(200):
        with open(f"/proc/{pid}/stat") as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                return pid
        time.sleep(0.01)
    pytest.fail(f"pid {pid} did not become a zombie")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scan", "--pid"], "has exited (a zombie: its descriptors are closed)"),
        (["scan", "--json", "--pid"], "has exited (a zombie: its descriptors are closed)"),
        (["watch", "-n", "1", "--pid"], "has exited (a zombie: its descriptors are closed)"),
        (["scan", "--netns"], "has exited: no network namespace left to scan"),
    ],
)
def test_a_zombie_pid_is_one_line_and_exit_2(zombie: int, args: list[str], message: str) -> None:
    done = run_cli(*args, str(zombie))
    assert done.returncode == 2, done.stdout
    assert done.stdout == ""
    assert done.stderr.splitlines() == [f"closewait: error: pid {zombie} {message}"]


def test_reap_of_a_zombie_is_one_line_and_exit_2(zombie: int) -> None:
    done = run_cli("reap", "--pid", str(zombie))
    assert done.returncode == 2, done.stdout
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"closewait: error: pid {zombie} has exited")
