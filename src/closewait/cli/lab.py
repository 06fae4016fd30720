"""``closewait lab``: run the article's experiments on this kernel and report them.

Exit codes: 0 every experiment ran (skipped ones count as fine), 1 at least one experiment is an
error, 2 a bad argument (including an --html path that cannot be written, found before the lab runs),
74 the report could not be written after all, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import click

from closewait._console import OutputFailed
from closewait.cli._options import Integer, examples
from closewait.errors import ClosewaitError, UsageError
from closewait.lab import DEFAULT_TRIALS
from closewait.lab.model import PARTS, Experiment


def _open_report(path: Path) -> bool:
    """Fail before running the lab, not after, when the HTML report cannot be written: open it for
    writing now (appending, so an existing report survives a failed run) and write nothing to it,
    which procfs and full devices refuse (``/proc/version``: EIO). True when this created the file."""
    if not str(path).isprintable():
        raise UsageError(f"--html {str(path)!r}: a file name with control characters is refused")
    try:
        existed = os.path.lexists(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
    except IsADirectoryError:
        raise UsageError(f"--html {path}: is a directory") from None
    except FileNotFoundError:
        raise UsageError(f"--html {path}: directory {path.parent} does not exist") from None
    except OSError as err:
        raise UsageError(f"--html {path}: cannot write it: {err.strerror or err}") from None
    try:
        os.write(fd, b"")
    except OSError as err:
        raise UsageError(f"--html {path}: cannot write it: {err.strerror or err}") from None
    finally:
        os.close(fd)
    return not existed


@click.command(
    "lab",
    epilog=examples(
        ("closewait lab", "every part, about 10-15 s"),
        ("closewait lab teardown --json", "the close()/shutdown() table as JSON"),
        ("closewait lab --html lab.html --full", "wait out kernel timers too, and write an HTML report"),
    ),
)
@click.argument("parts", nargs=-1, type=click.Choice(PARTS), metavar="[reproduce|remedies|teardown]...")
@click.option("--full", is_flag=True, help="Wait out kernel timers (tcp_fin_timeout, keepalive): minutes, not seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (docs/lab.md) instead of the report.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PATH",
    help="Also write a self-contained HTML report (diagrams, charts) to PATH.",
)
@click.option(
    "--trials",
    type=Integer(1, 100),
    default=DEFAULT_TRIALS,
    show_default=True,
    metavar="N",
    help="Trials per remedy, 1-100.",
)
@click.option("--no-capture", is_flag=True, help="Do not capture packets; use states and errno as evidence.")
def lab_command(
    parts: tuple[str, ...],
    full: bool,
    as_json: bool,
    html_path: Path | None,
    trials: int,
    no_capture: bool,
) -> None:
    """Reproduce CLOSE_WAIT, prove each remedy, and check close() vs shutdown() on this kernel.

    Runs every part unless some are named. Talks only over the loopback and leaves nothing behind.
    """
    from closewait import lab

    _quiet_logging()
    created = _open_report(html_path) if html_path is not None else False
    _adopt_orphans()
    progress = None if as_json else _progress
    try:
        report = lab.run(
            parts,
            full=full,
            trials=trials,
            capture=not no_capture,
            progress=progress,
        )
    except KeyboardInterrupt:
        _end_adopted()
        if created and html_path is not None:
            with contextlib.suppress(OSError):
                html_path.unlink()
        _exit_interrupted()
    _end_adopted()
    html_error = None
    if html_path is not None:
        from closewait.lab.html import render_html

        try:
            html_path.write_text(render_html(report), encoding="utf-8")
        except OSError as err:
            html_error = f"cannot write the HTML report {html_path}: {err.strerror or err}"
    if as_json:
        from closewait.lab.report import report_dict

        json.dump(report_dict(report), sys.stdout, separators=(",", ":"))
        sys.stdout.write("\n")
    else:
        from closewait.cli.render.lab import print_report

        print_report(report)
    if html_error is not None:
        raise OutputFailed(html_error)
    if html_path is not None:
        click.echo(f"wrote {html_path}", err=True)
    if not report.ok:
        sys.exit(1)


def _adopt_orphans() -> None:
    """Become a child subreaper: a grandchild whose parent dies (cc1 after a killed cc, a server's
    helper) is re-parented to this process instead of init, so ``_end_adopted`` can end it. Only
    the command does this; ``closewait.lab.run`` inside another program must not change it."""
    from closewait.sources.process import set_child_subreaper

    with contextlib.suppress(ClosewaitError):
        set_child_subreaper()


def _end_adopted() -> None:
    """End, by pid, every child process still left once the lab's context is closed, and reap it."""
    from closewait.sources.process import child_pids

    me = os.getpid()
    for _ in range(3):  # a killed child's own children are adopted next: a few rounds at most
        orphans = child_pids(me)
        if not orphans:
            return
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in orphans:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


class _OneLine(logging.Formatter):
    """Library warnings as one line each; the report already says which experiment failed and why."""

    def format(self, record: logging.LogRecord) -> str:
        return f"closewait lab: {record.getMessage()}"


def _quiet_logging() -> None:
    """Without this, Python's last-resort handler prints each failed experiment's traceback.
    CLOSEWAIT_DEBUG=1 keeps the tracebacks (and debug messages) for bug reports."""
    root = logging.getLogger("closewait")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("CLOSEWAIT_DEBUG"):
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.setLevel(logging.DEBUG)
    else:
        handler.setFormatter(_OneLine())
        root.setLevel(logging.WARNING)
    root.addHandler(handler)


def _exit_interrupted() -> NoReturn:
    """Exit 130 now. lab.run() has already ended every child process and closed its context; what
    may remain are worker threads of the interrupted part blocked in bounded waits, which a normal
    interpreter exit would join (concurrent.futures does) for seconds. Nothing is left for them to
    do, and the kernel closes their sockets when the process exits."""
    click.echo("closewait: interrupted", err=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(130)


def _progress(part: str, results: Sequence[Experiment]) -> None:
    if sys.stderr.isatty():
        click.echo(f"lab: {part} done ({len(results)} experiments)", err=True)


__all__ = ["lab_command"]
