"""Shared pieces of the scan tests: leaking programs, running the real CLI, parsing ``ss``.

Every program here binds port 0 on loopback and prints what the test needs (its port, its local
port) on one line, so the test never guesses. Tests filter every scan by their own ports and pids:
other engineers' tests leave their own CLOSE_WAIT sockets on this host at the same time.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import closewait
from closewait.model import Finding, TcpState
from tests.util import wait_for

REPO = Path(__file__).resolve().parents[2]

#: A server that accepts one connection per line of argv[2] ("eof", "keep") and then sleeps:
#: "eof" reads until recv() returns b"" and keeps the socket (Recv-Q 0), "keep" never reads it.
LEAKING_SERVER = """
import socket, sys, time
host, modes = sys.argv[1], sys.argv[2].split(",")
server = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
server.bind((host, 0))
server.listen()
print(server.getsockname()[1], flush=True)
kept = []
for mode in modes:
    conn, _ = server.accept()
    kept.append(conn)
    if mode == "eof":
        while conn.recv(4096):
            pass
    print("accepted", flush=True)
time.sleep(120)
"""

#: A client that connects to argv[1]:argv[2], prints its local port, and then either reads until
#: EOF and keeps the socket ("eof") or never reads it ("keep").
LEAKING_CLIENT = """
import socket, sys, time
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = socket.create_connection((host, port))
print(conn.getsockname()[1], flush=True)
if mode == "eof":
    while conn.recv(4096):
        pass
    print("eof", flush=True)
time.sleep(120)
"""


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def python_argv(code: str, *args: object) -> list[str]:
    import textwrap

    return [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]


def close_wait_of(
    pid: int, port: int, *, count: int = 1, backend: str = "auto", **kwargs: object
) -> tuple[Finding, ...]:
    """Wait until ``pid`` holds ``count`` CLOSE_WAIT sockets with ``port`` at one end; return them."""

    def found() -> tuple[Finding, ...]:
        snap = closewait.scan(ports=[port], pids=[pid], backend=backend, **kwargs)  # type: ignore[arg-type]
        return snap.findings if len(snap.findings) == count else ()

    return wait_for(found)


def without_netlink_fields(sock: closewait.Socket) -> closewait.Socket:
    return dataclasses.replace(sock, cookie=None, tcp_info=None, source="-")


# --- the real command line -------------------------------------------------------------------


def run_cli(
    *args: str, argv0: Sequence[str] | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``closewait ARGS`` as a user runs it: the console script if installed, else ``python -m closewait``."""
    if argv0 is None:
        script = Path(sys.executable).with_name("closewait")
        argv0 = [str(script)] if script.exists() else [sys.executable, "-m", "closewait"]
    full_env = dict(os.environ, COLUMNS="200")
    if env:
        full_env.update(env)
    return subprocess.run([*argv0, *args], capture_output=True, text=True, timeout=timeout, env=full_env, check=False)


# --- ss -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SsRow:
    recv_q: int
    send_q: int
    local: closewait.Endpoint
    remote: closewait.Endpoint
    users: tuple[tuple[str, int, int], ...]  # (name, pid, fd)
    inode: int | None
    bytes_received: int | None


_USER = re.compile(r'\("(?P<name>[^"]*)",pid=(?P<pid>\d+),fd=(?P<fd>\d+)\)')


def _ss_endpoint(text: str) -> closewait.Endpoint:
    address, _, port = text.rpartition(":")
    address = address.strip("[]")
    if "%" in address:  # ss prints a scope (fe80::1%lo); closewait does not
        address = address.split("%", 1)[0]
    return closewait.Endpoint(address, int(port))


def parse_ss(output: str) -> list[SsRow]:
    """Rows of ``ss -tanpie state close-wait``: a socket line, then a tab-indented tcp_info line."""
    rows: list[SsRow] = []
    lines = output.splitlines()[1:]
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line[0].isspace():
            continue
        info = lines[i] if i < len(lines) and lines[i][:1].isspace() else ""
        if info:
            i += 1
        fields = line.split()
        inode = re.search(r"\bino:(\d+)", line)
        received = re.search(r"\bbytes_received:(\d+)", info)
        rows.append(
            SsRow(
                recv_q=int(fields[0]),
                send_q=int(fields[1]),
                local=_ss_endpoint(fields[2]),
                remote=_ss_endpoint(fields[3]),
                users=tuple((m["name"], int(m["pid"]), int(m["fd"])) for m in _USER.finditer(line)),
                inode=int(inode.group(1)) if inode else None,
                bytes_received=int(received.group(1)) if received else 0 if info else None,
            )
        )
    return rows


CLOSE_WAIT = TcpState.CLOSE_WAIT
