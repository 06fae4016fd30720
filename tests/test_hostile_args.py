"""Every command over hostile arguments: one line on stderr and the documented exit code, never a traceback.

The table crosses each command's options with values an attacker or a typo produces: NaN and
infinities, 1e308 and 400 nines, negatives, non-ASCII digits (``８０``, ``٣``), the empty string,
300 characters, a symlink loop, a path under a regular file, an unwritable output path; and runs
every command with stdout on /dev/full and with stdout closed. Exit codes are docs/cli.md's: 2 for a
bad argument (``check``: 3, UNKNOWN), 74 when stdout cannot be written. Each case is a real
``closewait`` process (the console script, so the click-free fast path is covered too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = str(Path(sys.executable).with_name("closewait"))
NINES = "9" * 400
LONG = "a" * 300
#: Values no numeric option accepts (each is refused before anything runs).
NUMBERS = ["nan", "inf", "-inf", "1e308", NINES, "-1", "８０", "٣", "", LONG]
#: Paths that name no network namespace; {loop} is a symlink loop made by the fixture below.
PATHS = ["", LONG, "/etc/hostname/x", "{loop}", "/proc/version", "٣", "-1", "/proc/self/ns/uts", "5\n"]

USAGE = 2  # a bad argument or a refusal
UNKNOWN = 3  # check: every error
OUTPUT_FAILED = 74  # stdout could not be written


def _cases() -> Iterator[tuple[list[str], int]]:
    numeric = {
        "scan": [["--port"], ["--pid"]],
        "watch": [
            ["-n", "1", "-i"],
            ["-n"],
            ["--window"],
            ["--min-growth"],
            ["-n", "1", "--port"],
            ["-n", "1", "--pid"],
        ],
        "check": [["-w"], ["-c"], ["--port"], ["--pid"]],
        "exporter": [["--top"], ["--min-interval"]],
        "reap": [["--pid"], ["--all", "--port"]],
        "lab": [["--trials"], ["reproduce", "--trials"]],
        "record": [["--capacity"]],
    }
    for command, options in numeric.items():
        code = UNKNOWN if command == "check" else USAGE
        for option in options:
            for value in NUMBERS:
                if command == "check" and value == "-1" and option[0] in ("-w", "-c"):
                    continue  # a valid integer, refused by the thresholds: see below
                yield [command, *option, value], code
    # check's thresholds: ASCII decimal, finite; a negative is refused on the status line (stdout).
    for age in ("--max-age", "--max-age-critical"):
        for value in ["nan", "inf", "-inf", NINES, "８０", "٣", "", LONG, "-1"]:
            yield ["check", age, value], UNKNOWN
    yield ["check", "-w", "-1"], UNKNOWN
    yield ["check", "-c", "-1"], UNKNOWN
    for command in ("scan", "watch", "check", "exporter"):
        for path in PATHS:
            yield [command, "--netns", path], UNKNOWN if command == "check" else USAGE
    for path in PATHS:
        yield ["watch", "--events", "--netns", path], USAGE
    # reap: a filter that lets the namespace be looked at (--all --port 1), and never --yes.
    for path in [*PATHS, "cwtest-no-such-namespace", "999999999"]:
        yield ["reap", "--all", "--port", "1", "--netns", path], USAGE
    yield ["reap", "--all", "--port", "1", "--all-netns", "--netns", "1"], USAGE
    yield ["reap", "--all-netns", "--netns", ""], USAGE
    yield ["reap", "--all-netns"], USAGE  # whose sockets is still required
    yield ["watch", "--events", "--pid", "1"], USAGE
    # An entry into CLOSE_WAIT has no process, hence no workload: --events takes no workload options.
    yield ["watch", "--events", "--container", "web"], USAGE
    yield ["watch", "--events", "--unit", "a\nb"], USAGE
    yield ["watch", "--events", "--by", "workload"], USAGE
    # A pin directory that is no bpffs and whose parent is no empty directory to mount one on:
    # refused before anything is attached, mounted or created (/proc is never mounted over).
    for path in ["", LONG, "/proc/version", "/etc/hostname/x", "{loop}", "5\n", "/proc/self/x"]:
        yield ["record", "--pin-dir", path], USAGE
    for path in ["", LONG, "5\n"]:
        yield ["scan", "--recorder-pins", path], USAGE
    for value in ["nan", "inf", "-1s", "٣s", "", LONG, NINES, NINES + "s", NINES + "ms", "1e308s"]:
        yield ["reap", "--all", "--older-than", value], USAGE
    for value in ["::1:80", "fe80::1:8080", "nan", "", LONG, "10.0.0.1:٣", "10.0.0.1:" + NINES, "[::1]:-1"]:
        yield ["reap", "--all", "--remote", value], USAGE
    for value in ["a..b:1", ".:1", "a" * 64 + ".example:1", "127.0.0.1:٣٣", "127.0.0.1:nan", "", LONG, ":" + NINES]:
        yield ["exporter", "--listen", value], USAGE
    for path in ["/proc/version", "/etc/hostname/x", "{loop}", "", LONG, "/proc", "/nonexistent/dir/report.html"]:
        yield ["lab", "reproduce", "--html", path], USAGE
    # Workload options: empty, a newline, a bad pod spelling, and names no process on the host runs in
    # (the answer names the closest ones when there are any: still one line).
    workload_values = {
        "--container": ["", "a\nb", LONG, "no-such-container-3f2a", "٣"],
        "--pod": ["", "/x", "a/", "a/b/c", "a\tb", "no-such-pod-7d9f"],
        "--namespace": ["", "no-such-namespace"],
        "--unit": ["", "no-such.service", "x\ny"],
    }
    for command, prefix in (("scan", []), ("watch", ["-n", "1"]), ("check", []), ("reap", [])):
        for option, values in workload_values.items():
            for value in values:
                yield [command, *prefix, option, value], UNKNOWN if command == "check" else USAGE
    yield ["scan", "--no-owners", "--container", "web"], USAGE
    yield ["scan", "--no-workloads", "--unit", "web"], USAGE
    yield ["scan", "--json", "--no-workloads", "--pod", "a/b"], USAGE
    yield ["scan", "--by", "pod"], USAGE
    yield ["watch", "-n", "1", "--by", ""], USAGE
    yield ["check", "--per-workload", "--perfdata-top", "-1"], UNKNOWN
    yield ["check", "--per-workload", "--per-process"], UNKNOWN
    yield ["lab", "nosuchpart"], USAGE
    yield ["nosuchcommand"], USAGE
    yield ["scan", "--state", LONG], USAGE


CASES = list(_cases())


def _id(argv: list[str]) -> str:
    return " ".join(a if len(a) <= 12 else a[:9] + "..." for a in argv) or "(none)"


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A symlink loop: a -> b -> a."""
    base = tmp_path_factory.mktemp("hostile")
    (base / "a").symlink_to(base / "b")
    (base / "b").symlink_to(base / "a")
    return str(base / "a")


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *argv], capture_output=True, text=True, timeout=60, check=False, env=env)


