"""``closewait reap``: release a running process's CLOSE_WAIT sockets, a thin layer over closewait.reap.

It always plans first and prints the plan; it acts only with ``--yes``. Exit codes (docs/reap.md):
0 everything planned was released, or a dry run, or nothing matched; 1 some socket was skipped or
failed; 2 bad usage, missing permission, no such process, or an unsupported kernel.
"""

from __future__ import annotations

import json
import sys

import click

from closewait import reap
from closewait.cli._options import PORT


@click.command("reap")
@click.option("--pid", "pids", multiple=True, type=click.IntRange(min=1), help="Process whose sockets to release.")
@click.option("--port", "ports", multiple=True, type=PORT, help="Only sockets with this local or remote port.")
@click.option("--remote", metavar="ADDR[:PORT]", help="Only sockets whose peer is this address or network.")
@click.option("--older-than", metavar="DURATION", help="Only sockets idle at least this long (30s, 5m, 1h, 500ms).")
@click.option(
    "--method",
    type=click.Choice([m.value for m in reap.Method]),
    default=reap.Method.SHUTDOWN.value,
    show_default=True,
    help="shutdown: pidfd_getfd + shutdown() (FIN, Linux 5.6+); destroy: SOCK_DESTROY (RST, CAP_NET_ADMIN).",
)
@click.option(
    "--all", "all_processes", is_flag=True, help="Any process's sockets (needs --port, --remote or --older-than)."
)
@click.option("--yes", is_flag=True, help="Act on the plan. Without it, only the plan is printed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the plan, and the outcomes with --yes).")
def reap_command(
    pids: tuple[int, ...],
    ports: tuple[int, ...],
    remote: str | None,
    older_than: str | None,
    method: str,
    all_processes: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Release CLOSE_WAIT sockets of a running process without restarting it.

    Prints the plan (sockets, fds, method) and changes nothing unless --yes is given.
    """
    older_than_ms = reap.parse_duration(older_than) if older_than is not None else None
    remote_filter = reap.RemoteFilter.parse(remote) if remote is not None else None
    # Validate before touching the kernel, so a bad combination is one line even without privileges.
    reap.ReapCriteria(frozenset(pids), frozenset(ports), remote_filter, older_than_ms, all_processes).validate()
    snapshot = reap.survey(pids=pids, ports=ports)
    reap_plan = reap.plan(
        snapshot,
        pids=pids,
        ports=ports,
        remote=remote_filter,
        older_than_ms=older_than_ms,
        method=method,
        all_processes=all_processes,
    )
    from closewait.cli.render import reap as view

    if not reap_plan.targets:
        if as_json:
            _print_json({**reap_plan.as_dict(), "applied": False})
        else:
            view.print_nothing(reap_plan)
        return
    if not yes:
        if as_json:
            _print_json({**reap_plan.as_dict(), "applied": False})
        else:
            view.print_plan(reap_plan, dry_run=True)
        return
    if not as_json:
        view.print_plan(reap_plan, dry_run=False)
    result = reap.apply(reap_plan)
    if as_json:
        _print_json({**result.as_dict(), "applied": True})
    else:
        view.print_result(result)
    sys.exit(result.exit_code)


def _print_json(data: dict[str, object]) -> None:
    json.dump(data, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")
