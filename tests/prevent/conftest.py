"""Fixtures for the prevention tests (trace, the pytest plugin, the sentinel).

``pytester`` is enabled in test_plugin.py (``pytest_plugins`` in a conftest below the rootdir is an
error in pytest 8+); its inner sessions run in subprocesses, so the plugin loads through its
``pytest11`` entry point exactly as it does for users.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from closewait import trace


@pytest.fixture
def tracing() -> Iterator[None]:
    """closewait.trace on for one test, off (originals restored) afterwards."""
    trace.start()
    try:
        yield
    finally:
        trace.stop()


class LeakyServer:
    """A server thread in this process that accepts connections and never reads or closes them.

    ``connections`` holds the accepted sockets (the test's own leak); ``close()`` ends everything.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.accepted = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._serve, name="leaky-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # listener closed
            self.connections.append(conn)
            self.accepted.release()

    def leak_one(self) -> socket.socket:
        """Connect, let the server accept, close the client: the server's end goes to CLOSE_WAIT."""
        client = socket.create_connection(("127.0.0.1", self.port))
        assert self.accepted.acquire(timeout=5)
        client.close()
        return self.connections[-1]

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(5)
        for conn in self.connections:
            conn.close()


@pytest.fixture
def leaky_server() -> Iterator[LeakyServer]:
    server = LeakyServer()
    try:
        yield server
    finally:
        server.close()
