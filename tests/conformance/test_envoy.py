"""Envoy 1.40 (SotW ADS and Delta ADS) against the hub, over IPv4 and IPv6 loopback."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers import (
    FAMILIES, Envoy, HttpBackend, HttpClient, Hub, Proc, dest, endpoint, endpoints, free_port, gateway,
    metric_sum, route, service, share, wait_equal, wait_until,
)

HOST = "reviews.prod"
PORT = 9080
LISTENER = "gateway|edge|http"
CL = {s: f"outbound|{PORT}|{s}|{HOST}" for s in ("", "v1", "v2", "v3")}
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# RE2 accepts this syntax but Envoy rejects it: its RE2 program size (~509) is over
# Envoy's default `re2.max_program_size.error_level` of 100. A hub that validates
# regexes with a regex library (syntax) accepts it, so it reaches Envoy and is NACKed.
NACK_REGEX = "/nack[a-z]{500}"


def reviews_mesh(addr: str, backends: dict[str, HttpBackend], gw_port: int,
                 default_split: dict[str, int] | None = None, extra_rules: list[dict] | None = None) -> list[dict]:
    split = default_split or {"v1": 80, "v2": 20}
    rules = list(extra_rules or [])
    rules.append({"match": {"headers": [{"name": "x-canary", "exact": "true"}]},
                  "destinations": [dest("reviews", "v2", 100)]})
    rules.append({"destinations": [dest("reviews", s, w) for s, w in split.items()]})
    return [
        service("reviews", [HOST], [{"name": "http", "port": PORT, "protocol": "HTTP"}],
                subsets=[{"name": s, "labels": {"version": s}} for s in sorted(backends)]),
        endpoints("reviews", [endpoint(b.host, b.port, {"version": s}) for s, b in sorted(backends.items())]),
        route("reviews", [HOST], rules, port=PORT),
        gateway("edge", [{"name": "http", "address": addr, "port": gw_port, "protocol": "HTTP",
                          "hosts": ["*"]}]),
    ]


@dataclass
class Stack:
    family: str
    addr: str
    hub: Hub
    envoy: Envoy
    backends: dict[str, HttpBackend]
    gw_port: int
    client: HttpClient

    def docs(self, **kw) -> list[dict]:
        return reviews_mesh(self.addr, self.backends, self.gw_port, **kw)


def wait_warm(envoy: Envoy, expected: dict[str, HttpBackend], timeout: float = 15.0):
    """Every expected subset cluster is active with exactly its backend's endpoint."""
    def warm():
        eps = envoy.dynamic_endpoints()
        for s, b in expected.items():
            if eps.get(CL[s]) != [(b.host, b.port)]:
                return False
        return LISTENER in envoy.dynamic_listeners() and LISTENER in envoy.dynamic_routes()
    wait_until(warm, timeout, f"Envoy warm with clusters {sorted(expected)}")


@pytest.fixture
def build_stack(make_hub, make_envoy, make_http_backend):
    clients: list[HttpClient] = []

    def build(family: str, api_type: str, xds_port: int = 0) -> Stack:
        addr = FAMILIES[family]
        backends = {s: make_http_backend(s, family) for s in ("v1", "v2")}
        gw_port = free_port(addr)
        hub = make_hub(family, reviews_mesh(addr, backends, gw_port), xds_port=xds_port)
        envoy = make_envoy(hub, api_type, node_id=f"edge-{family}-{api_type.lower()}")
        wait_warm(envoy, backends)
        client = HttpClient(addr, gw_port)
        clients.append(client)
        # The listener is active in config_dump slightly before its socket accepts.
        wait_until(lambda: client.key(HOST) in ("v1", "v2"), 10, "first request through the gateway")
        return Stack(family, addr, hub, envoy, backends, gw_port, client)

    yield build
    for c in clients:
        c.close()


@pytest.fixture
def stack(family, api_type, build_stack):
    return build_stack(family, api_type)


# ------------------------------------------------------------------------- tests


