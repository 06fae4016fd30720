"""``closewait reap``: release a running process's CLOSE_WAIT sockets, a thin layer over closewait.reap.

It always plans first; without ``--yes`` it prints the plan and changes nothing. With ``--yes`` it
decides, then acts, then writes: what is released never depends on whether the output could be
written (``reap --yes | head -1`` used to release nothing, the plan's print having failed first). An
output failure after acting is one line on stderr with what was done, and exit 141 (reader gone) or
74 (stdout not writable). ``--netns`` and ``--all-netns`` survey other network namespaces
(``reap.survey``, ``reap.survey_all_netns``); the plan names each socket's. Exit codes
(docs/reap.md): 0 everything planned was released, or a dry run, or nothing matched; 1 some socket
was skipped or failed; 2 bad usage, missing permission, no such process, or an unsupported kernel.
"""

from __future__ import annotations

import ipaddress
import json
import sys

import click

from closewait import reap
from closewait._console import OutputFailed, ReaderGone
from closewait.cli._options import (
    DURATION,
    PID,
    examples,
    netns_option,
    port_option,
    refuse_non_ascii_digits,
    selector_from,
    workload_options,
)
from closewait.errors import UsageError


@click.command(
    "reap",
    epilog=examples(
        ("closewait reap --pid 1234 --netns 1234", "the plan only (in pid 1234's network namespace)"),
        ("closewait reap --container web --older-than 10m --yes", "one container's, idle over 10 minutes"),
        ("closewait reap --all --port 8080 --yes", "every process's CLOSE_WAIT on port 8080"),
    ),
)
@click.option(
    "--pid", "pids", multiple=True, type=PID, metavar="PID", help="Process whose sockets to release (repeatable)."
)
@port_option
@click.option(
    "--remote",
    metavar="ADDR[:PORT]",
    help="Only sockets whose peer is this address or network (10.0.0.0/8); IPv6 with a port as [::1]:80.",
)
@click.option(
    "--older-than",
    "older_than_ms",
    type=DURATION,
    metavar="DURATION",
    help="Only sockets idle at least this long (500ms, 30s, 5m, 1h, 1m30s).",
)
@click.option(
    "--method",
    type=click.Choice([m.value for m in reap.Method]),
    default=reap.Method.SHUTDOWN.value,
    show_default=True,
    metavar="|".join(m.value for m in reap.Method),
    help="shutdown: pidfd_getfd + shutdown() (FIN, Linux 5.6+); destroy: SOCK_DESTROY (RST, CAP_NET_ADMIN).",
)
@workload_options
@netns_option(
    "Reap in this network namespace: its name under /run/netns, a pid in it, or /proc/PID/ns/net (root).",
    metavar="NAME|PID|PATH",
)
@click.option(
    "--all-netns",
    is_flag=True,
    help="Reap in every network namespace some process is in (root); not with --netns.",
)
@click.option(
    "--all",
    "all_processes",
    is_flag=True,
    help="Any process's sockets (needs --port, --remote, --older-than or a workload).",
)
@click.option("--yes", is_flag=True, help="Act on the plan. Without it, only the plan is printed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the plan, and the outcomes with --yes).")
def reap_command(
    pids: tuple[int, ...],
    ports: tuple[int, ...],
    remote: str | None,
    older_than_ms: int | None,
    method: str,
    container: str | None,
    pod: str | None,
    namespace: str | None,
    unit: str | None,
    netns: str | None,
    all_netns: bool,
    all_processes: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Release CLOSE_WAIT sockets of a running process without restarting it.

    Prints the plan (sockets, fds, method) and changes nothing unless --yes is given. With --yes it
    acts first and prints the plan and the outcomes after.
    """
    if all_netns and netns is not None:
        raise UsageError("give --all-netns or --netns, not both")
    remote_filter = _remote_filter(remote) if remote is not None else None
    # Validate before touching the kernel, so a bad combination is one line even without privileges.
    selection = selector_from(container, pod, namespace, unit)
    reap.ReapCriteria(
        frozenset(pids), frozenset(ports), remote_filter, older_than_ms, all_processes, selection
    ).validate()
    if all_netns:
        snapshots = reap.survey_all_netns(pids=pids, ports=ports, workload=selection)
    else:
        snapshots = (reap.survey(pids=pids, ports=ports, workload=selection, netns=netns),)
    reap_plan = reap.plan(
        snapshots,
        pids=pids,
        ports=ports,
        remote=remote_filter,
        older_than_ms=older_than_ms,
        method=method,
        all_processes=all_processes,
        workload=selection,
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
    # Decided; now act, and only then write: the output can fail (a closed pipe, a full disk), the
    # action must not depend on it.
    result = reap.apply(reap_plan)
    try:
        if as_json:
            _print_json({**result.as_dict(), "applied": True})
        else:
            view.print_plan(reap_plan, dry_run=False)
            view.print_result(result)
        sys.stdout.flush()
    except (ReaderGone, BrokenPipeError) as err:
        raise ReaderGone(f"stdout was closed early; the reap was carried out: {_summary(result)}") from err
    except OutputFailed as err:
        raise OutputFailed(f"{err}; the reap was carried out: {_summary(result)}") from err
    except SystemExit as err:  # rich's broken-pipe handler exits 141 itself
        if err.code == 141:
            raise ReaderGone(f"stdout was closed early; the reap was carried out: {_summary(result)}") from err
        raise
    sys.exit(result.exit_code)


def _summary(result: reap.ReapResult) -> str:
    return f"released {len(result.done)}, skipped {len(result.skipped)}, failed {len(result.failed)}"


def _remote_filter(text: str) -> reap.RemoteFilter:
    """``--remote``; an unbracketed IPv6 address followed by what could be a port is refused as
    ambiguous (``::1:80`` is both the address ::1:80 and port 80 of ::1)."""
    refuse_non_ascii_digits(text, "--remote")
    raw = text.strip()
    if not raw.startswith("[") and raw.count(":") > 1:
        head, _, tail = raw.rpartition(":")
        if tail.isdigit() and _is_address(head):
            raise UsageError(
                f"bad --remote {text!r}: ambiguous: write [{head}]:{tail} for port {tail} of {head}, "
                f"or [{raw}] for the address {raw}"
            )
    return reap.RemoteFilter.parse(text)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _print_json(data: dict[str, object]) -> None:
    json.dump(data, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")
