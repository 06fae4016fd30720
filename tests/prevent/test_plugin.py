"""The pytest plugin, run the way users run it: inner pytest sessions in subprocesses (pytester),
with the plugin loaded through its ``pytest11`` entry point, real asyncio and HTTP servers on loopback."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

#: Inner test files. ``# creates:NAME`` marks the line a traced failure must name.
ASYNCIO_TESTS = """
import asyncio


async def forgetful_echo(reader, writer):
    writer.write(await reader.read(100))
    await writer.drain()
    # returns without writer.close(): the transport stays open until the garbage collector runs


async def careful_echo(reader, writer):
    writer.write(await reader.read(100))
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def talk(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # creates:listener
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping")
    assert await reader.read(100) == b"ping"
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.05)  # the server reads the EOF
    server.close()
    await server.wait_closed()


def test_asyncio_handler_forgets_close():
    asyncio.run(talk(forgetful_echo))  # creates:accepted


def test_asyncio_clean_server():
    asyncio.run(talk(careful_echo))
"""

HTTP_TESTS = """
import http.server
import threading

import requests

SESSION = requests.Session()  # an application-wide pool, never closed


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = 0.2  # the server closes connections idle this long

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.closed_one = threading.Event()

    def shutdown_request(self, request):
        super().shutdown_request(request)
        self.closed_one.set()  # after the close: the client has the FIN


def serve():
    server = Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread, f"http://127.0.0.1:{server.server_address[1]}/"


def stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_pooled_client_keeps_connection_the_server_closed():
    server, thread, url = serve()
    try:
        assert SESSION.get(url).text == "ok"  # creates:pooled
        assert server.closed_one.wait(5)  # the server closed the idle keep-alive connection
    finally:
        stop(server, thread)


def test_closed_session_is_clean():
    server, thread, url = serve()
    try:
        with requests.Session() as session:
            assert session.get(url).text == "ok"
            assert server.closed_one.wait(5)
    finally:
        stop(server, thread)
"""

#: A helper every activation test uses: a connection the test leaves in CLOSE_WAIT.
LEAK_HELPER = """
import socket
import pytest

KEPT = []


def leak():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    client.close()
    listener.close()
    KEPT.append(conn)  # never closed
"""

ACTIVATION_TESTS = (
    LEAK_HELPER
    + """

def test_unchecked_leak():
    leak()


@pytest.mark.closewait
def test_marked_leak():
    leak()


@pytest.mark.closewait(grace=0.05)
def test_marked_clean():
    pass


def test_fixture_leak(closewait_guard):
    assert closewait_guard.grace == 0.5
    leak()


def test_late_fixture_leak(request):
    request.getfixturevalue("closewait_guard")
    leak()
"""
)


def _line_of(source: str, tag: str) -> int:
    """The line number of a tagged line in the file pytester writes (it drops leading blank lines)."""
    lines = source.lstrip("\n").splitlines()
    (number,) = [n for n, line in enumerate(lines, 1) if line.endswith(f"# creates:{tag}")]
    return number


def _outcomes(result: pytest.RunResult) -> dict[str, set[str]]:
    """test name -> {PASSED, FAILED, ERROR} from ``-rA``'s short summary (a teardown error adds ERROR)."""
    found: dict[str, set[str]] = {}
    for line in result.outlines:
        for word in ("PASSED", "FAILED", "ERROR"):
            if line.startswith(f"{word} ") and "::" in line:
                found.setdefault(line.split("::", 1)[1].split(" ", 1)[0], set()).add(word)
    return found


def test_inactive_by_default_a_leaking_test_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_leaks=LEAK_HELPER + "\n\ndef test_leak():\n    leak()\n")
    result = pytester.runpytest_subprocess("-rA")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["plugins:*closewait-*"])  # loaded through the pytest11 entry point
    result.stdout.no_fnmatch_line("*CLOSE_WAIT*")


#: The inner sessions keep the automatic garbage collector off, so the asyncio transport nobody
#: closed stays in CLOSE_WAIT until the horizon (test_gc_closed_socket_is_reported covers the other case).
NO_GC_CONFTEST = "import gc\n\ngc.disable()\n"


