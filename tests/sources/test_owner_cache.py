"""The owner cache (sources/owner_cache.py) on the real kernel: a cached answer is the answer a fresh
lookup gives, or it is not used.

What a full BPF pass found is re-checked before it is reused: the same socket (cookie), the same
process (pid and start time), the same fd (readlink), and every process started since the pass is
walked. Whatever fails a check, or a socket the cache has not seen, means a full pass. The file the
one-shot CLI keeps is root's alone, and anything else found at its path is ignored without an error.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import closewait
from closewait.model import Process
from closewait.sources import bpf, owner_cache, owner_check, owners
from closewait.sources.owner_cache import OwnerCache
from closewait.sources.owner_check import fork_check
from closewait.sources.owners import OwnerMap, _from_cache, check_cache, find_owners
from closewait.sources.process import read_process
from tests.conftest import Nobody, Spawn
from tests.scan.kit import LEAKING_SERVER, REPO, close_wait_of, python_argv, run_cli
from tests.sources.test_bpf_owners import needs_bpf
from tests.sources.test_identity import _end, _reuse, _start
from tests.sources.test_owners import FORKING_SERVER
from tests.util import wait_for

#: Accepts one connection and forks: both hold it. On SIGUSR1 the parent forks once more (a process
#: born after the cache was filled, holding the socket too) and prints the new child's pid; on
#: SIGUSR2 it puts another socket on the connection's fd (dup2), so its copy is gone while the
#: first child keeps the socket in CLOSE_WAIT. Children die with the parent (PR_SET_PDEATHSIG), and
#: a child killed before is reaped at once (SIGCHLD ignored), so its pid may be given again.
FORKS_ON_SIGNAL = """
import ctypes, os, signal, socket, time
def child():
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    while True:
        time.sleep(60)
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
first = os.fork()
if first == 0:
    child()
print(first, conn.fileno(), flush=True)
todo = []
signal.signal(signal.SIGUSR1, lambda *_: todo.append("fork"))
signal.signal(signal.SIGUSR2, lambda *_: todo.append("dup2"))
while True:
    signal.pause()
    while todo:
        if todo.pop(0) == "fork":
            pid = os.fork()
            if pid == 0:
                child()
            print(pid, flush=True)
        else:
            other = socket.socket()
            os.dup2(other.fileno(), conn.fileno())
            print("moved", flush=True)
