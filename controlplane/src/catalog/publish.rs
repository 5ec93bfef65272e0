//! The catalog's tasks: shard leaders publish their zone's summaries; every hub
//! watches the other zones'.
//!
//! - **Leading** ([`lead_shards`]): a replica campaigns, with its registration's
//!   lease, to lead each shard the assignment gives it
//!   (`/tributary/election/shard/{env}/{zone}/`, etcd's election recipe), and
//!   resigns a shard the assignment moves away. While it leads, it writes the
//!   difference between what the store holds of the shard and what its index
//!   computes: one key per service that changed, puts and deletes in transactions
//!   of at most `max_txn_ops`, each conditional on its election key's create
//!   revision — a deposed leader's write fails and changes nothing, so it cannot
//!   overwrite its successor. A write round follows a change after `interval`
//!   (the debounce: changes during it go in the same round), so the write rate is
//!   at most one round per interval whatever the churn, and a round writes only the
//!   services whose summary changed (their healthy count, weight or gateway), never
//!   the whole catalog. A new leader starts from what the store holds, so it writes
//!   only what its predecessor left different.
//! - **Watching** ([`watch_catalog`]): every hub lists and watches
//!   `/tributary/catalog/` with the resumable [`Watcher`] and hands the index what
//!   changed ([`CatalogUpdate`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, info, warn};
use tributary_store::watcher::{Update, Watcher};
use tributary_store::{
    Compare, CompareOp, CompareTarget, EventKind, LeaseId, SharedStore, StoreError, Txn, TxnOp,
    election,
};

use super::{
    CATALOG_PREFIX, CatalogUpdate, SHARD_ELECTION_PREFIX, Summary, parse_summary_key, shard_prefix,
    summary_key,
};
use crate::index::{Command, IndexHandle, LocalCatalog};
use crate::membership::{Membership, Shard};
use crate::model::ObjectKey;

/// Bounds of the catalog's writes.
#[derive(Debug, Clone, Copy)]
pub struct CatalogConfig {
    /// A write round follows a change after this long (`--catalog-interval`).
    pub interval: Duration,
    /// Most puts and deletes in one transaction (etcd's `--max-txn-ops` default).
    pub max_txn_ops: usize,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(500),
            max_txn_ops: 128,
        }
    }
}

/// What this replica did for the catalog (`/status/shards`, tests).
#[derive(Debug, Default)]
pub struct CatalogStats {
    /// Transactions written as a shard leader.
    pub transactions: AtomicU64,
    /// Summaries put or deleted as the shard's leader, per shard.
    pub written: std::sync::Mutex<std::collections::BTreeMap<Shard, u64>>,
    /// The shards this replica leads now.
    pub leading: std::sync::Mutex<Vec<Shard>>,
}

/// What `/status/shards` shows of the catalog.
#[derive(Debug, Clone, Serialize)]
pub struct CatalogView {
    /// The shards this replica leads.
    pub leading: Vec<String>,
    pub transactions: u64,
    /// Summaries written (put or deleted) per shard, as its leader.
    pub summaries_written: std::collections::BTreeMap<String, u64>,
}

impl CatalogStats {
    pub fn view(&self) -> CatalogView {
        CatalogView {
            leading: self
                .leading
                .lock()
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect(),
            transactions: self.transactions.load(Ordering::Relaxed),
            summaries_written: self
                .written
                .lock()
                .unwrap()
                .iter()
                .map(|(s, n)| (s.to_string(), *n))
                .collect(),
        }
    }

