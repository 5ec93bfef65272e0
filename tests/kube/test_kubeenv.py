"""Self-test of the real etcd + kube-apiserver environment (tests/kube/kubeenv.py).

    python3 -m pytest -q tests/kube/test_kubeenv.py

Needs `etcd` (Debian etcd-server) and a kube-apiserver binary (built and cached by
tests/kube/build-apiserver.sh on first use; see kubeenv.py for the env knobs).
"""

import ipaddress
import json
import os
import shutil
import ssl
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kubeenv  # noqa: E402
from kubeenv import KubeApiError, KubeEnv  # noqa: E402

NS = "tributary-selftest"
SVC = "web"
ES = "/apis/discovery.k8s.io/v1"


@pytest.fixture(scope="module")
def env():
    if not (os.environ.get("ETCD_BIN") or shutil.which("etcd")):
        pytest.skip("etcd not installed")
    with KubeEnv() as e:
        yield e
    # Processes are gone and the temp dir removed.
    assert e.apiserver_proc is None and e.etcd_proc is None and e.dir is None


def slice_body(name, address_type, addresses, *, ready=True):
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS,
                     "labels": {"kubernetes.io/service-name": SVC,
                                "endpointslice.kubernetes.io/managed-by": "tributary-test"}},
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": addresses, "conditions": {"ready": ready},
                       "zone": "az1", "nodeName": "node-1"}],
    }


def test_version_and_health(env):
    v = env.kubectl_json("GET", "/version")
    assert v["major"] == "1" and v["gitVersion"].startswith("v1.30."), v
    status, body = env.request("GET", "/readyz")
    assert (status, body) == (200, "ok")
    assert env.server.startswith("https://127.0.0.1:")
    # The kubeconfig is self-contained JSON(=YAML) with embedded certs.
    cfg = json.loads(Path(env.kubeconfig).read_text())
    assert cfg["clusters"][0]["cluster"]["server"] == env.server
    assert "client-key-data" in cfg["users"][0]["user"]


def test_anonymous_is_not_admin(env):
    # Without a client cert we are system:anonymous: RBAC denies listing namespaces.
    import http.client

    ctx = ssl.create_default_context(cafile=env.ca_file)
    c = http.client.HTTPSConnection("127.0.0.1", env.port, context=ctx, timeout=10)
    c.request("GET", "/api/v1/namespaces")
    r = c.getresponse()
    r.read()
    c.close()
    assert r.status in (401, 403)


