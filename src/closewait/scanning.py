"""Compose a Snapshot: sockets from a source, owners from /proc, role and diagnosis for each.

``scan()`` is what ``closewait scan`` runs and what watch, check, the exporter, reap and the pytest
plugin build on. It reads as its steps, each a function below that names the pitfall it avoids:
validate the arguments first (one clear ``ClosewaitError`` each), dump the socket table once,
resolve only the owners of the sockets kept, then diagnose each socket.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Iterable

from closewait import diagnosis as rules
from closewait._records import make_age, make_finding
from closewait.errors import AccessDenied, UsageError
from closewait.model import Age, AgeSource, Endpoint, Finding, Owner, Process, Role, Snapshot, Socket, TcpState
from closewait.sources import get_source, pinned
from closewait.sources import netns as netns_mod
from closewait.sources.owners import OwnerMap, check_owner_source, descriptors_denied, find_owners
from closewait.sources.process import identify_pids

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5 ms); mypy knows the name
if TYPE_CHECKING:
    from closewait.sources import SocketSource
    from closewait.sources.attribution import WorkloadResolver

CLOSE_WAIT_ONLY: frozenset[TcpState] = frozenset({TcpState.CLOSE_WAIT})


def validate_ports(ports: Iterable[int]) -> frozenset[int]:
    result = frozenset(ports)
    for port in result:
        if not 0 < port <= 65535:
            raise UsageError(f"port {port} is out of range (1-65535)")
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
    workloads: bool | WorkloadResolver = True,
    recorder_pins: str | None = pinned.DEFAULT_PIN_DIR,
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

    ``recorder_pins`` is where a running recorder (``closewait record``, the exporter) pinned its
    maps: each CLOSE_WAIT socket then gets the exact time it entered that state (``Finding.age``,
    source ``exact``); without one (or with None), the age is ``tcpi_last_ack_recv``, a lower
    bound, and ``Snapshot.recorder_unavailable`` says why once.

    ``workloads`` names each owning process's container, Kubernetes pod or systemd unit
    (``Process.workload``) from its cgroup: True uses one resolver shared by the whole program (its
    answers are cached by pid and start time), a ``WorkloadResolver`` is used as given (a long-running
    exporter keeps its own), False leaves ``workload`` None.

    The steps: ``_validate`` the arguments, ``_dump`` the socket table, find the ``_owners`` of the
    sockets kept and ``_attribute`` them to workloads, read the CLOSE_WAIT entry times (``_ages``),
    turn each into a Finding (``_findings``), and count them into a Snapshot.
    """
    wanted_states, port_filter, pid_filter = _validate(states, ports, pids, owners, owner_source, proc_root)
    ns = netns_mod.resolve(netns, proc_root=proc_root) if isinstance(netns, str) else netns
    source = get_source(backend) if isinstance(backend, str) else backend
    taken_at = time.time()
    targets, listeners = _dump(source, ns, wanted_states, port_filter, with_listeners=owners)
    owner_map = _owners(targets, listeners, pid_filter, proc_root, owner_source) if owners and targets else None
    if owner_map is not None and owner_map.owners and workloads is not False:
        if workloads is True:
            from closewait.sources.attribution import default_resolver  # only a scan with owners pays its import

            workloads = default_resolver(proc_root)
        _attribute(targets, owner_map, workloads)
    entries = _ages(targets, wanted_states, recorder_pins)
    findings = _findings(targets, listeners, owner_map, pid_filter, entries, taken_at, with_roles=owners)
    return Snapshot(
        findings=findings,
        states=wanted_states,
        taken_at=taken_at,
        backend=source.name,
        netns=ns.path if ns is not None else None,
        owners_resolved=owners,
        errors=_owner_warnings(targets, owner_map),
        state_counts=_state_counts(wanted_states, findings),
        owners_via=owner_map.method if owner_map is not None else None,
        owners_fallback_reason=owner_map.bpf_unavailable if owner_map is not None else None,
        recorder_used=entries is not None and entries.unavailable is None,
        recorder_unavailable=entries.unavailable if entries is not None else None,
    )


