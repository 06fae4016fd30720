"""Helpers for the lab's tests: an independent view of the kernel (``ss``), socket pairs, and the
way to run the ``closewait`` command line as a child process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLOSEWAIT = [sys.executable, "-c", "import sys; from closewait.cli import main; sys.exit(main())"]


@dataclass(frozen=True)
class SsRow:
    state: str
    recv_q: int
    send_q: int
    local: str
    peer: str
    #: The socket's inode (``ino:``); 0 for an orphan that no process holds any more.
    inode: int


def ss(*filters: str) -> list[SsRow]:
    """``ss -tane`` rows matching an ss filter expression, e.g. ``sport = :1234``.

    ``-e`` (inode) rather than ``-p`` (processes): ``-p`` walks every process's descriptors, which
    takes seconds on a host shared with benchmarks holding 200,000 sockets; the filter itself runs
    in the kernel."""
    assert shutil.which("ss"), "iproute2's ss is needed"
    argv = ["ss", "-tanHe", *filters]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        ino = next((int(p[4:]) for p in parts[5:] if p.startswith("ino:")), -1)
        rows.append(SsRow(parts[0], int(parts[1]), int(parts[2]), parts[3], parts[4], ino))
    return rows


def ss_tuple(local: tuple[str, int], remote: tuple[str, int]) -> SsRow | None:
    """ss's row for one connection seen from ``local``, or None."""
    rows = ss(f"sport = :{local[1]} and dport = :{remote[1]}")
    want_local, want_peer = f"{local[0]}:{local[1]}", f"{remote[0]}:{remote[1]}"
    return next((r for r in rows if r.local == want_local and r.peer == want_peer), None)


def holds_inode(pid: int, inode: int) -> bool:
    """Whether process ``pid`` has a descriptor for socket ``inode`` (/proc/PID/fd)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                return True
        except OSError:
            continue
    return False


def pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket, socket.socket]:
    """(listener, client, server) on 127.0.0.1 port 0."""
    listener = socket.socket()
    if rcvbuf:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname(), timeout=5)
    client.settimeout(None)
    server, _ = listener.accept()
    return listener, client, server


def env() -> dict[str, str]:
    """The environment for a closewait child: this checkout importable, wide terminal output."""
    result = dict(os.environ)
    result["PYTHONPATH"] = str(REPO / "src") + os.pathsep + result.get("PYTHONPATH", "")
    result["COLUMNS"] = "200"
    return result