"""


def _owners(result: OwnerMap) -> dict[int, list[tuple[int, int, str]]]:
    return {inode: [(o.process.pid, o.fd, o.process.name) for o in found] for inode, found in result.owners.items()}


def _sockets(ports: list[int]) -> dict[int, int]:
    """inode -> cookie of the CLOSE_WAIT sockets with one of ``ports`` at one end."""
    snapshot = closewait.scan(ports=ports, owners=False)
    return {f.socket.inode: f.socket.cookie for f in snapshot.findings if f.socket.cookie is not None}


@needs_bpf
def test_the_cached_answer_is_the_walks_answer(spawn: Spawn) -> None:
    """Two leaks and a socket shared by a forked parent and child: a fresh pass fills the cache, the
    next lookup answers from it, and both equal the /proc walk."""
    plain = spawn(argv=python_argv(LEAKING_SERVER, "127.0.0.1", "keep,eof"))
    assert plain.stdout is not None
    plain_port = int(plain.stdout.readline())
    forking = spawn(argv=python_argv(FORKING_SERVER))
    assert forking.stdout is not None
    fork_port = int(forking.stdout.readline())
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", plain_port)):
            pass
    shared = socket.create_connection(("127.0.0.1", fork_port))
    child_pid, shared_fd = map(int, forking.stdout.readline().split())
    shared.close()
    close_wait_of(plain.pid, plain_port, count=2)
    close_wait_of(forking.pid, fork_port)
    cookies = _sockets([plain_port, fork_port])
    assert len(cookies) == 3

    cache = OwnerCache(max_age=60)
    fresh = find_owners(cookies, cookies=cookies, cache=cache)
    cached = find_owners(cookies, cookies=cookies, cache=cache)
    walked = find_owners(cookies, method="procfs")
    assert (fresh.method, cached.method, walked.method) == ("bpf", "cache", "procfs")
    assert _owners(fresh) == _owners(cached) == _owners(walked)
    (shared_inode,) = [
        inode for inode, found in _owners(cached).items() if {pid for pid, _, _ in found} == {forking.pid, child_pid}
    ]
    assert [(pid, fd) for pid, fd, _ in _owners(cached)[shared_inode]] == sorted(
        [(forking.pid, shared_fd), (child_pid, shared_fd)]
    )
    # --owners-from bpf and procfs always look afresh; an old cache is not used.
    assert find_owners(cookies, cookies=cookies, cache=cache, method="bpf").method == "bpf"
    cache.max_age = 0
    cache.pass_ticks -= 2
    assert find_owners(cookies, cookies=cookies, cache=cache).method == "bpf"

    # scan() takes the cache too, and says how the owners were found.
    in_memory = OwnerCache(max_age=60)
    first = closewait.scan(ports=[plain_port, fork_port], owner_cache=in_memory)
    again = wait_for(
        lambda: (s := closewait.scan(ports=[plain_port, fork_port], owner_cache=in_memory)).owners_via == "cache" and s,
        timeout=30,
    )
    assert first.owners_via == "bpf"
    # Findings come oldest first (idle time), which may differ between two scans: compare by socket.
    assert sorted((f.socket.inode, f.owners) for f in first.findings) == sorted(
        (f.socket.inode, f.owners) for f in again.findings
    )


@needs_bpf
def test_a_fork_after_the_pass_is_found_and_a_moved_fd_means_a_new_pass(spawn: Spawn) -> None:
    holder, first_child, fd, cookies = _forking_holder(spawn)
    assert holder.stdout is not None
    (inode,) = cookies
    cache = OwnerCache(max_age=60)
    assert find_owners(cookies, cookies=cookies, cache=cache).method == "bpf"
    assert [(pid, fd) for pid, fd, _ in cache.holders_of(cookies)[inode]] == sorted(
        [(holder.pid, fd), (first_child, fd)]
    )

    # A process born after the pass inherits the socket: it is walked, and listed.
    os.kill(holder.pid, signal.SIGUSR1)
    second_child = int(holder.stdout.readline())
    after_fork = find_owners(cookies, cookies=cookies, cache=cache)
    assert after_fork.method == "cache"
    assert [(o.process.pid, o.fd) for o in after_fork.owners[inode]] == sorted(
        [(holder.pid, fd), (first_child, fd), (second_child, fd)]
    )
    assert after_fork.owners == find_owners(cookies, method="procfs").owners

    # The parent's fd now holds another socket: its cached entry fails the readlink, so a full pass
    # answers, and the parent is no longer listed.
    os.kill(holder.pid, signal.SIGUSR2)
    assert holder.stdout.readline().strip() == "moved"
    moved = find_owners(cookies, cookies=cookies, cache=cache)
    assert moved.method == "bpf"
    assert [(o.process.pid, o.fd) for o in moved.owners[inode]] == sorted([(first_child, fd), (second_child, fd)])
    assert moved.owners == find_owners(cookies, method="procfs").owners


@needs_bpf
def test_a_re_check_started_in_a_thread_is_the_one_find_owners_uses(spawn: Spawn) -> None:
    """The exporter starts the cache's re-check (``start_check``) before its dump; ``find_owners``
    waits for that thread and uses its result: a cached answer when every fd still holds its socket,
    a full pass when one does not."""
    holder, first_child, fd, cookies = _forking_holder(spawn)
    (inode,) = cookies
    cache = OwnerCache(max_age=60)
    assert find_owners(cookies, cookies=cookies, cache=cache).method == "bpf"

    owners.start_check(cache)
    assert cache.checking is not None
    reused = find_owners(cookies, cookies=cookies, cache=cache)
    assert cache.checking is None
    assert reused.method == "cache"
    assert reused.owners == find_owners(cookies, method="procfs").owners

    # The parent's fd is moved before the threaded re-check runs: it fails, and a full pass answers.
    assert holder.stdout is not None
    os.kill(holder.pid, signal.SIGUSR2)
    assert holder.stdout.readline().strip() == "moved"
    owners.start_check(cache)
    moved = find_owners(cookies, cookies=cookies, cache=cache)
    assert moved.method == "bpf"
    assert [(o.process.pid, o.fd) for o in moved.owners[inode]] == [(first_child, fd)]


def _fails(*_args: object) -> object:
    raise RuntimeError("the child's reads fail")


def _checked_both_ways(cache: OwnerCache) -> tuple[object, object]:
    """``check_cache``'s answer (in this process) and ``owner_check``'s (in a child it forks), as
    comparable values: [(pid, start time, name, [(fd, inode)])] and the failed inodes. The child is
    reaped by ``join()``: its pid is no child of this process afterwards."""
    check_cache(cache)
    assert cache.verified is not None
    here = cache.verified[1]
    cache.verified = None
    forked = fork_check(cache)
    assert forked is not None
    cache.checking = forked
    forked.join()
    with pytest.raises(ChildProcessError):
        os.waitpid(forked.pid, os.WNOHANG)
    assert cache.verified is not None
    there = cache.verified[1]

    def comparable(verified: tuple[list[tuple[int, Process, list[tuple[int, int]]]], set[int]]) -> object:
        found, failed = verified
        return sorted((pid, p.start_time, p.name, p.cmdline, p.uid, hits) for pid, p, hits in found), sorted(failed)

    return comparable(here), comparable(there)


@needs_bpf
def test_the_re_check_in_a_child_process_answers_as_the_one_in_process(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console forks its re-check (``owner_check.fork_check``) before importing the model. The
    child only reads; what it read is judged by the same rules as the in-process re-check: the same
    holders and the same failures, with every holder there, with an fd moved, and with a holder
    gone. A child that dies before answering is replaced by the re-check in-process."""
    holder, first_child, _, cookies = _forking_holder(spawn)
    (inode,) = cookies
    cache = OwnerCache(max_age=60)
    assert find_owners(cookies, cookies=cookies, cache=cache).method == "bpf"

    here, there = _checked_both_ways(cache)
    assert here == there
    assert here[1] == []
    assert {entry[0] for entry in here[0]} == {holder.pid, first_child}

    # A child that fails before it answers (here its reader raises: the child has the parent's
    # memory, patch included) exits 1: join() re-checks in this process instead.
    with monkeypatch.context() as patched:
        patched.setattr(owner_check, "read_process", _fails)
        forked = fork_check(cache)
    assert forked is not None
    cache.checking = forked
    forked.join()
    assert cache.verified is not None
    assert cache.verified[1][1] == set()
    assert {entry[0] for entry in cache.verified[1][0]} == {holder.pid, first_child}
    with pytest.raises(ChildProcessError):
        os.waitpid(forked.pid, os.WNOHANG)
    reused = find_owners(cookies, cookies=cookies, cache=cache)
    assert reused.method == "cache"
    assert reused.owners == find_owners(cookies, method="procfs").owners

    # The first child is gone: skipped both ways (the parent still holds the socket).
    _ended(first_child)
    here, there = _checked_both_ways(cache)
    assert here == there
    assert {entry[0] for entry in here[0]} == {holder.pid}

    # The parent's fd now holds another socket: the same failure both ways.
    assert holder.stdout is not None
    os.kill(holder.pid, signal.SIGUSR2)
    assert holder.stdout.readline().strip() == "moved"
    here, there = _checked_both_ways(cache)
    assert here == there
    assert here[1] == [inode]


