"""closewait reap --netns / --all-netns against leaky servers in network namespaces the tests create.

Each server runs under ``ip netns exec`` in a fresh namespace with its own loopback, and its clients
are opened inside that namespace, so its CLOSE_WAIT sockets are in no table the host's sock_diag
shows. Every reap here names the test's own pids: the host's other CLOSE_WAIT sockets (a big
fixture may be running) are never planned, and each test checks that the sockets it did not ask
for, on the host and in another namespace, are still there.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from closewait import reap
from closewait.model import Finding
from tests.conftest import Nobody, Spawn
from tests.reap.helpers import LeakyServer, run_cli, start_python

METHODS_AND_NAMES = [("shutdown", "name"), ("destroy", "pid"), ("shutdown", "path"), ("destroy", "name")]


def _inodes(findings: tuple[Finding, ...]) -> set[int]:
    return {f.socket.inode for f in findings}


def _spec(kind: str, server: LeakyServer, name: str) -> str:
    """The same namespace as ``--netns`` takes it: a bare name, a pid in it, or a path."""
    return {"name": name, "pid": str(server.pid), "path": f"/run/netns/{name}"}[kind]


@pytest.mark.parametrize(("method", "kind"), METHODS_AND_NAMES)
def test_netns_finds_plans_and_releases_only_that_namespaces_sockets(
    spawn: Spawn, netns_name: str, other_netns_name: str, method: str, kind: str
) -> None:
    inside = start_python(spawn, netns_name=netns_name)
    elsewhere = start_python(spawn, netns_name=other_netns_name)
    host = start_python(spawn)
    leaked = inside.leak(2)
    kept_elsewhere = _inodes(elsewhere.leak(1))
    kept_on_host = _inodes(host.leak(1))
    spec = _spec(kind, inside, netns_name)
    path = f"/proc/{inside.pid}/ns/net" if kind == "pid" else f"/run/netns/{netns_name}"

    # From the host's namespace the server holds nothing in CLOSE_WAIT: its sockets are not there.
    blind = run_cli(["reap", "--pid", str(inside.pid)])
    assert blind.returncode == 0, blind.stderr
    assert blind.stdout.startswith(f"nothing to reap: no CLOSE_WAIT socket matches pid {inside.pid}\n")

    dry = run_cli(["reap", "--netns", spec, "--pid", str(inside.pid), "--method", method])
    assert dry.returncode == 0, dry.stderr
    first = dry.stdout.splitlines()[0]
    held = f"held by 1 process (pid {inside.pid}) in network namespace {path}"
    assert first == f"plan: {method} 2 CLOSE_WAIT sockets {held}"
    planned = json.loads(run_cli(["reap", "--netns", spec, "--pid", str(inside.pid), "--json"]).stdout)
    assert planned["namespaces"] == [path]
    assert {t["inode"] for t in planned["targets"]} == _inodes(leaked)
    assert {t["netns"] for t in planned["targets"]} == {path}
    assert len(inside.close_wait()) == 2  # a dry run changes nothing

    done = run_cli(["reap", "--netns", spec, "--pid", str(inside.pid), "--method", method, "--yes", "--json"])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["applied"] is True
    assert [o["code"] for o in result["outcomes"]] == ["released", "released"]
    assert inside.close_wait() == ()
    # The server keeps serving, inside its namespace, and sees EOF on the released fds.
    assert inside.ask("PING") == f"PONG {inside.pid}"
    send_error = "EPIPE" if method == "shutdown" else "ECONNABORTED"
    for target in result["outcomes"]:
        fd = target["fd"]
        assert inside.ask(f"TOUCH {fd}") == f"TOUCH {fd} recv=EOF send={send_error}"
    # Another namespace's and the host's CLOSE_WAIT sockets were not touched.
    assert _inodes(elsewhere.close_wait()) == kept_elsewhere
    assert _inodes(host.close_wait()) == kept_on_host


def test_all_netns_releases_in_every_namespace_it_is_asked_about(
    spawn: Spawn, netns_name: str, other_netns_name: str
) -> None:
    inside = start_python(spawn, netns_name=netns_name)
    elsewhere = start_python(spawn, netns_name=other_netns_name)
    host = start_python(spawn)
    wanted = _inodes(inside.leak(2)) | _inodes(host.leak(1))
    kept_elsewhere = _inodes(elsewhere.leak(1))
    pids = ["--pid", str(inside.pid), "--pid", str(host.pid)]

    dry = run_cli(["reap", "--all-netns", *pids])
    assert dry.returncode == 0, dry.stderr
    assert " held by 2 processes " in dry.stdout.splitlines()[0]
    assert " across " in dry.stdout.splitlines()[0]
    assert "NETNS" in dry.stdout
    planned = json.loads(run_cli(["reap", "--all-netns", *pids, "--json"]).stdout)
    netns_of = {t["inode"]: t["netns"] for t in planned["targets"]}
    assert set(netns_of) == wanted
    # The host's own namespace is null, as in scan's JSON; the others by the names `ip netns add`
    # gave them.
    assert {netns_of[i] for i in _inodes(host.close_wait())} == {None}
    assert {netns_of[i] for i in _inodes(inside.close_wait())} == {f"/run/netns/{netns_name}"}
    assert planned["namespaces"][0] is None
    assert f"/run/netns/{netns_name}" in planned["namespaces"]
    assert f"/run/netns/{other_netns_name}" in planned["namespaces"]

    done = run_cli(["reap", "--all-netns", *pids, "--method", "shutdown", "--yes", "--json"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["done"] == 3
    assert inside.close_wait() == ()
    assert host.close_wait() == ()
    assert _inodes(elsewhere.close_wait()) == kept_elsewhere
    assert inside.ask("PING") == f"PONG {inside.pid}"
    assert host.ask("PING") == f"PONG {host.pid}"


@pytest.mark.parametrize("method", ["shutdown", "destroy"])
def test_a_namespace_gone_since_the_plan_skips_its_sockets(spawn: Spawn, netns_name: str, method: str) -> None:
    """Planned through /run/netns/NAME, which is deleted before apply: nothing is touched."""
    inside = start_python(spawn, netns_name=netns_name)
    leaked = inside.leak(1)
    snapshot = reap.survey(pids=[inside.pid], netns=netns_name)
    plan = reap.plan(snapshot, pids=[inside.pid], method=method)
    assert [t.netns for t in plan.targets] == [f"/run/netns/{netns_name}"]
    assert plan.namespaces == (f"/run/netns/{netns_name}",)
    subprocess.run(["ip", "netns", "del", netns_name], check=True)  # the server keeps the namespace alive

    result = reap.apply(plan)
    ((outcome,),) = (result.outcomes,)
    assert (outcome.outcome, outcome.code) == (reap.Outcome.SKIPPED, "netns-gone")
    assert f"/run/netns/{netns_name}" in outcome.reason
    assert result.exit_code == 1
    assert _inodes(inside.close_wait()) == _inodes(leaked)


def test_library_plan_over_survey_all_netns(spawn: Spawn, netns_name: str) -> None:
    inside = start_python(spawn, netns_name=netns_name)
    leaked = inside.leak(1)
    snapshots = reap.survey_all_netns(pids=[inside.pid])
    assert snapshots[0].netns is None
    (mine,) = [s for s in snapshots if s.findings]
    assert mine.netns == f"/run/netns/{netns_name}"
    plan = reap.plan(snapshots, pids=[inside.pid])
    assert [(t.socket.inode, t.netns) for t in plan.targets] == [(f.socket.inode, mine.netns) for f in leaked]
    result = reap.apply(plan)
    assert [o.code for o in result.outcomes] == ["released"]
    assert inside.close_wait() == ()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--netns", "cwtest-no-such-namespace"], "cwtest-no-such-namespace: no such network namespace"),
        (["--netns", "/etc/hostname"], "/etc/hostname is not a network namespace"),
        (["--netns", "/proc/self/ns/uts"], "is not a network namespace"),
        (["--netns", "1", "--all-netns"], "give --all-netns or --netns, not both"),
    ],
)
def test_a_bad_namespace_is_one_line_and_exit_2(spawn: Spawn, args: list[str], message: str) -> None:
    host = start_python(spawn)
    host.leak(1)
    proc = run_cli(["reap", "--pid", str(host.pid), *args, "--yes"])
    assert proc.returncode == 2
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("closewait: error: ")
    assert message in line
    assert len(host.close_wait()) == 1


def test_a_namespace_nobody_may_not_enter_is_one_line_and_exit_2(netns_name: str, nobody: Nobody) -> None:
    argv = [*nobody.argv, "-m", "closewait", "reap", "--netns", netns_name, "--all", "--port", "1", "--yes"]
    proc = subprocess.run(argv, env=nobody.env, capture_output=True, text=True, timeout=60, check=False, cwd="/")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("closewait: error: ")
    assert "permission denied" in line


_UNACCEPTED = """
import socket, sys, time
listener = socket.socket()
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(4)
client = socket.create_connection(listener.getsockname())
port = client.getsockname()[1]
client.close()  # its FIN reaches a connection still in the accept queue: CLOSE_WAIT with inode 0
print(port, flush=True)
time.sleep(600)
"""


def test_all_netns_keeps_each_unaccepted_socket_in_its_own_namespace(
    spawn: Spawn, netns_name: str, other_netns_name: str
) -> None:
    """Sockets not accepted yet have inode 0 in every namespace: each is grouped with the namespace
    it was dumped in (by its cookie), not with whichever namespace was read last."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # the same listening port in both namespaces
    clients: dict[str, int] = {}
    for name in (netns_name, other_netns_name):
        proc = spawn(argv=["ip", "netns", "exec", name, sys.executable, "-c", _UNACCEPTED, str(port)])
        assert proc.stdout is not None
        clients[f"/run/netns/{name}"] = int(proc.stdout.readline())
    snapshots = reap.survey_all_netns(ports=[port])
    found = {
        s.netns: sorted((f.socket.inode, f.socket.remote.port) for f in s.findings) for s in snapshots if s.findings
    }
    assert found == {path: [(0, client_port)] for path, client_port in clients.items()}


