"""/proc/PID/cgroup: which control groups a process is in, on cgroup v1, v2 and hybrid hosts.

One line per hierarchy, ``hierarchy-ID:controller-list:cgroup-path`` (cgroups(7)):

    v2        0::/system.slice/nginx.service
    v1        4:memory:/docker/<id>          (one line per mounted hierarchy; named ones as name=systemd)
    hybrid    both: the v1 lines and ``0::/...`` for the unified mount

The path may itself contain ``:`` (cgroup names are free text), so a line is split on its first two
colons only. Paths are relative to the reader's cgroup namespace root (``/..`` above it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from closewait.errors import KernelDataError


@dataclass(frozen=True, slots=True)
class CgroupEntry:
    """One line of /proc/PID/cgroup."""

    hierarchy: int
    #: "" on cgroup v2; "memory", "cpu,cpuacct", "name=systemd" ... on v1.
    controllers: str
    path: str


def parse_cgroup_lines(text: str) -> list[tuple[int, str, str]]:
    """(hierarchy, controllers, path) per line of a /proc/PID/cgroup text, the fast form the resolver
    uses. KernelDataError on a malformed line or an empty file."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        hierarchy, sep1, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep1 and sep2) or not hierarchy.isdigit() or not path.startswith("/"):
            raise KernelDataError(f"malformed /proc/PID/cgroup line {number}: {line[:120]!r}")
        entries.append((int(hierarchy), controllers, path))
    if not entries:
        raise KernelDataError("empty /proc/PID/cgroup")
    return entries


def parse_cgroup_file(text: str) -> list[CgroupEntry]:
    """The entries of a /proc/PID/cgroup text. KernelDataError on a malformed line or an empty file."""
    return [CgroupEntry(*entry) for entry in parse_cgroup_lines(text)]


def read_proc_file(path: str) -> bytes:
    """A small /proc file in one read() (the kernel renders these whole), more if it is larger.
    OSError as the kernel raised it (ENOENT/ESRCH: the process is gone)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, 65536)]
        while len(chunks[-1]) == 65536:
            chunks.append(os.read(fd, 65536))
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_cgroup_text(pid: int | str, proc_root: str = "/proc") -> str:
    """The text of /proc/PID/cgroup. OSError as the kernel raised it (ENOENT/ESRCH: the process is gone)."""
    return read_proc_file(f"{proc_root}/{pid}/cgroup").decode("utf-8", "surrogateescape")


def read_cgroups(pid: int, proc_root: str = "/proc") -> list[CgroupEntry]:
    """The parsed /proc/PID/cgroup: OSError if unreadable, KernelDataError if malformed."""
    return parse_cgroup_file(read_cgroup_text(pid, proc_root))


def own_cgroups(proc_root: str = "/proc") -> list[CgroupEntry]:
    """This process's cgroups (``/proc/self/cgroup``)."""
    return parse_cgroup_file(read_cgroup_text("self", proc_root))
