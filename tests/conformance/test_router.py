"""The shard router in front of hub replicas on etcd, with a real Envoy 1.40.

Three `tributary hub --store etcd` replicas (two per shard) of one shard `prod/az1`, a
`tributary-router` on the same etcd, and an Envoy whose bootstrap points at the router
(node metadata `tributary.io/env: prod`, locality zone `az1`), over SotW and Delta,
IPv4 and IPv6:

- Envoy gets its config through the router from a replica of its shard, and traffic
  flows through its gateway;
- the replica serving it is killed (SIGKILL): the router ends the relayed stream,
  Envoy reconnects through the router to a live replica of the shard, keeps routing
  traffic meanwhile, and a change made after the kill reaches it (prints the time from
  the kill until another replica serves it);
- replicas agree: the two live replicas of the shard publish identical resources and
  versions (`/config_dump`).

And proxyless gRPC through the router: the Go xDS client (which waits for the
server's connection preface before it opens its ADS stream: the router sends one of
its own before it knows the replica) and the Python one get their config from the
replica of their shard and reach the backend.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from peers import (
    FAMILIES, GREETER_TARGET, Envoy, Etcd, HttpBackend, HttpClient, Hub, Router, dest, endpoint,
    endpoints, free_port, gateway, greeter_mesh, http_get_json, route, service, wait_until,
)

HOST = "reviews.prod"
PORT = 9080
CLUSTER = f"outbound|{PORT}||{HOST}"
TTL = "2s"


PROD_AZ1 = {"apiVersion": "tributary.io/v1alpha1", "kind": "Environment",
            "metadata": {"name": "prod"}, "spec": {"zones": ["az1"]}}


def mesh(backends: list[HttpBackend], gw_addr: str, gw_port: int) -> list[dict]:
    return [
        PROD_AZ1,
        service("reviews", [HOST], [{"name": "http", "port": PORT, "protocol": "HTTP"}]),
        endpoints("reviews", [endpoint(b.host, b.port) for b in backends]),
        route("reviews", [HOST], [{"destinations": [dest("reviews")]}], port=PORT),
        gateway("edge", [{"name": "http", "address": gw_addr, "port": gw_port, "protocol": "HTTP",
                          "hosts": ["*"]}]),
    ]


def dump(hub: Hub) -> dict:
    return http_get_json(hub.admin_url + "/config_dump?env=prod")["resources"]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
def test_envoy_through_the_router_fails_over_when_its_replica_is_killed(tmp_path, family, api_type):
    host = FAMILIES[family]
    b1, b2 = HttpBackend("b1", host), HttpBackend("b2", host)
    etcd = Etcd(tmp_path).start()
    gw_port = free_port(host)
    hubs: dict[str, Hub] = {}
    router = envoy = None
    try:
        for rid in ("hub-a", "hub-b", "hub-c"):
            h = Hub(tmp_path / rid, family=family,
                    extra_args=["--store", "etcd", "--etcd-endpoints", etcd.client_url,
                                "--replica-id", rid, "--lease-ttl", TTL, "--replicas-per-shard", "2"])
            h.write_config(mesh([b1], host, gw_port))
            hubs[rid] = h.start()
        router = Router(tmp_path, etcd, family).start()
        wait_until(lambda: len(router.routes().get("prod/az1", [])) == 2, 20,
                   "prod/az1 with two replicas in the router's table")
        envoy = Envoy(tmp_path, router, api_type, "edge-1",
                      metadata={"tributary.io/env": "prod", "tributary.io/gateway": "edge"}).start()
        client = HttpClient(host, gw_port)
        wait_until(lambda: client.request(HOST) == (200, "b1"), 20, "traffic through the gateway to b1")

        serving = [rid for rid, h in hubs.items() if h.client("edge-1")]
        assert len(serving) == 1, serving
        dead = serving[0]
        assert dead in router.routes()["prod/az1"]

        killed = time.monotonic()
        os.kill(hubs[dead].proc.pid, signal.SIGKILL)
        hubs[dead].proc.p.wait(5)
        live = {rid: h for rid, h in hubs.items() if rid != dead}
        # Envoy keeps routing with what it has while it reconnects.
        new_home = wait_until(
            lambda: next((rid for rid, h in live.items() if h.client("edge-1")), None)
            if client.request(HOST) == (200, "b1") else None,
            20, "Envoy served by a live replica through the router")
        took = time.monotonic() - killed
        print(f"\n{api_type}/{family}: Envoy served by {new_home} {took:.2f} s after {dead} was killed "
              f"(lease TTL {TTL})")
        m = router.metrics()
        ended = m.get("tributary_router_upstream_failures_total", 0) + \
            m.get("tributary_router_ended_by_membership_total", 0)
        assert ended >= 1, m

        # A change after the kill reaches Envoy through its new replica.
        for h in live.values():
            h.write_config(mesh([b1, b2], host, gw_port))
        wait_until(lambda: "b2" in {client.request(HOST)[1] for _ in range(20)}, 20,
                   "the change after the kill reaches Envoy")

        # Replicas agree: once the assignment holds two live replicas again, both
        # publish the same resources at the same versions.
        wait_until(lambda: sorted(router.routes().get("prod/az1", [])) == sorted(live), 20,
                   "the shard reassigned to the two live replicas")
        x, y = live.values()
        wait_until(lambda: dump(x) == dump(y) and CLUSTER in {c["name"] for c in dump(x)["CDS"]}, 20,
                   "the two live replicas publish identical resource versions")
        client.close()
    finally:
        if envoy:
            envoy.stop()
        if router:
            router.stop()
        for h in hubs.values():
            h.stop()
        etcd.stop()
        b1.stop()
        b2.stop()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_grpc_xds_clients_through_the_router(tmp_path, family, make_grpc_backend, run_go_client,
                                            make_py_grpc_client):
    b1 = make_grpc_backend("b1", family)
    etcd = Etcd(tmp_path).start()
    hub = router = None
    try:
        hub = Hub(tmp_path / "hub-a", family=family,
                  extra_args=["--store", "etcd", "--etcd-endpoints", etcd.client_url,
                              "--replica-id", "hub-a", "--lease-ttl", TTL])
        hub.write_config([PROD_AZ1] + greeter_mesh({"b1": b1}))
        hub.start()
        router = Router(tmp_path, etcd, family).start()
        wait_until(lambda: router.routes().get("prod/az1") == ["hub-a"], 20,
                   "prod/az1 served by hub-a in the router's table")
        out = run_go_client(router, GREETER_TARGET, 50)
        assert out.get("errors") == 0 and out["counts"] == {"b1": 50}, out
        node = f"py-router-{family}"
        py = make_py_grpc_client(router, GREETER_TARGET, node_id=node)
        out = py.run(50)
        assert out["counts"] == {"b1": 50} and out["errors"] == 0, out
        # The replica serves it, through the router.
        assert hub.client(node), hub.sync_status()
        m = router.metrics()
        routed = sum(v for k, v in m.items() if k.startswith("tributary_router_routed_total"))
        assert routed >= 2, m
    finally:
        if router:
            router.stop()
        if hub:
            hub.stop()
        etcd.stop()
