"""Intermediate rotation with an overlap, then revocation, with real Envoy 1.40
sidecars on the hub's own CA (`--mesh-mtls`, over SDS; docs/security.md,
"Rotating an intermediate"):

- during the overlap the sidecars move to certificates of the new `mesh`
  intermediate while constant traffic flows between them (zero failed requests, no
  connection of the sidecar hop dropped), and a client still holding a certificate
  of the old intermediate is served by the server sidecar;
- once the rotation is finished the old intermediate is revoked: the CRL pushed
  over SDS lists it, and the server sidecar refuses that client at the handshake
  (`ssl.fail_verify_error`), while the renewed sidecars keep serving.

    load threads ──keep-alive──▶ client sidecar ══mTLS══▶ server sidecar ──▶ backend
    old-intermediate client ──────────────mTLS──────────▶ server sidecar
"""

from __future__ import annotations

import http.client
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from peers import hostport, hub_binary, wait_until
from test_mtls import CLIENT_ID, Mesh, listener_stat, tls_get
from test_rotation import (Load, ca_call, connection_stats, data_listener_stat, envoy_secrets,
                           fingerprint, held)


def cert_request(hub, out: Path, identity: str) -> tuple[Path, Path, Path]:
    """A certificate of the hub's CA for `identity` through the CSR API, as a peer
    with file certificates gets it: a join token, then `tributary cert request`.
    (cert.pem, key.pem, ca.pem)."""
    admin = hostport(*hub.admin)
    token = subprocess.run(
        [str(hub_binary()), "token", "create", "--identity", identity, "--admin", admin],
        capture_output=True, text=True, timeout=30)
    assert token.returncode == 0, token.stderr
    got = subprocess.run(
        [str(hub_binary()), "cert", "request", "--server", f"http://{admin}",
         "--token", token.stdout.strip(), "--out", str(out)],
        capture_output=True, text=True, timeout=30)
    assert got.returncode == 0, got.stderr
    return out / "cert.pem", out / "key.pem", out / "ca.pem"


def crls_held(envoy) -> list[x509.CertificateRevocationList]:
    """The CRLs of the ROOTCA secret an Envoy holds and uses."""
    crl = (envoy_secrets(envoy).get("ROOTCA", {}).get("validation_context", {})
           .get("crl", {}).get("inline_string", ""))
    blocks = crl.split("-----END X509 CRL-----")
    return [x509.load_pem_x509_crl((b + "-----END X509 CRL-----\n").encode())
            for b in blocks if "-----BEGIN X509 CRL-----" in b]


def revoked_serials(envoy) -> set[int]:
    return {r.serial_number for c in crls_held(envoy) for r in c}


def test_a_revoked_intermediate_is_refused_while_renewed_sidecars_keep_serving(
        tmp_path, make_hub, api_type):
    mesh = Mesh(tmp_path, make_hub, api_type, "ipv4",
                hub_args=["--mesh-mtls", "--trust-domain", "td.test"])
    load = None
    direct = 0  # connections made straight to the server sidecar's inbound port
    try:
        def through():
            try:
                return mesh.get() == (200, b"backend")
            except OSError:
                return False
        wait_until(through, 20, "a request through both sidecars reaches the backend")
        sidecars = (mesh.client, mesh.server)
        host, port = mesh.host, mesh.inbound_port
        # Every CA of the chain has a CRL in the validation context (the root and the
        # mesh intermediate), none revoking anything yet.
        wait_until(lambda: all(len(crls_held(e)) >= 2 for e in sidecars), 20,
                   "both sidecars hold the CRLs of the hub's CA")
        assert not any(revoked_serials(e) for e in sidecars)

        # A peer with file certificates, signed by the current mesh intermediate.
        cert, key, ca = cert_request(mesh.hub, tmp_path / "old", CLIENT_ID)
        old_chain = x509.load_pem_x509_certificates(cert.read_bytes())
        old_inter = old_chain[1]
        assert tls_get(host, port, ca, (cert, key)).startswith("200"), "served before the rotation"
        direct += 1

        load = Load(mesh)
        load.more(100, "start")
        before = connection_stats(mesh)
        server_destroyed = data_listener_stat(mesh.server, "downstream_cx_destroy")

        # Rotate: the sidecars move to the new intermediate during the overlap.
        status = ca_call(mesh.hub, "POST", "/v1/ca/rotate",
                         {"intermediate": "mesh", "overlap": "1h"})
        new_inter = status["intermediates"]["mesh"]["fingerprint"]
        retiring = status["intermediates"]["mesh"]["retiring"]
        assert [r["fingerprint"] for r in retiring] == [fingerprint(old_inter)], status
        wait_until(lambda: all(fingerprint(held(e)[0][1]) == new_inter for e in sidecars), 30,
                   "both sidecars hold a certificate of the new intermediate")
        load.more(100, "the intermediate rotation")
        # The old intermediate's certificate is still accepted during the overlap.
        assert tls_get(host, port, ca, (cert, key)).startswith("200"), "served during the overlap"
        direct += 1

        # Finish: the old intermediate is revoked, the CRL pushed to both sidecars.
        status = ca_call(mesh.hub, "POST", "/v1/ca/finish-rotation", {"intermediate": "mesh"})
        assert [int(r["serial"], 16) for r in status["revoked"]] == [old_inter.serial_number], status
        assert status["intermediates"]["mesh"].get("retiring", []) == [], status
        wait_until(lambda: all(old_inter.serial_number in revoked_serials(e) for e in sidecars), 30,
                   "both sidecars hold the CRL revoking the old intermediate")
        failed_before = listener_stat(mesh.server, "ssl.fail_verify_error")
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)):
            tls_get(host, port, ca, (cert, key))
        direct += 1
        wait_until(lambda: listener_stat(mesh.server, "ssl.fail_verify_error") > failed_before, 5,
                   "the server sidecar counts the revoked certificate as unverifiable")
        load.more(100, "the revocation")

        # A certificate of the new intermediate is served.
        cert2, key2, ca2 = cert_request(mesh.hub, tmp_path / "new", CLIENT_ID)
        assert fingerprint(x509.load_pem_x509_certificates(cert2.read_bytes())[1]) == new_inter
        assert tls_get(host, port, ca2, (cert2, key2)).startswith("200")
        direct += 1

        after = connection_stats(mesh)
        served, failures = load.stop()
        load = None
        assert not failures, f"{len(failures)} of {served + len(failures)} requests failed: {failures[:5]}"
        # The sidecar hop and the app's connections: nothing dropped. The server
        # sidecar closed exactly the direct connections of this test, and counted
        # one verification failure (the revoked client) and nothing else.
        for k in ("client upstream_cx_destroy", "client upstream_cx_connect_fail",
                  "client app downstream_cx_destroy", "client ssl.fail_verify_error"):
            assert after[k] == before[k], f"{k}: before {before}, after {after}"
        assert after["server ssl.fail_verify_error"] == before["server ssl.fail_verify_error"] + 1, \
            f"before {before}, after {after}"
        wait_until(lambda: data_listener_stat(mesh.server, "downstream_cx_destroy")
                   == server_destroyed + direct - 1, 5,
                   "the server sidecar closed only this test's direct connections")
        for node in ("client-sidecar", "server-sidecar"):
            c = mesh.hub.client(node)
            assert c and all(t.get("nacks_total", 0) == 0 for t in c["types"]), c
    finally:
        if load:
            load.stop()
        mesh.stop()
