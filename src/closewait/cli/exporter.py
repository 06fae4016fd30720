"""``closewait exporter``: serve CLOSE_WAIT metrics for Prometheus at http://HOST:PORT/metrics.

Binds to loopback unless told otherwise. A bad ``--listen`` or a port in use is one line on stderr
and exit 2, before anything is served. SIGTERM and SIGINT stop it cleanly: the listening socket is
closed, in-flight scrapes finish; exit 0 after SIGTERM, 130 after SIGINT (Ctrl-C), as docs/cli.md says.
"""

from __future__ import annotations

import logging
import sys

import click

from closewait.cli._options import (
    DAY_S,
    Integer,
    Seconds,
    StopSignals,
    examples,
    netns_option,
    refuse_non_ascii_digits,
)
from closewait.errors import UsageError
from closewait.exporter import (
    DEFAULT_LISTEN,
    DEFAULT_MIN_INTERVAL,
    DEFAULT_TOP_N,
    CloseWaitCollector,
    MetricsServer,
    build_registry,
    parse_listen,
)
from closewait.exporter.http import HttpLimits
from closewait.sources.recorder import DEFAULT_PIN_DIR


@click.command(
    "exporter",
    epilog=examples(
        ("closewait exporter", "http://127.0.0.1:9947/metrics"),
        ("closewait exporter --listen 0.0.0.0:9947 --all-netns", "every interface, every network namespace"),
        ("closewait exporter --listen [::1]:0 --top 50", "IPv6 loopback, any free port"),
    ),
)
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="Address to serve /metrics on; [::1]:PORT for IPv6, port 0 for any free port.",
)
@click.option(
    "--all-netns",
    is_flag=True,
    help="Cover every network namespace on the host (containers); adds a netns label. Needs root/CAP_SYS_ADMIN.",
)
@netns_option(
    "Scan this network namespace instead of the exporter's own: a pid in it, /proc/PID/ns/net or /run/netns/NAME."
)
@click.option(
    "--top",
    "top_n",
    type=Integer(0, 1_000_000),
    default=DEFAULT_TOP_N,
    show_default=True,
    metavar="N",
    help=(
        "Workloads (containers, pods, units) with their own series, and process rows within each;"
        ' the rest are summed into process="other".'
    ),
)
@click.option(
    "--pid-label",
    is_flag=True,
    help="Add a pid label: one series per process instead of per workload and process name (churns on restarts).",
)
@click.option(
    "--min-interval",
    type=Seconds(min=0, max=DAY_S),
    default=DEFAULT_MIN_INTERVAL,
    show_default=True,
    metavar="SECONDS",
    help=(
        "Reuse a scan younger than this; concurrent scrapes share one scan. 0 scans on every request:"
        " then any client that can connect triggers a full scan of the host (as root: all of /proc) per request."
    ),
)
@click.option(
    "--recorder",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help=(
        "The CLOSE_WAIT recorder (BPF, root): close-time histograms, entered/left counters, per-state counts"
        " without a dump. auto: attach if possible, else say why once; on: refuse to start without it."
    ),
)
@click.option(
    "--recorder-pin-dir",
    default=DEFAULT_PIN_DIR,
    show_default=True,
    metavar="DIR",
    help="Where the recorder is pinned (a bpffs is mounted on its parent if needed), for `closewait scan`.",
)
def exporter_command(
    listen: str,
    all_netns: bool,
    netns: str | None,
    top_n: int,
    pid_label: bool,
    min_interval: float,
    recorder: str,
    recorder_pin_dir: str,
) -> None:
    """Serve CLOSE_WAIT metrics (per state; per workload and process; per namespace) for Prometheus."""
    # The collector logs failed scans and skipped namespaces; an operator reads them in the journal.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="closewait exporter: %(message)s")
    host, port = _listen_address(listen)
    limits = HttpLimits.from_environ()  # CLOSEWAIT_EXPORTER_HTTP=name=value,... (docs/monitoring.md)
    collector = CloseWaitCollector(
        top_n=top_n,
        min_interval=min_interval,
        all_netns=all_netns,
        netns=netns,
        pid_label=pid_label,
        recorder=recorder,
        recorder_pin_dir=recorder_pin_dir,
    )
    try:
        server = MetricsServer(build_registry(collector), host, port, limits)
    except BaseException:
        collector.close()
        raise
    with StopSignals() as signals:
        server.start()
        click.echo(f"closewait exporter: serving {server.url}", err=True)
        try:
            signals.wait()
        finally:
            server.stop()
            collector.close()
    click.echo("closewait exporter: stopped", err=True)
    if signals.interrupted:
        sys.exit(130)  # Ctrl-C: interrupted, as every command (docs/cli.md); SIGTERM is a normal stop


def _listen_address(text: str) -> tuple[str, int]:
    refuse_non_ascii_digits(text, "--listen")
    try:
        return parse_listen(text)
    except UnicodeError:
        # An empty or over-long DNS label ("a..b", ".", 64 characters) fails in the idna codec.
        raise UsageError(
            f"--listen {text!r}: not a valid host name (empty or over-long label); give an IP address or a name"
        ) from None
