"""Options several commands share, declared once (``scan``, ``watch``, ``check``, ``reap``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from closewait.errors import UsageError
from closewait.model import TcpState, parse_states
from closewait.sources import BACKENDS

F = TypeVar("F", bound=Callable[..., Any])

PORT = click.IntRange(1, 65535)


def states_from(values: tuple[str, ...], default: frozenset[TcpState]) -> frozenset[TcpState]:
    """``--state`` values (ss's spelling, ``all``, ``teardown``) as states; a bad name is a UsageError."""
    if not values:
        return default
    try:
        return parse_states(values)
    except ValueError:
        bad = next(v for v in values if not _known_state(v))
        raise UsageError(
            f"unknown state {bad!r}: use ss's names (close-wait, fin-wait-2, time-wait, last-ack, "
            "established, ...), all or teardown"
        ) from None


def _known_state(value: str) -> bool:
    try:
        parse_states([value])
    except ValueError:
        return False
    return True


def state_option(f: F) -> F:
    return click.option(
        "--state",
        "states",
        multiple=True,
        metavar="STATE",
        help="TCP state to list, repeatable, in ss's spelling (close-wait, fin-wait-2, time-wait, ...), "
        "or all, or teardown. Default: close-wait.",
    )(f)


def filter_options(f: F) -> F:
    """--port, --pid and --netns."""
    f = click.option(
        "--netns",
        metavar="PID|PATH",
        help="Scan another network namespace: a pid in it, /proc/PID/ns/net or /run/netns/NAME.",
    )(f)
    f = click.option(
        "--pid",
        "pids",
        multiple=True,
        type=click.IntRange(min=1),
        help="Only sockets this process holds (repeatable).",
    )(f)
    return click.option(
        "--port",
        "ports",
        multiple=True,
        type=PORT,
        help="Only sockets with this local or remote port (repeatable).",
    )(f)


def backend_option(f: F) -> F:
    return click.option(
        "--backend",
        type=click.Choice(BACKENDS),
        default="auto",
        show_default=True,
        help="Where to read sockets: netlink sock_diag (with idle times) or /proc/net/tcp.",
    )(f)
