"""``closewait check``: a Nagios/Icinga/Sensu/Zabbix-style plugin for CLOSE_WAIT.

Prints one status line with perfdata and exits 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN. Every error,
an internal one included, is UNKNOWN, exit 3: a bad threshold value, unknown pid or missing permission prints
``CLOSEWAIT UNKNOWN - reason`` on stdout (monitoring systems read stdout); a malformed flag is
click's one line on stderr (``ERROR_EXIT_CODES`` in ``closewait.cli`` maps exit 2 to 3 here). The logic is in
``closewait.check``; this module only parses flags, scans and prints.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import click

from closewait._console import OutputFailed, ReaderGone
from closewait.check import Status, Thresholds, evaluate
from closewait.cli._options import (
    INT_MAX,
    Integer,
    Seconds,
    backend_option,
    examples,
    filter_options,
    selector_from,
    workload_options,
)
from closewait.errors import ClosewaitError
from closewait.scanning import CLOSE_WAIT_ONLY, scan

#: The count thresholds used when none at all is given (docs/cli.md): check never silently says OK
#: without a threshold.
DEFAULT_WARNING = 100
DEFAULT_CRITICAL = 500


@click.command(
    "check",
    epilog=examples(
        ("closewait check -w 100 -c 500", "the host total (also what check alone uses)"),
        ("closewait check --per-workload -w 20 -c 100 --max-age 3600", "the worst container/pod/unit, the oldest"),
        ("closewait check --port 8080 --max-age 600", "one service: WARNING past 10 min idle"),
    ),
)
@click.option(
    "-w",
    "--warning",
    type=Integer(max=INT_MAX),
    metavar="N",
    help=f"WARNING when the CLOSE_WAIT count is above N. With no threshold at all: -w {DEFAULT_WARNING}.",
)
@click.option(
    "-c",
    "--critical",
    type=Integer(max=INT_MAX),
    metavar="N",
    help=f"CRITICAL when the CLOSE_WAIT count is above N. With no threshold at all: -c {DEFAULT_CRITICAL}.",
)
@click.option(
    "--per-process",
    is_flag=True,
    help="Apply --warning/--critical to the process holding the most CLOSE_WAIT sockets, not the host total.",
)
@click.option(
    "--max-age",
    type=Seconds(),
    metavar="SECONDS",
    help="WARNING when a CLOSE_WAIT socket has been idle (peer silent since its FIN) longer than this.",
)
@click.option(
    "--per-workload",
    is_flag=True,
    help="Apply --warning/--critical to the container, pod or unit holding the most CLOSE_WAIT sockets; "
    "perfdata per workload.",
)
@click.option(
    "--perfdata-top",
    type=Integer(0, 1000),
    default=10,
    show_default=True,
    metavar="N",
    help="With --per-workload: perfdata for the N workloads holding the most sockets (the rest are counted).",
)
@click.option("--max-age-critical", type=Seconds(), metavar="SECONDS", help="CRITICAL for the same, above this.")
@filter_options
@workload_options
@backend_option
def check_command(
    warning: int | None,
    critical: int | None,
    per_process: bool,
    max_age: float | None,
    per_workload: bool,
    perfdata_top: int,
    max_age_critical: float | None,
    ports: tuple[int, ...],
    pids: tuple[int, ...],
    netns: str | None,
    container: str | None,
    pod: str | None,
    namespace: str | None,
    unit: str | None,
    backend: str,
) -> None:
    """Monitoring plugin: OK/WARNING/CRITICAL on CLOSE_WAIT count and age (exit 0/1/2, 3 on error).

    With no threshold at all (none of -w, -c, --max-age, --max-age-critical), the count thresholds
    are -w 100 -c 500.
    """
    if warning is None and critical is None and max_age is None and max_age_critical is None:
        warning, critical = DEFAULT_WARNING, DEFAULT_CRITICAL
    try:
        thresholds = Thresholds(
            warning=warning,
            critical=critical,
            per_process=per_process,
            max_age_s=max_age,
            max_age_critical_s=max_age_critical,
            per_workload=per_workload,
            perfdata_top=perfdata_top,
        )
        selection = selector_from(container, pod, namespace, unit)
        snapshot = scan(CLOSE_WAIT_ONLY, ports=ports, pids=pids, netns=netns, backend=backend, workload=selection)
        result = evaluate(snapshot, thresholds)
    except ClosewaitError as err:
        # Monitoring systems read the plugin's stdout: the reason goes there, as the status line.
        _unknown(str(err))
    except (ReaderGone, OutputFailed):
        raise
    except Exception as err:
        # Anything unexpected is UNKNOWN (3), never a traceback whose exit 1 would read as WARNING.
        if os.environ.get("CLOSEWAIT_DEBUG"):
            raise
        _unknown(f"internal error: {type(err).__name__}: {err}")
    click.echo(result.line())
    sys.exit(int(result.status))


def _unknown(reason: str) -> NoReturn:
    lines = reason.splitlines() or [""]
    click.echo(f"CLOSEWAIT UNKNOWN - {lines[0]}")
    sys.exit(int(Status.UNKNOWN))
