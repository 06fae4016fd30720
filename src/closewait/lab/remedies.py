"""Lab part "remedies": the article's five ways out of CLOSE_WAIT (plus SO_KEEPALIVE), each proved on this kernel.

Every remedy is a real server in a child process (``servers/remedy.py``), under the same client
scenario, ``ctx.trials`` times: the client connects, sends a line, closes. Per remedy it measures:

- ``close_wait_ms`` / ``close_wait_ms_max``: median and max milliseconds from the client's
  ``close()`` to the server's ``close()``. Both stamps are ``time.monotonic()`` (CLOCK_MONOTONIC,
  one clock for all processes): the lab's taken right before the client's close, the server's right
  after its close, reported on its stdout.
- ``fd_released``: the server's ``/proc/PID/fd`` no longer refers to the socket's inode (every trial).
- ``left_tcp_table``: the server's end is gone from the kernel's TCP table (closewait's scanner).
- ``app_saw``: what the application saw: ``eof``, ``epipe``, ``reset``, ``sigpipe``, ``idle-timeout``.
- ``caveat``: what the remedy does not cover, demonstrated where it can be.

send-sigpipe runs three extra trials: a peer that only half-closes (``shutdown(SHUT_WR)``) is never
detected; between EPIPE and close() the socket has already left the TCP table while the fd is
still held (close() is still needed); with SIGPIPE at its C default the EPIPE send kills the server.

keepalive cannot finish inside the default budget: its CLOSE_WAIT ends only when the peer's orphaned
FIN_WAIT2 expires (``net.ipv4.tcp_fin_timeout``, 60 s by default): until then the peer's kernel
answers every probe with an ACK. The default run shows the probes answered, the state still
CLOSE_WAIT and the fd held; ``ctx.full`` waits it out (bounded) and shows the state gone and the fd
still leaked.

Entry point for the lab's runner: ``run(ctx) -> list[Experiment]`` returns the six remedy
experiments followed by the churn run (``closewait.lab.churn``, id ``churn``, part ``remedies``):
the runner calls this ``run`` only, not ``churn.run`` as well.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from closewait.display import format_latency
from closewait.lab import churn
from closewait.lab.model import Experiment, LabContext, Measurement, Verdict, unfinished
from closewait.lab.servers import (
    HEARTBEAT_S,
    IDLE_TIMEOUT_S,
    KEEPCNT,
    KEEPIDLE_S,
    KEEPINTVL_S,
    ServerError,
    ServerProcess,
    run_parallel,
    start_remedy,
    stop_event,
)
from closewait.lab.servers.observe import (
    capturing,
    connection_experiment,
    held_inodes,
    lookup_end,
    median,
)
from closewait.model import Finding, TcpState
from closewait.sources.capture import Segment
from closewait.sources.sysctl import tcp_fin_timeout_s

log = logging.getLogger(__name__)

PART = "remedies"
LINE = b"hello from the closewait lab\n"

#: Seconds a trial waits for the server's close before calling it missing.
CLOSE_DEADLINE_S = 3.0
#: Stagger between the starts of a remedy's trials (they run concurrently, on separate connections).
STAGGER_S = 0.02
FULL_MARGIN_S = 25.0


@dataclass(frozen=True)
class Remedy:
    id: str
    title: str
    claim: str
    caveat: str
    close_deadline_s: float = CLOSE_DEADLINE_S


REMEDIES: tuple[Remedy, ...] = (
    Remedy(
        "idle-timeout",
        "1. Close connections idle too long (timing-wheel reaper)",
        "A reaper that closes connections idle for longer than a timeout ends CLOSE_WAIT even when "
        "the application ignores EOF.",
        "It bounds the leak, it does not notice the close: each dead connection stays in CLOSE_WAIT "
        "for up to the idle timeout (plus one wheel tick), and a timeout short enough to matter also "
        "cuts legitimately quiet clients.",
        close_deadline_s=IDLE_TIMEOUT_S + CLOSE_DEADLINE_S,
    ),
    Remedy(
        "send-sigpipe",
        "2. send() + SIGPIPE + close()",
        "Sending to a peer that closed makes the socket fail (SIGPIPE/EPIPE); the server then has to "
        "close the fd itself.",
        "The first send after the peer closed succeeds and the peer answers RST; only the next send "
        "fails with EPIPE (SIGPIPE, fatal by default in C). The fd still needs close(): the socket is "
        "already out of the TCP table while the fd leaks. A peer that only half-closed "
        "(shutdown(SHUT_WR)) acknowledges every send and is never detected. Detection takes one to "
        "two send periods.",
    ),
    Remedy(
        "read-close",
        "3. Blocking read() == 0, then close()",
        "A blocking read() returns 0 when the peer has closed; closing then ends CLOSE_WAIT at once.",
        "Someone must be blocked in read() on every connection (a thread each); a connection no code "
        "is reading is never noticed.",
    ),
    Remedy(
        "multiplex-read-close",
        "4. Multiplexing (epoll/selectors) + read() == 0 + close()",
        "After the client closes, the server's socket becomes readable; read() returns 0 and the server closes.",
        "Every connection must stay registered for reading; an unregistered one (or an edge-triggered "
        "one not read to EAGAIN) leaks exactly like the article's server.",
    ),
    Remedy(
        "nonblocking-read-close",
        "5. Polled non-blocking read() + close()",
        "A non-blocking read() returns EAGAIN while there is no data and 0 when the peer has closed; "
        "closing on 0 ends CLOSE_WAIT.",
        "The close is noticed only at the next poll (latency up to the poll interval), and every poll "
        "costs one read() per connection, nearly all of them EAGAIN.",
    ),
    Remedy(
        "keepalive",
        "SO_KEEPALIVE alone",
        "SO_KEEPALIVE on the server's socket ends a CLOSE_WAIT connection whose peer is gone.",
        "Keepalive probes to a peer in FIN_WAIT2 are answered with ACKs, so nothing ends until the "
        "peer's orphaned FIN_WAIT2 expires (net.ipv4.tcp_fin_timeout); then a probe gets RST and the "
        "socket leaves the TCP table, but the application never learns it and the fd still leaks.",
    ),
)


@dataclass
class Trial:
    """One client connection against a remedy server."""

    client_port: int
    closed_at: float
    inode: int
    close_wait_ms: float | None = None
    fd_released: bool | None = None
    left_tcp_table: bool | None = None
    app_saw: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def run(ctx: LabContext) -> list[Experiment]:
    """The six remedy experiments (run in parallel, each on its own server), then the churn run."""
    fin_timeout = tcp_fin_timeout_s()
    calls = [functools.partial(_guarded, remedy, ctx, fin_timeout) for remedy in REMEDIES]
    results = run_parallel(ctx, calls, "lab-remedy")
    results.extend(churn.run(ctx))
    return results


def _guarded(remedy: Remedy, ctx: LabContext, fin_timeout: int | None) -> Experiment:
    """One remedy; whatever goes wrong becomes an ERROR result with one line, never a traceback."""
    start = time.monotonic()
    try:
        if remedy.id == "keepalive":
            return _keepalive(ctx, remedy, fin_timeout)
        return _prompt_remedy(ctx, remedy)
    except Exception as err:
        log.debug("remedy %s failed", remedy.id, exc_info=True)
        return unfinished(remedy.id, PART, remedy.title, remedy.claim, err, start)


# -- the client scenario ----------------------------------------------------------------------------


def _connect_and_send(server: ServerProcess, port: int) -> tuple[socket.socket, int, int]:
    """Connect, send the line, wait until the server reports the connection: (socket, port, inode)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        client_port = int(conn.getsockname()[1])
        conn.sendall(LINE)
        accepted = server.wait_event(5.0, ev="accepted", peer=client_port)
        if accepted is None:
            raise ServerError(f"the {server.name} server did not report accepting a connection within 5 s")
    except BaseException:
        conn.close()
        raise
    return conn, client_port, int(accepted["inode"])


