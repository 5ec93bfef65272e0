//! Which remote clusters fed this hub, remembered across restarts.
//!
//! After a restart the index holds every known cluster "pending resync" until its
//! agent has sent a complete full resync or its grace period has run out, and holds
//! withdrawals meanwhile (see [`super::Index::restore`]). The list lives behind the
//! small [`KnownClusters`] interface. The hub keeps it in the store ([`StoreKnown`]:
//! one key per hub replica, `/tributary/known-clusters/{replica}`); [`StateDir`] is
//! the `--state-dir` lock and the JSON file earlier versions kept there
//! (`clusters.json`, read once and moved into the store).
//!
//! The directory is locked while a hub runs: two hubs sharing one state dir would
//! share one embedded store.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One cluster that fed the hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnownCluster {
    pub id: String,
    pub region: String,
    pub zone: String,
    /// When its agent was last connected (Unix seconds).
    pub last_seen_unix: f64,
}

/// Where the index keeps the list of known clusters.
pub trait KnownClusters: std::fmt::Debug + Send {
    /// Replaces the stored list (atomically: a crash leaves the old or the new one).
    fn save(&mut self, clusters: &[KnownCluster]) -> Result<(), StateError>;
}

/// Errors of the state dir; none is retryable without an operator's action.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state dir {dir}: {what}: {source}")]
    Io {
        dir: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(
        "state dir {dir} is in use by another hub ({holder}); two hubs must not share one --state-dir"
    )]
    Locked { dir: PathBuf, holder: String },
    #[error(
        "state dir {dir}: {file} is not a valid state file: {message}; move it away to start afresh"
    )]
    Corrupt {
        dir: PathBuf,
        file: PathBuf,
        message: String,
    },
}

const STATE_FILE: &str = "clusters.json";
const LOCK_FILE: &str = "lock";

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    clusters: Vec<KnownCluster>,
}

/// The state dir: a lock file held for the hub's lifetime and `clusters.json`.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    /// Holds the exclusive lock until the hub drops it.
    _lock: File,
}

impl StateDir {
    /// Creates `dir` if needed, locks it, and reads the clusters it remembers.
    pub fn open(dir: &Path) -> Result<(StateDir, Vec<KnownCluster>), StateError> {
        let io = |what: &'static str| {
            let dir = dir.to_path_buf();
            move |source| StateError::Io { dir, what, source }
        };
        std::fs::create_dir_all(dir).map_err(io("creating it"))?;
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(io("opening its lock file"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(StateError::Locked {
                    dir: dir.to_path_buf(),
                    holder: if holder.is_empty() {
                        "holder unknown".into()
                    } else {
                        holder.to_string()
                    },
                });
            }
            Err(TryLockError::Error(e)) => return Err(io("locking it")(e)),
        }
        // Name the holder for the next hub that finds the dir locked.
        lock.set_len(0).map_err(io("writing its lock file"))?;
        lock.rewind().map_err(io("writing its lock file"))?;
        write!(lock, "pid {}", std::process::id()).map_err(io("writing its lock file"))?;

        let file = dir.join(STATE_FILE);
        let clusters = match std::fs::read(&file) {
            Ok(bytes) => {
                let state: StateFile =
                    serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                        dir: dir.to_path_buf(),
                        file: file.clone(),
                        message: e.to_string(),
                    })?;
                state.clusters
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io("reading clusters.json")(e)),
        };
        Ok((
            StateDir {
                dir: dir.to_path_buf(),
                _lock: lock,
            },
            clusters,
        ))
    }
}

impl KnownClusters for StateDir {
    fn save(&mut self, clusters: &[KnownCluster]) -> Result<(), StateError> {
        let io = |what: &'static str| {
            let dir = self.dir.clone();
            move |source| StateError::Io { dir, what, source }
        };
        let body = serde_json::to_vec_pretty(&StateFile {
            version: 1,
            clusters: clusters.to_vec(),
        })
        .map_err(|e| io("encoding clusters.json")(std::io::Error::other(e)))?;
        // tmp + fsync + rename + fsync(dir): a crash leaves the old or the new list.
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let mut f = File::create(&tmp).map_err(io("writing clusters.json.tmp"))?;
        f.write_all(&body)
            .map_err(io("writing clusters.json.tmp"))?;
        f.sync_all().map_err(io("syncing clusters.json.tmp"))?;
        std::fs::rename(&tmp, self.dir.join(STATE_FILE)).map_err(io("renaming clusters.json"))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing the directory"))?;
        Ok(())
    }
}

