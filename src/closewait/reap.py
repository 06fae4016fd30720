"""Release a running process's CLOSE_WAIT sockets without restarting it: ``plan()`` is pure, ``apply()`` acts.

``survey()`` reads what ``plan()`` needs; ``apply()`` acts through ``closewait.sources`` (``pidfd``,
``netlink``, ``process``). Methods (docs/reap.md): ``shutdown`` (default, Linux 5.6+) borrows the
descriptor with pidfd_getfd and sends a normal FIN with ``shutdown(SHUT_RDWR)``; ``destroy`` is
SOCK_DESTROY over sock_diag, as ``ss -K`` does (CAP_NET_ADMIN), an RST. Either way the target's fd
stays open: its next ``recv()`` returns EOF.

Pitfalls this module exists to avoid:

- pids are reused. The plan records (pid, start time); apply opens a pidfd first and only then
  compares the start time, so the process checked is the process acted on (a pidfd cannot be
  re-targeted; if that process exits, pidfd_getfd fails with ESRCH instead of touching another).
- fds are reused. The target may close the planned fd and get the same number for a new
  connection; the inode check on the duplicate catches it, so an ESTABLISHED socket is never hit.
- states change. Between plan and apply the application may close the socket or shut it down
  itself; each socket is looked up again right before acting and skipped (reported) unless it is
  still in CLOSE_WAIT.
- a socket shared by several processes (fork, SCM_RIGHTS) is one socket: shutting it down through
  one holder affects every holder. The plan lists the other holders.
- a socket belongs to the network namespace it was created in, not to its holder's. A container's
  sockets are found by a dump inside its namespace (``survey(netns=...)``, ``survey_all_netns()``),
  each target names its namespace, and apply looks each socket up again (and sends SOCK_DESTROY)
  over a netlink socket opened inside that namespace: from the host's, the exact lookup finds
  nothing. ``pidfd_getfd`` + ``shutdown`` acts on the descriptor, whatever its namespace.

Only CLOSE_WAIT sockets are ever touched: ``plan()`` drops every other state it is given, and
``apply()`` re-checks the live state. Library code logs and never prints; the CLI
(``closewait.cli.reap``) prints the plan and the result.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import os
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from closewait.errors import (
    AccessDenied,
    ClosewaitError,
    NetlinkError,
    NetnsError,
    NoSuchProcess,
    NotSupported,
    UsageError,
)
from closewait.filters import ReapCriteria, RemoteFilter, parse_duration
from closewait.model import Finding, Owner, Process, Snapshot, Socket, TcpState
from closewait.sources import COOKIE, get_source, netlink, pidfd
from closewait.sources import netns as netns_mod
from closewait.sources.owners import find_owners
from closewait.sources.process import fd_link, hidepid_option, read_stat, read_uid, socket_inode, validate_pids
from closewait.workload import WorkloadSelector

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    import socket as socket_mod

log = logging.getLogger(__name__)


class Method(enum.StrEnum):
    """How a planned socket is released."""

    SHUTDOWN = "shutdown"
    DESTROY = "destroy"


class Outcome(enum.StrEnum):
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


# --- the plan --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReapTarget:
    """One CLOSE_WAIT socket to release through descriptor ``fd`` of ``process``.

    ``fds`` are all of that process's descriptors for the socket (``fd`` is the first);
    ``other_holders`` are descriptors of other processes sharing it, which the release affects too.
    ``netns`` is the path of the network namespace the socket is in (``Snapshot.netns``), None for
    the caller's own.
    """

    socket: Socket
    process: Process
    fds: tuple[int, ...]
    other_holders: tuple[Owner, ...] = ()
    netns: str | None = None

    @property
    def fd(self) -> int:
        return self.fds[0]


@dataclass(frozen=True, slots=True)
class Excluded:
    """A socket the filters matched that the plan will not touch, and why."""

    socket: Socket
    owners: tuple[Owner, ...]
    reason: str
    netns: str | None = None


@dataclass(frozen=True, slots=True)
class ReapPlan:
    """What ``apply()`` would do. Built by ``plan()`` from a Snapshot; nothing here touches the kernel."""

    method: Method
    criteria: ReapCriteria
    targets: tuple[ReapTarget, ...]
    excluded: tuple[Excluded, ...] = ()
    taken_at: float = 0.0
    #: Problems the scan reported (for example processes whose owners could not be read).
    errors: tuple[str, ...] = ()
    #: The network namespaces surveyed (their paths; None is the caller's own), in survey order.
    namespaces: tuple[str | None, ...] = (None,)
    #: Each surveyed namespace's inode, by path: ``apply()`` enters a namespace only through a path
    #: that still names that inode (the path itself, else a target holder's /proc/PID/ns/net).
    namespace_inodes: Mapping[str, int] = field(default_factory=dict)

    @property
    def processes(self) -> tuple[Process, ...]:
        seen: dict[tuple[int, int], Process] = {}
        for target in self.targets:
            seen.setdefault(target.process.identity, target.process)
        return tuple(seen.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``closewait reap --json``, docs/reap.md)."""
        from closewait.serialize import reap_plan_dict

        return reap_plan_dict(self)