def _send_and_close(server: ServerProcess, port: int) -> tuple[int, float, int]:
    """The scenario: connect, send a line, close at once. (client port, monotonic close time, server inode).

    The client does not wait for the server before closing: the clock starts at the client's close
    whatever the server is doing (a connection still in the accept queue is in CLOSE_WAIT too), and
    no heartbeat can reach the client first (unread data would turn its FIN into an RST).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        client_port = int(conn.getsockname()[1])
        conn.sendall(LINE)
        closed_at = time.monotonic()
    accepted = server.wait_event(5.0, ev="accepted", peer=client_port)
    if accepted is None:
        raise ServerError(f"the {server.name} server did not report accepting a connection within 5 s")
    return client_port, closed_at, int(accepted["inode"])


def _left_table(port: int, client_port: int, timeout: float = 2.0) -> bool:
    """Whether the server's end of the connection leaves the TCP table within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if lookup_end(port, client_port) is None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _trial(server: ServerProcess, port: int, deadline_s: float) -> Trial:
    """Connect, send a line, close; then what the server did about it and what the kernel shows."""
    client_port, closed_at, inode = _send_and_close(server, port)
    trial = Trial(client_port, closed_at, inode)
    closed = server.wait_event(deadline_s, ev="closed", peer=client_port)
    saw = server.wait_event(0.5, ev="saw", peer=client_port)
    if saw is not None:
        trial.app_saw = str(saw["what"])
        trial.extra = {k: v for k, v in saw.items() if k not in ("ev", "peer", "what")}
    if closed is not None:
        trial.close_wait_ms = (float(closed["t"]) - closed_at) * 1000.0
    trial.fd_released = inode not in held_inodes(server.pid)
    trial.left_tcp_table = _left_table(port, client_port, timeout=2.0 if closed is not None else 0.0)
    return trial


