"""The reapers with real sockets on loopback: idle connections are closed, active ones kept."""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import socket
import time
from collections.abc import Iterator

import pytest

from closewait.guard.reaper import CloseReason, SelectorReaper, TransportReaper, close_socket


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def connected_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(listener.getsockname())
    server_side, _ = listener.accept()
    return client, server_side


def peer_closed(client: socket.socket) -> bool:
    """True once the server side has closed: recv sees EOF (or a reset)."""
    client.setblocking(False)
    try:
        return client.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_selector_reaper_closes_idle_and_keeps_active(listener: socket.socket) -> None:
    idle_client, idle_server = connected_pair(listener)
    busy_client, busy_server = connected_pair(listener)
    with selectors.DefaultSelector() as selector:
        reaper = SelectorReaper(selector, idle_timeout=1.0, tick=0.05)
        reaper.register(idle_server)
        reaper.register(busy_server)
        assert len(reaper) == 2
        assert idle_server in reaper
        reaped: list[socket.socket] = []
        deadline = time.monotonic() + 10.0
        # A selectors loop: the busy client sends every 20 ms, far inside the 1 s timeout.
        while not reaped and time.monotonic() < deadline:
            busy_client.send(b"x")
            timeout = reaper.timeout()
            assert timeout is not None
            for key, _ in selector.select(min(timeout, 0.02)):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock.recv(4096):
                    reaper.touch(sock)
                else:
                    reaper.close(sock, CloseReason.EOF)
            reaped.extend(reaper.reap())
        assert reaped == [idle_server]
        assert idle_server.fileno() == -1
        assert busy_server in reaper
        assert idle_server not in reaper
        assert peer_closed(idle_client)
        assert not peer_closed(busy_client)
        # The busy connection still works end to end.
        busy_client.setblocking(True)
        busy_server.sendall(b"still here")
        assert busy_client.recv(100) == b"still here"
        busy_client.close()
        (key, _), *_ = selector.select(5.0)
        assert key.fileobj is busy_server
        while busy_server.recv(4096):
            pass
        reaper.close(busy_server, CloseReason.EOF)
        stats = reaper.statistics()
        assert stats.watched == 0
        assert stats.closed_idle == 1
        assert stats.closed[CloseReason.EOF] == 1
        assert stats.closed_total == 2
        assert reaper.timeout() is None
    idle_client.close()


def test_unregister_hands_the_socket_back_open(listener: socket.socket) -> None:
    client, server_side = connected_pair(listener)
    with selectors.DefaultSelector() as selector:
        reaper = SelectorReaper(selector, idle_timeout=0.05, tick=0.01)
        reaper.register(server_side)
        reaper.unregister(server_side)
        time.sleep(0.1)
        assert reaper.reap() == []
        assert server_side.fileno() != -1
        assert selector.get_map() is not None
        assert len(selector.get_map()) == 0
    server_side.sendall(b"ok")
    assert client.recv(2) == b"ok"
    client.close()
    server_side.close()


def test_close_socket_sends_fin_even_when_the_descriptor_was_duplicated(listener: socket.socket) -> None:
    """close() alone would not: the dup keeps the connection open; shutdown acts on the connection."""
    client, server_side = connected_pair(listener)
    duplicate = os.dup(server_side.fileno())
    try:
        client.settimeout(5.0)
        close_socket(server_side)
        assert server_side.fileno() == -1
        assert client.recv(1) == b""  # the FIN arrived although `duplicate` still holds the socket
    finally:
        os.close(duplicate)
        client.close()


def test_plain_close_of_a_duplicated_socket_sends_nothing(listener: socket.socket) -> None:
    """The control for the test above: without shutdown the peer hears nothing."""
    client, server_side = connected_pair(listener)
    duplicate = os.dup(server_side.fileno())
    try:
        server_side.close()
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recv(1)
    finally:
        os.close(duplicate)
        client.close()


class _ReapedProtocol(asyncio.Protocol):
    def __init__(self, reaper: TransportReaper, lost: asyncio.Queue[asyncio.BaseTransport]) -> None:
        self.reaper = reaper
        self.lost = lost
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.reaper.add(transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.reaper.touch(self.transport)
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.transport is not None
        self.reaper.discard(self.transport)
        self.lost.put_nowait(self.transport)


async def _transport_reaper_scenario() -> None:
    loop = asyncio.get_running_loop()
    reaper = TransportReaper(1.0, tick=0.05)
    lost: asyncio.Queue[asyncio.BaseTransport] = asyncio.Queue()
    server = await loop.create_server(lambda: _ReapedProtocol(reaper, lost), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        deadline = loop.time() + 10.0
        while lost.empty() and loop.time() < deadline:
            busy_writer.write(b"ping")
            assert await busy_reader.readexactly(4) == b"ping"
            await asyncio.sleep(0.02)
        reaped = await asyncio.wait_for(lost.get(), 5.0)
        assert reaped not in reaper
        # The idle client sees the server's FIN; the busy one still echoes.
        assert await asyncio.wait_for(idle_reader.read(), 5.0) == b""
        busy_writer.write(b"pong")
        assert await busy_reader.readexactly(4) == b"pong"
        assert len(reaper) == 1
        stats = reaper.statistics()
        assert stats.closed_idle == 1
        assert stats.watched == 1
        assert stats.callback_errors == 0
    finally:
        for writer in (idle_writer, busy_writer):
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await asyncio.wait_for(lost.get(), 5.0)
        reaper.close()
        server.close()
        await server.wait_closed()


def test_transport_reaper_closes_idle_transports_and_keeps_active_ones() -> None:
    asyncio.run(_transport_reaper_scenario())


async def _failing_callback_scenario() -> None:
    calls: list[asyncio.BaseTransport] = []

    def on_idle(transport: asyncio.BaseTransport) -> None:
        calls.append(transport)
        transport.close()
        raise RuntimeError("callback bug")

    loop = asyncio.get_running_loop()
    reaper = TransportReaper(0.1, tick=0.02, on_idle=on_idle)
    lost: asyncio.Queue[asyncio.BaseTransport] = asyncio.Queue()
    server = await loop.create_server(lambda: _ReapedProtocol(reaper, lost), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    readers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    for reader, _ in readers:
        assert await asyncio.wait_for(reader.read(), 5.0) == b""
    assert len(calls) == 3  # one failing callback does not stop the others
    assert reaper.statistics().callback_errors == 3
    for _, writer in readers:
        writer.close()
    reaper.close()
    server.close()
    await server.wait_closed()


def test_transport_reaper_survives_a_failing_callback(caplog: pytest.LogCaptureFixture) -> None:
    asyncio.run(_failing_callback_scenario())
    assert "closing an idle transport failed" in caplog.text
