"""Compose a Snapshot: sockets from a source, owners from /proc, role and diagnosis for each.

``scan()`` is what ``closewait scan`` runs and what watch, check, the exporter, reap and the pytest
plugin build on. It reads as its steps, each a function below that names the pitfall it avoids:
validate the arguments first (one clear ``ClosewaitError`` each), dump the socket table once,
resolve only the owners of the sockets kept, then diagnose each socket.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Iterable

from closewait import diagnosis as rules
from closewait._records import make_age, make_finding
from closewait.errors import AccessDenied, UsageError
from closewait.model import (
    Age,
    AgeSource,
    Diagnosis,
    Endpoint,
    Finding,
    Owner,
    Process,
    Role,
    Snapshot,
    Socket,
    TcpState,
)
from closewait.sources import get_source, pinned
from closewait.sources import netns as netns_mod
from closewait.sources.owners import OwnerMap, check_owner_source, descriptors_denied, find_owners
from closewait.sources.process import identify_pids

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5 ms); mypy knows the name
if TYPE_CHECKING:
    from closewait.sources import SocketSource
    from closewait.sources.attribution import WorkloadResolver
    from closewait.sources.owner_cache import OwnerCache
    from closewait.workload import WorkloadSelector

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
    workload: WorkloadSelector | None = None,
    require_workload: bool = True,
    recorder_pins: str | None = pinned.DEFAULT_PIN_DIR,
    owner_cache: OwnerCache | None = None,
) -> Snapshot:
    """Every TCP socket in ``states`` (default CLOSE_WAIT), with owners, role and diagnosis.

    ``ports`` keeps sockets whose local or remote port is one of them. ``pids`` keeps sockets held
    by those processes (and walks only their descriptors). ``netns`` scans another network
    namespace; owners are still looked up across all of the host's processes. ``owners=False``
    skips the owner lookup (role is then ``unknown``). ``owner_source`` picks how owners are found:
    ``bpf`` (one pass over every fd table in the kernel, root only), ``procfs`` (the /proc/PID/fd
    walk) or ``auto`` (bpf when the kernel allows it, else procfs). ``owner_cache`` (an
    ``OwnerCache`` the caller keeps between scans) lets ``auto`` reuse what a full BPF pass found
    less than ``max_age`` seconds ago, re-checked socket by socket and process by process
    (``Snapshot.owners_via`` "cache"; see ``sources/owner_cache.py``).

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

    ``workload`` (a ``WorkloadSelector``: ``--container``, ``--pod``, ``--namespace``, ``--unit``)
    keeps the sockets held by a process of a matching workload. When it matches none of them and
    ``require_workload`` is True, the host's processes are looked at once more: if none runs in
    such a workload, ``UsageError`` says so and names the closest workloads there are (a typo is
    one line, not an empty list). ``watch`` passes False after its first sample: a container that
    goes away later is zero sockets, not an error.

    The steps: ``_validate`` the arguments, ``_dump`` the socket table, find the ``_owners`` of the
    sockets kept, naming their workloads (``_Namer``), ``_select`` those of the asked workloads,
    read the CLOSE_WAIT entry times of the sockets left (``_ages``), turn each into a Finding
    (``_findings``), and count them into a Snapshot.
    """
    selection = workload if workload is not None and not workload.empty else None
    wanted_states, port_filter, pid_filter = _validate(states, ports, pids, owners, owner_source, proc_root)
    if selection is not None and not owners:
        raise UsageError(f"selecting by workload ({selection.describe()}) needs owners; drop --no-owners")
    if selection is not None and workloads is False:
        raise UsageError(f"selecting by workload ({selection.describe()}) needs workloads; drop --no-workloads")
    ns = netns_mod.resolve(netns, proc_root=proc_root) if isinstance(netns, str) else netns
    source = get_source(backend) if isinstance(backend, str) else backend
    taken_at = time.time()
    prepared = _Prepared.install(source, taken_at) if owners and TcpState.CLOSE_WAIT in wanted_states else None
    try:
        targets, listeners = _dump(source, ns, wanted_states, port_filter, with_listeners=owners)
    finally:
        if prepared is not None:
            prepared.uninstall(source)
    owner_map: OwnerMap | None = None
    namer: _Namer | None = None
    if owners and targets:
        namer = _Namer(workloads, proc_root) if workloads is not False else None
        owner_map = _owners(targets, pid_filter, proc_root, owner_source, owner_cache, namer)
    warnings = _owner_warnings(targets, owner_map)
    if namer is not None:
        warnings += namer.warnings()
    # The resolver (and the modules behind it) only when some owner or a selection needs it: a scan
    # with --no-owners, or that found nothing, never imports them.
    resolver = namer.resolver if namer is not None else None
    if resolver is None and workloads is not False and selection is not None:
        resolver = _resolver(workloads, proc_root)
    if selection is not None:
        targets = _select(targets, owner_map, selection)
    entries = _ages(targets, wanted_states, recorder_pins)
    findings = _findings(
        targets, listeners, owner_map, pid_filter, entries, taken_at, with_roles=owners, prepared=prepared
    )
    if selection is not None and not findings and require_workload and resolver is not None:
        _require_workload(selection, resolver)
    return Snapshot(
        findings=findings,
        states=wanted_states,
        taken_at=taken_at,
        backend=source.name,
        netns=ns.path if ns is not None else None,
        owners_resolved=owners,
        errors=warnings,
        state_counts=_state_counts(wanted_states, findings),
        owners_via=owner_map.method if owner_map is not None else None,
        owners_fallback_reason=owner_map.bpf_unavailable if owner_map is not None else None,
        recorder_used=entries is not None and entries.unavailable is None,
        recorder_unavailable=entries.unavailable if entries is not None else None,
        selection=selection,
        netns_inode=ns.inode if ns is not None else None,
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
    listen = TcpState.LISTEN  # read once: an Enum member read from its class costs ~70 ns, per socket here
    listeners = [s for s in raw if s.state == listen]
    targets = [s for s in raw if s.state in wanted_states]
    if port_filter:
        targets = [s for s in targets if s.local.port in port_filter or s.remote.port in port_filter]
    return targets, listeners


def _owners(
    targets: list[Socket],
    pid_filter: dict[int, int],
    proc_root: str,
    method: str,
    cache: OwnerCache | None,
    namer: _Namer | None,
) -> OwnerMap:
    """Who holds the kept sockets: only their inodes are looked up (their cookies go along, so a
    cached answer is used only for the very sockets it was about).

    The listeners (dumped for the roles) are not looked up unless they are kept sockets themselves:
    a connection whose local port any listener on the host uses is the server's end whoever holds
    that listener (``rules.role_of``), so their owners would change no role, and a listener opened
    or closed anywhere on the host would make the owner cache miss.

    Pitfall: a process the caller named (``pids``) whose descriptors may not be read would leave an
    empty answer that reads as "holds no such socket", a lie; that raises AccessDenied instead.
    Unnamed processes that refuse are only counted (``OwnerMap.denied_pids``).
    """
    inodes = {s.inode for s in targets}
    cookies = {s.inode: s.cookie for s in targets if s.cookie is not None} if cache is not None else None
    owner_map = find_owners(
        inodes,
        pids=sorted(pid_filter) if pid_filter else None,
        proc_root=proc_root,
        method=method,
        start_times=pid_filter,
        cookies=cookies,
        cache=cache,
        name=namer,
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
    if owner_map is None or not owner_map.denied_pids:  # nothing refused (root): no line, whatever is unowned
        return ()
    owner_index = owner_map.owners
    if any(s.inode and not owner_index.get(s.inode) for s in targets):
        return tuple(owner_map.errors())
    return ()


def _resolver(workloads: bool | WorkloadResolver, proc_root: str) -> WorkloadResolver:
    """The resolver ``workloads`` asks for: the program's shared one for True, else the one given."""
    if workloads is True or workloads is False:
        from closewait.sources.attribution import default_resolver  # imported by the scans that attribute

        return default_resolver(proc_root)
    return workloads


