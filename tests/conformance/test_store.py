"""Config in the store, driven by `tributary ctl` while a real Envoy 1.40 is connected.

- apply, change and delete through `ctl`: each change reaches Envoy without a restart;
  an invalid apply changes nothing (the error names the object and the field);
- etcd outage: etcd is killed for 30 s; the hub keeps serving the last config (Envoy
  keeps routing traffic and loses nothing), API writes fail naming the store, and when
  etcd returns a change made just before the outage and one just after both arrive.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from peers import (
    FAMILIES, Envoy, Etcd, HttpBackend, HttpClient, Hub, dest, endpoint, endpoints, free_port,
    gateway, route, service, wait_equal, wait_until,
)

HOST = "reviews.prod"
PORT = 9080
LISTENER = "gateway|edge|http"
CLUSTER = f"outbound|{PORT}||{HOST}"
OUTAGE_S = 30


def mesh(backends: list[HttpBackend], gw_addr: str, gw_port: int) -> list[dict]:
    return [
        service("reviews", [HOST], [{"name": "http", "port": PORT, "protocol": "HTTP"}],
                subsets=[{"name": "v1", "labels": {"version": "v1"}}]),
        endpoints("reviews", [endpoint(b.host, b.port, {"version": "v1"}) for b in backends]),
        route("reviews", [HOST], [{"destinations": [dest("reviews")]}], port=PORT),
        gateway("edge", [{"name": "http", "address": gw_addr, "port": gw_port, "protocol": "HTTP",
                          "hosts": ["*"]}]),
    ]


def write(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def ok(r) -> str:
    assert r.returncode == 0, f"ctl failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


def endpoint_ports(envoy: Envoy) -> list[int]:
    return sorted(p for _, p in envoy.dynamic_endpoints().get(CLUSTER, []))


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_ctl_apply_change_and_delete_reach_envoy(tmp_path, api_type, family):
    host = FAMILIES[family]
    b1, b2 = HttpBackend("b1", host), HttpBackend("b2", host)
    hub = Hub(tmp_path, family=family, config_in_store=True).start()
    envoy = None
    try:
        # The first apply creates environment prod (a proxy of an environment the hub
        # does not serve yet gets nothing, and Envoy's /ready waits for its first config).
        gw_port = free_port(host)
        docs = mesh([b1], host, gw_port)
        out = ok(hub.ctl("apply", "-f", str(write(tmp_path / "mesh.yaml", docs))))
        assert "Service prod/default/reviews created" in out, out
        envoy = Envoy(tmp_path, hub, api_type, "edge-1").start()
        pid = envoy.proc.pid
        wait_until(lambda: LISTENER in envoy.dynamic_listeners(), 10, "the gateway listener in Envoy")
        wait_equal(lambda: endpoint_ports(envoy), [b1.port], 10, "b1 in Envoy's EDS")
        client = HttpClient(host, gw_port)
        wait_until(lambda: client.request(HOST)[1] == "b1", 10, "traffic through the gateway to b1")

        # A change: the endpoints move to b2. No restart.
        docs[1] = endpoints("reviews", [endpoint(b2.host, b2.port, {"version": "v1"})])
        changed = write(tmp_path / "change.yaml", docs)
        diff = hub.ctl("diff", "-f", str(changed))
        assert diff.returncode == 1, diff
        assert f"-        port: {b1.port}" in diff.stdout or str(b1.port) in diff.stdout, diff.stdout
        out = ok(hub.ctl("apply", "-f", str(changed)))
        assert "Endpoints prod/default/reviews configured" in out and "Service prod/default/reviews unchanged" in out, out
        wait_equal(lambda: endpoint_ports(envoy), [b2.port], 10, "b2 in Envoy's EDS")
        wait_until(lambda: client.request(HOST)[1] == "b2", 10, "traffic moves to b2")
        assert envoy.proc.pid == pid and envoy.proc.alive()

        # An invalid apply (a route to a subset that does not exist, with a valid
        # endpoint change in the same request): nothing changes.
        acked = {t["type_url"]: t["last_acked_version"] for t in hub.client("edge-1")["types"]}
        bad = list(docs)
        bad[1] = endpoints("reviews", [endpoint(b1.host, b1.port, {"version": "v1"})])
        bad[2] = route("reviews", [HOST], [{"destinations": [dest("reviews", "v9")]}], port=PORT)
        r = hub.ctl("apply", "-f", str(write(tmp_path / "bad.yaml", bad)))
        assert r.returncode == 1, r
        assert "/tributary/config/prod/Route/default/reviews" in r.stderr, r.stderr
        assert "spec.http[0].destinations[0].subset" in r.stderr, r.stderr
        assert "nothing was written" in r.stderr, r.stderr
        v = hub.ctl("validate", "-f", str(tmp_path / "bad.yaml"))
        assert v.returncode == 1 and "spec.http[0].destinations[0].subset" in v.stderr, v
        stored = ok(hub.ctl("get", "endpoints", "reviews", "--env", "prod", "-o", "yaml"))
        assert str(b2.port) in stored and str(b1.port) not in stored, stored
        as_json = json.loads(ok(hub.ctl("get", "endpoints", "reviews", "--env", "prod", "-o", "json")))
        assert str(b2.port) in json.dumps(as_json) and str(b1.port) not in json.dumps(as_json), as_json
        time.sleep(0.5)  # a push, if one were coming, would be out by now (debounce 100 ms)
        assert endpoint_ports(envoy) == [b2.port]
        now = {t["type_url"]: t["last_acked_version"] for t in hub.client("edge-1")["types"]}
        assert now == acked, (acked, now)

        # Delete: the gateway goes, and Envoy drops its listener.
        out = ok(hub.ctl("delete", "gateway", "edge", "--env", "prod"))
        assert "Gateway prod/default/edge deleted" in out, out
        wait_until(lambda: LISTENER not in envoy.dynamic_listeners(), 10, "the listener removed from Envoy")
        table = ok(hub.ctl("get", "gateways"))
        assert "edge" not in table, table
        assert envoy.proc.pid == pid and envoy.proc.alive()
        client.close()
    finally:
        if envoy:
            envoy.stop()
        hub.stop()
        b1.stop()
        b2.stop()


def test_etcd_outage_keeps_serving_and_resumes_without_a_gap(tmp_path):
    host = "127.0.0.1"
    b1, b2, b3 = (HttpBackend(f"b{i}", host) for i in (1, 2, 3))
    etcd = Etcd(tmp_path).start()
    hub = Hub(tmp_path, config_in_store=True,
              extra_args=["--store", "etcd", "--etcd-endpoints", etcd.client_url,
                          "--lease-ttl", "5s"]).start()
    envoy = None
    try:
        gw_port = free_port(host)
        docs = mesh([b1], host, gw_port)
        ok(hub.ctl("apply", "-f", str(write(tmp_path / "mesh.yaml", docs))))
        envoy = Envoy(tmp_path, hub, "DELTA_GRPC", "edge-1").start()
        client = HttpClient(host, gw_port)
        wait_until(lambda: client.request(HOST)[1] == "b1", 15, "traffic through the gateway to b1")

        # A change just before the outage: b2 joins; etcd is killed right after.
        docs[1] = endpoints("reviews", [endpoint(b.host, b.port, {"version": "v1"}) for b in (b1, b2)])
        ok(hub.ctl("apply", "-f", str(write(tmp_path / "before.yaml", docs))))
        etcd.kill()
        listeners, clusters = set(envoy.dynamic_listeners()), set(envoy.dynamic_clusters())

        # The outage: Envoy keeps routing, the hub keeps its config, writes fail.
        deadline = time.monotonic() + OUTAGE_S
        write_checked = False
        served = 0
        while time.monotonic() < deadline:
            code, body = client.request(HOST)
            assert code == 200 and body in ("b1", "b2"), (code, body)
            served += 1
            assert set(envoy.dynamic_listeners()) == listeners
            assert set(envoy.dynamic_clusters()) == clusters
            if not write_checked:
                docs_bad = list(docs)
                docs_bad[1] = endpoints("reviews", [endpoint(b3.host, b3.port, {"version": "v1"})])
                r = hub.ctl("apply", "-f", str(write(tmp_path / "during.yaml", docs_bad)))
                assert r.returncode == 1, r
                assert f"etcd {etcd.client_url}" in r.stderr and "unavailable" in r.stderr, r.stderr
                assert "nothing was written" in r.stderr, r.stderr
                status = hub.config_status()["store"]
                assert status["connected"] is False and etcd.client_url in status["error"], status
                write_checked = True
            time.sleep(0.5)
        assert write_checked and served >= OUTAGE_S
        c = hub.client("edge-1")
        assert c is not None, "the Envoy is still connected"
        for t in c["types"]:
            assert t["deferred_removals"] == 0, t

        # etcd returns. The write refused during the outage was not kept anywhere to be
        # applied later: the store holds the change from before the outage.
        etcd.start()
        stored = wait_until(lambda: ok(hub.ctl("get", "endpoints", "reviews", "--env", "prod", "-o", "yaml")),
                            20, "the store answering again")
        assert str(b2.port) in stored and str(b3.port) not in stored, stored
        # A change just after: b3 joins.
        docs[1] = endpoints("reviews", [endpoint(b.host, b.port, {"version": "v1"}) for b in (b1, b2, b3)])
        after = write(tmp_path / "after.yaml", docs)
        wait_until(lambda: hub.ctl("apply", "-f", str(after)).returncode == 0, 20,
                   "the API takes writes again")
        wait_equal(lambda: endpoint_ports(envoy), sorted([b1.port, b2.port, b3.port]), 15,
                   "both changes (before and after the outage) in Envoy")
        wait_until(lambda: hub.config_status()["store"]["connected"], 10, "the hub's watch resumed")
        client.close()
    finally:
        if envoy:
            envoy.stop()
        hub.stop()
        etcd.stop()
        for b in (b1, b2, b3):
            b.stop()