def test_flag_fails_asyncio_and_pooled_client_leaks_and_passes_clean_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_asyncio_leak=ASYNCIO_TESTS, test_http_pool=HTTP_TESTS)
    pytester.makeconftest(NO_GC_CONFTEST)
    result = pytester.runpytest_subprocess("--closewait", "--closewait-horizon=1", "-rA", "-p", "no:cacheprovider")
    # A leak is found after its test has passed: it is reported as an error at that test's teardown.
    assert _outcomes(result) == {
        "test_asyncio_handler_forgets_close": {"PASSED", "ERROR"},
        "test_asyncio_clean_server": {"PASSED"},
        "test_pooled_client_keeps_connection_the_server_closed": {"PASSED", "ERROR"},
        "test_closed_session_is_clean": {"PASSED"},
    }
    result.assert_outcomes(passed=4, errors=2)
    output = result.stdout.str()
    # Failures are attributed to the tests themselves, with each socket's diagnosis.
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at teardown of test_asyncio_handler_forgets_close _*",
            "closewait: 1 socket still in CLOSE_WAIT 1.* s after the test ended (horizon 1 s)",
            "  1) fd * 127.0.0.1:* <- 127.0.0.1:*  role *  Recv-Q 0  [[]eof-not-closed[]]",
            "     read() returned 0 (EOF) after 127.0.0.1:* closed *, but it has not been closed",
            "(run pytest with --closewait-trace to see where each socket was created and by which thread)",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at teardown of test_pooled_client_keeps_connection_the_server_closed _*",
            "closewait: 1 socket still in CLOSE_WAIT*",
            "  1) fd * 127.0.0.1:* <- 127.0.0.1:*  role client  Recv-Q 1  [[]not-reading[]]",
            "     fix: an idle pooled connection the server closed*",
        ]
    )
    assert "Traceback" not in output
    assert "never closed" not in output


def test_trace_flag_names_the_line_that_created_each_socket(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_asyncio_leak=ASYNCIO_TESTS, test_http_pool=HTTP_TESTS)
    pytester.makeconftest(NO_GC_CONFTEST)
    result = pytester.runpytest_subprocess("--closewait", "--closewait-horizon=1", "--closewait-trace", "-rA")
    result.assert_outcomes(passed=4, errors=2)
    asyncio_file = pytester.path / "test_asyncio_leak.py"
    http_file = pytester.path / "test_http_pool.py"
    result.stdout.fnmatch_lines(
        [
            "*role server (accepted, from the trace)  Recv-Q 0  [[]eof-not-closed[]]",
            "     fix: close the connection when read()/recv() returns 0*",
            f"     accepted at {asyncio_file}:{_line_of(ASYNCIO_TESTS, 'accepted')}"
            " in test_asyncio_handler_forgets_close"
            f" (listener created at {asyncio_file}:{_line_of(ASYNCIO_TESTS, 'listener')} in talk)",
            "     accepted in thread 'MainThread'",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*role client  Recv-Q 1  [[]not-reading[]]",
            "*",
            f"     created at {http_file}:{_line_of(HTTP_TESTS, 'pooled')}"
            " in test_pooled_client_keeps_connection_the_server_closed",
            "     created in thread 'MainThread'",
        ]
    )
    result.stdout.no_fnmatch_line("*--closewait-trace to see*")


def test_marker_and_fixture_each_check_one_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_activation=ACTIVATION_TESTS)
    result = pytester.runpytest_subprocess("-rA", "--closewait-horizon=0.3")
    assert _outcomes(result) == {
        "test_unchecked_leak": {"PASSED"},
        "test_marked_leak": {"PASSED", "ERROR"},
        "test_marked_clean": {"PASSED"},
        "test_fixture_leak": {"PASSED", "ERROR"},
        # Requested late, the fixture can only check when it is torn down: a teardown error.
        "test_late_fixture_leak": {"PASSED", "ERROR"},
    }
    result.stdout.fnmatch_lines(["*_ ERROR at teardown of test_marked_leak _*", "closewait: 1 socket still in*"])
    result.stdout.fnmatch_lines(["*_ ERROR at teardown of test_fixture_leak _*", "closewait: 1 socket still in*"])
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_late_fixture_leak*", "*CloseWaitLeak*"])


