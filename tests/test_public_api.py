"""``closewait``'s public API: listed once (the ``name as name`` imports of its TYPE_CHECKING block),
imported on first use, and the same names whichever way they are asked for: ``__all__``, ``dir()``,
attribute lookup and ``from closewait import *``.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import closewait


def test_all_dir_and_lookups_agree() -> None:
    public = set(closewait._public_names())
    assert public  # the TYPE_CHECKING block was read
    assert set(closewait.__all__) == public | {"__version__"}
    assert closewait.__all__ == sorted(closewait.__all__)
    assert set(closewait.__all__) <= set(dir(closewait))
    for name, module in closewait._public_names().items():
        assert getattr(closewait, name) is getattr(importlib.import_module(module), name)
    namespace: dict[str, object] = {}
    exec("from closewait import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(closewait.__all__)


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="no attribute 'make_socket'"):
        _ = closewait.make_socket
    assert not hasattr(closewait, "Layout")


def test_import_is_lazy_and_scan_stays_the_function() -> None:
    """``import closewait`` (and its ``__all__``) imports none of the modules behind the names:
    the console's fast path imports the package before it starts the kernel's dump."""
    program = """
import sys
from pathlib import Path
import closewait
behind = ("closewait.model", "closewait.scanning", "closewait.errors", "closewait.diagnosis", "closewait.sources")
assert not [m for m in behind if m in sys.modules], sorted(sys.modules)
assert "scan" in closewait.__all__ and "scan" in dir(closewait)
assert not [m for m in behind if m in sys.modules], sorted(sys.modules)
assert "ast" not in sys.modules  # not on the console's fast path
import closewait.scanning
assert callable(closewait.scan) and closewait.scan.__module__ == "closewait.scanning"
assert closewait.Snapshot is sys.modules["closewait.model"].Snapshot
"""
    subprocess.run([sys.executable, "-c", program], check=True)


def test_the_names_are_read_as_ast_reads_them() -> None:
    """``_public_names`` reads lines; the thorough reading of the same block must agree (a
    parenthesised or comma-separated re-export would be seen by mypy and missed at run time)."""
    tree = ast.parse(Path(closewait.__file__).read_text(encoding="utf-8"))
    (block,) = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
    ]
    reexports = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.asname == alias.name
    }
    assert closewait._public_names() == reexports
    imports = [node for node in block.body if isinstance(node, ast.ImportFrom) and node.module != "typing"]
    assert all(alias.asname == alias.name for node in imports for alias in node.names)
