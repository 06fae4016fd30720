"""What a lab experiment returns, and the context every experiment runs in.

An ``Experiment`` is one claim of the article (or one remedy) turned into an observation on this
kernel: the claim in words, what the kernel did, a verdict, typed measurements, and the packet
evidence when a capture ran. Renderers (terminal, JSON, HTML) read only these objects.

``LabContext`` owns everything an experiment starts: child processes are registered with it and
ended by pid in ``close()``, also when the run is interrupted (Ctrl+C), and its temporary workdir
(made on first use) is removed there too, so the lab leaves nothing behind. Use it as a context
manager or call ``close()``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from closewait.errors import ClosewaitError
from closewait.sources.capture import Segment

log = logging.getLogger(__name__)

PARTS = ("reproduce", "remedies", "teardown")

#: Measurement values are JSON scalars (or lists of them); names are documented in docs/lab.md.
Measurement = bool | int | float | str | None | list[Any]


class Verdict(enum.StrEnum):
    HOLDS = "holds"
    DOES_NOT_HOLD = "does-not-hold"
    HOLDS_WITH_CAVEAT = "holds-with-caveat"


class Status(enum.StrEnum):
    OK = "ok"
    SKIPPED = "skipped"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Experiment:
    """One experiment's result. ``id`` and ``part`` are stable (docs/lab.md lists them)."""

    id: str
    part: str
    title: str
    claim: str
    observed: str
    verdict: Verdict | None
    measurements: Mapping[str, Measurement]
    status: Status = Status.OK
    #: Why it was skipped, or what failed.
    reason: str | None = None
    #: Segments captured during the experiment, or empty when no capture ran.
    packets: tuple[Segment, ...] = ()
    #: False when no capture ran (not root, no AF_PACKET): evidence is states and errno only.
    packets_captured: bool = False
    #: Labels for the two ends in the ladder diagram, e.g. {"127.0.0.1:40000": "client"}.
    actors: Mapping[str, str] = field(default_factory=dict)
    #: Time series for charts: name -> [(seconds, value), ...] (the churn run's CLOSE_WAIT counts).
    series: Mapping[str, list[tuple[float, float]]] = field(default_factory=dict)
    #: Extra notes for the reader: what the article's table leaves out, caveats.
    notes: tuple[str, ...] = ()
    duration_s: float = 0.0


@dataclass
class LabContext:
    """Shared settings and the cleanup registry for one lab run."""

    full: bool = False
    trials: int = 5
    capture: bool = True
    _children: list[subprocess.Popen[Any]] = field(default_factory=list)
    _cleanups: list[Callable[[], None]] = field(default_factory=list)
    _workdir: Path | None = field(default=None, init=False, repr=False)
    _workdir_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def workdir(self) -> Path:
        """A private temporary directory (build outputs, extracted server programs), made on first
        use; the context owns it and ``close()`` removes it."""
        with self._workdir_lock:  # parallel experiments may ask first at the same time
            if self._workdir is None:
                self._workdir = Path(tempfile.mkdtemp(prefix="closewait-lab-"))
            return self._workdir

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a child process that ``close()`` will end by pid. Its stdout is a text pipe."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        kwargs.setdefault("text", True)
        # Own process group, so a terminal's Ctrl+C reaches only the lab, which then ends it by pid.
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(argv, **kwargs)
        self._children.append(proc)
        return proc

    def on_close(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` when the lab ends (last registered runs first)."""
        self._cleanups.append(cleanup)

    def end(self, proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
        """End one child now, by pid, and reap it."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def close(self) -> None:
        """End every child, run every cleanup, then remove the workdir; safe to call twice."""
        while self._children:
            self.end(self._children.pop())
        while self._cleanups:
            cleanup = self._cleanups.pop()
            try:
                cleanup()
            except Exception:
                log.exception("lab cleanup failed")
        with self._workdir_lock:
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    def __enter__(self) -> LabContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def error_reason(err: BaseException) -> str:
    """One line for the report: closewait's own errors say it themselves; others are named."""
    return str(err) if isinstance(err, ClosewaitError) else f"{type(err).__name__}: {err}"


def unfinished(exp_id: str, part: str, title: str, claim: str, err: BaseException, started: float) -> Experiment:
    """The record of an experiment that raised ``err``: an error with its reason, never a traceback."""
    return Experiment(
        id=exp_id,
        part=part,
        title=title,
        claim=claim,
        observed="the experiment could not finish",
        verdict=None,
        measurements={},
        status=Status.ERROR,
        reason=error_reason(err),
        duration_s=round(time.monotonic() - started, 3),
    )
