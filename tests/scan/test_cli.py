"""``closewait scan`` as a user runs it: the real console script against real leaking processes."""

from __future__ import annotations

import json
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from closewait import diagnosis
from closewait.model import TcpState
from closewait.sources import netlink
from tests.conftest import Spawn
from tests.scan.kit import LEAKING_SERVER, REPO, close_wait_of, python_argv, run_cli


@dataclass(frozen=True)
class Leakers:
    big_pid: int
    big_port: int
    small_pid: int
    small_port: int
    #: The client ports of the big leaker's three connections: ``--port`` also matches sockets of
    #: other connections that merely share the port number (a stale TIME_WAIT from an earlier test
    #: whose listener had this port), so exact checks keep only this fixture's own connections.
    big_clients: frozenset[int] = frozenset()

    def own(self, sockets: list[dict[str, object]]) -> list[dict[str, object]]:
        """The sockets of the big leaker's own listener and connections."""
        kept = []
        for sock in sockets:
            local, remote = sock["local"], sock["remote"]
            assert isinstance(local, dict)
            assert isinstance(remote, dict)
            ends = {local["port"], remote["port"]}
            if ends == {self.big_port, 0} or (self.big_port in ends and ends & self.big_clients):
                kept.append(sock)
        return kept


@pytest.fixture
def leakers(spawn: Spawn) -> Leakers:
    """One process leaking three sockets (one per code), another leaking one."""
    ports = []
    pids = []
    clients: list[set[int]] = []
    for modes, payloads in (("eof,keep,keep", (b"", b"", b"abcde")), ("keep", (b"",))):
        proc = spawn(argv=python_argv(LEAKING_SERVER, "127.0.0.1", modes))
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        clients.append(set())
        for payload in payloads:
            client = socket.create_connection(("127.0.0.1", port))
            clients[-1].add(client.getsockname()[1])
            client.sendall(payload)
            client.close()
            assert proc.stdout.readline().strip() == "accepted"
        close_wait_of(proc.pid, port, count=len(payloads))
        ports.append(port)
        pids.append(proc.pid)
    return Leakers(pids[0], ports[0], pids[1], ports[1], frozenset(clients[0]))


