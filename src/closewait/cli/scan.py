"""``closewait scan``: the sockets, grouped by workload and owning process, with a diagnosis and remedy each."""

from __future__ import annotations

import sys

import click

from closewait.cli._options import (
    backend_option,
    examples,
    filter_options,
    recorder_pins_option,
    selector_from,
    state_option,
    states_from,
    workload_options,
)
from closewait.scanning import CLOSE_WAIT_ONLY, scan
from closewait.serialize import snapshot_json
from closewait.sources.owners import OWNER_SOURCES

#: How the human table groups sockets: by container/pod/unit, then process; or by process alone.
GROUPINGS = ("workload", "process")


@click.command(
    "scan",
    epilog=examples(
        ("closewait scan --port 8080", "one service: its leaked ends and its clients'"),
        ("closewait scan --container web --wide", "one container, every socket"),
        ("closewait scan --json | jq '.sockets[]'", "for programs (docs/json.md)"),
    ),
)
@state_option
@filter_options
@workload_options
@backend_option
@click.option(
    "--no-owners", is_flag=True, help="Skip finding the owning processes (much faster on big hosts); not with --pid."
)
@click.option(
    "--owners-from",
    "owner_source",
    type=click.Choice(OWNER_SOURCES),
    default="auto",
    show_default=True,
    metavar="|".join(OWNER_SOURCES),
    help="How to find owners: a BPF iterator (one kernel pass, root), the /proc/PID/fd walk, or bpf when allowed.",
)
@click.option(
    "--no-workloads",
    is_flag=True,
    help="Skip naming each owner's container, pod or unit (docs/workloads.md); not with --container and the like.",
)
@click.option(
    "--by",
    type=click.Choice(GROUPINGS),
    default="workload",
    show_default=True,
    metavar="|".join(GROUPINGS),
    help="Group the table by workload (container, pod, unit, host), then process; or by process alone.",
)
@recorder_pins_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (docs/json.md).")
@click.option("--wide", is_flag=True, help="Show every socket, not only the first ones of each process.")
def scan_command(
    states: tuple[str, ...],
    ports: tuple[int, ...],
    pids: tuple[int, ...],
    netns: str | None,
    container: str | None,
    pod: str | None,
    namespace: str | None,
    unit: str | None,
    backend: str,
    no_owners: bool,
    owner_source: str,
    no_workloads: bool,
    by: str,
    recorder_pins: str,
    as_json: bool,
    wide: bool,
) -> None:
    """List sockets stuck in CLOSE_WAIT (or other states), who holds them, and why."""
    snapshot = scan(
        states_from(states, CLOSE_WAIT_ONLY),
        ports=ports,
        pids=pids,
        netns=netns,
        backend=backend,
        owners=not no_owners,
        owner_source=owner_source,
        workloads=not no_workloads,
        workload=selector_from(container, pod, namespace, unit),
        recorder_pins=recorder_pins,
    )
    if as_json:
        sys.stdout.write(snapshot_json(snapshot))
        return
    from closewait.cli.render.scan import print_snapshot

    print_snapshot(snapshot, wide=wide, by=by)
