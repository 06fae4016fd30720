"""The Collector behind ``closewait exporter``: metric names and values from real leaking children,
parsed with prometheus_client's own parser; shared scans; bounded cardinality; namespaces; workload
labels from real cgroups (systemd units, a kubelet pod with its log link, a podman container's cgroup)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from closewait.exporter import WORKLOAD_LABELS, CloseWaitCollector, build_registry, workload_labels
from closewait.model import TcpState
from closewait.sources.attribution import WorkloadResolver
from tests.conftest import Spawn
from tests.monitor.leakers import start_leaker
from tests.util import wait_for
from tests.workload.realcg import CgroupTree, Hierarchy, hierarchies, usable

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(registry: CollectorRegistry) -> Samples:
    """Render the registry as the exposition text and parse it back (what Prometheus would read)."""
    text = generate_latest(registry).decode()
    result: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return result


def by_pid(samples: Samples, name: str, pid: int) -> list[tuple[dict[str, str], float]]:
    return [(labels, value) for labels, value in samples.get(name, []) if labels.get("pid") == str(pid)]


def test_metrics_for_a_leaking_child(spawn: Spawn) -> None:
    child, _ = start_leaker(spawn, initial=6)
    collector = CloseWaitCollector(min_interval=0, pid_label=True)
    registry = build_registry(collector)
    samples = scrape(registry)

    (row,) = by_pid(samples, "closewait_close_wait_sockets", child.pid)
    labels, value = row
    assert value == 6
    assert (labels["role"], labels["diagnosis"], labels["process"]) == ("server", "not-reading", child_comm(child.pid))
    assert "netns" not in labels  # only with --all-netns
    # The workload labels are always there, "" where they do not apply (the child runs where this test runs).
    expected = workload_labels(WorkloadResolver().workload_of_pid(child.pid))
    assert tuple(labels[name] for name in WORKLOAD_LABELS) == expected
    ((_, oldest),) = by_pid(samples, "closewait_close_wait_oldest_idle_seconds", child.pid)
    assert oldest >= 0
    ((_, unread),) = by_pid(samples, "closewait_close_wait_unread_bytes", child.pid)
    assert unread == 0  # never-read sockets hold only the FIN

    # Every TCP state has a series, zeros included, and the host's CLOSE_WAIT count includes the child's.
    states = {labels["state"]: value for labels, value in samples["closewait_tcp_sockets"]}
    assert set(states) == {s.name.lower() for s in TcpState}
    assert states["close_wait"] >= 6
    assert states["listen"] >= 1
    assert samples["closewait_scan_duration_seconds"][0][1] > 0
    assert samples["closewait_scan_success"] == [({}, 1.0)]
    kinds = {labels["kind"] for labels, _ in samples["closewait_scan_errors_total"]}
    assert kinds == {"scan", "netns", "owners", "owners_bpf", "kubernetes_api"}
    assert {labels["kind"]: v for labels, v in samples["closewait_scan_errors_total"]}["scan"] == 0


def child_comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as handle:
        return handle.read().strip()


def test_register_does_not_scan() -> None:
    collector = CloseWaitCollector(min_interval=3600)
    registry = CollectorRegistry()
    registry.register(collector)  # calls describe()
    names = {metric.name for metric in collector.describe()}
    assert "closewait_tcp_sockets" in names
    assert "closewait_scan_errors" in names
    assert all(not metric.samples for metric in collector.describe())
    first = scrape(registry)
    assert first["closewait_scans_total"] == [({}, 1.0)]  # the first scrape made the first scan


def test_concurrent_scrapes_share_one_scan(spawn: Spawn) -> None:
    start_leaker(spawn, initial=3)
    collector = CloseWaitCollector(min_interval=60)
    registry = build_registry(collector)
    results: list[Samples] = []
    lock = threading.Lock()

    def one() -> None:
        samples = scrape(registry)
        with lock:
            results.append(samples)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 8
    assert {r["closewait_scans_total"][0][1] for r in results} == {1.0}
    assert len({r["closewait_last_scan_timestamp_seconds"][0][1] for r in results}) == 1

    # With no minimum interval every scrape scans.
    eager = build_registry(CloseWaitCollector(min_interval=0))
    scrape(eager)
    assert scrape(eager)["closewait_scans_total"] == [({}, 2.0)]


def test_top_n_folds_the_rest_into_other(spawn: Spawn, netns_name: str) -> None:
    """Four leakers in a private namespace: with --top 2 the two biggest keep their series, the
    other two are summed into process="other"; sums are preserved."""
    prefix = ("ip", "netns", "exec", netns_name)
    sizes = [7, 5, 2, 1]
    children = [start_leaker(spawn, initial=n, prefix=prefix)[0] for n in sizes]
    collector = CloseWaitCollector(min_interval=0, top_n=2, netns=f"/run/netns/{netns_name}", pid_label=True)
    registry = build_registry(collector)

    def ready() -> Samples | None:
        samples = scrape(registry)
        states = {labels["state"]: value for labels, value in samples["closewait_tcp_sockets"]}
        return samples if states["close_wait"] == sum(sizes) else None

    samples = wait_for(ready, timeout=15, interval=0.1)
    rows = {(labels["pid"], labels["process"]): value for labels, value in samples["closewait_close_wait_sockets"]}
    comm = child_comm(children[0].pid)
    assert rows == {(str(children[0].pid), comm): 7, (str(children[1].pid), comm): 5, ("", "other"): 3}
    assert samples["closewait_processes_folded"] == [({}, 2.0)]
    assert samples["closewait_workloads_folded"] == [({}, 0.0)]  # all four run in one workload
    other_unread = [v for labels, v in samples["closewait_close_wait_unread_bytes"] if labels["process"] == "other"]
    assert other_unread == [0.0]
    # The namespace's ESTABLISHED count is 0: the leakers' client ends were closed.
    states = {labels["state"]: value for labels, value in samples["closewait_tcp_sockets"]}
    assert states["established"] == 0
    assert states["listen"] == 4


def test_all_netns_adds_a_netns_label_naming_a_process(spawn: Spawn, netns_name: str) -> None:
    child, _ = start_leaker(spawn, initial=4, prefix=("ip", "netns", "exec", netns_name))
    collector = CloseWaitCollector(min_interval=0, all_netns=True, top_n=1000, pid_label=True)
    registry = build_registry(collector)
    label = f"{child.pid}/{child_comm(child.pid)}"  # the lowest (only) pid in the new namespace

    def found() -> list[tuple[dict[str, str], float]] | None:
        rows = by_pid(scrape(registry), "closewait_close_wait_sockets", child.pid)
        return rows if rows and rows[0][1] == 4 else None

    ((labels, _value),) = wait_for(found, timeout=15, interval=0.1)
    assert labels["netns"] == label
    samples = scrape(registry)
    ns_states = {lab["state"]: v for lab, v in samples["closewait_tcp_sockets"] if lab["netns"] == label}
    assert ns_states["close_wait"] == 4
    assert len(ns_states) == len(TcpState)
    # The host namespace is there too, under another label.
    assert len({lab["netns"] for lab, _ in samples["closewait_tcp_sockets"]}) >= 2


# A collector scraped twice in a process of its own, holding one CLOSE_WAIT socket so owners are
# looked up; prints the scan-errors counters and the log lines.
FALLBACK_SCRAPES = """
import json, logging, socket
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from closewait.exporter import CloseWaitCollector, build_registry
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
client = socket.create_connection(srv.getsockname())
conn, _ = srv.accept()
client.close()
registry = build_registry(CloseWaitCollector(min_interval=0))
for _ in range(2):
    text = generate_latest(registry).decode()
