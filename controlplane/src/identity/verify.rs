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
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
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
/// peer with this, on both sides). `X509 CRL` blocks in the bundle (the CSR API's
/// `ca.pem` carries the CA's) are checked as the listeners check them: a certificate
/// a CRL lists is refused, one whose issuer has no CRL there is not.
pub fn client_verifier(bundle_pem: &str) -> Result<Arc<dyn ClientCertVerifier>, VerifyError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem("the trust bundle", bundle_pem)? {
        roots
            .add(cert)
            .map_err(|e| VerifyError::Untrusted(format!("a root of the trust bundle: {e}")))?;
    }
    let crls = CertificateRevocationListDer::pem_slice_iter(bundle_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| VerifyError::Pem {
            what: "a CRL of the trust bundle",
            message: e.to_string(),
        })?;
    WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .with_crls(crls)
    .allow_unknown_revocation_status()
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

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;
    use std::time::SystemTime;

    use proptest::prelude::*;

    use super::*;
    use crate::identity::CertificateIssuer;
    use crate::identity::ca::{Ca, CaConfig};

    /// One CA and one certificate for every case (issuing per case would measure
    /// the CA, not the verifier).
    fn fixture() -> &'static (String, String, Vec<u8>) {
        static FIXTURE: OnceLock<(String, String, Vec<u8>)> = OnceLock::new();
        FIXTURE.get_or_init(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let ca = Ca::open(
                    crate::identity::ca::tests::memory_store(),
                    CaConfig::new("mesh.local"),
                )
                .await
                .unwrap();
                let id =
                    SpiffeId::parse("spiffe://mesh.local/env/prod/ns/shop/sa/checkout").unwrap();
                let issued = ca.issue(&id).unwrap();
                let chain = certs_from_pem("chain", &issued.chain_pem).unwrap();
                (ca.trust_bundle_pem(), issued.chain_pem, chain[0].to_vec())
            })
        })
    }

    fn pem(der: &[u8]) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
    }

    fn cases() -> u32 {
        std::env::var("TRIBUTARY_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000)
    }

    #[test]
    fn the_unmodified_chain_verifies() {
        let (bundle, chain, leaf) = fixture();
        let intermediate = &chain[chain.find("-----END CERTIFICATE-----").unwrap() + 26..];
        let rebuilt = format!("{}{intermediate}", pem(leaf));
        verify_chain(bundle, &rebuilt, SystemTime::now()).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: cases(),
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Any change to one byte of a valid leaf is refused (the signature covers
        /// every byte that means something; the rest does not parse), and arbitrary
        /// bytes never verify and never panic.
        #[test]
        fn fuzz_verify_chain(at in any::<prop::sample::Index>(), xor in 1u8..=255, junk in prop::collection::vec(any::<u8>(), 0..600)) {
            let (bundle, chain, leaf) = fixture();
            let intermediate = &chain[chain.find("-----END CERTIFICATE-----").unwrap() + 26..];
            let mut mutated = leaf.clone();
            let i = at.index(mutated.len());
            mutated[i] ^= xor;
            let tampered = format!("{}{intermediate}", pem(&mutated));
            prop_assert!(verify_chain(bundle, &tampered, SystemTime::now()).is_err(), "byte {i} ^ {xor:#x} accepted");
            let garbage = format!("{}{intermediate}", pem(&junk));
            prop_assert!(verify_chain(bundle, &garbage, SystemTime::now()).is_err());
            let _ = spiffe_id_of(&junk);
        }
    }
}
