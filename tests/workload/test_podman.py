"""Real podman containers: a leaker inside a container with its own network namespace, found from
the host by a scan of that namespace, and named by the resolver from podman's own files.

How podman runs here (Debian 12, podman 4.3 + runc, root, hybrid cgroups, no systemd as PID 1):
``podman --runtime runc run -d --cgroup-parent=<this test's cgroup>/... --ulimit nofile=1024:1024
--ulimit nproc=1000:1000 --network none -v SCRIPT:/x.py:ro --rootfs /:O /usr/bin/python3 /x.py``.
crun refuses the hybrid layout, the ulimits are needed because podman's defaults exceed the host's hard
limits, options go before ``--rootfs`` (its first argument is the root). Podman uses its cgroupfs
manager, so the container lands in ``<parent>/libpod-<id>`` in every hierarchy, which runc creates;
the test removes what it created in each.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import closewait
from closewait.sources.attribution import WorkloadResolver
from closewait.sources.runtimes import PODMAN_GRAPHROOT, ContainerNames, parse_libpod_bolt
from tests.workload.realcg import have, hierarchies

pytestmark = [pytest.mark.root, pytest.mark.slow]

#: Runs inside the container: a server on the container's own loopback whose accepted connection
#: sits in CLOSE_WAIT (EOF read, never closed). Exits at once on SIGTERM (it is PID 1 in there).
LEAKER_IN_CONTAINER = """
import signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
client = socket.create_connection(server.getsockname())
conn, _ = server.accept()
client.close()
while conn.recv(100):
    pass
print(server.getsockname()[1], flush=True)
time.sleep(600)
"""


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120, check=check)


@dataclass
class Container:
    name: str
    id: str
    pid: int
    port: int
    cgroup_parent: str


def _missing_ancestors(path: str) -> list[str]:
    """The directories of ``path`` (and its ancestors) in every cgroup hierarchy that do not exist yet."""
    missing = []
    for hierarchy in {h.mount for h in hierarchies().values()}:
        parts = [p for p in path.split("/") if p]
        for depth in range(1, len(parts) + 1):
            directory = hierarchy + "/" + "/".join(parts[:depth])
            if not os.path.isdir(directory):
                missing.append(directory)
    return missing


def _remove_created(directories: list[str]) -> None:
    """rmdir the cgroup directories the runtime made below and up to the ones that did not exist."""
    for top in sorted(directories, key=len, reverse=True):
        if not os.path.isdir(top):
            continue
        below = sorted((p for p in Path(top).rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for directory in [*below, Path(top)]:
            deadline = time.monotonic() + 10
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as err:
                    if err.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Container]:
    if os.geteuid() != 0 or not (have("podman") and have("runc")):
        pytest.skip("needs root, podman and runc (apt-get install podman runc)")
    memory = hierarchies().get("memory") or hierarchies().get("unified")
    assert memory is not None
    parent = f"{memory.own.rstrip('/')}/closewait-test-{uuid.uuid4().hex[:10]}"
    created = _missing_ancestors(parent)
    name = f"closewait-test-{uuid.uuid4().hex[:8]}"
    script = tmp_path / "leaker.py"
    script.write_text(LEAKER_IN_CONTAINER)
    try:
        run = podman(
            "--runtime", "runc", "run", "-d", "--name", name, f"--cgroup-parent={parent}",
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000", "--network", "none",
            "-v", f"{script}:/x.py:ro", "--rootfs", "/:O", "/usr/bin/python3", "/x.py",
            check=False,
        )  # fmt: skip
        if run.returncode != 0:
            pytest.fail(f"podman run failed: {run.stderr.strip()}")
        container_id = run.stdout.strip().splitlines()[-1]
        port = _wait_for_port(name)
        pid = int(podman("inspect", "--format", "{{.State.Pid}}", name).stdout)
        yield Container(name, container_id, pid, port, parent)
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
        _remove_created(created)


def _wait_for_port(name: str) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        logs = podman("logs", name, check=False).stdout.split()
        if logs:
            return int(logs[0])
        time.sleep(0.1)
    raise AssertionError(f"container {name} printed no port: {podman('logs', name, check=False).stderr}")


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
