//! Shard membership: hub replicas registered under leases, and the assignment of
//! shards to them.
//!
//! A **shard** is `(environment, zone)`: every zone of every `Environment` definition
//! in the config. Keys in the store:
//!
//! | key | value |
//! |---|---|
//! | `/tributary/replicas/{replica}` | [`ReplicaInfo`] (JSON): addresses, the shards it serves, its load; attached to the replica's lease |
//! | `/tributary/election/assigner/{lease}` | the replica id of a candidate for assigner (etcd's election recipe, [`tributary_store::election`]) |
//! | `/tributary/assignment` | [`Assignment`] (JSON): every shard and its replicas, written only by the leader |
//!
//! Each replica keeps its lease alive ([`LeaseKeeper`]); a clean shutdown revokes it
//! (its entry goes at once), a crash lets it expire after `--lease-ttl`. The elected
//! leader watches the registrations and the config, and rewrites the assignment
//! whenever the set of live replicas or of shards changes: [`assign`] gives each
//! shard `--replicas-per-shard` live replicas (fewer only when fewer are alive),
//! keeping a shard's surviving replicas, filling by load with rendezvous hashing to
//! break ties, and no replica more than one shard above its share (rounded up). The write is conditional on the
//! leader's election key, so a deposed leader cannot overwrite its successor. Every
//! replica watches the assignment and registers the shards it serves.
//!
//! A replica refuses xDS clients of a shard the assignment gives to others
//! ([`Membership::refusal`], with `FAILED_PRECONDITION` naming the replicas that serve
//! it); the shard router (`shard-router/`) routes each proxy to a replica of its shard
//! by the registrations.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};
use tributary_store::lease::LeaseKeeper;
use tributary_store::watcher::{Update, Watcher};
use tributary_store::{Compare, EventKind, LeaseId, SharedStore, StoreError, Txn, TxnOp, election};

use crate::model::Mesh;
use crate::status::{SyncRegistry, unix_now};

pub const REPLICAS_PREFIX: &str = "/tributary/replicas/";
pub const ELECTION_PREFIX: &str = "/tributary/election/assigner/";
pub const ASSIGNMENT_KEY: &str = "/tributary/assignment";
/// A changed load figure is re-registered at most this often.
const LOAD_REFRESH: Duration = Duration::from_secs(5);

/// `(environment, zone)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Shard {
    pub environment: String,
    pub zone: String,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.environment, self.zone)
    }
}

/// Every shard of a mesh: each zone of each environment definition.
pub fn shards_of(mesh: &Mesh) -> BTreeSet<Shard> {
    mesh.environments
        .iter()
        .flat_map(|(env, e)| {
            e.zones.iter().map(move |z| Shard {
                environment: env.clone(),
                zone: z.clone(),
            })
        })
        .collect()
}

/// What a replica registers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub id: String,
    pub xds_addr: String,
    pub admin_addr: String,
    /// The shards the assignment gives it.
    pub shards: Vec<Shard>,
    /// Connected xDS streams.
    pub streams: u64,
    pub started_unix: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardAssignment {
    #[serde(flatten)]
    pub shard: Shard,
    pub replicas: Vec<String>,
}

/// The assignment, as the leader writes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// The replica that computed it.
    pub leader: String,
    pub replicas_per_shard: usize,
    pub shards: Vec<ShardAssignment>,
    pub updated_unix: f64,
}

