"""A process whose descriptors the kernel hides even from root (a sandbox's init in another user
namespace, an LSM policy): root is told so, not told to run as root."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import closewait
from closewait.sources import owners


def _protected_pid() -> int | None:
    """A process whose fd links root cannot read, if this machine has one (pid 1 in some sandboxes)."""
    for pid in owners.list_pids()[:50]:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
            if names:
                os.readlink(f"/proc/{pid}/fd/{names[0]}")
        except PermissionError:
            return pid
        except OSError:
            continue
    return None


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the root-specific message needs root")


def test_naming_a_protected_process_says_even_root_is_refused() -> None:
    pid = _protected_pid()
    if pid is None:
        pytest.skip("no process here hides its descriptors from root")
    with pytest.raises(closewait.AccessDenied, match="even to root"):
        closewait.scan(pids=[pid])
    result = subprocess.run(
        [sys.executable, "-m", "closewait", "scan", "--pid", str(pid)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "even to root" in line
    assert "run as root" not in line


def test_the_warning_for_a_hidden_owner_does_not_tell_root_to_run_as_root() -> None:
    owner_map = owners.OwnerMap(denied_pids=[1])
    (message,) = owner_map.errors()
    assert message.startswith("owner unknown:")
    assert "even to root (pid 1)" in message
    assert "run as root" not in message


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "closewait", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_reap_and_scan_netns_of_a_protected_process_do_not_tell_root_to_run_as_root() -> None:
    pid = _protected_pid()
    if pid is None:
        pytest.skip("no process here hides its descriptors from root")
    reap = _run("reap", "--pid", str(pid))
    assert reap.returncode == 2
    (line,) = reap.stderr.splitlines()
    assert line.startswith(f"closewait: error: permission denied: reaping pid {pid}")
    assert "refused even to root" in line
    assert "run as root" not in line
    assert "you are uid" not in line
    netns = _run("scan", "--netns", str(pid))
    assert netns.returncode == 2
    (line,) = netns.stderr.splitlines()
    # The namespace exists but may not be looked at: not "not a network namespace", not "run as root".
    expected = f"--netns {pid}: reading /proc/{pid}/ns/net: permission denied, refused even to root"
    assert line == f"closewait: error: {expected}"
