"""Owners from the BPF task_file iterator, against the /proc walk on the real kernel.

The iterator must give exactly the owners the walk gives (same pids, same fds, a socket shared by
a forked parent and child under both), leave nothing open behind it, refuse itself cleanly where
it cannot be trusted (an unprivileged user, another pid namespace, a wrong or stale layout) so
``auto`` falls back to the walk, and its parsers must turn malformed data into KernelDataError or
BpfUnavailable, never anything else.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import closewait
from closewait.errors import KernelDataError
from closewait.sources import bpf
from closewait.sources.owners import find_owners
from tests.conftest import Nobody, Spawn
from tests.scan.kit import LEAKING_SERVER, REPO, close_wait_of, python_argv, run_cli
from tests.sources.test_owners import FORKING_SERVER

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _bpf_reason() -> str | None:
    """Why the iterator cannot run in this test process, or None when it can."""
    try:
        with socket.socket() as probe:
            bpf.socket_holders({os.fstat(probe.fileno()).st_ino}, cache_path=None)
    except bpf.BpfUnavailable as err:
        return str(err)
    return None


_BPF_REASON = _bpf_reason() if os.geteuid() == 0 else "not root"
needs_bpf = pytest.mark.skipif(_BPF_REASON is not None, reason=f"BPF iterator unavailable: {_BPF_REASON}")


@pytest.fixture(scope="module")
def kernel_btf() -> bytes:
    try:
        return bpf.read_btf()
    except bpf.BpfUnavailable as err:
        pytest.skip(str(err))


def _open_fds() -> set[str]:
    """This process's descriptors with what they point to (the listing's own descriptor, closed by
    the time its link is read, is left out)."""
    result = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            result.add(f"{name}:{os.readlink(f'/proc/self/fd/{name}')}")
        except FileNotFoundError:
            continue
    return result


def _leak(spawn: Spawn, code: str, *args: object) -> tuple[int, int]:
    proc = spawn(argv=python_argv(code, *args))
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc.pid, port


@needs_bpf
def test_bpf_and_procfs_find_the_same_owners(spawn: Spawn) -> None:
    """Two leaking servers and a socket shared by a forked parent and child: both ways agree."""
    plain_pid, plain_port = _leak(spawn, LEAKING_SERVER, "127.0.0.1", "keep,eof")
    forking = spawn(argv=python_argv(FORKING_SERVER))
    assert forking.stdout is not None
    fork_port = int(forking.stdout.readline())
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", plain_port)):
            pass
    shared = socket.create_connection(("127.0.0.1", fork_port))
    child_pid, shared_fd = map(int, forking.stdout.readline().split())
    shared.close()
    close_wait_of(plain_pid, plain_port, count=2)
    close_wait_of(forking.pid, fork_port)

    by_bpf = closewait.scan(ports=[plain_port, fork_port], owner_source="bpf")
    by_proc = closewait.scan(ports=[plain_port, fork_port], owner_source="procfs")
    assert by_bpf.owners_via == "bpf"
    assert by_proc.owners_via == "procfs"
    assert len(by_bpf.findings) == 3

    def owners(snapshot: closewait.Snapshot) -> dict[int, list[tuple[int, int, str]]]:
        return {f.socket.inode: [(o.process.pid, o.fd, o.process.name) for o in f.owners] for f in snapshot.findings}

    assert owners(by_bpf) == owners(by_proc)

    def verdicts(snapshot: closewait.Snapshot) -> dict[int, tuple[closewait.Role, str | None, str | None]]:
        return {
            f.socket.inode: (f.role, f.diagnosis and f.diagnosis.code, f.diagnosis and f.diagnosis.remedy)
            for f in snapshot.findings
        }

    assert verdicts(by_bpf) == verdicts(by_proc)
    (shared_finding,) = [f for f in by_bpf.findings if f.socket.local.port == fork_port]
    assert sorted((o.process.pid, o.fd) for o in shared_finding.owners) == sorted(
        [(forking.pid, shared_fd), (child_pid, shared_fd)]
    )
    # The listeners' owners (what tells server from client) come from the iterator too.
    assert {f.role for f in by_bpf.findings} == {closewait.Role.SERVER}


@needs_bpf
def test_auto_uses_the_iterator_as_root_and_the_walk_for_named_pids(spawn: Spawn) -> None:
    pid, port = _leak(spawn, LEAKING_SERVER, "127.0.0.1", "keep")
    with socket.create_connection(("127.0.0.1", port)):
        pass
    close_wait_of(pid, port)
    assert closewait.scan(ports=[port]).owners_via == "bpf"
    # --pid names the processes to read: the walk of just those is cheaper than a host-wide pass.
    assert closewait.scan(ports=[port], pids=[pid]).owners_via == "procfs"
    with pytest.raises(closewait.UsageError, match="--pid"):
        find_owners({1}, pids=[pid], method="bpf")
    with pytest.raises(closewait.UsageError, match="owner source"):
        closewait.scan(owner_source="psutil")
    document = json.loads(run_cli("scan", "--port", str(port), "--json").stdout)
    assert document["owners_via"] == "bpf"
    assert document["owners_fallback_reason"] is None
    assert [o["pid"] for o in document["sockets"][0]["owners"]] == [pid]
    walked = json.loads(run_cli("scan", "--port", str(port), "--json", "--owners-from", "procfs").stdout)
    assert walked["owners_via"] == "procfs"
    assert walked["owners_fallback_reason"] is None  # asked for, not fallen back to
    assert "BPF iterator not used" not in run_cli("scan", "--port", str(port)).stdout
    assert walked["sockets"][0]["owners"] == document["sockets"][0]["owners"]
    assert json.loads(run_cli("scan", "--port", str(port), "--json", "--no-owners").stdout)["owners_via"] is None


@needs_bpf
def test_the_iterator_leaves_nothing_open(spawn: Spawn) -> None:
    pid, port = _leak(spawn, LEAKING_SERVER, "127.0.0.1", "keep")
    with socket.create_connection(("127.0.0.1", port)):
        pass
    (finding,) = close_wait_of(pid, port)
    before = _open_fds()
    for _ in range(3):
        holders = bpf.socket_holders({finding.socket.inode})
        start_time = finding.owners[0].process.start_time
        assert holders == {finding.socket.inode: [(pid, finding.owners[0].fd, start_time)]}
    assert _open_fds() == before
    assert not any("bpf" in link for link in _open_fds())


@needs_bpf
def test_a_wrong_cached_layout_is_caught_and_replaced(tmp_path: Path, kernel_btf: bytes) -> None:
    """A cache for this kernel with a wrong offset: the answer is still right, and the file is rewritten."""
    right = bpf.parse_btf(kernel_btf)
    cache = tmp_path / "layout.json"
    bpf.save_layout(right, cache_path=str(cache))
    assert bpf.cached_layout(cache_path=str(cache)) == right
    saved = json.loads(cache.read_text())
    saved["layout"]["inode_i_ino"] += 8  # reads the wrong field: the marker check must catch it
    cache.write_text(json.dumps(saved))
    os.chmod(cache, 0o644)
    assert bpf.cached_layout(cache_path=str(cache)) != right
    with socket.socket() as mine:
        inode = os.fstat(mine.fileno()).st_ino
        holders = bpf.socket_holders({inode}, cache_path=str(cache))
        assert holders == {inode: [(os.getpid(), mine.fileno(), bpf._own_start_time())]}
    assert bpf.cached_layout(cache_path=str(cache)) == right
    # Another kernel's cache, or a file others may write, is not trusted at all.
    saved = json.loads(cache.read_text())
    cache.write_text(json.dumps({**saved, "kernel": "another kernel"}))
    assert bpf.cached_layout(cache_path=str(cache)) is None
    cache.write_text(json.dumps(saved))
    assert bpf.cached_layout(cache_path=str(cache)) == right
    os.chmod(cache, 0o666)
    assert bpf.cached_layout(cache_path=str(cache)) is None
    cache.write_text("{not json")
    os.chmod(cache, 0o644)
    assert bpf.cached_layout(cache_path=str(cache)) is None


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
@needs_bpf
def test_another_pid_namespace_falls_back_to_the_walk(spawn: Spawn, tmp_path: Path) -> None:
    """In a child pid namespace the kernel's pids are not the ones /proc shows: the marker catches it."""
    own_socket = """
import json, os, socket
from closewait.sources import bpf
from closewait.sources.owners import find_owners
with socket.socket() as mine:
    inode = os.fstat(mine.fileno()).st_ino
    result = find_owners({inode})
    owners = [(o.process.pid, o.fd) for o in result.owners[inode]]
    try:
        bpf.socket_holders({inode}, cache_path=None)
        forced = None
    except bpf.BpfUnavailable as err:
        forced = str(err)
    print(json.dumps({"pid": os.getpid(), "fd": mine.fileno(), "method": result.method,
                      "why": result.bpf_unavailable, "owners": owners, "forced": forced}))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", own_socket],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["pid"] == 1  # the first process of the new namespace
    assert report["method"] == "procfs"
    assert "pid namespace" in report["why"]
    assert report["owners"] == [[1, report["fd"]]]
    assert report["forced"] is not None
    assert "pid namespace" in report["forced"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
@needs_bpf
def test_users_see_why_auto_fell_back_to_the_walk(spawn: Spawn) -> None:
    """In another pid namespace the iterator refuses itself: scan --json says why next to owners_via,
    the terminal view says it in a footer line."""
    pid, port = _leak(spawn, LEAKING_SERVER, "127.0.0.1", "keep")
    with socket.create_connection(("127.0.0.1", port)):
        pass
    close_wait_of(pid, port)
    unshare = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "closewait"]
    env = {"PYTHONPATH": str(REPO / "src")}
    done = run_cli("scan", "--port", str(port), "--json", argv0=unshare, env=env)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["owners_via"] == "procfs"
    assert "pid namespace" in document["owners_fallback_reason"]
    keys = list(document)
    assert keys.index("owners_fallback_reason") == keys.index("owners_via") + 1
    human = run_cli("scan", "--port", str(port), argv0=unshare, env=env)
    assert human.returncode == 0, human.stderr
    (footer,) = [line for line in human.stdout.splitlines() if "BPF iterator not used" in line]
    assert footer.startswith("owners found by the /proc walk (BPF iterator not used: ")
    assert "pid namespace" in footer


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_nobody_gets_the_walk_and_a_clear_line_when_bpf_is_forced(spawn: Spawn, nobody: Nobody) -> None:
    pid, port = _leak(spawn, LEAKING_SERVER, "127.0.0.1", "keep")
    with socket.create_connection(("127.0.0.1", port)):
        pass
    close_wait_of(pid, port)
    argv0 = [*nobody.argv, "-m", "closewait"]
    auto = run_cli("scan", "--port", str(port), "--json", argv0=argv0, env=nobody.env)
    assert auto.returncode == 0, auto.stderr
    document = json.loads(auto.stdout)
    assert document["owners_via"] == "procfs"
    assert "permission denied (needs root, or CAP_BPF and CAP_PERFMON)" in document["owners_fallback_reason"]
    assert document["sockets"][0]["owners"] == []
    assert any("permission denied, run as root" in line for line in document["errors"])
    forced = run_cli("scan", "--port", str(port), "--owners-from", "bpf", argv0=argv0, env=nobody.env)
    assert forced.returncode == 2
    assert "Traceback" not in forced.stderr
    (line,) = forced.stderr.splitlines()
    assert line.startswith("closewait: error: ")
    assert "permission denied (needs root, or CAP_BPF and CAP_PERFMON)" in line


# --- parsers, without the kernel's say-so -------------------------------------------------------


def test_parse_btf_finds_what_the_program_needs(kernel_btf: bytes) -> None:
    layout = bpf.parse_btf(kernel_btf)
    assert layout.iter_func_id > 0
    # i_mode is a 2-byte field and i_ino 8; both inside struct inode, tgid inside task_struct.
    assert layout.inode_i_mode != layout.inode_i_ino
    assert all(offset % 2 == 0 for offset in (layout.file_f_inode, layout.inode_i_mode, layout.inode_i_ino))
    assert layout.task_tgid % 4 == 0
    assert layout.task_group_leader % 8 == 0
    assert layout.task_start_boottime % 8 == 0
    program = bpf.assemble(layout, map_fd=7)
    assert len(program) == 33 * 8
    # The map's fd is in the ld_imm64 instruction (src_reg 1 = BPF_PSEUDO_MAP_FD), nowhere else.
    code, regs, _off, imm = struct.unpack_from("<BBhi", program, 12 * 8)
    assert (code, regs, imm) == (0x18, 0x11, 7)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_parse_btf_turns_damage_into_clear_errors(kernel_btf: bytes, data: st.DataObject) -> None:
    head = kernel_btf[: 24 + 4096]
    damaged = bytearray(data.draw(st.sampled_from([kernel_btf, head])))
    cut = data.draw(st.integers(0, len(damaged)))
    for _ in range(data.draw(st.integers(0, 8))):
        at = data.draw(st.integers(0, max(0, len(damaged) - 1)))
        if damaged:
            damaged[at] = data.draw(st.integers(0, 255))
    sample = bytes(damaged[: cut if data.draw(st.booleans()) else len(damaged)])
    try:
        layout = bpf.parse_btf(sample)
    except (KernelDataError, bpf.BpfUnavailable) as err:
        message = str(err)
    else:
        message = ""
        assert layout.iter_func_id > 0
    assert "\n" not in message


@FUZZ
@given(st.binary(max_size=200))
def test_parse_btf_rejects_noise(noise: bytes) -> None:
    with pytest.raises((KernelDataError, bpf.BpfUnavailable)):
        bpf.parse_btf(noise)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.integers(1, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
        )
    )
)
def test_parse_records_groups_and_deduplicates(records: list[tuple[int, int, int, int]]) -> None:
    data = b"".join(struct.pack("<QIIQ", *record) for record in records + records)
    holders = bpf.parse_records(data)
    expected: dict[int, set[tuple[int, int, int]]] = {}
    for inode, pid, fd, start_ns in records:
        expected.setdefault(inode, set()).add((pid, fd, start_ns // 10_000_000))  # ns -> 1/100 s ticks
    assert holders == {inode: sorted(pairs) for inode, pairs in expected.items()}
    if data:
        with pytest.raises(KernelDataError, match="whole records"):
            bpf.parse_records(data[:-1])


def test_a_kernel_without_btf_is_one_clear_reason(tmp_path: Path) -> None:
    with pytest.raises(bpf.BpfUnavailable, match="without BTF"):
        bpf.read_btf(str(tmp_path / "vmlinux"))


@needs_bpf
def test_malformed_btf_makes_the_iterator_unavailable_not_the_scan_fail(tmp_path: Path, kernel_btf: bytes) -> None:
    """Damaged type data is a reason to walk /proc instead (BpfUnavailable), with the damage named."""
    damaged = tmp_path / "vmlinux"
    damaged.write_bytes(kernel_btf[:4096])  # the header promises megabytes of types
    with socket.socket() as mine, pytest.raises(bpf.BpfUnavailable, match="BTF header points outside"):
        bpf.socket_holders({os.fstat(mine.fileno()).st_ino}, btf_path=str(damaged), cache_path=None)