/// FNV-1a: a stable hash, the same in every build (the rendezvous weights).
fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Assigns each shard `per_shard` distinct live replicas (all of them when fewer are
/// alive), in three steps:
///
/// 1. **keep**: a shard keeps its `previous` replicas that are still alive (so a
///    replica leaving moves only its own shards' slots);
/// 2. **trim**: a replica above its share, `ceil(shards × per_shard / replicas)`, gives
///    up its last shards (after a replica joined);
/// 3. **fill**: each missing slot goes to the least-loaded replica not yet in the shard,
///    ties broken by rendezvous hashing of (shard, replica); when every candidate is at
///    its share, an augmenting path re-places a slot filled in this step (kept slots
///    never move) to make room.
///
/// A replica ends above its share only where no arrangement of the new slots avoids
/// it (the kept slots and distinct replicas per shard can force one over;
/// `fuzz_assignment` checks at most one).
pub fn assign(
    shards: &BTreeSet<Shard>,
    replicas: &BTreeSet<String>,
    per_shard: usize,
    previous: &[ShardAssignment],
) -> Vec<ShardAssignment> {
    let n = per_shard.min(replicas.len());
    let cap = if replicas.is_empty() {
        0
    } else {
        (shards.len() * n).div_ceil(replicas.len())
    };
    let prev: HashMap<&Shard, &Vec<String>> =
        previous.iter().map(|a| (&a.shard, &a.replicas)).collect();
    let rank = |shard: &str, r: &str| std::cmp::Reverse(fnv(&[shard, r]));
    let keys: Vec<String> = shards.iter().map(ToString::to_string).collect();
    // 1. keep
    let mut chosen: Vec<Vec<&str>> = shards
        .iter()
        .zip(&keys)
        .map(|(shard, key)| {
            let mut kept: Vec<&str> = prev
                .get(shard)
                .into_iter()
                .flat_map(|v| v.iter())
                .filter_map(|r| replicas.get(r).map(String::as_str))
                .collect();
            kept.sort_by_key(|r| rank(key, r));
            kept.dedup();
            kept.truncate(n);
            kept
        })
        .collect();
    let mut load: HashMap<&str, usize> = replicas.iter().map(|r| (r.as_str(), 0)).collect();
    for c in &chosen {
        for r in c {
            *load.get_mut(r).unwrap() += 1;
        }
    }
    // 2. trim: an over-share replica leaves the fullest shards first (so the slots
    // it frees are spread over distinct shards, which a newcomer can take)
    let mut over: Vec<&str> = replicas
        .iter()
        .map(String::as_str)
        .filter(|r| load[r] > cap)
        .collect();
    over.sort();
    for r in over {
        let mut holding: Vec<usize> = (0..chosen.len())
            .filter(|&i| chosen[i].contains(&r))
            .collect();
        holding.sort_by_key(|&i| (std::cmp::Reverse(chosen[i].len()), rank(&keys[i], r)));
        for i in holding {
            if load[r] <= cap {
                break;
            }
            chosen[i].retain(|x| *x != r);
            *load.get_mut(r).unwrap() -= 1;
        }
    }
    // 3. fill: each missing slot to the least-loaded replica not yet in the shard,
    // within the share where any arrangement allows it. When every candidate of a
    // slot is full, an augmenting path moves a slot filled in this step (never a kept
    // one) to another replica to make room; only where no arrangement fits is the
    // share exceeded (first by one).
    let candidates: Vec<&str> = replicas.iter().map(String::as_str).collect();
    let kept_load = load.clone();
    let mut filled: Vec<Vec<&str>> = vec![Vec::new(); chosen.len()];
    for limit in [cap, cap + 1, usize::MAX] {
        load.clone_from(&kept_load);
        filled.iter_mut().for_each(Vec::clear);
        let mut fits = true;
        'shards: for i in 0..chosen.len() {
            while chosen[i].len() + filled[i].len() < n {
                let mut fill = Fill {
                    chosen: &chosen,
                    filled: &mut filled,
                    load: &mut load,
                    candidates: &candidates,
                    keys: &keys,
                    limit,
                    tried: HashSet::new(),
                };
                if !fill.place(i) {
                    fits = false;
                    break 'shards;
                }
            }
        }
        if fits {
            break;
        }
    }
    for (c, f) in chosen.iter_mut().zip(filled) {
        c.extend(f);
    }
    shards
        .iter()
        .zip(chosen)
        .map(|(shard, c)| {
            let mut replicas: Vec<String> = c.into_iter().map(String::from).collect();
            replicas.sort();
            ShardAssignment {
                shard: shard.clone(),
                replicas,
            }
        })
        .collect()
}

