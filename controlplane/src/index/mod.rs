//! The index: the single writer of every shard's snapshots.
//!
//! Inputs arrive as [`Command`]s on one bounded channel: the file source's mesh, and
//! federation sessions' hellos, batches and departures. Each input names the
//! `(environment, service)` keys it touched. The debouncer decides when to act; then,
//! per touched environment, the index re-merges only the touched services and
//! regenerates only their resources — load assignments alone for an endpoint change,
//! and the shared route tables and listeners only when a service's hosts or ports, a
//! route or a gateway changed. Content versions drop whatever did not really change,
//! so an unchanged input pushes nothing.

pub mod debounce;
pub mod known;
pub mod zones;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use self::debounce::{DebounceConfig, Debouncer};
use self::known::{KnownCluster, KnownClusters};
use self::zones::ZoneViews;
use crate::catalog::{CatalogUpdate, RemoteCatalog, Summary};
use crate::federation::secrets::SecretEvent;
use crate::federation::{Batch, ChangeKind, ClusterInfo, FedEndpoint, FedService};
use crate::metrics::{ClusterLabel, EnvLabel, Metrics, SecretLabel};
use crate::model::{Credential, Endpoint, Environment, Mesh, ObjectKey, SecretRef, Service};
use crate::xds::XdsType;
use crate::xds::generate::{
    EnvResources, Generated, MeshTls, VirtualHostCache, endpoint_resources_with,
    service_resources_with, shared_resources_tls,
};
use crate::xds::snapshot::{Changes, Snapshots};

#[derive(Debug, Clone)]
pub struct IndexConfig {
    pub debounce: DebounceConfig,
    /// How long a disconnected cluster's endpoints are kept before they are withdrawn.
    pub grace: Duration,
    /// The mesh's trust domain when the hub issues workload certificates: then every
    /// environment has mesh mTLS unless its `Environment` says `mtls: false`.
    /// `None`: no environment has it (nothing could serve the certificates).
    pub mesh_trust_domain: Option<String>,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            debounce: DebounceConfig::default(),
            grace: Duration::from_secs(60),
            mesh_trust_domain: None,
        }
    }
}

/// The hub's answer to an agent's Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// The hub holds this cluster's state at the agent's last acknowledged version:
    /// the agent sends only what changed since.
    pub resume: bool,
    pub hub_version: u64,
}

#[derive(Debug)]
pub enum Command {
    File(Arc<Mesh>),
    Hello {
        info: ClusterInfo,
        last_acked: u64,
        session: u64,
        reply: oneshot::Sender<Result<Welcome, String>>,
    },
    /// A batch from a live session, or why the session could not read or accept it
    /// (`Err`: the batch is recorded as rejected and nothing of it is applied).
    Batch {
        cluster: String,
        session: u64,
        version: u64,
        batch: Result<Batch, String>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Gone {
        cluster: String,
        session: u64,
    },
    /// Other zones' summaries changed in the store (the catalog watcher).
    Catalog(CatalogUpdate),
    /// A credential's Kubernetes Secret, as its cluster's agent sent it and the
    /// session checked it (`federation::secrets`).
    Secret {
        secret: SecretRef,
        event: SecretEvent,
    },
}

/// The summaries this hub computes of each shard's own endpoints, for the shard
/// leaders to publish: shard → service → summary (persistent maps: a clone is O(1),
/// and a diff against an earlier clone skips what they share).
pub type LocalCatalog = Arc<BTreeMap<crate::membership::Shard, imbl::OrdMap<ObjectKey, Summary>>>;

/// Cheap to clone; every input reaches the index through one.
#[derive(Debug, Clone)]
pub struct IndexHandle {
    tx: mpsc::Sender<Command>,
    status: watch::Receiver<Arc<Vec<ClusterStatus>>>,
    pending: watch::Receiver<Arc<Vec<PendingResync>>>,
    catalog: watch::Receiver<LocalCatalog>,
}

impl IndexHandle {
    /// The summaries of each shard's own endpoints, as of the last flush.
    pub fn local_catalog(&self) -> watch::Receiver<LocalCatalog> {
        self.catalog.clone()
    }

    pub async fn send(&self, c: Command) -> Result<(), String> {
        self.tx
            .send(c)
            .await
            .map_err(|_| "the index has stopped".to_string())
    }

    pub fn clusters(&self) -> Arc<Vec<ClusterStatus>> {
        self.status.borrow().clone()
    }

    pub fn watch_clusters(&self) -> watch::Receiver<Arc<Vec<ClusterStatus>>> {
        self.status.clone()
    }

    /// Known clusters that have not resynced since the hub started (withdrawals are
    /// held while any is listed).
    pub fn resync_pending(&self) -> Arc<Vec<PendingResync>> {
        self.pending.borrow().clone()
    }
}

/// A cluster the hub remembers from before its start that has not resynced yet.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PendingResync {
    pub id: String,
    pub region: String,
    pub zone: String,
    pub last_seen_unix: f64,
    /// Its grace period (from the hub's start) ends then: it stops being waited for.
    pub grace_until_unix: f64,
}

/// One cluster as `/status/clusters` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterStatus {
    pub id: String,
    pub region: String,
    pub zone: String,
    pub network: String,
    pub agent_version: String,
    /// `connected` or `grace` (disconnected, endpoints kept until `grace_until_unix`).
    pub state: &'static str,
    pub grace_until_unix: Option<f64>,
    pub last_version: u64,
    /// The last applied batch whose changes are all in the published snapshots:
    /// `last_version` once the flush after it has published (what proxies can get).
    pub published_version: u64,
    pub services: usize,
    pub endpoints: usize,
    /// Origin time (at the agent) of the last applied change.
    pub last_origin_unix: Option<f64>,
    /// When the last change was applied here; lag = applied - origin.
    pub last_applied_unix: Option<f64>,
    pub lag_seconds: Option<f64>,
    pub changes_applied: u64,
    pub sessions: u64,
    /// The agent process's incarnation (resume needs the same one).
    pub incarnation: String,
    /// A full resync split over several batches has started and not finished.
    pub resync_in_progress: bool,
    /// Batches rejected (not applied) and the last reason.
    pub batches_rejected: u64,
    pub last_batch_error: Option<String>,
    /// The credentials' Kubernetes Secrets this cluster's agent sent.
    pub secrets: Vec<SecretStatus>,
}

/// A credential's Kubernetes Secret as `/status/clusters` shows it (never its data).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SecretStatus {
    pub namespace: String,
    pub name: String,
    /// The last update: `valid`, `invalid` or `deleted` (in its cluster).
    pub state: &'static str,
    /// A valid pair is held and served (the last good one when `state` is not `valid`).
    pub serving: bool,
    /// Expiry of the served certificate.
    pub not_after_unix: Option<f64>,
    /// Why the last update was not served.
    pub error: Option<String>,
    pub updated_unix: Option<f64>,
}

#[derive(Debug, Default)]
struct ClusterState {
    info: ClusterInfo,
    services: BTreeMap<ObjectKey, FedService>,
    endpoints: BTreeMap<ObjectKey, Vec<FedEndpoint>>,
    /// The sum of `endpoints`' lengths, kept as they change (status shows it per batch).
    endpoint_count: usize,
    session: Option<u64>,
    grace_until: Option<Instant>,
    grace_until_wall: Option<SystemTime>,
    last_version: u64,
    /// See [`ClusterStatus::published_version`].
    published_version: u64,
    /// The incarnation and version an agent may resume from: the last batch that
    /// completed a state. `None` while a split diff or resync is incomplete.
    resumable: Option<(String, u64)>,
    /// The full resync in progress: the keys it has named so far.
    resync: Option<Resync>,
    last_origin: Option<SystemTime>,
    last_applied: Option<SystemTime>,
    changes_applied: u64,
    sessions: u64,
    batches_rejected: u64,
    last_batch_error: Option<String>,
}

