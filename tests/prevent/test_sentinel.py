"""closewait.sentinel with real leaking sockets in this test process."""

from __future__ import annotations

import logging
import os
import socket
import threading

import pytest

from closewait import sentinel, trace
from closewait.errors import UsageError
from closewait.model import ALL_STATES
from closewait.sources import netlink
from tests.prevent.conftest import LeakyServer
from tests.util import wait_for

LOGGER = "closewait.sentinel"


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def _in_tcp_table(inode: int) -> bool:
    return any(s.inode == inode for s in netlink.dump(ALL_STATES, with_info=False))


def _records_about(caplog: pytest.LogCaptureFixture, port: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and f"127.0.0.1:{port} <- " in r.getMessage()]


def test_thread_logs_count_and_diagnosis_then_stops(
    caplog: pytest.LogCaptureFixture, leaky_server: LeakyServer
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    conn = leaky_server.leak_one()
    watcher = sentinel.start(interval=0.05)
    try:
        (detail,) = wait_for(lambda: _records_about(caplog, leaky_server.port))
        assert detail.levelno == logging.WARNING
        assert detail.closewait_diagnosis == "not-reading"  # type: ignore[attr-defined]
        assert detail.closewait_inode == _inode(conn)  # type: ignore[attr-defined]
        assert "role server [not-reading]" in detail.getMessage()
        summaries = [r for r in caplog.records if hasattr(r, "closewait_count")]
        assert summaries
        summary = summaries[-1]
        assert summary.closewait_count >= 1  # type: ignore[attr-defined]
        assert summary.closewait_diagnoses["not-reading"] >= 1  # type: ignore[attr-defined]
        assert "in CLOSE_WAIT in this process" in summary.getMessage()
        # The same socket is detailed once, not on every check.
        checks = watcher.statistics().checks
        wait_for(lambda: watcher.statistics().checks >= checks + 2)
        assert len(_records_about(caplog, leaky_server.port)) == 1
    finally:
        assert watcher.stop(timeout=5.0)
    stats = watcher.statistics()
    assert not stats.running
    assert not any(t.name == "closewait-sentinel" and t.is_alive() for t in threading.enumerate())
    assert stats.checks >= 3
    assert stats.close_wait_max >= 1
    assert stats.errors == 0
    assert 0 < stats.max_check_seconds <= stats.total_check_seconds
    assert watcher.stop()  # idempotent


def test_shutdown_action_releases_the_connection_and_recv_returns_eof(
    caplog: pytest.LogCaptureFixture, leaky_server: LeakyServer
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    conn = leaky_server.leak_one()
    inode = _inode(conn)
    fd = conn.fileno()
    with sentinel.Sentinel(interval=3600, action="shutdown", idle_limit=0.0) as watcher:
        wait_for(lambda: inode in watcher.check_now().shut_down)
        assert watcher.statistics().shutdowns >= 1
    wait_for(lambda: not _in_tcp_table(inode))  # LAST_ACK, then gone
    assert conn.fileno() == fd  # the application's descriptor is untouched
    assert os.fstat(fd).st_ino == inode
    conn.settimeout(5)
    assert conn.recv(100) == b""  # the application sees EOF and can close
    assert any("shut down fd" in r.getMessage() for r in caplog.records)


def test_shutdown_spares_connections_not_idle_long_enough(leaky_server: LeakyServer) -> None:
    conn = leaky_server.leak_one()
    inode = _inode(conn)
    watcher = sentinel.Sentinel(interval=3600, action="shutdown", idle_limit=3600.0)
    report = wait_for(lambda: [r for r in [watcher.check_now()] if any(f.socket.inode == inode for f in r.findings)])
    assert report[0].shut_down == ()
    assert _in_tcp_table(inode)


def test_shutdown_socket_rechecks_identity(leaky_server: LeakyServer) -> None:
    conn = leaky_server.leak_one()
    inode = _inode(conn)
    assert not sentinel.shutdown_socket(conn.fileno(), inode + 1)  # fd reused by another socket: refuse
    assert _in_tcp_table(inode)
    assert not sentinel.shutdown_socket(10_000_000, inode)  # closed fd


def test_trace_option_names_the_creation_site(caplog: pytest.LogCaptureFixture, leaky_server: LeakyServer) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    watcher = sentinel.start(interval=3600, trace=True)
    try:
        assert trace.is_tracing()
        conn = leaky_server.leak_one()  # accepted after tracing started
        wait_for(lambda: _inode(conn) in {f.socket.inode for f in watcher.check_now().findings})
        (detail,) = _records_about(caplog, leaky_server.port)
        assert "accepted at " in detail.getMessage()
        assert "tests/prevent/conftest.py:" in detail.getMessage()
    finally:
        watcher.stop()
    assert not trace.is_tracing()  # the sentinel stops the tracing it started


def test_custom_logger_and_a_clean_process_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("app.sockets")
    caplog.set_level(logging.WARNING, logger="app.sockets")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        server_side, _ = listener.accept()
        watcher = sentinel.Sentinel(interval=3600, logger=logger)
        report = watcher.check_now()
        assert all(f.socket.local.port != port for f in report.findings)
        client.close()
        server_side.close()
    assert not [r for r in caplog.records if f":{port} " in r.getMessage()]


@pytest.mark.parametrize(
    "kwargs",
    [{"interval": 0}, {"interval": -1.0}, {"action": "kill"}, {"idle_limit": -5}, {"interval": True}],
)
def test_bad_arguments_are_usage_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        sentinel.start(**kwargs)  # type: ignore[arg-type]
    assert not any(t.name == "closewait-sentinel" and t.is_alive() for t in threading.enumerate())