def _run_trials(ctx: LabContext, server: ServerProcess, port: int, deadline_s: float) -> list[Trial]:
    """``ctx.trials`` trials, concurrently (staggered), each on its own connection."""

    def staggered(index: int) -> Trial:
        time.sleep(index * STAGGER_S)
        return _trial(server, port, deadline_s)

    count = max(1, ctx.trials)
    with ThreadPoolExecutor(max_workers=count, thread_name_prefix=f"lab-{server.name}") as pool:
        return list(pool.map(staggered, range(count)))


# -- remedies that close ----------------------------------------------------------------------------


def _prompt_remedy(ctx: LabContext, remedy: Remedy) -> Experiment:
    start = time.monotonic()
    server, port = start_remedy(ctx, remedy.id)
    try:
        with capturing(ctx, [port]) as cap:
            trials = _run_trials(ctx, server, port, remedy.close_deadline_s)
            extra: dict[str, Measurement] = {}
            notes: list[str] = []
            if remedy.id == "send-sigpipe":
                extra, notes = _send_sigpipe_demos(ctx, server, port)
            if cap.active:
                cap.sync()
            segments = cap.segments()
    finally:
        server.stop()

    closed = [t for t in trials if t.close_wait_ms is not None]
    waits = [t.close_wait_ms for t in closed if t.close_wait_ms is not None]
    fd_released = all(t.fd_released for t in trials)
    left = all(t.left_tcp_table for t in trials)
    saw = collections.Counter(t.app_saw or "nothing" for t in trials)
    app_saw = saw.most_common(1)[0][0]
    med = median(waits)
    worst = max(waits) if waits else None
    measurements: dict[str, Measurement] = {
        "trials": len(trials),
        "trials_closed": len(closed),
        "close_wait_ms": _round(med),
        "close_wait_ms_max": _round(worst),
        "close_wait_ms_all": [_round(w) for w in waits],
        "fd_released": fd_released,
        "left_tcp_table": left,
        "app_saw": app_saw,
        "app_saw_counts": [f"{k}: {v}" for k, v in sorted(saw.items())],
        "caveat": remedy.caveat,
        **_packet_flags(segments, port, cap.active),
        **extra,
    }
    first = trials[0]
    all_hold = len(closed) == len(trials) and fd_released and left
    observed = (
        f"{len(closed)}/{len(trials)} trials: the server closed {_ms(med)} (median; max {_ms(worst)}) after the "
        f"client's close; the fd was {'released' if fd_released else 'NOT released'} and the connection "
        f"{'left' if left else 'did NOT leave'} the TCP table in "
        f"{'every trial' if all_hold else 'some trials only'}. The application saw: "
        f"{', '.join(f'{k} ({v}x)' for k, v in sorted(saw.items()))}."
    )
    if remedy.id == "send-sigpipe":
        observed += " " + _send_sigpipe_observed(extra, trials)
        caveat_seen = extra.get("half_close_detected") is False
        verdict = Verdict.HOLDS_WITH_CAVEAT if all_hold else Verdict.DOES_NOT_HOLD
        if all_hold and not caveat_seen:
            notes.append("The half-close caveat did not show on this kernel: the half-closed peer was detected.")
    else:
        verdict = Verdict.HOLDS if all_hold else Verdict.DOES_NOT_HOLD
    return connection_experiment(
        remedy.id,
        PART,
        remedy.title,
        remedy.claim,
        observed=observed,
        verdict=verdict,
        measurements=measurements,
        cap=cap,
        packets=_one_connection(segments, first.client_port),
        ports=(port, first.client_port),
        notes=[remedy.caveat, *notes],
        evidence="socket states, /proc and errno",
        started=start,
    )