def plan(
    snapshot: Snapshot | Iterable[Snapshot],
    *,
    pids: Iterable[int] = (),
    ports: Iterable[int] = (),
    remote: RemoteFilter | str | None = None,
    older_than_ms: int | None = None,
    method: Method | str = Method.SHUTDOWN,
    all_processes: bool = False,
    workload: WorkloadSelector | None = None,
) -> ReapPlan:
    """Choose the sockets of ``snapshot`` to release. Pure: reads only its arguments.

    Only CLOSE_WAIT sockets become targets, whatever states the snapshot holds. With ``pids``, a
    socket is a target through the first of those processes holding it; with ``workload``, through
    the first holder in a matching container, pod or unit (``Process.workload``: a holder whose
    workload was not looked up never matches); with both, through a holder that is both; with
    ``all_processes`` (which needs a port, remote, age or workload filter), through its first
    holder. Sockets the filters match but that cannot be acted on safely (no cookie from the procfs
    backend, unknown idle time with ``older_than_ms``, unknown process identity, no known owner) are
    listed in ``excluded``.

    Several snapshots (``survey_all_netns()``: one per network namespace) make one plan; each
    target and exclusion names the namespace of its snapshot (``Snapshot.netns``).
    """
    criteria = ReapCriteria(
        pids=frozenset(pids),
        ports=frozenset(ports),
        remote=RemoteFilter.parse(remote) if isinstance(remote, str) else remote,
        older_than_ms=older_than_ms,
        all_processes=all_processes,
        workload=workload if workload is not None and not workload.empty else None,
    )
    criteria.validate()
    try:
        chosen_method = Method(method)
    except ValueError:
        raise UsageError(f"unknown method {method!r}: choose shutdown or destroy") from None

    snapshots = (snapshot,) if isinstance(snapshot, Snapshot) else tuple(snapshot)
    if not snapshots:
        raise UsageError("nothing was surveyed: give plan() at least one snapshot")
    targets: list[ReapTarget] = []
    excluded: list[Excluded] = []
    for surveyed in snapshots:
        for finding in surveyed.findings:
            placed = _place(finding, criteria, surveyed.netns)
            if isinstance(placed, ReapTarget):
                targets.append(placed)
            elif placed is not None:
                excluded.append(placed)
    targets.sort(key=lambda t: (t.process.pid, t.fd))
    return ReapPlan(
        method=chosen_method,
        criteria=criteria,
        targets=tuple(targets),
        excluded=tuple(excluded),
        taken_at=min(s.taken_at for s in snapshots),
        errors=tuple(dict.fromkeys(e for s in snapshots for e in s.errors)),
        namespaces=tuple(s.netns for s in snapshots),
        namespace_inodes={s.netns: s.netns_inode for s in snapshots if s.netns is not None and s.netns_inode},
    )


