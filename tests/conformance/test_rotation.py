"""Rotation under load: real Envoy 1.40 sidecars with certificates from the hub's own
CA (`--mesh-mtls`, over SDS) serve constant traffic to each other through mutual TLS
while the `mesh` intermediate and then the root are rotated, phase by phase
(docs/security.md, "Rotation"). Zero requests may fail, and no connection may be
dropped: the mTLS hop's `upstream_cx_destroy` (client sidecar) and
`downstream_cx_destroy` (server sidecar), and the app's own connections, stay as they
were. Each step waits on what the Envoys hold (their SDS secrets in /config_dump),
never on time.

    load threads ──keep-alive──▶ client sidecar ══mTLS══▶ server sidecar ──▶ backend
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from peers import wait_until
from test_mtls import CLUSTER, HOST, TD, Mesh

LOAD_THREADS = 4


def ca_call(hub, method: str, path: str, body: dict | None = None) -> dict:
    """The hub's CA API (the conformance hub is --insecure: no operator identity)."""
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(hub.admin_url + path, data=data if method == "POST" else None,
                                 method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read().decode())


def certs(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode()) if pem.strip() else []


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def envoy_secrets(envoy) -> dict[str, dict]:
    """The SDS secrets an Envoy holds and uses (`dynamic_active_secrets`), by name."""
    code, text = envoy.admin_get("/config_dump?resource=dynamic_active_secrets")
    assert code == 200, text
    out = {}
    for c in json.loads(text).get("configs", []):
        secret = c.get("secret", {})
        out[c.get("name") or secret.get("name")] = secret
    return out


def held(envoy) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """(its certificate chain, its trust bundle)."""
    s = envoy_secrets(envoy)
    chain = s.get("default", {}).get("tls_certificate", {}).get("certificate_chain", {})
    bundle = s.get("ROOTCA", {}).get("validation_context", {}).get("trusted_ca", {})
    return certs(chain.get("inline_string", "")), certs(bundle.get("inline_string", ""))