def _validate(
    states: Collection[TcpState],
    ports: Iterable[int],
    pids: Iterable[int],
    owners: bool,
    owner_source: str,
    proc_root: str,
) -> tuple[frozenset[TcpState], frozenset[int], dict[int, int]]:
    """The wanted states, ports and pids, each checked before the kernel is read.

    Pitfall: checked after the dump, a bad argument would only be noticed when some socket matched,
    so the same command would fail or succeed depending on the traffic. The owner source is checked
    here too, because with no socket to look up ``find_owners`` (which also checks it) never runs.
    """
    wanted_states = frozenset(states)
    if not wanted_states:
        raise UsageError("no TCP state asked for")
    port_filter = validate_ports(ports)
    pid_filter = identify_pids(pids, proc_root)  # pid -> start time: a reused pid is told apart later
    if pid_filter and not owners:
        raise UsageError("--pid needs owners; drop --no-owners")
    check_owner_source(owner_source)
    return wanted_states, port_filter, pid_filter


def _dump(
    source: SocketSource,
    ns: netns_mod.Netns | None,
    wanted_states: frozenset[TcpState],
    port_filter: frozenset[int],
    *,
    with_listeners: bool,
) -> tuple[list[Socket], list[Socket]]:
    """The sockets in ``wanted_states`` that pass the port filter, and the listening sockets.

    Pitfall: the role of a connection (server or client end) needs the listeners, and a second
    dump for them would walk the whole table again (seconds on a busy host) and could disagree with
    the first. They come in the same dump, asked for only when roles will be computed. Only the
    dump runs inside ``ns``: owners are looked up in the host's /proc afterwards.
    """
    need_listeners = with_listeners and bool(wanted_states - {TcpState.LISTEN})
    dump_states = wanted_states | {TcpState.LISTEN} if need_listeners else wanted_states
    with netns_mod.entered(ns):
        raw = list(source.sockets(dump_states))
    listeners = [s for s in raw if s.state == TcpState.LISTEN]
    targets = [s for s in raw if s.state in wanted_states]
    if port_filter:
        targets = [s for s in targets if s.local.port in port_filter or s.remote.port in port_filter]
    return targets, listeners


def _owners(
    targets: list[Socket], listeners: list[Socket], pid_filter: dict[int, int], proc_root: str, method: str
) -> OwnerMap:
    """Who holds the kept sockets and the listeners: only their inodes are looked up.

    Pitfall: a process the caller named (``pids``) whose descriptors may not be read would leave an
    empty answer that reads as "holds no such socket", a lie; that raises AccessDenied instead.
    Unnamed processes that refuse are only counted (``OwnerMap.denied_pids``).
    """
    inodes = {s.inode for s in targets} | {s.inode for s in listeners}
    owner_map = find_owners(
        inodes,
        pids=sorted(pid_filter) if pid_filter else None,
        proc_root=proc_root,
        method=method,
        start_times=pid_filter,
    )
    denied_targets = sorted(set(pid_filter).intersection(owner_map.denied_pids))
    if denied_targets:
        raise AccessDenied(descriptors_denied(denied_targets[0]))
    return owner_map


def _owner_warnings(targets: list[Socket], owner_map: OwnerMap | None) -> tuple[str, ...]:
    """The lines for ``Snapshot.errors``: why some owners are unknown.

    Pitfall: other users' processes are refused to a non-root scan on every host, nearly always
    without holding any of the sockets asked about; warning every time would teach users to ignore
    the line. Only a socket really left without an owner makes the refusals worth saying.
    """
    if owner_map is None:
        return ()
    owner_index = owner_map.owners
    if any(s.inode and not owner_index.get(s.inode) for s in targets):
        return tuple(owner_map.errors())
    return ()


def _attribute(targets: list[Socket], owner_map: OwnerMap, resolver: WorkloadResolver) -> None:
    """Name the workload of every process that holds a kept socket, in ``owner_map`` itself.

    Pitfall: per socket this would be 100,000 cgroup reads on a busy host; per process it is a few
    hundred, and the resolver caches each by (pid, start time), so a reused pid is never given the
    old process's workload. Listeners' owners are left as they are: only the findings show it.
    """
    named: dict[tuple[int, int], Process] = {}
    index = owner_map.owners
    for sock in targets:
        found = index.get(sock.inode)
        if not found:
            continue
        renamed = []
        for owner in found:
            process = owner.process
            if process.workload is not None:
                renamed.append(owner)
                continue
            named_process = named.get(process.identity)
            if named_process is None:
                workload = resolver.workload_of(process)
                named_process = named[process.identity] = dataclasses.replace(process, workload=workload)
            renamed.append(Owner(named_process, owner.fd))
        index[sock.inode] = renamed