def test_a_failing_test_gets_the_leak_as_an_extra_section(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_both=LEAK_HELPER + "\n\ndef test_leak_and_fail():\n    leak()\n    assert 1 == 2\n")
    result = pytester.runpytest_subprocess("--closewait", "--closewait-grace=0")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*assert 1 == 2*",
            "*- closewait -*",
            "closewait: 1 socket still in CLOSE_WAIT 0.0 s after the test ended (horizon 0 s)",
        ]
    )


@pytest.mark.parametrize(
    ("args", "source", "message"),
    [
        (["--closewait-grace=-1"], "", "*argument --closewait-grace: '-1' must be 0 or more seconds*"),
        (["--closewait-grace=soon"], "", "*argument --closewait-grace: 'soon' is not a number of seconds*"),
        (
            [],
            "import pytest\n\n@pytest.mark.closewait(grace='x')\ndef test_x():\n    pass\n",
            "*test_bad.py::test_x: @pytest.mark.closewait(grace=...) must be 0 or more seconds*",
        ),
    ],
)
def test_bad_options_are_one_clear_line(pytester: pytest.Pytester, args: list[str], source: str, message: str) -> None:
    pytester.makepyfile(test_bad=source or "def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str()


# -- a suite shaped like urllib3's ----------------------------------------------------------------
#: A keep-alive test server thread ("dummyserver", session-scoped) that, like hypercorn, closes a
#: connection only when its keep-alive timer fires (1.5 s), whether or not the client has gone: its
#: ends sit in CLOSE_WAIT for up to 1.5 s after every correct test. An application under test
#: ("mylib", on the rootdir as an editable install is) with a module-level pool.
URLLIB3_LIKE_CONFTEST = """
import socket
import threading
import time

import pytest

KEEPALIVE = 1.5


def _serve_one(conn):
    with conn:
        conn.settimeout(5)
        if not conn.recv(65536):
            return
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: keep-alive\\r\\n\\r\\nok")
        time.sleep(KEEPALIVE)  # the keep-alive timer: the only thing that closes the connection


def _accept_forever(listener):
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()


@pytest.fixture(scope="session")
def http_server():
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_accept_forever, args=(listener,), name="dummyserver", daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    listener.close()
"""

MYLIB_POOL = """
import urllib3

POOL = urllib3.PoolManager()  # module-level: connections stay pooled after the test


def fetch(url):
    return _level1(url)


def _level1(url):
    return _level2(url)


def _level2(url):
    return _level3(url)


def _level3(url):
    return _level4(url)


def _level4(url):
    return POOL.request("GET", url).data
"""

URLLIB3_LIKE_CLIENT_TESTS = """
import pytest
import urllib3


@pytest.mark.parametrize("n", range(6))
def test_pool_closed(http_server, n):
    with urllib3.PoolManager() as pool:
        assert pool.request("GET", http_server).data == b"ok"


def test_response_released(http_server):
    with urllib3.PoolManager() as pool:
        response = pool.request("GET", http_server, preload_content=False)
        assert response.read() == b"ok"
        response.release_conn()


FLAKY = []


@pytest.mark.flaky(reruns=2)
def test_flaky(http_server):
    with urllib3.PoolManager() as pool:
        assert pool.request("GET", http_server).data == b"ok"
    FLAKY.append(1)
    assert len(FLAKY) > 1, "fails the first time"
"""

URLLIB3_LIKE_LEAK_TESTS = """
import socket
import threading

import mylib


def test_module_pool_leak(http_server):
    assert mylib.fetch(http_server) == b"ok"  # creates:pool


class ForgetfulServer:
    \"\"\"The server under test: reads a request, answers nothing, never closes on EOF.\"\"\"

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.kept = []
        self.thread = threading.Thread(target=self._serve, name="app-under-test", daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        self.kept.append(conn)
        while conn.recv(100):
            pass  # EOF: returns, keeps the socket


SERVERS = []


def test_server_under_test_leak():
    server = ForgetfulServer()
    SERVERS.append(server)
    with socket.create_connection(server.listener.getsockname()) as client:
        client.sendall(b"hello")
    server.thread.join(5)
"""


def _urllib3_like_suite(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(URLLIB3_LIKE_CONFTEST)
    pytester.mkpydir("mylib").joinpath("__init__.py").write_text(MYLIB_POOL)
    pytester.makepyfile(test_clients=URLLIB3_LIKE_CLIENT_TESTS, test_leaks=URLLIB3_LIKE_LEAK_TESTS)
    pytester.syspathinsert()


@pytest.mark.slow
def test_urllib3_like_suite_gives_exactly_the_two_leaks(pytester: pytest.Pytester) -> None:
    _urllib3_like_suite(pytester)
    result = pytester.runpytest_subprocess(
        "--closewait", "--closewait-horizon=3", "--closewait-trace", "-rA", "-p", "rerunfailures"
    )
    outcomes = _outcomes(result)
    assert {name for name, seen in outcomes.items() if "ERROR" in seen or "FAILED" in seen} == {
        "test_module_pool_leak",
        "test_server_under_test_leak",
    }
    assert result.parseoutcomes() == {"passed": 10, "errors": 2, "rerun": 1}
    leaks_file = pytester.path / "test_leaks.py"
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at teardown of test_module_pool_leak _*",
            "closewait: 1 socket still in CLOSE_WAIT * s after the test ended (horizon 3 s)",
            "  1) fd * 127.0.0.1:* <- 127.0.0.1:*  role client  Recv-Q *  [[]*[]]",
            "     created at */mylib/__init__.py:* in _level4",
            "     created in thread 'MainThread'",
            f"     the test's own line: {leaks_file}:{_line_of(URLLIB3_LIKE_LEAK_TESTS, 'pool')}"
            " in test_module_pool_leak",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at teardown of test_server_under_test_leak _*",
            "closewait: 1 socket still in CLOSE_WAIT * s after the test ended (horizon 3 s)",
            "  1) fd * 127.0.0.1:* <- 127.0.0.1:*  role server*  Recv-Q 0  [[]eof-not-closed[]]",
            "*accepted in thread 'app-under-test'",
            "     hint: thread 'app-under-test' of this process accepted it: an in-process server;*",
            "*closewait_ignore_threads = app-under-test*",
        ]
    )
    assert "never closed" not in result.stdout.str()


