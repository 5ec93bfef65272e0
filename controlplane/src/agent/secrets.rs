//! The Kubernetes Secrets the hubs ask this agent for: the certificates of gateway
//! credentials whose `spec.kubernetesSecret` names this cluster.
//!
//! A hub tells each session which Secrets to watch (`WatchSecrets`: the whole list,
//! only of namespaces the cluster's grant covers). [`SecretWatch`] is shared by every
//! session of the agent (one per hub replica with `--router`): it keeps each session's
//! list, and the union is what the source watches ([`run_kube`]: one name-scoped
//! watch per Secret, `metadata.name=NAME` in its namespace, so nothing else is listed).
//! Each Secret is reduced as it arrives to its `tls.crt`/`tls.key` (and `ca.crt`)
//! bytes: the agent keeps no whole object. A session sends the state of each Secret
//! its hub asked for when it is first known, and again whenever it changes (a
//! rotation) or the Secret is deleted ([`SessionSecrets`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use tributary_proto::federation::v1::{self as pb, agent_message, secret_update};

use crate::model::ObjectKey;

/// The Secret type the agent reads (`kubernetes.io/tls`).
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// One watched Secret as the agent sees it.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretState {
    /// Its `tls.crt`, `tls.key` and (possibly empty) `ca.crt`.
    Tls {
        certificate_chain: Bytes,
        private_key: Bytes,
        ca_certificate: Bytes,
    },
    /// It does not exist (deleted, or not created yet).
    Deleted,
    /// It is not a TLS Secret the hub could use; why (never quoting its data).
    Invalid(String),
}

impl std::fmt::Debug for SecretState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretState::Tls {
                certificate_chain,
                ca_certificate,
                ..
            } => f
                .debug_struct("Tls")
                .field("certificate_chain", &certificate_chain.len())
                .field("private_key", &"<redacted>")
                .field("ca_certificate", &ca_certificate.len())
                .finish(),
            SecretState::Deleted => f.write_str("Deleted"),
            SecretState::Invalid(why) => f.debug_tuple("Invalid").field(why).finish(),
        }
    }
}

impl SecretState {
    /// Reduces a Secret to what the hub needs: its type must be `kubernetes.io/tls`
    /// with `tls.crt` and `tls.key`; `ca.crt` is taken when present.
    pub fn of(secret: &Secret) -> SecretState {
        let ty = secret.type_.as_deref().unwrap_or("Opaque");
        if ty != TLS_SECRET_TYPE {
            return SecretState::Invalid(format!(
                "type is {ty:?}, expected {TLS_SECRET_TYPE:?} (with tls.crt and tls.key)"
            ));
        }
        let data = secret.data.as_ref();
        let get = |k: &str| {
            data.and_then(|d| d.get(k))
                .map(|b| Bytes::from(b.0.clone()))
        };
        let missing: Vec<&str> = ["tls.crt", "tls.key"]
            .into_iter()
            .filter(|k| get(k).is_none_or(|b| b.is_empty()))
            .collect();
        if !missing.is_empty() {
            return SecretState::Invalid(format!("no data under {}", missing.join(" and ")));
        }
        SecretState::Tls {
            certificate_chain: get("tls.crt").unwrap_or_default(),
            private_key: get("tls.key").unwrap_or_default(),
            ca_certificate: get("ca.crt").unwrap_or_default(),
        }
    }

    fn to_proto(&self, key: &ObjectKey) -> pb::SecretUpdate {
        let state = match self {
            SecretState::Tls {
                certificate_chain,
                private_key,
                ca_certificate,
            } => secret_update::State::Tls(pb::TlsSecret {
                certificate_chain: certificate_chain.clone(),
                private_key: private_key.clone(),
                ca_certificate: ca_certificate.clone(),
            }),
            SecretState::Deleted => secret_update::State::Deleted(true),
            SecretState::Invalid(why) => secret_update::State::Invalid(why.clone()),
        };
        pb::SecretUpdate {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            state: Some(state),
        }
    }
}

/// The Secrets the agent's sessions want and what the source has seen of them.
/// Cheap to clone; shared by every session and the source.
#[derive(Clone)]
pub struct SecretWatch {
    inner: Arc<Inner>,
}

struct Inner {
    /// Session → the Secrets its hub asked for. A plain mutex: held only to update
    /// the map and recompute the union, never across an `.await`.
    wanted: Mutex<HashMap<u64, BTreeSet<ObjectKey>>>,
    /// The union of `wanted`: what the source watches.
    union: watch::Sender<BTreeSet<ObjectKey>>,
    /// What the source has seen of each watched Secret (absent: not known yet).
    observed: watch::Sender<SecretsSeen>,
    next_session: AtomicU64,
}

