"""Build ``closewait.pyz``: closewait and its pure-Python dependencies in one file (stdlib ``zipapp``).

    python tools/build_pyz.py WHEEL OUTPUT

``WHEEL`` is closewait's freshly built wheel (``./dev dist`` builds it first). The dependencies
(click, rich with markdown-it-py, mdurl and pygments, prometheus_client) are copied from the
environment this script runs in, at exactly the versions the tests ran against: no download, so it
builds offline and the same way twice. Every file of the archive must be pure Python or data: a
compiled extension cannot be imported from a zip, and the build fails if one would be copied.

The archive runs with any Python 3.11+ on the host (``python3 closewait.pyz scan``, or
``./closewait.pyz scan`` through its ``#!/usr/bin/env python3`` line). closewait reads its own
non-Python files (the lab's server programs) through ``importlib.resources``, and copies the ones a
compiler or interpreter must open to the lab's temporary workdir, which the lab removes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import sys
import tempfile
import zipapp
import zipfile
from pathlib import Path, PurePosixPath

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

#: What runs when the archive is executed: the same entry point as the ``closewait`` console script.
MAIN = "from closewait._console import main\n\nmain()\n"
#: Files of an installed distribution that do not belong in the archive.
SKIP_PARTS = frozenset({"__pycache__"})
SKIP_SUFFIXES = (".pyc", ".pyo")
NATIVE_SUFFIXES = (".so", ".pyd", ".dylib")


def runtime_requirements(dist: importlib.metadata.Distribution) -> list[Requirement]:
    """The distribution's requirements without extras (``rich[jupyter]`` is not wanted)."""
    wanted = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            wanted.append(req)
    return wanted


def dependency_closure(wheel_requires: list[str]) -> list[importlib.metadata.Distribution]:
    """Every installed distribution the wheel needs at run time, recursively, each checked against
    the requirement that pulled it in."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [Requirement(text) for text in wheel_requires]
    todo = [r for r in todo if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        if key in found:
            continue
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            sys.exit(f"build_pyz: {req.name} is not installed in this environment ({sys.prefix})")
        if not req.specifier.contains(dist.version, prereleases=True):
            sys.exit(f"build_pyz: {req.name} {dist.version} does not satisfy {req}")
        found[key] = dist
        todo.extend(runtime_requirements(dist))
    return sorted(found.values(), key=lambda d: canonicalize_name(d.metadata["Name"]))


def copy_distribution(dist: importlib.metadata.Distribution, staging: Path) -> int:
    """Copy the distribution's importable files and its dist-info into ``staging``."""
    copied = 0
    for file in dist.files or []:
        relative = PurePosixPath(str(file))
        if relative.parts[0] == ".." or SKIP_PARTS.intersection(relative.parts) or relative.suffix in SKIP_SUFFIXES:
            continue  # console scripts (../../bin/...) and byte code
        if relative.suffix in NATIVE_SUFFIXES:
            sys.exit(f"build_pyz: {dist.metadata['Name']} has a compiled extension ({relative}): not zip-importable")
        source = Path(str(dist.locate_file(file)))
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied += 1
    return copied


def build(wheel: Path, output: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="closewait-pyz-") as tmp:
        staging = Path(tmp) / "app"
        staging.mkdir()
        # A pure-Python wheel is a zip laid out as site-packages: unpacking it is installing it.
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(staging)
        (metadata_path,) = staging.glob("*.dist-info/METADATA")
        dist = importlib.metadata.PathDistribution(metadata_path.parent)
        for dep in dependency_closure(list(dist.requires or [])):
            copy_distribution(dep, staging)
        for native in (p for p in staging.rglob("*") if p.suffix in NATIVE_SUFFIXES):
            sys.exit(f"build_pyz: {native.relative_to(staging)} is a compiled extension: not zip-importable")
        (staging / "__main__.py").write_text(MAIN)
        output.parent.mkdir(parents=True, exist_ok=True)
        zipapp.create_archive(staging, output, interpreter="/usr/bin/env python3", compressed=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="closewait's wheel")
    parser.add_argument("output", type=Path, help="where to write the archive (e.g. dist/closewait.pyz)")
    args = parser.parse_args()
    build(args.wheel, args.output)
    print(f"{args.output} ({args.output.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
