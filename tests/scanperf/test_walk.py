"""The threaded /proc walk of ``closewait.sources.owners`` finds every owner, like the plain walk.

A listening socket is inherited by three forked children, so four processes hold the same inode;
the walk must list all four whether it runs in one thread or two (and with the biggest fd tables
taken first).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

import pytest

from closewait.sources import owners
from tests.conftest import Spawn

#: Forks three children that keep the inherited fd (given on argv) open; prints their pids.
SHARER = """
import os, sys, time
fd = int(sys.argv[1])
kids = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    kids.append(pid)
print(" ".join(map(str, kids)), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_every_owner_of_a_shared_socket_is_found(spawn: Spawn, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    inode = os.fstat(listener.fileno()).st_ino
    fd = listener.fileno()
    proc = spawn(argv=[sys.executable, "-c", SHARER, str(fd)], pass_fds=[fd])
    assert proc.stdout is not None
    kids = [int(p) for p in proc.stdout.readline().split()]
    try:
        monkeypatch.setattr(owners, "_walk_threads", lambda n_pids: threads)
        found = owners.find_owners({inode})
        holders = {(o.process.pid, o.fd) for o in found.owners[inode]}
        assert holders == {(pid, fd) for pid in [os.getpid(), proc.pid, *kids]}
        assert {o.process.pid for o in found.owners[inode]} == {os.getpid(), proc.pid, *kids}
        # Processes the sandbox protects even from root (its init) may be denied; ours never are.
        assert not set(found.denied_pids) & {os.getpid(), proc.pid, *kids}
    finally:
        for kid in kids:  # the spawn fixture ends their parent; the children are ended here by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, 9)
        listener.close()


#: Opens argv[1] descriptors, says so, and holds them: an fd table whose size does not change.
FD_HOLDER = """
import os, sys, time
held = [os.open("/dev/null", os.O_RDONLY) for _ in range(int(sys.argv[1]))]
print("ready", flush=True)
time.sleep(120)
"""


def test_largest_first_orders_by_open_descriptors(spawn: Spawn) -> None:
    # Processes of our own with fixed fd counts: the host's other processes open and close
    # descriptors between the ordering and the check below (a flake on a busy machine).
    holders = [spawn(argv=[sys.executable, "-c", FD_HOLDER, str(n)]) for n in (40, 10, 25, 5, 60)]
    for proc in holders:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    pids = [proc.pid for proc in holders]
    ordered = owners._largest_first(pids, "/proc")
    assert sorted(ordered) == sorted(pids)
    sizes = []
    for pid in ordered[:5]:
        try:
            sizes.append(os.stat(f"/proc/{pid}/fd").st_size)
        except OSError:
            sizes.append(0)
    assert sizes == sorted(sizes, reverse=True) or any(s == 0 for s in sizes)