def _place(finding: Finding, criteria: ReapCriteria, netns: str | None) -> ReapTarget | Excluded | None:
    """``finding`` as a target, as a socket the filters match but that is kept out (and why), or
    None when the filters do not match it."""
    owners = finding.owners
    mine = [o for o in owners if _chosen(o.process, criteria.pids, criteria.workload)]
    if (criteria.pids or criteria.workload is not None) and not mine:
        return None
    sock = finding.socket
    if not criteria.matches(sock, keep_unknown_age=True):  # _exclusion says why it is kept out
        return None
    reason = _exclusion(finding, mine, criteria)
    if reason is not None:
        return Excluded(sock, owners, reason, netns)
    process = mine[0].process
    fds = tuple(o.fd for o in mine if o.process.identity == process.identity)
    others = tuple(o for o in owners if o.process.identity != process.identity)
    return ReapTarget(sock, process, fds, others, netns)


def _chosen(process: Process, pids: frozenset[int], selection: WorkloadSelector | None) -> bool:
    """Whether the user's --pid and workload options (where given) both name ``process``."""
    if pids and process.pid not in pids:
        return False
    return selection is None or (process.workload is not None and selection.matches(process.workload))


def _exclusion(finding: Finding, mine: list[Owner], criteria: ReapCriteria) -> str | None:
    sock = finding.socket
    if sock.state != TcpState.CLOSE_WAIT:
        return f"{sock.state.name}: only CLOSE_WAIT sockets are ever touched"
    if criteria.older_than_ms is not None and sock.idle_ms is None:
        return "idle time unknown (no tcp_info from this backend), so --older-than cannot be checked"
    if sock.cookie is None:
        return "no socket cookie (procfs backend): it cannot be re-verified exactly, use the netlink backend"
    if not mine:
        if os.geteuid() == 0:
            return "no owning process found (its descriptors are hidden even from root, or it just closed)"
        return "no owning process found (its descriptors may be unreadable: run as root)"
    if mine[0].process.start_time <= 0:
        return f"start time of pid {mine[0].process.pid} unknown, so a reused pid could not be told apart"
    return None


def survey(
    *,
    pids: Collection[int] = (),
    ports: Iterable[int] = (),
    proc_root: str = "/proc",
    workload: WorkloadSelector | None = None,
    netns: str | netns_mod.Netns | None = None,
) -> Snapshot:
    """The Snapshot ``plan()`` needs: CLOSE_WAIT sockets from sock_diag, with every owner.

    With ``workload``, only the sockets of those containers, pods or units (a name no process runs
    in is a ``UsageError``, as in ``scan``). With ``netns`` (a pid in it, ``/proc/PID/ns/net``,
    ``/run/netns/NAME``, a bare NAME under /run/netns, or a ``Netns``), the sockets of that network
    namespace, as ``scan(netns=...)`` reads them: dumped over a netlink socket opened inside it
    (root: setns), owners looked up among the host's processes, so pids are host pids.

    Checks first that each pid's descriptors are readable, so a missing privilege is one clear
    ``AccessDenied`` rather than an empty plan. With ``pids``, the scan walks only those processes;
    then the sockets found are looked up in every other process too, because releasing a shared
    socket (fork, SCM_RIGHTS) affects all its holders and the plan must say so (as far as this
    user can see: without root, other users' processes are not looked into).
    """
    from closewait.scanning import CLOSE_WAIT_ONLY, scan

    _check_pids(pids, proc_root)
    snapshot = scan(
        CLOSE_WAIT_ONLY,
        ports=ports,
        pids=pids,
        netns=netns,
        backend=get_source(needs=[COOKIE]),
        proc_root=proc_root,
        workload=workload,
    )
    return _with_every_holder(snapshot, pids, proc_root)


