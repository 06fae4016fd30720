"""The files the resolver reads, including bad ones: /proc/PID/cgroup (this host's real one, and
malformed or unreadable stand-ins under a temporary proc root, since the kernel does not write bad
ones on demand), and the runtimes' metadata files under a temporary host root."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from closewait.errors import KernelDataError
from closewait.sources.attribution import EXITED, WorkloadResolver
from closewait.sources.cgroup import CgroupEntry, own_cgroups, parse_cgroup_file, read_cgroups
from closewait.sources.runtimes import BoltReader, ContainerNames, parse_containers_json, parse_libpod_bolt

CID = "ab12" * 16
HYBRID = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/bf2ff1130b93ff0f3047dbf6f8234206
1:cpu,cpuacct:/
0::/
"""


def test_parse_a_hybrid_file() -> None:
    entries = parse_cgroup_file(HYBRID)
    assert entries[0] == CgroupEntry(9, "name=systemd", "/")
    assert entries[2] == CgroupEntry(4, "memory", "/process_api/bf2ff1130b93ff0f3047dbf6f8234206")
    assert entries[3].controllers == "cpu,cpuacct"
    assert entries[-1] == CgroupEntry(0, "", "/")


def test_a_path_may_contain_colons() -> None:
    assert parse_cgroup_file("0::/odd:name/x.service\n") == [CgroupEntry(0, "", "/odd:name/x.service")]


def test_this_process_reads_its_own_file() -> None:
    own = own_cgroups()
    assert own == read_cgroups(os.getpid())
    assert any(entry.hierarchy == 0 for entry in own) or all(entry.controllers for entry in own)


@pytest.mark.parametrize(
    "text",
    ["", "\n", "garbage\n", "0:/\n", "x::/\n", "0::relative\n", "0::/\nbroken line\n"],
)
def test_malformed_files_raise_kernel_data_error(text: str) -> None:
    with pytest.raises(KernelDataError, match="/proc/PID/cgroup"):
        parse_cgroup_file(text)


def _fake_proc(root: Path, pid: int, cgroup: str | None) -> None:
    """A proc root with pid's stat (this process's, so the start time is real) and a cgroup file."""
    directory = root / str(pid)
    directory.mkdir(parents=True)
    (directory / "stat").write_bytes(Path("/proc/self/stat").read_bytes())
    if cgroup is not None:
        (directory / "cgroup").write_text(cgroup)


@pytest.mark.parametrize(
    ("cgroup", "error"),
    [
        ("garbage\n", "malformed /proc/4242/cgroup line 1: 'garbage'"),
        ("", "empty /proc/4242/cgroup"),
    ],
)
def test_a_malformed_file_is_an_unknown_workload(tmp_path: Path, cgroup: str, error: str) -> None:
    _fake_proc(tmp_path, 4242, cgroup)
    workload = WorkloadResolver(proc_root=str(tmp_path)).workload_of_pid(4242)
    assert (workload.kind, workload.error) == ("unknown", error)


def test_an_unreadable_file_is_an_unknown_workload(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 4242, None)
    (tmp_path / "4242" / "cgroup").mkdir()  # read() fails with EISDIR, as an unreadable file would fail
    workload = WorkloadResolver(proc_root=str(tmp_path)).workload_of_pid(4242)
    assert workload.kind == "unknown"
    assert workload.error == "cannot read /proc/4242/cgroup: Is a directory"


def test_a_missing_process_is_exited(tmp_path: Path) -> None:
    assert WorkloadResolver(proc_root=str(tmp_path)).workload_of_pid(4242).error == EXITED


def test_a_fake_proc_root_names_the_workload(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 4242, f"1:memory:/docker/{CID}\n0::/\n")
    start = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
    resolver = WorkloadResolver(proc_root=str(tmp_path), host_root=str(tmp_path))
    workload = resolver.workload_of_pid(4242, start)
    assert (workload.kind, workload.id, workload.runtime, workload.name) == ("container", CID, "docker", CID[:12])
    assert resolver.workload_of_pid(4242, start + 1).error == EXITED  # another process now


# ---- runtimes' metadata ------------------------------------------------------------------------


def test_docker_names_from_config_v2(tmp_path: Path) -> None:
    config = tmp_path / "var/lib/docker/containers" / CID / "config.v2.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"ID": CID, "Name": "/web-1", "Config": {"Image": "nginx"}}))
    names = ContainerNames(str(tmp_path), recheck=0.0)
    assert names.name("docker", CID) == "web-1"
    assert names.name("docker", "cd" * 32) is None
    config.write_text("{ torn")
    os.utime(config, ns=(1, 1))  # a different mtime: read again
    assert names.name("docker", CID) is None
    assert names.name("containerd", CID) is None


def test_podman_names_from_containers_json_under_a_root(tmp_path: Path) -> None:
    storage = tmp_path / "var/lib/containers/storage/overlay-containers/containers.json"
    storage.parent.mkdir(parents=True)
    storage.write_text(json.dumps([{"id": CID, "names": ["api"], "layer": "x"}, {"id": "x", "names": []}]))
    names = ContainerNames(str(tmp_path))
    assert names.name("podman", CID) == "api"
    assert names.name("podman", "x") is None


@pytest.mark.parametrize("data", [b"", b"{}", b"[1, 2", b'[{"id": 1}]'])
def test_bad_containers_json(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        assert parse_containers_json(data) == {}


@pytest.mark.parametrize("data", [b"", b"\x00" * 8192, os.urandom(16384)])
def test_bad_bolt_files_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"bolt_state\.db"):
        parse_libpod_bolt(data)


def test_a_truncated_bolt_file_is_no_names_not_a_crash(tmp_path: Path) -> None:
    real = Path("/var/lib/containers/storage/libpod/bolt_state.db")
    if not real.exists():
        pytest.skip("no podman state on this host")
    data = real.read_bytes()
    BoltReader(data).bucket(b"id-registry")
    for size in (4096, 8192, 12288, len(data) // 2):
        with contextlib.suppress(ValueError):
            parse_libpod_bolt(data[:size])


def test_workloads_of_many_processes_by_identity(tmp_path: Path) -> None:
    from closewait.model import Process

    _fake_proc(tmp_path, 4242, "0::/system.slice/a.service\n")
    _fake_proc(tmp_path, 4343, f"0::/system.slice/docker-{CID}.scope\n")
    start = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
    processes = [Process(4242, start, "a", ()), Process(4343, start, "b", ()), Process(4444, start, "gone", ())]
    resolver = WorkloadResolver(proc_root=str(tmp_path), host_root=str(tmp_path), verify=False)
    by_identity = resolver.workloads_of(processes)
    assert [by_identity[p.identity].kind for p in processes] == ["unit", "container", "unknown"]
    assert by_identity[(4444, start)].error == EXITED
    assert resolver.statistics().unknown == 1
