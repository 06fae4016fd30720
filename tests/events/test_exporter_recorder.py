"""The exporter with the CLOSE_WAIT recorder: real recorder, real sockets, real exporter process.

The worker (``netns_worker.py``) runs alone in a network namespace, and the exporter is given that
namespace (``netns=``/``--netns``), so its recorder records only the worker's sockets: the
entered/left counters change by exactly what the worker did, whatever else runs on the machine.
Series are picked by the worker's pid (``pid_label``). Each bucket of the exporter's histogram is
checked exactly against the kernel's histogram for the worker, and against the worker's own clock
readings (exact where they fix the bucket; a close preempted across a bound may land either side).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from closewait.events import BUCKET_BOUNDS, N_BUCKETS, bucket_index
from closewait.exporter import CloseWaitCollector, build_registry
from closewait.model import TcpState
from closewait.sources import netlink
from closewait.sources.recorder import cgroup_id, mount_bpffs
from tests.conftest import Nobody
from tests.events.test_recorder import _REASON, Worker, start_worker

pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"recorder unavailable: {_REASON}")

CLOSEWAIT = str(Path(sys.executable).with_name("closewait"))
HIST = "closewait_close_wait_duration_seconds"
#: 300 closes: most at once, some after 50 ms, 200 ms and 1 s (about 1.2 s in all).
DELAYS = [1.0] * 5 + [0.2] * 15 + [0.05] * 60 + [0.0] * 220

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples_of(families: object) -> Samples:
    out: Samples = {}
    for family in families:  # type: ignore[attr-defined]
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels`` (0 when there is none)."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def _buckets(samples: Samples, pid: int) -> list[float]:
    """The worker's cumulative bucket counts, in ``le`` order, +Inf last."""
    les = [*(str(float(b)) for b in BUCKET_BOUNDS), "+Inf"]
    return [_value(samples, f"{HIST}_bucket", pid=str(pid), le=le) for le in les]


def _cumulative(counts: list[int]) -> list[float]:
    total, out = 0, []
    for n in counts:
        total += n
        out.append(float(total))
    return out