def _the_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    """The one line the command answered with: on stderr, or for check's UNKNOWN on stdout."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    if command == "check" and not lines:
        lines = (result.stdout or "").splitlines()
        assert len(lines) == 1, result.stdout
        assert lines[0].startswith("CLOSEWAIT UNKNOWN - "), lines
        return lines[0]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("closewait"), lines[0]
    return lines[0]


@pytest.mark.parametrize(("argv", "code"), CASES, ids=[_id(a) for a, _ in CASES])
def test_hostile_argument_is_one_line_and_the_documented_code(argv: list[str], code: int, loop: str) -> None:
    argv = [a.replace("{loop}", loop) for a in argv]
    result = _run(argv)
    line = _the_line(result, argv[0])
    assert result.returncode == code, (line, result.stdout[:200])
    if argv[0] != "check":
        assert result.stdout == ""


#: Every command's output path (exporter writes only to stderr: its --help stands for it).
OUTPUTS = [
    [],
    ["--help"],
    ["--version"],
    ["scan"],
    ["scan", "--json"],
    ["scan", "--json", "--no-owners"],
    ["scan", "--json", "--no-workloads"],
    ["scan", "--by", "process"],
    ["scan", "--json", "--state", "all"],
    ["scan", "--state", "teardown", "--port", "1"],
    ["scan", "--help"],
    ["watch", "-n", "1"],
    ["watch", "-n", "1", "--jsonl"],
    ["check"],
    ["check", "--per-workload"],
    ["check", "--help"],
    ["exporter", "--help"],
    ["reap", "--pid", "{me}"],
    ["reap", "--pid", "{me}", "--json"],
    ["reap", "--pid", "{me}", "--all-netns"],
    ["reap", "--pid", "{me}", "--netns", "{me}", "--json"],
    ["lab", "--help"],
    ["record", "--help"],
    ["record", "--ebpf"],
]


@pytest.mark.parametrize("stdout", ["/dev/full", "closed"])
@pytest.mark.parametrize("argv", OUTPUTS, ids=[_id(a) for a in OUTPUTS])
def test_unwritable_stdout_is_one_line_and_exit_74(argv: list[str], stdout: str) -> None:
    argv = [a.replace("{me}", str(os.getpid())) for a in argv]
    with open(os.devnull if stdout == "closed" else stdout, "w") as sink:
        result = subprocess.run(
            [SCRIPT, *argv],
            stdout=sink,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
            preexec_fn=(lambda: os.close(1)) if stdout == "closed" else None,
        )
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.splitlines()
    why = "stdout is closed" if stdout == "closed" else "No space left on device"
    assert line == f"closewait: error: cannot write the output: {why}"
    assert result.returncode == (UNKNOWN if argv[:1] == ["check"] else OUTPUT_FAILED)


def test_closewait_alone_prints_help_and_exits_0() -> None:
    result = _run([])
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.startswith("Usage: closewait ")
    assert "Commands:" in result.stdout


@pytest.mark.parametrize("command", ["scan", "watch", "check", "exporter", "reap", "lab", "record"])
def test_every_help_ends_with_examples_and_uses_plain_metavars(command: str) -> None:
    result = _run([command, "--help"], env={**os.environ, "COLUMNS": "100"})
    assert result.returncode == 0
    text = result.stdout
    for click_name in ("INTEGER", "FLOAT", "RANGE", "FILE"):
        assert click_name not in text
    examples = text.split("Examples:\n", 1)[1].strip().splitlines()
    assert 2 <= len(examples) <= 3
    assert all(line.strip().startswith(f"closewait {command}") for line in examples)


def test_a_thread_id_is_refused_with_its_process() -> None:
    ready = threading.Event()
    tid: list[int] = []
    done = threading.Event()

    def run() -> None:
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(60)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        ready.wait(10)
        for command, code in (("scan", USAGE), ("reap", USAGE), ("check", UNKNOWN)):
            result = _run([command, "--pid", str(tid[0])])
            line = _the_line(result, command)
            assert result.returncode == code
            assert f"{tid[0]} is a thread of process {os.getpid()}, not a process: give {os.getpid()}" in line
    finally:
        done.set()
        worker.join()


@pytest.mark.parametrize("command", [["watch", "-i", "0.2"], ["exporter", "--listen", "127.0.0.1:0"]])
def test_ctrl_c_exits_130(command: list[str]) -> None:
    proc = subprocess.Popen(
        [SCRIPT, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        if command[0] == "exporter":
            assert proc.stderr.readline().startswith("closewait exporter: serving ")
        else:
            threading.Event().wait(1.0)  # a sample or two
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in rest
    last = "closewait exporter: stopped" if command[0] == "exporter" else "closewait: interrupted"
    assert rest.splitlines() == [last]


def test_an_internal_error_in_check_is_unknown_not_warning() -> None:
    """A bug in check (here: evaluate() raising) is UNKNOWN (3) with one line, not a traceback with exit 1."""
    code = (
        "import closewait.cli.check as c\n"
        "def boom(*args):\n"
        "    raise RuntimeError('boom')\n"
        "c.evaluate = boom\n"
        "from closewait.cli import main\n"
        "main(['check', '-w', '1'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CLOSEWAIT_DEBUG"}
    argv = [sys.executable, "-c", code]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert result.returncode == UNKNOWN
    assert result.stdout.splitlines() == ["CLOSEWAIT UNKNOWN - internal error: RuntimeError: boom"]
    assert result.stderr == ""
