"""``closewait check``: a Nagios/Icinga/Sensu/Zabbix-style plugin for CLOSE_WAIT.

Prints one status line with perfdata and exits 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN. Every error
is UNKNOWN, exit 3: a bad threshold value, unknown pid or missing permission prints
``CLOSEWAIT UNKNOWN - reason`` on stdout (monitoring systems read stdout); a malformed flag is
click's one line on stderr (``ERROR_EXIT_CODES`` in ``closewait.cli`` maps exit 2 to 3 here). The logic is in
``closewait.check``; this module only parses flags, scans and prints.
"""

from __future__ import annotations

import sys

import click

from closewait.check import Status, Thresholds, evaluate
from closewait.cli._options import backend_option, filter_options
from closewait.errors import ClosewaitError
from closewait.scan import CLOSE_WAIT_ONLY, scan


@click.command("check")
@click.option("-w", "--warning", type=int, metavar="N", help="WARNING when the CLOSE_WAIT count is above N.")
@click.option("-c", "--critical", type=int, metavar="N", help="CRITICAL when the CLOSE_WAIT count is above N.")
@click.option(
    "--per-process",
    is_flag=True,
    help="Apply --warning/--critical to the process holding the most CLOSE_WAIT sockets, not the host total.",
)
@click.option(
    "--max-age",
    type=float,
    metavar="SECONDS",
    help="WARNING when a CLOSE_WAIT socket has been idle (peer silent since its FIN) longer than this.",
)
@click.option("--max-age-critical", type=float, metavar="SECONDS", help="CRITICAL for the same, above this.")
@filter_options
@backend_option
def check_command(
    warning: int | None,
    critical: int | None,
    per_process: bool,
    max_age: float | None,
    max_age_critical: float | None,
    ports: tuple[int, ...],
    pids: tuple[int, ...],
    netns: str | None,
    backend: str,
) -> None:
    """Monitoring plugin: OK/WARNING/CRITICAL on CLOSE_WAIT count and age (exit 0/1/2, 3 on error)."""
    try:
        thresholds = Thresholds(
            warning=warning,
            critical=critical,
            per_process=per_process,
            max_age_s=max_age,
            max_age_critical_s=max_age_critical,
        )
        snapshot = scan(CLOSE_WAIT_ONLY, ports=ports, pids=pids, netns=netns, backend=backend)
    except ClosewaitError as err:
        # Monitoring systems read the plugin's stdout: the reason goes there, as the status line.
        click.echo(f"CLOSEWAIT UNKNOWN - {err}")
        sys.exit(int(Status.UNKNOWN))
    result = evaluate(snapshot, thresholds)
    click.echo(result.line())
    sys.exit(int(result.status))
