"""Envoy 1.40 against the hub under faults: per-resource NACKs (SotW and Delta, LDS and
CDS) and make-before-break under constant traffic. docs/xds.md has the rules."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from peers import (
    FAMILIES, HttpClient, endpoint, endpoints, free_port, gateway, route, service, wait_until,
)

ADDR = FAMILIES["ipv4"]


def occupied_port() -> tuple[socket.socket, int]:
    """A listening socket holding a loopback port (without SO_REUSEPORT, so Envoy's
    listener cannot bind it)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((ADDR, 0))
    s.listen(1)
    return s, s.getsockname()[1]


def rejected(envoy, kind: str) -> int:
    stat = {"lds": "listener_manager.lds.update_rejected", "cds": "cluster_manager.cds.update_rejected"}[kind]
    return envoy.stat(stat) or 0


def hub_nacks(hub, node_id: str, short: str) -> int:
    c = hub.client(node_id) or {}
    return sum(t["nacks_total"] for t in c.get("types", []) if t["type_url"].endswith(short))


def plain(name: str, port_name: str = "http") -> dict:
    return service(name, [f"{name}.prod"], [{"name": port_name, "port": 8080, "protocol": "HTTP"}])


# ------------------------------------------------------------------ LDS: listeners


def gw_listener(name: str, port: int) -> dict:
    return {"name": name, "address": ADDR, "port": port, "protocol": "HTTP", "hosts": ["*"]}


def lds_docs(listeners: list[dict]) -> list[dict]:
    return [plain("a"), endpoints("a", [endpoint(ADDR, 9)]), gateway("edge", listeners)]


def active_listeners(envoy) -> dict[str, int]:
    return {n: int(l["address"]["socket_address"]["port_value"])
            for n, l in envoy.dynamic_listeners().items()}


@pytest.mark.parametrize("case", ["new", "update"])
def test_lds_nack_of_one_listener_keeps_the_others(make_hub, make_envoy, api_type, case):
    holder, busy = occupied_port()
    try:
        base = [gw_listener("http", free_port(ADDR))]
        x = {n: free_port(ADDR) for n in ("x1", "x2", "x3")}
        if case == "update":
            # x1..x3 exist; x1's update moves it to a port it cannot bind.
            base += [gw_listener(n, p) for n, p in x.items()]
        hub = make_hub("ipv4", lds_docs(base))
        e = make_envoy(hub, api_type, node_id=f"lds-{case}-{api_type.lower()}")
        want = {"gateway|edge|" + l["name"]: l["port"] for l in base}
        wait_until(lambda: active_listeners(e) == want, 15, f"Envoy holding {want}")

        if case == "new":
            edit = base + [gw_listener("bad", busy)] + [gw_listener(n, p) for n, p in x.items()]
            want.update({f"gateway|edge|{n}": p for n, p in x.items()})
        else:
            edit = [gw_listener("http", base[0]["port"]), gw_listener("x1", busy)] + \
                   [gw_listener(n, x[n]) for n in ("x2", "x3")]
        hub.write_config(lds_docs(edit))
        wait_until(lambda: rejected(e, "lds") >= 1, 10, "Envoy rejecting the listener it cannot bind")
        wait_until(lambda: hub_nacks(hub, e.node_id, "Listener") == 1, 10, "the hub recording the NACK")

        # Five unrelated changes, each adding a listener.
        for i in range(1, 6):
            port = free_port(ADDR)
            edit = edit + [gw_listener(f"u{i}", port)]
            want[f"gateway|edge|u{i}"] = port
            hub.write_config(lds_docs(edit))
            wait_until(lambda: f"gateway|edge|u{i}" in active_listeners(e), 10, f"listener u{i}")
        wait_until(lambda: active_listeners(e) == want, 10,
                   f"Envoy holding every listener it accepted, at its accepted port: {want}")
        assert rejected(e, "lds") == 1, "Envoy rejected more than one LDS update (a resend of the bad listener?)"
        assert hub_nacks(hub, e.node_id, "Listener") == 1
        assert (e.stat("listener_manager.listener_removed") or 0) == 0, "Envoy removed an accepted listener"
        nack = next(t for t in hub.client(e.node_id)["types"] if t["type_url"].endswith("Listener"))["last_nack"]
        bad = "gateway|edge|bad" if case == "new" else "gateway|edge|x1"
        assert nack["resources"] == [bad], nack
    finally:
        holder.close()


# ------------------------------------------------------------------ CDS: clusters


def cds_docs(names: list[str], invalid: str | None = None) -> list[dict]:
    docs = [plain(n, "test-invalid-http" if n == invalid else "http") for n in names]
    docs += [gateway("edge", [gw_listener("http", 18999)])]
    return docs


def outbound(envoy) -> dict[str, str]:
    """Envoy's clusters of our services, with their connect timeouts."""
    return {n: c.get("connect_timeout", "") for n, c in envoy.dynamic_clusters().items()
            if n.startswith("outbound|")}


