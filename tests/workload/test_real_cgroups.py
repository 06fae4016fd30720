"""Real cgroups: the directories systemd, kubelet (both drivers) and the runtimes create, made under
this test's own cgroup in each hierarchy of the host, with a real leaking process moved into them.

The process is found by a real scan (its CLOSE_WAIT socket), and the resolver must name the workload
from the process's /proc/PID/cgroup as the kernel writes it. Every process is moved back and every
directory removed (``realcg.CgroupTree``).
"""

from __future__ import annotations

import collections
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

import closewait
from closewait.model import Process
from closewait.sources.attribution import EXITED, WorkloadResolver
from closewait.sources.process import read_process
from closewait.workload import Workload, workload_of_cgroup
from tests.workload.realcg import CgroupTree, Hierarchy, Leaker, hierarchies, start_leaker, usable

pytestmark = pytest.mark.root

CID = "4e5f" * 16
NODE_CID = "d0c4" * 16
UID = "0f5e8a2c-7b1d-4c3e-9f6a-1b2c3d4e5f60"
UID_ = UID.replace("-", "_")

HIERARCHIES = hierarchies()
#: The hierarchies a tree is made in: the v1 ones the brief names, systemd's named one, and v2.
WANTED = ("memory", "pids", "cpu", "name=systemd", "unified")


def hierarchy(label: str) -> Hierarchy:
    found = HIERARCHIES.get(label)
    if found is None or not usable(found):
        pytest.skip(f"no writable {label} cgroup hierarchy here (or not root)")
    return found


@pytest.fixture(scope="module")
def leaker() -> Iterator[Leaker]:
    if os.geteuid() != 0:
        pytest.skip("moving processes between cgroups needs root")
    leaker = start_leaker()
    yield leaker
    leaker.stop()


def scanned_process(leaker: Leaker) -> Process:
    """The leaker as a real scan finds it: the owner of its CLOSE_WAIT socket."""
    snapshot = closewait.scan(pids=[leaker.pid], ports=[leaker.port])
    [finding] = snapshot.findings
    [owner] = finding.owners
    assert owner.process.pid == leaker.pid
    return owner.process


# (layout below the test's cgroup, kind, name, id, pod uid, qos, runtime, unit)
LAYOUTS = {
    "systemd-service": ("system.slice/nginx.service", "unit", "nginx.service", None, None, None, None),
    "systemd-scope": ("user.slice/user-1000.slice/session-3.scope", "unit", "session-3.scope", None, None, None, None),
    "systemd-user-unit": (
        "user.slice/user-1000.slice/user@1000.service/app.slice/foo.service",
        "unit",
        "foo.service",
        None,
        None,
        None,
        None,
    ),
    "podman-systemd": (f"machine.slice/libpod-{CID}.scope", "container", CID[:12], CID, None, None, "podman"),
    "podman-cgroupfs": (f"libpod_parent/libpod-{CID}", "container", CID[:12], CID, None, None, "podman"),
    "docker-systemd": (f"system.slice/docker-{CID}.scope", "container", CID[:12], CID, None, None, "docker"),
    "docker-cgroupfs": (f"docker/{CID}", "container", CID[:12], CID, None, None, "docker"),
    "crio-systemd": (f"machine.slice/crio-{CID}.scope", "container", CID[:12], CID, None, None, "cri-o"),
    "kubelet-systemd-burstable": (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
        "pod",
        f"pod{UID}",
        CID,
        UID,
        "burstable",
        "containerd",
    ),
    "kubelet-systemd-besteffort": (
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope",
        "pod",
        f"pod{UID}",
        CID,
        UID,
        "besteffort",
        "cri-o",
    ),
    "kubelet-systemd-guaranteed": (
        f"kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
        "pod",
        f"pod{UID}",
        CID,
        UID,
        "guaranteed",
        "containerd",
    ),
    "kubelet-cgroupfs-burstable": (
        f"kubepods/burstable/pod{UID}/{CID}",
        "pod",
        f"pod{UID}",
        CID,
        UID,
        "burstable",
        None,
    ),
    "kubelet-cgroupfs-guaranteed": (f"kubepods/pod{UID}/{CID}", "pod", f"pod{UID}", CID, UID, "guaranteed", None),
    "kind-node": (
        f"kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
        f"kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
        "pod",
        f"pod{UID}",
        CID,
        UID,
        "burstable",
        "containerd",
    ),
    "docker-node-cgroupfs-kubelet": (
        f"docker/{NODE_CID}/kubepods/besteffort/pod{UID}/{CID}",
        "pod",
        f"pod{UID}",
        CID,
        UID,
        "besteffort",
        None,
    ),
}


