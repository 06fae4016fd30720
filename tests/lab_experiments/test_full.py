"""``--full`` waits out tcp_fin_timeout; in a network namespace of our own it can be 3 s, not 60.

net.ipv4.tcp_fin_timeout is per network namespace. The test runs the reproduce part and the
keepalive remedy with ``full=True`` inside a fresh namespace (``unshare --net``; it disappears with
its only process) whose tcp_fin_timeout is 3 s, so the whole kernel story plays out in seconds:
FIN_WAIT2 expires while CLOSE_WAIT stays; keepalive probes are answered until the peer's orphan
expires, then one draws an RST and the server's socket leaves the table while its fd leaks.
The same script also checks the kernel directly with ss and /proc, without the lab.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

FIN_TIMEOUT = 3

SCRIPT = f"""
import json, os, signal, socket, subprocess, sys, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
with open("/proc/sys/net/ipv4/tcp_fin_timeout", "w") as handle:
    handle.write("{FIN_TIMEOUT}")

from closewait.lab import remedies, reproduce
from closewait.lab.model import LabContext
from closewait.lab.servers import LEAKY, REMEDY
from tests.lab_experiments.kernel import client_end, server_end, socket_inodes
from tests.util import wait_for

out = {{}}
with LabContext(full=True, trials=2) as ctx:
    keepalive = next(r for r in remedies.REMEDIES if r.id == "keepalive")
    for exp in [*reproduce.run(ctx), remedies._guarded(keepalive, ctx, {FIN_TIMEOUT})]:
        out[exp.id] = {{"status": exp.status, "reason": exp.reason, "verdict": exp.verdict,
                        "m": dict(exp.measurements)}}

# The same facts straight from the kernel: the article's server, a killed client, ss and /proc.
server = subprocess.Popen([sys.executable, str(LEAKY)], stdout=subprocess.PIPE, text=True)
client = None
try:
    port = int(server.stdout.readline().rsplit(" ", 1)[1])
    client = socket.create_connection(("127.0.0.1", port))
    client_port = client.getsockname()[1]
    client.sendall(b"hello\\n")
    client.close()  # an orphan now, like the killed client's
    wait_for(lambda: (r := client_end(port, client_port)) is not None and r.state == "FIN-WAIT-2", 10)
    wait_for(lambda: client_end(port, client_port) is None, {FIN_TIMEOUT} + 15)
    row = server_end(port, client_port)
    out["ss"] = {{"server_state": row.state if row else None, "server_fds": len(socket_inodes(server.pid))}}
finally:
    server.kill()
    server.wait()
print(json.dumps(out))
"""


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_full_mode_in_a_namespace_with_a_short_fin_timeout() -> None:
    result = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])

    for exp_id in ("reproduce", "reproduce-c"):
        exp = out[exp_id]
        if exp["status"] == "skipped":
            continue
        assert exp["status"] == "ok", exp["reason"]
        m = exp["m"]
        assert m["fin_timeout_s"] == FIN_TIMEOUT  # the namespace's own value
        assert m["fin_wait2_gone"] is True
        assert m["close_wait_after_fin_timeout"] is True
        assert m["fin_wait2_lasted_s"] >= FIN_TIMEOUT
        assert m["fin_wait2_last_seen_s"] < m["fin_wait2_lasted_s"]
        assert exp["verdict"] == "holds"

    keepalive = out["keepalive"]
    assert keepalive["status"] == "ok", keepalive["reason"]
    m = keepalive["m"]
    assert m["keepalive_probes_answered"] is True
    assert m["state_after_probes"] == "CLOSE_WAIT"
    assert m["left_tcp_table"] is True  # a probe drew an RST once the peer's orphan expired
    assert m["close_wait_ms"] >= FIN_TIMEOUT * 1000
    assert m["fd_released"] is False  # and the application still holds the descriptor
    assert m["needs_full"] is False
    assert keepalive["verdict"] == "holds-with-caveat"
    if m["rst_sent"] is not None:
        assert m["rst_sent"] is True

    # ss and /proc agree: the orphaned FIN_WAIT2 went, CLOSE_WAIT and its fd stayed.
    assert out["ss"] == {"server_state": "CLOSE-WAIT", "server_fds": 2}
