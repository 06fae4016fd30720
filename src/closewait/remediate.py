"""Release a running process's CLOSE_WAIT sockets without restarting it: ``plan()`` is pure, ``apply()`` acts.

Two methods:

``shutdown`` (default, Linux 5.6+)
    ``pidfd_open(pid)`` pins the target process, its start time (field 22 of /proc/PID/stat) is
    compared with the one captured at plan time, ``pidfd_getfd(pidfd, fd)`` duplicates its
    descriptor into this process, ``fstat`` proves the duplicate is the planned socket (same inode),
    sock_diag and ``TCP_INFO`` on the duplicate prove it is still in CLOSE_WAIT, then
    ``shutdown(SHUT_RDWR)`` sends a normal FIN and the duplicate is closed. The connection leaves the
    TCP table (LAST_ACK, then gone), while the target's fd number stays valid and open: its next
    ``recv()`` returns 0 (EOF) and its next ``send()`` fails with EPIPE. The fd itself is still the
    application's to close; a process that never closes it keeps one descriptor (no port, no buffers).

``destroy``
    SOCK_DESTROY over sock_diag, as ``ss -K`` does, for kernels without pidfd_getfd or callers without
    ptrace rights over the target. Needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY. The kernel
    aborts the socket (RST to the peer); the target's next ``send()`` fails with ECONNABORTED.

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

Only CLOSE_WAIT sockets are ever touched: ``plan()`` drops every other state it is given, and
``apply()`` re-checks the live state. Library code logs and never prints; the CLI
(``closewait.cli.reap``) prints the plan and the result.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import errno as errno_mod
import ipaddress
import logging
import os
import platform
import re
import socket as socket_mod
import stat
import struct
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from closewait.errors import AccessDenied, NetlinkError, NotSupported, UsageError
from closewait.model import Endpoint, Finding, Owner, Process, Snapshot, Socket, TcpState
from closewait.sources import netlink
from closewait.sources.owners import find_owners, parse_stat, socket_inode

log = logging.getLogger(__name__)


class Method(enum.StrEnum):
    """How a planned socket is released."""

    SHUTDOWN = "shutdown"
    DESTROY = "destroy"


class Outcome(enum.StrEnum):
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


# --- parsing user input ----------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(text: str) -> int:
    """``30s``, ``5m``, ``1h``, ``500ms``, ``1m30s`` -> milliseconds. Raises ``UsageError`` otherwise."""
    value = text.strip().lower()
    parts = _DURATION_PART.findall(value)
    if not value or "".join(number + unit for number, unit in parts) != value:
        raise UsageError(f"bad duration {text!r}: use a number with a unit, like 500ms, 30s, 5m, 1h or 1m30s")
    return round(sum(float(number) * _UNIT_MS[unit] for number, unit in parts))


@dataclass(frozen=True, slots=True)
class RemoteFilter:
    """``--remote ADDR[:PORT]``: an address or network (``10.0.0.0/8``), IPv6 in brackets with a port.

    An IPv4 filter also matches IPv4-mapped peers of IPv6 sockets (``::ffff:10.0.0.1``).
    """

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    port: int | None
    text: str

    @classmethod
    def parse(cls, text: str) -> RemoteFilter:
        raw = text.strip()
        address, port_text = raw, ""
        if raw.startswith("["):
            close = raw.find("]")
            if close < 0 or (close + 1 < len(raw) and raw[close + 1] != ":"):
                raise UsageError(f"bad --remote {text!r}: use ADDR, ADDR:PORT or [IPv6]:PORT")
            address, port_text = raw[1:close], raw[close + 2 :]
        elif raw.count(":") == 1:
            address, port_text = raw.split(":")
        try:
            network = ipaddress.ip_network(address, strict=False)
        except ValueError:
            raise UsageError(f"bad --remote {text!r}: {address!r} is not an IP address or network") from None
        port: int | None = None
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
                raise UsageError(f"bad --remote {text!r}: port {port_text!r} is not 1-65535")
            port = int(port_text)
        return cls(network, port, raw)

    def matches(self, endpoint: Endpoint) -> bool:
        if self.port is not None and endpoint.port != self.port:
            return False
        address = ipaddress.ip_address(endpoint.address)
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        if mapped is not None and isinstance(self.network, ipaddress.IPv4Network):
            return mapped in self.network
        return address.version == self.network.version and address in self.network


# --- the plan --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReapCriteria:
    """Which sockets the user asked for. ``describe()`` is the phrase used in messages."""

    pids: frozenset[int] = frozenset()
    ports: frozenset[int] = frozenset()
    remote: RemoteFilter | None = None
    older_than_ms: int | None = None
    all_processes: bool = False

    @property
    def has_socket_filter(self) -> bool:
        return bool(self.ports) or self.remote is not None or self.older_than_ms is not None

    def validate(self) -> None:
        """Raise ``UsageError`` for a combination that could reap more than the user meant."""
        if self.all_processes and self.pids:
            raise UsageError("give either --pid or --all, not both")
        if self.all_processes and not self.has_socket_filter:
            raise UsageError("--all reaps every process's sockets: add --port, --remote or --older-than to narrow it")
        if not self.all_processes and not self.pids:
            raise UsageError("say whose sockets to reap: --pid PID, or --all with --port, --remote or --older-than")
        for port in self.ports:
            if not 0 < port <= 65535:
                raise UsageError(f"port {port} is out of range (1-65535)")
        if self.older_than_ms is not None and self.older_than_ms < 0:
            raise UsageError("--older-than cannot be negative")

    def describe(self) -> str:
        parts = ["any process" if self.all_processes else "pid " + ", ".join(str(p) for p in sorted(self.pids))]
        if self.ports:
            parts.append("port " + ", ".join(str(p) for p in sorted(self.ports)))
        if self.remote is not None:
            parts.append(f"remote {self.remote.text}")
        if self.older_than_ms is not None:
            parts.append(f"idle over {format_ms(self.older_than_ms)}")
        return ", ".join(parts)

    def matches(self, sock: Socket) -> bool:
        """The socket filters (port, remote, age); the owner filter is applied by ``plan()``."""
        if self.ports and sock.local.port not in self.ports and sock.remote.port not in self.ports:
            return False
        if self.remote is not None and not self.remote.matches(sock.remote):
            return False
        return not (self.older_than_ms is not None and (sock.idle_ms or 0) < self.older_than_ms)


def format_ms(ms: int) -> str:
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True, slots=True)
class ReapTarget:
    """One CLOSE_WAIT socket to release through descriptor ``fd`` of ``process``.

    ``fds`` are all of that process's descriptors for the socket (``fd`` is the first);
    ``other_holders`` are descriptors of other processes sharing it, which the release affects too.
    """

    socket: Socket
    process: Process
    fds: tuple[int, ...]
    other_holders: tuple[Owner, ...] = ()

    @property
    def fd(self) -> int:
        return self.fds[0]


@dataclass(frozen=True, slots=True)
class Excluded:
    """A socket the filters matched that the plan will not touch, and why."""

    socket: Socket
    owners: tuple[Owner, ...]
    reason: str


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

    @property
    def processes(self) -> tuple[Process, ...]:
        seen: dict[tuple[int, int], Process] = {}
        for target in self.targets:
            seen.setdefault(target.process.identity, target.process)
        return tuple(seen.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``closewait reap --json``, docs/reap.md)."""
        return {
            "method": self.method.value,
            "criteria": self.criteria.describe(),
            "taken_at": self.taken_at,
            "targets": [_target_dict(t) for t in self.targets],
            "excluded": [_excluded_dict(e) for e in self.excluded],
            "errors": list(self.errors),
        }


