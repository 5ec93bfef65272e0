"""Proxyless gRPC (Go, google.golang.org/grpc/xds) against the hub, IPv4 and IPv6.

Uses go/bin/xds-client (built by go/build.sh if missing); each run is its own
process and xDS client."""

from __future__ import annotations

from peers import EMPTY, GREETER_TARGET, UNARY, dest, greeter_mesh, share


def _ok(out: dict, n: int) -> dict[str, int]:
    assert out.get("errors") == 0, out
    assert sum(out["counts"].values()) == n, out
    return out["counts"]


def test_round_robin(family, make_hub, make_grpc_backend, run_go_client):
    bs = {k: make_grpc_backend(k, family) for k in ("b1", "b2", "b3")}
    hub = make_hub(family, greeter_mesh(bs, labels={k: "all" for k in bs}))
    c = _ok(run_go_client(hub, GREETER_TARGET, 300), 300)
    assert set(c) == set(bs), c
    for k in bs:
        assert abs(share(c, k) - 1 / 3) <= 0.10, c


def test_traffic_split(family, make_hub, make_grpc_backend, run_go_client):
    bs = {v: make_grpc_backend(v, family) for v in ("v1", "v2")}
    rules = [{"destinations": [dest("greeter", "v1", 80), dest("greeter", "v2", 20)]}]
    hub = make_hub(family, greeter_mesh(bs, rules))
    c = _ok(run_go_client(hub, GREETER_TARGET, 1000), 1000)
    assert set(c) == {"v1", "v2"}, c
    assert abs(share(c, "v1") - 0.80) <= 0.05, c


def test_path_match(family, make_hub, make_grpc_backend, run_go_client):
    bs = {v: make_grpc_backend(v, family) for v in ("a", "b")}
    rules = [{"match": {"path": {"prefix": EMPTY}}, "destinations": [dest("greeter", "a", 1)]},
             {"destinations": [dest("greeter", "b", 1)]}]
    hub = make_hub(family, greeter_mesh(bs, rules))
    assert _ok(run_go_client(hub, GREETER_TARGET, 50, method=EMPTY), 50) == {"a": 50}
    assert _ok(run_go_client(hub, GREETER_TARGET, 50, method=UNARY), 50) == {"b": 50}


def test_header_match(family, make_hub, make_grpc_backend, run_go_client):
    bs = {v: make_grpc_backend(v, family) for v in ("v1", "v2")}
    rules = [{"match": {"headers": [{"name": "x-canary", "exact": "true"}]},
              "destinations": [dest("greeter", "v2", 1)]},
             {"destinations": [dest("greeter", "v1", 1)]}]
    hub = make_hub(family, greeter_mesh(bs, rules))
    assert _ok(run_go_client(hub, GREETER_TARGET, 50, metadata={"x-canary": "true"}), 50) == {"v2": 50}
    assert _ok(run_go_client(hub, GREETER_TARGET, 50), 50) == {"v1": 50}
