"""Kernel settings closewait reports next to what it observes, read from /proc/sys.

``net.*`` settings belong to a network namespace, and /proc/sys/net shows the one of the process
that reads it: run inside a namespace (the lab's full run does), these are that namespace's values.
"""

from __future__ import annotations

__all__ = ["tcp_fin_timeout_s"]


def tcp_fin_timeout_s(proc_root: str = "/proc") -> int | None:
    """``net.ipv4.tcp_fin_timeout``: how long, in seconds, an orphaned FIN_WAIT2 socket lives; None
    when it cannot be read (no /proc/sys, an unexpected value)."""
    try:
        with open(f"{proc_root}/sys/net/ipv4/tcp_fin_timeout", encoding="ascii") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None
