"""Owners: who holds a socket, read from /proc on the real kernel (fork, comm with odd characters)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket

import pytest

import closewait
from closewait.errors import KernelDataError
from closewait.model import Role
from closewait.sources.owners import find_owners
from closewait.sources.process import parse_start_time, parse_stat, read_process
from tests.conftest import Spawn
from tests.scan.kit import close_wait_of, python_argv
from tests.util import wait_for

#: Accepts one connection, then forks: parent and child both hold the listener and the connection.
FORKING_SERVER = """
import ctypes, os, signal, socket, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
child = os.fork()
if child == 0:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    time.sleep(120)
    os._exit(0)
print(child, conn.fileno(), flush=True)
time.sleep(120)
"""


def test_socket_shared_by_forked_parent_and_child_lists_both(spawn: Spawn) -> None:
    parent = spawn(argv=python_argv(FORKING_SERVER))
    assert parent.stdout is not None
    port = int(parent.stdout.readline())
    client = socket.create_connection(("127.0.0.1", port))
    child_pid, fd = map(int, parent.stdout.readline().split())
    try:
        client.close()
        close_wait_of(parent.pid, port)
        # Without --pid the walk covers every process, so both holders are found.
        (finding,) = closewait.scan(ports=[port]).findings
        assert sorted((o.process.pid, o.fd) for o in finding.owners) == sorted([(parent.pid, fd), (child_pid, fd)])
        assert finding.role == Role.SERVER
        assert finding.diagnosis is not None
        assert finding.diagnosis.code == "not-reading"
        # Grouped by process, the socket appears under each holder.
        snapshot = closewait.scan(ports=[port])
        mine = [g for g in snapshot.by_process() if g.process and g.process.pid in (parent.pid, child_pid)]
        assert sorted(g.process.pid for g in mine if g.process) == sorted([parent.pid, child_pid])
        assert all(g.count == 1 for g in mine)
        # --pid of the child alone still finds it, with the child as the only owner listed.
        (only_child,) = closewait.scan(ports=[port], pids=[child_pid]).findings
        assert [(o.process.pid, o.fd) for o in only_child.owners] == [(child_pid, fd)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)


#: Renames itself (prctl PR_SET_NAME) to a comm with spaces and ')' and leaks one socket.
ODD_NAME_SERVER = """
import ctypes, socket, time
ctypes.CDLL(None).prctl(15, b"a) b (c) d")  # PR_SET_NAME
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
time.sleep(120)
"""


def test_process_name_with_spaces_and_parens_from_the_kernel(spawn: Spawn) -> None:
    proc = spawn(argv=python_argv(ODD_NAME_SERVER))
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    with socket.create_connection(("127.0.0.1", port)):
        pass
    (finding,) = close_wait_of(proc.pid, port)
    (owner,) = finding.owners
    assert owner.process.name == "a) b (c) d"
    stat = read_process(proc.pid)
    assert stat.name == "a) b (c) d"
    assert stat.start_time > 0


STAT_TAIL = " S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 20 21 22"


@pytest.mark.parametrize("comm", ["python3", "a b", "x) (y", "))", "(", "", ") S 1 2 3"])
def test_parse_stat_takes_comm_up_to_the_last_paren(comm: str) -> None:
    stat = parse_stat(f"1234 ({comm}){STAT_TAIL}\n")
    name, start = stat.comm, stat.start_time
    assert (stat.state, stat.ppid) == ("S", 1)
    assert name == comm
    assert start == 424242
    assert parse_start_time(f"1234 ({comm}){STAT_TAIL}\n".encode()) == 424242


@pytest.mark.parametrize(
    "text", ["", "1234", "1234 (x", "1234 x) S 1", "1234 (x) S 1 2 3", "1234 (x)" + STAT_TAIL.replace("424242", "z")]
)
def test_parse_stat_rejects_malformed(text: str) -> None:
    with pytest.raises(KernelDataError):
        parse_stat(text)
    assert parse_start_time(text.encode()) is None


def test_find_owners_skips_vanished_processes_and_unknown_inodes(spawn: Spawn) -> None:
    """A pid that exits before the walk is skipped, not an error; inode 0 (TIME_WAIT) is never looked up."""
    gone = spawn("pass")
    gone.wait(timeout=10)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    with server:
        inode = os.fstat(server.fileno()).st_ino
        result = find_owners({inode, 0}, pids=[gone.pid, os.getpid()])
        assert [(o.process.pid, o.fd) for o in result.owners[inode]] == [(os.getpid(), server.fileno())]
        assert 0 not in result.owners
        assert result.denied_pids == []
        assert result.errors() == []
    assert wait_for(lambda: not os.path.exists(f"/proc/{gone.pid}/fd") or gone.returncode is not None)
