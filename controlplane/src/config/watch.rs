//! Watches config files and hands each new valid [`Mesh`] to the index.
//!
//! Polling, not inotify: it behaves the same on every filesystem (including the
//! symlink swaps of Kubernetes ConfigMap volumes), and reading a few config files every
//! few hundred milliseconds costs nothing. A change is detected by content, so touching
//! a file without changing it does nothing.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{error, info};

use super::{ConfigError, ConfigErrors, parse_files};
use crate::metrics::Metrics;
use crate::model::Mesh;

/// Why a config set could not be read from disk. Retryable: the next poll tries again.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: no *.yaml or *.yml files found")]
    Empty(String),
    #[error(transparent)]
    Invalid(#[from] ConfigErrors),
}

/// What `/status/config` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigStatus {
    pub paths: Vec<String>,
    pub files: Vec<String>,
    /// Unix seconds of the last successful load.
    pub last_applied_unix: Option<u64>,
    pub applied_generation: u64,
    /// Errors of the most recent attempt; empty when it succeeded.
    pub last_errors: Vec<String>,
}

/// The YAML files under `paths`: a file as given, or the `*.yaml`/`*.yml` directly in
/// a directory, in name order.
pub fn list_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    let mut files = Vec::new();
    for path in paths {
        let io = |source| LoadError::Io {
            path: path.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.is_dir() {
            let mut found = Vec::new();
            for entry in std::fs::read_dir(path).map_err(io)? {
                let p = entry.map_err(io)?.path();
                let yaml = p.extension().is_some_and(|e| e == "yaml" || e == "yml");
                let hidden = p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                if yaml && !hidden && p.is_file() {
                    found.push(p);
                }
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    if files.is_empty() {
        let shown: Vec<_> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(LoadError::Empty(shown.join(", ")));
    }
    Ok(files)
}

/// Reads the files' contents.
pub fn read_files(files: &[PathBuf]) -> Result<Vec<(String, String)>, LoadError> {
    files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .map(|text| (f.display().to_string(), text))
                .map_err(|source| LoadError::Io {
                    path: f.display().to_string(),
                    source,
                })
        })
        .collect()
}

/// Lists, reads and parses the config once.
pub fn load(paths: &[PathBuf]) -> Result<(Vec<(String, String)>, Mesh), LoadError> {
    let contents = read_files(&list_files(paths)?)?;
    let mesh = parse_files(contents.iter().map(|(f, t)| (f.as_str(), t.as_str())))?;
    Ok((contents, mesh))
}

/// The file source: publishes each new valid mesh into `tx`.
#[derive(Debug)]
pub struct FileSource {
    paths: Vec<PathBuf>,
    interval: Duration,
    status: Arc<Mutex<ConfigStatus>>,
    metrics: Arc<Metrics>,
}

impl FileSource {
    pub fn new(paths: Vec<PathBuf>, interval: Duration, metrics: Arc<Metrics>) -> Self {
        let status = ConfigStatus {
            paths: paths.iter().map(|p| p.display().to_string()).collect(),
            ..Default::default()
        };
        Self {
            paths,
            interval,
            status: Arc::new(Mutex::new(status)),
            metrics,
        }
    }

    pub fn status(&self) -> Arc<Mutex<ConfigStatus>> {
        self.status.clone()
    }

    /// Loads the config for start-up: an invalid config is an error here, so the hub
    /// refuses to start rather than serve nothing.
    pub fn initial(&self) -> Result<(Vec<(String, String)>, Mesh), LoadError> {
        let (contents, mesh) = load(&self.paths)?;
        self.record_success(&contents);
        Ok((contents, mesh))
    }

    /// Polls until `tx` has no receivers left.
    pub async fn run(self, mut last: Vec<(String, String)>, tx: watch::Sender<Arc<Mesh>>) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<String> = None;
        loop {
            ticker.tick().await;
            if tx.is_closed() {
                return;
            }
            let paths = self.paths.clone();
            // File I/O and parsing off the async workers.
            let contents =
                match tokio::task::spawn_blocking(move || read_files(&list_files(&paths)?)).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        self.record_failure(&e, &mut last_error);
                        continue;
                    }
                    Err(_) => continue,
                };
            if contents == last {
                continue;
            }
            let parsed = {
                let c = contents.clone();
                tokio::task::spawn_blocking(move || {
                    parse_files(c.iter().map(|(f, t)| (f.as_str(), t.as_str())))
                })
                .await
            };
            match parsed {
                Ok(Ok(mesh)) => {
                    self.record_success(&contents);
                    last_error = None;
                    last = contents;
                    info!(files = last.len(), "config reloaded");
                    if tx.send(Arc::new(mesh)).is_err() {
                        return;
                    }
                }
                Ok(Err(e)) => {
                    self.record_failure(&LoadError::Invalid(e), &mut last_error);
                    // Remember the bad contents so the same errors are not logged on
                    // every poll; the next edit is parsed again.
                    last = contents;
                }
                Err(_) => continue,
            }
        }
    }

    fn record_success(&self, contents: &[(String, String)]) {
        self.metrics.config_reloads.inc();
        let mut s = self.status.lock().unwrap();
        s.files = contents.iter().map(|(f, _)| f.clone()).collect();
        s.applied_generation += 1;
        s.last_errors.clear();
        s.last_applied_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
    }

    fn record_failure(&self, e: &LoadError, last_error: &mut Option<String>) {
        let lines: Vec<String> = match e {
            LoadError::Invalid(ConfigErrors(list)) => {
                list.iter().map(ConfigError::to_string).collect()
            }
            other => vec![other.to_string()],
        };
        let joined = lines.join("\n");
        if last_error.as_deref() != Some(joined.as_str()) {
            self.metrics.config_reload_errors.inc();
            error!(
                "config rejected, still serving the last good config:\n  {}",
                lines.join("\n  ")
            );
            *last_error = Some(joined);
        }
        self.status.lock().unwrap().last_errors = lines;
    }
}
