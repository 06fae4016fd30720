"""A closed stdout (``closewait ... | head``) ends a command with 141, like a shell pipeline, and quietly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


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