def _forking_holder(spawn: Spawn) -> tuple[subprocess.Popen[str], int, int, dict[int, int]]:
    """FORKS_ON_SIGNAL holding one CLOSE_WAIT socket with its first child: (process, the child's pid,
    the fd, inode -> cookie of the socket)."""
    holder = spawn(argv=python_argv(FORKS_ON_SIGNAL))
    assert holder.stdout is not None
    port = int(holder.stdout.readline())
    with socket.create_connection(("127.0.0.1", port)):
        first_child, fd = map(int, holder.stdout.readline().split())
    close_wait_of(holder.pid, port)
    return holder, first_child, fd, _sockets([port])


def _fork(holder: subprocess.Popen[str]) -> int:
    """The pid of a new child of FORKS_ON_SIGNAL (it inherits the socket)."""
    assert holder.stdout is not None
    os.kill(holder.pid, signal.SIGUSR1)
    return int(holder.stdout.readline())


def _ended(pid: int) -> None:
    """Kill a child of FORKS_ON_SIGNAL (which reaps it) and wait until its pid is free."""
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"))


@needs_bpf
def test_a_verified_holder_whose_pid_a_fork_took_since_is_the_new_process(spawn: Spawn) -> None:
    """The console re-checks the cached holders before the dump and looks for processes started
    since the pass after it. A holder that exits in between, its pid taken by a fork of another
    holder (which inherits the socket), is listed as the new process, once: not as the one checked."""
    if not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("needs root to choose the next pid")
    holder, first_child, fd, cookies = _forking_holder(spawn)
    (inode,) = cookies
    cache = OwnerCache(max_age=60)
    assert find_owners(cookies, cookies=cookies, cache=cache).method == "bpf"
    first_start = read_process(first_child).start_time
    check_cache(cache)  # before the dump, as the console's forked re-check does
    assert cache.verified is not None
    _ended(first_child)
    wait_for(lambda: owner_cache.boot_ticks() > first_start)  # the next process has another start time
    for _ in range(20):  # other processes may take the pid first: retry, bounded
        with open("/proc/sys/kernel/ns_last_pid", "w") as handle:
            handle.write(str(first_child - 1))
        reborn = _fork(holder)
        if reborn == first_child:
            break
        _ended(reborn)
    else:
        pytest.skip(f"could not get pid {first_child} again in 20 tries (busy machine)")
    found = find_owners(cookies, cookies=cookies, cache=cache)
    assert found.method == "cache"
    assert [(o.process.pid, o.fd) for o in found.owners[inode]] == sorted([(holder.pid, fd), (reborn, fd)])
    assert read_process(reborn).start_time != first_start
    assert found.owners == find_owners(cookies, method="procfs").owners  # the new process, start time and all


