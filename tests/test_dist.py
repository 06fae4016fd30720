"""``./dev dist``'s artefacts: the wheel and sdist carry py.typed and LICENSE, and ``closewait.pyz``
runs with the host's Python from an empty directory, with a clean environment and no network.

The artefacts are built once per session the way ``./dev dist`` builds them (``python -m build
--no-isolation``, then ``tools/build_pyz.py``) into pytest's tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import closewait

ROOT = Path(__file__).resolve().parent.parent
#: What a host without a venv has: no PYTHONPATH, no venv on PATH, no HOME, a plain locale.
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path
    pyz: Path


def _host_python() -> str:
    """A Python >= 3.11 that is not this venv's: the system's python3, else the venv's base."""
    candidates = [shutil.which("python3", path="/usr/bin:/bin"), getattr(sys, "_base_executable", None)]
    for python in candidates:
        if python and os.path.exists(python) and not python.startswith(sys.prefix + os.sep):
            version = subprocess.run(
                [python, "-I", "-c", "import sys; print(sys.version_info >= (3, 11))"],
                capture_output=True,
                text=True,
                check=False,
                env=CLEAN_ENV,
            )
            if version.stdout.strip() == "True":
                return python
    pytest.skip("no Python >= 3.11 outside the venv")


def _no_network_prefix() -> list[str]:
    """``unshare --net --`` where it works (root): the command then has only a down loopback."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "--net", "--", "true"], capture_output=True, check=False)
    return ["unshare", "--net", "--"] if probe.returncode == 0 else []


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    pytest.importorskip("build")
    pytest.importorskip("hatchling")
    pytest.importorskip("packaging")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("closewait-*.whl")
    (sdist,) = out.glob("closewait-*.tar.gz")
    pyz = out / "closewait.pyz"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_pyz.py"), str(wheel), str(pyz)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return Dist(wheel, sdist, pyz)


@pytest.fixture
def empty_dir() -> Iterator[Path]:
    """An empty working directory with only the archive's copy in it: nothing importable around."""
    with tempfile.TemporaryDirectory(prefix="closewait-dist-") as tmp:
        yield Path(tmp)


def _run_pyz(
    dist: Dist, cwd: Path, *args: str, prefix: list[str] | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    pyz = cwd / "closewait.pyz"
    if not pyz.exists():
        shutil.copy(dist.pyz, pyz)
    return subprocess.run(
        [*(prefix or []), _host_python(), "-I", str(pyz), *args],
        cwd=cwd,
        env={**CLEAN_ENV, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_wheel_and_sdist_carry_py_typed_and_license(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        names = wheel.namelist()
    assert "closewait/py.typed" in names
    assert "closewait/lab/servers/article_server.c" in names
    (license_file,) = [n for n in names if n.endswith("dist-info/licenses/LICENSE")]
    with zipfile.ZipFile(dist.wheel) as wheel:
        assert "MIT License" in wheel.read(license_file).decode()
    with tarfile.open(dist.sdist) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert {"LICENSE", "src/closewait/py.typed", "src/closewait/lab/servers/article_server.c"} <= members


def test_pyz_holds_closewait_and_pure_python_dependencies(dist: Dist) -> None:
    with zipfile.ZipFile(dist.pyz) as pyz:
        names = pyz.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    packages = {"closewait", "click", "rich", "markdown_it", "mdurl", "pygments", "prometheus_client"}
    assert {"__main__.py", *packages} <= tops
    assert not [n for n in names if n.endswith((".so", ".pyc"))]


def test_pyz_runs_isolated_from_an_empty_directory_without_network(dist: Dist, empty_dir: Path) -> None:
    offline = _no_network_prefix()

    version = _run_pyz(dist, empty_dir, "--version", prefix=offline)
    assert (version.returncode, version.stdout.strip(), version.stderr) == (
        0,
        f"closewait, version {closewait.__version__}",
        "",
    )

    as_json = _run_pyz(dist, empty_dir, "scan", "--json", prefix=offline)
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert document["errors"] == []
    assert document["state_counts"] == {"CLOSE_WAIT": len(document["sockets"])}
    if offline:  # a fresh network namespace: nothing in it
        assert document["sockets"] == []

    table = _run_pyz(dist, empty_dir, "scan", prefix=offline)
    assert table.returncode == 0, table.stderr
    if offline:
        assert table.stdout.strip() == "no sockets in CLOSE_WAIT"

    check = _run_pyz(dist, empty_dir, "check", "-w", "1", "-c", "2", prefix=offline)
    if offline:
        assert check.returncode == 0, check.stderr
        assert check.stdout.startswith("CLOSEWAIT OK - 0 sockets in CLOSE_WAIT |")
    else:
        assert check.returncode in (0, 1, 2), check.stderr
        assert check.stdout.startswith("CLOSEWAIT ")
    # Nothing was written beside the archive (no extracted files, no byte code).
    assert sorted(p.name for p in empty_dir.iterdir()) == ["closewait.pyz"]


def test_pyz_scan_finds_a_real_close_wait_socket(dist: Dist, empty_dir: Path) -> None:
    """In this network namespace: the archive's scan sees the socket this test leaks, and its owner."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        with conn:
            client.close()
            result = _run_pyz(dist, empty_dir, "scan", "--json", "--port", str(port))
    assert result.returncode == 0, result.stderr
    (sock,) = json.loads(result.stdout)["sockets"]
    assert sock["state"] == "CLOSE_WAIT"
    assert sock["local"]["port"] == port
    assert os.getpid() in [o["pid"] for o in sock["owners"]]


@pytest.mark.slow
def test_pyz_lab_builds_the_article_server_from_inside_the_zip(dist: Dist, empty_dir: Path) -> None:
    """The lab's C program and Python servers are package data: copied out of the archive into the
    lab's workdir, which the lab removes."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    lab_tmp = empty_dir / "tmp"
    lab_tmp.mkdir()
    result = _run_pyz(dist, empty_dir, "lab", "reproduce", "--no-capture", "--json", env={"TMPDIR": str(lab_tmp)})
    assert result.returncode == 0, result.stderr
    experiments = {e["id"]: e for e in json.loads(result.stdout)["experiments"]}
    assert {i: e["status"] for i, e in experiments.items()} == {"reproduce": "ok", "reproduce-c": "ok"}
    assert list(lab_tmp.iterdir()) == []  # the workdir with the copied programs and the binary is gone