/// The fill step of [`assign`]: places one missing slot, by an augmenting path when
/// every candidate is at `limit`.
struct Fill<'a, 'b> {
    chosen: &'b [Vec<&'a str>],
    filled: &'b mut [Vec<&'a str>],
    load: &'b mut HashMap<&'a str, usize>,
    candidates: &'b [&'a str],
    keys: &'b [String],
    limit: usize,
    /// Replicas already tried as the end of a path for this slot.
    tried: HashSet<&'a str>,
}

impl<'a> Fill<'a, '_> {
    fn free(&self, r: &str, i: usize) -> bool {
        !self.chosen[i].contains(&r) && !self.filled[i].contains(&r)
    }

    fn place(&mut self, i: usize) -> bool {
        let key = &self.keys[i];
        let mut cands: Vec<&'a str> = self
            .candidates
            .iter()
            .copied()
            .filter(|r| self.free(r, i))
            .collect();
        cands.sort_by_key(|r| (self.load[r], std::cmp::Reverse(fnv(&[key, r]))));
        if let Some(&r) = cands.iter().find(|r| self.load[**r] < self.limit) {
            self.filled[i].push(r);
            *self.load.get_mut(r).unwrap() += 1;
            return true;
        }
        // Every candidate is full: give shard i one of r's new slots elsewhere (j),
        // and place j's slot again.
        for r in cands {
            if !self.tried.insert(r) {
                continue;
            }
            for j in 0..self.filled.len() {
                if j == i || !self.filled[j].contains(&r) {
                    continue;
                }
                self.filled[j].retain(|x| *x != r);
                self.filled[i].push(r);
                if self.place(j) {
                    return true;
                }
                self.filled[i].retain(|x| *x != r);
                self.filled[j].push(r);
            }
        }
        false
    }
}

/// Options of a replica's membership.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub replica_id: String,
    /// The registration expires this long after a crash (`--lease-ttl`).
    pub lease_ttl: Duration,
    /// Replicas per shard (`--replicas-per-shard`).
    pub replicas_per_shard: usize,
    pub xds_addr: String,
    pub admin_addr: String,
}

/// What `/status/shards` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MembershipView {
    /// This replica.
    pub replica: String,
    /// Its lease (hex) while registered.
    pub lease: Option<String>,
    /// The replica elected to assign shards.
    pub leader: Option<String>,
    /// Live replicas (registered, lease alive), by id.
    pub replicas: Vec<ReplicaInfo>,
    pub assignment: Assignment,
    /// The shards the assignment gives this replica.
    pub serving: Vec<Shard>,
    /// The last store error, while the store is unreachable.
    pub store_error: Option<String>,
}

/// A running replica's membership.
#[derive(Debug, Clone)]
pub struct Membership {
    view: watch::Receiver<Arc<MembershipView>>,
    lease: watch::Receiver<Option<LeaseId>>,
}