impl std::fmt::Debug for SecretWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretWatch")
            .field("watched", &self.inner.union.borrow().len())
            .finish()
    }
}

impl Default for SecretWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl SecretWatch {
    pub fn new() -> Self {
        SecretWatch {
            inner: Arc::new(Inner {
                wanted: Mutex::new(HashMap::new()),
                union: watch::channel(BTreeSet::new()).0,
                observed: watch::channel(Arc::new(BTreeMap::new())).0,
                next_session: AtomicU64::new(1),
            }),
        }
    }

    /// The Secrets some session wants: what a source must watch.
    pub fn watched(&self) -> watch::Receiver<BTreeSet<ObjectKey>> {
        self.inner.union.subscribe()
    }

    /// What the source has seen.
    pub fn observed(&self) -> watch::Receiver<SecretsSeen> {
        self.inner.observed.subscribe()
    }

    /// The source saw `key` in `state` (`None`: it stopped watching it).
    pub fn set(&self, key: ObjectKey, state: Option<SecretState>) {
        self.inner.observed.send_if_modified(|map| {
            if map.get(&key) == state.as_ref() {
                return false;
            }
            let map = Arc::make_mut(map);
            match state {
                Some(s) => map.insert(key, s),
                None => map.remove(&key),
            };
            true
        });
    }

    fn register(&self) -> Registration {
        Registration {
            watch: self.clone(),
            id: self.inner.next_session.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn want(&self, session: u64, keys: Option<BTreeSet<ObjectKey>>) {
        let union: BTreeSet<ObjectKey> = {
            let mut wanted = self.inner.wanted.lock().unwrap_or_else(|e| e.into_inner());
            match keys {
                Some(k) => wanted.insert(session, k),
                None => wanted.remove(&session),
            };
            wanted.values().flatten().cloned().collect()
        };
        self.inner.union.send_if_modified(|u| {
            let changed = *u != union;
            *u = union;
            changed
        });
    }
}

/// One session's place in a [`SecretWatch`]; its wants end with it.
struct Registration {
    watch: SecretWatch,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.watch.want(self.id, None);
    }
}

/// What the source has seen of each watched Secret (absent: not known yet).
pub type SecretsSeen = Arc<BTreeMap<ObjectKey, SecretState>>;

/// The Secrets one session's hub asked for, and what it was sent of them.
pub(super) struct SessionSecrets {
    source: Option<(Registration, watch::Receiver<SecretsSeen>)>,
    asked: BTreeSet<ObjectKey>,
    sent: HashMap<ObjectKey, SecretState>,
    warned: bool,
}

impl SessionSecrets {
    pub(super) fn new(watch: Option<&SecretWatch>) -> Self {
        SessionSecrets {
            source: watch.map(|w| (w.register(), w.observed())),
            asked: BTreeSet::new(),
            sent: HashMap::new(),
            warned: false,
        }
    }

    /// The hub's new list replaces the previous one.
    pub(super) fn on_watch(&mut self, w: pb::WatchSecrets) {
        let asked: BTreeSet<ObjectKey> = w
            .secrets
            .into_iter()
            .map(|s| ObjectKey {
                namespace: s.namespace,
                name: s.name,
            })
            .collect();
        info!(secrets = asked.len(), "the hub asks for Secrets");
        self.sent.retain(|k, _| asked.contains(k));
        self.asked = asked;
        match &self.source {
            Some((reg, _)) => reg.watch.want(reg.id, Some(self.asked.clone())),
            None if !self.asked.is_empty() && !self.warned => {
                self.warned = true;
                warn!(
                    secrets = self.asked.len(),
                    "the hub asks for Kubernetes Secrets, but this agent has no Kubernetes source (file mode): none is sent"
                );
            }
            None => {}
        }
    }

    /// Resolves when the source's view changed (never without a source).
    pub(super) async fn changed(&mut self) {
        match &mut self.source {
            Some((_, rx)) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await
                }
            }
            None => std::future::pending().await,
        }
    }

    /// The messages that bring the hub up to date: each asked Secret whose known
    /// state differs from what this session sent.
    pub(super) fn updates(&mut self) -> Vec<pb::AgentMessage> {
        let Some((_, rx)) = &mut self.source else {
            return Vec::new();
        };
        let observed = rx.borrow_and_update().clone();
        let mut out = Vec::new();
        for key in &self.asked {
            let Some(state) = observed.get(key) else {
                continue; // not known yet
            };
            if self.sent.get(key) == Some(state) {
                continue;
            }
            debug!(namespace = %key.namespace, name = %key.name, ?state, "sending Secret");
            out.push(pb::AgentMessage {
                kind: Some(agent_message::Kind::Secret(state.to_proto(key))),
            });
            self.sent.insert(key.clone(), state.clone());
        }
        out
    }
}

