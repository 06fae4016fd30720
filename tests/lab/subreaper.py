"""Run a command, interrupt it with SIGINT, and report what it left behind (a test helper).

    python -m tests.lab.subreaper children|sockets -- ARGV...

This process becomes a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so every process the
command starts, even in its own session, is re-parented here if it outlives its parent: after the
command exits, any child of ours is something it leaked. Until the SIGINT it records the command's
process tree and the socket inodes those processes hold (from /proc/PID/fd: cheap, unlike a full
socket dump on a host with tens of thousands of sockets).

SIGINT is sent once the command has child processes and sockets (``children``) or holds at least
MIN_SOCKETS sockets itself (``sockets``: in the middle of an experiment), after a short pause; at
most MAX_WAIT_S after the start. After the exit one ``ss -tane`` dump tells whether any recorded
inode still exists (a socket some process still holds).

Prints one JSON object: returncode, running_at_sigint, seconds from SIGINT to exit, descendants,
inodes, still_open (sockets with a recorded inode), leftover pids (then killed by pid and
reaped) and the command's stderr.
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
MAX_WAIT_S = 60.0
PAUSE_S = 0.3
MIN_SOCKETS = 4


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
        kids = _children(frontier.pop())
        found.extend(kids)
        frontier.extend(kids)
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def main() -> int:
    until = sys.argv[1]
    assert until in ("children", "sockets"), until
    argv = sys.argv[sys.argv.index("--") + 1 :]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + MAX_WAIT_S
    fire_at: float | None = None
    seen: set[int] = set()
    inodes: set[int] = set()
    while time.monotonic() < deadline and proc.poll() is None:
        descendants = _descendants(proc.pid)
        seen.update(descendants)
        own = _socket_inodes(proc.pid)
        inodes |= own
        for pid in descendants:
            inodes |= _socket_inodes(pid)
        ready = (descendants and inodes) if until == "children" else len(own) >= MIN_SOCKETS
        if fire_at is None and ready:
            fire_at = time.monotonic() + PAUSE_S
        if fire_at is not None and time.monotonic() >= fire_at:
            break
        time.sleep(0.02)
    running_at_sigint = proc.poll() is None
    start = time.monotonic()
    if running_at_sigint:
        os.kill(proc.pid, signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=10)
    seconds = time.monotonic() - start
    time.sleep(0.3)  # let orphans be re-parented to us
    leftover = _children(os.getpid())
    leftover_cmdlines = []
    for pid in leftover:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            leftover_cmdlines.append(f.read().replace(b"\0", b" ").decode(errors="replace").strip())
    for pid in leftover:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in leftover:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    # ss -e: one kernel dump with inodes, no /proc walk (cheap next to -p on a busy host).
    dump = subprocess.run(["ss", "-tanHe"], capture_output=True, text=True, check=True, timeout=120).stdout
    wanted = {f"ino:{inode}" for inode in inodes}
    still_open = [line.strip() for line in dump.splitlines() if wanted.intersection(line.split())]
    print(
        json.dumps(
            {
                "returncode": proc.returncode,
                "running_at_sigint": running_at_sigint,
                "seconds": seconds,
                "descendants": sorted(seen),
                "inodes": sorted(inodes),
                "still_open": still_open,
                "leftover": leftover,
                "leftover_cmdlines": leftover_cmdlines,
                "stderr": stderr,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