@pytest.mark.slow
def test_urllib3_like_suite_with_a_horizon_below_the_keep_alive_blames_the_test_server(
    pytester: pytest.Pytester,
) -> None:
    """The counter-check: with the horizon under the server's keep-alive timer, the dummyserver's ends
    are reported, each naming the thread, and ignoring that thread in the ini file silences them."""
    _urllib3_like_suite(pytester)
    result = pytester.runpytest_subprocess(
        "--closewait", "--closewait-horizon=0.2", "--closewait-trace", "-p", "rerunfailures", "test_clients.py"
    )
    result.stdout.fnmatch_lines(["*hint: thread 'dummyserver' of this process accepted it*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    pytester.makeini("[pytest]\nclosewait_ignore_threads = dummyserver\n")
    result = pytester.runpytest_subprocess(
        "--closewait", "--closewait-horizon=0.2", "-p", "rerunfailures", "test_clients.py"
    )
    assert result.parseoutcomes() == {"passed": 8, "rerun": 1}


# -- control: markers, ini options, report-only ---------------------------------------------------
CONTROL_TESTS = (
    LEAK_HELPER
    + """

@pytest.mark.closewait(check=False)
def test_not_checked():
    leak()


@pytest.mark.closewait(allow=1)
def test_one_allowed():
    leak()


@pytest.mark.closewait(allow=["server"])
def test_server_ends_allowed():
    leak()


@pytest.mark.closewait(allow="thread=worker-*")
def test_other_thread_allowed():
    import threading
    t = threading.Thread(target=leak, name="worker-1")
    t.start()
    t.join()


@pytest.mark.closewait(allow=1)
def test_two_with_one_allowed():
    leak()
    leak()
"""
)


def test_marker_allows_by_count_role_and_thread_and_check_false_skips(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_control=CONTROL_TESTS)
    result = pytester.runpytest_subprocess("--closewait", "--closewait-horizon=0.2", "--closewait-trace", "-rA")
    assert {name for name, seen in _outcomes(result).items() if "ERROR" in seen} == {"test_two_with_one_allowed"}
    result.stdout.fnmatch_lines(["*_ ERROR at teardown of test_two_with_one_allowed _*", "closewait: 1 socket still*"])


def test_ini_ignores_by_role(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_leaks=LEAK_HELPER + "\n\ndef test_leak():\n    leak()\n")
    # The listener is closed before the check: only the trace knows the socket was accepted (a server end).
    pytester.makeini("[pytest]\nclosewait_ignore_roles = server\nclosewait_trace = true\n")
    result = pytester.runpytest_subprocess("--closewait", "--closewait-horizon=0.2")
    result.assert_outcomes(passed=1)
    # The same socket is reported without the ini option; its port then goes in closewait_ignore_ports.
    pytester.makeini("[pytest]\n")
    result = pytester.runpytest_subprocess("--closewait", "--closewait-horizon=0.2")
    result.assert_outcomes(passed=1, errors=1)


def test_ini_ignores_the_listener_port(pytester: pytest.Pytester) -> None:
    import socket

    with socket.socket() as probe:  # a free port for the inner server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pytester.makepyfile(
        test_leaks=LEAK_HELPER.replace('("127.0.0.1", 0)', f'("127.0.0.1", {port})')
        + "\n\ndef test_leak():\n    leak()\n"
    )
    pytester.makeini(f"[pytest]\nclosewait_ignore_ports = {port}\n")
    result = pytester.runpytest_subprocess("--closewait", "--closewait-horizon=0.2")
    result.assert_outcomes(passed=1)


def test_report_only_lists_leaks_and_fails_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_leaks=LEAK_HELPER + "\n\ndef test_leak():\n    leak()\n")
    result = pytester.runpytest_subprocess("--closewait", "--closewait-horizon=0.2", "--closewait-report-only")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        ["*closewait (report only: nothing failed)*", "test_leaks.py::test_leak", "closewait: 1 socket still in*"]
    )
    pytester.makeini("[pytest]\nclosewait_report_only = true\n")
    result = pytester.runpytest_subprocess("--closewait", "--closewait-horizon=0.2", "-n", "2")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*closewait (report only: nothing failed)*", "test_leaks.py::test_leak"])