def cl(name: str) -> str:
    return f"outbound|8080||{name}.prod"


@pytest.mark.parametrize("case", ["new", "update"])
def test_cds_nack_of_one_cluster_keeps_the_others(make_hub, make_envoy, api_type, case):
    old = ["old", "c1", "c2", "c3"] if case == "update" else ["old"]
    hub = make_hub("ipv4", cds_docs(old), extra_args=["--test-hooks"])
    e = make_envoy(hub, api_type, node_id=f"cds-{case}-{api_type.lower()}")
    wait_until(lambda: set(outbound(e)) == {cl(n) for n in old}, 15, "Envoy holding the first clusters")

    if case == "new":
        names, invalid = ["old", "c1", "c2", "c3", "bad"], "bad"
    else:
        names, invalid = ["old", "c1", "c2", "c3"], "c1"  # c1's update is invalid
    hub.write_config(cds_docs(names, invalid))
    wait_until(lambda: rejected(e, "cds") >= 1, 10, "Envoy rejecting the invalid cluster")
    wait_until(lambda: hub_nacks(hub, e.node_id, "Cluster") == 1, 10, "the hub recording the NACK")

    for i in range(1, 6):
        names = names + [f"u{i}"]
        hub.write_config(cds_docs(names, invalid))
        wait_until(lambda: cl(f"u{i}") in outbound(e), 10, f"cluster u{i}")
    want = {cl(n) for n in names if n != "bad"}
    wait_until(lambda: set(outbound(e)) == want, 10, f"Envoy holding exactly {sorted(want)}")
    # Every cluster is at a valid version (the updated one at its last good version).
    assert all(t == "1s" for t in outbound(e).values()), outbound(e)
    assert rejected(e, "cds") == 1, "Envoy rejected more than one CDS update (a resend of the bad cluster?)"
    assert hub_nacks(hub, e.node_id, "Cluster") == 1
    assert (e.stat("cluster_manager.cluster_removed") or 0) == 0, "Envoy removed an accepted cluster"
    nack = next(t for t in hub.client(e.node_id)["types"] if t["type_url"].endswith(".Cluster"))["last_nack"]
    assert nack["resources"] == [cl(invalid)], nack


# ------------------------------------------------- make-before-break under traffic

HOST = "r.prod"


def switch_docs(backends: dict, subsets: list[str], to: str, gw_port: int) -> list[dict]:
    return [
        service("r", [HOST], [{"name": "http", "port": 8080, "protocol": "HTTP"}],
                subsets=[{"name": s, "labels": {"version": s}} for s in subsets]),
        endpoints("r", [endpoint(b.host, b.port, {"version": s}) for s, b in sorted(backends.items())]),
        route("r", [HOST], [{"destinations": [{"service": "r", "subset": to}]}], port=8080),
        gateway("edge", [gw_listener("http", gw_port)]),
    ]


def test_route_switch_and_cluster_removal_lose_no_request(make_hub, make_envoy, make_http_backend, api_type):
    """Constant traffic while the route moves between subsets and the old subset's
    cluster is removed in the same edit: not one request fails."""
    backends = {s: make_http_backend(s) for s in ("a", "b")}
    gw_port = free_port(ADDR)
    hub = make_hub("ipv4", switch_docs(backends, ["a", "b"], "a", gw_port))
    e = make_envoy(hub, api_type, node_id=f"mbb-{api_type.lower()}")
    client = HttpClient(ADDR, gw_port)
    wait_until(lambda: client.key(HOST) == "a", 15, "traffic through the gateway to subset a")

    stop = threading.Event()
    results: dict[str, int] = {}
    failures: list[tuple[float, str]] = []

    def traffic():
        c = HttpClient(ADDR, gw_port)
        try:
            while not stop.is_set():
                k = c.key(HOST)
                results[k] = results.get(k, 0) + 1
                if k not in ("a", "b"):
                    failures.append((time.monotonic(), k))
        finally:
            c.close()

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        # a → b (a's cluster removed), b → a (b's removed), ... while traffic flows.
        cur = "a"
        for _ in range(6):
            nxt = "b" if cur == "a" else "a"
            hub.write_config(switch_docs(backends, [nxt], nxt, gw_port))
            wait_until(lambda: f"outbound|8080|{cur}|{HOST}" not in e.dynamic_clusters(), 10,
                       f"Envoy dropping subset {cur}'s cluster")
            time.sleep(0.3)  # let traffic run on the new subset before the next switch
            cur = nxt
        wait_until(lambda: sum(results.values()) >= 5000, 60, "at least 5,000 requests")
    finally:
        stop.set()
        t.join(10)
        client.close()
    total = sum(results.values())
    print(f"make-before-break: {total} requests, by answer {results}")
    assert total >= 5000
    assert not failures, f"{len(failures)} failed requests of {total}: {failures[:10]}"
    assert (e.stat("cluster_manager.cluster_removed") or 0) >= 6
