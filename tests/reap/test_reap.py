"""closewait reap against real leaky servers: sockets are released, everything else keeps working."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from closewait import reap
from closewait.errors import NotSupported
from closewait.model import Snapshot, TcpState
from closewait.sources import netlink
from tests.conftest import Spawn
from tests.reap.helpers import (
    PY_SERVER,
    LeakyServer,
    compile_c_server,
    run_cli,
    ss_lines,
    start_c,
    start_python,
)
from tests.util import wait_for


def reap_plan(server: LeakyServer, method: str = "shutdown") -> reap.ReapPlan:
    snapshot = reap.survey(pids=[server.pid], ports=[server.port])
    return reap.plan(snapshot, pids=[server.pid], ports=[server.port], method=method)


def assert_server_healthy_after_reap(server: LeakyServer, reaped_fds: list[int], send_error: str) -> None:
    """The reaped sockets are gone, the rest still works, and touching a reaped fd is harmless."""
    assert server.alive()
    # Gone from the TCP table, in sock_diag's view and in ss's.
    assert server.close_wait() == ()
    assert ss_lines(server.port, "close-wait") == []
    # The LISTEN socket still accepts and the ESTABLISHED control connection still answers.
    assert len(ss_lines(server.port, "listening")) == 1
    assert len(ss_lines(server.port, "established")) == 1
    assert server.ask("PING") == f"PONG {server.pid}"
    assert server.ask_new_connection("PING") == f"PONG {server.pid}"
    # The application's fd number is still valid: recv() sees EOF, send() fails, nothing crashes.
    for fd in reaped_fds:
        assert server.ask(f"TOUCH {fd}") == f"TOUCH {fd} recv=EOF send={send_error}"
    assert server.alive()
    assert server.ask("PING") == f"PONG {server.pid}"
    # The connection opened above leaked too (the server's bug); the reaped ones stay gone.
    assert len(server.close_wait()) <= 1


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_shutdown_reaps_python_server_which_keeps_serving(spawn: Spawn, host: str) -> None:
    server = start_python(spawn, host)
    leaked = server.leak(3)
    assert {f.socket.state for f in leaked} == {TcpState.CLOSE_WAIT}

    plan = reap_plan(server)
    assert plan.method == reap.Method.SHUTDOWN
    assert sorted(t.socket.inode for t in plan.targets) == sorted(f.socket.inode for f in leaked)
    assert {t.process.pid for t in plan.targets} == {server.pid}
    result = reap.apply(plan)

    assert [o.outcome for o in result.outcomes] == [reap.Outcome.DONE] * 3
    assert result.exit_code == 0
    assert_server_healthy_after_reap(server, [t.fd for t in plan.targets], send_error="EPIPE")


def test_shutdown_reaps_compiled_c_server_through_the_cli(spawn: Spawn, tmp_path: Path) -> None:
    binary = compile_c_server(tmp_path)
    if binary is None:
        pytest.skip("no C compiler")
    server = start_c(spawn, binary)
    server.leak(2)

    proc = run_cli(["reap", "--pid", str(server.pid), "--port", str(server.port), "--yes", "--json"])
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["applied"] is True
    assert report["done"] == 2
    assert {o["outcome"] for o in report["outcomes"]} == {"done"}
    assert {o["pid"] for o in report["outcomes"]} == {server.pid}
    assert_server_healthy_after_reap(server, [o["fd"] for o in report["outcomes"]], send_error="EPIPE")


def test_dry_run_prints_the_plan_and_changes_nothing(spawn: Spawn) -> None:
    server = start_python(spawn)
    leaked = server.leak(2)

    proc = run_cli(["reap", "--pid", str(server.pid)])
    assert proc.returncode == 0, proc.stderr
    assert "plan: shutdown 2 CLOSE_WAIT sockets held by 1 process" in proc.stdout
    assert "dry run: nothing was changed" in proc.stdout
    for finding in leaked:
        fd = finding.owners[0].fd
        assert f"{finding.socket.local}" in proc.stdout
        assert f" {fd} " in proc.stdout
    # Same sockets, same inodes, still CLOSE_WAIT; the fds were not touched.
    assert {f.socket.inode for f in server.close_wait()} == {f.socket.inode for f in leaked}
    assert len(ss_lines(server.port, "close-wait")) == 2
    plan_json = json.loads(run_cli(["reap", "--pid", str(server.pid), "--json"]).stdout)
    assert plan_json["applied"] is False
    assert len(plan_json["targets"]) == 2


def test_sockets_that_change_between_plan_and_apply_are_skipped(spawn: Spawn) -> None:
    server = start_python(spawn)
    server.leak(3)
    plan = reap_plan(server)
    closed_fd, shut_fd, kept_fd = (t.fd for t in plan.targets)

    # After planning: the app closes one leaked socket for real and a new connection takes its fd
    # number (the lowest free one); it shuts down another itself (LAST_ACK, then out of the table).
    assert server.ask(f"CLOSE {closed_fd}") == f"CLOSED {closed_fd}"
    newcomer = server.connect()
    assert server.ask("PING", newcomer) == f"PONG {server.pid}"
    assert server.ask(f"SHUTWR {shut_fd}") == f"SHUTWR {shut_fd}"
    wait_for(lambda: len(server.close_wait()) == 1)

    result = reap.apply(plan)
    by_fd = {o.target.fd: o for o in result.outcomes}
    assert by_fd[closed_fd].outcome == reap.Outcome.SKIPPED
    assert by_fd[closed_fd].code == "fd-reused"
    assert by_fd[shut_fd].outcome == reap.Outcome.SKIPPED
    assert by_fd[shut_fd].code in ("socket-gone", "state-changed")
    assert by_fd[kept_fd].outcome == reap.Outcome.DONE
    assert result.exit_code == 1
    # The ESTABLISHED newcomer that reused the planned fd number was not touched.
    assert server.ask("PING", newcomer) == f"PONG {server.pid}"
    planned_inodes = {t.socket.inode for t in plan.targets}
    assert planned_inodes.isdisjoint(f.socket.inode for f in server.close_wait())
    newcomer.close()


def test_a_process_that_exited_is_never_hit(spawn: Spawn) -> None:
    first = start_python(spawn)
    first.leak(1)
    plan = reap_plan(first)
    os.kill(first.pid, signal.SIGKILL)
    first.proc.wait(timeout=10)
    second = start_python(spawn)  # a new process, with its own CLOSE_WAIT socket
    second.leak(1)
    assert second.pid != first.pid

    result = reap.apply(plan)
    assert [(o.outcome, o.code) for o in result.outcomes] == [(reap.Outcome.SKIPPED, "process-gone")]
    assert len(second.close_wait()) == 1


def test_a_reused_pid_is_never_hit(spawn: Spawn) -> None:
    """Plan against a process, kill it, and get its very pid for a new leaky process (ns_last_pid)."""
    if os.geteuid() != 0 or not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("needs root to choose the next pid")
    first = start_python(spawn)
    first.leak(1)
    plan = reap_plan(first)
    (planned,) = plan.targets
    os.kill(first.pid, signal.SIGKILL)
    first.proc.wait(timeout=10)

    impostor = None
    for _ in range(20):  # other processes on the machine may take the pid first: retry, bounded
        with open("/proc/sys/kernel/ns_last_pid", "w") as handle:
            handle.write(str(first.pid - 1))
        candidate = spawn(argv=[sys.executable, str(PY_SERVER)])
        if candidate.pid == first.pid:
            impostor = LeakyServer(candidate, "127.0.0.1")
            break
        os.kill(candidate.pid, signal.SIGKILL)
        candidate.wait(timeout=10)
    if impostor is None:
        pytest.skip(f"could not get pid {first.pid} again in 20 tries (busy machine)")
    (theirs,) = impostor.leak(1)
    assert impostor.pid == planned.process.pid
    assert [o.fd for o in theirs.owners] == [planned.fd]  # same pid, same fd number: only identity differs

    for method in reap.Method:
        (outcome,) = reap.apply(dataclasses.replace(plan, method=method)).outcomes
        assert (outcome.outcome, outcome.code) == (reap.Outcome.SKIPPED, "pid-reused")
    assert [f.socket.inode for f in impostor.close_wait()] == [theirs.socket.inode]


def test_identity_check_refuses_a_pid_with_another_start_time(spawn: Spawn) -> None:
    server = start_python(spawn)
    leaked = server.leak(1)
    plan = reap_plan(server)
    (target,) = plan.targets
    impostor = dataclasses.replace(target.process, start_time=target.process.start_time + 1)
    forged = dataclasses.replace(plan, targets=(dataclasses.replace(target, process=impostor),))

    for method in reap.Method:
        result = reap.apply(dataclasses.replace(forged, method=method))
        (outcome,) = result.outcomes
        assert (outcome.outcome, outcome.code) == (reap.Outcome.SKIPPED, "pid-reused")
        assert "is now another process" in outcome.reason
    assert [f.socket.inode for f in server.close_wait()] == [leaked[0].socket.inode]


def destroy_supported() -> bool:
    """Whether this kernel has CONFIG_INET_DIAG_DESTROY, from its config when it publishes one."""
    for path in ("/proc/config.gz", f"/boot/config-{os.uname().release}"):
        try:
            if path.endswith(".gz"):
                import gzip

                with gzip.open(path, "rt") as handle:
                    return "CONFIG_INET_DIAG_DESTROY=y" in handle.read()
            return "CONFIG_INET_DIAG_DESTROY=y" in Path(path).read_text()
        except OSError:
            continue
    return True  # unknown: expect it to work; NotSupported would then fail the test loudly


def test_destroy_method(spawn: Spawn) -> None:
    server = start_python(spawn)
    server.leak(2)
    plan = reap_plan(server, method="destroy")
    if not destroy_supported():
        with pytest.raises(NotSupported, match="CONFIG_INET_DIAG_DESTROY"):
            reap.apply(plan)
        assert len(server.close_wait()) == 2
        return
    result = reap.apply(plan)
    assert [o.outcome for o in result.outcomes] == [reap.Outcome.DONE] * 2
    # SOCK_DESTROY aborts the socket: send() then fails with ECONNABORTED instead of EPIPE.
    assert_server_healthy_after_reap(server, [t.fd for t in plan.targets], send_error="ECONNABORTED")


def test_reaping_someone_elses_process_as_nobody_is_refused(spawn: Spawn) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody")
    server = start_python(spawn)  # owned by root
    server.leak(1)
    proc = run_cli(["reap", "--pid", str(server.pid), "--yes"], user="nobody")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("closewait: error: permission denied: reaping pid")
    assert "CAP_SYS_PTRACE" in lines[0]
    assert "Traceback" not in proc.stderr
    assert len(server.close_wait()) == 1


def test_nobody_may_shutdown_its_own_sockets_but_not_destroy_them(spawn: Spawn) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody")
    server = LeakyServer(
        spawn(
            argv=[
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                sys.executable,
                str(PY_SERVER),
            ]
        ),
        "127.0.0.1",
    )
    server.leak(2)
    destroy = run_cli(["reap", "--pid", str(server.pid), "--method", "destroy", "--yes"], user="nobody")
    assert destroy.returncode == 2
    assert destroy.stderr.strip().count("\n") == 0
    assert "CAP_NET_ADMIN" in destroy.stderr
    assert len(server.close_wait()) == 2

    shutdown = run_cli(["reap", "--pid", str(server.pid), "--yes"], user="nobody")
    assert shutdown.returncode == 0, shutdown.stderr
    assert "released 2, skipped 0, failed 0" in shutdown.stdout
    assert server.close_wait() == ()
    assert server.ask("PING") == f"PONG {server.pid}"


@pytest.mark.parametrize("method", ["shutdown", "destroy"])
def test_sockets_bound_to_a_device_are_found_and_reaped(spawn: Spawn, method: str) -> None:
    """SO_BINDTODEVICE sockets need idiag_if in exact sock_diag requests; reap finds it by cookie."""
    server = start_python(spawn, "127.0.0.1", device="lo")
    (finding,) = server.leak(1)
    assert netlink.interface_of(finding.socket) == socket.if_nametoindex("lo")
    assert netlink.lookup(finding.socket, interface=0) is None  # why the interface matters
    plan = reap_plan(server, method=method)
    if method == "destroy" and not destroy_supported():
        pytest.skip("kernel without CONFIG_INET_DIAG_DESTROY")
    result = reap.apply(plan)
    assert [o.outcome for o in result.outcomes] == [reap.Outcome.DONE]
    assert server.close_wait() == ()
    assert server.ask("PING") == f"PONG {server.pid}"


FORKING_LEAKER = """
import os, socket, sys, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
while conn.recv(100):
    pass
