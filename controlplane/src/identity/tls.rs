//! Mutual TLS for every hop: rustls server and client configs built from PEM files
//! (`--tls-cert`, `--tls-key`, `--tls-ca`), reloaded when the files change, and the
//! peer's [`SpiffeId`] read from its certificate.
//!
//! Servers require a client certificate that chains to the trust bundle, is within
//! its validity, and carries exactly one URI SAN: a SPIFFE id of our trust domain
//! (`--trust-domain`). Clients check the server the same way (chain, validity, a
//! `Hub` or `Router` SPIFFE id) instead of a DNS name: hubs are addressed by IP as
//! often as by name, and their certificates name what they are, not where.
//!
//! Who writes, who reads: a [`Reloading`] config is rebuilt by its file watcher's
//! thread and read (an `Arc` clone under a short lock) by every accept or connect; a
//! bad new file is logged and counted, and the previous config stays in force.
//! Handshakes run in their own tasks ([`accept_tls`]), a bounded number at a time,
//! so one slow client cannot hold the accept loop.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::{Identity, SpiffeId};

/// Default of `--trust-domain`: the SPIFFE trust domain of the mesh.
pub const DEFAULT_TRUST_DOMAIN: &str = "tributary.local";

/// A TLS handshake that takes longer than this is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most TLS handshakes one listener runs at once; the rest wait in the accept queue.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 256;

/// ALPN of gRPC listeners (xDS, federation): HTTP/2 only.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN of the admin HTTP listener: HTTP/1.1.
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];

/// The PEM files of one side of a TLS hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This process's certificate chain (leaf first).
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The trust bundle: every root (or intermediate) a peer's chain may end at.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// From the three optional flags: all three, or none (`Ok(None)`); a partial set
    /// names the missing flags.
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, String> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
            (cert, key, ca) => {
                let missing: Vec<&str> = [
                    ("--tls-cert", cert.is_none()),
                    ("--tls-key", key.is_none()),
                    ("--tls-ca", ca.is_none()),
                ]
                .into_iter()
                .filter_map(|(f, m)| m.then_some(f))
                .collect();
                Err(format!(
                    "mutual TLS needs --tls-cert, --tls-key and --tls-ca together; missing {}",
                    missing.join(", ")
                ))
            }
        }
    }
}

/// Why TLS material could not be loaded, or a peer's identity not read.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {flag} {path}: {source}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{flag} {path} holds no PEM certificate")]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error("{flag} {path}: certificate {index} is not a valid trust anchor: {source}")]
    BadAnchor {
        flag: &'static str,
        path: PathBuf,
        index: usize,
        source: rustls::Error,
    },
    #[error("--tls-cert {cert} and --tls-key {key} do not make a usable pair: {source}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("--tls-ca {path}: {source}")]
    Verifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("watching the TLS files {paths:?} for changes: {source}")]
    Watch {
        paths: Vec<PathBuf>,
        source: notify::Error,
    },
}

/// Why a verified certificate does not name a peer of this mesh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdError {
    #[error("the peer certificate cannot be parsed: {0}")]
    Parse(String),
    #[error(
        "the peer certificate has {0} URI SANs; expected exactly one SPIFFE id (spiffe://<trust-domain>/...)"
    )]
    UriSans(usize),
    #[error("the peer certificate's URI SAN is not a SPIFFE id of this mesh: {0}")]
    Spiffe(#[from] super::SpiffeIdError),
    #[error(
        "the peer certificate's SPIFFE id {id} is of trust domain {found:?}; this mesh trusts {expected:?} (--trust-domain)"
    )]
    TrustDomain {
        id: String,
        found: String,
        expected: String,
    },
    #[error("the peer presented no certificate")]
    NoCertificate,
}

/// The SPIFFE id in `leaf`: exactly one URI SAN, of `trust_domain`.
pub fn spiffe_id_of(leaf: &[u8], trust_domain: &str) -> Result<SpiffeId, PeerIdError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| PeerIdError::Parse(e.to_string()))?;
    let uris: Vec<&str> = match cert
        .subject_alternative_name()
        .map_err(|e| PeerIdError::Parse(e.to_string()))?
    {
        Some(san) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    let [uri] = uris.as_slice() else {
        return Err(PeerIdError::UriSans(uris.len()));
    };
    let id = SpiffeId::parse(uri)?;
    if id.trust_domain != trust_domain {
        return Err(PeerIdError::TrustDomain {
            id: id.to_string(),
            found: id.trust_domain,
            expected: trust_domain.to_string(),
        });
    }
    Ok(id)
}