/// What a full resync has named so far (including keys of rejected items): at its
/// last part, whatever the cluster holds and it did not name is deleted.
#[derive(Debug, Default)]
struct Resync {
    services: FastSet<ObjectKey>,
    endpoints: FastSet<ObjectKey>,
}

/// One cluster's state as the index holds it (see [`Index::held`]).
#[derive(Debug, Clone, Copy)]
pub struct HeldCluster<'a> {
    pub services: &'a BTreeMap<ObjectKey, FedService>,
    pub endpoints: &'a BTreeMap<ObjectKey, Vec<FedEndpoint>>,
}

/// A known cluster waiting for its resync after the hub started.
#[derive(Debug)]
struct Pending {
    known: KnownCluster,
    until: Instant,
    until_wall: SystemTime,
}

/// Everything the merged model is computed from.
#[derive(Debug, Default)]
struct Sources {
    file: Arc<Mesh>,
    clusters: BTreeMap<String, ClusterState>,
    /// Service key → the clusters declaring a service under it, so that merging a
    /// service visits its own declarations, never every cluster.
    declared: Declared,
    /// Summaries other zones published (the store's catalog).
    catalog: RemoteCatalog,
    /// Credentials' Kubernetes Secrets from the agents: in memory only, held while
    /// some credential names them.
    secrets: BTreeMap<SecretRef, HeldSecret>,
}

/// One credential Secret: its last good pair (what gateways are served) and its
/// last update.
#[derive(Debug, Default)]
struct HeldSecret {
    good: Option<Credential>,
    not_after: Option<SystemTime>,
    state: &'static str,
    error: Option<String>,
    updated: Option<SystemTime>,
}

type Declared = FastMap<ObjectKey, BTreeSet<String>>;

fn declare(declared: &mut Declared, key: &ObjectKey, cluster: &str) {
    let set = declared.entry(key.clone()).or_default();
    if !set.contains(cluster) {
        set.insert(cluster.to_string());
    }
}

fn undeclare(declared: &mut Declared, key: &ObjectKey, cluster: &str) {
    if let Some(set) = declared.get_mut(key) {
        set.remove(cluster);
        if set.is_empty() {
            declared.remove(key);
        }
    }
}

/// How much per-item work the index has done: real counters in the code paths whose
/// cost must stay linear in the size of what changed (a test ingests 1,000 and 4,000
/// services and requires about 4× the work, see `index/tests.rs`). Each is a plain
/// `u64` increment on the index task; [`Index::work`] reads them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Work {
    /// Host claims placed or released and host owners looked up (host ownership).
    pub host_ops: u64,
    /// Declarations (the file's, or one cluster's) visited while merging services.
    pub merge_visits: u64,
    /// Services re-merged in a flush.
    pub services_merged: u64,
    /// Resources generated and encoded (a service's own, and the shared ones).
    pub resources_encoded: u64,
    /// Virtual hosts encoded for the shared route tables (cached per service).
    pub virtual_hosts_encoded: u64,
    /// Cluster status entries computed.
    pub status_entries: u64,
    /// Endpoints copied while merging services (see [`Merged`]): only those whose
    /// cluster names a port differently, and those of environments with zone views.
    pub endpoints_copied: u64,
}

#[derive(Debug, Default)]
struct EnvDirty {
    keys: BTreeSet<ObjectKey>,
    /// Routes or gateways changed.
    routing: bool,
    /// A credential's Kubernetes Secret changed: the credentials and the shared
    /// resources are generated again (content versions keep what did not change).
    credentials: bool,
}

#[derive(Debug, Default)]
struct EnvState {
    /// The merged services (specs only: endpoints are left out), routes, gateways
    /// and sidecar scopes: what the shared resources are generated from.
    model: Environment,
    resources: EnvResources,
    /// Resource names each service generated, to withdraw what it no longer does.
    owned: FastMap<ObjectKey, Vec<(XdsType, Arc<str>)>>,
    shared: Vec<(XdsType, Arc<str>)>,
    /// Host → every service claiming it, the owner first (see [`Claim`]).
    /// A sorted `Vec`: almost every host has one claimant, and a one-element B-tree
    /// set costs a whole node (about 600 bytes) per host.
    claims: FastMap<String, Vec<Claim>>,
    /// Service → the hosts it claims (its merged hosts, owned or not) and whether it
    /// is defined in the file (its claims' rank depends on it).
    claimed: FastMap<ObjectKey, Claimed>,
    /// The shared route tables' virtual hosts, encoded once per service version.
    vhosts: VirtualHostCache,
    /// Mesh mTLS of the environment as last generated (`None`: off).
    tls: Option<MeshTls>,
    /// Each zone's view and the zones' summaries.
    zones: ZoneViews,
}

/// What a service claims: see [`EnvState::claimed`].
#[derive(Debug, Default, PartialEq)]
struct Claimed {
    in_file: bool,
    hosts: Vec<String>,
}

/// A service's claim on a host. The owner is the smallest claim: (1) a service
/// defined in the hub's file config, (2) else the service whose conventional host
/// (`name.namespace.svc.cluster.local`) it is, (3) else the lowest `namespace/name`.
/// So ownership never depends on arrival order, and a loser gets the host back when
/// the owner lets it go.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    rank: u8,
    key: ObjectKey,
}

#[derive(Debug)]
pub struct Index {
    cfg: IndexConfig,
    sources: Sources,
    envs: BTreeMap<String, EnvState>,
    dirty: BTreeMap<String, EnvDirty>,
    debouncer: Debouncer,
    pending_origin: Option<SystemTime>,
    snapshots: Arc<Snapshots>,
    metrics: Arc<Metrics>,
    status: watch::Sender<Arc<Vec<ClusterStatus>>>,
    /// Clusters that fed the hub (kept in `store`, read back after a restart).
    known: BTreeMap<String, KnownCluster>,
    store: Option<Box<dyn KnownClusters>>,
    /// Known clusters not resynced since the start; withdrawals are held meanwhile.
    pending: BTreeMap<String, Pending>,
    pending_status: watch::Sender<Arc<Vec<PendingResync>>>,
    holding: bool,
    work: Work,
    /// The status entry of each cluster, recomputed only when that cluster changes.
    status_entries: BTreeMap<String, ClusterStatus>,
    /// Clusters with applied batches that the next flush publishes.
    unpublished: BTreeSet<String>,
    catalog: watch::Sender<LocalCatalog>,
}

/// Hash maps and sets on the index's hot paths (keyed by names, touched per service
/// and per host in every flush): foldhash, randomly seeded per map like std's
/// default, rather than SipHash, which showed in the ingest's profile.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

impl Index {
    pub fn new(cfg: IndexConfig, snapshots: Arc<Snapshots>, metrics: Arc<Metrics>) -> Self {
        let (status, _) = watch::channel(Arc::new(Vec::new()));
        Self {
            cfg,
            sources: Sources::default(),
            envs: BTreeMap::new(),
            dirty: BTreeMap::new(),
            debouncer: Debouncer::default(),
            pending_origin: None,
            snapshots,
            metrics,
            status,
            known: BTreeMap::new(),
            store: None,
            pending: BTreeMap::new(),
            pending_status: watch::channel(Arc::new(Vec::new())).0,
            holding: false,
            work: Work::default(),
            status_entries: BTreeMap::new(),
            unpublished: BTreeSet::new(),
            catalog: watch::channel(LocalCatalog::default()).0,
        }
    }