child = os.fork()  # both processes now hold the CLOSE_WAIT socket on the same fd
if child:  # only the parent writes: a line from the child could arrive first
    print(child, flush=True)
time.sleep(60)
"""


def test_plan_names_every_other_holder_of_a_shared_socket(spawn: Spawn) -> None:
    parent = spawn(FORKING_LEAKER)
    assert parent.stdout is not None
    port = int(parent.stdout.readline())
    socket.create_connection(("127.0.0.1", port)).close()
    forked = int(parent.stdout.readline())
    try:

        def leaked() -> Snapshot | None:
            found = reap.survey(pids=[parent.pid], ports=[port])
            return found if found.findings else None

        snapshot = wait_for(leaked)
        (target,) = reap.plan(snapshot, pids=[parent.pid]).targets
        assert target.process.pid == parent.pid
        assert [(o.process.pid, o.fd) for o in target.other_holders] == [(forked, target.fd)]
        proc = run_cli(["reap", "--pid", str(parent.pid)])
        assert f"pid {forked} fd {target.fd}" in proc.stdout
    finally:
        os.kill(forked, signal.SIGKILL)


def test_sock_diag_lookup_is_exact(spawn: Spawn) -> None:
    """The re-verification lookup finds the socket by endpoints and cookie, and nothing else."""
    server = start_python(spawn)
    (finding,) = server.leak(1)
    current = netlink.lookup(finding.socket)
    assert current is not None
    assert (current.inode, current.state) == (finding.socket.inode, TcpState.CLOSE_WAIT)
    assert finding.socket.cookie is not None
    stale = dataclasses.replace(finding.socket, cookie=finding.socket.cookie ^ 1)
    assert netlink.lookup(stale) is None
