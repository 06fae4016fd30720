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
from closewait.errors import UsageError
from closewait.model import Snapshot
from closewait.scanning import CLOSE_WAIT_ONLY, scan
from closewait.serialize import event_dict
from closewait.sources import get_source
from closewait.sources import netns as netns_mod
from closewait.watch import (
    DEFAULT_MIN_GROWTH,
    DEFAULT_WINDOW,
    GROUPINGS,
    Tracker,
    sample_dict,
    sample_forever,
    watch_events,
)
from closewait.workload import WorkloadSelector


@click.command(
    "watch",
    epilog=examples(
        ("closewait watch", "every process, every 2 s, until Ctrl-C"),
        ("closewait watch --by workload --jsonl -n 30 > cw.jsonl", "per container, pod or unit: 30 JSON samples"),
        ("closewait watch --events --port 8080", "each socket entering/leaving CLOSE_WAIT, and who closed it"),
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
@click.option(
    "-n", "--count", type=COUNT, metavar="N", help="Stop after N samples (events); without it, run until Ctrl-C."
)
@click.option(
    "--jsonl", "--json", "jsonl", is_flag=True, help="Print one JSON object per sample or event (docs/json.md)."
)
@click.option(
    "--events",
    is_flag=True,
    help="A line per socket entering or leaving CLOSE_WAIT, with the closing pid (BPF recorder; root).",
)
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
    events: bool,
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
    if events:
        _watch_events(count, jsonl, ports, pids, netns, by, selector_from(container, pod, namespace, unit))
        return
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


def _watch_events(
    count: int | None,
    jsonl: bool,
    ports: tuple[int, ...],
    pids: tuple[int, ...],
    netns: str | None,
    by: str,
    selection: WorkloadSelector | None,
) -> None:
    """``--events``: the recorder's feed, a line (or a JSON object) per transition, until Ctrl-C or N events."""
    if pids:
        raise UsageError("--pid does not apply to --events: a socket enters CLOSE_WAIT in no process's context")
    # The same reason holds for workloads: an entry has no process, so it has no container either.
    if selection is not None:
        raise UsageError(
            f"selecting by workload ({selection.describe()}) does not apply to --events:"
            " a socket enters CLOSE_WAIT in no process's context"
        )
    if by != "process":
        raise UsageError("--by workload does not apply to --events: each event is one socket, not a row per workload")
    path = netns_mod.resolve(netns).path if netns is not None else None
    stream = watch_events(netns=path, ports=ports, count=count)  # RecorderUnavailable: one line, exit 2
    where = f" in {path}" if path else ""
    click.echo(f"closewait watch: sockets entering and leaving CLOSE_WAIT{where}; Ctrl-C stops", err=True)
    # Ctrl-C is how it ends: the KeyboardInterrupt closes the recorder and reaches closewait.cli.main (130).
    if jsonl:
        for event in stream:
            sys.stdout.write(json.dumps(event_dict(event), separators=(",", ":")) + "\n")
            sys.stdout.flush()
        return
    from closewait.cli.render.watch import show_events

    show_events(stream)
