"""Shared pieces of the reap tests: the leaky child servers, and views of the TCP table (closewait and ss)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import closewait
from closewait.sources import netns
from tests.conftest import Spawn
from tests.util import wait_for

HERE = Path(__file__).parent
PY_SERVER = HERE / "leaky_server.py"
C_SERVER = HERE / "leaky_server.c"


class LeakyServer:
    """A running leaky server child: leak connections into CLOSE_WAIT, talk to it, look at its sockets.

    ``in_netns``: the child runs in a network namespace of its own (``ip netns exec``); clients are
    then opened inside that namespace (named by the child's /proc/PID/ns/net, so deleting its
    /run/netns name does not lose it), and its sockets are looked for there.
    """

    def __init__(self, proc: subprocess.Popen[str], host: str, *, in_netns: bool = False) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.pid = proc.pid
        self.host = host
        self.port = int(proc.stdout.readline())
        self.netns = netns.resolve(str(proc.pid)) if in_netns else None
        self.control = self.connect()

    def connect(self) -> socket.socket:
        with netns.entered(self.netns):  # a socket keeps the namespace it was opened in
            return socket.create_connection((self.host, self.port), timeout=10)

    def ask(self, line: str, conn: socket.socket | None = None) -> str:
        """Send one command line and return the reply line (on ``conn``, the control connection by default)."""
        sock = conn or self.control
        sock.sendall(line.encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(4096)
            assert chunk, f"server closed the connection instead of answering {line!r}"
            reply += chunk
        return reply.decode().strip()

    def ask_new_connection(self, line: str) -> str:
        with self.connect() as conn:
            return self.ask(line, conn)

    def close_wait(self) -> tuple[closewait.Finding, ...]:
        """This server's CLOSE_WAIT sockets, through sock_diag."""
        snapshot = closewait.scan(ports=[self.port], pids=[self.pid], backend="netlink", netns=self.netns)
        return tuple(f for f in snapshot.findings if f.socket.local.port == self.port)

    def leak(self, count: int) -> tuple[closewait.Finding, ...]:
        """Open ``count`` connections and close them; wait until the server has read EOF on each."""
        before = len(self.close_wait())
        for _ in range(count):
            client = self.connect()
            client.sendall(b"hello, then goodbye (not a command)")
            client.close()

        def settled() -> tuple[closewait.Finding, ...]:
            found = self.close_wait()
            eof_read = [f for f in found if f.socket.eof_read]
            return found if len(eof_read) >= before + count else ()

        return wait_for(settled, timeout=10)

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_python(
    spawn: Spawn, host: str = "127.0.0.1", device: str | None = None, *, netns_name: str | None = None
) -> LeakyServer:
    """The Python leaky server, in the network namespace ``netns_name`` (``ip netns add``) if given."""
    prefix = ["ip", "netns", "exec", netns_name] if netns_name is not None else []
    argv = [*prefix, sys.executable, str(PY_SERVER), host, *([device] if device else [])]
    return LeakyServer(spawn(argv=argv), host, in_netns=netns_name is not None)


def start_c(spawn: Spawn, binary: Path) -> LeakyServer:
    return LeakyServer(spawn(argv=[str(binary)]), "127.0.0.1")


def compile_c_server(directory: Path) -> Path | None:
    """Compile leaky_server.c with gcc or cc; None when no compiler is installed."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    binary = directory / "leaky_server"
    subprocess.run([compiler, "-O1", "-Wall", "-o", str(binary), str(C_SERVER)], check=True, timeout=60)
    return binary


def ss_lines(port: int, state: str) -> list[str]:
    """``ss -tnH state STATE`` lines for sockets with local port ``port`` (iproute2's own view)."""
    out = subprocess.run(
        ["ss", "-tnH", "state", state, f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


def run_cli(
    args: Sequence[str], *, user: str | None = None, preload: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m closewait ARGS`` (as ``user`` through setpriv, with an LD_PRELOAD library, when given)."""
    src = str(Path(closewait.__file__).resolve().parent.parent)
    command = [sys.executable, "-m", "closewait", *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *command]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": src, "COLUMNS": "200", "LANG": "C.UTF-8"}
    if preload is not None:
        env["LD_PRELOAD"] = str(preload)
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)
