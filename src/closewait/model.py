"""The data model: what a TCP socket, its owners and a scan of them are.

Everything here is an immutable value. Sources (``closewait.sources``) build these objects from the
kernel; ``closewait.diagnosis`` reads them; views render them. Nothing here imports a UI or a metrics
library, and nothing here touches the kernel.

Numbers and names follow the kernel (``include/net/tcp_states.h``, ``uapi/linux/tcp.h``) so code can
be grepped against it. The scan's per-socket loop builds ``Endpoint``, ``TcpInfo``, ``Socket``,
``Diagnosis`` and ``Finding`` through the typed fast constructors of ``closewait._records``. The
classes are ``dataclasses.dataclass(frozen=True, slots=True)`` to type checkers and readers; at run
time ``closewait._frozen.dataclass`` makes the same classes without compiling ``dataclasses``'
generated code until it is used. Every dataclass here keeps a docstring (``dataclasses`` calls
``inspect`` for one without, which the console does not import; ``_frozen`` requires one).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import field

from closewait.display import format_address

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5 ms); mypy knows the name
if TYPE_CHECKING:
    from dataclasses import dataclass

    from closewait.workload import Workload, WorkloadSelector
else:
    # The same frozen, slotted dataclasses, without compiling their generated code at import
    # (~6 ms of every scan --json): see closewait/_frozen.py. Type checkers see dataclasses'.
    from closewait._frozen import dataclass


class TcpState(enum.IntEnum):
    """TCP states with the kernel's numbers (``include/net/tcp_states.h``)."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12

    @property
    def ss_name(self) -> str:
        """The name ``ss`` uses on its command line and in its output (``close-wait``)."""
        return _SS_NAMES[self]

    @property
    def bit(self) -> int:
        """This state's bit in an inet_diag ``idiag_states`` mask."""
        return 1 << int(self)

    @classmethod
    def from_ss_name(cls, name: str) -> TcpState:
        """Parse ``ss``'s spelling (``close-wait``); also accepts the kernel's (``CLOSE_WAIT``)."""
        key = name.strip().lower().replace("_", "-")
        for state, ss_name in _SS_NAMES.items():
            # The kernel's FIN_WAIT2 is ss's fin-wait-2: compare both spellings.
            if key in (ss_name, state.name.lower().replace("_", "-")):
                return state
        raise ValueError(f"unknown TCP state {name!r}")


_SS_NAMES: dict[TcpState, str] = {
    TcpState.ESTABLISHED: "established",
    TcpState.SYN_SENT: "syn-sent",
    TcpState.SYN_RECV: "syn-recv",
    TcpState.FIN_WAIT1: "fin-wait-1",
    TcpState.FIN_WAIT2: "fin-wait-2",
    TcpState.TIME_WAIT: "time-wait",
    TcpState.CLOSE: "closed",
    TcpState.CLOSE_WAIT: "close-wait",
    TcpState.LAST_ACK: "last-ack",
    TcpState.LISTEN: "listening",
    TcpState.CLOSING: "closing",
    TcpState.NEW_SYN_RECV: "new-syn-recv",
}

#: States a connection passes through while it is being torn down.
TEARDOWN_STATES: frozenset[TcpState] = frozenset(
    {
        TcpState.FIN_WAIT1,
        TcpState.FIN_WAIT2,
        TcpState.TIME_WAIT,
        TcpState.CLOSE_WAIT,
        TcpState.LAST_ACK,
        TcpState.CLOSING,
    }
)
ALL_STATES: frozenset[TcpState] = frozenset(TcpState)
#: States whose Recv-Q includes the peer's FIN (one sequence number) until EOF is read.
_FIN_RECEIVED: frozenset[TcpState] = frozenset({TcpState.CLOSE_WAIT, TcpState.LAST_ACK, TcpState.CLOSING})
# Module constants for the properties read once per socket per scan (a global lookup, not two).
_CLOSE_WAIT = TcpState.CLOSE_WAIT
_LISTEN = TcpState.LISTEN


def state_mask(states: Iterable[TcpState]) -> int:
    """The inet_diag ``idiag_states`` bitmask selecting ``states``."""
    mask = 0
    for state in states:
        mask |= state.bit
    return mask


def parse_states(names: Iterable[str]) -> frozenset[TcpState]:
    """Turn ``--state`` values (ss's spelling, plus ``all`` and ``teardown``) into states.

    Raises ``ValueError`` naming the first value it does not know.
    """
    states: set[TcpState] = set()
    for name in names:
        key = name.strip().lower()
        if key == "all":
            states |= ALL_STATES
        elif key == "teardown":
            states |= TEARDOWN_STATES
        elif key in ("listen", "listening"):
            states.add(TcpState.LISTEN)
        else:
            states.add(TcpState.from_ss_name(key))
    return frozenset(states)