/// Where a replica's known clusters live in the store.
pub fn store_key(replica: &str) -> String {
    format!("/tributary/known-clusters/{replica}")
}

/// The known clusters in the store. [`KnownClusters::save`] hands the newest list to
/// a writer task and returns at once (the index never waits on the store); the task
/// writes the latest list, retrying while the store is unavailable, so a burst of
/// saves costs one write and an outage loses nothing but intermediate lists.
#[derive(Debug)]
pub struct StoreKnown {
    tx: tokio::sync::watch::Sender<Option<Vec<KnownCluster>>>,
}

impl StoreKnown {
    /// Reads `replica`'s list and starts the writer task.
    pub async fn open(
        store: tributary_store::SharedStore,
        replica: &str,
    ) -> Result<(StoreKnown, Vec<KnownCluster>), tributary_store::StoreError> {
        let key = store_key(replica);
        let (kv, _) = store.get(&key).await?;
        let clusters = match kv {
            None => Vec::new(),
            Some(kv) => match serde_json::from_slice::<StateFile>(&kv.value) {
                Ok(f) => f.clusters,
                Err(e) => {
                    tracing::warn!(key, error = %e, "the stored known-cluster list is not valid; starting without it");
                    Vec::new()
                }
            },
        };
        let (tx, mut rx) = tokio::sync::watch::channel(None::<Vec<KnownCluster>>);
        tokio::spawn(async move {
            let mut written: Option<Vec<KnownCluster>> = None;
            loop {
                let open = rx.changed().await.is_ok();
                let latest = rx.borrow_and_update().clone();
                if let Some(list) = latest.filter(|l| Some(l) != written.as_ref()) {
                    let body = serde_json::to_vec(&StateFile {
                        version: 1,
                        clusters: list.clone(),
                    })
                    .unwrap_or_default();
                    // While the hub runs: until it is written. Once it stops: a few tries.
                    let mut tries = 0;
                    loop {
                        match store.put(&key, body.clone(), 0).await {
                            Ok(_) => {
                                written = Some(list);
                                break;
                            }
                            Err(e) => {
                                tries += 1;
                                tracing::warn!(key, error = %e, "could not save the known clusters; retrying");
                                if !open && tries >= 3 {
                                    break;
                                }
                                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                            }
                        }
                    }
                }
                if !open {
                    return;
                }
            }
        });
        Ok((StoreKnown { tx }, clusters))
    }
}

impl KnownClusters for StoreKnown {
    fn save(&mut self, clusters: &[KnownCluster]) -> Result<(), StateError> {
        self.tx.send_replace(Some(clusters.to_vec()));
        Ok(())
    }
}

impl StateDir {
    /// Moves the `clusters.json` of an earlier version aside once its list is in the
    /// store (renamed to `clusters.json.migrated`).
    pub fn retire_legacy_file(&self) -> Result<(), StateError> {
        let file = self.dir.join(STATE_FILE);
        match std::fs::rename(&file, self.dir.join(format!("{STATE_FILE}.migrated"))) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io {
                dir: self.dir.clone(),
                what: "moving clusters.json aside",
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_clusters_and_refuses_a_second_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let (mut state, known) = StateDir::open(&dir).unwrap();
        assert!(known.is_empty());
        let c = KnownCluster {
            id: "east-1".into(),
            region: "r".into(),
            zone: "z".into(),
            last_seen_unix: 5.0,
        };
        state.save(std::slice::from_ref(&c)).unwrap();
        let err = StateDir::open(&dir).unwrap_err().to_string();
        assert!(
            err.contains(&dir.display().to_string())
                && err.contains(&format!("pid {}", std::process::id()))
                && err.contains("two hubs must not share"),
            "{err}"
        );
        drop(state);
        let (_state, known) = StateDir::open(&dir).unwrap();
        assert_eq!(known, vec![c]);
    }

    #[test]
    fn a_corrupt_file_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(STATE_FILE), "{not json").unwrap();
        let err = StateDir::open(tmp.path()).unwrap_err().to_string();
        assert!(
            err.contains("clusters.json is not a valid state file"),
            "{err}"
        );
    }
}