/// The SPIFFE id of a peer from the chain its TLS session presented (leaf first).
pub fn peer_id(
    certs: Option<&[CertificateDer<'_>]>,
    trust_domain: &str,
) -> Result<SpiffeId, PeerIdError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(PeerIdError::NoCertificate)?;
    spiffe_id_of(leaf, trust_domain)
}

fn load_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            flag,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read {
        flag: "--tls-key",
        path: path.to_path_buf(),
        source,
    })
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for (index, cert) in load_certs("--tls-ca", path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|source| TlsError::BadAnchor {
            flag: "--tls-ca",
            path: path.to_path_buf(),
            index,
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

/// The CRLs in the trust bundle file (`X509 CRL` blocks next to the roots: the
/// CSR API's `ca.pem` carries one per CA of the mesh).
fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        flag: "--tls-ca",
        path: path.to_path_buf(),
        source,
    };
    CertificateRevocationListDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)
}

/// CRLs checked by our verifiers: `first` (the hub's own CA's, current) then those of
/// the bundle file. webpki uses the first CRL of a chain's issuer, so a CA's own CRL
/// wins over an older copy in a file. A certificate whose issuer has no CRL here is
/// not refused for it (a peer of another issuer, or a bundle without CRLs): the
/// roots' CRLs, always present with our CA, are what revoke an intermediate.
fn merged_crls(
    first: &[CertificateRevocationListDer<'static>],
    file: Vec<CertificateRevocationListDer<'static>>,
) -> Vec<CertificateRevocationListDer<'static>> {
    first.iter().cloned().chain(file).collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn rustls_general(e: PeerIdError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

/// Requires a client certificate chaining to the bundle (webpki: validity, key usage,
/// signatures), then a SPIFFE id of our trust domain in it.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        spiffe_id_of(end_entity, &self.trust_domain).map_err(rustls_general)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Checks a server's chain against the bundle, then that it is a hub or a router of
/// our trust domain (only a hub when `hub_only`). The DNS name / IP the client
/// dialled is not checked (see the module comment): webpki checks the name last,
/// after chain and validity, so a name mismatch alone is what is ignored.
#[derive(Debug)]
struct SpiffeServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    trust_domain: String,
    /// The CSR client's check: a credential (a join token, a service-account token)
    /// goes to a hub's CSR listener only, never to a router (which serves no CSR API,
    /// and would otherwise collect the tokens of whoever was pointed at it).
    hub_only: bool,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let id = spiffe_id_of(end_entity, &self.trust_domain).map_err(rustls_general)?;
        match id.identity {
            Identity::Hub { .. } => Ok(ServerCertVerified::assertion()),
            Identity::Router { .. } if !self.hub_only => Ok(ServerCertVerified::assertion()),
            _ if self.hub_only => Err(rustls::Error::General(format!(
                "the server's certificate names {id}, which is not a hub: only a hub's CSR listener (--csr-addr) is sent a credential"
            ))),
            _ => Err(rustls::Error::General(format!(
                "the server's certificate names {id}, which is neither a hub nor a router"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server config that requires a client certificate of our trust domain.
pub fn server_config(
    files: &TlsFiles,
    trust_domain: &str,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    server_config_with_crls(files, trust_domain, alpn, &[])
}

/// [`server_config`], also checking `crls` (before those of the bundle file).
pub fn server_config_with_crls(
    files: &TlsFiles,
    trust_domain: &str,
    alpn: &[&[u8]],
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<ServerConfig, TlsError> {
    let roots = load_roots(&files.ca)?;
    let crls = merged_crls(crls, load_crls(&files.ca)?);
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .with_crls(crls)
        .allow_unknown_revocation_status()
        .build()
        .map_err(|source| TlsError::Verifier {
            path: files.ca.clone(),
            source,
        })?;
    let verifier = Arc::new(SpiffeClientVerifier {
        inner,
        trust_domain: trust_domain.to_string(),
    });
    let chain = load_certs("--tls-cert", &files.cert)?;
    let key = load_key(&files.key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Pair {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client config that presents our certificate and accepts a hub or a router of
/// our trust domain.
pub fn client_config(
    files: &TlsFiles,
    trust_domain: &str,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let roots = load_roots(&files.ca)?;
    let crls = load_crls(&files.ca)?;
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
        .with_crls(crls)
        .allow_unknown_revocation_status()
        .build()
        .map_err(|source| TlsError::Verifier {
            path: files.ca.clone(),
            source,
        })?;
    let chain = load_certs("--tls-cert", &files.cert)?;
    let key = load_key(&files.key)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
            inner,
            trust_domain: trust_domain.to_string(),
            hub_only: false,
        }))
        .with_client_auth_cert(chain, key)
        .map_err(|source| TlsError::Pair {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A server config that presents our certificate and asks for none: the CSR
/// listener (`--csr-addr`), where a peer without a certificate gets its first one.
pub fn server_auth_only_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let chain = load_certs("--tls-cert", &files.cert)?;
    let key = load_key(&files.key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Pair {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client config that presents no certificate and accepts only a hub of our trust
/// domain whose chain ends at a root of the bundle `ca` (`flag` names it in errors)
/// and is not revoked by a CRL in that file (the `X509 CRL` blocks the CSR API
/// writes after the roots; a CA without one there is not checked): how a peer
/// without a certificate reaches the CSR listener, and sends it its credential.
pub fn server_auth_only_client_config(
    flag: &'static str,
    ca: &Path,
    trust_domain: &str,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for (index, cert) in load_certs(flag, ca)?.into_iter().enumerate() {
        roots.add(cert).map_err(|source| TlsError::BadAnchor {
            flag,
            path: ca.to_path_buf(),
            index,
            source,
        })?;
    }
    let crls = CertificateRevocationListDer::pem_file_iter(ca)
        .and_then(|crls| crls.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            flag,
            path: ca.to_path_buf(),
            source,
        })?;
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(crls)
            .allow_unknown_revocation_status()
            .build()
            .map_err(|source| TlsError::Verifier {
                path: ca.to_path_buf(),
                source,
            })?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
            inner,
            trust_domain: trust_domain.to_string(),
            hub_only: true,
        }))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A config rebuilt whenever one of its files changes (a renewed certificate, a
/// rotated bundle): new handshakes use the new config, established connections keep
/// theirs. A rebuild that fails keeps the previous config and logs why.
pub struct Reloading<T> {
    current: Arc<RwLock<Arc<T>>>,
    /// Bumped after each successful rebuild (tests and metrics wait on it).
    generation: watch::Receiver<u64>,
    /// Rebuilds now (what a file change does); `None` for a fixed config.
    rebuild: Option<Arc<dyn Fn() + Send + Sync>>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("generation", &*self.generation.borrow())
            .finish_non_exhaustive()
    }
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Builds the config now (an error here stops start-up) and rebuilds it on every
    /// change in the directories of `files` (a Kubernetes Secret volume swaps a
    /// symlink in the directory rather than writing the file).
    pub fn watch(
        files: &TlsFiles,
        build: impl Fn() -> Result<T, TlsError> + Send + 'static,
    ) -> Result<Self, TlsError> {
        use notify::Watcher;
        let current = Arc::new(RwLock::new(Arc::new(build()?)));
        let (gen_tx, generation) = watch::channel(0u64);
        let paths = [&files.cert, &files.key, &files.ca];
        let shared = current.clone();
        let names: Vec<PathBuf> = paths.iter().map(|p| p.to_path_buf()).collect();
        let rebuild: Arc<dyn Fn() + Send + Sync> = {
            let names = names.clone();
            // One rebuild at a time (file events and CRL updates come from two threads).
            let build = Mutex::new(build);
            Arc::new(move || {
                let build = build.lock().unwrap();
                match build() {
                    Ok(config) => {
                        *shared.write().unwrap() = Arc::new(config);
                        gen_tx.send_modify(|g| *g += 1);
                        info!(files = ?names, "TLS files reloaded");
                    }
                    Err(e) => {
                        // Mid-rotation a cert may be new and its key not yet: the next
                        // event rebuilds again.
                        warn!(error = %e, "TLS files changed but do not load; keeping the previous ones");
                    }
                }
            })
        };
        let mut watcher = notify::recommended_watcher({
            let rebuild = rebuild.clone();
            move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if matches!(event.kind, notify::EventKind::Access(_)) {
                    return;
                }
                rebuild();
            }
        })
        .map_err(|source| TlsError::Watch {
            paths: names.clone(),
            source,
        })?;
        let mut dirs: Vec<PathBuf> = paths
            .iter()
            .map(|p| {
                p.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_path_buf()
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        for dir in &dirs {
            watcher
                .watch(dir, notify::RecursiveMode::NonRecursive)
                .map_err(|source| TlsError::Watch {
                    paths: names.clone(),
                    source,
                })?;
        }
        Ok(Self {
            current,
            generation,
            rebuild: Some(rebuild),
            _watcher: Some(watcher),
        })
    }

    /// Rebuilds the config now, as a change of its files would (an input that is
    /// not a file changed: the CA's CRLs).
    pub fn reload_now(&self) {
        if let Some(rebuild) = &self.rebuild {
            rebuild();
        }
    }

    /// A fixed config (tests, and callers that build their own).
    pub fn fixed(config: T) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(config))),
            generation: watch::channel(0).1,
            rebuild: None,
            _watcher: None,
        }
    }

    /// The config for the next handshake.
    pub fn current(&self) -> Arc<T> {
        // The lock is held for an Arc clone only; a rebuild swaps the Arc.
        self.current.read().unwrap().clone()
    }

    /// Changes each time the files are reloaded successfully.
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.clone()
    }
}

/// A server's TLS: its reloading config and the trust domain its peers must be of.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<Reloading<ServerConfig>>,
    pub trust_domain: String,
    /// CRLs checked before the bundle file's (the hub's own CA's: see
    /// [`ServerTls::set_crls`]).
    crls: Arc<RwLock<Arc<Vec<CertificateRevocationListDer<'static>>>>>,
}

impl ServerTls {
    /// Loads `files` for a listener speaking `alpn`, watching them for changes.
    pub fn load(files: &TlsFiles, trust_domain: &str, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        let (f, td) = (files.clone(), trust_domain.to_string());
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let crls: Arc<RwLock<Arc<Vec<CertificateRevocationListDer<'static>>>>> = Arc::default();
        let read = crls.clone();
        let config = Reloading::watch(files, move || {
            let alpn: Vec<&[u8]> = alpn.iter().map(|p| p.as_slice()).collect();
            let crls = read.read().unwrap().clone();
            server_config_with_crls(&f, &td, &alpn, &crls)
        })?;
        Ok(Self {
            config: Arc::new(config),
            trust_domain: trust_domain.to_string(),
            crls,
        })
    }

    /// A listener of `config` that asks for no client certificate, so has no CRLs to
    /// check (the CSR listener).
    pub fn server_auth_only(config: Reloading<ServerConfig>, trust_domain: &str) -> Self {
        Self {
            config: Arc::new(config),
            trust_domain: trust_domain.to_string(),
            crls: Arc::default(),
        }
    }

    /// Checks client chains against `crls` from the next handshake on (established
    /// connections keep theirs), ahead of the bundle file's CRLs.
    pub fn set_crls(&self, crls: Vec<CertificateRevocationListDer<'static>>) {
        *self.crls.write().unwrap() = Arc::new(crls);
        self.config.reload_now();
    }

    /// Keeps this listener's CRLs those of the hub's CA: now, and at every change of
    /// what peers must trust (a revocation, a new intermediate), until `shutdown`.
    pub async fn follow_ca_crls(self, ca: Arc<super::ca::Ca>, mut shutdown: watch::Receiver<bool>) {
        let mut changes = ca.trust_changes();
        loop {
            changes.borrow_and_update();
            let (tls, crls) = (self.clone(), ca.crls());
            // The rebuild reads the files: off the async workers.
            let _ = tokio::task::spawn_blocking(move || tls.set_crls(crls)).await;
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

/// A client's TLS: its reloading config.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub config: Arc<Reloading<ClientConfig>>,
}

impl ClientTls {
    /// Loads `files` for connections speaking `alpn`, watching them for changes.
    pub fn load(files: &TlsFiles, trust_domain: &str, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        let (f, td) = (files.clone(), trust_domain.to_string());
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let config = Reloading::watch(files, move || {
            let alpn: Vec<&[u8]> = alpn.iter().map(|p| p.as_slice()).collect();
            client_config(&f, &td, &alpn)
        })?;
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// Opens a TCP connection to `addr` and runs the TLS handshake over it.
    pub async fn connect(
        &self,
        addr: &str,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        // The name is only sent as SNI (when it is a DNS name); the server is checked
        // by its SPIFFE id.
        let name = ServerName::try_from(host.to_string())
            .unwrap_or_else(|_| ServerName::try_from("tributary.invalid").unwrap());
        tokio_rustls::TlsConnector::from(self.config.current())
            .connect(name, tcp)
            .await
    }

    /// A connector for tonic's `Endpoint::connect_with_connector`: TLS is done here,
    /// not by tonic's own (which cannot reload its files), so the endpoint's URL is
    /// `http://` (see [`plain_scheme`]).
    pub fn connector(&self) -> TlsConnector {
        TlsConnector { tls: self.clone() }
    }
}

/// A tower service dialling `host:port` of a URI over mutual TLS.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    tls: ClientTls,
}

type ClientIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for TlsConnector {
    type Response = ClientIo;
    type Error = io::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = io::Result<ClientIo>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let auth = uri.authority().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{uri} names no host:port"),
                )
            })?;
            let addr = match auth.port() {
                Some(_) => auth.to_string(),
                None => format!("{}:443", auth.host()),
            };
            tls.connect(&addr).await.map(hyper_util::rt::TokioIo::new)
        })
    }
}

