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

#: typing.TYPE_CHECKING without importing typing (and the ~15 ms of modules it pulls in); mypy
#: recognises the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    # The public API, each name once. ``name as name`` marks a re-export: for mypy (--strict has no
    # implicit re-exports) and for _public_names() below, which reads these lines at run time.
    from closewait.diagnosis import diagnose as diagnose
    from closewait.diagnosis import role_of as role_of
    from closewait.errors import AccessDenied as AccessDenied
    from closewait.errors import ClosewaitError as ClosewaitError
    from closewait.errors import KernelDataError as KernelDataError
    from closewait.errors import NetlinkError as NetlinkError
    from closewait.errors import NetnsError as NetnsError
    from closewait.errors import NoSuchProcess as NoSuchProcess
    from closewait.errors import NotSupported as NotSupported
    from closewait.errors import UsageError as UsageError
    from closewait.model import ALL_STATES as ALL_STATES
    from closewait.model import TEARDOWN_STATES as TEARDOWN_STATES
    from closewait.model import Diagnosis as Diagnosis
    from closewait.model import Endpoint as Endpoint
    from closewait.model import Family as Family
    from closewait.model import Finding as Finding
    from closewait.model import Owner as Owner
    from closewait.model import Process as Process
    from closewait.model import ProcessGroup as ProcessGroup
    from closewait.model import Role as Role
    from closewait.model import Snapshot as Snapshot
    from closewait.model import Socket as Socket
    from closewait.model import TcpInfo as TcpInfo
    from closewait.model import TcpState as TcpState
    from closewait.model import parse_states as parse_states
    from closewait.scanning import CLOSE_WAIT_ONLY as CLOSE_WAIT_ONLY
    from closewait.scanning import scan as scan

__version__ = "0.1.0"

# The public names are imported on first use (PEP 562), not here: ``import closewait._console``
# runs this file first, and the console's ``scan --json`` starts reading the kernel before it
# imports the model (see closewait.sources.prefetch). ``__all__`` and the table behind it are made
# on the first lookup too (``from closewait import diagnosis`` in scan.py is one: the import
# system asks the package for the name before importing the submodule).
_exports: dict[str, str] | None = None


def _public_names() -> dict[str, str]:
    """Each public name -> the module that defines it: the ``from M import N as N`` lines of the
    ``if TYPE_CHECKING:`` block above, read from this file.

    Lines, not ``ast``: ast is not imported on the console's fast path, and these lines have one
    shape (ruff's isort writes each ``as`` import on its own line); tests/test_public_api.py checks
    that this reads what ``ast`` reads.
    """
    global _exports
    if _exports is None:
        _exports = {}
        try:
            with open(__file__, encoding="utf-8") as handle:
                source = handle.read()
        except OSError:  # run from closewait.pyz: __file__ is a path inside the archive
            source = __spec__.loader.get_source(__name__) or ""  # type: ignore[union-attr]
        lines = iter(source.splitlines())
        for line in lines:
            if line.startswith("if TYPE_CHECKING:"):
                break
        for line in lines:
            if line.strip() and not line.startswith(" "):
                break  # the end of the block
            match line.split():
                case ["from", module, "import", name, "as", alias] if alias == name:
                    _exports[name] = module
    return _exports


def __getattr__(name: str) -> Any:
    if name == "__all__":
        value: Any = sorted([*_public_names(), "__version__"])
    else:
        module = _public_names().get(name)
        if module is None:
            raise AttributeError(f"module 'closewait' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_public_names(), "__all__"})
