"""``closewait exporter`` as a process: served over HTTP, scraped by a real Prometheus server, queried
with PromQL; clean stop on SIGTERM; one-line errors for bad addresses and ports in use."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from closewait.model import TcpState
from tests.conftest import Spawn
from tests.monitor.conftest import Prometheus, stop_process
from tests.monitor.leakers import CLOSEWAIT, start_leaker
from tests.util import wait_for

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "closewait.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "closewait-dashboard.json"


class Exporter:
    """``closewait exporter`` on a kernel-chosen loopback port; ended by pid."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [CLOSEWAIT, "exporter", "--listen", "127.0.0.1:0", "--recorder", "off", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert line.startswith("closewait exporter: serving http://127.0.0.1:"), line
        self.url = line.split("serving ", 1)[1].strip()
        self.address = self.url.removeprefix("http://").removesuffix("/metrics")

    def scrape(self) -> str:
        response = requests.get(self.url, timeout=30)
        response.raise_for_status()
        return response.text

    def stop(self) -> None:
        stop_process(self.proc)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def exporter() -> Iterator[Exporter]:
    running = Exporter("--min-interval", "0.5", "--pid-label")
    yield running
    running.stop()


def test_prometheus_scrapes_the_exporter_and_promql_returns_the_leaking_count(
    spawn: Spawn, exporter: Exporter, tmp_path: Path
) -> None:
    # A child that keeps leaking: 2 sockets now, then one every 0.3 s up to 8.
    child, _ = start_leaker(spawn, initial=2, extra=6, period=0.3)
    prometheus = Prometheus(tmp_path, [exporter.address], [RULES])
    try:
        query = f'sum(closewait_close_wait_sockets{{pid="{child.pid}"}})'

        def leaked_count() -> float | None:
            result = prometheus.query(query)
            if not result:
                return None
            value = float(result[0]["value"][1])  # type: ignore[index]
            return value if value == 8 else None

        assert wait_for(leaked_count, timeout=60, interval=0.5) == 8
        # Per role and diagnosis, with the process name as a label.
        (series,) = prometheus.query(f'closewait_close_wait_sockets{{pid="{child.pid}"}}')
        labels = series["metric"]
        assert isinstance(labels, dict)
        assert (labels["role"], labels["diagnosis"], labels["job"]) == ("server", "not-reading", "closewait")
        # Every state is a series, zeros included.
        states = prometheus.query("closewait_tcp_sockets")
        assert {s["metric"]["state"] for s in states} == {t.name.lower() for t in TcpState}  # type: ignore[index]
        up = prometheus.query('up{job="closewait"}')
        assert float(up[0]["value"][1]) == 1  # type: ignore[index]
        # The rules file loads in a real server, and its recording rule sees the leak too.
        rules = prometheus.get("/api/v1/rules")
        groups = {g["name"] for g in rules["data"]["groups"]}  # type: ignore[index]
        assert groups == {"closewait.rules", "closewait.alerts"}

        def recorded() -> bool:
            result = prometheus.query(f'closewait:close_wait_sockets:by_workload{{pid="{child.pid}"}}')
            return bool(result) and float(result[0]["value"][1]) == 8  # type: ignore[index]

        wait_for(recorded, timeout=30, interval=0.5)

        # Every query on the Grafana dashboard is valid PromQL for this server and finds data.
        dashboard = json.loads(DASHBOARD.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = all_values(dashboard, target["expr"])
                assert prometheus.query(expr) is not None, (panel["title"], expr)
        (table_target,) = next(p for p in dashboard["panels"] if p["type"] == "table")["targets"]
        rows = prometheus.query(all_values(dashboard, table_target["expr"]))
        assert any(r["metric"].get("pid") == str(child.pid) for r in rows)  # type: ignore[attr-defined]
    finally:
        prometheus.stop()


def all_values(dashboard: dict[str, Any], expr: str) -> str:
    """``expr`` with each of the dashboard's query variables ($instance, $namespace, $pod) set to "All"."""
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            expr = expr.replace(f"${variable['name']}", variable["allValue"])
    return expr


def test_exporter_serves_parseable_metrics_and_stops_on_sigterm(spawn: Spawn) -> None:
    child, _ = start_leaker(spawn, initial=3)
    running = Exporter("--min-interval", "0", "--pid-label")
    try:
        families = {f.name: f for f in text_string_to_metric_families(running.scrape())}
        mine = [s for s in families["closewait_close_wait_sockets"].samples if s.labels["pid"] == str(child.pid)]
        assert [s.value for s in mine] == [3]
        assert families["closewait_scan_errors"].type == "counter"
        assert requests.get(running.url.replace("/metrics", "/nope"), timeout=10).status_code == 404
        os.kill(running.proc.pid, signal.SIGTERM)
        assert running.proc.wait(timeout=15) == 0
        assert running.proc.stderr is not None
        assert running.proc.stderr.read().strip() == "closewait exporter: stopped"
        with pytest.raises(requests.ConnectionError):
            requests.get(running.url, timeout=5)
    finally:
        running.stop()


def test_sigint_also_stops_cleanly() -> None:
    running = Exporter()
    try:
        os.kill(running.proc.pid, signal.SIGINT)
        assert running.proc.wait(timeout=15) == 130  # interrupted, as every command (docs/cli.md; issue 13)
    finally:
        running.stop()


def _exporter_error(*args: str) -> tuple[int, str]:
    result = subprocess.run([CLOSEWAIT, "exporter", *args], capture_output=True, text=True, timeout=30, check=False)
    return result.returncode, result.stderr


def test_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, err = _exporter_error("--listen", f"127.0.0.1:{port}")
    assert rc == 2
    assert err.splitlines() == [f"closewait: error: cannot listen on 127.0.0.1:{port}: Address already in use"]


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("9947", "--listen '9947': expected HOST:PORT, e.g. 127.0.0.1:9947 or [::1]:9947"),
        ("127.0.0.1:70000", "--listen '127.0.0.1:70000': port 70000 is out of range (0-65535)"),
        ("127.0.0.1:http", "--listen '127.0.0.1:http': expected HOST:PORT, e.g. 127.0.0.1:9947 or [::1]:9947"),
        (":9947", "--listen ':9947': give a host (0.0.0.0 to listen on every interface)"),
        ("no.such.host.invalid:9947", "--listen 'no.such.host.invalid:9947': cannot resolve"),
        ("192.0.2.1:9947", "cannot listen on 192.0.2.1:9947: Cannot assign requested address"),
    ],
)
def test_bad_listen_address_is_one_line_and_exit_2(listen: str, message: str) -> None:
    rc, err = _exporter_error("--listen", listen)
    assert rc == 2
    (line,) = err.splitlines()
    assert line.startswith(f"closewait: error: {message}")


