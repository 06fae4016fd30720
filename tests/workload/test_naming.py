"""Every cgroup naming form the managers write, named from the path alone (pure, no kernel), and the
kubelet link names and pod lists that name a pod (sources/kubernetes.py's pure parsers)."""

from __future__ import annotations

import pytest

from closewait.sources.kubernetes import PodContainer, PodMeta, parse_container_log_name, parse_pod_list, with_pod
from closewait.workload import HOST, Workload, WorkloadSelector, pick_workload, with_container_name, workload_of_cgroup

CID = "3f2a" + "0123456789abcdef" * 3 + "0123456789ab"  # 64 hex
CID2 = "b" * 64
UID = "8c1e6b0a-4f4b-4b9e-9a43-6f5d0d7f2c11"
UID_ = UID.replace("-", "_")


def test_container_id_fixture_is_64_hex() -> None:
    assert len(CID) == 64
    assert int(CID, 16)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/system.slice/nginx.service", "nginx.service"),
        ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service"),
        ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service", "foo.service"),
        ("/user.slice/user-1000.slice/user@1000.service/init.scope", "init.scope"),
        ("/init.scope", "init.scope"),
        ("/machine.slice", "machine.slice"),
        ("/system.slice/nginx.service/worker", "nginx.service"),  # a service's own sub-cgroup (Delegate=)
    ],
)
def test_systemd_units(path: str, name: str) -> None:
    workload = workload_of_cgroup(path)
    assert (workload.kind, workload.name, workload.unit) == ("unit", name, name)
    assert workload.id == workload.cgroup == path


@pytest.mark.parametrize(
    ("path", "runtime", "monitor", "unit"),
    [
        (f"/machine.slice/libpod-{CID}.scope", "podman", False, None),
        (f"/machine.slice/libpod-{CID}.scope/container", "podman", False, None),  # systemd in the container
        (f"/machine.slice/libpod-conmon-{CID}.scope", "podman", True, None),
        (f"/libpod_parent/libpod-{CID}", "podman", False, None),  # cgroupfs manager
        (f"/system.slice/web.service/libpod-payload-{CID}", "podman", False, "web.service"),  # quadlet, split
        (f"/system.slice/docker-{CID}.scope", "docker", False, None),
        (f"/docker/{CID}", "docker", False, None),
        (f"/system.slice/cri-containerd-{CID}.scope", "containerd", False, None),
        (f"/machine.slice/crio-{CID}.scope", "cri-o", False, None),
        (f"/machine.slice/crio-conmon-{CID}.scope", "cri-o", True, None),
    ],
)
def test_containers(path: str, runtime: str, monitor: bool, unit: str | None) -> None:
    workload = workload_of_cgroup(path)
    assert workload == Workload("container", CID[:12], CID, runtime=runtime, unit=unit, cgroup=path, monitor=monitor)


@pytest.mark.parametrize(
    ("path", "qos", "container_id", "runtime"),
    [
        # kubelet, systemd driver (CgroupName.ToSystemd: "-" -> "_", expanded into nested slices)
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
            "burstable",
            CID,
            "containerd",
        ),
        (
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope",
            "besteffort",
            CID,
            "cri-o",
        ),
        (f"/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope", "guaranteed", CID, "docker"),
        (f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope", "guaranteed", CID, "cri-o"),
        # CRI-O on cgroup v2 puts the payload one level down
        (f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope/container", "guaranteed", CID, "cri-o"),
        # kubelet, cgroupfs driver
        (f"/kubepods/burstable/pod{UID}/{CID}", "burstable", CID, None),
        (f"/kubepods/besteffort/pod{UID}/{CID}", "besteffort", CID, None),
        (f"/kubepods/pod{UID}/{CID}", "guaranteed", CID, None),
        (f"/kubepods/burstable/pod{UID}/crio-{CID}", "burstable", CID, "cri-o"),
        # nested: kind nodes (kubelet --cgroup-root=/kubelet), docker-in-docker, cgroup namespaces
        (
            f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
            f"kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
            "burstable",
            CID,
            "containerd",
        ),
        (
            f"/system.slice/docker-{CID2}.scope/kubelet.slice/kubelet-kubepods.slice/"
            f"kubelet-kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
            "guaranteed",
            CID,
            "containerd",
        ),
        (f"/docker/{CID2}/kubepods/burstable/pod{UID}/{CID}", "burstable", CID, None),
        (f"/kubelet/kubepods/besteffort/pod{UID}/{CID}", "besteffort", CID, None),
        (f"/../../kubepods/pod{UID}/{CID}", "guaranteed", CID, None),
        # a process of the pod outside any container: the pod UID is the id
        (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice", "burstable", UID, None),
    ],
)
def test_kubernetes_pods(path: str, qos: str, container_id: str, runtime: str | None) -> None:
    workload = workload_of_cgroup(path)
    assert workload.kind == "pod"
    assert (workload.pod_uid, workload.qos, workload.id, workload.runtime) == (UID, qos, container_id, runtime)
    assert workload.name == f"pod{UID}"  # until kubelet's log links or the API server name it
    assert workload.monitor == ("conmon" in path)


def test_static_pod_uid_is_a_hash_without_dashes() -> None:
    uid = "2f8e4bd5a7e4c5dd14e3b2e1b5f5d1e6"
    assert workload_of_cgroup(f"/kubepods/burstable/pod{uid}/{CID}").pod_uid == uid
    assert workload_of_cgroup(f"/kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-{CID}.scope").pod_uid == uid


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "",
        "/process_api/bf2ff1130b93ff0f3047dbf6f8234206",
        f"/docker/{CID[:20]}",  # not a full id
        f"/somewhere/{CID}",  # a bare id means a container only under /docker or a pod
        "/kubepods",
        "/kubepods/burstable",
        f"/notkubepods/burstable/pod{UID}",
        "/-.slice",
    ],
)
def test_host(path: str) -> None:
    workload = workload_of_cgroup(path)
    assert workload.kind == "host"
    assert workload.name == "host"