@needs_bpf
def test_more_processes_started_since_the_pass_than_the_budget_mean_a_full_pass(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each descriptor of a process started since the pass costs a readlink: past a budget (a few
    thousand) a full pass is cheaper, and answers."""
    holder, first_child, fd, cookies = _forking_holder(spawn)
    (inode,) = cookies
    cache = OwnerCache(max_age=60)
    assert find_owners(cookies, cookies=cookies, cache=cache).method == "bpf"
    born = _fork(holder)
    n_fds = len(os.listdir(f"/proc/{born}/fd"))
    assert owners._within_budget([born])
    monkeypatch.setattr(owners, "_BORN_MAX_FDS", n_fds - 1)
    assert not owners._within_budget([born])
    over = find_owners(cookies, cookies=cookies, cache=cache)
    assert over.method == "bpf"
    assert [(o.process.pid, o.fd) for o in over.owners[inode]] == sorted(
        [(holder.pid, fd), (first_child, fd), (born, fd)]
    )
    monkeypatch.setattr(owners, "_BORN_MAX_FDS", n_fds)
    assert owners._within_budget([born])
    monkeypatch.setattr(owners, "_BORN_MAX_PIDS", 0)
    assert not owners._within_budget([born])


@needs_bpf
def test_a_cached_owner_whose_pid_was_reused_is_not_reported(spawn: Spawn) -> None:
    """The cache names a process that has exited; a new process got its pid and holds another socket
    on the same fd number. It is not listed; the holder that is still there is."""
    first, fd, first_inode = _start(spawn, "cw-first")
    first_start = read_process(first.pid).start_time
    keeper, keeper_fd, _ = _start(spawn, "cw-keeper")
    keeper_start = read_process(keeper.pid).start_time
    _end(first)
    second, second_fd, second_inode = _reuse(first.pid, spawn, "cw-second")
    assert (second.pid, second_fd) == (first.pid, fd)
    cache = OwnerCache()
    cache.pass_ticks = owner_cache.boot_ticks()
    # One socket with two cached holders, one of them the exited process.
    answer = _from_cache({first_inode: [(keeper.pid, keeper_fd, keeper_start), (first.pid, fd, first_start)]}, cache)
    # The keeper's fd does not hold first_inode (it holds its own socket): a full pass is needed.
    assert answer is None
    keeper_inode = os.stat(f"/proc/{keeper.pid}/fd/{keeper_fd}").st_ino
    answer = _from_cache({keeper_inode: [(keeper.pid, keeper_fd, keeper_start), (first.pid, fd, first_start)]}, cache)
    assert answer is not None
    found, _grew = answer
    assert [(pid, process.cmdline[0], hits) for pid, process, hits in found] == [
        (keeper.pid, "cw-keeper", [(keeper_fd, keeper_inode)])
    ]
    # Every cached holder gone (the pid now names another process): a full pass, never the new one.
    assert _from_cache({second_inode: [(first.pid, fd, first_start)]}, cache) is None


@needs_bpf
def test_a_socket_that_entered_close_wait_since_the_pass_gets_its_owner(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leak in progress: the cached leaker's new CLOSE_WAIT socket is looked for in the fd tables
    of the cached holders only (no full pass), found there with every reference to it, and kept in
    the cache without making the cache any younger."""
    server = spawn(argv=python_argv(LEAKING_SERVER, "127.0.0.1", "keep,keep"))
    assert server.stdout is not None
    port = int(server.stdout.readline())
    first = socket.create_connection(("127.0.0.1", port))
    second = socket.create_connection(("127.0.0.1", port))
    first.close()
    close_wait_of(server.pid, port)
    cache = OwnerCache(max_age=60)
    before = _sockets([port])
    assert find_owners(before, cookies=before, cache=cache).method == "bpf"
    assert find_owners(before, cookies=before, cache=cache).method == "cache"
    pass_ticks = cache.pass_ticks
    second.close()
    close_wait_of(server.pid, port, count=2)
    after = _sockets([port])
    (new_inode,) = set(after) - set(before)
    looked_in: list[list[int]] = []
    in_processes = bpf.holders_in_processes
    monkeypatch.setattr(bpf, "socket_holders", _no_full_pass)
    monkeypatch.setattr(
        bpf, "holders_in_processes", lambda inodes, pids: looked_in.append(sorted(pids)) or in_processes(inodes, pids)
    )
    found = find_owners(after, cookies=after, cache=cache)
    assert found.method == "cache"
    assert looked_in == [[server.pid]]
    assert [o.process.pid for o in found.owners[new_inode]] == [server.pid]
    assert found.owners == find_owners(after, method="procfs").owners
    # The new socket is kept: the next lookup is a plain cached answer, and the age is still the pass's.
    assert cache.pass_ticks == pass_ticks
    assert set(cache.holders_of(after) or ()) == set(after)
    again = find_owners(after, cookies=after, cache=cache)
    assert again.method == "cache"
    assert looked_in == [[server.pid]]
    assert again.owners == found.owners


def _no_full_pass(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("a full BPF pass ran")


#: Accepts a connection it leaks ("a"), then another it shares with a child forked right away, which
#: closes its copy of the first: the child holds only the second. Prints the child's pid and the
#: two fds. The child dies with the parent.
SHARES_WITH_A_CHILD = """
import ctypes, os, signal, socket, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
print(server.getsockname()[1], flush=True)
a, _ = server.accept()
print("a", flush=True)
b, _ = server.accept()
child = os.fork()
if child == 0:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    a.close()
    while True:
        time.sleep(60)
print(child, a.fileno(), b.fileno(), flush=True)
time.sleep(120)
"""


@needs_bpf
def test_a_new_socket_a_process_outside_the_cache_holds_too_means_a_full_pass(spawn: Spawn) -> None:
    """A socket the cache has not seen may be older than the pass: this one was established then and
    shared with a child forked before the pass, which holds no cached socket. The leaker's fd table
    has it, but so does the child's: the reference count says a reference is elsewhere, and a full
    pass answers, with both. A socket held only by a process outside the cache, likewise."""
    server = spawn(argv=python_argv(SHARES_WITH_A_CHILD))
    assert server.stdout is not None
    port = int(server.stdout.readline())
    # Started before the pass (one started since is walked, and would be looked in).
    other = spawn(argv=python_argv(LEAKING_SERVER, "127.0.0.1", "keep"))
    assert other.stdout is not None
    other_port = int(other.stdout.readline())
    leaked = socket.create_connection(("127.0.0.1", port))
    assert server.stdout.readline().strip() == "a"
    shared = socket.create_connection(("127.0.0.1", port))
    child, a_fd, b_fd = map(int, server.stdout.readline().split())
    leaked.close()
    close_wait_of(server.pid, port)
    # The pass comes after the clock tick both processes started in (or they count as started since).
    latest = max(read_process(pid).start_time for pid in (child, other.pid))
    wait_for(lambda: owner_cache.boot_ticks() > latest)
    cache = OwnerCache(max_age=60)
    before = _sockets([port])
    assert find_owners(before, cookies=before, cache=cache).method == "bpf"
    shared.close()
    close_wait_of(server.pid, port, count=2)
    after = _sockets([port])
    (new_inode,) = set(after) - set(before)
    found = find_owners(after, cookies=after, cache=cache)
    assert found.method == "bpf"
    assert [(o.process.pid, o.fd) for o in found.owners[new_inode]] == sorted([(server.pid, b_fd), (child, b_fd)])
    assert found.owners == find_owners(after, method="procfs").owners
    assert [(o.process.pid, o.fd) for o in found.owners[(set(before)).pop()]] == [(server.pid, a_fd)]

    # Another server's socket: nobody the cache knows holds it.
    with socket.create_connection(("127.0.0.1", other_port)):
        pass
    close_wait_of(other.pid, other_port)
    assert find_owners(after, cookies=after, cache=cache).method == "cache"
    both = _sockets([port, other_port])
    elsewhere = find_owners(both, cookies=both, cache=cache)
    assert elsewhere.method == "bpf"
    assert elsewhere.owners == find_owners(both, method="procfs").owners


@needs_bpf
def test_the_iterator_over_named_processes_reads_only_their_fd_tables(spawn: Spawn) -> None:
    """``holders_in_processes`` reads the fd tables of the pids it is given (and of this process, for
    its marker), no other; a socket with a reference in a table it did not read is named."""
    with socket.socket() as shared, socket.socket() as theirs:
        inode = os.fstat(shared.fileno()).st_ino
        their_inode = os.fstat(theirs.fileno()).st_ino
        first = spawn(argv=python_argv(SLEEPER), pass_fds=(shared.fileno(),))
        second = spawn(argv=python_argv(SLEEPER), pass_fds=(shared.fileno(), theirs.fileno()))
        for sleeper in (first, second):
            assert sleeper.stdout is not None
            assert sleeper.stdout.readline().strip() == "up"
        theirs.close()  # only the second sleeper holds it now
        me = (os.getpid(), shared.fileno(), read_process(os.getpid()).start_time)
        at_first = (first.pid, shared.fileno(), read_process(first.pid).start_time)
        at_second = (second.pid, shared.fileno(), read_process(second.pid).start_time)
        held, elsewhere = bpf.holders_in_processes({inode, their_inode}, [first.pid])
        assert held == {inode: sorted([me, at_first])}
        assert elsewhere == {inode}
        held, elsewhere = bpf.holders_in_processes({inode, their_inode}, [first.pid, second.pid, 2**22 + 1])
        assert held[inode] == sorted([me, at_first, at_second])
        assert [pid for pid, _, _ in held[their_inode]] == [second.pid]
        assert elsewhere == set()


#: Holds the descriptors it was given, says it started, and sleeps.
SLEEPER = "import time; print('up', flush=True); time.sleep(120)"

#: As a user with CAP_BPF and CAP_PERFMON: a fresh pass, a lookup that may use the cache, and what
#: re-checking the cached holders says (the inodes that need a full pass).
CACHE_AS_A_USER = """
import json, sys
from closewait.sources import owners
from closewait.sources.owner_cache import OwnerCache
inode, cookie = map(int, sys.argv[1:])
cookies = {inode: cookie}
cache = OwnerCache(max_age=600)
first = owners.find_owners(cookies, cookies=cookies, cache=cache)
again = owners.find_owners(cookies, cookies=cookies, cache=cache)
_, failed = owners._verify_holders(cache.holders_of(cookies) or {})
from closewait.sources.owner_check import fork_check
cache.checking = fork_check(cache)
cache.checking.join()
print(json.dumps({
    "methods": [first.method, again.method],
    "owners": [sorted(o.process.pid for o in found.owners.get(inode, ())) for found in (first, again)],
    "failed": sorted(failed),
    "failed in a child": sorted(cache.verified[1][1]),
}))
"""


@pytest.mark.root
def test_a_holder_the_user_may_not_read_means_a_full_pass(spawn: Spawn, nobody: Nobody) -> None:
    """The exporter as a user with CAP_BPF and CAP_PERFMON: the pass sees every holder, but the
    fd directory of root's holder may not be opened. That holder is not taken for exited: another
    holder that checks out must not answer for the socket without it."""
    with socket.socket() as shared:
        shared.bind(("127.0.0.1", 0))
        inode = os.fstat(shared.fileno()).st_ino
        (cookie,) = struct.unpack("Q", shared.getsockopt(socket.SOL_SOCKET, 57, 8))  # SO_COOKIE
        fd = shared.fileno()
        roots = spawn(argv=python_argv(SLEEPER), pass_fds=(fd,))
        users = spawn(argv=[*nobody.argv, "-c", SLEEPER], env=nobody.env, pass_fds=(fd,), cwd="/")
        for holder in (roots, users):
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "up"
    caps = ["--inh-caps=+bpf,+perfmon", "--ambient-caps=+bpf,+perfmon"]
    done = subprocess.run(
        [nobody.argv[0], *caps, *nobody.argv[1:], "-c", CACHE_AS_A_USER, str(inode), str(cookie)],
        env=nobody.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    if done.returncode != 0 and "BpfUnavailable" in done.stderr:
        pytest.skip(f"no BPF iterator with CAP_BPF and CAP_PERFMON here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    both = sorted([roots.pid, users.pid])
    # Root's holder cannot be re-checked by this user: its socket needs a full pass, every time.
    assert result["failed"] == [inode]
    assert result == {
        "methods": ["bpf", "bpf"],
        "owners": [both, both],
        "failed": [inode],
        "failed in a child": [inode],
    }


# --- the file -------------------------------------------------------------------------------------


def _written(directory: Path) -> Path:
    """A cache file as the CLI writes it, for two sockets (one held, one nobody holds)."""
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / "owners.bin"
    cache = OwnerCache(path=str(path))
    cache.remember(owner_cache.boot_ticks(), {11: 101, 12: 102}, {11: [(os.getpid(), 3, 4)]})
    cache.save()
    return path


def _read(path: Path) -> dict[int, tuple[tuple[int, int, int], ...]] | None:
    return OwnerCache(path=str(path), max_age=3600).holders_of({11: 101, 12: 102})


@pytest.mark.skipif(os.geteuid() != 0, reason="the file cache is root's")
def test_the_file_round_trips_and_is_private(tmp_path: Path) -> None:
    path = _written(tmp_path / "cw")
    assert path.stat().st_mode & 0o777 == 0o600
    assert _read(path) == {11: ((os.getpid(), 3, 4),), 12: ()}
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    # An answer too big to be worth re-checking fd by fd is not kept: the file says so.
    big = OwnerCache(path=str(path))
    big.remember(owner_cache.boot_ticks(), {11: 101}, {11: [(1, fd, 1) for fd in range(owner_cache.MAX_RECORDS + 1)]})
    big.save()
    assert _read(path) is None
    assert OwnerCache(path=str(path)).holders_of(None) is None
    # A directory made by the cache itself is root's alone.
    made = tmp_path / "made" / "owners.bin"
    cache = OwnerCache(path=str(made))
    cache.remember(owner_cache.boot_ticks(), {11: 101}, {})
    cache.save()
    assert made.parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="the file cache is root's")
@pytest.mark.parametrize("shared", [True, False], ids=["sockets-with-several-holders", "one-holder-each"])
def test_the_file_keeps_every_holder_by_process(tmp_path: Path, shared: bool) -> None:
    """The file lays the holders out by process: read back, every socket has the holders it was
    given, and the re-check's by-process view is the one the cache made in memory."""
    directory = tmp_path / "cw"
    directory.mkdir(mode=0o700)
    path = directory / "owners.bin"
    cookies = {11: 101, 12: 102, 13: 103, 14: 104}  # 14: held by nobody
    holders = {11: [(7, 5, 70)], 12: [(7, 4, 70)], 13: [(9, 8, 90)]}
    if shared:
        holders[11].append((9, 3, 90))
        holders[13].append((9, 6, 90))
    cache = OwnerCache(path=str(path))
    cache.remember(owner_cache.boot_ticks(), cookies, holders)
    cache.save()
    read = OwnerCache(path=str(path), max_age=3600)
    kept = read.holders_of(None)
    assert kept is not None
    assert {inode: sorted(found) for inode, found in kept.items()} == {
        inode: sorted(holders.get(inode, ())) for inode in cookies
    }
    assert read.holders_of(cookies) == kept
    assert read.by_process() == cache.by_process()
    expected = [((7, 70), [(4, 12), (5, 11)]), ((9, 90), [(8, 13)])]
    if shared:
        expected[1] = ((9, 90), [(3, 11), (6, 13), (8, 13)])
    assert read.by_process() == expected


@pytest.mark.skipif(os.geteuid() != 0, reason="the file cache is root's")
def test_a_write_left_behind_does_not_stop_later_ones_and_a_failed_one_leaves_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "cw"
    directory.mkdir(mode=0o700)
    path = directory / "owners.bin"
    # What a write interrupted between create and rename left, under the name this pid would use.
    (directory / f"owners.bin.{os.getpid()}.tmp").write_bytes(b"half")
    cache = OwnerCache(path=str(path))
    cache.remember(owner_cache.boot_ticks(), {11: 101, 12: 102}, {11: [(os.getpid(), 3, 4)]})
    cache.save()
    assert _read(path) == {11: ((os.getpid(), 3, 4),), 12: ()}
    assert sorted(p.name for p in directory.iterdir()) == ["owners.bin", f"owners.bin.{os.getpid()}.tmp"]
    # The rename fails (a directory is in the way): nothing is written, no error, and no file is left.
    blocked = tmp_path / "blocked"
    (blocked / "owners.bin" / "inside").mkdir(parents=True, mode=0o700)
    os.chmod(blocked, 0o700)
    cache = OwnerCache(path=str(blocked / "owners.bin"))
    cache.remember(owner_cache.boot_ticks(), {11: 101}, {})
    cache.save()
    assert [p.name for p in blocked.iterdir()] == ["owners.bin"]
    assert [p.name for p in (blocked / "owners.bin").iterdir()] == ["inside"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the file cache is root's")
def test_hostile_or_corrupt_files_are_ignored(tmp_path: Path) -> None:
    good = _written(tmp_path / "cw").read_bytes()
    header_format = "<16sI16sQQII"  # magic, version, boot id, pid namespace, pass, processes, records
    header = struct.calcsize(header_format)
    magic, version, boot_id, pid_ns, pass_ticks, _, _ = struct.unpack_from(header_format, good)

    def file_of(cookies: tuple[int, int], inodes: tuple[int, int]) -> bytes:
        """Two records as owner_cache lays them out: one socket nobody holds, one fd 3 of this process."""
        return b"".join(
            [
                struct.pack(header_format, magic, version, boot_id, pid_ns, pass_ticks, 2, 2),
                struct.pack("<IIQ", 0, 1, 0),
                struct.pack("<IIQ", os.getpid(), 1, 4),
                struct.pack("<2Q", *cookies),
                struct.pack("<2Q", *inodes),
                struct.pack("<2I", 0, 3),
            ]
        )

    assert file_of((102, 101), (12, 11)) == good

    def variant(name: str, data: bytes, mode: int = 0o600, dir_mode: int = 0o700) -> Path:
        directory = tmp_path / name
        directory.mkdir(mode=dir_mode)
        os.chmod(directory, dir_mode)
        path = directory / "owners.bin"
        path.write_bytes(data)
        os.chmod(path, mode)
        return path

    wrong_boot = bytearray(good)
    wrong_boot[20] ^= 0xFF
    wrong_version = bytearray(good)
    wrong_version[16] += 1
    two_sockets_one_cookie = file_of((101, 101), (99, 11))
    cases = {
        "readable_by_others": variant("a", good, mode=0o644),
        "writable_directory": variant("b", good, dir_mode=0o777),
        "truncated": variant("c", good[:-5]),
        "header_only": variant("d", good[:header]),
        "noise": variant("e", os.urandom(300)),
        "empty": variant("f", b""),
        "another_boot": variant("g", bytes(wrong_boot)),
        "another_version": variant("h", bytes(wrong_version)),
        "cookie_reused": variant("i", two_sockets_one_cookie),
        "too_big": variant("j", good + bytes(owner_cache.MAX_RECORDS * 64)),
    }
    owned_by_nobody = variant("k", good)
    os.chown(owned_by_nobody, 65534, 65534)
    cases["owned_by_nobody"] = owned_by_nobody
    link_dir = tmp_path / "l"
    link_dir.mkdir(mode=0o700)
    (link_dir / "owners.bin").symlink_to(tmp_path / "cw" / "owners.bin")
    cases["symlink"] = link_dir / "owners.bin"
    directory_instead = tmp_path / "m"
    (directory_instead / "owners.bin").mkdir(parents=True, mode=0o700)
    os.chmod(directory_instead, 0o700)
    cases["a_directory"] = directory_instead / "owners.bin"
    assert _read(tmp_path / "cw" / "owners.bin") is not None
    for name, path in cases.items():
        assert _read(path) is None, name
    # Saving never follows a planted link or writes into a directory others may write.
    cache = OwnerCache(path=str(tmp_path / "b" / "owners.bin"))
    cache.remember(owner_cache.boot_ticks(), {11: 101}, {})
    cache.save()
    assert (tmp_path / "b" / "owners.bin").read_bytes() == good


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_users_other_than_root_keep_the_walk_and_no_file(spawn: Spawn, nobody: Nobody) -> None:
    server = spawn(argv=python_argv(LEAKING_SERVER, "127.0.0.1", "keep"))
    assert server.stdout is not None
    port = int(server.stdout.readline())
    with socket.create_connection(("127.0.0.1", port)):
        pass
    close_wait_of(server.pid, port)
    code = "from closewait.sources.owner_cache import file_cache; print(file_cache())"
    done = subprocess.run([*nobody.argv, "-c", code], env=nobody.env, capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "None"), done.stderr
    console = "import sys; sys.argv = ['closewait', 'scan', '--json']; from closewait._console import main; main()"
    done = subprocess.run(
        [*nobody.argv, "-c", console], env=nobody.env, capture_output=True, text=True, check=False, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["owners_via"] == "procfs"
    assert "permission denied" in document["owners_fallback_reason"]
    assert REPO.exists()


@needs_bpf
def test_the_console_reuses_a_recent_pass_and_says_so(spawn: Spawn) -> None:
    """``closewait scan --json`` as root keeps the cache in its file: a later run answers from it
    (when nothing else on this shared host changed its CLOSE_WAIT sockets meanwhile), with the same
    owners a fresh pass gives."""
    server = spawn(argv=python_argv(LEAKING_SERVER, "127.0.0.1", "keep,eof"))
    assert server.stdout is not None
    port = int(server.stdout.readline())
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port)):
            pass
    close_wait_of(server.pid, port, count=2)
    console = "import sys; sys.argv = ['closewait', 'scan', '--json']; from closewait._console import main; main()"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))

    def run() -> dict[str, object]:
        done = subprocess.run([sys.executable, "-c", console], env=env, capture_output=True, text=True, check=True)
        document: dict[str, object] = json.loads(done.stdout)
        return document

    def mine(document: dict[str, object]) -> list[tuple[int, list[tuple[int, int]]]]:
        sockets = document["sockets"]
        assert isinstance(sockets, list)
        return sorted(
            (s["inode"], [(o["pid"], o["fd"]) for o in s["owners"]]) for s in sockets if s["local"]["port"] == port
        )

    fresh = run()
    for _ in range(20):  # other tests on this host may open CLOSE_WAIT sockets between two runs
        reused = run()
        if reused["owners_via"] == "cache":
            break
    else:
        pytest.skip("the host's CLOSE_WAIT sockets changed between every two runs")
    assert mine(reused) == mine(fresh) == mine(json.loads(run_cli("scan", "--port", str(port), "--json").stdout))
    assert len(mine(reused)) == 2
    assert all(owners == [(server.pid, owners[0][1])] for _, owners in mine(reused))
    assert os.stat(owner_cache.CACHE_PATH).st_mode & 0o777 == 0o600


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_a_file_from_another_pid_namespace_is_ignored(tmp_path: Path) -> None:
    """Cached pids are the pid namespace's: in another one the file is not read at all."""
    path = _written(tmp_path / "cw")
    assert _read(path) is not None
    code = (
        "import sys; from closewait.sources.owner_cache import OwnerCache; "
        "print(OwnerCache(path=sys.argv[1], max_age=3600).holders_of({11: 101, 12: 102}))"
    )
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code, str(path)],
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "None"), done.stderr