class Load:
    """Constant traffic: threads on keep-alive connections to the client sidecar's
    app listener, each sending one request after the other until stopped."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()  # guards ok and failures
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(LOAD_THREADS)]
        for t in self.threads:
            t.start()

    def _run(self):
        conn = http.client.HTTPConnection(self.mesh.host, self.mesh.app_port, timeout=5)
        while not self.stopping.is_set():
            try:
                conn.request("GET", "/", headers={"host": HOST})
                r = conn.getresponse()
                body = r.read()
                good = r.status == 200 and body == b"backend"
                with self.lock:
                    if good:
                        self.ok += 1
                    else:
                        self.failures.append(f"{r.status} {body[:100]!r}")
            except (OSError, http.client.HTTPException) as e:
                with self.lock:
                    self.failures.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection(self.mesh.host, self.mesh.app_port, timeout=5)
            # Paced, so that two sidecars and the hub share the machine's cores.
            self.stopping.wait(0.005)
        conn.close()

    def served(self) -> int:
        with self.lock:
            return self.ok

    def more(self, n: int, what: str):
        """Waits until `n` more requests have succeeded (traffic kept flowing)."""
        target = self.served() + n
        wait_until(lambda: self.served() >= target, 30, f"{n} more requests after {what}")

    def stop(self) -> tuple[int, list[str]]:
        self.stopping.set()
        for t in self.threads:
            t.join(10)
        return self.ok, self.failures


def data_listener_stat(envoy, suffix: str) -> int:
    """`listener_stat` without the admin listener (which our own polling uses)."""
    code, text = envoy.admin_get(f"/stats?filter={suffix}$")
    assert code == 200, text
    total = 0
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if (name.startswith("listener.") and not name.startswith("listener.admin.")
                and name.endswith("." + suffix)):
            total += int(value)
    return total


def connection_stats(mesh: Mesh) -> dict[str, int]:
    """Every counter of a connection closed, on each hop."""
    c, s = mesh.client, mesh.server
    return {
        "client upstream_cx_destroy": c.stat(f"cluster.{CLUSTER}.upstream_cx_destroy") or 0,
        "client upstream_cx_connect_fail": c.stat(f"cluster.{CLUSTER}.upstream_cx_connect_fail") or 0,
        "client app downstream_cx_destroy": data_listener_stat(c, "downstream_cx_destroy"),
        "server downstream_cx_destroy": data_listener_stat(s, "downstream_cx_destroy"),
        "server ssl.connection_error": data_listener_stat(s, "ssl.connection_error"),
        "server ssl.fail_verify_error": data_listener_stat(s, "ssl.fail_verify_error"),
        "client ssl.fail_verify_error": c.stat(f"cluster.{CLUSTER}.ssl.fail_verify_error") or 0,
    }


def test_rotating_the_intermediate_then_the_root_under_load_fails_nothing(
        tmp_path, make_hub, api_type):
    mesh = Mesh(tmp_path, make_hub, api_type, "ipv4",
                hub_args=["--mesh-mtls", "--trust-domain", TD])
    load = None
    try:
        def through():
            try:
                return mesh.get() == (200, b"backend")
            except OSError:
                return False
        wait_until(through, 20, "a request through both sidecars reaches the backend")
        sidecars = (mesh.client, mesh.server)
        status = ca_call(mesh.hub, "GET", "/v1/ca")
        old_root = status["root"]

        def chains_to(root_fp: str, envoy) -> bool:
            """Its chain's intermediate was signed by the root `root_fp`, which its
            bundle holds."""
            chain, bundle = held(envoy)
            roots = {fingerprint(r): r for r in bundle}
            return (len(chain) == 2 and root_fp in roots
                    and chain[1].issuer == roots[root_fp].subject)

        wait_until(lambda: all(chains_to(old_root, e) for e in sidecars), 20,
                   "both sidecars hold a certificate of the hub's CA")
        load = Load(mesh)
        load.more(100, "start")
        before = connection_stats(mesh)

        # The mesh intermediate: both sidecars move to a certificate of the new one.
        old_inters = {e.node_id: fingerprint(held(e)[0][1]) for e in sidecars}
        status = ca_call(mesh.hub, "POST", "/v1/ca/rotate", {"intermediate": "mesh"})
        new_inter = status["intermediates"]["mesh"]["fingerprint"]
        assert new_inter not in old_inters.values(), status
        wait_until(lambda: all(fingerprint(held(e)[0][1]) == new_inter for e in sidecars), 30,
                   "both sidecars hold a certificate of the new intermediate")
        load.more(100, "the intermediate rotation")

        # The root, phase 1: both sidecars hold the two-root bundle, still issued from
        # the old root.
        status = ca_call(mesh.hub, "POST", "/v1/ca/rotate",
                         {"root": True, "trust_window": "1h", "overlap": "1h"})
        assert status["phase"] == "trusting-new", status
        new_root = status["incoming"]["root"]
        wait_until(lambda: all({fingerprint(r) for r in held(e)[1]} == {old_root, new_root}
                               and chains_to(old_root, e) for e in sidecars), 30,
                   "both sidecars trust the old and the new root")
        load.more(100, "trusting the new root")

        # Phase 2: the new root signs; both sidecars move to it, the old root is
        # still trusted.
        status = ca_call(mesh.hub, "POST", "/v1/ca/promote", {})
        assert status["phase"] == "issuing-from-new" and status["root"] == new_root, status
        wait_until(lambda: all(chains_to(new_root, e) and len(held(e)[1]) == 2
                               for e in sidecars), 30,
                   "both sidecars hold a certificate of the new root")
        load.more(100, "issuing from the new root")

        # Phase 3: the old root leaves every bundle.
        status = ca_call(mesh.hub, "POST", "/v1/ca/finish-rotation", {})
        assert status["phase"] == "steady", status
        wait_until(lambda: all([fingerprint(r) for r in held(e)[1]] == [new_root]
                               and chains_to(new_root, e) for e in sidecars), 30,
                   "both sidecars trust the new root alone")
        load.more(100, "dropping the old root")

        after = connection_stats(mesh)
        served, failures = load.stop()
        load = None
        assert not failures, f"{len(failures)} of {served + len(failures)} requests failed: {failures[:5]}"
        assert after == before, f"connections closed during the rotation: before {before}, after {after}"
        # The hub saw every secret ACKed, none NACKed.
        for node in ("client-sidecar", "server-sidecar"):
            c = mesh.hub.client(node)
            assert c and all(t.get("nacks_total", 0) == 0 for t in c["types"]), c
    finally:
        if load:
            load.stop()
        mesh.stop()
