"""The article's leaking server, ported line for line to Python (run as a child process by the lab).

The C original (``article_server.c`` next to this file) accepts ONE client and loops: ``recv()``,
``sleep(1)``, print what arrived; it breaks only when ``recv()`` returns a negative value, never
on 0 (the peer's FIN), and its ``close(client_fd)`` is commented out. That is the leak: after the
client goes away ``recv()`` returns 0 every second and the kernel keeps the connection in
CLOSE_WAIT, because its owner never closes it.

The port keeps that logic. Differences, all forced by Python or by the lab:

- ``recv()`` never returns a negative value in Python; it raises ``OSError``. The port breaks on
  that exception, which is the same condition (the C code's ``bytes_received < 0``).
- Python closes a socket when its object is garbage-collected, which would quietly fix the leak.
  The port keeps a reference to every accepted connection, like the C fd nobody closes.
- It binds 127.0.0.1 port 0 (the article: any address, port 12345) so the lab never collides with
  anything, and prints the port the kernel chose.
- ``--many`` (used by the lab's churn run) serves any number of clients, each on its own thread
  running exactly the article's loop; without it, the server accepts one client like the article.

Usage: ``python leaky.py [--many]``. The first line on stdout is
``Server is listening on port N``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from types import FrameType

BUFFER_SIZE = 1024

_print_lock = threading.Lock()
#: Accepted connections, kept alive on purpose (see the module docstring).
_leaked: list[socket.socket] = []


def say(text: str) -> None:
    with _print_lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def sigpipe_handler(sig: int, frame: FrameType | None) -> None:
    # os.write, not say(): a handler must not wait for a lock its own thread may hold.
    os.write(1, b"SIGPIPE received!\n")


def serve(client: socket.socket) -> None:
    """The article's loop: recv, sleep 1 s, print; stop only on an error, never close the client."""
    while True:
        try:
            data = client.recv(BUFFER_SIZE - 1)
        except OSError as err:
            say(f"recv: {err.strerror}")
            break
        time.sleep(1)
        say(f"Received: {len(data)}, {data.decode('utf-8', 'replace')}")
    # close(client) deliberately missing: the leak the article demonstrates.


def main(argv: list[str]) -> int:
    many = "--many" in argv
    signal.signal(signal.SIGPIPE, sigpipe_handler)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(128 if many else 1)
    say(f"Server is listening on port {server.getsockname()[1]}")
    if not many:
        client, _ = server.accept()
        _leaked.append(client)
        say(f"Client connected, {client.fileno()}")
        serve(client)
        server.close()
        return 0
    while True:
        client, _ = server.accept()
        _leaked.append(client)
        say(f"Client connected, {client.fileno()}")
        threading.Thread(target=serve, args=(client,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
