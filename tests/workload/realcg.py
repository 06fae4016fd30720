"""Real cgroups and real podman containers for the workload tests.

Cgroups: the directories kubelet, systemd and runtimes would create, made under the cgroup this
test process already sits in (never anywhere else), with real processes moved into them and back.
Containers: ``run_container`` starts podman with runc as tests/workload/test_podman.py describes.

On this host (hybrid) the test process sits in ``memory:/process_api/<id>`` and ``/`` everywhere
else; a tree is made below that in one hierarchy at a time. A process is only ever moved into a
child of the test's own cgroup and back to the test's own cgroup; every directory made is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.util import EOF_LEAKER, wait_for


def remove_cgroup_tree(top: str | Path, *, timeout: float, pause: float) -> None:
    """Remove the cgroup directory ``top`` and everything below it, deepest first; a cgroup a process
    just left stays busy (EBUSY) for a moment, so each is retried until ``timeout`` seconds."""
    below = sorted((p for p in Path(top).rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for directory in [*below, Path(top)]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as err:
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(pause)


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy and where this process sits in it."""

    #: "memory", "pids", "cpu", "name=systemd" (v1) or "unified" (v2).
    label: str
    mount: str
    own: str

    @property
    def own_dir(self) -> str:
        return self.mount + self.own.rstrip("/")


def hierarchies() -> dict[str, Hierarchy]:
    """The hierarchies of this host by label, with this process's cgroup in each."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup", encoding="utf-8") as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            own[controllers or "unified"] = path
    found: dict[str, Hierarchy] = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            separator = fields.index("-")
            fstype, options, mount = fields[separator + 1], set(fields[separator + 3].split(",")), fields[4]
            if fstype == "cgroup2":
                keys = ["unified"]
            elif fstype == "cgroup":  # the super options name the controllers (or name=... of a named one)
                keys = [key for key in own if key != "unified" and set(key.split(",")) <= options]
            else:
                continue
            for key in keys:
                if key in own and os.path.isdir(mount + own[key]):
                    found[key] = Hierarchy(key, mount, own[key])
    return found


def usable(hierarchy: Hierarchy) -> bool:
    return os.geteuid() == 0 and os.access(hierarchy.own_dir, os.W_OK)


@dataclass
class CgroupTree:
    """Directories ``layout`` (e.g. ``kubepods/burstable/pod<uid>/<id>``) below a fresh directory under the
    test's own cgroup in ``hierarchy``. ``move(pid)`` puts a process in the innermost one; leaving the
    ``with`` block moves every process back to the test's own cgroup and removes the directories."""

    hierarchy: Hierarchy
    layout: str
    base: str = ""
    leaf: str = ""
    moved: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base = f"{self.hierarchy.own_dir}/closewait-test-{uuid.uuid4().hex[:10]}"
        self.leaf = f"{self.base}/{self.layout}"

    @property
    def path(self) -> str:
        """The innermost directory as /proc/PID/cgroup shows it."""
        return self.leaf[len(self.hierarchy.mount) :]

    def sibling(self, layout: str) -> str:
        """Make another directory ``layout`` in the same fresh base; returns its /proc path."""
        os.makedirs(f"{self.base}/{layout}")
        return f"{self.base}/{layout}"[len(self.hierarchy.mount) :]

    def move(self, pid: int, path: str | None = None) -> None:
        """Put ``pid`` into ``path`` (a /proc path from this tree; default the innermost directory)."""
        target = self.hierarchy.mount + (path or self.path)
        if not target.startswith(self.base + "/"):
            raise ValueError(f"{target} is not in this test's tree")
        Path(target, "cgroup.procs").write_text(str(pid))
        self.moved.append(pid)

    def __enter__(self) -> CgroupTree:
        os.makedirs(self.leaf)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        home = Path(self.hierarchy.own_dir, "cgroup.procs")
        for pid in dict.fromkeys(self.moved):
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                try:
                    home.write_text(str(pid))
                except OSError as err:
                    if err.errno != errno.ESRCH:
                        raise
        self.moved.clear()
        # A process that just exited may keep its cgroup busy for a moment.
        remove_cgroup_tree(self.base, timeout=5, pause=0.02)


