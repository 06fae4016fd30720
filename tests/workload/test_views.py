"""Workloads in every view, with real parts: real leaking processes moved into the cgroups systemd and
kubelet create (made under this test's own cgroup, ``realcg.CgroupTree``), real podman containers
(``realcg.run_container``), and the real ``closewait`` console script for scan, check, watch and reap.

The kubelet layout here is the cgroupfs driver's ``kubepods/burstable/pod<uid>/<container id>``; the
pod's namespace and names come from kubelet's /var/log/containers links, written in a temp directory
as kubelet writes them (the CLI reads the host's, so those tests call the library and the renderer).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

import closewait
from closewait.check import Status, Thresholds, evaluate
from closewait.cli.render.scan import print_snapshot
from closewait.sources.attribution import WorkloadResolver
from closewait.workload import WorkloadSelector
from tests.scan.kit import run_cli
from tests.workload.realcg import (
    CgroupTree,
    Container,
    Hierarchy,
    Leaker,
    can_run_podman,
    hierarchies,
    run_container,
    start_leaker,
    usable,
    write_kubelet_log_links,
)

pytestmark = pytest.mark.root

UID = "7b0c2d4e-1f3a-4b5c-8d9e-0a1b2c3d4e5f"
CID = "a1b2c3d4" * 8
UNIT = "web.service"


def unified() -> Hierarchy:
    found = hierarchies().get("unified")
    if found is None or not usable(found):
        pytest.skip("no writable cgroup v2 hierarchy here (or not root)")
    return found


@dataclass
class Placed:
    """Two leakers: ``unit`` in system.slice/web.service, ``pod`` in a burstable pod's container."""

    unit: Leaker
    pod: Leaker
    tree: CgroupTree

    @property
    def port_args(self) -> list[str]:
        return ["--port", str(self.unit.port), "--port", str(self.pod.port)]


@pytest.fixture
def placed() -> Iterator[Placed]:
    hierarchy = unified()
    unit, pod = start_leaker(), start_leaker()
    try:
        with CgroupTree(hierarchy, f"system.slice/{UNIT}") as tree:
            tree.move(unit.pid)
            tree.move(pod.pid, tree.sibling(f"kubepods/burstable/pod{UID}/{CID}"))
            yield Placed(unit, pod, tree)
    finally:
        unit.stop()
        pod.stop()


def cli(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    result = run_cli(*args)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.stdout[-2000:], result.stderr)
    return result


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stderr or result.stdout).splitlines()
    assert len(lines) == 1, (result.stdout, result.stderr)
    return lines[0]


# ---- scan ----------------------------------------------------------------------------------------


def test_scan_table_groups_by_workload_then_process(placed: Placed) -> None:
    lines = cli("scan", *placed.port_args).stdout.splitlines()
    assert lines[0].startswith("2 sockets in CLOSE_WAIT, held by 2 processes in 2 workloads")
    unit_heading = lines.index(f"unit {UNIT}  1 socket, 1 process")
    pod_heading = lines.index(f"pod uid {UID} container {CID[:12]} (burstable)  1 socket, 1 process")
    # each heading is followed (after a blank line) by its process, as scan --by process prints it
    assert lines[unit_heading + 2].startswith(f"pid {placed.unit.pid} ")
    assert lines[pod_heading + 2].startswith(f"pid {placed.pod.pid} ")

    by_process = cli("scan", "--by", "process", *placed.port_args).stdout.splitlines()
    assert by_process[0].startswith("2 sockets in CLOSE_WAIT, held by 2 processes  ")
    assert not any(line.startswith(("unit ", "pod ")) for line in by_process)
    assert {line.split()[1] for line in by_process if line.startswith("pid ")} == {
        str(placed.unit.pid),
        str(placed.pod.pid),
    }