def test_resources_warm(stack: Stack):
    e = stack.envoy
    listeners = e.dynamic_listeners()
    assert list(listeners) == [LISTENER], f"listeners: {list(listeners)}"
    sa = listeners[LISTENER]["address"]["socket_address"]
    assert (sa["address"], int(sa["port_value"])) == (stack.addr, stack.gw_port), sa

    routes = e.dynamic_routes()
    assert LISTENER in routes, f"route configs: {list(routes)}"
    vhosts = [vh for vh in routes[LISTENER].get("virtual_hosts", []) if HOST in vh.get("domains", [])]
    assert vhosts, f"no virtual host for {HOST}: {routes[LISTENER]}"
    weighted = [r["route"]["weighted_clusters"] for r in vhosts[0]["routes"]
                if "weighted_clusters" in r.get("route", {})]
    assert weighted, f"no weighted_clusters route: {vhosts[0]['routes']}"
    got = {c["name"]: int(c.get("weight", 0)) for c in weighted[-1]["clusters"]}
    assert set(got) == {CL["v1"], CL["v2"]}, got
    assert got[CL["v1"]] * 20 == got[CL["v2"]] * 80, f"weights not 80:20: {got}"

    clusters = e.dynamic_clusters()
    for s in ("", "v1", "v2"):
        assert CL[s] in clusters, f"{CL[s]} not in {sorted(clusters)}"
    eps = e.dynamic_endpoints()
    for s, b in stack.backends.items():
        assert eps[CL[s]] == [(b.host, b.port)], eps
    assert sorted(eps[CL[""]]) == sorted((b.host, b.port) for b in stack.backends.values()), eps

    # /clusters: every host known and healthy per EDS.
    cj = e.clusters_json()
    for s in ("v1", "v2"):
        hosts = cj.get(CL[s], [])
        assert len(hosts) == 1, f"{CL[s]}: {hosts}"
        assert hosts[0].get("health_status", {}).get("eds_health_status", "HEALTHY") == "HEALTHY", hosts

    # The hub sees this node as ACKed on every type it was sent.
    def acked():
        c = stack.hub.client(e.node_id)
        if not c:
            return None
        types = {t["type_url"].rsplit(".", 1)[-1]: t for t in c["types"]}
        need = {"Listener", "RouteConfiguration", "Cluster", "ClusterLoadAssignment"}
        if not need <= set(types):
            return None
        if all(types[n]["last_acked_version"] == types[n]["last_sent_version"] for n in need):
            return c
        return None
    c = wait_until(acked, 10, "/status/sync showing every type ACKed")
    assert c["protocol"] == ("delta" if stack.envoy.api_type == "DELTA_GRPC" else "sotw"), c
    assert c["environment"] == "prod", c
    assert all(t["nacks_total"] == 0 and t["last_nack"] is None for t in c["types"]), c


def test_weighted_split(stack: Stack):
    counts = stack.client.counts(2000, HOST)
    assert set(counts) <= {"v1", "v2"}, f"non-backend answers: {counts}"
    assert abs(share(counts, "v1") - 0.80) <= 0.05, counts
    assert abs(share(counts, "v2") - 0.20) <= 0.05, counts


def test_header_match(stack: Stack):
    counts = stack.client.counts(300, HOST, headers={"x-canary": "true"})
    assert counts == {"v2": 300}, counts
    # A different value falls through to the default split.
    counts = stack.client.counts(300, HOST, headers={"x-canary": "false"})
    assert set(counts) == {"v1", "v2"}, counts


def _follow(client: HttpClient, want: str, t_write: float, timeout: float, streak_len: int = 50):
    """Send requests until `streak_len` in a row answer `want`; returns the time from
    `t_write` to the first request of that streak, and what was seen on the way."""
    seen: dict[str, int] = {}
    streak_start = None
    streak = 0
    deadline = t_write + timeout
    while time.monotonic() < deadline:
        t = time.monotonic()
        k = client.key(HOST)
        seen[k] = seen.get(k, 0) + 1
        if k == want:
            if streak == 0:
                streak_start = t
            streak += 1
            if streak >= streak_len:
                return streak_start - t_write, seen
        else:
            streak = 0
    raise AssertionError(f"traffic did not move to {want} within {timeout}s; seen {seen}")


