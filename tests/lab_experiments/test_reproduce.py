"""The reproduce part: the article's leak, checked with ss and /proc (not with closewait's scanner)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from closewait.lab import reproduce
from closewait.lab.model import Experiment, LabContext, Status, Verdict
from closewait.lab.servers import ARTICLE_C
from tests.conftest import Spawn
from tests.lab_experiments.conftest import CLIENT, StartServer
from tests.lab_experiments.kernel import (
    SsRow,
    alive,
    client_end,
    listening_port,
    server_end,
    socket_inodes,
    ss_port,
)
from tests.util import wait_for

FIN_TIMEOUT = int(Path("/proc/sys/net/ipv4/tcp_fin_timeout").read_text())


def _kill_client_after_sending(spawn: Spawn, port: int) -> int:
    """The article's scenario: a client connects, sends a line, and is killed (SIGKILL)."""
    client = spawn(argv=[sys.executable, "-c", CLIENT, str(port)])
    assert client.stdout is not None
    client_port = int(client.stdout.readline())
    os.kill(client.pid, signal.SIGKILL)
    client.wait(timeout=10)
    return client_port


def _assert_leaked(server_pid: int, port: int, client_port: int) -> None:
    def eof_read_in_close_wait() -> SsRow | None:
        row = server_end(port, client_port, processes=True)
        return row if row is not None and row.state == "CLOSE-WAIT" and row.recv_q == 0 else None

    # Recv-Q 0 in CLOSE_WAIT: the server read the FIN (recv() returned 0) and did not close.
    row = wait_for(eof_read_in_close_wait, timeout=10)
    assert f"pid={server_pid}," in row.extra

    # The client end reaches FIN-WAIT-2 when the server's ACK of the FIN is processed, which on a
    # loaded machine can come after the server has already read EOF: wait for it, do not race it.
    def client_in_fin_wait2() -> SsRow | None:
        found = client_end(port, client_port, processes=True)
        return found if found is not None and found.state == "FIN-WAIT-2" else None

    client = wait_for(client_in_fin_wait2, timeout=10)
    assert client.state == "FIN-WAIT-2"
    assert not client.owned  # the client process is dead: the kernel alone keeps this end


def test_python_port_leaves_close_wait_and_an_ownerless_fin_wait2(spawn: Spawn, leaky_server: StartServer) -> None:
    pid, port = leaky_server()
    client_port = _kill_client_after_sending(spawn, port)
    _assert_leaked(pid, port, client_port)
    # The server keeps the descriptor: the leak is the application's, not the kernel's.
    row = server_end(port, client_port)
    assert row is not None
    assert len(socket_inodes(pid)) == 2  # the listener and the leaked connection


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler")
def test_article_c_program_builds_and_leaks(spawn: Spawn, tmp_path: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler is not None
    binary = tmp_path / "article_server"
    subprocess.run([compiler, "-o", str(binary), str(ARTICLE_C)], check=True, timeout=120)
    server = spawn(argv=[str(binary), "0"])
    port = wait_for(lambda: listening_port(server.pid), timeout=10)
    client_port = _kill_client_after_sending(spawn, port)
    _assert_leaked(server.pid, port, client_port)


def _check_common(exp: Experiment, ports: set[int]) -> None:
    assert exp.part == "reproduce"
    assert exp.status == Status.OK, exp.reason
    assert exp.verdict == Verdict.HOLDS
    m = exp.measurements
    assert m["server_state"] == "CLOSE_WAIT"
    assert m["client_state"] == "FIN_WAIT2"
    assert m["diagnosis"] == "eof-not-closed"
    assert m["server_recv_q"] == 0
    assert m["client_has_owner"] is False
    assert m["fin_timeout_s"] == FIN_TIMEOUT
    assert str(FIN_TIMEOUT) in exp.observed
    assert m["fin_wait2_gone"] is None  # only --full waits tcp_fin_timeout out
    for name in ("fin_sent", "rst_sent"):
        assert isinstance(m[name], bool) or (m[name] is None and not exp.packets_captured)
    if exp.packets_captured:
        client_port = next(int(a.rsplit(":", 1)[1]) for a, role in exp.actors.items() if role == "client")
        # The killed client's kernel sent the FIN; the segments carry it.
        assert m["fin_sent"] is True
        assert any(s.src.port == client_port and "FIN" in s.flags for s in exp.packets)
    ports.update(int(a.rsplit(":", 1)[1]) for a, role in exp.actors.items() if role == "server")


def test_reproduce_run_matches_the_kernel_and_leaves_nothing_behind() -> None:
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    ports: set[int] = set()
    with LabContext() as ctx:
        experiments = {e.id: e for e in reproduce.run(ctx)}
        server_pids = [pid for e in experiments.values() for pid in e.measurements.get("server_owner_pids") or []]
    assert set(experiments) == {"reproduce", "reproduce-c"}
    _check_common(experiments["reproduce"], ports)
    if shutil.which("cc") or shutil.which("gcc"):
        _check_common(experiments["reproduce-c"], ports)
    assert server_pids
    assert not any(alive(pid) for pid in server_pids)
    assert {p.pid for p in me.children(recursive=True)} <= before
    # The servers are gone; what the kernel may still hold is TIME_WAIT (no process, no fd).
    for port in ports:
        wait_for(lambda port=port: all(row.state == "TIME-WAIT" for row in ss_port(port)), timeout=10)


def test_reproduce_c_is_skipped_without_a_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no cc, gcc or clang
    with LabContext() as ctx:
        experiments = {e.id: e for e in reproduce.run(ctx)}
    native = experiments["reproduce-c"]
    assert native.status == Status.SKIPPED
    assert native.reason is not None
    assert "compiler" in native.reason
    assert experiments["reproduce"].status == Status.OK  # the Python port needs no compiler