def test_bad_options_are_one_line_and_exit_2() -> None:
    rc, err = _exporter_error("--top", "-1")
    assert rc == 2
    assert len(err.splitlines()) == 1
    rc, err = _exporter_error("--all-netns", "--netns", "1")
    assert rc == 2
    assert err.splitlines() == ["closewait: error: give --all-netns or --netns, not both"]
    rc, err = _exporter_error("--netns", "/nonexistent")
    assert rc == 2
    assert len(err.splitlines()) == 1


def test_a_failed_scan_is_counted_logged_and_still_answered(netns_name: str) -> None:
    """The namespace the exporter scans is deleted under it: scrapes still answer, with the failure
    counted and logged, and recover nothing silently."""
    running = Exporter("--min-interval", "0", "--netns", netns_name)
    try:
        first = {f.name: f for f in text_string_to_metric_families(running.scrape())}
        assert first["closewait_scan_success"].samples[0].value == 1
        assert {s.labels["state"] for s in first["closewait_tcp_sockets"].samples} == {t.name.lower() for t in TcpState}
        subprocess.run(["ip", "netns", "del", netns_name], check=True)
        second = {f.name: f for f in text_string_to_metric_families(running.scrape())}
        assert second["closewait_scan_success"].samples[0].value == 0
        errors = {s.labels["kind"]: s.value for s in second["closewait_scan_errors"].samples}
        # The scan failed (scan) because the one namespace asked for is gone (netns).
        assert errors == {"scan": 1, "netns": 1, "owners": 0, "owners_bpf": 0, "kubernetes_api": 0}
        assert second["closewait_tcp_sockets"].samples == []  # no stale numbers served as current
        os.kill(running.proc.pid, signal.SIGTERM)
        assert running.proc.wait(timeout=15) == 0
        assert running.proc.stderr is not None
        log = running.proc.stderr.read().splitlines()
        assert log[0].startswith("closewait exporter: scan failed: ")
        assert "namespace" in log[0]
        assert log[-1] == "closewait exporter: stopped"
    finally:
        running.stop()


def test_concurrent_http_scrapes_share_one_scan(spawn: Spawn) -> None:
    start_leaker(spawn, initial=2)
    running = Exporter("--min-interval", "60")
    try:
        bodies: list[str] = []
        lock = threading.Lock()

        def one() -> None:
            body = running.scrape()
            with lock:
                bodies.append(body)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(bodies) == 6
        for body in bodies:
            families = {f.name: f for f in text_string_to_metric_families(body)}
            assert families["closewait_scans"].samples[0].value == 1
    finally:
        running.stop()
