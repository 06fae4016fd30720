"""Ctrl+C in the middle of reproduce or remedies (with --full's minute-long waits): nothing is left.

The experiments run in worker threads; these tests check that an interrupt does not wait for them
(``run_parallel``, ``stop_event``) and that every server and client the part started is gone.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import psutil
import pytest

from tests.lab_experiments.kernel import alive
from tests.util import wait_for

RUN_PART = """
import signal, sys
import closewait.lab
# A child of a non-interactive shell may inherit SIGINT ignored; Ctrl+C must reach this one.
signal.signal(signal.SIGINT, signal.default_int_handler)
closewait.lab.run([sys.argv[1]], full=True)
print("finished", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("part", "servers"), [("reproduce", 2), ("remedies", 6)])
def test_ctrl_c_mid_part_ends_every_child(part: str, servers: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_PART, part],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lab = psutil.Process(proc.pid)
        # Interrupt once the part's servers are up (and its workers are deep in their waits).
        children = wait_for(lambda: (kids := lab.children(recursive=True)) and len(kids) >= servers and kids, 30)
        pids = [child.pid for child in children]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode != 0
    assert "finished" not in out  # interrupted, not waited out (--full would take over a minute)
    assert "KeyboardInterrupt" in err
    for pid in pids:
        wait_for(lambda pid=pid: not alive(pid), timeout=10)
