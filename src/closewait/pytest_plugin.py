"""closewait's pytest plugin (entry point ``pytest11``): fail a test that leaves CLOSE_WAIT sockets behind.

Inactive unless asked for; then a thin layer over ``closewait.testing``. Three ways to ask:

- ``pytest --closewait``: check every test;
- ``@pytest.mark.closewait`` (optionally ``@pytest.mark.closewait(grace=2.0)``): check this test;
- the ``closewait_guard`` fixture: check the test that uses it (it yields the ``Guard``).

Other options: ``--closewait-grace=SECONDS`` (default 0.5) is how long a leak may take to go away after
the test (asynchronous closes); ``--closewait-trace`` starts ``closewait.trace`` for the session, so
each failure names the line that created the socket.

How it fails a test: for a checked test the plugin runs pytest's own run-test protocol itself (like
pytest-rerunfailures does), takes the baseline before setup and checks after teardown, so sockets a
fixture closes in its teardown are not reported. When new CLOSE_WAIT sockets remain, the test's
call report becomes a failure whose message lists each socket with its diagnosis (and creation site
when tracing); if the test had already failed, the list is added as a "closewait" section. Reports are
logged after teardown, so a checked test's result line appears once the whole test has finished.

No ``gc.collect()`` is run before the check: that would hide the asyncio leak it should catch. For
the same reason the automatic garbage collector is paused from the baseline to the check of a checked
test (``--closewait-keep-gc`` keeps it running): an asyncio transport nobody closed stays in CLOSE_WAIT
in an idle production process until the collector runs, while in a test the collector runs by chance
and would make the failure come and go.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from closewait import testing, trace
from closewait.errors import ClosewaitError

MARKER = "closewait"
FIXTURE = "closewait_guard"
_HINT = "(run pytest with --closewait-trace to see where each socket was created)"
_guard_key = pytest.StashKey[testing.Guard]()
_started_trace_key = pytest.StashKey[bool]()


def _grace_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more seconds")
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("closewait", "fail tests that leave TCP sockets in CLOSE_WAIT")
    group.addoption(
        "--closewait",
        action="store_true",
        default=False,
        help="fail every test that leaves this process holding CLOSE_WAIT sockets it did not hold before",
    )
    group.addoption(
        "--closewait-grace",
        type=_grace_value,
        default=testing.DEFAULT_GRACE,
        metavar="SECONDS",
        help=f"how long a leak may take to go away after a test ends (default {testing.DEFAULT_GRACE})",
    )
    group.addoption(
        "--closewait-keep-gc",
        action="store_true",
        default=False,
        help="do not pause the automatic garbage collector during checked tests (it can hide asyncio leaks)",
    )
    group.addoption(
        "--closewait-trace",
        action="store_true",
        default=False,
        help="record where sockets are created (closewait.trace) and name that line in failures",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(grace=None): fail this test if it leaves CLOSE_WAIT sockets behind (closewait's pytest plugin)",
    )
    if config.getoption("closewait_trace") and not trace.is_tracing():
        trace.start()
        config.stash[_started_trace_key] = True
    if config.getoption("closewait"):
        try:
            testing.close_wait_inodes()
        except ClosewaitError as err:
            raise pytest.UsageError(f"--closewait cannot read this process's sockets: {err}") from err


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(_started_trace_key, False):
        trace.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker(MARKER)
        if marker is None:
            continue
        if marker.args or set(marker.kwargs) - {"grace"}:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.closewait takes only grace=SECONDS")
        grace = marker.kwargs.get("grace")
        if grace is not None and (isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0):
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.closewait(grace=...) must be 0 or more seconds")


def _grace_for(item: pytest.Item) -> float | None:
    """The grace period when this test is checked, None when it is not."""
    default: float = item.config.getoption("closewait_grace")
    marker = item.get_closest_marker(MARKER)
    if marker is not None:
        grace = marker.kwargs.get("grace")
        return default if grace is None else float(grace)
    if item.config.getoption("closewait") or FIXTURE in getattr(item, "fixturenames", ()):
        return default
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    grace = _grace_for(item)
    if grace is None:
        return None
    from _pytest.runner import runtestprotocol

    try:
        guard = testing.Guard(grace=grace, pause_gc=not item.config.getoption("closewait_keep_gc"))
    except ClosewaitError as err:
        item.warn(pytest.PytestWarning(f"closewait: no check for this test: {err}"))
        return None
    item.stash[_guard_key] = guard
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    try:
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        _check(item, guard, reports)
    finally:
        guard.resume_gc()
    for report in reports:
        ihook.pytest_runtest_logreport(report=report)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _check(item: pytest.Item, guard: testing.Guard, reports: list[pytest.TestReport]) -> None:
    call = next((r for r in reports if r.when == "call"), None)
    if call is None or call.skipped:
        return  # setup failed or the test was skipped: nothing ran that could leak
    try:
        leaks = guard.leaks()
    except ClosewaitError as err:
        item.warn(pytest.PytestWarning(f"closewait: could not check for CLOSE_WAIT sockets: {err}"))
        return
    if not leaks:
        return
    message = testing.format_leaks(leaks, grace=guard.grace, hint=_HINT)
    if call.passed:
        call.outcome = "failed"
        call.longrepr = message
    else:
        call.sections.append(("closewait", message))


@pytest.fixture
def closewait_guard(request: pytest.FixtureRequest) -> Iterator[testing.Guard]:
    """Fail this test if it leaves CLOSE_WAIT sockets behind; yields the ``closewait.testing.Guard``."""
    guard = request.node.stash.get(_guard_key, None)
    if guard is not None:
        yield guard  # the run-test protocol above checks after teardown
        return
    # Requested late (request.getfixturevalue): check when this fixture is torn down.
    guard = testing.Guard(
        grace=request.config.getoption("closewait_grace"),
        pause_gc=not request.config.getoption("closewait_keep_gc"),
    )
    try:
        yield guard
    finally:
        guard.resume_gc()  # check() resumes it too; this covers a test that failed
    guard.check(hint=_HINT)
