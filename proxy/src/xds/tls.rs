//! Mutual TLS on the proxy's own xDS connection to the router or a hub (bootstrap
//! `tls:`), as the hub's and the router's clients do it
//! (`controlplane/src/identity/tls.rs`): our certificate from PEM files, the server's
//! chain checked against the trust bundle and its validity, then its SPIFFE id — by
//! default a `hub/*` or `router/*` id of the trust domain, or exactly `server_id` —
//! instead of the DNS name or IP dialled (hubs are addressed by IP as often as by
//! name; their certificates say what they are, not where). ALPN is `h2`.
//!
//! The files are read and checked at every connection attempt ([`XdsTls::client_config`]):
//! a certificate renewed on disk (the mesh and Kubernetes renew at half-life) is used
//! on the next connection without a restart, and one that is missing or broken fails
//! that attempt with an error naming the file (`/ready` stays false until a
//! connection works). An established stream keeps the session it negotiated.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio::net::TcpStream;

use crate::bootstrap::TlsConfig;
use crate::tls::{PeerCheck, ServerVerifier};

/// Why the xDS TLS files cannot be used; each names the bootstrap field and the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tls.{field} {path}: cannot read it: {source}")]
    Read {
        field: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("tls.{field} {path}: {message}")]
    Pem {
        field: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("tls.ca {path}: certificate {index} is not a usable trust anchor: {source}")]
    Anchor {
        path: PathBuf,
        index: usize,
        source: rustls::Error,
    },
    #[error("tls.key {key} does not match the certificate in tls.cert {cert}: {source}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error(
        "tls.cert {path} names no SPIFFE id (a spiffe://TRUST-DOMAIN/... URI SAN) to take the trust domain from; set tls.trust_domain"
    )]
    NoTrustDomain { path: PathBuf },
}

/// What the server's certificate must name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    /// A `hub/{replica}` or `router/{name}` id of the trust domain.
    HubOrRouter { trust_domain: String },
    /// Exactly this SPIFFE id (`tls.server_id`).
    Exact(String),
}

impl Expected {
    fn check(&self, uris: &[String]) -> Result<(), ServerIdError> {
        let [uri] = uris else {
            return Err(ServerIdError {
                found: format!("{} URI SANs {uris:?}", uris.len()),
                expected: self.clone(),
            });
        };
        let ok = match self {
            Expected::Exact(id) => uri == id,
            Expected::HubOrRouter { trust_domain } => uri
                .strip_prefix("spiffe://")
                .and_then(|r| r.strip_prefix(trust_domain.as_str()))
                .and_then(|r| r.strip_prefix('/'))
                .and_then(|p| p.split_once('/'))
                .is_some_and(|(kind, name)| {
                    matches!(kind, "hub" | "router")
                        && !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
                }),
        };
        if ok {
            Ok(())
        } else {
            Err(ServerIdError {
                found: uri.clone(),
                expected: self.clone(),
            })
        }
    }
}

/// The server's certificate names an identity we do not connect to.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the xDS server's certificate names {found}; expected {}", describe(.expected))]
struct ServerIdError {
    found: String,
    expected: Expected,
}

fn describe(e: &Expected) -> String {
    match e {
        Expected::Exact(id) => format!("{id} (tls.server_id)"),
        Expected::HubOrRouter { trust_domain } => format!(
            "a hub or router of trust domain {trust_domain}: spiffe://{trust_domain}/hub/... or spiffe://{trust_domain}/router/... (set tls.server_id or tls.trust_domain to expect another)"
        ),
    }
}

/// The bootstrap's `tls`, ready to build a client config per connection attempt.
#[derive(Debug, Clone)]
pub struct XdsTls {
    cfg: TlsConfig,
}

impl XdsTls {
    pub fn new(cfg: TlsConfig) -> XdsTls {
        XdsTls { cfg }
    }

    /// The trust bundle's file.
    pub fn ca(&self) -> &Path {
        &self.cfg.ca
    }

    /// Reads the files now and builds the client config: our chain and key (checked
    /// to match), the trust bundle, the server's expected SPIFFE id, ALPN `h2`.
    pub fn client_config(&self) -> Result<ClientConfig, Error> {
        let chain = certs("cert", &self.cfg.cert)?;
        let key = key(&self.cfg.key)?;
        let roots = roots(&self.cfg.ca)?;
        let expected = match (&self.cfg.server_id, &self.cfg.trust_domain) {
            (Some(id), _) => Expected::Exact(id.clone()),
            (None, Some(td)) => Expected::HubOrRouter {
                trust_domain: td.clone(),
            },
            (None, None) => Expected::HubOrRouter {
                trust_domain: trust_domain_of(&chain[0]).ok_or_else(|| Error::NoTrustDomain {
                    path: self.cfg.cert.clone(),
                })?,
            },
        };
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| Error::Pem {
            field: "ca",
            path: self.cfg.ca.clone(),
            message: e.to_string(),
        })?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier {
                inner,
                check: expected,
            }))
            .with_client_auth_cert(chain, key)
            .map_err(|source| Error::Pair {
                cert: self.cfg.cert.clone(),
                key: self.cfg.key.clone(),
                source,
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        field,
        path: path.to_path_buf(),
        source,
    })
}

