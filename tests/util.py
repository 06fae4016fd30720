"""Helpers for tests: bounded waiting on the kernel, and the simplest leaking child program."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy, at most ``timeout`` seconds.

    Returns that value; raises AssertionError with the last value if time runs out.
    """
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last value: {value!r})")
        time.sleep(interval)
        value = predicate()
    return value


#: A child program that prints its port, accepts one connection, reads it to EOF and never closes
#: it: the accepted socket sits in CLOSE_WAIT with Recv-Q 0 (``eof-not-closed``) for 60 s.
EOF_LEAKER = """
import socket, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
while conn.recv(100):
    pass
time.sleep(60)  # read EOF, never close
"""
