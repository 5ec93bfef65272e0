"""tributary-proxy against Envoy 1.40: one hub config drives both, side by side, and the
same request mix must give the same routing decisions.

Each test starts one hub, one Envoy and one `tributary-proxy` (built by
`cargo build -p tributary-proxy`; `TRIBUTARY_PROXY_BIN` overrides the path), both as
the gateway `edge`. Envoy binds the gateway listener's port; the proxy binds the same
listener on another free port (its bootstrap's `listeners.port_override`), so both
serve the very same resources.

- weighted split (80/20 over 2,000 requests each, within ±5 points) and header route;
- a flaky backend (every other answer a 503; the hub configures no retries): both pass
  the same share of 503s through, and neither ejects it (never 5 gateway failures in a row);
- cross-zone locality (test_locality.py's mesh: priority 0 the local endpoint, priority
  1 the other zones' gateways, overprovisioning 98): the 98/1/1 split within the
  binomial 99.9% interval for both, and both fail over to the gateways when the local
  endpoint turns UNHEALTHY.
- mesh mTLS (test_mtls.py's mesh, the hub issuing certificates): an Envoy client
  sidecar talks mTLS to a `tributary-proxy` server sidecar, whose app sees the Envoy's
  SPIFFE id; the proxy refuses a plain client, a TLS client without a certificate
  and one with a certificate of another CA.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from peers import (
    FAMILIES, REPO, Envoy, HttpBackend, HttpClient, Hub, Proc, endpoint, endpoints, free_port, gateway,
    hostport, http_get_json, http_get_text, service, share, wait_until,
)
from test_envoy import HOST, reviews_mesh
from test_locality import binomial_interval, mesh as locality_mesh


def proxy_binary() -> Path:
    return Path(os.environ.get("TRIBUTARY_PROXY_BIN", REPO / "target" / "debug" / "tributary-proxy"))


class TributaryProxy:
    """`tributary-proxy --bootstrap FILE` as the gateway `edge`, or as a sidecar with
    `sidecar_meta` (its listeners then bind their own ports)."""

    def __init__(self, workdir: Path, hub: Hub, protocol: str, node_id: str, zone: str, family: str,
                 sidecar_meta: dict | None = None):
        self.dir = workdir / f"proxy-{node_id}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = FAMILIES[family]
        self.admin_port = free_port("127.0.0.1")
        self.port = free_port(self.host)
        xhost, xport = hub.xds  # type: ignore[misc]
        self.bootstrap = {
            "node": {"id": node_id, "environment": "prod", "zone": zone, "region": "r1",
                     "cluster": "conformance",
                     "metadata": sidecar_meta or {"tributary.io/gateway": "edge"}},
            "xds": {"address": f"http://{hostport(xhost, xport)}", "protocol": protocol},
            "admin": {"address": f"127.0.0.1:{self.admin_port}"},
            "workers": 1,
        }
        if sidecar_meta is None:
            self.bootstrap["listeners"] = {"port_override": self.port}
        self.path = self.dir / "bootstrap.yaml"
        self.path.write_text(yaml.safe_dump(self.bootstrap, sort_keys=False))
        b = proxy_binary()
        if not b.exists():
            pytest.fail(f"{b} missing: run `cargo build -p tributary-proxy` first (or set TRIBUTARY_PROXY_BIN)",
                        pytrace=False)
        self.proc = Proc(f"tributary-proxy {node_id}", [str(b), "--bootstrap", str(self.path)],
                         self.dir / "proxy.log", env=dict(os.environ, RUST_LOG="info"))

        def ready():
            assert self.proc.alive(), f"tributary-proxy exited with {self.proc.p.returncode}"
            try:
                return http_get_text(f"http://127.0.0.1:{self.admin_port}/ready")[0] == 200
            except OSError:
                return False

        wait_until(ready, 20, "tributary-proxy /ready")

    def config_dump(self) -> dict:
        return http_get_json(f"http://127.0.0.1:{self.admin_port}/config_dump")

    def endpoints(self, cluster: str) -> list[tuple[str, int]]:
        eps = self.config_dump().get("endpoint_state", {}).get(cluster, [])
        out = []
        for e in eps:
            host, port = e["address"].rsplit(":", 1)
            out.append((host.strip("[]"), int(port)))
        return sorted(out)

    def stop(self):
        self.proc.stop()


@pytest.fixture
def make_proxy(tmp_path):
    proxies: list[TributaryProxy] = []

    def make(hub: Hub, api_type: str, node_id: str, zone: str = "az1", family: str = "ipv4",
             sidecar_meta: dict | None = None) -> TributaryProxy:
        p = TributaryProxy(tmp_path, hub, "delta" if api_type == "DELTA_GRPC" else "sotw", node_id, zone, family,
                           sidecar_meta)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.stop()


@pytest.mark.parametrize("api_type,family", [("DELTA_GRPC", "ipv4"), ("GRPC", "ipv6")])
def test_weighted_and_header_routes_match_envoy(api_type, family, make_hub, make_envoy, make_http_backend,
                                                make_proxy):
    addr = FAMILIES[family]
    backends = {s: make_http_backend(s, family) for s in ("v1", "v2")}
    gw_port = free_port(addr)
    hub = make_hub(family, reviews_mesh(addr, backends, gw_port))
    envoy = make_envoy(hub, api_type, node_id=f"envoy-{family}")
    proxy = make_proxy(hub, api_type, f"proxy-{family}", family=family)
    clients = {"envoy": HttpClient(addr, gw_port), "proxy": HttpClient(addr, proxy.port)}
    for name, c in clients.items():
        wait_until(lambda: c.key(HOST) in ("v1", "v2"), 15, f"first request through {name}")
    for name, c in clients.items():
        counts = c.counts(2000, HOST)
        print(f"\n{name} {api_type}/{family}: 80/20 over 2000: {counts}")
        assert set(counts) == {"v1", "v2"}, (name, counts)
        assert abs(share(counts, "v1") - 0.80) <= 0.05, (name, counts)
        assert c.counts(200, HOST, headers={"x-canary": "true"}) == {"v2": 200}, name
        assert set(c.counts(200, HOST, headers={"x-canary": "false"})) == {"v1", "v2"}, name
        c.close()


class FlakyBackend(HttpBackend):
    """Answers 503 to every other request."""

    def __init__(self, backend_id: str, host: str):
        super().__init__(backend_id, host)
        handler = self.server.RequestHandlerClass
        original = handler._answer
        backend = self

        def _answer(h):
            if backend.hits % 2 == 0:
                backend.hits += 1
                h.send_response(503)
                h.send_header("content-length", "0")
                h.end_headers()
                return
            original(h)

        handler._answer = _answer
        handler.do_GET = _answer


def test_flaky_backend_gets_the_same_treatment(tmp_path, make_hub, make_envoy, make_proxy):
    addr = FAMILIES["ipv4"]
    flaky = FlakyBackend("v1", addr)
    try:
        gw_port = free_port(addr)
        hub = make_hub("ipv4", [
            service("reviews", [HOST], [{"name": "http", "port": 9080, "protocol": "HTTP"}]),
            endpoints("reviews", [endpoint(flaky.host, flaky.port)]),
            gateway("edge", [{"name": "http", "address": addr, "port": gw_port, "protocol": "HTTP",
                              "hosts": ["*"]}]),
        ])
        make_envoy(hub, "DELTA_GRPC", node_id="envoy-flaky")
        proxy = make_proxy(hub, "DELTA_GRPC", "proxy-flaky")
        for name, port in (("envoy", gw_port), ("proxy", proxy.port)):
            c = HttpClient(addr, port)
            wait_until(lambda: c.key(HOST) in ("v1", "status:503"), 15, f"first request through {name}")
            counts = c.counts(400, HOST)
            print(f"\n{name}: flaky backend, 400 requests: {counts}")
            assert set(counts) == {"v1", "status:503"}, (name, counts)
            assert abs(share(counts, "v1") - 0.5) <= 0.01, (name, counts)
            c.close()
    finally:
        flaky.stop()


@pytest.mark.parametrize("api_type,family", [("DELTA_GRPC", "ipv4"), ("GRPC", "ipv6")])
def test_locality_split_and_failover_match_envoy(api_type, family, tmp_path, make_proxy):
    host = FAMILIES[family]
    local, gw2, gw3 = HttpBackend("local", host), HttpBackend("gw-az2", host), HttpBackend("gw-az3", host)
    edge_port, gw1_port = free_port(host), free_port(host)
    hub = envoy = None
    cluster = f"outbound|9080||{HOST}"
    n = 2000
    try:
        hub = Hub(tmp_path, family=family, extra_args=["--replicas-per-shard", "1"])
        hub.write_config(locality_mesh(host, local, gw2, gw3, gw1_port, edge_port, True))
        hub.start()
        envoy = Envoy(tmp_path, hub, api_type, "edge-az1").start()
        proxy = make_proxy(hub, api_type, "proxy-az1", zone="az1", family=family)
        want = sorted([(local.host, local.port), (gw2.host, gw2.port), (gw3.host, gw3.port)])
        wait_until(lambda: envoy.dynamic_endpoints().get(cluster) == want, 30, "Envoy's endpoints")
        wait_until(lambda: proxy.endpoints(cluster) == want, 30, "the proxy's endpoints")
        clients = {"envoy": HttpClient(host, edge_port), "proxy": HttpClient(host, proxy.port)}
        bounds = {"local": binomial_interval(n, 0.98), "gw-az2": binomial_interval(n, 0.01),
                  "gw-az3": binomial_interval(n, 0.01)}
        for name, c in clients.items():
            counts = c.counts(n, HOST)
            print(f"\n{name} {api_type}/{family}: {n} requests: {counts}; 99.9% bounds {bounds}")
            assert set(counts) == set(bounds), (name, counts)
            for k, (lo, hi) in bounds.items():
                assert lo <= counts[k] <= hi, (name, k, counts, bounds)

        hub.write_config(locality_mesh(host, local, gw2, gw3, gw1_port, edge_port, False))
        for name, c in clients.items():
            wait_until(lambda: "local" not in c.counts(50, HOST), 30, f"{name}: traffic leaves the local endpoint")
            after = c.counts(1000, HOST)
            print(f"{name}: local endpoint unhealthy, 1000 requests: {after}")
            assert set(after) == {"gw-az2", "gw-az3"}, (name, after)
            assert min(after.values()) >= 400, (name, after)
        for c in clients.values():
            c.close()
    finally:
        if envoy:
            envoy.stop()
        if hub:
            hub.stop()
        for b in (local, gw2, gw3):
            b.stop()


@pytest.mark.parametrize("api_type,family", [("DELTA_GRPC", "ipv4"), ("GRPC", "ipv6")])
def test_envoy_sidecar_talks_mtls_to_a_tributary_proxy_sidecar(api_type, family, tmp_path, make_hub,
                                                                make_proxy):
    import http.client
    import ssl

    from test_mtls import (
        CLIENT_ID, CLUSTER, PORT, TD, XfccBackend, app_listener, foreign_client_cert, plain_get,
        sidecar, start_envoy, tls_get, workload_meta,
    )
    from test_mtls import HOST as MTLS_HOST

    host = FAMILIES[family]
    backend = XfccBackend(host)
    envoy = None
    try:
        inbound_port = free_port(host)
        issuer_dir = tmp_path / "issuer"
        docs = [
            service("backend", [MTLS_HOST], [{"name": "http", "port": PORT, "protocol": "HTTP"}]),
            endpoints("backend", [endpoint(host, inbound_port)]),
            sidecar("client", [{"host": MTLS_HOST}]),
            sidecar("server", [{"namespace": "default"}],
                    inbound=[{"port": inbound_port, "bind": host, "targetAddress": host,
                              "targetPort": backend.port}]),
        ]
        hub = make_hub(family=family, docs=docs,
                       extra_args=["--test-issuer", str(issuer_dir), "--trust-domain", TD])
        # Ready only once its certificates from SDS are loaded.
        proxy = make_proxy(hub, api_type, "server-sidecar", family=family,
                           sidecar_meta=workload_meta("server", "server"))
        app_port = free_port(host)
        envoy = start_envoy(tmp_path, hub, api_type, "client-sidecar", workload_meta("client", "client"),
                            [app_listener(host, app_port)])

        def through():
            c = http.client.HTTPConnection(host, app_port, timeout=5)
            try:
                c.request("GET", "/", headers={"host": MTLS_HOST})
                r = c.getresponse()
                return (r.status, r.read()) == (200, b"backend")
            except OSError:
                return False
            finally:
                c.close()

        wait_until(through, 20, "Envoy → (mTLS) → tributary-proxy → backend")
        xfcc = backend.seen[-1] or ""
        assert xfcc.startswith(f"By=spiffe://{TD}/env/prod/ns/default/sa/server;Hash="), xfcc
        assert xfcc.endswith(f";URI={CLIENT_ID}"), xfcc
        assert (envoy.stat(f"cluster.{CLUSTER}.ssl.handshake") or 0) >= 1
        assert proxy.config_dump()["certificates_loaded"] is True

        seen = len(backend.seen)
        root = issuer_dir / "root.pem"
        assert b"HTTP/" not in plain_get(host, inbound_port)
        refused = (ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)
        with pytest.raises(refused):
            tls_get(host, inbound_port, root, None)
        with pytest.raises(refused):
            tls_get(host, inbound_port, root, foreign_client_cert(tmp_path, CLIENT_ID))
        assert len(backend.seen) == seen, "no refused client reached the backend"
        # Envoy NACKs nothing (both sidecars serve virtualOutbound on 15001 on this one
        # host: each binds it with SO_REUSEPORT, as Envoy does); the proxy NACKs no secret.
        c = hub.client("client-sidecar")
        assert all(t.get("nacks_total", 0) == 0 for t in c["types"]), json.dumps(c["types"])
        p = hub.client("server-sidecar")
        sds = [t for t in p["types"] if t.get("type_url", "").endswith("Secret")]
        assert sds and sds[0].get("last_acked_version") and sds[0].get("nacks_total", 0) == 0, p
    finally:
        if envoy:
            envoy.stop()
        backend.stop()
