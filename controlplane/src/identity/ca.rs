//! The mesh's certificate authority: a root, one intermediate per signer, short-lived
//! leaf certificates carrying one SPIFFE id, and rotation with an overlap window.
//!
//! The chain (see `docs/security.md`):
//!
//! ```text
//! root (self-signed, --ca-root-lifetime, default 10 years; generated into the store or
//! │     supplied by the operator with --ca-root-cert/--ca-root-key)
//! ├── intermediate "cluster/{id}"  (--ca-intermediate-lifetime, default 30 days)
//! │     signs the agent of remote cluster {id}, and the workloads whose credential
//! │     proved they run in {id} (a TokenReview by {id}'s API server, or a join token
//! │     created with --cluster {id})
//! └── intermediate "mesh"
//!       signs hubs, routers and operators, and workloads and gateways whose cluster the
//!       hub does not know (SDS issues through `CertificateIssuer::issue`, where a
//!       node's claims are no proof of its cluster)
//! ```
//!
//! A root rotation has three phases (`docs/security.md`, "Rotation"): the new root is
//! trusted alongside the active one, which still signs (`incoming`, for the trust
//! window); then it signs, and the old root stays trusted (`retiring`, for the
//! overlap); then the old root leaves the bundle. Each change of what a peer must
//! hold is announced on [`Ca::changes`], so SDS pushes it at once.
//!
//! State lives in the store so that every replica shares one CA:
//! `/tributary/ca/roots` (the active root and its key, an incoming root, and the roots
//! being rotated out with the time each leaves the trust bundle) and `/tributary/ca/intermediates/{signer}`
//! (each signer's current intermediate and key). Every write is a transaction compared
//! on the mod revision it read, so two replicas creating the same intermediate at once
//! end with one (the loser reloads the winner's; certificates it issued meanwhile stay
//! valid, they carry their own intermediate). Each replica keeps the state in memory
//! (an `Arc` snapshot behind a lock held only to clone or swap it) and follows the
//! prefix with a store watch ([`Ca::run`]), so issuance itself never waits on the store.
//!
//! Keys never reach a log: [`IssuedCertificate`]'s `Debug` omits them, and so do the
//! types here.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};
use tributary_store::watcher::{Update, Watcher};
use tributary_store::{Compare, SharedStore, StoreError, Txn, TxnOp};

use super::{CertificateIssuer, Identity, IssuedCertificate, SpiffeId};

/// Everything the CA keeps in the store lives under this prefix.
pub const CA_PREFIX: &str = "/tributary/ca/";
/// The active root and the roots being rotated out (JSON [`RootsRecord`]).
pub const ROOTS_KEY: &str = "/tributary/ca/roots";
/// `{prefix}{signer}`: one signer's current intermediate (JSON).
pub const INTERMEDIATES_PREFIX: &str = "/tributary/ca/intermediates/";
/// The revoked certificates, listed in their issuers' CRLs (JSON).
pub const REVOKED_KEY: &str = "/tributary/ca/revoked";

/// Default lifetime of a leaf certificate (`--cert-lifetime`).
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Default lifetime of an intermediate (`--ca-intermediate-lifetime`).
pub const DEFAULT_INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default lifetime of a generated root (`--ca-root-lifetime`).
pub const DEFAULT_ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default overlap of a root rotation (`--overlap`): how long the old root stays in
/// the trust bundle after the new one starts signing. Two leaf lifetimes, so that every
/// leaf issued under the old root has expired, and every peer renewed at half-life
/// twice, before the old root leaves the bundle.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(48 * 3600);
/// Default trust window of a root rotation (`--trust-window`): how long the new root
/// is only trusted (in every bundle, signing nothing) before it starts signing. One
/// leaf lifetime, so that every peer has renewed at half-life at least once, and so
/// holds the two-root bundle, before any peer is given a certificate of the new root.
/// SDS clients receive the new bundle at once; file-based peers (agents, routers,
/// `tributary cert request --renew`) only with their next renewal.
pub const DEFAULT_TRUST_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Certificates start this long before they are issued, for peers whose clock is
/// slightly behind.
const BACKDATE: Duration = Duration::from_secs(60);
/// Store writes that lost a race are retried this many times (then the error says so).
const WRITE_ATTEMPTS: usize = 5;

/// How the CA is configured (built from flags by `main`, directly by tests).
#[derive(Clone)]
pub struct CaConfig {
    /// The mesh's SPIFFE trust domain, e.g. `mesh.local`.
    pub trust_domain: String,
    /// Lifetime of leaf certificates (workloads, agents, hubs, routers, operators).
    pub cert_lifetime: Duration,
    /// Lifetime of an intermediate. An intermediate is replaced once less than two
    /// leaf lifetimes of it remain, so a leaf never outlives its intermediate.
    pub intermediate_lifetime: Duration,
    /// Lifetime of a root the CA generates.
    pub root_lifetime: Duration,
    /// DNS names and IP addresses put in hub and router certificates next to their
    /// SPIFFE id, for clients that check the hostname they dialled.
    pub serving_sans: Vec<String>,
    /// An operator-supplied root (PEM certificate and PKCS#8 key) instead of a
    /// generated one.
    pub root: Option<SuppliedRoot>,
}

impl std::fmt::Debug for CaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaConfig")
            .field("trust_domain", &self.trust_domain)
            .field("cert_lifetime", &self.cert_lifetime)
            .field("intermediate_lifetime", &self.intermediate_lifetime)
            .field("root_lifetime", &self.root_lifetime)
            .field("serving_sans", &self.serving_sans)
            .field("root", &self.root.as_ref().map(|r| &r.source))
            .finish()
    }
}

impl CaConfig {
    pub fn new(trust_domain: impl Into<String>) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            cert_lifetime: DEFAULT_CERT_LIFETIME,
            intermediate_lifetime: DEFAULT_INTERMEDIATE_LIFETIME,
            root_lifetime: DEFAULT_ROOT_LIFETIME,
            serving_sans: Vec::new(),
            root: None,
        }
    }
}

/// A root the operator supplies: its certificate and key as PEM, and where they came
/// from (named in errors).
#[derive(Clone)]
pub struct SuppliedRoot {
    pub cert_pem: String,
    pub key_pem: String,
    pub source: String,
}

impl std::fmt::Debug for SuppliedRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("SuppliedRoot")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl SuppliedRoot {
    /// Reads `--ca-root-cert` and `--ca-root-key`.
    pub fn read(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, CaError> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| CaError::Config(format!("{}: {e}", p.display())))
        };
        Ok(Self {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            source: format!(
                "--ca-root-cert {} / --ca-root-key {}",
                cert.display(),
                key.display()
            ),
        })
    }
}

/// Which intermediate signs a certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signer {
    /// The intermediate of one remote cluster.
    Cluster(String),
    /// The mesh's own intermediate (hubs, routers, operators, SDS-issued workloads).
    Mesh,
}

impl Signer {
    /// The signer of an identity when nothing else says which cluster it runs in: an
    /// agent's cluster intermediate, the mesh intermediate for everything else.
    pub fn for_identity(id: &Identity) -> Signer {
        match id {
            Identity::Agent { cluster } => Signer::Cluster(cluster.clone()),
            _ => Signer::Mesh,
        }
    }

    /// Its name in the store and in the admin API: `mesh` or `cluster/{id}`.
    pub fn name(&self) -> String {
        match self {
            Signer::Cluster(id) => format!("cluster/{id}"),
            Signer::Mesh => "mesh".to_string(),
        }
    }

    pub fn parse(name: &str) -> Option<Signer> {
        match name {
            "mesh" => Some(Signer::Mesh),
            _ => name
                .strip_prefix("cluster/")
                .filter(|id| super::spiffe::valid_segment(id))
                .map(|id| Signer::Cluster(id.to_string())),
        }
    }
}

/// Errors of the CA. `Store` errors are retryable when the store says so; the others
/// need someone's action.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate authority: {0}")]
    Config(String),
    #[error("certificate authority: the store: {0}")]
    Store(#[from] StoreError),
    #[error("certificate authority: the store's {key} is invalid: {message}")]
    Corrupt { key: String, message: String },
    #[error("certificate authority: {0}")]
    Crypto(String),
    #[error(
        "certificate authority: {what} kept changing under us ({WRITE_ATTEMPTS} attempts): try again"
    )]
    Contended { what: String },
}

impl CaError {
    pub fn is_retryable(&self) -> bool {
        match self {
            CaError::Store(e) => e.is_retryable(),
            CaError::Contended { .. } => true,
            _ => false,
        }
    }
}

fn crypto(what: &str) -> impl FnOnce(rcgen::Error) -> CaError + '_ {
    move |e| CaError::Crypto(format!("{what}: {e}"))
}

