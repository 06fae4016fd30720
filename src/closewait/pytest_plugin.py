"""closewait's pytest plugin (entry point ``pytest11``): report the test that leaves a socket in CLOSE_WAIT.

Inactive unless asked for; then a thin layer over ``closewait.testing``. Three ways to ask:

- ``pytest --closewait``: check every test (``@pytest.mark.closewait(check=False)`` leaves one out);
- ``@pytest.mark.closewait`` (optionally ``horizon=``, ``allow=``): check this test;
- the ``closewait_guard`` fixture: check the test that uses it (it yields a ``closewait.testing.Guard``).

The horizon (``--closewait-horizon``, ini ``closewait_horizon``, default 10 s): a socket is reported
only when it is still in CLOSE_WAIT that long after the test it is attributed to has ended. Nothing
waits in a test: one snapshot of this process's TCP sockets (a ``getsockopt`` and an ``fstat`` per
descriptor) is taken before each test's setup and after its teardown (``closewait.testing.Horizon``);
sockets come due at a later boundary, and the session's last check waits only as long as the
youngest candidate needs (at most the horizon), and only while one is still in CLOSE_WAIT. A socket
is the test's during which it was first seen; one first seen just before the next test's setup (a
server thread accepting late) is still the previous test's.

How a leak found late is reported: as a failing *teardown* report for the test it belongs to, sent
through ``pytest_runtest_logreport`` when found, so pytest shows ``ERROR at teardown of test_x``
with the message, counts it as an error, sets the exit code and xdist forwards it like any report.
When it is found at the test's own end (``--closewait-horizon 0``) that test's own teardown report
fails instead. ``--closewait-report-only`` (ini ``closewait_report_only``) lists leaks in a terminal
summary section instead and fails nothing: the way to adopt the plugin on an existing suite.

Ignoring sockets (ini): ``closewait_ignore_roles`` (server, client), ``closewait_ignore_ports``
(local ports, e.g. a session-scoped test server's: its accepted ends), ``closewait_ignore_threads``
(names or globs of the thread that created or accepted the socket; starts ``closewait.trace``).
Per test: ``@pytest.mark.closewait(allow=...)`` with the same items (``"server"``, ``"client"``,
``"port=8080"``, ``"thread=dummyserver*"``) or a number of sockets tolerated.

No ``gc.collect()`` is run: that would hide the asyncio leak it should catch. The automatic garbage
collector is paused during a checked test (``--closewait-keep-gc`` keeps it running), and a socket
that was in CLOSE_WAIT and that only a garbage collection closed is reported at once: nothing else
closed it. The plugin never overrides ``pytest_runtest_protocol``, so rerunfailures, xdist,
pytest-timeout and the asyncio plugins keep theirs.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import shlex
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from closewait import testing, trace
from closewait.errors import ClosewaitError
from closewait.model import Role

MARKER = "closewait"
FIXTURE = "closewait_guard"
_HINT = "(run pytest with --closewait-trace to see where each socket was created and by which thread)"
#: Frames the plugin's trace keeps per socket: deep enough to reach a test's line from inside an
#: HTTP client's connection pool.
TRACE_LIMIT = 48
_ROLES = ("server", "client")
_guard_key = pytest.StashKey[testing.Guard]()
_state_key = pytest.StashKey["_State"]()


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more seconds")
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("closewait", "report tests that leave TCP sockets in CLOSE_WAIT")
    group.addoption(
        "--closewait",
        action="store_true",
        default=False,
        help="check every test: report a socket still in CLOSE_WAIT a horizon after the test that made it ended",
    )
    group.addoption(
        "--closewait-horizon",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help=f"how long a socket may stay in CLOSE_WAIT after its test ended (default {testing.DEFAULT_HORIZON:g}; "
        "ini closewait_horizon)",
    )
    group.addoption(
        "--closewait-grace",
        type=_seconds,
        default=None,
        dest="closewait_grace",
        metavar="SECONDS",
        help="the old name of --closewait-horizon",
    )
    group.addoption(
        "--closewait-report-only",
        action="store_true",
        default=None,
        help="list leaks in the terminal summary, fail nothing (ini closewait_report_only)",
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
        default=None,
        help="record where and in which thread sockets are created (closewait.trace); ini closewait_trace",
    )
    parser.addini("closewait_horizon", f"closewait: seconds (default {testing.DEFAULT_HORIZON:g})", default="")
    parser.addini("closewait_report_only", "closewait: report leaks, fail nothing", type="bool", default=False)
    parser.addini("closewait_trace", "closewait: trace where sockets are created", type="bool", default=False)
    parser.addini("closewait_ignore_roles", "closewait: ignore sockets in these roles (server, client)", type="args")
    parser.addini("closewait_ignore_ports", "closewait: ignore sockets with these local ports", type="args")
    parser.addini(
        "closewait_ignore_threads", "closewait: ignore sockets created/accepted by these threads (globs)", type="args"
    )


# -- rules ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Rules:
    """Sockets to leave out: by role, by local port, by the name of the thread that made them."""

    roles: frozenset[str] = frozenset()
    ports: frozenset[int] = frozenset()
    threads: tuple[str, ...] = ()
    count: int = 0

    @classmethod
    def parse(cls, items: Sequence[object], what: str) -> Rules:
        roles: set[str] = set()
        ports: set[int] = set()
        threads: list[str] = []
        count = 0
        for item in items:
            if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
                count = item
                continue
            text = str(item) if isinstance(item, str) else None
            if text is None:
                raise ValueError(f"{what}: {item!r} is not a role, port=N, thread=NAME or a number of sockets")
            key, sep, value = text.partition("=")
            if not sep and key in _ROLES:
                roles.add(key)
            elif key == "role" and value in _ROLES:
                roles.add(value)
            elif key == "port" and value.isascii() and value.isdecimal() and 0 < int(value) < 65536:
                ports.add(int(value))
            elif key == "thread" and value:
                threads.append(value)
            else:
                raise ValueError(
                    f"{what}: {item!r} is not server, client, port=N (1-65535), thread=NAME or a number of sockets"
                )
        return cls(frozenset(roles), frozenset(ports), tuple(threads), count)

    def __or__(self, other: Rules) -> Rules:
        return Rules(self.roles | other.roles, self.ports | other.ports, self.threads + other.threads, other.count)

    def allows(self, found: _Found) -> str | None:
        """Why this socket is left out (the rule that matched), or None."""
        leak = found.leak
        if leak is not None:
            if leak.finding.role.value in self.roles:
                return f"role {leak.finding.role.value}"
            if leak.finding.socket.local.port in self.ports:
                return f"port {leak.finding.socket.local.port}"
        tb = found.traceback
        if tb is not None and any(fnmatch.fnmatchcase(tb.thread, pattern) for pattern in self.threads):
            return f"thread {tb.thread}"
        return None


def _ini_rules(config: pytest.Config) -> Rules:
    items: list[str] = []
    items += [f"role={r}" for r in config.getini("closewait_ignore_roles")]
    items += [f"port={p}" for p in config.getini("closewait_ignore_ports")]
    items += [f"thread={t}" for t in config.getini("closewait_ignore_threads")]
    try:
        return Rules.parse(items, "closewait_ignore_* in the ini file")
    except ValueError as err:
        raise pytest.UsageError(str(err)) from None


# -- per-test settings ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Test:
    nodeid: str
    location: tuple[str, int | None, str]
    keywords: Mapping[str, Any]
    path: str
    checked: bool
    horizon: float | None
    allow: Rules


def _marker_settings(item: pytest.Item) -> tuple[bool | None, float | None, Rules]:
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return None, None, Rules()
    known = {"check", "allow", "horizon", "grace"}
    if marker.args or set(marker.kwargs) - known:
        raise pytest.UsageError(
            f"{item.nodeid}: @pytest.mark.closewait takes only check=, allow=, horizon=SECONDS (grace= is its old name)"
        )
    check = marker.kwargs.get("check", True)
    if not isinstance(check, bool):
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.closewait(check=...) must be True or False")
    horizon: float | None = None
    for name in ("horizon", "grace"):
        value = marker.kwargs.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.closewait({name}=...) must be 0 or more seconds")
        horizon = float(value)
    allow = marker.kwargs.get("allow", ())
    items: list[object] = list(allow) if isinstance(allow, list | tuple | set | frozenset) else [allow]
    try:
        rules = Rules.parse(items, f"{item.nodeid}: @pytest.mark.closewait(allow=...)")
    except ValueError as err:
        raise pytest.UsageError(str(err)) from None
    return check, horizon, rules


# -- the session ----------------------------------------------------------------------------------
@dataclass(slots=True)
class _Found:
    due: testing.DueSocket
    leak: testing.Leak | None
    traceback: trace.Traceback | None


@dataclass(slots=True)
class _State:
    horizon: testing.Horizon
    report_only: bool
    keep_gc: bool
    rules: Rules
    tests: dict[str, _Test] = field(default_factory=dict)
    allowed_so_far: dict[str, int] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)
    #: The failing setup/call report of each test that failed: a leak of a failed test is added to
    #: it as a "closewait" section (the summary prints it at the end) rather than as another error.
    failures: dict[str, pytest.TestReport] = field(default_factory=dict)
    in_worker: bool = False
    #: nodeid -> position in session.items (xdist reports carry it).
    index: dict[str, int] = field(default_factory=dict)
    resume_gc: bool = False
    started: bool = False


def _horizon_setting(config: pytest.Config) -> float:
    value = config.getoption("closewait_horizon")
    if value is None:
        value = config.getoption("closewait_grace")
    if value is None:
        text = str(config.getini("closewait_horizon")).strip()
        if not text:
            return testing.DEFAULT_HORIZON
        try:
            value = _seconds(text)
        except argparse.ArgumentTypeError as err:
            raise pytest.UsageError(f"ini closewait_horizon: {err}") from None
    return float(value)


def _flag(config: pytest.Config, name: str) -> bool:
    value = config.getoption(name)
    return bool(config.getini(name)) if value is None else bool(value)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(check=True, allow=(), horizon=None): check this test for sockets it leaves in CLOSE_WAIT "
        "(closewait's pytest plugin)",
    )
    rules = _ini_rules(config)
    horizon = _horizon_setting(config)
    if (_flag(config, "closewait_trace") or rules.threads) and not trace.is_tracing():
        trace.start(limit=TRACE_LIMIT)
        config.add_cleanup(trace.stop)
    if config.getoption("closewait"):
        try:
            testing.close_wait_inodes()
        except ClosewaitError as err:
            raise pytest.UsageError(f"--closewait cannot read this process's sockets: {err}") from err
    config.stash[_state_key] = _State(
        testing.Horizon(horizon),
        report_only=_flag(config, "closewait_report_only"),
        keep_gc=bool(config.getoption("closewait_keep_gc")),
        rules=rules,
        in_worker=hasattr(config, "workerinput"),
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = config.stash[_state_key]
    everything = bool(config.getoption("closewait"))
    for item in items:
        check, horizon, allow = _marker_settings(item)
        checked = (everything or FIXTURE in getattr(item, "fixturenames", ())) if check is None else check
        location = item.location
        state.tests[item.nodeid] = _Test(
            item.nodeid,
            (location[0], location[1], location[2]),
            dict.fromkeys(item.keywords, 1),
            str(item.path),
            checked,
            horizon,
            allow,
        )


def _active(config: pytest.Config) -> _State | None:
    state = config.stash.get(_state_key, None)
    if state is None or not any(t.checked for t in state.tests.values()):
        return None
    return state


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Generator[None, object, object]:
    state = _active(session.config)
    if state is None:
        return (yield)
    try:
        state.horizon.start()
    except ClosewaitError as err:
        session.config.issue_config_time_warning(pytest.PytestWarning(f"closewait: no checks: {err}"), stacklevel=2)
        return (yield)
    state.started = True
    state.index = {item.nodeid: n for n, item in enumerate(session.items)}
    state.horizon.watch_gc()
    try:
        result = yield
        _report(session.config, state, state.horizon.finish(), current=None)
        return result
    finally:
        state.horizon.unwatch_gc()
        state.started = False


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    state = item.config.stash.get(_state_key, None)
    if state is not None and state.started:
        _report(item.config, state, state.horizon.begin(item.nodeid), current=None)
        test = state.tests.get(item.nodeid)
        if test is not None and test.checked and not state.keep_gc and gc.isenabled():
            gc.disable()
            state.resume_gc = True
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    state = item.config.stash.get(_state_key, None)
    if state is None or not state.started:
        return report
    if report.failed and call.when != "teardown":
        state.failures[item.nodeid] = report
    if call.when != "teardown":
        return report
    if state.resume_gc:
        state.resume_gc = False
        gc.enable()
    test = state.tests.get(item.nodeid)
    checked = test is not None and test.checked
    due = state.horizon.end(item.nodeid if checked else None, horizon=test.horizon if test else None)
    _report(item.config, state, due, current=report)
    return report


def _report(
    config: pytest.Config, state: _State, due: list[testing.DueSocket], *, current: pytest.TestReport | None
) -> None:
    if not due:
        return
    found = _explain(due)
    by_test: dict[str, list[_Found]] = {}
    for one in found:
        by_test.setdefault(one.due.test, []).append(one)
    for nodeid, sockets in by_test.items():
        test = state.tests.get(nodeid)
        if test is None:
            continue
        kept = [s for s in sockets if (state.rules | test.allow).allows(s) is None]
        if test.allow.count:
            tolerated = max(0, test.allow.count - state.allowed_so_far.get(nodeid, 0))
            state.allowed_so_far[nodeid] = state.allowed_so_far.get(nodeid, 0) + min(tolerated, len(kept))
            kept = kept[tolerated:]
        if not kept:
            continue
        message = _message(test, kept, state.horizon.horizons.get(nodeid, state.horizon.horizon))
        failed = state.failures.get(nodeid)
        if state.report_only:
            state.reports.append(f"{nodeid}\n{message}")
        elif failed is not None and failed.outcome == "failed" and not state.in_worker:
            failed.sections.append(("closewait", message))
        elif current is not None and current.nodeid == nodeid:
            if current.passed:
                current.outcome = "failed"
                current.longrepr = message
            else:
                current.sections.append(("closewait", message))
        else:
            late = pytest.TestReport(
                nodeid=nodeid,
                location=test.location,
                keywords=test.keywords,
                outcome="failed",
                longrepr=message,
                when="teardown",
            )
            _log_late(config, state, late)


def _log_late(config: pytest.Config, state: _State, report: pytest.TestReport) -> None:
    """Log a report for a test that has already finished. In an xdist worker the report must carry
    that test's index (the worker checks it against the test it is running), so it is set for the
    time of the call; the controller then shows and counts the report like any other."""
    interactor = next((p for p in config.pluginmanager.get_plugins() if type(p).__name__ == "WorkerInteractor"), None)
    index = state.index.get(report.nodeid)
    if interactor is None or index is None or not hasattr(interactor, "item_index"):
        config.hook.pytest_runtest_logreport(report=report)
        return
    saved = interactor.item_index
    interactor.item_index = index
    try:
        config.hook.pytest_runtest_logreport(report=report)
    finally:
        interactor.item_index = saved


def _explain(due: list[testing.DueSocket]) -> list[_Found]:
    """A Leak (a scan's finding: endpoints, role, diagnosis) for each socket still open."""
    open_inodes = {d.tracked.inode for d in due if not d.closed_by_gc}
    findings: dict[int, testing.Leak] = {}
    if open_inodes:
        try:
            for finding in testing.close_wait_sockets():
                if finding.socket.inode in open_inodes:
                    findings[finding.socket.inode] = testing.leak_of(finding)
        except ClosewaitError:
            pass
    result = []
    for d in due:
        leak = findings.get(d.tracked.inode)
        tb = leak.traceback if leak is not None and leak.traceback is not None else d.tracked.traceback
        if tb is None and trace.is_tracing() and not d.closed_by_gc:
            tb = trace.get_traceback_for_inode(d.tracked.inode)
        if leak is None and not d.closed_by_gc:
            continue  # closed between the snapshot and the scan: not a leak after all
        result.append(_Found(d, leak, tb))
    return result


def _message(test: _Test, sockets: list[_Found], horizon: float) -> str:
    still = [s for s in sockets if not s.due.closed_by_gc]
    by_gc = [s for s in sockets if s.due.closed_by_gc]
    lines: list[str] = []
    number = 0
    if still:
        n = len(still)
        after = min(s.due.after_test for s in still)
        lines.append(
            f"closewait: {n} socket{'s' if n != 1 else ''} still in CLOSE_WAIT {after:.1f} s after the test ended"
            f" (horizon {horizon:g} s)"
        )
        for one in still:
            number += 1
            assert one.leak is not None
            leak = one.leak if one.leak.traceback is not None or one.traceback is None else _with_tb(one)
            lines.extend(testing.format_leak(leak, number, test_file=test.path))
            lines.extend(_server_hint(one))
    if by_gc:
        n = len(by_gc)
        lines.append(
            f"closewait: {n} socket{'s' if n != 1 else ''} in CLOSE_WAIT after the test, closed only by the garbage"
            " collector: nothing closed it (a reference cycle held it, e.g. an asyncio transport nobody closed)"
        )
        for one in by_gc:
            number += 1
            tracked = one.due.tracked
            lines.append(
                f"  {number}) fd {tracked.fd} (socket inode {tracked.inode}): closed by a garbage collection"
                f" {one.due.after_test:.1f} s after the test ended"
            )
            if one.traceback is not None:
                lines.extend(testing.format_traceback(one.traceback, test_file=test.path))
    if not any(s.traceback is not None for s in sockets):
        lines.append(_HINT)
    return "\n".join(lines)


def _with_tb(one: _Found) -> testing.Leak:
    assert one.leak is not None
    return testing.Leak(one.leak.finding, one.traceback, one.leak.role_from_trace)


def _server_hint(one: _Found) -> list[str]:
    leak = one.leak
    if leak is None or leak.finding.role != Role.SERVER:
        return []
    port = leak.finding.socket.local.port
    tb = one.traceback
    if tb is not None and tb.thread != "MainThread":
        who = f"thread {tb.thread!r} of this process accepted it: an in-process server"
        ignore = f"closewait_ignore_threads = {shlex.quote(tb.thread)}"  # the ini value is split like a shell
    else:
        who = "this process accepted it: if it is the test suite's own server (a thread or task of this process)"
        ignore = f"closewait_ignore_ports = {port}"
    return [
        f"     hint: {who}; if that is the test harness's server, its keep-alive timer may be longer than the",
        f"     horizon: shorten the server's keep-alive, raise closewait_horizon, or ignore it in the ini file:"
        f" {ignore} (or closewait_ignore_roles = server)",
    ]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    state = config.stash.get(_state_key, None)
    if state is None or not state.reports:
        return
    if hasattr(config, "workerinput"):
        return
    terminalreporter.section("closewait (report only: nothing failed)", sep="=", yellow=True)
    for text in state.reports:
        terminalreporter.line(text)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(_state_key, None)
    workeroutput = getattr(session.config, "workeroutput", None)
    if state is not None and state.reports and isinstance(workeroutput, dict):
        workeroutput["closewait_reports"] = list(state.reports)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """xdist's controller: gather the report-only lists of its workers."""
    config = getattr(node, "config", None)
    output = getattr(node, "workeroutput", None)
    if config is None or not isinstance(output, dict):
        return
    state = config.stash.get(_state_key, None)
    if state is not None:
        state.reports.extend(output.get("closewait_reports", ()))


@pytest.fixture
def closewait_guard(request: pytest.FixtureRequest) -> Iterator[testing.Guard]:
    """Check this test for CLOSE_WAIT sockets; yields a ``closewait.testing.Guard`` (baseline taken
    at setup) for explicit ``guard.check()`` calls."""
    if FIXTURE in getattr(request.node, "fixturenames", ()):
        guard = testing.Guard(grace=testing.DEFAULT_GRACE, pause_gc=False)
        request.node.stash[_guard_key] = guard
        yield guard  # the plugin checks this test at its boundaries
        return
    # Requested late (request.getfixturevalue): check when this fixture is torn down.
    guard = testing.Guard(
        grace=testing.DEFAULT_GRACE,
        pause_gc=not request.config.getoption("closewait_keep_gc"),
    )
    try:
        yield guard
    finally:
        guard.resume_gc()  # check() resumes it too; this covers a test that failed
    guard.check(hint=_HINT)
