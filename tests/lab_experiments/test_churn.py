"""The churn run: clients that come and go, against the leak and the remedies, counted with ss."""

from __future__ import annotations

import socket

import psutil

from closewait.lab import churn
from closewait.lab.model import LabContext, Status, Verdict
from closewait.lab.servers import REMEDY_ARGS
from tests.lab_experiments.conftest import StartServer
from tests.lab_experiments.kernel import socket_inodes, ss_port
from tests.util import wait_for

CLIENTS = 10


def _churn(port: int) -> None:
    for _ in range(CLIENTS):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"hello\n")


def _close_wait(port: int) -> int:
    return sum(1 for row in ss_port(port) if row.local_port == port and row.state == "CLOSE-WAIT")


def test_leaking_server_keeps_one_close_wait_per_client(leaky_server: StartServer) -> None:
    pid, port = leaky_server("--many")
    _churn(port)
    wait_for(lambda: _close_wait(port) == CLIENTS, timeout=10)
    wait_for(lambda: len(socket_inodes(pid)) == CLIENTS + 1, timeout=10)  # every fd kept, plus the listener


def test_read_close_server_keeps_none(remedy_server: StartServer) -> None:
    pid, port = remedy_server("read-close")
    _churn(port)
    wait_for(lambda: len(socket_inodes(pid)) == 1, timeout=10)  # only the listener
    wait_for(lambda: _close_wait(port) == 0, timeout=10)


def test_churn_series_per_server_and_nothing_left() -> None:
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    with LabContext() as ctx:
        (exp,) = churn.run(ctx)
    assert exp.id == "churn"
    assert exp.part == "remedies"
    assert exp.status == Status.OK, exp.reason
    assert set(exp.series) == {"leaking", *REMEDY_ARGS}
    for points in exp.series.values():
        assert points
        assert all(isinstance(t, float) and isinstance(c, float) for t, c in points)
        assert [t for t, _c in points] == sorted(t for t, _c in points)
    m = exp.measurements
    clients = m["clients_per_server"]
    assert isinstance(clients, int)
    assert clients == churn.RATE_PER_S * churn.DURATION_S
    # The shape the chart shows: the leak climbs to one per client, a read-based remedy stays low.
    errors = m["connect_errors"]
    assert isinstance(errors, int)
    assert clients - errors <= m["leaking_final"] <= clients
    assert isinstance(m["read-close_peak"], int)
    assert m["read-close_peak"] <= churn.PROMPT_SLACK
    assert exp.verdict == Verdict.HOLDS
    assert {p.pid for p in me.children(recursive=True)} <= before
