"""Kubernetes names: kubelet's /var/log/containers links (written here as kubelet writes them, in a temp
directory) and pod labels from an API server.

The API server is a STAND-IN: a local HTTPS server (a self-signed certificate made by the test with
the ``openssl`` CLI) that serves ``GET /api/v1/pods?fieldSelector=spec.nodeName=...`` with Pod objects
in the real API's JSON shape (``PodList`` of ``v1.Pod``), checks the bearer token, and can be told to
be down, slow, trickling, failing or to answer garbage. No real cluster is involved.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from closewait.sources.attribution import WorkloadResolver
from closewait.sources.kubernetes import PodApi, PodLogIndex
from tests.workload.realcg import (
    CgroupTree,
    Leaker,
    have,
    hierarchies,
    start_leaker,
    usable,
    write_kubelet_log_links,
)

NODE = "node-1"
TOKEN = "test-token-1f2e3d"
UID = "6a1c0d3e-2b4f-4e8a-9c7d-5e6f7a8b9c0d"
CID = "c0ffee" + "0" * 58
SIDECAR_CID = "5eed" * 16


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pod_object(namespace: str, name: str, uid: str, labels: dict[str, str], containers: dict[str, str]) -> object:
    """A v1.Pod as the API server returns it (the fields a list call carries, abridged)."""
    return {
        "metadata": {
            "name": name,
            "generateName": name.rsplit("-", 1)[0] + "-",
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": "48213",
            "creationTimestamp": "2026-12-05T09:58:01Z",
            "labels": labels,
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": name.rsplit("-", 1)[0], "uid": "rs-uid"}
            ],
        },
        "spec": {
            "nodeName": NODE,
            "containers": [{"name": c, "image": f"registry.example/{c}:1"} for c in containers],
        },
        "status": {
            "phase": "Running",
            "qosClass": "Burstable",
            "podIP": "10.244.1.7",
            "containerStatuses": [
                {
                    "name": c,
                    "ready": True,
                    "restartCount": 0,
                    "image": f"registry.example/{c}:1",
                    "imageID": f"registry.example/{c}@sha256:" + "ab" * 32,
                    "containerID": f"containerd://{cid}",
                    "started": True,
                    "state": {"running": {"startedAt": "2026-12-05T09:58:03Z"}},
                }
                for c, cid in containers.items()
            ],
        },
    }


@dataclass
class StandIn:
    """The local HTTPS stand-in for the API server."""

    port: int
    ca_path: str
    token_path: str
    #: "ok", "garbage", "error", "slow" (no answer for 3 s), "trickle" (one byte every 0.2 s)
    mode: str = "ok"
    pods: list[object] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if not have("openssl"):
        pytest.skip("needs the openssl CLI to make a certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "apiserver.crt", directory / "apiserver.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.fixture
def api(tmp_path: Path, tls: tuple[str, str]) -> Iterator[StandIn]:
    cert, key = tls
    token_path = tmp_path / "token"
    token_path.write_text(TOKEN + "\n")
    state = StandIn(0, cert, str(token_path))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            state.requests.append(self.path)
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._send(401, b'{"kind":"Status","code":401}')
            elif state.mode == "slow":
                time.sleep(3)
                self._send(200, b"{}")
            elif state.mode == "error":
                self._send(500, b'{"kind":"Status","status":"Failure","code":500}')
            elif state.mode == "garbage":
                self._send(200, b"<html>not json</html>")
            elif state.mode == "trickle":
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.2)
            else:
                body = {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "48300"}}
                body["items"] = state.pods
                self._send(200, json.dumps(body).encode())

        def _send(self, status: int, body: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass  # the client gave up (timeout)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


def pod_api(state: StandIn, clock: FakeClock | None = None, **kwargs: object) -> PodApi:
    return PodApi(
        "127.0.0.1",
        state.port,
        token_path=state.token_path,
        ca_path=state.ca_path,
        node_name=NODE,
        clock=clock or FakeClock(),
        **kwargs,  # type: ignore[arg-type]
    )


# ---- kubelet's log links ---------------------------------------------------------------------


def test_log_index_reads_kubelet_links(tmp_path: Path) -> None:
    links = write_kubelet_log_links(tmp_path, "payments", "api-7d9f8b6c5-x2x4z", UID, {"web": CID})
    (links / "not-a-container.log").write_text("")
    index = PodLogIndex(str(links))
    entry = index.lookup(CID)
    assert entry is not None
    assert (entry.namespace, entry.pod, entry.container, entry.pod_uid) == (
        "payments",
        "api-7d9f8b6c5-x2x4z",
        "web",
        UID,
    )
    assert index.lookup_pod(UID) == entry


def test_log_index_lists_again_for_a_new_container_at_most_once_per_interval(tmp_path: Path) -> None:
    clock = FakeClock()
    links = write_kubelet_log_links(tmp_path, "ns", "p", UID, {"web": CID})
    index = PodLogIndex(str(links), min_refresh=2.0, clock=clock)
    assert index.lookup(CID) is not None
    write_kubelet_log_links(tmp_path, "ns", "p", UID, {"sidecar": SIDECAR_CID})
    assert index.lookup(SIDECAR_CID) is None  # listed a moment ago: not again
    assert index.lookup("f" * 64) is None
    assert index.listings == 1
    clock.now += 2.0
    assert index.lookup(SIDECAR_CID) is not None
    assert index.listings == 2


def test_log_index_without_the_directory(tmp_path: Path) -> None:
    assert PodLogIndex(str(tmp_path / "absent")).lookup(CID) is None


# ---- the API server stand-in ---------------------------------------------------------------


def test_pod_labels_from_the_api_server_one_list_per_interval(api: StandIn) -> None:
    api.pods = [pod_object("payments", "api-1", UID, {"app": "api", "tier": "web"}, {"web": CID})]
    clock = FakeClock()
    client = pod_api(api, clock, interval=30.0)
    for _ in range(50):
        meta = client.pod(UID)
        assert meta is not None
        assert meta.labels == (("app", "api"), ("tier", "web"))
        assert dict(meta.containers) == {CID: "web"}
    assert api.requests == [f"/api/v1/pods?fieldSelector=spec.nodeName={NODE}"]
    clock.now += 30.0
    client.pods()
    assert len(api.requests) == 2
    assert (client.requests, client.errors, client.last_error) == (2, 0, None)


@pytest.mark.parametrize("mode", ["down", "slow", "trickle", "garbage", "error", "bad-token", "wrong-ca"])
def test_an_api_server_failure_is_one_warning_and_a_counter(
    api: StandIn, tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    client = pod_api(api, clock, interval=10.0, timeout=0.5)
    if mode == "down":
        client.port = _closed_port()
    elif mode == "bad-token":
        Path(api.token_path).write_text("wrong")
    elif mode == "wrong-ca":
        other = tmp_path / "other-ca.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=other",
             "-keyout", str(tmp_path / "other.key"), "-out", str(other)],
            check=True,
            capture_output=True,
        )  # fmt: skip
        client.ca_path = str(other)
    else:
        api.mode = mode
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="closewait.sources.kubernetes"):
        assert client.pods() == {}
        clock.now += 10.0
        assert client.pods() == {}
    assert time.monotonic() - started < 4.0  # bounded by the timeout (0.5 s per call, plus TLS setup)
    assert client.errors == 2
    assert client.last_error
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "cannot list pods" in warnings[0].getMessage()


def test_the_last_good_list_is_kept_while_the_server_fails(api: StandIn, caplog: pytest.LogCaptureFixture) -> None:
    api.pods = [pod_object("ns", "p-1", UID, {"app": "x"}, {"web": CID})]
    clock = FakeClock()
    client = pod_api(api, clock, interval=10.0, timeout=0.5)
    assert UID in client.pods()
    api.mode = "garbage"
    clock.now += 10.0
    with caplog.at_level(logging.WARNING, logger="closewait.sources.kubernetes"):
        assert UID in client.pods()
        api.mode = "ok"
        clock.now += 10.0
        assert UID in client.pods()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "answers again" in messages[1]


def test_from_environment(tmp_path: Path) -> None:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443", "NODE_NAME": NODE}
    assert PodApi.from_environment(env, service_account_dir=str(sa)) is None  # no token mounted
    (sa / "token").write_text(TOKEN)
    (sa / "ca.crt").write_text("")
    client = PodApi.from_environment(env, service_account_dir=str(sa), interval=5.0)
    assert client is not None
    assert (client.host, client.port, client.node_name, client.interval) == ("10.96.0.1", 443, NODE, 5.0)
    assert client.token_path == str(sa / "token")
    assert PodApi.from_environment({}, service_account_dir=str(sa)) is None


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---- all of it on a real process in a real kubelet cgroup ------------------------------------


@pytest.fixture
def leaker() -> Iterator[Leaker]:
    if os.geteuid() != 0:
        pytest.skip("moving processes between cgroups needs root")
    leaker = start_leaker()
    yield leaker
    leaker.stop()


@pytest.mark.root
@pytest.mark.parametrize("driver", ["systemd", "cgroupfs"])
def test_a_leaking_pod_container_named_by_links_and_labelled_by_the_api(
    api: StandIn, tmp_path: Path, leaker: Leaker, driver: str
) -> None:
    import closewait

    unified = hierarchies().get("unified")
    if unified is None or not usable(unified):
        pytest.skip("no writable cgroup v2 hierarchy")
    layout = (
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
        f"cri-containerd-{CID}.scope"
        if driver == "systemd"
        else f"kubepods/burstable/pod{UID}/{CID}"
    )
    links = write_kubelet_log_links(
        tmp_path, "payments", "api-7d9f8b6c5-x2x4z", UID, {"web": CID, "proxy": SIDECAR_CID}
    )
    api.pods = [pod_object("payments", "api-7d9f8b6c5-x2x4z", UID, {"app": "api"}, {"web": CID, "proxy": SIDECAR_CID})]
    with CgroupTree(unified, layout) as tree:
        tree.move(leaker.pid)
        [finding] = closewait.scan(pids=[leaker.pid], ports=[leaker.port]).findings
        process = finding.owners[0].process

        by_links = WorkloadResolver(container_log_dir=str(links)).workload_of(process)
        assert by_links.as_dict() == {
            "kind": "pod",
            "name": "api-7d9f8b6c5-x2x4z",
            "id": CID,
            **({"runtime": "containerd"} if driver == "systemd" else {}),
            "container": "web",
            "pod": "api-7d9f8b6c5-x2x4z",
            "namespace": "payments",
            "pod_uid": UID,
            "qos": "burstable",
            "cgroup": tree.path,
        }
        resolver = WorkloadResolver(container_log_dir=str(links), pod_api=pod_api(api))
        labelled = resolver.workload_of(process)
        assert labelled.labels == (("app", "api"),)
        # the API server alone (no links) names pod, namespace and container too
        api_only = WorkloadResolver(container_log_dir=str(tmp_path / "none"), pod_api=pod_api(api))
        assert api_only.workload_of(process) == labelled
        # a down API server: names from the links, no labels, no exception
        down = pod_api(api, timeout=0.5)
        down.port = _closed_port()
        degraded = WorkloadResolver(container_log_dir=str(links), pod_api=down)
        assert degraded.workload_of(process) == by_links
        assert degraded.statistics().api_errors == 1


@pytest.mark.root
def test_the_exporter_labels_a_pod_from_the_links_and_counts_api_failures(
    api: StandIn, tmp_path: Path, leaker: Leaker
) -> None:
    """The exporter's collector, as it runs in a cluster: pod labels from the API server when it
    answers; when it is down, the series still carry pod, namespace and container from kubelet's
    links, and each failed call is counted as ``kind="kubernetes_api"`` (never a failed scrape)."""
    from prometheus_client import generate_latest

    from closewait.exporter import CloseWaitCollector, build_registry

    unified = hierarchies().get("unified")
    if unified is None or not usable(unified):
        pytest.skip("no writable cgroup v2 hierarchy")
    links = write_kubelet_log_links(tmp_path, "payments", "api-7d9f8b6c5-x2x4z", UID, {"web": CID})
    api.pods = [pod_object("payments", "api-7d9f8b6c5-x2x4z", UID, {"app": "api"}, {"web": CID})]
    with CgroupTree(unified, f"kubepods/burstable/pod{UID}/{CID}") as tree:
        tree.move(leaker.pid)
        for up in (True, False):
            client = pod_api(api, timeout=0.5)
            if not up:
                client.port = _closed_port()
            resolver = WorkloadResolver(container_log_dir=str(links), pod_api=client)
            collector = CloseWaitCollector(top_n=20, min_interval=0, resolver=resolver)
            text = generate_latest(build_registry(collector)).decode()
            series = [
                line
                for line in text.splitlines()
                if line.startswith("closewait_close_wait_sockets{") and 'pod="api-7d9f8b6c5-x2x4z"' in line
            ]
            assert series, text
            assert all('namespace="payments"' in line and 'container="web"' in line for line in series)
            api_errors = next(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith('closewait_scan_errors_total{kind="kubernetes_api"}')
            )
            assert api_errors == (0.0 if up else 1.0)
            assert "closewait_scan_success 1.0" in text