def survey_all_netns(
    *,
    pids: Collection[int] = (),
    ports: Iterable[int] = (),
    proc_root: str = "/proc",
    workload: WorkloadSelector | None = None,
) -> tuple[Snapshot, ...]:
    """``survey()`` over every network namespace some process is in: one Snapshot per namespace,
    for ``plan()`` to take together.

    The caller's own namespace comes first (``netns`` None); each other one is named by its
    ``/run/netns/NAME`` when it has one, else by ``/proc/PID/ns/net`` of the lowest pid in it
    (``netns.survey()``). Each is dumped over a netlink
    socket opened inside it, and the owners of all of them are looked up in one pass over the
    host's processes. A namespace that cannot be read or entered (only other users' processes are
    in it, or it went away meanwhile) is skipped, one line each in the first snapshot's ``errors``,
    as a system-wide walk skips what vanished.
    """
    from closewait.scanning import CLOSE_WAIT_ONLY, scan

    _check_pids(pids, proc_root)
    found = netns_mod.survey(proc_root)
    own = netns_mod.current(proc_root).inode
    namespaces: list[tuple[netns_mod.Netns | None, str]] = [(None, "")]
    namespaces += [(ns, ns.path) for ns, _ in found.found if ns.inode != own]
    inode_of = {ns.path: ns.inode for ns, _ in namespaces[1:] if ns is not None}
    source = get_source(namespaces=namespaces, needs=[COOKIE])
    snapshot = scan(CLOSE_WAIT_ONLY, ports=ports, pids=pids, backend=source, proc_root=proc_root, workload=workload)
    snapshot = _with_every_holder(snapshot, pids, proc_root)
    in_ns: dict[str | None, list[Finding]] = {None: []}
    in_ns.update((label, []) for _, label in namespaces[1:] if label not in source.skipped)
    for finding in snapshot.findings:
        # By cookie, not inode: every socket not accepted yet has inode 0, whatever its namespace.
        in_ns.setdefault(source.netns_of(finding.socket) or None, []).append(finding)
    skipped = [f"network namespace of pid {u.pid} not covered: {u.reason}" for u in found.unreadable]
    skipped += [f"network namespace {line}" for line in source.failures]
    return tuple(
        dataclasses.replace(
            snapshot,
            findings=tuple(findings),
            netns=label,
            netns_inode=inode_of.get(label) if label is not None else None,
            errors=(*snapshot.errors, *skipped) if label is None else (),
            state_counts={TcpState.CLOSE_WAIT: len(findings)},
        )
        for label, findings in in_ns.items()
    )


def _check_pids(pids: Iterable[int], proc_root: str) -> None:
    for pid in sorted(pids):
        try:
            validate_pids([pid], proc_root)  # one fd link read, not all of them: scan() walks them next
        except AccessDenied:
            raise AccessDenied(_ptrace_message(pid, proc_root)) from None


def _with_every_holder(snapshot: Snapshot, pids: Collection[int], proc_root: str) -> Snapshot:
    """``snapshot`` with each socket's holders among all processes, not only ``pids``."""
    if not pids or not snapshot.findings:
        return snapshot
    everyone = find_owners({f.socket.inode for f in snapshot.findings}, proc_root=proc_root)
    findings = tuple(
        dataclasses.replace(f, owners=_merge_owners(f.owners, everyone.owners.get(f.socket.inode, ())))
        for f in snapshot.findings
    )
    # Processes this user may not read are left out without a warning: a non-root caller reaping its
    # own process cannot see (and need not ask about) other users' descriptors.
    return dataclasses.replace(snapshot, findings=findings)


def _merge_owners(first: Iterable[Owner], more: Iterable[Owner]) -> tuple[Owner, ...]:
    merged = {(o.process.pid, o.fd): o for o in (*more, *first)}  # on a tie the later one, from first, stays
    return tuple(sorted(merged.values(), key=lambda o: (o.process.pid, o.fd)))


def _ptrace_message(pid: int, proc_root: str = "/proc") -> str:
    try:
        owner = f" (uid {read_uid(pid, proc_root)})"
    except ClosewaitError:
        owner = ""
    if os.geteuid() == 0:  # never tell root to run as root
        needs = "was refused even to root (a protected process, or CAP_SYS_PTRACE dropped)"
    else:
        needs = f"needs root or CAP_SYS_PTRACE over it (you are uid {os.geteuid()})"
    return f"permission denied: reaping pid {pid}{owner} {needs}; --method destroy needs CAP_NET_ADMIN"


