"""What deploy/ ships: Prometheus rules checked and unit-tested by promtool, a dashboard whose queries
use metrics the exporter serves, a systemd unit systemd accepts, a DaemonSet with what it needs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from closewait.exporter import CloseWaitCollector

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMTOOL = shutil.which("promtool")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if PROMTOOL is None:
        pytest.fail("promtool (Debian's prometheus package) is not installed; ./dev test installs it")
    return subprocess.run(
        [PROMTOOL, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", "closewait.rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout  # + CloseWaitSlowClose


def test_promtool_test_rules() -> None:
    result = _promtool("test", "rules", "closewait.rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _exported_names() -> set[str]:
    names = set()
    for metric in CloseWaitCollector().describe():
        names.add(metric.name + ("_total" if metric.type == "counter" else ""))
        if metric.type == "histogram":
            names.update(metric.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def test_rules_and_dashboard_use_only_exported_metrics() -> None:
    exported = _exported_names()
    rules = (DEPLOY / "prometheus" / "closewait.rules.yml").read_text()
    dashboard = json.loads((DEPLOY / "grafana" / "closewait-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    used = set(re.findall(r"\bclosewait_[a-z_]+", rules + "\n".join(exprs)))
    assert used
    assert used <= exported, used - exported
    assert dashboard["uid"] == "closewait"
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "instance", "namespace", "pod"}


def test_systemd_unit_is_accepted_by_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (DEPLOY / "systemd" / "closewait-exporter.service").read_text()
    assert "--listen 127.0.0.1:9947" in unit
    # systemd-analyze verify wants the ExecStart binary to exist: point it at this venv's closewait.
    closewait = shutil.which("closewait") or str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "closewait")
    local = tmp_path / "closewait-exporter.service"
    local.write_text(unit.replace("/usr/local/bin/closewait", closewait))
    result = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60, check=False)
    problems = [line for line in result.stderr.splitlines() if "closewait-exporter.service" in line]
    assert problems == [], result.stderr


def test_daemonset_asks_for_host_pid_read_only_root_and_only_the_needed_capabilities() -> None:
    text = (DEPLOY / "kubernetes" / "daemonset.yaml").read_text()
    assert re.search(r"^kind: DaemonSet$", text, re.MULTILINE)
    assert re.search(r"^\s+hostPID: true$", text, re.MULTILINE)
    assert re.search(r"^\s+readOnlyRootFilesystem: true$", text, re.MULTILINE)
    assert re.search(r"^\s+allowPrivilegeEscalation: false$", text, re.MULTILINE)
    assert re.search(r"^\s+drop: \[\"ALL\"\]$", text, re.MULTILINE)
    added = re.search(r"^\s+add: \[(.*)\]$", text, re.MULTILINE)
    assert added is not None
    assert sorted(c.strip().strip('"') for c in added.group(1).split(",")) == [
        "DAC_READ_SEARCH",
        "SYS_ADMIN",
        "SYS_PTRACE",
    ]
    assert "--all-netns" in text


def test_daemonset_runs_the_image_the_containerfile_builds() -> None:
    """The DaemonSet names the image ``./dev image`` tags, reads kubelet's log links read-only (the pod
    labels), and runs as uid 0 for the reason it gives; the Containerfile labels the image per OCI and
    runs as a non-root user by default. tests/monitor/test_image.py builds and runs it."""
    import closewait

    text = (DEPLOY / "kubernetes" / "daemonset.yaml").read_text()
    image = re.search(r"^\s+image: (\S+)$", text, re.MULTILINE)
    assert image is not None
    assert image.group(1) == f"localhost/closewait:{closewait.__version__}"
    assert re.search(r"^\s+runAsUser: 0$", text, re.MULTILINE)
    assert re.search(r"^#\s+runAsUser: 0\s+\S", text, re.MULTILINE), "say why it runs as root"
    assert re.search(r"mountPath: /var/log/containers\n\s+readOnly: true$", text, re.MULTILINE)
    containerfile = (DEPLOY / "Containerfile").read_text()
    labels = set(re.findall(r"org\.opencontainers\.image\.([a-z.]+)=", containerfile))
    assert labels >= {"title", "description", "version", "revision", "created", "licenses", "source"}
    assert re.search(r"^USER 65532:65532$", containerfile, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["/opt/closewait/bin/closewait"\]$', containerfile, re.MULTILINE)
    assert "--no-index" in containerfile  # the build reads only the wheels it is given