class _Namer:
    """Names the workload of every process that holds a kept socket, as ``find_owners`` makes its
    owners (``find_owners(name=...)``); ``warnings()`` is the line for ``Snapshot.errors`` when some
    cgroup could not be read or parsed.

    Pitfall: per socket this would be 100,000 cgroup reads on a busy host; per process it is a few
    hundred, and the resolver caches each by (pid, start time), so a reused pid is never given the
    old process's workload. Naming each process before its owners are made (not renaming 5,000
    owners afterwards) makes one Owner per socket, not two. The resolver, and the modules behind
    it, is made on the first process named: a scan that found no owner never imports them. A
    process that exited meanwhile is ``unknown`` without a warning (exits are ordinary); an
    unreadable or malformed cgroup file is said once per scan, however many processes it hit.
    """

    def __init__(self, workloads: bool | WorkloadResolver, proc_root: str) -> None:
        self._workloads = workloads
        self._proc_root = proc_root
        self.resolver: WorkloadResolver | None = None
        self._named: dict[tuple[int, int], Process] = {}

    def __call__(self, process: Process) -> Process:
        if process.workload is not None:
            return process
        identity = process.identity
        named = self._named.get(identity)
        if named is None:
            if self.resolver is None:
                self.resolver = _resolver(self._workloads, self._proc_root)
            named = self._named[identity] = dataclasses.replace(process, workload=self.resolver.workload_of(process))
        return named

    def warnings(self) -> tuple[str, ...]:
        if not self._named:
            return ()
        from closewait.sources.attribution import EXITED

        named = self._named.values()
        failed = [p for p in named if p.workload is not None and p.workload.error not in (None, EXITED)]
        if not failed:
            return ()
        first = min(failed, key=lambda p: p.pid)
        assert first.workload is not None
        more = f" (and {len(failed) - 1} more processes)" if len(failed) > 1 else ""
        return (f"workload unknown for pid {first.pid} {first.name}{more}: {first.workload.error}",)