fn certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(field, path)?;
    let bad = |message: String| Error::Pem {
        field,
        path: path.to_path_buf(),
        message,
    };
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(chain)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = read("key", path)?;
    // The error never quotes the file: it is key material.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| Error::Pem {
        field: "key",
        path: path.to_path_buf(),
        message: "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
    })
}

fn roots(path: &Path) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for (index, cert) in certs("ca", path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|source| Error::Anchor {
            path: path.to_path_buf(),
            index,
            source,
        })?;
    }
    Ok(roots)
}

/// The trust domain of the SPIFFE id in `leaf`, if it has one.
fn trust_domain_of(leaf: &[u8]) -> Option<String> {
    let (uris, _) = crate::tls::sans(leaf);
    uris.iter()
        .filter_map(|u| u.strip_prefix("spiffe://"))
        .map(|r| r.split_once('/').map_or(r, |(d, _)| d).to_string())
        .find(|d| !d.is_empty())
}

/// The server's SPIFFE id, checked after webpki's check of the chain and validity.
impl PeerCheck for Expected {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let (uris, _) = crate::tls::sans(end_entity);
        Expected::check(self, &uris).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })
    }
}

/// Dials `host:port` of the endpoint's URI and runs the TLS handshake with one config
/// (built for this connection attempt): tonic's `connect_with_connector`.
#[derive(Debug, Clone)]
pub struct Connector {
    pub config: Arc<ClientConfig>,
    /// The trust bundle's file, for messages.
    pub ca: PathBuf,
}

type Io = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<hyper::Uri> for Connector {
    type Response = Io;
    type Error = io::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = io::Result<Io>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let config = self.config.clone();
        let ca = self.ca.clone();
        Box::pin(async move {
            let auth = uri.authority().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{uri} names no host:port"),
                )
            })?;
            let host = auth.host().trim_start_matches('[').trim_end_matches(']');
            let port = auth.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            // The name is sent as SNI when it is a DNS name; the server is checked by
            // its SPIFFE id.
            let name = ServerName::try_from(host.to_string())
                .unwrap_or_else(|_| ServerName::try_from("tributary.invalid").expect("a DNS name"));
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| handshake_error(e, &ca))?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// A failed handshake, saying what was checked against what: a chain that does not
/// verify names the bundle it was checked against.
fn handshake_error(e: io::Error, ca: &Path) -> io::Error {
    let message = match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        // Our own check (the server's SPIFFE id): its message, not rustls' Debug of it.
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(o))) => {
            format!("TLS handshake: invalid peer certificate: {o}")
        }
        Some(rustls::Error::InvalidCertificate(_)) => format!(
            "TLS handshake: {e} (the server's chain was checked against tls.ca {})",
            ca.display()
        ),
        _ => format!("TLS handshake: {e}"),
    };
    io::Error::new(e.kind(), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uris(u: &[&str]) -> Vec<String> {
        u.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn by_default_a_hub_or_router_of_the_trust_domain() {
        let e = Expected::HubOrRouter {
            trust_domain: "td.test".into(),
        };
        assert!(e.check(&uris(&["spiffe://td.test/hub/hub-1"])).is_ok());
        assert!(e.check(&uris(&["spiffe://td.test/router/mesh"])).is_ok());
        for bad in [
            "spiffe://td.test/env/prod/ns/default/sa/default",
            "spiffe://td.test/env/prod/gateway/edge",
            "spiffe://other.test/hub/hub-1",
            "spiffe://td.test/hub/",
            "spiffe://td.test/hub/a/b",
            "spiffe://td.testx/hub/h",
        ] {
            let err = e.check(&uris(&[bad])).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("td.test/hub/"), "{err}");
        }
        let err = e
            .check(&uris(&["spiffe://td.test/hub/a", "spiffe://td.test/hub/b"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 URI SANs"), "{err}");
        assert!(e.check(&[]).is_err());
    }

    #[test]
    fn an_exact_server_id() {
        let e = Expected::Exact("spiffe://td.test/router/front".into());
        assert!(e.check(&uris(&["spiffe://td.test/router/front"])).is_ok());
        let err = e
            .check(&uris(&["spiffe://td.test/hub/hub-1"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spiffe://td.test/hub/hub-1") && err.contains("tls.server_id"),
            "{err}"
        );
    }
}