    /// After a (re)start: `known` clusters fed the hub before. Each is pending until
    /// its first complete full resync is applied or its grace period (from `now`) runs
    /// out; while any is pending, streams withhold withdrawals
    /// ([`Snapshots::hold_withdrawals`]). The list is kept up to date in `store`.
    pub fn restore(
        &mut self,
        known: Vec<KnownCluster>,
        store: Box<dyn KnownClusters>,
        now: Instant,
    ) {
        let wall = SystemTime::now();
        for k in known {
            self.pending.insert(
                k.id.clone(),
                Pending {
                    known: k.clone(),
                    until: now + self.cfg.grace,
                    until_wall: wall + self.cfg.grace,
                },
            );
            self.known.insert(k.id.clone(), k);
        }
        self.store = Some(store);
        if !self.pending.is_empty() {
            info!(
                clusters = ?self.pending.keys().collect::<Vec<_>>(),
                grace_seconds = self.cfg.grace.as_secs_f64(),
                "holding withdrawals until the known clusters resync"
            );
            self.holding = true;
            self.snapshots.hold_withdrawals(true);
        }
        self.publish_pending();
    }

    fn save_known(&mut self) {
        if let Some(store) = self.store.as_mut() {
            let list: Vec<KnownCluster> = self.known.values().cloned().collect();
            if let Err(e) = store.save(&list) {
                warn!(error = %e, "could not save the known clusters");
            }
        }
    }

    /// Remembers `id` as a cluster that fed the hub (saved when it is new or moved).
    fn remember(&mut self, info: &ClusterInfo, always: bool) {
        let entry = KnownCluster {
            id: info.id.clone(),
            region: info.region.clone(),
            zone: info.zone.clone(),
            last_seen_unix: unix(SystemTime::now()),
        };
        let changed = self
            .known
            .get(&info.id)
            .is_none_or(|k| k.region != entry.region || k.zone != entry.zone);
        self.known.insert(info.id.clone(), entry);
        if changed || always {
            self.save_known();
        }
    }

    fn forget(&mut self, id: &str) {
        if self.known.remove(id).is_some() {
            self.save_known();
        }
    }

    /// Lifts the withdrawal hold once no known cluster is pending and everything
    /// applied is published (else the flush that publishes it lifts it, at its end).
    fn maybe_release(&mut self) {
        if self.holding && self.pending.is_empty() && !self.debouncer.is_pending() {
            self.holding = false;
            self.snapshots.hold_withdrawals(false);
            info!("every known cluster resynced or timed out: withdrawals released");
        }
    }

    fn publish_pending(&self) {
        let list = self
            .pending
            .values()
            .map(|p| PendingResync {
                id: p.known.id.clone(),
                region: p.known.region.clone(),
                zone: p.known.zone.clone(),
                last_seen_unix: p.known.last_seen_unix,
                grace_until_unix: unix(p.until_wall),
            })
            .collect();
        self.pending_status.send_replace(Arc::new(list));
    }