/// A certificate and its key, as stored.
#[derive(Clone, Serialize, Deserialize)]
struct KeyedCert {
    cert_pem: String,
    key_pem: String,
}

/// A root being rotated out: trusted until `until` (seconds since the epoch).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RetiringRoot {
    pub cert_pem: String,
    pub until: u64,
    /// Its key, kept until it leaves the bundle so that it can sign its CRL (peers
    /// that check every CA of a chain, as Envoy does, need one per CA). Roots retired
    /// before CRLs existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_pem: Option<String>,
}

impl std::fmt::Debug for RetiringRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("RetiringRoot")
            .field("until", &self.until)
            .finish_non_exhaustive()
    }
}

/// A new root in the first phase of a rotation: in the trust bundle, signing nothing
/// until `signs_from` (seconds since the epoch); then it replaces the active root,
/// which stays trusted `overlap` seconds more.
#[derive(Clone, Serialize, Deserialize)]
struct IncomingRoot {
    #[serde(flatten)]
    keyed: KeyedCert,
    signs_from: u64,
    overlap: u64,
}

/// `/tributary/ca/roots`.
#[derive(Clone, Serialize, Deserialize)]
struct RootsRecord {
    active: KeyedCert,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    incoming: Option<IncomingRoot>,
    #[serde(default)]
    retiring: Vec<RetiringRoot>,
}

impl RootsRecord {
    /// The incoming root takes over signing at `now`: the active one joins the
    /// retiring roots for the overlap (counted from `now`).
    fn promote(&mut self, now: SystemTime) -> bool {
        let Some(incoming) = self.incoming.take() else {
            return false;
        };
        self.retiring.retain(|r| from_unix(r.until) > now);
        self.retiring.push(RetiringRoot {
            cert_pem: self.active.cert_pem.clone(),
            until: unix(now + Duration::from_secs(incoming.overlap)),
            key_pem: Some(self.active.key_pem.clone()),
        });
        self.active = incoming.keyed;
        true
    }
}

/// `/tributary/ca/intermediates/{signer}`.
#[derive(Clone, Serialize, Deserialize)]
struct IntermediateRecord {
    #[serde(flatten)]
    keyed: KeyedCert,
    /// SHA-256 (hex) of the root certificate that signed it.
    root: String,
    /// Its notAfter, seconds since the epoch.
    not_after: u64,
    /// The signer's previous intermediates, still accepted until their overlap ends;
    /// then each is revoked (its serial joins its root's CRL).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    retiring: Vec<RetiringIntermediate>,
}

/// A replaced intermediate in its overlap: it signs nothing, its certificates are
/// accepted until `until` (seconds since the epoch), then it is revoked. Its key is
/// kept until then to sign its own (empty) CRL.
#[derive(Clone, Serialize, Deserialize)]
struct RetiringIntermediate {
    #[serde(flatten)]
    keyed: KeyedCert,
    /// SHA-256 (hex) of the root that signed it: the CRL that revokes it is that
    /// root's.
    root: String,
    until: u64,
}

/// `/tributary/ca/revoked`: every revoked certificate that has not expired yet.
#[derive(Clone, Default, Serialize, Deserialize)]
struct RevokedRecord {
    #[serde(default)]
    entries: Vec<RevokedEntry>,
}

/// One revoked certificate, listed in its issuer's CRL until it expires.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevokedEntry {
    /// SHA-256 (hex) of the issuing CA's certificate: the CRL that lists it.
    pub issuer: String,
    /// The revoked certificate's serial number (hex, as its DER encodes it).
    pub serial: String,
    /// What it was (`intermediate mesh`, `intermediate cluster/east-1`, a SPIFFE id).
    pub what: String,
    /// When it was revoked (seconds since the epoch).
    pub revoked_at: u64,
    /// Its notAfter (seconds since the epoch): after it, the entry is dropped.
    pub not_after: u64,
}

/// A loaded signing certificate: its PEM, and an issuer holding its key.
struct Signing {
    cert_pem: String,
    /// Kept to write the record again (a rotation moves it to the retiring ones).
    key_pem: String,
    fingerprint: String,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

struct Intermediate {
    signing: Signing,
    /// The fingerprint of the root that signed it.
    root: String,
    /// The store's mod revision of its key (0: not written yet).
    mod_revision: i64,
    /// The signer's previous intermediates in their overlap (see
    /// [`RetiringIntermediate`]).
    retiring: Vec<OldIntermediate>,
}

/// A loaded [`RetiringIntermediate`].
struct OldIntermediate {
    signing: Signing,
    root: String,
    serial: String,
    until: SystemTime,
}

/// A loaded incoming root (see [`IncomingRoot`]).
struct Incoming {
    cert_pem: String,
    fingerprint: String,
    signs_from: SystemTime,
    signing: Arc<Signing>,
}

/// The CRLs peers check chains against: one per CA this replica holds a key of
/// (every root in the bundle, every intermediate that signs or is in its overlap),
/// each listing the revoked certificates that CA issued (empty when none). Envoy
/// requires a CRL for every CA of a chain once it is given one, so none is left out.
#[derive(Default)]
pub struct Crls {
    /// Every CRL, PEM, concatenated.
    pub pem: String,
    pub der: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
    /// What the CRLs say (each issuer with its revoked serials), to tell a change of
    /// content from a re-signing.
    key: String,
}

impl std::fmt::Debug for Crls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crls")
            .field("count", &self.der.len())
            .finish()
    }
}

/// One replica's view of the CA state; replaced whole, never mutated.
struct CaState {
    /// The root that signs (the stored active root).
    root: Arc<Signing>,
    /// A new root that is trusted but does not sign yet.
    incoming: Option<Incoming>,
    roots_revision: i64,
    /// The store's revision when this state was read.
    revision: i64,
    retiring: Vec<RetiringRoot>,
    intermediates: BTreeMap<Signer, Arc<Intermediate>>,
    /// The revoked certificates (`/tributary/ca/revoked`) and its mod revision.
    revoked: Vec<RevokedEntry>,
    revoked_revision: i64,
    /// Signed from the above by [`Ca::sign_crls`].
    crls: Arc<Crls>,
}

/// The certificate authority. Cheap to share (`Arc<Ca>`); every method may be called
/// from any task.
pub struct Ca {
    cfg: CaConfig,
    store: SharedStore,
    /// The current state. The lock is held only to clone or swap the `Arc`.
    state: RwLock<Arc<CaState>>,
    /// Bumped whenever what a peer must hold changes: the trust bundle, or the chain
    /// new certificates are issued from (see [`CertificateIssuer::changes`]).
    changes: watch::Sender<u64>,
    /// What `changes` was last bumped for: the trust bundle and each signer's
    /// intermediate (the lock is held only to compare and replace it).
    issued_from: std::sync::Mutex<(String, BTreeMap<Signer, String>)>,
    /// Bumped whenever what a peer must trust changes: the roots or the CRLs (a new
    /// intermediate's, a revocation). See [`CertificateIssuer::trust_changes`].
    trust: watch::Sender<u64>,
    /// What `trust` was last bumped for (roots and CRL contents).
    trusted: std::sync::Mutex<String>,
    /// CRLs already signed, by (issuer fingerprint, revoked serials): a reload that
    /// changes nothing they say does not re-sign them.
    crl_cache: std::sync::Mutex<CrlCache>,
    /// The [`CaStatus::warnings`] last logged (each is logged when it appears).
    warned: std::sync::Mutex<Vec<String>>,
}

type CrlCache = std::collections::HashMap<
    (String, Vec<String>),
    (
        rustls::pki_types::CertificateRevocationListDer<'static>,
        String,
    ),
