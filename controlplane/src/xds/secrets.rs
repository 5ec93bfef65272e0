//! SDS: each proxy's own certificate and the mesh's trust bundle, served over ADS.
//!
//! Secrets are per **identity**, not per environment: a proxy is served
//! [`DEFAULT_SECRET`] (its `tls_certificate`) and [`ROOT_SECRET`] (a
//! `validation_context` with the trust bundle) of the SPIFFE id its stream is
//! bound to, and nothing else. Each identity has one snapshot channel, like an
//! environment's: its streams share one certificate (issued once per identity, not
//! per proxy) and the snapshot's pre-encoded bytes, and the stream state machine
//! serves it with the same versions, ACKs, NACKs and Delta bookkeeping as every
//! other type.
//!
//! One task per identity owns its certificate: it issues through the hub's
//! [`CertificateIssuer`], publishes, re-issues at half-life (or when the CA asks:
//! [`CertificateIssuer::changes`], a rotation's phase, or [`Secrets::reissue_all`])
//! and pushes the new secret to every stream of that
//! identity by publishing a new snapshot. When the last stream of an identity goes
//! away the task ends and the identity is forgotten; the next stream issues anew.
//!
//! Key material never leaves this module except inside a `Secret` resource on the
//! stream of its own identity: no log line, `Debug` output or admin page holds it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prost::Message;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};
use tributary_proto::envoy::envoy::config::core::v3::{DataSource, data_source::Specifier};
use tributary_proto::envoy::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use tributary_proto::wire::EncodedResource;

use super::XdsType;
pub use super::generate::mtls::{DEFAULT_SECRET, ROOT_SECRET};
use super::generate::{EnvResources, content_version};
use super::snapshot::{Changes, Snapshot};
use super::stream::{NodeInfo, Role, StreamState};
use crate::identity::{CertificateIssuer, Identity, IssuedCertificate, SpiffeId, SpiffeIdError};

/// Earliest re-issue after an issuance (a certificate issued already past its
/// half-life must not make the task spin).
const MIN_RENEWAL: Duration = Duration::from_secs(1);
/// Retry after a failed issuance: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// When the issuer's chain changes (a new intermediate or root signs), the new trust
/// (bundle and CRLs) is pushed to every stream at once and certificates of the new
/// chain only this much later: a peer that checks a CRL for every CA of a chain
/// (Envoy) must hold the new intermediate's CRL before it is shown a certificate of
/// it, or the handshake fails.
pub const TRUST_LEAD: Duration = Duration::from_secs(2);

/// What a proxy must trust: the roots, and the CRLs of every CA (may be empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    pub bundle_pem: String,
    pub crl_pem: String,
}

impl Trust {
    fn of(issuer: &dyn CertificateIssuer) -> Trust {
        Trust {
            bundle_pem: issuer.trust_bundle_pem(),
            crl_pem: issuer.crl_pem(),
        }
    }
}

/// The hub's secrets: one snapshot channel per identity with a connected stream.
pub struct Secrets {
    issuer: Arc<dyn CertificateIssuer>,
    trust_domain: String,
    // Held only to find, add or forget an identity's channel (when a stream starts
    // asking for secrets, and when an identity's last stream is gone); never across
    // an await, never on a response path.
    identities: Mutex<HashMap<SpiffeId, watch::Sender<Arc<Snapshot>>>>,
    /// Bumped to make every identity's task re-issue now (CA rotation).
    reissue: watch::Sender<u64>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("trust_domain", &self.trust_domain)
            .field("issuer", &self.issuer)
            .field("identities", &self.identities())
            .finish()
    }
}

