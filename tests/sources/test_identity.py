"""Pids are reused: what the owner lookup reads about a process is that one process's, never the
name of a new process that got its pid. Real processes, and a real pid reuse (ns_last_pid)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from closewait.errors import NoSuchProcess
from closewait.sources import owners
from closewait.sources.process import identify_pids, open_process, read_process, read_process_at
from tests.conftest import Nobody, Spawn

#: Holds one TCP socket and says its fd and inode; the name shows in /proc/PID/comm.
HOLDER = """
import os, socket, sys, time
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
print(sock.fileno(), os.fstat(sock.fileno()).st_ino, flush=True)
time.sleep(120)
"""


def _start(spawn: Spawn, name: str) -> tuple[subprocess.Popen[str], int, int]:
    """A child running HOLDER with ``name`` as its argv[0] (its cmdline shows it): (process, fd, inode)."""
    proc = spawn(argv=[name, "-c", HOLDER], executable=sys.executable)
    assert proc.stdout is not None
    fd, inode = map(int, proc.stdout.readline().split())
    return proc, fd, inode


def _end(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _reuse(pid: int, spawn: Spawn, name: str) -> tuple[subprocess.Popen[str], int, int]:
    """A new HOLDER given exactly ``pid`` (whose process has exited), through ns_last_pid."""
    if os.geteuid() != 0 or not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("needs root to choose the next pid")
    for _ in range(20):  # other processes may take the pid first: retry, bounded
        with open("/proc/sys/kernel/ns_last_pid", "w") as handle:
            handle.write(str(pid - 1))
        started = _start(spawn, name)
        if started[0].pid == pid:
            return started
        _end(started[0])
    pytest.skip(f"could not get pid {pid} again in 20 tries (busy machine)")


def test_a_process_read_through_its_directory_is_never_the_new_one_with_its_pid(spawn: Spawn) -> None:
    first, _, _ = _start(spawn, "cw-first")
    dir_fd = open_process(first.pid)
    try:
        assert read_process_at(dir_fd, first.pid).cmdline[0] == "cw-first"
        _end(first)
        second, _, _ = _reuse(first.pid, spawn, "cw-second")
        assert read_process(first.pid).cmdline[0] == "cw-second"  # by number: the new process
        with pytest.raises(NoSuchProcess):
            read_process_at(dir_fd, first.pid)  # through the old directory: gone, not the new one
        assert second.pid == first.pid
    finally:
        os.close(dir_fd)


def test_the_walk_names_the_process_whose_fds_it_read_not_the_next_one_with_its_pid(spawn: Spawn) -> None:
    """The host-wide walk reads a process's name through the descriptor of the fd directory it walked:
    the process exits and its pid is reused between the two, and the walk skips it."""
    first, _, _ = _start(spawn, "cw-first")
    fd_dir = os.open(f"/proc/{first.pid}/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        process = owners._identified_through(fd_dir, first.pid)
        assert process is not None
        assert process.cmdline[0] == "cw-first"
        _end(first)
        _reuse(first.pid, spawn, "cw-second")
        assert owners._identified_through(fd_dir, first.pid) is None
    finally:
        os.close(fd_dir)


def test_a_named_pid_reused_since_it_was_validated_raises(spawn: Spawn) -> None:
    """``scan --pid P``: P is validated (start time kept), exits, and a new process gets P before the
    walk. The walk must not answer for the new process."""
    first, _, first_inode = _start(spawn, "cw-first")
    start_times = identify_pids([first.pid])
    _end(first)
    second, _, second_inode = _reuse(first.pid, spawn, "cw-second")
    with pytest.raises(NoSuchProcess, match=f"pid {first.pid} has exited and its pid now names another process"):
        owners.find_owners({first_inode, second_inode}, pids=[first.pid], method="procfs", start_times=start_times)
    # Named, and exited with no new process on its pid: NoSuchProcess too, not an empty answer.
    start_times = identify_pids([second.pid])
    _end(second)
    with pytest.raises(NoSuchProcess, match=f"pid {second.pid} has exited$"):
        owners.find_owners({second_inode}, pids=[second.pid], method="procfs", start_times=start_times)


def test_owners_from_the_bpf_iterator_are_checked_against_the_process_now(spawn: Spawn) -> None:
    """(pid, fd) pairs the kernel reported for a process that has exited since are dropped, even when
    a new process has the pid and a socket on the same fd number."""
    first, fd, first_inode = _start(spawn, "cw-first")
    first_start = read_process(first.pid).start_time  # the start time the kernel's pass saw
    _end(first)
    second, second_fd, second_inode = _reuse(first.pid, spawn, "cw-second")
    second_start = read_process(second.pid).start_time
    assert second_fd == fd
    assert second_inode != first_inode
    assert owners._identify_holders({first_inode: [(first.pid, fd, first_start)]}, "/proc") == []
    if second_start != first_start:  # started in another clock tick: told apart by start time alone
        assert owners._identify_holders({second_inode: [(first.pid, fd, first_start)]}, "/proc") == []
    ((pid, process, hits),) = owners._identify_holders({second_inode: [(second.pid, fd, second_start)]}, "/proc")
    assert (pid, process.cmdline[0], hits) == (second.pid, "cw-second", [(fd, second_inode)])


def test_the_walk_names_the_process_that_holds_the_socket(spawn: Spawn) -> None:
    holder, fd, inode = _start(spawn, "cw-holder")
    for start_times in (None, identify_pids([holder.pid])):
        found = owners.find_owners(
            {inode}, pids=[holder.pid] if start_times else None, method="procfs", start_times=start_times
        )
        ((owner,),) = found.owners.values()
        assert (owner.process.pid, owner.fd, owner.process.cmdline[0]) == (holder.pid, fd, "cw-holder")
    with socket.socket() as mine:  # a socket nobody else holds: no owner but this process
        assert owners.find_owners({os.fstat(mine.fileno()).st_ino}, method="procfs").owners


# As nobody, the links of root's process may not be read (CAP_BPF alone is like that), and they are
# not needed: the start time the kernel saw decides. Prints the holders kept for the process's own
# start time and for another one (a process that had the pid before).
BY_START_TIME = """
import json, sys
from closewait.sources import owners, process
pid, fd, inode = map(int, sys.argv[1:])
start = process.read_process(pid).start_time
kept = [owners._identify_holders({inode: [(pid, fd, at)]}, "/proc") for at in (start, start - 1)]
print(json.dumps([[hits for _, _, hits in found] for found in kept]))
"""


def test_bpf_holders_whose_links_cannot_be_read_are_checked_by_start_time(spawn: Spawn, nobody: Nobody) -> None:
    holder, fd, inode = _start(spawn, "cw-holder")
    done = subprocess.run(
        [*nobody.argv, "-c", BY_START_TIME, str(holder.pid), str(fd), str(inode)],
        env=nobody.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    # The start time the kernel saw is this process's: kept. Another start time: another process
    # had the pid when the kernel looked, dropped.
    assert json.loads(done.stdout) == [[[[fd, inode]]], []]