>;

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.snapshot();
        f.debug_struct("Ca")
            .field("trust_domain", &self.cfg.trust_domain)
            .field("root", &state.root.fingerprint)
            .field("retiring", &state.retiring.len())
            .field("signers", &state.intermediates.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The phase of a root rotation (`GET /v1/ca`'s `phase`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RotationPhase {
    /// One root, trusted and signing.
    Steady,
    /// 1. A new root is trusted alongside the active one, which still signs: peers
    ///    receive the two-root bundle (`incoming`).
    TrustingNew,
    /// 2. The new root signs; the old one is still trusted while peers move to the new
    ///    chain (`retiring`).
    IssuingFromNew,
}

/// What `GET /v1/ca` and the rotation commands report.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CaStatus {
    pub trust_domain: String,
    /// Where a root rotation is: trusting the new root, issuing from it (the old one
    /// still trusted), or steady (the old one dropped).
    pub phase: RotationPhase,
    /// SHA-256 of the active root (the one that signs).
    pub root: String,
    pub root_not_after: String,
    /// A new root trusted alongside the active one, and when it starts signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<IncomingStatus>,
    /// Roots still trusted while being rotated out: fingerprint and until when.
    pub retiring: Vec<RetiringStatus>,
    /// Each signer's intermediate: its fingerprint and notAfter.
    pub intermediates: BTreeMap<String, IntermediateStatus>,
    /// The revoked certificates the CRLs list (until each expires).
    #[serde(default)]
    pub revoked: Vec<RevokedStatus>,
    /// What an operator should act on (also logged when it appears): a root still
    /// trusted without a CRL (retired before CRLs existed, so its key was not kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IncomingStatus {
    pub root: String,
    pub signs_from: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RetiringStatus {
    pub root: String,
    pub until: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IntermediateStatus {
    pub fingerprint: String,
    pub root: String,
    pub not_after: String,
    /// The signer's previous intermediates, still accepted until `until`, then
    /// revoked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring: Vec<RetiringIntermediateStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RetiringIntermediateStatus {
    pub fingerprint: String,
    pub serial: String,
    pub until: String,
}

/// A revoked certificate, as `GET /v1/ca` lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevokedStatus {
    pub what: String,
    pub serial: String,
    /// SHA-256 of the CA whose CRL lists it.
    pub issuer: String,
    pub revoked_at: String,
    /// When it expires (and leaves the CRL).
    pub not_after: String,
}

pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn from_unix(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// SHA-256 of a DER certificate, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut buf = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .expect("the system's random number generator works");
    buf
}

/// The DER of the first certificate in `pem`.
fn first_der(pem: &str) -> Result<Vec<u8>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| "no CERTIFICATE block".to_string())?
        .map(|c| c.to_vec())
        .map_err(|e| format!("not PEM: {e}"))
}

fn not_after_of(der: &[u8]) -> Result<SystemTime, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let t = cert.validity().not_after.timestamp();
    Ok(from_unix(u64::try_from(t).unwrap_or(0)))
}

fn load_signing(cert_pem: &str, key_pem: &str) -> Result<Signing, String> {
    let der = first_der(cert_pem)?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| format!("the key: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err("the key does not belong to the certificate".into());
    }
    if !cert.is_ca() {
        return Err("the certificate is not a CA (basicConstraints CA:TRUE)".into());
    }
    let not_after = not_after_of(&der)?;
    let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key).map_err(|e| e.to_string())?;
    Ok(Signing {
        cert_pem: cert_pem.to_string(),
        key_pem: key_pem.to_string(),
        fingerprint: fingerprint(&der),
        not_after,
        issuer,
    })
}

fn serial() -> SerialNumber {
    let mut b = random_bytes::<16>();
    b[0] &= 0x7f; // a positive INTEGER
    SerialNumber::from_slice(&b)
}

fn ca_params(
    cn: String,
    td: &str,
    now: SystemTime,
    until: SystemTime,
    path_len: Option<u8>,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, td);
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = match path_len {
        Some(n) => IsCa::Ca(BasicConstraints::Constrained(n)),
        None => IsCa::Ca(BasicConstraints::Unconstrained),
    };
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = (now - BACKDATE).into();
    p.not_after = until.into();
    p.serial_number = Some(serial());
    p.use_authority_key_identifier_extension = path_len.is_some();
    p
}

/// Generates a self-signed root.
fn generate_root(cfg: &CaConfig, now: SystemTime) -> Result<KeyedCert, CaError> {
    let key = KeyPair::generate().map_err(crypto("generating the root key"))?;
    // A distinct name per root: peers find a chain's issuer by name, and during a
    // rotation two roots are trusted at once.
    let cn = format!(
        "Tributary root {} {}",
        rfc3339(now),
        hex(&random_bytes::<4>())
    );
    let params = ca_params(cn, &cfg.trust_domain, now, now + cfg.root_lifetime, None);
    let cert = params
        .self_signed(&key)
        .map_err(crypto("signing the root"))?;
    Ok(KeyedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// `i`'s retiring intermediates that `keep` selects, as stored.
fn retiring_records(
    i: &Intermediate,
    keep: impl Fn(&OldIntermediate) -> bool,
) -> Vec<RetiringIntermediate> {
    i.retiring
        .iter()
        .filter(|o| keep(o))
        .map(|o| RetiringIntermediate {
            keyed: KeyedCert {
                cert_pem: o.signing.cert_pem.clone(),
                key_pem: o.signing.key_pem.clone(),
            },
            root: o.root.clone(),
            until: unix(o.until),
        })
        .collect()
}

fn revoked_intermediate(
    signer: &Signer,
    root: &str,
    serial: String,
    not_after: SystemTime,
    now: SystemTime,
) -> RevokedEntry {
    RevokedEntry {
        issuer: root.to_string(),
        serial,
        what: format!("intermediate {}", signer.name()),
        revoked_at: unix(now),
        not_after: unix(not_after),
    }
}

/// The CRLs of `state`: one per CA it holds a key of (every root in the bundle,
/// every intermediate that signs or is in its overlap), each listing the revoked
/// certificates that CA issued, signed anew only when that list changed.
fn crls_for(
    cache: &std::sync::Mutex<CrlCache>,
    state: &CaState,
    now: SystemTime,
) -> Result<Crls, CaError> {
    let mut cas: Vec<&Signing> = vec![&state.root];
    cas.extend(state.incoming.iter().map(|i| &*i.signing));
    let retiring_roots: Vec<Signing> = state
        .retiring
        .iter()
        .filter(|r| from_unix(r.until) > now)
        .filter_map(|r| {
            let key = r.key_pem.as_deref()?;
            load_signing(&r.cert_pem, key)
                .map_err(
                    |e| warn!(error = %e, "a retiring root's key does not load: no CRL for it"),
                )
                .ok()
        })
        .collect();
    cas.extend(retiring_roots.iter());
    for i in state.intermediates.values() {
        cas.push(&i.signing);
        cas.extend(i.retiring.iter().map(|o| &o.signing));
    }
    let mut cache = cache.lock().expect("CRL cache lock");
    let mut fresh = CrlCache::new();
    let mut crls = Crls::default();
    for ca in cas {
        let revoked: Vec<&RevokedEntry> = state
            .revoked
            .iter()
            .filter(|r| r.issuer == ca.fingerprint)
            .collect();
        let mut serials: Vec<String> = revoked.iter().map(|r| r.serial.clone()).collect();
        serials.sort();
        let key = (ca.fingerprint.clone(), serials);
        if fresh.contains_key(&key) {
            continue;
        }
        let signed = match cache.get(&key) {
            Some(c) => c.clone(),
            None => match sign_crl(ca, &revoked, now) {
                Ok(c) => c,
                Err(e) => {
                    // A CA that cannot sign CRLs (a supplied root without the
                    // cRLSign key usage): no CRL at all, rather than a set that
                    // leaves one CA of a chain out (Envoy would refuse every chain
                    // through it). Revocation is then not enforced.
                    warn!(error = %e, ca = %ca.fingerprint, "a CA cannot sign its CRL: revocation is not enforced");
                    *cache = CrlCache::new();
                    return Ok(Crls::default());
                }
            },
        };
        crls.key
            .push_str(&format!("{}:{};", key.0, key.1.join(",")));
        crls.der.push(signed.0.clone());
        crls.pem.push_str(&signed.1);
        fresh.insert(key, signed);
    }
    *cache = fresh;
    Ok(crls)
}

/// A CRL of `ca` listing `revoked`, valid from now until the CA itself expires: it is
/// replaced whenever what it lists changes, and peers get it pushed (SDS) or with
/// their trust bundle, so it has no shorter refresh period to announce.
fn sign_crl(
    ca: &Signing,
    revoked: &[&RevokedEntry],
    now: SystemTime,
) -> Result<
    (
        rustls::pki_types::CertificateRevocationListDer<'static>,
        String,
    ),
    CaError,
> {
    let this_update = now - BACKDATE;
    let params = rcgen::CertificateRevocationListParams {
        this_update: this_update.into(),
        next_update: ca.not_after.max(now + BACKDATE).into(),
        // Increasing per issuer: the second it was signed.
        crl_number: SerialNumber::from(unix(now)),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|r| {
                Ok(rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&unhex(&r.serial).ok_or_else(
                        || CaError::Corrupt {
                            key: REVOKED_KEY.into(),
                            message: format!("serial {:?} is not hex", r.serial),
                        },
                    )?),
                    revocation_time: from_unix(r.revoked_at).into(),
                    reason_code: Some(rcgen::RevocationReason::Superseded),
                    invalidity_date: None,
                })
            })
            .collect::<Result<_, CaError>>()?,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&ca.issuer)
        .map_err(crypto("signing a CRL"))?;
    let pem = crl.pem().map_err(crypto("encoding a CRL"))?;
    Ok((crl.der().clone(), pem))
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A leaf's serial number as an operator copies it (`serial=3F:7A…`, any case) in
/// the CA's form (lowercase hex of its DER bytes), or what was expected.
fn leaf_serial(given: &str) -> Result<String, String> {
    let t = given.trim();
    let t = t.strip_prefix("serial=").unwrap_or(t);
    let mut h: String = t.chars().filter(|c| *c != ':').collect();
    h.make_ascii_lowercase();
    if !h.len().is_multiple_of(2) {
        h.insert(0, '0');
    }
    match unhex(&h) {
        Some(b) if !b.is_empty() && b.len() <= 20 => Ok(h),
        _ => Err(format!(
            "serial {given:?}: expected a certificate's serial number in hex, as `openssl x509 -noout -serial` prints it (at most 20 bytes)"
        )),
    }
}

