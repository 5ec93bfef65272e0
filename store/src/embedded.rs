//! The embedded store: a `redb` file (or memory, for tests) in the hub's process.
//!
//! Tables (redb's own typed tables, no file format of ours):
//!
//! | table | key → value |
//! |---|---|
//! | `kv` | key → (create revision, mod revision, version, lease, value) |
//! | `log` | (revision, index in the transaction) → (kind, key, create, mod, version, lease, value): the bounded event log that watches replay |
//! | `meta` | `revision`, `compacted`, `next_lease` → number |
//! | `leases` | lease → TTL in seconds |
//! | `lease_keys` | (lease, key) → (): the keys a lease deletes |
//!
//! Every write runs under one writer mutex, in one redb write transaction that gets
//! the next revision, appends its events to the log, commits, and only then — still
//! under the mutex — hands the events to live watchers. A new watch registers under
//! the same mutex, noting the revision R0 it started at, then replays the log up to
//! R0 and forwards live events (all after R0): no gap, no repeat. A live watcher that
//! falls more than [`WATCH_BUFFER`] batches behind is dropped with
//! [`StoreError::Lagged`] (bounded memory); it resumes from the log.
//!
//! Leases: the TTL is persisted; deadlines are kept in memory and, as etcd does after
//! a leader change, a reopened store gives every lease its whole TTL again (a holder
//! that is still alive has that long to renew it). A task sleeps until the earliest
//! deadline and revokes what expired: one revision per lease, a delete event per key.
//!
//! The log keeps the last `history` revisions (default 10,000); a watch from before
//! that fails with [`StoreError::Compacted`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::{
    Compare, CompareOp, CompareTarget, Event, EventKind, EventStream, KeyValue, LeaseId, Range,
    Result, Revision, Store, StoreError, Txn, TxnOp, TxnResult, ttl_seconds,
};

type KvValue<'a> = (i64, i64, i64, i64, &'a [u8]);
type LogValue<'a> = (u8, &'a str, i64, i64, i64, i64, &'a [u8]);

const KV: TableDefinition<'_, &str, KvValue<'_>> = TableDefinition::new("kv");
const LOG: TableDefinition<'_, (i64, u32), LogValue<'_>> = TableDefinition::new("log");
const META: TableDefinition<'_, &str, i64> = TableDefinition::new("meta");
const LEASES: TableDefinition<'_, i64, i64> = TableDefinition::new("leases");
const LEASE_KEYS: TableDefinition<'_, (i64, &str), ()> = TableDefinition::new("lease_keys");

/// Batches a live watcher may have queued before it is dropped as lagging.
pub const WATCH_BUFFER: usize = 1024;
/// Revisions the event log keeps by default.
pub const DEFAULT_HISTORY: u64 = 10_000;
/// Log entries replayed per read transaction.
const REPLAY_CHUNK: usize = 512;

/// Options of the embedded store.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedConfig {
    /// Revisions of history kept for watches (`--store-history`).
    pub history: u64,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            history: DEFAULT_HISTORY,
        }
    }
}

/// Store files opened in this process, each with the signal its database raises once
/// closed, so that a reopen waits for the previous opening (see [`Embedded::open`]).
static OPEN_FILES: std::sync::LazyLock<Mutex<HashMap<PathBuf, Arc<Closed>>>> =
    std::sync::LazyLock::new(Default::default);

/// Raised when an opening's database has closed.
#[derive(Debug, Default)]
struct Closed {
    done: Mutex<bool>,
    cv: std::sync::Condvar,
}

/// The last field of [`Inner`]: fields drop in order, so this raises [`Closed`] only
/// after the database (and its file lock) is gone.
struct RaiseOnDrop(Arc<Closed>);

impl Drop for RaiseOnDrop {
    fn drop(&mut self) {
        *self.0.done.lock().unwrap() = true;
        self.0.cv.notify_all();
    }
}

/// Longest wait in [`Embedded::open`] for an earlier opening in this process to close.
const REOPEN_WAIT: Duration = Duration::from_secs(5);

/// The embedded store. Cheap to clone; the file closes when the last clone (and every
/// watch still replaying) is dropped.
#[derive(Debug, Clone)]
pub struct Embedded {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    db: Database,
    cfg: EmbeddedConfig,
    /// Serializes writes and watch registration: a commit and the hand-off of its
    /// events to live watchers happen under it, so every watcher sees commit order.
    writer: Mutex<Writer>,
    /// Wakes the lease task when a deadline moved earlier.
    lease_wake: Arc<Notify>,
    /// Keep last: raised once everything above, the database first, has dropped.
    _closed: RaiseOnDrop,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("name", &self.name)
            .finish()
    }
}

