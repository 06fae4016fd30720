"""A leak inside a network namespace this test creates: found with --netns (path or pid), owners
resolved to the host pid, and invisible to a scan of the host's namespace."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap

import pytest

import closewait
from closewait.model import Role
from tests.conftest import Spawn
from tests.scan.kit import run_cli
from tests.util import wait_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="creating network namespaces needs root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (ip) is not installed"),
]

#: Server and client in one process inside the namespace: the client closes, the server keeps its end.
NETNS_LEAKER = """
import socket, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
client = socket.create_connection(server.getsockname())
conn, _ = server.accept()
client.close()
print(server.getsockname()[1], conn.fileno(), flush=True)
time.sleep(120)
"""


def test_leak_in_a_network_namespace(spawn: Spawn, netns_name: str) -> None:
    netns = netns_name
    # `ip netns exec` enters the namespace and execs the command: the child's pid is python's.
    leaker = spawn(argv=["ip", "netns", "exec", netns, sys.executable, "-c", textwrap.dedent(NETNS_LEAKER)])
    assert leaker.stdout is not None
    port, fd = map(int, leaker.stdout.readline().split())

    def found(spec: str) -> closewait.Finding:
        def attempt() -> list[closewait.Finding]:
            return [f for f in closewait.scan(ports=[port], netns=spec).findings if f.socket.local.port == port]

        (finding,) = wait_for(attempt)
        return finding

    by_path = found(f"/run/netns/{netns}")
    by_pid = found(str(leaker.pid))
    assert by_path.socket == by_pid.socket or by_path.socket.inode == by_pid.socket.inode
    for finding in (by_path, by_pid):
        assert [(o.process.pid, o.fd) for o in finding.owners] == [(leaker.pid, fd)]
        assert finding.role == Role.SERVER  # the listener is found in the namespace's own dump
        assert finding.diagnosis is not None
        assert finding.diagnosis.code == "not-reading"

    # The host's namespace does not have it, even when the walk finds the process's descriptor.
    host = closewait.scan(ports=[port], pids=[leaker.pid])
    assert by_path.socket.inode not in {f.socket.inode for f in host.findings}

    # The same through the real command, both spellings, and with the procfs backend.
    for spec, backend in ((f"/run/netns/{netns}", "auto"), (str(leaker.pid), "procfs"), (netns, "netlink")):
        result = run_cli("scan", "--netns", spec, "--port", str(port), "--backend", backend, "--json")
        assert result.returncode == 0, result.stderr
        document = json.loads(result.stdout)
        (sock,) = [s for s in document["sockets"] if s["local"]["port"] == port]
        assert sock["inode"] == by_path.socket.inode
        assert [(o["pid"], o["fd"]) for o in sock["owners"]] == [(leaker.pid, fd)]
        assert sock["role"] == "server"
    table = run_cli("scan", "--netns", f"/run/netns/{netns}", "--port", str(port))
    assert table.returncode == 0, table.stderr
    assert f"in network namespace /run/netns/{netns}" in table.stdout
    assert f"pid {leaker.pid}" in table.stdout
    host_cli = run_cli("scan", "--port", str(port), "--pid", str(leaker.pid), "--json")
    assert host_cli.returncode == 0, host_cli.stderr
    assert json.loads(host_cli.stdout)["sockets"] == []


#: Inside a private namespace, take loopback down so FINs are lost: LAST_ACK and FIN_WAIT1 hold still.
FINS_LOST = """
import os, socket, time
server = socket.create_server(("127.0.0.1", 0))
port = server.getsockname()[1]
a = socket.create_connection(("127.0.0.1", port)); b, _ = server.accept()
c = socket.create_connection(("127.0.0.1", port)); d, _ = server.accept()
a.close()
time.sleep(0.2)                  # b: CLOSE_WAIT, a's FIN unread (Recv-Q 1)
os.system("ip link set lo down")
b.close()                        # b: LAST_ACK, its FIN cannot leave
c.close()                        # c: FIN_WAIT1 with nothing but its FIN unacknowledged
print(port, flush=True)
time.sleep(120)
"""


def test_fin_counts_in_the_queues_of_last_ack_and_fin_wait_1(spawn: Spawn, netns_name: str) -> None:
    """The FIN is one sequence number: Recv-Q 1 in LAST_ACK is the peer's FIN (no unread data),
    Send-Q 1 in FIN_WAIT1 is this side's FIN (not data the peer refuses)."""
    netns = netns_name
    proc = spawn(argv=["ip", "netns", "exec", netns, sys.executable, "-c", textwrap.dedent(FINS_LOST)])
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    states = closewait.parse_states(["last-ack", "fin-wait-1"])
    snapshot = closewait.scan(states, ports=[port], netns=f"/run/netns/{netns}")
    by_state = {f.socket.state: f for f in snapshot.findings}
    assert set(by_state) == {closewait.TcpState.LAST_ACK, closewait.TcpState.FIN_WAIT1}
    last_ack = by_state[closewait.TcpState.LAST_ACK]
    assert (last_ack.socket.recv_q, last_ack.socket.send_q, last_ack.socket.unread_bytes) == (1, 1, 0)
    assert last_ack.diagnosis is not None
    assert last_ack.diagnosis.code == "last-ack"
    fin_wait_1 = by_state[closewait.TcpState.FIN_WAIT1]
    assert fin_wait_1.socket.send_q == 1
    assert fin_wait_1.diagnosis is None  # only the FIN is in flight: the peer is not refusing data


_WAIT = "import time; print(1, flush=True); time.sleep(120)"


def test_the_survey_names_a_namespace_by_its_ip_netns_name(spawn: Spawn, netns_name: str) -> None:
    """A namespace ``ip netns add`` named is surveyed as /run/netns/NAME, one without a name as its
    lowest pid's /proc/PID/ns/net; a stray file under /run/netns (no namespace mounted on it) names
    nothing."""
    from closewait.sources import netns

    named = spawn(argv=["ip", "netns", "exec", netns_name, sys.executable, "-c", _WAIT])
    unnamed = spawn(argv=["unshare", "--net", sys.executable, "-c", _WAIT])  # unshare execs: one process
    for proc in (named, unnamed):
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "1"
    stray = f"{netns.NAMED_DIR}/cwtest-stray-{os.getpid()}"
    with open(stray, "w"):
        pass
    try:
        names = netns.named_namespaces()
        assert stray not in names.values()
        inode_named = os.stat(f"/proc/{named.pid}/ns/net").st_ino
        inode_unnamed = os.stat(f"/proc/{unnamed.pid}/ns/net").st_ino
        by_inode = {ns.inode: ns.path for ns, _ in netns.survey().found}
    finally:
        os.unlink(stray)
    assert names[inode_named] == f"/run/netns/{netns_name}"
    assert by_inode[inode_named] == f"/run/netns/{netns_name}"
    assert by_inode[inode_unnamed] == f"/proc/{unnamed.pid}/ns/net"  # the only process in it
    assert inode_unnamed not in names
