"""Fixtures the workload tests share: a real podman container with a CLOSE_WAIT leak inside."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.workload.realcg import Container, can_run_podman, run_container


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Container]:
    """A podman container with its own network namespace, leaking one CLOSE_WAIT socket on its loopback."""
    if not can_run_podman():
        pytest.skip("needs root, podman and runc (apt-get install podman runc)")
    with run_container(tmp_path) as running:
        yield running
