"""A closed stdout (``closewait ... | head``) ends a command with 141, like a shell pipeline, and quietly."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pytest

from tests.conftest import Spawn


@pytest.mark.parametrize("args", [["scan", "--state", "all"], ["scan", "--state", "all", "--json"]])
def test_reader_gone_exits_141_without_traceback(args: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: every write gets EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "closewait", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141
    assert "Traceback" not in proc.stderr


#: Holds 200 established loopback connections (400 sockets, a few hundred KB of output: more than a
#: pipe buffer), prints its port, and waits.
HOLDER = """
import socket, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(256)
kept = []
for _ in range(200):
    kept.append(socket.create_connection(server.getsockname()))
    kept.append(server.accept()[0])
print(server.getsockname()[1], flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("extra", [["--json"], ["--json", "--wide"], ["--wide"]])
def test_a_reader_that_stops_early_is_noticed(spawn: Spawn, extra: list[str]) -> None:
    """``closewait scan ... | head -c 10`` on an output larger than the pipe: 141, not 0.

    Python's buffered stdout reports a write that the reader's exit cut short as complete, and the
    rest was lost silently; closewait writes stdout itself and notices."""
    holder = spawn(HOLDER)
    assert holder.stdout is not None
    port = holder.stdout.readline().strip()
    # A pipe of one page: the output (tens of KB) can never fit in it whole, so the command is still
    # writing when the reader goes away, however fast it runs (with the default 64 KiB pipe the
    # --wide table of 400 sockets could be written whole before the reader closed, and exit 0).
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "closewait", "scan", "--state", "established", "--port", port, *extra],
            stdout=write_end,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    assert proc.stderr is not None
    with os.fdopen(read_end, "rb", buffering=0) as reader:
        assert len(reader.read(10)) == 10
    # the reader went away, like head -c 10
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""
