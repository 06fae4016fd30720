"""Real podman containers: a leaker inside a container with its own network namespace, found from
the host by a scan of that namespace, and named by the resolver from podman's own files.

How podman runs here (Debian 12, podman 4.3 + runc, root, hybrid cgroups, no systemd as PID 1):
``podman --runtime runc run -d --cgroup-parent=<this test's cgroup>/... --ulimit nofile=1024:1024
--ulimit nproc=1000:1000 --network none -v SCRIPT:/x.py:ro --rootfs /:O /usr/bin/python3 /x.py``.
crun refuses the hybrid layout, the ulimits are needed because podman's defaults exceed the host's hard
limits, options go before ``--rootfs`` (its first argument is the root). Podman uses its cgroupfs
manager, so the container lands in ``<parent>/libpod-<id>`` in every hierarchy, which runc creates;
the test removes what it created in each. The ``container`` fixture (tests/workload/conftest.py) and
``realcg.run_container`` do all this; the views' tests use them too.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest

import closewait
from closewait.sources.attribution import WorkloadResolver
from closewait.sources.runtimes import PODMAN_GRAPHROOT, ContainerNames, parse_libpod_bolt
from tests.workload.realcg import Container

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_a_leak_in_a_podman_container_is_named_by_container(container: Container) -> None:
    snapshot = closewait.scan(netns=f"/proc/{container.pid}/ns/net", ports=[container.port])
    [finding] = [f for f in snapshot.findings if f.socket.local.port == container.port]
    [owner] = finding.owners
    assert owner.process.pid == container.pid  # the host's pid of the container's python

    workload = WorkloadResolver().workload_of(owner.process)
    assert workload.kind == "container"
    assert workload.runtime == "podman"
    assert (workload.name, workload.container, workload.id) == (container.name, container.name, container.id)
    assert workload.cgroup.startswith(container.cgroup_parent + "/libpod-")


def test_podman_names_from_its_bolt_database_alone(container: Container, tmp_path: Path) -> None:
    """Debian's podman 4.3 keeps its state in BoltDB: the name comes from there even without containers.json."""
    bolt = Path(PODMAN_GRAPHROOT, "libpod", "bolt_state.db")
    assert parse_libpod_bolt(bolt.read_bytes())[container.id] == container.name
    copy = tmp_path / PODMAN_GRAPHROOT.lstrip("/") / "libpod"
    copy.mkdir(parents=True)
    shutil.copy(bolt, copy / "bolt_state.db")
    assert ContainerNames(str(tmp_path)).podman(container.id) == container.name


def test_podman_names_from_containers_json(container: Container) -> None:
    storage = json.loads(Path(PODMAN_GRAPHROOT, "overlay-containers", "containers.json").read_text())
    assert any(entry["id"] == container.id for entry in storage)
    names = ContainerNames()
    assert names.podman(container.id) == container.name
    with contextlib.suppress(FileNotFoundError):
        assert names.docker(container.id) is None
