"""A loopback fixture at "big host" scale for ``bench/bench_scan.py``: E established connection pairs,
C sockets in CLOSE_WAIT, and enough idle processes holding descriptors to mirror a real host.

What it builds (all on 127.0.0.0/8, nothing leaves the machine):

- **Workers**: Python processes (this file, ``--worker``), each listening on its own address
  ``127.100.W.1`` (port 0, the kernel picks it) and holding up to ~18,500 descriptors, because
  RLIMIT_NOFILE's hard limit here is 20,000 and cannot be raised. A worker connects its share of
  clients to its own listener and accepts them, so it holds both ends of each pair. Then it opens
  its share of the CLOSE_WAIT pairs and closes the client end: the kernel delivers the FIN at once
  on loopback, and the accepted end sits in CLOSE_WAIT for as long as the worker lives. The
  CLOSE_WAIT sockets are split in three so every diagnosis appears: read until EOF (Recv-Q 0,
  ``eof-not-closed``), never read (Recv-Q 1, ``not-reading``), and 100 bytes unread
  (``unread-data``).
- **Source addresses and ports**: clients bind explicit source ports 20000-20499 (below the
  ephemeral range 32768-60999) on many source addresses ``127.(110+W).X.Y``. So the fixture never
  consumes the ephemeral range that other programs on this shared machine rely on for port 0, and
  the kernel never searches a crowded port range for a free 4-tuple (which is quadratic).
- **Fillers**: ``sleep infinity`` processes holding a few pipes, /dev/null and Unix socket pairs
  each, until the host has about ``--procs`` processes and ``--fds`` descriptors in total (the
  reference host: ~380 processes, ~210,000 fds). ``sleep`` is tiny, so 300 of them cost little
  memory. Their count is computed from what the host already has when the fixture starts.

Teardown is by pid: SIGKILL each worker and filler, then reap it. Every child also gets
PR_SET_PDEATHSIG(SIGKILL), so even if this process is killed with SIGKILL the children die with
it; workers also exit when their stdin (a pipe from this process) reaches EOF. Sockets get
SO_LINGER(on, 0), so tearing down 200,000 sockets sends RSTs and leaves no TIME_WAIT or orphans.

Kernel memory: an idle TCP socket costs roughly 3-4 KiB of slab (tcp_sock, file, inode, dentry),
so 205,000 sockets take ~0.8 GiB; they hold no buffers, so ``net.ipv4.tcp_mem`` (counted in pages
of buffer memory) is not approached. ``check_host()`` reports free memory and refuses to start with
less than 2 GiB available.

Sysctls relied on: ``net.core.somaxconn`` (the accept backlog; workers connect in batches of at
most min(somaxconn, 1024) before accepting), ``net.ipv4.ip_local_port_range`` (source ports
20000-20499 must lie outside it so port-0 users elsewhere are unaffected), ``tcp_max_orphans``
(only relevant while CLOSE_WAIT peers sit in FIN_WAIT_2; 5,000 is far below it). None is changed.

Usage::

    python bench/scan_fixture.py --established 20000 --close-wait 1000   # holds until Ctrl+C
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

#: Descriptors a worker may hold (hard limit 20,000, minus headroom for the interpreter).
WORKER_FDS = 18_500
SOURCE_PORT_FIRST = 20_000
SOURCE_PORTS = 500
#: Clients connected before the worker accepts them (kept under somaxconn).
BATCH = 1024
READY_TIMEOUT_S = 180.0
PR_SET_PDEATHSIG = 1
LINGER_RST = struct.pack("ii", 1, 0)
UNREAD_BYTES = 100


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the fixture process dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _read_sysctl(name: str) -> str:
    with open("/proc/sys/" + name.replace(".", "/")) as handle:
        return handle.read().strip()


@dataclass(frozen=True)
class HostCounts:
    """Processes and open descriptors on the host right now (thread-group leaders only)."""

    processes: int
    fds: int


def host_counts() -> HostCounts:
    procs = fds = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        procs += 1
        with contextlib.suppress(OSError):
            fds += len(os.listdir(f"/proc/{name}/fd"))
    return HostCounts(procs, fds)


def check_host(established: int, close_wait: int) -> list[str]:
    """Facts about the host the fixture relies on; raises SystemExit if one is not met."""
    notes: list[str] = []
    low, high = (int(x) for x in _read_sysctl("net.ipv4.ip_local_port_range").split())
    if low <= SOURCE_PORT_FIRST + SOURCE_PORTS and high >= SOURCE_PORT_FIRST:
        raise SystemExit(
            f"net.ipv4.ip_local_port_range {low}-{high} overlaps the fixture's source ports "
            f"{SOURCE_PORT_FIRST}-{SOURCE_PORT_FIRST + SOURCE_PORTS - 1}"
        )
    notes.append(f"ip_local_port_range {low}-{high} (fixture ports {SOURCE_PORT_FIRST}+ are outside it)")
    somaxconn = int(_read_sysctl("net.core.somaxconn"))
    notes.append(f"somaxconn {somaxconn}")
    orphans = int(_read_sysctl("net.ipv4.tcp_max_orphans"))
    if close_wait > orphans // 2:
        raise SystemExit(f"--close-wait {close_wait} is too close to net.ipv4.tcp_max_orphans {orphans}")
    notes.append(f"tcp_max_orphans {orphans}")
    notes.append(f"tcp_mem {_read_sysctl('net.ipv4.tcp_mem')} (pages)")
    available_kib = 0
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                available_kib = int(line.split()[1])
    need_kib = (2 * established + close_wait) * 4 + 2 * 1024 * 1024
    if available_kib < need_kib:
        raise SystemExit(f"only {available_kib // 1024} MiB available; the fixture needs ~{need_kib // 1024} MiB")
    notes.append(f"MemAvailable {available_kib // 1024} MiB")
    return notes


# ---------------------------------------------------------------------------------------------
# Worker side


def _client_socket(worker: int, index: int) -> socket.socket:
    """A client socket bound to a unique (source address, port) outside the ephemeral range."""
    addr_index, port_index = divmod(index, SOURCE_PORTS)
    address = f"127.{110 + worker}.{addr_index // 250}.{1 + addr_index % 250}"
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    for attempt in range(SOURCE_PORTS):
        port = SOURCE_PORT_FIRST + (port_index + attempt) % SOURCE_PORTS
        try:
            client.bind((address, port))
            return client
        except OSError:  # someone else holds that port on a wildcard address
            continue
    client.close()
    raise OSError(f"no free source port on {address}")


def run_worker(worker: int, pairs: int, close_wait: int) -> None:
    """Build this worker's share, print "ready", then hold everything until stdin closes."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((f"127.100.{worker}.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]
    batch = min(BATCH, int(_read_sysctl("net.core.somaxconn")))
    held: list[socket.socket] = []
    index = 0

    def connect_batch(count: int) -> list[tuple[socket.socket, socket.socket]]:
        nonlocal index
        clients = []
        for _ in range(count):
            client = _client_socket(worker, index)
            index += 1
            client.connect(listener.getsockname())
            clients.append(client)
        accepted = [listener.accept()[0] for _ in clients]
        # accept() order matches connect() order on one listener: the backlog is a FIFO.
        return list(zip(clients, accepted, strict=True))

    remaining = pairs
    while remaining:
        n = min(batch, remaining)
        for client, server in connect_batch(n):
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            held += (client, server)
        remaining -= n
    remaining = close_wait
    made = 0
    while remaining:
        n = min(batch, remaining)
        for client, server in connect_batch(n):
            kind = made % 3
            if kind == 2:
                client.sendall(b"x" * UNREAD_BYTES)
            client.close()  # FIN: the server end goes to CLOSE_WAIT
            if kind == 0:
                server.settimeout(5.0)
                while server.recv(4096):  # read to EOF, then never close: eof-not-closed
                    pass
                server.settimeout(None)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            held.append(server)
            made += 1
        remaining -= n
    print(f"ready {os.getpid()} {port} {len(held)}", flush=True)
    sys.stdin.read()  # EOF when the fixture goes away
    for sock in held:
        sock.close()


