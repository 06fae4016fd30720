"""The whole default ``closewait lab`` (every part) as a user runs it, and its HTML page opened in
headless Chromium: a screenshot is taken and the console stays free of errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from closewait.lab.report import PART_IDS, REQUIRED_IDS
from tests.lab.conftest import CliRun
from tests.lab.test_report import check_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_every_part_runs_and_the_json_has_every_id(full_run: CliRun) -> None:
    assert full_run.returncode == 0, full_run.stderr
    experiments = full_run.report["experiments"]
    by_id = {e["id"]: e for e in experiments}
    assert set(REQUIRED_IDS) <= set(by_id), set(REQUIRED_IDS) - set(by_id)
    for exp in experiments:
        assert {"id", "part", "claim", "observed", "verdict", "measurements"} <= exp.keys()
        if exp["status"] == "ok":
            assert exp["verdict"] in {"holds", "does-not-hold", "holds-with-caveat"}
            assert exp["claim"]
            assert exp["observed"]
        else:
            assert exp["status"] == "skipped", exp
            assert exp["reason"]
    for part, ids in PART_IDS.items():
        for exp_id in ids:
            if exp_id in by_id:
                assert by_id[exp_id]["part"] == part
    for remedy in ("read-close", "multiplex-read-close", "nonblocking-read-close", "idle-timeout", "send-sigpipe"):
        m = by_id[remedy]["measurements"]
        assert isinstance(m["close_wait_ms"], int | float)
        assert isinstance(m["close_wait_ms_max"], int | float)
        assert m["fd_released"] is True
        assert m["left_tcp_table"] is True
    churn = by_id["churn"]
    assert churn["series"]
    assert all(len(points) >= 2 for points in churn["series"].values())
    # For the report: how long the default run took (not asserted; timings belong to benchmarks).
    print(f"closewait lab took {full_run.seconds:.1f} s (lab's own clock: {full_run.report['duration_s']} s)")


@pytest.mark.slow
def test_html_report_is_complete(full_run: CliRun) -> None:
    page = full_run.html.read_text(encoding="utf-8")
    parser = check_html(page)
    for exp_id in REQUIRED_IDS:
        assert f'id="exp-{exp_id}"' in page
    assert "close_wait_ms per remedy" in page
    assert "CLOSE_WAIT count over time per server" in page
    assert parser.tags["svg"] >= 2 + 9 * (os.geteuid() == 0)
    assert "<script" not in page


def _chromium(page: Path, png: Path) -> str:
    assert CHROMIUM is not None
    profile = tempfile.mkdtemp(prefix="closewait-chromium-")
    try:
        proc = subprocess.run(
            [
                CHROMIUM,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--screenshot={png}",
                "--window-size=1280,2400",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert png.exists(), proc.stderr[-2000:]
    return proc.stderr


def _console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_chromium_renders_the_page_without_console_errors(full_run: CliRun, tmp_path: Path) -> None:
    # The check must be able to fail: a page with a console error and an exception is caught.
    bad = tmp_path / "bad.html"
    bad.write_text('<p>x</p><script>console.error("lab-check"); throw new Error("boom")</script>', encoding="utf-8")
    bad_log = _chromium(bad, tmp_path / "bad.png")
    assert any("lab-check" in line for line in _console_errors(bad_log))
    assert any("Uncaught" in line for line in _console_errors(bad_log))

    png = tmp_path / "report.png"
    log = _chromium(full_run.html, png)
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 2400)
    assert len(data) > 50_000  # a rendered page, not a blank one (a blank 1280x2400 PNG is ~10 KB)
    assert _console_errors(log) == []