def test_config_update_without_restart(stack: Stack, make_http_backend):
    e = stack.envoy
    v3 = make_http_backend("v3", stack.family)
    stack.backends["v3"] = v3
    pid_before = e.proc.pid
    t_write = stack.hub.write_config(stack.docs(default_split={"v3": 1}))
    elapsed, seen = _follow(stack.client, "v3", t_write, timeout=10)
    # Budget: 2 s after the write plus one hub poll interval (100 ms).
    assert elapsed < 2.1, f"traffic moved to v3 after {elapsed:.2f}s (seen {seen})"
    # Never a request without an upstream (make-before-break: route after cluster).
    assert not [k for k in seen if k.startswith(("status:", "error:"))], seen
    assert e.proc.alive() and e.proc.pid == pid_before
    assert e.dynamic_endpoints().get(CL["v3"]) == [(v3.host, v3.port)]

    # Endpoint change: v3's subset now points at a fresh backend (same label).
    v3b = make_http_backend("v3b", stack.family)
    docs = stack.docs(default_split={"v3": 1})
    eps_doc = docs[1]
    eps_doc["spec"]["endpoints"] = [ep for ep in eps_doc["spec"]["endpoints"] if ep["labels"]["version"] != "v3"]
    eps_doc["spec"]["endpoints"].append(endpoint(v3b.host, v3b.port, {"version": "v3"}))
    t_write = stack.hub.write_config(docs)
    elapsed, seen = _follow(stack.client, "v3b", t_write, timeout=10)
    assert elapsed < 2.1, f"traffic moved to the new v3 endpoint after {elapsed:.2f}s (seen {seen})"
    assert not [k for k in seen if k.startswith(("status:", "error:"))], seen

    # Removal: subsets v1 and v2 go away; Envoy drops their clusters (SotW: absent
    # from the wildcard CDS response; Delta: removed_resources), traffic unaffected.
    docs = stack.docs(default_split={"v3": 1})
    docs[0]["spec"]["subsets"] = [{"name": "v3", "labels": {"version": "v3"}}]
    docs[2]["spec"]["http"] = [docs[2]["spec"]["http"][-1]]  # drop the x-canary -> v2 rule
    docs[1]["spec"]["endpoints"] = [endpoint(v3b.host, v3b.port, {"version": "v3"})]
    stack.hub.write_config(docs)
    wait_equal(lambda: sorted(c for c in e.dynamic_clusters() if c.startswith("outbound|")),
               sorted([CL[""], CL["v3"]]), 5,
               "Envoy dropping the clusters of removed subsets v1, v2")
    wait_equal(lambda: sorted(c for c in e.dynamic_endpoints() if c.startswith("outbound|")),
               sorted([CL[""], CL["v3"]]), 5,
               "Envoy dropping the endpoints of removed subsets v1, v2")
    assert stack.client.counts(100, HOST) == {"v3b": 100}


@pytest.mark.parametrize("family", ["ipv4"])
def test_nack_keeps_last_good_config(stack: Stack):
    hub, e = stack.hub, stack.envoy
    m0 = hub.metrics()
    reload_errors0 = metric_sum(m0, "tributary_config_reload_errors_total")
    good = hub.client(e.node_id)
    assert good, hub.sync_status()

    # Valid for the hub (RE2 syntax), rejected by Envoy.
    bad_rule = {"match": {"path": {"regex": NACK_REGEX}}, "destinations": [dest("reviews", "v2", 1)]}
    hub.write_config(stack.docs(extra_rules=[bad_rule]))

    def nacked():
        c = hub.client(e.node_id)
        for t in (c or {}).get("types", []):
            if t["type_url"] == ROUTE_TYPE and t.get("last_nack"):
                return t
        if metric_sum(hub.metrics(), "tributary_config_reload_errors_total") > reload_errors0:
            raise AssertionError(f"the hub rejected the config instead of serving it: {hub.config_status()}")
        return None
    t = wait_until(nacked, 10, "a RouteConfiguration NACK in /status/sync")
    nack = t["last_nack"]
    assert "program size" in nack["message"] and "nack" in nack["message"], nack
    assert nack.get("nonce"), nack

    # Envoy logged the rejection and kept serving the last good route config.
    wait_until(lambda: "rejected" in e.log.read_text() and NACK_REGEX in e.log.read_text(), 5,
               "Envoy log line about the rejected RouteConfiguration")
    routes = e.dynamic_routes()[LISTENER]
    assert NACK_REGEX not in str(routes), "Envoy applied the rejected route config"
    counts = stack.client.counts(500, HOST)
    assert set(counts) == {"v1", "v2"}, counts
    assert abs(share(counts, "v1") - 0.80) <= 0.07, counts

    # No NACK loop: observe the hub for 3 s; the NACK count stays at one or two and it
    # does not keep sending responses to this client.
    m1 = hub.metrics()
    c1 = hub.client(e.node_id)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        c = hub.client(e.node_id)
        nacks = sum(t["nacks_total"] for t in c["types"])
        assert nacks <= 2, f"NACK loop: {c}"
        time.sleep(0.2)
    if all("responses_total" in t for t in c1["types"]):
        sent1 = sum(t["responses_total"] for t in c1["types"])
        sent2 = sum(t["responses_total"] for t in hub.client(e.node_id)["types"])
        assert sent2 - sent1 <= 1, f"{sent2 - sent1} responses sent to {e.node_id} in 3 s after the NACK"
    m2 = hub.metrics()
    n_nacks = metric_sum(m2, "tributary_xds_nacks_total") - metric_sum(m0, "tributary_xds_nacks_total")
    assert 1 <= n_nacks <= 2, f"tributary_xds_nacks_total grew by {n_nacks}"
    resp_metric = next((n for n in ("tributary_xds_responses_total", "tributary_xds_pushes_total",
                                    "tributary_xds_responses_sent_total")
                        if any(k.split("{")[0] == n for k in m2)), None)
    assert resp_metric, f"no xDS responses metric among {sorted({k.split('{')[0] for k in m2})}"
    grew = metric_sum(m2, resp_metric) - metric_sum(m1, resp_metric)
    assert grew <= 1, f"{resp_metric} grew by {grew} in 3 s after the NACK (re-send loop?)"

    # Fixing the config is applied: ACKed again and traffic follows.
    t_write = hub.write_config(stack.docs(default_split={"v2": 1}))
    _follow(stack.client, "v2", t_write, timeout=10)

    def acked_again():
        c = hub.client(e.node_id)
        t = next(t for t in c["types"] if t["type_url"] == ROUTE_TYPE)
        return t["last_acked_version"] == t["last_sent_version"] and t
    wait_until(acked_again, 5, "the fixed RouteConfiguration ACKed")


