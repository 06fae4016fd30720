"""The one socket source (``closewait.sources.get_source``): its backend chain, what a caller needs
from it, namespaces with per-state counts, and that scan, the exporter, reap and the test helpers
all read sockets through it (so a backend that falls back does so for every one of them)."""

from __future__ import annotations

import socket

import pytest

import closewait
from closewait import testing
from closewait.errors import NetnsError, NotSupported, UsageError
from closewait.exporter import CloseWaitCollector
from closewait.model import TcpState
from closewait.sources import COOKIE, TCP_INFO, get_source, netlink
from closewait.sources import netns as netns_mod
from tests.conftest import Spawn
from tests.monitor.leakers import start_leaker
from tests.scan.kit import LEAKING_SERVER, close_wait_of, python_argv

CLOSE_WAIT = frozenset({TcpState.CLOSE_WAIT})
GONE = netns_mod.Netns(path="/run/netns/closewait-test-never-there", inode=1)


def test_what_a_caller_needs_picks_the_backends() -> None:
    assert get_source().name == "netlink"
    assert get_source(needs=[COOKIE, TCP_INFO]).name == "netlink"
    assert get_source("procfs").name == "procfs"
    with pytest.raises(UsageError, match="the procfs backend gives no cookie: use netlink"):
        get_source("procfs", needs=[COOKIE])
    with pytest.raises(UsageError, match="unknown backend 'psutil'"):
        get_source("psutil")


@pytest.mark.parametrize("backend", ["netlink", "procfs"])
def test_namespaces_counts_and_skipped_namespaces(spawn: Spawn, netns_name: str, backend: str) -> None:
    """Three CLOSE_WAIT sockets in a private namespace, read by label with every state counted; a
    labelled namespace that is gone is skipped with a line, an unlabelled one fails the read."""
    start_leaker(spawn, initial=3, prefix=("ip", "netns", "exec", netns_name))
    lab = netns_mod.resolve(f"/run/netns/{netns_name}")
    source = get_source(backend, namespaces=[(lab, "lab"), (GONE, "gone")], count_states=True)
    sockets = source.sockets(CLOSE_WAIT)
    assert source.name == backend
    assert len(sockets) == 3
    assert {s.state for s in sockets} == {TcpState.CLOSE_WAIT}
    assert source.netns_of_inode == {s.inode: "lab" for s in sockets}
    assert set(source.counts) == {"lab"}
    assert source.counts["lab"][TcpState.CLOSE_WAIT] == 3
    assert source.counts["lab"][TcpState.LISTEN] == 1
    assert set(source.counts["lab"]) == set(TcpState)  # zeros included
    (failure,) = source.failures
    assert failure.startswith("gone: ")
    # A second read starts afresh (watch reuses one source).
    assert len(source.sockets(CLOSE_WAIT)) == 3
    assert len(source.failures) == 1
    with pytest.raises(NetnsError, match="the namespace is gone"):
        get_source(backend, namespaces=[(GONE, "")]).sockets(CLOSE_WAIT)


def test_without_sock_diag_every_reader_falls_back_together(spawn: Spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without sock_diag (a fake here: the kernel cannot be made to refuse on demand):
    scan, the test helpers and the exporter read /proc/net/tcp instead; reap, which needs cookies,
    refuses with the netlink error instead of acting on sockets it could not re-verify."""
    server = spawn(argv=python_argv(LEAKING_SERVER, "127.0.0.1", "keep"))
    assert server.stdout is not None
    port = int(server.stdout.readline())
    with socket.create_connection(("127.0.0.1", port)):
        pass
    (finding,) = close_wait_of(server.pid, port)

    def refuse() -> socket.socket:
        raise NotSupported("sock_diag netlink is not available: refused by the test")

    monkeypatch.setattr(netlink, "open_socket", refuse)
    source = get_source()
    assert finding.socket.inode in {s.inode for s in source.sockets(CLOSE_WAIT)}
    assert source.name == "procfs"
    snapshot = closewait.scan(ports=[port])
    assert snapshot.backend == "procfs"
    assert [f.socket.inode for f in snapshot.findings] == [finding.socket.inode]
    assert testing.close_wait_inodes(server.pid) == {finding.socket.inode: finding.owners[0].fd}
    counts = CloseWaitCollector(min_interval=0).scan_once().counts
    assert counts[""][TcpState.CLOSE_WAIT] >= 1
    with pytest.raises(NotSupported, match="refused by the test"):
        get_source(needs=[COOKIE]).sockets(CLOSE_WAIT)
