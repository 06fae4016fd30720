"""The console script's click-free fast path (``closewait._console``) against the click path.

``closewait scan --json [--no-owners]`` skips click; everything else goes through
``closewait.cli.main``. These tests hold real CLOSE_WAIT sockets in a child process and check that
both paths report them identically, that only the exact fast command lines take the fast path, and
that a closed stdout still exits 141.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from closewait._console import _fast_scan_json
from tests.conftest import Spawn
from tests.util import wait_for

SCRIPT = str(Path(sys.executable).with_name("closewait"))
CLICK_PATH = [sys.executable, "-c", "import sys; from closewait.cli import main; main()"]

#: Listens on port 0, accepts three connections, keeps them open and never reads: once the test's
#: clients close, the three accepted sockets sit in CLOSE_WAIT (Recv-Q 1, not-reading).
HOLDER = """
import socket, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
print(server.getsockname()[1], flush=True)
kept = [server.accept()[0] for _ in range(3)]
print("accepted", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize(
    ("argv", "owners"),
    [
        (["scan", "--json"], True),
        (["scan", "--json", "--no-owners"], False),
        (["scan", "--no-owners", "--json"], False),
        (["scan", "--json", "--no-workloads"], True),
        (["scan", "--json", "--no-workloads", "--no-owners"], False),
        (["scan", "--json", "--container", "web"], None),
        (["scan", "--json", "--by", "process"], None),
        (["scan"], None),
        (["scan", "--no-owners"], None),
        (["scan", "--json", "--port", "80"], None),
        (["scan", "--json", "--state=all"], None),
        (["--json", "scan"], None),
        (["watch", "--json"], None),
        ([], None),
    ],
)
def test_only_exact_fast_command_lines_skip_click(argv: list[str], owners: bool | None) -> None:
    assert _fast_scan_json(argv) is owners


def _mine(output: str, port: int) -> list[dict[str, Any]]:
    sockets = [s for s in json.loads(output)["sockets"] if s["local"]["port"] == port]
    for sock in sockets:
        sock.pop("idle_ms")
        sock.pop("close_wait_age_ms")  # an age too (the lower bound is idle_ms)
        sock.pop("close_wait_since")  # the scan's time minus that age: moves by a millisecond or two
        sock["diagnosis"].pop("summary")  # mentions the idle time, which moves between the two runs
    return sorted(sockets, key=lambda s: s["remote"]["port"])


@pytest.mark.parametrize("extra", [[], ["--no-owners"]])
def test_fast_path_prints_what_the_click_path_prints(spawn: Spawn, extra: list[str]) -> None:
    holder = spawn(HOLDER)
    assert holder.stdout is not None
    port = int(holder.stdout.readline())
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    assert holder.stdout.readline().strip() == "accepted"
    for client in clients:
        client.close()

    def scan(argv: list[str]) -> list[dict[str, Any]]:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
        assert done.stderr == ""
        return _mine(done.stdout, port)

    wait_for(lambda: len(scan([SCRIPT, "scan", "--json", *extra])) == 3)
    fast = scan([SCRIPT, "scan", "--json", *extra])
    slow = scan([*CLICK_PATH, "scan", "--json", *extra])
    assert fast == slow
    assert {s["state"] for s in fast} == {"CLOSE_WAIT"}
    assert {s["diagnosis"]["code"] for s in fast} == {"not-reading"}
    if extra:
        assert all(s["owners"] == [] and s["role"] == "unknown" for s in fast)
    else:
        assert all([o["pid"] for o in s["owners"]] == [holder.pid] for s in fast)
        assert {s["role"] for s in fast} == {"server"}


def test_fast_path_with_and_without_workloads(spawn: Spawn) -> None:
    """``--no-workloads`` stays on the fast path: the same bytes as click's path, workload null;
    without it every owner carries its workload (this test's process runs on the host or in the
    test runner's cgroup, whatever it is: the two paths must agree)."""
    holder = spawn(HOLDER)
    assert holder.stdout is not None
    port = int(holder.stdout.readline())
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    assert holder.stdout.readline().strip() == "accepted"
    for client in clients:
        client.close()

    def scan(argv: list[str]) -> list[dict[str, Any]]:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
        assert done.stderr == ""
        return _mine(done.stdout, port)

    wait_for(lambda: len(scan([SCRIPT, "scan", "--json"])) == 3)
    for extra in ([], ["--no-workloads"]):
        fast = scan([SCRIPT, "scan", "--json", *extra])
        assert fast == scan([*CLICK_PATH, "scan", "--json", *extra])
        workloads = [o["workload"] for s in fast for o in s["owners"]]
        assert len(workloads) == 3
        if extra:
            assert workloads == [None, None, None]
        else:
            assert all(w is not None and w["kind"] in ("host", "unit", "container", "pod") for w in workloads)


def test_fast_path_exits_141_when_stdout_is_closed() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first write gets EPIPE
    try:
        done = subprocess.run(
            [SCRIPT, "scan", "--json", "--no-owners"], stdout=write_end, stderr=subprocess.PIPE, timeout=60, check=False
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141
    assert b"Traceback" not in done.stderr


def test_other_command_lines_still_reach_click() -> None:
    done = subprocess.run(
        [SCRIPT, "scan", "--json", "--port", "70000"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "70000" in done.stderr


DEFERRED_INSPECT = """
import sys
from closewait._console import _defer_inspect
_defer_inspect()
import closewait.scanning, closewait.serialize
loaded = sorted(m for m in ("ast", "dis", "tokenize") if m in sys.modules)
import dataclasses, inspect
from inspect import isclass
@dataclasses.dataclass
class NoDocstring:
    x: int
print(loaded, NoDocstring.__doc__, str(inspect.signature(divmod)), isclass(int), "ast" in sys.modules)
"""


def test_inspect_is_imported_only_when_used() -> None:
    """The console's stand-in for ``inspect``: the scan's imports leave it (and ast, dis, tokenize)
    unloaded, and the first use loads the real module for every holder of the stand-in."""
    done = subprocess.run([sys.executable, "-c", DEFERRED_INSPECT], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[0] == "[] NoDocstring(x: int) (x, y, /) True True"
