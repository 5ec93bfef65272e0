//! Config in the store: the same Kubernetes-style YAML documents the file source
//! reads, one object per key, written through the admin API and watched by hubs.
//!
//! Keys: `/tributary/config/{environment}/{Kind}/{namespace}/{name}`, each holding
//! one YAML document (an `Environment` lives at `/tributary/config/{name}/Environment/default/{name}`).
//! `/tributary/config-revision` guards writers: every apply or delete compares its
//! mod revision with the one read, so two concurrent writers never both succeed on a
//! stale view (the loser re-reads, re-validates and retries).
//!
//! An apply is validated with exactly the files' validation: [`parse_files`] over
//! every stored document, the applied ones replacing theirs, each named by its key
//! (so an error names the object and the field). Then it is written in one
//! transaction: all of it or nothing. A delete is validated the same way (deleting a
//! Service a Route still uses is refused, naming the Route's field).
//!
//! [`StoreSource`] is the hub side: it watches the prefix ([`Watcher`]: resumes after
//! an outage from the last revision it saw) and hands each new valid [`Mesh`] to the
//! index exactly as the file source does; while the store is unreachable the last
//! good config stays in force.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};
use tributary_store::watcher::{Update, Watcher};
use tributary_store::{Compare, EventKind, SharedStore, StoreError, Txn, TxnOp};

use super::watch::ConfigStatus;
use super::{
    ConfigError, ConfigErrors, DEFAULT_ENVIRONMENT, DEFAULT_NAMESPACE, check_yaml_size, parse_files,
};
use crate::metrics::Metrics;
use crate::model::Mesh;

pub const CONFIG_PREFIX: &str = "/tributary/config/";
/// Bumped by every config write; writers compare it (see the module docs).
pub const CONFIG_GUARD: &str = "/tributary/config-revision";
/// How often a write is tried when other hubs' writers keep winning the race; each
/// retry waits a jittered 10–100 ms first.
const MAX_ATTEMPTS: usize = 10;

/// `(environment, kind, namespace, name)` of one config object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ObjectId {
    pub environment: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectId {
    pub fn key(&self) -> String {
        format!(
            "{CONFIG_PREFIX}{}/{}/{}/{}",
            self.environment, self.kind, self.namespace, self.name
        )
    }

    /// The id of a stored key, if it is one.
    pub fn from_key(key: &str) -> Option<ObjectId> {
        let rest = key.strip_prefix(CONFIG_PREFIX)?;
        let mut parts = rest.split('/');
        let id = ObjectId {
            environment: parts.next()?.to_string(),
            kind: parts.next()?.to_string(),
            namespace: parts.next()?.to_string(),
            name: parts.next()?.to_string(),
        };
        parts.next().is_none().then_some(id)
    }
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}/{}/{}",
            self.kind, self.environment, self.namespace, self.name
        )
    }
}

/// One stored object.
#[derive(Debug, Clone, Serialize)]
pub struct StoredObject {
    #[serde(flatten)]
    pub id: ObjectId,
    pub key: String,
    pub mod_revision: i64,
    /// The YAML document.
    pub document: String,
}

/// What an apply or delete did (or, for a dry run, would do) to one object.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    #[serde(flatten)]
    pub id: ObjectId,
    /// `created`, `configured`, `unchanged` or `deleted`.
    pub action: &'static str,
    /// The stored document before, if any.
    pub before: Option<String>,
    /// The document after, if any.
    pub after: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WriteResult {
    pub dry_run: bool,
    /// The store's revision after the write (or when read, for a dry run).
    pub revision: i64,
    pub changes: Vec<Change>,
}

/// Why a config write was refused. Only `Store` errors that are retryable and
/// `Conflict` may succeed when sent again unchanged.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The config would be invalid; nothing was written.
    #[error(transparent)]
    Invalid(#[from] ConfigErrors),
    #[error("{0}: nothing was written")]
    Store(#[from] StoreError),
    #[error(
        "other writers changed the config {attempts} times while this write was validated; nothing was written, try again"
    )]
    Conflict { attempts: usize },
    #[error("{0} does not exist")]
    NotFound(ObjectId),
}