    /// Starts the single-writer task; the index must already hold the initial config.
    pub fn spawn(self, queue: usize) -> (IndexHandle, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(queue);
        let handle = IndexHandle {
            tx,
            status: self.status.subscribe(),
            pending: self.pending_status.subscribe(),
            catalog: self.catalog.subscribe(),
        };
        (handle, tokio::spawn(self.run(rx)))
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            let flush_at = self.debouncer.deadline(&self.cfg.debounce);
            let expire_at = self.next_expiry();
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(c) => self.handle(c, Instant::now()),
                    None => break,
                },
                _ = sleep_until(flush_at) => self.flush(Instant::now()),
                _ = sleep_until(expire_at) => self.expire(Instant::now()),
            }
        }
    }

    pub fn handle(&mut self, c: Command, now: Instant) {
        match c {
            Command::File(mesh) => self.set_file(mesh, now),
            Command::Hello {
                info,
                last_acked,
                session,
                reply,
            } => {
                let _ = reply.send(self.hello(info, last_acked, session));
            }
            Command::Batch {
                cluster,
                session,
                version,
                batch,
                reply,
            } => {
                let result = batch.and_then(|b| self.apply_batch(&cluster, session, b, now));
                if let Err(message) = &result {
                    self.reject_batch(&cluster, session, version, message);
                }
                let _ = reply.send(result);
            }
            Command::Gone { cluster, session } => self.gone(&cluster, session, now),
            Command::Catalog(update) => self.apply_catalog(update, now),
            Command::Secret { secret, event } => self.apply_secret(secret, event, now),
        }
    }

    /// A credential's Secret from its cluster's agent. A valid pair replaces what is
    /// served (pushed to the gateways over SDS when it differs); an invalid or deleted
    /// Secret leaves the last good pair served, and is logged, counted and shown in
    /// the cluster's status.
    pub fn apply_secret(&mut self, secret: SecretRef, event: SecretEvent, now: Instant) {
        let envs: Vec<String> = self
            .sources
            .file
            .environments
            .iter()
            .filter(|(_, e)| e.secret_credentials.values().any(|s| *s == secret))
            .map(|(env, _)| env.clone())
            .collect();
        // Held even when no credential of the index's config names it yet: the
        // session asked for it from the config it saw, which may be newer than the
        // index's (the next config the index gets names it, or drops it).
        let held = self.sources.secrets.entry(secret.clone()).or_default();
        let label = || SecretLabel {
            cluster: secret.cluster.clone(),
            namespace: secret.namespace.clone(),
            name: secret.name.clone(),
        };
        let (cluster, namespace, name) = (&secret.cluster, &secret.namespace, &secret.name);
        let changed = match event {
            SecretEvent::Valid {
                credential,
                not_after,
            } => {
                held.state = "valid";
                held.error = None;
                held.not_after = Some(not_after);
                let changed = held.good.as_ref() != Some(&credential);
                held.good = Some(credential);
                info!(
                    cluster,
                    namespace, name, changed, "credential Secret received"
                );
                changed
            }
            SecretEvent::Invalid(_) | SecretEvent::Deleted => {
                let (state, why) = match event {
                    SecretEvent::Invalid(why) => ("invalid", why),
                    _ => (
                        "deleted",
                        "the Secret does not exist in its cluster".to_string(),
                    ),
                };
                held.state = state;
                warn!(cluster, namespace, name, state, reason = %why, serving_last_good = held.good.is_some(), "credential Secret not served (the last good certificate stays served)");
                held.error = Some(why);
                self.metrics
                    .credential_secret_errors
                    .get_or_create(&label())
                    .inc();
                false
            }
        };
        held.updated = Some(SystemTime::now());
        if changed {
            for env in envs {
                self.dirty.entry(env).or_default().credentials = true;
            }
            self.note_origin(SystemTime::now());
            self.debouncer.record(now, false);
        }
        self.publish_status(&secret.cluster);
    }

    /// Forgets the Secrets no credential names (after each new config).
    fn prune_secrets(&mut self) {
        let named: HashSet<&SecretRef> = self
            .sources
            .file
            .environments
            .values()
            .flat_map(|e| e.secret_credentials.values())
            .collect();
        let gone: Vec<SecretRef> = self
            .sources
            .secrets
            .keys()
            .filter(|s| !named.contains(s))
            .cloned()
            .collect();
        for s in gone {
            self.sources.secrets.remove(&s);
            self.publish_status(&s.cluster);
        }
    }

    /// Other zones' summaries changed: the services they name are settled again.
    pub fn apply_catalog(&mut self, update: CatalogUpdate, now: Instant) {
        let mut touched: BTreeSet<(String, ObjectKey)> = BTreeSet::new();
        let mut removal = false;
        let catalog = &mut self.sources.catalog;
        let mut set = |env: String, zone: String, key: ObjectKey, s: Option<Summary>| {
            let services = catalog.entry(env.clone()).or_default();
            let zones = services.entry(key.clone()).or_default();
            let changed = match s {
                Some(s) => zones.insert(zone, s.clone()).as_ref() != Some(&s),
                None => {
                    removal = true;
                    zones.remove(&zone).is_some()
                }
            };
            if zones.is_empty() {
                services.remove(&key);
            }
            if services.is_empty() {
                catalog.remove(&env);
            }
            if changed {
                touched.insert((env, key));
            }
        };
        match update {
            CatalogUpdate::Events(events) => {
                for (env, zone, key, s) in events {
                    set(env, zone, key, s);
                }
            }
            CatalogUpdate::Resync(all) => {
                let mut now_held: BTreeSet<(String, String, ObjectKey)> = BTreeSet::new();
                for (env, zone, key, s) in all {
                    now_held.insert((env.clone(), zone.clone(), key.clone()));
                    set(env, zone, key, Some(s));
                }
                let gone: Vec<(String, String, ObjectKey)> = catalog_entries(&self.sources.catalog)
                    .filter(|e| !now_held.contains(e))
                    .collect();
                let catalog = &mut self.sources.catalog;
                for (env, zone, key) in gone {
                    removal = true;
                    if let Some(services) = catalog.get_mut(&env) {
                        if let Some(zones) = services.get_mut(&key) {
                            zones.remove(&zone);
                            if zones.is_empty() {
                                services.remove(&key);
                            }
                        }
                        if services.is_empty() {
                            catalog.remove(&env);
                        }
                    }
                    touched.insert((env, key));
                }
            }
        }
        if touched.is_empty() {
            return;
        }
        for (env, key) in touched {
            self.mark(&env, &key);
        }
        self.note_origin(SystemTime::now());
        self.debouncer.record(now, removal);
    }

    fn mark(&mut self, env: &str, key: &ObjectKey) {
        self.dirty
            .entry(env.to_string())
            .or_default()
            .keys
            .insert(key.clone());
    }

    fn note_origin(&mut self, origin: SystemTime) {
        self.pending_origin = Some(self.pending_origin.map_or(origin, |o| o.min(origin)));
    }

    /// A new file-source mesh.
    pub fn set_file(&mut self, mesh: Arc<Mesh>, now: Instant) {
        let old = std::mem::replace(&mut self.sources.file, mesh);
        let empty = Environment::default();
        let envs: BTreeSet<String> = old
            .environments
            .keys()
            .chain(self.sources.file.environments.keys())
            .cloned()
            .collect();
        let mut touched = false;
        for env in envs {
            let a = old.environments.get(&env).unwrap_or(&empty);
            let b = self.sources.file.environments.get(&env).unwrap_or(&empty);
            if a == b {
                continue;
            }
            touched = true;
            let keys: BTreeSet<&ObjectKey> = a.services.keys().chain(b.services.keys()).collect();
            let dirty = self.dirty.entry(env.clone()).or_default();
            for k in keys {
                if a.services.get(k) != b.services.get(k) {
                    dirty.keys.insert(k.clone());
                }
            }
            dirty.routing |= a.routes != b.routes
                || a.gateways != b.gateways
                || a.sidecars != b.sidecars
                || a.credentials != b.credentials
                || a.secret_credentials != b.secret_credentials
                || a.mtls != b.mtls;
            if a.zones != b.zones || a.locality != b.locality {
                // Every service's zone views and summaries depend on these.
                if let Some(st) = self.envs.get(&env) {
                    dirty.keys.extend(st.model.services.keys().cloned());
                }
            }
        }
        if touched {
            self.note_origin(SystemTime::now());
            self.debouncer.record(now, true);
        }
        self.prune_secrets();
    }

    pub fn hello(
        &mut self,
        info: ClusterInfo,
        last_acked: u64,
        session: u64,
    ) -> Result<Welcome, String> {
        let state = self.sources.clusters.entry(info.id.clone()).or_default();
        if let Some(live) = state.session {
            self.metrics.federation_rejected.inc();
            return Err(format!(
                "cluster {:?} already has a live agent (session {live}); a second agent may not claim the same cluster id",
                info.id
            ));
        }
        let had_state = state.sessions > 0;
        // Versions count per agent process: only the same incarnation at the version
        // the hub holds may resume; any other agent resyncs in full.
        let resume = had_state
            && last_acked != 0
            && !info.incarnation.is_empty()
            && state
                .resumable
                .as_ref()
                .is_some_and(|(inc, v)| *inc == info.incarnation && *v == last_acked);
        state.session = Some(session);
        state.sessions += 1;
        state.grace_until = None;
        state.grace_until_wall = None;
        state.resync = None;
        state.info = info.clone();
        if had_state {
            self.metrics.federation_reconnects.inc();
        }
        info!(cluster = %state.info.id, session, resume, last_acked, hub_version = state.last_version, incarnation = %state.info.incarnation, "agent connected");
        let hub_version = state.last_version;
        self.remember(&info, false);
        self.publish_status(&info.id);
        Ok(Welcome {
            resume,
            hub_version,
        })
    }

    /// Applies a batch (or one part of a split one) from the live session of
    /// `cluster`. Parts of a full resync are applied as they come (upserts at once);
    /// the last part deletes what the whole resync did not name.
    pub fn apply_batch(
        &mut self,
        cluster: &str,
        session: u64,
        batch: Batch,
        now: Instant,
    ) -> Result<(), String> {
        let Sources {
            clusters, declared, ..
        } = &mut self.sources;
        let state = clusters
            .get_mut(cluster)
            .filter(|s| s.session == Some(session))
            .ok_or_else(|| {
                format!("cluster {cluster:?}: session {session} is not the live session")
            })?;
        if !batch.full && state.resync.is_some() {
            return Err(format!(
                "cluster {cluster:?}: incremental batch {} arrived before the full resync in progress ended (its last part has more = false)",
                batch.version
            ));
        }
        let n = batch.changes.len() as u64;
        let (version, full, more) = (batch.version, batch.full, batch.more);
        let mut applied = Applied::default();
        for c in &batch.changes {
            applied.oldest = Some(applied.oldest.map_or(c.origin, |o| o.min(c.origin)));
            state.last_origin = Some(state.last_origin.map_or(c.origin, |o| o.max(c.origin)));
        }
        if full && state.resync.is_none() {
            state.resync = Some(Resync::default());
        }
        for c in batch.changes {
            apply_change(state, declared, c.kind, full, &mut applied);
        }
        let resynced = full && !more;
        if resynced {
            let named = state.resync.take().unwrap_or_default();
            finish_resync(state, declared, &named, &mut applied);
        }
        state.last_version = version;
        // Only a complete state can be resumed from.
        state.resumable = (!more).then(|| (state.info.incarnation.clone(), version));
        state.changes_applied += n;
        let wall = SystemTime::now();
        state.last_applied = Some(wall);
        if let Some(o) = state.last_origin {
            let lag = wall.duration_since(o).unwrap_or_default().as_secs_f64();
            self.metrics
                .federation_lag_seconds
                .get_or_create(&ClusterLabel {
                    cluster: cluster.to_string(),
                })
                .set(lag);
        }
        self.metrics.federation_changes_applied.inc_by(n);
        // A batch that touched nothing is published as it is applied, unless an
        // earlier one still waits for the flush.
        if !applied.touched.is_empty() {
            self.unpublished.insert(cluster.to_string());
        } else if !self.unpublished.contains(cluster) {
            state.published_version = version;
        }
        if !applied.touched.is_empty() {
            for (env, k) in &applied.touched {
                self.mark(env, k);
            }
            if let Some(o) = applied.oldest {
                self.note_origin(o);
            }
            self.debouncer.record(now, applied.removal);
        }
        // A resync's last part ends its burst: nothing more of it is coming, so what it
        // applied is published without waiting for the quiet period, unless another
        // cluster's resync is still open (its parts belong to the same burst).
        if resynced && !self.sources.clusters.values().any(|c| c.resync.is_some()) {
            self.debouncer.complete(now);
        }
        debug!(
            cluster,
            version,
            full,
            more,
            changes = n,
            touched = applied.touched.len(),
            "batch applied"
        );
        if resynced && self.pending.remove(cluster).is_some() {
            info!(cluster, "known cluster resynced after the hub's start");
            self.publish_pending();
            self.maybe_release();
        }
        self.publish_status(cluster);
        Ok(())
    }

    /// Records a batch that was not applied: counted, shown in status. A resync in
    /// progress is abandoned (the session ends; the agent resyncs on its return).
    pub fn reject_batch(&mut self, cluster: &str, session: u64, version: u64, message: &str) {
        self.metrics.federation_batches_rejected.inc();
        warn!(cluster, session, version, %message, "batch rejected (not applied)");
        if let Some(state) = self.sources.clusters.get_mut(cluster) {
            state.batches_rejected += 1;
            state.last_batch_error = Some(format!("batch {version}: {message}"));
            if state.session == Some(session) {
                state.resync = None;
            }
            self.publish_status(cluster);
        }
    }

    pub fn gone(&mut self, cluster: &str, session: u64, now: Instant) {
        let grace = self.cfg.grace;
        if let Some(s) = self
            .sources
            .clusters
            .get_mut(cluster)
            .filter(|s| s.session == Some(session))
        {
            s.session = None;
            s.resync = None;
            s.grace_until = Some(now + grace);
            s.grace_until_wall = Some(SystemTime::now() + grace);
            info!(
                cluster,
                session,
                grace_seconds = grace.as_secs_f64(),
                "agent disconnected; endpoints kept for the grace period"
            );
            let info = s.info.clone();
            self.remember(&info, true);
            self.publish_status(cluster);
        }
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.sources
            .clusters
            .values()
            .filter_map(|c| c.grace_until)
            .chain(self.pending.values().map(|p| p.until))
            .min()
    }

    /// Withdraws clusters whose grace period ended, and stops waiting for known
    /// clusters whose grace period (from the hub's start) ended without a resync.
    pub fn expire(&mut self, now: Instant) {
        let overdue: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.until <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &overdue {
            self.pending.remove(id);
            warn!(cluster = %id, "known cluster did not resync within its grace period after the hub's start; no longer waiting for it");
            // Never returned at all: nothing is held for it, so forget it.
            if !self.sources.clusters.contains_key(id) {
                self.forget(id);
            }
        }
        if !overdue.is_empty() {
            self.publish_pending();
            self.maybe_release();
        }
        let expired: Vec<String> = self
            .sources
            .clusters
            .iter()
            .filter(|(_, c)| c.session.is_none() && c.grace_until.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            let Some(state) = self.sources.clusters.remove(&id) else {
                continue;
            };
            for k in state.services.keys() {
                undeclare(&mut self.sources.declared, k, &id);
            }
            self.forget(&id);
            warn!(cluster = %id, services = state.services.len(), "grace period over: withdrawing the cluster's services and endpoints");
            let keys: BTreeSet<ObjectKey> = state
                .services
                .keys()
                .chain(state.endpoints.keys())
                .cloned()
                .collect();
            for k in keys {
                if let Some(env) = state.services.get(&k).map(|s| s.environment.clone()) {
                    self.mark(&env, &k);
                }
            }
            self.metrics.federation_lag_seconds.remove(&ClusterLabel {
                cluster: id.clone(),
            });
            self.debouncer.record(now, true);
            self.note_origin(SystemTime::now());
            self.publish_status(&id);
        }
    }

    /// How much per-item work the index has done so far.
    pub fn work(&self) -> Work {
        self.work
    }

    /// What the index holds for `cluster`: its services and endpoint sets (for
    /// tests and the fuzz target, which compare it with a model).
    pub fn held(&self, cluster: &str) -> Option<HeldCluster<'_>> {
        self.sources.clusters.get(cluster).map(|c| HeldCluster {
            services: &c.services,
            endpoints: &c.endpoints,
        })
    }

    /// Regenerates what the pending changes touched and publishes.
    pub fn flush(&mut self, now: Instant) {
        let waited = self.debouncer.fire(now);
        self.metrics.debounce_seconds.observe(waited.as_secs_f64());
        let origin = self.pending_origin.take();
        let dirty = std::mem::take(&mut self.dirty);
        let mut local_changed = false;
        for (env, d) in dirty {
            let started = std::time::Instant::now();
            let st = self.envs.entry(env.clone()).or_default();
            let trust_domain = self.cfg.mesh_trust_domain.as_deref();
            // Each changed resource's convergence starts at the oldest change of this
            // flush (recorded as the resource is replaced or removed).
            let origin_at = origin.unwrap_or_else(SystemTime::now);
            let changes = flush_env(
                &self.sources,
                &env,
                trust_domain,
                st,
                d,
                origin_at,
                &mut self.work,
            );
            let cfg = self.sources.file.environments.get(&env);
            st.zones
                .publish(&env, cfg, &st.resources, &changes, origin, &self.snapshots);
            local_changed |= std::mem::take(&mut st.zones.local_changed);
            self.metrics
                .generation_seconds
                .observe(started.elapsed().as_secs_f64());
            if let Some(seq) =
                self.snapshots
                    .publish_changes(&env, st.resources.clone(), changes, origin)
            {
                self.metrics
                    .snapshots_published
                    .get_or_create(&EnvLabel {
                        environment: env.clone(),
                    })
                    .inc();
                debug!(environment = %env, seq, "snapshot published");
            }
        }
        // Every batch applied so far is published now.
        let unpublished = std::mem::take(&mut self.unpublished);
        for id in &unpublished {
            if let Some(c) = self.sources.clusters.get_mut(id) {
                c.published_version = c.last_version;
                self.refresh_status(id);
            }
        }
        if !unpublished.is_empty() {
            self.send_status();
        }
        if local_changed {
            self.publish_local_catalog();
        }
        // Published: a hold waiting for this flush may end now.
        self.maybe_release();
    }

    /// The summaries of each shard's own endpoints, as of the last flush (what the
    /// shard leaders publish; tests and the fuzz target compare it with a model).
    pub fn local_catalog(&self) -> LocalCatalog {
        self.catalog.borrow().clone()
    }

    /// Hands the shard leaders the summaries of every shard (O(shards): the maps
    /// are persistent).
    fn publish_local_catalog(&self) {
        let mut all = BTreeMap::new();
        for (env, st) in &self.envs {
            for (zone, map) in &st.zones.local {
                all.insert(
                    crate::membership::Shard {
                        environment: env.clone(),
                        zone: zone.clone(),
                    },
                    map.clone(),
                );
            }
        }
        self.catalog.send_replace(Arc::new(all));
    }

    /// Recomputes the status entry of `id` alone (or drops it when the cluster is
    /// gone) and publishes the list: a batch costs one entry, not one per cluster.
    fn publish_status(&mut self, id: &str) {
        self.refresh_status(id);
        self.send_status();
    }

    fn refresh_status(&mut self, id: &str) {
        match self.sources.clusters.get(id) {
            Some(c) => {
                self.work.status_entries += 1;
                let mut status = cluster_status(id, c);
                status.secrets = secret_statuses(&self.sources.secrets, id);
                self.status_entries.insert(id.to_string(), status);
            }
            None => {
                self.status_entries.remove(id);
            }
        }
    }

    fn send_status(&mut self) {
        let connected = self
            .status_entries
            .values()
            .filter(|c| c.state == "connected")
            .count();
        self.metrics
            .federation_clusters_connected
            .set(connected as i64);
        self.metrics
            .federation_clusters_grace
            .set((self.status_entries.len() - connected) as i64);
        self.status
            .send_replace(Arc::new(self.status_entries.values().cloned().collect()));
    }
}