@pytest.mark.parametrize("family", ["ipv4"])
def test_invalid_config_keeps_last_good(stack: Stack):
    hub, e = stack.hub, stack.envoy
    errors0 = metric_sum(hub.metrics(), "tributary_config_reload_errors_total")
    docs = stack.docs(default_split={"v2": 1})
    docs[0]["spec"]["ports"][0]["port"] = 70000      # out of range
    hub.write_config(docs)
    wait_until(lambda: metric_sum(hub.metrics(), "tributary_config_reload_errors_total") > errors0, 5,
               "tributary_config_reload_errors_total to count the bad change")
    status = hub.config_status()
    assert "70000" in json.dumps(status) and "mesh.yaml" in json.dumps(status), status
    # Nothing reached Envoy: still the 80/20 split, every type still ACKed, no NACK.
    counts = stack.client.counts(500, HOST)
    assert set(counts) == {"v1", "v2"} and abs(share(counts, "v1") - 0.8) <= 0.07, counts
    c = hub.client(e.node_id)
    assert all(t["nacks_total"] == 0 for t in c["types"]), c
    # The fixed file is applied.
    t_write = hub.write_config(stack.docs(default_split={"v2": 1}))
    _follow(stack.client, "v2", t_write, timeout=10)


@pytest.mark.parametrize("family", ["ipv4"])
def test_hub_restart(family, api_type, build_stack):
    xds_port = free_port(FAMILIES[family])
    stack = build_stack(family, api_type, xds_port=xds_port)
    hub, e = stack.hub, stack.envoy

    hub.stop()
    wait_until(lambda: e.stat("control_plane.connected_state") == 0, 10,
               "Envoy noticing the control plane is gone")
    # Envoy keeps serving its last config without a control plane.
    counts = stack.client.counts(300, HOST)
    assert set(counts) == {"v1", "v2"}, counts

    hub.restart()
    wait_until(lambda: e.stat("control_plane.connected_state") == 1, 20, "Envoy reconnecting")

    def acked():
        c = hub.client(e.node_id)
        if not c:
            return None
        ts = [t for t in c["types"] if t["type_url"].rsplit(".", 1)[-1] in
              ("Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration")]
        return c if len(ts) == 4 and all(t["last_acked_version"] == t["last_sent_version"] for t in ts) else None
    wait_until(acked, 10, "the reconnected Envoy in /status/sync with every type ACKed")
    if api_type == "DELTA_GRPC":
        # Content-hash versions survive a restart: a Delta client reconnecting with
        # initial_resource_versions is not sent unchanged resources again.
        m = hub.metrics()
        assert metric_sum(m, "tributary_xds_requests_total") > 0, "no tributary_xds_requests_total series"
        sent = {k: v for k, v in m.items() if k.startswith("tributary_xds_resources_sent_total") and v}
        assert not sent, f"the restarted hub re-sent unchanged resources to a Delta client: {sent}"

    # Changes after the restart still reach Envoy.
    t_write = hub.write_config(stack.docs(default_split={"v2": 1}))
    _follow(stack.client, "v2", t_write, timeout=10)


