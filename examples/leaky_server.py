"""A tiny TCP echo server with the classic CLOSE_WAIT bug, for trying closewait on.

Each client gets a thread that echoes lines back. When the client hangs up, recv() returns b''
and the loop ends, but the handler forgets conn.close(): the connection sits in CLOSE_WAIT for as
long as this process lives. Run it, connect a few clients, then `closewait scan`.

    python3 examples/leaky_server.py [PORT]      # default: a free port, printed on start
"""

from __future__ import annotations

import socket
import sys
import threading

clients: list[socket.socket] = []  # the bug's accomplice: a reference that keeps each socket alive


def handle(conn: socket.socket) -> None:
    clients.append(conn)
    while data := conn.recv(4096):
        conn.sendall(data)
    # BUG: recv() returned b'' (the client closed) and conn.close() is never called.


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    server = socket.create_server(("127.0.0.1", port))
    print(f"leaky echo server on 127.0.0.1:{server.getsockname()[1]}", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
