"""Fixtures for the lab experiment tests: the lab's server programs started as the test's own children."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import pytest

from closewait.lab.servers import LEAKY, REMEDY
from tests.conftest import Spawn

StartServer = Callable[..., tuple[int, int]]
CLIENT = """
import socket, sys, time
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
conn.sendall(b"hello from the test\\n")
print(conn.getsockname()[1], flush=True)
time.sleep(60)
"""


@pytest.fixture
def remedy_server(spawn: Spawn) -> StartServer:
    """Start ``remedy.py STRATEGY ARGS...``; returns (pid, port)."""

    def start(strategy: str, *args: str) -> tuple[int, int]:
        proc = spawn(argv=[sys.executable, str(REMEDY), strategy, *args])
        assert proc.stdout is not None
        event = json.loads(proc.stdout.readline())
        assert event["ev"] == "listening"
        return proc.pid, int(event["port"])

    return start


@pytest.fixture
def leaky_server(spawn: Spawn) -> StartServer:
    """Start the Python port of the article's server (``--many`` if asked); returns (pid, port)."""

    def start(*args: str) -> tuple[int, int]:
        proc = spawn(argv=[sys.executable, str(LEAKY), *args])
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("Server is listening on port "), line
        return proc.pid, int(line.rsplit(" ", 1)[1])

    return start