/// `https://` → `http://`: for an endpoint whose TLS a custom connector does.
pub fn plain_scheme(url: &str) -> String {
    match url.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None if url.contains("://") => url.to_string(),
        None => format!("http://{url}"),
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub listener: &'static str,
    /// `ok`, or why the handshake failed: `no_certificate`, `unknown_ca`, `expired`,
    /// `revoked`, `bad_identity`, `timeout`, `other`.
    pub result: &'static str,
}

/// TLS handshakes of the hub's listeners, by outcome.
#[derive(Debug, Clone, Default)]
pub struct TlsMetrics {
    pub handshakes: Family<HandshakeLabels, Counter>,
}

impl TlsMetrics {
    /// Registers `tributary_tls_handshakes_total{listener, result}`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.sub_registry_with_prefix("tributary_tls").register(
            "handshakes",
            "TLS handshakes by listener and result (ok, no_certificate, unknown_ca, expired, revoked, bad_identity, timeout, other)",
            m.handshakes.clone(),
        );
        m
    }
}

/// Why a handshake failed, as a metric label.
pub fn failure_reason(e: &io::Error) -> &'static str {
    let Some(err) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return "other";
    };
    match err {
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "expired"
            }
            CertificateError::Revoked => "revoked",
            CertificateError::Other(_) => "bad_identity",
            _ => "other",
        },
        _ => "other",
    }
}