impl Membership {
    pub fn view(&self) -> Arc<MembershipView> {
        self.view.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<Arc<MembershipView>> {
        self.view.clone()
    }

    /// The replica's registration lease while it has one (shard leaders campaign
    /// with it: `catalog::publish`).
    pub fn lease(&self) -> watch::Receiver<Option<LeaseId>> {
        self.lease.clone()
    }

    /// Why this replica refuses an xDS client of shard `(environment, zone)`, if it
    /// does: the assignment gives that shard to other replicas. The message names
    /// them. A client that names no zone, or a shard the assignment does not know
    /// (no `Environment` with that zone), is served as before: a hub whose config
    /// defines no zones serves every client.
    pub fn refusal(&self, environment: &str, zone: Option<&str>) -> Option<String> {
        let (replica, elsewhere) = self.elsewhere(environment, zone?)?;
        Some(format!(
            "replica {replica} does not serve shard {environment}/{}; {elsewhere}; connect through the shard router (tributary-router), which routes each proxy to a replica of its shard",
            zone.unwrap_or_default()
        ))
    }

    /// Why this replica does not hold an agent's services of `environment` when the
    /// agent is in `zone` (its Hello's zone), if it does not: the assignment gives
    /// shard `(environment, zone)` to other replicas. The same rule as
    /// [`Membership::refusal`]: no zone, or a shard the assignment does not know, is
    /// held.
    pub fn federation_refusal(&self, environment: &str, zone: &str) -> Option<String> {
        let (replica, elsewhere) = self.elsewhere(environment, zone)?;
        Some(format!(
            "replica {replica} does not serve shard {environment}/{zone}, so it does not hold this service; {elsewhere}; an agent started with --router streams each environment only to the replicas of its shard"
        ))
    }

    /// `(this replica, "its replicas are ...")` when the assignment gives shard
    /// `(environment, zone)` to other replicas.
    fn elsewhere(&self, environment: &str, zone: &str) -> Option<(String, String)> {
        if zone.is_empty() {
            return None;
        }
        let v = self.view.borrow();
        let assigned = v
            .assignment
            .shards
            .iter()
            .find(|s| s.shard.environment == environment && s.shard.zone == zone)?;
        if assigned.replicas.contains(&v.replica) {
            return None;
        }
        let serving: Vec<String> = assigned
            .replicas
            .iter()
            .map(|r| match v.replicas.iter().find(|i| i.id == *r) {
                Some(i) => format!("{r} ({})", i.xds_addr),
                None => r.clone(),
            })
            .collect();
        Some((
            v.replica.clone(),
            if serving.is_empty() {
                "it has no live replica right now".to_string()
            } else {
                format!("its replicas are {}", serving.join(", "))
            },
        ))
    }
}

/// One of the membership's tasks, for the caller to spawn (and abort).
pub type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The tasks that register, campaign and watch the assignment; every one ends when
/// `stop` turns true, the registration task after revoking the lease.
pub fn start(
    store: SharedStore,
    cfg: MembershipConfig,
    mesh: watch::Receiver<Arc<Mesh>>,
    sync: Arc<SyncRegistry>,
    stop: watch::Receiver<bool>,
) -> (Membership, Vec<Task>) {
    let (view_tx, view) = watch::channel(Arc::new(MembershipView {
        replica: cfg.replica_id.clone(),
        ..Default::default()
    }));
    let view_tx = Arc::new(view_tx);
    let (lease_tx, lease_rx) = watch::channel(None::<LeaseId>);
    let lease = lease_rx.clone();
    let tasks: Vec<Task> = vec![
        Box::pin(register(
            store.clone(),
            cfg.clone(),
            sync,
            view_tx.clone(),
            lease_tx,
            stop.clone(),
        )),
        Box::pin(lead(
            store.clone(),
            cfg.clone(),
            mesh,
            lease_rx,
            stop.clone(),
        )),
        Box::pin(observe(store, cfg, view_tx, stop)),
    ];
    (Membership { view, lease }, tasks)
}

/// Changes the view, waking its watchers only if it really changed.
fn edit(view: &watch::Sender<Arc<MembershipView>>, f: impl FnOnce(&mut MembershipView)) {
    view.send_if_modified(|v| {
        let mut next = (**v).clone();
        f(&mut next);
        let changed = next != **v;
        if changed {
            *v = Arc::new(next);
        }
        changed
    });
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Owns the lease: registers, re-registers when the served shards or the load
/// change, re-grants after a loss, and revokes on shutdown.
async fn register(
    store: SharedStore,
    cfg: MembershipConfig,
    sync: Arc<SyncRegistry>,
    view: Arc<watch::Sender<Arc<MembershipView>>>,
    lease_tx: watch::Sender<Option<LeaseId>>,
    mut stop: watch::Receiver<bool>,
) {
    let key = format!("{REPLICAS_PREFIX}{}", cfg.replica_id);
    let started = unix_now();
    let mut views = view.subscribe();
    'lease: loop {
        let keeper = loop {
            tokio::select! {
                r = LeaseKeeper::grant(store.clone(), cfg.lease_ttl) => match r {
                    Ok(k) => break k,
                    Err(e) => {
                        warn!(error = %e, "cannot register this replica: granting a lease failed; retrying");
                        edit(&view, |v| v.store_error = Some(e.to_string()));
                    }
                },
                () = stopped(&mut stop) => return,
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = stopped(&mut stop) => return,
            }
        };
        let lease = keeper.id();
        let mut lost = keeper.lost();
        let mut written: Option<ReplicaInfo> = None;
        let mut announced = false;
        loop {
            let info = ReplicaInfo {
                id: cfg.replica_id.clone(),
                xds_addr: cfg.xds_addr.clone(),
                admin_addr: cfg.admin_addr.clone(),
                shards: views.borrow_and_update().serving.clone(),
                streams: sync.len() as u64,
                started_unix: started,
            };
            if written.as_ref() != Some(&info) {
                let body = serde_json::to_vec(&info).unwrap_or_default();
                match store.put(&key, body, lease).await {
                    Ok(_) => {
                        if written.is_none() {
                            info!(replica = %cfg.replica_id, lease = format!("{lease:x}"), ttl = ?cfg.lease_ttl, "replica registered");
                        }
                        written = Some(info);
                        edit(&view, |v| {
                            v.lease = Some(format!("{lease:x}"));
                            v.store_error = None;
                        });
                        if !announced {
                            lease_tx.send_replace(Some(lease));
                            announced = true;
                        }
                    }
                    Err(StoreError::LeaseNotFound { .. }) => {
                        lease_tx.send_replace(None);
                        continue 'lease;
                    }
                    Err(e) => {
                        edit(&view, |v| v.store_error = Some(e.to_string()));
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(500)) => {}
                            () = stopped(&mut stop) => return,
                        }
                        continue;
                    }
                }
            }
            enum Next {
                Lost,
                Refresh,
                Stop,
            }
            let next = tokio::select! {
                l = lost.wait_for(|l| *l) => if l.is_ok() { Next::Lost } else { Next::Refresh },
                r = views.changed() => {
                    if r.is_err() {
                        return;
                    }
                    Next::Refresh
                }
                () = tokio::time::sleep(LOAD_REFRESH) => Next::Refresh,
                () = stopped(&mut stop) => Next::Stop,
            };
            if let Next::Stop = next {
                lease_tx.send_replace(None);
                match tokio::time::timeout(Duration::from_secs(2), keeper.revoke()).await {
                    Ok(Ok(())) => info!(replica = %cfg.replica_id, "replica deregistered"),
                    Ok(Err(e)) => {
                        warn!(error = %e, "deregistering: revoking the lease failed; it expires after its TTL")
                    }
                    Err(_) => warn!("deregistering timed out; the lease expires after its TTL"),
                }
                return;
            }
            let lost_it = matches!(next, Next::Lost);
            if lost_it {
                warn!(replica = %cfg.replica_id, "the replica's lease was lost; registering again");
                lease_tx.send_replace(None);
                edit(&view, |v| v.lease = None);
                continue 'lease;
            }
        }
    }
}