def _socket_dict(sock: Socket) -> dict[str, Any]:
    from closewait.serialize import endpoint_dict

    return {
        "state": sock.state.name,
        "local": endpoint_dict(sock.local),
        "remote": endpoint_dict(sock.remote),
        "inode": sock.inode,
        "cookie": sock.cookie,
        "recv_q": sock.recv_q,
        "idle_ms": sock.idle_ms,
    }


def _target_dict(target: ReapTarget) -> dict[str, Any]:
    from closewait.serialize import owner_dict

    return {
        **_socket_dict(target.socket),
        "pid": target.process.pid,
        "start_time": target.process.start_time,
        "name": target.process.name,
        "fd": target.fd,
        "fds": list(target.fds),
        "other_holders": [owner_dict(o) for o in target.other_holders],
    }


def _excluded_dict(excluded: Excluded) -> dict[str, Any]:
    from closewait.serialize import owner_dict

    return {
        **_socket_dict(excluded.socket),
        "owners": [owner_dict(o) for o in excluded.owners],
        "reason": excluded.reason,
    }


def plan(
    snapshot: Snapshot,
    *,
    pids: Iterable[int] = (),
    ports: Iterable[int] = (),
    remote: RemoteFilter | str | None = None,
    older_than_ms: int | None = None,
    method: Method | str = Method.SHUTDOWN,
    all_processes: bool = False,
) -> ReapPlan:
    """Choose the sockets of ``snapshot`` to release. Pure: reads only its arguments.

    Only CLOSE_WAIT sockets become targets, whatever states the snapshot holds. With ``pids``, a
    socket is a target through the first of those processes holding it; with ``all_processes``
    (which needs a port, remote or age filter), through its first holder. Sockets the filters
    match but that cannot be acted on safely (no cookie from the procfs backend, unknown idle time
    with ``older_than_ms``, unknown process identity, no known owner) are listed in ``excluded``.
    """
    criteria = ReapCriteria(
        pids=frozenset(pids),
        ports=frozenset(ports),
        remote=RemoteFilter.parse(remote) if isinstance(remote, str) else remote,
        older_than_ms=older_than_ms,
        all_processes=all_processes,
    )
    criteria.validate()
    try:
        chosen_method = Method(method)
    except ValueError:
        raise UsageError(f"unknown method {method!r}: choose shutdown or destroy") from None

    targets: list[ReapTarget] = []
    excluded: list[Excluded] = []
    for finding in snapshot.findings:
        owners = finding.owners
        mine = _holders(finding, criteria)
        if criteria.pids and not mine:
            continue
        sock = finding.socket
        if not _socket_filters_match(sock, criteria):
            continue
        reason = _exclusion(finding, mine, criteria)
        if reason is not None:
            excluded.append(Excluded(sock, owners, reason))
            continue
        process = mine[0].process
        fds = tuple(o.fd for o in mine if o.process.identity == process.identity)
        others = tuple(o for o in owners if o.process.identity != process.identity)
        targets.append(ReapTarget(sock, process, fds, others))
    targets.sort(key=lambda t: (t.process.pid, t.fd))
    return ReapPlan(
        method=chosen_method,
        criteria=criteria,
        targets=tuple(targets),
        excluded=tuple(excluded),
        taken_at=snapshot.taken_at,
        errors=snapshot.errors,
    )


