"""The parsers against input the kernel cannot be made to produce: malformed, truncated, random.

The only exceptions allowed out of a parser are ``KernelDataError`` (and its ``NetlinkError``);
anything else (``struct.error``, ``IndexError``, ``UnicodeError``...) would reach the user as a
traceback. Well-formed synthetic lines and messages, built field by field with ``struct`` the way
the kernel lays them out, must round-trip exactly.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closewait.errors import KernelDataError, NetlinkError
from closewait.model import Endpoint, Family, TcpState
from closewait.sources import netlink, procfs

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- /proc/net/tcp ------------------------------------------------------------------------------

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def _hex_address(address: str, family: Family) -> str:
    """The kernel's text: each 32-bit word of the address printed with %08X in host byte order."""
    packed = ipaddress.ip_address(address).packed
    return "".join(f"{struct.unpack('=I', packed[i : i + 4])[0]:08X}" for i in range(0, len(packed), 4))


def proc_line(
    family: Family, local: Endpoint, remote: Endpoint, state: int, tx: int, rx: int, uid: int, inode: int
) -> str:
    return (
        f"   0: {_hex_address(local.address, family)}:{local.port:04X} "
        f"{_hex_address(remote.address, family)}:{remote.port:04X} {state:02X} {tx:08X}:{rx:08X} "
        f"00:00000000 00000000 {uid:5d}        0 {inode} 1 0000000000000000 20 4 30 10 -1"
    )


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda a: socket.inet_ntop(socket.AF_INET6, a.packed))
ports = st.integers(0, 65535)
u32 = st.integers(0, 2**32 - 1)


@st.composite
def sockets(draw: st.DrawFn) -> tuple[Family, Endpoint, Endpoint, TcpState, int, int, int, int]:
    family = draw(st.sampled_from(Family))
    addresses = ipv4 if family == Family.IPV4 else ipv6
    return (
        family,
        Endpoint(draw(addresses), draw(ports)),
        Endpoint(draw(addresses), draw(ports)),
        draw(st.sampled_from(TcpState)),
        draw(u32),
        draw(u32),
        draw(u32),
        draw(st.integers(0, 2**40)),
    )


@FUZZ
@given(sockets())
def test_procfs_line_round_trip(spec: tuple[Family, Endpoint, Endpoint, TcpState, int, int, int, int]) -> None:
    family, local, remote, state, tx, rx, uid, inode = spec
    line = proc_line(family, local, remote, state, tx, rx, uid, inode)
    sock = procfs.parse_line(line, family)
    assert (sock.family, sock.local, sock.remote, sock.state) == (family, local, remote, state)
    assert (sock.send_q, sock.recv_q, sock.uid, sock.inode) == (tx, rx, uid, inode)
    assert sock.source == "procfs"
    assert sock.tcp_info is None
    (again,) = procfs.parse_table(HEADER + line + "\n", family, [state])
    assert again == sock
    assert list(procfs.parse_table(HEADER + line + "\n", family, [s for s in TcpState if s != state])) == []


def _only_kernel_data_errors(call: object) -> None:
    assert callable(call)
    with contextlib.suppress(KernelDataError):
        call()


@FUZZ
@given(st.text(), st.sampled_from(Family))
def test_procfs_random_text(text: str, family: Family) -> None:
    _only_kernel_data_errors(lambda: procfs.parse_line(text, family))
    _only_kernel_data_errors(lambda: list(procfs.parse_table(text, family)))
    _only_kernel_data_errors(lambda: list(procfs.parse_table(HEADER + text, family, [TcpState.CLOSE_WAIT])))


#: Things a corrupted line might hold in a column: signs, prefixes, underscores, odd digits.
TOKENS = st.sampled_from(["-1", "+1", "0x1", "1_0", "٣", "", ":", "::", "FFFFFFFF:FFFF", "-0000001:0001", "08", " "])


