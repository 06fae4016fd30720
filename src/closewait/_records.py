"""Fast constructors for the records a scan builds per socket: ``Endpoint``, ``TcpInfo``, ``Socket``,
``Diagnosis``, ``Age`` and ``Finding``.

A frozen dataclass's ``__init__`` stores each field through ``object.__setattr__`` (a generic
attribute lookup per field). Each ``make_*`` here fills the slots through the class's member
descriptors instead, about twice as fast, and returns the very object ``Class(...)`` returns:
equal, same hash, same repr, still frozen. The netlink parser and ``scan()`` build thousands of
records per scan with them (see "scan --json on a big host" in docs/design.md).

The rules that keep them honest:

- Each takes exactly the class's fields, in declaration order, with the same types and no
  defaults, so mypy checks every call and a call that misses a field fails.
- Nothing runs that ``__init__`` would run and these skip: the classes have no ``__post_init__``
  and no field needs a default factory. tests/scanperf/test_fast_model.py checks that each
  constructor's parameters are its class's fields, so a field added to a class fails that test
  until it is added here.
- Only sources and the scan's per-socket loop use them; everything else writes ``Class(...)``.
"""

from __future__ import annotations

from collections.abc import Callable

from closewait.model import Age, AgeSource, Diagnosis, Endpoint, Family, Finding, Owner, Role, Socket, TcpInfo, TcpState

_new = object.__new__


def _setter(cls: type, field: str) -> Callable[[object, object], None]:
    """The ``__set__`` of ``cls``'s slot ``field``: stores a value without the frozen check."""
    member_descriptor = cls.__dict__[field]
    setter: Callable[[object, object], None] = member_descriptor.__set__
    return setter


_endpoint_address = _setter(Endpoint, "address")
_endpoint_port = _setter(Endpoint, "port")


def make_endpoint(address: str, port: int) -> Endpoint:
    """``Endpoint(address, port)``, faster."""
    self = _new(Endpoint)
    _endpoint_address(self, address)
    _endpoint_port(self, port)
    return self


_tcp_info_state = _setter(TcpInfo, "state")
_tcp_info_retransmits = _setter(TcpInfo, "retransmits")
_tcp_info_probes = _setter(TcpInfo, "probes")
_tcp_info_backoff = _setter(TcpInfo, "backoff")
_tcp_info_rto_us = _setter(TcpInfo, "rto_us")
_tcp_info_last_data_sent_ms = _setter(TcpInfo, "last_data_sent_ms")
_tcp_info_last_ack_recv_ms = _setter(TcpInfo, "last_ack_recv_ms")
_tcp_info_last_data_recv_ms = _setter(TcpInfo, "last_data_recv_ms")
_tcp_info_rtt_us = _setter(TcpInfo, "rtt_us")
_tcp_info_unacked = _setter(TcpInfo, "unacked")
_tcp_info_total_retrans = _setter(TcpInfo, "total_retrans")
_tcp_info_bytes_acked = _setter(TcpInfo, "bytes_acked")
_tcp_info_bytes_received = _setter(TcpInfo, "bytes_received")


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
    self = _new(TcpInfo)
    _tcp_info_state(self, state)
    _tcp_info_retransmits(self, retransmits)
    _tcp_info_probes(self, probes)
    _tcp_info_backoff(self, backoff)
    _tcp_info_rto_us(self, rto_us)
    _tcp_info_last_data_sent_ms(self, last_data_sent_ms)
    _tcp_info_last_ack_recv_ms(self, last_ack_recv_ms)
    _tcp_info_last_data_recv_ms(self, last_data_recv_ms)
    _tcp_info_rtt_us(self, rtt_us)
    _tcp_info_unacked(self, unacked)
    _tcp_info_total_retrans(self, total_retrans)
    _tcp_info_bytes_acked(self, bytes_acked)
    _tcp_info_bytes_received(self, bytes_received)
    return self


_socket_state = _setter(Socket, "state")
_socket_family = _setter(Socket, "family")
_socket_local = _setter(Socket, "local")
_socket_remote = _setter(Socket, "remote")
_socket_inode = _setter(Socket, "inode")
_socket_uid = _setter(Socket, "uid")
_socket_recv_q = _setter(Socket, "recv_q")
_socket_send_q = _setter(Socket, "send_q")
_socket_cookie = _setter(Socket, "cookie")
_socket_tcp_info = _setter(Socket, "tcp_info")
_socket_source = _setter(Socket, "source")


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
    self = _new(Socket)
    _socket_state(self, state)
    _socket_family(self, family)
    _socket_local(self, local)
    _socket_remote(self, remote)
    _socket_inode(self, inode)
    _socket_uid(self, uid)
    _socket_recv_q(self, recv_q)
    _socket_send_q(self, send_q)
    _socket_cookie(self, cookie)
    _socket_tcp_info(self, tcp_info)
    _socket_source(self, source)
    return self


_diagnosis_code = _setter(Diagnosis, "code")
_diagnosis_summary = _setter(Diagnosis, "summary")
_diagnosis_remedy = _setter(Diagnosis, "remedy")


def make_diagnosis(code: str, summary: str, remedy: str) -> Diagnosis:
    """``Diagnosis(code, summary, remedy)``, faster."""
    self = _new(Diagnosis)
    _diagnosis_code(self, code)
    _diagnosis_summary(self, summary)
    _diagnosis_remedy(self, remedy)
    return self


_finding_socket = _setter(Finding, "socket")
_finding_owners = _setter(Finding, "owners")
_finding_role = _setter(Finding, "role")
_finding_diagnosis = _setter(Finding, "diagnosis")
_finding_age = _setter(Finding, "age")


def make_finding(
    socket: Socket, owners: tuple[Owner, ...], role: Role, diagnosis: Diagnosis | None, age: Age | None
) -> Finding:
    """``Finding(socket, owners, role, diagnosis, age)``, faster."""
    self = _new(Finding)
    _finding_socket(self, socket)
    _finding_owners(self, owners)
    _finding_role(self, role)
    _finding_diagnosis(self, diagnosis)
    _finding_age(self, age)
    return self


_age_since = _setter(Age, "since")
_age_ms = _setter(Age, "ms")
_age_source = _setter(Age, "source")


def make_age(since: float, ms: int, source: AgeSource) -> Age:
    """``Age(since, ms, source)``, faster."""
    self = _new(Age)
    _age_since(self, since)
    _age_ms(self, ms)
    _age_source(self, source)
    return self