def _holders(finding: Finding, criteria: ReapCriteria) -> list[Owner]:
    if criteria.all_processes:
        return list(finding.owners)
    return [o for o in finding.owners if o.process.pid in criteria.pids]


def _socket_filters_match(sock: Socket, criteria: ReapCriteria) -> bool:
    if criteria.older_than_ms is not None and sock.idle_ms is None:
        # Unknown age: keep it so that _exclusion reports it instead of silently dropping it.
        return ReapCriteria(criteria.pids, criteria.ports, criteria.remote).matches(sock)
    return criteria.matches(sock)


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
) -> Snapshot:
    """The Snapshot ``plan()`` needs: CLOSE_WAIT sockets from sock_diag, with every owner.

    Checks first that each pid's descriptors are readable, so a missing privilege is one clear
    ``AccessDenied`` rather than an empty plan. With ``pids``, the scan walks only those processes;
    then the sockets found are looked up in every other process too, because releasing a shared
    socket (fork, SCM_RIGHTS) affects all its holders and the plan must say so (as far as this
    user can see: without root, other users' processes are not looked into).
    """
    from closewait.scan import CLOSE_WAIT_ONLY, scan, validate_pids

    for pid in sorted(pids):
        try:
            validate_pids([pid], proc_root)  # one fd link read, not all of them: scan() walks them next
        except AccessDenied:
            raise AccessDenied(_ptrace_message(pid, proc_root)) from None
    snapshot = scan(CLOSE_WAIT_ONLY, ports=ports, pids=pids, backend="netlink", proc_root=proc_root)
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
    merged: dict[tuple[int, int], Owner] = {}
    for owner in (*first, *more):
        merged.setdefault((owner.process.pid, owner.fd), owner)
    return tuple(sorted(merged.values(), key=lambda o: (o.process.pid, o.fd)))


def _ptrace_message(pid: int, proc_root: str = "/proc") -> str:
    try:
        owner = f" (uid {os.stat(f'{proc_root}/{pid}').st_uid})"
    except OSError:
        owner = ""
    if os.geteuid() == 0:
        # Root was refused too: the ptrace access check protects this process (another user
        # namespace's init, an LSM policy). Telling root to run as root would be no help.
        return (
            f"permission denied: the kernel refuses access to the descriptors of pid {pid}{owner} even to "
            "root (a protected process), so its sockets cannot be planned or reaped from here"
        )
    return (
        f"permission denied: reaping pid {pid}{owner} needs root or CAP_SYS_PTRACE over it "
        f"(you are uid {os.geteuid()}); --method destroy needs CAP_NET_ADMIN"
    )


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
        return {
            **self.plan.as_dict(),
            "outcomes": [
                {**_target_dict(o.target), "outcome": o.outcome.value, "code": o.code, "reason": o.reason}
                for o in self.outcomes
            ],
            "done": len(self.done),
            "skipped": len(self.skipped),
            "failed": len(self.failed),
        }


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
    nl = netlink.open_socket()
    try:
        for target in reap_plan.targets:
            try:
                if reap_plan.method == Method.SHUTDOWN:
                    reason = _shutdown_one(target, nl, proc_root)
                else:
                    reason = _destroy_one(target, nl, proc_root)
                outcomes.append(ReapOutcome(target, Outcome.DONE, "released", reason))
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
        nl.close()
    return ReapResult(reap_plan, tuple(outcomes))


