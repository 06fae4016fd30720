"""A child process that makes CLOSE_WAIT sockets on demand, for the recorder's tests.

Run inside its own network namespace (``unshare -n``, loopback up), so a recorder that records only
that namespace sees nothing but what this process does: its counters can be checked exactly while
other tests run on the machine. Reads one JSON command a line on stdin, answers one JSON line.

Every pair is a loopback connection whose client end has sent FIN (``shutdown(SHUT_WR)``), so the
server end, held here, is in CLOSE_WAIT. Times are CLOCK_MONOTONIC nanoseconds (the clock of
``bpf_ktime_get_ns``): ``c0``/``c1`` bracket the client's shutdown() call, ``fin`` is a time by
which the server end was seen in CLOSE_WAIT (so the kernel's entry time is in [c0, fin]).
"""

from __future__ import annotations

import heapq
import json
import os
import socket
import struct
import sys
import time

TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8
SO_COOKIE = 57
SO_NETNS_COOKIE = 71


def now() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def wait_state(sock: socket.socket, wanted: int) -> int:
    """Poll until ``sock`` is in state ``wanted``; the time right after it was seen there."""
    deadline = time.monotonic() + 5
    while state(sock) != wanted:
        if time.monotonic() > deadline:
            raise RuntimeError(f"socket did not reach state {wanted}")
        time.sleep(0.0005)
    return now()


class Worker:
    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.address = self.listener.getsockname()
        self.pairs: dict[int, tuple[socket.socket, socket.socket]] = {}
        self.next_id = 0

    def pair(self, unread: bool = False) -> dict[str, int]:
        client = socket.create_connection(self.address)
        server, _ = self.listener.accept()
        if unread:
            client.sendall(b"unread")
        cookie = int.from_bytes(server.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
        c0 = now()
        client.shutdown(socket.SHUT_WR)
        c1 = now()
        fin = wait_state(server, TCP_CLOSE_WAIT)
        self.next_id += 1
        self.pairs[self.next_id] = (client, server)
        return {"id": self.next_id, "cookie": cookie, "c0": c0, "c1": c1, "fin": fin, "port": client.getsockname()[1]}

    def op_pairs(self, n: int, unread: bool = False) -> list[dict[str, int]]:
        return [self.pair(unread) for _ in range(n)]

    def op_open(self, n: int, modulus: int = 1, residue: int = 0) -> list[dict[str, int]]:
        """``n`` established pairs (no FIN yet) whose server end's cookie is ``residue`` modulo
        ``modulus``: pairs are made until that many qualify. The others are reset (SO_LINGER 0), so
        neither end passes through CLOSE_WAIT."""
        kept = []
        while len(kept) < n:
            client = socket.create_connection(self.address)
            server, _ = self.listener.accept()
            cookie = int.from_bytes(server.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
            if cookie % modulus != residue:
                server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                server.close()
                client.close()
                continue
            self.next_id += 1
            self.pairs[self.next_id] = (client, server)
            kept.append({"id": self.next_id, "cookie": cookie})
        return kept

    def op_fin(self, ids: list[int]) -> list[dict[str, int]]:
        """The client ends of these open pairs send FIN: their server ends enter CLOSE_WAIT, in this
        order. Times as ``pair``'s."""
        out = []
        for pair_id in ids:
            client, server = self.pairs[pair_id]
            c0 = now()
            client.shutdown(socket.SHUT_WR)
            c1 = now()
            out.append({"id": pair_id, "c0": c0, "c1": c1, "fin": wait_state(server, TCP_CLOSE_WAIT)})
        return out

    def op_close(self, ids: list[int]) -> list[dict[str, int]]:
        out = []
        for pair_id in ids:
            client, server = self.pairs.pop(pair_id)
            s0 = now()
            server.close()
            s1 = now()
            client.close()
            out.append({"id": pair_id, "s0": s0, "s1": s1})
        return out

    def op_rst(self, ids: list[int]) -> None:
        """The peer resets: the client end closes with SO_LINGER 0, an RST reaches the server end."""
        for pair_id in ids:
            client, server = self.pairs[pair_id]
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            wait_state(server, TCP_CLOSE)

    def op_stress(self, delays: list[float]) -> list[list[int]]:
        """One pair per delay; each server end is closed ``delay`` s after its FIN arrived.

        Returns per pair [dwell_low, dwell_high, cookie], the first two in ns: bounds on the kernel's
        dwell (close time minus CLOSE_WAIT entry time), from the brackets around shutdown() and
        close(): the entry is in [c0, fin], the close in [s0, s1], so dwell is in [s0 - fin, s1 - c0].
        """
        out: list[list[int]] = [[0, 0, 0] for _ in delays]
        pending: list[tuple[int, int, int, int]] = []  # (deadline, index, c0, fin)
        servers: dict[int, socket.socket] = {}
        cookies: dict[int, int] = {}

        def close(index: int, c0: int, fin: int) -> None:
            server = servers.pop(index)
            s0 = now()
            server.close()
            s1 = now()
            out[index] = [s0 - fin, s1 - c0, cookies.pop(index)]

        def close_due() -> None:
            while pending and pending[0][0] <= now():
                _, index, c0, fin = heapq.heappop(pending)
                close(index, c0, fin)

        for index, delay in enumerate(delays):
            client = socket.create_connection(self.address)
            server, _ = self.listener.accept()
            c0 = now()
            client.shutdown(socket.SHUT_WR)
            fin = wait_state(server, TCP_CLOSE_WAIT)
            client.close()
            servers[index] = server
            cookies[index] = int.from_bytes(server.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
            if delay == 0:
                close(index, c0, fin)
            else:
                heapq.heappush(pending, (fin + int(delay * 1e9), index, c0, fin))
            close_due()
        while pending:
            time.sleep(max(0, pending[0][0] - now()) / 1e9)
            close_due()
        return out

    def op_exit(self) -> None:
        os._exit(0)


def main() -> None:
    worker = Worker()
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    netns_cookie = int.from_bytes(probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    probe.close()
    print(json.dumps({"pid": os.getpid(), "netns_cookie": netns_cookie}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        result = getattr(worker, f"op_{op}")(**command)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
