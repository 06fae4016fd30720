"""The ``closewait`` console script: a click-free fast path for ``closewait scan --json``.

Programs and monitoring checks run ``closewait scan --json`` (optionally ``--no-owners``) again and
again, and for them the whole command is the cost: interpreter start-up and imports included.
Importing click alone adds ~30 ms of CPU to a command whose other imports cost ~60 ms, so when the
arguments are exactly ``scan`` plus ``--json`` and optionally ``--no-owners``/``--no-workloads`` (no value-taking
option, nothing click would have to validate) this module runs the scan itself and prints the same
bytes ``closewait.cli.scan`` would. Every other command line goes to ``closewait.cli.main``
unchanged.

The fast path keeps ``closewait.cli.main``'s contract: a ClosewaitError is one line on stderr
(``closewait: error: ...``) and its exit code, Ctrl+C exits 130, a closed stdout exits 141.

This module also owns the process's stdout for both paths (``install_stdout``): every write reaches
the kernel whole or raises, so output that could not be written is never mistaken for success.
"""

from __future__ import annotations

import io
import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from closewait.model import Socket
    from closewait.serialize import SocketJson
    from closewait.sources.owner_check import ForkedCheck

_FAST_FLAGS = frozenset({"--json", "--no-owners", "--no-workloads"})

#: Exit code when stdout could not be written (sysexits.h EX_IOERR): stdout on a full disk, an I/O
#: error, or stdout closed (``>&-``). A reader that went away (EPIPE, ``| head``) is 141 instead.
OUTPUT_FAILED = 74


class ReaderGone(Exception):
    """stdout's reader went away (EPIPE). Not an OSError, so neither click nor rich turns it into
    exit 1. ``note`` is a line to print anyway (reap says what it did); usually there is none."""

    def __init__(self, note: str | None = None) -> None:
        super().__init__(note or "stdout was closed by its reader")
        self.note = note


class OutputFailed(Exception):
    """stdout could not be written (ENOSPC, EIO, EBADF...). ``str()`` is the one line for stderr."""


class _Stdout(io.RawIOBase):
    """fd 1 for ``sys.stdout``: each write goes to the kernel whole or raises.

    Python's own buffered stdout loses an error that follows a partial write (a pipe whose reader
    exits mid-write reports the bytes written, and the rest is silently dropped), so ``| head -c 10``
    on a large output used to exit 0. This writer loops until every byte is written and turns the
    first failure into ReaderGone or OutputFailed; later writes are discarded, so cleanup code (rich's
    Live, the interpreter's final flush) cannot fail a second time. ``failure`` stays set for
    ``check_output()``.
    """

    def __init__(self, fd: int, *, closed: bool) -> None:
        super().__init__()
        self._fd = fd
        self._closed_at_start = closed
        self.failure: ReaderGone | OutputFailed | None = None

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return not self._closed_at_start and os.isatty(self._fd)

    def write(self, data: object) -> int:
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
        size = len(view)
        if self.failure is not None:
            return size
        if self._closed_at_start:
            self._fail(OutputFailed("cannot write the output: stdout is closed"))
        while view:
            try:
                written = os.write(self._fd, view)
            except BrokenPipeError:
                self._fail(ReaderGone())
            except OSError as err:
                self._fail(OutputFailed(f"cannot write the output: {err.strerror or err}"))
            view = view[written:]
        return size

    def _fail(self, failure: ReaderGone | OutputFailed) -> None:
        self.failure = failure
        raise failure


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def install_stdout() -> None:
    """Make ``sys.stdout`` a ``_Stdout`` writer (once), and keep fds 0-2 taken.

    A standard descriptor closed by the caller (``closewait scan >&-``) is pointed at /dev/null, so
    that no socket or file this process opens later becomes fd 1 and receives the output; a closed
    stdout then fails on the first write with one clear line instead of an AttributeError.
    """
    current = sys.stdout
    if isinstance(getattr(current, "buffer", None), io.BufferedWriter) and isinstance(
        getattr(current.buffer, "raw", None), _Stdout
    ):
        return
    closed = {fd: not _fd_open(fd) for fd in (0, 1, 2)}
    for fd, is_closed in closed.items():
        if is_closed:
            devnull = os.open(os.devnull, os.O_RDWR)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
    if closed[2]:
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace")
    raw = _Stdout(1, closed=closed[1])
    encoding = getattr(current, "encoding", None) or "utf-8"
    errors = getattr(current, "errors", None) or "strict"
    if current is not None:
        try:  # noqa: SIM105 (contextlib is not imported on the fast path)
            current.flush()
        except (OSError, ValueError):
            pass
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(raw), encoding=encoding, errors=errors, line_buffering=raw.isatty())


def output_failure() -> ReaderGone | OutputFailed | None:
    """The first failure to write stdout, if any (also one a caller caught and ignored)."""
    buffer = getattr(sys.stdout, "buffer", None)
    raw = getattr(buffer, "raw", None)
    return raw.failure if isinstance(raw, _Stdout) else None


def flush_stdout() -> ReaderGone | OutputFailed | None:
    """Flush ``sys.stdout``; the first output failure of the process, or None."""
    try:
        sys.stdout.flush()
    except (ReaderGone, OutputFailed) as failure:
        return failure
    return output_failure()


