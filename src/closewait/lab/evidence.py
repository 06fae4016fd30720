"""Reading an experiment's evidence out of captured segments (``sources.capture`` captures them).

The segments are every packet of the experiment's ports; these pick out one connection, one
sender and one flag, which is what a verdict asks ("did the client send FIN?").
"""

from __future__ import annotations

from collections.abc import Iterable

from closewait.model import Endpoint
from closewait.sources.capture import Segment


def sent(segments: Iterable[Segment], flag: str, *, by: Endpoint | None = None) -> bool:
    """True when a segment with ``flag`` was sent (by ``by``, if given)."""
    return any(flag in s.flags and (by is None or s.src == by) for s in segments)


def payload_bytes(segments: Iterable[Segment], *, by: Endpoint | None = None) -> int:
    """Payload bytes carried by the segments (sent by ``by``, if given); retransmits count twice."""
    return sum(s.length for s in segments if by is None or s.src == by)


def between(segments: Iterable[Segment], a: Endpoint, b: Endpoint) -> tuple[Segment, ...]:
    """Only the segments of the connection between ``a`` and ``b``, either direction.

    Both ends are needed: every server side of one listener shares its address and port.
    """
    pair = {a, b}
    return tuple(s for s in segments if {s.src, s.dst} == pair)


__all__ = ["between", "payload_bytes", "sent"]
