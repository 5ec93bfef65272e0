"""Cross-zone locality through a real Envoy 1.40: the 98/1/1 split and failover.

One `tributary hub` (embedded store; it serves, and leads, the three shards of
`prod`: zones az1, az2, az3, each with an east-west gateway; `localPercent: 98`).
`reviews` has one endpoint in az1 — a loopback backend answering `local` — and two
in each of az2 and az3 (addresses nobody listens on: a proxy of az1 must reach those
zones only through their gateways). The gateways of az2 and az3 are loopback
backends answering `gw-az2` / `gw-az3`. An Envoy of zone az1 (SotW over IPv4, Delta
over IPv6) routes through its edge gateway listener to `reviews`:

- az1's load assignment holds the local endpoint at priority 0 and the two gateways
  at priority 1, with overprovisioning factor 98: over N = 10,000 requests the
  counts of `local`, `gw-az2` and `gw-az3` must each fall inside the two-sided 99.9%
  interval of a binomial(N, p) with p = 0.98, 0.01, 0.01 (exact quantiles, computed
  below). Envoy draws the priority of each request at random (so `local` is exactly
  binomial(N, 0.98)); within priority 1 it alternates between the two equally
  weighted gateways, which makes each gateway's count *less* variable than a
  binomial(N, 0.01): the bounds are conservative for them.
- the local endpoint is then marked UNHEALTHY in the config (as an agent reports a
  failing pod): priority 0 has no healthy endpoint and every request goes to the
  remote zones' gateways, split between them.
"""

from __future__ import annotations

import math

import pytest

from peers import (
    FAMILIES, Envoy, HttpBackend, HttpClient, Hub, dest, endpoint, endpoints, free_port,
    gateway, route, service, wait_until,
)

HOST = "reviews.prod"
PORT = 9080
CLUSTER = f"outbound|{PORT}||{HOST}"
N = 10_000
CONFIDENCE = 0.999


def binomial_interval(n: int, p: float, confidence: float = CONFIDENCE) -> tuple[int, int]:
    """The exact two-sided `confidence` interval of binomial(n, p): the smallest
    [lo, hi] with P(X < lo) <= (1 - c) / 2 and P(X > hi) <= (1 - c) / 2."""
    tail = (1 - confidence) / 2
    log_p, log_q = math.log(p), math.log1p(-p)
    cdf, lo, hi = 0.0, None, n
    for k in range(n + 1):
        pmf = math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                       + k * log_p + (n - k) * log_q)
        if lo is None and cdf + pmf > tail:
            lo = k
        cdf += pmf
        if cdf >= 1 - tail:
            hi = k
            break
    assert lo is not None
    return lo, hi


def test_binomial_interval_matches_the_normal_approximation():
    lo, hi = binomial_interval(N, 0.98)
    sd = math.sqrt(N * 0.98 * 0.02)
    assert abs(lo - (9800 - 3.29 * sd)) < 5 and abs(hi - (9800 + 3.29 * sd)) < 5, (lo, hi)
    lo, hi = binomial_interval(N, 0.01)
    assert 60 <= lo <= 72 and 128 <= hi <= 140, (lo, hi)


def mesh(host: str, local: HttpBackend, gw2: HttpBackend, gw3: HttpBackend, gw1_port: int,
         edge_port: int, local_healthy: bool) -> list[dict]:
    def zone_ep(address: str, port: int, zone: str, health: str = "HEALTHY") -> dict:
        return endpoint(address, port, health=health,
                        locality={"region": "r1", "zone": zone, "cluster": f"c-{zone}"})

    # Nobody listens on port 1: if az1's proxy ever used these directly, requests fail.
    remote = [zone_ep(host, 1, z) for z in ("az2", "az3") for _ in range(2)]
    return [
        {"apiVersion": "tributary.io/v1alpha1", "kind": "Environment",
         "metadata": {"name": "prod"},
         "spec": {"zones": ["az1", "az2", "az3"],
                  "eastWestGateways": [
                      {"zone": "az1", "address": host, "port": gw1_port},
                      {"zone": "az2", "address": gw2.host, "port": gw2.port},
                      {"zone": "az3", "address": gw3.host, "port": gw3.port}],
                  "locality": {"localPercent": 98}}},
        service("reviews", [HOST], [{"name": "http", "port": PORT, "protocol": "HTTP"}]),
        endpoints("reviews", [zone_ep(local.host, local.port, "az1",
                                      "HEALTHY" if local_healthy else "UNHEALTHY"), *remote]),
        route("reviews", [HOST], [{"destinations": [dest("reviews")]}], port=PORT),
        gateway("edge", [{"name": "http", "address": host, "port": edge_port, "protocol": "HTTP",
                          "hosts": ["*"]}]),
    ]


@pytest.mark.parametrize("api_type,family", [("GRPC", "ipv4"), ("DELTA_GRPC", "ipv6")])
def test_envoy_splits_98_1_1_and_fails_over_to_the_remote_zones(tmp_path, api_type, family):
    host = FAMILIES[family]
    local, gw2, gw3 = HttpBackend("local", host), HttpBackend("gw-az2", host), HttpBackend("gw-az3", host)
    edge_port, gw1_port = free_port(host), free_port(host)
    hub = envoy = None
    try:
        hub = Hub(tmp_path, family=family, extra_args=["--replicas-per-shard", "1"])
        hub.write_config(mesh(host, local, gw2, gw3, gw1_port, edge_port, True))
        hub.start()
        envoy = Envoy(tmp_path, hub, api_type, "edge-az1").start()  # locality zone az1
        # Once az2's and az3's leaders published their summaries, az1's view holds
        # their gateways (and none of their own endpoints).
        want = sorted([(local.host, local.port), (gw2.host, gw2.port), (gw3.host, gw3.port)])
        wait_until(lambda: envoy.dynamic_endpoints().get(CLUSTER) == want, 30,
                   f"Envoy's endpoints of {CLUSTER}: the local backend and the two gateways")
        client = HttpClient(host, edge_port)

        counts = client.counts(N, HOST)
        bounds = {"local": binomial_interval(N, 0.98), "gw-az2": binomial_interval(N, 0.01),
                  "gw-az3": binomial_interval(N, 0.01)}
        print(f"\n{api_type}/{family}: {N} requests: {counts}; 99.9% bounds {bounds}")
        assert set(counts) == set(bounds), counts
        for name, (lo, hi) in bounds.items():
            assert lo <= counts[name] <= hi, (name, counts, bounds)

        # Every local endpoint unhealthy: all traffic to the remote zones.
        hub.write_config(mesh(host, local, gw2, gw3, gw1_port, edge_port, False))
        wait_until(lambda: "local" not in client.counts(50, HOST), 30,
                   "traffic leaves the unhealthy local endpoint")
        after = client.counts(1000, HOST)
        print(f"{api_type}/{family}: local endpoint unhealthy, 1000 requests: {after}")
        assert set(after) == {"gw-az2", "gw-az3"}, after
        assert min(after.values()) >= 400, after  # the gateways alternate (equal weights)

        # Healthy again: back to the local zone, but for the configured 2%.
        hub.write_config(mesh(host, local, gw2, gw3, gw1_port, edge_port, True))
        wait_until(lambda: client.counts(100, HOST).get("local", 0) >= 90, 30,
                   "traffic returns to the local endpoint")
        client.close()
    finally:
        if envoy:
            envoy.stop()
        if hub:
            hub.stop()
        for b in (local, gw2, gw3):
            b.stop()
