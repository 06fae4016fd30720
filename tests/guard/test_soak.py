"""A short soak of serve(): thousands of connections with random client behaviour leak nothing.

Runs bench/soak_serve.py (server and clients in their own processes) at a small scale; the full
1,000,000-connection run and its figures are in docs/benchmarks-guard.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import Spawn

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak_serve.py"


@pytest.mark.slow
def test_short_soak_ends_with_no_close_wait_and_no_leaked_descriptors(spawn: Spawn) -> None:
    driver = spawn(
        argv=[
            sys.executable,
            str(SOAK),
            "--connections",
            "6000",
            "--clients",
            "2",
            "--concurrency",
            "60",
            "--max-connections",
            "100",
            "--idle-timeout",
            "1.0",
            "--max-seconds",
            "90",
            "--progress",
            "1000",
            "--json",
        ]
    )
    out, _ = driver.communicate(timeout=170)
    result = json.loads(out)
    server = result["server"]
    assert result["close_wait_at_end"] == 0
    assert result["fds_after"] == result["fds_before"]
    assert server["open"] == 0
    assert result["connections"] == 6000
    closed = sum(v for k, v in server.items() if k.startswith("closed_"))
    assert server["accepted"] == closed
    assert server["accepted"] >= 6000 - result["client_error_total"]
    # Every client behaviour ran, and each way of closing happened.
    assert set(result["behaviours"]) == {"close", "rst", "half", "forget", "error", "slow", "idle", "stall"}
    for reason in ("closed_eof", "closed_idle", "closed_error", "closed_handler"):
        assert server[reason] > 0, reason
    # Idle clients wait for the server's close, so the idle timeout closed every one of them (a
    # stalled client may reset first if it waited in the backlog, so those are not counted here).
    assert server["closed_idle"] >= result["behaviours"]["idle"] - result["client_error_total"]
    assert server["paused"] > 0  # 120 clients in flight against a limit of 100
    assert result["ok"] is True
    assert driver.returncode == 0