def test_namespace_service_endpointslices_and_watch(env):
    # Namespace with the env label.
    env.kubectl_json("POST", "/api/v1/namespaces", {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NS, "labels": {"tributary.io/env": "prod"}}})
    ns = env.kubectl_json("GET", f"/api/v1/namespaces/{NS}")
    assert ns["metadata"]["labels"]["tributary.io/env"] == "prod"
    sel = env.kubectl_json("GET", "/api/v1/namespaces?labelSelector=tributary.io%2Fenv%3Dprod")
    assert [n["metadata"]["name"] for n in sel["items"]] == [NS]

    # Dual-stack ClusterIP Service, port 80 named http.
    env.kubectl_json("POST", f"/api/v1/namespaces/{NS}/services", {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": SVC, "namespace": NS},
        "spec": {"type": "ClusterIP", "selector": {"app": SVC},
                 "ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4", "IPv6"],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
    svc = env.kubectl_json("GET", f"/api/v1/namespaces/{NS}/services/{SVC}")
    assert svc["spec"]["ports"][0]["name"] == "http" and svc["spec"]["ports"][0]["port"] == 80
    assert ipaddress.ip_address(svc["spec"]["clusterIP"]) in ipaddress.ip_network(kubeenv.SERVICE_CIDR_V4)
    assert svc["spec"]["ipFamilies"] == ["IPv4", "IPv6"], svc["spec"]
    assert ":" in svc["spec"]["clusterIPs"][1]

    # EndpointSlices, written by hand (no controller-manager runs).
    env.kubectl_json("POST", f"{ES}/namespaces/{NS}/endpointslices",
                     slice_body(f"{SVC}-v4", "IPv4", ["10.1.0.5"]))
    env.kubectl_json("POST", f"{ES}/namespaces/{NS}/endpointslices",
                     slice_body(f"{SVC}-v6", "IPv6", ["fd00::1"]))

    v4 = env.kubectl_json("GET", f"{ES}/namespaces/{NS}/endpointslices/{SVC}-v4")
    assert v4["addressType"] == "IPv4"
    assert v4["endpoints"][0]["addresses"] == ["10.1.0.5"]
    assert v4["endpoints"][0]["conditions"]["ready"] is True
    assert v4["ports"][0] == {"name": "http", "port": 8080, "protocol": "TCP"}

    lst = env.kubectl_json(
        "GET", f"{ES}/namespaces/{NS}/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3D{SVC}")
    by_name = {s["metadata"]["name"]: s for s in lst["items"]}
    assert set(by_name) == {f"{SVC}-v4", f"{SVC}-v6"}
    assert by_name[f"{SVC}-v6"]["addressType"] == "IPv6"
    assert by_name[f"{SVC}-v6"]["endpoints"][0]["addresses"] == ["fd00::1"]
    rv = lst["metadata"]["resourceVersion"]

    # Invalid objects are rejected by real validation: an IPv6 address in an IPv4 slice,
    # and loopback addresses (127.0.0.0/8, ::1) in any slice.
    for bad_type, bad_addr in (("IPv4", "fd00::2"), ("IPv6", "::1"), ("IPv4", "127.0.0.1")):
        with pytest.raises(KubeApiError) as ei:
            env.kubectl_json("POST", f"{ES}/namespaces/{NS}/endpointslices",
                             slice_body("bad", bad_type, [bad_addr]))
        assert ei.value.status == 422, (bad_type, bad_addr)

    # Watch from the list's resourceVersion, then change the v4 slice: a MODIFIED event.
    with env.watch(f"{ES}/namespaces/{NS}/endpointslices", rv, timeout_seconds=60) as w:
        env.kubectl_json("PATCH", f"{ES}/namespaces/{NS}/endpointslices/{SVC}-v4",
                         {"endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": False}},
                                        {"addresses": ["10.1.0.6"], "conditions": {"ready": True}}]})
        ev = w.next_event(timeout=10)
        assert ev is not None and ev["type"] == "MODIFIED", ev
        obj = ev["object"]
        assert obj["metadata"]["name"] == f"{SVC}-v4"
        assert [(e["addresses"][0], e["conditions"]["ready"]) for e in obj["endpoints"]] == [
            ("10.1.0.5", False), ("10.1.0.6", True)]

        env.kubectl_json("DELETE", f"{ES}/namespaces/{NS}/endpointslices/{SVC}-v6")
        ev = w.next_event(timeout=10)
        assert ev["type"] == "DELETED" and ev["object"]["metadata"]["name"] == f"{SVC}-v6"

    # A cluster-wide watch with a label selector also works (what an agent would use).
    rv2 = env.kubectl_json("GET", f"{ES}/endpointslices?limit=1")["metadata"]["resourceVersion"]
    with env.watch(f"{ES}/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3D{SVC}", rv2) as w:
        env.kubectl_json("POST", f"{ES}/namespaces/{NS}/endpointslices",
                         slice_body(f"{SVC}-{uuid.uuid4().hex[:6]}", "IPv6", ["fd00::3"]))
        ev = w.next_event(timeout=10)
        assert ev["type"] == "ADDED" and ev["object"]["addressType"] == "IPv6"

    # And a watch with nothing happening times out instead of hanging.
    with env.watch(f"{ES}/namespaces/{NS}/endpointslices",
                   env.kubectl_json("GET", f"{ES}/namespaces/{NS}/endpointslices")["metadata"]["resourceVersion"]) as w:
        t = time.monotonic()
        with pytest.raises(TimeoutError):
            w.next_event(timeout=1)
        assert time.monotonic() - t < 5


def test_service_range_holds_a_large_cluster(env):
    """The service CIDRs hold tens of thousands of ClusterIPs (the 20,000-Service
    benchmark): addresses far beyond a /24 (IPv4) and a /112 (IPv6) are allocatable."""
    v4 = ipaddress.ip_network(kubeenv.SERVICE_CIDR_V4)
    v6 = ipaddress.ip_network(kubeenv.SERVICE_CIDR_V6)
    assert v4.num_addresses - 2 >= 20_000 and v6.num_addresses - 2 >= 20_000
    ns = "tributary-range"
    env.kubectl_json("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    far_v4, far_v6 = str(v4[40_000]), str(v6[40_000])
    env.kubectl_json("POST", f"/api/v1/namespaces/{ns}/services", {
        "metadata": {"name": "far"},
        "spec": {"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
                 "clusterIP": far_v4, "clusterIPs": [far_v4, far_v6],
                 "ports": [{"name": "http", "port": 80}]}})
    svc = env.kubectl_json("GET", f"/api/v1/namespaces/{ns}/services/far")
    assert svc["spec"]["clusterIPs"] == [far_v4, far_v6], svc["spec"]
