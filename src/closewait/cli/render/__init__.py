"""Terminal views. This package is the only part of closewait that imports rich.

One module per command (scan, watch, lab, reap, ...); the shared console lives here.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The reader went away (``| head``): exit 141 like a shell pipeline, not rich's 1.

        stdout is pointed at /dev/null first so the interpreter's final flush cannot fail again.
        """
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise SystemExit(141)


def console(stderr: bool = False) -> Console:
    """A console that does not clip tables when output goes to a file or pipe (width 200 there)."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", "200"))
    return _Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)