/// One accepted and handshaken connection.
pub type TlsConn = tokio_rustls::server::TlsStream<TcpStream>;

/// Accepts on `listener` and handshakes each connection in its own task (at most
/// [`MAX_CONCURRENT_HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`]); the
/// finished connections come out of the returned channel. Failed handshakes are
/// logged with the peer address and the reason, and counted. Ends when the receiver
/// is dropped.
pub fn accept_tls(
    listener: TcpListener,
    tls: ServerTls,
    metrics: TlsMetrics,
    name: &'static str,
) -> mpsc::Receiver<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("never closed"),
                _ = tx.closed() => return,
            };
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly.
                        warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.current());
            let (tx, metrics) = (tx.clone(), metrics.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let result =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(conn)) => Ok(conn),
                        Ok(Err(e)) => Err((failure_reason(&e), e.to_string())),
                        Err(_) => Err((
                            "timeout",
                            format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
                        )),
                    };
                match result {
                    Ok(conn) => {
                        metrics
                            .handshakes
                            .get_or_create(&HandshakeLabels {
                                listener: name,
                                result: "ok",
                            })
                            .inc();
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err((reason, message)) => {
                        metrics
                            .handshakes
                            .get_or_create(&HandshakeLabels {
                                listener: name,
                                result: reason,
                            })
                            .inc();
                        warn!(listener = name, %peer, reason, error = %message, "TLS handshake refused");
                    }
                }
            });
        }
    });
    rx
}

