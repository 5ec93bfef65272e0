//! Verifying a peer's certificate chain against the mesh's trust bundle, and reading
//! the SPIFFE id it proves.
//!
//! This is rustls' own `WebPkiClientVerifier` (a real path build: signatures, validity
//! at `now`, CA constraints, key usage), so what these functions accept is what a
//! listener built on the same bundle accepts. The mTLS listeners use the verifier;
//! [`verify_chain`] is the same check for tests, tools and the CSR API.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use super::SpiffeId;

/// Why a certificate is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("{what} is not PEM: {message}")]
    Pem { what: &'static str, message: String },
    #[error("{0} holds no certificate")]
    Empty(&'static str),
    /// The chain does not verify: expired, not yet valid, signed by a CA outside the
    /// bundle, a bad signature. The message is rustls'.
    #[error("the certificate is not trusted: {0}")]
    Untrusted(String),
    #[error(
        "the certificate has no SPIFFE id: expected exactly one URI SAN spiffe://..., found {0}"
    )]
    NoSpiffeId(String),
    #[error("the certificate's SPIFFE id is invalid: {0}")]
    BadSpiffeId(String),
}

/// Parses every certificate of a PEM bundle.
pub fn certs_from_pem(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, VerifyError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| VerifyError::Pem {
            what,
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(VerifyError::Empty(what));
    }
    Ok(certs)
}

/// A client-certificate verifier trusting `bundle_pem` (mTLS: every hop verifies its
/// peer with this, on both sides).
pub fn client_verifier(bundle_pem: &str) -> Result<Arc<dyn ClientCertVerifier>, VerifyError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem("the trust bundle", bundle_pem)? {
        roots
            .add(cert)
            .map_err(|e| VerifyError::Untrusted(format!("a root of the trust bundle: {e}")))?;
    }
    WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| VerifyError::Untrusted(e.to_string()))
}

/// Verifies `chain_pem` (leaf first, then intermediates) against `bundle_pem` at `now`
/// and returns the leaf's SPIFFE id.
pub fn verify_chain(
    bundle_pem: &str,
    chain_pem: &str,
    now: SystemTime,
) -> Result<SpiffeId, VerifyError> {
    let verifier = client_verifier(bundle_pem)?;
    let chain = certs_from_pem("the certificate chain", chain_pem)?;
    let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::since_unix_epoch(secs))
        .map_err(|e| VerifyError::Untrusted(e.to_string()))?;
    spiffe_id_of(&chain[0])
}

/// The SPIFFE id of a certificate: its one URI SAN. (Does not verify anything.)
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, VerifyError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| VerifyError::Pem {
        what: "the certificate",
        message: e.to_string(),
    })?;
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [one] => SpiffeId::parse(one).map_err(|e| VerifyError::BadSpiffeId(e.to_string())),
        none_or_many => Err(VerifyError::NoSpiffeId(format!("{none_or_many:?}"))),
    }
}