def _select(targets: list[Socket], owner_map: OwnerMap | None, selection: WorkloadSelector) -> list[Socket]:
    """The sockets held by at least one process of a selected workload.

    Pitfall: a socket shared across workloads (passed over a unix socket) is kept when any holder
    matches, so a container's leak is not hidden because a sidecar also holds it.
    """
    if owner_map is None:
        return []
    index = owner_map.owners
    matches = selection.matches
    kept = []
    for sock in targets:
        for owner in index.get(sock.inode, ()):
            workload = owner.process.workload
            if workload is not None and matches(workload):
                kept.append(sock)
                break
    return kept


def _require_workload(selection: WorkloadSelector, resolver: WorkloadResolver) -> None:
    """Raise UsageError unless some process on the host runs in a workload ``selection`` matches.

    Only called when the selection matched no socket: then one cgroup read per process tells a
    container with no CLOSE_WAIT (an empty answer) from a name that is not there (a typo).
    """
    import difflib  # only on this error path

    running = resolver.running_workloads()
    if any(selection.matches(w) for w in running):
        return
    names = sorted({name for w in running for name in selection.names_of(w)})
    close = difflib.get_close_matches(_first_value(selection), names, n=3, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise UsageError(f"no {selection.describe()} on this host: no process runs in it{hint}")


def _first_value(selection: WorkloadSelector) -> str:
    for value in (selection.container, selection.pod, selection.namespace, selection.unit):
        if value is not None:
            return value
    return ""


def _ages(targets: list[Socket], wanted_states: frozenset[TcpState], pin_dir: str | None) -> pinned.EntryTimes | None:
    """When each CLOSE_WAIT socket entered that state, from a pinned recorder, by socket cookie.

    Pitfall: most hosts run no recorder, and ``scan --json`` runs in loops: one stat of the pin
    directory decides, and the recorder's module is imported only when it finds one. None when
    nothing is to be looked up (no CLOSE_WAIT asked for, or ``pin_dir`` None); otherwise the times
    found, with the reason there are none (``unavailable``), which the Snapshot reports once.
    """
    if pin_dir is None or TcpState.CLOSE_WAIT not in wanted_states:
        return None
    close_wait = TcpState.CLOSE_WAIT  # read once, not per socket (an Enum member read costs ~70 ns)
    cookies = [s.cookie for s in targets if s.state == close_wait and s.cookie is not None]
    if not cookies and any(s.state == close_wait for s in targets):
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


class _Prepared:
    """The role, age and diagnosis of each CLOSE_WAIT socket of the dump, made while the kernel's
    walk keeps the dump's next reply waiting (a source with ``while_waiting``, the console's
    prefetched one), for ``_findings`` to take instead of making them after the dump.

    They are made as they would be for a socket with owners, no recorder and no listener owned by a
    holder (``rules.role_of``: a server's end when a listener on the host has its local port, else a
    client's), from the listeners seen so far: in one walk of the kernel's table every listener
    comes before the connections, so they are all seen first. ``_findings`` takes one only when all
    of that held in the end: the socket has owners, no recorder times it, no listener's owner is
    known, the listeners' ports are the ones seen, and no listener came after a socket was
    prepared (``spoiled``). Anything else is made afresh, so the findings are the same either way.
    """

    def __init__(self, taken_at: float) -> None:
        self.taken_at = taken_at
        self.host_ports: set[int] = set()
        #: id(socket) -> (the socket, its role, its diagnosis, its age); the socket is kept so its
        #: id cannot be reused while this lives.
        self.ready: dict[int, tuple[Socket, Role, Diagnosis, Age | None]] = {}
        self.spoiled = False
        self._previous: Callable[[list[Socket]], None] | None = None
        self._lower_bounds: dict[int, Age] = {}

    @classmethod
    def install(cls, source: SocketSource, taken_at: float) -> _Prepared | None:
        """A _Prepared fed by ``source``'s idle time, or None when the source has none to give."""
        if not hasattr(source, "while_waiting"):
            return None
        prepared = cls(taken_at)
        prepared._previous = source.while_waiting
        source.while_waiting = prepared._idle
        return prepared

    def uninstall(self, source: SocketSource) -> None:
        if hasattr(source, "while_waiting"):
            source.while_waiting = self._previous

    def _idle(self, batch: list[Socket]) -> None:
        if self._previous is not None:
            self._previous(batch)
        self.add(batch)

    def add(self, batch: list[Socket]) -> None:
        listen, close_wait, lower_bound = TcpState.LISTEN, TcpState.CLOSE_WAIT, AgeSource.LAST_ACK_LOWER_BOUND
        server, client, diagnose = Role.SERVER, Role.CLIENT, rules.diagnose_close_wait
        host_ports, ready, lower_bounds, taken_at = self.host_ports, self.ready, self._lower_bounds, self.taken_at
        for sock in batch:
            state = sock.state
            if state == close_wait:
                role = server if sock.local.port in host_ports else client
                idle = sock.idle_ms
                age = None
                if idle is not None:
                    age = lower_bounds.get(idle)
                    if age is None:
                        age = lower_bounds[idle] = make_age(taken_at - idle / 1000, idle, lower_bound)
                ready[id(sock)] = (sock, role, diagnose(sock, role, idle), age)
            elif state == listen:
                if ready:
                    self.spoiled = True
                host_ports.add(sock.local.port)


def _findings(
    targets: list[Socket],
    listeners: list[Socket],
    owner_map: OwnerMap | None,
    pid_filter: dict[int, int],
    entries: pinned.EntryTimes | None,
    taken_at: float,
    *,
    with_roles: bool,
    prepared: _Prepared | None = None,
) -> tuple[Finding, ...]:
    """Each kept socket with its owners, role, age (CLOSE_WAIT only) and diagnosis, in report order.

    Pitfall: this loop runs once per socket, 100,000 times on a busy host, so it binds what it
    calls to locals, reuses one empty owners tuple and one Age per idle time, and diagnoses a
    CLOSE_WAIT socket without ``diagnose``'s dispatch on the state; keep it that lean. With
    ``pid_filter``, a socket none of the named processes holds is dropped here (the dump cannot
    filter by owner).
    """
    owner_index = owner_map.owners if owner_map is not None else {}
    listening: list[tuple[int, Endpoint]] = []
    for listener in listeners:
        for owner in owner_index.get(listener.inode, ()):
            listening.append((owner.process.pid, listener.local))
    host_ports = {s.local.port for s in listeners}

    findings: list[Finding] = []
    keys: list[tuple[int, int, int, int]] = []  # _finding_order's, made here where idle_ms is at hand
    append, add_key, no_owners = findings.append, keys.append, ()
    role_of, diagnose, close_wait_diagnosis = rules.role_of, rules.diagnose, rules.diagnose_close_wait
    close_wait, lower_bound, unknown = TcpState.CLOSE_WAIT, AgeSource.LAST_ACK_LOWER_BOUND, Role.UNKNOWN
    recorded = entries.times if entries is not None else None
    # The lower-bound Age by idle_ms: the sockets of a leak closed in bursts and share a few dozen
    # idle times, and an Age is an immutable value, so equal ones may be one object.
    lower_bounds: dict[int, Age] = {}
    ready: dict[int, tuple[Socket, Role, Diagnosis, Age | None]] = {}
    if (
        prepared is not None
        and with_roles
        and not recorded
        and not listening
        and not prepared.spoiled
        and prepared.taken_at == taken_at
        and prepared.host_ports == host_ports
    ):
        ready = prepared.ready
    get_ready = ready.get
    for sock in targets:
        found = owner_index.get(sock.inode) if owner_index else None
        sock_owners: tuple[Owner, ...] = tuple(found) if found else no_owners
        if pid_filter and not sock_owners:
            continue
        if sock_owners:
            made = get_ready(id(sock))
            if made is not None and made[0] is sock:
                idle = sock.idle_ms
                append(make_finding(sock, sock_owners, made[1], made[2], made[3]))
                add_key((sock.state, -(idle or 0), sock.local.port, sock.remote.port))
                continue
        role = role_of(sock, sock_owners, listening, host_ports) if with_roles else unknown
        idle = sock.idle_ms
        state = sock.state
        if state == close_wait:
            age: Age | None = None
            ago_ms = idle
            if recorded:
                age = _age(sock, entries, taken_at)
                if age is not None and age.source is AgeSource.EXACT:
                    ago_ms = age.ms
            elif idle is not None:  # no recorder (most hosts): _age's lower bound, without the call
                age = lower_bounds.get(idle)
                if age is None:
                    age = lower_bounds[idle] = make_age(taken_at - idle / 1000, idle, lower_bound)
            append(make_finding(sock, sock_owners, role, close_wait_diagnosis(sock, role, ago_ms), age))
        else:
            append(make_finding(sock, sock_owners, role, diagnose(sock, sock_owners, role), None))
        add_key((state, -(idle or 0), sock.local.port, sock.remote.port))
    # A stable sort of the keys, as findings.sort(key=_finding_order) would order them.
    return tuple([findings[i] for i in sorted(range(len(keys)), key=keys.__getitem__)])


def _state_counts(wanted_states: frozenset[TcpState], findings: tuple[Finding, ...]) -> dict[TcpState, int]:
    """Findings per state; every asked state is present, with 0 when none was found."""
    counts = dict.fromkeys(sorted(wanted_states), 0)
    for finding in findings:
        counts[finding.socket.state] += 1
    return counts


def _finding_order(finding: Finding) -> tuple[int, int, int, int]:
    """Report order: by state, oldest first (``idle_ms``), then by ports. ``_findings`` builds these
    keys in its loop; tests/scanperf compare its order with a sort by this function."""
    sock = finding.socket
    return (sock.state, -(sock.idle_ms or 0), sock.local.port, sock.remote.port)
