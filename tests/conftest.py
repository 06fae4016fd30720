"""Fixtures every test area shares: child processes ended by pid, and bounded waiting."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.util import wait_for

__all__ = ["wait_for"]

Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start child processes that are always ended (SIGKILL by pid, then reaped) after the test.

    ``spawn(code)`` runs a Python snippet (dedented) with this interpreter; ``spawn(argv=[...])``
    runs a command. The child's stdout is a pipe in text mode, so a child can report readiness
    and its bound port with one ``print(..., flush=True)`` that the test reads with
    ``proc.stdout.readline()``.
    """
    children: list[subprocess.Popen[str]] = []

    def _spawn(code: str | None = None, *, argv: list[str] | None = None, **kwargs: Any) -> subprocess.Popen[str]:
        if (code is None) == (argv is None):
            raise ValueError("give code or argv")
        command = [sys.executable, "-c", textwrap.dedent(code)] if code is not None else argv
        assert command is not None
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("text", True)
        proc = subprocess.Popen(command, **kwargs)
        children.append(proc)
        return proc

    yield _spawn
    for proc in children:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
