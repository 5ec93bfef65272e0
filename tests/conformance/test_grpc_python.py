"""Proxyless gRPC (Python grpcio, SotW xDS) against the hub, over IPv4 and IPv6.

Every client runs in its own subprocess (grpc_client.py): grpcio caches its xDS client
per process."""

from __future__ import annotations

import time

from peers import EMPTY, GREETER_TARGET, UNARY, dest, greeter_mesh, share, wait_until

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"


def test_rpcs_reach_backend(family, make_hub, make_grpc_backend, make_py_grpc_client):
    b1 = make_grpc_backend("b1", family)
    hub = make_hub(family, greeter_mesh({"b1": b1}))
    client = make_py_grpc_client(hub, GREETER_TARGET, node_id=f"py-reach-{family}")
    out = client.run(50)
    assert out["counts"] == {"b1": 50} and out["errors"] == 0, out
    assert b1.hits.get("/grpc.testing.TestService/UnaryCall") == 50, b1.hits

    # The hub knows the client: SotW, environment prod, listener asked by name and ACKed.
    def synced():
        c = hub.client(f"py-reach-{family}")
        if not c:
            return None
        lt = [t for t in c["types"] if t["type_url"] == LISTENER_TYPE]
        return c if lt and lt[0]["last_acked_version"] else None
    c = wait_until(synced, 5, "py client in /status/sync with an ACKed listener")
    assert c["protocol"] == "sotw" and c["environment"] == "prod", c
    assert all(t["nacks_total"] == 0 for t in c["types"]), c


def test_weighted_split(family, make_hub, make_grpc_backend, make_py_grpc_client):
    bs = {v: make_grpc_backend(v, family) for v in ("v1", "v2")}
    rules = [{"destinations": [dest("greeter", "v1", 80), dest("greeter", "v2", 20)]}]
    hub = make_hub(family, greeter_mesh(bs, rules))
    client = make_py_grpc_client(hub, GREETER_TARGET)
    out = client.run(1200)
    assert out["errors"] == 0, out
    c = out["counts"]
    assert sum(c.values()) == 1200 and set(c) == {"v1", "v2"}, out
    assert abs(share(c, "v1") - 0.80) <= 0.05, c


def test_header_match(family, make_hub, make_grpc_backend, make_py_grpc_client):
    bs = {v: make_grpc_backend(v, family) for v in ("v1", "v2")}
    rules = [{"match": {"headers": [{"name": "x-canary", "exact": "true"}]},
              "destinations": [dest("greeter", "v2", 1)]},
             {"destinations": [dest("greeter", "v1", 1)]}]
    hub = make_hub(family, greeter_mesh(bs, rules))
    client = make_py_grpc_client(hub, GREETER_TARGET)
    assert client.run(100, metadata={"x-canary": "true"})["counts"] == {"v2": 100}
    assert client.run(100)["counts"] == {"v1": 100}


def test_path_match(family, make_hub, make_grpc_backend, make_py_grpc_client):
    bs = {v: make_grpc_backend(v, family) for v in ("a", "b")}
    rules = [{"match": {"path": {"prefix": EMPTY}}, "destinations": [dest("greeter", "a", 1)]},
             {"destinations": [dest("greeter", "b", 1)]}]
    hub = make_hub(family, greeter_mesh(bs, rules))
    client = make_py_grpc_client(hub, GREETER_TARGET)
    assert client.run(50, method=EMPTY)["counts"] == {"a": 50}
    assert client.run(50, method=UNARY)["counts"] == {"b": 50}


def test_endpoint_change_moves_traffic(family, make_hub, make_grpc_backend, make_py_grpc_client):
    a = make_grpc_backend("a", family)
    b = make_grpc_backend("b", family)
    hub = make_hub(family, greeter_mesh({"a": a}, labels={"a": "v1"}))
    client = make_py_grpc_client(hub, GREETER_TARGET)
    out = client.run(50)
    assert out["counts"] == {"a": 50}, out

    # Same service, its only endpoint replaced by backend b.
    t_write = hub.write_config(greeter_mesh({"b": b}, labels={"b": "v1"}))

    def moved():
        o = client.run(20, wait=5)
        return o["counts"] == {"b": 20} and o
    wait_until(moved, 10, "all RPCs on the new endpoint b", interval=0)
    elapsed = time.monotonic() - t_write
    assert elapsed < 5, f"traffic took {elapsed:.2f}s to move"
