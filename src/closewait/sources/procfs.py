"""TCP sockets from /proc/net/tcp and /proc/net/tcp6, for hosts where sock_diag is unavailable.

The files list every socket of the reading thread's network namespace; there is no state filter in
the kernel, so lines are filtered here by their ``st`` column before anything else is parsed. The
procfs backend has no tcp_info, so ``Socket.tcp_info`` (and idle time) is ``None``, and no socket
cookie. For a listening socket the kernel prints the accept backlog as rx_queue but 0 as tx_queue
(sock_diag gives the backlog *limit* there), so a listener's ``send_q`` is 0 from this backend.

Line format (net/ipv4/tcp_ipv4.c, get_tcp4_sock)::

    sl  local_address rem_address   st tx_queue:rx_queue tr:tm->when retrnsmt   uid  timeout inode ...
    0: 0100007F:3039 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 ...

Addresses are the kernel's 32-bit words printed in host byte order.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Iterable, Iterator

from closewait.errors import KernelDataError, NotSupported, from_os_error
from closewait.model import Endpoint, Family, Socket, TcpState

_WORD = struct.Struct("=I")
_FILES = {Family.IPV4: "tcp", Family.IPV6: "tcp6"}


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _hex(text: str) -> int:
    """A kernel hex field. Stricter than ``int(text, 16)``, which also takes signs, ``0x``, ``_``,
    spaces and non-ASCII digits that the kernel never prints (and a sign would reach struct.pack)."""
    if not text or not _HEX_DIGITS.issuperset(text):
        raise ValueError(f"{text!r} is not a hex number")
    return int(text, 16)


def _dec(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{text!r} is not a decimal number")
    return int(text)


def _address(hex_address: str, family: Family) -> str:
    words = len(hex_address) // 8
    expected = 1 if family == Family.IPV4 else 4
    if words != expected or len(hex_address) != words * 8:
        raise ValueError(f"address {hex_address!r} is not {expected * 8} hex digits")
    raw = b"".join(_WORD.pack(_hex(hex_address[i * 8 : i * 8 + 8])) for i in range(words))
    af = socket.AF_INET if family == Family.IPV4 else socket.AF_INET6
    return socket.inet_ntop(af, raw)


def _endpoint(text: str, family: Family) -> Endpoint:
    address, sep, port = text.partition(":")
    if not sep:
        raise ValueError(f"endpoint {text!r} has no port")
    port_number = _hex(port)
    if not 0 <= port_number <= 65535:
        raise ValueError(f"port {port_number} out of range")
    return Endpoint(_address(address, family), port_number)


def parse_line(line: str, family: Family) -> Socket:
    """Parse one data line of /proc/net/tcp{,6}. Raises ``KernelDataError`` if it is malformed."""
    fields = line.split()
    try:
        if len(fields) < 10 or not fields[0].endswith(":"):
            raise ValueError(f"expected at least 10 columns, got {len(fields)}")
        tx_queue, sep, rx_queue = fields[4].partition(":")
        if not sep:
            raise ValueError(f"queue column {fields[4]!r} is not tx:rx")
        state = TcpState(_hex(fields[3]))
        inode = _dec(fields[9])
        uid = _dec(fields[7])
        return Socket(
            state=state,
            family=family,
            local=_endpoint(fields[1], family),
            remote=_endpoint(fields[2], family),
            inode=inode,
            uid=uid,
            recv_q=_hex(rx_queue),
            send_q=_hex(tx_queue),
            source="procfs",
        )
    except ValueError as err:
        raise KernelDataError(f"malformed /proc/net/{_FILES[family]} line {line.strip()[:80]!r}: {err}") from None


def parse_table(text: str, family: Family, states: Iterable[TcpState] | None = None) -> Iterator[Socket]:
    """Parse a whole /proc/net/tcp{,6} text, keeping only ``states`` (all when None).

    The state column is checked on the raw text first so that the other lines cost one split.
    """
    wanted = None if states is None else {f"{int(s):02X}" for s in states}
    lines = text.splitlines()
    if not lines:
        return
    if not lines[0].lstrip().startswith("sl"):
        raise KernelDataError(f"/proc/net/{_FILES[family]} does not start with its header line")
    for line in lines[1:]:
        if not line.strip():
            continue
        if wanted is not None:
            fields = line.split(None, 4)
            if len(fields) < 4:
                raise KernelDataError(f"malformed /proc/net/{_FILES[family]} line {line.strip()[:80]!r}")
            if fields[3].upper() not in wanted:
                continue
        yield parse_line(line, family)


def read_table(family: Family, *, proc_net: str = "/proc/thread-self/net") -> str:
    """The text of /proc/net/tcp or tcp6 of the calling thread's network namespace ('' if absent)."""
    path = f"{proc_net}/{_FILES[family]}"
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        if family == Family.IPV6:
            return ""  # IPv6 disabled: no tcp6 table
        raise NotSupported(f"{path} does not exist: is /proc mounted?") from None
    except OSError as err:
        raise from_os_error(err, f"cannot read {path}") from err


def dump(
    states: Iterable[TcpState],
    families: Iterable[Family] = (Family.IPV4, Family.IPV6),
    *,
    proc_net: str | None = None,
) -> Iterator[Socket]:
    """Yield every TCP socket in ``states`` from /proc/net/tcp and tcp6."""
    if proc_net is None:
        proc_net = "/proc/thread-self/net" if sys.platform == "linux" else "/proc/net"
    states = frozenset(states)
    for family in families:
        yield from parse_table(read_table(family, proc_net=proc_net), family, states)
