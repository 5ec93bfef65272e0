"""Mesh mTLS between real Envoy 1.40 sidecars through the hub's config (SotW and
Delta, IPv4 and IPv6): certificates from SDS over ADS, SPIFFE SAN checks, and a
server-side sidecar that refuses clients without a valid certificate.

    app ──plain──▶ client sidecar ══mTLS══▶ server sidecar (inbound) ──plain──▶ backend

The client sidecar's app-facing listener is a static one in its bootstrap (no
iptables on loopback) that uses the hub's route table `sidecar|client|9080`; the
cluster, the inbound listener and both sidecars' certificates come from the hub,
which issues them from a throwaway root (`--test-issuer`).
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import socket
import ssl
import threading
from pathlib import Path

import pytest
import yaml

from peers import (
    API_VERSION, FAMILIES, Envoy, endpoint, endpoints, free_port, service,
    wait_until,
)

TD = "td.test"
HOST = "backend.prod"
PORT = 9080
CLUSTER = f"outbound|{PORT}||{HOST}"
CLIENT_ID = f"spiffe://{TD}/env/prod/ns/default/sa/client"


class XfccBackend:
    """An HTTP/1.1 server on loopback that records the `x-forwarded-client-cert`
    header of every request it answers."""

    def __init__(self, host: str):
        self.seen: list[str | None] = []
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                backend.seen.append(self.headers.get("x-forwarded-client-cert"))
                body = b"backend"
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True

        self.server = Server((host, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def sidecar(name: str, dependencies: list[dict], inbound: list[dict] | None = None) -> dict:
    spec: dict = {"dependencies": dependencies}
    if inbound:
        spec["inbound"] = inbound
    return {"apiVersion": API_VERSION, "kind": "Sidecar",
            "metadata": {"name": name, "environment": "prod"}, "spec": spec}


def workload_meta(scope: str, service_account: str, namespace: str = "default") -> dict:
    return {"tributary.io/env": "prod", "tributary.io/sidecar": scope,
            "tributary.io/namespace": namespace, "tributary.io/service-account": service_account}


def listener_stat(envoy: Envoy, suffix: str) -> int:
    """The sum of `listener.*.{suffix}` over the Envoy's listeners."""
    code, text = envoy.admin_get(f"/stats?filter={suffix}$")
    assert code == 200, text
    total = 0
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith("listener.") and name.endswith("." + suffix):
            total += int(value)
    return total


def app_listener(host: str, port: int) -> dict:
    """What iptables would capture: the app's plain HTTP into the client sidecar,
    routed by the hub's route table for port 9080 of scope `client`."""
    return {
        "name": "app_outbound",
        "address": {"socket_address": {"address": host, "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "app_outbound",
                "rds": {"route_config_name": f"sidecar|client|{PORT}",
                        "config_source": {"ads": {}, "resource_api_version": "V3"}},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }}]}],
    }


def start_envoy(tmp_path: Path, hub, api_type: str, node_id: str, meta: dict,
                static_listeners: list[dict] | None = None) -> Envoy:
    e = Envoy(tmp_path, hub, api_type, node_id, metadata=meta)
    if static_listeners:
        e.bootstrap["static_resources"]["listeners"] = static_listeners
        e.bootstrap_path.write_text(yaml.safe_dump(e.bootstrap, sort_keys=False))
    try:
        return e.start()
    except BaseException:
        e.stop()
        raise


def foreign_client_cert(tmp_path: Path, uri: str) -> tuple[Path, Path]:
    """A client certificate carrying `uri` from a CA the mesh does not trust."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID, ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "foreign root")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "foreign.crt", tmp_path / "foreign.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                          + ca.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def tls_get(host: str, port: int, ca: Path, cert: tuple[Path, Path] | None) -> str:
    """An HTTPS GET straight to the server sidecar's inbound port: the response's
    status line, or raises (handshake refused, connection reset or closed)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False  # SPIFFE certificates name a URI, not a host
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=5)
    try:
        conn.request("GET", "/", headers={"host": HOST})
        r = conn.getresponse()
        return f"{r.status} {r.read()!r}"
    finally:
        conn.close()


