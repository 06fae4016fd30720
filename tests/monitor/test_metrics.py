"""The Collector behind ``closewait exporter``: metric names and values from real leaking children,
parsed with prometheus_client's own parser; shared scans; bounded cardinality; namespaces."""

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

from closewait.exporter import CloseWaitCollector, build_registry
from closewait.model import TcpState
from tests.conftest import Spawn
from tests.monitor.leakers import start_leaker
from tests.util import wait_for

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
    collector = CloseWaitCollector(min_interval=0)
    registry = build_registry(collector)
    samples = scrape(registry)

    (row,) = by_pid(samples, "closewait_close_wait_sockets", child.pid)
    labels, value = row
    assert value == 6
    assert (labels["role"], labels["diagnosis"], labels["process"]) == ("server", "not-reading", child_comm(child.pid))
    assert "netns" not in labels  # only with --all-netns
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
    assert kinds == {"scan", "netns", "owners", "owners_bpf"}
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
    collector = CloseWaitCollector(min_interval=0, top_n=2, netns=f"/run/netns/{netns_name}")
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
    other_unread = [v for labels, v in samples["closewait_close_wait_unread_bytes"] if labels["process"] == "other"]
    assert other_unread == [0.0]
    # The namespace's ESTABLISHED count is 0: the leakers' client ends were closed.
    states = {labels["state"]: value for labels, value in samples["closewait_tcp_sockets"]}
    assert states["established"] == 0
    assert states["listen"] == 4


def test_all_netns_adds_a_netns_label_naming_a_process(spawn: Spawn, netns_name: str) -> None:
    child, _ = start_leaker(spawn, initial=4, prefix=("ip", "netns", "exec", netns_name))
    collector = CloseWaitCollector(min_interval=0, all_netns=True, top_n=1000)
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
    assert errors == {"scan": 0, "netns": 0, "owners": 0, "owners_bpf": 2}
    (line,) = done.stderr.splitlines()
    assert line.startswith("closewait.exporter.collector: owners found by the /proc walk, not the BPF iterator: ")
    assert "pid namespace" in line


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
    registry = build_registry(CloseWaitCollector(min_interval=0))

    def rows() -> list[tuple[dict[str, str], float]] | None:
        found = by_pid(scrape(registry), "closewait_close_wait_sockets", child.pid)
        return found if found and found[0][1] == 3 else None

    ((labels, _),) = wait_for(rows, timeout=15, interval=0.1)
    assert labels["process"] == child_comm(child.pid) == "node"
    # node read the data and the EOF (Recv-Q 0) but never closed: the server's end of the leak.
    assert (labels["role"], labels["diagnosis"]) == ("server", "eof-not-closed")
