"""Child processes that leak CLOSE_WAIT on purpose, for the monitoring tests.

``LEAKER`` listens on 127.0.0.1 port 0, then leaks ``initial`` sockets, prints its port, and leaks
``extra`` more, one every ``period`` seconds: for each, it connects to itself, accepts, and closes
the client end. The accepted end gets the FIN at once on loopback and sits in CLOSE_WAIT (never
read: Recv-Q 1, ``not-reading``, role server) for as long as the child lives.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import closewait
from tests.util import wait_for

LEAKER = """
import socket, sys, time
initial, extra, period = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(256)
addr = srv.getsockname()
held = []

def leak_one():
    client = socket.create_connection(addr)
    conn, _ = srv.accept()
    client.close()
    held.append(conn)

for _ in range(initial):
    leak_one()
print(addr[1], flush=True)
for _ in range(extra):
    time.sleep(period)
    leak_one()
time.sleep(600)
"""

CLOSEWAIT = str(Path(sys.executable).with_name("closewait"))


def close_wait_count(pid: int) -> int:
    """CLOSE_WAIT sockets ``pid`` holds now, by a real scan filtered to that pid."""
    return len(closewait.scan(pids=[pid]).findings)


def start_leaker(
    spawn: Callable[..., subprocess.Popen[str]],
    initial: int,
    extra: int = 0,
    period: float = 0.2,
    prefix: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[str], int]:
    """Start a LEAKER (optionally under ``prefix``, e.g. ``ip netns exec NAME``); return it and its port
    once its ``initial`` sockets are in CLOSE_WAIT (when it runs in the caller's namespace)."""
    argv = [*prefix, sys.executable, "-c", LEAKER, str(initial), str(extra), str(period)]
    child = spawn(argv=argv)
    assert child.stdout is not None
    port = int(child.stdout.readline())
    if not prefix:
        wait_for(lambda: close_wait_count(child.pid) >= initial, timeout=10)
    return child, port
