"""``closewait record``, ``scan``'s exact ages and ``watch --events``, as real processes.

``record`` runs in a subprocess and pins its recorder in a bpffs it mounts on an empty directory of
the test's own; ``scan --json`` runs in another process and must report, for a socket whose client
closed at a known moment, ``age_source: exact`` and that moment within 10 ms. Without a recorder the
age is the lower bound, and the reason is said once. ``watch --events --json`` must see the socket
enter CLOSE_WAIT and this process close it. Stopping record leaves nothing: no pin, no mount.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from closewait.sources.recorder import Recorder, RecorderUnavailable, is_bpffs
from tests.conftest import Nobody
from tests.util import wait_for

SCRIPT = str(Path(sys.executable).with_name("closewait"))


def _recorder_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    try:
        Recorder.open(capacity=64).close()
    except RecorderUnavailable as err:
        return str(err)
    return None


_REASON = _recorder_reason()
needs_recorder = pytest.mark.skipif(_REASON is not None, reason=f"recorder unavailable: {_REASON}")


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as handle:
        return any(line.split()[4] == path for line in handle)


def _utc(text: str) -> float:
    """``2026-12-05T11:55:21.123Z`` as seconds since the epoch."""
    whole, ms = text.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000


@dataclass
class Recording:
    proc: subprocess.Popen[str]
    mount: str
    pin_dir: str
    line: str


@pytest.fixture
def recording(tmp_path: Path) -> Iterator[Recording]:
    """``closewait record`` in a subprocess, pinned under an empty directory it mounts a bpffs on."""
    mount = tmp_path / "bpf"
    mount.mkdir()
    pin_dir = str(mount / "closewait")
    proc = subprocess.Popen(
        [SCRIPT, "record", "--pin-dir", pin_dir, "--capacity", "4096"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    try:
        assert line.startswith(f"closewait record: recording, pinned in {pin_dir}; stop with Ctrl-C or kill"), line
        yield Recording(proc, str(mount), pin_dir, line)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        if _mounted(str(mount)):  # a failed test must not leave the mount behind
            subprocess.run(["umount", str(mount)], check=False)


@dataclass
class ClosedByPeer:
    """A server socket whose client closed between ``before`` and ``after`` (wall clock)."""

    server: socket.socket
    port: int
    before: float
    after: float


@contextlib.contextmanager
def closed_by_peer() -> Iterator[ClosedByPeer]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        server, _ = listener.accept()
        with server:
            before = time.time()
            client.close()
            after = time.time()
            server.settimeout(5)
            yield ClosedByPeer(server, port, before, after)


def _scan_json(*args: str) -> dict[str, Any]:
    result = subprocess.run([SCRIPT, "scan", "--json", *args], capture_output=True, text=True, timeout=60, check=True)
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


@needs_recorder
def test_record_pins_and_scan_reports_the_exact_age(recording: Recording) -> None:
    assert is_bpffs(recording.mount)
    assert sorted(os.listdir(recording.pin_dir)) == ["counters", "entries", "histograms", "link"]
    # Retried: a client preempted between its two clock readings brackets nothing (see test_recorder).
    for _attempt in range(5):
        with closed_by_peer() as peer:
            time.sleep(0.3)
            report = _scan_json("--recorder-pins", recording.pin_dir, "--port", str(peer.port))
        if peer.after - peer.before < 0.005:
            break
    assert report["recorder_used"] is True
    assert report["recorder_unavailable"] is None
    (sock,) = [s for s in report["sockets"] if s["local"]["port"] == peer.port]
    assert sock["age_source"] == "exact"
    since = _utc(sock["close_wait_since"])
    assert peer.before - 0.010 <= since <= peer.after + 0.010, (peer.before, since, peer.after)
    assert 250 <= sock["close_wait_age_ms"] <= 60_000


@needs_recorder
def test_record_unpins_and_unmounts_on_sigterm(recording: Recording) -> None:
    recording.proc.send_signal(signal.SIGTERM)
    assert recording.proc.wait(timeout=30) == 0
    assert recording.proc.stderr is not None
    rest = recording.proc.stderr.read()
    assert "Traceback" not in rest
    assert not os.path.exists(recording.pin_dir)
    assert not is_bpffs(recording.mount)
    assert not _mounted(recording.mount)
    assert os.listdir(recording.mount) == []


@needs_recorder
def test_record_interrupted_exits_130_and_leaves_nothing(recording: Recording) -> None:
    recording.proc.send_signal(signal.SIGINT)
    assert recording.proc.wait(timeout=30) == 130
    assert recording.proc.stderr is not None
    assert recording.proc.stderr.read().splitlines() == ["closewait: interrupted"]
    assert not _mounted(recording.mount)


@needs_recorder
def test_a_second_record_on_the_same_pins_is_refused(recording: Recording) -> None:
    result = subprocess.run(
        [SCRIPT, "record", "--pin-dir", recording.pin_dir], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert f"a recorder is already pinned in {recording.pin_dir}" in line


def test_without_a_recorder_the_age_is_the_lower_bound_and_the_reason_is_said_once(tmp_path: Path) -> None:
    pins = str(tmp_path / "no-recorder-here")
    with closed_by_peer() as peer:
        wait_for(lambda: _scan_json("--port", str(peer.port), "--recorder-pins", pins)["sockets"], timeout=5)
        report = _scan_json("--recorder-pins", pins, "--port", str(peer.port))
        human = subprocess.run(
            [SCRIPT, "scan", "--recorder-pins", pins, "--port", str(peer.port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    assert report["recorder_used"] is False
    assert report["recorder_unavailable"] == f"no recorder is pinned in {pins} (start one with: closewait record)"
    (sock,) = report["sockets"]
    assert sock["age_source"] == "last_ack_lower_bound"
    assert sock["close_wait_age_ms"] == sock["idle_ms"]
    assert _utc(sock["close_wait_since"]) <= peer.after + 0.01
    assert human.count("exact ages need a recorder: no recorder is pinned in") == 1
    assert "STUCK SINCE" not in human


def test_fast_path_and_click_agree_on_the_age_fields(tmp_path: Path) -> None:
    """The console's click-free ``scan --json`` writes the same fields as the click command."""
    with closed_by_peer():
        fast = _scan_json("--no-owners")
        slow = _scan_json("--no-owners", "--recorder-pins", "/sys/fs/bpf/closewait")
    for report in (fast, slow):
        assert set(report) >= {"recorder_used", "recorder_unavailable"}
        for sock in report["sockets"]:
            assert set(sock) >= {"close_wait_since", "close_wait_age_ms", "age_source"}


