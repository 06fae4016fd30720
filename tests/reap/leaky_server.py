"""A server that leaks CLOSE_WAIT and keeps serving: the reap tests' child process (run as a script).

Usage: ``python leaky_server.py [HOST [DEVICE]]``; with DEVICE the listener (and so every accepted
connection) is bound to that interface with SO_BINDTODEVICE. Prints its port on the first line of stdout. Every
connection speaks lines:

    PING            -> PONG <pid>            (the server still serves)
    TOUCH <fd>      -> TOUCH <fd> recv=<what recv() gave> send=<what send() gave>
    CLOSE <fd>      -> CLOSED <fd>           (close a leaked socket for real)
    SHUTWR <fd>     -> SHUTWR <fd>           (shutdown(SHUT_WR) a leaked socket: it leaves CLOSE_WAIT)

When a peer closes, the server reads EOF and stops watching the connection but never closes it:
the socket stays in CLOSE_WAIT, its fd stays open, and the server prints ``LEAK <fd>``.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import sys

selector = selectors.DefaultSelector()
leaked: dict[int, socket.socket] = {}
buffers: dict[int, bytes] = {}


def outcome(call: object) -> str:
    try:
        value = call()  # type: ignore[operator]
    except OSError as err:
        return errno.errorcode.get(err.errno or 0, str(err))
    if value == b"":
        return "EOF"
    return repr(value)


def handle(line: str) -> str | None:
    """The reply to one line, or None for a line that is not a command (it gets no reply)."""
    words = line.split()
    if words == ["PING"]:
        return f"PONG {os.getpid()}"
    if len(words) != 2 or words[0] not in ("TOUCH", "CLOSE", "SHUTWR") or not words[1].isdigit():
        return None
    fd = int(words[1])
    sock = leaked.get(fd)
    if sock is None:
        return f"ERR no leaked fd {fd}"
    if words[0] == "TOUCH":
        sock.settimeout(2)
        recv = outcome(lambda: sock.recv(100))
        send = outcome(lambda: sock.send(b"late reply\n"))
        return f"TOUCH {fd} recv={recv} send={send}"
    if words[0] == "CLOSE":
        del leaked[fd]
        sock.close()
        return f"CLOSED {fd}"
    if words[0] == "SHUTWR":
        sock.shutdown(socket.SHUT_WR)
        return f"SHUTWR {fd}"
    return "ERR unreachable"


def serve(conn: socket.socket) -> None:
    data = conn.recv(4096)
    if not data:
        selector.unregister(conn)
        leaked[conn.fileno()] = conn  # the bug under study: EOF read, never closed
        print(f"LEAK {conn.fileno()}", flush=True)
        return
    buffer = buffers.get(conn.fileno(), b"") + data
    while b"\n" in buffer:
        line, buffer = buffer.split(b"\n", 1)
        reply = handle(line.decode(errors="replace"))
        if reply is None:
            continue
        print(reply, flush=True)
        conn.sendall(reply.encode() + b"\n")
    buffers[conn.fileno()] = buffer


def main() -> None:
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    server = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    if len(sys.argv) > 2:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[2].encode())
    server.bind((host, 0))
    server.listen()
    selector.register(server, selectors.EVENT_READ)
    print(server.getsockname()[1], flush=True)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is server:
                conn, _ = server.accept()
                buffers[conn.fileno()] = b""
                selector.register(conn, selectors.EVENT_READ)
            else:
                serve(sock)


if __name__ == "__main__":
    main()
