"""The views' workload logic on hand-made Snapshots (no kernel): watch's history per workload survives
its processes being replaced, check's per-workload perfdata stays bounded, and reap's plan only narrows."""

from __future__ import annotations

from closewait import reap
from closewait.check import Status, Thresholds, evaluate, perfdata_label
from closewait.model import Endpoint, Family, Finding, Owner, Process, Role, Snapshot, Socket, TcpInfo, TcpState
from closewait.watch import Tracker, Trend
from closewait.workload import HOST, Workload, WorkloadSelector

WEB = Workload("container", "web", "ab" * 32, runtime="podman", container="web")
API = Workload("pod", "api-7d9f", "cd" * 32, pod="api-7d9f", namespace="payments", container="api", qos="burstable")
INFO = TcpInfo(8, 0, 0, 0, 200_000, 1000, 1000, 1000, 100, 0, 0)


def finding(port: int, process: Process) -> Finding:
    sock = Socket(
        TcpState.CLOSE_WAIT,
        Family.IPV4,
        Endpoint("127.0.0.1", 8080),
        Endpoint("127.0.0.1", port),
        inode=port,
        uid=0,
        recv_q=0,
        send_q=0,
        cookie=port,
        tcp_info=INFO,
    )
    return Finding(sock, (Owner(process, 3 + port % 100),), Role.SERVER, None)


def snapshot(at: float, findings: list[Finding]) -> Snapshot:
    return Snapshot(tuple(findings), frozenset({TcpState.CLOSE_WAIT}), at, "netlink")


def proc(pid: int, workload: Workload) -> Process:
    return Process(pid, 1000 + pid, "python3", ("python3", "app.py"), workload=workload)


def test_watch_by_workload_keeps_one_history_while_processes_are_replaced() -> None:
    by_workload = Tracker(window=3, min_growth=2, by="workload")
    by_process = Tracker(window=3, min_growth=2)
    port = 40000
    for step in range(3):  # a new worker pid each sample, holding one more leaked socket than the last
        worker = proc(100 + step, WEB)
        sample = snapshot(float(step), [finding(port + i, worker) for i in range(step + 1)])
        workload_sample = by_workload.observe(sample)
        process_sample = by_process.observe(sample)
    [row] = workload_sample.processes
    assert (row.workload, row.count, row.process_count, row.trend) == (WEB, 3, 1, Trend.LEAKING)
    assert row.window_counts == (1, 2, 3)
    assert workload_sample.grouping == "workload"
    assert [r.trend for r in process_sample.processes] == [Trend.NEW]  # a new pid, no history


def test_watch_by_workload_counts_a_shared_socket_once() -> None:
    one, two = proc(1, WEB), proc(2, WEB)
    shared = finding(40000, one)
    shared = Finding(shared.socket, (Owner(one, 3), Owner(two, 4)), Role.SERVER, None)
    [row] = Tracker(by="workload").observe(snapshot(0.0, [shared, finding(40001, two)])).processes
    assert (row.count, row.process_count, row.process) == (2, 2, None)


def test_check_per_workload_names_the_worst_and_bounds_perfdata() -> None:
    findings = [finding(40000 + i, proc(10 + i % 2, WEB)) for i in range(4)]
    findings += [finding(41000, proc(20, API)), finding(42000, proc(30, HOST))]
    result = evaluate(snapshot(0.0, findings), Thresholds(warning=3, critical=10, per_workload=True, perfdata_top=2))
    assert result.status == Status.WARNING
    assert result.summary.startswith("6 sockets in CLOSE_WAIT (worst: container web holds 4, 3 workloads)")
    assert result.perfdata[:2] == ("close_wait_max_workload=4;3;10;0", "close_wait=6;;;0")
    workload_items = [p for p in result.perfdata if p.startswith("'")]
    assert workload_items == [
        "'close_wait container web'=4;3;10;0",
        "'close_wait pod payments/api-7d9f container api'=1;3;10;0",
    ]
    assert result.perfdata[-1] == "workloads=3;;;0"
    assert perfdata_label("a'b=c " + "x" * 200) == "'a_b_c " + "x" * 94 + "'"


def test_reap_plan_with_a_workload_only_narrows() -> None:
    web, api = proc(10, WEB), proc(20, API)
    snap = snapshot(0.0, [finding(40000, web), finding(40001, api)])
    plan = reap.plan(snap, workload=WorkloadSelector.parse(container="web"))
    assert [(t.process.pid, t.socket.remote.port) for t in plan.targets] == [(10, 40000)]
    assert plan.criteria.describe() == "container web"
    assert reap.plan(snap, pids=[20], workload=WorkloadSelector.parse(container="web")).targets == ()
    by_pod = reap.plan(snap, workload=WorkloadSelector.parse(pod="payments/api-7d9f"))
    assert [t.process.pid for t in by_pod.targets] == [20]
    everything = reap.plan(snap, all_processes=True, workload=WorkloadSelector.parse(namespace="payments"))
    assert [t.process.pid for t in everything.targets] == [20]
