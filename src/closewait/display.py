"""How closewait writes numbers and addresses for people: the one home of every view's display helpers.

The terminal tables, the sentinel's log lines, the diagnosis summaries, reap's plan, the lab's
report and the exporter's messages all format through these, so one quantity reads the same
everywhere:

- ``format_duration``: a measured age for a table cell (``12 ms``, ``3.4 s``, ``5 min``, ``2.1 h``).
- ``format_latency``: a measured delay to a tenth of a millisecond (``3.4 ms``, ``1.2 s``).
- ``format_ms``: a duration the user typed, given back exactly (``90s``, ``5m``, ``250ms``).
- ``format_address``: ``host:port``, IPv6 hosts in brackets (``[::1]:8080``); ``Endpoint.__str__``.
- ``format_bytes``: a byte count scaled to B, KiB or MiB.
- ``format_decimal``: a float with at most three decimals and no trailing zeros.
- ``format_command``: a process's command line on one line, cut to a width.
- ``format_utc``: a moment as ISO 8601 UTC to the millisecond (``2026-12-05T11:55:21.123Z``).
- ``format_clock``: a moment as local wall-clock time for a table cell (``11:55:21``).
- ``plural``: ``1 socket``, ``2 sockets``, ``3 processes``.

Nothing here imports the rest of closewait (the model itself formats endpoints through
``format_address``), so any layer may use it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

__all__ = [
    "format_address",
    "format_bytes",
    "format_clock",
    "format_command",
    "format_decimal",
    "format_duration",
    "format_latency",
    "format_ms",
    "format_utc",
    "plural",
]

# Arguments may hold newlines and tabs (python -c, sh -c): shown escaped, so a command stays one line.
_ONE_LINE = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": " "})


def format_duration(ms: int) -> str:
    """12 ms, 3.4 s, 5 min, 2.1 h, 3.0 d: short enough for a table cell.

    For a measurement (an idle time, an age): one unit, rounded. Use ``format_ms`` to echo a
    duration the user gave, which must come back exactly.
    """
    if ms < 1000:
        return f"{ms} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_latency(ms: float) -> str:
    """3.4 ms, 1.2 s: a short measured delay (the lab's close latencies), where the tenth of a
    millisecond ``format_duration`` rounds away is the measurement."""
    if ms >= 1000:
        return f"{ms / 1000:.1f} s"
    return f"{ms:.1f} ms"


def format_ms(ms: int) -> str:
    """A duration as the CLI accepts it (``2h``, ``5m``, ``30s``, ``250ms``): the largest unit that
    divides it exactly, so ``--older-than 90s`` is echoed as ``90s``, never rounded to ``2m``."""
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def format_address(host: str, port: int) -> str:
    """``host:port``; an IPv6 host goes in brackets (``[::1]:8080``) so the port cannot be read as
    part of the address (RFC 3986 host syntax, what URLs and ``ss`` print)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_bytes(n: int) -> str:
    """A byte count in binary units, one decimal above 1 KiB: ``512 B``, ``1.5 KiB``, ``3.0 MiB``."""
    if n >= 1024 * 1024:
        return f"{n / 1024 / 1024:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def format_decimal(value: float) -> str:
    """At most three decimals, trailing zeros dropped: ``0.25``, ``1.5``, ``2`` (for 2.0)."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


def format_command(cmdline: Sequence[str], name: str, width: int) -> str:
    """The command line as a shell would take it (``shlex.join``), ``[name]`` for a kernel thread or
    a process whose cmdline is empty (a zombie), on one line, cut to ``width`` characters with ``...``."""
    import shlex  # here, not at the top: the scan --json fast path imports this module, not this function

    cmd = shlex.join(cmdline) if cmdline else f"[{name}]"
    cmd = cmd.translate(_ONE_LINE)
    return cmd if len(cmd) <= width else cmd[: width - 3] + "..."


def plural(n: int, word: str) -> str:
    """``n`` and the noun in the number it needs: ``1 socket``, ``2 sockets``, ``2 processes``."""
    if n == 1:
        return f"1 {word}"
    return f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def format_utc(seconds: float) -> str:
    """Seconds since the epoch as ISO 8601 UTC, to the millisecond: ``2026-12-05T11:55:21.123Z``."""
    whole, ms = divmod(round(seconds * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ms:03d}Z"


def format_clock(seconds: float) -> str:
    """Seconds since the epoch as local time of day (``11:55:21``), with the date when not today."""
    moment = time.localtime(seconds)
    if time.strftime("%Y-%m-%d", moment) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S", moment)
    return time.strftime("%Y-%m-%d %H:%M:%S", moment)