class Family(enum.StrEnum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"


class Role(enum.StrEnum):
    """Which end of the connection the owning process is."""

    SERVER = "server"
    CLIENT = "client"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """One end of a connection. ``address`` is the text form (``127.0.0.1``, ``::1``)."""

    address: str
    port: int

    def __str__(self) -> str:
        return format_address(self.address, self.port)


@dataclass(frozen=True, slots=True)
class TcpInfo:
    """The ``struct tcp_info`` fields closewait uses (netlink ``INET_DIAG_INFO`` only).

    Times are milliseconds ago, as the kernel reports them.
    """

    state: int
    retransmits: int
    probes: int
    backoff: int
    rto_us: int
    last_data_sent_ms: int
    last_ack_recv_ms: int
    last_data_recv_ms: int
    rtt_us: int
    unacked: int
    total_retrans: int
    bytes_acked: int | None = None
    bytes_received: int | None = None


@dataclass(frozen=True, slots=True)
class Socket:
    """One TCP socket as the kernel reports it.

    ``recv_q`` and ``send_q`` are the kernel's numbers (``idiag_rqueue``/``idiag_wqueue``, or the
    ``rx_queue``/``tx_queue`` columns of /proc/net/tcp). For a listening socket they are the accept
    backlog and its limit.
    """

    state: TcpState
    family: Family
    local: Endpoint
    remote: Endpoint
    inode: int
    uid: int
    recv_q: int
    send_q: int
    #: inet_diag's socket cookie, stable for the socket's life (netlink only).
    cookie: int | None = None
    tcp_info: TcpInfo | None = None
    #: Which backend produced this record: "netlink" or "procfs".
    source: str = "netlink"

    @property
    def key(self) -> tuple[Family, Endpoint, Endpoint]:
        """What identifies the connection in the TCP table."""
        return (self.family, self.local, self.remote)

    @property
    def eof_read(self) -> bool:
        """In CLOSE_WAIT, the owner has read the peer's FIN (read() returned 0).

        The kernel counts the FIN as one byte of Recv-Q until the application reads past it, so a
        Recv-Q of 0 in CLOSE_WAIT means EOF was read and the socket was still not closed.
        """
        return self.state == _CLOSE_WAIT and self.recv_q == 0

    @property
    def unread_bytes(self) -> int:
        """Bytes of data waiting to be read, not counting the FIN.

        Every state reached by receiving the peer's FIN (CLOSE_WAIT, LAST_ACK, CLOSING) counts that
        FIN as one byte of Recv-Q until the application reads EOF.
        """
        state = self.state
        if state in _FIN_RECEIVED:
            recv_q = self.recv_q
            return recv_q - 1 if recv_q > 1 else 0
        if state == _LISTEN:
            return 0
        return self.recv_q

    @property
    def idle_ms(self) -> int | None:
        """Milliseconds since anything arrived from the peer (for CLOSE_WAIT: since its FIN, at least).

        From tcp_info's ``tcpi_last_ack_recv``: the FIN carries an ACK, a bare FIN does not update
        ``tcpi_last_data_recv``. ``None`` when the backend has no tcp_info (procfs), and for a
        listening socket (no peer sends to it; the kernel reports 0 there).
        """
        info = self.tcp_info
        if info is None or self.state == _LISTEN:
            return None
        return info.last_ack_recv_ms


@dataclass(frozen=True, slots=True)
class Process:
    """A process, identified by pid and start time so a reused pid is never mistaken for it."""

    pid: int
    #: Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    start_time: int
    name: str
    cmdline: tuple[str, ...]
    uid: int | None = None
    #: The container, Kubernetes pod or systemd unit the process runs in (``closewait.workload``);
    #: None when it was not looked up.
    workload: Workload | None = None

    @property
    def identity(self) -> tuple[int, int]:
        return (self.pid, self.start_time)


@dataclass(frozen=True, slots=True)
class Owner:
    """One descriptor of one process that refers to a socket."""

    process: Process
    fd: int


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """Why a socket is where it is, and what fixes it. ``code`` is stable and documented."""

    code: str
    summary: str
    remedy: str


class AgeSource(enum.Enum):
    """Where a CLOSE_WAIT socket's age comes from (``Age.source``; JSON ``age_source``)."""

    #: The recorder saw the socket enter CLOSE_WAIT (the kernel's time of the peer's FIN).
    EXACT = "exact"
    #: ``tcpi_last_ack_recv``: time since the last ACK arrived, at most the time since the FIN
    #: (a keepalive reply arriving later makes it shorter).
    LAST_ACK_LOWER_BOUND = "last_ack_lower_bound"


@dataclass(frozen=True, slots=True)
class Age:
    """How long a socket has been in CLOSE_WAIT: since ``since`` (wall clock, seconds since the
    epoch) for ``ms`` milliseconds as of the scan, and how that is known."""

    since: float
    ms: int
    source: AgeSource


@dataclass(frozen=True, slots=True)
class Finding:
    """A socket with what closewait learned about it. ``age`` is set for CLOSE_WAIT sockets whose
    age is known (exactly, from the recorder, or as a lower bound from tcp_info)."""

    socket: Socket
    owners: tuple[Owner, ...]
    role: Role
    diagnosis: Diagnosis | None
    age: Age | None = None

    @property
    def processes(self) -> tuple[Process, ...]:
        seen: dict[tuple[int, int], Process] = {}
        for owner in self.owners:
            seen.setdefault(owner.process.identity, owner.process)
        return tuple(seen.values())


@dataclass(frozen=True, slots=True)
class ProcessGroup:
    """The findings held by one process (or by nobody, when ``process`` is None)."""

    process: Process | None
    findings: tuple[Finding, ...]

    @property
    def count(self) -> int:
        return len(self.findings)

    @property
    def oldest_idle_ms(self) -> int | None:
        idles = [f.socket.idle_ms for f in self.findings if f.socket.idle_ms is not None]
        return max(idles) if idles else None

    @property
    def unread_bytes(self) -> int:
        return sum(f.socket.unread_bytes for f in self.findings)

    def diagnosis_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for finding in self.findings:
            code = finding.diagnosis.code if finding.diagnosis else "-"
            counts[code] = counts.get(code, 0) + 1
        return counts


@dataclass(frozen=True, slots=True)
class WorkloadGroup:
    """The findings of one workload (container, pod, unit, the host), by process; ``workload`` is
    None for sockets with no known owner and for processes whose workload was not looked up."""

    workload: Workload | None
    processes: tuple[ProcessGroup, ...]

    @property
    def count(self) -> int:
        """Sockets, each once even when several of the workload's processes share it."""
        return len({id(f) for group in self.processes for f in group.findings})

    @property
    def oldest_idle_ms(self) -> int | None:
        idles = [g.oldest_idle_ms for g in self.processes if g.oldest_idle_ms is not None]
        return max(idles) if idles else None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The result of one scan: findings, the states asked for, and what went wrong on the way.

    ``errors`` are problems that did not stop the scan (for example owners that could not be read
    without root); each is one line for a person.
    """

    findings: tuple[Finding, ...]
    states: frozenset[TcpState]
    taken_at: float
    backend: str
    netns: str | None = None
    owners_resolved: bool = True
    errors: tuple[str, ...] = ()
    #: How the owners were found: "bpf" (one kernel pass over every fd table), "procfs" (the
    #: /proc/PID/fd walk) or "cache" (a recent bpf pass's answer, re-checked owner by owner;
    #: sources/owner_cache.py); None when they were not looked up.
    owners_via: str | None = None
    #: How many of ``findings`` are in each state asked for (zeros included), after --port/--pid filters.
    state_counts: Mapping[TcpState, int] = field(default_factory=dict)
    #: Why the BPF owner lookup was not used when ``owner_source="auto"`` fell back to the /proc walk
    #: (for example "permission denied (needs root, ...)"); None when it was used or not tried.
    owners_fallback_reason: str | None = None
    #: True when CLOSE_WAIT ages came from a running recorder (``closewait record``, the exporter).
    recorder_used: bool = False
    #: Why no recorder was used for the ages (said once per scan); None when one was, or when no
    #: CLOSE_WAIT socket was asked for.
    recorder_unavailable: str | None = None
    #: The workloads the scan was narrowed to (``--container``, ``--pod``, ...); None for all of them.
    selection: WorkloadSelector | None = None
    #: The inode of the network namespace ``netns`` named when it was scanned (None with ``netns``):
    #: what a later step checks a path against before it enters that namespace again.
    netns_inode: int | None = None

    def in_state(self, state: TcpState) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.socket.state == state)

    def by_process(self, state: TcpState | None = None) -> list[ProcessGroup]:
        """Findings grouped by owning process, worst first (most sockets, then oldest).

        A socket shared by several processes (fork, SCM_RIGHTS) appears under each of them.
        Sockets with no known owner form one group with ``process=None``, listed last.
        """
        groups: dict[tuple[int, int] | None, list[Finding]] = {}
        processes: dict[tuple[int, int], Process] = {}
        for finding in self.findings:
            if state is not None and finding.socket.state != state:
                continue
            owners = finding.processes
            if not owners:
                groups.setdefault(None, []).append(finding)
            for process in owners:
                processes[process.identity] = process
                groups.setdefault(process.identity, []).append(finding)
        result = [
            ProcessGroup(processes[key] if key is not None else None, tuple(items)) for key, items in groups.items()
        ]
        result.sort(
            key=lambda g: (
                g.process is None,
                -g.count,
                -(g.oldest_idle_ms or 0),
                g.process.pid if g.process else 0,
            )
        )
        return result

    def by_workload(self, state: TcpState | None = None) -> list[WorkloadGroup]:
        """Findings grouped by workload, then by process, worst first (most sockets, then oldest).

        Processes in one container, pod or unit form one group; sockets without a known owner
        form one group with ``workload=None``, listed last.
        """
        groups: dict[object, list[ProcessGroup]] = {}
        workloads: dict[object, Workload | None] = {}
        for group in self.by_process(state):
            workload = group.process.workload if group.process is not None else None
            key: object = (workload.kind, workload.name, workload.id) if workload is not None else None
            if group.process is not None and workload is None:
                key = ("process", group.process.identity)
            groups.setdefault(key, []).append(group)
            workloads[key] = workload
        result = [WorkloadGroup(workloads[key], tuple(items)) for key, items in groups.items()]
        result.sort(key=lambda g: (g.processes[0].process is None, -g.count, -(g.oldest_idle_ms or 0)))
        return result