# --- applying it -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReapOutcome:
    """What happened to one target. ``code`` is stable (docs/reap.md); ``reason`` is for a person."""

    target: ReapTarget
    outcome: Outcome
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class ReapResult:
    plan: ReapPlan
    outcomes: tuple[ReapOutcome, ...] = field(default=())

    def _with(self, outcome: Outcome) -> tuple[ReapOutcome, ...]:
        return tuple(o for o in self.outcomes if o.outcome == outcome)

    @property
    def done(self) -> tuple[ReapOutcome, ...]:
        return self._with(Outcome.DONE)

    @property
    def skipped(self) -> tuple[ReapOutcome, ...]:
        return self._with(Outcome.SKIPPED)

    @property
    def failed(self) -> tuple[ReapOutcome, ...]:
        return self._with(Outcome.FAILED)

    @property
    def exit_code(self) -> int:
        """0 when every planned socket was released (or there was none), 1 when any was skipped or failed."""
        return 0 if len(self.done) == len(self.outcomes) else 1

    def as_dict(self) -> dict[str, Any]:
        """The plan's JSON plus one entry per outcome and the counts."""
        from closewait.serialize import reap_result_dict

        return reap_result_dict(self)


class _Skip(Exception):
    """Raised inside one target's steps: this socket is left alone, for ``code``/``reason``."""

    def __init__(self, code: str, reason: str, outcome: Outcome = Outcome.SKIPPED) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.outcome = outcome


def apply(reap_plan: ReapPlan, *, proc_root: str = "/proc") -> ReapResult:
    """Release every target of ``reap_plan``, re-verifying each right before acting.

    Returns one outcome per target, in plan order. A missing privilege (EPERM) or a missing kernel
    feature (ENOSYS, no SOCK_DESTROY) is raised as ``AccessDenied``/``NotSupported`` when it happens
    before anything was released; after that it is recorded as a failed outcome, so the result still
    says what was done.
    """
    outcomes: list[ReapOutcome] = []
    release = _shutdown_one if reap_plan.method == Method.SHUTDOWN else _destroy_one
    # A plan over the caller's own namespace and others came from survey_all_netns(), whose names
    # (/run/netns/NAME) the user did not type: a name deleted since is looked past (below).
    channels = _Channels(reap_plan.namespace_inodes, proc_root, names_looked_past=None in reap_plan.namespaces)
    try:
        for target in reap_plan.targets:
            try:
                outcomes.append(ReapOutcome(target, Outcome.DONE, "released", release(target, channels, proc_root)))
            except _Skip as skip:
                outcomes.append(ReapOutcome(target, skip.outcome, skip.code, skip.reason))
            except (AccessDenied, NotSupported) as err:
                if not any(o.outcome == Outcome.DONE for o in outcomes):
                    raise
                code = "permission-denied" if isinstance(err, AccessDenied) else "not-supported"
                outcomes.append(ReapOutcome(target, Outcome.FAILED, code, str(err)))
            last = outcomes[-1]
            log.info("reap pid %d fd %d: %s %s", target.process.pid, target.fd, last.code, last.reason)
    finally:
        channels.close()
    return ReapResult(reap_plan, tuple(outcomes))