@FUZZ
@given(sockets(), st.data())
def test_procfs_mutated_lines(
    spec: tuple[Family, Endpoint, Endpoint, TcpState, int, int, int, int], data: st.DataObject
) -> None:
    family = spec[0]
    fields = proc_line(*spec).split()
    index = data.draw(st.integers(0, len(fields) - 1))
    mutation = data.draw(st.one_of(TOKENS, st.text(max_size=12)))
    mode = data.draw(st.sampled_from(["replace", "truncate", "splice"]))
    if mode == "replace":
        fields[index] = mutation
    elif mode == "truncate":
        fields = fields[:index]
    else:
        fields[index] = fields[index][: len(fields[index]) // 2] + mutation
    line = " ".join(fields)
    _only_kernel_data_errors(lambda: procfs.parse_line(line, family))
    _only_kernel_data_errors(lambda: list(procfs.parse_table(HEADER + line, family, [spec[3]])))


def test_procfs_rejects_what_int_would_take() -> None:
    """int(x, 16) accepts signs, 0x and underscores; the kernel never prints them."""
    good = proc_line(Family.IPV4, Endpoint("127.0.0.1", 80), Endpoint("127.0.0.1", 9), 8, 0, 1, 0, 5)
    bad = [
        good.replace("0100007F:0050", "-100007F:0050"),
        good.replace("0100007F:0050", "0100007F:+050"),
        good.replace(" 08 ", " 0x8 "),
        good.replace("00000000:00000001", "00000000:0000_001"),
        good.replace(" 5 1 ", " -5 1 "),
    ]
    for line in bad:
        assert line != good
        with pytest.raises(KernelDataError):
            procfs.parse_line(line, Family.IPV4)


# --- netlink ------------------------------------------------------------------------------------

AF = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}


def tcp_info_bytes(values: dict[str, int], *, length: int = 232) -> bytes:
    """A struct tcp_info as the kernel lays it out, with the named fields set."""
    u8 = [
        values.get("state", 0),
        0,
        values.get("retransmits", 0),
        values.get("probes", 0),
        values.get("backoff", 0),
        0,
        0,
        0,
    ]
    u32 = [0] * 24
    for name, index in (
        ("rto_us", 0),
        ("unacked", 4),
        ("last_data_sent_ms", 9),
        ("last_data_recv_ms", 11),
        ("last_ack_recv_ms", 12),
        ("rtt_us", 15),
        ("total_retrans", 23),
    ):
        u32[index] = values.get(name, 0)
    head = struct.pack("=8B24I", *u8, *u32)
    tail = struct.pack("=QQQQ", 0, 0, values.get("bytes_acked", 0), values.get("bytes_received", 0))
    return (head + tail).ljust(length, b"\0")[:length]


def diag_msg(
    family: Family,
    state: int,
    local: Endpoint,
    remote: Endpoint,
    rqueue: int,
    wqueue: int,
    uid: int,
    inode: int,
    cookie: int,
    attrs: list[tuple[int, bytes]] = (),  # type: ignore[assignment]
) -> bytes:
    """struct inet_diag_msg (+ rtattrs) exactly as inet_diag.h lays it out."""
    af = AF[family]
    src = socket.inet_pton(af, local.address).ljust(16, b"\0")
    dst = socket.inet_pton(af, remote.address).ljust(16, b"\0")
    body = struct.pack("=BBBB", af, state, 0, 0)
    body += struct.pack(">HH", local.port, remote.port) + src + dst
    body += struct.pack("=I", 1) + struct.pack("=II", cookie & 0xFFFFFFFF, cookie >> 32)
    body += struct.pack("=IIIII", 0, rqueue, wqueue, uid, inode)
    for rta_type, payload in attrs:
        rta = struct.pack("=HH", 4 + len(payload), rta_type) + payload
        body += rta.ljust((len(rta) + 3) & ~3, b"\0")
    return body


def nlmsg(msg_type: int, payload: bytes, seq: int = 7, flags: int = 2) -> bytes:
    data = struct.pack("=IHHII", 16 + len(payload), msg_type, flags, seq, 0) + payload
    return data.ljust((len(data) + 3) & ~3, b"\0")


DONE = nlmsg(netlink.NLMSG_DONE, struct.pack("=i", 0))

tcp_info_values = st.fixed_dictionaries(
    {
        "state": st.integers(0, 255),
        "retransmits": st.integers(0, 255),
        "probes": st.integers(0, 255),
        "backoff": st.integers(0, 255),
        "rto_us": u32,
        "unacked": u32,
        "last_data_sent_ms": u32,
        "last_data_recv_ms": u32,
        "last_ack_recv_ms": u32,
        "rtt_us": u32,
        "total_retrans": u32,
        "bytes_acked": st.integers(0, 2**64 - 1),
        "bytes_received": st.integers(0, 2**64 - 1),
    }
)


