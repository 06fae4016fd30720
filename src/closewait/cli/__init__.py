"""The ``closewait`` command: a thin click layer over the library.

Subcommands load lazily (``_COMMANDS``), so ``closewait scan --json`` never imports rich or
prometheus_client. ``main()`` turns every ClosewaitError and click usage error into one line on
stderr and the documented exit code (docs/cli.md), and so an unwritable stdout (74; 141 when its
reader went away) and Ctrl-C (130). Anything else is a bug and keeps its traceback, except in
``check``: a monitoring plugin reports its own failure as UNKNOWN (3).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from closewait._console import OUTPUT_FAILED, OutputFailed, ReaderGone, flush_stdout, install_stdout, quiet_stdout
from closewait.errors import ClosewaitError

_COMMANDS: dict[str, tuple[str, str]] = {
    "scan": ("closewait.cli.scan", "scan_command"),
    "watch": ("closewait.cli.watch", "watch_command"),
    "check": ("closewait.cli.check", "check_command"),
    "exporter": ("closewait.cli.exporter", "exporter_command"),
    "reap": ("closewait.cli.reap", "reap_command"),
    "lab": ("closewait.cli.lab", "lab_command"),
    "record": ("closewait.cli.record", "record_command"),
}


class _Interrupted(Exception):
    """Ctrl+C inside a command. Not a KeyboardInterrupt, so click does not print an empty line first."""


class LazyGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as err:
            raise ReaderGone from err
        except KeyboardInterrupt as err:
            raise _Interrupted from err

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target
        command: click.Command = getattr(importlib.import_module(module_name), attribute)
        return command


EPILOG = """\b
Examples:
  closewait scan             # every CLOSE_WAIT socket, by process, with a diagnosis and a fix
  closewait watch -i 10      # is it growing? a leak verdict per process
  closewait reap --pid 1234  # what releasing them would do (add --yes to act)

Each command's --help ends with its own examples. Exit codes: docs/cli.md.
"""


@click.group(
    cls=LazyGroup,
    invoke_without_command=True,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="closewait")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Find, explain, fix and prevent TCP connections stuck in CLOSE_WAIT."""
    if ctx.invoked_subcommand is None:
        # ``closewait`` alone is a request for help, not a mistake.
        click.echo(ctx.get_help())


#: Subcommands whose every error exits with another code than 2 (monitoring plugins: 3 = UNKNOWN).
ERROR_EXIT_CODES: dict[str, int] = {"check": 3}


def _subcommand(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _exit_code(value: object) -> int:
    """What ``sys.exit(value)`` would exit with."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    click.echo(str(value), err=True)
    return 1


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the console script; returns only through sys.exit.

    Every ClosewaitError and click usage error is one line on stderr and the documented exit code
    (docs/cli.md); so is a stdout that cannot be written (74, or 141 quietly when its reader went
    away). For ``check`` every failure, a bug included, is UNKNOWN (3) with a one-line reason.
    """
    install_stdout()
    args = sys.argv[1:] if argv is None else argv
    command = _subcommand(args) or ""
    code = _run(args, error_code=ERROR_EXIT_CODES.get(command, 2), plugin=command == "check")
    failure = flush_stdout()
    if isinstance(failure, ReaderGone) and code != 141:
        if failure.note:
            click.echo(f"closewait: {failure.note}", err=True)
        code = 141
    elif isinstance(failure, OutputFailed) and code != OUTPUT_FAILED and command != "check":
        click.echo(f"closewait: error: {failure}", err=True)
        code = OUTPUT_FAILED
    elif isinstance(failure, OutputFailed) and command == "check" and code != 3:
        click.echo(f"closewait: error: {failure}", err=True)
        code = 3
    quiet_stdout()
    sys.exit(code)


def _run(args: list[str], *, error_code: int, plugin: bool) -> int:
    prog = "closewait"
    try:
        # In non-standalone mode click returns the code of a ctx.exit(N) instead of exiting.
        return _exit_code(cli.main(args=args, prog_name=prog, standalone_mode=False))
    except SystemExit as exit_:
        return _exit_code(exit_.code)
    except ClosewaitError as err:
        click.echo(f"{prog}: error: {err}", err=True)
        return error_code if plugin or err.exit_code == 2 else err.exit_code
    except click.exceptions.Exit as exit_:
        return exit_.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt, _Interrupted):
        click.echo(f"{prog}: interrupted", err=True)
        return 130
    except click.ClickException as err:
        ctx = getattr(err, "ctx", None)
        name = ctx.command_path if isinstance(ctx, click.Context) else prog
        click.echo(f"{name}: error: {err.format_message()}", err=True)
        return error_code if plugin or err.exit_code == 2 else err.exit_code
    except (BrokenPipeError, ReaderGone) as gone:
        note = gone.note if isinstance(gone, ReaderGone) else None
        if note:
            click.echo(f"{prog}: {note}", err=True)
        quiet_stdout()
        return 141
    except OutputFailed as err:
        click.echo(f"{prog}: error: {err}", err=True)
        return 3 if plugin else OUTPUT_FAILED
    except Exception as err:
        if not plugin or os.environ.get("CLOSEWAIT_DEBUG"):
            raise
        # A monitoring plugin's own failure is UNKNOWN, never a traceback read as WARNING (exit 1).
        click.echo(f"CLOSEWAIT UNKNOWN - internal error: {type(err).__name__}: {err}".splitlines()[0])
        return 3