    fn set_leading(&self, shard: &Shard, leading: bool) {
        // Held only to edit the list; never across an await.
        let mut l = self.leading.lock().unwrap();
        l.retain(|s| s != shard);
        if leading {
            l.push(shard.clone());
            l.sort();
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Lists and watches the catalog, handing the index every change, until `stop`.
pub async fn watch_catalog(
    store: SharedStore,
    index: IndexHandle,
    mut stop: watch::Receiver<bool>,
) {
    let mut w = loop {
        tokio::select! {
            r = Watcher::list(store.clone(), CATALOG_PREFIX) => match r {
                Ok((w, range)) => {
                    let all = range.kvs.iter().filter_map(|kv| decode(&kv.key, &kv.value)).collect();
                    if index.send(Command::Catalog(CatalogUpdate::Resync(all))).await.is_err() {
                        return;
                    }
                    break w;
                }
                Err(e) => warn!(error = %e, "cannot list the cross-zone catalog; retrying"),
            },
            () = stopped(&mut stop) => return,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stopped(&mut stop) => return,
        }
    };
    loop {
        let update = tokio::select! {
            u = w.next() => u,
            () = stopped(&mut stop) => return,
        };
        let update = match update {
            Update::Events(events) => CatalogUpdate::Events(
                events
                    .into_iter()
                    .filter_map(|e| {
                        let (env, zone, key) = parse_summary_key(&e.kv.key)?;
                        let s = match e.kind {
                            EventKind::Put => Some(decode(&e.kv.key, &e.kv.value)?.3),
                            EventKind::Delete => None,
                        };
                        Some((env, zone, key, s))
                    })
                    .collect(),
            ),
            Update::Resync(range) => CatalogUpdate::Resync(
                range
                    .kvs
                    .iter()
                    .filter_map(|kv| decode(&kv.key, &kv.value))
                    .collect(),
            ),
            Update::Interrupted(e) => {
                debug!(error = %e, "the catalog watch broke; resuming");
                continue;
            }
        };
        if index.send(Command::Catalog(update)).await.is_err() {
            return;
        }
    }
}

fn decode(key: &str, value: &[u8]) -> Option<(String, String, ObjectKey, Summary)> {
    let (env, zone, k) = parse_summary_key(key)?;
    match serde_json::from_slice::<Summary>(value) {
        Ok(s) => Some((env, zone, k, s)),
        Err(e) => {
            warn!(%key, error = %e, "ignoring a catalog summary that does not parse");
            None
        }
    }
}

/// Campaigns to lead every shard the assignment gives this replica (with its
/// registration's lease) and, while leading one, publishes its summaries from
/// `local`. A shard moved away is resigned; a lost lease ends every leadership.
pub async fn lead_shards(
    store: SharedStore,
    replica: String,
    membership: Membership,
    local: watch::Receiver<LocalCatalog>,
    cfg: CatalogConfig,
    stats: Arc<CatalogStats>,
    mut stop: watch::Receiver<bool>,
) {
    let (mut view, mut lease) = (membership.watch(), membership.lease());
    let mut running: HashMap<Shard, (LeaseId, tokio::task::JoinHandle<()>)> = HashMap::new();
    loop {
        let serving = view.borrow_and_update().serving.clone();
        let current = *lease.borrow_and_update();
        let gone: Vec<Shard> = running
            .iter()
            .filter(|(s, (l, _))| Some(*l) != current || !serving.contains(s))
            .map(|(s, _)| s.clone())
            .collect();
        for shard in gone {
            if let Some((l, task)) = running.remove(&shard) {
                task.abort();
                stats.set_leading(&shard, false);
                if Some(l) == current {
                    // Still registered, no longer assigned the shard: hand it over now.
                    let prefix = election_prefix(&shard);
                    if let Err(e) = election::resign(&store, &prefix, l).await {
                        warn!(%shard, error = %e, "resigning the shard's leadership failed; it ends with the lease");
                    }
                    info!(%shard, "no longer serving the shard: resigned its catalog leadership");
                }
            }
        }
        if let Some(l) = current {
            for shard in &serving {
                running.entry(shard.clone()).or_insert_with(|| {
                    let task = tokio::spawn(lead_shard(
                        store.clone(),
                        replica.clone(),
                        shard.clone(),
                        l,
                        local.clone(),
                        cfg,
                        stats.clone(),
                    ));
                    (l, task)
                });
            }
        }
        tokio::select! {
            r = view.changed() => if r.is_err() { break },
            r = lease.changed() => if r.is_err() { break },
            () = stopped(&mut stop) => break,
        }
    }
    for (shard, (_, task)) in running {
        task.abort();
        stats.set_leading(&shard, false);
    }
}

fn election_prefix(shard: &Shard) -> String {
    format!(
        "{SHARD_ELECTION_PREFIX}{}/{}/",
        shard.environment, shard.zone
    )
}

/// One shard: campaign, then publish while leading; again after losing it.
async fn lead_shard(
    store: SharedStore,
    replica: String,
    shard: Shard,
    lease: LeaseId,
    mut local: watch::Receiver<LocalCatalog>,
    cfg: CatalogConfig,
    stats: Arc<CatalogStats>,
) {
    let prefix = election_prefix(&shard);
    loop {
        let leadership =
            match election::campaign(&store, &prefix, lease, replica.clone().into_bytes()).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(%shard, error = %e, "campaigning to lead the shard failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
        info!(%shard, %replica, "leading the shard: publishing its catalog summaries");
        stats.set_leading(&shard, true);
        let r = publish_while_leading(&store, &shard, &leadership, &mut local, cfg, &stats).await;
        stats.set_leading(&shard, false);
        match r {
            Err(PublishError::Deposed) => {
                info!(%shard, "no longer the shard's leader: stopped publishing its summaries");
            }
            Err(PublishError::Store(e)) => {
                warn!(%shard, error = %e, "publishing the shard's summaries failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(()) => return,
        }
    }
}

/// Why a leader stopped publishing.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Its election key is gone or was replaced: another replica leads (not
    /// retryable as this leadership; campaign again).
    #[error("no longer the shard's leader")]
    Deposed,
    /// The store failed (retryable: the leader re-reads what the store holds).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Publishes the shard's summaries while `leadership` holds: a first round from
/// what the store holds, then a round after each change (debounced by
/// `cfg.interval`). Returns `Ok` when the index is gone.
async fn publish_while_leading(
    store: &SharedStore,
    shard: &Shard,
    leadership: &election::Leadership,
    local: &mut watch::Receiver<LocalCatalog>,
    cfg: CatalogConfig,
    stats: &CatalogStats,
) -> Result<(), PublishError> {
    let range = store
        .range(&shard_prefix(&shard.environment, &shard.zone))
        .await?;
    let mut published: imbl::OrdMap<ObjectKey, Summary> = range
        .kvs
        .iter()
        .filter_map(|kv| decode(&kv.key, &kv.value))
        .filter(|(e, z, _, _)| *e == shard.environment && *z == shard.zone)
        .map(|(_, _, k, s)| (k, s))
        .collect();
    loop {
        let current = local
            .borrow_and_update()
            .get(shard)
            .cloned()
            .unwrap_or_default();
        write_round(store, shard, leadership, &published, &current, cfg, stats).await?;
        published = current;
        if local.changed().await.is_err() {
            return Ok(());
        }
        // The debounce: whatever else changes meanwhile goes in the same round.
        tokio::time::sleep(cfg.interval).await;
    }
}

/// Writes the difference from `published` (what the store holds) to `current`, in
/// transactions of at most `cfg.max_txn_ops`, each conditional on `leadership`.
pub async fn write_round(
    store: &SharedStore,
    shard: &Shard,
    leadership: &election::Leadership,
    published: &imbl::OrdMap<ObjectKey, Summary>,
    current: &imbl::OrdMap<ObjectKey, Summary>,
    cfg: CatalogConfig,
    stats: &CatalogStats,
) -> Result<(), PublishError> {
    let ops: Vec<TxnOp> = published
        .diff(current)
        .map(|d| match d {
            imbl::ordmap::DiffItem::Add(k, s)
            | imbl::ordmap::DiffItem::Update { new: (k, s), .. } => TxnOp::put(
                summary_key(&shard.environment, &shard.zone, k),
                serde_json::to_vec(s).unwrap_or_default(),
            ),
            imbl::ordmap::DiffItem::Remove(k, _) => {
                TxnOp::delete(summary_key(&shard.environment, &shard.zone, k))
            }
        })
        .collect();
    for chunk in ops.chunks(cfg.max_txn_ops.max(1)) {
        let r = store
            .txn(Txn {
                compares: vec![Compare::new(
                    leadership.key.clone(),
                    CompareOp::Equal,
                    CompareTarget::CreateRevision(leadership.create_revision),
                )],
                success: chunk.to_vec(),
                failure: vec![],
            })
            .await?;
        if !r.succeeded {
            return Err(PublishError::Deposed);
        }
        stats.transactions.fetch_add(1, Ordering::Relaxed);
        *stats
            .written
            .lock()
            .unwrap()
            .entry(shard.clone())
            .or_default() += chunk.len() as u64;
    }
    if !ops.is_empty() {
        debug!(%shard, summaries = ops.len(), "catalog summaries written");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tributary_store::embedded::{Embedded, EmbeddedConfig};
    use tributary_store::lease::LeaseKeeper;

    use super::*;
    use crate::catalog::PortSummary;

    fn summary(healthy: u32) -> Summary {
        Summary {
            gateway: "[::1]:15443".parse().unwrap(),
            region: String::new(),
            ports: vec![PortSummary {
                port: 80,
                healthy,
                weight: healthy,
            }],
        }
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[tokio::test]
    async fn a_round_writes_only_what_changed_and_a_deposed_leader_writes_nothing() {
        let store: SharedStore = Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap());
        let shard = Shard {
            environment: "prod".into(),
            zone: "az1".into(),
        };
        let prefix = election_prefix(&shard);
        let ttl = Duration::from_secs(30);
        let first = LeaseKeeper::grant(store.clone(), ttl).await.unwrap();
        let second = LeaseKeeper::grant(store.clone(), ttl).await.unwrap();
        let old = election::campaign(&store, &prefix, first.id(), b"a".to_vec())
            .await
            .unwrap();
        let cfg = CatalogConfig {
            interval: Duration::from_millis(1),
            max_txn_ops: 2,
        };
        let stats = CatalogStats::default();
        // 5 services, in transactions of at most 2.
        let v1: imbl::OrdMap<ObjectKey, Summary> = (0..5)
            .map(|i| (key(&format!("s{i}")), summary(i + 1)))
            .collect();
        write_round(&store, &shard, &old, &imbl::OrdMap::new(), &v1, cfg, &stats)
            .await
            .unwrap();
        assert_eq!(stats.transactions.load(Ordering::Relaxed), 3);
        assert_eq!(stats.written.lock().unwrap()[&shard], 5);
        // One healthy count changes and one service goes: two writes, one transaction.
        let mut v2 = v1.clone();
        v2.insert(key("s1"), summary(9));
        v2.remove(&key("s4"));
        write_round(&store, &shard, &old, &v1, &v2, cfg, &stats)
            .await
            .unwrap();
        assert_eq!(stats.transactions.load(Ordering::Relaxed), 4);
        assert_eq!(stats.written.lock().unwrap()[&shard], 7);
        let stored = store.range(&shard_prefix("prod", "az1")).await.unwrap();
        assert_eq!(stored.kvs.len(), 4);
        // Nothing changed: nothing written.
        write_round(&store, &shard, &old, &v2, &v2, cfg, &stats)
            .await
            .unwrap();
        assert_eq!(stats.transactions.load(Ordering::Relaxed), 4);

        // The old leader resigns (or its lease ends) and another candidate leads;
        // the old one's writes are refused and change nothing.
        election::resign(&store, &prefix, first.id()).await.unwrap();
        let new = election::campaign(&store, &prefix, second.id(), b"b".to_vec())
            .await
            .unwrap();
        let before = store.range(&shard_prefix("prod", "az1")).await.unwrap();
        let mut v3 = v2.clone();
        v3.insert(key("s0"), summary(0));
        let r = write_round(&store, &shard, &old, &v2, &v3, cfg, &stats).await;
        assert!(matches!(r, Err(PublishError::Deposed)), "{r:?}");
        let after = store.range(&shard_prefix("prod", "az1")).await.unwrap();
        assert_eq!(before.kvs, after.kvs);
        // The new leader can.
        write_round(&store, &shard, &new, &v2, &v3, cfg, &stats)
            .await
            .unwrap();
        let s0 = store
            .get(&summary_key("prod", "az1", &key("s0")))
            .await
            .unwrap()
            .0
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<Summary>(&s0.value).unwrap(),
            summary(0)
        );
    }
}