impl Secrets {
    pub fn new(issuer: Arc<dyn CertificateIssuer>, trust_domain: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            issuer,
            trust_domain: trust_domain.into(),
            identities: Mutex::default(),
            reissue: watch::channel(0).0,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// How many identities have a certificate (a stream asking for secrets).
    pub fn identities(&self) -> usize {
        self.identities.lock().unwrap().len()
    }

    /// The secrets of `id`: a snapshot channel whose first snapshot (seq 0) is empty
    /// until the certificate is issued. The first subscriber of an identity starts
    /// its task; later ones share its certificate.
    pub fn subscribe(self: &Arc<Self>, id: &SpiffeId) -> watch::Receiver<Arc<Snapshot>> {
        let mut map = self.identities.lock().unwrap();
        if let Some(tx) = map.get(id) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(Arc::new(Snapshot::empty(&id.to_string())));
        map.insert(id.clone(), tx.clone());
        drop(map);
        tokio::spawn(maintain(self.clone(), id.clone(), tx));
        rx
    }

    /// Every identity gets a new certificate and the current trust bundle now: for
    /// the CA to call when its roots or intermediates change.
    pub fn reissue_all(&self) {
        self.reissue.send_modify(|n| *n += 1);
    }

    /// Forgets `id` if no stream holds its channel; true if it did.
    fn forget_if_unused(&self, id: &SpiffeId, tx: &watch::Sender<Arc<Snapshot>>) -> bool {
        let mut map = self.identities.lock().unwrap();
        if tx.receiver_count() > 0 {
            return false;
        }
        map.remove(id);
        true
    }
}

impl NodeInfo {
    /// The SPIFFE id this stream's secrets are issued for: a gateway's
    /// (`/env/{env}/gateway/{name}`), or a workload's (`/env/{env}/ns/{ns}/sa/{sa}`)
    /// when its metadata names a namespace and a service account; `None` otherwise.
    ///
    /// Today this trusts node metadata (`tributary.io/env`, `tributary.io/gateway`,
    /// `tributary.io/namespace`, `tributary.io/service-account`): the one place to
    /// change when streams carry the identity verified from the peer's certificate.
    pub fn workload_identity(&self, trust_domain: &str) -> Result<Option<SpiffeId>, SpiffeIdError> {
        let env = self.environment.clone();
        let identity = match (&self.role, &self.namespace, &self.service_account) {
            (Role::Gateway(name), _, _) => Identity::Gateway {
                env,
                name: name.clone(),
            },
            (Role::Sidecar, Some(namespace), Some(service_account)) => Identity::Workload {
                env,
                namespace: namespace.clone(),
                service_account: service_account.clone(),
            },
            _ => return Ok(None),
        };
        // Through the parser: the same segment rules as every other SPIFFE id.
        SpiffeId::parse(&SpiffeId::new(trust_domain, identity).to_string()).map(Some)
    }
}

/// One stream's secrets: its identity's (once the client asks for secrets) and, for a
/// gateway, the credentials its listeners serve. Never anything else: the secret type
/// is not served from the environment's snapshot.
pub(super) struct StreamSecrets {
    secrets: Option<Arc<Secrets>>,
    identity: Option<SpiffeId>,
    gateway: Option<String>,
    rx: Option<watch::Receiver<Arc<Snapshot>>>,
    /// A gateway's identity secrets merged with its credentials, with the seqs of
    /// the identity's and the environment's snapshots it was built from.
    merged: Option<(u64, u64, Arc<Snapshot>)>,
    /// What a stream with nothing to be served is answered from (seq 1, empty): names
    /// it asks for do not exist.
    nothing: Arc<Snapshot>,
    warned: bool,
}

impl StreamSecrets {
    pub(super) fn new(
        secrets: Option<Arc<Secrets>>,
        node: &NodeInfo,
    ) -> Result<Self, tonic::Status> {
        let identity = match &secrets {
            Some(s) => node.workload_identity(s.trust_domain()).map_err(|e| {
                tonic::Status::invalid_argument(format!(
                    "the node's identity is not a valid SPIFFE id: {e} (from node metadata \"tributary.io/env\", \"tributary.io/gateway\", \"tributary.io/namespace\" and \"tributary.io/service-account\")"
                ))
            })?,
            None => None,
        };
        let empty = Snapshot::empty("");
        let nothing = Snapshot::after(
            &empty,
            EnvResources::default(),
            Changes::default(),
            false,
            None,
        );
        Ok(Self {
            secrets,
            identity,
            gateway: match &node.role {
                Role::Gateway(g) => Some(g.clone()),
                Role::Sidecar => None,
            },
            rx: None,
            merged: None,
            nothing: Arc::new(nothing),
            warned: false,
        })
    }

    /// Subscribes to the identity's secrets once the client asks for any.
    pub(super) fn start_if_asked(&mut self, state: &StreamState) {
        if self.rx.is_some() || !state.subscribed(XdsType::Secret) {
            return;
        }
        match (&self.secrets, &self.identity) {
            (Some(secrets), Some(id)) => self.rx = Some(secrets.subscribe(id)),
            (Some(_), None) if !self.warned => {
                self.warned = true;
                warn!(
                    "the node asks for secrets but has no identity: a sidecar needs node metadata \"tributary.io/namespace\" and \"tributary.io/service-account\"; it gets no secrets"
                );
            }
            _ => {}
        }
    }

