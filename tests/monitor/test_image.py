"""The container image (deploy/Containerfile), built on this machine and run as the DaemonSet runs it.

The image is built once per session by ``tools/build_image.py`` (what ``./dev image`` runs) under a tag
of its own, removed afterwards. Its base, ``localhost/closewait-base:bookworm``, is made from Debian's
packages with mmdebstrap only when podman does not have it yet (about 30 s and 125 MB on this
machine, and it needs a Debian mirror); it is kept in podman's storage on purpose, as a cache, as
``./dev image`` keeps it. With the base cached the build takes about 10 s.

Then the exporter runs in that image under podman with the DaemonSet's privileges, read from
deploy/kubernetes/daemonset.yaml: the host's pid namespace (``hostPID``), uid 0 with every capability
dropped but the ones the DaemonSet adds, no new privileges, a read-only root with a tmpfs at
/run/closewait, and the DaemonSet's ``--all-netns``. Its network is the host's (``--network host``,
listening on 127.0.0.1 only) so the test can scrape it; the DaemonSet keeps a network namespace of its
own, which makes no difference to what it reads (every namespace is entered through /proc/PID/ns/net).
podman's metadata is mounted read-only where the exporter looks for it, as a user does on a podman
host (docs/monitoring.md). A leaking container with its own network namespace (``--network none``:
its server and its client both inside, over its loopback) must show up with its name.

How podman runs here (tests/workload/test_podman.py): runc, a cgroup parent under this test's own
cgroup (whose directories runc creates in every hierarchy and the test removes), ulimits under the
machine's hard limits. Everything the test starts is removed: containers, the test's tag, cgroups.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import closewait
from tests.util import wait_for
from tests.workload.realcg import _missing_ancestors, _remove_created, have, hierarchies, podman

pytestmark = [pytest.mark.root, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = ROOT / "deploy" / "kubernetes" / "daemonset.yaml"
BUILD_IMAGE = ROOT / "tools" / "build_image.py"
BASE = "localhost/closewait-base:bookworm"
#: podman options every container here needs (see the module docstring).
LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000")

#: Runs in the leaking container: three accepted connections whose clients closed, never read nor
#: closed (CLOSE_WAIT, not-reading, role server), all on the container's own loopback.
LEAKER = """
import signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
held = []
for _ in range(3):
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    client.close()
    held.append(conn)
