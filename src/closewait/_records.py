"""Fast constructors for the records a scan builds per socket: ``Endpoint``, ``TcpInfo``, ``Socket``,
``Owner``, ``Diagnosis``, ``Age`` and ``Finding``.

A frozen dataclass's ``__init__`` stores each field through ``object.__setattr__`` (a generic
attribute lookup per field): ~1.2 us for a ``TcpInfo``. Each ``make_*`` here fills a draft
instead, an instance of a plain class with the very same ``__slots__`` (so each store is the
interpreter's specialised slot store, a few ns), and then makes it an instance of the real class
by assigning its ``__class__``: ~0.25 us for the same ``TcpInfo`` (``bench/bench_records.py``).
CPython allows that assignment only between classes of the same memory layout (same slots, same
base) and refuses it with TypeError otherwise, so a draft that went out of step with its class
fails loudly on first use. What comes back is the very object ``Class(...)`` returns: equal, same
hash, same repr, still frozen. The netlink parser and ``scan()`` build thousands of records per
scan with them (see "scan --json on a big host" in docs/design.md).

The rules that keep them honest:

- Each takes exactly the class's fields, in declaration order, with the same types and no
  defaults, so mypy checks every call and a call that misses a field fails.
- Nothing runs that ``__init__`` would run and these skip: the classes have no ``__post_init__``
  and no field needs a default factory. tests/scanperf/test_fast_model.py checks that each
  constructor's parameters are its class's fields and that each fills every slot, so a field
  added to a class fails that test until it is added here.
- Only sources and the scan's per-socket loop use them; everything else writes ``Class(...)``.
"""

from __future__ import annotations

from closewait.model import (
    Age,
    AgeSource,
    Diagnosis,
    Endpoint,
    Family,
    Finding,
    Owner,
    Process,
    Role,
    Socket,
    TcpInfo,
    TcpState,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from typing import Any

_new = object.__new__


def _draft(cls: type) -> Any:
    """A plain class with ``cls``'s slots: its instances take stores, and become ``cls``'s by
    ``__class__`` assignment. Typed Any: mypy cannot follow a class made from another's slots; the
    constructors' parameters are what it checks."""
    return type(f"_{cls.__name__}Draft", (), {"__slots__": vars(cls)["__slots__"]})


_EndpointDraft = _draft(Endpoint)


def make_endpoint(address: str, port: int) -> Endpoint:
    """``Endpoint(address, port)``, faster."""
    self = _new(_EndpointDraft)
    self.address = address
    self.port = port
    self.__class__ = Endpoint
    made: Endpoint = self
    return made


_TcpInfoDraft = _draft(TcpInfo)


def make_tcp_info(
    state: int,
    retransmits: int,
    probes: int,
    backoff: int,
    rto_us: int,
    last_data_sent_ms: int,
    last_ack_recv_ms: int,
    last_data_recv_ms: int,
    rtt_us: int,
    unacked: int,
    total_retrans: int,
    bytes_acked: int | None,
    bytes_received: int | None,
) -> TcpInfo:
    """``TcpInfo(...)`` with every field given, faster."""
    self = _new(_TcpInfoDraft)
    self.state = state
    self.retransmits = retransmits
    self.probes = probes
    self.backoff = backoff
    self.rto_us = rto_us
    self.last_data_sent_ms = last_data_sent_ms
    self.last_ack_recv_ms = last_ack_recv_ms
    self.last_data_recv_ms = last_data_recv_ms
    self.rtt_us = rtt_us
    self.unacked = unacked
    self.total_retrans = total_retrans
    self.bytes_acked = bytes_acked
    self.bytes_received = bytes_received
    self.__class__ = TcpInfo
    made: TcpInfo = self
    return made


_SocketDraft = _draft(Socket)


def make_socket(
    state: TcpState,
    family: Family,
    local: Endpoint,
    remote: Endpoint,
    inode: int,
    uid: int,
    recv_q: int,
    send_q: int,
    cookie: int | None,
    tcp_info: TcpInfo | None,
    source: str,
) -> Socket:
    """``Socket(...)`` with every field given, faster."""
    self = _new(_SocketDraft)
    self.state = state
    self.family = family
    self.local = local
    self.remote = remote
    self.inode = inode
    self.uid = uid
    self.recv_q = recv_q
    self.send_q = send_q
    self.cookie = cookie
    self.tcp_info = tcp_info
    self.source = source
    self.__class__ = Socket
    made: Socket = self
    return made


_OwnerDraft = _draft(Owner)


def make_owner(process: Process, fd: int) -> Owner:
    """``Owner(process, fd)``, faster."""
    self = _new(_OwnerDraft)
    self.process = process
    self.fd = fd
    self.__class__ = Owner
    made: Owner = self
    return made


_DiagnosisDraft = _draft(Diagnosis)


def make_diagnosis(code: str, summary: str, remedy: str) -> Diagnosis:
    """``Diagnosis(code, summary, remedy)``, faster."""
    self = _new(_DiagnosisDraft)
    self.code = code
    self.summary = summary
    self.remedy = remedy
    self.__class__ = Diagnosis
    made: Diagnosis = self
    return made


_FindingDraft = _draft(Finding)


def make_finding(
    socket: Socket, owners: tuple[Owner, ...], role: Role, diagnosis: Diagnosis | None, age: Age | None
) -> Finding:
    """``Finding(socket, owners, role, diagnosis, age)``, faster."""
    self = _new(_FindingDraft)
    self.socket = socket
    self.owners = owners
    self.role = role
    self.diagnosis = diagnosis
    self.age = age
    self.__class__ = Finding
    made: Finding = self
    return made


_AgeDraft = _draft(Age)


def make_age(since: float, ms: int, source: AgeSource) -> Age:
    """``Age(since, ms, source)``, faster."""
    self = _new(_AgeDraft)
    self.since = since
    self.ms = ms
    self.source = source
    self.__class__ = Age
    made: Age = self
    return made