struct Writer {
    revision: Revision,
    compacted: Revision,
    next_lease: LeaseId,
    leases: HashMap<LeaseId, LeaseState>,
    watchers: Vec<Live>,
}

struct LeaseState {
    ttl: i64,
    deadline: Instant,
}

struct Live {
    prefix: String,
    tx: mpsc::Sender<Vec<Event>>,
    lagged: Arc<AtomicBool>,
}

fn db_err(name: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Failed {
        store: name.to_string(),
        message: e.to_string(),
    }
}

impl Embedded {
    /// Opens (or creates) the store file at `path`. Needs a tokio runtime (the lease
    /// task). Another process holding the file is an error naming it.
    ///
    /// A store reopened in the same process (a hub restarted in place, tests) waits
    /// for the previous one's last handle to go: its lease task may still hold the
    /// file for a moment after the owner dropped it.
    pub fn open(path: &Path, cfg: EmbeddedConfig) -> Result<Self> {
        let name = format!("embedded store {}", path.display());
        let key = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let previous = OPEN_FILES.lock().unwrap().get(&key).cloned();
        if let Some(previous) = previous {
            let done = previous.done.lock().unwrap();
            let (done, _) = previous
                .cv
                .wait_timeout_while(done, REOPEN_WAIT, |done| !*done)
                .unwrap();
            if !*done {
                return Err(StoreError::Failed {
                    store: name,
                    message: "the file is still open in this process".into(),
                });
            }
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Failed {
                store: name.clone(),
                message: "the file is in use by another process".into(),
            },
            other => db_err(&name, format!("opening: {other}")),
        })?;
        let closed = Arc::new(Closed::default());
        let store = Self::with_db(name, db, cfg, closed.clone())?;
        OPEN_FILES.lock().unwrap().insert(key, closed);
        Ok(store)
    }

    /// A store in memory: for tests, and hubs run without a state dir.
    pub fn in_memory(cfg: EmbeddedConfig) -> Result<Self> {
        let name = "embedded store (in memory)".to_string();
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| db_err(&name, e))?;
        Self::with_db(name, db, cfg, Arc::default())
    }

    fn with_db(
        name: String,
        db: Database,
        cfg: EmbeddedConfig,
        closed: Arc<Closed>,
    ) -> Result<Self> {
        let e = |x: redb::Error| db_err(&name, x);
        let txn = db.begin_write().map_err(|x| e(x.into()))?;
        let (revision, compacted, next_lease, leases) = {
            let mut meta = txn.open_table(META).map_err(|x| e(x.into()))?;
            txn.open_table(KV).map_err(|x| e(x.into()))?;
            txn.open_table(LOG).map_err(|x| e(x.into()))?;
            txn.open_table(LEASE_KEYS).map_err(|x| e(x.into()))?;
            let lt = txn.open_table(LEASES).map_err(|x| e(x.into()))?;
            let get = |m: &redb::Table<'_, &str, i64>, k: &str, d: i64| {
                m.get(k)
                    .map(|v| v.map_or(d, |v| v.value()))
                    .map_err(|x| e(x.into()))
            };
            let revision = get(&meta, "revision", 1)?;
            let compacted = get(&meta, "compacted", 0)?;
            let next_lease = get(&meta, "next_lease", 1)?;
            meta.insert("revision", revision).map_err(|x| e(x.into()))?;
            let now = Instant::now();
            let mut leases = HashMap::new();
            for row in lt.iter().map_err(|x| e(x.into()))? {
                let (id, ttl) = row.map_err(|x| e(x.into()))?;
                let ttl = ttl.value();
                leases.insert(
                    id.value(),
                    LeaseState {
                        ttl,
                        deadline: now + Duration::from_secs(ttl as u64),
                    },
                );
            }
            (revision, compacted, next_lease, leases)
        };
        txn.commit().map_err(|x| e(x.into()))?;
        let lease_wake = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            name,
            db,
            cfg,
            writer: Mutex::new(Writer {
                revision,
                compacted,
                next_lease,
                leases,
                watchers: Vec::new(),
            }),
            lease_wake: lease_wake.clone(),
            _closed: RaiseOnDrop(closed),
        });
        tokio::spawn(expire_leases(Arc::downgrade(&inner), lease_wake));
        Ok(Embedded { inner })
    }

    /// Ends every live watch as if its connection broke (each yields
    /// [`StoreError::Unavailable`]): how tests exercise watch resumption.
    pub fn disconnect_watchers(&self) {
        self.inner.writer.lock().unwrap().watchers.clear();
    }

    /// Runs `f` in a write transaction under the writer lock, on a blocking thread.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut WriteCtx<'_>) -> Result<T, WriteError> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.write_blocking(f))
            .await
            .map_err(|e| db_err(&self.inner.name, format!("write task failed: {e}")))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let txn = inner.db.begin_read().map_err(|e| db_err(&inner.name, e))?;
            f(&txn).map_err(|e| db_err(&inner.name, e))
        })
        .await
        .map_err(|e| db_err(&self.inner.name, format!("read task failed: {e}")))?
    }
}

