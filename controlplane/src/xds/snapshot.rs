//! Immutable per-environment snapshots and the registry that publishes them.
//!
//! The index task is the only writer: it hands each environment's freshly generated
//! resources to [`Snapshots::publish`], which diffs them against the current snapshot
//! and publishes a new one only if some resource version changed. Connections hold a
//! `watch::Receiver`: it coalesces, so a slow connection sees only the newest
//! snapshot, and fan-out carries a dirty signal, never a copy of the data.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::watch;
use tributary_proto::wire::EncodedResource;

use super::XdsType;
use super::generate::{EnvResources, ResourceMap, RoleListeners};

/// Names changed (added, updated or removed) between two snapshots, per type.
pub type Changes = [HashSet<Arc<str>>; XdsType::COUNT];

/// How many earlier snapshots' change sets a snapshot keeps (see
/// [`Snapshot::changes_since`]).
pub const CHANGE_HISTORY: usize = 32;

/// Most names the kept change sets may hold together; past it the oldest are dropped
/// (a stream that skipped that far compares everything, which costs no more).
const CHANGE_HISTORY_NAMES: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct Snapshot {
    pub environment: Arc<str>,
    /// Starts at 0 (empty) and grows by one per published change.
    pub seq: u64,
    pub resources: EnvResources,
    /// What changed since `seq - 1`.
    pub changed: Arc<Changes>,
    /// The role → listener sets changed since `seq - 1`.
    pub roles_changed: bool,
    /// When the oldest change in this snapshot (since `seq - 1`) was first observed
    /// at its source (an agent, or the file source): the start of its convergence.
    pub origin: Option<SystemTime>,
    /// The change sets of the snapshots just before this one, oldest first, with
    /// their seqs and role flags: a stream that skipped snapshots (the watch
    /// coalesces) walks what changed since the one it saw instead of every name it
    /// holds. Shared with the next snapshot (clones of `Arc`s).
    earlier: VecDeque<(u64, Arc<Changes>, bool)>,
}

impl Snapshot {
    /// An environment's first snapshot (seq 0): nothing in it.
    pub fn empty(environment: &str) -> Snapshot {
        Snapshot {
            environment: Arc::from(environment),
            ..Default::default()
        }
    }

    /// The snapshot after `prev`: `resources`, which differ from `prev`'s in
    /// `changed` (and in the role listener sets when `roles_changed`).
    pub fn after(
        prev: &Snapshot,
        resources: EnvResources,
        changed: Changes,
        roles_changed: bool,
        origin: Option<SystemTime>,
    ) -> Snapshot {
        let mut earlier = prev.earlier.clone();
        earlier.push_back((prev.seq, prev.changed.clone(), prev.roles_changed));
        let size = |c: &Changes| c.iter().map(HashSet::len).sum::<usize>();
        let mut names: usize = earlier.iter().map(|(_, c, _)| size(c)).sum();
        while earlier.len() > CHANGE_HISTORY || names > CHANGE_HISTORY_NAMES {
            let Some((_, c, _)) = earlier.pop_front() else {
                break;
            };
            names -= size(&c);
        }
        Snapshot {
            environment: prev.environment.clone(),
            seq: prev.seq + 1,
            resources,
            changed: Arc::new(changed),
            roles_changed,
            origin,
            earlier,
        }
    }

