"""Lab part "reproduce": the article's CLOSE_WAIT leak, made to happen on this kernel and observed.

Two experiments, run side by side (each on its own kernel-chosen port):

- ``reproduce``: the Python port of the article's server (``servers/leaky.py``).
- ``reproduce-c``: the article's C program itself (``servers/article_server.c``), built with the
  system C compiler into the lab's workdir; skipped, with the reason, when there is no compiler.

The scenario is the article's: a client connects, sends a line and is killed with SIGKILL (the
article's Ctrl+C on ``nc``). The kernel closes the dead client's socket, which sends FIN; the
server's ``recv()`` returns 0 and the server keeps looping without closing. closewait's own scanner
then shows the server's end in CLOSE_WAIT diagnosed ``eof-not-closed`` (the port's loop keeps
calling ``recv()``, so the FIN has been read and Recv-Q is 0), and the client's end in FIN_WAIT2
with no owner. That orphan lives until ``net.ipv4.tcp_fin_timeout`` (read from /proc/sys);
with ``ctx.full`` the experiment waits that long (bounded) and shows FIN_WAIT2 gone while
CLOSE_WAIT stays: only the server's close() can end it.

Pitfall: right after the FIN, Recv-Q is 1 (the FIN not yet read) and the diagnosis says
``not-reading``; the server reads it within its 1 s sleep, so the experiment waits for Recv-Q 0.

Entry point for the lab's runner: ``run(ctx) -> list[Experiment]``.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from closewait import diagnosis
from closewait.lab.model import Experiment, LabContext, Measurement, Status, Verdict, unfinished
from closewait.lab.servers import (
    ServerError,
    ServerProcess,
    build_article_server,
    find_compiler,
    run_parallel,
    start_leaky,
    stop_event,
)
from closewait.lab.servers.observe import (
    AFTER_FIN_STATES,
    CONNECTION_STATES,
    capturing,
    client_end,
    connection_experiment,
    connection_findings,
    lookup_end,
)
from closewait.model import Finding, TcpState
from closewait.scanning import scan
from closewait.sources.capture import Segment
from closewait.sources.sysctl import tcp_fin_timeout_s

log = logging.getLogger(__name__)

PART = "reproduce"

CLAIM = (
    "A server that never closes an accepted connection leaves it in CLOSE_WAIT once the client is "
    "gone (killed, like Ctrl+C on nc); the client's side stays in FIN_WAIT2 even though the client "
    "process is dead."
)

#: The client: connect, send one line, report its own port, then wait to be killed.
CLIENT = """
import socket, sys, time
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
conn.sendall(b"hello from the closewait lab\\n")
print(conn.getsockname()[1], flush=True)
time.sleep(120)
"""

#: How long to wait for the server's end to reach CLOSE_WAIT with the FIN read (its loop sleeps 1 s).
SETTLE_S = 5.0
#: Extra time past tcp_fin_timeout before ``--full`` gives up on FIN_WAIT2 disappearing (the kernel's
#: timer wheel rounds long timers up, and a scan on a host with many connections takes a while).
FULL_MARGIN_S = 25.0


@dataclass
class Observation:
    server: Finding | None
    client: Finding | None


def run(ctx: LabContext) -> list[Experiment]:
    """Both variants of the reproduction (Python port, then the C original)."""
    calls = [
        functools.partial(_guarded, "reproduce", "The article's leaking server (Python port)", _python, ctx),
        functools.partial(_guarded, "reproduce-c", "The article's leaking server (its C program)", _native, ctx),
    ]
    return run_parallel(ctx, calls, "lab-reproduce")


def _guarded(
    exp_id: str, title: str, body: Callable[[LabContext, str, str], Experiment], ctx: LabContext
) -> Experiment:
    """Run one experiment; anything that goes wrong becomes an ERROR result, never a traceback."""
    start = time.monotonic()
    try:
        return body(ctx, exp_id, title)
    except Exception as err:
        log.debug("experiment %s failed", exp_id, exc_info=True)
        return unfinished(exp_id, PART, title, CLAIM, err, start)


def _python(ctx: LabContext, exp_id: str, title: str) -> Experiment:
    server, port = start_leaky(ctx)
    return _observe(ctx, exp_id, title, server, port, "the Python port (servers/leaky.py)")


def _native(ctx: LabContext, exp_id: str, title: str) -> Experiment:
    compiler = find_compiler()
    if compiler is None:
        return Experiment(
            id=exp_id,
            part=PART,
            title=title,
            claim=CLAIM,
            observed="not run",
            verdict=None,
            measurements={},
            status=Status.SKIPPED,
            reason="no C compiler found (looked for cc, gcc, clang on PATH)",
        )
    binary = build_article_server(ctx, compiler)
    proc = ctx.spawn([str(binary), "0"])
    server = ServerProcess(ctx, proc, "article_server")
    port = _listening_port(server, timeout=10.0)
    return _observe(ctx, exp_id, title, server, port, f"the article's C program, built with {compiler}")


def _listening_port(server: ServerProcess, timeout: float) -> int:
    """The port a child listens on, found with closewait's scanner (its stdout is block-buffered)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerError(f"the article's server exited with status {server.proc.returncode} before listening")
        listeners = scan({TcpState.LISTEN}, pids=[server.pid]).findings
        if listeners:
            return listeners[0].socket.local.port
        time.sleep(0.02)
    raise ServerError(f"the article's server did not listen within {timeout:.0f} s")


