"""``closewait check`` as a monitoring plugin, against real leaking children."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.conftest import Spawn
from tests.monitor.leakers import CLOSEWAIT, start_leaker

# Nagios plugin output: "SERVICE STATUS - text | label=value[UOM];warn;crit;min[;max] ..."
STATUS_LINE = re.compile(r"^CLOSEWAIT (OK|WARNING|CRITICAL|UNKNOWN) - [^|]+(?: \| (.+))?$")
PERFDATA = re.compile(r"^[a-z_]+=[0-9.]+(s|B)?;[0-9.]*;[0-9.]*;0$")


def _check(*args: str) -> tuple[int, str, str]:
    result = subprocess.run([CLOSEWAIT, "check", *args], capture_output=True, text=True, timeout=60, check=False)
    return result.returncode, result.stdout, result.stderr


def _perf(line: str) -> dict[str, str]:
    match = STATUS_LINE.match(line)
    assert match, line
    items = match.group(2).split()
    for item in items:
        assert PERFDATA.match(item), item
    return dict(item.split("=", 1) for item in items)


@pytest.mark.parametrize(
    ("warning", "critical", "status", "code"),
    [("10", "20", "OK", 0), ("4", "20", "WARNING", 1), ("2", "4", "CRITICAL", 2), ("5", "5", "OK", 0)],
)
def test_count_thresholds_map_to_plugin_statuses(
    spawn: Spawn, warning: str, critical: str, status: str, code: int
) -> None:
    child, _ = start_leaker(spawn, initial=5)
    rc, out, err = _check("--pid", str(child.pid), "-w", warning, "-c", critical)
    assert rc == code, (out, err)
    lines = out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"CLOSEWAIT {status} - 5 sockets in CLOSE_WAIT (worst: pid {child.pid} ")
    perf = _perf(lines[0])
    assert perf["close_wait"] == f"5;{warning};{critical};0"
    assert perf["processes"] == "1;;;0"
    assert err == ""


def test_per_process_thresholds_judge_the_worst_process(spawn: Spawn) -> None:
    big, _ = start_leaker(spawn, initial=4)
    small, _ = start_leaker(spawn, initial=2)
    pids = ["--pid", str(big.pid), "--pid", str(small.pid)]
    # Host total 6 is above 5, but no single process is: OK per process, WARNING as a total.
    rc, out, _ = _check(*pids, "--per-process", "-w", "5", "-c", "10")
    assert rc == 0, out
    assert f"worst: pid {big.pid} " in out
    perf = _perf(out.strip())
    assert perf["close_wait_max_process"] == "4;5;10;0"
    assert perf["close_wait"] == "6;;;0"
    rc, out, _ = _check(*pids, "-w", "5", "-c", "10")
    assert rc == 1, out
    rc, out, _ = _check(*pids, "--per-process", "-w", "1", "-c", "3")
    assert rc == 2, out
    assert "count 4 > 3" in out


def test_port_filter_and_max_age(spawn: Spawn) -> None:
    child, port = start_leaker(spawn, initial=3)
    other, _ = start_leaker(spawn, initial=2)
    rc, out, _ = _check("--port", str(port), "-w", "2", "-c", "9")
    assert rc == 1, out
    assert "3 sockets in CLOSE_WAIT" in out
    assert f"pid {child.pid}" in out
    assert f"pid {other.pid}" not in out

    time.sleep(1.2)  # the peers' FINs are now more than a second old (tcp_info idle)
    rc, out, _ = _check("--port", str(port), "--max-age", "1")
    assert rc == 1, out
    assert re.search(r"oldest idle \d+s > 1s", out)
    age = float(_perf(out.strip())["oldest_age"].split("s;")[0])
    assert age >= 1.2
    rc, out, _ = _check("--port", str(port), "--max-age", "0.5", "--max-age-critical", "1")
    assert rc == 2, out
    rc, out, _ = _check("--port", str(port), "--max-age", "3600")
    assert rc == 0, out


def test_no_close_wait_is_ok(spawn: Spawn) -> None:
    child, _ = start_leaker(spawn, initial=0)
    rc, out, _ = _check("--pid", str(child.pid), "-w", "0", "-c", "0")
    assert rc == 0
    assert out.startswith("CLOSEWAIT OK - 0 sockets in CLOSE_WAIT | close_wait=0;0;0;0 ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-w", "10", "-c", "5"], "--warning (10) is above --critical (5)"),
        (["-w", "-1"], "--warning must not be negative, got -1"),
        (["--max-age", "-3"], "--max-age must not be negative, got -3.0"),
        (["--max-age", "60", "--max-age-critical", "30"], "--max-age (60) is above --max-age-critical (30)"),
        (["--pid", "999999999"], "no process with pid 999999999"),
    ],
)
def test_bad_input_is_unknown_exit_3_one_line(args: list[str], message: str) -> None:
    rc, out, err = _check(*args)
    assert rc == 3
    assert out.splitlines() == [f"CLOSEWAIT UNKNOWN - {message}"]
    assert err == ""


def test_malformed_flag_is_exit_3_one_line() -> None:
    rc, out, err = _check("--warning", "many")
    assert rc == 3
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "--warning" in err


def test_age_threshold_without_tcp_info_is_unknown(spawn: Spawn) -> None:
    child, _ = start_leaker(spawn, initial=2)
    rc, out, _ = _check("--pid", str(child.pid), "--backend", "procfs", "--max-age", "3600")
    assert rc == 3, out
    assert "socket ages unknown" in out
    # Without an age threshold the procfs backend is fine for counting.
    rc, out, _ = _check("--pid", str(child.pid), "--backend", "procfs", "-w", "1", "-c", "5")
    assert rc == 1, out
    assert out.startswith("CLOSEWAIT WARNING - 2 sockets in CLOSE_WAIT")