def test_all_netns_applies_after_the_pid_naming_the_namespace_exits(spawn: Spawn, netns_name: str) -> None:
    """--all-netns names a namespace without a /run/netns name by its lowest pid's /proc/PID/ns/net.
    That pid exiting between plan and apply does not make the namespace gone: apply enters it
    through the target holder's /proc/PID/ns/net, whose inode is the one the survey saw. (The name
    is deleted before the survey: the processes keep the namespace alive, unnamed.)"""
    first = spawn(
        argv=[
            "ip",
            "netns",
            "exec",
            netns_name,
            sys.executable,
            "-c",
            "import time; print(1, flush=True); time.sleep(600)",
        ]
    )
    assert first.stdout is not None
    first.stdout.readline()
    inside = start_python(spawn, netns_name=netns_name)
    assert first.pid < inside.pid
    leaked = inside.leak(1)
    subprocess.run(["ip", "netns", "del", netns_name], check=True)
    plan = reap.plan(reap.survey_all_netns(pids=[inside.pid]), pids=[inside.pid])
    assert [(t.socket.inode, t.netns) for t in plan.targets] == [
        (f.socket.inode, f"/proc/{first.pid}/ns/net") for f in leaked
    ]
    first.kill()
    first.wait()

    result = reap.apply(plan)
    assert [o.code for o in result.outcomes] == ["released"]
    assert inside.close_wait() == ()


def test_all_netns_applies_after_the_name_it_gave_is_deleted(spawn: Spawn, netns_name: str) -> None:
    """--all-netns names a namespace by its /run/netns name, which the user did not type: that name
    deleted between plan and apply, while the server keeps the namespace alive, does not make it
    gone (unlike a name given with --netns): apply enters it through the holder's /proc/PID/ns/net,
    whose inode is the one the survey saw."""
    inside = start_python(spawn, netns_name=netns_name)
    leaked = inside.leak(1)
    plan = reap.plan(reap.survey_all_netns(pids=[inside.pid]), pids=[inside.pid])
    assert [(t.socket.inode, t.netns) for t in plan.targets] == [
        (f.socket.inode, f"/run/netns/{netns_name}") for f in leaked
    ]
    subprocess.run(["ip", "netns", "del", netns_name], check=True)

    result = reap.apply(plan)
    assert [o.code for o in result.outcomes] == ["released"]
    assert inside.close_wait() == ()