def _look(port: int, client_port: int) -> Observation:
    """Both ends of the connection, by exact lookup: cheap enough to poll on a host with 200,000
    sockets, where a dump takes half a second. No owners (role unknown); see ``_look_with_owners``."""
    return Observation(lookup_end(port, client_port), lookup_end(client_port, port))


def _look_with_owners(port: int, client_port: int, server_pid: int, states: Collection[TcpState]) -> Observation:
    """Both ends, with who holds them, without walking every process on the host.

    The server's end: only the server's descriptors are walked (``pids``). The client's end: once
    the dead client's socket is in FIN_WAIT2 the kernel keeps it as a timewait socket, which has
    no inode, so no descriptor anywhere can refer to it and there is nothing to walk; only an end
    with an inode (not yet in FIN_WAIT2) needs the full walk.
    """
    plain = _look(port, client_port)
    owned = connection_findings(port, client_port, states=states, pids=[server_pid])
    server = next((f for f in owned if f.socket.local.port == port), plain.server)
    client = plain.client
    if client is not None and client.socket.inode != 0:
        client = client_end(connection_findings(port, client_port, states=states), port)
    return Observation(server, client)


def _leaked(obs: Observation) -> bool:
    return (
        obs.server is not None
        and obs.server.socket.state == TcpState.CLOSE_WAIT
        and obs.server.diagnosis is not None
        and obs.server.diagnosis.code == diagnosis.EOF_NOT_CLOSED
        and obs.client is not None
        and obs.client.socket.state == TcpState.FIN_WAIT2
    )


def _state_name(finding: Finding | None) -> str | None:
    return finding.socket.state.name if finding is not None else None


