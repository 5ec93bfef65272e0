//! [`Watcher`]: a prefix watch that survives disconnects with no gap and no repeat.
//!
//! It remembers the last revision it handed out. When the watch breaks (the store is
//! unreachable, etcd restarted, the embedded store dropped a lagging watcher) it says
//! so ([`Update::Interrupted`], so the caller can show it) and, on the next call,
//! watches again from that revision + 1 after a backoff. If the store has compacted
//! past that revision, it lists the prefix again and hands the caller the whole
//! listing ([`Update::Resync`]): never a silent skip.

use std::time::Duration;

use backon::BackoffBuilder;
use futures_util::StreamExt;
use tracing::{debug, info};

use crate::{Event, EventStream, Range, Revision, SharedStore, StoreError};

/// What [`Watcher::next`] hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The next events, in revision order, each revision whole; all newer than any
    /// handed out before.
    Events(Vec<Event>),
    /// The store no longer had the events since the last revision seen: this is the
    /// whole prefix as of `revision`; replace what you hold with it.
    Resync(Range),
    /// The watch broke; the next call resumes from the last revision seen + 1.
    Interrupted(StoreError),
}

/// A resumable watch of one prefix.
pub struct Watcher {
    store: SharedStore,
    prefix: String,
    last: Revision,
    stream: Option<EventStream>,
    backoff: backon::ExponentialBackoff,
    /// After an interruption, the next watch waits until then (kept until the wait
    /// is over, so a cancelled `next` does not skip it).
    retry_at: Option<tokio::time::Instant>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("prefix", &self.prefix)
            .field("last", &self.last)
            .field("connected", &self.stream.is_some())
            .finish()
    }
}

/// Retry delays: 100 ms doubling to 2 s, each drawn below its cap.
fn backoff() -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_factor(2.0)
        .without_max_times()
        .build()
}

impl Watcher {
    /// Lists `prefix` and watches it from right after the listing.
    pub async fn list(store: SharedStore, prefix: &str) -> Result<(Watcher, Range), StoreError> {
        let range = store.range(prefix).await?;
        let w = Watcher::resume(store, prefix, range.revision);
        Ok((w, range))
    }

    /// Watches `prefix` for what came after revision `last` (a watcher that had seen
    /// everything up to `last`, e.g. before a restart of the store).
    pub fn resume(store: SharedStore, prefix: &str, last: Revision) -> Watcher {
        Watcher {
            store,
            prefix: prefix.to_string(),
            last,
            stream: None,
            backoff: backoff(),
            retry_at: None,
        }
    }

    /// The revision of the last event (or listing) handed out.
    pub fn last_revision(&self) -> Revision {
        self.last
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The next update. Cancel-safe: dropping the future loses nothing that was not
    /// handed out, and does not cut a retry's wait short.
    pub async fn next(&mut self) -> Update {
        loop {
            if self.stream.is_none() {
                if let Some(at) = self.retry_at {
                    tokio::time::sleep_until(at).await;
                    self.retry_at = None;
                }
                match self.store.watch(&self.prefix, self.last + 1).await {
                    Ok(s) => {
                        debug!(prefix = %self.prefix, from = self.last + 1, "watching");
                        self.stream = Some(s);
                        self.backoff = backoff();
                    }
                    Err(StoreError::Compacted { .. }) => return self.resync().await,
                    Err(e) => return self.interrupted(e),
                }
            }
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            match stream.next().await {
                Some(Ok(events)) => {
                    // A store never repeats; this keeps the promise even if one did.
                    let fresh: Vec<Event> = events
                        .into_iter()
                        .filter(|e| e.revision() > self.last)
                        .collect();
                    if let Some(last) = fresh.last() {
                        self.last = last.revision();
                        return Update::Events(fresh);
                    }
                }
                Some(Err(StoreError::Compacted { .. })) => {
                    self.stream = None;
                    return self.resync().await;
                }
                Some(Err(e)) => return self.interrupted(e),
                None => {
                    let store = self.store.describe();
                    return self.interrupted(StoreError::Unavailable {
                        store,
                        message: "the watch ended".into(),
                    });
                }
            }
        }
    }

    fn interrupted(&mut self, e: StoreError) -> Update {
        self.stream = None;
        let d = self.backoff.next().unwrap_or(Duration::from_secs(2));
        // Never less than half the delay: no tight loop against a down store.
        self.retry_at = Some(tokio::time::Instant::now() + d.mul_f64(0.5 + fastrand::f64() / 2.0));
        info!(prefix = %self.prefix, last = self.last, error = %e, "watch interrupted; resuming from the last revision seen");
        Update::Interrupted(e)
    }

    async fn resync(&mut self) -> Update {
        match self.store.range(&self.prefix).await {
            Ok(range) => {
                info!(prefix = %self.prefix, last = self.last, now = range.revision, "the store compacted past this watch: re-listed");
                self.last = range.revision;
                Update::Resync(range)
            }
            Err(e) => self.interrupted(e),
        }
    }
}
