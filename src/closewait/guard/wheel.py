"""A hashed timing wheel for idle timeouts: O(1) per I/O event, amortised O(1) per connection.

This module owns the bookkeeping behind every idle timeout in ``closewait.guard``: which keys
(connections) have been quiet for ``timeout`` seconds. It never touches a socket; the reaper
(``closewait.guard.reaper``) and the guarded server (``closewait.guard.server``) close what it
reports.

How it works (Varghese & Lauck's scheme 6, the one Netty's ``HashedWheelTimer`` and the Linux
timer wheel use, in its lazy form)::

    time ──►  tick 0    tick 1    tick 2   ...  tick n-1
              [slot 0]  [slot 1]  [slot 2] ...  [slot n-1]   slot = tick % n

- Time is cut into ticks of ``tick`` seconds. A key whose deadline (last activity + timeout) is
  ``d`` sits in the slot of the first tick boundary at or after ``d``.
- ``touch(key)`` only stamps the time of last activity in a dict. It does NOT move the key between
  slots: a connection that reads a million times per timeout costs a million dict stores, not a
  million re-arms (the pitfall of ``loop.call_later`` per read, which allocates and cancels a
  timer handle every time).
- When a slot's time passes, ``expired()`` looks at each key in it: if it has been idle for at
  least ``timeout`` it is reported and removed; otherwise it was touched since it was placed, and
  it moves once to the slot of its new deadline. A busy connection is therefore visited about
  once per ``timeout``, whatever its I/O rate.

Precision: if ``expired()`` is called when ``next_deadline()`` says, a key is reported between
``timeout`` and ``timeout + tick`` seconds after its last activity. The default tick is
``timeout / 16`` (about 6 % late at worst).

Pitfalls handled here: float rounding at tick boundaries (a key is never re-placed in the slot
being fired, which would delay it by a whole turn of the wheel); a caller that stops calling
``expired()`` for longer than a turn (the wheel fires each slot once and re-places what is not
due, rather than spinning over every missed tick); an empty wheel has no deadline, so an idle
event loop built on it does not wake up at all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from closewait.errors import UsageError

K = TypeVar("K", bound=Hashable)

__all__ = ["TimingWheel"]


class TimingWheel(Generic[K]):
    """Keys that expire ``timeout`` seconds after their last ``add()``/``touch()``.

    ``tick`` is the wheel's resolution (default ``timeout / 16``); ``clock`` returns seconds and
    must not go backwards (default ``time.monotonic``; an asyncio loop's ``loop.time`` fits too).
    Not thread-safe: use it from the thread that runs the event loop.
    """

    __slots__ = ("_clock", "_current", "_last", "_nslots", "_slot_of", "_slots", "tick", "timeout")

    def __init__(
        self, timeout: float, *, tick: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise UsageError(f"idle timeout must be a positive number of seconds, not {timeout!r}")
        if tick is None:
            tick = timeout / 16
        if not (math.isfinite(tick) and tick > 0):
            raise UsageError(f"wheel tick must be a positive number of seconds, not {tick!r}")
        self.timeout: float = float(timeout)
        self.tick: float = float(tick)
        self._clock = clock
        # Every deadline lies at most ceil(timeout/tick) + 1 ticks ahead of the last fired tick,
        # so this many slots never alias while expired() keeps up.
        self._nslots = math.ceil(self.timeout / self.tick) + 2
        self._slots: list[set[K]] = [set() for _ in range(self._nslots)]
        self._last: dict[K, float] = {}
        self._slot_of: dict[K, int] = {}
        # The last tick whose slot has fired: buckets <= _current are all done.
        self._current = self._tick_at_or_before(clock())

    # -- tick arithmetic, robust to float rounding ------------------------------------------------
    def _tick_at_or_before(self, when: float) -> int:
        """The largest tick ``t`` with ``t * tick <= when``."""
        t = math.floor(when / self.tick)
        if (t + 1) * self.tick <= when:
            t += 1
        elif t * self.tick > when:
            t -= 1
        return t

    def _tick_at_or_after(self, when: float) -> int:
        """The smallest tick ``t`` with ``t * tick >= when``."""
        t = math.ceil(when / self.tick)
        if t * self.tick < when:
            t += 1
        elif (t - 1) * self.tick >= when:
            t -= 1
        return t

    def _place(self, key: K, deadline: float) -> None:
        bucket = max(self._tick_at_or_after(deadline), self._current + 1)
        slot = bucket % self._nslots
        self._slots[slot].add(key)
        self._slot_of[key] = slot

    # -- public API -------------------------------------------------------------------------------
    def add(self, key: K) -> None:
        """Start watching ``key`` as active now. Adding a key already present just touches it."""
        now = self._clock()
        if key in self._last:
            self._last[key] = now
            return
        if not self._last:
            # Nothing is scheduled, so the wheel can jump to now: after a long quiet spell (when no
            # one calls expired()) the first new key would otherwise land in a slot a turn behind.
            self._current = max(self._current, self._tick_at_or_before(now))
        self._last[key] = now
        self._place(key, now + self.timeout)

    def touch(self, key: K) -> None:
        """Record activity on ``key`` now: one dict store, the key stays in its slot.

        A key that is not in the wheel (already expired or discarded) is ignored, because an I/O
        callback can run after the reaper has dropped its connection.
        """
        if key in self._last:
            self._last[key] = self._clock()

    def discard(self, key: K) -> None:
        """Stop watching ``key`` (closed by its owner). Unknown keys are ignored."""
        slot = self._slot_of.pop(key, None)
        if slot is None:
            return
        del self._last[key]
        self._slots[slot].discard(key)

    def expired(self, now: float | None = None) -> list[K]:
        """Fire every slot whose time has passed; return (and forget) the keys idle >= timeout.

        Keys that were touched since they were placed move to the slot of their new deadline.
        """
        if now is None:
            now = self._clock()
        target = self._tick_at_or_before(now)
        if target <= self._current:
            return []
        # Behind by more than a turn: each slot fires once (with ``now``), which covers them all.
        first = max(self._current + 1, target - self._nslots + 1)
        self._current = target
        result: list[K] = []
        timeout = self.timeout
        last = self._last
        for t in range(first, target + 1):
            slot = t % self._nslots
            fired = self._slots[slot]
            if not fired:
                continue
            self._slots[slot] = set()
            for key in fired:
                deadline = last[key] + timeout
                if deadline <= now:
                    del last[key]
                    del self._slot_of[key]
                    result.append(key)
                else:
                    self._place(key, deadline)
        return result

    def next_deadline(self) -> float | None:
        """When the next non-empty slot fires (same clock), or None when the wheel is empty.

        Use it as the select/epoll timeout (``max(0, next_deadline() - clock())``). It may be
        earlier than any key's real deadline (the slot then re-places its touched keys), never later.
        Keys added while ``expired()`` lagged more than a turn behind may sit in an earlier slot;
        they are re-placed when it fires.
        """
        if not self._last:
            return None
        n = self._nslots
        for t in range(self._current + 1, self._current + n + 1):
            if self._slots[t % n]:
                return t * self.tick
        return (self._current + 1) * self.tick  # unreachable while the invariants hold

    def last_activity(self, key: K) -> float:
        """The clock reading of ``key``'s last add/touch (KeyError if not watched)."""
        return self._last[key]

    def __len__(self) -> int:
        return len(self._last)

    def __contains__(self, key: object) -> bool:
        return key in self._last

    def __repr__(self) -> str:
        return f"TimingWheel(timeout={self.timeout!r}, tick={self.tick!r}, keys={len(self._last)})"