    /// The secrets to serve now, given the environment's snapshot `env`; `None` while
    /// the identity's certificate is being issued (nothing is answered meanwhile, not
    /// even "does not exist").
    pub(super) fn current(&mut self, env: &Snapshot) -> Option<Arc<Snapshot>> {
        let own = self.rx.as_mut().map(|rx| rx.borrow_and_update().clone());
        if own.as_ref().is_some_and(|s| s.seq == 0) {
            return None;
        }
        let Some(gateway) = &self.gateway else {
            return Some(own.unwrap_or_else(|| self.nothing.clone()));
        };
        let own_seq = own.as_ref().map_or(0, |s| s.seq);
        if let Some((o, e, merged)) = &self.merged
            && *o == own_seq
            && *e == env.seq
        {
            return Some(merged.clone());
        }
        // A gateway: its identity's secrets and its credentials, as one snapshot of
        // its own (versions and change sets kept, so the stream state machine serves
        // it like any other). Rebuilt only when either input moved; costs the
        // gateway's credentials.
        let mut resources = EnvResources::default();
        let secrets = &mut resources.by_type[XdsType::Secret as usize];
        if let Some(own) = &own {
            *secrets = own.of_type(XdsType::Secret).clone();
        }
        for name in env
            .roles()
            .gateway_secrets
            .get(gateway)
            .into_iter()
            .flatten()
        {
            if let Some(r) = env.get(XdsType::Secret, name) {
                secrets.insert(name.clone(), r.clone());
            }
        }
        let prev = self
            .merged
            .as_ref()
            .map_or_else(|| self.nothing.clone(), |(_, _, m)| m.clone());
        let mut changed: Changes = Default::default();
        let before = prev.of_type(XdsType::Secret);
        for (name, r) in secrets.iter() {
            if before.get(name) != Some(r) {
                changed[XdsType::Secret as usize].insert(name.clone());
            }
        }
        for name in before.keys() {
            if !secrets.contains_key(name) {
                changed[XdsType::Secret as usize].insert(name.clone());
            }
        }
        let next = if changed.iter().all(HashSet::is_empty) {
            prev
        } else {
            Arc::new(Snapshot::after(
                &prev, resources, changed, false, env.origin,
            ))
        };
        self.merged = Some((own_seq, env.seq, next.clone()));
        Some(next)
    }

    /// Resolves when the identity's secrets change; never without them.
    pub(super) async fn changed(&mut self) {
        match self.rx.as_mut() {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    self.rx = None;
                }
            }
            None => std::future::pending().await,
        }
    }
}