/// Why a write closure stopped: a storage error, or the store's answer (the
/// transaction is not committed).
enum WriteError {
    Db(redb::Error),
    Store(StoreError),
}

impl<E: Into<redb::Error>> From<E> for WriteError {
    fn from(e: E) -> Self {
        WriteError::Db(e.into())
    }
}

/// A write transaction in progress: its revision (used only if it writes) and events.
struct WriteCtx<'a> {
    txn: &'a WriteTransaction,
    revision: Revision,
    events: Vec<Event>,
    writer: &'a mut Writer,
    name: &'a str,
}

impl WriteCtx<'_> {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, WriteError> {
        let kv = self.txn.open_table(KV)?;
        let found = kv.get(key)?;
        Ok(found.map(|g| decode_kv(key, g.value())))
    }

    fn put(&mut self, key: &str, value: &[u8], lease: LeaseId) -> Result<(), WriteError> {
        if lease != 0 && !self.writer.leases.contains_key(&lease) {
            return Err(WriteError::Store(StoreError::LeaseNotFound {
                store: self.name.to_string(),
                lease,
            }));
        }
        let old = self.get(key)?;
        let rev = self.revision;
        let (create, version) = old
            .as_ref()
            .map_or((rev, 1), |o| (o.create_revision, o.version + 1));
        let mut lk = self.txn.open_table(LEASE_KEYS)?;
        if let Some(o) = &old
            && o.lease != 0
            && o.lease != lease
        {
            lk.remove((o.lease, key))?;
        }
        if lease != 0 {
            lk.insert((lease, key), ())?;
        }
        let mut kv = self.txn.open_table(KV)?;
        kv.insert(key, (create, rev, version, lease, value))?;
        self.events.push(Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: key.to_string(),
                value: value.to_vec(),
                create_revision: create,
                mod_revision: rev,
                version,
                lease,
            },
        });
        Ok(())
    }

    fn delete(&mut self, key: &str) -> Result<bool, WriteError> {
        let old = self.get(key)?;
        let Some(old) = old else { return Ok(false) };
        if old.lease != 0 {
            self.txn.open_table(LEASE_KEYS)?.remove((old.lease, key))?;
        }
        self.txn.open_table(KV)?.remove(key)?;
        self.events.push(Event {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: key.to_string(),
                value: Vec::new(),
                create_revision: 0,
                mod_revision: self.revision,
                version: 0,
                lease: 0,
            },
        });
        Ok(true)
    }

    fn compare(&self, c: &Compare) -> Result<bool, WriteError> {
        let kv = self.get(&c.key)?;
        let ord = match (&c.target, &kv) {
            (CompareTarget::Value(_), None) => return Ok(false),
            (CompareTarget::Value(v), Some(kv)) => kv.value.as_slice().cmp(v.as_slice()),
            (CompareTarget::ModRevision(r), kv) => kv.as_ref().map_or(0, |k| k.mod_revision).cmp(r),
            (CompareTarget::CreateRevision(r), kv) => {
                kv.as_ref().map_or(0, |k| k.create_revision).cmp(r)
            }
            (CompareTarget::Version(v), kv) => kv.as_ref().map_or(0, |k| k.version).cmp(v),
        };
        Ok(match c.op {
            CompareOp::Equal => ord.is_eq(),
            CompareOp::NotEqual => !ord.is_eq(),
            CompareOp::Greater => ord.is_gt(),
            CompareOp::Less => ord.is_lt(),
        })
    }

    /// Revokes `lease`: deletes its keys (events at this revision) and forgets it.
    fn revoke(&mut self, lease: LeaseId) -> Result<bool, WriteError> {
        if self.writer.leases.remove(&lease).is_none() {
            return Ok(false);
        }
        let keys: Vec<String> = {
            let lk = self.txn.open_table(LEASE_KEYS)?;
            let mut keys = Vec::new();
            for row in lk.range((lease, "")..)? {
                let (k, _) = row?;
                let (l, key) = k.value();
                if l != lease {
                    break;
                }
                keys.push(key.to_string());
            }
            keys
        };
        for k in keys {
            self.delete(&k)?;
        }
        self.txn.open_table(LEASES)?.remove(lease)?;
        Ok(true)
    }
}