/// The serial number of a DER certificate, hex, as encoded.
fn serial_of(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    Ok(hex(cert.raw_serial()))
}

impl Ca {
    /// Opens the CA in `store`: loads its root (generating one, or storing the
    /// operator's, when the store has none) and the intermediates, and makes sure the
    /// mesh intermediate is current.
    pub async fn open(store: SharedStore, cfg: CaConfig) -> Result<Arc<Ca>, CaError> {
        if cfg.cert_lifetime.is_zero() || cfg.cert_lifetime * 2 >= cfg.intermediate_lifetime {
            return Err(CaError::Config(format!(
                "--cert-lifetime {} must be more than zero and less than half of --ca-intermediate-lifetime {}",
                humantime::format_duration(cfg.cert_lifetime),
                humantime::format_duration(cfg.intermediate_lifetime)
            )));
        }
        if cfg.intermediate_lifetime >= cfg.root_lifetime {
            return Err(CaError::Config(format!(
                "--ca-intermediate-lifetime {} must be less than --ca-root-lifetime {}",
                humantime::format_duration(cfg.intermediate_lifetime),
                humantime::format_duration(cfg.root_lifetime)
            )));
        }
        for san in &cfg.serving_sans {
            if san.parse::<std::net::IpAddr>().is_err()
                && rcgen::string::Ia5String::try_from(san.as_str()).is_err()
            {
                return Err(CaError::Config(format!(
                    "--serving-san {san:?} is neither an IP address nor an ASCII DNS name"
                )));
            }
        }
        Self::init_roots(&store, &cfg).await?;
        let mut state = Self::load(&store).await?;
        let crl_cache = std::sync::Mutex::default();
        state.crls = Arc::new(crls_for(&crl_cache, &state, SystemTime::now())?);
        let ca = Arc::new(Ca {
            cfg,
            store,
            state: RwLock::new(Arc::new(state)),
            changes: watch::channel(0).0,
            issued_from: Default::default(),
            trust: watch::channel(0).0,
            trusted: Default::default(),
            crl_cache,
            warned: Default::default(),
        });
        // A trust window that ended while no replica ran.
        ca.promote_due(SystemTime::now()).await?;
        ca.ensure_signer(&Signer::Mesh).await?;
        ca.note_changes();
        info!(trust_domain = %ca.cfg.trust_domain, root = %ca.snapshot().root.fingerprint, "certificate authority ready");
        Ok(ca)
    }

    /// Writes the first root when the store has none; checks a supplied root against
    /// the stored one.
    async fn init_roots(store: &SharedStore, cfg: &CaConfig) -> Result<(), CaError> {
        let (existing, _) = store.get(ROOTS_KEY).await?;
        if let Some(kv) = existing {
            if let Some(supplied) = &cfg.root {
                let stored: RootsRecord = parse_record(ROOTS_KEY, &kv.value)?;
                let fp = |pem: &str| first_der(pem).map(|d| fingerprint(&d));
                let theirs = fp(&supplied.cert_pem)
                    .map_err(|e| CaError::Config(format!("{}: {e}", supplied.source)))?;
                let ours = fp(&stored.active.cert_pem).map_err(|message| CaError::Corrupt {
                    key: ROOTS_KEY.into(),
                    message,
                })?;
                if theirs != ours {
                    return Err(CaError::Config(format!(
                        "{}: the store already holds a different root (SHA-256 {ours}, supplied {theirs}); \
                         the root changes only by rotation (`tributary ca rotate --root`), or start from an empty store",
                        supplied.source
                    )));
                }
            }
            return Ok(());
        }
        let now = SystemTime::now();
        let active = match &cfg.root {
            Some(s) => {
                load_signing(&s.cert_pem, &s.key_pem)
                    .map_err(|e| CaError::Config(format!("{}: {e}", s.source)))?;
                KeyedCert {
                    cert_pem: s.cert_pem.clone(),
                    key_pem: s.key_pem.clone(),
                }
            }
            None => generate_root(cfg, now)?,
        };
        let record = RootsRecord {
            active,
            incoming: None,
            retiring: Vec::new(),
        };
        let txn = Txn {
            compares: vec![Compare::absent(ROOTS_KEY)],
            success: vec![TxnOp::put(
                ROOTS_KEY,
                serde_json::to_vec(&record).expect("serializable"),
            )],
            failure: vec![],
        };
        // Losing the race means another replica stored its root first: use that one.
        if store.txn(txn).await?.succeeded {
            info!(store = %store.describe(), supplied = cfg.root.is_some(), "stored the CA root");
        }
        Ok(())
    }

    /// Reads the whole CA state from the store.
    async fn load(store: &SharedStore) -> Result<CaState, CaError> {
        let range = store.range(CA_PREFIX).await?;
        let mut roots = None;
        let mut intermediates = BTreeMap::new();
        let mut revoked = (Vec::new(), 0);
        for kv in &range.kvs {
            if kv.key == REVOKED_KEY {
                let rec: RevokedRecord = parse_record(&kv.key, &kv.value)?;
                revoked = (rec.entries, kv.mod_revision);
            } else if kv.key == ROOTS_KEY {
                roots = Some((
                    parse_record::<RootsRecord>(&kv.key, &kv.value)?,
                    kv.mod_revision,
                ));
            } else if let Some(name) = kv.key.strip_prefix(INTERMEDIATES_PREFIX) {
                let Some(signer) = Signer::parse(name) else {
                    warn!(key = %kv.key, "ignoring an intermediate of an unknown signer");
                    continue;
                };
                let rec: IntermediateRecord = parse_record(&kv.key, &kv.value)?;
                let signing =
                    load_signing(&rec.keyed.cert_pem, &rec.keyed.key_pem).map_err(|message| {
                        CaError::Corrupt {
                            key: kv.key.clone(),
                            message,
                        }
                    })?;
                let corrupt = |message: String| CaError::Corrupt {
                    key: kv.key.clone(),
                    message,
                };
                let retiring = rec
                    .retiring
                    .iter()
                    .map(|r| {
                        let signing = load_signing(&r.keyed.cert_pem, &r.keyed.key_pem)
                            .map_err(|m| corrupt(format!("retiring: {m}")))?;
                        let serial = first_der(&r.keyed.cert_pem)
                            .and_then(|d| serial_of(&d))
                            .map_err(|m| corrupt(format!("retiring: {m}")))?;
                        Ok(OldIntermediate {
                            signing,
                            root: r.root.clone(),
                            serial,
                            until: from_unix(r.until),
                        })
                    })
                    .collect::<Result<Vec<_>, CaError>>()?;
                intermediates.insert(
                    signer,
                    Arc::new(Intermediate {
                        signing,
                        root: rec.root,
                        mod_revision: kv.mod_revision,
                        retiring,
                    }),
                );
            }
        }
        let (roots, roots_revision) = roots.ok_or_else(|| CaError::Corrupt {
            key: ROOTS_KEY.into(),
            message: "missing".into(),
        })?;
        let root =
            load_signing(&roots.active.cert_pem, &roots.active.key_pem).map_err(|message| {
                CaError::Corrupt {
                    key: ROOTS_KEY.into(),
                    message,
                }
            })?;
        let incoming = match &roots.incoming {
            Some(i) => {
                // Loaded like the active root, so that a broken one is refused before
                // it is ever promoted.
                let signing =
                    load_signing(&i.keyed.cert_pem, &i.keyed.key_pem).map_err(|message| {
                        CaError::Corrupt {
                            key: ROOTS_KEY.into(),
                            message: format!("incoming: {message}"),
                        }
                    })?;
                Some(Incoming {
                    cert_pem: signing.cert_pem.clone(),
                    fingerprint: signing.fingerprint.clone(),
                    signs_from: from_unix(i.signs_from),
                    signing: Arc::new(signing),
                })
            }
            None => None,
        };
        Ok(CaState {
            root: Arc::new(root),
            incoming,
            roots_revision,
            revision: range.revision,
            retiring: roots.retiring,
            intermediates,
            revoked: revoked.0,
            revoked_revision: revoked.1,
            crls: Arc::default(),
        })
    }