/// One identity's certificate, for as long as a stream of it is connected.
async fn maintain(secrets: Arc<Secrets>, id: SpiffeId, tx: watch::Sender<Arc<Snapshot>>) {
    let mut reissue = secrets.reissue.subscribe();
    reissue.borrow_and_update();
    // The issuer's own signal (a CA rotation's phase): the same as `reissue_all`.
    let mut issuer_changed = secrets.issuer.changes();
    if let Some(rx) = issuer_changed.as_mut() {
        rx.borrow_and_update();
    }
    // The bundle or the CRLs alone (a revocation, a new intermediate): pushed again
    // with the same certificate.
    let mut trust_changed = secrets.issuer.trust_changes();
    if let Some(rx) = trust_changed.as_mut() {
        rx.borrow_and_update();
    }
    let mut last: Option<IssuedCertificate> = None;
    let mut retry = RETRY_FIRST;
    loop {
        let issuer = secrets.issuer.clone();
        let for_issuer = id.clone();
        // Key generation and signing are CPU work: off the async workers.
        let issued = tokio::task::spawn_blocking(move || {
            issuer
                .issue(&for_issuer)
                .map(|cert| (cert, Trust::of(&*issuer)))
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
        let wait = match issued {
            Ok((cert, trust)) => {
                retry = RETRY_FIRST;
                let renew = renewal_delay(&cert, SystemTime::now());
                let seq = publish(&tx, &cert, &trust);
                last = Some(cert);
                info!(identity = %id, seq, renew_in = ?renew, "issued a workload certificate");
                renew
            }
            Err(e) => {
                let wait = retry;
                retry = (retry * 2).min(RETRY_MAX);
                warn!(identity = %id, error = format!("{e:#}"), retry_in = ?wait, "issuing a workload certificate failed; its streams get no secrets until it succeeds");
                wait
            }
        };
        let deadline = Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                changed = reissue.changed() => {
                    if changed.is_ok() {
                        break;
                    }
                }
                changed = async {
                    match trust_changed.as_mut() {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match changed {
                        Ok(()) => {
                            if let Some(cert) = &last {
                                let seq = publish(&tx, cert, &Trust::of(&*secrets.issuer));
                                info!(identity = %id, seq, "the trust bundle or CRLs changed: pushed");
                            }
                        }
                        Err(_) => trust_changed = None,
                    }
                }
                changed = async {
                    match issuer_changed.as_mut() {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match changed {
                        Ok(()) => {
                            // The new trust first (every identity's task does the same
                            // at once), the certificate of the new chain TRUST_LEAD
                            // later; a trust change meanwhile (a promotion is two
                            // writes: the roots, then the intermediates) restarts the
                            // lead, so the last CRLs are out before the certificate.
                            info!(identity = %id, lead = ?TRUST_LEAD, "the issuer's chain or trust bundle changed: re-issuing");
                            loop {
                                if let Some(rx) = trust_changed.as_mut() {
                                    rx.borrow_and_update();
                                }
                                if let Some(cert) = &last {
                                    publish(&tx, cert, &Trust::of(&*secrets.issuer));
                                }
                                tokio::select! {
                                    _ = tokio::time::sleep(TRUST_LEAD) => {}
                                    _ = tx.closed() => {}
                                }
                                if !trust_changed.as_ref().is_some_and(|rx| rx.has_changed().unwrap_or(false)) {
                                    break;
                                }
                            }
                            if let Some(rx) = issuer_changed.as_mut() {
                                rx.borrow_and_update();
                            }
                            break;
                        }
                        // The issuer is gone: renewal at half-life only.
                        Err(_) => issuer_changed = None,
                    }
                }
                _ = tx.closed() => {
                    if secrets.forget_if_unused(&id, &tx) {
                        info!(identity = %id, "no stream of this identity is left; its certificate is dropped");
                        return;
                    }
                }
            }
        }
    }
}

/// When to re-issue `cert`: at half its lifetime, counted from `now`.
pub fn renewal_delay(cert: &IssuedCertificate, now: SystemTime) -> Duration {
    let lifetime = cert
        .not_after
        .duration_since(cert.not_before)
        .unwrap_or_default();
    let half = cert.not_before + lifetime / 2;
    half.duration_since(now)
        .unwrap_or_default()
        .max(MIN_RENEWAL)
}

/// The identity's two secrets, encoded: `default` (its certificate and key) and
/// `ROOTCA` (the roots, and the CRLs of every CA when the issuer has them: Envoy then
/// checks every certificate of a chain against its issuer's CRL).
pub fn secret_resources(cert: &IssuedCertificate, trust: &Trust) -> [EncodedResource; 2] {
    let inline = |s: &str| DataSource {
        specifier: Some(Specifier::InlineString(s.to_string())),
        ..Default::default()
    };
    let default = Secret {
        name: DEFAULT_SECRET.into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(&cert.chain_pem)),
            private_key: Some(inline(&cert.key_pem)),
            ..Default::default()
        })),
    };
    let root = Secret {
        name: ROOT_SECRET.into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(inline(&trust.bundle_pem)),
                crl: (!trust.crl_pem.is_empty()).then(|| inline(&trust.crl_pem)),
                ..Default::default()
            },
        )),
    };
    [default, root].map(|s| {
        let body = s.encode_to_vec();
        EncodedResource::from_body(
            XdsType::Secret.type_url(),
            &s.name,
            &content_version(&body),
            &body,
        )
    })
}

/// Publishes the identity's secrets as its next snapshot; returns its seq.
fn publish(tx: &watch::Sender<Arc<Snapshot>>, cert: &IssuedCertificate, trust: &Trust) -> u64 {
    let current = tx.borrow().clone();
    let mut resources = EnvResources::default();
    let mut changed: Changes = Default::default();
    let now = SystemTime::now();
    for r in secret_resources(cert, trust) {
        let name: Arc<str> = r.name_arc().clone();
        if current.get(XdsType::Secret, &name) != Some(&r) {
            changed[XdsType::Secret as usize].insert(name.clone());
        }
        resources.origins[XdsType::Secret as usize].insert(name.clone(), now);
        resources.by_type[XdsType::Secret as usize].insert(name, r);
    }
    if changed.iter().all(HashSet::is_empty) {
        return current.seq;
    }
    let next = Snapshot::after(&current, resources, changed, false, Some(now));
    let seq = next.seq;
    tx.send_replace(Arc::new(next));
    seq
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(not_before: SystemTime, lifetime: Duration) -> IssuedCertificate {
        IssuedCertificate {
            chain_pem: String::new(),
            key_pem: String::new(),
            not_before,
            not_after: not_before + lifetime,
        }
    }

    #[test]
    fn renewal_is_at_half_life_and_never_immediate() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(renewal_delay(&cert(t0, day), t0), day / 2);
        assert_eq!(
            renewal_delay(&cert(t0, day), t0 + Duration::from_secs(3600)),
            day / 2 - Duration::from_secs(3600)
        );
        // Past half-life (or expired, or a zero lifetime): soon, not in a loop.
        assert_eq!(renewal_delay(&cert(t0, day), t0 + day), MIN_RENEWAL);
        assert_eq!(renewal_delay(&cert(t0, Duration::ZERO), t0), MIN_RENEWAL);
    }
}
