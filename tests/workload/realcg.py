"""Real cgroups for the workload tests: the directories kubelet, systemd and runtimes would create,
made under the cgroup this test process already sits in (never anywhere else), with real processes
moved into them and back.

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
from dataclasses import dataclass, field
from pathlib import Path

from tests.util import EOF_LEAKER, wait_for


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
        # Deepest first; a process that just exited may keep its cgroup busy for a moment.
        directories = sorted((p for p in Path(self.base).rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for directory in [*directories, Path(self.base)]:
            deadline = time.monotonic() + 5
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as err:
                    if err.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)


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
    wait_for(lambda: _in_close_wait(port))
    return leaker


def _in_close_wait(port: int) -> bool:
    import closewait

    return bool(closewait.scan(ports=[port], owners=False).findings)


def have(command: str) -> bool:
    return shutil.which(command) is not None