def _send_sigpipe_demos(ctx: LabContext, server: ServerProcess, port: int) -> tuple[dict[str, Measurement], list[str]]:
    """The three caveats of send-sigpipe, each shown on the kernel (run concurrently)."""
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="lab-sigpipe-demo") as pool:
        half = pool.submit(_half_close_demo, server, port, stop_event(ctx))
        hold = pool.submit(_fd_still_held_demo, ctx)
        kill = pool.submit(_sigpipe_default_demo, ctx)
        measurements: dict[str, Measurement] = {**half.result(), **hold.result(), **kill.result()}
    return measurements, []


def _half_close_demo(server: ServerProcess, port: int, stop: threading.Event) -> dict[str, Measurement]:
    """A peer that only shutdown(SHUT_WR): its kernel ACKs every heartbeat, so nothing fails."""
    conn, client_port, inode = _connect_and_send(server, port)
    try:
        conn.shutdown(socket.SHUT_WR)
        watched_s = 10 * HEARTBEAT_S
        stop.wait(watched_s)
        detected = server.wait_event(0.0, ev="saw", peer=client_port) is not None
        end = lookup_end(port, client_port)
        state = end.socket.state.name if end else None
        held = inode in held_inodes(server.pid)
    finally:
        # Tidy up: the full close now (with heartbeats unread, so the kernel sends RST).
        conn.close()
    server.wait_event(CLOSE_DEADLINE_S, ev="closed", peer=client_port)
    return {
        "half_close_detected": detected,
        "half_close_watched_s": watched_s,
        "half_close_server_state": state,
        "half_close_fd_held": held,
    }


def _fd_still_held_demo(ctx: LabContext) -> dict[str, Measurement]:
    """Between EPIPE and close(): the socket is out of the TCP table, its fd is not released.

    The server keeps failed sockets open until it gets SIGUSR1, so the lab looks in between.
    """
    server, port = start_remedy(ctx, "send-sigpipe", "--close-on-sigusr1")
    try:
        client_port, _closed_at, inode = _send_and_close(server, port)
        saw = server.wait_event(CLOSE_DEADLINE_S, ev="saw", peer=client_port)
        in_table = lookup_end(port, client_port)
        held = inode in held_inodes(server.pid)
        os.kill(server.pid, signal.SIGUSR1)
        closed = server.wait_event(CLOSE_DEADLINE_S, ev="closed", peer=client_port)
        released = inode not in held_inodes(server.pid)
    finally:
        server.stop()
    return {
        "after_epipe_errno": str(saw["errno"]) if saw else None,
        "after_epipe_in_tcp_table": in_table is not None,
        "after_epipe_fd_held": held,
        "fd_released_after_close": closed is not None and released,
    }


def _sigpipe_default_demo(ctx: LabContext) -> dict[str, Measurement]:
    """SIGPIPE at its default disposition (a C program's): the EPIPE send kills the server."""
    server, port = start_remedy(ctx, "send-sigpipe", "--sigpipe-default")
    try:
        _send_and_close(server, port)
        try:
            status: int | None = server.proc.wait(timeout=CLOSE_DEADLINE_S)
        except Exception:
            status = None
    finally:
        server.stop()
    return {
        "sigpipe_default_exit_signal": signal.Signals(-status).name if status is not None and status < 0 else None,
        "sigpipe_kills_process": status == -signal.SIGPIPE,
    }


