"""What a user asks ``closewait reap`` for, parsed once and matched against the model:
``--remote ADDR[:PORT]`` (``RemoteFilter``), ``--older-than DURATION`` (``parse_duration``; ``display.format_ms``
says it back) and the whole selection (``ReapCriteria``).

Each parser raises ``UsageError`` with the accepted forms, so a typo is one line, not a traceback.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from closewait.display import format_ms
from closewait.errors import UsageError
from closewait.model import Endpoint, Socket
from closewait.workload import WorkloadSelector

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")  # ASCII digits only, not \d
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
#: The longest duration accepted (ten years): anything longer is a typo, and 400 nines would be inf.
MAX_DURATION_MS = 3650 * 86_400_000


def parse_duration(text: str) -> int:
    """``30s``, ``5m``, ``1h``, ``500ms``, ``2d``, ``1m30s`` -> milliseconds, at most ``MAX_DURATION_MS``.

    Raises ``UsageError`` otherwise (the CLI's ``--older-than`` type calls this too).
    """
    value = text.strip().lower()
    parts = _DURATION_PART.findall(value)
    if not value or "".join(number + unit for number, unit in parts) != value:
        raise UsageError(f"bad duration {text!r}: use a number with a unit, like 500ms, 30s, 5m, 1h or 1m30s")
    total = sum(float(number) * _UNIT_MS[unit] for number, unit in parts)
    if not total <= MAX_DURATION_MS:  # also catches inf
        raise UsageError(f"duration {text[:40]!r} is too long (at most 3650d)")
    return round(total)


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
            if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) <= 65535:
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


@dataclass(frozen=True, slots=True)
class ReapCriteria:
    """Which sockets the user asked for. ``describe()`` is the phrase used in messages."""

    pids: frozenset[int] = frozenset()
    ports: frozenset[int] = frozenset()
    remote: RemoteFilter | None = None
    older_than_ms: int | None = None
    all_processes: bool = False
    #: ``--container``, ``--pod``, ``--namespace``, ``--unit``: only processes of these workloads.
    workload: WorkloadSelector | None = None

    @property
    def has_socket_filter(self) -> bool:
        return bool(self.ports) or self.remote is not None or self.older_than_ms is not None

    def validate(self) -> None:
        """Raise ``UsageError`` for a combination that could reap more than the user meant.

        A workload selection names whose sockets as --pid does (it only ever narrows): ``reap
        --container web`` plans every CLOSE_WAIT socket of that container's processes."""
        selected = self.workload is not None and not self.workload.empty
        if self.all_processes and self.pids:
            raise UsageError("give either --pid or --all, not both")
        if self.all_processes and not self.has_socket_filter and not selected:
            raise UsageError(
                "--all reaps every process's sockets: add --port, --remote or --older-than to narrow it, "
                "or a workload (--container, --pod, --namespace, --unit)"
            )
        if not self.all_processes and not self.pids and not selected:
            raise UsageError(
                "say whose sockets to reap: --pid PID, or --all with --port, --remote or --older-than, "
                "or a workload (--container, --pod, --namespace, --unit)"
            )
        for port in self.ports:
            if not 0 < port <= 65535:
                raise UsageError(f"port {port} is out of range (1-65535)")
        if self.older_than_ms is not None and self.older_than_ms < 0:
            raise UsageError("--older-than cannot be negative")

    def describe(self) -> str:
        parts = []
        if self.pids:
            parts.append("pid " + ", ".join(str(p) for p in sorted(self.pids)))
        if self.workload is not None and not self.workload.empty:
            parts.append(self.workload.describe())
        if not parts:
            parts.append("any process")
        if self.ports:
            parts.append("port " + ", ".join(str(p) for p in sorted(self.ports)))
        if self.remote is not None:
            parts.append(f"remote {self.remote.text}")
        if self.older_than_ms is not None:
            parts.append(f"idle over {format_ms(self.older_than_ms)}")
        return ", ".join(parts)

    def matches(self, sock: Socket, *, keep_unknown_age: bool = False) -> bool:
        """The socket filters (port, remote, age); the owner filter is applied by ``plan()``.

        A socket whose idle time is unknown (procfs) fails ``older_than_ms`` unless
        ``keep_unknown_age``, which ``plan()`` uses to list it as excluded instead of dropping it.
        """
        if self.ports and sock.local.port not in self.ports and sock.remote.port not in self.ports:
            return False
        if self.remote is not None and not self.remote.matches(sock.remote):
            return False
        if self.older_than_ms is None or (sock.idle_ms is None and keep_unknown_age):
            return True
        return (sock.idle_ms or 0) >= self.older_than_ms


__all__ = ["MAX_DURATION_MS", "ReapCriteria", "RemoteFilter", "parse_duration"]