def test_innermost_container_wins() -> None:
    assert workload_of_cgroup(f"/docker/{CID2}/docker/{CID}").id == CID
    assert workload_of_cgroup(f"/system.slice/docker-{CID2}.scope/system.slice/nginx.service").id == CID2


@pytest.mark.parametrize(
    ("lines", "expected_cgroup"),
    [
        # v2 only
        ([("", "/system.slice/nginx.service")], "/system.slice/nginx.service"),
        # hybrid: the unified line agrees with name=systemd; the container is in the v1 controllers only
        (
            [
                ("cpu", f"/docker/{CID}"),
                ("memory", f"/docker/{CID}"),
                ("name=systemd", "/system.slice/x.service"),
                ("", "/"),
            ],
            f"/docker/{CID}",
        ),
        # all lines name units: the v2 line is preferred, then name=systemd
        ([("memory", "/a.service"), ("name=systemd", "/b.service"), ("", "/c.service")], "/c.service"),
        ([("memory", "/a.service"), ("name=systemd", "/b.service"), ("", "/")], "/b.service"),
        # this host: memory:/process_api/<id>, everything else /
        ([("memory", "/process_api/x"), ("name=systemd", "/"), ("", "/")], "/"),
    ],
)
def test_pick_workload_prefers_the_most_specific_line(lines: list[tuple[str, str]], expected_cgroup: str) -> None:
    assert pick_workload(lines).cgroup == expected_cgroup


def test_pick_workload_of_nothing_is_unknown() -> None:
    assert pick_workload([]).kind == "unknown"


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        (
            f"api-7d9f8b6c5-x2x4z_payments_web-{CID}.log",
            PodContainer("payments", "api-7d9f8b6c5-x2x4z", "web", CID, UID),
        ),
        (  # container names may contain "-" and "_"-free namespaces are required
            f"coredns-5d78c9869d-abcde_kube-system_coredns-sidecar-{CID}.log",
            PodContainer("kube-system", "coredns-5d78c9869d-abcde", "coredns-sidecar", CID, UID),
        ),
        (f"pod.with.dots_ns_c-{CID}.log", PodContainer("ns", "pod.with.dots", "c", CID, UID)),
        ("kube-proxy.log", None),
        (f"Bad_ns_c-{CID}.log", None),  # pod names are lower case
        (f"p_ns_c-{CID[:63]}.log", None),
        (f"p_ns_c-{CID}.log.1", None),
    ],
)
def test_container_log_names(filename: str, expected: PodContainer | None) -> None:
    target = f"/var/log/pods/payments_api-7d9f8b6c5-x2x4z_{UID}/web/0.log"
    assert parse_container_log_name(filename, target) == expected


def test_container_log_name_without_a_link_has_no_uid() -> None:
    entry = parse_container_log_name(f"p_ns_c-{CID}.log", None)
    assert entry is not None
    assert entry.pod_uid is None


def _pod_list(*items: object) -> dict[str, object]:
    return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": list(items)}


def test_parse_pod_list() -> None:
    pods = parse_pod_list(
        _pod_list(
            {
                "metadata": {"name": "api-1", "namespace": "payments", "uid": UID, "labels": {"app": "api", "a": "b"}},
                "status": {"containerStatuses": [{"name": "web", "containerID": f"containerd://{CID}"}]},
            },
            {"metadata": {"name": "bare", "namespace": "default", "uid": "u2"}},
        )
    )
    assert pods[UID] == PodMeta(UID, "payments", "api-1", (("a", "b"), ("app", "api")), ((CID, "web"),))
    assert pods["u2"] == PodMeta("u2", "default", "bare")