    /// Reloads the state from the store.
    pub async fn reload(&self) -> Result<(), CaError> {
        let mut state = Self::load(&self.store).await?;
        state.crls = Arc::new(crls_for(&self.crl_cache, &state, SystemTime::now())?);
        *self.state.write().expect("CA state lock") = Arc::new(state);
        self.note_changes();
        Ok(())
    }

    /// Bumps [`Ca::changes`] if the trust bundle changed, or a signer's intermediate
    /// was replaced, since it was last bumped. A signer's first intermediate (a new
    /// cluster's) does not: nothing was issued from it before.
    fn note_changes(&self) {
        let warnings = warnings(&self.snapshot(), SystemTime::now());
        let mut warned = self.warned.lock().expect("CA warning lock");
        for w in warnings.iter().filter(|w| !warned.contains(w)) {
            warn!("{w}");
        }
        *warned = warnings;
        drop(warned);
        let bundle = self.trust_bundle_at(SystemTime::now());
        let signers: BTreeMap<Signer, String> = self
            .snapshot()
            .intermediates
            .iter()
            .map(|(s, i)| (s.clone(), i.signing.fingerprint.clone()))
            .collect();
        let mut last = self.issued_from.lock().expect("CA change lock");
        let replaced = signers
            .iter()
            .any(|(s, fp)| last.1.get(s).is_some_and(|before| before != fp));
        let changed = last.0 != bundle || replaced;
        let trusted = format!("{bundle}{}", self.snapshot().crls.key);
        *last = (bundle, signers);
        drop(last);
        // Trust first: a peer told to re-issue also finds the new CRLs pushed.
        let mut last = self.trusted.lock().expect("CA change lock");
        if *last != trusted {
            *last = trusted;
            self.trust.send_modify(|n| *n += 1);
        }
        drop(last);
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// A receiver that changes whenever what a peer must trust changes: the roots,
    /// or the CRLs (a revocation, an intermediate created, replaced or removed).
    /// Certificates need not be re-issued for it; the bundle and CRLs must be sent
    /// again.
    pub fn trust_changes(&self) -> watch::Receiver<u64> {
        self.trust.subscribe()
    }

    /// Every CRL, PEM (see [`Crls`]).
    pub fn crl_pem(&self) -> String {
        self.snapshot().crls.pem.clone()
    }

    /// Every CRL, DER, for rustls verifiers.
    pub fn crls(&self) -> Vec<rustls::pki_types::CertificateRevocationListDer<'static>> {
        self.snapshot().crls.der.clone()
    }

    /// The trust bundle at `now` followed by the CRLs: what a peer that verifies from
    /// files writes to its `ca.pem` (the CSR API's `trust_bundle_pem`). Readers of
    /// `--tls-ca` take the certificates as roots and check chains against the CRLs.
    pub fn trust_file_pem_at(&self, now: SystemTime) -> String {
        let mut pem = self.trust_bundle_at(now);
        if !pem.ends_with('\n') {
            pem.push('\n');
        }
        pem.push_str(&self.crl_pem());
        pem
    }

    /// A receiver that changes whenever the trust bundle changes (a rotation's phase,
    /// an old root's window ending) or new certificates are issued from another chain:
    /// certificates issued before should be replaced, with the current bundle.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The next time the CA's state changes by the clock alone: an incoming root's
    /// trust window ends (or, once it has, now: its promotion is retried until it is
    /// written), or a retiring root's overlap ends.
    fn next_deadline(&self, now: SystemTime) -> Option<SystemTime> {
        let state = self.snapshot();
        let incoming = state.incoming.iter().map(|i| i.signs_from.max(now));
        let retiring = state
            .retiring
            .iter()
            .map(|r| from_unix(r.until))
            .filter(|t| *t > now);
        // Retiring intermediates: their overlap's end (or now, once it has ended:
        // the revocation is retried until it is written).
        let intermediates = state
            .intermediates
            .values()
            .flat_map(|i| i.retiring.iter().map(|o| o.until.max(now)));
        incoming.chain(retiring).chain(intermediates).min()
    }

    /// Promotes the incoming root if its trust window has ended at `now`. Another
    /// replica having promoted it first is not an error.
    async fn promote_due(&self, now: SystemTime) -> Result<(), CaError> {
        let due = self
            .snapshot()
            .incoming
            .as_ref()
            .is_some_and(|i| i.signs_from <= now);
        if due {
            self.promote(now, |i| i.signs_from <= unix(now)).await?;
        }
        Ok(())
    }

    fn snapshot(&self) -> Arc<CaState> {
        self.state.read().expect("CA state lock").clone()
    }

    pub fn config(&self) -> &CaConfig {
        &self.cfg
    }

    pub fn trust_domain(&self) -> &str {
        &self.cfg.trust_domain
    }