@pytest.mark.parametrize(
    ("ini", "message"),
    [
        ("closewait_ignore_roles = servers", "*closewait_ignore_* in the ini file: 'role=servers' is not server*"),
        ("closewait_ignore_ports = 70000", "*'port=70000' is not server, client, port=N (1-65535)*"),
        ("closewait_horizon = soon", "*ini closewait_horizon: 'soon' is not a number of seconds*"),
    ],
)
def test_bad_ini_options_are_one_clear_line(pytester: pytest.Pytester, ini: str, message: str) -> None:
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    pytester.makeini(f"[pytest]\n{ini}\n")
    result = pytester.runpytest_subprocess("--closewait")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


# -- attribution, late sockets, the garbage collector ---------------------------------------------
LATE_ACCEPT_CONFTEST = """
import socket
import threading

import pytest

LISTENER = socket.create_server(("127.0.0.1", 0))
KEPT = []
ACCEPT_NOW = threading.Event()
ACCEPTED = threading.Event()


def _serve():
    ACCEPT_NOW.wait()
    conn, _ = LISTENER.accept()
    KEPT.append(conn)  # never closed
    ACCEPTED.set()


threading.Thread(target=_serve, name="late-acceptor", daemon=True).start()


def pytest_runtest_logfinish(nodeid):
    # Between the end of one test and the start of the next: after the plugin's check.
    if nodeid.endswith("test_connects"):
        ACCEPT_NOW.set()
        assert ACCEPTED.wait(5)
"""

