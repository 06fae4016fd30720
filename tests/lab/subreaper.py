"""Run a command, interrupt it with SIGINT, and report what it left behind (a test helper).

    python -m tests.lab.subreaper WAIT_S -- ARGV...

This process becomes a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so every process the
command starts, even in its own session, is re-parented here if it outlives its parent: after the
command exits, any child of ours other than the command itself is something it leaked. Before the
SIGINT it records the command's process tree and the TCP connections those processes hold.

Prints one JSON object: returncode, seconds from SIGINT to exit, the descendants seen, the
connections seen ([state, local, remote]), the leftover pids (then killed by pid and reaped) and
the command's stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2 :].split()[1])


def _children(parent: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == parent]


def _descendants(root: int) -> list[int]:
    found: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        kids = _children(pid)
        found.extend(kids)
        frontier.extend(kids)
    return found


def main() -> int:
    wait_s = float(sys.argv[1])
    argv = sys.argv[sys.argv.index("--") + 1 :]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + wait_s
    seen: set[int] = set()
    connections: set[tuple[str, str, str]] = set()
    from closewait.model import ALL_STATES
    from closewait.scan import scan

    while time.monotonic() < deadline and proc.poll() is None:
        tree = [proc.pid, *_descendants(proc.pid)]
        seen.update(tree[1:])
        with contextlib.suppress(Exception):
            for finding in scan(ALL_STATES, pids=tree).findings:
                sock = finding.socket
                connections.add((sock.state.name, str(sock.local), str(sock.remote)))
        time.sleep(0.1)
    running_at_sigint = proc.poll() is None
    start = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=10)
    seconds = time.monotonic() - start
    time.sleep(0.3)  # let orphans be re-parented to us
    leftover = _children(os.getpid())
    for pid in leftover:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in leftover:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    print(
        json.dumps(
            {
                "returncode": proc.returncode,
                "running_at_sigint": running_at_sigint,
                "seconds": seconds,
                "descendants": sorted(seen),
                "connections": sorted(connections),
                "leftover": leftover,
                "stderr": stderr,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