fn cluster_status(id: &str, c: &ClusterState) -> ClusterStatus {
    ClusterStatus {
        id: id.to_string(),
        region: c.info.region.clone(),
        zone: c.info.zone.clone(),
        network: c.info.network.clone(),
        agent_version: c.info.agent_version.clone(),
        state: if c.session.is_some() {
            "connected"
        } else {
            "grace"
        },
        grace_until_unix: c.grace_until_wall.map(unix),
        last_version: c.last_version,
        published_version: c.published_version,
        services: c.services.len(),
        endpoints: c.endpoint_count,
        incarnation: c.info.incarnation.clone(),
        resync_in_progress: c.resync.is_some(),
        batches_rejected: c.batches_rejected,
        last_batch_error: c.last_batch_error.clone(),
        last_origin_unix: c.last_origin.map(unix),
        last_applied_unix: c.last_applied.map(unix),
        lag_seconds: match (c.last_applied, c.last_origin) {
            (Some(a), Some(o)) => Some(a.duration_since(o).unwrap_or_default().as_secs_f64()),
            _ => None,
        },
        changes_applied: c.changes_applied,
        sessions: c.sessions,
        secrets: Vec::new(),
    }
}

/// The credential Secrets held of `cluster`, in order.
fn secret_statuses(secrets: &BTreeMap<SecretRef, HeldSecret>, cluster: &str) -> Vec<SecretStatus> {
    secrets
        .iter()
        .filter(|(s, _)| s.cluster == cluster)
        .map(|(s, h)| SecretStatus {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            state: h.state,
            serving: h.good.is_some(),
            not_after_unix: h.not_after.map(unix),
            error: h.error.clone(),
            updated_unix: h.updated.map(unix),
        })
        .collect()
}

