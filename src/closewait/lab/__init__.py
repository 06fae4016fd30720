"""closewait lab: the article turned into experiments on this kernel (see docs/lab.md).

``run(parts)`` creates one ``LabContext``, runs each part's module (``reproduce``, ``remedies``,
``teardown``; each exposes ``run(ctx) -> list[Experiment]``) and returns a ``LabReport``. Modules are
imported only when their part runs. A part whose module raises is reported as an error with the
reason, and the other parts still run.

Cleanup: the context (child processes, registered cleanups) is always closed in ``finally``, also
on KeyboardInterrupt. SIGINT is blocked while it closes, so a second Ctrl+C cannot cut the cleanup
short; it is delivered (and propagates) right after. Pitfall: a part's worker threads may still be
running when Ctrl+C closes the context, and one of them could start a server right after the
cleanup ended it all. The run's context therefore refuses to spawn once closing has begun (the
check and the registration happen under one lock, so a child is either ended or never started).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from closewait.errors import UsageError
from closewait.lab.model import PARTS, Experiment, LabContext, Status, error_reason
from closewait.lab.report import LabReport, placeholders

log = logging.getLogger(__name__)

DEFAULT_TRIALS = 5

#: Called after each part with the part's name and its experiments (the CLI shows progress).
Progress = Callable[[str, Sequence[Experiment]], None]


@dataclasses.dataclass
class _RunContext(LabContext):
    """The LabContext of one run: no new child once ``close()`` has begun."""

    def __post_init__(self) -> None:
        self._spawn_lock = threading.Lock()
        self._closing = False

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        with self._spawn_lock:
            if self._closing:
                raise RuntimeError("the lab run is over: no new child processes")
            return super().spawn(argv, **kwargs)

    def close(self) -> None:
        with self._spawn_lock:
            self._closing = True
        super().close()


def validate_parts(parts: Iterable[str]) -> tuple[str, ...]:
    """The parts in canonical order, without duplicates; empty means all."""
    wanted = list(parts)
    for part in wanted:
        if part not in PARTS:
            raise UsageError(f"unknown lab part {part!r}: choose from {', '.join(PARTS)}")
    return tuple(p for p in PARTS if p in wanted) if wanted else PARTS


def _capture_reason(enabled: bool) -> str | None:
    from closewait.sources.capture import Capture

    probe = Capture([], enabled=enabled).start()
    probe.stop()
    return probe.reason


def _run_part(part: str, ctx: LabContext) -> list[Experiment]:
    start = time.monotonic()
    try:
        results = list(importlib.import_module(f"closewait.lab.{part}").run(ctx))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        log.exception("lab part %s failed", part)
        return placeholders(part, Status.ERROR, error_reason(err))
    log.debug("lab part %s: %d experiments in %.2f s", part, len(results), time.monotonic() - start)
    return results


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Hold SIGINT back (it stays pending) while cleanup runs; only possible in the main thread."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if main:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def run(
    parts: Iterable[str] = (),
    *,
    full: bool = False,
    trials: int = DEFAULT_TRIALS,
    capture: bool = True,
    progress: Progress | None = None,
) -> LabReport:
    """Run the lab's ``parts`` (all when empty) and return the report.

    ``full`` waits out kernel timers (tcp_fin_timeout) where a part offers it; ``trials`` is the
    number of repetitions per remedy; ``capture=False`` skips the packet capture (evidence then
    comes from states and errno only).
    """
    chosen = validate_parts(parts)
    if trials < 1:
        raise UsageError(f"--trials must be at least 1, not {trials}")
    started_at = time.time()
    start = time.monotonic()
    experiments: list[Experiment] = []
    ctx = _RunContext(full=full, trials=trials, capture=capture)
    try:
        capture_reason = _capture_reason(capture)
        for part in chosen:
            results = _run_part(part, ctx)
            experiments.extend(results)
            if progress is not None:
                progress(part, results)
    finally:
        with _sigint_blocked():
            ctx.close()
    return LabReport(
        experiments=tuple(experiments),
        parts=chosen,
        duration_s=time.monotonic() - start,
        started_at=started_at,
        full=full,
        trials=trials,
        capture_reason=capture_reason,
    )


__all__ = ["DEFAULT_TRIALS", "LabReport", "Progress", "run", "validate_parts"]