@pytest.mark.parametrize(
    "document",
    [[], {"kind": "Status"}, {"kind": "PodList"}, _pod_list({"metadata": {"name": "x"}}), _pod_list("x")],
)
def test_parse_pod_list_refuses_garbage(document: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies with the garbage
        parse_pod_list(document)


def test_pod_names_from_log_link_and_api() -> None:
    path = f"/kubepods/burstable/pod{UID}/{CID}"
    bare = workload_of_cgroup(path)
    entry = PodContainer("payments", "api-1", "web", CID, UID)
    named = with_pod(bare, entry, None)
    assert (named.name, named.pod, named.namespace, named.container, named.labels) == (
        "api-1",
        "api-1",
        "payments",
        "web",
        (),
    )
    meta = PodMeta(UID, "payments", "api-1", (("app", "api"),), ((CID, "web"),))
    assert with_pod(named, entry, meta).labels == (("app", "api"),)
    # the API server alone names the container from the pod's status
    assert with_pod(bare, None, meta).container == "web"
    # another container's link names the pod, not this container
    sibling = PodContainer("payments", "api-1", "sidecar", CID2, UID)
    assert with_pod(bare, sibling, None).container is None
    assert with_pod(bare, None, None) == bare
    assert with_pod(HOST, entry, meta) == HOST


def test_container_name() -> None:
    bare = workload_of_cgroup(f"/docker/{CID}")
    assert with_container_name(bare, "web").as_dict() == {
        "kind": "container",
        "name": "web",
        "id": CID,
        "runtime": "docker",
        "container": "web",
        "cgroup": f"/docker/{CID}",
    }
    assert with_container_name(bare, None) == bare


def test_as_dict_of_the_host_and_of_a_pod() -> None:
    assert HOST.as_dict() == {"kind": "host", "name": "host", "id": ""}
    pod = with_pod(
        workload_of_cgroup(f"/kubepods/pod{UID}/{CID}"),
        PodContainer("ns", "p", "c", CID, UID),
        PodMeta(UID, "ns", "p", (("app", "x"),)),
    )
    assert pod.as_dict() == {
        "kind": "pod",
        "name": "p",
        "id": CID,
        "container": "c",
        "pod": "p",
        "namespace": "ns",
        "pod_uid": UID,
        "qos": "guaranteed",
        "cgroup": f"/kubepods/pod{UID}/{CID}",
        "labels": {"app": "x"},
    }


def test_selectors() -> None:
    pod = with_pod(workload_of_cgroup(f"/kubepods/pod{UID}/{CID}"), PodContainer("ns", "p", "c", CID, UID), None)
    container = with_container_name(workload_of_cgroup(f"/docker/{CID2}"), "web")
    unit = workload_of_cgroup("/system.slice/nginx.service")
    assert WorkloadSelector().empty
    assert WorkloadSelector.parse(pod="ns/p") == WorkloadSelector(pod="p", namespace="ns")
    cases = {
        WorkloadSelector(container="c"): (True, False, False),
        WorkloadSelector(container="web"): (False, True, False),
        WorkloadSelector(container=CID2[:12]): (False, True, False),
        WorkloadSelector(container="bbb"): (False, False, False),  # too short a prefix
        WorkloadSelector(pod="p"): (True, False, False),
        WorkloadSelector(pod=UID): (True, False, False),
        WorkloadSelector.parse(pod="ns/p"): (True, False, False),
        WorkloadSelector.parse(pod="other/p"): (False, False, False),
        WorkloadSelector(namespace="ns"): (True, False, False),
        WorkloadSelector(unit="nginx"): (False, False, True),
        WorkloadSelector(unit="nginx.service"): (False, False, True),
        WorkloadSelector(pod="p", container="c"): (True, False, False),
        WorkloadSelector(pod="p", container="web"): (False, False, False),
    }
    for selector, expected in cases.items():
        assert (selector.matches(pod), selector.matches(container), selector.matches(unit)) == expected, selector
    assert WorkloadSelector.parse(pod="ns/p", unit="u").describe() == "pod ns/p, unit u"


@pytest.mark.parametrize(
    "kwargs",
    [{"pod": "/p"}, {"pod": "ns/"}, {"pod": "a/b/c"}, {"pod": "a/p", "namespace": "b"}, {"container": ""}],
)
def test_bad_selectors(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        WorkloadSelector.parse(**kwargs)
