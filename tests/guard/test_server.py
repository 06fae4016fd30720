"""serve() against real loopback clients: every connection is closed, for a counted reason."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import closewait
from closewait.errors import UsageError
from closewait.guard import GuardedServer, ServerOptions, ServerStatistics, serve, start_server
from closewait.guard.server import Handler


def close_wait_on(port: int) -> list[closewait.Finding]:
    """Server-side CLOSE_WAIT sockets this process holds on ``port`` (local port, so not our clients')."""
    findings = closewait.scan(ports=[port], pids=[os.getpid()]).findings
    return [f for f in findings if f.socket.local.port == port]


async def wait_until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(handler: Handler, **kwargs: Any) -> AsyncIterator[GuardedServer]:
    """serve() in a task, with readiness through a future; cancelled (and awaited) at the end."""
    ready: asyncio.Future[GuardedServer] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(handler, ready=ready, **kwargs))
    server = await asyncio.wait_for(ready, 5.0)
    try:
        yield server
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def forgetful(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The classic leak: answer once and return without writer.close()."""
    writer.write(await reader.read(100))
    await writer.drain()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60.0))


# --- the pitfall itself ------------------------------------------------------------------------


def test_plain_asyncio_server_leaks_close_wait_with_a_forgetful_handler() -> None:
    """The control: with asyncio.start_server the same handler leaves CLOSE_WAIT behind."""
    writers: list[asyncio.StreamWriter] = []

    async def forgetful_kept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)  # only so the test can clean up the leak it makes on purpose
        await forgetful(reader, writer)

    async def scenario() -> None:
        server = await asyncio.start_server(forgetful_kept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            writer.close()
            await wait_until(lambda: close_wait_on(port))
            (finding,) = close_wait_on(port)
            assert finding.role == closewait.Role.SERVER
        finally:
            for leaked in writers:
                leaked.close()
            server.close()
            await server.wait_closed()
        await wait_until(lambda: not close_wait_on(port))

    run(scenario)


def test_handler_returning_without_close_leaves_no_close_wait() -> None:
    async def scenario() -> None:
        async with running(forgetful) as server:
            port = server.address[1]
            for _ in range(5):
                reader, writer = await asyncio.open_connection(*server.address)
                writer.write(b"hello")
                assert await reader.readexactly(5) == b"hello"
                assert await reader.read() == b""  # serve() closed it when the handler returned
                writer.close()
            await wait_until(lambda: server.statistics().open == 0)
            assert close_wait_on(port) == []
            stats = server.statistics()
            assert stats.accepted == 5
            assert stats.closed_handler + stats.closed_eof == 5

    run(scenario)


def test_peer_close_is_answered_even_while_the_handler_waits_elsewhere() -> None:
    """close_on_eof: the FIN is answered at once, not when the handler gets round to reading."""
    started = asyncio.Event()

    async def busy_elsewhere(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started.set()
        await asyncio.sleep(3600)

    async def scenario() -> None:
        async with running(busy_elsewhere, idle_timeout=None) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            await asyncio.wait_for(started.wait(), 5.0)
            writer.write_eof()  # half-close: our FIN
            assert await asyncio.wait_for(reader.read(), 5.0) == b""  # theirs came back
            writer.close()
            await wait_until(lambda: server.statistics().open == 0)
            assert close_wait_on(server.address[1]) == []
            assert server.statistics().closed_eof == 1

    run(scenario)


def test_half_close_request_gets_its_answer_with_close_on_eof_off() -> None:
    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the client's FIN
        writer.write(request.upper())
        await writer.drain()

    async def scenario() -> None:
        async with running(answer_after_eof, close_on_eof=False) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"question")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5.0) == b"QUESTION"
            writer.close()
            await wait_until(lambda: server.statistics().open == 0)
            stats = server.statistics()
            assert stats.closed_eof == 1
            assert close_wait_on(server.address[1]) == []

    run(scenario)


def test_echo_until_eof_closes_with_reason_eof() -> None:
    async def scenario() -> None:
        async with running(echo) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"a" * 100_000)
            assert await reader.readexactly(100_000) == b"a" * 100_000
            writer.close()
            await writer.wait_closed()
            await wait_until(lambda: server.statistics().open == 0)
            stats = server.statistics()
            assert (stats.accepted, stats.closed_eof, stats.closed) == (1, 1, 1)

    run(scenario)


# --- idle timeout, keepalive, limits -----------------------------------------------------------


def test_idle_connection_is_closed_and_active_one_kept() -> None:
    async def scenario() -> None:
        async with running(echo, idle_timeout=1.0, tick=0.05) as server:
            idle_reader, idle_writer = await asyncio.open_connection(*server.address)
            busy_reader, busy_writer = await asyncio.open_connection(*server.address)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10.0
            # Reads and writes keep the busy one alive, every 20 ms, far inside the 1 s timeout.
            while server.statistics().closed_idle == 0 and loop.time() < deadline:
                busy_writer.write(b"ping")
                assert await busy_reader.readexactly(4) == b"ping"
                await asyncio.sleep(0.02)
            assert await asyncio.wait_for(idle_reader.read(), 5.0) == b""
            busy_writer.write(b"still")
            assert await busy_reader.readexactly(5) == b"still"
            stats = server.statistics()
            assert (stats.open, stats.closed_idle) == (1, 1)
            for writer in (idle_writer, busy_writer):
                writer.close()
            await wait_until(lambda: server.statistics().open == 0)
            assert server.statistics().closed_eof == 1

    run(scenario)


def test_idle_timeout_closes_a_peer_that_stopped_reading() -> None:
    """transport.close() would wait forever for the buffer to drain; the reaper aborts instead."""

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        for _ in range(10_000):
            writer.write(b"x" * 65536)
            await writer.drain()

    async def scenario() -> None:
        async with running(flood, idle_timeout=0.3, tick=0.05) as server:
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.setblocking(False)
            await asyncio.get_running_loop().sock_connect(client, server.address)
            client.send(b"go")  # and never read
            await wait_until(lambda: server.statistics().closed_idle == 1)
            await wait_until(lambda: server.statistics().open == 0)
            client.close()

    run(scenario)


def test_keepalive_options_are_set_on_accepted_sockets() -> None:
    seen: dict[str, int] = {}

    async def inspect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        seen["keepalive"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        seen["idle"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
        seen["interval"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
        seen["count"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
        writer.write(b"done")

    async def scenario(**kwargs: Any) -> None:
        async with running(inspect, **kwargs) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            assert await reader.read() == b"done"
            writer.close()

    run(lambda: scenario(keepalive_idle=7, keepalive_interval=3, keepalive_count=4))
    assert seen == {"keepalive": 1, "idle": 7, "interval": 3, "count": 4}
    run(lambda: scenario(keepalive=False))
    assert seen["keepalive"] == 0


def test_connection_limit_pauses_accepting() -> None:
    async def scenario() -> None:
        async with running(echo, max_connections=2) as server:
            clients = [await asyncio.open_connection(*server.address) for _ in range(3)]
            for index, (reader, writer) in enumerate(clients[:2]):
                writer.write(b"%d" % index)
                assert await reader.readexactly(1) == b"%d" % index
            third_reader, third_writer = clients[2]
            third_writer.write(b"3")  # connected in the kernel's backlog, not accepted yet
            await wait_until(lambda: server.statistics().paused == 1)
            await asyncio.sleep(0.1)
            stats = server.statistics()
            assert (stats.open, stats.accepted, stats.peak, stats.paused) == (2, 2, 2, 1)
            clients[0][1].close()  # a slot frees: the third is accepted and answered
            assert await asyncio.wait_for(third_reader.readexactly(1), 5.0) == b"3"
            stats = server.statistics()
            assert (stats.open, stats.accepted, stats.peak) == (2, 3, 2)
            for _, writer in clients[1:]:
                writer.close()
            await wait_until(lambda: server.statistics().open == 0)

    run(scenario)


def test_connection_limit_refuses_with_reset() -> None:
    async def scenario() -> None:
        async with running(echo, max_connections=1, when_full="refuse") as server:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"1")
            assert await reader.readexactly(1) == b"1"

            async def refused() -> None:
                # The RST can beat asyncio's connect callback, so it surfaces at connect or at read.
                refused_reader, refused_writer = await asyncio.open_connection(*server.address)
                try:
                    await asyncio.wait_for(refused_reader.read(1), 5.0)
                finally:
                    refused_writer.close()

            with pytest.raises(ConnectionResetError):
                await refused()
            stats = server.statistics()
            assert (stats.open, stats.accepted, stats.closed_limit) == (1, 2, 1)
            writer.close()
            await wait_until(lambda: server.statistics().open == 0)

    run(scenario)


# --- errors, shutdown, statistics --------------------------------------------------------------


def test_handler_exception_and_reset_count_as_errors(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.read(1) == b"!":
            raise RuntimeError("handler bug")
        await reader.read()

    async def scenario() -> None:
        async with running(broken) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"!")
            assert await reader.read() == b""  # closed although the handler raised
            writer.close()
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"?")
            await wait_until(lambda: server.statistics().closed_error == 1)
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST
            await wait_until(lambda: server.statistics().open == 0)
            assert server.statistics().closed_error == 2
            assert close_wait_on(server.address[1]) == []

    run(scenario)
    assert "handler failed" in caplog.text


def test_shutdown_closes_every_connection() -> None:
    async def scenario() -> None:
        ready: asyncio.Future[GuardedServer] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(echo, ready=ready))
        server = await ready
        clients = [await asyncio.open_connection(*server.address) for _ in range(4)]
        await wait_until(lambda: server.statistics().open == 4)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for reader, writer in clients:
            assert await asyncio.wait_for(reader.read(), 5.0) == b""
            writer.close()
        stats = server.statistics()
        assert (stats.open, stats.closed_shutdown) == (0, 4)
        assert not server.is_serving()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*server.address)

    run(scenario)


def test_statistics_are_an_immutable_consistent_snapshot() -> None:
    async def scenario() -> None:
        async with await start_server(echo, idle_timeout=0.3) as server:
            for _ in range(3):
                reader, writer = await asyncio.open_connection(*server.address)
                writer.write(b"x")
                await reader.readexactly(1)
                writer.close()
            idle = await asyncio.open_connection(*server.address)
            await wait_until(lambda: server.statistics().closed_idle == 1)
            await wait_until(lambda: server.statistics().open == 0)
            stats = server.statistics()
            assert isinstance(stats, ServerStatistics)
            assert stats.accepted == stats.open + stats.closed == 4
            assert stats.closed_by_reason()[closewait.guard.CloseReason.EOF] == 3
            with pytest.raises(dataclasses.FrozenInstanceError):
                stats.open = 99  # type: ignore[misc]
            idle[1].close()

    run(scenario)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_connections": 0}, "max_connections"),
        ({"when_full": "drop"}, "when_full"),
        ({"keepalive_idle": 0}, "keepalive_idle"),
        ({"keepalive_count": 0}, "keepalive_count"),
        ({"port": 70000}, "out of range"),
        ({"host": "no-such-host.invalid"}, "cannot listen"),
        ({"idle_timeout": -1.0}, "idle timeout"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(kwargs: dict[str, Any], message: str) -> None:
    async def scenario() -> None:
        with pytest.raises(UsageError, match=message) as info:
            await start_server(echo, **kwargs)
        assert "\n" not in str(info.value)

    run(scenario)


def test_port_in_use_is_a_usage_error() -> None:
    async def scenario() -> None:
        async with await start_server(echo) as server:
            with pytest.raises(UsageError, match="cannot listen"):
                await start_server(echo, port=server.address[1])

    run(scenario)


def test_one_options_object_serves_both_and_keywords_override_it() -> None:
    """serve() and start_server() take one ServerOptions; keyword arguments are its fields and win."""
    options = ServerOptions(idle_timeout=0.3, max_connections=1, when_full="refuse")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.backlog = 1  # type: ignore[misc]
    with pytest.raises(UsageError, match="max_connections"):
        ServerOptions(max_connections=0)  # checked when made, before any socket is opened

    async def scenario() -> None:
        async with await start_server(echo, options=options) as server:
            _, first = await asyncio.open_connection(*server.address)
            await wait_until(lambda: server.statistics().open == 1)
            with contextlib.suppress(ConnectionError):  # over the limit: reset at once
                _, second = await asyncio.open_connection(*server.address)
                second.close()
            await wait_until(lambda: server.statistics().closed_limit == 1)
            await wait_until(lambda: server.statistics().closed_idle == 1)  # the 0.3 s idle timeout
            first.close()
        async with running(echo, options=options, max_connections=2) as server:
            clients = [await asyncio.open_connection(*server.address) for _ in range(2)]
            await wait_until(lambda: server.statistics().open == 2)
            assert server.statistics().closed_limit == 0
            for _, writer in clients:
                writer.close()

    run(scenario)
