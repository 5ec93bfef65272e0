//! [`LeaseKeeper`]: a lease kept alive by a task until it is revoked or dropped.
//!
//! The task renews the lease every third of its TTL. A renewal that fails because
//! the store is unreachable is retried every half second; once the store says the
//! lease is gone, or a whole TTL passed without a successful renewal, the keeper
//! reports the lease **lost** ([`LeaseKeeper::lost`]) and stops: whatever was attached
//! to it (a replica's registration, a candidate's election key) must be recreated
//! under a new lease. Dropping the keeper stops the renewals (the lease then expires
//! after its TTL, as after a crash); [`LeaseKeeper::revoke`] ends it at once.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::{LeaseId, Result, SharedStore, StoreError};

#[derive(Debug)]
pub struct LeaseKeeper {
    store: SharedStore,
    id: LeaseId,
    ttl: Duration,
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// Grants a lease of `ttl` and starts keeping it alive.
    pub async fn grant(store: SharedStore, ttl: Duration) -> Result<LeaseKeeper> {
        let id = store.grant(ttl).await?;
        Ok(Self::keep(store, id, ttl))
    }

    /// Keeps an existing lease alive.
    pub fn keep(store: SharedStore, id: LeaseId, ttl: Duration) -> LeaseKeeper {
        let (tx, lost) = watch::channel(false);
        let task = tokio::spawn(renew(store.clone(), id, ttl, tx));
        LeaseKeeper {
            store,
            id,
            ttl,
            lost,
            task,
        }
    }

    pub fn id(&self) -> LeaseId {
        self.id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Turns true once the lease is gone (expired, revoked, or not renewed for a TTL).
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Stops renewing and revokes the lease: its keys are deleted now.
    pub async fn revoke(self) -> Result<()> {
        self.task.abort();
        match self.store.revoke(self.id).await {
            Ok(()) | Err(StoreError::LeaseNotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn renew(store: SharedStore, id: LeaseId, ttl: Duration, lost: watch::Sender<bool>) {
    let period = ttl / 3;
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(period).await;
        loop {
            match store.keep_alive(id).await {
                Ok(_) => {
                    last_ok = Instant::now();
                    break;
                }
                Err(StoreError::LeaseNotFound { .. }) => {
                    warn!(lease = format!("{id:x}"), store = %store.describe(), "lease lost: it expired or was revoked");
                    let _ = lost.send(true);
                    return;
                }
                Err(e) => {
                    if last_ok.elapsed() >= ttl {
                        warn!(lease = format!("{id:x}"), error = %e, "lease lost: not renewed for its whole TTL");
                        let _ = lost.send(true);
                        return;
                    }
                    info!(lease = format!("{id:x}"), error = %e, "renewing a lease failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}