def plain_get(host: str, port: int) -> bytes:
    """Plain HTTP straight to the inbound port: what comes back before it closes."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(f"GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode())
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return got


class Mesh:
    """The backend, the hub, and the two sidecars: the server sidecar's identity is
    in namespace `server_namespace` (the service's is `default`)."""

    def __init__(self, tmp_path: Path, make_hub, api_type: str, family: str,
                 server_namespace: str = "default", hub_args: list[str] | None = None):
        self.host = host = FAMILIES[family]
        self.envoys: list[Envoy] = []
        self.backend = XfccBackend(host)
        # The issuer: a throwaway root by default, or what `hub_args` says (the hub's
        # own CA with --mesh-mtls).
        self.hub_args = hub_args
        try:
            self._start(tmp_path, make_hub, api_type, family, server_namespace)
        except BaseException:
            self.stop()  # what was started (the hub is the make_hub fixture's)
            raise

    def _start(self, tmp_path, make_hub, api_type, family, server_namespace):
        host = self.host
        self.inbound_port = free_port(host)
        issuer_dir = tmp_path / "issuer"
        docs = [
            service("backend", [HOST], [{"name": "http", "port": PORT, "protocol": "HTTP"}]),
            endpoints("backend", [endpoint(host, self.inbound_port)]),
            sidecar("client", [{"host": HOST}]),
            sidecar("server", [{"namespace": "default"}],
                    inbound=[{"port": self.inbound_port, "bind": host, "targetAddress": host,
                              "targetPort": self.backend.port}]),
        ]
        hub_args = self.hub_args or ["--test-issuer", str(issuer_dir), "--trust-domain", TD]
        self.hub = make_hub(family=family, docs=docs, extra_args=hub_args)
        self.root = issuer_dir / "root.pem"
        self.app_port = free_port(host)
        self.client = self._envoy(tmp_path, api_type, "client-sidecar",
                                  workload_meta("client", "client"),
                                  [app_listener(host, self.app_port)])
        self.server = self._envoy(tmp_path, api_type, "server-sidecar",
                                  workload_meta("server", "server", server_namespace))
        inbound_name = f"sidecar|server|inbound|{self.inbound_port}"
        wait_until(lambda: inbound_name in self.server.dynamic_listeners(), 20,
                   "the server sidecar's inbound listener is active (its secrets arrived)")
        wait_until(lambda: CLUSTER in self.client.dynamic_clusters()
                   and self.client.dynamic_endpoints().get(CLUSTER) == [(host, self.inbound_port)],
                   20, "the client sidecar's cluster is warm (its secrets arrived)")

    def _envoy(self, tmp_path, api_type, node_id, meta, static_listeners=None) -> Envoy:
        e = start_envoy(tmp_path, self.hub, api_type, node_id, meta, static_listeners)
        self.envoys.append(e)
        return e

    def get(self) -> tuple[int, bytes]:
        """GET through the client sidecar (what the app does)."""
        c = http.client.HTTPConnection(self.host, self.app_port, timeout=5)
        try:
            c.request("GET", "/", headers={"host": HOST})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def stop(self):
        for e in self.envoys:
            e.stop()
        self.backend.stop()


@pytest.fixture
def make_mesh(tmp_path, make_hub):
    meshes: list[Mesh] = []

    def make(api_type: str, family: str, **kw) -> Mesh:
        m = Mesh(tmp_path, make_hub, api_type, family, **kw)
        meshes.append(m)
        return m

    yield make
    for m in meshes:
        m.stop()


def assert_no_nacks(mesh: Mesh):
    for node in ("client-sidecar", "server-sidecar"):
        c = mesh.hub.client(node)
        assert c is not None, node
        assert all(t.get("nacks_total", 0) == 0 for t in c["types"]), c
        sds = [t for t in c["types"] if t.get("type_url", "").endswith("Secret")]
        assert sds and sds[0].get("last_acked_version"), f"secrets ACKed: {c}"


def test_sidecars_talk_mtls_and_refuse_clients_without_a_mesh_certificate(
        tmp_path, make_mesh, api_type, family):
    mesh = make_mesh(api_type, family)
    host, port = mesh.host, mesh.inbound_port

    # Through both sidecars: mTLS on the hop between them, and the client's SPIFFE id
    # reaches the app in x-forwarded-client-cert.
    def through():
        try:
            return mesh.get() == (200, b"backend")
        except OSError:
            return False
    wait_until(through, 20, "a request through both sidecars reaches the backend")
    xfcc = mesh.backend.seen[-1] or ""
    assert f"URI={CLIENT_ID}" in xfcc, f"x-forwarded-client-cert: {xfcc!r}"
    assert (mesh.client.stat(f"cluster.{CLUSTER}.ssl.handshake") or 0) >= 1
    assert listener_stat(mesh.server, "ssl.handshake") >= 1

    seen = len(mesh.backend.seen)
    # No TLS at all: a plain HTTP client gets no answer.
    assert b"HTTP/" not in plain_get(host, port)
    # TLS without a client certificate: refused by the server sidecar.
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)):
        tls_get(host, port, mesh.root, None)
    wait_until(lambda: listener_stat(mesh.server, "ssl.fail_verify_no_cert") >= 1, 5,
               "the server sidecar counts a client without a certificate")
    # A client certificate with the right SPIFFE id, from another CA: refused.
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)):
        tls_get(host, port, mesh.root, foreign_client_cert(tmp_path, CLIENT_ID))
    wait_until(lambda: listener_stat(mesh.server, "ssl.fail_verify_error") >= 1, 5,
               "the server sidecar counts a certificate it cannot verify")
    assert len(mesh.backend.seen) == seen, "no refused client reached the backend"
    assert_no_nacks(mesh)


