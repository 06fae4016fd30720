"""``closewait watch`` and the Tracker behind it, against real leaking children."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time

import pytest

import closewait
from closewait.watch import Tracker, Trend, classify, slope_per_minute
from tests.conftest import Spawn
from tests.monitor.leakers import CLOSEWAIT, close_wait_count, start_leaker
from tests.util import wait_for


def test_leak_verdict_rule() -> None:
    # Monotonic non-decreasing over the window with growth >= min_growth: a leak.
    assert classify([1, 2, 2, 3, 4], window=5, min_growth=3) is Trend.LEAKING
    # Same growth but one dip inside the window: not a leak, only growing.
    assert classify([1, 3, 2, 3, 4], window=5, min_growth=3) is Trend.GROWING
    # Flat pool: steady, whatever its size.
    assert classify([40, 40, 40, 40, 40], window=5, min_growth=3) is Trend.STEADY
    assert classify([9, 8, 8, 7, 5], window=5, min_growth=3) is Trend.SHRINKING
    # Too few samples to judge.
    assert classify([1, 5, 9], window=5, min_growth=3) is Trend.NEW
    # Only the last `window` samples count: an old climb followed by a plateau is no longer a leak.
    assert classify([1, 5, 9, 9, 9, 9, 9], window=5, min_growth=3) is Trend.STEADY


def test_slope_is_least_squares_per_minute() -> None:
    assert slope_per_minute([(0.0, 0), (30.0, 1), (60.0, 2)]) == pytest.approx(2.0)
    assert slope_per_minute([(0.0, 5)]) is None
    assert slope_per_minute([(1.0, 5), (1.0, 6)]) is None


def test_tracker_on_real_snapshots(spawn: Spawn) -> None:
    """Count, change, first-seen age and idle age from real scans of a child that leaks more over time."""
    child, _ = start_leaker(spawn, initial=2)
    tracker = Tracker(window=3, min_growth=2)
    first = tracker.observe(closewait.scan(pids=[child.pid]))
    (row,) = first.processes
    assert row.process is not None
    assert row.process.pid == child.pid
    assert (row.count, row.change, row.trend) == (2, 0, Trend.NEW)
    assert row.oldest_first_seen_s == 0
    assert row.oldest_idle_s is not None  # netlink gives tcp_info
    assert row.diagnosis == "not-reading"

    time.sleep(0.3)
    second = tracker.observe(closewait.scan(pids=[child.pid]))
    (row,) = second.processes
    assert row.count == 2
    # First-seen is tracked across samples: the same sockets are now older by the time between scans.
    assert row.oldest_first_seen_s == pytest.approx(second.taken_at - first.taken_at)
    assert row.oldest_idle_s is not None
    assert row.oldest_idle_s >= 0.3


GROW_ARGS = {"initial": 1, "extra": 400, "period": 0.15}  # grows for 60 s: longer than any watch here


def _watch(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLOSEWAIT, "watch", *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_watch_jsonl_gives_the_growing_child_the_leak_verdict_and_not_the_stable_one(spawn: Spawn) -> None:
    grower, _ = start_leaker(spawn, **GROW_ARGS)
    stable, _ = start_leaker(spawn, initial=4)
    result = _watch(
        [
            "--pid",
            str(grower.pid),
            "--pid",
            str(stable.pid),
            "--jsonl",
            "--count",
            "8",
            "--interval",
            "0.4",
            "--window",
            "5",
            "--min-growth",
            "3",
        ]
    )
    assert result.returncode == 0, result.stderr
    samples = [json.loads(line) for line in result.stdout.splitlines()]
    assert [s["sample"] for s in samples] == list(range(8))
    last = {p["pid"]: p for p in samples[-1]["processes"]}
    assert last[grower.pid]["leaking"] is True
    assert last[grower.pid]["trend"] == "leaking"
    assert last[grower.pid]["change"] > 0
    assert last[grower.pid]["rate_per_minute"] > 0
    counts = last[grower.pid]["window_counts"]
    assert counts == sorted(counts)
    assert counts[-1] - counts[0] >= 3
    assert last[stable.pid]["leaking"] is False
    assert last[stable.pid]["trend"] == "steady"
    assert (last[stable.pid]["count"], last[stable.pid]["change"]) == (4, 0)
    assert last[stable.pid]["rate_per_minute"] == 0
    assert last[stable.pid]["diagnosis"] == "not-reading"
    # first-seen age grows with the watch; idle age (tcp_info) is at least as old.
    assert last[stable.pid]["oldest_first_seen_s"] == pytest.approx(samples[-1]["elapsed_s"], abs=0.01)
    assert last[stable.pid]["oldest_idle_s"] >= last[stable.pid]["oldest_first_seen_s"]
    assert samples[-1]["total"] == last[grower.pid]["count"] + 4


def test_watch_plain_lines_when_not_a_terminal(spawn: Spawn) -> None:
    grower, _ = start_leaker(spawn, **GROW_ARGS)
    stable, _ = start_leaker(spawn, initial=3)
    result = _watch(["--pid", str(grower.pid), "--pid", str(stable.pid), "-n", "7", "-i", "0.4", "--window", "4"])
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout  # no cursor movement or colour in a pipe
    blocks = [line for line in result.stdout.splitlines() if "sample " in line]
    assert len(blocks) == 7
    last_block = result.stdout.split("sample 7")[1].splitlines()
    grower_line = next(line for line in last_block if f"pid {grower.pid} " in line)
    stable_line = next(line for line in last_block if f"pid {stable.pid} " in line)
    assert grower_line.endswith("LEAK")
    assert "count 3 (+0)" in stable_line
    assert stable_line.endswith("steady")


def test_watch_refreshes_in_place_on_a_terminal(spawn: Spawn) -> None:
    child, _ = start_leaker(spawn, initial=2)
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "LINES": "40", "TERM": "xterm"}
    proc = subprocess.Popen(
        [CLOSEWAIT, "watch", "--pid", str(child.pid), "-n", "3", "-i", "0.3"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    output = b""
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break  # the child closed the terminal
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
    text = output.decode("utf-8", "replace")
    assert "sample 3" in text
    assert str(child.pid) in text
    # rich's Live moves the cursor up to redraw the table in place (CSI n A) instead of scrolling.
    assert "\x1b[1A" in text or "\x1b[2K" in text


def test_watch_bad_input_is_one_line_and_exit_2() -> None:
    result = _watch(["--interval", "0"])
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--interval" in result.stderr

    result = _watch(["--pid", "999999999", "-n", "1"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["closewait: error: no process with pid 999999999"]

    result = _watch(["--netns", "/nonexistent/ns", "-n", "1"])
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "network namespace" in result.stderr


def test_watch_counts_sockets_in_another_namespace(spawn: Spawn, netns_name: str) -> None:
    child, _ = start_leaker(spawn, initial=3, prefix=("ip", "netns", "exec", netns_name))
    ns_path = f"/run/netns/{netns_name}"
    wait_for(lambda: len(closewait.scan(netns=ns_path).findings) == 3, timeout=10)
    # The same child is invisible from the host namespace...
    assert close_wait_count(child.pid) == 0
    result = _watch(["--netns", netns_name, "--jsonl", "-n", "2", "-i", "0.2"])
    assert result.returncode == 0, result.stderr
    last = json.loads(result.stdout.splitlines()[-1])
    assert last["netns"] == ns_path
    # ...and found in its own, owned by the child (owners are looked up host-wide).
    (row,) = last["processes"]
    with open(f"/proc/{child.pid}/comm") as comm:
        assert (row["count"], row["name"]) == (3, comm.read().strip())
