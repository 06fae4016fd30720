"""What the lab's reproduce, remedies and churn experiments ask of the kernel, in one place (through
``closewait.scan`` and ``closewait.sources``, which alone read it).

- ``connection_sockets``: the TCP table entries of one connection, via ``closewait.scan`` (the
  project's own scanner, netlink sock_diag) so the lab demonstrates the tool it ships.
- ``held_inodes``: which socket inodes a process still holds (``/proc/PID/fd``): the only honest
  answer to "was the fd released?" (a socket can leave the TCP table while its fd leaks).
- ``connection_experiment``: the Experiment record of such a run, its ladder on one connection.
- ``capturing``: the packet capture (``closewait.sources.capture``); when it cannot run (not root,
  ``--no-capture``) ``cap.active`` is False and ``cap.reason`` says why.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection, Iterator, Mapping, Sequence

from closewait.diagnosis import diagnose
from closewait.errors import NoSuchProcess
from closewait.lab.model import Experiment, LabContext, Measurement, Verdict
from closewait.model import ALL_STATES, TEARDOWN_STATES, Endpoint, Finding, Role, TcpState
from closewait.scanning import scan
from closewait.sources import capture as capture_mod
from closewait.sources import netlink
from closewait.sources.capture import Capture, Segment
from closewait.sources.process import socket_fds

log = logging.getLogger(__name__)

#: Every state a connection can be in (listening sockets are not connections).
CONNECTION_STATES = ALL_STATES - {TcpState.LISTEN}
#: The states either end can be in once a FIN has been sent, except TIME_WAIT (which only the end
#: that closed first reaches). Lookups ask the kernel for these only: a busy host can hold 100,000
#: ESTABLISHED connections, and dumping them all (with tcp_info) takes seconds per lookup.
AFTER_FIN_STATES = TEARDOWN_STATES - {TcpState.TIME_WAIT}


def held_inodes(pid: int) -> set[int]:
    """Socket inodes ``pid`` holds a descriptor for; empty once the process is gone."""
    try:
        return set(socket_fds(pid).values())
    except NoSuchProcess:
        return set()


def connection_findings(
    server_port: int,
    client_port: int | None = None,
    *,
    states: Collection[TcpState] = AFTER_FIN_STATES,
    owners: bool = True,
    pids: Collection[int] = (),
) -> list[Finding]:
    """Both ends of the connections to ``server_port`` (only the one from ``client_port`` if given).

    Only ``states`` are asked for (default: after a FIN, see ``AFTER_FIN_STATES``). ``pids`` keeps
    only sockets those processes hold, and walks only their descriptors (cheap on a busy host).
    """
    snapshot = scan(states, ports=[server_port], owners=owners, pids=pids)
    found = []
    for finding in snapshot.findings:
        ends = {finding.socket.local.port, finding.socket.remote.port}
        if server_port in ends and (client_port is None or client_port in ends):
            found.append(finding)
    return found


LOOPBACK = "127.0.0.1"


def lookup_end(local_port: int, remote_port: int, address: str = LOOPBACK) -> Finding | None:
    """One end of a loopback connection, asked of the kernel by its endpoints (no dump), or None.

    A dump walks every socket on the host (half a second with 200,000 connections); this is the
    kernel's own hash lookup, what ``ss -K`` uses. The Finding carries no owners (role unknown) and
    the diagnosis the socket alone supports. Pitfall: when no connection matches, the kernel falls
    back to the listening socket on the local port, so anything that is not this exact connection
    counts as gone.
    """
    found = netlink.lookup_connection(Endpoint(address, local_port), Endpoint(address, remote_port))
    if found is None:
        return None
    return Finding(found, (), Role.UNKNOWN, diagnose(found, (), Role.UNKNOWN))


def client_end(findings: Collection[Finding], server_port: int) -> Finding | None:
    """The client's end of a connection: its remote port is the server's."""
    for finding in findings:
        if finding.socket.remote.port == server_port:
            return finding
    return None


@contextlib.contextmanager
def capturing(ctx: LabContext, ports: Collection[int]) -> Iterator[Capture]:
    """Capture the segments to and from ``ports`` on the loopback while the block runs.

    Never raises for lack of privilege or ``ctx.capture`` off: ``cap.active``/``cap.reason`` say.
    Leaving the block syncs first, so every segment sent inside it is in ``cap.segments()``.
    """
    with capture_mod.capture(ports, enabled=ctx.capture) as cap:
        try:
            yield cap
        finally:
            if cap.active:
                cap.sync()


def connection_experiment(
    exp_id: str,
    part: str,
    title: str,
    claim: str,
    *,
    observed: str,
    verdict: Verdict,
    measurements: Mapping[str, Measurement],
    cap: Capture,
    packets: tuple[Segment, ...],
    ports: tuple[int, int],
    notes: Sequence[str],
    evidence: str,
    started: float,
) -> Experiment:
    """The record of an experiment on connections to a loopback server.

    ``ports`` is (server port, client port) of the connection the ladder diagram shows, labelled
    "server" and "client". Without packets (``cap`` inactive), a last note says why and what
    ``evidence`` stood in for them. ``started`` is the experiment's ``time.monotonic()`` start.
    """
    port, client_port = ports
    if not cap.active:
        notes = [*notes, no_capture_note(cap.reason, evidence)]
    return Experiment(
        id=exp_id,
        part=part,
        title=title,
        claim=claim,
        observed=observed,
        verdict=verdict,
        measurements=measurements,
        packets=packets,
        packets_captured=cap.active,
        actors={f"{LOOPBACK}:{port}": "server", f"{LOOPBACK}:{client_port}": "client"},
        notes=tuple(notes),
        duration_s=time.monotonic() - started,
    )


def no_capture_note(reason: str | None, evidence: str) -> str:
    """One line for an experiment's notes when no packets were captured, and what stands in for them."""
    why = (reason or "no capture").removeprefix("packets not captured: ")
    return f"Packets were not captured ({why}); the evidence is {evidence}."


def median(values: Collection[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2
