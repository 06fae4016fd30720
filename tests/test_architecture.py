"""The architecture rules import-linter cannot see: only ``closewait.sources`` reads the kernel.

import-linter (run by ``./dev test``, contracts in pyproject.toml) checks who imports whom: the
layers, and that ctypes, click, rich and prometheus_client stay in their rooms. Reading /proc or
/sys is not an import, so this test walks the syntax tree of every module outside sources/ and
fails on a call that opens, lists or reads a path under /proc or /sys.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "closewait"
#: Calls that read the file system (``open`` and the os/pathlib functions that touch a path).
READERS = frozenset({"open", "listdir", "scandir", "readlink", "stat", "lstat", "walk", "Path", "read_text", "exists"})
KERNEL_TREES = ("/proc", "/sys")


def _names_kernel_path(node: ast.AST) -> bool:
    """A string (or f-string) argument that starts with /proc or /sys, or with a ``proc_root``-like
    variable (the configurable /proc root every process reader takes)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.startswith(KERNEL_TREES)
    if isinstance(node, ast.JoinedStr) and node.values:
        return _names_kernel_path(node.values[0])
    if isinstance(node, ast.FormattedValue):
        return isinstance(node.value, ast.Name) and node.value.id.startswith("proc")
    return False


def _call_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def kernel_reads(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and _call_name(node) in READERS
            and node.args
            and _names_kernel_path(node.args[0])
        ):
            found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_only_sources_read_proc_and_sys() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "sources" in path.relative_to(PACKAGE).parts:
            continue
        offenders.extend(kernel_reads(path))
    assert offenders == [], "read /proc or /sys through closewait.sources:\n" + "\n".join(offenders)


def test_the_check_sees_a_kernel_read(tmp_path: Path) -> None:
    """The walker itself works: it flags the forms closewait's code uses, and not a docstring."""
    target = tmp_path / "sample.py"
    target.write_text(
        '"""Reads /proc/PID/fd."""\n'
        "import os\n"
        'open(f"/proc/{1}/stat")\n'
        'os.listdir("/proc")\n'
        'os.readlink(f"{proc_root}/self/fd/3")\n'
        'print("/proc")\n'
    )
    assert len(kernel_reads(target, root=tmp_path)) == 3


def _lint_imports(src: Path) -> subprocess.CompletedProcess[str]:
    """import-linter with the project's contracts over the package under ``src``."""
    lint = Path(sys.executable).with_name("lint-imports")
    env = dict(os.environ, PYTHONPATH=str(src))
    return subprocess.run(
        [str(lint), "--no-cache", str(PACKAGE.parents[1] / "pyproject.toml")],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("model.py", "import ctypes", "Only sources/ loads libc"),
        ("scanning.py", "import socket", "never open sockets"),
        ("diagnosis.py", "from closewait.scanning import scan", "Data flows one way"),
        ("sentinel.py", "from closewait import testing", "does not depend on the test helpers"),
        ("reap.py", "import rich", "rich only in cli/render"),
    ],
)
def test_the_contracts_fail_the_build(tmp_path: Path, module: str, line: str, contract: str) -> None:
    """The contracts in pyproject.toml are live: one forbidden import in a copy of the package
    makes import-linter fail, naming the contract; the untouched copy passes."""
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "closewait", ignore=shutil.ignore_patterns("__pycache__"))
    target = src / "closewait" / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{line}  # noqa\n", encoding="utf-8")
    broken = _lint_imports(src)
    assert broken.returncode != 0, broken.stdout
    assert contract in " ".join(broken.stdout.split()), broken.stdout
    target.write_text(target.read_text(encoding="utf-8").replace(f"\n{line}  # noqa\n", ""), encoding="utf-8")
    assert _lint_imports(src).returncode == 0
