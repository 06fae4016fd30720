"""CLOSE_WAIT entry times from a recorder another process pinned (``closewait record``, the exporter).

``scan()`` asks here for the exact time each CLOSE_WAIT socket entered that state. Most hosts run no
recorder, and ``closewait scan --json`` must not pay for the recorder's module (ctypes, the BPF
assembler) to learn that: one ``stat()`` of the pin directory's ``link`` says whether a recorder is
pinned, and ``closewait.sources.recorder`` is imported only when one is. Every way it can fail is a
one-line reason in ``EntryTimes.unavailable``; the caller falls back to ``tcpi_last_ack_recv``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from dataclasses import dataclass

#: Where ``closewait record`` pins the recorder's maps by default (``Recorder.open_pinned``'s default).
DEFAULT_PIN_DIR = "/sys/fs/bpf/closewait"


@dataclass(frozen=True, slots=True)
class EntryTimes:
    """cookie -> when the socket entered CLOSE_WAIT (CLOCK_MONOTONIC ns, the kernel's clock), and one
    reading of both clocks taken right after the lookup to turn them into ages and wall times.
    ``unavailable`` is why there are none (no recorder pinned, no permission, ...)."""

    times: dict[int, int]
    monotonic_ns: int
    wall: float
    unavailable: str | None = None


def _now(times: dict[int, int], unavailable: str | None = None) -> EntryTimes:
    return EntryTimes(times, time.clock_gettime_ns(time.CLOCK_MONOTONIC), time.time(), unavailable)


def is_pinned(pin_dir: str = DEFAULT_PIN_DIR) -> str | None:
    """None when a recorder looks pinned in ``pin_dir`` (its link is there), else why not. One stat."""
    try:
        os.stat(os.path.join(pin_dir, "link"))
    except (FileNotFoundError, NotADirectoryError):
        return f"no recorder is pinned in {pin_dir} (start one with: closewait record)"
    except PermissionError:
        return f"cannot look in {pin_dir}: permission denied (the recorder's pins need root)"
    except OSError as err:
        return f"cannot look in {pin_dir}: {err.strerror or err}"
    return None


def entry_times(cookies: Collection[int], pin_dir: str = DEFAULT_PIN_DIR) -> EntryTimes:
    """The entry times the pinned recorder holds for ``cookies``; never raises for a missing,
    foreign or unreadable recorder (``unavailable`` says which)."""
    reason = is_pinned(pin_dir)
    if reason is not None:
        return _now({}, reason)
    from closewait.sources.recorder import Recorder, RecorderUnavailable

    try:
        with Recorder.open_pinned(pin_dir) as recorder:
            found = recorder.entry_times(cookies)
    except RecorderUnavailable as err:
        return _now({}, str(err))
    return _now(found)


__all__ = ["DEFAULT_PIN_DIR", "EntryTimes", "entry_times", "is_pinned"]