def _scan(*args: str) -> str:
    result = run_cli("scan", *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def test_table_grouped_by_process_worst_first(leakers: Leakers) -> None:
    out = _scan("--port", str(leakers.small_port), "--port", str(leakers.big_port))
    lines = out.splitlines()
    assert lines[0].startswith("4 sockets in CLOSE_WAIT, held by 2 processes")
    big = next(i for i, line in enumerate(lines) if line.startswith(f"pid {leakers.big_pid} "))
    small = next(i for i, line in enumerate(lines) if line.startswith(f"pid {leakers.small_pid} "))
    assert big < small  # three sockets before one
    assert lines[big + 1].split()[:4] == ["3", "CLOSE_WAIT", "sockets", "role"]
    assert "unread 5 B" in lines[big + 1]
    big_block = "\n".join(lines[big:small])
    for code in ("eof-not-closed x1", "not-reading x1", "unread-data x1", "5 bytes sent by 127.0.0.1:"):
        assert code in big_block
    assert big_block.count("    fix: ") == 3
    # One table row per socket: local, remote, idle, Recv-Q, Send-Q, fd, diagnosis (the role is in the
    # summary line when all of the process's sockets share it).
    rows = [line.split() for line in lines[big:small] if line.strip().startswith(f"127.0.0.1:{leakers.big_port} ")]
    assert sorted((row[-1], row[-4]) for row in rows) == [
        ("eof-not-closed", "0"),
        ("not-reading", "1"),
        ("unread-data", "6"),
    ]
    header = next(line for line in lines[big:small] if "LOCAL" in line)
    assert header.split() == ["LOCAL", "REMOTE", "IDLE", "RECV-Q", "SEND-Q", "FD", "DIAGNOSIS"]
    assert "role server" in lines[big + 1]


def _unused_port() -> socket.socket:
    """A socket bound (not listening: no TCP table entry) to a port no socket in any state uses at
    either end. While it stays bound no other program's connect() can take the port as its
    ephemeral port, and no listener can open on it; but a port free to bind may still be the remote
    port of an earlier connection's TIME_WAIT (a test server that listened there before), which
    ``--port`` matches too: such a port is passed over (bounded tries)."""
    every_state = frozenset(TcpState)
    for _ in range(50):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        if not any(port in (s.local.port, s.remote.port) for s in netlink.dump(every_state)):
            return probe
        probe.close()
    pytest.fail("no port free of every TCP socket in 50 tries")


def test_nothing_found_says_so(spawn: Spawn) -> None:
    with _unused_port() as probe:
        unused = probe.getsockname()[1]
        result = run_cli("scan", "--port", str(unused))
        assert (result.returncode, result.stdout, result.stderr) == (0, "no sockets in CLOSE_WAIT\n", "")
        result = run_cli("scan", "--port", str(unused), "--state", "all")
        assert result.stdout == "no sockets in the asked states\n"


def test_python_dash_m_is_the_same_command(leakers: Leakers) -> None:
    args = ("scan", "--port", str(leakers.small_port), "--json")
    via_module = run_cli(*args, argv0=[sys.executable, "-m", "closewait"])
    assert via_module.returncode == 0, via_module.stderr
    (sock,) = json.loads(via_module.stdout)["sockets"]
    assert sock["owners"][0]["pid"] == leakers.small_pid


#: The names issue 2 promises to programs outside the project, with their JSON types.
SOCKET_KEYS = {
    "state": str,
    "family": str,
    "local": dict,
    "remote": dict,
    "inode": int,
    "uid": int,
    "recv_q": int,
    "send_q": int,
    "unread_bytes": int,
    "eof_read": bool,
    "idle_ms": (int, type(None)),
    "role": str,
    "owners": list,
    "diagnosis": (dict, type(None)),
}
OWNER_KEYS = {"pid": int, "fd": int, "name": str, "cmdline": list}


def _check_types(obj: dict[str, object], spec: dict[str, object]) -> None:
    for key, kind in spec.items():
        assert key in obj, key
        assert isinstance(obj[key], kind), (key, obj[key])  # type: ignore[arg-type]


def test_json_schema(leakers: Leakers) -> None:
    document = json.loads(_scan("--port", str(leakers.big_port), "--json"))
    assert {"sockets", "errors"} <= document.keys()
    assert document["errors"] == []
    sockets = document["sockets"]
    assert len(sockets) == 3
    for sock in sockets:
        _check_types(sock, SOCKET_KEYS)
        assert sock["state"] == "CLOSE_WAIT"
        assert sock["family"] == "ipv4"
        assert sock["local"] == {"address": "127.0.0.1", "port": leakers.big_port}
        assert set(sock["remote"]) == {"address", "port"}
        assert sock["role"] == "server"
        assert sock["idle_ms"] >= 0
        (owner,) = sock["owners"]
        _check_types(owner, OWNER_KEYS)
        assert owner["pid"] == leakers.big_pid
        assert all(isinstance(part, str) for part in owner["cmdline"])
        assert set(sock["diagnosis"]) == {"code", "summary", "remedy"}
        assert sock["diagnosis"]["code"] in diagnosis.CODES
        assert sock["eof_read"] is (sock["recv_q"] == 0)
        assert sock["unread_bytes"] == max(sock["recv_q"] - 1, 0)
    assert sorted(s["recv_q"] for s in sockets) == [0, 1, 6]
    # Every name the command prints is explained in docs/json.md.
    documented = (REPO / "docs" / "json.md").read_text()
    names = set(document) | {k for s in sockets for k in s} | {k for s in sockets for o in s["owners"] for k in o}
    names |= set(document.get("state_counts", {}))
    for name in sorted(names):
        assert f"`{name}`" in documented, f"docs/json.md does not explain {name!r}"


def test_every_diagnosis_code_is_documented() -> None:
    documented = (REPO / "docs" / "diagnoses.md").read_text()
    for code in diagnosis.CODES:
        assert f"## `{code}`" in documented, code


def _json(*args: str) -> list[dict[str, object]]:
    sockets: list[dict[str, object]] = json.loads(_scan(*args, "--json"))["sockets"]
    return sockets


def test_state_option(leakers: Leakers) -> None:
    port = str(leakers.big_port)
    # The test's closed clients are orphaned FIN_WAIT2 sockets whose remote port is the leaker's.
    own = leakers.own
    states = sorted(
        str(s["state"]) for s in own(_json("--port", port, "--state", "close-wait", "--state", "fin-wait-2"))
    )
    assert states == ["CLOSE_WAIT"] * 3 + ["FIN_WAIT2"] * 3
    assert {str(s["state"]) for s in _json("--port", port, "--state", "fin-wait-2")} == {"FIN_WAIT2"}
    everything = own(_json("--port", port, "--state", "all"))
    assert sorted({str(s["state"]) for s in everything}) == ["CLOSE_WAIT", "FIN_WAIT2", "LISTEN"]
    listener = next(s for s in everything if s["state"] == "LISTEN")
    assert listener["role"] == "server"
    assert listener["diagnosis"] is None
    teardown = {str(s["state"]) for s in own(_json("--port", port, "--state", "teardown"))}
    assert teardown == {"CLOSE_WAIT", "FIN_WAIT2"}
    orphan = next(s for s in everything if s["state"] == "FIN_WAIT2")
    assert (orphan["inode"], orphan["owners"], orphan["role"]) == (0, [], "unknown")
    table = _scan("--port", port, "--state", "close-wait", "--state", "FIN_WAIT2")
    assert "STATE" in table
    assert "fin-wait-2" in table
    assert "close-wait" in table
    assert "no owning process (closed by its program" in table


def test_pid_port_backend_and_no_owners(leakers: Leakers) -> None:
    both = ("--port", str(leakers.big_port), "--port", str(leakers.small_port))
    only_small = _json(*both, "--pid", str(leakers.small_pid))
    assert [[o["pid"] for o in s["owners"]] for s in only_small] == [[leakers.small_pid]]  # type: ignore[attr-defined]
    assert len(_json(*both)) == 4
    assert len(_json(*both, "--pid", str(leakers.small_pid), "--pid", str(leakers.big_pid))) == 4

    procfs = _json(*both, "--backend", "procfs")
    netlink = _json(*both, "--backend", "netlink")
    key = lambda s: (s["inode"],)  # noqa: E731
    assert [s["inode"] for s in sorted(procfs, key=key)] == [s["inode"] for s in sorted(netlink, key=key)]
    assert all(s["idle_ms"] is None for s in procfs)
    assert all(isinstance(s["idle_ms"], int) for s in netlink)
    assert "(source: procfs)" in _scan(*both, "--backend", "procfs")

    bare = _json(*both, "--no-owners")
    assert len(bare) == 4
    assert all(s["role"] == "unknown" and s["owners"] == [] for s in bare)
    assert all(s["diagnosis"]["code"] in diagnosis.CODES for s in bare)  # type: ignore[index]
    table = _scan(*both, "--no-owners")
    assert "owners not looked up (--no-owners)" in table
    assert "unknown" in table


BAD_INPUTS = [
    (["--state", "bogus"], "unknown state 'bogus'"),
    (["--state", "close-wait", "--state", "nope"], "unknown state 'nope'"),
    (["--port", "70000"], "70000 is not in the range"),
    (["--port", "0"], "0 is not in the range"),
    (["--port", "http"], "'http' is not a valid integer"),
    (["--pid", "2147483646"], "no process with pid 2147483646"),
    (["--pid", "-3"], "--pid"),
    (["--netns", "/etc/hostname"], "/etc/hostname is not a network namespace"),
    (["--netns", "/proc/self/ns/uts"], "is not a network namespace"),
    (["--netns", "/nonexistent/ns"], "no such network namespace"),
    (["--netns", "2147483646"], "no process with pid 2147483646"),
    (["--backend", "bpf"], "'bpf' is not one of 'auto', 'netlink', 'procfs'"),
    (["--frobnicate"], "No such option '--frobnicate'"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run_cli("scan", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("closewait")
    assert ": error: " in line
    assert message in line


def test_docs_cover_every_scan_option() -> None:
    from closewait.cli.scan import scan_command

    documented = (REPO / "docs" / "cli.md").read_text()
    for param in scan_command.params:
        for opt in param.opts:
            assert f"`{opt}" in documented, f"docs/cli.md does not mention {opt}"
    assert Path(REPO / "docs" / "cli.md").read_text().count("## Exit codes") == 1


def test_wide_shows_every_row(spawn: Spawn) -> None:
    proc = spawn(argv=python_argv(LEAKING_SERVER, "127.0.0.1", ",".join(["keep"] * 12)))
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    for _ in range(12):
        socket.create_connection(("127.0.0.1", port)).close()
        assert proc.stdout.readline().strip() == "accepted"
    close_wait_of(proc.pid, port, count=12)

    def rows(out: str) -> int:
        return sum(1 for line in out.splitlines() if line.strip().startswith(f"127.0.0.1:{port} "))

    short = _scan("--port", str(port))
    assert rows(short) == 10
    assert "... and 2 more (--wide shows all)" in short
    wide = _scan("--port", str(port), "--wide")
    assert rows(wide) == 12
    assert "more (--wide shows all)" not in wide


#: Columns whose cells are right-aligned under their header; the others are left-aligned.
_RIGHT_ALIGNED = frozenset({"IDLE", "RECV-Q", "SEND-Q", "FD"})


def _tables(out: str) -> list[tuple[str, list[str]]]:
    """Each socket table of ``scan``'s output: (header line, row lines)."""
    tables: list[tuple[str, list[str]]] = []
    rows: list[str] | None = None
    for line in out.splitlines():
        words = line.split()
        if line.startswith("  ") and words[:2] in (["STATE", "LOCAL"], ["LOCAL", "REMOTE"]):
            rows = []
            tables.append((line, rows))
        elif rows is not None and line.startswith("  ") and line.strip():
            rows.append(line)
        else:
            rows = None
    return tables


def _assert_aligned(header: str, rows: list[str]) -> None:
    """Every row has the header's width; each left-aligned cell starts where its header starts and
    each right-aligned cell ends where its header ends, with a space before or after it."""
    assert rows
    columns = [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", header)]
    for row in rows:
        assert len(row) == len(header), (header, row)
        for name, start, end in columns:
            if name in _RIGHT_ALIGNED:
                assert row[end - 1] != " ", (name, header, row)
                assert row[end : end + 1] in ("", " "), (name, header, row)
            else:
                assert row[start] != " ", (name, header, row)
                assert row[start - 1] == " ", (name, header, row)


def test_wide_table_stays_aligned_on_hundreds_of_sockets(spawn: Spawn) -> None:
    """300 CLOSE_WAIT sockets (Recv-Q of 1 to 4 digits, fds of 1 to 3 digits) and their 300 orphaned
    FIN_WAIT2 peers: every row of both tables lines up under its header."""
    modes = ["eof", "keep", "keep"] * 100
    proc = spawn(argv=python_argv(LEAKING_SERVER, "127.0.0.1", ",".join(modes)))
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    for index, mode in enumerate(modes):
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"" if mode == "eof" else b"x" * (index * 7 % 1500))
        client.close()
        assert proc.stdout.readline().strip() == "accepted"
    close_wait_of(proc.pid, port, count=len(modes))
    out = _scan("--wide", "--state", "teardown", "--port", str(port))
    tables = _tables(out)
    server_rows = [row for _, rows in tables for row in rows if row.split()[:2] == ["close-wait", f"127.0.0.1:{port}"]]
    assert len(server_rows) == len(modes)
    for header, rows in tables:
        _assert_aligned(header, rows)
    assert any(header.split()[:1] == ["STATE"] and len(rows) >= len(modes) for header, rows in tables)


def test_table_on_a_narrow_or_recording_console_keeps_endpoints_whole(leakers: Leakers) -> None:
    """A table wider than the terminal (few rows) goes through rich, which folds DIAGNOSIS but never
    cuts an endpoint; a recording console gets the rows of the plain-line path too."""
    import io

    from rich.console import Console

    import closewait
    from closewait.cli.render.scan import print_snapshot

    snapshot = closewait.scan(closewait.parse_states(["teardown"]), ports=[leakers.big_port])
    for width in (60, 200):
        out = Console(file=io.StringIO(), record=True, width=width, highlight=False, soft_wrap=False)
        print_snapshot(snapshot, wide=True, out=out)
        text = out.export_text()
        for finding in snapshot.findings:
            assert str(finding.socket.local) in text
            assert str(finding.socket.remote) in text
