"""The article's five ways out of CLOSE_WAIT, plus SO_KEEPALIVE, as real servers (lab child processes).

Run as ``python remedy.py STRATEGY [options]``. Every strategy serves any number of clients on
127.0.0.1 (port 0), and reports what it does as JSON lines on stdout, with ``time.monotonic()``
stamps (CLOCK_MONOTONIC is one clock for every process on the machine, so the lab can subtract its
own stamp of the client's ``close()`` from the server's stamp of its ``close()``)::

    {"ev": "listening", "port": 41234}
    {"ev": "accepted", "peer": 51000, "fd": 5, "inode": 123456, "t": 1234.5}
    {"ev": "saw", "peer": 51000, "what": "eof", "t": 1234.6}        # what the application saw
    {"ev": "closed", "peer": 51000, "t": 1234.6}                    # right after close(fd)

Strategies (the article's numbering):

1. ``idle-timeout``: a selectors loop that reads and stamps activity in closewait's timing wheel
   (``closewait.guard.wheel.TimingWheel``, the same piece the guard uses, not a copy) but ignores
   EOF, the bug it guards against; the wheel's reaper closes whatever has been idle for
   ``--idle-timeout`` seconds.
2. ``send-sigpipe``: reads the request once, then only sends: a heartbeat every ``--heartbeat``
   seconds, the first one period after the request. After the peer
   closed, the first send succeeds and the peer answers RST; the next raises EPIPE (Python ignores
   SIGPIPE; ``--sigpipe-default`` restores the C default, and the process dies of SIGPIPE). The fd
   still has to be closed; ``--close-on-sigusr1`` keeps a failed socket open until the process gets
   SIGUSR1, so the lab can show it already gone from the TCP table while the fd is still held.
3. ``read-close``: a thread per connection, blocking ``recv()`` until it returns 0, then close.
4. ``multiplex-read-close``: one selectors (epoll) loop; readable -> ``recv()`` == 0 -> close.
5. ``nonblocking-read-close``: one thread polls every connection with non-blocking ``recv()``
   every ``--poll`` seconds: EAGAIN means "nothing yet", 0 means close.
6. ``keepalive``: SO_KEEPALIVE with short TCP_KEEPIDLE/INTVL/CNT and nothing else: it never reads
   and never closes, so only the kernel can end the connection.

Pitfall kept in mind: Python closes a socket when its object is garbage-collected, so servers that
must not close (keepalive, and send-sigpipe until it decides to) keep a reference to each one.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
from typing import Any

_emit_lock = threading.Lock()


def emit(ev: str, **fields: Any) -> None:
    line = json.dumps({"ev": ev, **fields})
    with _emit_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def now() -> float:
    return time.monotonic()


def peer_port(conn: socket.socket) -> int:
    return int(conn.getpeername()[1])


def announce(conn: socket.socket, peer: int) -> None:
    emit("accepted", peer=peer, fd=conn.fileno(), inode=os.fstat(conn.fileno()).st_ino, t=now())


def accept_watched(
    listener: socket.socket, sel: selectors.BaseSelector, peers: dict[socket.socket, int]
) -> socket.socket:
    """Accept one connection into a selectors loop: non-blocking, announced, in ``peers``, watched for reads."""
    conn, addr = listener.accept()
    conn.setblocking(False)
    peers[conn] = addr[1]
    announce(conn, addr[1])
    sel.register(conn, selectors.EVENT_READ)
    return conn


def close_and_report(conn: socket.socket, peer: int) -> None:
    conn.close()
    emit("closed", peer=peer, t=now())


def listen() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    emit("listening", port=listener.getsockname()[1], pid=os.getpid())
    return listener


# -- 3. blocking read + close ---------------------------------------------------------------------
def serve_read_close(listener: socket.socket, args: argparse.Namespace) -> None:
    def handle(conn: socket.socket, peer: int) -> None:
        what = "eof"
        try:
            while conn.recv(4096):
                pass
        except ConnectionResetError:
            what = "reset"
        emit("saw", peer=peer, what=what, t=now())
        close_and_report(conn, peer)

    while True:
        conn, addr = listener.accept()
        announce(conn, addr[1])
        threading.Thread(target=handle, args=(conn, addr[1]), daemon=True).start()


# -- 4. multiplexing + read + close ---------------------------------------------------------------
def serve_multiplex(listener: socket.socket, args: argparse.Namespace) -> None:
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    peers: dict[socket.socket, int] = {}
    emit("selector", kind=type(sel).__name__)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                accept_watched(listener, sel, peers)
                continue
            try:
                data = sock.recv(4096)
                what = "eof"
            except ConnectionResetError:
                data, what = b"", "reset"
            if data:
                continue
            sel.unregister(sock)
            peer = peers.pop(sock)
            emit("saw", peer=peer, what=what, t=now())
            close_and_report(sock, peer)


# -- 5. non-blocking read + close -----------------------------------------------------------------
def serve_nonblocking(listener: socket.socket, args: argparse.Namespace) -> None:
    lock = threading.Lock()
    conns: dict[socket.socket, list[int]] = {}  # conn -> [peer, EAGAIN count]

    def poll_forever() -> None:
        while True:
            with lock:
                current = list(conns.items())
            for conn, state in current:
                what = None
                try:
                    while conn.recv(4096):
                        pass
                    what = "eof"
                except BlockingIOError:  # EAGAIN / EWOULDBLOCK: no data yet, not an end
                    state[1] += 1
                except ConnectionResetError:
                    what = "reset"
                if what is not None:
                    with lock:
                        del conns[conn]
                    emit("saw", peer=state[0], what=what, t=now(), eagain=state[1])
                    close_and_report(conn, state[0])
            time.sleep(args.poll)

    threading.Thread(target=poll_forever, daemon=True).start()
    while True:
        conn, addr = listener.accept()
        conn.setblocking(False)
        announce(conn, addr[1])
        with lock:
            conns[conn] = [addr[1], 0]


# -- 1. idle timeout (closewait's timing wheel) ---------------------------------------------------
def serve_idle_timeout(listener: socket.socket, args: argparse.Namespace) -> None:
    # The guard's wheel itself, not a copy (issue 3: the lab's remedies use these pieces).
    from closewait.guard.wheel import TimingWheel

    wheel: TimingWheel[socket.socket] = TimingWheel(args.idle_timeout)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    peers: dict[socket.socket, int] = {}
    watching: set[socket.socket] = set()
    emit("wheel", timeout=wheel.timeout, tick=wheel.tick)
    while True:
        deadline = wheel.next_deadline()
        wait = None if deadline is None else max(0.0, deadline - now())
        for key, _ in sel.select(wait):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                conn = accept_watched(listener, sel, peers)
                watching.add(conn)
                wheel.add(conn)
                continue
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            if data:
                wheel.touch(sock)
            else:
                # The bug the reaper guards against: EOF is not handled, the socket is just no
                # longer watched (level-triggered readiness would otherwise spin on it).
                sel.unregister(sock)
                watching.discard(sock)
        for conn in wheel.expired():
            if conn in watching:
                sel.unregister(conn)
                watching.discard(conn)
            peer = peers.pop(conn)
            emit("saw", peer=peer, what="idle-timeout", t=now())
            close_and_report(conn, peer)


# -- 2. send + SIGPIPE + close --------------------------------------------------------------------
def serve_send_sigpipe(listener: socket.socket, args: argparse.Namespace) -> None:
    if args.sigpipe_default:
        # What a C program gets by default: the EPIPE send raises SIGPIPE, which kills the process.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    lock = threading.Lock()
    # conn -> [peer, sends that succeeded, monotonic time of the last that succeeded, next send due]
    conns: dict[socket.socket, list[Any]] = {}
    # conn -> peer: the send failed, the fd is still open
    dead: dict[socket.socket, int] = {}
    release = threading.Event()
    if args.close_on_sigusr1:
        signal.signal(signal.SIGUSR1, lambda sig, frame: release.set())
    else:
        release.set()

    def read_request(conn: socket.socket, peer: int) -> None:
        # The request is read once; after that the server only sends. Heartbeats start one period
        # later, so none can reach a client before it has sent its line and closed (data it never
        # read would turn the client's FIN into an RST and change the scenario).
        with contextlib.suppress(OSError):
            conn.recv(4096)
        with lock:
            conns[conn] = [peer, 0, None, now() + args.heartbeat]

    def heartbeat_forever() -> None:
        while True:
            time.sleep(args.heartbeat / 5)
            with lock:
                current = list(conns.items())
            for conn, state in current:
                if now() < state[3]:
                    continue
                state[3] += args.heartbeat
                try:
                    conn.send(b"ping\n")
                    state[1] += 1
                    state[2] = now()
                except OSError as err:
                    what = {errno.EPIPE: "epipe", errno.ECONNRESET: "reset"}.get(err.errno or 0, "error")
                    emit(
                        "saw",
                        peer=state[0],
                        what=what,
                        errno=errno.errorcode.get(err.errno or 0, str(err.errno)),
                        t=now(),
                        sends_ok=state[1],
                        last_ok_send_t=state[2],
                    )
                    with lock:
                        del conns[conn]
                        dead[conn] = state[0]
            if release.is_set():
                for conn, peer in list(dead.items()):
                    del dead[conn]
                    close_and_report(conn, peer)

    threading.Thread(target=heartbeat_forever, daemon=True).start()
    while True:
        conn, addr = listener.accept()
        announce(conn, addr[1])
        threading.Thread(target=read_request, args=(conn, addr[1]), daemon=True).start()


# -- SO_KEEPALIVE alone ---------------------------------------------------------------------------
def serve_keepalive(listener: socket.socket, args: argparse.Namespace) -> None:
    kept: list[socket.socket] = []  # never read, never closed: only the kernel may end these
    while True:
        conn, addr = listener.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, args.keepidle)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, args.keepintvl)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, args.keepcnt)
        kept.append(conn)
        announce(conn, addr[1])


#: Strategy name (the argument, and the remedy's experiment id) -> its server loop.
SERVERS = {
    "idle-timeout": serve_idle_timeout,
    "send-sigpipe": serve_send_sigpipe,
    "read-close": serve_read_close,
    "multiplex-read-close": serve_multiplex,
    "nonblocking-read-close": serve_nonblocking,
    "keepalive": serve_keepalive,
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="closewait lab remedy server")
    parser.add_argument("strategy", choices=list(SERVERS))
    parser.add_argument("--idle-timeout", type=float, default=1.0)
    parser.add_argument("--heartbeat", type=float, default=0.1)
    parser.add_argument("--close-on-sigusr1", action="store_true")
    parser.add_argument("--sigpipe-default", action="store_true")
    parser.add_argument("--poll", type=float, default=0.01)
    parser.add_argument("--keepidle", type=int, default=1)
    parser.add_argument("--keepintvl", type=int, default=1)
    parser.add_argument("--keepcnt", type=int, default=2)
    args = parser.parse_args(argv)
    if args.strategy == "idle-timeout":
        # Import before listening: a client must not wait in the accept queue while it loads,
        # or the measured time would include the import.
        import closewait.guard.wheel  # noqa: F401
    listener = listen()
    try:
        SERVERS[args.strategy](listener, args)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