class _Channels:
    """A sock_diag socket per network namespace, opened inside it when first needed.

    Pitfall: sock_diag answers about the namespace its netlink socket was opened in. From the
    host's, the exact lookup of a container's socket finds nothing (reported as gone) and
    SOCK_DESTROY cannot reach it. The namespace is entered again through a path whose inode is
    the one the survey saw (``ReapPlan.namespace_inodes``): the path the survey used, else, when
    that was a pid's /proc/PID/ns/net (the pid may have exited while the namespace lives on), the
    target's holders' /proc/PID/ns/net. A name under /run/netns the user gave (``--netns NAME``)
    deleted since is not looked past: the namespace is skipped as gone; one ``survey_all_netns()``
    named it by (``names_looked_past``) is, through the holders' paths, like a pid's. Without a
    recorded inode the path is resolved as it is now; if it names another namespace, the lookup by
    cookie finds nothing there and the socket is skipped, never another one touched. A namespace
    that is gone skips its targets.
    """

    def __init__(
        self, inodes: Mapping[str, int] | None = None, proc_root: str = "/proc", *, names_looked_past: bool = False
    ) -> None:
        self._inodes = inodes or {}
        self._proc_root = proc_root
        self._names_looked_past = names_looked_past
        self._open: dict[str | None, socket_mod.socket] = {}
        self._gone: dict[str, str] = {}

    def get(self, target: ReapTarget) -> socket_mod.socket:
        path = target.netns
        nl = self._open.get(path)
        if nl is not None:
            return nl
        if path is None:
            nl = netlink.open_socket()
        else:
            if path in self._gone:
                raise _Skip("netns-gone", self._gone[path])
            try:
                nl = self._open_in(path, target)
            except (NetnsError, NoSuchProcess) as err:
                self._gone[path] = f"its network namespace is gone since the plan ({err})"
                raise _Skip("netns-gone", self._gone[path]) from err
        self._open[path] = nl
        return nl

    def _open_in(self, path: str, target: ReapTarget) -> socket_mod.socket:
        inode = self._inodes.get(path)
        if inode is None:
            with netns_mod.entered(netns_mod.resolve(path)):
                return netlink.open_socket()
        paths = [path]
        # A pid's, which may have exited, or a name the survey gave, which may have been deleted:
        # the holders' too (entered only if still the surveyed inode).
        if path.startswith(f"{self._proc_root}/") or (
            self._names_looked_past and path.startswith(f"{netns_mod.NAMED_DIR}/")
        ):
            holders = (target.process, *(o.process for o in target.other_holders))
            paths += [f"{self._proc_root}/{p.pid}/ns/net" for p in holders]
        first: NetnsError | None = None
        for candidate in dict.fromkeys(paths):
            try:
                with netns_mod.entered(netns_mod.Netns(path=candidate, inode=inode)):
                    return netlink.open_socket()
            except NetnsError as err:  # gone, or now another namespace (NetnsGone): try the next
                first = first or err
        assert first is not None
        raise first

    def close(self) -> None:
        for nl in self._open.values():
            nl.close()
        self._open.clear()


@contextmanager
def _about(target: ReapTarget, proc_root: str, failed_code: str | None = None) -> Iterator[None]:
    """The sources' errors about the target process, as reap reports them: an exited process is a
    skip, a refusal names the ptrace right needed, other kernel errors fail this target only."""
    pid = target.process.pid
    try:
        yield
    except NoSuchProcess:
        raise _Skip("process-gone", f"pid {pid} has exited") from None
    except AccessDenied as err:
        raise AccessDenied(_ptrace_message(pid, proc_root)) from err
    except NotSupported as err:
        raise NotSupported(f"{err}: use --method destroy") from err
    except ClosewaitError as err:
        if failed_code is None:
            raise
        raise _Skip(failed_code, str(err), Outcome.FAILED) from err


@contextmanager
def _pinned(target: ReapTarget, proc_root: str, *, required: bool) -> Iterator[int | None]:
    """A pidfd on the planned process (None where the kernel has none and it is not ``required``),
    opened *before* its start time is compared, so the process checked is the process acted on."""
    with _about(target, proc_root, "pidfd-failed"):
        pin = pidfd.open_pidfd(target.process.pid, required=required)
    try:
        with _about(target, proc_root):
            _check_identity(target.process, proc_root, pin)
        yield pin
    finally:
        if pin is not None:
            os.close(pin)


def _check_fd(target: ReapTarget, inode: int | None) -> None:
    """The planned fd is still open (``inode`` not None) and still the planned socket (fds are reused)."""
    if inode is None:
        raise _Skip("fd-closed", f"fd {target.fd} is no longer open in pid {target.process.pid}")
    if inode != target.socket.inode:
        what = f"socket {inode}" if inode else "a file that is not a socket"
        raise _Skip("fd-reused", f"fd {target.fd} now holds {what}, not the planned {target.socket.inode}")