@pytest.mark.parametrize(
    ("selector", "which"),
    [
        (["--unit", UNIT], "unit"),
        (["--unit", "web"], "unit"),  # .service may be left out, as systemctl allows
        (["--pod", UID], "pod"),
        (["--container", CID], "pod"),
        (["--container", CID[:6]], "pod"),
    ],
)
def test_scan_selectors_keep_only_that_workload(placed: Placed, selector: list[str], which: str) -> None:
    document = json.loads(cli("scan", "--json", *selector, *placed.port_args).stdout)
    leaker = placed.unit if which == "unit" else placed.pod
    assert [s["local"]["port"] for s in document["sockets"]] == [leaker.port]
    [owner] = document["sockets"][0]["owners"]
    assert owner["pid"] == leaker.pid
    assert owner["workload"]["kind"] == which
    key = {"--unit": "unit", "--pod": "pod", "--container": "container"}[selector[0]]
    assert document["selection"] == {key: selector[1]}

    table = cli("scan", *selector, *placed.port_args).stdout
    assert table.splitlines()[0].startswith("1 socket in CLOSE_WAIT, held by 1 process in 1 workload of ")


def test_scan_without_a_selection_has_no_selection_key(placed: Placed) -> None:
    document = json.loads(cli("scan", "--json", *placed.port_args).stdout)
    assert "selection" not in document
    kinds = {s["owners"][0]["workload"]["kind"] for s in document["sockets"]}
    assert kinds == {"unit", "pod"}
    plain = json.loads(cli("scan", "--json", "--no-workloads", *placed.port_args).stdout)
    assert {s["owners"][0]["workload"] is None for s in plain["sockets"]} == {True}


def test_a_workload_without_close_wait_is_an_empty_answer_not_an_error(placed: Placed) -> None:
    """web.service runs (a process is in it) but holds nothing on this port: exit 0, nothing listed."""
    other = str(placed.pod.port)
    assert cli("scan", "--unit", UNIT, "--port", other).stdout == f"no sockets in CLOSE_WAIT of unit {UNIT}\n"
    document = json.loads(cli("scan", "--json", "--unit", UNIT, "--port", other).stdout)
    assert (document["sockets"], document["selection"]) == ([], {"unit": UNIT})


def test_an_unknown_unit_is_one_line_with_the_closest_name(placed: Placed) -> None:
    line = one_line(cli("scan", "--unit", "web.servise", code=2))
    assert line == f"closewait: error: no unit web.servise on this host: no process runs in it; closest: {UNIT}"
    line = one_line(cli("scan", "--json", "--pod", "nosuch-7d9f", code=2))
    assert line.startswith("closewait: error: no pod nosuch-7d9f on this host")


def test_the_pod_named_by_kubelet_links_in_the_table(placed: Placed, tmp_path: Path) -> None:
    """Names from /var/log/containers (a temp copy written as kubelet does): the heading says
    namespace/pod, container and QoS, and ``--pod NS/NAME`` selects it."""
    links = write_kubelet_log_links(tmp_path, "payments", "api-7d9f8b6c5-x2x4z", UID, {"web": CID})
    resolver = WorkloadResolver(container_log_dir=str(links))
    selection = WorkloadSelector.parse(pod="payments/api-7d9f8b6c5-x2x4z")
    snapshot = closewait.scan(ports=[placed.unit.port, placed.pod.port], workloads=resolver, workload=selection)
    [finding] = snapshot.findings
    assert finding.owners[0].process.pid == placed.pod.pid

    out = Console(file=io.StringIO(), width=200, record=True)
    print_snapshot(snapshot, out=out)
    lines = out.export_text().splitlines()
    assert "pod payments/api-7d9f8b6c5-x2x4z container web (burstable)  1 socket, 1 process" in lines
    assert lines[0].startswith("1 socket in CLOSE_WAIT, held by 1 process in 1 workload of pod payments/api-")

    everything = closewait.scan(ports=[placed.unit.port, placed.pod.port], workloads=resolver)
    result = evaluate(everything, Thresholds(warning=0, per_workload=True))
    assert result.status == Status.WARNING
    assert "'close_wait pod payments/api-7d9f8b6c5-x2x4z container web'=1;0;;0" in result.perfdata


