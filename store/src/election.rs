//! Leader election on top of [`Store`](crate::Store), etcd's recipe, for both backends.
//!
//! Each candidate writes a key under the election's prefix, named after its lease
//! (`{prefix}{lease:016x}`) and attached to it. The candidate whose key has the
//! lowest create revision leads. Every other candidate waits for the deletion of the
//! key created just before its own (not the leader's: no herd when the leader goes),
//! then looks again. A candidate that dies stops renewing its lease; when the lease
//! expires its key is deleted and the next candidate takes over. Observers watch the
//! prefix and see who leads ([`observe`]).

use std::collections::BTreeMap;

use tokio::sync::watch;

use crate::watcher::{Update, Watcher};
use crate::{
    Compare, EventKind, KeyValue, LeaseId, Result, Revision, SharedStore, StoreError, Txn, TxnOp,
};

/// The key a candidate holding `lease` campaigns with.
pub fn candidate_key(prefix: &str, lease: LeaseId) -> String {
    format!("{prefix}{lease:016x}")
}

/// This candidate leads (until its lease is lost or it resigns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    pub key: String,
    pub create_revision: Revision,
}

/// Campaigns under `prefix` with `lease`, announcing `value`; returns once this
/// candidate leads. Cancel by dropping the future (the key stays until
/// [`resign`] or the lease ends). Fails if the candidate's key disappears (its lease
/// expired) or the store fails for good; waits through outages.
pub async fn campaign(
    store: &SharedStore,
    prefix: &str,
    lease: LeaseId,
    value: Vec<u8>,
) -> Result<Leadership> {
    let key = candidate_key(prefix, lease);
    let txn = Txn {
        compares: vec![Compare::absent(key.clone())],
        success: vec![TxnOp::Put {
            key: key.clone(),
            value: value.clone(),
            lease,
        }],
        failure: vec![TxnOp::get(key.clone())],
    };
    let r = store.txn(txn).await?;
    if !r.succeeded
        && let Some(Some(kv)) = r.gets.first()
        && kv.value != value
    {
        // Already a candidate (a retried campaign): keep the create revision, update
        // what it announces.
        store.put(&key, value, lease).await?;
    }
    loop {
        let range = store.range(prefix).await?;
        let Some(mine) = range.kvs.iter().find(|k| k.key == key) else {
            return Err(StoreError::Failed {
                store: store.describe(),
                message: format!(
                    "the election key {key} is gone (lease {lease:x} expired or was revoked)"
                ),
            });
        };
        let before = range
            .kvs
            .iter()
            .filter(|k| k.create_revision < mine.create_revision)
            .max_by_key(|k| k.create_revision);
        match before {
            None => {
                return Ok(Leadership {
                    key,
                    create_revision: mine.create_revision,
                });
            }
            Some(b) => wait_deleted(store, &b.key, range.revision).await?,
        }
    }
}

/// Waits until `key` (which existed at revision `seen`) is deleted.
async fn wait_deleted(store: &SharedStore, key: &str, seen: Revision) -> Result<()> {
    let mut w = Watcher::resume(store.clone(), key, seen);
    loop {
        match w.next().await {
            Update::Events(events) => {
                if events
                    .iter()
                    .any(|e| e.kind == EventKind::Delete && e.kv.key == key)
                {
                    return Ok(());
                }
            }
            Update::Resync(range) => {
                if !range.kvs.iter().any(|k| k.key == key) {
                    return Ok(());
                }
            }
            Update::Interrupted(e) if e.is_retryable() => {}
            Update::Interrupted(e) => return Err(e),
        }
    }
}

/// Gives up leadership (or candidacy): deletes the candidate's key.
pub async fn resign(store: &SharedStore, prefix: &str, lease: LeaseId) -> Result<()> {
    store
        .delete(&candidate_key(prefix, lease))
        .await
        .map(|_| ())
}

/// Who leads now: the candidate key with the lowest create revision.
pub async fn leader(store: &SharedStore, prefix: &str) -> Result<Option<KeyValue>> {
    let range = store.range(prefix).await?;
    Ok(range.kvs.into_iter().min_by_key(|k| k.create_revision))
}

/// Watches who leads under `prefix`: the receiver holds the leader's key (with the
/// value it announced), `None` while nobody does. During a store outage it keeps the
/// last value it knew. The watching task ends when every receiver is dropped.
pub async fn observe(
    store: SharedStore,
    prefix: &str,
) -> Result<watch::Receiver<Option<KeyValue>>> {
    let (mut w, range) = Watcher::list(store, prefix).await?;
    let mut candidates: BTreeMap<String, KeyValue> =
        range.kvs.into_iter().map(|k| (k.key.clone(), k)).collect();
    let lead =
        |c: &BTreeMap<String, KeyValue>| c.values().min_by_key(|k| k.create_revision).cloned();
    let (tx, rx) = watch::channel(lead(&candidates));
    tokio::spawn(async move {
        loop {
            let update = tokio::select! {
                u = w.next() => u,
                () = tx.closed() => return,
            };
            match update {
                Update::Events(events) => {
                    for e in events {
                        match e.kind {
                            EventKind::Put => {
                                candidates.insert(e.kv.key.clone(), e.kv);
                            }
                            EventKind::Delete => {
                                candidates.remove(&e.kv.key);
                            }
                        }
                    }
                }
                Update::Resync(range) => {
                    candidates = range.kvs.into_iter().map(|k| (k.key.clone(), k)).collect();
                }
                Update::Interrupted(_) => continue,
            }
            let now = lead(&candidates);
            tx.send_if_modified(|cur| {
                let changed = *cur != now;
                *cur = now;
                changed
            });
        }
    });
    Ok(rx)
}