def test_the_forked_re_checks_link_prefix_is_the_process_modules() -> None:
    """owner_check may not import sources.process (the model comes with it): its copy must agree."""
    from closewait.sources import process

    assert owner_check._SOCKET_LINK_PREFIX == process.SOCKET_LINK_PREFIX


#: Runs a command as a child subreaper (PR_SET_CHILD_SUBREAPER): a process the command leaves behind
#: becomes this one's child. Prints the command's exit code and output, and the pids it was left.
SUBREAPER = """
import ctypes, json, os, signal, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
done = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=120)
with open(f"/proc/self/task/{os.getpid()}/children") as handle:
    left = [int(pid) for pid in handle.read().split()]
for pid in left:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print(json.dumps({"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr, "left": left}))
"""


@needs_bpf
def test_the_console_ends_its_forked_re_check_when_there_is_nothing_to_look_up(spawn: Spawn) -> None:
    """A scan that finds no CLOSE_WAIT socket to look up never joins the re-check it forked: the
    console ends it anyway (SIGKILL, reaped by pid), so no child outlives it. The scan runs in a new
    network namespace, empty, while the cache holds the host's answer of a moment ago; under a child
    subreaper, anything it left behind would be found."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    _, _, _, cookies = _forking_holder(spawn)
    filled = run_cli("scan", "--json")  # as root: a full pass fills the console's cache file
    assert filled.returncode == 0, filled.stderr
    assert set(cookies) <= {s["inode"] for s in json.loads(filled.stdout)["sockets"]}
    console = [sys.executable, "-c", "import sys; from closewait._console import main; main(sys.argv[1:])"]
    done = subprocess.run(
        [sys.executable, "-c", SUBREAPER, "unshare", "--net", *console, "scan", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
    )
    result = json.loads(done.stdout)
    assert result["rc"] == 0, result["stderr"]
    assert json.loads(result["stdout"])["sockets"] == []
    assert result["left"] == []