# ---- check and watch ----------------------------------------------------------------------------


def test_check_per_workload_names_the_worst_and_bounds_the_perfdata(placed: Placed) -> None:
    more = start_leaker()  # a second socket in web.service: it becomes the worst workload
    try:
        placed.tree.move(more.pid)
        args = ["--port", str(more.port), *placed.port_args]
        line = one_line(cli("check", "--per-workload", "-w", "1", "-c", "5", *args, code=1))
        assert line.startswith(f"CLOSEWAIT WARNING - 3 sockets in CLOSE_WAIT (worst: unit {UNIT} holds 2, 2 workloads)")
        perfdata = line.split(" | ")[1].split()
        assert perfdata[:2] == ["close_wait_max_workload=2;1;5;0", "close_wait=3;;;0"]
        assert f"'close_wait unit {UNIT}'=2;1;5;0" in line
        assert f"'close_wait pod uid {UID} container {CID[:12]}'=1;1;5;0" in line
        assert perfdata[-1] == "workloads=2;;;0"
        bounded = one_line(cli("check", "--per-workload", "--perfdata-top", "1", "-w", "1", *args, code=1))
        assert "'close_wait pod" not in bounded
        assert bounded.endswith("workloads=2;;;0")
        # a selection narrows what check counts
        narrowed = one_line(cli("check", "--per-workload", "--pod", UID, "-w", "1", *args))
        assert narrowed.startswith(f"CLOSEWAIT OK - 1 socket in CLOSE_WAIT (worst: pod uid {UID} container ")
    finally:
        more.stop()


def test_check_with_an_unknown_container_is_unknown(placed: Placed) -> None:
    line = one_line(cli("check", "--container", "no-such-container", code=3))
    assert line == "CLOSEWAIT UNKNOWN - no container no-such-container on this host: no process runs in it"
    line = one_line(cli("check", "--per-process", "--per-workload", code=3))
    assert line == "CLOSEWAIT UNKNOWN - give either --per-process or --per-workload, not both"


def test_watch_by_workload(placed: Placed) -> None:
    samples = [
        json.loads(line)
        for line in cli("watch", "--by", "workload", "-n", "2", "-i", "0.2", "--jsonl", *placed.port_args)
        .stdout.strip()
        .splitlines()
    ]
    assert len(samples) == 2
    for sample in samples:
        assert sample["by"] == "workload"
        rows = {row["workload"]["kind"]: row for row in sample["processes"]}
        assert set(rows) == {"unit", "pod"}
        assert (rows["unit"]["workload"]["name"], rows["unit"]["count"], rows["unit"]["process_count"]) == (
            UNIT,
            1,
            1,
        )
        assert rows["pod"]["workload"]["pod_uid"] == UID
        assert rows["unit"]["pid"] == placed.unit.pid  # a workload of one process names it
    plain = cli("watch", "--by", "workload", "-n", "1", "--unit", UNIT, *placed.port_args).stdout.splitlines()
    assert plain[1].startswith(f"  unit {UNIT} (1 process): count 1 (+0)")
    assert len(plain) == 2
    by_process = cli("watch", "-n", "1", "--jsonl", "--unit", UNIT, *placed.port_args).stdout
    [row] = json.loads(by_process)["processes"]
    assert (row["pid"], row["workload"]["name"]) == (placed.unit.pid, UNIT)


# ---- reap --------------------------------------------------------------------------------------


