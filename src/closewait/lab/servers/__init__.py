"""The lab's server programs and how the lab starts them and listens to them.

The programs run as child processes (never threads of the lab: a process that exits, is killed or
leaks descriptors is the whole point):

- ``leaky.py``: the article's leaking server, ported line for line to Python.
- ``article_server.c``: the article's C program itself, built with the system C compiler into the
  lab's workdir (``build_article_server``). Changes from the article are listed in its header.
- ``remedy.py``: one server per remedy strategy, reporting what it sees as JSON lines.

``ServerProcess`` wraps a child started through ``LabContext.spawn`` (so ``LabContext.close()``
ends it by pid, also on Ctrl+C): a thread drains its stdout (a child blocked on a full pipe would
stop serving and skew every measurement) and keeps every line and JSON event for the experiment
to wait on.

``run_parallel`` runs experiments side by side in worker threads without ever making Ctrl+C wait
for them: on KeyboardInterrupt the main thread returns to the lab's runner at once (which closes
the context and kills the children), and ``stop_event(ctx)``, set when the context closes, makes
every long wait in the workers (``--full`` waits a minute or more) end promptly.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

from closewait.errors import ClosewaitError
from closewait.lab.model import LabContext

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
LEAKY = HERE / "leaky.py"
REMEDY = HERE / "remedy.py"
ARTICLE_C = HERE / "article_server.c"

Event = dict[str, Any]
T = TypeVar("T")

#: The remedy servers' settings, short so the lab stays fast (shared by remedies and churn).
IDLE_TIMEOUT_S = 1.0
HEARTBEAT_S = 0.1
POLL_S = 0.01
KEEPIDLE_S, KEEPINTVL_S, KEEPCNT = 1, 1, 2
REMEDY_ARGS: dict[str, tuple[str, ...]] = {
    "idle-timeout": ("--idle-timeout", str(IDLE_TIMEOUT_S)),
    "send-sigpipe": ("--heartbeat", str(HEARTBEAT_S)),
    "read-close": (),
    "multiplex-read-close": (),
    "nonblocking-read-close": ("--poll", str(POLL_S)),
    "keepalive": ("--keepidle", str(KEEPIDLE_S), "--keepintvl", str(KEEPINTVL_S), "--keepcnt", str(KEEPCNT)),
}


_stop_lock = threading.Lock()
_STOP_ATTR = "_closewait_lab_stop"


def stop_event(ctx: LabContext) -> threading.Event:
    """An event that is set when ``ctx`` closes; long waits use ``event.wait(t)`` instead of sleep.

    It lives on the context object itself, so a worker that asks after the context closed (a
    Ctrl+C raced it) gets the event already set, never a fresh one nobody will set.
    """
    with _stop_lock:
        event = getattr(ctx, _STOP_ATTR, None)
        if not isinstance(event, threading.Event):
            event = threading.Event()
            setattr(ctx, _STOP_ATTR, event)
            ctx.on_close(event.set)
    return event


def run_parallel(ctx: LabContext, calls: Sequence[Callable[[], T]], name: str) -> list[T]:
    """Results of ``calls`` run in threads, in order; an interrupt does not wait for the workers."""
    stop_event(ctx)  # registered before any worker starts, so closing the context always stops them
    pool = ThreadPoolExecutor(max_workers=max(1, len(calls)), thread_name_prefix=name)
    try:
        futures = [pool.submit(call) for call in calls]
        # Wait in short slices: a Ctrl+C delivered to a worker thread does not interrupt the main
        # thread's blocking wait, and Python runs the KeyboardInterrupt handler only in the main
        # thread, when it next executes bytecode.
        pending = set(futures)
        while pending:
            _done, pending = wait(pending, timeout=0.1)
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class ServerError(ClosewaitError):
    """A lab server did not start or behaved unexpectedly; the message is one line for the report."""


class ServerProcess:
    """A child process whose stdout lines (and JSON events) are collected by a reader thread."""

    def __init__(self, ctx: LabContext, proc: subprocess.Popen[Any], name: str) -> None:
        self.ctx = ctx
        self.proc = proc
        self.name = name
        self.lines: list[str] = []
        self.events: list[Event] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, name=f"lab-{name}-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        stream = self.proc.stdout
        try:
            if stream is not None:
                for raw in stream:
                    line = raw.rstrip("\n")
                    event: Event | None = None
                    if line.startswith("{"):
                        with contextlib.suppress(ValueError):
                            event = json.loads(line)
                    with self._cond:
                        self.lines.append(line)
                        if event is not None:
                            self.events.append(event)
                        self._cond.notify_all()
        except (OSError, ValueError):
            pass  # the stream was closed under us when the child was ended
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def wait_line(self, predicate: Callable[[str], bool], timeout: float) -> str | None:
        """The first line (already seen or yet to come) matching ``predicate``; None on timeout/exit."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if predicate(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    return None
                self._cond.wait(min(left, 0.2))

    def wait_event(self, timeout: float, **match: Any) -> Event | None:
        """The first event whose fields equal ``match``; None on timeout or when the child exited."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if all(event.get(k) == v for k, v in match.items()):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    return None
                self._cond.wait(min(left, 0.2))

    def stop(self) -> None:
        """End the child by pid now (the lab would anyway at close) and let the reader finish."""
        self.ctx.end(self.proc)
        self._reader.join(timeout=2)


def program_file(ctx: LabContext, program: Path) -> Path:
    """A real file for one of the programs beside this module (``LEAKY``, ``REMEDY``, ``ARTICLE_C``).

    Installed on disk, that is the package's own file. Run from a zip (``closewait.pyz``) the
    interpreter and the C compiler cannot open a member of the archive, so the program is copied
    out of the package (``importlib.resources``) into the lab's workdir, which ``ctx.close()``
    removes.
    """
    resource = importlib.resources.files(__package__ or __name__) / program.name
    if isinstance(resource, Path) and resource.is_file():
        return resource
    target = ctx.workdir / program.name
    if not target.exists():
        # Experiments run in parallel threads: write a private copy, then rename it into place.
        partial = ctx.workdir / f".{program.name}.{threading.get_ident()}"
        partial.write_bytes(resource.read_bytes())
        os.replace(partial, target)
    return target


def python_server(ctx: LabContext, script: Path, args: list[str], name: str) -> ServerProcess:
    """Start one of the Python server programs with the lab's own interpreter."""
    proc = ctx.spawn([sys.executable, str(program_file(ctx, script)), *args])
    return ServerProcess(ctx, proc, name)