@FUZZ
@given(sockets(), st.integers(0, 2**64 - 1), st.one_of(st.none(), tcp_info_values))
def test_diag_msg_round_trip(
    spec: tuple[Family, Endpoint, Endpoint, TcpState, int, int, int, int], cookie: int, info: dict[str, int] | None
) -> None:
    family, local, remote, state, wq, rq, uid, inode = spec
    inode &= 0xFFFFFFFF
    attrs = [(netlink.INET_DIAG_SHUTDOWN, b"\x01")]
    if info is not None:
        attrs.append((netlink.INET_DIAG_INFO, tcp_info_bytes(info)))
    payload = diag_msg(family, state, local, remote, rq, wq, uid, inode, cookie, attrs)
    sock = netlink.parse_diag_msg(memoryview(payload))
    assert (sock.family, sock.state, sock.local, sock.remote) == (family, state, local, remote)
    assert (sock.recv_q, sock.send_q, sock.uid, sock.inode, sock.cookie) == (rq, wq, uid, inode, cookie)
    assert sock.source == "netlink"
    if info is None:
        assert sock.tcp_info is None
    else:
        assert sock.tcp_info is not None
        for name, value in info.items():
            assert getattr(sock.tcp_info, name) == value, name
        # A listener has no peer: its idle time is None whatever tcp_info says.
        assert sock.idle_ms == (None if state == TcpState.LISTEN else info["last_ack_recv_ms"])
    # The same message inside a netlink stream, twice, then NLMSG_DONE.
    stream = nlmsg(netlink.SOCK_DIAG_BY_FAMILY, payload) * 2 + DONE
    parsed, done = netlink.parse_messages(stream, seq=7)
    assert done
    assert parsed == [sock, sock]
    # Messages for another request are skipped, not parsed.
    assert netlink.parse_messages(nlmsg(netlink.SOCK_DIAG_BY_FAMILY, payload, seq=8) + DONE, seq=7) == ([], True)


def test_tcp_info_older_shorter_struct() -> None:
    """Kernels before 4.1 end tcp_info before tcpi_bytes_acked: parsed, with those as None."""
    info = netlink.parse_tcp_info(tcp_info_bytes({"last_ack_recv_ms": 1234, "bytes_received": 9}, length=104))
    assert info.last_ack_recv_ms == 1234
    assert info.bytes_received is None
    with pytest.raises(NetlinkError, match="too short"):
        netlink.parse_tcp_info(b"\0" * 103)


def test_nlmsg_error_is_raised_with_errno() -> None:
    error = nlmsg(netlink.NLMSG_ERROR, struct.pack("=i", -13) + b"\0" * 16)
    with pytest.raises(NetlinkError, match="Permission denied") as caught:
        netlink.parse_messages(error, seq=7)
    assert caught.value.errno == 13
    assert netlink.parse_messages(nlmsg(netlink.NLMSG_ERROR, struct.pack("=i", 0)), seq=7) == ([], True)


def _only_netlink_errors(call: object) -> None:
    assert callable(call)
    with contextlib.suppress(NetlinkError):
        call()


@FUZZ
@given(st.binary(max_size=600))
def test_netlink_random_bytes(data: bytes) -> None:
    _only_netlink_errors(lambda: netlink.parse_messages(data))
    _only_netlink_errors(lambda: netlink.parse_messages(data, seq=7))
    _only_netlink_errors(lambda: netlink.parse_diag_msg(memoryview(data)))
    _only_netlink_errors(lambda: netlink.parse_tcp_info(data))


@FUZZ
@given(sockets(), tcp_info_values, st.data())
def test_netlink_truncated_and_corrupted_replies(
    spec: tuple[Family, Endpoint, Endpoint, TcpState, int, int, int, int], info: dict[str, int], data: st.DataObject
) -> None:
    family, local, remote, state, wq, rq, uid, inode = spec
    payload = diag_msg(family, state, local, remote, rq, wq, uid, inode & 0xFFFFFFFF, 1, [(2, tcp_info_bytes(info))])
    stream = bytearray(nlmsg(netlink.SOCK_DIAG_BY_FAMILY, payload) + DONE)
    # Cut anywhere: a truncated reply raises, it never yields a half-parsed socket.
    cut = data.draw(st.integers(1, len(stream) - 1))
    try:
        sockets_, done = netlink.parse_messages(bytes(stream[:cut]), seq=7)
    except NetlinkError:
        pass
    else:
        assert (not done and sockets_ == []) or sockets_ == [netlink.parse_diag_msg(memoryview(payload))]
    # Overwrite bytes anywhere (lengths, types, family, state, attribute headers).
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(stream) - 1))
        stream[position] = data.draw(st.integers(0, 255))
    _only_netlink_errors(lambda: netlink.parse_messages(bytes(stream), seq=7))
    _only_netlink_errors(lambda: netlink.parse_diag_msg(memoryview(bytes(stream[16:]))))