    /// The change sets from snapshot `seen` (exclusive) to this one (inclusive),
    /// oldest first, each with its role flag; `None` when `seen` is older than the
    /// kept history (or not before this snapshot), so the caller must compare
    /// everything.
    pub fn changes_since(&self, seen: u64) -> Option<Vec<(&Changes, bool)>> {
        if seen >= self.seq {
            return None;
        }
        let first = seen + 1;
        if first < self.seq && self.earlier.front().is_none_or(|(s, _, _)| *s > first) {
            return None;
        }
        let mut out: Vec<(&Changes, bool)> = self
            .earlier
            .iter()
            .filter(|(s, _, _)| *s >= first)
            .map(|(_, c, r)| (&**c, *r))
            .collect();
        out.push((&*self.changed, self.roles_changed));
        Some(out)
    }

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

/// The per-environment snapshot channels, and the hub-wide withdrawal hold.
///
/// Environments come into being only when the index publishes config for them: a
/// client (or an admin query) naming an environment the hub does not serve gets
/// nothing and allocates nothing here.
#[derive(Debug)]
pub struct Snapshots {
    // Held only to look up or create an environment's channel (at connect and publish),
    // never across an await and never on a per-response path.
    inner: Mutex<HashMap<Arc<str>, watch::Sender<Arc<Snapshot>>>>,
    /// Bumped whenever an environment is created: streams waiting for theirs wake.
    created: watch::Sender<u64>,
    /// True while the hub may not yet hold everything its remote clusters provide
    /// (after a restart, until each known cluster has resynced or its grace period
    /// has run out): streams withhold removals meanwhile.
    withdrawals_held: watch::Sender<bool>,
    empty: Arc<Snapshot>,
}

impl Default for Snapshots {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            created: watch::channel(0).0,
            withdrawals_held: watch::channel(false).0,
            empty: Arc::new(Snapshot::default()),
        }
    }
}

/// One environment's snapshot in `/status/environments`.
#[derive(Debug, Clone, Serialize)]
pub struct EnvironmentSummary {
    pub environment: String,
    pub seq: u64,
    pub clusters: usize,
    pub endpoints: usize,
    pub listeners: usize,
    pub routes: usize,
}

impl Snapshots {
    /// The channel of `environment`, created (empty) if the hub has none yet. Only
    /// the index creates environments, and tests; never client input.
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
        drop(map);
        self.created.send_modify(|n| *n += 1);
        tx
    }

    fn existing(&self, environment: &str) -> Option<watch::Sender<Arc<Snapshot>>> {
        self.inner.lock().unwrap().get(environment).cloned()
    }

    /// A receiver for `environment`'s snapshots, or `None` when the hub serves no
    /// such environment (nothing is allocated for it).
    pub fn subscribe(&self, environment: &str) -> Option<watch::Receiver<Arc<Snapshot>>> {
        self.existing(environment).map(|tx| tx.subscribe())
    }

    /// Like [`Self::subscribe`], creating the environment (empty) if needed: for the
    /// index and for tests that wait for an environment to fill.
    pub fn subscribe_or_create(&self, environment: &str) -> watch::Receiver<Arc<Snapshot>> {
        self.sender(environment).subscribe()
    }

    /// Changes whenever an environment is created.
    pub fn watch_created(&self) -> watch::Receiver<u64> {
        self.created.subscribe()
    }

    /// The current snapshot of `environment`; an empty one (seq 0) when the hub
    /// serves no such environment.
    pub fn current(&self, environment: &str) -> Arc<Snapshot> {
        self.existing(environment)
            .map(|tx| tx.borrow().clone())
            .unwrap_or_else(|| self.empty.clone())
    }

    pub fn contains(&self, environment: &str) -> bool {
        self.inner.lock().unwrap().contains_key(environment)
    }

    /// Holds (or releases) every stream's removals; see [`Snapshots`].
    pub fn hold_withdrawals(&self, held: bool) {
        self.withdrawals_held.send_if_modified(|h| {
            let changed = *h != held;
            *h = held;
            changed
        });
    }

    pub fn withdrawals_held(&self) -> watch::Receiver<bool> {
        self.withdrawals_held.subscribe()
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
        let next = Snapshot::after(&current, resources, changed, roles_changed, origin);
        let seq = next.seq;
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

    pub fn summaries(&self) -> Vec<EnvironmentSummary> {
        self.environments()
            .into_iter()
            .map(|env| {
                let s = self.current(&env);
                let n = |t: XdsType| s.of_type(t).len();
                EnvironmentSummary {
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
