"""The timing wheel's logic with an injected clock: never early, at most one tick late, O(1) touch.

Pure logic, so a fake clock is the right tool here; the reaper and server tests use real sockets.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from closewait.errors import UsageError
from closewait.guard.wheel import TimingWheel


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_idle_key_expires_after_timeout_and_not_before() -> None:
    clock = FakeClock()
    wheel: TimingWheel[str] = TimingWheel(2.0, tick=0.25, clock=clock)
    wheel.add("a")
    assert "a" in wheel
    assert len(wheel) == 1
    clock.now += 1.99
    assert wheel.expired() == []
    clock.now += 0.01
    assert wheel.expired() == ["a"]
    assert "a" not in wheel
    assert len(wheel) == 0
    assert wheel.next_deadline() is None


def test_touched_key_is_kept_and_expires_timeout_after_last_touch() -> None:
    clock = FakeClock(0.0)
    wheel: TimingWheel[int] = TimingWheel(1.0, tick=0.1, clock=clock)
    wheel.add(1)
    wheel.add(2)
    clock.now = 0.6
    wheel.touch(1)
    clock.now = 1.0
    assert wheel.expired() == [2]
    assert 1 in wheel
    clock.now = 1.59
    assert wheel.expired() == []
    clock.now = 1.6
    assert wheel.expired() == [1]


def test_touch_does_not_rearm_the_slot() -> None:
    """A touch only stamps the time: the key is still checked at its original slot, then moved once."""
    clock = FakeClock(0.0)
    wheel: TimingWheel[str] = TimingWheel(1.0, tick=0.125, clock=clock)
    wheel.add("k")
    first = wheel.next_deadline()
    assert first == pytest.approx(1.0)
    for step in range(1, 100):
        clock.now = step * 0.005
        wheel.touch("k")
    assert wheel.next_deadline() == first  # a thousand reads would not move it either
    last = clock.now
    clock.now = first
    assert wheel.expired() == []
    assert wheel.next_deadline() == pytest.approx(math.ceil((last + 1.0) / 0.125) * 0.125)
    assert wheel.last_activity("k") == last


def test_discard_and_unknown_keys() -> None:
    clock = FakeClock()
    wheel: TimingWheel[str] = TimingWheel(1.0, clock=clock)
    wheel.add("a")
    wheel.discard("a")
    wheel.discard("a")  # twice is fine
    wheel.touch("never-added")  # ignored: the reaper may have dropped it already
    assert "never-added" not in wheel
    clock.now += 5
    assert wheel.expired() == []
    assert wheel.next_deadline() is None


def test_add_twice_is_a_touch() -> None:
    clock = FakeClock(0.0)
    wheel: TimingWheel[str] = TimingWheel(1.0, tick=0.5, clock=clock)
    wheel.add("a")
    clock.now = 0.5
    wheel.add("a")
    assert len(wheel) == 1
    clock.now = 1.0
    assert wheel.expired() == []
    clock.now = 1.5
    assert wheel.expired() == ["a"]


def test_default_tick_is_a_sixteenth_of_the_timeout() -> None:
    wheel: TimingWheel[int] = TimingWheel(8.0)
    assert wheel.tick == 0.5
    assert wheel.timeout == 8.0
    assert "TimingWheel(timeout=8.0" in repr(wheel)


@pytest.mark.parametrize(("timeout", "tick"), [(0, None), (-1, None), (math.inf, None), (1.0, 0), (1.0, math.nan)])
def test_bad_parameters_are_usage_errors(timeout: float, tick: float | None) -> None:
    with pytest.raises(UsageError):
        TimingWheel(timeout, tick=tick)


def test_empty_wheel_catches_up_on_add() -> None:
    """After a quiet spell with no one calling expired(), a new key still gets its exact slot."""
    clock = FakeClock(0.0)
    wheel: TimingWheel[str] = TimingWheel(1.0, tick=0.1, clock=clock)
    clock.now = 500.05
    wheel.add("x")
    assert wheel.next_deadline() == pytest.approx(501.1)


def test_many_turns_missed_fires_each_slot_once() -> None:
    """A caller that sleeps for many turns gets every due key at once, without spinning per tick."""
    clock = FakeClock(0.0)
    wheel: TimingWheel[int] = TimingWheel(1.0, tick=0.01, clock=clock)
    for key in range(50):
        clock.now = key * 0.05
        wheel.add(key)
    clock.now = 1e6
    assert sorted(wheel.expired()) == list(range(50))
    assert len(wheel) == 0


def test_next_deadline_tracks_the_earliest_slot() -> None:
    clock = FakeClock(10.0)
    wheel: TimingWheel[str] = TimingWheel(4.0, tick=0.25, clock=clock)
    assert wheel.next_deadline() is None
    wheel.add("early")
    clock.now = 11.1
    assert wheel.expired() == []  # an event loop fires the wheel at least every deadline
    wheel.add("late")
    assert wheel.next_deadline() == pytest.approx(14.0)
    clock.now = 14.0
    assert wheel.expired() == ["early"]
    assert wheel.next_deadline() == pytest.approx(15.25)  # first boundary at or after 15.1


# --- property tests against a naive model ------------------------------------------------------

Op = tuple[str, int | float]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 7)),
        st.tuples(st.just("touch"), st.integers(0, 7)),
        st.tuples(st.just("discard"), st.integers(0, 7)),
        st.tuples(st.just("advance"), st.floats(0.0, 3.0, allow_nan=False)),
        st.tuples(st.just("advance"), st.floats(0.0, 0.3, allow_nan=False)),
        st.tuples(st.just("jump"), st.floats(0.0, 50.0, allow_nan=False)),
        st.tuples(st.just("expired"), st.just(0)),
        st.tuples(st.just("at_deadline"), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(
    timeout=st.sampled_from([0.5, 1.0, 2.0, 3.3, 10.0]),
    ratio=st.sampled_from([1 / 16, 1 / 7, 1 / 3, 1.0, 2.5]),
    start=st.floats(0.0, 1e6, allow_nan=False),
    operations=ops,
)
def test_wheel_matches_naive_model(timeout: float, ratio: float, start: float, operations: list[Op]) -> None:
    """Never early, never more than one tick late, and the key set always matches the model."""
    tick = timeout * ratio
    clock = FakeClock(start)
    wheel: TimingWheel[int] = TimingWheel(timeout, tick=tick, clock=clock)
    model: dict[int, float] = {}  # key -> last activity
    slack = 1e-9 * max(1.0, abs(start) + 100.0)

    def check_expired(now: float) -> None:
        got = wheel.expired(now)
        assert len(got) == len(set(got))
        for key in got:
            assert key in model
            assert now - model[key] >= timeout - slack  # never early
            del model[key]
        for key, last in model.items():
            # Not reported: its deadline rounded up to the next tick boundary is still ahead.
            assert last + timeout + tick > now - slack, (key, last, now)

    for name, arg in operations:
        if name == "add":
            key = int(arg)
            wheel.add(key)
            model[key] = clock.now
        elif name == "touch":
            key = int(arg)
            wheel.touch(key)
            if key in model:
                model[key] = clock.now
        elif name == "discard":
            key = int(arg)
            wheel.discard(key)
            model.pop(key, None)
        elif name in ("advance", "jump"):
            clock.now += float(arg)
        elif name == "expired":
            check_expired(clock.now)
        else:  # at_deadline: what an event loop does, sleep until next_deadline() then fire
            deadline = wheel.next_deadline()
            if not model:
                assert deadline is None
                continue
            assert deadline is not None
            earliest = min(model.values()) + timeout
            assert deadline <= earliest + tick + slack
            clock.now = max(clock.now, deadline)
            check_expired(clock.now)
        assert len(wheel) == len(model)
        assert all(key in wheel for key in model)
        assert not any(key in wheel for key in range(8) if key not in model)


@settings(max_examples=100, deadline=None)
@given(
    lasts=st.lists(st.floats(0.0, 5.0, allow_nan=False), min_size=1, max_size=30),
    timeout=st.sampled_from([1.0, 2.0]),
)
def test_event_loop_driven_by_next_deadline_closes_within_one_tick(lasts: list[float], timeout: float) -> None:
    """Sleeping until next_deadline() and firing reports each key in [timeout, timeout + tick)."""
    tick = timeout / 16
    clock = FakeClock(0.0)
    wheel: TimingWheel[int] = TimingWheel(timeout, tick=tick, clock=clock)
    wheel.add(-1)  # keeps the wheel non-empty from 0
    events = sorted((last, i) for i, last in enumerate(lasts))
    reported: dict[int, float] = {}
    pending = list(events)
    for _ in range(10_000):
        deadline = wheel.next_deadline()
        if pending and (deadline is None or pending[0][0] < deadline):
            clock.now, key = pending.pop(0)
            wheel.add(key)  # first add, or a touch when the key is already watched
            continue
        if deadline is None:
            break
        clock.now = max(clock.now, deadline)
        for key in wheel.expired():
            reported[key] = clock.now
    assert set(reported) == {-1, *range(len(lasts))}
    for i, last in enumerate(lasts):
        idle = reported[i] - last
        assert timeout - 1e-9 <= idle < timeout + tick + 1e-9
