"""Lab experiment "churn" (part remedies): CLOSE_WAIT over time under a steady stream of clients.

Every server runs at once, each in its own child process and on its own port: the leaking server
(the article's loop, one thread per client: ``servers/leaky.py --many``) and each remedy server.
For ``DURATION_S`` seconds a client thread per server connects, sends a line and closes, at
``RATE_PER_S`` connections per second; sampling goes on for ``TAIL_S`` more seconds so the idle
reaper can be seen draining. Every ``SAMPLE_S`` one scan (closewait's scanner, CLOSE_WAIT only,
filtered to the servers' ports) counts each server's CLOSE_WAIT sockets.

The result is ``Experiment.series``: ``{"leaking": [(t, count), ...], "read-close": [...], ...}``
with ``t`` in seconds since the first client, for the HTML report's chart. Expected shape: the leak
and keepalive climb by one per client (keepalive only ends CLOSE_WAIT after tcp_fin_timeout);
idle-timeout plateaus near rate x timeout then drains; the read-based remedies stay near zero.

Called by ``closewait.lab.remedies.run`` (the runner need not call it); ``run(ctx)`` works alone too.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Callable

from closewait.lab.model import Experiment, LabContext, Measurement, Verdict, unfinished
from closewait.lab.servers import (
    HEARTBEAT_S,
    IDLE_TIMEOUT_S,
    REMEDY_ARGS,
    ServerProcess,
    run_parallel,
    start_leaky,
    start_remedy,
)
from closewait.model import TcpState
from closewait.scanning import scan

log = logging.getLogger(__name__)

PART = "remedies"
EXPERIMENT_ID = "churn"
RATE_PER_S = 20
DURATION_S = 4.0
TAIL_S = 1.5
SAMPLE_S = 0.2
LINE = b"hello from the closewait lab churn\n"

#: Remedies whose server closes as soon as it learns of the close; their count must stay near 0.
PROMPT = ("read-close", "multiplex-read-close", "nonblocking-read-close")
#: The most CLOSE_WAIT sockets a prompt remedy may show at one sample: FINs caught mid-flight, more of
#: them when the machine is busy and a server's thread waits for a CPU. A tenth of the clients is far
#: below the leak's one-per-client, which is the difference the run is about.
PROMPT_SLACK = max(3, round(RATE_PER_S * DURATION_S) // 10)

CLAIM = (
    "Under a steady stream of clients that connect and leave, a server that never closes collects one "
    "CLOSE_WAIT socket per client, while each remedy keeps the count bounded."
)
TITLE = f"Churn: {RATE_PER_S} clients/s against every server"


def run(ctx: LabContext) -> list[Experiment]:
    start = time.monotonic()
    try:
        return [_churn(ctx)]
    except Exception as err:
        log.debug("churn failed", exc_info=True)
        return [unfinished(EXPERIMENT_ID, PART, TITLE, CLAIM, err, start)]


def _start_all(ctx: LabContext) -> dict[str, tuple[ServerProcess, int]]:
    starters: dict[str, Callable[[], tuple[ServerProcess, int]]] = {"leaking": lambda: start_leaky(ctx, many=True)}
    for strategy in REMEDY_ARGS:
        starters[strategy] = functools.partial(start_remedy, ctx, strategy)
    started = run_parallel(ctx, list(starters.values()), "lab-churn-start")
    return dict(zip(starters, started, strict=True))


def _clients(port: int, t0: float, count: int, errors: list[str], lock: threading.Lock) -> None:
    """Connect, send, close ``count`` times at ``RATE_PER_S``, on schedule (no drift)."""
    for i in range(count):
        delay = t0 + i / RATE_PER_S - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                conn.sendall(LINE)
        except OSError as err:
            with lock:
                errors.append(f"{port}: {err}")


def _churn(ctx: LabContext) -> Experiment:
    start = time.monotonic()
    servers = _start_all(ctx)
    count = round(RATE_PER_S * DURATION_S)
    series: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
    errors: list[str] = []
    lock = threading.Lock()
    port_to_name = {port: name for name, (_server, port) in servers.items()}
    try:
        t0 = time.monotonic() + 0.1
        threads = [
            threading.Thread(target=_clients, args=(port, t0, count, errors, lock), daemon=True, name=f"churn-{name}")
            for name, (_server, port) in servers.items()
        ]
        for thread in threads:
            thread.start()
        end = t0 + DURATION_S + TAIL_S
        next_sample = t0
        # Bounded by time, not by sample count: a slow scan means fewer samples, never a longer run.
        while next_sample <= end:
            delay = next_sample - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t = time.monotonic() - t0
            counts = _close_wait_by_port(port_to_name)
            for name in servers:
                series[name].append((round(t, 3), float(counts.get(name, 0))))
            next_sample = max(next_sample + SAMPLE_S, time.monotonic())
        join_by = time.monotonic() + 5
        for thread in threads:
            while thread.is_alive() and time.monotonic() < join_by:
                thread.join(timeout=0.1)  # short slices: Ctrl+C is handled between them
    finally:
        for server, _port in servers.values():
            server.stop()
    return _result(series, count, errors, time.monotonic() - start)


def _close_wait_by_port(port_to_name: dict[int, str]) -> dict[str, int]:
    """One scan: how many CLOSE_WAIT sockets each server has.

    The server's end of a connection has the server's port as its local port, and only the server
    end can be in CLOSE_WAIT here (the clients close first), so counting by local port needs no
    walk of /proc: the scan stays cheap on a host that already holds thousands of CLOSE_WAIT sockets.
    """
    snapshot = scan({TcpState.CLOSE_WAIT}, ports=list(port_to_name), owners=False)
    counts: dict[str, int] = {}
    for finding in snapshot.findings:
        name = port_to_name.get(finding.socket.local.port)
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _result(series: dict[str, list[tuple[float, float]]], count: int, errors: list[str], took: float) -> Experiment:
    peak = {name: int(max((c for _t, c in points), default=0)) for name, points in series.items()}
    final = {name: int(points[-1][1]) if points else 0 for name, points in series.items()}
    measurements: dict[str, Measurement] = {
        "rate_per_s": RATE_PER_S,
        "duration_s": DURATION_S,
        "clients_per_server": count,
        "connect_errors": len(errors),
        "samples": len(series.get("leaking", [])),
    }
    for name in series:
        measurements[f"{name}_peak"] = peak[name]
        measurements[f"{name}_final"] = final[name]

    enough = max(1, int(count * 0.9)) - len(errors)
    leak_grew = final.get("leaking", 0) >= enough
    prompt_bounded = all(peak.get(name, 0) <= PROMPT_SLACK for name in PROMPT)
    idle_bound = int(RATE_PER_S * (IDLE_TIMEOUT_S * 1.5)) + PROMPT_SLACK
    idle_bounded = peak.get("idle-timeout", 0) <= idle_bound and final.get("idle-timeout", 0) < final.get("leaking", 0)
    sigpipe_bound = int(RATE_PER_S * HEARTBEAT_S * 3) + PROMPT_SLACK
    sigpipe_bounded = peak.get("send-sigpipe", 0) <= sigpipe_bound
    keepalive_grew = final.get("keepalive", 0) >= enough
    holds = leak_grew and prompt_bounded and idle_bounded and sigpipe_bounded
    observed = (
        f"{count} clients per server in {DURATION_S:.0f} s. CLOSE_WAIT at the end (peak): "
        + ", ".join(f"{name} {final[name]} ({peak[name]})" for name in series)
        + ". "
        + (
            "The leaking server kept one per client; "
            if leak_grew
            else f"The leaking server kept only {final.get('leaking', 0)}; "
        )
        + (
            "keepalive grew just the same (it ends CLOSE_WAIT only after tcp_fin_timeout); "
            if keepalive_grew
            else "keepalive did not grow like the leak; "
        )
        + f"idle-timeout {'stayed' if idle_bounded else 'did NOT stay'} under {idle_bound} (rate x 1.5 timeout); "
        + f"send-sigpipe {'stayed' if sigpipe_bounded else 'did NOT stay'} under {sigpipe_bound}; "
        + f"the read-based remedies {'stayed' if prompt_bounded else 'did NOT stay'} at {PROMPT_SLACK} or fewer."
    )
    notes: list[str] = []
    if errors:
        notes.append(f"{len(errors)} client connections failed, first: {errors[0]}")
    return Experiment(
        id=EXPERIMENT_ID,
        part=PART,
        title=TITLE,
        claim=CLAIM,
        observed=observed,
        verdict=Verdict.HOLDS if holds else Verdict.DOES_NOT_HOLD,
        measurements=measurements,
        series=series,
        notes=tuple(notes),
        duration_s=took,
    )
