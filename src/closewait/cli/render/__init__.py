"""Terminal views. This package is the only part of closewait that imports rich.

One module per command (scan, watch, lab, reap, ...); the shared console lives here.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console


def console(stderr: bool = False) -> Console:
    """A console that does not clip tables when output goes to a file or pipe (width 200 there)."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", "200"))
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)
