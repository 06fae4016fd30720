"""``closewait watch``: CLOSE_WAIT per process over time, with rate, ages and a leak verdict.

Refreshes in place on a terminal, prints plain lines otherwise, or one JSON object per sample
with ``--jsonl``. The numbers and the leak verdict are defined in ``closewait.watch``.
"""

from __future__ import annotations

import json
import sys

import click

from closewait.cli._options import (
    COUNT,
    DAY_S,
    INT_MAX,
    Integer,
    Seconds,
    backend_option,
    examples,
    filter_options,
    selector_from,
    workload_options,
)
from closewait.model import Snapshot
from closewait.scanning import CLOSE_WAIT_ONLY, scan
from closewait.sources import get_source
from closewait.sources import netns as netns_mod
from closewait.watch import DEFAULT_MIN_GROWTH, DEFAULT_WINDOW, GROUPINGS, Tracker, sample_dict, sample_forever


@click.command(
    "watch",
    epilog=examples(
        ("closewait watch", "every process, every 2 s, until Ctrl-C"),
        ("closewait watch --by workload -i 10", "per container, pod or unit, every 10 s"),
        ("closewait watch --jsonl -n 30 > cw.jsonl", "one JSON object per sample, 30 samples"),
    ),
)
@click.option(
    "-i",
    "--interval",
    type=Seconds(min=0.05, max=DAY_S),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Time between samples, 0.05 to 86400.",
)
@click.option("-n", "--count", type=COUNT, metavar="N", help="Stop after N samples; without it, run until Ctrl-C.")
@click.option("--jsonl", is_flag=True, help="Print one JSON object per sample (docs/monitoring.md).")
@click.option(
    "--window",
    type=Integer(2, 100_000),
    default=DEFAULT_WINDOW,
    show_default=True,
    metavar="N",
    help="Leak verdict: samples the count must not decrease over.",
)
@click.option(
    "--min-growth",
    type=Integer(1, INT_MAX),
    default=DEFAULT_MIN_GROWTH,
    show_default=True,
    metavar="N",
    help="Leak verdict: sockets the count must grow by over the window.",
)
@click.option(
    "--by",
    type=click.Choice(GROUPINGS),
    default="process",
    show_default=True,
    metavar="|".join(GROUPINGS),
    help="One row per process, or per workload (container, pod, unit, host: docs/workloads.md).",
)
@filter_options
@workload_options
@backend_option
def watch_command(
    interval: float,
    count: int | None,
    jsonl: bool,
    window: int,
    min_growth: int,
    by: str,
    ports: tuple[int, ...],
    pids: tuple[int, ...],
    netns: str | None,
    container: str | None,
    pod: str | None,
    namespace: str | None,
    unit: str | None,
    backend: str,
) -> None:
    """Watch CLOSE_WAIT per process (or per workload): count, change, rate, oldest age, diagnosis and leak verdict."""
    # Pinned (a descriptor held open): a namespace that is gone stops the watch with one line and
    # exit 2 ("the namespace is gone"), it is never silently replaced by a new one with its name.
    ns = netns_mod.pin(netns_mod.resolve(netns)) if netns is not None else None
    try:
        _watch(
            ns, interval, count, jsonl, window, min_growth, by, ports, pids, backend, container, pod, namespace, unit
        )
    finally:
        netns_mod.unpin(ns)


def _watch(
    ns: netns_mod.Netns | None,
    interval: float,
    count: int | None,
    jsonl: bool,
    window: int,
    min_growth: int,
    by: str,
    ports: tuple[int, ...],
    pids: tuple[int, ...],
    backend: str,
    container: str | None,
    pod: str | None,
    namespace: str | None,
    unit: str | None,
) -> None:
    source = get_source(backend)
    selection = selector_from(container, pod, namespace, unit)

    def take(first: bool = False) -> Snapshot:
        # Only the first sample insists that the selected workload exists: one that goes away
        # later is a count of zero, not an error in the middle of a watch.
        return scan(
            CLOSE_WAIT_ONLY,
            ports=ports,
            pids=pids,
            netns=ns,
            backend=source,
            workload=selection,
            require_workload=first,
        )

    # The first scan happens before any output, so a bad --pid or --container fails with one line and nothing else.
    pending = [take(first=True)]

    def next_snapshot() -> Snapshot:
        return pending.pop() if pending else take()

    tracker = Tracker(window=window, min_growth=min_growth, by=by)
    samples = sample_forever(next_snapshot, tracker, interval=interval, count=count)
    # Ctrl-C is how an unbounded watch ends: the KeyboardInterrupt reaches closewait.cli.main (exit 130).
    if jsonl:
        for sample in samples:
            sys.stdout.write(json.dumps(sample_dict(sample), separators=(",", ":")) + "\n")
            sys.stdout.flush()
        return
    from closewait.cli.render.watch import show

    show(samples, window, live=sys.stdout.isatty())