def _shutdown_one(target: ReapTarget, nl: socket_mod.socket, proc_root: str) -> str:
    pid = target.process.pid
    with _pidfd(pid, required=True) as pidfd:
        _check_identity(target.process, proc_root)
        assert pidfd is not None
        dup = _getfd(pidfd, target)
    try:
        info = os.fstat(dup)
        if not stat.S_ISSOCK(info.st_mode) or info.st_ino != target.socket.inode:
            what = f"socket {info.st_ino}" if stat.S_ISSOCK(info.st_mode) else "a file that is not a socket"
            raise _Skip("fd-reused", f"fd {target.fd} now holds {what}, not the planned {target.socket.inode}")
        sock = socket_mod.socket(fileno=dup)
        dup = -1  # owned by `sock` now
        try:
            _check_still_close_wait(target, nl)
            state = _tcp_state(sock)
            if state != TcpState.CLOSE_WAIT:
                raise _Skip("state-changed", f"socket is now {_state_name(state)}, no longer CLOSE_WAIT")
            try:
                sock.shutdown(socket_mod.SHUT_RDWR)
            except OSError as err:
                raise _Skip("shutdown-failed", f"shutdown() failed: {err.strerror}", Outcome.FAILED) from err
            after = _tcp_state(sock)
        finally:
            sock.close()
    finally:
        if dup >= 0:
            os.close(dup)
    return f"FIN sent; socket now {_state_name(after)}; fd {target.fd} stays open"


def _destroy_one(target: ReapTarget, nl: socket_mod.socket, proc_root: str) -> str:
    pid = target.process.pid
    with _pidfd(pid, required=False):
        _check_identity(target.process, proc_root)
        inode = _fd_inode(pid, target.fd, proc_root)
        if inode != target.socket.inode:
            what = f"socket {inode}" if inode else "something that is not a socket"
            raise _Skip("fd-reused", f"fd {target.fd} now holds {what}, not the planned {target.socket.inode}")
        _check_still_close_wait(target, nl)
        try:
            netlink.destroy(target.socket, nl=nl)
        except NetlinkError as err:
            if err.errno in (errno_mod.ENOENT, errno_mod.ESTALE):
                raise _Skip("socket-gone", "socket left the TCP table just before SOCK_DESTROY") from err
            raise _Skip("destroy-failed", str(err), Outcome.FAILED) from err
    return f"SOCK_DESTROY aborted it (RST sent); fd {target.fd} stays open"


# --- the steps -------------------------------------------------------------------------------------------


def _check_identity(process: Process, proc_root: str) -> None:
    """The pid still names the planned process (same start time), else skip."""
    try:
        with open(f"{proc_root}/{process.pid}/stat", "rb") as handle:
            _, start_time = parse_stat(handle.read().decode("utf-8", "replace"))
    except (FileNotFoundError, ProcessLookupError):
        raise _Skip("process-gone", f"pid {process.pid} has exited") from None
    if start_time != process.start_time:
        raise _Skip(
            "pid-reused",
            f"pid {process.pid} is now another process (start time {start_time}, planned {process.start_time})",
        )


def _check_still_close_wait(target: ReapTarget, nl: socket_mod.socket) -> None:
    """sock_diag's current record of exactly this socket (endpoints + cookie) is CLOSE_WAIT, same inode."""
    current = netlink.lookup(target.socket, nl=nl)
    if current is None:
        raise _Skip("socket-gone", "socket left the TCP table since the plan (closed)")
    if current.inode != target.socket.inode:
        raise _Skip("socket-replaced", f"its endpoints now belong to socket {current.inode}")
    if current.state != TcpState.CLOSE_WAIT:
        raise _Skip("state-changed", f"socket is now {current.state.name}, no longer CLOSE_WAIT")


def _fd_inode(pid: int, fd: int, proc_root: str) -> int:
    try:
        link = os.readlink(f"{proc_root}/{pid}/fd/{fd}")
    except FileNotFoundError:
        raise _Skip("fd-closed", f"fd {fd} is no longer open in pid {pid}") from None
    except PermissionError:
        raise AccessDenied(_ptrace_message(pid, proc_root)) from None
    return socket_inode(link) or 0


