"""closewait.trace on real sockets: every creation path records the line that made the socket."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading

import pytest

import closewait
from closewait import trace
from closewait.errors import UsageError
from tests.prevent.conftest import LeakyServer
from tests.util import wait_for

HERE = os.path.abspath(__file__)


def _next_line() -> int:
    """The line number after the caller's line (where the socket under test is created)."""
    return sys._getframe(1).f_lineno + 1


def _assert_origin(tb: trace.Traceback | None, line: int, function: str) -> trace.Traceback:
    assert tb is not None
    assert tb.origin is not None
    assert (tb.origin.filename, tb.origin.lineno, tb.origin.function) == (HERE, line, function)
    return tb


def test_off_by_default_and_start_stop_restore_the_exact_methods() -> None:
    init = socket.socket.__dict__["__init__"]
    real_close = socket.socket.__dict__["_real_close"]
    assert not trace.is_tracing()
    with socket.socket() as sock:
        assert trace.get_traceback(sock) is None
    trace.start()
    trace.start(limit=4)  # idempotent: only the limit changes
    try:
        assert trace.is_tracing()
        assert socket.socket.__dict__["__init__"] is not init
        assert trace.statistics().limit == 4
        with socket.socket() as sock:
            assert isinstance(sock, socket.socket)
            assert trace.get_traceback(sock) is not None
    finally:
        trace.stop()
    assert socket.socket.__dict__["__init__"] is init
    assert socket.socket.__dict__["_real_close"] is real_close
    assert not trace.is_tracing()
    assert trace.statistics().traced == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_limits_are_usage_errors(bad: object) -> None:
    with pytest.raises(UsageError):
        trace.start(limit=bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        trace.start(max_entries=bad)  # type: ignore[arg-type]
    assert not trace.is_tracing()


@pytest.mark.usefixtures("tracing")
def test_constructor_create_connection_accept_and_listener_link() -> None:
    line = _next_line()
    listener = socket.create_server(("127.0.0.1", 0))
    listener_line = line
    line = _next_line()
    client = socket.create_connection(listener.getsockname())
    client_line = line
    line = _next_line()
    server_side, _ = listener.accept()
    accept_line = line
    line = _next_line()
    plain = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    plain_line = line
    try:
        name = "test_constructor_create_connection_accept_and_listener_link"
        assert _assert_origin(trace.get_traceback(listener), listener_line, name).kind == "create_server"
        assert _assert_origin(trace.get_traceback(client), client_line, name).kind == "create_connection"
        accepted = _assert_origin(trace.get_traceback(server_side.fileno()), accept_line, name)
        assert accepted.kind == "accept"
        assert accepted.listener is not None
        assert accepted.listener.inode == os.fstat(listener.fileno()).st_ino
        assert f"listener created at {HERE}:{listener_line}" in accepted.describe()
        assert _assert_origin(trace.get_traceback(plain), plain_line, name).kind == "socket"
        # Frames inside socket.py are not kept; the first frame is the caller.
        tb = trace.get_traceback(client)
        assert tb is not None
        assert all(f.filename != socket.__file__ for f in tb.frames)
        assert tb.frames[0].lineno == client_line
        assert tb.format(most_recent_first=True)[0] == f'  File "{HERE}", line {client_line}, in {name}'
    finally:
        for sock in (listener, client, server_side, plain):
            sock.close()


@pytest.mark.usefixtures("tracing")
def test_only_inet_stream_sockets_are_recorded() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket(socket.AF_UNIX) as unix:
        assert trace.get_traceback(udp) is None
        assert trace.get_traceback(unix) is None
    a, b = socket.socketpair()  # AF_UNIX on Linux (the kernel has no AF_INET socketpair)
    try:
        assert trace.get_traceback(a) is None
        assert trace.statistics().traced == 0
    finally:
        a.close()
        b.close()


@pytest.mark.usefixtures("tracing")
def test_record_is_dropped_when_the_descriptor_really_closes() -> None:
    sock = socket.socket()
    inode = os.fstat(sock.fileno()).st_ino
    reader = sock.makefile("rb")
    sock.close()  # a makefile() reader keeps the descriptor open: the record must stay
    assert trace.get_traceback_for_inode(inode) is not None
    reader.close()  # now the descriptor is closed
    assert trace.get_traceback_for_inode(inode) is None
    assert trace.statistics().dropped_on_close >= 1


@pytest.mark.usefixtures("tracing")
def test_a_second_object_for_the_same_socket_keeps_the_creation_site() -> None:
    line = _next_line()
    original = socket.socket()
    copy = socket.fromfd(original.fileno(), socket.AF_INET, socket.SOCK_STREAM)
    inode = os.fstat(original.fileno()).st_ino
    tb = trace.get_traceback(copy)
    assert tb is not None
    assert tb.kind == "socket"
    assert tb.origin is not None
    assert tb.origin.lineno == line
    copy.close()  # the original descriptor is still open: keep the record
    assert trace.get_traceback_for_inode(inode) is not None
    original.close()
    assert trace.get_traceback_for_inode(inode) is None


def test_memory_is_bounded_oldest_first() -> None:
    trace.start(max_entries=3)
    sockets = [socket.socket() for _ in range(5)]
    try:
        stats = trace.statistics()
        assert stats.traced == 3
        assert stats.evicted == 2
        assert trace.get_traceback(sockets[0]) is None
        assert trace.get_traceback(sockets[4]) is not None
    finally:
        for sock in sockets:
            sock.close()
        trace.stop()


@pytest.mark.usefixtures("tracing")
def test_threads_record_concurrently_with_their_names() -> None:
    made: dict[str, list[socket.socket]] = {}
    barrier = threading.Barrier(4)

    def work() -> None:
        barrier.wait()
        made[threading.current_thread().name] = [socket.socket() for _ in range(50)]

    threads = [threading.Thread(target=work, name=f"maker-{i}") for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    try:
        for name, socks in made.items():
            for sock in socks:
                tb = trace.get_traceback(sock)
                assert tb is not None
                assert tb.thread == name
        assert len(made) == 4
    finally:
        for socks in made.values():
            for sock in socks:
                sock.close()


@pytest.mark.usefixtures("tracing")
def test_asyncio_selector_loop_server_and_client_sockets_are_recorded() -> None:
    seen: dict[str, trace.Traceback | None] = {}
    lines: dict[str, int] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["accepted"] = trace.get_traceback(writer.get_extra_info("socket").fileno())
        writer.write(await reader.read(10))
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main() -> None:
        lines["server"] = _next_line()
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        lines["client"] = _next_line()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        seen["client"] = trace.get_traceback(writer.get_extra_info("socket").fileno())
        writer.write(b"ping")
        assert await reader.read(10) == b"ping"
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    assert isinstance(asyncio.get_event_loop_policy(), asyncio.DefaultEventLoopPolicy)  # a selector loop
    accepted = seen["accepted"]
    assert accepted is not None
    assert accepted.kind == "accept"
    assert any(f.filename.endswith("asyncio/selector_events.py") for f in accepted.frames)
    assert accepted.listener is not None
    _assert_origin(accepted.listener, lines["server"], "main")
    _assert_origin(seen["client"], lines["client"], "main")


@pytest.mark.usefixtures("tracing")
def test_scan_findings_join_to_their_creation_site(leaky_server: LeakyServer) -> None:
    line = _next_line()
    conn = leaky_server.leak_one()
    inode = os.fstat(conn.fileno()).st_ino

    def finding() -> closewait.Finding | None:
        found = [f for f in closewait.scan(pids=[os.getpid()]).findings if f.socket.inode == inode]
        return found[0] if found else None

    leaked = wait_for(finding)
    tb = trace.get_traceback(leaked)
    assert tb is not None
    assert tb.kind == "accept"
    assert tb.thread == "leaky-server"
    assert tb.listener is not None
    assert tb.listener.origin is not None
    assert tb.listener.origin.filename.endswith("tests/prevent/conftest.py")
    assert trace.get_traceback(leaked.socket) == tb
    assert trace.get_traceback_for_inode(inode) == tb
    assert inode in trace.traced_inodes()
    assert line > 0


@pytest.mark.usefixtures("tracing")
def test_a_forked_child_keeps_tracing_with_fresh_locks() -> None:
    with trace._state.lock:  # held while forking, as another thread might
        pid = os.fork()
        if pid == 0:  # the child: must leave through os._exit whatever happens
            code = 1
            try:
                with socket.socket() as sock:
                    tb = trace.get_traceback(sock)
                    code = 0 if tb is not None and tb.origin is not None and tb.origin.filename == HERE else 2
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
