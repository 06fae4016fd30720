"""What naming a process's workload costs: ``WorkloadResolver.workload_of`` per process, uncached
(the first lookup in a scan: read /proc/PID/cgroup and /proc/PID/stat, name the cgroup, look up the
names) and cached (every later lookup of the same process in that scan).

Starts N real processes (``sleep``) and, as root, moves a third of them into kubelet pod cgroups
(systemd driver, with /var/log/containers-style links in a temp dir) and a third into podman-style
container cgroups, all made under this process's own cgroup in the v2 hierarchy (the rest stay on
the host). Every process is killed and every directory removed at the end. Results to stdout as a
markdown table.

Usage::

    .venv/bin/python -m bench.bench_workload --processes 300
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import timeit
import uuid
from pathlib import Path

from tests.workload.realcg import CgroupTree, hierarchies, usable

from closewait.model import Process
from closewait.sources.attribution import WorkloadResolver
from closewait.sources.cgroup import read_cgroup_text, read_proc_file
from closewait.sources.owners import read_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    children = [subprocess.Popen(["sleep", "600"]) for _ in range(args.processes)]
    unified = hierarchies().get("unified")
    trees: list[CgroupTree] = []
    try:
        with tempfile.TemporaryDirectory() as logs:
            placed = _place(children, unified, Path(logs), trees) if unified and usable(unified) else "host only"
            processes = [read_process(child.pid) for child in children]
            rows = _measure(processes, logs, args.repeat)
            kinds: dict[str, int] = {}
            for process in processes:
                kind = WorkloadResolver(container_log_dir=logs).workload_of(process).kind
                kinds[kind] = kinds.get(kind, 0) + 1
            print(f"{len(processes)} processes ({placed}; kinds {kinds}), best of {args.repeat}\n")
            print("| lookup | per process |")
            print("|---|---|")
            for label, seconds in rows:
                print(f"| {label} | {seconds * 1e6:.1f} µs |")
    finally:
        for child in children:
            child.kill()
            child.wait()
        for tree in trees:
            tree.release()


def _place(children: list[subprocess.Popen[bytes]], unified: object, logs: Path, trees: list[CgroupTree]) -> str:
    assert unified is not None
    pods = containers = 0
    for index, child in enumerate(children):
        container_id = uuid.uuid4().hex * 2
        if index % 3 == 0:
            uid = str(uuid.uuid4())
            layout = (
                f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice/"
                f"cri-containerd-{container_id}.scope"
            )
            target = logs / f"pods/ns_pod-{index}_{uid}/web/0.log"
            target.parent.mkdir(parents=True)
            target.write_text("")
            (logs / f"pod-{index}_ns_web-{container_id}.log").symlink_to(target)
            pods += 1
        elif index % 3 == 1:
            layout = f"machine.slice/libpod-{container_id}.scope"
            containers += 1
        else:
            continue
        tree = CgroupTree(unified, layout)  # type: ignore[arg-type]
        tree.__enter__()
        trees.append(tree)
        tree.move(child.pid)
    return f"{pods} in kubelet pod cgroups, {containers} in podman container cgroups, the rest on the host"


def _measure(processes: list[Process], logs: str, repeat: int) -> list[tuple[str, float]]:
    n = len(processes)

    def uncached(**kwargs: object) -> None:
        resolver = WorkloadResolver(container_log_dir=logs, **kwargs)  # type: ignore[arg-type]
        for process in processes:
            resolver.workload_of(process)

    warm = WorkloadResolver(container_log_dir=logs)
    for process in processes:
        warm.workload_of(process)

    def cached() -> None:
        for process in processes:
            warm.workload_of(process)

    def read_only() -> None:
        for process in processes:
            read_cgroup_text(process.pid)

    def read_both() -> None:
        for process in processes:
            read_cgroup_text(process.pid)
            read_proc_file(f"/proc/{process.pid}/stat")

    def best(function: object) -> float:
        return min(timeit.repeat(function, number=1, repeat=repeat)) / n  # type: ignore[arg-type]

    return [
        ("read /proc/PID/cgroup only (os.open + read)", best(read_only)),
        ("read /proc/PID/cgroup and /proc/PID/stat", best(read_both)),
        (
            "uncached, cgroup only, no start-time check (names=False, verify=False)",
            best(lambda: uncached(names=False, verify=False)),
        ),
        ("uncached, cgroup only (names=False)", best(lambda: uncached(names=False))),
        ("uncached, with names (runtime files, log links)", best(uncached)),
        ("cached (same resolver, same process)", best(cached)),
    ]


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("note: not root, every process stays on the host", file=sys.stderr)
    main()
