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

import importlib
import sys
import types

#: typing.TYPE_CHECKING without importing typing (and the ~15 ms of modules it pulls in); mypy
#: recognises the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

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

# The public names are imported on first use (PEP 562), not here: ``import closewait._console``
# runs this file first, and the console's ``scan --json`` starts reading the kernel before it
# imports the model (see closewait.sources.prefetch). Each name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["diagnose", "role_of"], "closewait.diagnosis"),
    **dict.fromkeys(
        [
            "AccessDenied",
            "ClosewaitError",
            "KernelDataError",
            "NetlinkError",
            "NetnsError",
            "NoSuchProcess",
            "NotSupported",
            "UsageError",
        ],
        "closewait.errors",
    ),
    **dict.fromkeys(
        [
            "ALL_STATES",
            "TEARDOWN_STATES",
            "Diagnosis",
            "Endpoint",
            "Family",
            "Finding",
            "Owner",
            "Process",
            "ProcessGroup",
            "Role",
            "Snapshot",
            "Socket",
            "TcpInfo",
            "TcpState",
            "parse_states",
        ],
        "closewait.model",
    ),
    **dict.fromkeys(["CLOSE_WAIT_ONLY", "scan"], "closewait.scan"),
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'closewait' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """The ``closewait`` module: ``closewait.scan`` is the function, even once the submodule
    ``closewait.scan`` is imported (the import system binds a submodule on its package; with the
    eager imports this file used to have, the function was bound after it and won)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "scan" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

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