errors = {s.labels["kind"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
          if s.name == "closewait_scan_errors_total"}
print(json.dumps(errors))
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_a_bpf_fallback_is_counted_on_every_scan_and_logged_once() -> None:
    """In another pid namespace the BPF owner lookup refuses itself (its pids are not /proc's): each
    scan counts kind="owners_bpf", and the reason is logged once, not on every scrape."""
    src = Path(__file__).resolve().parents[2] / "src"
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", FALLBACK_SCRAPES],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(src)),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    errors = json.loads(done.stdout)
    assert errors == {"scan": 0, "netns": 0, "owners": 0, "owners_bpf": 2, "kubernetes_api": 0}
    (line,) = done.stderr.splitlines()
    assert line.startswith("closewait.exporter.collector: owners found by the /proc walk, not the BPF iterator: ")
    assert "pid namespace" in line


def test_the_owner_cache_kept_between_scrapes_still_sees_new_leaks(spawn: Spawn) -> None:
    """The collector keeps the last full owner pass for its next scans; a process that starts leaking
    after that pass is found on the next scrape all the same (its sockets are new to the cache)."""
    first_child, _ = start_leaker(spawn, initial=3)
    collector = CloseWaitCollector(min_interval=0, pid_label=True)
    first = scrape(build_registry(collector))
    if not collector.owner_cache.pass_ticks:
        pytest.skip("no BPF owner lookup here: the cache is filled only by a full BPF pass")
    ((_, value),) = by_pid(first, "closewait_close_wait_sockets", first_child.pid)
    assert value == 3
    second_child, _ = start_leaker(spawn, initial=2)
    second = scrape(build_registry(collector))
    assert [v for _, v in by_pid(second, "closewait_close_wait_sockets", first_child.pid)] == [3]
    assert [v for _, v in by_pid(second, "closewait_close_wait_sockets", second_child.pid)] == [2]
    third = scrape(build_registry(collector))
    assert [v for _, v in by_pid(third, "closewait_close_wait_sockets", second_child.pid)] == [2]


NODE_SERVER = """
const net = require('net');
const held = [];
// allowHalfOpen: after the client's FIN, node leaves closing to the code, and this code forgets.
const server = net.createServer({ allowHalfOpen: true }, (socket) => {
  held.push(socket);
  socket.on('data', () => {});
  socket.on('end', () => { /* should call socket.end() here */ });
});
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
"""


def test_node_server_that_forgets_to_end_is_exported_with_its_name_and_diagnosis(spawn: Spawn) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (./dev test installs nodejs)")
    child = spawn(argv=[node, "-e", NODE_SERVER])
    assert child.stdout is not None
    port = int(child.stdout.readline())
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
    registry = build_registry(CloseWaitCollector(min_interval=0, pid_label=True))

    def rows() -> list[tuple[dict[str, str], float]] | None:
        found = by_pid(scrape(registry), "closewait_close_wait_sockets", child.pid)
        return found if found and found[0][1] == 3 else None

    ((labels, _),) = wait_for(rows, timeout=15, interval=0.1)
    assert labels["process"] == child_comm(child.pid) == "node"
    # node read the data and the EOF (Recv-Q 0) but never closed: the server's end of the leak.
    assert (labels["role"], labels["diagnosis"]) == ("server", "eof-not-closed")


# ---- workload labels, from real cgroups made under this test's own cgroup (tests/workload/realcg.py) ----

CID = "7c1d" * 16
SIDECAR_CID = "5e1f" * 16
PODMAN_CID = "a3b4" * 16
POD_UID = "0f5e8a2c-7b1d-4c3e-9f6a-1b2c3d4e5f60"
POD_SLICE = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice"


def writable_hierarchy() -> Hierarchy:
    """One hierarchy to make cgroups in: the resolver names a process by its most specific cgroup line."""
    for label in ("memory", "unified", "pids"):
        found = hierarchies().get(label)
        if found is not None and usable(found):
            return found
    pytest.skip("no writable cgroup hierarchy here (or not root)")


def rows_of(samples: Samples, labels: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """closewait_close_wait_sockets summed over role and diagnosis, keyed by ``labels``' values."""
    rows: dict[tuple[str, ...], float] = {}
    for sample_labels, value in samples.get("closewait_close_wait_sockets", []):
        key = tuple(sample_labels.get(name, "<absent>") for name in labels)
        rows[key] = rows.get(key, 0) + value
    return rows


def scrape_when(registry: CollectorRegistry, close_wait: int) -> Samples:
    def ready() -> Samples | None:
        samples = scrape(registry)
        states = {labels["state"]: value for labels, value in samples["closewait_tcp_sockets"]}
        return samples if states["close_wait"] == close_wait else None

    return wait_for(ready, timeout=15, interval=0.1)


def test_series_are_labelled_by_workload_and_sum_by_pod(spawn: Spawn, netns_name: str, tmp_path: Path) -> None:
    """Leakers in a systemd unit, in two containers of one Kubernetes pod (systemd driver, named by
    kubelet's log links in a temp root) and in a podman container's cgroup that no runtime names: each
    series carries its workload's labels, there is no pid label, and summing by (namespace, pod)
    gives the pod's total."""
    hierarchy = writable_hierarchy()
    logs = tmp_path / "var" / "log" / "containers"
    logs.mkdir(parents=True)
    for container, cid in (("web", CID), ("sidecar", SIDECAR_CID)):
        target = f"/var/log/pods/payments_api-7d9f_{POD_UID}/{container}/0.log"
        (logs / f"api-7d9f_payments_{container}-{cid}.log").symlink_to(target)
    prefix = ("ip", "netns", "exec", netns_name)
    unit, web, sidecar, podman = (start_leaker(spawn, initial=n, prefix=prefix)[0] for n in (3, 2, 1, 4))
    comm = child_comm(unit.pid)
    resolver = WorkloadResolver(host_root=str(tmp_path))
    registry = build_registry(CloseWaitCollector(min_interval=0, netns=f"/run/netns/{netns_name}", resolver=resolver))
    with CgroupTree(hierarchy, "system.slice/web.service") as tree:
        tree.move(unit.pid)
        tree.move(web.pid, tree.sibling(f"{POD_SLICE}/cri-containerd-{CID}.scope"))
        tree.move(sidecar.pid, tree.sibling(f"{POD_SLICE}/cri-containerd-{SIDECAR_CID}.scope"))
        tree.move(podman.pid, tree.sibling(f"machine.slice/libpod-{PODMAN_CID}.scope"))
        samples = scrape_when(registry, 10)
    assert rows_of(samples, (*WORKLOAD_LABELS, "process", "pid")) == {
        ("", "", "", "web.service", comm, "<absent>"): 3,
        ("payments", "api-7d9f", "web", "", comm, "<absent>"): 2,
        ("payments", "api-7d9f", "sidecar", "", comm, "<absent>"): 1,
        ("", "", PODMAN_CID[:12], "", comm, "<absent>"): 4,  # no runtime metadata names it: its short id
    }
    assert rows_of(samples, ("namespace", "pod")) == {("payments", "api-7d9f"): 3, ("", ""): 7}
    oldest = {labels["container"]: v for labels, v in samples["closewait_close_wait_oldest_idle_seconds"]}
    assert set(oldest) == {"", "web", "sidecar", PODMAN_CID[:12]}


def test_top_keeps_workloads_then_processes_and_folds_the_rest_into_other(spawn: Spawn, netns_name: str) -> None:
    """Three units: a.service (three processes: 4, 2 and 1 sockets), b.service (3), c.service (2).
    With --top 2, a and b keep their series and c is folded into the row with no workload; in a, the
    third process is folded into a.service's own process="other". Without the pid label a's three
    processes (one name) are one row."""
    hierarchy = writable_hierarchy()
    prefix = ("ip", "netns", "exec", netns_name)
    a1, a2, a3, b, c = (start_leaker(spawn, initial=n, prefix=prefix)[0] for n in (4, 2, 1, 3, 2))
    comm = child_comm(a1.pid)
    with_pids = build_registry(
        CloseWaitCollector(min_interval=0, top_n=2, netns=f"/run/netns/{netns_name}", pid_label=True)
    )
    by_name = build_registry(CloseWaitCollector(min_interval=0, top_n=2, netns=f"/run/netns/{netns_name}"))
    with CgroupTree(hierarchy, "system.slice/a.service") as tree:
        for pid in (a1.pid, a2.pid, a3.pid):
            tree.move(pid)
        tree.move(b.pid, tree.sibling("system.slice/b.service"))
        tree.move(c.pid, tree.sibling("system.slice/c.service"))
        samples = scrape_when(with_pids, 12)
        named = scrape_when(by_name, 12)
    assert rows_of(samples, ("unit", "process", "pid")) == {
        ("a.service", comm, str(a1.pid)): 4,
        ("a.service", comm, str(a2.pid)): 2,
        ("a.service", "other", ""): 1,
        ("b.service", comm, str(b.pid)): 3,
        ("", "other", ""): 2,
    }
    assert samples["closewait_processes_folded"] == [({}, 2.0)]
    assert samples["closewait_workloads_folded"] == [({}, 1.0)]
    assert rows_of(named, ("unit", "process")) == {("a.service", comm): 7, ("b.service", comm): 3, ("", "other"): 2}
    assert named["closewait_processes_folded"] == [({}, 1.0)]
    assert named["closewait_workloads_folded"] == [({}, 1.0)]


def test_a_scan_restores_only_the_garbage_collector_state_it_changed() -> None:
    """The pause is process-wide: a collector disabled before a scan stays disabled after it; an
    enabled one is enabled again, only when the last of two overlapping scans ends."""
    import gc

    from closewait.exporter.collector import _gc_paused

    collector = CloseWaitCollector(min_interval=0)
    was = gc.isenabled()
    try:
        gc.disable()
        collector.scan_once()
        assert not gc.isenabled()
        gc.enable()
        collector.scan_once()
        assert gc.isenabled()
        first, second = _gc_paused(), _gc_paused()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert not gc.isenabled()  # the second scan still runs
        second.__exit__(None, None, None)
        assert gc.isenabled()
    finally:
        collector.close()
        (gc.enable if was else gc.disable)()
