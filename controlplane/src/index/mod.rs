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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use self::debounce::{DebounceConfig, Debouncer};
use crate::federation::{Batch, ChangeKind, ClusterInfo, FedService};
use crate::metrics::{ClusterLabel, EnvLabel, Metrics};
use crate::model::{Endpoint, Environment, Mesh, ObjectKey, Service};
use crate::xds::XdsType;
use crate::xds::generate::{
    EnvResources, Generated, endpoint_resources, service_resources, shared_resources,
};
use crate::xds::snapshot::{Changes, Shards};

#[derive(Debug, Clone, Copy)]
pub struct IndexConfig {
    pub debounce: DebounceConfig,
    /// How long a disconnected cluster's endpoints are kept before they are withdrawn.
    pub grace: Duration,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            debounce: DebounceConfig::default(),
            grace: Duration::from_secs(60),
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
    Batch {
        cluster: String,
        session: u64,
        batch: Batch,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Gone {
        cluster: String,
        session: u64,
    },
}

/// Cheap to clone; every input reaches the index through one.
#[derive(Debug, Clone)]
pub struct IndexHandle {
    tx: mpsc::Sender<Command>,
    status: watch::Receiver<Arc<Vec<ClusterStatus>>>,
}

impl IndexHandle {
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
    pub services: usize,
    pub endpoints: usize,
    /// Origin time (at the agent) of the last applied change.
    pub last_origin_unix: Option<f64>,
    /// When the last change was applied here; lag = applied - origin.
    pub last_applied_unix: Option<f64>,
    pub lag_seconds: Option<f64>,
    pub changes_applied: u64,
    pub sessions: u64,
}

#[derive(Debug, Default)]
struct ClusterState {
    info: ClusterInfo,
    services: BTreeMap<ObjectKey, FedService>,
    endpoints: BTreeMap<ObjectKey, Vec<Endpoint>>,
    session: Option<u64>,
    grace_until: Option<Instant>,
    grace_until_wall: Option<SystemTime>,
    last_version: u64,
    last_origin: Option<SystemTime>,
    last_applied: Option<SystemTime>,
    changes_applied: u64,
    sessions: u64,
}

/// Everything the merged model is computed from.
#[derive(Debug, Default)]
struct Sources {
    file: Arc<Mesh>,
    clusters: BTreeMap<String, ClusterState>,
}

#[derive(Debug, Default)]
struct EnvDirty {
    keys: BTreeSet<ObjectKey>,
    /// Routes or gateways changed.
    routing: bool,
}

#[derive(Debug, Default)]
struct EnvState {
    model: Environment,
    resources: EnvResources,
    /// Resource names each service generated, to withdraw what it no longer does.
    owned: HashMap<ObjectKey, Vec<(XdsType, Arc<str>)>>,
    shared: Vec<(XdsType, Arc<str>)>,
    /// Host → the service that holds it (first come); a conflicting later claim is
    /// dropped with a warning.
    hosts: HashMap<String, ObjectKey>,
}

#[derive(Debug)]
pub struct Index {
    cfg: IndexConfig,
    sources: Sources,
    envs: BTreeMap<String, EnvState>,
    dirty: BTreeMap<String, EnvDirty>,
    debouncer: Debouncer,
    pending_origin: Option<SystemTime>,
    shards: Arc<Shards>,
    metrics: Arc<Metrics>,
    status: watch::Sender<Arc<Vec<ClusterStatus>>>,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

impl Index {
    pub fn new(cfg: IndexConfig, shards: Arc<Shards>, metrics: Arc<Metrics>) -> Self {
        let (status, _) = watch::channel(Arc::new(Vec::new()));
        Self {
            cfg,
            sources: Sources::default(),
            envs: BTreeMap::new(),
            dirty: BTreeMap::new(),
            debouncer: Debouncer::default(),
            pending_origin: None,
            shards,
            metrics,
            status,
        }
    }