print(server.getsockname()[1], flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="session")
def image() -> Iterator[str]:
    """The image, built from this checkout under a tag only this session uses."""
    if not (have("podman") and have("runc")) or sys.platform != "linux":
        pytest.skip("needs podman and runc (./dev test installs them)")
    if os.geteuid() != 0:
        pytest.skip("needs root (rootful podman)")
    if not have("mmdebstrap") and podman("image", "exists", BASE, check=False).returncode != 0:
        pytest.skip(f"needs mmdebstrap to make {BASE} (./dev test installs it)")
    tag = f"localhost/closewait-test:{uuid.uuid4().hex[:10]}"
    started = time.monotonic()
    built = subprocess.run(
        [sys.executable, str(BUILD_IMAGE), "--tag", tag, "--base", BASE],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    try:
        assert built.returncode == 0, built.stdout + built.stderr
        assert built.stdout.startswith(f"{tag} ("), built.stdout
        print(f"\n{built.stdout.strip()} (fixture: {time.monotonic() - started:.1f} s)", file=sys.stderr)
        yield tag
    finally:
        podman("rmi", "--force", tag, check=False)


def daemonset_privileges() -> tuple[list[str], list[str]]:
    """The capabilities the DaemonSet adds and the exporter arguments it gives, from the manifest."""
    text = DAEMONSET.read_text()
    assert re.search(r"^\s+runAsUser: 0$", text, re.MULTILINE)
    added = re.search(r"^\s+add: \[(.*)\]$", text, re.MULTILINE)
    assert added is not None
    capabilities = [c.strip().strip('"') for c in added.group(1).split(",")]
    args = re.findall(r"^\s+- (--[a-z-]+(?:=\S+)?)$", text, re.MULTILINE)
    return capabilities, args


def test_image_metadata(image: str) -> None:
    labels = podman("image", "inspect", "--format", "{{json .Labels}}", image).stdout
    for key, value in (
        ("org.opencontainers.image.title", "closewait"),
        ("org.opencontainers.image.version", closewait.__version__),
        ("org.opencontainers.image.licenses", "MIT"),
        ("org.opencontainers.image.base.name", BASE),
    ):
        assert f'"{key}":"{value}"' in labels, labels
    assert re.search(r'"org\.opencontainers\.image\.revision":"[0-9a-f]{40}"', labels), labels
    config = podman("image", "inspect", "--format", "{{.Config.User}} {{json .Config.Entrypoint}}", image).stdout
    assert config.strip() == '65532:65532 ["/opt/closewait/bin/closewait"]'
    # The default user is not root, and closewait runs with the image's own python3 (no pip left in it).
    run = podman(
        "--runtime", "runc", "run", "--rm", *LIMITS, "--network", "none", "--entrypoint", "sh", image,
        "-c", "id -u; closewait --version; test ! -e /opt/closewait/bin/pip && echo no-pip",
    )  # fmt: skip
    assert run.stdout.split("\n")[:3] == ["65532", f"closewait, version {closewait.__version__}", "no-pip"]


def test_exporter_in_the_image_labels_a_leaking_container_with_its_name(image: str, tmp_path: Path) -> None:
    capabilities, args = daemonset_privileges()
    assert "--all-netns" in args
    memory = hierarchies().get("memory") or hierarchies().get("unified")
    assert memory is not None
    parent = f"{memory.own.rstrip('/')}/closewait-test-{uuid.uuid4().hex[:10]}"
    created = _missing_ancestors(parent)
    suffix = uuid.uuid4().hex[:8]
    leaker, exporter = f"closewait-test-leaker-{suffix}", f"closewait-test-exporter-{suffix}"
    script = tmp_path / "leaker.py"
    script.write_text(LEAKER)
    script.chmod(0o644)  # the leaker runs as the image's user 65532
    common = ("--runtime", "runc", "run", "-d", f"--cgroup-parent={parent}", *LIMITS)
    try:
        podman(*common, "--name", leaker, "--network", "none", "-v", f"{script}:/x.py:ro",
               "--entrypoint", "python3", image, "/x.py")  # fmt: skip
        wait_for(lambda: podman("logs", leaker, check=False).stdout.strip() != "", timeout=30, interval=0.1)
        leaker_pid = int(podman("inspect", "--format", "{{.State.Pid}}", leaker).stdout)

        exporter_args = [a for a in args if not a.startswith(("--listen", "--min-interval"))]
        podman(
            *common, "--name", exporter,
            "--pid", "host", "--cgroupns", "host", "--network", "host",
            "--user", "0", "--cap-drop", "all", "--cap-add", ",".join(capabilities),
            "--security-opt", "no-new-privileges", "--read-only", "--read-only-tmpfs=false",
            "--tmpfs", "/run/closewait",
            # podman's metadata, where the exporter looks for container names (read-only)
            "-v", "/var/lib/containers/storage/libpod:/var/lib/containers/storage/libpod:ro",
            image, "exporter", *exporter_args, "--listen", "127.0.0.1:0", "--min-interval", "0",
        )  # fmt: skip

        def serving() -> str | None:
            logs = podman("logs", exporter)
            found = re.search(r"serving (http://127\.0\.0\.1:\d+/metrics)", logs.stdout + logs.stderr)
            return found.group(1) if found else None

        url = wait_for(serving, timeout=30, interval=0.1)
        # It runs with exactly the DaemonSet's privileges.
        exporter_pid = int(podman("inspect", "--format", "{{.State.Pid}}", exporter).stdout)
        lines = Path(f"/proc/{exporter_pid}/status").read_text().splitlines()
        status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
        assert status["Uid"].split()[0] == "0"
        assert int(status["CapEff"], 16) == sum(1 << CAPABILITY_BITS[c] for c in capabilities)
        assert status["NoNewPrivs"].strip() == "1"

        samples: list[tuple[str, dict[str, str], float]] = []

        def leak_rows() -> list[tuple[dict[str, str], float]] | None:
            text = requests.get(url, timeout=30).text
            samples[:] = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]
            rows = [
                (labels, value)
                for name, labels, value in samples
                if name == "closewait_close_wait_sockets" and labels.get("container") == leaker
            ]
            return rows or None

        ((labels, value),) = wait_for(leak_rows, timeout=60, interval=0.5)
        assert ("closewait_scan_success", {}, 1.0) in samples
        assert value == 3
        assert labels == {
            "netns": f"{leaker_pid}/python3",  # the leaker's own namespace, named by its only process
            "namespace": "",
            "pod": "",
            "container": leaker,
            "unit": "",
            "process": "python3",
            "role": "server",
            "diagnosis": "not-reading",
        }
    finally:
        podman("rm", "--force", "--time", "0", leaker, exporter, check=False)
        _remove_created(created)


#: Capability numbers (linux/capability.h) of the ones a DaemonSet may add here.
CAPABILITY_BITS = {"DAC_READ_SEARCH": 2, "SYS_PTRACE": 19, "SYS_ADMIN": 21, "BPF": 39, "PERFMON": 38}