@needs_recorder
def test_watch_events_sees_the_entry_and_who_closed_it() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        proc = subprocess.Popen(
            [SCRIPT, "watch", "--events", "--json", "--port", str(port), "-n", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stderr is not None
            assert proc.stderr.readline().startswith("closewait watch: sockets entering and leaving CLOSE_WAIT")
            client = socket.create_connection(("127.0.0.1", port))
            server, _ = listener.accept()
            client.close()
            time.sleep(0.2)
            server.close()
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    enter, leave = (json.loads(line) for line in out.splitlines())
    assert (enter["event"], enter["old_state"], enter["new_state"]) == ("enter", "ESTABLISHED", "CLOSE_WAIT")
    assert enter["local"]["port"] == port
    assert enter["pid"] is None
    assert (leave["event"], leave["new_state"], leave["reason"]) == ("leave", "LAST_ACK", "closed")
    assert leave["pid"] == os.getpid()
    assert leave["cookie"] == enter["cookie"]
    assert 150 <= leave["dwell_ms"] <= 30_000


@needs_recorder
def test_watch_events_stops_on_ctrl_c_with_130() -> None:
    proc = subprocess.Popen(
        [SCRIPT, "watch", "--events", "--port", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("closewait watch:")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert proc.stderr.read().splitlines() == ["closewait: interrupted"]


@pytest.mark.parametrize(
    "argv",
    [["record", "--pin-dir", "{tmp}/bpf/closewait"], ["watch", "--events"]],
    ids=["record", "watch-events"],
)
def test_without_root_record_and_events_refuse_with_one_line(argv: list[str], nobody: Nobody, tmp_path: Path) -> None:
    (tmp_path / "bpf").mkdir()
    os.chmod(tmp_path, 0o755)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = subprocess.run(
        [*nobody.argv, "-m", "closewait", *argv],
        env=nobody.env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        check=False,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("closewait: error: ")
    assert "needs root" in line
    assert result.stdout == ""