MARK = 15  # INET_DIAG_MARK
attribute_lists = st.lists(
    st.tuples(
        st.sampled_from(
            [netlink.INET_DIAG_SHUTDOWN, netlink.INET_DIAG_INFO, MARK, 21, 22]  # 21 CGROUP_ID, 22 SOCKOPT
        ),
        st.sampled_from([0, 1, 2, 4, 8, 104, 232, 280]),
    ),
    max_size=6,
)


def _outcome(payload: bytes) -> tuple[str, object]:
    try:
        return ("socket", netlink.parse_diag_msg(memoryview(payload)))
    except NetlinkError as err:
        return ("error", str(err))


def _layout_variants(attrs: list[tuple[int, int]], order: list[int], corruptions: list[tuple[int, int]]) -> list[bytes]:
    """One CLOSE_WAIT message with the attributes ``attrs`` (kind, size), then the same with them
    reordered by ``order``, with INET_DIAG_INFO's type changed, and with bytes after the
    inet_diag_msg overwritten by ``corruptions`` (offset, value): one attribute length, other headers."""
    info = tcp_info_bytes({"last_ack_recv_ms": 77, "rtt_us": 5, "bytes_received": 3}, length=280)
    local, remote = Endpoint("127.0.0.1", 80), Endpoint("127.0.0.2", 40000)

    def message(attributes: list[tuple[int, int]]) -> bytes:
        body = [(kind, info[:size] if kind == netlink.INET_DIAG_INFO else bytes(size)) for kind, size in attributes]
        return diag_msg(Family.IPV4, TcpState.CLOSE_WAIT, local, remote, 1, 0, 0, 9, 5, body)

    reordered = [attrs[i] for i in order if i < len(attrs)]
    retyped = [(MARK if kind == netlink.INET_DIAG_INFO else kind, size) for kind, size in attrs]
    messages = [message(attrs), message(reordered), message(retyped)]
    corrupted = bytearray(messages[0])
    for at, value in corruptions:
        if netlink._MSG_SIZE + at < len(corrupted):
            corrupted[netlink._MSG_SIZE + at] = value
    messages.append(bytes(corrupted))
    return messages


@FUZZ
@given(attribute_lists, st.permutations(range(6)), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255))))
def test_remembered_attribute_layouts_parse_as_the_walk(
    attrs: list[tuple[int, int]], order: list[int], corruptions: list[tuple[int, int]]
) -> None:
    """The parser remembers each attribute layout it walked, by length; a message whose attributes
    have that length but other headers (reordered, another type, corrupted bytes) must still come
    out as the walk alone makes it, error included."""
    messages = _layout_variants(attrs, order, corruptions)
    walked = []
    for payload in messages:
        netlink._ATTRIBUTE_LAYOUTS.clear()
        walked.append(_outcome(payload))
    netlink._ATTRIBUTE_LAYOUTS.clear()
    for _ in range(2):
        assert [_outcome(payload) for payload in messages] == walked


def _in_place(payload: bytes) -> tuple[str, object]:
    """What ``parse_messages`` makes of ``payload`` as one message of a dump (its inner loop)."""
    try:
        sockets_, _done = netlink.parse_messages(nlmsg(netlink.SOCK_DIAG_BY_FAMILY, payload), seq=7)
    except NetlinkError as err:
        return ("error", str(err))
    assert len(sockets_) == 1
    return ("socket", sockets_[0])


@FUZZ
@given(
    attribute_lists,
    st.permutations(range(6)),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255))),
    st.sampled_from([0, 1, 2, 3, 40]),
)
def test_messages_parsed_in_place_come_out_as_the_walk(
    attrs: list[tuple[int, int]], order: list[int], corruptions: list[tuple[int, int]], spot: int
) -> None:
    """``parse_messages`` writes ``_diag_msg_at`` out for messages of an attribute layout it has
    walked: after a message of that layout, one with the same length but other attributes, another
    family, state or bytes must come out exactly as ``parse_diag_msg`` alone makes it, error included.
    ``spot`` corrupts the inet_diag_msg itself (family, state, timer, retransmits, the interface)."""
    messages = _layout_variants(attrs, order, corruptions)
    first = messages[0]
    for value in (0, 3, 99, 255):
        header = bytearray(first)
        header[spot] = value
        messages.append(bytes(header))
    walked = []
    for payload in messages:
        netlink._ATTRIBUTE_LAYOUTS.clear()
        walked.append(_outcome(payload))
    for payload, expected in zip(messages, walked, strict=True):
        netlink._ATTRIBUTE_LAYOUTS.clear()
        _in_place(first)  # remembers first's layout (or fails as the walk does)
        assert _in_place(payload) == expected
    netlink._ATTRIBUTE_LAYOUTS.clear()