# ---------------------------------------------------------------------------------------------
# Fixture side


@dataclass
class Fixture:
    """The running fixture: its children by pid and what it holds."""

    established: int
    close_wait: int
    procs_target: int
    fds_target: int
    workers: list[subprocess.Popen[str]] = field(default_factory=list)
    fillers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    listen_ports: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    setup_s: float = 0.0
    host_before: HostCounts | None = None
    host_after: HostCounts | None = None

    def start(self) -> None:
        started = time.monotonic()
        self.notes = check_host(self.established, self.close_wait)
        self.host_before = host_counts()
        self._start_workers()
        self._start_fillers()
        self.host_after = host_counts()
        self.setup_s = time.monotonic() - started

    def _start_workers(self) -> None:
        total_fds = 2 * self.established + self.close_wait
        n_workers = max(1, math.ceil(total_fds / WORKER_FDS))
        pairs = _split(self.established, n_workers)
        waits = _split(self.close_wait, n_workers)
        for w in range(n_workers):
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", str(w), str(pairs[w]), str(waits[w])],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads here)
            )
            self.workers.append(proc)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for proc in self.workers:
            assert proc.stdout is not None
            line = _readline_until(proc, deadline)
            parts = line.split()
            if len(parts) != 4 or parts[0] != "ready":
                raise RuntimeError(f"worker {proc.pid} did not get ready: {line!r}")
            self.listen_ports.append(int(parts[2]))

    def _start_fillers(self) -> None:
        """Idle processes holding descriptors until the host has ~procs_target processes and ~fds_target fds."""
        now = host_counts()
        n_fillers = max(0, self.procs_target - now.processes)
        fds_needed = max(0, self.fds_target - now.fds)
        if n_fillers == 0:
            return
        per_filler = max(0, min(WORKER_FDS, fds_needed // n_fillers))
        opened: list[int] = []
        try:
            while len(opened) < per_filler:
                kind = len(opened) % 3
                if kind == 0:
                    opened.append(os.open("/dev/null", os.O_RDONLY))
                elif kind == 1:
                    opened.extend(os.pipe())
                else:
                    a, b = socket.socketpair()
                    opened += (a.detach(), b.detach())
            passed = opened[:per_filler]
            for _ in range(n_fillers):
                self.fillers.append(
                    subprocess.Popen(
                        ["sleep", "infinity"],
                        stdin=subprocess.DEVNULL,
                        pass_fds=passed,
                        preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads here)
                    )
                )
        finally:
            for fd in opened:
                os.close(fd)
        self.notes.append(f"{n_fillers} filler processes holding {per_filler} fds each")

    def pids(self) -> list[int]:
        return [p.pid for p in self.workers] + [p.pid for p in self.fillers]

    def stop(self) -> None:
        """SIGKILL every child by pid and reap it."""
        for proc in [*self.workers, *self.fillers]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        for proc in [*self.workers, *self.fillers]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self.workers.clear()
        self.fillers.clear()

    def describe(self) -> str:
        before = self.host_before or HostCounts(0, 0)
        after = self.host_after or HostCounts(0, 0)
        return (
            f"{2 * self.established} established sockets ({self.established} pairs), {self.close_wait} CLOSE_WAIT, "
            f"{len(self.workers)} workers + {len(self.fillers)} fillers; host {before.processes} -> "
            f"{after.processes} processes, {before.fds} -> {after.fds} fds; set up in {self.setup_s:.1f} s"
        )


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _readline_until(proc: subprocess.Popen[str], deadline: float) -> str:
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                return proc.stdout.readline()
            if proc.poll() is not None:
                raise RuntimeError(f"worker {proc.pid} exited with {proc.returncode} before it was ready")
    raise RuntimeError(f"worker {proc.pid} not ready within {READY_TIMEOUT_S:.0f} s")


@contextlib.contextmanager
def running(
    established: int, close_wait: int, *, procs: int = 380, fds: int = 210_000, log: bool = True
) -> Iterator[Fixture]:
    """The fixture, torn down by pid on exit, Ctrl+C or an exception."""
    fixture = Fixture(established, close_wait, procs, fds)
    try:
        fixture.start()
        if log:
            print(f"fixture ready: {fixture.describe()}", file=sys.stderr, flush=True)
        yield fixture
    finally:
        fixture.stop()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """Ctrl+C and SIGTERM both unwind through ``running()``'s teardown (a background job starts with
    SIGINT ignored, so the handler is set explicitly)."""
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--established", type=int, default=100_000, help="established pairs (x2 sockets)")
    parser.add_argument("--close-wait", type=int, default=5_000)
    parser.add_argument("--procs", type=int, default=380, help="processes on the host to reach with fillers")
    parser.add_argument("--fds", type=int, default=210_000, help="open descriptors on the host to reach")
    parser.add_argument("--worker", nargs=3, type=int, metavar=("INDEX", "PAIRS", "CLOSE_WAIT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(*args.worker)
        return 0
    if args.established < 0 or args.close_wait < 0:
        parser.error("counts must be >= 0")
    install_signal_handlers()
    try:
        with running(args.established, args.close_wait, procs=args.procs, fds=args.fds) as fixture:
            for note in fixture.notes:
                print(f"  {note}", file=sys.stderr)
            print(f"listening ports: {' '.join(map(str, fixture.listen_ports))}", flush=True)
            print("holding; Ctrl+C to tear down", file=sys.stderr, flush=True)
            signal.pause()
    except KeyboardInterrupt:
        print("torn down", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