/// Reads the identity of one document as the parser would; `None` when the document
/// is not a mapping with a kind and a name (the parser then says what is wrong).
fn identify(value: &serde_yaml::Value) -> Option<ObjectId> {
    let kind = value.get("kind")?.as_str()?.to_string();
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str()?.to_string();
    let field = |f: &str, default: &str| -> Option<String> {
        match meta.get(f) {
            None => Some(default.to_string()),
            Some(v) => v.as_str().map(str::to_string),
        }
    };
    let namespace = field("namespace", DEFAULT_NAMESPACE)?;
    let environment = if kind == "Environment" {
        name.clone()
    } else if super::security::is_mesh_kind(&kind) {
        super::security::MESH_SCOPE.to_string()
    } else {
        field("environment", DEFAULT_ENVIRONMENT)?
    };
    // The parts become a key: they must be names (the parser checks them the same way).
    for part in [&kind, &name, &namespace, &environment] {
        if part.is_empty() || part.contains('/') {
            return None;
        }
    }
    Some(ObjectId {
        environment,
        kind,
        namespace,
        name,
    })
}

/// Splits a request body into its documents, each identified and re-serialized.
/// Errors name the request document (the parser's own messages).
pub fn split_documents(body: &str) -> Result<Vec<(ObjectId, String)>, ConfigErrors> {
    const FILE: &str = "request";
    if let Err((number, message)) = check_yaml_size(body) {
        return Err(ConfigErrors(vec![ConfigError {
            file: FILE.into(),
            document: format!("document {number}"),
            field: String::new(),
            message,
        }]));
    }
    let mut out: Vec<(ObjectId, String)> = Vec::new();
    let mut errors = Vec::new();
    for (index, de) in serde_yaml::Deserializer::from_str(body).enumerate() {
        use serde::Deserialize;
        let value = match serde_yaml::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                errors.push(ConfigError {
                    file: FILE.into(),
                    document: format!("document {}", index + 1),
                    field: String::new(),
                    message: format!("invalid YAML: {e}"),
                });
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        let Some(id) = identify(&value) else {
            // The parser names what is missing or wrong.
            let text = serde_yaml::to_string(&value).unwrap_or_default();
            match parse_files([(FILE, text.as_str())]) {
                Err(ConfigErrors(mut e)) => {
                    for err in &mut e {
                        err.document = err.document.replacen(
                            "document 1",
                            &format!("document {}", index + 1),
                            1,
                        );
                    }
                    errors.extend(e);
                }
                Ok(_) => errors.push(ConfigError {
                    file: FILE.into(),
                    document: format!("document {}", index + 1),
                    field: "metadata".into(),
                    message: "expected kind, metadata.name, and string metadata fields".into(),
                }),
            }
            continue;
        };
        if let Some((first, _)) = out.iter().find(|(o, _)| *o == id) {
            errors.push(ConfigError {
                file: FILE.into(),
                document: format!("document {} ({id})", index + 1),
                field: "metadata.name".into(),
                message: format!("{first} is applied twice in one request"),
            });
            continue;
        }
        let text = match serde_yaml::to_string(&value) {
            Ok(t) => t,
            Err(e) => {
                errors.push(ConfigError {
                    file: FILE.into(),
                    document: format!("document {} ({id})", index + 1),
                    field: String::new(),
                    message: e.to_string(),
                });
                continue;
            }
        };
        out.push((id, text));
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Parses stored documents (key → document) into a mesh, with the files' validation.
pub fn parse_stored(docs: &BTreeMap<String, String>) -> Result<Mesh, ConfigErrors> {
    parse_files(docs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

/// Config writes and reads against the store.
#[derive(Debug, Clone)]
pub struct ConfigStore {
    store: SharedStore,
    /// Writers through this hub queue here instead of racing each other; writers
    /// through other hubs are ordered by the guard's compare.
    writer: Arc<tokio::sync::Mutex<()>>,
}

/// The stored config as read at one revision.
struct Current {
    docs: BTreeMap<String, (String, i64)>,
    guard_revision: i64,
    revision: i64,
}

impl ConfigStore {
    pub fn new(store: SharedStore) -> Self {
        Self {
            store,
            writer: Arc::default(),
        }
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    async fn current(&self) -> Result<Current, StoreError> {
        let txn = self
            .store
            .txn(Txn {
                success: vec![TxnOp::get(CONFIG_GUARD)],
                ..Default::default()
            })
            .await?;
        let guard_revision = txn.gets[0].as_ref().map_or(0, |k| k.mod_revision);
        let range = self.store.range(CONFIG_PREFIX).await?;
        // The guard is read first: if anything was written since, the guard moved
        // too and the write's compare fails.
        let docs = range
            .kvs
            .into_iter()
            .map(|kv| {
                (
                    kv.key,
                    (
                        String::from_utf8_lossy(&kv.value).into_owned(),
                        kv.mod_revision,
                    ),
                )
            })
            .collect();
        Ok(Current {
            docs,
            guard_revision,
            revision: range.revision,
        })
    }

    /// Every stored object, optionally of one kind / environment / name.
    pub async fn list(
        &self,
        kind: Option<&str>,
        environment: Option<&str>,
        name: Option<&str>,
    ) -> Result<(Vec<StoredObject>, i64), StoreError> {
        let range = self.store.range(CONFIG_PREFIX).await?;
        let objects = range
            .kvs
            .into_iter()
            .filter_map(|kv| {
                let id = ObjectId::from_key(&kv.key)?;
                let keep = kind.is_none_or(|k| k.eq_ignore_ascii_case(&id.kind))
                    && environment.is_none_or(|e| e == id.environment)
                    && name.is_none_or(|n| n == id.name);
                keep.then(|| StoredObject {
                    id,
                    key: kv.key,
                    mod_revision: kv.mod_revision,
                    document: String::from_utf8_lossy(&kv.value).into_owned(),
                })
            })
            .collect();
        Ok((objects, range.revision))
    }

    /// Applies a multi-document YAML body: validated with the stored config, written
    /// in one transaction (or, with `dry_run`, only validated and compared).
    pub async fn apply(&self, body: &str, dry_run: bool) -> Result<WriteResult, WriteError> {
        let docs = split_documents(body)?;
        self.write(dry_run, |current| {
            let mut changes = Vec::new();
            for (id, text) in &docs {
                let key = id.key();
                let before = current.get(&key).cloned();
                let action = match &before {
                    None => "created",
                    Some(b) if b == text => "unchanged",
                    Some(_) => "configured",
                };
                current.insert(key, text.clone());
                changes.push(Change {
                    id: id.clone(),
                    action,
                    before,
                    after: Some(text.clone()),
                });
            }
            Ok(changes)
        })
        .await
    }

    /// Deletes objects (validated: what remains must still be a valid config).
    pub async fn delete(&self, ids: &[ObjectId], dry_run: bool) -> Result<WriteResult, WriteError> {
        self.write(dry_run, |current| {
            let mut changes = Vec::new();
            for id in ids {
                match current.remove(&id.key()) {
                    Some(before) => changes.push(Change {
                        id: id.clone(),
                        action: "deleted",
                        before: Some(before),
                        after: None,
                    }),
                    None => return Err(WriteError::NotFound(id.clone())),
                }
            }
            Ok(changes)
        })
        .await
    }

    /// Reads, edits (`edit` changes the key → document map), validates, and writes
    /// in one transaction guarded by what was read; retries when another writer won.
    async fn write(
        &self,
        dry_run: bool,
        edit: impl Fn(&mut BTreeMap<String, String>) -> Result<Vec<Change>, WriteError>,
    ) -> Result<WriteResult, WriteError> {
        let _queued = if dry_run {
            None
        } else {
            Some(self.writer.lock().await)
        };
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                let ms = 10 + fastrand::u64(..90);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let current = self.current().await?;
            let mut docs: BTreeMap<String, String> = current
                .docs
                .iter()
                .map(|(k, (v, _))| (k.clone(), v.clone()))
                .collect();
            let changes = edit(&mut docs)?;
            let parsed = {
                let docs = docs.clone();
                tokio::task::spawn_blocking(move || parse_stored(&docs))
                    .await
                    .map_err(|e| {
                        WriteError::Invalid(ConfigErrors(vec![ConfigError {
                            file: "request".into(),
                            document: String::new(),
                            field: String::new(),
                            message: format!("validating the config panicked: {e}"),
                        }]))
                    })?
            };
            parsed?;
            let writes: Vec<&Change> = changes.iter().filter(|c| c.action != "unchanged").collect();
            if dry_run || writes.is_empty() {
                return Ok(WriteResult {
                    dry_run,
                    revision: current.revision,
                    changes,
                });
            }
            let mut compares = vec![Compare::mod_revision(CONFIG_GUARD, current.guard_revision)];
            let mut ops = Vec::new();
            for c in &writes {
                let key = c.id.key();
                let read = current.docs.get(&key).map_or(0, |(_, rev)| *rev);
                compares.push(Compare::mod_revision(key.clone(), read));
                ops.push(match &c.after {
                    Some(doc) => TxnOp::put(key, doc.clone()),
                    None => TxnOp::delete(key),
                });
            }
            ops.push(TxnOp::put(CONFIG_GUARD, current.revision.to_string()));
            let r = self
                .store
                .txn(Txn {
                    compares,
                    success: ops,
                    failure: vec![],
                })
                .await?;
            if r.succeeded {
                info!(
                    revision = r.revision,
                    objects = writes.len(),
                    "config written to the store"
                );
                return Ok(WriteResult {
                    dry_run,
                    revision: r.revision,
                    changes,
                });
            }
        }
        Err(WriteError::Conflict {
            attempts: MAX_ATTEMPTS,
        })
    }
}

/// Where a hub's config comes from, as `/status/config` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreSourceStatus {
    /// The store watched.
    pub store: String,
    /// The last store revision applied (the watch resumes after it).
    pub revision: i64,
    pub connected: bool,
    /// Why the watch is interrupted, while it is.
    pub error: Option<String>,
    pub interruptions: u64,
}

/// The hub's store config source: watches the config prefix and publishes each new
/// valid mesh.
#[derive(Debug)]
pub struct StoreSource {
    store: SharedStore,
    status: Arc<Mutex<ConfigStatus>>,
    metrics: Arc<Metrics>,
    /// Collect a burst of changes this long before parsing.
    debounce: Duration,
}

impl StoreSource {
    pub fn new(store: SharedStore, debounce: Duration, metrics: Arc<Metrics>) -> Self {
        let status = ConfigStatus {
            paths: vec![format!("{} {CONFIG_PREFIX}", store.describe())],
            ..Default::default()
        };
        Self {
            store,
            status: Arc::new(Mutex::new(status)),
            metrics,
            debounce,
        }
    }

    pub fn status(&self) -> Arc<Mutex<ConfigStatus>> {
        self.status.clone()
    }

    /// Lists the config for start-up. An invalid stored config (only possible when
    /// someone wrote the keys directly) is an error here.
    pub async fn initial(
        &self,
    ) -> Result<(Watcher, BTreeMap<String, String>, Mesh), anyhow::Error> {
        let (w, range) = Watcher::list(self.store.clone(), CONFIG_PREFIX).await?;
        let docs: BTreeMap<String, String> = range
            .kvs
            .into_iter()
            .map(|kv| (kv.key, String::from_utf8_lossy(&kv.value).into_owned()))
            .collect();
        let mesh = parse_stored(&docs)?;
        self.record(Ok(range.revision), docs.keys().cloned().collect());
        Ok((w, docs, mesh))
    }

    fn record(&self, result: Result<i64, Vec<String>>, files: Vec<String>) {
        let mut s = self.status.lock().unwrap();
        match result {
            Ok(revision) => {
                self.metrics.config_reloads.inc();
                s.files = files;
                s.applied_generation += 1;
                s.last_errors.clear();
                s.last_applied_unix = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs());
                let st = s.store.get_or_insert_with(Default::default);
                st.revision = revision;
            }
            Err(errors) => {
                self.metrics.config_reload_errors.inc();
                s.last_errors = errors;
            }
        }
    }

    fn set_connection(&self, error: Option<&StoreError>) {
        let mut s = self.status.lock().unwrap();
        let st = s.store.get_or_insert_with(Default::default);
        st.store = self.store.describe();
        st.connected = error.is_none();
        st.error = error.map(ToString::to_string);
        if error.is_some() {
            st.interruptions += 1;
        }
    }

    /// Watches the store until `tx` has no receivers left, publishing each new valid
    /// mesh. `docs` is the config in force.
    pub async fn run(
        self,
        mut w: Watcher,
        mut docs: BTreeMap<String, String>,
        tx: watch::Sender<Arc<Mesh>>,
    ) {
        self.set_connection(None);
        loop {
            let first = tokio::select! {
                u = w.next() => u,
                () = tx.closed() => return,
            };
            let interrupted = matches!(first, Update::Interrupted(_));
            let mut changed = self.absorb(first, &mut docs);
            // Take the rest of a burst before parsing once.
            let until = tokio::time::Instant::now() + self.debounce;
            if !interrupted {
                while let Ok(u) = tokio::time::timeout_at(until, w.next()).await {
                    let stop = matches!(u, Update::Interrupted(_));
                    changed |= self.absorb(u, &mut docs);
                    if stop {
                        break;
                    }
                }
            }
            if !changed {
                continue;
            }
            let parsed = {
                let d = docs.clone();
                tokio::task::spawn_blocking(move || parse_stored(&d)).await
            };
            match parsed {
                Ok(Ok(mesh)) => {
                    info!(
                        revision = w.last_revision(),
                        objects = docs.len(),
                        "config from the store applied"
                    );
                    self.record(Ok(w.last_revision()), docs.keys().cloned().collect());
                    let _ = tx.send(Arc::new(mesh));
                }
                Ok(Err(ConfigErrors(errors))) => {
                    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
                    warn!(errors = ?lines, "the stored config is invalid; keeping the last good config");
                    self.record(Err(lines), Vec::new());
                }
                Err(e) => {
                    let message = super::watch::panic_message(e);
                    self.record(
                        Err(vec![format!("parsing the config panicked: {message}")]),
                        Vec::new(),
                    );
                }
            }
        }
    }

    /// Applies one watch update to `docs`; whether anything changed.
    fn absorb(&self, u: Update, docs: &mut BTreeMap<String, String>) -> bool {
        match u {
            Update::Events(events) => {
                self.set_connection(None);
                for e in events {
                    match e.kind {
                        EventKind::Put => {
                            docs.insert(
                                e.kv.key,
                                String::from_utf8_lossy(&e.kv.value).into_owned(),
                            );
                        }
                        EventKind::Delete => {
                            docs.remove(&e.kv.key);
                        }
                    }
                }
                true
            }
            Update::Resync(range) => {
                self.set_connection(None);
                *docs = range
                    .kvs
                    .into_iter()
                    .map(|kv| (kv.key, String::from_utf8_lossy(&kv.value).into_owned()))
                    .collect();
                true
            }
            Update::Interrupted(e) => {
                warn!(error = %e, "config watch interrupted; serving the last good config until the store is back");
                self.set_connection(Some(&e));
                false
            }
        }
    }
}