def _shutdown_one(target: ReapTarget, channels: _Channels, proc_root: str) -> str:
    with _pinned(target, proc_root, required=True) as pin, _about(target, proc_root, "getfd-failed"):
        dup = pidfd.borrow(pin, target.process.pid, target.fd) if pin is not None else None
    try:
        _check_fd(target, None if dup is None else pidfd.socket_inode_of(dup) or 0)
        assert dup is not None
        _check_still_close_wait(target, channels.get(target))
        state = pidfd.tcp_state(dup)
        if state != TcpState.CLOSE_WAIT:
            raise _Skip("state-changed", f"socket is now {_state_name(state)}, no longer CLOSE_WAIT")
        try:
            pidfd.shutdown(dup)
        except ClosewaitError as err:
            raise _Skip("shutdown-failed", str(err), Outcome.FAILED) from err
        after = pidfd.tcp_state(dup)
    finally:
        if dup is not None:
            os.close(dup)
    return f"FIN sent; socket now {_state_name(after)}; fd {target.fd} stays open"


def _destroy_one(target: ReapTarget, channels: _Channels, proc_root: str) -> str:
    with _pinned(target, proc_root, required=False):  # pins the pid while it is checked, where the kernel can
        with _about(target, proc_root):
            link = fd_link(target.process.pid, target.fd, proc_root)
        _check_fd(target, None if link is None else socket_inode(link) or 0)
        nl = channels.get(target)  # SOCK_DESTROY reaches only the namespace nl was opened in
        _check_still_close_wait(target, nl)
        try:
            netlink.destroy(target.socket, nl=nl)
        except NetlinkError as err:
            if err.errno in (errno.ENOENT, errno.ESTALE):
                raise _Skip("socket-gone", "socket left the TCP table just before SOCK_DESTROY") from err
            raise _Skip("destroy-failed", str(err), Outcome.FAILED) from err
    return f"SOCK_DESTROY aborted it (RST sent); fd {target.fd} stays open"


def _check_identity(process: Process, proc_root: str, pin: int | None) -> None:
    """The pid still names the planned process (same start time), else skip.

    Pitfall: /proc mounted with ``hidepid`` hides other users' processes: their stat is missing
    (hidepid=2, "invisible") or refused (hidepid=1). That is no proof the process exited, and no
    proof it is the planned one: skipped as ``identity-unknown``, saying which, never a traceback.
    """
    pid = process.pid
    try:
        start_time = read_stat(pid, proc_root).start_time
    except AccessDenied as err:
        raise _Skip("identity-unknown", f"cannot check that pid {pid} is still the planned process: {err}") from err
    except NoSuchProcess:
        if not pidfd.alive(pid, pin):
            raise
        option = hidepid_option(proc_root)
        mounted = f" (mounted with {option})" if option else ""
        raise _Skip(
            "identity-unknown",
            f"pid {pid} is running but {proc_root}{mounted} does not show it to this user:"
            " cannot check it is still the planned process",
        ) from None
    if start_time != process.start_time:
        planned = f"start time {start_time}, planned {process.start_time}"
        raise _Skip("pid-reused", f"pid {process.pid} is now another process ({planned})")


def _check_still_close_wait(target: ReapTarget, nl: socket_mod.socket) -> None:
    """sock_diag's current record of exactly this socket (endpoints + cookie) is CLOSE_WAIT, same inode."""
    current = netlink.lookup(target.socket, nl=nl)
    if current is None:
        raise _Skip("socket-gone", "socket left the TCP table since the plan (closed)")
    if current.inode != target.socket.inode:
        raise _Skip("socket-replaced", f"its endpoints now belong to socket {current.inode}")
    if current.state != TcpState.CLOSE_WAIT:
        raise _Skip("state-changed", f"socket is now {current.state.name}, no longer CLOSE_WAIT")


def _state_name(state: int) -> str:
    try:
        name: str = TcpState(state).name
    except ValueError:
        return f"state {state}"
    return "CLOSED (out of the TCP table)" if state == TcpState.CLOSE else name


__all__ = [
    "Excluded",
    "Method",
    "Outcome",
    "ReapCriteria",
    "ReapOutcome",
    "ReapPlan",
    "ReapResult",
    "ReapTarget",
    "RemoteFilter",
    "apply",
    "parse_duration",
    "plan",
    "survey",
    "survey_all_netns",
]
