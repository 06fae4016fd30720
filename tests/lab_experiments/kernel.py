"""What the tests ask the kernel directly, without closewait: ``ss`` (iproute2) and /proc/PID/fd.

The experiments observe through closewait's own scanner; the tests check the same facts through
tools that share no code with it, so a bug in the scanner cannot make both agree.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class SsRow:
    state: str  # ss's spelling: ESTAB, CLOSE-WAIT, FIN-WAIT-2, TIME-WAIT, LISTEN, LAST-ACK ...
    recv_q: int
    send_q: int
    local_port: int
    peer_port: int
    #: The rest of the line: ``users:(("name",pid=N,fd=M))`` (-p) and ``timer:(keepalive,...)`` (-o).
    extra: str

    @property
    def owned(self) -> bool:
        return "users:(" in self.extra


def ss_port(port: int, *, processes: bool = False) -> list[SsRow]:
    """Every TCP socket whose local or remote port is ``port`` (ss filters in the kernel).

    ``processes`` adds ``-p`` (owners). It is off by default: ``ss -p`` reads every process's fds,
    seconds on a host where some process holds 200,000 sockets. Pitfall: in a namespace made with
    ``unshare --net`` (same /proc), ``ss -p`` leaves out orphaned FIN_WAIT2 sockets.
    """
    out = subprocess.run(
        ["ss", "-tanopH" if processes else "-tanoH", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    rows = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        rows.append(
            SsRow(
                state=fields[0],
                recv_q=int(fields[1]),
                send_q=int(fields[2]),
                local_port=_port(fields[3]),
                peer_port=_port(fields[4]),
                extra=" ".join(fields[5:]),
            )
        )
    return rows


def _port(address: str) -> int:
    port = address.rsplit(":", 1)[1]
    return 0 if port == "*" else int(port)  # a listener's peer is "*:*"


def server_end(port: int, client_port: int, *, processes: bool = False) -> SsRow | None:
    for row in ss_port(port, processes=processes):
        if row.local_port == port and row.peer_port == client_port:
            return row
    return None


def client_end(port: int, client_port: int, *, processes: bool = False) -> SsRow | None:
    for row in ss_port(port, processes=processes):
        if row.local_port == client_port and row.peer_port == port:
            return row
    return None


def socket_inodes(pid: int) -> set[int]:
    """Socket inodes ``pid`` holds, read straight from /proc/PID/fd."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            link = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def listening_port(pid: int) -> int | None:
    """The TCP port ``pid`` listens on, from ``ss -tlnp``."""
    out = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True, check=True, timeout=30).stdout
    for line in out.splitlines():
        if f"pid={pid}," in line:
            return int(line.split()[3].rsplit(":", 1)[1])
    return None