/// An environment's credentials: its own, and those of Kubernetes Secrets whose last
/// good pair the hub holds (one not received yet, or never valid, is left out: its
/// gateways' listeners wait for it).
fn credentials_of(sources: &Sources, env: Option<&Environment>) -> BTreeMap<ObjectKey, Credential> {
    let Some(env) = env else {
        return BTreeMap::new();
    };
    let mut out = env.credentials.clone();
    for (key, secret) in &env.secret_credentials {
        if let Some(good) = sources.secrets.get(secret).and_then(|h| h.good.as_ref()) {
            out.insert(key.clone(), good.clone());
        }
    }
    out
}

/// What applying changes touched.
#[derive(Debug, Default)]
struct Applied {
    touched: Vec<(String, ObjectKey)>,
    /// Endpoints or services were withdrawn (the debouncer does not hold those).
    removal: bool,
    oldest: Option<SystemTime>,
}

fn env_of(s: &ClusterState, k: &ObjectKey) -> Option<String> {
    s.services.get(k).map(|f| f.environment.clone())
}

/// Applies one change to a cluster's state (and the cluster's entries in `declared`).
/// In a full resync, upserts and keeps name their key, and a delete takes an earlier
/// part's naming back (an agent exporting its cluster as it lists it saw the object go
/// before the list ended); nothing is deleted before the resync's end, which deletes
/// what it did not name.
fn apply_change(
    state: &mut ClusterState,
    declared: &mut Declared,
    kind: ChangeKind,
    full: bool,
    out: &mut Applied,
) {
    if let Some(named) = state.resync.as_mut() {
        match &kind {
            ChangeKind::UpsertService(s) => {
                named.services.insert(s.key.clone());
            }
            ChangeKind::KeepService(k) => {
                named.services.insert(k.clone());
            }
            ChangeKind::UpsertEndpoints(k, _) | ChangeKind::KeepEndpoints(k) => {
                named.endpoints.insert(k.clone());
            }
            ChangeKind::DeleteService(k) => {
                named.services.remove(k);
            }
            ChangeKind::DeleteEndpoints(k) => {
                named.endpoints.remove(k);
            }
        }
    }
    match kind {
        ChangeKind::UpsertService(s) => {
            let k = s.key.clone();
            if state.services.get(&k) == Some(&s) {
                return;
            }
            out.touched
                .extend(env_of(state, &k).map(|e| (e, k.clone())));
            out.touched.push((s.environment.clone(), k.clone()));
            declare(declared, &k, &state.info.id);
            state.services.insert(k, s);
        }
        ChangeKind::DeleteService(k) if !full => {
            if let Some(env) = env_of(state, &k) {
                out.touched.push((env, k.clone()));
                out.removal = true;
            }
            undeclare(declared, &k, &state.info.id);
            state.services.remove(&k);
        }
        ChangeKind::UpsertEndpoints(k, set) => {
            let old = state.endpoints.get(&k);
            let mut new = set.endpoints;
            if !set.keep.is_empty() {
                // Named endpoints whose new form was invalid keep their previous form.
                let keep: HashSet<&str> = set.keep.iter().map(String::as_str).collect();
                new.extend(
                    old.into_iter()
                        .flatten()
                        .filter(|e| keep.contains(e.name.as_str()))
                        .cloned(),
                );
            }
            if old == Some(&new) {
                return;
            }
            if let Some(old) = old {
                let now: HashSet<IpAddr> = new.iter().map(|e| e.endpoint.address).collect();
                out.removal |= old.iter().any(|e| !now.contains(&e.endpoint.address));
            }
            out.touched
                .extend(env_of(state, &k).map(|env| (env, k.clone())));
            state.endpoint_count += new.len();
            if let Some(old) = state.endpoints.insert(k, new) {
                state.endpoint_count -= old.len();
            }
        }
        ChangeKind::DeleteEndpoints(k) if !full => {
            if let Some(old) = state.endpoints.remove(&k) {
                state.endpoint_count -= old.len();
                out.removal = true;
                out.touched
                    .extend(env_of(state, &k).map(|env| (env, k.clone())));
            }
        }
        ChangeKind::DeleteService(_)
        | ChangeKind::DeleteEndpoints(_)
        | ChangeKind::KeepService(_)
        | ChangeKind::KeepEndpoints(_) => {}
    }
}

/// The end of a full resync: deletes what the cluster holds and the resync did not
/// name (a rejected item's key counts as named, so it is never deleted).
fn finish_resync(
    state: &mut ClusterState,
    declared: &mut Declared,
    named: &Resync,
    out: &mut Applied,
) {
    let endpoints: Vec<ObjectKey> = state
        .endpoints
        .keys()
        .filter(|k| !named.endpoints.contains(*k))
        .cloned()
        .collect();
    for k in endpoints {
        if let Some(old) = state.endpoints.remove(&k) {
            state.endpoint_count -= old.len();
        }
        out.removal = true;
        out.touched
            .extend(env_of(state, &k).map(|env| (env, k.clone())));
    }
    let services: Vec<ObjectKey> = state
        .services
        .keys()
        .filter(|k| !named.services.contains(*k))
        .cloned()
        .collect();
    for k in services {
        if let Some(s) = state.services.remove(&k) {
            undeclare(declared, &k, &state.info.id);
            out.removal = true;
            out.touched.push((s.environment, k));
        }
    }
}