def test_reap_by_unit_plans_and_releases_only_that_unit(placed: Placed) -> None:
    plan = json.loads(cli("reap", "--unit", UNIT, "--json", *placed.port_args).stdout)
    assert plan["applied"] is False
    assert [(t["pid"], t["local"]["port"]) for t in plan["targets"]] == [(placed.unit.pid, placed.unit.port)]
    assert plan["targets"][0]["workload"]["name"] == UNIT
    assert plan["criteria"] == f"unit {UNIT}, port {min(placed.unit.port, placed.pod.port)}, " + (
        f"{max(placed.unit.port, placed.pod.port)}"
    )
    text = cli("reap", "--unit", UNIT, *placed.port_args).stdout
    assert f"pid {placed.unit.pid} python  [unit {UNIT}]" in text

    done = json.loads(cli("reap", "--unit", UNIT, "--json", "--yes", *placed.port_args).stdout)
    assert [(o["pid"], o["outcome"]) for o in done["outcomes"]] == [(placed.unit.pid, "done")]
    left = closewait.scan(ports=[placed.unit.port, placed.pod.port])
    assert [f.socket.local.port for f in left.findings] == [placed.pod.port]


def test_reap_selection_only_narrows(placed: Placed) -> None:
    """With --pid, a workload option keeps only the sockets of that pid that are in the workload."""
    plan = json.loads(cli("reap", "--pid", str(placed.pod.pid), "--unit", UNIT, "--json").stdout)
    assert plan["targets"] == []
    line = one_line(cli("reap", "--unit", "zzz", code=2))
    assert line == "closewait: error: no unit zzz on this host: no process runs in it"


# ---- processes that exit or move while the CLI scans ---------------------------------------------


def test_scans_while_processes_move_and_exit_never_fail(placed: Placed) -> None:
    """One leaker is moved between two units in a loop, others exit, while the console script scans
    by workload, as JSON and as a table: every run exits 0 and names one of the two units."""
    mount = placed.tree.hierarchy.mount
    other = placed.tree.sibling("system.slice/other.service")
    mover = subprocess.Popen(
        [
            "sh",
            "-c",
            f"while :; do echo {placed.unit.pid} > {mount}{other}/cgroup.procs; "
            f"echo {placed.unit.pid} > {placed.tree.leaf}/cgroup.procs; done",
        ]
    )
    placed.tree.moved.append(placed.unit.pid)
    exiting = [start_leaker() for _ in range(4)]
    ports = [arg for leaker in exiting for arg in ("--port", str(leaker.port))]

    def stop_them() -> None:
        for leaker in exiting:
            time.sleep(0.3)
            leaker.stop()

    stopper = threading.Thread(target=stop_them)
    stopper.start()
    try:
        names = set()
        for round_ in range(6):
            if round_ % 2:
                cli("scan", *placed.port_args, *ports)
                continue
            document = json.loads(cli("scan", "--json", *placed.port_args, *ports).stdout)
            for sock in document["sockets"]:
                for owner in sock["owners"]:
                    if owner["pid"] == placed.unit.pid:
                        names.add(owner["workload"]["name"])
    finally:
        mover.kill()
        mover.wait()
        stopper.join()
        for leaker in exiting:
            leaker.stop()
    assert names <= {UNIT, "other.service"}, names


# ---- unreadable and malformed cgroup files -------------------------------------------------------


@pytest.fixture
def leakers() -> Iterator[list[Leaker]]:
    if os.geteuid() != 0:
        pytest.skip("needs root (as the rest of the workload tests)")
    started = [start_leaker(), start_leaker()]
    yield started
    for leaker in started:
        leaker.stop()


