"""The ``closewait`` command: a thin click layer over the library.

Subcommands load lazily (``_COMMANDS``), so ``closewait scan --json`` never imports rich or
prometheus_client. ``main()`` turns every ClosewaitError and click usage error into one line on
stderr and the documented exit code (docs/cli.md); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from closewait.errors import ClosewaitError

_COMMANDS: dict[str, tuple[str, str]] = {
    "scan": ("closewait.cli.scan", "scan_command"),
    "watch": ("closewait.cli.watch", "watch_command"),
    "check": ("closewait.cli.check", "check_command"),
    "exporter": ("closewait.cli.exporter", "exporter_command"),
    "reap": ("closewait.cli.reap", "reap_command"),
    "lab": ("closewait.cli.lab", "lab_command"),
}


class _ReaderGone(Exception):
    """stdout's reader went away. Not an OSError, so click does not turn it into exit 1."""


class LazyGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as err:
            raise _ReaderGone from err

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target
        command: click.Command = getattr(importlib.import_module(module_name), attribute)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="closewait")
def cli() -> None:
    """Find, explain, fix and prevent TCP connections stuck in CLOSE_WAIT."""


#: Subcommands whose every error exits with another code than 2 (monitoring plugins: 3 = UNKNOWN).
ERROR_EXIT_CODES: dict[str, int] = {"check": 3}


def _subcommand(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the console script; returns only through sys.exit."""
    prog = "closewait"
    args = sys.argv[1:] if argv is None else argv
    error_code = ERROR_EXIT_CODES.get(_subcommand(args) or "", 2)
    try:
        # In non-standalone mode click returns the code of a ctx.exit(N) instead of exiting.
        returned = cli.main(args=args, prog_name=prog, standalone_mode=False)
        if isinstance(returned, int) and not isinstance(returned, bool):
            sys.exit(returned)
    except ClosewaitError as err:
        click.echo(f"{prog}: error: {err}", err=True)
        sys.exit(error_code if err.exit_code == 2 else err.exit_code)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except click.exceptions.Abort:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        ctx = getattr(err, "ctx", None)
        name = ctx.command_path if isinstance(ctx, click.Context) else prog
        click.echo(f"{name}: error: {err.format_message()}", err=True)
        sys.exit(error_code if err.exit_code == 2 else err.exit_code)
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    except (BrokenPipeError, _ReaderGone):
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        sys.exit(141)
    sys.exit(0)