/// Every `(environment, zone, service)` the remote catalog holds.
fn catalog_entries(c: &RemoteCatalog) -> impl Iterator<Item = (String, String, ObjectKey)> + '_ {
    c.iter().flat_map(|(env, services)| {
        services.iter().flat_map(move |(key, zones)| {
            zones
                .keys()
                .map(move |zone| (env.clone(), zone.clone(), key.clone()))
        })
    })
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A merged service (see [`merged`]): its spec, with no endpoints, and its endpoints,
/// borrowed from the file and the clusters that hold them. An endpoint is copied only
/// when its cluster names a port differently from the merged service (counted in
/// [`Work::endpoints_copied`]): a flush after an endpoint change reads every endpoint
/// of the touched services, and copying each (its locality's and ports' strings) cost
/// as much as encoding it.
struct Merged<'a> {
    spec: Service,
    endpoints: Vec<Cow<'a, Endpoint>>,
}

/// The merged service `key` of `env`: the file's definition and every cluster's
/// declaration in that environment, with their endpoints.
///
/// Declarations only add: ports are a union by number (the first declaration of a
/// number names it), hosts a union. The canonical host — which names the clusters —
/// does not depend on which cluster declared first: the file's first host, else
/// `name.namespace.svc.cluster.local` when declared, else the smallest host. So one
/// cluster can never take another's ports or rename the service under it.
fn merged<'a>(
    sources: &'a Sources,
    env: &str,
    key: &ObjectKey,
    work: &mut Work,
) -> Option<Merged<'a>> {
    let file = sources
        .file
        .environments
        .get(env)
        .and_then(|e| e.services.get(key));
    let mut endpoints: Vec<Cow<'a, Endpoint>> = Vec::new();
    let mut svc = file.map(|f| {
        endpoints.extend(f.endpoints.iter().map(Cow::Borrowed));
        Service {
            key: f.key.clone(),
            hosts: f.hosts.clone(),
            ports: f.ports.clone(),
            subsets: f.subsets.clone(),
            endpoints: Vec::new(),
        }
    });
    work.merge_visits += 1;
    let declaring = sources.declared.get(key).into_iter().flatten();
    for c in declaring.filter_map(|id| sources.clusters.get(id)) {
        work.merge_visits += 1;
        let Some(fs) = c.services.get(key).filter(|f| f.environment == env) else {
            continue;
        };
        let s = svc.get_or_insert_with(|| Service {
            key: key.clone(),
            hosts: Vec::new(),
            ports: Vec::new(),
            subsets: Vec::new(),
            endpoints: Vec::new(),
        });
        for h in &fs.hosts {
            if !s.hosts.contains(h) {
                s.hosts.push(h.clone());
            }
        }
        for p in &fs.ports {
            if !s.ports.iter().any(|q| q.port == p.port) {
                s.ports.push(p.clone());
            }
        }
        if let Some(eps) = c.endpoints.get(key) {
            // Endpoints name ports as their cluster does; the merged service may name
            // the same port number differently. Translate through the number (on a
            // copy: only then is an endpoint copied).
            let rename: HashMap<&str, &str> = fs
                .ports
                .iter()
                .filter_map(|p| {
                    s.ports
                        .iter()
                        .find(|q| q.port == p.port)
                        .map(|q| (p.name.as_str(), q.name.as_str()))
                })
                .filter(|(a, b)| a != b)
                .collect();
            endpoints.reserve(eps.len());
            if rename.is_empty() {
                endpoints.extend(eps.iter().map(|e| Cow::Borrowed(&e.endpoint)));
            } else {
                work.endpoints_copied += eps.len() as u64;
                endpoints.extend(eps.iter().map(|e| {
                    let mut e = e.endpoint.clone();
                    e.ports = e
                        .ports
                        .into_iter()
                        .map(|(n, p)| (rename.get(n.as_str()).map_or(n, |r| r.to_string()), p))
                        .collect();
                    Cow::Owned(e)
                }));
            }
        }
    }
    let mut spec = svc?;
    if file.is_none() {
        let conventional = format!("{}.{}.svc.cluster.local", key.name, key.namespace);
        spec.hosts.sort();
        if let Some(i) = spec.hosts.iter().position(|h| *h == conventional) {
            let h = spec.hosts.remove(i);
            spec.hosts.insert(0, h);
        }
    }
    Some(Merged { spec, endpoints })
}

/// A service settled in a flush (see [`flush_env`]).
struct Settled {
    spec: Option<Service>,
    generated: Generated,
    /// `generated` is every resource of the service (else its load assignments only).
    all: bool,
}

fn same_spec(a: &Service, b: &Service) -> bool {
    a.hosts == b.hosts && a.ports == b.ports && a.subsets == b.subsets
}

/// An environment's mesh mTLS: on when the hub has a trust domain (it issues
/// workload certificates) unless the environment's definition turns it off.
fn mesh_tls(trust_domain: Option<&str>, file: Option<&Environment>, env: &str) -> Option<MeshTls> {
    let td = trust_domain?;
    file.and_then(|e| e.mtls).unwrap_or(true).then(|| MeshTls {
        trust_domain: td.to_string(),
        environment: env.to_string(),
    })
}

