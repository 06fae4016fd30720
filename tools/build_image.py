"""Build closewait's container image (``deploy/Containerfile``) with podman, from Debian's packages and
this checkout only: no container registry is asked for anything.

    python tools/build_image.py [--tag closewait:0.1.0] [--base localhost/closewait-base:bookworm]
                                [--rebuild-base] [--mirror URL]

1. **The base** (``--base``, kept in podman's storage and reused while it exists): a Debian bookworm
   root file system with python3 and python3-venv, made by ``mmdebstrap --variant=apt`` from a Debian
   mirror (the one apt uses here, ``deb.debian.org`` by default) and piped into ``podman import``.
   Manual pages, info pages, translations and documentation other than the copyright files are left
   out (``--dpkgopt=path-exclude``, as Debian's own slim images do). About 30 s and 125 MB.
2. **The wheels**: closewait's wheel, built from this checkout (``python -m build --wheel
   --no-isolation``, as ``./dev dist``), and one wheel per run-time dependency, repacked from the
   environment this script runs in (the same pure-Python files at exactly the versions the tests ran
   against, as ``tools/build_pyz.py`` copies them): offline and the same way twice.
3. ``podman build --network none --pull=never --layers=false -f deploy/Containerfile`` with those
   wheels as the context, tagged ``--tag``, with the OCI labels for version, revision and date.

Prints the image's tag, size and the time each step took.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packaging.utils import canonicalize_name

from build_pyz import SKIP_PARTS, SKIP_SUFFIXES, dependency_closure

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
DEFAULT_BASE = "localhost/closewait-base:bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
#: What the base holds beyond Debian's essential packages and apt.
BASE_PACKAGES = ("python3", "python3-venv")
#: dpkg filters for the base: no manual, info or translation files; of /usr/share/doc only copyrights.
DPKG_FILTERS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
#: dist-info files the installer wrote, not the wheel.
INSTALLER_FILES = frozenset({"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"})


def log(message: str) -> None:
    print(f"build_image: {message}", file=sys.stderr, flush=True)


def podman(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], check=check, text=True, capture_output=capture)


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def build_base(name: str, mirror: str) -> None:
    """mmdebstrap a bookworm root file system and import it into podman as ``name``."""
    if shutil.which("mmdebstrap") is None:
        sys.exit("build_image: mmdebstrap is not installed (apt-get install mmdebstrap; ./dev image does)")
    security = mirror.removesuffix("/debian") + "/debian-security" if mirror.endswith("/debian") else None
    sources = [f"deb {mirror} {SUITE} main", f"deb {mirror} {SUITE}-updates main"]
    if security is not None:
        sources.append(f"deb {security} {SUITE}-security main")
    argv = [
        "mmdebstrap",
        "--quiet",
        "--variant=apt",
        f"--include={','.join(BASE_PACKAGES)}",
        # merged /usr without the usrmerge package (and the perl it pulls in), as Debian's images are
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        *(f"--dpkgopt={option}" for option in DPKG_FILTERS),
        SUITE,
        "-",
        *sources,
    ]
    changes = [
        'CMD ["/bin/bash"]',
        f"LABEL org.opencontainers.image.description=Debian {SUITE} with python3 and python3-venv, made by mmdebstrap",
        f"LABEL org.opencontainers.image.source={mirror}",
    ]
    # mmdebstrap's hooks talk on stderr even with --quiet: kept, and shown only if it fails.
    with (
        tempfile.TemporaryFile(mode="w+") as messages,
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=messages) as strap,
    ):
        imported = subprocess.run(
            ["podman", "import", "--quiet", *(f"--change={c}" for c in changes), "-", name],
            stdin=strap.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
        strap.wait()
        messages.seek(0)
        if strap.returncode != 0:
            podman("rmi", "--force", name, check=False)
            sys.exit(f"build_image: mmdebstrap failed (exit {strap.returncode}):\n{messages.read()}")
    if imported.returncode != 0:
        sys.exit(f"build_image: podman import failed: {imported.stderr.strip()}")


def build_closewait_wheel(outdir: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(outdir), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"build_image: building the wheel failed:\n{done.stdout}{done.stderr}")
    (wheel,) = outdir.glob("closewait-*.whl")
    return wheel


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def repack(dist: importlib.metadata.Distribution, outdir: Path) -> Path:
    """Write an installed pure-Python distribution back as a wheel (its files, its dist-info, a new RECORD)."""
    name, version = dist.metadata["Name"], dist.version
    wheel_meta = dist.read_text("WHEEL") or ""
    if "Root-Is-Purelib: true" not in wheel_meta:
        sys.exit(f"build_image: {name} is not a pure-Python distribution; cannot repack it")
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    pythons = sorted({tag.split("-")[0] for tag in tags}) or ["py3"]
    escaped = canonicalize_name(name).replace("-", "_")
    target = outdir / f"{escaped}-{version}-{'.'.join(pythons)}-none-any.whl"
    records: list[str] = []
    dist_info: str | None = None
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(dist.files or [], key=str):
            relative = PurePosixPath(str(file))
            if relative.parts[0] == ".." or SKIP_PARTS.intersection(relative.parts) or relative.suffix in SKIP_SUFFIXES:
                continue  # console scripts (the installer makes them again from entry_points.txt) and byte code
            if relative.parts[0].endswith(".dist-info"):
                dist_info = relative.parts[0]
                if relative.name in INSTALLER_FILES:
                    continue
            data = Path(str(dist.locate_file(file))).read_bytes()
            archive.writestr(str(relative), data)
            records.append(f"{relative},{_record_hash(data)},{len(data)}")
        if dist_info is None:
            sys.exit(f"build_image: {name} has no dist-info in its file list")
        records.append(f"{dist_info}/RECORD,,")
        archive.writestr(f"{dist_info}/RECORD", "\n".join(records) + "\n")
    return target


def _drop_if_untagged(image_id: str) -> None:
    """Remove the image the tag named before this build, if the build took its only name (no dangling images)."""
    if not image_id:
        return
    names = podman("image", "inspect", "--format", "{{len .RepoTags}}", image_id, check=False).stdout.strip()
    if names == "0":
        podman("rmi", image_id, check=False)


def git_revision() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def build(tag: str | None, base: str, *, rebuild_base: bool, mirror: str) -> str:
    """Build the image; returns its tag (``closewait:VERSION`` unless ``tag`` is given)."""
    if shutil.which("podman") is None:
        sys.exit("build_image: podman is not installed (apt-get install podman; ./dev image does)")
    started = time.monotonic()
    if rebuild_base or not image_exists(base):
        log(f"making the base {base} from Debian {SUITE} ({mirror}) with mmdebstrap")
        previous = podman("image", "inspect", "--format", "{{.Id}}", base, check=False).stdout.strip()
        build_base(base, mirror)
        _drop_if_untagged(previous)
        log(f"base {base} made in {time.monotonic() - started:.1f} s")
    else:
        log(f"reusing the base {base} (--rebuild-base to make it again)")
    with tempfile.TemporaryDirectory(prefix="closewait-image-") as tmp:
        wheels = Path(tmp) / "wheels"
        wheels.mkdir()
        step = time.monotonic()
        wheel = build_closewait_wheel(wheels)
        with zipfile.ZipFile(wheel) as archive:
            (meta_name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
            unpacked = Path(tmp) / "meta"
            archive.extract(meta_name, unpacked)
        metadata = importlib.metadata.PathDistribution(unpacked / PurePosixPath(meta_name).parent)
        version, requires = metadata.version, list(metadata.requires or [])
        shutil.rmtree(unpacked)
        for dep in dependency_closure(requires):
            repack(dep, wheels)
        log(f"wheels in {time.monotonic() - step:.1f} s: {' '.join(sorted(p.name for p in wheels.iterdir()))}")
        step = time.monotonic()
        tag = tag or f"closewait:{version}"
        created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        argv = [
            "build",
            "--network=none",
            "--pull=never",
            "--layers=false",
            f"--file={CONTAINERFILE}",
            f"--build-arg=BASE={base}",
            f"--build-arg=VERSION={version}",
            f"--build-arg=REVISION={git_revision()}",
            f"--build-arg=CREATED={created}",
            f"--tag={tag}",
            tmp,
        ]
        previous = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False).stdout.strip()
        done = podman(*argv, check=False)
        if done.returncode != 0:
            sys.exit(f"build_image: podman build failed:\n{done.stdout}{done.stderr}")
        _drop_if_untagged(previous)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
    log(f"podman build in {time.monotonic() - step:.1f} s")
    print(f"{tag} ({size / 1e6:.0f} MB) built in {time.monotonic() - started:.1f} s")
    return tag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default=None, help="the image's name (default closewait:VERSION)")
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"the base image (default {DEFAULT_BASE})")
    parser.add_argument("--rebuild-base", action="store_true", help="make the base again even if it exists")
    parser.add_argument(
        "--mirror",
        default=os.environ.get("CLOSEWAIT_DEBIAN_MIRROR", DEFAULT_MIRROR),
        help=f"the Debian mirror for the base (default $CLOSEWAIT_DEBIAN_MIRROR or {DEFAULT_MIRROR})",
    )
    args = parser.parse_args()
    build(args.tag, args.base, rebuild_base=args.rebuild_base, mirror=args.mirror)


if __name__ == "__main__":
    main()