LATE_ACCEPT_TESTS = """
import socket

from conftest import LISTENER


def test_connects():
    client = socket.create_connection(LISTENER.getsockname())
    client.close()  # the server has not accepted yet


def test_next():
    pass
"""


def test_a_socket_accepted_after_the_check_is_the_previous_tests(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(LATE_ACCEPT_CONFTEST)
    pytester.makepyfile(test_late=LATE_ACCEPT_TESTS)
    result = pytester.runpytest_subprocess("--closewait", "--closewait-horizon=0.3", "-rA")
    assert _outcomes(result) == {"test_connects": {"PASSED", "ERROR"}, "test_next": {"PASSED"}}


GC_TESTS = (
    ASYNCIO_TESTS
    + """

def test_collects():
    import gc
    gc.collect()
"""
)


def test_a_socket_only_the_garbage_collector_closed_is_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_gc=GC_TESTS)
    result = pytester.runpytest_subprocess("--closewait", "--closewait-trace", "-rA")
    assert _outcomes(result) == {
        "test_asyncio_handler_forgets_close": {"PASSED", "ERROR"},
        "test_asyncio_clean_server": {"PASSED"},
        "test_collects": {"PASSED"},
    }
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at teardown of test_asyncio_handler_forgets_close _*",
            "closewait: 1 socket in CLOSE_WAIT after the test, closed only by the garbage collector: nothing*",
            "  1) fd * (socket inode *): closed by a garbage collection * s after the test ended",
            f"     accepted at {pytester.path / 'test_gc.py'}:*",
        ]
    )


# -- other plugins --------------------------------------------------------------------------------
def test_xdist_workers_each_check_their_own_process(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_activation=ACTIVATION_TESTS)
    result = pytester.runpytest_subprocess("-n", "2", "--closewait", "--closewait-horizon=0.3", "-rA")
    outcomes = _outcomes(result)
    assert {name for name, seen in outcomes.items() if "ERROR" in seen} == {
        "test_unchecked_leak",
        "test_marked_leak",
        "test_fixture_leak",
        "test_late_fixture_leak",
    }
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_marked_leak*", "closewait: 1 socket still in*"])


TIMEOUT_TESTS = (
    LEAK_HELPER
    + """
import time


@pytest.mark.timeout(1)
def test_times_out():
    time.sleep(10)


def test_leak():
    leak()
"""
)


def test_pytest_timeout_still_times_tests_out(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_timeout=TIMEOUT_TESTS)
    result = pytester.runpytest_subprocess("--closewait", "--closewait-horizon=0.3", "-rA", "-p", "timeout")
    assert _outcomes(result) == {"test_times_out": {"FAILED"}, "test_leak": {"PASSED", "ERROR"}}
    result.stdout.fnmatch_lines(["*Timeout*"])


ASYNC_PLUGIN_TESTS = """
import asyncio

import anyio
import pytest

KEPT = []


async def _keep(reader, writer):
    KEPT.append(writer)  # never closed
    await reader.read()


@pytest.mark.asyncio
async def test_asyncio_leak():
    server = await asyncio.start_server(_keep, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.05)
    server.close()


@pytest.mark.asyncio
async def test_asyncio_clean():
    async def echo(reader, writer):
        writer.write(await reader.read(10))
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    writer.write(b"x")
    writer.write_eof()
    assert await reader.read() == b"x"
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_anyio_clean():
    async def handle(stream):
        async with stream:
            await stream.send(await stream.receive())

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, handle)
        async with await anyio.connect_tcp("127.0.0.1", port) as client:
            await client.send(b"x")
            assert await client.receive() == b"x"
        group.cancel_scope.cancel()
"""


def test_pytest_asyncio_and_anyio_tests_are_checked(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_async=ASYNC_PLUGIN_TESTS)
    pytester.makeconftest(NO_GC_CONFTEST)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    result = pytester.runpytest_subprocess("--closewait", "--closewait-horizon=0.3", "-rA", "-p", "asyncio")
    assert _outcomes(result) == {
        "test_asyncio_leak": {"PASSED", "ERROR"},
        "test_asyncio_clean": {"PASSED"},
        "test_anyio_clean": {"PASSED"},
    }