def _ages(targets: list[Socket], wanted_states: frozenset[TcpState], pin_dir: str | None) -> pinned.EntryTimes | None:
    """When each CLOSE_WAIT socket entered that state, from a pinned recorder, by socket cookie.

    Pitfall: most hosts run no recorder, and ``scan --json`` runs in loops: one stat of the pin
    directory decides, and the recorder's module is imported only when it finds one. None when
    nothing is to be looked up (no CLOSE_WAIT asked for, or ``pin_dir`` None); otherwise the times
    found, with the reason there are none (``unavailable``), which the Snapshot reports once.
    """
    if pin_dir is None or TcpState.CLOSE_WAIT not in wanted_states:
        return None
    cookies = [s.cookie for s in targets if s.state == TcpState.CLOSE_WAIT and s.cookie is not None]
    if not cookies and any(s.state == TcpState.CLOSE_WAIT for s in targets):
        return pinned.EntryTimes({}, 0, 0.0, "this socket source reports no socket cookies (use --backend netlink)")
    return pinned.entry_times(cookies, pin_dir)


def _age(sock: Socket, entries: pinned.EntryTimes | None, taken_at: float) -> Age | None:
    """A CLOSE_WAIT socket's age: exact when the recorder saw it enter, else the tcp_info lower bound."""
    if entries is not None and sock.cookie is not None:
        entered = entries.times.get(sock.cookie)
        if entered is not None:
            ms = max(0, entries.monotonic_ns - entered) // 1_000_000
            return make_age(entries.wall - (entries.monotonic_ns - entered) / 1e9, ms, AgeSource.EXACT)
    idle = sock.idle_ms
    if idle is None:
        return None
    return make_age(taken_at - idle / 1000, idle, AgeSource.LAST_ACK_LOWER_BOUND)


def _findings(
    targets: list[Socket],
    listeners: list[Socket],
    owner_map: OwnerMap | None,
    pid_filter: dict[int, int],
    entries: pinned.EntryTimes | None,
    taken_at: float,
    *,
    with_roles: bool,
) -> tuple[Finding, ...]:
    """Each kept socket with its owners, role, age (CLOSE_WAIT only) and diagnosis, in report order.

    Pitfall: this loop runs once per socket, 100,000 times on a busy host, so it binds what it
    calls to locals and reuses one empty owners tuple; keep it that lean. With ``pid_filter``, a
    socket none of the named processes holds is dropped here (the dump cannot filter by owner).
    """
    owner_index = owner_map.owners if owner_map is not None else {}
    listening: list[tuple[int, Endpoint]] = []
    for listener in listeners:
        for owner in owner_index.get(listener.inode, ()):
            listening.append((owner.process.pid, listener.local))
    host_ports = {s.local.port for s in listeners}

    findings: list[Finding] = []
    append, diagnose, role_of, no_owners = findings.append, rules.diagnose, rules.role_of, ()
    close_wait, exact = TcpState.CLOSE_WAIT, AgeSource.EXACT
    for sock in targets:
        found = owner_index.get(sock.inode) if owner_index else None
        sock_owners: tuple[Owner, ...] = tuple(found) if found else no_owners
        if pid_filter and not sock_owners:
            continue
        role = role_of(sock, sock_owners, listening, host_ports) if with_roles else Role.UNKNOWN
        age = _age(sock, entries, taken_at) if sock.state == close_wait else None
        exact_ms = age.ms if age is not None and age.source is exact else None
        append(make_finding(sock, sock_owners, role, diagnose(sock, sock_owners, role, exact_ms), age))
    findings.sort(key=_finding_order)
    return tuple(findings)


def _state_counts(wanted_states: frozenset[TcpState], findings: tuple[Finding, ...]) -> dict[TcpState, int]:
    """Findings per state; every asked state is present, with 0 when none was found."""
    counts = dict.fromkeys(sorted(wanted_states), 0)
    for finding in findings:
        counts[finding.socket.state] += 1
    return counts


def _finding_order(finding: Finding) -> tuple[int, int, int, int]:
    sock = finding.socket
    return (sock.state, -(sock.idle_ms or 0), sock.local.port, sock.remote.port)