/// Watches the Secrets `watch` wants, each by a name-scoped watch in its namespace,
/// until `watch` has no receivers left. Watch errors are retried with the watcher's
/// default backoff.
pub async fn run_kube(client: Client, watch: SecretWatch) {
    let mut wanted = watch.watched();
    let mut running: HashMap<ObjectKey, JoinHandle<()>> = HashMap::new();
    loop {
        let now: BTreeSet<ObjectKey> = wanted.borrow_and_update().clone();
        running.retain(|k, task| {
            let keep = now.contains(k);
            if !keep {
                info!(namespace = %k.namespace, name = %k.name, "no longer watching Secret");
                task.abort();
                watch.set(k.clone(), None);
            }
            keep
        });
        for key in now {
            if running.contains_key(&key) {
                continue;
            }
            info!(namespace = %key.namespace, name = %key.name, "watching Secret");
            let task = tokio::spawn(watch_one(client.clone(), watch.clone(), key.clone()));
            running.insert(key, task);
        }
        if wanted.changed().await.is_err() {
            break;
        }
    }
    for task in running.into_values() {
        task.abort();
    }
}

async fn watch_one(client: Client, watch: SecretWatch, key: ObjectKey) {
    let api = Api::<Secret>::namespaced(client, &key.namespace);
    let mut events =
        std::pin::pin!(kube::runtime::watcher::watch_object(api, &key.name).default_backoff());
    while let Some(ev) = events.next().await {
        match ev {
            Ok(Some(secret)) => watch.set(key.clone(), Some(SecretState::of(&secret))),
            Ok(None) => watch.set(key.clone(), Some(SecretState::Deleted)),
            Err(e) => {
                warn!(namespace = %key.namespace, name = %key.name, error = %e, "Secret watch error (retrying)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(ty: &str, data: &[(&str, &[u8])]) -> Secret {
        Secret {
            type_: Some(ty.into()),
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn a_secret_is_reduced_to_its_key_material() {
        let s = secret(
            TLS_SECRET_TYPE,
            &[("tls.crt", b"C"), ("tls.key", b"K"), ("other", b"x")],
        );
        assert_eq!(
            SecretState::of(&s),
            SecretState::Tls {
                certificate_chain: Bytes::from_static(b"C"),
                private_key: Bytes::from_static(b"K"),
                ca_certificate: Bytes::new(),
            }
        );
        assert!(!format!("{:?}", SecretState::of(&s)).contains('K'));
        let opaque = secret("Opaque", &[("tls.crt", b"C"), ("tls.key", b"K")]);
        assert!(
            matches!(SecretState::of(&opaque), SecretState::Invalid(m) if m.contains("Opaque"))
        );
        let no_key = secret(TLS_SECRET_TYPE, &[("tls.crt", b"C")]);
        assert!(
            matches!(SecretState::of(&no_key), SecretState::Invalid(m) if m.contains("tls.key"))
        );
    }

    /// The source watches the union of what the sessions want; a session's wants end
    /// with it, and each session sends only what its hub asked for, once per change.
    #[test]
    fn sessions_want_what_their_hub_asked_and_send_each_state_once() {
        let watch = SecretWatch::new();
        let k = |n: &str| ObjectKey {
            namespace: "shop".into(),
            name: n.into(),
        };
        let ask = |names: &[&str]| pb::WatchSecrets {
            secrets: names
                .iter()
                .map(|n| pb::SecretRef {
                    namespace: "shop".into(),
                    name: n.to_string(),
                })
                .collect(),
        };
        let mut a = SessionSecrets::new(Some(&watch));
        let mut b = SessionSecrets::new(Some(&watch));
        a.on_watch(ask(&["one"]));
        b.on_watch(ask(&["one", "two"]));
        assert_eq!(*watch.watched().borrow(), [k("one"), k("two")].into());
        assert!(a.updates().is_empty(), "nothing known yet");
        watch.set(k("one"), Some(SecretState::Deleted));
        watch.set(k("two"), Some(SecretState::Invalid("x".into())));
        assert_eq!(a.updates().len(), 1);
        assert!(a.updates().is_empty(), "sent once");
        assert_eq!(b.updates().len(), 2);
        drop(b);
        assert_eq!(*watch.watched().borrow(), [k("one")].into());
        // A new list replaces the old one.
        a.on_watch(ask(&[]));
        assert!(watch.watched().borrow().is_empty());
    }
}
