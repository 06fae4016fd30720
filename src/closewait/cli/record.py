"""``closewait record``: attach the CLOSE_WAIT recorder and pin its maps until stopped.

While it runs, ``closewait scan`` (any process, root) reports the exact time each socket entered
CLOSE_WAIT. SIGTERM and SIGINT stop it: the recorder is unpinned (so detached) and a bpffs it
mounted is unmounted; exit 0 after SIGTERM, 130 after SIGINT (Ctrl-C), as docs/cli.md says.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from closewait.cli._options import Integer, StopSignals, examples, pin_dir_option
from closewait.record import remove, start
from closewait.sources.recorder import DEFAULT_CAPACITY, program_listing


@click.command(
    "record",
    epilog=examples(
        ("closewait record", "record until Ctrl-C; meanwhile scan shows exact ages"),
        ("closewait record --keep &", "leave it attached after exit (closewait record --unpin removes it)"),
        ("closewait record --ebpf", "print the BPF program it attaches, and exit"),
    ),
)
@pin_dir_option
@click.option("--keep", is_flag=True, help="On exit, leave the recorder attached and pinned.")
@click.option("--unpin", is_flag=True, help="Remove a recorder left pinned (by --keep) and exit.")
@click.option("--ebpf", is_flag=True, help="Print the BPF program (as assembled for this kernel) and exit.")
@click.option(
    "--capacity",
    type=Integer(64, 1 << 24),
    default=DEFAULT_CAPACITY,
    show_default=True,
    metavar="N",
    help="Slots for CLOSE_WAIT entry times, 16 B of kernel memory each (rounded up to a power of two): "
    "at most N sockets at once, N/2 without a drop.",
)
def record_command(pin_dir: str, keep: bool, unpin: bool, ebpf: bool, capacity: int) -> None:
    """Record when each socket enters and leaves CLOSE_WAIT (BPF, root), pinned for scan to read."""
    if ebpf:
        sys.stdout.write(program_listing() + "\n")
        return
    if unpin:
        found = remove(pin_dir)
        click.echo(f"closewait record: {'removed the recorder pinned' if found else 'no recorder pinned'} in {pin_dir}")
        return
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="closewait record: %(message)s")
    with StopSignals() as signals:
        recording = start(pin_dir, capacity=capacity)
        try:
            after = "it stays attached after that (--keep)" if keep else "that unpins it"
            click.echo(
                f"closewait record: recording, pinned in {recording.pin_dir}; stop with Ctrl-C or "
                f"kill {os.getpid()} ({after})",
                err=True,
            )
            signals.wait()
        finally:
            recording.stop(keep=keep)
    if signals.interrupted:
        click.echo("closewait: interrupted", err=True)
        sys.exit(130)  # Ctrl-C: interrupted, as every command; SIGTERM is a normal stop
