//! Immutable per-environment snapshots and the registry that publishes them.
//!
//! The index task is the only writer: it hands each environment's freshly generated
//! resources to [`Shards::publish`], which diffs them against the current snapshot
//! and publishes a new one only if some resource version changed. Connections hold a
//! `watch::Receiver`: it coalesces, so a slow connection sees only the newest
//! snapshot, and fan-out carries a dirty signal, never a copy of the data.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::watch;
use tributary_proto::wire::EncodedResource;

use super::XdsType;
use super::generate::{EnvResources, ResourceMap, RoleListeners};

/// Names changed (added, updated or removed) between two snapshots, per type.
pub type Changes = [HashSet<Arc<str>>; XdsType::COUNT];

#[derive(Debug, Default)]
pub struct Snapshot {
    pub environment: Arc<str>,
    /// Starts at 0 (empty) and grows by one per published change.
    pub seq: u64,
    pub resources: EnvResources,
    /// What changed since `seq - 1`.
    pub changed: Changes,
    /// The role → listener sets changed since `seq - 1`.
    pub roles_changed: bool,
    /// When the oldest change in this snapshot (since `seq - 1`) was first observed
    /// at its source (an agent, or the file source): the start of its convergence.
    pub origin: Option<SystemTime>,
}

impl Snapshot {
    pub fn get(&self, ty: XdsType, name: &str) -> Option<&EncodedResource> {
        self.resources.by_type[ty as usize].get(name)
    }

    pub fn of_type(&self, ty: XdsType) -> &ResourceMap {
        &self.resources.by_type[ty as usize]
    }

    pub fn roles(&self) -> &RoleListeners {
        &self.resources.roles
    }
}

/// The per-environment snapshot channels.
#[derive(Debug, Default)]
pub struct Shards {
    // Held only to look up or create an environment's channel (at connect and publish),
    // never across an await and never on a per-response path.
    inner: Mutex<HashMap<Arc<str>, watch::Sender<Arc<Snapshot>>>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShardSummary {
    pub environment: String,
    pub seq: u64,
    pub clusters: usize,
    pub endpoints: usize,
    pub listeners: usize,
    pub routes: usize,
}

impl Shards {
    fn sender(&self, environment: &str) -> watch::Sender<Arc<Snapshot>> {
        let mut map = self.inner.lock().unwrap();
        if let Some(tx) = map.get(environment) {
            return tx.clone();
        }
        let env: Arc<str> = Arc::from(environment);
        let empty = Snapshot {
            environment: env.clone(),
            ..Default::default()
        };
        let (tx, _) = watch::channel(Arc::new(empty));
        map.insert(env, tx.clone());
        tx
    }

    /// A receiver for `environment`'s snapshots; an environment with no config yet
    /// starts empty and fills when config for it arrives.
    pub fn subscribe(&self, environment: &str) -> watch::Receiver<Arc<Snapshot>> {
        self.sender(environment).subscribe()
    }

    pub fn current(&self, environment: &str) -> Arc<Snapshot> {
        self.sender(environment).borrow().clone()
    }

    /// Publishes `resources` whose difference from the current snapshot the caller
    /// already knows (`changed`): the index's incremental path, O(changes).
    pub fn publish_changes(
        &self,
        environment: &str,
        resources: EnvResources,
        changed: Changes,
        origin: Option<SystemTime>,
    ) -> Option<u64> {
        let tx = self.sender(environment);
        let current = tx.borrow().clone();
        let roles_changed = current.resources.roles != resources.roles;
        if !roles_changed && changed.iter().all(HashSet::is_empty) {
            return None;
        }
        let seq = current.seq + 1;
        let next = Snapshot {
            environment: current.environment.clone(),
            seq,
            resources,
            changed,
            roles_changed,
            origin,
        };
        tx.send_replace(Arc::new(next));
        Some(seq)
    }

    pub fn environments(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .lock()
            .unwrap()
            .keys()
            .map(|k| k.to_string())
            .collect();
        v.sort();
        v
    }

    pub fn summaries(&self) -> Vec<ShardSummary> {
        self.environments()
            .into_iter()
            .map(|env| {
                let s = self.current(&env);
                let n = |t: XdsType| s.of_type(t).len();
                ShardSummary {
                    environment: env,
                    seq: s.seq,
                    clusters: n(XdsType::Cluster),
                    endpoints: n(XdsType::Endpoint),
                    listeners: n(XdsType::Listener),
                    routes: n(XdsType::Route),
                }
            })
            .collect()
    }
}