/// Campaigns with the replica's lease and, while leading, keeps the assignment.
async fn lead(
    store: SharedStore,
    cfg: MembershipConfig,
    mesh: watch::Receiver<Arc<Mesh>>,
    mut lease_rx: watch::Receiver<Option<LeaseId>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let lease = tokio::select! {
            l = lease_rx.wait_for(Option::is_some) => match l {
                Ok(l) => l.unwrap_or_default(),
                Err(_) => return,
            },
            () = stopped(&mut stop) => return,
        };
        let campaign = election::campaign(
            &store,
            ELECTION_PREFIX,
            lease,
            cfg.replica_id.clone().into_bytes(),
        );
        let leadership = tokio::select! {
            r = campaign => r,
            _ = lease_rx.wait_for(|l| *l != Some(lease)) => continue,
            () = stopped(&mut stop) => return,
        };
        match leadership {
            Ok(l) => {
                info!(replica = %cfg.replica_id, "elected to assign shards");
                tokio::select! {
                    r = assign_while_leading(&store, &cfg, mesh.clone(), &l) => {
                        if let Err(e) = r {
                            warn!(error = %e, "stopped assigning shards");
                        }
                    }
                    _ = lease_rx.wait_for(|l| *l != Some(lease)) => {
                        info!(replica = %cfg.replica_id, "lease lost: no longer assigning shards");
                    }
                    () = stopped(&mut stop) => return,
                }
            }
            Err(e) => {
                warn!(error = %e, "campaigning to assign shards failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = stopped(&mut stop) => return,
                }
            }
        }
    }
}