def _send_sigpipe_observed(extra: dict[str, Measurement], trials: list[Trial]) -> str:
    first_send_ok = sum(1 for t in trials if _first_send_after_close_ok(t))
    parts = [
        f"In {first_send_ok}/{len(trials)} trials a send after the client's close still succeeded before "
        "one failed with EPIPE."
    ]
    if extra.get("after_epipe_fd_held") and not extra.get("after_epipe_in_tcp_table"):
        parts.append(
            "With the close delayed after EPIPE, the socket had already left the TCP table while the fd was "
            "still held: close() is still needed."
        )
    if extra.get("sigpipe_kills_process"):
        parts.append("With SIGPIPE at its C default, the failing send killed the server (signal SIGPIPE).")
    if extra.get("half_close_detected") is False:
        parts.append(
            f"A client that only called shutdown(SHUT_WR) was not detected in {extra.get('half_close_watched_s')} s "
            f"of heartbeats: the server's end stayed in {extra.get('half_close_server_state')}."
        )
    return " ".join(parts)


def _first_send_after_close_ok(trial: Trial) -> bool:
    last_ok = trial.extra.get("last_ok_send_t")
    return isinstance(last_ok, int | float) and last_ok > trial.closed_at


# -- keepalive ------------------------------------------------------------------------------------


def _keepalive(ctx: LabContext, remedy: Remedy, fin_timeout: int | None) -> Experiment:
    start = time.monotonic()
    server, port = start_remedy(ctx, remedy.id)
    conns: list[tuple[int, float, int]] = []  # (client port, closed at, inode)
    try:
        with capturing(ctx, [port]) as cap:
            for _ in range(max(1, ctx.trials)):
                conns.append(_send_and_close(server, port))
            answered, states = _wait_probes_answered(port, conns, stop_event(ctx))
            held_after_probes = [inode in held_inodes(server.pid) for _, _, inode in conns]

            ended_ms: list[float | None] = [None] * len(conns)
            left = [False] * len(conns)
            if ctx.full and fin_timeout is not None:
                limit = conns[0][1] + fin_timeout + KEEPIDLE_S + KEEPINTVL_S * KEEPCNT + FULL_MARGIN_S
                stop = stop_event(ctx)
                while time.monotonic() < limit and not all(left) and not stop.is_set():
                    for i, (client_port, closed_at, _inode) in enumerate(conns):
                        if left[i]:
                            continue
                        end = _server_end_state(port, client_port)
                        if end != TcpState.CLOSE_WAIT:
                            left[i] = True
                            ended_ms[i] = (time.monotonic() - closed_at) * 1000.0
                    stop.wait(0.5)
            held_at_end = [inode in held_inodes(server.pid) for _, _, inode in conns]
            if cap.active:
                cap.sync()
            segments = cap.segments()
    finally:
        server.stop()

    still_close_wait = all(s == TcpState.CLOSE_WAIT for s in states)
    waits = [w for w in ended_ms if w is not None]
    measurements: dict[str, Measurement] = {
        "trials": len(conns),
        "close_wait_ms": _round(median(waits)) if ctx.full else None,
        "close_wait_ms_max": _round(max(waits)) if ctx.full and waits else None,
        "fd_released": not any(held_at_end),
        "left_tcp_table": all(left) if ctx.full else False,
        "app_saw": "nothing",
        "keepalive_probes_answered": answered,
        "state_after_probes": states[0].name if states and states[0] is not None else None,
        "fin_timeout_s": fin_timeout,
        "needs_full": not ctx.full,
        "caveat": remedy.caveat,
        **_packet_flags(segments, port, cap.active),
    }
    probes_phrase = (
        f"after {KEEPIDLE_S} s idle the keepalive probes were answered by the peer's kernel (an ACK arrived "
        "after the FIN)"
        if answered
        else "no ACK to the keepalive probes was seen"
    )
    observed = (
        f"{len(conns)} connections closed by the client: {probes_phrase}; the server's end is "
        f"{'still in CLOSE_WAIT' if still_close_wait else 'no longer in CLOSE_WAIT'} and the fd is "
        f"{'still held' if all(held_after_probes) else 'released'}."
    )
    notes = [remedy.caveat]
    fin_phrase = f"net.ipv4.tcp_fin_timeout = {fin_timeout} s" if fin_timeout is not None else "tcp_fin_timeout"
    if ctx.full:
        if all(left):
            observed += (
                f" Waited it out: CLOSE_WAIT ended after {_ms(median(waits))} (median; {fin_phrase}), when the "
                f"peer's FIN_WAIT2 had expired; the fd is {'still held' if all(held_at_end) else 'released'}."
            )
        else:
            observed += f" Waited {fin_phrase} plus {FULL_MARGIN_S:.0f} s and the server's end was still in CLOSE_WAIT."
        claim_confirmed = still_close_wait and answered and all(left) and all(held_at_end)
        early = any(w < (fin_timeout or 0) * 1000 for w in waits)
        verdict = Verdict.HOLDS_WITH_CAVEAT if claim_confirmed and not early else Verdict.DOES_NOT_HOLD
    else:
        notes.append(
            f"Not waited out: the state ends only after {fin_phrase}; run with --full to see it leave CLOSE_WAIT "
            "while the fd stays leaked."
        )
        verdict = Verdict.HOLDS_WITH_CAVEAT if still_close_wait and all(held_after_probes) else Verdict.DOES_NOT_HOLD
    return connection_experiment(
        remedy.id,
        PART,
        remedy.title,
        remedy.claim,
        observed=observed,
        verdict=verdict,
        measurements=measurements,
        cap=cap,
        packets=_one_connection(segments, conns[0][0]),
        ports=(port, conns[0][0]),
        notes=notes,
        evidence="socket states, tcp_info and /proc",
        started=start,
    )