@pytest.mark.parametrize("damage", ["malformed", "unreadable"])
def test_a_bad_cgroup_file_is_unknown_and_one_warning(leakers: list[Leaker], tmp_path: Path, damage: str) -> None:
    """The kernel cannot be made to write a bad /proc/PID/cgroup, so the resolver reads a stand-in
    /proc (a temp dir) while the scan itself is real: both processes get ``unknown`` with the reason,
    the scan says so once, and the table shows an ``unknown`` heading."""
    for leaker in leakers:
        directory = tmp_path / str(leaker.pid)
        directory.mkdir()
        if damage == "malformed":
            (directory / "cgroup").write_text("this is not a cgroup line\n")
        else:
            (directory / "cgroup").mkdir()  # read() fails with EISDIR
    resolver = WorkloadResolver(proc_root=str(tmp_path), verify=False)
    # --pid: the owners come from these two processes' own fd tables, whatever else runs meanwhile
    snapshot = closewait.scan(
        ports=[leaker.port for leaker in leakers], pids=[leaker.pid for leaker in leakers], workloads=resolver
    )
    assert len(snapshot.findings) == 2
    workloads = {f.owners[0].process.workload for f in snapshot.findings}
    assert {w.kind for w in workloads if w is not None} == {"unknown"}
    [warning] = snapshot.errors
    first = min(leaker.pid for leaker in leakers)
    assert warning.startswith(f"workload unknown for pid {first} python (and 1 more processes): ")
    assert ("malformed" if damage == "malformed" else "cannot read") in warning

    out = Console(file=io.StringIO(), width=200, record=True)
    print_snapshot(snapshot, out=out)
    headings = [line for line in out.export_text().splitlines() if line.startswith("unknown (")]
    assert len(headings) == 1, headings
    assert headings[0].endswith("2 sockets, 2 processes")


# ---- real podman containers --------------------------------------------------------------------


@pytest.mark.slow
def test_scan_names_and_selects_a_podman_container(container: Container) -> None:
    lines = cli("scan", "--netns", container.netns, "--port", str(container.port)).stdout.splitlines()
    heading = f"container {container.name} (podman {container.id[:12]})  1 socket, 1 process"
    assert heading in lines
    assert lines[lines.index(heading) + 2].startswith(f"pid {container.pid}  python3  ")

    for value in (container.name, container.id[:12], container.id):
        document = json.loads(cli("scan", "--json", "--netns", container.netns, "--container", value).stdout)
        assert document["selection"] == {"container": value}
        [sock] = [s for s in document["sockets"] if s["local"]["port"] == container.port]
        workload = sock["owners"][0]["workload"]
        assert (workload["kind"], workload["name"], workload["id"], workload["runtime"]) == (
            "container",
            container.name,
            container.id,
            "podman",
        )
    typo = container.name[:-1]
    line = one_line(cli("scan", "--container", typo, code=2))
    assert line == (
        f"closewait: error: no container {typo} on this host: no process runs in it; closest: {container.name}"
    )

    check = one_line(cli("check", "--per-workload", "-w", "0", "--netns", container.netns, code=1))
    assert f"worst: container {container.name} holds 1" in check


@pytest.mark.slow
def test_reap_a_podman_container_releases_exactly_its_sockets(tmp_path: Path) -> None:
    """A container on the host's network (so its sockets are in the host's table, where reap acts) and
    a leaker outside it: reap --container plans and releases the container's socket only."""
    if not can_run_podman():
        pytest.skip("needs root, podman and runc (apt-get install podman runc)")
    outside = start_leaker()
    try:
        with run_container(tmp_path, network="host") as running:
            ports = ["--port", str(running.port), "--port", str(outside.port)]
            plan = json.loads(cli("reap", "--container", running.name, "--json", *ports).stdout)
            assert [(t["pid"], t["local"]["port"]) for t in plan["targets"]] == [(running.pid, running.port)]
            assert plan["targets"][0]["workload"]["name"] == running.name
            done = json.loads(cli("reap", "--container", running.name, "--json", "--yes", *ports).stdout)
            assert [(o["pid"], o["outcome"]) for o in done["outcomes"]] == [(running.pid, "done")]
            left = closewait.scan(ports=[running.port, outside.port])
            assert [f.socket.local.port for f in left.findings] == [outside.port]
    finally:
        outside.stop()