def quiet_stdout() -> None:
    """After a failure: nothing more is written, and the interpreter's final flush cannot fail."""
    raw = getattr(getattr(sys.stdout, "buffer", None), "raw", None)
    if isinstance(raw, _Stdout) and raw.failure is None:
        raw.failure = ReaderGone()


def _fast_scan_json(args: list[str]) -> bool | None:
    """``owners`` for ``scan --json [--no-owners] [--no-workloads]``, or None when click must parse
    the arguments (``--no-workloads`` is read by ``main``)."""
    if not args or args[0] != "scan":
        return None
    flags = args[1:]
    if "--json" not in flags or not _FAST_FLAGS.issuperset(flags):
        return None
    return "--no-owners" not in flags


def _defer_inspect() -> None:
    """Load the standard library's ``inspect`` only if something uses it.

    The model's dataclasses import ``dataclasses``, which imports ``inspect`` (with ast, dis,
    tokenize and linecache: ~7-12 ms) but calls it only to write a docstring for a class that has
    none; closewait's classes all have one. So ``inspect`` starts as a stand-in module: the import
    statement takes it as it is, and the first attribute anyone reads from it (PEP 562's module
    ``__getattr__``) imports the real one and fills the stand-in with its names, so nothing changes
    for code that does use it. (``importlib.util.LazyLoader`` cannot do this: the import statement
    itself reads a module's ``__spec__``, which loads a lazy module there and then.)
    """
    if "inspect" in sys.modules:
        return
    import types

    stand_in = types.ModuleType("inspect", "The standard library's inspect, imported on first use.")

    def load(name: str) -> object:
        if sys.modules.get("inspect") is stand_in:
            del sys.modules["inspect"]
        import importlib

        real = importlib.import_module("inspect")
        vars(stand_in).update(vars(real))
        return getattr(real, name)

    vars(stand_in)["__getattr__"] = load
    sys.modules["inspect"] = stand_in


def _while_waiting(ahead: SocketJson, *, warm_up: bool) -> Callable[[list[Socket]], None]:
    """What the console does while the kernel's walk keeps the dump's next reply waiting: write the
    JSON of the sockets parsed so far (``ahead``), and the first time, when workloads will be named,
    import the resolver's modules (~3.5 ms), which the scan would otherwise import after the dump,
    when nothing else runs beside it."""
    pending = [warm_up]

    def idle(batch: list[Socket]) -> None:
        ahead.add(batch)
        if pending[0]:
            pending[0] = False
            import closewait.sources.attribution  # noqa: F401 (imported for the scan to find)

    return idle


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the console script. It ends the process: through sys.exit, or after the fast
    path has written its output, os._exit (see below); call it in a process of its own."""
    args = sys.argv[1:] if argv is None else argv
    owners = _fast_scan_json(args)
    if owners is None:
        from closewait.cli import main as cli_main

        return cli_main(args)
    workloads = "--no-workloads" not in args
    install_stdout()
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

    forked: ForkedCheck | None = None
    try:
        # Programs run this command in loops: as root, owners a full pass found a few seconds ago
        # are re-checked instead of walking every fd table again (sources/owner_cache.py). The
        # re-check's readlinks depend on neither the dump nor the model: a child process does them
        # now, while this one imports and parses (sources/owner_check.py).
        owner_cache = None
        if owners:
            from closewait.sources.owner_cache import file_cache
            from closewait.sources.owner_check import fork_check

            owner_cache = file_cache()
            if owner_cache is not None:
                owner_cache.checking = forked = fork_check(owner_cache)
        from closewait.scanning import CLOSE_WAIT_ONLY, scan
        from closewait.serialize import SocketJson, snapshot_json_chunks

        # While the kernel's walk keeps the dump's next reply waiting, write the JSON of the sockets
        # already parsed: work taken off the end of the command, the same bytes.
        ahead = SocketJson()
        if early is not None:
            early.while_waiting = _while_waiting(ahead, warm_up=owners and workloads)
        snapshot = scan(
            CLOSE_WAIT_ONLY,
            owners=owners,
            backend=early if early is not None else "auto",
            workloads=workloads,
            owner_cache=owner_cache,
        )
        write = sys.stdout.write
        for chunk in snapshot_json_chunks(snapshot, ahead):
            write(chunk)
        sys.stdout.flush()
        sys.stderr.flush()
        if forked is not None:
            forked.cancel()  # joined by the owner lookup, unless the scan found nothing to look up
        # Everything is written: leave without the interpreter's teardown, which would free the
        # ~100,000 objects of a big scan one by one (15-30 ms on the benchmark host) for nothing.
        # No atexit handler matters here, and the prefetch thread ended with the kernel's reply.
        os._exit(0)
    except ClosewaitError as err:
        sys.stderr.write(f"closewait: error: {err}\n")
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("closewait: interrupted\n")
        sys.exit(130)
    except ReaderGone:
        sys.exit(141)
    except OutputFailed as err:
        sys.stderr.write(f"closewait: error: {err}\n")
        sys.exit(OUTPUT_FAILED)
    finally:
        if forked is not None:
            forked.cancel()
    sys.exit(0)
