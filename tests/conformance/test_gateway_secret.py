"""A real Envoy 1.40 gateway (SotW and Delta, IPv4 and IPv6) serving the wildcard
certificate of a Kubernetes Secret: the Secret lives in a real kube-apiserver
(tests/kube/kubeenv.py), a `tributary remote` agent watches it because the hub asked
for it, the hub serves it over SDS, and an HTTPS client verifying against the test CA
gets through the gateway; replacing the Secret rotates the certificate the client
sees, without restarting the listener.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import sys
from pathlib import Path

import pytest

from peers import (
    API_VERSION, FAMILIES, Proc, endpoint, endpoints, free_port, hub_binary, service,
    wait_until,
)
from test_mtls import XfccBackend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "kube"))
from kubeenv import KubeEnv  # noqa: E402

CLUSTER_ID = "east-1"


class SecretCa:
    """A CA that issues certificates for one wildcard pattern."""

    def __init__(self, tmp_path: Path):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secret test root")])
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = tmp_path / "secret-ca.pem"
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM).decode()
        self.path.write_text(self.pem)

    def issue(self, pattern: str, odd_hex_serial: bool = False) -> tuple[str, str, int]:
        """(chain PEM, key PEM, serial number). `odd_hex_serial`: a serial of 37 hex
        digits, which `ssl` shows with a leading 0 (whole bytes), so the test's own
        comparison of serials is exercised on that case in every run."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        if odd_hex_serial:
            serial = (1 << 144) | (serial % (1 << 144))
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, pattern)]))
                .issuer_name(self.name).public_key(key.public_key()).serial_number(serial)
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(pattern)]), critical=False)
                .sign(self.key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem, serial


def tls_secret(chain: str, key: str, ca: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "wild-tls", "namespace": "shop"},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": chain, "tls.key": key, "ca.crt": ca}}


def test_gateway_serves_a_kubernetes_secret_and_its_rotation(tmp_path, make_hub, make_envoy,
                                                              api_type, family):
    host = FAMILIES[family]
    backend = XfccBackend(host)
    agent = None
    try:
        with KubeEnv() as kube:
            ca = SecretCa(tmp_path)
            chain1, key1, serial1 = ca.issue("*.example.test", odd_hex_serial=True)
            kube.kubectl_json("POST", "/api/v1/namespaces", {"metadata": {"name": "shop"}})
            kube.kubectl_json("POST", "/api/v1/namespaces/shop/secrets",
                              tls_secret(chain1, key1, ca.pem))
            gw_port = free_port(host)
            docs = [
                service("shop", ["shop.example.test"],
                        [{"name": "http", "port": 80, "protocol": "HTTP"}]),
                endpoints("shop", [endpoint(host, backend.port)]),
                {"apiVersion": API_VERSION, "kind": "RemoteCluster",
                 "metadata": {"name": CLUSTER_ID},
                 "spec": {"environments": ["prod"], "namespaces": ["shop"]}},
                {"apiVersion": API_VERSION, "kind": "Credential",
                 "metadata": {"name": "wildcard", "environment": "prod"},
                 "spec": {"kubernetesSecret": {"cluster": CLUSTER_ID, "namespace": "shop",
                                               "name": "wild-tls"}}},
                {"apiVersion": API_VERSION, "kind": "Gateway",
                 "metadata": {"name": "edge", "environment": "prod"},
                 "spec": {"listeners": [{"name": "https", "address": host, "port": gw_port,
                                         "tls": {"credential": "wildcard"}}]}},
            ]
            hub = make_hub(family=family, docs=docs)
            agent = Proc("agent", [str(hub_binary()), "remote", "--hub",
                                   f"http://{hub.xds_hostport}", "--cluster-id", CLUSTER_ID,
                                   "--kubeconfig", str(kube.kubeconfig), "--zone", "az1"],
                         tmp_path / "agent.log")
            gw = make_envoy(hub, api_type, "gateway")
            wait_until(lambda: "gateway|edge|https" in gw.dynamic_listeners(), 30,
                       "the gateway's HTTPS listener is active (the Secret's certificate arrived)")

            def https_get(server_name: str):
                ctx = ssl.create_default_context(cafile=str(ca.path))  # verifies the name
                with socket.create_connection((host, gw_port), timeout=5) as raw:
                    with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                        tls.sendall(f"GET / HTTP/1.1\r\nhost: {server_name}\r\n"
                                    "connection: close\r\n\r\n".encode())
                        got = b""
                        while chunk := tls.recv(4096):
                            got += chunk
                        return tls.getpeercert(), got

            def served(serial: int):
                def attempt():
                    try:
                        peer, got = https_get("shop.example.test")
                    except OSError:
                        return None
                    # Compared as numbers: ssl shows the serial as hex padded to whole
                    # bytes ("06A1…"), so a text comparison fails whenever it starts with 0.
                    return (peer, got) if int(peer["serialNumber"], 16) == serial else None
                return attempt

            peer, got = wait_until(served(serial1), 30, "HTTPS with the Secret's certificate")
            assert got.startswith(b"HTTP/1.1 200"), got[:200]
            assert got.endswith(b"backend"), got[-200:]
            assert ("DNS", "*.example.test") in peer["subjectAltName"], peer
            with pytest.raises(ssl.SSLCertVerificationError):
                https_get("example.test")

            # Rotation: the Secret is replaced; the gateway serves the new certificate
            # on the same listener (Envoy modifies no listener: only the secret changes).
            modified = gw.stat("listener_manager.listener_modified") or 0
            chain2, key2, serial2 = ca.issue("*.example.test")
            kube.kubectl_json("PUT", "/api/v1/namespaces/shop/secrets/wild-tls",
                              tls_secret(chain2, key2, ca.pem))
            peer, got = wait_until(served(serial2), 30, "HTTPS with the rotated certificate")
            assert got.startswith(b"HTTP/1.1 200"), got[:200]
            assert (gw.stat("listener_manager.listener_modified") or 0) == modified, \
                "the listener was not replaced: the certificate came over SDS alone"
            c = hub.client("gateway")
            assert c and all(t.get("nacks_total", 0) == 0 for t in c["types"]), c
            # The hub never shows the key.
            code, dump = hub.get("/config_dump?env=prod&type=SDS")
            assert code == 200 and "credential/default/wildcard" in dump, dump
            assert "PRIVATE KEY" not in dump and key2.splitlines()[1] not in dump
            status = hub.get("/status/clusters")[1]
            assert '"state":"valid"' in status.replace(" ", ""), status
    finally:
        if agent:
            agent.stop()
        backend.stop()
