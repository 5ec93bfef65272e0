"""Proxyless gRPC (Python grpcio) clients reach a hub that serves only mutual TLS,
with a gRPC xDS bootstrap whose certificates are files watched by gRPC (`tls` channel
credentials and a `file_watcher` certificate provider), over IPv4 and IPv6. Each
client gets its certificate's environment and nothing else: a prod client resolves
prod's service and not staging's, a staging client the reverse, and a prod
certificate whose node claims staging is refused (PERMISSION_DENIED) and resolves
nothing.

The PKI is an operator's (a root, a hub certificate with the hub's SPIFFE id and its
loopback addresses, workload certificates), made here with `cryptography`.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from peers import FAMILIES, GREETER_PORT, Hub, endpoint, endpoints, service

TD = "tributary.local"
PROD_TARGET = f"xds:///greeter.prod:{GREETER_PORT}"
STAGING_TARGET = f"xds:///greeter.staging:{GREETER_PORT}"


class Pki:
    """A root and the leaf certificates it signs, written as PEM files."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.now = datetime.datetime.now(datetime.timezone.utc)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "conformance root")])
        root = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(self.now - datetime.timedelta(hours=1))
                .not_valid_after(self.now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(self.key, hashes.SHA256()))
        self.ca = self.dir / "ca.pem"
        self.ca.write_bytes(root.public_bytes(serialization.Encoding.PEM))

    def leaf(self, name: str, spiffe_id: str, ips: list[str] = ()) -> tuple[Path, Path, Path]:
        """(certificate, key, trust bundle) for `spiffe_id`, plus IP SANs `ips`."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(self.now - datetime.timedelta(hours=1))
                .not_valid_after(self.now + datetime.timedelta(hours=12))
                .add_extension(x509.SubjectAlternativeName(sans), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        cert_path, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path, self.ca


def greeter(env: str, backend) -> list[dict]:
    return [
        service("greeter", [f"greeter.{env}"], [{"name": "grpc", "port": GREETER_PORT, "protocol": "GRPC"}],
                env=env),
        endpoints("greeter", [endpoint(backend.host, backend.port)], env=env),
    ]


@pytest.fixture
def tls_hub(tmp_path, hub_bin):
    hubs: list[Hub] = []

    def make(family: str, docs: list[dict], files: tuple[Path, Path, Path]) -> Hub:
        h = Hub(tmp_path / "hub", family=family, tls_files=files)
        h.write_config(docs)
        hubs.append(h)
        return h.start()

    yield make
    for h in hubs:
        h.stop()


def workload(env: str) -> str:
    return f"spiffe://{TD}/env/{env}/ns/default/sa/greeter-client"


def test_grpcio_over_mtls_gets_its_environment_and_nothing_else(
        tmp_path, family, tls_hub, make_grpc_backend, make_py_grpc_client):
    host = FAMILIES[family]
    pki = Pki(tmp_path / "pki")
    prod_backend = make_grpc_backend("prod-b", family)
    staging_backend = make_grpc_backend("staging-b", family)
    hub = tls_hub(family, greeter("prod", prod_backend) + greeter("staging", staging_backend),
                  pki.leaf("hub", f"spiffe://{TD}/hub/conformance", ips=[host]))
    prod = pki.leaf("prod", workload("prod"))
    staging = pki.leaf("staging", workload("staging"))

    # A prod workload: prod's greeter, over mTLS with the files of its bootstrap.
    c = make_py_grpc_client(hub, PROD_TARGET, node_id=f"prod-{family}", tls=prod)
    out = c.run(20)
    assert out["counts"] == {"prod-b": 20} and out["errors"] == 0, out
    # Staging's service is not among what it was given.
    c = make_py_grpc_client(hub, STAGING_TARGET, node_id=f"prod-peek-{family}", tls=prod)
    out = c.run(1, wait=3)
    assert out["counts"] == {} and out["errors"] == 1, out

    # A staging workload: the reverse.
    c = make_py_grpc_client(hub, STAGING_TARGET, node_id=f"staging-{family}",
                            node_env="staging", tls=staging)
    out = c.run(20)
    assert out["counts"] == {"staging-b": 20} and out["errors"] == 0, out
    c = make_py_grpc_client(hub, PROD_TARGET, node_id=f"staging-peek-{family}",
                            node_env="staging", tls=staging)
    out = c.run(1, wait=3)
    assert out["counts"] == {} and out["errors"] == 1, out

    # A prod certificate whose node claims staging: refused before anything is sent.
    c = make_py_grpc_client(hub, STAGING_TARGET, node_id=f"liar-{family}",
                            node_env="staging", tls=prod)
    out = c.run(1, wait=3)
    assert out["counts"] == {} and out["errors"] == 1, out
    assert staging_backend.hits == {"/grpc.testing.TestService/UnaryCall": 20}, staging_backend.hits
    assert prod_backend.hits == {"/grpc.testing.TestService/UnaryCall": 20}, prod_backend.hits

    # Without a certificate: the hub refuses the handshake; nothing resolves.
    c = make_py_grpc_client(hub, PROD_TARGET, node_id=f"anonymous-{family}")
    out = c.run(1, wait=3)
    assert out["counts"] == {} and out["errors"] == 1, out