fn decode_kv(key: &str, (create, m, version, lease, value): KvValue<'_>) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: value.to_vec(),
        create_revision: create,
        mod_revision: m,
        version,
        lease,
    }
}

fn decode_event((kind, key, create, m, version, lease, value): LogValue<'_>) -> Event {
    Event {
        kind: if kind == 0 {
            EventKind::Put
        } else {
            EventKind::Delete
        },
        kv: KeyValue {
            key: key.to_string(),
            value: value.to_vec(),
            create_revision: create,
            mod_revision: m,
            version,
            lease,
        },
    }
}

impl Inner {
    fn write_blocking<T>(
        &self,
        f: impl FnOnce(&mut WriteCtx<'_>) -> Result<T, WriteError>,
    ) -> Result<T> {
        let e = |x: redb::Error| db_err(&self.name, x);
        let mut w = self.writer.lock().unwrap();
        let txn = self.db.begin_write().map_err(|x| e(x.into()))?;
        let revision = w.revision + 1;
        let mut ctx = WriteCtx {
            txn: &txn,
            revision,
            events: Vec::new(),
            writer: &mut w,
            name: &self.name,
        };
        let out = match f(&mut ctx) {
            Ok(out) => out,
            Err(WriteError::Db(x)) => return Err(e(x)),
            Err(WriteError::Store(s)) => return Err(s),
        };
        let events = std::mem::take(&mut ctx.events);
        drop(ctx);
        let mut compact_to = None;
        if !events.is_empty() {
            let mut log = txn.open_table(LOG).map_err(|x| e(x.into()))?;
            for (i, ev) in events.iter().enumerate() {
                let kind = match ev.kind {
                    EventKind::Put => 0u8,
                    EventKind::Delete => 1u8,
                };
                let kv = &ev.kv;
                log.insert(
                    (revision, i as u32),
                    (
                        kind,
                        kv.key.as_str(),
                        kv.create_revision,
                        kv.mod_revision,
                        kv.version,
                        kv.lease,
                        kv.value.as_slice(),
                    ),
                )
                .map_err(|x| e(x.into()))?;
            }
            let history = self.cfg.history as i64;
            // Compact in steps of a tenth of the history, not on every write.
            if revision - w.compacted.max(1) > history + history / 10 {
                compact_to = Some(revision - history);
            }
            drop(log);
            let mut meta = txn.open_table(META).map_err(|x| e(x.into()))?;
            meta.insert("revision", revision).map_err(|x| e(x.into()))?;
            if let Some(c) = compact_to {
                meta.insert("compacted", c).map_err(|x| e(x.into()))?;
                drop(meta);
                compact_log(&txn, c).map_err(e)?;
            }
        }
        txn.commit().map_err(|x| e(x.into()))?;
        if let Some(c) = compact_to {
            w.compacted = c;
        }
        if !events.is_empty() {
            w.revision = revision;
            broadcast(&mut w.watchers, &events);
        }
        Ok(out)
    }
}

/// Removes log entries before revision `c`.
fn compact_log(txn: &WriteTransaction, c: Revision) -> Result<(), redb::Error> {
    let mut log = txn.open_table(LOG)?;
    log.retain_in(..(c, 0u32), |_, _| false)?;
    Ok(())
}

/// Hands a commit's events to every live watcher whose prefix they match; a watcher
/// whose buffer is full is dropped (it resumes from the log).
fn broadcast(watchers: &mut Vec<Live>, events: &[Event]) {
    watchers.retain(|w| {
        let mine: Vec<Event> = events
            .iter()
            .filter(|e| e.kv.key.starts_with(&w.prefix))
            .cloned()
            .collect();
        if mine.is_empty() {
            return !w.tx.is_closed();
        }
        match w.tx.try_send(mine) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                w.lagged.store(true, Ordering::Release);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    });
}

/// Sleeps until the earliest lease deadline (or a wake-up) and revokes what expired.
async fn expire_leases(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(inner) = inner.upgrade() else { return };
            let w = inner.writer.lock().unwrap();
            w.leases.values().map(|l| l.deadline).min()
        };
        let notified = wake.notified();
        match next {
            // Bounded sleep: the task notices a dropped store within a second.
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.min(Instant::now() + Duration::from_secs(1))) => {}
                    _ = notified => {}
                }
            }
            None => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = notified => {}
                }
            }
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        let due: Vec<LeaseId> = {
            let w = strong.writer.lock().unwrap();
            w.leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect()
        };
        for id in due {
            let s = strong.clone();
            let r = tokio::task::spawn_blocking(move || {
                s.write_blocking(|ctx| {
                    // Renewed meanwhile: keep it.
                    if ctx.writer.leases.get(&id).is_some_and(|l| l.deadline > now) {
                        return Ok(false);
                    }
                    ctx.revoke(id)
                })
            })
            .await;
            match r {
                Ok(Ok(true)) => {
                    debug!(store = %strong.name, lease = format!("{id:x}"), "lease expired")
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => warn!(error = %e, "expiring a lease"),
                Err(e) => warn!(error = %e, "expiring a lease"),
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for Embedded {
    fn describe(&self) -> String {
        self.inner.name.clone()
    }

    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, Revision)> {
        let key = key.to_string();
        self.read(move |txn| {
            let kv = txn.open_table(KV)?;
            let meta = txn.open_table(META)?;
            let rev = meta.get("revision")?.map_or(1, |v| v.value());
            let found = kv.get(key.as_str())?.map(|g| decode_kv(&key, g.value()));
            Ok((found, rev))
        })
        .await
    }

    async fn range(&self, prefix: &str) -> Result<Range> {
        let prefix = prefix.to_string();
        self.read(move |txn| {
            let kv = txn.open_table(KV)?;
            let meta = txn.open_table(META)?;
            let revision = meta.get("revision")?.map_or(1, |v| v.value());
            let mut kvs = Vec::new();
            for row in kv.range(prefix.as_str()..)? {
                let (k, v) = row?;
                let k = k.value();
                if !k.starts_with(prefix.as_str()) {
                    break;
                }
                kvs.push(decode_kv(k, v.value()));
            }
            Ok(Range { kvs, revision })
        })
        .await
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision> {
        let key = key.to_string();
        self.write(move |ctx| {
            ctx.put(&key, &value, lease)?;
            Ok(ctx.revision)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(bool, Revision)> {
        let key = key.to_string();
        self.write(move |ctx| {
            let existed = ctx.delete(&key)?;
            Ok((
                existed,
                if existed {
                    ctx.revision
                } else {
                    ctx.revision - 1
                },
            ))
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        self.write(move |ctx| {
            let mut ok = true;
            for c in &txn.compares {
                if !ctx.compare(c)? {
                    ok = false;
                    break;
                }
            }
            let ops = if ok { &txn.success } else { &txn.failure };
            let mut gets = Vec::new();
            for op in ops {
                match op {
                    TxnOp::Put { key, value, lease } => ctx.put(key, value, *lease)?,
                    TxnOp::Delete { key } => {
                        ctx.delete(key)?;
                    }
                    TxnOp::Get { key } => gets.push(ctx.get(key)?),
                }
            }
            let revision = if ctx.events.is_empty() {
                ctx.revision - 1
            } else {
                ctx.revision
            };
            Ok(TxnResult {
                succeeded: ok,
                revision,
                gets,
            })
        })
        .await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<EventStream> {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let lagged = Arc::new(AtomicBool::new(false));
        let start = {
            let mut w = self.inner.writer.lock().unwrap();
            if from != 0 && from < w.compacted {
                return Err(StoreError::Compacted {
                    store: self.inner.name.clone(),
                    requested: from,
                    compacted: w.compacted,
                });
            }
            w.watchers.push(Live {
                prefix: prefix.to_string(),
                tx,
                lagged: lagged.clone(),
            });
            w.revision
        };
        let (out_tx, out_rx) = mpsc::channel::<Result<Vec<Event>>>(16);
        let inner = self.inner.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let name = inner.name.clone();
            if from != 0 && from <= start {
                let mut next = from;
                while next <= start {
                    let (i, p) = (inner.clone(), prefix.clone());
                    let chunk =
                        tokio::task::spawn_blocking(move || replay_chunk(&i, &p, next, start))
                            .await
                            .unwrap_or_else(|e| Err(db_err(&name, e)));
                    match chunk {
                        Ok((events, after)) => {
                            next = after;
                            if !events.is_empty() && out_tx.send(Ok(events)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = out_tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
            }
            drop(inner);
            let mut rx = rx;
            loop {
                tokio::select! {
                    batch = rx.recv() => match batch {
                        Some(b) => {
                            if out_tx.send(Ok(b)).await.is_err() {
                                return;
                            }
                        }
                        None => {
                            let e = if lagged.load(Ordering::Acquire) {
                                StoreError::Lagged { store: name }
                            } else {
                                StoreError::Unavailable {
                                    store: name,
                                    message: "the watch was disconnected".into(),
                                }
                            };
                            let _ = out_tx.send(Err(e)).await;
                            return;
                        }
                    },
                    () = out_tx.closed() => return,
                }
            }
        });
        Ok(Box::pin(tokio_stream_from(out_rx)))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.write(move |ctx| {
            let c = revision.min(ctx.writer.revision);
            if c > ctx.writer.compacted {
                ctx.txn.open_table(META)?.insert("compacted", c)?;
                compact_log(ctx.txn, c)?;
                ctx.writer.compacted = c;
            }
            Ok(())
        })
        .await
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl = ttl_seconds(ttl);
        let id = self
            .write(move |ctx| {
                let id = ctx.writer.next_lease;
                ctx.writer.next_lease += 1;
                ctx.txn.open_table(META)?.insert("next_lease", id + 1)?;
                ctx.txn.open_table(LEASES)?.insert(id, ttl)?;
                ctx.writer.leases.insert(
                    id,
                    LeaseState {
                        ttl,
                        deadline: Instant::now() + Duration::from_secs(ttl as u64),
                    },
                );
                Ok(id)
            })
            .await?;
        self.inner.lease_wake.notify_one();
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let mut w = self.inner.writer.lock().unwrap();
        match w.leases.get_mut(&lease) {
            Some(l) => {
                let ttl = Duration::from_secs(l.ttl as u64);
                l.deadline = Instant::now() + ttl;
                Ok(ttl)
            }
            None => Err(StoreError::LeaseNotFound {
                store: self.inner.name.clone(),
                lease,
            }),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        let name = self.inner.name.clone();
        self.write(move |ctx| {
            if ctx.revoke(lease)? {
                Ok(())
            } else {
                Err(WriteError::Store(StoreError::LeaseNotFound {
                    store: name,
                    lease,
                }))
            }
        })
        .await
    }
}

/// Log events under `prefix` from revision `from` to `to` (inclusive), at most about
/// [`REPLAY_CHUNK`] of them, whole revisions only; and the next revision to read.
fn replay_chunk(
    inner: &Inner,
    prefix: &str,
    from: Revision,
    to: Revision,
) -> Result<(Vec<Event>, Revision)> {
    let e = |x: redb::Error| db_err(&inner.name, x);
    let txn = inner.db.begin_read().map_err(|x| e(x.into()))?;
    let meta = txn.open_table(META).map_err(|x| e(x.into()))?;
    let compacted = meta
        .get("compacted")
        .map_err(|x| e(x.into()))?
        .map_or(0, |v| v.value());
    if from < compacted {
        return Err(StoreError::Compacted {
            store: inner.name.clone(),
            requested: from,
            compacted,
        });
    }
    let log = txn.open_table(LOG).map_err(|x| e(x.into()))?;
    let mut events = Vec::new();
    let mut last_rev = from;
    let mut next = to + 1;
    let rows = log
        .range((from, 0u32)..=(to, u32::MAX))
        .map_err(|x| e(x.into()))?;
    for (scanned, row) in rows.enumerate() {
        let (k, v) = row.map_err(|x| e(x.into()))?;
        let (rev, _) = k.value();
        if scanned >= REPLAY_CHUNK && rev != last_rev {
            next = rev;
            break;
        }
        last_rev = rev;
        let ev = decode_event(v.value());
        if ev.kv.key.starts_with(prefix) {
            events.push(ev);
        }
    }
    Ok((events, next))
}

/// A stream over an mpsc receiver.
fn tokio_stream_from<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
}

/// Where a hub's embedded store lives inside its state dir.
pub fn file_in(dir: &Path) -> PathBuf {
    dir.join("store.redb")
}
