"""The exporter tells the truth about namespaces: partial ``--all-netns`` coverage is counted and
logged once per namespace, and a namespace given with ``--netns`` is pinned: when it is gone (deleted
and recreated under the same name, or its process exited) the exporter says so once and keeps
answering ``closewait_scan_success 0``; ``watch`` says so in one line and exits 2."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from closewait.exporter import CloseWaitCollector, build_registry
from tests.conftest import Nobody, Spawn
from tests.util import wait_for

# Three scrapes of an --all-netns collector; prints the scan-error counters and coverage gauges.
SCRAPES = """
import json, logging
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from closewait.exporter import CloseWaitCollector, build_registry
logging.basicConfig(level=logging.WARNING, format="%(message)s")
registry = build_registry(CloseWaitCollector(min_interval=0, all_netns=True))
for _ in range(3):
    text = generate_latest(registry).decode()
values = {s.name + s.labels.get("kind", ""): s.value for f in text_string_to_metric_families(text) for s in f.samples}
print(json.dumps(values))
"""


def _values(collector: CloseWaitCollector) -> dict[str, float]:
    text = generate_latest(build_registry(collector)).decode()
    return {s.name + s.labels.get("kind", ""): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def _sleeper_in(spawn: Spawn, netns_name: str) -> subprocess.Popen[str]:
    """``sleep`` in the namespace, once it is there: ``ip netns exec`` enters the namespace and then
    execs the command, so a /proc/PID/ns/net read before that names the host's namespace (a
    collector that pinned it then saw "the path now names another namespace")."""
    sleeper = spawn(argv=["ip", "netns", "exec", netns_name, "sleep", "120"])
    target = os.stat(f"/run/netns/{netns_name}").st_ino

    def there() -> bool:
        try:
            with open(f"/proc/{sleeper.pid}/comm") as comm:
                name = comm.read().strip()
            return name == "sleep" and os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino == target
        except OSError:
            return False

    wait_for(there)
    return sleeper


def test_all_netns_as_nobody_counts_and_logs_the_namespaces_it_cannot_read(
    spawn: Spawn, nobody: Nobody, netns_name: str
) -> None:
    """A root process in a second namespace: nobody can neither read its /proc/PID/ns/net nor enter
    it. The exporter covers its own namespace, and says the other one was skipped."""
    sleeper = _sleeper_in(spawn, netns_name)
    label = f"{sleeper.pid}/sleep"
    done = subprocess.run(
        [*nobody.argv, "-c", SCRAPES], env=nobody.env, capture_output=True, text=True, timeout=120, check=False, cwd="/"
    )
    if "No module named 'prometheus_client'" in done.stderr:
        pytest.skip("prometheus_client is not importable as nobody here")
    assert done.returncode == 0, done.stderr
    values = json.loads(done.stdout)
    assert values["closewait_scan_success"] == 1
    assert values["closewait_netns_covered"] >= 1
    skipped = values["closewait_netns_skipped"]
    assert skipped >= 1  # ours; other tests' namespaces may be there too
    assert values["closewait_scan_errors_totalnetns"] >= 3  # ours, on each of the three scans
    log = done.stderr.splitlines()
    ours = [line for line in log if line.startswith(f"network namespace {label} not covered: ")]
    assert len(ours) == 1, log  # once, not once per scrape
    assert "permission denied" in ours[0]
    assert len(log) == len(set(log))


def test_a_namespace_covered_again_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    collector = CloseWaitCollector(min_interval=0)
    caplog.set_level(logging.WARNING, logger="closewait.exporter.collector")
    collector._note_coverage({"7/a": "gone", "8/b": "refused"}, covered={"1/init"})
    collector._note_coverage({"7/a": "gone", "8/b": "refused"}, covered={"1/init"})
    collector._note_coverage({"8/b": "refused"}, covered={"1/init", "7/a"})
    collector._note_coverage({}, covered={"1/init", "7/a"})  # 8/b left without being read: not "covered"
    assert [r.getMessage() for r in caplog.records] == [
        "network namespace 7/a not covered: gone",
        "network namespace 8/b not covered: refused",
        "network namespace 7/a covered again",
    ]


def test_a_namespace_recreated_under_the_same_name_is_gone_not_followed(
    netns_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    collector = CloseWaitCollector(min_interval=0, netns=netns_name)
    caplog.set_level(logging.WARNING, logger="closewait.exporter.collector")
    try:
        assert _values(collector)["closewait_scan_success"] == 1
        subprocess.run(["ip", "netns", "del", netns_name], check=True)
        subprocess.run(["ip", "netns", "add", netns_name], check=True)  # same name, another namespace
        for scrape in (1, 2, 3):
            values = _values(collector)
            assert values["closewait_scan_success"] == 0
            assert values["closewait_scan_errors_totalnetns"] == scrape
            assert "closewait_netns_covered" not in values  # no stale numbers
        (record,) = caplog.records  # logged once, not per scrape
        assert record.getMessage().startswith(f"scan failed: /run/netns/{netns_name}: the namespace is gone")
    finally:
        collector.close()


def test_a_namespace_named_by_a_pid_is_gone_when_the_pid_exits(
    spawn: Spawn, netns_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    sleeper = _sleeper_in(spawn, netns_name)
    collector = CloseWaitCollector(min_interval=0, netns=str(sleeper.pid))
    caplog.set_level(logging.WARNING, logger="closewait.exporter.collector")
    try:
        assert _values(collector)["closewait_scan_success"] == 1
        sleeper.kill()
        sleeper.wait(timeout=10)
        for _ in range(2):
            assert _values(collector)["closewait_scan_success"] == 0
        (record,) = caplog.records
        assert record.getMessage() == (
            f"scan failed: /proc/{sleeper.pid}/ns/net: the namespace is gone (its process exited or it was deleted)"
        )
    finally:
        collector.close()


# watch in the background; the test deletes and recreates the namespace after the first sample.
def _watch_until_gone(spec: str, make_it_go: list[list[str]]) -> subprocess.CompletedProcess[str]:
    watch = subprocess.Popen(
        [sys.executable, "-m", "closewait", "watch", "--jsonl", "-i", "0.1", "-n", "600", "--netns", spec],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        assert json.loads(watch.stdout.readline())["sample"] == 0
        for argv in make_it_go:
            subprocess.run(argv, check=True)
        out, err = watch.communicate(timeout=60)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    return subprocess.CompletedProcess(watch.args, watch.returncode, out, err)


def test_watch_stops_with_one_line_when_its_namespace_is_recreated(netns_name: str) -> None:
    done = _watch_until_gone(netns_name, [["ip", "netns", "del", netns_name], ["ip", "netns", "add", netns_name]])
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"closewait: error: /run/netns/{netns_name}: the namespace is gone (")


def test_watch_stops_with_one_line_when_the_pid_naming_its_namespace_exits(spawn: Spawn, netns_name: str) -> None:
    sleeper = _sleeper_in(spawn, netns_name)
    done = _watch_until_gone(str(sleeper.pid), [["kill", "-9", str(sleeper.pid)]])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"closewait: error: /proc/{sleeper.pid}/ns/net: the namespace is gone (its process exited or it was deleted)"
    ]
