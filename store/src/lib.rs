//! Tributary's store: one small interface, [`Store`], over two backends.
//!
//! - [`embedded::Embedded`]: the default. A `redb` file under the hub's `--state-dir`
//!   (or memory, for tests): a single global revision counter, the keys with their
//!   revision metadata, a bounded event log for watching from a revision, and leases
//!   with deadlines that a task expires.
//! - [`etcd::Etcd`]: the same operations on an etcd v3 cluster, through `etcd-client`.
//!
//! The model is etcd's: every write transaction gets the next store-wide **revision**;
//! every key carries the revision that created it, the one that last changed it, and
//! its version (writes since creation); a **watch** of a prefix from a revision yields
//! every later event in revision order; a **lease** deletes its keys (with delete
//! events) when its TTL runs out without a keep-alive; a **transaction** applies its
//! operations only if every compare holds. On top of the interface, shared by both
//! backends: [`watcher::Watcher`] (resumes after a disconnect from the last revision
//! it saw, with no gap and no repeat, and re-lists when the store compacted past it),
//! [`lease::LeaseKeeper`] and [`election`] (etcd's recipe: the candidate key with the
//! lowest create revision leads).
//!
//! Nothing here knows about meshes: keys are strings, values bytes.

pub mod election;
pub mod embedded;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod lease;
#[cfg(feature = "etcd")]
pub mod testing;
pub mod watcher;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;

/// A store-wide revision: every write transaction gets the next one. 0 means "none".
pub type Revision = i64;
/// A lease id; 0 means "no lease".
pub type LeaseId = i64;

/// One key and its revision metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the write that created the key (since it last did not exist).
    pub create_revision: Revision,
    /// The revision of the last write to it (for a delete event: the deletion's).
    pub mod_revision: Revision,
    /// Writes since creation (1 after the first put; 0 for a delete event).
    pub version: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: LeaseId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch. A delete's `kv` has the key and, as its
/// `mod_revision`, the revision of the deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
}

impl Event {
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// The keys under a prefix, as of `revision`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Range {
    pub kvs: Vec<KeyValue>,
    pub revision: Revision,
}

/// What a compare looks at. A missing key has value "none" (every value compare
/// fails) and revisions and version 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    Value(Vec<u8>),
    ModRevision(Revision),
    CreateRevision(Revision),
    Version(i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub op: CompareOp,
    pub target: CompareTarget,
}

impl Compare {
    pub fn new(key: impl Into<String>, op: CompareOp, target: CompareTarget) -> Self {
        Self {
            key: key.into(),
            op,
            target,
        }
    }
    /// The key's last write was at `rev` (0: the key does not exist).
    pub fn mod_revision(key: impl Into<String>, rev: Revision) -> Self {
        Self::new(key, CompareOp::Equal, CompareTarget::ModRevision(rev))
    }
    /// The key does not exist.
    pub fn absent(key: impl Into<String>) -> Self {
        Self::new(key, CompareOp::Equal, CompareTarget::CreateRevision(0))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    Delete {
        key: String,
    },
    Get {
        key: String,
    },
}

impl TxnOp {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }
    pub fn delete(key: impl Into<String>) -> Self {
        TxnOp::Delete { key: key.into() }
    }
    pub fn get(key: impl Into<String>) -> Self {
        TxnOp::Get { key: key.into() }
    }
}

/// If every compare holds, `success` is applied, else `failure`; atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The store's revision after the transaction (its own, if it wrote anything).
    pub revision: Revision,
    /// One entry per `Get` of the branch that ran, in order.
    pub gets: Vec<Option<KeyValue>>,
}

/// A watch: batches of events in revision order. A batch always holds every event of
/// the revisions it covers (a transaction's events are never split). The stream ends
/// (or yields an error) when the watch breaks: resume from the last revision seen + 1
/// ([`watcher::Watcher`] does that).
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Vec<Event>, StoreError>> + Send>>;

/// Errors of a store operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or did not answer (etcd down, a network
    /// partition, a watch that broke). Retryable: nothing was applied, or the
    /// operation's outcome is unknown (a write may need a read to check).
    #[error("{store}: unavailable: {message}")]
    Unavailable { store: String, message: String },
    /// A watch asked for a revision the store no longer keeps. Re-list, then watch
    /// from the listing's revision + 1.
    #[error(
        "{store}: revision {requested} is compacted (the oldest kept is {compacted}): re-list and watch from there"
    )]
    Compacted {
        store: String,
        requested: Revision,
        compacted: Revision,
    },
    /// The lease expired or was revoked. Not retryable: grant a new one.
    #[error("{store}: lease {lease:x} not found (expired or revoked)")]
    LeaseNotFound { store: String, lease: LeaseId },
    /// A live watcher could not keep up and was dropped (embedded store). Retryable:
    /// resume from the last revision seen + 1.
    #[error("{store}: watch fell behind and was dropped: resume from the last revision seen")]
    Lagged { store: String },
    /// Anything else (a corrupt file, an invalid request). Not retryable.
    #[error("{store}: {message}")]
    Failed { store: String, message: String },
}

impl StoreError {
    /// Whether the same request may succeed later without anyone's action.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable { .. } | StoreError::Lagged { .. }
        )
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The store interface. Object-safe: a hub holds an `Arc<dyn Store>` whichever
/// backend it runs on.
#[async_trait::async_trait]
pub trait Store: fmt::Debug + Send + Sync {
    /// Names the store in errors and logs, e.g. `embedded store /var/lib/tributary/store.redb`
    /// or `etcd http://10.0.0.1:2379`.
    fn describe(&self) -> String;

    /// One key, and the store's revision when it was read.
    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, Revision)>;

    /// Every key starting with `prefix`, in key order, at one revision.
    async fn range(&self, prefix: &str) -> Result<Range>;

    /// Writes `key` (attached to `lease` unless 0); returns the write's revision.
    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision>;

    /// Deletes `key`; returns whether it existed, and the store's revision after.
    async fn delete(&self, key: &str) -> Result<(bool, Revision)>;

    /// Applies a transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnResult>;

    /// Events under `prefix` from revision `from` on (`from` = 0: from now). Fails
    /// with [`StoreError::Compacted`] when `from` is older than the store keeps.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<EventStream>;

    /// Forgets events before `revision` (watching from before it then fails with
    /// `Compacted`). Both backends also compact on their own.
    async fn compact(&self, revision: Revision) -> Result<()>;

    /// Grants a lease that lives `ttl` (whole seconds, at least 1) unless kept alive.
    async fn grant(&self, ttl: Duration) -> Result<LeaseId>;

    /// Renews a lease for its whole TTL; returns the TTL. `LeaseNotFound` once it
    /// expired or was revoked.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration>;

    /// Revokes a lease: its keys are deleted now (with delete events).
    async fn revoke(&self, lease: LeaseId) -> Result<()>;
}

/// A shared store.
pub type SharedStore = Arc<dyn Store>;

/// Whole seconds, at least 1 (etcd's lease unit).
pub(crate) fn ttl_seconds(ttl: Duration) -> i64 {
    (ttl.as_secs_f64().ceil() as i64).max(1)
}
