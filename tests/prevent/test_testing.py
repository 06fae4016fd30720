"""closewait.testing without pytest's help: real leaks in this process and in a child process."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import threading

import pytest

import closewait
from closewait import testing
from tests.conftest import Spawn
from tests.prevent.conftest import LeakyServer
from tests.util import EOF_LEAKER, wait_for


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def test_no_new_close_wait_fails_on_a_leak_and_names_it(leaky_server: LeakyServer) -> None:
    with pytest.raises(testing.CloseWaitLeak) as caught, testing.no_new_close_wait(grace=0.1):
        conn = leaky_server.leak_one()
    (leak,) = caught.value.leaks
    assert leak.finding.socket.inode == _inode(conn)
    assert leak.finding.socket.local.port == leaky_server.port
    assert leak.finding.role == closewait.Role.SERVER
    assert leak.finding.diagnosis is not None
    assert leak.finding.diagnosis.code == "not-reading"  # the server never read after the FIN
    assert conn.fileno() in leak.fds
    message = str(caught.value)
    assert message.startswith("closewait: 1 socket left in CLOSE_WAIT (still there after a 0.1 s grace period)")
    assert f"127.0.0.1:{leaky_server.port} <- " in message
    assert "[not-reading]" in message
    assert gc.isenabled()  # the guard resumed the collector it paused


def test_a_clean_block_passes_and_older_leaks_are_not_blamed(leaky_server: LeakyServer) -> None:
    old = leaky_server.leak_one()
    wait_for(lambda: _inode(old) in testing.close_wait_inodes())
    with testing.no_new_close_wait(grace=0.1) as guard:
        assert _inode(old) in guard.baseline
        client = socket.create_connection(("127.0.0.1", leaky_server.port))
        assert leaky_server.accepted.acquire(timeout=5)
        client.sendall(b"still open")  # ESTABLISHED on both ends, not a leak
    client.close()
    with pytest.raises(testing.CloseWaitLeak):
        testing.assert_no_close_wait()  # the old leak is there, and the plain assertion sees it
    testing.assert_no_close_wait(ignore=testing.close_wait_inodes())


def test_grace_period_waits_for_an_asynchronous_close(leaky_server: LeakyServer) -> None:
    with testing.no_new_close_wait(grace=5.0):
        conn = leaky_server.leak_one()
        wait_for(lambda: _inode(conn) in testing.close_wait_inodes())
        closer = threading.Timer(0.2, conn.close)  # closed by another thread after the block ends
        closer.start()
    closer.join()
    assert conn.fileno() == -1


def test_the_block_exception_wins_and_no_check_is_made(leaky_server: LeakyServer) -> None:
    def leak_then_fail() -> None:
        with testing.no_new_close_wait(grace=0.0):
            leaky_server.leak_one()
            raise KeyError("the code under test failed")

    with pytest.raises(KeyError):
        leak_then_fail()
    assert gc.isenabled()


def test_asyncio_handler_that_forgets_close_is_caught_because_gc_is_paused() -> None:
    """The transport nobody closed is only closed by the garbage collector; the guard must see it."""

    async def forgetful(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await writer.drain()  # returns without writer.close()

    async def main() -> int:
        server = await asyncio.start_server(forgetful, "127.0.0.1", 0)
        port: int = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        assert await reader.read(100) == b"ping"
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.05)  # the server reads the EOF
        server.close()
        await server.wait_closed()
        return port

    with pytest.raises(testing.CloseWaitLeak) as caught, testing.no_new_close_wait(grace=0.2):
        port = asyncio.run(main())
    (leak,) = caught.value.leaks
    assert leak.finding.socket.local.port == port
    assert leak.finding.diagnosis is not None
    assert leak.finding.diagnosis.code == "eof-not-closed"
    gc.collect()  # now the collector closes the transport (with a ResourceWarning)
    wait_for(lambda: not any(f.socket.local.port == port for f in testing.close_wait_sockets()))


def test_another_process_can_be_checked(spawn: Spawn) -> None:
    child = spawn(EOF_LEAKER)
    assert child.stdout is not None
    port = int(child.stdout.readline())
    before = testing.close_wait_inodes(child.pid)
    assert before == {}
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"bye")
    wait_for(lambda: testing.close_wait_inodes(child.pid))
    with pytest.raises(testing.CloseWaitLeak) as caught:
        testing.assert_no_close_wait(child.pid, grace=0.1)
    (leak,) = caught.value.leaks
    assert leak.finding.role == closewait.Role.SERVER
    assert leak.finding.diagnosis is not None
    assert leak.finding.diagnosis.code == "eof-not-closed"
    assert leak.traceback is None  # tracing is in-process only
    assert [f.socket.inode for f in testing.close_wait_sockets(child.pid)] == [leak.finding.socket.inode]


def test_bad_grace_is_rejected() -> None:
    with pytest.raises(ValueError, match="grace"):
        testing.Guard(grace=-1.0)
    assert gc.isenabled()


# -- Horizon: attribution by test boundary, reports a horizon after the test ----------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_horizon_reports_a_socket_a_horizon_after_its_test_and_only_once(leaky_server: LeakyServer) -> None:
    clock = _Clock()
    horizon = testing.Horizon(5.0, clock=clock)
    horizon.start()
    assert horizon.begin("t1") == []
    conn = leaky_server.leak_one()
    assert horizon.end("t1") == []  # in CLOSE_WAIT, but the horizon has not passed
    clock.now += 4.0
    assert horizon.begin("t2") == []
    assert horizon.end("t2") == []
    clock.now += 1.5
    (due,) = horizon.begin("t3")
    assert (due.test, due.tracked.inode, due.closed_by_gc) == ("t1", _inode(conn), False)
    assert due.after_test == pytest.approx(5.5)
    assert horizon.end("t3") == []  # reported once


def test_horizon_gives_a_socket_seen_before_the_next_test_to_the_previous_one(leaky_server: LeakyServer) -> None:
    clock = _Clock()
    horizon = testing.Horizon(1.0, clock=clock)
    horizon.start()
    horizon.begin("t1")
    horizon.end("t1")
    conn = leaky_server.leak_one()  # after t1's check, before t2's start
    horizon.begin("t2")
    horizon.end("t2")
    clock.now += 2.0
    (due,) = horizon.begin("t3")
    assert (due.test, due.tracked.inode) == ("t1", _inode(conn))


def test_horizon_closed_socket_is_not_reported_and_unchecked_tests_own_nothing(leaky_server: LeakyServer) -> None:
    clock = _Clock()
    horizon = testing.Horizon(1.0, clock=clock)
    horizon.start()
    horizon.begin("t1")
    leaky_server.leak_one().close()  # closed in time: a keep-alive timer that fired
    horizon.end("t1")
    horizon.begin("t2")
    leaky_server.leak_one()
    horizon.end(None)  # t2 is not checked
    clock.now += 5.0
    assert horizon.begin("t3") == []
    assert horizon.finish(sleep=lambda _: None) == []


def test_horizon_finish_waits_only_for_the_youngest_candidate(leaky_server: LeakyServer) -> None:
    clock = _Clock()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    horizon = testing.Horizon(3.0, clock=clock)
    horizon.start()
    horizon.begin("t1")
    leaky_server.leak_one()
    horizon.end("t1")
    clock.now += 2.0
    (due,) = horizon.finish(poll=0.5, sleep=sleep)
    assert due.test == "t1"
    assert sum(slept) == pytest.approx(1.0)  # 3 s horizon, 2 s already gone