def _server_end_state(port: int, client_port: int) -> TcpState | None:
    end = lookup_end(port, client_port)
    return end.socket.state if end else None


def _wait_probes_answered(
    port: int, conns: list[tuple[int, float, int]], stop: threading.Event
) -> tuple[bool, list[TcpState | None]]:
    """Wait (bounded) until every server end got an ACK after its peer's FIN: a probe was answered.

    tcp_info's ``tcpi_last_ack_recv`` is the time since the last ACK arrived; the FIN carried one,
    so an ACK newer than "closed at + keepidle" can only be the answer to a keepalive probe.
    """
    deadline = time.monotonic() + KEEPIDLE_S + KEEPINTVL_S * KEEPCNT + 1.0
    while True:
        ends = [_server_finding(port, cp) for cp, _, _ in conns]
        answered = all(_probe_answered(end, closed_at) for end, (_, closed_at, _) in zip(ends, conns, strict=True))
        states = [end.socket.state if end else None for end in ends]
        if answered or time.monotonic() >= deadline or stop.wait(0.1):
            return answered, states


def _server_finding(port: int, client_port: int) -> Finding | None:
    return lookup_end(port, client_port)


def _probe_answered(end: Finding | None, closed_at: float) -> bool:
    if end is None or end.socket.idle_ms is None:
        return False
    last_ack_at = time.monotonic() - end.socket.idle_ms / 1000.0
    return last_ack_at > closed_at + KEEPIDLE_S * 0.9


# -- shared bits ----------------------------------------------------------------------------------


def _packet_flags(segments: tuple[Segment, ...], port: int, active: bool) -> dict[str, Measurement]:
    """fin_sent: the server's end sent a FIN; rst_sent: an RST went either way (all trials)."""
    if not active:
        return {"fin_sent": None, "rst_sent": None}
    return {
        "fin_sent": any(s.src.port == port and "FIN" in s.flags for s in segments),
        "rst_sent": any("RST" in s.flags for s in segments),
    }


def _one_connection(segments: tuple[Segment, ...], client_port: int) -> tuple[Segment, ...]:
    """The first trial's segments only: one connection makes a readable ladder diagram."""
    return tuple(s for s in segments if client_port in (s.src.port, s.dst.port))


def _round(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


def _ms(value: float | None) -> str:
    return "never" if value is None else format_latency(value)
