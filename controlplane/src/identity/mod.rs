//! Identity: who a peer is, proven by its certificate, never by what it claims.
//!
//! Every hop (proxy → router → hub, agent → hub, operator → hub) is mutual TLS. The
//! peer's certificate carries one SPIFFE id ([`SpiffeId`]); the hub turns it into an
//! [`Identity`] and authorizes from that: a proxy's environment and role, an agent's
//! remote cluster, an operator's name. Node metadata that claims something else is
//! refused, not trusted.
//!
//! The certificate authority ([`ca`]) issues those certificates: over the CSR API
//! ([`api`], served to peers without a certificate by [`csr_listener`]) to peers
//! proving themselves with a Kubernetes service-account token ([`tokenreview`]) or a
//! join token ([`tokens`]), and directly through
//! [`CertificateIssuer`] (SDS). [`client`] is the requesting side (files, renewal at
//! half-life), [`verify`] checks a chain against the trust bundle, [`cli`] holds the
//! `token`, `ca` and `cert` commands. See `docs/security.md`.

pub mod api;
pub mod authz;
pub mod ca;
pub mod cli;
pub mod client;
pub mod csr_listener;
pub mod spiffe;
pub mod test_issuer;
pub mod testing;
pub mod tls;
pub mod tokenreview;
pub mod tokens;
pub mod verify;

pub use spiffe::{Identity, SpiffeId, SpiffeIdError};

use std::time::SystemTime;

/// A certificate and its key, as PEM, issued for one identity.
#[derive(Clone)]
pub struct IssuedCertificate {
    /// The leaf first, then the intermediates up to (not including) the root.
    pub chain_pem: String,
    /// PKCS#8 private key of the leaf.
    pub key_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("IssuedCertificate")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Issues certificates for identities and says which roots to trust. The hub's CA
/// implements it; SDS and the hub's own serving certificate are built on it.
pub trait CertificateIssuer: Send + Sync + std::fmt::Debug {
    /// A fresh key and certificate for `id`, valid from now for the issuer's lifetime.
    fn issue(&self, id: &SpiffeId) -> anyhow::Result<IssuedCertificate>;
    /// Every root a peer must trust right now, as concatenated PEM: during a rotation
    /// the old root and the new one.
    fn trust_bundle_pem(&self) -> String;
    /// Changes whenever certificates issued before should be replaced and the bundle
    /// sent again (a rotation's phase, an old root leaving the bundle). `None`: never.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
    /// The CRLs of every CA a peer may meet in a chain, PEM, concatenated (empty:
    /// none; peers then check no revocation). Sent with the trust bundle.
    fn crl_pem(&self) -> String {
        String::new()
    }
    /// Changes whenever the bundle or the CRLs change without certificates needing
    /// re-issue (a revocation, a new intermediate's CRL). `None`: never.
    fn trust_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}