def _expected(brackets: list[list[int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Per-bucket counts the worker's clocks fix, and the (low, high) buckets of the closes they do not."""
    known = [0] * N_BUCKETS
    straddling: list[tuple[int, int]] = []
    for low, high, _cookie in brackets:
        if bucket_index(low) == bucket_index(high):
            known[bucket_index(low)] += 1
        else:
            straddling.append((bucket_index(low), bucket_index(high)))
    return known, straddling


def _check_buckets(got: list[float], before: list[float], brackets: list[list[int]]) -> None:
    per_bucket = [int(g - b) for g, b in zip(got, before, strict=True)]
    counts = [per_bucket[0]] + [per_bucket[i] - per_bucket[i - 1] for i in range(1, N_BUCKETS)]
    known, straddling = _expected(brackets)
    assert len(straddling) <= len(brackets) // 10, straddling
    for index in range(N_BUCKETS):
        spread = sum(lo <= index <= hi for lo, hi in straddling)
        assert known[index] <= counts[index] <= known[index] + spread, (index, counts, known)
    assert sum(counts) == len(brackets)


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    started = start_worker(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"'])
    yield started
    started.end()


@pytest.fixture
def bpffs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "bpffs"
    assert mount_bpffs(str(mount))
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture
def collector(worker: Worker, bpffs: Path) -> Iterator[CloseWaitCollector]:
    made = CloseWaitCollector(
        netns=worker.netns,
        recorder="on",
        recorder_pin_dir=str(bpffs / "closewait"),
        pid_label=True,
        min_interval=0,
    )
    try:
        yield made
    finally:
        made.close()
    assert not (bpffs / "closewait").exists()  # what it pinned is unpinned


def _scrape(collector: CloseWaitCollector) -> Samples:
    return _samples_of(build_registry(collector).collect())


def test_histogram_and_counters_are_exact_for_the_worker(worker: Worker, collector: CloseWaitCollector) -> None:
    before = _scrape(collector)
    assert _value(before, "closewait_state_counts_source") == 1.0
    hist_before = _buckets(before, worker.pid)
    recorder = collector._recorder
    assert recorder is not None
    kernel_before = recorder.recorder.histograms().get((cgroup_id(worker.pid) or 0, worker.pid))

    brackets = worker.call("stress", delays=DELAYS)
    after = _scrape(collector)

    got = _buckets(after, worker.pid)
    _check_buckets(got, hist_before, brackets)
    # The exporter serves the kernel's own histogram for the worker, bucket for bucket.
    kernel = recorder.recorder.histograms()[(cgroup_id(worker.pid) or 0, worker.pid)]
    if kernel_before is not None:
        kernel = kernel - kernel_before
    assert [g - b for g, b in zip(got, hist_before, strict=True)] == _cumulative(list(kernel.counts))
    sum_delta = _value(after, f"{HIST}_sum", pid=str(worker.pid)) - _value(before, f"{HIST}_sum", pid=str(worker.pid))
    assert sum_delta == pytest.approx(kernel.sum_seconds, abs=1e-6)
    assert sum_delta >= sum(DELAYS)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("closewait_close_wait_entered_total") == len(DELAYS)
    assert delta("closewait_close_wait_left_total", how="closed") == len(DELAYS)
    for how in ("exited", "reset", "untracked"):
        assert delta("closewait_close_wait_left_total", how=how) == 0
    assert _value(after, "closewait_scan_errors_total", kind="recorder") == 0
    # The worker's series carries its process name, as the CLOSE_WAIT series do.
    labels = next(ls for (n, ls), _ in after.items() if n == f"{HIST}_count" and ("pid", str(worker.pid)) in ls)
    assert dict(labels)["process"] == Path(f"/proc/{worker.pid}/comm").read_text().strip()


def test_per_state_counts_come_from_the_recorder(worker: Worker, collector: CloseWaitCollector) -> None:
    pairs = worker.call("pairs", n=7)
    try:
        samples = _scrape(collector)
        assert _value(samples, "closewait_state_counts_source") == 1.0
        assert _value(samples, "closewait_tcp_sockets", state="close_wait") == 7
        assert _value(samples, "closewait_tcp_sockets", state="listen") == 1
    finally:
        worker.call("close", ids=[pair["id"] for pair in pairs])
    assert _value(_scrape(collector), "closewait_tcp_sockets", state="close_wait") == 0


def test_state_counts_are_recounted_after_a_scrape_never_in_it(
    worker: Worker, bpffs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sock_diag count that re-pins the recorder's per-state counts (a read of every socket)
    runs at start and then in a thread of its own after a scrape, never in the scrape."""
    counted_in: list[str] = []
    real_count = netlink.count_by_state

    def count_by_state(**kwargs: Any) -> dict[TcpState, int]:  # the real count, and which thread asked
        counted_in.append(threading.current_thread().name)
        return real_count(**kwargs)

    monkeypatch.setattr(netlink, "count_by_state", count_by_state)
    made = CloseWaitCollector(
        netns=worker.netns,
        recorder="on",
        recorder_pin_dir=str(bpffs / "closewait"),
        min_interval=0,
        recorder_resync_s=0,  # due after every scrape
    )
    try:
        assert counted_in == [threading.current_thread().name]  # once at start, before any scrape
        pairs = worker.call("pairs", n=4)
        try:
            for _ in range(2):
                samples = _scrape(made)
                assert _value(samples, "closewait_state_counts_source") == 1.0
                assert _value(samples, "closewait_tcp_sockets", state="close_wait") == 4
                assert made._resync is not None
                made._resync.wait()
        finally:
            worker.call("close", ids=[pair["id"] for pair in pairs])
        assert _value(_scrape(made), "closewait_tcp_sockets", state="close_wait") == 0
        assert _value(_scrape(made), "closewait_scan_errors_total", kind="recorder") == 0
    finally:
        made.close()
    assert len(counted_in) >= 3
    assert set(counted_in[1:]) == {"closewait-resync"}


def test_a_socket_stuck_3s_and_closed_between_scrapes_is_counted(worker: Worker, collector: CloseWaitCollector) -> None:
    before = _scrape(collector)
    (pair,) = worker.call("pairs", n=1)
    time.sleep(3.0)
    (closed,) = worker.call("close", ids=[pair["id"]])
    after = _scrape(collector)
    dwell = (closed["s1"] - pair["c0"]) / 1e9
    assert 3.0 <= dwell < 5.0
    got = [a - b for a, b in zip(_buckets(after, worker.pid), _buckets(before, worker.pid), strict=True)]
    five = BUCKET_BOUNDS.index(5.0)
    assert got == [0.0] * five + [1.0] * (N_BUCKETS - five)  # in (1, 5] s, nowhere else
    pid = str(worker.pid)
    assert _value(after, f"{HIST}_sum", pid=pid) - _value(before, f"{HIST}_sum", pid=pid) == pytest.approx(
        dwell, abs=0.05
    )
    assert (
        _value(after, "closewait_close_wait_entered_total") - _value(before, "closewait_close_wait_entered_total") == 1
    )
    closed_delta = _value(after, "closewait_close_wait_left_total", how="closed") - _value(
        before, "closewait_close_wait_left_total", how="closed"
    )
    assert closed_delta == 1


def test_an_exited_process_keeps_its_series_and_frees_its_slot(worker: Worker, collector: CloseWaitCollector) -> None:
    second = start_worker(["nsenter", f"--net={worker.netns}"])
    try:
        second.call("stress", delays=[0.0] * 10 + [0.05] * 5)
        seen = _scrape(collector)
        count = _value(seen, f"{HIST}_count", pid=str(second.pid))
        assert count == 15
        labels = {ls for (n, ls), _ in seen.items() if n == f"{HIST}_count" and ("pid", str(second.pid)) in ls}
    finally:
        second.end()
    recorder = collector._recorder
    assert recorder is not None
    after = _scrape(collector)
    assert {ls for (n, ls), _ in after.items() if n == f"{HIST}_count" and ("pid", str(second.pid)) in ls} == labels
    assert _value(after, f"{HIST}_count", pid=str(second.pid)) == 15  # monotonic after the exit
    assert all(tgid != second.pid for _cg, tgid in recorder.recorder.histograms())  # its kernel slot freed


def test_all_netns_labels_each_closer_with_its_network_namespace(netns_name: str, bpffs: Path) -> None:
    """With --all-netns the close-time series carry the netns label the CLOSE_WAIT gauges give the
    closer's namespace: here a worker alone in a namespace the test made (``ip netns add``)."""
    worker = start_worker(["ip", "netns", "exec", netns_name])
    made = CloseWaitCollector(
        all_netns=True, recorder="on", recorder_pin_dir=str(bpffs / "closewait"), pid_label=True, min_interval=0
    )
    try:
        comm = Path(f"/proc/{worker.pid}/comm").read_text().strip()
        label = f"{worker.pid}/{comm}"  # the lowest (the only) pid in the namespace, and its name
        held = worker.call("pairs", n=2)
        before = _scrape(made)
        assert _value(before, "closewait_close_wait_sockets", pid=str(worker.pid), netns=label) == 2
        worker.call("close", ids=[pair["id"] for pair in held])
        worker.call("stress", delays=[0.0] * 5)
        after = _scrape(made)
    finally:
        made.close()
        worker.end()
    pid = str(worker.pid)
    assert _value(after, f"{HIST}_count", pid=pid) == 7
    assert _value(after, f"{HIST}_count", pid=pid, netns=label) == 7
    assert _value(after, "closewait_close_wait_sockets", pid=pid, netns=label) == 0


def test_all_netns_a_closer_first_seen_by_a_failed_scan_gets_its_label_later(netns_name: str, bpffs: Path) -> None:
    """A scan that fails before its survey of the namespaces still reads the recorder (its series
    are served), without the namespaces: a closer seen then for the first time is not labelled
    netns="" for good; the next scrape labels it, and counts its closes there."""
    worker = start_worker(["ip", "netns", "exec", netns_name])
    made = CloseWaitCollector(
        all_netns=True, recorder="on", recorder_pin_dir=str(bpffs / "closewait"), pid_label=True, min_interval=0
    )
    try:
        comm = Path(f"/proc/{worker.pid}/comm").read_text().strip()
        label = f"{worker.pid}/{comm}"
        worker.call("stress", delays=[0.0] * 3)
        made._read_recorder(None)  # what collect() does when the scan failed before its survey
        after = _scrape(made)
    finally:
        made.close()
        worker.end()
    pid = str(worker.pid)
    assert {dict(ls).get("netns") for (n, ls), _ in after.items() if n == f"{HIST}_count" and ("pid", pid) in ls} == {
        label
    }
    assert _value(after, f"{HIST}_count", pid=pid, netns=label) == 3


def _scrape_http(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return _samples_of(text_string_to_metric_families(text))


@contextlib.contextmanager
def _exporter(
    *args: str, argv: list[str] | None = None, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[str], list[str]]]:
    proc = subprocess.Popen(
        [*(argv or [CLOSEWAIT]), "exporter", "--listen", "127.0.0.1:0", "--min-interval", "0", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd="/",
    )
    assert proc.stderr is not None
    early: list[str] = []  # what it said before serving (the recorder's reason)
    try:
        line = proc.stderr.readline()
        while line and "serving http://" not in line:
            early.append(line)
            line = proc.stderr.readline()
        assert line, "".join(early)
        yield line.split("serving ", 1)[1].strip(), proc, early
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_real_exporter_serves_the_histogram_and_unpins_on_stop(worker: Worker, bpffs: Path) -> None:
    pin_dir = bpffs / "closewait"
    args = ["--netns", worker.netns, "--recorder", "on", "--recorder-pin-dir", str(pin_dir), "--pid-label"]
    with _exporter(*args) as (url, proc, _early):
        assert (pin_dir / "link").exists()
        before = _scrape_http(url)
        brackets = worker.call("stress", delays=DELAYS)
        after = _scrape_http(url)
        _check_buckets(_buckets(after, worker.pid), _buckets(before, worker.pid), brackets)
        for name, labels in (
            ("closewait_close_wait_entered_total", {}),
            ("closewait_close_wait_left_total", {"how": "closed"}),
        ):
            assert _value(after, name, **labels) - _value(before, name, **labels) == len(DELAYS)
        assert _value(after, "closewait_state_counts_source") == 1
        assert _value(after, "closewait_scan_success") == 1
    assert proc.returncode == 0
    assert not pin_dir.exists()


def test_recorder_off_serves_what_it_served_before(worker: Worker) -> None:
    with _exporter("--netns", worker.netns, "--recorder", "off") as (url, proc, _early):
        samples = _scrape_http(url)
    assert proc.returncode == 0
    names = {name for name, _ in samples}
    assert not any(
        name.startswith((HIST, "closewait_close_wait_entered", "closewait_close_wait_left")) for name in names
    )
    assert "closewait_state_counts_source" not in names
    kinds = {dict(ls)["kind"] for (name, ls) in samples if name == "closewait_scan_errors_total"}
    assert kinds == {"scan", "netns", "owners", "owners_bpf", "kubernetes_api"}
    assert _value(samples, "closewait_scan_success") == 1


@pytest.fixture(scope="module")
def nobody_env(nobody: Nobody) -> Iterator[Nobody]:
    """``nobody`` with prometheus_client importable (copied to a world-readable directory if need be)."""
    import prometheus_client

    package = Path(prometheus_client.__file__).parent
    copy_dir = tempfile.mkdtemp(prefix="closewait-nobody-prom-")
    try:
        os.chmod(copy_dir, 0o755)
        shutil.copytree(package, Path(copy_dir) / package.name, ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(["chmod", "-R", "a+rX", copy_dir], check=True)
        env = {**nobody.env, "PYTHONPATH": nobody.env["PYTHONPATH"] + os.pathsep + copy_dir}
        yield Nobody(nobody.argv, env)
    finally:
        shutil.rmtree(copy_dir, ignore_errors=True)


def test_not_root_auto_says_why_once_and_serves_the_rest(nobody_env: Nobody) -> None:
    argv = [*nobody_env.argv, "-m", "closewait"]
    with _exporter(argv=argv, env=nobody_env.env) as (url, proc, early):
        first = _scrape_http(url)
        second = _scrape_http(url)
    assert proc.stderr is not None
    stderr = "".join(early) + proc.stderr.read()
    assert proc.returncode == 0, stderr
    reasons = [line for line in stderr.splitlines() if "recorder off: " in line]
    assert len(reasons) == 1, stderr
    for samples in (first, second):
        assert _value(samples, "closewait_scan_errors_total", kind="recorder") == 1
        assert _value(samples, "closewait_scan_success") == 1
        assert _value(samples, "closewait_tcp_sockets", state="listen") >= 1
        assert not any(name.startswith(HIST) for name, _ in samples)


def test_not_root_on_refuses_to_start_in_one_line(nobody_env: Nobody) -> None:
    result = subprocess.run(
        [*nobody_env.argv, "-m", "closewait", "exporter", "--listen", "127.0.0.1:0", "--recorder", "on"],
        env=nobody_env.env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--recorder on" in lines[0]