@pytest.mark.parametrize("family", ["ipv4"])
def test_environment_isolation(stack: Stack, make_envoy):
    """An Envoy of environment `staging` (whose Gateway `edge` exists, but no services)
    sees none of prod's clusters or hosts, and its listener answers 404 for them."""
    hub = stack.hub
    st_port = free_port(stack.addr)
    docs = stack.docs()
    docs.append(gateway("edge", [{"name": "http", "address": stack.addr, "port": st_port,
                                  "protocol": "HTTP", "hosts": ["*"]}], env="staging"))
    reloads0 = metric_sum(hub.metrics(), "tributary_config_reloads_total")
    hub.write_config(docs)
    wait_until(lambda: metric_sum(hub.metrics(), "tributary_config_reloads_total") > reloads0, 5,
               "the config with the staging Gateway applied")
    st = make_envoy(hub, stack.envoy.api_type, node_id=f"staging-{stack.envoy.api_type.lower()}",
                    metadata={"tributary.io/env": "staging", "tributary.io/gateway": "edge"})
    wait_equal(lambda: list(st.dynamic_listeners()), [LISTENER], 10, "the staging gateway listener")
    sa = st.dynamic_listeners()[LISTENER]["address"]["socket_address"]
    assert int(sa["port_value"]) == st_port, sa
    assert not [c for c in st.dynamic_clusters() if c.startswith("outbound|")], st.dynamic_clusters()
    assert HOST not in json.dumps(st.dynamic_routes()), st.dynamic_routes()
    c = HttpClient(stack.addr, st_port)
    try:
        wait_equal(lambda: c.key(HOST), "status:404", 5, "404 for a prod host on the staging listener")
    finally:
        c.close()
    assert hub.client(st.node_id)["environment"] == "staging"
    # prod is unaffected.
    assert set(stack.client.counts(100, HOST)) == {"v1", "v2"}


# ------------------------------------------------------- dead endpoints (outlier)

POOL_HOST = "pool.prod"

# A backend in a process of its own, so that the test can kill it like a crashed pod:
# prints its port, then serves until killed.
_BACKEND_MAIN = """
import signal, sys
sys.path.insert(0, sys.argv[1])
from peers import HttpBackend
b = HttpBackend(sys.argv[2], sys.argv[3])
print(b.port, flush=True)
signal.pause()
"""