/// The leader's loop: recompute the assignment whenever the live replicas or the
/// shards change, and write it if it changed. Returns when it is no longer leader.
async fn assign_while_leading(
    store: &SharedStore,
    cfg: &MembershipConfig,
    mut mesh: watch::Receiver<Arc<Mesh>>,
    leadership: &election::Leadership,
) -> Result<(), StoreError> {
    let (mut replicas_w, range) = Watcher::list(store.clone(), REPLICAS_PREFIX).await?;
    let mut live: BTreeSet<String> = range
        .kvs
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(REPLICAS_PREFIX).map(String::from))
        .collect();
    let mut current: Assignment = match store.get(ASSIGNMENT_KEY).await?.0 {
        Some(kv) => serde_json::from_slice(&kv.value).unwrap_or_default(),
        None => Assignment::default(),
    };
    loop {
        let shards = shards_of(&mesh.borrow_and_update());
        let shards_now = assign(&shards, &live, cfg.replicas_per_shard, &current.shards);
        if shards_now != current.shards
            || current.replicas_per_shard != cfg.replicas_per_shard
            || current.leader != cfg.replica_id
        {
            let next = Assignment {
                leader: cfg.replica_id.clone(),
                replicas_per_shard: cfg.replicas_per_shard,
                shards: shards_now,
                updated_unix: unix_now(),
            };
            let body = serde_json::to_vec(&next).unwrap_or_default();
            let r = store
                .txn(Txn {
                    compares: vec![Compare::new(
                        leadership.key.clone(),
                        tributary_store::CompareOp::Equal,
                        tributary_store::CompareTarget::CreateRevision(leadership.create_revision),
                    )],
                    success: vec![TxnOp::put(ASSIGNMENT_KEY, body)],
                    failure: vec![],
                })
                .await;
            match r {
                Ok(t) if t.succeeded => {
                    info!(replicas = ?live, shards = next.shards.len(), "shard assignment written");
                    current = next;
                }
                Ok(_) => {
                    return Err(StoreError::Failed {
                        store: store.describe(),
                        message: "no longer the elected leader".into(),
                    });
                }
                Err(e) => {
                    warn!(error = %e, "writing the shard assignment failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            u = replicas_w.next() => match u {
                Update::Events(events) => {
                    for e in events {
                        let Some(id) = e.kv.key.strip_prefix(REPLICAS_PREFIX) else { continue };
                        match e.kind {
                            EventKind::Put => live.insert(id.to_string()),
                            EventKind::Delete => live.remove(id),
                        };
                    }
                }
                Update::Resync(range) => {
                    live = range
                        .kvs
                        .iter()
                        .filter_map(|kv| kv.key.strip_prefix(REPLICAS_PREFIX).map(String::from))
                        .collect();
                }
                Update::Interrupted(_) => {}
            },
            r = mesh.changed() => if r.is_err() { return Ok(()) },
        }
    }
}

/// Watches the assignment, the live replicas and the leader, for the view.
async fn observe(
    store: SharedStore,
    cfg: MembershipConfig,
    view: Arc<watch::Sender<Arc<MembershipView>>>,
    mut stop: watch::Receiver<bool>,
) {
    // Retry the initial listings until the store answers.
    let (mut assignment_w, mut replicas_w, mut leader) = loop {
        let r = async {
            let a = Watcher::list(store.clone(), ASSIGNMENT_KEY).await?;
            let r = Watcher::list(store.clone(), REPLICAS_PREFIX).await?;
            let l = election::observe(store.clone(), ELECTION_PREFIX).await?;
            Ok::<_, StoreError>((a, r, l))
        }
        .await;
        match r {
            Ok(((aw, ar), (rw, rr), l)) => {
                let mut replicas: BTreeMap<String, ReplicaInfo> = BTreeMap::new();
                for kv in rr.kvs {
                    if let Ok(info) = serde_json::from_slice::<ReplicaInfo>(&kv.value) {
                        replicas.insert(kv.key, info);
                    }
                }
                let assignment = ar
                    .kvs
                    .iter()
                    .find(|kv| kv.key == ASSIGNMENT_KEY)
                    .and_then(|kv| serde_json::from_slice::<Assignment>(&kv.value).ok())
                    .unwrap_or_default();
                set_assignment(&view, &cfg, assignment);
                edit(&view, |v| v.replicas = replicas.values().cloned().collect());
                break (aw, (rw, replicas), l);
            }
            Err(e) => {
                edit(&view, |v| v.store_error = Some(e.to_string()));
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = stopped(&mut stop) => return,
                }
            }
        }
    };
    loop {
        let leader_now = leader
            .borrow_and_update()
            .as_ref()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
        edit(&view, |v| v.leader = leader_now);
        tokio::select! {
            u = assignment_w.next() => match u {
                Update::Events(events) => {
                    if let Some(e) = events.iter().rev().find(|e| e.kv.key == ASSIGNMENT_KEY) {
                        let a = match e.kind {
                            EventKind::Put => serde_json::from_slice(&e.kv.value).unwrap_or_default(),
                            EventKind::Delete => Assignment::default(),
                        };
                        set_assignment(&view, &cfg, a);
                    }
                }
                Update::Resync(range) => {
                    let a = range
                        .kvs
                        .iter()
                        .find(|kv| kv.key == ASSIGNMENT_KEY)
                        .and_then(|kv| serde_json::from_slice(&kv.value).ok())
                        .unwrap_or_default();
                    set_assignment(&view, &cfg, a);
                }
                Update::Interrupted(e) => edit(&view, |v| v.store_error = Some(e.to_string())),
            },
            u = replicas_w.0.next() => {
                let replicas = &mut replicas_w.1;
                match u {
                    Update::Events(events) => {
                        for e in events {
                            match e.kind {
                                EventKind::Put => {
                                    if let Ok(info) = serde_json::from_slice::<ReplicaInfo>(&e.kv.value) {
                                        replicas.insert(e.kv.key, info);
                                    }
                                }
                                EventKind::Delete => {
                                    replicas.remove(&e.kv.key);
                                }
                            }
                        }
                    }
                    Update::Resync(range) => {
                        replicas.clear();
                        for kv in range.kvs {
                            if let Ok(info) = serde_json::from_slice::<ReplicaInfo>(&kv.value) {
                                replicas.insert(kv.key, info);
                            }
                        }
                    }
                    Update::Interrupted(e) => edit(&view, |v| v.store_error = Some(e.to_string())),
                }
                let list: Vec<ReplicaInfo> = replicas.values().cloned().collect();
                edit(&view, |v| v.replicas = list);
            }
            r = leader.changed() => if r.is_err() { return },
            () = stopped(&mut stop) => return,
        }
    }
}

fn set_assignment(
    view: &watch::Sender<Arc<MembershipView>>,
    cfg: &MembershipConfig,
    a: Assignment,
) {
    let serving: Vec<Shard> = a
        .shards
        .iter()
        .filter(|s| s.replicas.contains(&cfg.replica_id))
        .map(|s| s.shard.clone())
        .collect();
    edit(view, |v| {
        if v.serving != serving {
            info!(replica = %cfg.replica_id, serving = ?serving.iter().map(ToString::to_string).collect::<Vec<_>>(), "shards assigned to this replica");
        }
        v.assignment = a;
        v.serving = serving;
    });
}

#[cfg(test)]
mod tests;
