//! A throwaway PKI for tests: a root, and leaf certificates carrying one SPIFFE id,
//! written as PEM files into a directory. Not a certificate authority (no CSRs, no
//! intermediates, no rotation): `identity::ca` is that; this only mints what tests
//! of the mTLS listeners and of authorization need, expired and foreign ones
//! included.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::tls::TlsFiles;
use super::{Identity, SpiffeId};

/// A self-signed root that signs leaves.
#[derive(Debug)]
pub struct TestCa {
    pub trust_domain: String,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// How long a test leaf is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From a day ago for a year.
    Current,
    /// Ended in 2001.
    Expired,
}

impl TestCa {
    /// A new root for `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        let key = KeyPair::generate().expect("generating a key");
        let mut params = CertificateParams::new(Vec::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("test root of {trust_domain}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signing the root");
        Self {
            trust_domain: trust_domain.to_string(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The root as PEM (the trust bundle).
    pub fn bundle_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A leaf for `identity` of this CA's trust domain: (chain PEM, key PEM).
    pub fn leaf(&self, identity: Identity, validity: Validity) -> (String, String) {
        let uri = SpiffeId::new(self.trust_domain.clone(), identity).to_string();
        self.leaf_with_uris(&[uri], validity)
    }

    /// A leaf whose URI SANs are `uris` verbatim (none, several, foreign domains).
    pub fn leaf_with_uris(&self, uris: &[String], validity: Validity) -> (String, String) {
        let key = KeyPair::generate().expect("generating a key");
        // localhost / loopback too, so that peers checking names also accept it.
        let mut params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .expect("params");
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into().expect("an IA5 URI")));
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if validity == Validity::Expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        } else {
            let now = std::time::SystemTime::now();
            params.not_before = (now - std::time::Duration::from_secs(86_400)).into();
            params.not_after = (now + std::time::Duration::from_secs(365 * 86_400)).into();
        }
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("signing the leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a leaf for `identity`, its key and this CA's bundle into `dir` as
    /// `{name}.crt`, `{name}.key` and `{name}-ca.crt`.
    pub fn write(&self, dir: &Path, name: &str, identity: Identity) -> TlsFiles {
        let (cert, key) = self.leaf(identity, Validity::Current);
        write_files(dir, name, &cert, &key, self.bundle_pem())
    }
}

/// Writes `{name}.crt`, `{name}.key`, `{name}-ca.crt` into `dir`.
pub fn write_files(dir: &Path, name: &str, cert: &str, key: &str, bundle: &str) -> TlsFiles {
    let path = |suffix: &str| -> PathBuf { dir.join(format!("{name}{suffix}")) };
    let files = TlsFiles {
        cert: path(".crt"),
        key: path(".key"),
        ca: path("-ca.crt"),
    };
    std::fs::write(&files.cert, cert).expect("writing the cert");
    std::fs::write(&files.key, key).expect("writing the key");
    std::fs::write(&files.ca, bundle).expect("writing the bundle");
    files
}