def _observe(ctx: LabContext, exp_id: str, title: str, server: ServerProcess, port: int, what: str) -> Experiment:
    start = time.monotonic()
    fin_timeout = tcp_fin_timeout_s()
    stop = stop_event(ctx)
    notes: list[str] = []
    with capturing(ctx, [port]) as cap:
        client_proc = ctx.spawn([sys.executable, "-c", CLIENT, str(port)])
        client = ServerProcess(ctx, client_proc, f"{exp_id}-client")
        line = client.wait_line(lambda text: text.isdigit(), 10.0)
        if line is None:
            raise ServerError("the client did not connect within 10 s")
        client_port = int(line)
        ctx.end(client_proc)  # SIGKILL, the article's Ctrl+C on nc
        killed_at = time.monotonic()

        obs = _look(port, client_port)
        while not _leaked(obs) and time.monotonic() - killed_at < SETTLE_S and not stop.wait(0.05):
            obs = _look(port, client_port)
        # Once more with owners (who holds each end) and, if it did not leak, every state.
        seen_at = time.monotonic()
        obs = _look_with_owners(port, client_port, server.pid, AFTER_FIN_STATES if _leaked(obs) else CONNECTION_STATES)

        fin_wait2_gone: bool | None = None
        close_wait_after_fin_timeout: bool | None = None
        fin_wait2_lasted_s: float | None = None
        fin_wait2_last_seen_s: float | None = None
        if ctx.full and _leaked(obs) and fin_timeout is not None:
            limit = killed_at + fin_timeout + FULL_MARGIN_S
            later = obs
            while later.client is not None and time.monotonic() < limit and not stop.wait(0.5):
                looked_at = time.monotonic()
                later = _look(port, client_port)
                if later.client is not None:
                    seen_at = looked_at
            fin_wait2_gone = later.client is None
            if fin_wait2_gone:
                fin_wait2_lasted_s = round(time.monotonic() - killed_at, 1)
                fin_wait2_last_seen_s = round(seen_at - killed_at, 1)
            close_wait_after_fin_timeout = later.server is not None and later.server.socket.state == TcpState.CLOSE_WAIT
        # Snapshot the evidence before the lab ends the server (its exit closes the socket).
        if cap.active:
            cap.sync()
        segments = cap.segments()
        server.stop()
    leaked = _leaked(obs)

    server_sock = obs.server.socket if obs.server else None
    owner_pids = sorted({p.pid for p in obs.server.processes}) if obs.server else []
    client_owned = bool(obs.client.owners) if obs.client else None
    measurements: dict[str, Measurement] = {
        "server_state": _state_name(obs.server),
        "client_state": _state_name(obs.client),
        "diagnosis": obs.server.diagnosis.code if obs.server and obs.server.diagnosis else None,
        "server_recv_q": server_sock.recv_q if server_sock else None,
        "server_owner_pids": owner_pids,
        "client_has_owner": client_owned,
        "fin_timeout_s": fin_timeout,
        "fin_wait2_gone": fin_wait2_gone,
        "close_wait_after_fin_timeout": close_wait_after_fin_timeout,
        "fin_wait2_lasted_s": fin_wait2_lasted_s,
        "fin_wait2_last_seen_s": fin_wait2_last_seen_s,
        # FIN from the killed client's end; no RST from either end (nothing was left unread).
        "fin_sent": _flag_seen(segments, client_port, "FIN") if cap.active else None,
        "rst_sent": (
            _flag_seen(segments, client_port, "RST") or _flag_seen(segments, port, "RST") if cap.active else None
        ),
        "packets": len(segments) if cap.active else None,
    }

    fin_phrase = f"net.ipv4.tcp_fin_timeout = {fin_timeout} s" if fin_timeout is not None else "tcp_fin_timeout"
    if leaked:
        observed = (
            f"With {what}: the server's end 127.0.0.1:{port} is in CLOSE_WAIT with Recv-Q "
            f"{server_sock.recv_q if server_sock else '?'} (diagnosis eof-not-closed: recv() returned 0 "
            f"and nobody closed), owned by pid {', '.join(map(str, owner_pids))}; the client's end "
            f"127.0.0.1:{client_port} is in FIN_WAIT2 with "
            f"{'no owner' if not client_owned else 'an owner'}, and the kernel keeps it until {fin_phrase}."
        )
        verdict = Verdict.HOLDS
        if ctx.full:
            if fin_wait2_gone and close_wait_after_fin_timeout:
                observed += (
                    f" Waited it out: FIN_WAIT2 was still there {fin_wait2_last_seen_s} s after the kill and "
                    f"gone at {fin_wait2_lasted_s} s; CLOSE_WAIT is still there, because only the server's "
                    "close() can end it."
                )
            else:
                verdict = Verdict.DOES_NOT_HOLD
                observed += (
                    f" Waited {fin_phrase} plus {FULL_MARGIN_S:.0f} s: FIN_WAIT2 "
                    f"{'gone' if fin_wait2_gone else 'still there'}, server end "
                    f"{'still in CLOSE_WAIT' if close_wait_after_fin_timeout else 'no longer in CLOSE_WAIT'}."
                )
        else:
            notes.append(f"Run with --full to wait out {fin_phrase} and see FIN_WAIT2 go while CLOSE_WAIT stays.")
    else:
        verdict = Verdict.DOES_NOT_HOLD
        observed = (
            f"With {what}: after {SETTLE_S:.0f} s the server's end was "
            f"{_describe(obs.server)} and the client's end {_describe(obs.client)}."
        )
    return connection_experiment(
        exp_id,
        PART,
        title,
        CLAIM,
        observed=observed,
        verdict=verdict,
        measurements=measurements,
        cap=cap,
        packets=segments,
        ports=(port, client_port),
        notes=notes,
        evidence="the kernel's socket states",
        started=start,
    )


def _describe(finding: Finding | None) -> str:
    if finding is None:
        return "gone from the TCP table"
    sock = finding.socket
    code = finding.diagnosis.code if finding.diagnosis else "-"
    return f"{sock.state.name} (Recv-Q {sock.recv_q}, diagnosis {code})"


def _flag_seen(segments: tuple[Segment, ...], src_port: int, flag: str) -> bool:
    """Whether a segment from ``src_port`` carried ``flag`` (FIN, RST, ...)."""
    return any(s.src.port == src_port and flag in s.flags for s in segments)