def start_backend_process(tmp_path, backend_id: str, host: str) -> tuple[Proc, int]:
    here = str(Path(__file__).resolve().parent)
    p = Proc(f"backend {backend_id}", [sys.executable, "-c", _BACKEND_MAIN, here, backend_id, host],
             tmp_path / f"backend-{backend_id}.log", stdout_pipe=True)
    line = p.p.stdout.readline()
    assert line.strip().isdigit(), f"backend {backend_id} did not print its port: {line!r}"
    return p, int(line)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_dead_endpoint_stops_taking_traffic(family, api_type, tmp_path, make_hub, make_envoy):
    """Three backends behind a gateway under constant traffic; one is killed. The hub
    still lists it (HEALTHY, as a disconnected cluster's endpoints are during the
    grace period): Envoy's outlier detection (consecutive gateway failures, which the
    hub configures on every EDS cluster) ejects it, and errors stop within 5 s."""
    addr = FAMILIES[family]
    procs = {}
    try:
        for b in ("b1", "b2", "b3"):
            procs[b] = start_backend_process(tmp_path, b, addr)
        gw_port = free_port(addr)
        docs = [
            service("pool", [POOL_HOST], [{"name": "http", "port": PORT, "protocol": "HTTP"}]),
            endpoints("pool", [endpoint(addr, port) for _, port in procs.values()]),
            gateway("edge", [{"name": "http", "address": addr, "port": gw_port, "protocol": "HTTP",
                              "hosts": ["*"]}]),
        ]
        hub = make_hub(family, docs)
        e = make_envoy(hub, api_type, node_id=f"edge-outlier-{family}-{api_type.lower()}")
        cluster = f"outbound|{PORT}||{POOL_HOST}"
        client = HttpClient(addr, gw_port)
        try:
            wait_until(lambda: set(client.counts(30, POOL_HOST)) == {"b1", "b2", "b3"}, 15,
                       "traffic reaching all three backends")
            # Constant traffic; kill b2 after 1 s; keep sending for 8 s after the kill.
            log: list[tuple[float, str]] = []
            t_kill = None
            start = time.monotonic()
            while True:
                now = time.monotonic()
                if t_kill is None and now - start >= 1.0:
                    os.kill(procs["b2"][0].pid, signal.SIGKILL)
                    procs["b2"][0].p.wait(5)
                    t_kill = time.monotonic()
                if t_kill is not None and now - t_kill >= 8.0:
                    break
                log.append((now, client.key(POOL_HOST)))
            after = [(t - t_kill, k) for t, k in log if t >= t_kill]
            errors = [(dt, k) for dt, k in after if k not in ("b1", "b3")]
            last_error = max((dt for dt, _ in errors), default=0.0)
            tail = [k for dt, k in after if dt >= 6.0]
            print(f"\n[{family} {api_type}] {len(after)} requests after the kill, {len(errors)} errors, "
                  f"last error {last_error * 1000:.0f} ms after the kill; errors: {errors[:10]}")
            assert errors, "killing a backend caused no error at all: was it serving?"
            assert last_error < 5.0, \
                f"errors went on until {last_error:.2f} s after the kill ({len(errors)} errors: {errors[-10:]})"
            assert tail and set(tail) <= {"b1", "b3"}, tail
            od = e.config_dump(include_eds=False)
            assert "consecutive_gateway_failure" in json.dumps(od), "no outlier_detection in CDS"
            # Envoy ejected it for consecutive gateway failures.
            _, stats = e.admin_get("/stats?filter=outlier_detection.ejections_enforced_consecutive_gateway_failure")
            ejected = [line for line in stats.splitlines()
                       if line.startswith(f"cluster.{cluster}.") and not line.endswith(": 0")]
            assert ejected, f"no consecutive gateway failure ejection in Envoy's stats: {stats}"
            # The hub still lists the endpoint, HEALTHY: nothing told it the backend died.
            eps = e.clusters_json()[cluster]
            assert len(eps) == 3, eps
            assert all(h.get("health_status", {}).get("eds_health_status", "HEALTHY") == "HEALTHY" for h in eps), eps
        finally:
            client.close()
    finally:
        for p, _ in procs.values():
            p.stop()


# ------------------------------------------------------------ scoped sidecars


def sidecar_scope(name: str, hosts: list[str]) -> dict:
    return {"apiVersion": "tributary.io/v1alpha1", "kind": "Sidecar",
            "metadata": {"name": name, "environment": "prod"},
            "spec": {"dependencies": [{"host": h} for h in hosts]}}


def test_scoped_sidecar_holds_only_its_dependencies(api_type, make_hub, make_envoy):
    """A real Envoy of a sidecar scope accepts the scope's own listeners and route
    tables (docs/xds.md), which hold only the services it depends on; widening the
    scope adds the new dependency's virtual host, and nothing is rejected."""
    http = [{"name": "http", "port": PORT, "protocol": "HTTP"}]
    svcs = [service(n, [f"{n}.prod"], http) for n in ("reviews", "ratings", "details")]
    hub = make_hub(docs=svcs + [sidecar_scope("productpage", ["reviews.prod"])])
    envoy = make_envoy(hub, api_type, node_id=f"productpage-{api_type.lower()}",
                       metadata={"tributary.io/env": "prod", "tributary.io/sidecar": "productpage"})
    listener = f"sidecar|productpage|0.0.0.0_{PORT}"
    table = f"sidecar|productpage|{PORT}"

    def domains() -> list[str]:
        rc = envoy.dynamic_routes().get(table, {})
        return sorted(d for vh in rc.get("virtual_hosts", []) for d in vh["domains"] if ":" not in d)

    wait_equal(lambda: sorted(envoy.dynamic_listeners()), sorted([listener, "virtualOutbound"]), 15,
               "the scope's listeners")
    wait_equal(domains, ["reviews.prod"], 10, "the scope's route table: its dependency only")
    assert sorted(c for c in envoy.dynamic_clusters() if c.startswith("outbound|")) == \
        [f"outbound|{PORT}||reviews.prod"], envoy.dynamic_clusters()

    hub.write_config(svcs + [sidecar_scope("productpage", ["reviews.prod", "ratings.prod"])])
    wait_equal(domains, ["ratings.prod", "reviews.prod"], 10, "the widened scope's route table")
    assert envoy.stat("listener_manager.lds.update_rejected") == 0
    assert (envoy.stat("cluster_manager.cds.update_rejected") or 0) == 0
    assert "details.prod" not in json.dumps(envoy.dynamic_routes())
