"""Compose a Snapshot: sockets from a source, owners from /proc, role and diagnosis for each.

``scan()`` is what ``closewait scan`` runs and what watch, check, the exporter, reap and the pytest
plugin build on. It validates its arguments first (one clear ``ClosewaitError`` each), then reads
the kernel once per source, then resolves only the owners of the sockets it kept.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Collection, Iterable

from closewait import diagnosis as rules
from closewait._records import make_finding
from closewait.errors import AccessDenied, NoSuchProcess, UsageError
from closewait.model import Endpoint, Finding, Owner, Role, Snapshot, TcpState
from closewait.sources import get_source
from closewait.sources import netns as netns_mod
from closewait.sources.owners import check_owner_source, descriptors_denied, find_owners, read_process

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5 ms); mypy knows the name
if TYPE_CHECKING:
    from closewait.sources import SocketSource

CLOSE_WAIT_ONLY: frozenset[TcpState] = frozenset({TcpState.CLOSE_WAIT})


def validate_ports(ports: Iterable[int]) -> frozenset[int]:
    result = frozenset(ports)
    for port in result:
        if not 0 < port <= 65535:
            raise UsageError(f"port {port} is out of range (1-65535)")
    return result


def validate_pids(pids: Iterable[int], proc_root: str = "/proc") -> frozenset[int]:
    """Check each pid exists now and its descriptors can be read.

    Raises NoSuchProcess for the first that does not exist, AccessDenied for the first whose
    /proc/PID/fd this user may not read (another user's process, without root): checked here,
    before the kernel is read, so the answer does not depend on whether any socket matched.
    """
    result = frozenset(pids)
    for pid in sorted(result):
        if pid <= 0:
            raise UsageError(f"pid {pid} is not a process id")
        read_process(pid, proc_root)
        try:
            dir_fd = os.open(f"{proc_root}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                # Listing may be allowed (root, CAP_DAC_READ_SEARCH) while every link is behind the
                # ptrace access check: read one link too.
                for name in os.listdir(dir_fd)[:1]:
                    with contextlib.suppress(FileNotFoundError):  # closed since listing
                        os.readlink(name, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        except PermissionError as err:
            raise AccessDenied(descriptors_denied(pid)) from err
        except FileNotFoundError:
            raise NoSuchProcess(pid) from None
    return result


def scan(
    states: Collection[TcpState] = CLOSE_WAIT_ONLY,
    *,
    ports: Iterable[int] = (),
    pids: Iterable[int] = (),
    netns: str | netns_mod.Netns | None = None,
    backend: str | SocketSource = "auto",
    owners: bool = True,
    owner_source: str = "auto",
    proc_root: str = "/proc",
) -> Snapshot:
    """Every TCP socket in ``states`` (default CLOSE_WAIT), with owners, role and diagnosis.

    ``ports`` keeps sockets whose local or remote port is one of them. ``pids`` keeps sockets held
    by those processes (and walks only their descriptors). ``netns`` scans another network
    namespace; owners are still looked up across all of the host's processes. ``owners=False``
    skips the owner lookup (role is then ``unknown``). ``owner_source`` picks how owners are found:
    ``bpf`` (one pass over every fd table in the kernel, root only), ``procfs`` (the /proc/PID/fd
    walk) or ``auto`` (bpf when the kernel allows it, else procfs).

    Processes whose descriptors cannot be read (other users', without root) leave their sockets
    without owners and add one line to ``Snapshot.errors``; a pid named in ``pids`` that cannot be
    read raises ``AccessDenied`` instead, since an empty answer for it would be wrong.
    """
    wanted_states = frozenset(states)
    if not wanted_states:
        raise UsageError("no TCP state asked for")
    port_filter = validate_ports(ports)
    pid_filter = validate_pids(pids, proc_root)
    if pid_filter and not owners:
        raise UsageError("--pid needs owners; drop --no-owners")
    # Checked here too: with nothing to look up, find_owners is never called.
    check_owner_source(owner_source)
    ns = netns_mod.resolve(netns, proc_root=proc_root) if isinstance(netns, str) else netns
    source = get_source(backend) if isinstance(backend, str) else backend

    # Listening sockets tell which end of a connection its owner is; fetch them in the same dump.
    need_listeners = owners and bool(wanted_states - {TcpState.LISTEN})
    dump_states = wanted_states | {TcpState.LISTEN} if need_listeners else wanted_states
    taken_at = time.time()
    with netns_mod.entered(ns):
        raw = list(source.sockets(dump_states))

    listeners = [s for s in raw if s.state == TcpState.LISTEN]
    targets = [s for s in raw if s.state in wanted_states]
    if port_filter:
        targets = [s for s in targets if s.local.port in port_filter or s.remote.port in port_filter]

    errors: list[str] = []
    owner_index: dict[int, list[Owner]] = {}
    listening: list[tuple[int, Endpoint]] = []
    owners_via: str | None = None
    if owners and targets:
        inodes = {s.inode for s in targets} | {s.inode for s in listeners}
        owner_map = find_owners(
            inodes, pids=sorted(pid_filter) if pid_filter else None, proc_root=proc_root, method=owner_source
        )
        owner_index = owner_map.owners
        owners_via = owner_map.method
        denied_targets = sorted(pid_filter.intersection(owner_map.denied_pids))
        if denied_targets:
            # The caller named this process: an empty answer would be a lie, so refuse.
            raise AccessDenied(descriptors_denied(denied_targets[0]))
        if any(s.inode and not owner_index.get(s.inode) for s in targets):
            # Only worth a warning when some socket really was left without an owner.
            errors.extend(owner_map.errors())
        for listener in listeners:
            for owner in owner_map.owners.get(listener.inode, ()):
                listening.append((owner.process.pid, listener.local))
    host_ports = {s.local.port for s in listeners}

    findings: list[Finding] = []
    append, diagnose, no_owners = findings.append, rules.diagnose, ()
    for sock in targets:
        found = owner_index.get(sock.inode) if owner_index else None
        sock_owners: tuple[Owner, ...] = tuple(found) if found else no_owners
        if pid_filter and not sock_owners:
            continue
        role = rules.role_of(sock, sock_owners, listening, host_ports) if owners else Role.UNKNOWN
        append(make_finding(sock, sock_owners, role, diagnose(sock, sock_owners, role)))
    findings.sort(key=_finding_order)

    counts = dict.fromkeys(sorted(wanted_states), 0)
    for finding in findings:
        counts[finding.socket.state] += 1
    return Snapshot(
        findings=tuple(findings),
        states=wanted_states,
        taken_at=taken_at,
        backend=source.name,
        netns=ns.path if ns is not None else None,
        owners_resolved=owners,
        errors=tuple(errors),
        state_counts=counts,
        owners_via=owners_via,
    )


def _finding_order(finding: Finding) -> tuple[int, int, int, int]:
    sock = finding.socket
    return (sock.state, -(sock.idle_ms or 0), sock.local.port, sock.remote.port)
