//! Follows membership in the store and keeps the routing table current.
//!
//! Two resumable watches ([`Watcher`]): the replicas' registrations under
//! `/tributary/replicas/` (each attached to its replica's lease, so a crashed
//! replica's key is deleted when the lease expires) and the assignment at
//! `/tributary/assignment` (every shard, so that an error can name them all). After
//! each change the whole view is applied to the [`Table`], which ends the relayed
//! streams of every replica that left a shard. While the store is unreachable the
//! table keeps the last view it had: the replicas themselves keep serving.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};
use tributary_controlplane::membership::{
    ASSIGNMENT_KEY, Assignment, REPLICAS_PREFIX, ReplicaInfo,
};
use tributary_store::watcher::{Update, Watcher};
use tributary_store::{EventKind, KeyValue, SharedStore, StoreError};

use crate::app::stopped;
use crate::metrics::RouterMetrics;
use crate::table::Table;

fn replica_of(kv: &KeyValue) -> Option<ReplicaInfo> {
    match serde_json::from_slice::<ReplicaInfo>(&kv.value) {
        Ok(info) => Some(info),
        Err(e) => {
            warn!(key = %kv.key, error = %e, "a replica registration is not valid JSON; ignoring it");
            None
        }
    }
}

fn assignment_of(kvs: &[KeyValue]) -> Assignment {
    kvs.iter()
        .find(|kv| kv.key == ASSIGNMENT_KEY)
        .and_then(|kv| serde_json::from_slice(&kv.value).ok())
        .unwrap_or_default()
}

/// Runs until `stop` turns true.
pub async fn follow(
    store: SharedStore,
    table: Arc<Table>,
    metrics: Arc<RouterMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    let listed = loop {
        let r = async {
            let r = Watcher::list(store.clone(), REPLICAS_PREFIX).await?;
            let a = Watcher::list(store.clone(), ASSIGNMENT_KEY).await?;
            Ok::<_, StoreError>((r, a))
        };
        tokio::select! {
            r = r => match r {
                Ok(l) => break l,
                Err(e) => warn!(store = %store.describe(), error = %e, "cannot list membership; retrying"),
            },
            () = stopped(&mut stop) => return,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stopped(&mut stop) => return,
        }
    };
    let ((mut replicas_w, range), (mut assignment_w, arange)) = listed;
    let mut replicas: BTreeMap<String, ReplicaInfo> = range
        .kvs
        .iter()
        .filter_map(|kv| Some((kv.key.clone(), replica_of(kv)?)))
        .collect();
    let mut assignment = assignment_of(&arange.kvs);
    table.set_revision(range.revision.max(arange.revision));
    info!(store = %store.describe(), replicas = replicas.len(), shards = assignment.shards.len(), "membership listed");
    loop {
        table.apply(&replicas, &assignment);
        metrics.replicas.set(replicas.len() as i64);
        tokio::select! {
            u = replicas_w.next() => match u {
                Update::Events(events) => {
                    for e in events {
                        table.set_revision(e.revision());
                        match e.kind {
                            EventKind::Put => {
                                if let Some(info) = replica_of(&e.kv) {
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
                    table.set_revision(range.revision);
                    replicas = range
                        .kvs
                        .iter()
                        .filter_map(|kv| Some((kv.key.clone(), replica_of(kv)?)))
                        .collect();
                }
                Update::Interrupted(e) => {
                    warn!(error = %e, "the membership watch broke; routing with the last membership seen until it resumes");
                }
            },
            u = assignment_w.next() => match u {
                Update::Events(events) => {
                    if let Some(e) = events.last() {
                        table.set_revision(e.revision());
                    }
                    if let Some(e) = events.iter().rev().find(|e| e.kv.key == ASSIGNMENT_KEY) {
                        assignment = match e.kind {
                            EventKind::Put => serde_json::from_slice(&e.kv.value).unwrap_or_default(),
                            EventKind::Delete => Assignment::default(),
                        };
                    }
                }
                Update::Resync(range) => {
                    table.set_revision(range.revision);
                    assignment = assignment_of(&range.kvs);
                }
                Update::Interrupted(e) => {
                    warn!(error = %e, "the assignment watch broke; routing with the last assignment seen until it resumes");
                }
            },
            () = stopped(&mut stop) => return,
        }
    }
}
