"""closewait reap's command line: filters, --all, and one clear line with a documented exit code per error."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import closewait
from tests.conftest import Spawn
from tests.reap.helpers import HERE, run_cli, start_python


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["reap"], "say whose sockets to reap: --pid PID, or --all with --port, --remote or --older-than"),
        (["reap", "--all"], "--all reaps every process's sockets: add --port, --remote or --older-than"),
        (["reap", "--all", "--yes"], "--all reaps every process's sockets"),
        (["reap", "--pid", "1", "--older-than", "30"], "bad duration '30': use a number with a unit"),
        (["reap", "--pid", "1", "--older-than", "5 minutes"], "bad duration"),
        (["reap", "--pid", "1", "--remote", "example.com"], "'example.com' is not an IP address or network"),
        (["reap", "--pid", "1", "--remote", "10.0.0.1:99999"], "port '99999' is not 1-65535"),
        (["reap", "--pid", "1", "--method", "kill"], "Invalid value for '--method'"),
        (["reap", "--pid", "1", "--all", "--port", "80"], "give either --pid or --all, not both"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    proc = run_cli(args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]


def test_a_pid_that_does_not_exist(spawn: Spawn) -> None:
    child = spawn("pass")
    child.wait(timeout=10)  # reaped: its pid now names nothing (until reused, which takes a while)
    proc = run_cli(["reap", "--pid", str(child.pid), "--yes"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"closewait: error: no process with pid {child.pid}"


def test_filters_matching_nothing_are_one_line_and_exit_0(spawn: Spawn) -> None:
    server = start_python(spawn)
    server.leak(1)
    for extra in (["--older-than", "1h"], ["--remote", "10.0.0.0/8"], ["--port", "1"]):
        proc = run_cli(["reap", "--pid", str(server.pid), *extra, "--yes"])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"nothing to reap: no CLOSE_WAIT socket matches pid {server.pid}")
        assert len(server.close_wait()) == 1


def test_remote_and_age_filters_select_the_socket(spawn: Spawn) -> None:
    server = start_python(spawn)
    (finding,) = server.leak(1)
    proc = run_cli(
        [
            "reap",
            "--pid",
            str(server.pid),
            "--remote",
            f"127.0.0.1:{finding.socket.remote.port}",
            "--older-than",
            "1ms",
            "--json",
        ]
    )
    plan = json.loads(proc.stdout)
    assert [t["inode"] for t in plan["targets"]] == [finding.socket.inode]
    assert "remote 127.0.0.1" in plan["criteria"]


def test_all_with_a_port_filter_reaps_only_that_port(spawn: Spawn) -> None:
    target = start_python(spawn)
    bystander = start_python(spawn)
    target.leak(2)
    bystander.leak(1)
    proc = run_cli(["reap", "--all", "--port", str(target.port), "--yes"])
    assert proc.returncode == 0, proc.stderr
    assert "released 2, skipped 0, failed 0" in proc.stdout
    assert target.close_wait() == ()
    assert len(bystander.close_wait()) == 1


def test_old_kernel_without_pidfd_getfd_is_one_line(spawn: Spawn, tmp_path: Path) -> None:
    """ENOSYS from pidfd_getfd (kernels before 5.6), produced by an LD_PRELOAD shim over syscall()."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None or platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("needs a C compiler on x86_64 or aarch64")
    shim = tmp_path / "enosys.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(shim), str(HERE / "enosys_shim.c"), "-ldl"], check=True, timeout=60
    )
    server = start_python(spawn)
    server.leak(1)
    proc = run_cli(["reap", "--pid", str(server.pid), "--yes"], preload=shim)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "closewait: error: pidfd_getfd is not available on this kernel (Linux 5.6+ needed): use --method destroy"
    )
    assert "Traceback" not in proc.stderr
    assert len(server.close_wait()) == 1


@pytest.mark.parametrize("as_json", [False, True])
def test_a_closed_stdout_does_not_decide_what_is_released(spawn: Spawn, as_json: bool) -> None:
    """``reap --yes | head -1``: the plan is decided, acted on, and only then written; the output
    failure is reported after acting, with exit 141 (reader gone) and what was done."""
    server = start_python(spawn)
    server.leak(3)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    src = str(Path(closewait.__file__).resolve().parent.parent)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "closewait", "reap", "--pid", str(server.pid), "--yes", *(["--json"] * as_json)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": src},
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141
    assert proc.stderr.splitlines() == [
        "closewait: stdout was closed early; the reap was carried out: released 3, skipped 0, failed 0"
    ]
    assert server.close_wait() == ()


def test_a_full_disk_is_reported_after_acting_with_exit_74(spawn: Spawn) -> None:
    server = start_python(spawn)
    server.leak(2)
    src = str(Path(closewait.__file__).resolve().parent.parent)
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "closewait", "reap", "--pid", str(server.pid), "--yes"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": src},
            check=False,
        )
    assert proc.returncode == 74
    assert proc.stderr.splitlines() == [
        "closewait: error: cannot write the output: No space left on device; "
        "the reap was carried out: released 2, skipped 0, failed 0"
    ]
    assert server.close_wait() == ()


def test_an_unbracketed_ipv6_address_with_a_port_is_refused_as_ambiguous() -> None:
    proc = run_cli(["reap", "--all", "--remote", "::1:80"])
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "closewait: error: bad --remote '::1:80': ambiguous: write [::1]:80 for port 80 of ::1, "
        "or [::1:80] for the address ::1:80"
    ]