def test_client_sidecar_refuses_a_server_outside_the_service_namespace(make_mesh, api_type):
    # The server sidecar holds a valid mesh certificate, but of namespace `other`:
    # it cannot answer for a service of namespace `default`.
    mesh = make_mesh(api_type, "ipv4", server_namespace="other")
    def rejected():
        status, _ = mesh.get()  # each request makes the client sidecar connect
        assert status == 503, status
        return (mesh.client.stat(f"cluster.{CLUSTER}.ssl.fail_verify_san") or 0) >= 1
    wait_until(rejected, 20, "the client sidecar rejects the server's SPIFFE id")
    assert not mesh.backend.seen, "nothing reached the backend"
    assert_no_nacks(mesh)


# ------------------------------------------------------ gateways: operator certificates


def wildcard_credential(tmp_path: Path, pattern: str) -> tuple[Path, str, str]:
    """A CA (its certificate written to a file, for the client) and a certificate for
    `pattern` that it signed: (CA file, chain PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator root")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, pattern)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(pattern)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path = tmp_path / "operator-ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return ca_path, cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def test_gateway_serves_an_operator_wildcard_certificate(tmp_path, make_hub, make_envoy, api_type,
                                                         family):
    host = FAMILIES[family]
    backend = XfccBackend(host)
    try:
        ca, chain, key = wildcard_credential(tmp_path, "*.example.test")
        gw_port = free_port(host)
        docs = [
            service("shop", ["shop.example.test"], [{"name": "http", "port": 80, "protocol": "HTTP"}]),
            endpoints("shop", [endpoint(host, backend.port)]),
            {"apiVersion": API_VERSION, "kind": "Credential",
             "metadata": {"name": "wildcard", "environment": "prod"},
             "spec": {"certificate": chain, "privateKey": key}},
            {"apiVersion": API_VERSION, "kind": "Gateway",
             "metadata": {"name": "edge", "environment": "prod"},
             "spec": {"listeners": [{"name": "https", "address": host, "port": gw_port,
                                     "tls": {"credential": "wildcard"}}]}},
        ]
        hub = make_hub(family=family, docs=docs)
        gw = make_envoy(hub, api_type, "gateway")
        wait_until(lambda: "gateway|edge|https" in gw.dynamic_listeners(), 20,
                   "the gateway's HTTPS listener is active (its certificate arrived)")

        def https_get(server_name: str):
            ctx = ssl.create_default_context(cafile=str(ca))  # verifies the name
            with socket.create_connection((host, gw_port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                    tls.sendall(f"GET / HTTP/1.1\r\nhost: {server_name}\r\nconnection: close\r\n\r\n".encode())
                    got = b""
                    while chunk := tls.recv(4096):
                        got += chunk
                    return tls.getpeercert(), got

        def served():
            try:
                return https_get("shop.example.test")
            except OSError:
                return None
        peer, got = wait_until(served, 20, "an HTTPS request through the gateway")
        assert got.startswith(b"HTTP/1.1 200"), got[:200]
        assert got.endswith(b"backend"), got[-200:]
        assert ("DNS", "*.example.test") in peer["subjectAltName"], peer
        # A name the wildcard does not cover fails the client's hostname check.
        with pytest.raises(ssl.SSLCertVerificationError):
            https_get("example.test")
        c = hub.client("gateway")
        assert c and all(t.get("nacks_total", 0) == 0 for t in c["types"]), c
        # The hub never shows the key.
        code, dump = hub.get("/config_dump?env=prod&type=SDS")
        assert code == 200 and "credential/default/wildcard" in dump, dump
        assert "PRIVATE KEY" not in dump and key.splitlines()[1] not in dump
    finally:
        backend.stop()