    /// Starts the single-writer task; the index must already hold the initial config.
    pub fn spawn(self, queue: usize) -> (IndexHandle, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(queue);
        let handle = IndexHandle {
            tx,
            status: self.status.subscribe(),
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
                batch,
                reply,
            } => {
                let _ = reply.send(self.apply_batch(&cluster, session, batch, now));
            }
            Command::Gone { cluster, session } => self.gone(&cluster, session, now),
        }
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
            dirty.routing |=
                a.routes != b.routes || a.gateways != b.gateways || a.sidecars != b.sidecars;
        }
        if touched {
            self.note_origin(SystemTime::now());
            self.debouncer.record(now, true);
        }
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
        state.session = Some(session);
        state.sessions += 1;
        state.grace_until = None;
        state.grace_until_wall = None;
        state.info = info;
        if had_state {
            self.metrics.federation_reconnects.inc();
        }
        let resume = had_state && last_acked != 0 && last_acked == state.last_version;
        info!(cluster = %state.info.id, session, resume, last_acked, hub_version = state.last_version, "agent connected");
        let hub_version = state.last_version;
        self.publish_status();
        Ok(Welcome {
            resume,
            hub_version,
        })
    }

    pub fn apply_batch(
        &mut self,
        cluster: &str,
        session: u64,
        batch: Batch,
        now: Instant,
    ) -> Result<(), String> {
        let state = self
            .sources
            .clusters
            .get_mut(cluster)
            .filter(|s| s.session == Some(session))
            .ok_or_else(|| {
                format!("cluster {cluster:?}: session {session} is not the live session")
            })?;
        let n = batch.changes.len() as u64;
        let mut touched: Vec<(String, ObjectKey)> = Vec::new();
        let mut removal = false;
        let mut oldest: Option<SystemTime> = None;
        for c in &batch.changes {
            oldest = Some(oldest.map_or(c.origin, |o| o.min(c.origin)));
            state.last_origin = Some(state.last_origin.map_or(c.origin, |o| o.max(c.origin)));
        }
        let env_of =
            |s: &ClusterState, k: &ObjectKey| s.services.get(k).map(|f| f.environment.clone());
        if batch.full {
            // The complete state: diff it against what is held, touching only keys
            // that differ (a reconnect that changes nothing pushes nothing).
            let mut services = BTreeMap::new();
            let mut endpoints = BTreeMap::new();
            for c in batch.changes {
                match c.kind {
                    ChangeKind::UpsertService(s) => {
                        services.insert(s.key.clone(), s);
                    }
                    ChangeKind::UpsertEndpoints(k, e) => {
                        endpoints.insert(k, e);
                    }
                    ChangeKind::DeleteService(_) | ChangeKind::DeleteEndpoints(_) => {}
                }
            }
            let keys: BTreeSet<ObjectKey> = state
                .services
                .keys()
                .chain(services.keys())
                .chain(state.endpoints.keys())
                .chain(endpoints.keys())
                .cloned()
                .collect();
            for k in keys {
                if state.services.get(&k) != services.get(&k)
                    || state.endpoints.get(&k) != endpoints.get(&k)
                {
                    removal |= !services.contains_key(&k) || !endpoints.contains_key(&k);
                    for env in [
                        env_of(state, &k),
                        services.get(&k).map(|s: &FedService| s.environment.clone()),
                    ]
                    .into_iter()
                    .flatten()
                    {
                        touched.push((env, k.clone()));
                    }
                }
            }
            state.services = services;
            state.endpoints = endpoints;
        } else {
            for c in batch.changes {
                match c.kind {
                    ChangeKind::UpsertService(s) => {
                        let k = s.key.clone();
                        if state.services.get(&k) == Some(&s) {
                            continue;
                        }
                        touched.extend(env_of(state, &k).map(|e| (e, k.clone())));
                        touched.push((s.environment.clone(), k.clone()));
                        state.services.insert(k, s);
                    }
                    ChangeKind::DeleteService(k) => {
                        touched.extend(env_of(state, &k).map(|e| (e, k.clone())));
                        removal = true;
                        state.services.remove(&k);
                    }
                    ChangeKind::UpsertEndpoints(k, e) => {
                        let old = state.endpoints.get(&k);
                        if old == Some(&e) {
                            continue;
                        }
                        removal |= old.is_some_and(|o| o.iter().any(|x| !e.contains(x)));
                        touched.extend(env_of(state, &k).map(|env| (env, k.clone())));
                        state.endpoints.insert(k, e);
                    }
                    ChangeKind::DeleteEndpoints(k) => {
                        if state.endpoints.remove(&k).is_some() {
                            removal = true;
                            touched.extend(env_of(state, &k).map(|env| (env, k.clone())));
                        }
                    }
                }
            }
        }
        state.last_version = batch.version;
        state.changes_applied += n;
        let applied = SystemTime::now();
        state.last_applied = Some(applied);
        if let Some(o) = state.last_origin {
            let lag = applied.duration_since(o).unwrap_or_default().as_secs_f64();
            self.metrics
                .federation_lag_seconds
                .get_or_create(&ClusterLabel {
                    cluster: cluster.to_string(),
                })
                .set(lag);
        }
        self.metrics.federation_changes_applied.inc_by(n);
        if !touched.is_empty() {
            for (env, k) in &touched {
                self.mark(env, k);
            }
            if let Some(o) = oldest {
                self.note_origin(o);
            }
            self.debouncer.record(now, removal);
        }
        debug!(
            cluster,
            version = batch.version,
            full = batch.full,
            changes = n,
            touched = touched.len(),
            "batch applied"
        );
        self.publish_status();
        Ok(())
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
            s.grace_until = Some(now + grace);
            s.grace_until_wall = Some(SystemTime::now() + grace);
            info!(
                cluster,
                session,
                grace_seconds = grace.as_secs_f64(),
                "agent disconnected; endpoints kept for the grace period"
            );
            self.publish_status();
        }
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.sources
            .clusters
            .values()
            .filter_map(|c| c.grace_until)
            .min()
    }

    /// Withdraws clusters whose grace period ended.
    pub fn expire(&mut self, now: Instant) {
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
        }
        self.publish_status();
    }

    /// Regenerates what the pending changes touched and publishes.
    pub fn flush(&mut self, now: Instant) {
        let waited = self.debouncer.fire(now);
        self.metrics.debounce_seconds.observe(waited.as_secs_f64());
        let origin = self.pending_origin.take();
        let dirty = std::mem::take(&mut self.dirty);
        for (env, d) in dirty {
            let started = std::time::Instant::now();
            let st = self.envs.entry(env.clone()).or_default();
            let changes = flush_env(&self.sources, &env, st, d);
            // Each changed resource's convergence starts at the oldest change of this flush.
            let origin_at = origin.unwrap_or_else(SystemTime::now);
            for ty in XdsType::ALL {
                let i = ty as usize;
                for name in &changes[i] {
                    if st.resources.by_type[i].contains_key(name) {
                        st.resources.origins[i].insert(name.clone(), origin_at);
                    } else {
                        st.resources.origins[i].remove(name);
                    }
                }
            }
            self.metrics
                .generation_seconds
                .observe(started.elapsed().as_secs_f64());
            if let Some(seq) =
                self.shards
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
    }

    fn publish_status(&self) {
        let list = self
            .sources
            .clusters
            .iter()
            .map(|(id, c)| ClusterStatus {
                id: id.clone(),
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
                services: c.services.len(),
                endpoints: c.endpoints.values().map(Vec::len).sum(),
                last_origin_unix: c.last_origin.map(unix),
                last_applied_unix: c.last_applied.map(unix),
                lag_seconds: match (c.last_applied, c.last_origin) {
                    (Some(a), Some(o)) => {
                        Some(a.duration_since(o).unwrap_or_default().as_secs_f64())
                    }
                    _ => None,
                },
                changes_applied: c.changes_applied,
                sessions: c.sessions,
            })
            .collect();
        let connected = self
            .sources
            .clusters
            .values()
            .filter(|c| c.session.is_some())
            .count();
        self.metrics
            .federation_clusters_connected
            .set(connected as i64);
        self.metrics
            .federation_clusters_grace
            .set((self.sources.clusters.len() - connected) as i64);
        self.status.send_replace(Arc::new(list));
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The merged service `key` of `env`: the file's definition and every cluster's
/// declaration in that environment, with their endpoints.
///
/// Declarations only add: ports are a union by number (the first declaration of a
/// number names it), hosts a union. The canonical host — which names the clusters —
/// does not depend on which cluster declared first: the file's first host, else
/// `name.namespace.svc.cluster.local` when declared, else the smallest host. So one
/// cluster can never take another's ports or rename the service under it.
fn merged(sources: &Sources, env: &str, key: &ObjectKey) -> Option<Service> {
    let file = sources
        .file
        .environments
        .get(env)
        .and_then(|e| e.services.get(key));
    let mut svc = file.cloned();
    for c in sources.clusters.values() {
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
            // the same port number differently. Translate through the number.
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
            s.endpoints.extend(eps.iter().map(|e| {
                let mut e = e.clone();
                if !rename.is_empty() {
                    e.ports = e
                        .ports
                        .into_iter()
                        .map(|(n, p)| (rename.get(n.as_str()).map_or(n, |r| r.to_string()), p))
                        .collect();
                }
                e
            }));
        }
    }
    if let Some(s) = svc.as_mut().filter(|_| file.is_none()) {
        let conventional = format!("{}.{}.svc.cluster.local", key.name, key.namespace);
        s.hosts.sort();
        if let Some(i) = s.hosts.iter().position(|h| *h == conventional) {
            let h = s.hosts.remove(i);
            s.hosts.insert(0, h);
        }
    }
    svc
}

fn same_spec(a: &Service, b: &Service) -> bool {
    a.hosts == b.hosts && a.ports == b.ports && a.subsets == b.subsets
}

fn flush_env(sources: &Sources, env: &str, st: &mut EnvState, d: EnvDirty) -> Changes {
    let mut changes: Changes = Default::default();
    let mut shared = d.routing;
    if d.routing {
        let file = sources.file.environments.get(env);
        st.model.routes = file.map(|e| e.routes.clone()).unwrap_or_default();
        st.model.gateways = file.map(|e| e.gateways.clone()).unwrap_or_default();
        st.model.sidecars = file.map(|e| e.sidecars.clone()).unwrap_or_default();
    }
    for key in d.keys {
        let mut new = merged(sources, env, &key);
        if let Some(s) = new.as_mut() {
            claim_hosts(st, env, s);
            if s.hosts.is_empty() || s.ports.is_empty() {
                new = None;
            }
        }
        if new.is_none() {
            st.hosts.retain(|_, owner| *owner != key);
        }
        let old = st.model.services.get(&key);
        if new.as_ref() == old {
            continue;
        }
        let mut generated = Generated::new();
        match (old, &new) {
            (Some(o), Some(n)) if same_spec(o, n) => {
                endpoint_resources(n, &mut generated);
                upsert(&mut st.resources, generated, &mut changes);
            }
            _ => {
                shared = true;
                if let Some(n) = &new {
                    service_resources(n, &mut generated);
                }
                let old_names = st.owned.remove(&key).unwrap_or_default();
                let names = replace(&mut st.resources, &old_names, generated, &mut changes);
                if !names.is_empty() {
                    st.owned.insert(key.clone(), names);
                }
            }
        }
        match new {
            Some(n) => st.model.services.insert(key, n),
            None => st.model.services.remove(&key),
        };
    }
    if shared {
        let mut generated = Generated::new();
        let roles = shared_resources(&st.model, &mut generated);
        let old_names = std::mem::take(&mut st.shared);
        st.shared = replace(&mut st.resources, &old_names, generated, &mut changes);
        st.resources.roles = roles;
    }
    changes
}

/// Drops hosts of `s` that another service of `env` already holds, and claims the rest.
fn claim_hosts(st: &mut EnvState, env: &str, s: &mut Service) {
    let key = s.key.clone();
    s.hosts.retain(|h| match st.hosts.get(h) {
        Some(owner) if *owner != key => {
            warn!(environment = env, host = %h, service = %key, owner = %owner, "host already held by another service; ignored for this one");
            false
        }
        _ => true,
    });
    st.hosts
        .retain(|h, owner| *owner != key || s.hosts.contains(h));
    for h in &s.hosts {
        st.hosts.insert(h.clone(), key.clone());
    }
}

/// Inserts `generated`, recording names whose version changed.
fn upsert(res: &mut EnvResources, generated: Generated, changes: &mut Changes) {
    for (ty, r) in generated {
        let name: Arc<str> = Arc::from(r.name());
        let same = res.by_type[ty as usize]
            .get(&name)
            .is_some_and(|o| o.version() == r.version());
        if !same {
            res.by_type[ty as usize].insert(name.clone(), r);
            changes[ty as usize].insert(name);
        }
    }
}

/// Replaces the resources named `old` with `generated`; returns the new names.
fn replace(
    res: &mut EnvResources,
    old: &[(XdsType, Arc<str>)],
    generated: Generated,
    changes: &mut Changes,
) -> Vec<(XdsType, Arc<str>)> {
    let names: Vec<(XdsType, Arc<str>)> = generated
        .iter()
        .map(|(t, r)| (*t, Arc::from(r.name())))
        .collect();
    let keep: HashSet<&(XdsType, Arc<str>)> = names.iter().collect();
    for n in old {
        if !keep.contains(n) && res.by_type[n.0 as usize].remove(&n.1).is_some() {
            changes[n.0 as usize].insert(n.1.clone());
        }
    }
    upsert(res, generated, changes);
    names
}

#[cfg(test)]
mod tests;