fn flush_env(
    sources: &Sources,
    env: &str,
    trust_domain: Option<&str>,
    st: &mut EnvState,
    d: EnvDirty,
    origin: SystemTime,
    work: &mut Work,
) -> Changes {
    let mut changes: Changes = Default::default();
    let mut shared = d.routing;
    let mut queue = d.keys;
    // Turning mesh mTLS on or off changes every cluster and inbound listener.
    let tls = mesh_tls(trust_domain, sources.file.environments.get(env), env);
    let tls_changed = tls != st.tls;
    if tls_changed {
        st.tls = tls;
        queue.extend(st.model.services.keys().cloned());
        shared = true;
    }
    if d.routing {
        // Routes may now name any service: no virtual host is kept.
        st.vhosts.clear();
        let file = sources.file.environments.get(env);
        st.model.routes = file.map(|e| e.routes.clone()).unwrap_or_default();
        st.model.gateways = file.map(|e| e.gateways.clone()).unwrap_or_default();
        st.model.sidecars = file.map(|e| e.sidecars.clone()).unwrap_or_default();
    }
    if d.routing || d.credentials {
        st.model.credentials = credentials_of(sources, sources.file.environments.get(env));
        shared |= d.credentials;
    }
    // A service whose claim moves a host's ownership puts the services that gained or
    // lost it back on the list: they are re-merged in this same flush.
    // Per settled service: its new spec (endpoints left out), its resources generated
    // (encoded: the merged endpoints are not held for the whole flush) and whether
    // they are all of its resources (else its load assignments only); `None` when
    // there was and is nothing.
    let mut settled: BTreeMap<ObjectKey, Option<Settled>> = BTreeMap::new();
    while let Some(key) = queue.pop_first() {
        work.services_merged += 1;
        let (mut new, endpoints) = match merged(sources, env, &key, work) {
            Some(m) => (Some(m.spec), m.endpoints),
            None => (None, Vec::new()),
        };
        let endpoints: Vec<&Endpoint> = endpoints.iter().map(|e| e.as_ref()).collect();
        let in_file = sources
            .file
            .environments
            .get(env)
            .is_some_and(|e| e.services.contains_key(&key));
        let claims = new
            .as_ref()
            .filter(|s| !s.ports.is_empty())
            .map(|s| s.hosts.clone())
            .unwrap_or_default();
        claim_hosts(st, &key, in_file, claims, &mut queue, work);
        if let Some(s) = new.as_mut() {
            s.hosts.retain(|h| {
                work.host_ops += 1;
                let owner = st.claims.get(h).and_then(|c| c.first()).map(|c| &c.key);
                if owner != Some(&key) {
                    debug!(environment = env, host = %h, service = %key, owner = ?owner.map(ToString::to_string), "host owned by another service; ignored for this one");
                }
                owner == Some(&key)
            });
            if s.hosts.is_empty() || s.ports.is_empty() {
                new = None;
            }
        }
        // Its zones' views and summaries, from its merged endpoints: the zone views
        // read a whole service, so an environment with them gets a copy.
        let cfg = sources.file.environments.get(env);
        let with_endpoints = new
            .as_ref()
            .filter(|_| cfg.is_some_and(Environment::zone_views))
            .map(|s| {
                work.endpoints_copied += endpoints.len() as u64;
                Service {
                    endpoints: endpoints.iter().map(|e| (*e).clone()).collect(),
                    ..s.clone()
                }
            });
        st.zones.settle(
            cfg,
            &key,
            with_endpoints.as_ref().or(new.as_ref()),
            sources.catalog.get(env).and_then(|c| c.get(&key)),
        );
        drop(with_endpoints);
        // A touched service with the same spec regenerates its load assignments; the
        // content versions drop those that did not change. (A service settled again
        // because a host changed hands is generated again.)
        let old = st.model.services.get(&key);
        let entry = match (old, &new) {
            (None, None) => None,
            (Some(o), Some(n)) if same_spec(o, n) && !tls_changed => {
                let mut generated = Generated::new();
                endpoint_resources_with(n, &endpoints, &mut generated);
                Some((generated, false))
            }
            (_, n) => {
                let mut generated = Generated::new();
                if let Some(n) = n {
                    service_resources_with(n, &endpoints, st.tls.as_ref(), &mut generated);
                }
                Some((generated, true))
            }
        };
        // The model keeps each service's spec only: its endpoints are held in the
        // sources and in the encoded load assignments, not a third time here.
        settled.insert(
            key,
            entry.map(|(generated, all)| Settled {
                spec: new,
                generated,
                all,
            }),
        );
    }
    // Withdraw every changed service's stale resources before inserting any new ones:
    // a resource name (an API listener of a host) may move from one service to another.
    let mut inserts = Vec::new();
    for (key, entry) in settled {
        let Some(Settled {
            spec: new,
            generated,
            all,
        }) = entry
        else {
            continue;
        };
        if all {
            shared = true;
            st.vhosts.invalidate(&key);
            let old_names = st.owned.remove(&key).unwrap_or_default();
            let names = remove_stale(&mut st.resources, &old_names, &generated, &mut changes);
            if !names.is_empty() {
                st.owned.insert(key.clone(), names);
            }
        }
        work.resources_encoded += generated.len() as u64;
        inserts.push(generated);
        match new {
            Some(n) => st.model.services.insert(key, n),
            None => st.model.services.remove(&key),
        };
    }
    for generated in inserts {
        upsert(&mut st.resources, generated, origin, &mut changes);
    }
    if shared {
        let mut generated = Generated::new();
        let encoded = st.vhosts.encoded;
        let roles =
            shared_resources_tls(&st.model, st.tls.as_ref(), &mut st.vhosts, &mut generated);
        work.resources_encoded += generated.len() as u64;
        work.virtual_hosts_encoded += st.vhosts.encoded - encoded;
        let old_names = std::mem::take(&mut st.shared);
        st.shared = replace(
            &mut st.resources,
            &old_names,
            generated,
            origin,
            &mut changes,
        );
        st.resources.roles = roles;
    }
    changes
}

/// Replaces the claims of `key` with `hosts`, and queues every other service that
/// gained or lost a host by it. Costs O(hosts of `key`); nothing when the service
/// claims what it claimed already (an endpoint change: no claim is released or
/// placed, so no host changes hands).
fn claim_hosts(
    st: &mut EnvState,
    key: &ObjectKey,
    in_file: bool,
    hosts: Vec<String>,
    queue: &mut BTreeSet<ObjectKey>,
    work: &mut Work,
) {
    let unchanged = match st.claimed.get(key) {
        Some(c) => c.in_file == in_file && c.hosts == hosts,
        None => hosts.is_empty(),
    };
    if unchanged {
        return;
    }
    let old = st.claimed.remove(key).map(|c| c.hosts).unwrap_or_default();
    let owner = |st: &EnvState, h: &str| -> Option<ObjectKey> {
        st.claims
            .get(h)
            .and_then(|c| c.first())
            .map(|c| c.key.clone())
    };
    let affected: BTreeSet<&String> = old.iter().chain(hosts.iter()).collect();
    // Each host: its owner before and after, and its claim released and/or placed.
    work.host_ops += (2 * affected.len() + old.len() + hosts.len()) as u64;
    let before: Vec<Option<ObjectKey>> = affected.iter().map(|h| owner(st, h)).collect();
    for h in &old {
        if let Some(set) = st.claims.get_mut(h) {
            set.retain(|c| c.key != *key);
            if set.is_empty() {
                st.claims.remove(h);
            }
        }
    }
    let conventional = format!("{}.{}.svc.cluster.local", key.name, key.namespace);
    for h in &hosts {
        let rank = if in_file {
            0
        } else if *h == conventional {
            1
        } else {
            2
        };
        let claim = Claim {
            rank,
            key: key.clone(),
        };
        let set = st.claims.entry(h.clone()).or_default();
        if set.is_empty() {
            *set = vec![claim]; // exactly one (a push would reserve four)
        } else if let Err(at) = set.binary_search(&claim) {
            set.insert(at, claim);
        }
    }
    for (h, was) in affected.iter().zip(before) {
        let now = owner(st, h);
        if now != was {
            queue.extend([was, now].into_iter().flatten().filter(|k| k != key));
        }
    }
    if !hosts.is_empty() {
        st.claimed.insert(key.clone(), Claimed { in_file, hosts });
    }
}

/// Inserts `generated`, recording names whose version changed and `origin` as the
/// start of their convergence.
fn upsert(res: &mut EnvResources, generated: Generated, origin: SystemTime, changes: &mut Changes) {
    for (ty, r) in generated {
        let name: Arc<str> = Arc::from(r.name());
        let same = res.by_type[ty as usize]
            .get(&name)
            .is_some_and(|o| o.version() == r.version());
        if !same {
            res.by_type[ty as usize].insert(name.clone(), r);
            res.origins[ty as usize].insert(name.clone(), origin);
            changes[ty as usize].insert(name);
        }
    }
}

/// Removes the resources named `old` that `generated` no longer has; returns the
/// names `generated` has (inserted by the caller with [`upsert`]).
fn remove_stale(
    res: &mut EnvResources,
    old: &[(XdsType, Arc<str>)],
    generated: &Generated,
    changes: &mut Changes,
) -> Vec<(XdsType, Arc<str>)> {
    let names: Vec<(XdsType, Arc<str>)> = generated
        .iter()
        .map(|(t, r)| (*t, Arc::from(r.name())))
        .collect();
    let keep: HashSet<&(XdsType, Arc<str>)> = names.iter().collect();
    for n in old {
        if !keep.contains(n) && res.by_type[n.0 as usize].remove(&n.1).is_some() {
            res.origins[n.0 as usize].remove(&n.1);
            changes[n.0 as usize].insert(n.1.clone());
        }
    }
    names
}

/// Replaces the resources named `old` with `generated`; returns the new names.
fn replace(
    res: &mut EnvResources,
    old: &[(XdsType, Arc<str>)],
    generated: Generated,
    origin: SystemTime,
    changes: &mut Changes,
) -> Vec<(XdsType, Arc<str>)> {
    let names = remove_stale(res, old, &generated, changes);
    upsert(res, generated, origin, changes);
    names
}

#[cfg(test)]
mod secret_tests;
#[cfg(test)]
mod tests;