_TCP_INFO_STATE = struct.Struct("=B")


def _tcp_state(sock: socket_mod.socket) -> int:
    """tcpi_state of the socket itself (the first byte of struct tcp_info)."""
    raw = sock.getsockopt(socket_mod.IPPROTO_TCP, socket_mod.TCP_INFO, 8)
    state: int = _TCP_INFO_STATE.unpack_from(raw, 0)[0]
    return state


def _state_name(state: int) -> str:
    try:
        name: str = TcpState(state).name
    except ValueError:
        return f"state {state}"
    return "CLOSED (out of the TCP table)" if state == TcpState.CLOSE else name


# --- pidfd syscalls --------------------------------------------------------------------------------------

#: (pidfd_open, pidfd_getfd): the generic syscall table numbers, shared since Linux 5.1 by x86_64,
#: aarch64, i386, arm, riscv, powerpc, s390 and loongarch. alpha, ia64 and mips number them differently.
_SYSCALL_NUMBERS: dict[str, tuple[int, int]] = dict.fromkeys(
    (
        "x86_64",
        "amd64",
        "aarch64",
        "arm64",
        "i386",
        "i686",
        "armv7l",
        "armv6l",
        "armv8l",
        "riscv64",
        "ppc64le",
        "ppc64",
        "s390x",
        "loongarch64",
    ),
    (434, 438),
)


class _Libc:
    def __init__(self) -> None:
        self._syscall: Any = None

    def syscall(self, number: int, *args: int) -> int:
        if self._syscall is None:
            libc = ctypes.CDLL(None, use_errno=True)
            self._syscall = libc.syscall
            self._syscall.restype = ctypes.c_long
        result: int = self._syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return result


_libc = _Libc()


def _numbers() -> tuple[int, int]:
    machine = platform.machine().lower()
    numbers = _SYSCALL_NUMBERS.get(machine)
    if numbers is None:
        raise NotSupported(f"pidfd syscall numbers are not known for {machine}: use --method destroy")
    return numbers


def pidfd_open(pid: int) -> int:
    """A pidfd for ``pid`` (os.pidfd_open where Python has it, the raw syscall otherwise)."""
    opener = getattr(os, "pidfd_open", None)
    if opener is not None:
        fd: int = opener(pid, 0)
        return fd
    return _libc.syscall(_numbers()[0], pid, 0)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """Duplicate descriptor ``target_fd`` of the process behind ``pidfd`` (Linux 5.6+; Python has no wrapper).

    The duplicate is close-on-exec. Needs ptrace (PTRACE_MODE_ATTACH_REALCREDS) rights over the target.
    """
    return _libc.syscall(_numbers()[1], pidfd, target_fd, 0)


@contextmanager
def _pidfd(pid: int, *, required: bool) -> Iterator[int | None]:
    """A pidfd pinning ``pid`` for the duration; None if the kernel has none and it is not ``required``."""
    try:
        pidfd: int | None = pidfd_open(pid)
    except ProcessLookupError:
        raise _Skip("process-gone", f"pid {pid} has exited") from None
    except PermissionError:
        raise AccessDenied(_ptrace_message(pid)) from None
    except OSError as err:
        if err.errno != errno_mod.ENOSYS:
            raise _Skip("pidfd-failed", f"pidfd_open({pid}) failed: {err.strerror}", Outcome.FAILED) from err
        if required:
            raise NotSupported(
                "pidfd_open is not available (Linux 5.3+ needed, pidfd_getfd 5.6+): use --method destroy"
            ) from err
        pidfd = None
    try:
        yield pidfd
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _getfd(pidfd: int, target: ReapTarget) -> int:
    pid = target.process.pid
    try:
        return pidfd_getfd(pidfd, target.fd)
    except OSError as err:
        if err.errno == errno_mod.ESRCH:
            raise _Skip("process-gone", f"pid {pid} exited before its fd could be taken") from err
        if err.errno == errno_mod.EBADF:
            raise _Skip("fd-closed", f"fd {target.fd} is no longer open in pid {pid}") from err
        if err.errno in (errno_mod.EPERM, errno_mod.EACCES):
            raise AccessDenied(_ptrace_message(pid)) from err
        if err.errno == errno_mod.ENOSYS:
            raise NotSupported(
                "pidfd_getfd is not available on this kernel (Linux 5.6+ needed): use --method destroy"
            ) from err
        raise _Skip("getfd-failed", f"pidfd_getfd failed: {err.strerror}", Outcome.FAILED) from err


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
    "pidfd_getfd",
    "pidfd_open",
    "plan",
    "survey",
]
