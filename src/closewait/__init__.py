"""closewait: find, explain, fix and prevent TCP connections stuck in CLOSE_WAIT on Linux.

The library under the ``closewait`` command. Data flows one way: the kernel (``closewait.sources``)
-> the model (``closewait.model``) -> diagnosis (``closewait.diagnosis``) -> views (the CLI, JSON,
Prometheus, HTML)::

    import closewait
    snapshot = closewait.scan()                      # CLOSE_WAIT sockets, owners, diagnoses
    for group in snapshot.by_process():
        print(group.process, group.count, group.diagnosis_counts())
"""

from __future__ import annotations

from closewait.diagnosis import diagnose, role_of
from closewait.errors import (
    AccessDenied,
    ClosewaitError,
    KernelDataError,
    NetlinkError,
    NetnsError,
    NoSuchProcess,
    NotSupported,
    UsageError,
)
from closewait.model import (
    ALL_STATES,
    TEARDOWN_STATES,
    Diagnosis,
    Endpoint,
    Family,
    Finding,
    Owner,
    Process,
    ProcessGroup,
    Role,
    Snapshot,
    Socket,
    TcpInfo,
    TcpState,
    parse_states,
)
from closewait.scan import CLOSE_WAIT_ONLY, scan

__version__ = "0.1.0"

__all__ = [
    "ALL_STATES",
    "CLOSE_WAIT_ONLY",
    "TEARDOWN_STATES",
    "AccessDenied",
    "ClosewaitError",
    "Diagnosis",
    "Endpoint",
    "Family",
    "Finding",
    "KernelDataError",
    "NetlinkError",
    "NetnsError",
    "NoSuchProcess",
    "NotSupported",
    "Owner",
    "Process",
    "ProcessGroup",
    "Role",
    "Snapshot",
    "Socket",
    "TcpInfo",
    "TcpState",
    "UsageError",
    "__version__",
    "diagnose",
    "parse_states",
    "role_of",
    "scan",
]