/// Who is on the other end of an admin connection.
#[derive(Debug, Clone)]
pub struct PeerAddr {
    pub addr: SocketAddr,
    /// The peer's SPIFFE id; `None` on a plaintext (`--insecure`) listener.
    pub id: Option<SpiffeId>,
}

/// An axum listener over [`accept_tls`]: the admin endpoint's mTLS.
#[derive(Debug)]
pub struct TlsListener {
    rx: Mutex<Option<mpsc::Receiver<io::Result<TlsConn>>>>,
    local: SocketAddr,
    trust_domain: String,
}

impl TlsListener {
    pub fn new(listener: TcpListener, tls: ServerTls, metrics: TlsMetrics) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let trust_domain = tls.trust_domain.clone();
        Ok(Self {
            rx: Mutex::new(Some(accept_tls(listener, tls, metrics, "admin"))),
            local,
            trust_domain,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConn;
    type Addr = PeerAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let rx = self.rx.get_mut().unwrap();
        loop {
            let next = match rx.as_mut() {
                Some(rx) => rx.recv().await,
                None => None,
            };
            match next {
                Some(Ok(conn)) => {
                    let (tcp, session) = conn.get_ref();
                    let addr = tcp.peer_addr().unwrap_or(self.local);
                    let id = peer_id(session.peer_certificates(), &self.trust_domain)
                        .map_err(|e| debug!(error = %e, "admin peer without identity"))
                        .ok();
                    return (conn, PeerAddr { addr, id });
                }
                Some(Err(_)) => continue,
                // The accept task only ends when this listener is dropped.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(PeerAddr {
            addr: self.local,
            id: None,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        PeerAddr {
            addr: *stream.remote_addr(),
            id: None,
        }
    }
}

/// The SPIFFE id of the peer of a tonic request: `Ok(None)` on a plaintext
/// (`--insecure`) listener, where no certificate is asked for.
pub fn request_peer<T>(
    request: &tonic::Request<T>,
    trust_domain: &str,
) -> Result<Option<SpiffeId>, tonic::Status> {
    match request.peer_certs() {
        None => Ok(None),
        Some(certs) => peer_id(Some(&certs), trust_domain)
            .map(Some)
            .map_err(|e| tonic::Status::unauthenticated(e.to_string())),
    }
}

/// How a hub's (or a router's) listeners serve: mutual TLS, or plaintext on loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Plaintext (`--insecure`): loopback addresses only, no identities, a warning
    /// at start and every minute.
    Insecure,
    /// Mutual TLS with these files (`--tls-cert`, `--tls-key`, `--tls-ca`).
    Mtls(TlsFiles),
}

/// How often an `--insecure` process repeats its warning.
pub const INSECURE_WARNING_INTERVAL: Duration = Duration::from_secs(60);

impl Transport {
    /// From the flags: TLS files, or `--insecure`, exactly one of them.
    pub fn from_flags(files: Option<TlsFiles>, insecure: bool) -> Result<Self, String> {
        match (files, insecure) {
            (Some(_), true) => Err(
                "--insecure and --tls-cert/--tls-key/--tls-ca exclude each other: pass the TLS files to serve mutual TLS, or --insecure alone to serve plaintext on loopback".into(),
            ),
            (Some(files), false) => Ok(Transport::Mtls(files)),
            (None, true) => Ok(Transport::Insecure),
            (None, false) => Err(
                "no transport security configured: pass --tls-cert, --tls-key and --tls-ca (PEM files: this process's certificate, its key, and the trust bundle; see docs/security.md) to serve mutual TLS, or --insecure to serve plaintext on a loopback address (local development and tests only)".into(),
            ),
        }
    }

    /// Refuses a plaintext listener on anything but loopback; `flag` names the
    /// address's flag in the error.
    pub fn check_bind(&self, flag: &str, addr: SocketAddr) -> Result<(), String> {
        match self {
            Transport::Insecure if !addr.ip().is_loopback() => Err(format!(
                "--insecure serves plaintext and binds only loopback addresses, but {flag} is {addr}: bind 127.0.0.1 or [::1], or serve mutual TLS with --tls-cert, --tls-key and --tls-ca"
            )),
            _ => Ok(()),
        }
    }

    /// The TLS files, when mutual TLS is on.
    pub fn files(&self) -> Option<&TlsFiles> {
        match self {
            Transport::Insecure => None,
            Transport::Mtls(f) => Some(f),
        }
    }

    /// Logs that `what` serves plaintext, now and every [`INSECURE_WARNING_INTERVAL`]
    /// until `stop` resolves; with mutual TLS it logs nothing, and still returns only
    /// when `stop` resolves (a process's task that ends early reads as a failure).
    pub async fn warn_while_insecure(
        &self,
        what: &'static str,
        addrs: Vec<SocketAddr>,
        stop: impl Future<Output = ()>,
    ) {
        if *self != Transport::Insecure {
            stop.await;
            return;
        }
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(INSECURE_WARNING_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => warn!(
                    ?addrs,
                    "{what} runs with --insecure: plaintext, no peer identities, no authorization; loopback only, never in production"
                ),
                _ = &mut stop => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With mutual TLS the warning task must not end before `stop`: the hub treats
    /// a task that ends as failed (`tributary hub --tls-cert ...` exited at start).
    #[tokio::test(start_paused = true)]
    async fn the_insecure_warning_task_lasts_until_stop_with_mtls_too() {
        let files = TlsFiles {
            cert: "cert.pem".into(),
            key: "key.pem".into(),
            ca: "ca.pem".into(),
        };
        for transport in [Transport::Mtls(files), Transport::Insecure] {
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                transport
                    .warn_while_insecure("test", vec![], async {
                        let _ = stop_rx.await;
                    })
                    .await
            });
            tokio::time::sleep(INSECURE_WARNING_INTERVAL * 3).await;
            assert!(!task.is_finished(), "ended before stop");
            stop_tx.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(1), task)
                .await
                .expect("ends at stop")
                .unwrap();
        }
    }
    use crate::identity::testing::{TestCa, Validity};

    fn leaf_der(ca: &TestCa, uris: &[&str]) -> Vec<u8> {
        let uris: Vec<String> = uris.iter().map(|u| u.to_string()).collect();
        let (pem, _) = ca.leaf_with_uris(&uris, Validity::Current);
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_peer_id_is_exactly_one_spiffe_uri_of_our_trust_domain() {
        let ca = TestCa::new(DEFAULT_TRUST_DOMAIN);
        let ok = leaf_der(&ca, &["spiffe://tributary.local/cluster/east-1"]);
        assert_eq!(
            spiffe_id_of(&ok, DEFAULT_TRUST_DOMAIN).unwrap().identity,
            Identity::Agent {
                cluster: "east-1".into()
            }
        );
        let none = leaf_der(&ca, &[]);
        assert_eq!(
            spiffe_id_of(&none, DEFAULT_TRUST_DOMAIN),
            Err(PeerIdError::UriSans(0))
        );
        let two = leaf_der(
            &ca,
            &[
                "spiffe://tributary.local/cluster/a",
                "spiffe://tributary.local/cluster/b",
            ],
        );
        assert_eq!(
            spiffe_id_of(&two, DEFAULT_TRUST_DOMAIN),
            Err(PeerIdError::UriSans(2))
        );
        let other = leaf_der(&ca, &["spiffe://other.local/cluster/a"]);
        let err = spiffe_id_of(&other, DEFAULT_TRUST_DOMAIN).unwrap_err();
        assert!(
            err.to_string().contains("\"other.local\"")
                && err.to_string().contains("--trust-domain"),
            "{err}"
        );
        let bad = leaf_der(&ca, &["spiffe://tributary.local/nothing/here"]);
        assert!(matches!(
            spiffe_id_of(&bad, DEFAULT_TRUST_DOMAIN),
            Err(PeerIdError::Spiffe(_))
        ));
    }

    #[test]
    fn a_partial_set_of_tls_flags_names_what_is_missing() {
        let err = TlsFiles::from_flags(Some("c".into()), None, None).unwrap_err();
        assert!(err.contains("--tls-key, --tls-ca"), "{err}");
        assert_eq!(TlsFiles::from_flags(None, None, None), Ok(None));
        let err = Transport::from_flags(
            Some(TlsFiles {
                cert: "c".into(),
                key: "k".into(),
                ca: "a".into(),
            }),
            true,
        )
        .unwrap_err();
        assert!(err.contains("exclude each other"), "{err}");
    }

    #[test]
    fn an_unreadable_file_is_named_with_its_flag() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("missing.crt"),
            key: dir.path().join("missing.key"),
            ca: dir.path().join("missing-ca.crt"),
        };
        let err = server_config(&files, DEFAULT_TRUST_DOMAIN, ALPN_GRPC).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--tls-ca") && msg.contains("missing-ca.crt"),
            "{msg}"
        );
    }
}