def start_remedy(ctx: LabContext, strategy: str, *extra: str, ready_timeout: float = 10.0) -> tuple[ServerProcess, int]:
    """Start ``remedy.py STRATEGY`` (with ``REMEDY_ARGS``, then ``extra``) and wait for its port.

    Raises ServerError if it does not listen within ``ready_timeout``.
    """
    server = python_server(ctx, REMEDY, [strategy, *REMEDY_ARGS[strategy], *extra], strategy)
    event = server.wait_event(ready_timeout, ev="listening")
    if event is None:
        server.stop()
        raise ServerError(f"the {strategy} server did not start listening within {ready_timeout:.0f} s")
    return server, int(event["port"])


def start_leaky(ctx: LabContext, *, many: bool = False, ready_timeout: float = 10.0) -> tuple[ServerProcess, int]:
    """Start the Python port of the article's server and wait for its port."""
    server = python_server(ctx, LEAKY, ["--many"] if many else [], "leaky")
    prefix = "Server is listening on port "
    line = server.wait_line(lambda text: text.startswith(prefix), ready_timeout)
    if line is None:
        server.stop()
        raise ServerError(f"the leaking server did not start listening within {ready_timeout:.0f} s")
    return server, int(line[len(prefix) :])


def find_compiler() -> str | None:
    """The system C compiler (cc, then gcc, then clang), or None."""
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def build_article_server(ctx: LabContext, compiler: str) -> Path:
    """Compile ``article_server.c`` into the lab's workdir; raises ServerError with the compiler's words."""
    output = ctx.workdir / "article_server"
    try:
        result = subprocess.run(
            [compiler, "-O1", "-o", str(output), str(program_file(ctx, ARTICLE_C))],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ServerError(f"{compiler} could not build the article's server: {err}") from err
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["no message"])[0]
        raise ServerError(f"{compiler} could not build the article's server: {first}")
    return output
