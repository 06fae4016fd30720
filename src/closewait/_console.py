"""The ``closewait`` console script: a click-free fast path for ``closewait scan --json``.

Programs and monitoring checks run ``closewait scan --json`` (optionally ``--no-owners``) again and
again, and for them the whole command is the cost: interpreter start-up and imports included.
Importing click alone adds ~30 ms of CPU to a command whose other imports cost ~60 ms, so when the
arguments are exactly ``scan`` plus ``--json`` and optionally ``--no-owners`` (no value-taking
option, nothing click would have to validate) this module runs the scan itself and prints the same
bytes ``closewait.cli.scan`` would. Every other command line goes to ``closewait.cli.main``
unchanged.

The fast path keeps ``closewait.cli.main``'s contract: a ClosewaitError is one line on stderr
(``closewait: error: ...``) and its exit code, Ctrl+C exits 130, a closed stdout exits 141.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from typing import Any

_FAST_FLAGS = frozenset({"--json", "--no-owners"})


def _fast_scan_json(args: list[str]) -> bool | None:
    """``owners`` for ``scan --json [--no-owners]``, or None when click must parse the arguments."""
    if not args or args[0] != "scan":
        return None
    flags = args[1:]
    if "--json" not in flags or not _FAST_FLAGS.issuperset(flags):
        return None
    return "--no-owners" not in flags


def _defer_inspect() -> None:
    """Load the standard library's ``inspect`` only if something uses it.

    The model's dataclasses import ``dataclasses``, which imports ``inspect`` (with ast, dis,
    tokenize and linecache: ~12 ms) but calls it only to write a docstring for a class that has
    none; closewait's classes all have one. ``importlib.util.LazyLoader`` puts a module in
    ``sys.modules`` that runs its code on first attribute access, so nothing changes for code that
    does use it.
    """
    import importlib.util

    if "inspect" in sys.modules:
        return
    spec = importlib.util.find_spec("inspect")
    if spec is None or spec.loader is None:
        return
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["inspect"] = module
    loader.exec_module(module)


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the console script. It ends the process: through sys.exit, or after the fast
    path has written its output, os._exit (see below); call it in a process of its own."""
    args = sys.argv[1:] if argv is None else argv
    owners = _fast_scan_json(args)
    if owners is None:
        from closewait.cli import main as cli_main

        return cli_main(args)
    # One scan, one print, exit: a short-lived process holding no cycles worth collecting. The
    # collector would otherwise run a few dozen times over the ~100,000 objects a big scan builds.
    import gc

    gc.disable()
    # Start the kernel's dump now, before importing the model: it runs on two threads while this
    # one imports and parses. The states are those scan() asks for: CLOSE_WAIT, plus the
    # listeners when owners (and so roles) are looked up. Should they ever differ, the prefetched
    # source reads the kernel again instead.
    from closewait.sources import prefetch

    early = prefetch.start((prefetch.TCP_CLOSE_WAIT, prefetch.TCP_LISTEN) if owners else (prefetch.TCP_CLOSE_WAIT,))
    _defer_inspect()
    from closewait.errors import ClosewaitError

    try:
        from closewait.scan import CLOSE_WAIT_ONLY, scan
        from closewait.serialize import snapshot_json_chunks

        snapshot = scan(CLOSE_WAIT_ONLY, owners=owners, backend=early if early is not None else "auto")
        write = sys.stdout.write
        for chunk in snapshot_json_chunks(snapshot):
            write(chunk)
        sys.stdout.flush()
        sys.stderr.flush()
        # Everything is written: leave without the interpreter's teardown, which would free the
        # ~100,000 objects of a big scan one by one (15-30 ms on the benchmark host) for nothing.
        # No atexit handler matters here, and the prefetch thread ended with the kernel's reply.
        import os

        os._exit(0)
    except ClosewaitError as err:
        sys.stderr.write(f"closewait: error: {err}\n")
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("closewait: interrupted\n")
        sys.exit(130)
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush cannot fail again (which
        # would turn the exit code into 120).
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.stderr.close()
        sys.exit(141)
    sys.exit(0)
