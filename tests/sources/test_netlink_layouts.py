"""The netlink struct layouts, declared field by field, against the kernel's own numbers.

Sizes and offsets are those of ``sizeof``/``offsetof`` on the uapi headers (linux/netlink.h,
inet_diag.h, tcp.h); the parser's Structs are derived from the declarations, and must read the same
bytes the hand-packed formats they replaced read. The last test checks the tcp_info declaration on
the kernel's own bytes: getsockopt(TCP_INFO) of a real connection.
"""

from __future__ import annotations

import socket
import struct

import pytest

from closewait.sources import netlink
from closewait.sources.netlink import (
    INET_DIAG_MSG,
    INET_DIAG_REQ,
    INET_DIAG_REQ_V2,
    INET_DIAG_SOCKID,
    NLMSGERR,
    NLMSGHDR,
    RTATTR,
    TCP_INFO,
    Layout,
)
from tests.util import wait_for


def test_sizes_are_the_kernels() -> None:
    assert NLMSGHDR.size == 16
    assert NLMSGERR.size == 20
    assert RTATTR.size == 4
    assert INET_DIAG_SOCKID.size == 48
    assert INET_DIAG_REQ_V2.size == 56
    assert INET_DIAG_REQ.size == 60
    assert INET_DIAG_MSG.size == 72
    assert TCP_INFO.size == 136  # up to tcpi_bytes_received, the last field closewait reads


@pytest.mark.parametrize(
    ("layout", "field", "offset"),
    [
        (INET_DIAG_MSG, "idiag_state", 1),
        (INET_DIAG_MSG, "idiag_sport", 4),
        (INET_DIAG_MSG, "idiag_src", 8),
        (INET_DIAG_MSG, "idiag_if", 40),
        (INET_DIAG_MSG, "idiag_cookie", 44),
        (INET_DIAG_MSG, "idiag_inode", 68),
        (INET_DIAG_REQ, "idiag_states", 52),
        (INET_DIAG_REQ_V2, "idiag_states", 4),
        (TCP_INFO, "tcpi_rto", 8),
        (TCP_INFO, "tcpi_unacked", 24),
        (TCP_INFO, "tcpi_last_data_sent", 44),
        (TCP_INFO, "tcpi_last_data_recv", 52),
        (TCP_INFO, "tcpi_last_ack_recv", 56),
        (TCP_INFO, "tcpi_rtt", 68),
        (TCP_INFO, "tcpi_total_retrans", 100),
        (TCP_INFO, "tcpi_bytes_acked", 120),
        (TCP_INFO, "tcpi_bytes_received", 128),
    ],
)
def test_offsets_are_the_kernels(layout: Layout, field: str, offset: int) -> None:
    assert layout.offset(field) == offset


def test_derived_parsers_read_what_the_hand_packed_formats_read() -> None:
    """The formats the parser used before its structs were declared field by field."""
    data = bytes(range(256))[: TCP_INFO.size]
    assert netlink._TCP_INFO_SHORT.unpack_from(data) == struct.unpack_from("=Bx3B3xI12xI16xI4x2I8xI28xI", data)
    assert netlink._TCP_INFO_LONG.unpack_from(data) == struct.unpack_from("=Bx3B3xI12xI16xI4x2I8xI28xI16x2Q", data)
    msg = bytes(range(INET_DIAG_MSG.size))
    assert INET_DIAG_MSG.struct.unpack_from(msg) == struct.unpack_from("=BBBBBBBB16s16sI2IIIIII", msg)


def test_picking_wants_fields_in_declaration_order() -> None:
    assert RTATTR.picking("rta_type").format == "=2xH"
    with pytest.raises(KeyError):
        RTATTR.picking("rta_type", "rta_len")
    with pytest.raises(KeyError):
        RTATTR.picking("rta_kind")


def test_pack_wants_every_field_by_name() -> None:
    assert RTATTR.pack(rta_len=5, rta_type=2) == struct.pack("=HH", 5, 2)
    with pytest.raises(KeyError):
        RTATTR.pack(rta_len=5)
    with pytest.raises(KeyError):
        RTATTR.pack(rta_len=5, rta_type=2, rta_kind=1)


def test_nlmsg_align() -> None:
    assert [netlink.nlmsg_align(n) for n in (0, 1, 4, 5, 8, 72, 73)] == [0, 4, 4, 8, 8, 72, 76]


def test_tcp_info_declaration_reads_the_kernels_bytes() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        client.sendall(b"x" * 1000)
        assert accepted.recv(1000)

        def acked() -> tuple[bytes, dict[str, int]] | None:
            raw = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO.size)
            names = [name for name, _ in TCP_INFO.fields]
            fields = dict(zip(names, TCP_INFO.struct.unpack_from(raw), strict=True))
            return (raw, fields) if fields["tcpi_bytes_acked"] >= 1000 else None

        raw, fields = wait_for(acked)
        assert fields["tcpi_state"] == 1  # TCP_ESTABLISHED
        assert fields["tcpi_bytes_acked"] in (1000, 1001)  # the SYN counts one on some kernels
        assert 0 < fields["tcpi_rtt"] < 1_000_000  # microseconds, on loopback
        info = netlink.parse_tcp_info(raw)
        assert (info.state, info.rtt_us, info.bytes_acked) == (1, fields["tcpi_rtt"], fields["tcpi_bytes_acked"])
    finally:
        for sock in (client, accepted, server):
            sock.close()