def check(workload: Workload, tree: CgroupTree, expected: tuple[object, ...]) -> None:
    _, kind, name, container_id, pod_uid, qos, runtime = expected
    assert workload.kind == kind, workload
    assert workload.name == name
    assert workload.cgroup == tree.path
    if kind == "unit":
        assert workload.unit == name
        assert workload.id == tree.path
    else:
        assert (workload.id, workload.pod_uid, workload.qos, workload.runtime) == (container_id, pod_uid, qos, runtime)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_in_cgroup_v2(leaker: Leaker, layout: str) -> None:
    expected = LAYOUTS[layout]
    process = scanned_process(leaker)
    with CgroupTree(hierarchy("unified"), str(expected[0])) as tree:
        tree.move(leaker.pid)
        check(WorkloadResolver().workload_of(process), tree, expected)
    assert WorkloadResolver().workload_of(process).kind == "host"


@pytest.mark.parametrize("label", [label for label in WANTED if label != "unified"])
@pytest.mark.parametrize("layout", ["kubelet-systemd-burstable", "kubelet-cgroupfs-burstable", "systemd-service"])
def test_v1_hierarchies_of_a_hybrid_host(leaker: Leaker, label: str, layout: str) -> None:
    """One v1 hierarchy names the workload although every other line still says where the test runs."""
    expected = LAYOUTS[layout]
    process = scanned_process(leaker)
    with CgroupTree(hierarchy(label), str(expected[0])) as tree:
        tree.move(leaker.pid)
        check(WorkloadResolver().workload_of(process), tree, expected)


def test_a_process_moved_mid_scan_keeps_its_first_attribution(leaker: Leaker) -> None:
    process = scanned_process(leaker)
    with CgroupTree(hierarchy("unified"), "system.slice/first.service") as tree:
        tree.move(leaker.pid)
        resolver = WorkloadResolver()
        assert resolver.workload_of(process).name == "first.service"
        tree.move(leaker.pid, tree.sibling("system.slice/second.service"))
        # the same resolver (one scan) keeps the answer; a fresh one, or after forget(), sees the move
        assert resolver.workload_of(process).name == "first.service"
        assert WorkloadResolver().workload_of(process).name == "second.service"
        resolver.forget()
        assert resolver.workload_of(process).name == "second.service"
        assert resolver.statistics().cgroup_reads == 2


def test_a_process_moving_while_it_is_read(leaker: Leaker) -> None:
    """Another process moves the leaker back and forth while fresh resolvers read it: each answer is
    one of the two units, never an exception and never a mix."""
    process = scanned_process(leaker)
    with CgroupTree(hierarchy("unified"), "system.slice/a.service") as tree:
        other = tree.sibling("system.slice/b.service")
        tree.move(leaker.pid)
        tree.moved.append(leaker.pid)
        mount = tree.hierarchy.mount
        mover = subprocess.Popen(
            [
                "sh",
                "-c",
                f"while :; do echo {leaker.pid} > {mount}{other}/cgroup.procs; "
                f"echo {leaker.pid} > {tree.leaf}/cgroup.procs; done",
            ]
        )
        names: collections.Counter[str] = collections.Counter()
        try:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                names[WorkloadResolver(names=False).workload_of(process).name] += 1
        finally:
            mover.kill()
            mover.wait()
    assert set(names) <= {"a.service", "b.service"}, names
    assert sum(names.values()) > 100


def test_an_exited_process_is_unknown_not_an_error() -> None:
    leaker = start_leaker()
    process = read_process(leaker.pid)
    resolver = WorkloadResolver()
    leaker.stop()
    workload = resolver.workload_of(process)
    assert (workload.kind, workload.error) == ("unknown", EXITED)
    assert resolver.workload_of(process) is workload  # the same answer for the rest of the scan


def test_a_reused_pid_is_not_attributed_to_the_old_process(leaker: Leaker) -> None:
    process = scanned_process(leaker)
    impostor = Process(process.pid, process.start_time + 1, process.name, process.cmdline)
    assert WorkloadResolver().workload_of(impostor).error == EXITED
    assert WorkloadResolver().workload_of(process).kind == "host"


def test_a_zombie_does_not_break_the_resolver() -> None:
    leaker = start_leaker()
    process = read_process(leaker.pid)
    try:
        with CgroupTree(hierarchy("unified"), "system.slice/zombie.service") as tree:
            tree.move(leaker.pid)
            os.kill(leaker.pid, 9)
            os.waitid(os.P_PID, leaker.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped
            workload = WorkloadResolver().workload_of(process)
            assert workload.kind in ("unit", "host", "unknown")
    finally:
        leaker.stop()


def test_one_cgroup_read_per_process(leaker: Leaker) -> None:
    process = scanned_process(leaker)
    resolver = WorkloadResolver()
    first = resolver.workload_of(process)
    for _ in range(1000):
        assert resolver.workload_of(process) is first
    stats = resolver.statistics()
    assert (stats.lookups, stats.cache_hits, stats.cgroup_reads) == (1001, 1000, 1)


def test_the_naming_is_the_pure_functions_naming(leaker: Leaker) -> None:
    """What the resolver reads from the kernel is exactly what ``workload_of_cgroup`` names."""
    process = scanned_process(leaker)
    layout = LAYOUTS["kind-node"][0]
    with CgroupTree(hierarchy("unified"), str(layout)) as tree:
        tree.move(leaker.pid)
        assert WorkloadResolver(names=False).workload_of(process) == workload_of_cgroup(tree.path)