    /// Follows the store until `shutdown`: every change under [`CA_PREFIX`] (a
    /// rotation, another replica's new intermediate) reloads the state. It also keeps
    /// the rotation's clock: when an incoming root's trust window ends it promotes it
    /// (every replica tries; the store's compare lets one write it), and when a
    /// retiring root's overlap ends it announces the smaller bundle.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // From the revision the state was read at: nothing in between is missed.
        let mut watcher = Watcher::resume(self.store.clone(), CA_PREFIX, self.snapshot().revision);
        loop {
            let now = SystemTime::now();
            let deadline = self.next_deadline(now).map(|t| {
                // One second past it, so that the window has ended at whole seconds.
                tokio::time::Instant::now()
                    + t.duration_since(now).unwrap_or_default()
                    + Duration::from_secs(1)
            });
            tokio::select! {
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Err(e) = self.promote_due(SystemTime::now()).await {
                        warn!(error = %e, "promoting the incoming root at the end of its trust window");
                    }
                    if let Err(e) = self.revoke_due(SystemTime::now()).await {
                        warn!(error = %e, "revoking the intermediates whose overlap ended");
                    }
                    self.note_changes();
                }
                update = watcher.next() => match update {
                    Update::Events(_) | Update::Resync(_) => {
                        if let Err(e) = self.reload().await {
                            warn!(error = %e, "reloading the certificate authority");
                        }
                    }
                    Update::Interrupted(e) => warn!(error = %e, "certificate authority watch interrupted"),
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// The roots a peer must trust at `now`: the active one, and those being rotated
    /// out whose window has not passed.
    pub fn trust_bundle_at(&self, now: SystemTime) -> String {
        let state = self.snapshot();
        let mut pem = state.root.cert_pem.clone();
        let incoming = state.incoming.iter().map(|i| &i.cert_pem);
        let retiring = state
            .retiring
            .iter()
            .filter(|r| from_unix(r.until) > now)
            .map(|r| &r.cert_pem);
        for cert_pem in incoming.chain(retiring) {
            if !pem.ends_with('\n') {
                pem.push('\n');
            }
            pem.push_str(cert_pem);
        }
        pem
    }

    /// An intermediate of `signer` that is current (signed by the active root, with at
    /// least two leaf lifetimes left at `now`), if this replica holds one.
    fn current(
        &self,
        state: &CaState,
        signer: &Signer,
        now: SystemTime,
    ) -> Option<Arc<Intermediate>> {
        state
            .intermediates
            .get(signer)
            .filter(|i| {
                i.root == state.root.fingerprint
                    && i.signing.not_after > now + self.cfg.cert_lifetime * 2
            })
            .cloned()
    }

    /// Creates a new intermediate for `signer` under the active root (not stored).
    fn new_intermediate(
        &self,
        state: &CaState,
        signer: &Signer,
        now: SystemTime,
    ) -> Result<(Intermediate, IntermediateRecord), CaError> {
        let key = KeyPair::generate().map_err(crypto("generating an intermediate key"))?;
        let until = (now + self.cfg.intermediate_lifetime).min(state.root.not_after);
        let params = ca_params(
            format!(
                "Tributary intermediate {} {}",
                signer.name(),
                hex(&random_bytes::<4>())
            ),
            &self.cfg.trust_domain,
            now,
            until,
            Some(0),
        );
        let cert = params
            .signed_by(&key, &state.root.issuer)
            .map_err(crypto("signing an intermediate"))?;
        let record = IntermediateRecord {
            keyed: KeyedCert {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            },
            root: state.root.fingerprint.clone(),
            not_after: unix(until),
            retiring: Vec::new(),
        };
        let signing =
            load_signing(&record.keyed.cert_pem, &record.keyed.key_pem).map_err(CaError::Crypto)?;
        Ok((
            Intermediate {
                signing,
                root: record.root.clone(),
                mod_revision: 0,
                retiring: Vec::new(),
            },
            record,
        ))
    }

    /// Makes sure the store holds a current intermediate for `signer` (creating one if
    /// needed), so that [`CertificateIssuer::issue`] for its identities needs no store
    /// round trip.
    pub async fn prepare(&self, signer: &Signer) -> Result<(), CaError> {
        self.ensure_signer(signer).await.map(|_| ())
    }

    /// Makes sure the store holds a current intermediate for `signer` (creating one if
    /// needed) and returns it.
    async fn ensure_signer(&self, signer: &Signer) -> Result<Arc<Intermediate>, CaError> {
        let key = format!("{INTERMEDIATES_PREFIX}{}", signer.name());
        for _ in 0..WRITE_ATTEMPTS {
            let state = self.snapshot();
            let now = SystemTime::now();
            if let Some(i) = self.current(&state, signer, now)
                && i.mod_revision > 0
            {
                return Ok(i);
            }
            let (_, record) = self.new_intermediate(&state, signer, now)?;
            // The one it replaces (near its end, or under a root that no longer
            // signs) stays accepted while its certificates can live: one leaf lifetime.
            let not_after = record.not_after;
            if self
                .write_intermediate(
                    &state,
                    signer,
                    record,
                    now,
                    self.default_intermediate_overlap(),
                )
                .await?
            {
                info!(signer = %signer.name(), not_after = %rfc3339(from_unix(not_after)), "new intermediate");
            }
        }
        Err(CaError::Contended { what: key })
    }

    /// Stores `record` as `signer`'s intermediate if the signer, the roots and the
    /// revocations are still as `state` read them; the intermediate it replaces joins
    /// the retiring ones until `now + overlap` (a zero overlap revokes it at once).
    /// Reloads either way; true if written.
    async fn write_intermediate(
        &self,
        state: &CaState,
        signer: &Signer,
        mut record: IntermediateRecord,
        now: SystemTime,
        overlap: Duration,
    ) -> Result<bool, CaError> {
        let key = format!("{INTERMEDIATES_PREFIX}{}", signer.name());
        let old = state.intermediates.get(signer);
        let mut revoke = Vec::new();
        if let Some(old) = old {
            record.retiring = retiring_records(old, |_| true);
            let replaced = RetiringIntermediate {
                keyed: KeyedCert {
                    cert_pem: old.signing.cert_pem.clone(),
                    key_pem: old.signing.key_pem.clone(),
                },
                root: old.root.clone(),
                until: unix(now + overlap),
            };
            if overlap.is_zero() {
                let serial = first_der(&old.signing.cert_pem)
                    .and_then(|d| serial_of(&d))
                    .map_err(CaError::Crypto)?;
                revoke.push(revoked_intermediate(
                    signer,
                    &old.root,
                    serial,
                    old.signing.not_after,
                    now,
                ));
            } else {
                record.retiring.push(replaced);
            }
        }
        let mut txn = Txn {
            compares: vec![
                Compare::mod_revision(key.clone(), old.map(|i| i.mod_revision).unwrap_or(0)),
                Compare::mod_revision(ROOTS_KEY, state.roots_revision),
            ],
            success: vec![TxnOp::put(
                key.clone(),
                serde_json::to_vec(&record).expect("serializable"),
            )],
            failure: vec![],
        };
        if !revoke.is_empty() {
            self.add_revocations(&mut txn, state, revoke, now);
        }
        let done = self.store.txn(txn).await?.succeeded;
        // Either way, what the store holds now is what every replica uses.
        self.reload().await?;
        Ok(done)
    }

    /// Adds to `txn` the write of the revocations: `state`'s (less those expired at
    /// `now`) and `new`, compared on the revision `state` read.
    fn add_revocations(
        &self,
        txn: &mut Txn,
        state: &CaState,
        new: Vec<RevokedEntry>,
        now: SystemTime,
    ) {
        let mut entries: Vec<RevokedEntry> = state
            .revoked
            .iter()
            .filter(|r| from_unix(r.not_after) > now)
            .cloned()
            .collect();
        for n in new {
            if !entries
                .iter()
                .any(|e| e.issuer == n.issuer && e.serial == n.serial)
            {
                entries.push(n);
            }
        }
        txn.compares
            .push(Compare::mod_revision(REVOKED_KEY, state.revoked_revision));
        txn.success.push(TxnOp::put(
            REVOKED_KEY,
            serde_json::to_vec(&RevokedRecord { entries }).expect("serializable"),
        ));
    }

    /// Ends the overlap of `signer`'s retiring intermediates that `due` selects: each
    /// is revoked (its serial joins its root's CRL) and no longer accepted. Returns
    /// how many were revoked.
    async fn revoke_retiring(
        &self,
        signer: &Signer,
        now: SystemTime,
        due: impl Fn(&OldIntermediate) -> bool,
    ) -> Result<usize, CaError> {
        let key = format!("{INTERMEDIATES_PREFIX}{}", signer.name());
        for _ in 0..WRITE_ATTEMPTS {
            let state = self.snapshot();
            let Some(current) = state.intermediates.get(signer) else {
                return Ok(0);
            };
            let revoke: Vec<RevokedEntry> = current
                .retiring
                .iter()
                .filter(|o| due(o))
                .map(|o| {
                    revoked_intermediate(
                        signer,
                        &o.root,
                        o.serial.clone(),
                        o.signing.not_after,
                        now,
                    )
                })
                .collect();
            if revoke.is_empty() {
                return Ok(0);
            }
            let n = revoke.len();
            let record = IntermediateRecord {
                keyed: KeyedCert {
                    cert_pem: current.signing.cert_pem.clone(),
                    key_pem: current.signing.key_pem.clone(),
                },
                root: current.root.clone(),
                not_after: unix(current.signing.not_after),
                retiring: retiring_records(current, |o| !due(o)),
            };
            let mut txn = Txn {
                compares: vec![Compare::mod_revision(key.clone(), current.mod_revision)],
                success: vec![TxnOp::put(
                    key.clone(),
                    serde_json::to_vec(&record).expect("serializable"),
                )],
                failure: vec![],
            };
            self.add_revocations(&mut txn, &state, revoke, now);
            let done = self.store.txn(txn).await?.succeeded;
            self.reload().await?;
            if done {
                info!(signer = %signer.name(), revoked = n, "intermediate rotation finished: the old intermediate is revoked");
                return Ok(n);
            }
        }
        Err(CaError::Contended { what: key })
    }

    /// Revokes every retiring intermediate whose overlap has ended at `now` (every
    /// replica tries; the store's compare lets one write each).
    async fn revoke_due(&self, now: SystemTime) -> Result<(), CaError> {
        let due: Vec<Signer> = self
            .snapshot()
            .intermediates
            .iter()
            .filter(|(_, i)| i.retiring.iter().any(|o| o.until <= now))
            .map(|(s, _)| s.clone())
            .collect();
        for signer in due {
            self.revoke_retiring(&signer, now, |o| o.until <= now)
                .await?;
        }
        Ok(())
    }

    /// Ends `signer`'s intermediate rotation now: its previous intermediates are
    /// revoked, so their certificates are refused from now on.
    pub async fn finish_intermediate_rotation(&self, signer: &Signer) -> Result<CaStatus, CaError> {
        if !self.snapshot().intermediates.contains_key(signer) {
            return Err(CaError::Config(format!(
                "no intermediate {}: `tributary ca status` lists them",
                signer.name()
            )));
        }
        self.revoke_retiring(signer, SystemTime::now(), |_| true)
            .await?;
        Ok(self.status())
    }

    /// Revokes one leaf certificate by its serial number (hex, as `openssl x509
    /// -noout -serial` prints it: `serial=` and `:` separators allowed, any case),
    /// e.g. a decommissioned cluster's agent. The CA keeps no record of what it
    /// issued, so the serial joins the CRL of every intermediate of `signer` (`None`:
    /// every signer's), the current one and those in their overlap, each entry kept
    /// until that intermediate expires (no leaf outlives its intermediate). Serials
    /// are 127 random bits: no other certificate is revoked with it. The CRLs are
    /// pushed like any revocation (SDS `ROOTCA`, the hubs' listeners, the next
    /// `ca.pem`).
    pub async fn revoke_leaf(
        &self,
        serial: &str,
        signer: Option<&Signer>,
    ) -> Result<CaStatus, CaError> {
        let serial = leaf_serial(serial).map_err(CaError::Config)?;
        for _ in 0..WRITE_ATTEMPTS {
            let state = self.snapshot();
            let now = SystemTime::now();
            let signers: Vec<(&Signer, &Arc<Intermediate>)> = match signer {
                Some(s) => match state.intermediates.get_key_value(s) {
                    Some(one) => vec![one],
                    None => {
                        return Err(CaError::Config(format!(
                            "no intermediate {}: `tributary ca status` lists them",
                            s.name()
                        )));
                    }
                },
                None => state.intermediates.iter().collect(),
            };
            let new: Vec<RevokedEntry> = signers
                .iter()
                .flat_map(|(s, i)| {
                    std::iter::once(&i.signing)
                        .chain(i.retiring.iter().map(|o| &o.signing))
                        .map(|ca| RevokedEntry {
                            issuer: ca.fingerprint.clone(),
                            serial: serial.clone(),
                            what: format!("leaf {serial} (intermediate {})", s.name()),
                            revoked_at: unix(now),
                            not_after: unix(ca.not_after),
                        })
                })
                .collect();
            if new.iter().all(|n| {
                state
                    .revoked
                    .iter()
                    .any(|e| e.issuer == n.issuer && e.serial == n.serial)
            }) {
                return Ok(self.status());
            }
            let mut txn = Txn {
                compares: vec![],
                success: vec![],
                failure: vec![],
            };
            self.add_revocations(&mut txn, &state, new, now);
            let done = self.store.txn(txn).await?.succeeded;
            self.reload().await?;
            if done {
                info!(%serial, signer = signer.map(Signer::name).unwrap_or_else(|| "every".into()), "revoked a leaf certificate: its serial joins its intermediates' CRLs");
                return Ok(self.status());
            }
        }
        Err(CaError::Contended {
            what: REVOKED_KEY.into(),
        })
    }

    /// Issues a certificate for `id` with a fresh key, signed by `signer`'s
    /// intermediate (created and stored first when needed).
    pub async fn issue_with(
        &self,
        id: &SpiffeId,
        signer: &Signer,
    ) -> Result<IssuedCertificate, CaError> {
        let key = KeyPair::generate().map_err(crypto("generating a leaf key"))?;
        let intermediate = self.ensure_signer(signer).await?;
        let mut issued = self.sign_leaf(id, &key, &intermediate, SystemTime::now())?;
        issued.key_pem = key.serialize_pem();
        Ok(issued)
    }

    /// Signs `public_key` (a CSR's, already checked against the credential) for `id`.
    /// The certificate carries only what the CA decides: the SPIFFE id (and, for hubs
    /// and routers, the operator's serving names); nothing else the CSR asked for.
    pub async fn sign_for(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        signer: &Signer,
    ) -> Result<IssuedCertificate, CaError> {
        let intermediate = self.ensure_signer(signer).await?;
        self.sign_leaf(id, public_key, &intermediate, SystemTime::now())
    }

    fn sign_leaf(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        intermediate: &Intermediate,
        now: SystemTime,
    ) -> Result<IssuedCertificate, CaError> {
        if id.trust_domain != self.cfg.trust_domain {
            return Err(CaError::Config(format!(
                "{id} is not in this mesh's trust domain {:?}",
                self.cfg.trust_domain
            )));
        }
        let mut p = CertificateParams::default();
        // An empty subject: the SPIFFE id is the name (the SAN is then critical).
        p.distinguished_name = DistinguishedName::new();
        let uri = rcgen::string::Ia5String::try_from(id.to_string())
            .map_err(|e| CaError::Crypto(e.to_string()))?;
        p.subject_alt_names = vec![SanType::URI(uri)];
        if matches!(id.identity, Identity::Hub { .. } | Identity::Router { .. }) {
            for san in &self.cfg.serving_sans {
                p.subject_alt_names
                    .push(match san.parse::<std::net::IpAddr>() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => SanType::DnsName(
                            rcgen::string::Ia5String::try_from(san.as_str())
                                .map_err(|e| CaError::Config(e.to_string()))?,
                        ),
                    });
            }
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let not_before = now - BACKDATE;
        let not_after = (now + self.cfg.cert_lifetime).min(intermediate.signing.not_after);
        p.not_before = not_before.into();
        p.not_after = not_after.into();
        p.serial_number = Some(serial());
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(public_key, &intermediate.signing.issuer)
            .map_err(crypto("signing a leaf"))?;
        let mut chain_pem = cert.pem();
        if !chain_pem.ends_with('\n') {
            chain_pem.push('\n');
        }
        chain_pem.push_str(&intermediate.signing.cert_pem);
        // The times as the certificate states them (whole seconds).
        let (_, leaf) = x509_parser::parse_x509_certificate(cert.der())
            .map_err(|e| CaError::Crypto(e.to_string()))?;
        let secs =
            |t: x509_parser::time::ASN1Time| from_unix(u64::try_from(t.timestamp()).unwrap_or(0));
        Ok(IssuedCertificate {
            chain_pem,
            key_pem: String::new(),
            not_before: secs(leaf.validity().not_before),
            not_after: secs(leaf.validity().not_after),
        })
    }

    /// The overlap of an intermediate rotation that names none (`tributary ca rotate
    /// --intermediate NAME` without `--overlap`): how long certificates of the replaced
    /// intermediate stay accepted before it is revoked. One leaf lifetime
    /// (`--cert-lifetime`): by then every certificate it signed has expired, and every
    /// peer renewing at half-life has renewed onto the new one, so the revocation
    /// refuses nothing still in use. (The CA's own replacements use the same.)
    pub fn default_intermediate_overlap(&self) -> Duration {
        self.cfg.cert_lifetime
    }

    /// Rotates `signer`'s intermediate: a new one is stored and signs from now on
    /// (it is trusted at once: it chains to the same root, and its CRL is published
    /// with the write). The old one stays accepted for `overlap`, then it is revoked
    /// (by [`Ca::run`], or now by [`Ca::finish_intermediate_rotation`]); a zero
    /// overlap revokes it at once.
    pub async fn rotate_intermediate(
        &self,
        signer: &Signer,
        overlap: Duration,
    ) -> Result<CaStatus, CaError> {
        let key = format!("{INTERMEDIATES_PREFIX}{}", signer.name());
        for _ in 0..WRITE_ATTEMPTS {
            let state = self.snapshot();
            let now = SystemTime::now();
            let (_, record) = self.new_intermediate(&state, signer, now)?;
            if self
                .write_intermediate(&state, signer, record, now, overlap)
                .await?
            {
                info!(signer = %signer.name(), overlap = %humantime::format_duration(overlap), "rotated the intermediate; the old one is accepted for the overlap");
                return Ok(self.status());
            }
        }
        Err(CaError::Contended { what: key })
    }

    /// Starts a root rotation, phase 1 (trust the new root): a new root is generated
    /// and added to the trust bundle; the active root keeps signing for
    /// `trust_window`, so that every peer holds the two-root bundle before any peer
    /// presents a certificate of the new root. Then (at the end of the window, by
    /// [`Ca::run`], or at [`Ca::promote_root`]) phase 2: the new root signs, every
    /// intermediate is replaced under it, and the old root stays trusted for
    /// `overlap`; then phase 3: the old root leaves the bundle (at the end of the
    /// overlap, or at [`Ca::finish_rotation`]). A zero `trust_window` skips phase 1.
    pub async fn rotate_root(
        &self,
        trust_window: Duration,
        overlap: Duration,
    ) -> Result<CaStatus, CaError> {
        self.rotate_root_at(trust_window, overlap, SystemTime::now())
            .await
    }

    async fn rotate_root_at(
        &self,
        trust_window: Duration,
        overlap: Duration,
        now: SystemTime,
    ) -> Result<CaStatus, CaError> {
        for _ in 0..WRITE_ATTEMPTS {
            let (kv, mut record) = self.read_roots().await?;
            if let Some(i) = &record.incoming {
                let fp = first_der(&i.keyed.cert_pem)
                    .map(|d| fingerprint(&d))
                    .unwrap_or_default();
                return Err(CaError::Config(format!(
                    "a root rotation is already in progress: the new root {fp} is trusted and signs from {}; \
                     promote it now (`tributary ca promote`) or wait, then rotate again",
                    rfc3339(from_unix(i.signs_from))
                )));
            }
            record.incoming = Some(IncomingRoot {
                keyed: generate_root(&self.cfg, now)?,
                signs_from: unix(now + trust_window),
                overlap: overlap.as_secs(),
            });
            if trust_window.is_zero() {
                record.promote(now);
            }
            if self.write_roots(&kv, &record).await? {
                info!(
                    trust_window = %humantime::format_duration(trust_window),
                    overlap = %humantime::format_duration(overlap),
                    "root rotation: the new root is trusted alongside the active one"
                );
                self.move_signers().await?;
                return Ok(self.status());
            }
        }
        Err(CaError::Contended {
            what: ROOTS_KEY.into(),
        })
    }

    /// Phase 2 of a root rotation, now: the incoming root signs (and every
    /// intermediate this replica knows is replaced under it), the old root stays
    /// trusted for the rotation's overlap. An error when no rotation is in phase 1.
    pub async fn promote_root(&self) -> Result<CaStatus, CaError> {
        match self.promote(SystemTime::now(), |_| true).await? {
            true => Ok(self.status()),
            false => Err(CaError::Config(
                "no new root to promote: start a rotation with `tributary ca rotate --root`".into(),
            )),
        }
    }

    /// Promotes the stored incoming root if `wanted` says so; false if there is none
    /// (or it is not wanted).
    async fn promote(
        &self,
        now: SystemTime,
        wanted: impl Fn(&IncomingRoot) -> bool,
    ) -> Result<bool, CaError> {
        for _ in 0..WRITE_ATTEMPTS {
            let (kv, mut record) = self.read_roots().await?;
            if !record.incoming.as_ref().is_some_and(&wanted) {
                return Ok(false);
            }
            record.promote(now);
            if self.write_roots(&kv, &record).await? {
                info!(root = %self.snapshot().root.fingerprint, "root rotation: the new root signs; the old one stays trusted for the overlap");
                self.move_signers().await?;
                return Ok(true);
            }
        }
        Err(CaError::Contended {
            what: ROOTS_KEY.into(),
        })
    }

    /// Moves the signers this replica knows to the active root now, rather than at
    /// their next use.
    async fn move_signers(&self) -> Result<(), CaError> {
        let signers: Vec<Signer> = self.snapshot().intermediates.keys().cloned().collect();
        for s in signers {
            self.ensure_signer(&s).await?;
        }
        Ok(())
    }

    async fn read_roots(&self) -> Result<(tributary_store::KeyValue, RootsRecord), CaError> {
        let (kv, _) = self.store.get(ROOTS_KEY).await?;
        let kv = kv.ok_or_else(|| CaError::Corrupt {
            key: ROOTS_KEY.into(),
            message: "missing".into(),
        })?;
        let record: RootsRecord = parse_record(ROOTS_KEY, &kv.value)?;
        Ok((kv, record))
    }

    /// Writes `record` if the roots are still as read in `kv`; reloads either way.
    async fn write_roots(
        &self,
        kv: &tributary_store::KeyValue,
        record: &RootsRecord,
    ) -> Result<bool, CaError> {
        let txn = Txn {
            compares: vec![Compare::mod_revision(ROOTS_KEY, kv.mod_revision)],
            success: vec![TxnOp::put(
                ROOTS_KEY,
                serde_json::to_vec(record).expect("serializable"),
            )],
            failure: vec![],
        };
        let done = self.store.txn(txn).await?.succeeded;
        self.reload().await?;
        Ok(done)
    }

    /// Phase 3 of a root rotation, now: the roots being rotated out leave the trust
    /// bundle. Refused while a new root is only trusted (phase 1): the active root
    /// still signs every certificate, so dropping it is not what is meant; promote
    /// first.
    pub async fn finish_rotation(&self) -> Result<CaStatus, CaError> {
        for _ in 0..WRITE_ATTEMPTS {
            let (kv, mut record) = self.read_roots().await?;
            if let Some(i) = &record.incoming {
                return Err(CaError::Config(format!(
                    "the new root does not sign yet (its trust window ends {}): every certificate still \
                     chains to the active root; promote the new root first (`tributary ca promote`), \
                     let peers renew, then finish",
                    rfc3339(from_unix(i.signs_from))
                )));
            }
            if record.retiring.is_empty() {
                return Ok(self.status());
            }
            record.retiring.clear();
            if self.write_roots(&kv, &record).await? {
                info!("finished the root rotation: the old roots left the trust bundle");
                return Ok(self.status());
            }
        }
        Err(CaError::Contended {
            what: ROOTS_KEY.into(),
        })
    }

    /// The CA's roots and intermediates (fingerprints and times; never keys).
    pub fn status(&self) -> CaStatus {
        let state = self.snapshot();
        let now = SystemTime::now();
        let retiring: Vec<&RetiringRoot> = state
            .retiring
            .iter()
            .filter(|r| from_unix(r.until) > now)
            .collect();
        CaStatus {
            trust_domain: self.cfg.trust_domain.clone(),
            phase: if state.incoming.is_some() {
                RotationPhase::TrustingNew
            } else if !retiring.is_empty() {
                RotationPhase::IssuingFromNew
            } else {
                RotationPhase::Steady
            },
            root: state.root.fingerprint.clone(),
            root_not_after: rfc3339(state.root.not_after),
            incoming: state.incoming.as_ref().map(|i| IncomingStatus {
                root: i.fingerprint.clone(),
                signs_from: rfc3339(i.signs_from),
            }),
            retiring: retiring
                .into_iter()
                .map(|r| RetiringStatus {
                    root: first_der(&r.cert_pem)
                        .map(|d| fingerprint(&d))
                        .unwrap_or_default(),
                    until: rfc3339(from_unix(r.until)),
                })
                .collect(),
            intermediates: state
                .intermediates
                .iter()
                .map(|(s, i)| {
                    (
                        s.name(),
                        IntermediateStatus {
                            fingerprint: i.signing.fingerprint.clone(),
                            root: i.root.clone(),
                            not_after: rfc3339(i.signing.not_after),
                            retiring: i
                                .retiring
                                .iter()
                                .map(|o| RetiringIntermediateStatus {
                                    fingerprint: o.signing.fingerprint.clone(),
                                    serial: o.serial.clone(),
                                    until: rfc3339(o.until),
                                })
                                .collect(),
                        },
                    )
                })
                .collect(),
            revoked: state
                .revoked
                .iter()
                .map(|r| RevokedStatus {
                    what: r.what.clone(),
                    serial: r.serial.clone(),
                    issuer: r.issuer.clone(),
                    revoked_at: rfc3339(from_unix(r.revoked_at)),
                    not_after: rfc3339(from_unix(r.not_after)),
                })
                .collect(),
            warnings: warnings(&state, now),
        }
    }
}

/// What [`CaStatus::warnings`] says about `state` at `now`: every root still in the
/// trust bundle that has no CRL, because it was retired before CRLs existed and its
/// key was not kept to sign one.
fn warnings(state: &CaState, now: SystemTime) -> Vec<String> {
    state
        .retiring
        .iter()
        .filter(|r| from_unix(r.until) > now && r.key_pem.is_none())
        .map(|r| {
            let root = first_der(&r.cert_pem)
                .map(|d| fingerprint(&d))
                .unwrap_or_default();
            format!(
                "retiring root {root} (trusted until {}) has no CRL: it was retired before CRLs existed and its key was not kept. \
                 Nothing it issued can be revoked, and Envoy and tributary-proxy (which require a CRL for every CA of a chain) \
                 refuse every chain through it; `tributary ca finish-rotation` removes it from the bundle once no peer holds a certificate of it",
                rfc3339(from_unix(r.until))
            )
        })
        .collect()
}

fn parse_record<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, CaError> {
    serde_json::from_slice(value).map_err(|e| CaError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

impl CertificateIssuer for Ca {
    /// Issues from the in-memory state, without waiting on the store, when the
    /// signer's intermediate is current; otherwise it is created and stored first
    /// (which needs a multi-threaded Tokio runtime, as the hub's).
    fn issue(&self, id: &SpiffeId) -> anyhow::Result<IssuedCertificate> {
        let signer = Signer::for_identity(&id.identity);
        let now = SystemTime::now();
        let state = self.snapshot();
        let intermediate = match self
            .current(&state, &signer, now)
            .filter(|i| i.mod_revision > 0)
        {
            Some(i) => i,
            None => tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(self.ensure_signer(&signer))
            })?,
        };
        let key = KeyPair::generate().map_err(crypto("generating a leaf key"))?;
        let mut issued = self.sign_leaf(id, &key, &intermediate, now)?;
        issued.key_pem = key.serialize_pem();
        Ok(issued)
    }

    fn trust_bundle_pem(&self) -> String {
        self.trust_bundle_at(SystemTime::now())
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(Ca::changes(self))
    }

    fn crl_pem(&self) -> String {
        Ca::crl_pem(self)
    }

    fn trust_changes(&self) -> Option<watch::Receiver<u64>> {
        Some(Ca::trust_changes(self))
    }
}

#[cfg(test)]
pub(crate) mod tests;