@dataclass
class Leaker:
    """A child process holding one CLOSE_WAIT socket (read to EOF, never closed) on loopback."""

    proc: subprocess.Popen[str]
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_leaker() -> Leaker:
    proc = subprocess.Popen([sys.executable, "-c", EOF_LEAKER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    client = socket.create_connection(("127.0.0.1", port))
    client.close()  # the server reads EOF and keeps its end: CLOSE_WAIT
    leaker = Leaker(proc, port)
    wait_for(lambda: _in_close_wait(port, proc.pid))
    return leaker


def _in_close_wait(port: int, pid: int) -> bool:
    """The leaker holds its end in CLOSE_WAIT. Pitfall: the FIN can arrive while the connection
    still waits in the listen queue, in CLOSE_WAIT with no owner until accept(); a scan by --pid
    right after that would not see it, so wait for the leaker's own descriptor."""
    import closewait

    return bool(closewait.scan(ports=[port], pids=[pid], workloads=False).findings)


def have(command: str) -> bool:
    return shutil.which(command) is not None


def write_kubelet_log_links(root: Path, namespace: str, pod: str, uid: str, containers: dict[str, str]) -> Path:
    """What kubelet writes: /var/log/pods/<ns>_<pod>_<uid>/<container>/0.log and, in
    /var/log/containers, <pod>_<ns>_<container>-<id>.log linking to it. Returns the containers dir."""
    pods_dir = root / "var/log/pods" / f"{namespace}_{pod}_{uid}"
    links = root / "var/log/containers"
    links.mkdir(parents=True, exist_ok=True)
    for container, container_id in containers.items():
        (pods_dir / container).mkdir(parents=True, exist_ok=True)
        log = pods_dir / container / "0.log"
        log.write_text("2026-12-05T10:00:00.000000000Z stdout F started\n")
        (links / f"{pod}_{namespace}_{container}-{container_id}.log").symlink_to(log)
    return links


# ---- real podman containers (podman + runc from Debian, as root) ---------------------------------------

#: Runs inside the container: a server on the container's loopback whose accepted connection sits in
#: CLOSE_WAIT (EOF read, never closed). Exits at once on SIGTERM (it is PID 1 in there).
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


def can_run_podman() -> bool:
    return os.geteuid() == 0 and have("podman") and have("runc")


@dataclass
class Container:
    name: str
    id: str
    pid: int
    port: int
    cgroup_parent: str

    @property
    def netns(self) -> str:
        return f"/proc/{self.pid}/ns/net"


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
        remove_cgroup_tree(top, timeout=10, pause=0.05)


@contextlib.contextmanager
def run_container(workdir: Path, *, network: str = "none", name: str | None = None) -> Iterator[Container]:
    """A podman container running ``LEAKER_IN_CONTAINER`` under a fresh cgroup parent below this
    test's own cgroup, removed (with every cgroup directory the runtime made) on leaving.

    ``network="none"`` gives it a network namespace of its own (scan it with ``--netns``);
    ``"host"`` leaves its sockets in the host's, where reap can reach them.
    """
    memory = hierarchies().get("memory") or hierarchies().get("unified")
    assert memory is not None
    parent = f"{memory.own.rstrip('/')}/closewait-test-{uuid.uuid4().hex[:10]}"
    created = _missing_ancestors(parent)
    name = name or f"closewait-test-{uuid.uuid4().hex[:8]}"
    script = workdir / f"leaker-{name}.py"
    script.write_text(LEAKER_IN_CONTAINER)
    try:
        run = podman(
            "--runtime", "runc", "run", "-d", "--name", name, f"--cgroup-parent={parent}",
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000", "--network", network,
            "-v", f"{script}:/x.py:ro", "--rootfs", "/:O", "/usr/bin/python3", "/x.py",
            check=False,
        )  # fmt: skip
        if run.returncode != 0:
            raise AssertionError(f"podman run failed: {run.stderr.strip()}")
        container_id = run.stdout.strip().splitlines()[-1]
        port = _wait_for_port(name)
        pid = int(podman("inspect", "--format", "{{.State.Pid}}", name).stdout)
        yield Container(name, container_id, pid, port, parent)
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
        _remove_created(created)
        script.unlink(missing_ok=True)


def _wait_for_port(name: str) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        logs = podman("logs", name, check=False).stdout.split()
        if logs:
            return int(logs[0])
        time.sleep(0.1)
    raise AssertionError(f"container {name} printed no port: {podman('logs', name, check=False).stderr}")
