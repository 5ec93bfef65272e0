//! A small in-memory [`CertificateIssuer`] for tests and local trials: a self-signed
//! root generated at start that signs workload certificates directly (no
//! intermediate, no CSR, no proof of identity). Not a certificate authority: the
//! hub's CA (`identity::ca`) replaces it wherever identities matter.

use std::time::{Duration, SystemTime};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::{CertificateIssuer, IssuedCertificate, SpiffeId};

/// Issues leaves valid for `lifetime` from a root it generated.
pub struct TestIssuer {
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
    lifetime: Duration,
}

impl std::fmt::Debug for TestIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestIssuer")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl TestIssuer {
    /// A new root (named `common_name`) whose leaves live `lifetime`.
    pub fn new(common_name: &str, lifetime: Duration) -> anyhow::Result<Self> {
        let key = KeyPair::generate().context("generating the test root's key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(10 * 365 * 24 * 3600)).into();
        let root = params.self_signed(&key).context("signing the test root")?;
        Ok(Self {
            root_pem: root.pem(),
            issuer: Issuer::new(params, key),
            lifetime,
        })
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }
}

impl CertificateIssuer for TestIssuer {
    fn issue(&self, id: &SpiffeId) -> anyhow::Result<IssuedCertificate> {
        let key = KeyPair::generate().context("generating a workload key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .with_context(|| format!("{id} as a URI SAN"))?,
        )];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let not_before = SystemTime::now();
        let not_after = not_before + self.lifetime;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let leaf = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing the certificate of {id}"))?;
        Ok(IssuedCertificate {
            chain_pem: leaf.pem(),
            key_pem: key.serialize_pem(),
            not_before,
            not_after,
        })
    }

    fn trust_bundle_pem(&self) -> String {
        self.root_pem.clone()
    }
}
