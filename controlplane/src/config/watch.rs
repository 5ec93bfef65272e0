//! Watches config files and hands each new valid [`Mesh`] to the index.
//!
//! The config directories are watched with `notify` (inotify on Linux): a directory
//! watch sees edits, new and removed files, and the symlink swap of a Kubernetes
//! ConfigMap volume. Where the native watcher cannot start (or `--watch poll` asks for
//! it, e.g. on NFS, where inotify misses remote writes), notify's `PollWatcher` checks
//! the files every `--poll-interval`. A burst of events is coalesced for
//! `--watch-debounce`, then the files are read; a change is detected by content, so
//! touching a file without changing it does nothing, and a file set is applied whole
//! or not at all.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use notify::Watcher;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

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
    /// A bug: reading or parsing panicked. Reported like an invalid config (the last
    /// good config stays in force), never swallowed.
    #[error("{stage} the config panicked: {message}")]
    Panicked {
        stage: &'static str,
        message: String,
    },
}

/// The message of a panicked blocking task.
pub fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".to_string())
}

/// How config files are watched for changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WatchMode {
    /// The platform's file events (inotify), falling back to polling when they cannot
    /// start (e.g. the inotify watch limit is reached).
    #[default]
    Auto,
    /// Always poll (filesystems without reliable events, such as NFS).
    Poll,
}

impl std::str::FromStr for WatchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "poll" => Ok(Self::Poll),
            other => Err(format!(
                "{other:?} is not a watch mode, expected auto or poll"
            )),
        }
    }
}

/// Watching options, shared by the hub's file source and the file agent.
#[derive(Debug, Clone, Copy)]
pub struct WatchConfig {
    pub mode: WatchMode,
    /// How often the polling fallback checks the files.
    pub poll_interval: Duration,
    /// After the first event of a burst, wait this long before reading the files.
    pub debounce: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            mode: WatchMode::Auto,
            poll_interval: Duration::from_millis(500),
            debounce: Duration::from_millis(50),
        }
    }
}

/// A `notify` watcher over the directories of a config path set, as a level-triggered
/// "something changed" signal (events coalesce: nothing queues up).
pub struct PathWatcher {
    watcher: Box<dyn Watcher + Send>,
    /// `inotify`, `poll`, ...: which backend is in use.
    pub backend: String,
    signal: Arc<Notify>,
    watched: BTreeSet<PathBuf>,
    debounce: Duration,
}

impl std::fmt::Debug for PathWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathWatcher")
            .field("backend", &self.backend)
            .field("watched", &self.watched)
            .finish()
    }
}

/// The directories whose events matter for `paths` and the files listed from them: a
/// directory itself, a file's directory, and the directory of a file's symlink target.
fn watch_dirs(paths: &[PathBuf], files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut dirs = BTreeSet::new();
    for p in paths {
        dirs.insert(if p.is_dir() { p.clone() } else { parent(p) });
    }
    for f in files {
        if let Ok(target) = std::fs::canonicalize(f) {
            dirs.insert(parent(&target));
        }
    }
    dirs
}

/// Whether a file event can mean new content. Opening or reading a file cannot: the
/// native watcher reports those too (inotify `IN_OPEN`, `IN_CLOSE_NOWRITE`), and since
/// the hub's own reload opens every file, acting on them re-read the config after
/// every read, forever, once per debounce period.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

impl PathWatcher {
    /// Starts watching the directories of `paths`: natively when `cfg.mode` allows and
    /// it works, else by polling. Logs which backend is used.
    pub fn start(paths: &[PathBuf], cfg: &WatchConfig) -> notify::Result<Self> {
        let signal = Arc::new(Notify::new());
        let handler = {
            let signal = signal.clone();
            move |event: notify::Result<notify::Event>| match &event {
                Ok(event) if !is_change(&event.kind) => {}
                Ok(_) => signal.notify_one(),
                Err(e) => {
                    warn!(error = %e, "config watcher error; re-reading the config");
                    signal.notify_one();
                }
            }
        };
        let dirs = watch_dirs(paths, &[]);
        let watch_all = |w: &mut dyn Watcher| -> notify::Result<()> {
            for d in &dirs {
                w.watch(d, notify::RecursiveMode::NonRecursive)?;
            }
            Ok(())
        };
        if cfg.mode == WatchMode::Auto {
            let native =
                notify::RecommendedWatcher::new(handler.clone(), notify::Config::default())
                    .and_then(|mut w| watch_all(&mut w).map(|()| w));
            match native {
                Ok(w) => {
                    let backend = format!("{:?}", notify::RecommendedWatcher::kind());
                    info!(backend, dirs = ?dirs, "watching config files");
                    return Ok(Self {
                        watcher: Box::new(w),
                        backend,
                        signal,
                        watched: dirs,
                        debounce: cfg.debounce,
                    });
                }
                Err(e) => warn!(
                    error = %e,
                    poll_interval = ?cfg.poll_interval,
                    "the native file watcher cannot start; polling the config files instead"
                ),
            }
        }
        let mut w = notify::PollWatcher::new(
            handler,
            notify::Config::default()
                .with_poll_interval(cfg.poll_interval)
                .with_compare_contents(true),
        )?;
        watch_all(&mut w)?;
        info!(backend = "poll", poll_interval = ?cfg.poll_interval, dirs = ?dirs, "watching config files");
        Ok(Self {
            watcher: Box::new(w),
            backend: "poll".into(),
            signal,
            watched: dirs,
            debounce: cfg.debounce,
        })
    }

    /// Also watches the directories of `files` (symlink targets, new files).
    pub fn add_files(&mut self, paths: &[PathBuf], files: &[PathBuf]) {
        for d in watch_dirs(paths, files) {
            if self.watched.contains(&d) {
                continue;
            }
            match self.watcher.watch(&d, notify::RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watched.insert(d);
                }
                Err(e) => warn!(dir = %d.display(), error = %e, "cannot watch a config directory"),
            }
        }
    }

    /// Waits for the next change, then for the rest of its burst (`debounce`).
    pub fn changed(&self) -> impl Future<Output = ()> + Send + 'static {
        let (signal, debounce) = (self.signal.clone(), self.debounce);
        async move {
            signal.notified().await;
            tokio::time::sleep(debounce).await;
        }
    }
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
    /// With the store as the config source: the watch's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<super::store::StoreSourceStatus>,
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

/// Parses a file set's contents: [`parse_files`] (tests substitute a parser).
type Parser = fn(&[(String, String)]) -> Result<Mesh, ConfigErrors>;

fn parse_contents(contents: &[(String, String)]) -> Result<Mesh, ConfigErrors> {
    parse_files(contents.iter().map(|(f, t)| (f.as_str(), t.as_str())))
}

/// The file source: publishes each new valid mesh into `tx`.
#[derive(Debug)]
pub struct FileSource {
    paths: Vec<PathBuf>,
    watch: WatchConfig,
    status: Arc<Mutex<ConfigStatus>>,
    metrics: Arc<Metrics>,
    parser: Parser,
}

impl FileSource {
    pub fn new(paths: Vec<PathBuf>, watch: WatchConfig, metrics: Arc<Metrics>) -> Self {
        let status = ConfigStatus {
            paths: paths.iter().map(|p| p.display().to_string()).collect(),
            ..Default::default()
        };
        Self {
            paths,
            watch,
            status: Arc::new(Mutex::new(status)),
            metrics,
            parser: parse_contents,
        }
    }

    /// A test seam: parse with `parser` instead of [`parse_files`].
    #[cfg(test)]
    fn with_parser(mut self, parser: Parser) -> Self {
        self.parser = parser;
        self
    }

    pub fn status(&self) -> Arc<Mutex<ConfigStatus>> {
        self.status.clone()
    }

    /// Loads the config for start-up: an invalid config is an error here, so the hub
    /// refuses to start rather than serve nothing.
    pub fn initial(&self) -> Result<(Vec<(String, String)>, Mesh), LoadError> {
        let contents = read_files(&list_files(&self.paths)?)?;
        let mesh = (self.parser)(&contents)?;
        self.record_success(&contents);
        Ok((contents, mesh))
    }

    /// Watches the files until `tx` has no receivers left. `last` is the content of
    /// the config in force; a read whose content equals it does nothing.
    pub async fn run(self, mut last: Vec<(String, String)>, tx: watch::Sender<Arc<Mesh>>) {
        let watcher = match PathWatcher::start(&self.paths, &self.watch) {
            Ok(w) => w,
            Err(e) => {
                error!(error = %e, "cannot watch the config files: edits are not applied until a restart");
                self.status.lock().unwrap().last_errors =
                    vec![format!("cannot watch the config files: {e}")];
                return;
            }
        };
        let mut watcher = watcher;
        let mut last_error: Option<String> = None;
        loop {
            // Read once before waiting: an edit between the initial load and the
            // watcher's start is not missed.
            self.reload(&mut watcher, &mut last, &tx, &mut last_error)
                .await;
            if tx.is_closed() {
                return;
            }
            tokio::select! {
                () = watcher.changed() => {}
                () = tx.closed() => return,
            }
        }
    }

    /// Reads the files and, if their content changed, parses and publishes them.
    async fn reload(
        &self,
        watcher: &mut PathWatcher,
        last: &mut Vec<(String, String)>,
        tx: &watch::Sender<Arc<Mesh>>,
        last_error: &mut Option<String>,
    ) {
        let paths = self.paths.clone();
        self.metrics.config_reads.inc();
        // File I/O and parsing off the async workers.
        let read = tokio::task::spawn_blocking(move || {
            let files = list_files(&paths)?;
            let contents = read_files(&files)?;
            Ok::<_, LoadError>((files, contents))
        })
        .await;
        let contents = match read {
            Ok(Ok((files, contents))) => {
                watcher.add_files(&self.paths, &files);
                contents
            }
            Ok(Err(e)) => return self.record_failure(&e, last_error),
            Err(e) => {
                let e = LoadError::Panicked {
                    stage: "reading",
                    message: panic_message(e),
                };
                return self.record_failure(&e, last_error);
            }
        };
        if contents == *last {
            return;
        }
        let parsed = {
            let c = contents.clone();
            let parser = self.parser;
            tokio::task::spawn_blocking(move || parser(&c)).await
        };
        match parsed {
            Ok(Ok(mesh)) => {
                self.record_success(&contents);
                *last_error = None;
                *last = contents;
                info!(files = last.len(), "config reloaded");
                let _ = tx.send(Arc::new(mesh));
            }
            Ok(Err(e)) => {
                self.record_failure(&LoadError::Invalid(e), last_error);
                // Remember the bad contents so the same errors are not logged on
                // every event; the next edit is parsed again.
                *last = contents;
            }
            Err(e) => {
                let e = LoadError::Panicked {
                    stage: "parsing",
                    message: panic_message(e),
                };
                self.record_failure(&e, last_error);
                // The same contents would panic again: wait for the next edit.
                *last = contents;
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: tributary.io/v1alpha1\nkind: Service\nmetadata: {name: a, environment: prod}\nspec:\n  hosts: [a.prod]\n  ports: [{name: http, port: 8080}]\n";

    /// Panics on a file set containing `PANIC`, like a parser bug would.
    fn panicking_parser(contents: &[(String, String)]) -> Result<Mesh, ConfigErrors> {
        if contents.iter().any(|(_, t)| t.contains("PANIC")) {
            panic!("parser bug on purpose");
        }
        parse_contents(contents)
    }

    async fn wait_for_status(
        status: &Mutex<ConfigStatus>,
        what: &str,
        ok: impl Fn(&ConfigStatus) -> bool,
    ) -> ConfigStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = status.lock().unwrap().clone();
            if ok(&s) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_panic_while_parsing_is_reported_and_the_last_good_config_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mesh.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let watch = WatchConfig {
            debounce: Duration::from_millis(10),
            ..WatchConfig::default()
        };
        let source = FileSource::new(vec![dir.path().to_path_buf()], watch, metrics.clone())
            .with_parser(panicking_parser);
        let status = source.status();
        let (contents, mesh) = source.initial().unwrap();
        let (tx, mut rx) = watch::channel(Arc::new(mesh));
        rx.borrow_and_update();
        let task = tokio::spawn(source.run(contents, tx));

        std::fs::write(&file, format!("# PANIC\n{GOOD}")).unwrap();
        let s = wait_for_status(&status, "the panic in /status/config", |s| {
            !s.last_errors.is_empty()
        })
        .await;
        assert_eq!(
            s.last_errors,
            vec!["parsing the config panicked: parser bug on purpose".to_string()]
        );
        assert_eq!(metrics.config_reload_errors.get(), 1);
        assert_eq!(s.applied_generation, 1, "nothing applied after the panic");
        assert!(!rx.has_changed().unwrap(), "the last good config stays");
        assert!(!task.is_finished(), "the source keeps watching");

        // The next edit is parsed and applied: the source survived the panic.
        let second = GOOD.replace("port: 8080", "port: 9090");
        std::fs::write(&file, &second).unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("the edit after the panic applied")
            .unwrap();
        let port = rx.borrow().environments["prod"]
            .services
            .values()
            .next()
            .unwrap()
            .ports[0]
            .port;
        assert_eq!(port, 9090);
        let s = status.lock().unwrap().clone();
        assert!(
            s.last_errors.is_empty() && s.applied_generation == 2,
            "{s:?}"
        );
    }

    /// A burst of writes inside the debounce window is read once, as a whole: no
    /// intermediate file set is applied.
    #[tokio::test]
    async fn a_burst_of_writes_is_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let watch = WatchConfig {
            poll_interval: Duration::from_secs(3600),
            debounce: Duration::from_millis(500),
            ..WatchConfig::default()
        };
        let source = FileSource::new(vec![dir.path().to_path_buf()], watch, metrics.clone());
        let status = source.status();
        let (contents, mesh) = source.initial().unwrap();
        let (tx, mut rx) = watch::channel(Arc::new(mesh));
        rx.borrow_and_update();
        tokio::spawn(source.run(contents, tx));
        // Let the source's first pass and watcher start complete: an edit is applied.
        let edit = GOOD.replace("port: 8080", "port: 8081");
        std::fs::write(dir.path().join("a.yaml"), &edit).unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("first edit applied")
            .unwrap();
        rx.borrow_and_update();
        let generation = status.lock().unwrap().applied_generation;

        // Twenty writes within the debounce window: one read, of the last.
        let b = GOOD
            .replace("name: a,", "name: b,")
            .replace("[a.prod]", "[b.prod]");
        for i in 0..20 {
            std::fs::write(
                dir.path().join("b.yaml"),
                b.replace("8080", &format!("{}", 9000 + i)),
            )
            .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("the burst applied")
            .unwrap();
        let mesh = rx.borrow_and_update().clone();
        let b_port = mesh.environments["prod"]
            .services
            .values()
            .find(|s| s.key.name == "b")
            .unwrap()
            .ports[0]
            .port;
        assert_eq!(b_port, 9019, "the last write of the burst");
        let s = status.lock().unwrap().clone();
        assert_eq!(
            s.applied_generation,
            generation + 1,
            "one reload for the burst: {s:?}"
        );
        assert_eq!(metrics.config_reload_errors.get(), 0);
    }

    /// Reading or opening a file is not a change; writing, creating, removing and
    /// renaming are, and so is anything the watcher cannot classify.
    #[test]
    fn only_events_that_can_change_content_count() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind, RemoveKind,
        };
        for quiet in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Open(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Any),
        ] {
            assert!(!is_change(&quiet), "{quiet:?}");
        }
        for change in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(notify::event::RenameMode::To)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Any,
            EventKind::Other,
        ] {
            assert!(is_change(&change), "{change:?}");
        }
    }

    /// The source's own reads (and anyone else's) do not make it read again: with the
    /// native watcher, opening a file is an event, and acting on it re-read the whole
    /// config every debounce period for as long as the hub ran.
    #[tokio::test]
    async fn reading_the_config_does_not_make_the_source_read_it_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let debounce = Duration::from_millis(20);
        let watch = WatchConfig {
            poll_interval: Duration::from_secs(3600),
            debounce,
            ..WatchConfig::default()
        };
        let source = FileSource::new(vec![dir.path().to_path_buf()], watch, metrics.clone());
        let (contents, mesh) = source.initial().unwrap();
        let (tx, mut rx) = watch::channel(Arc::new(mesh));
        rx.borrow_and_update();
        tokio::spawn(source.run(contents, tx));
        // An edit is applied: the watcher runs, and the source has read since.
        let edit = GOOD.replace("port: 8080", "port: 8081");
        std::fs::write(dir.path().join("a.yaml"), &edit).unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("the edit applied")
            .unwrap();
        let reads = metrics.config_reads.get();
        // Someone reads the file (an operator's `cat`, a backup); then fifty debounce
        // periods pass: before the fix the source read the files about once a period.
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.yaml")).unwrap(),
            edit
        );
        tokio::time::sleep(debounce * 50).await;
        assert_eq!(
            metrics.config_reads.get(),
            reads,
            "no read without a change (reads before: {reads})"
        );
        // A real change is still read, once.
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("the second edit applied")
            .unwrap();
        assert!(metrics.config_reads.get() > reads);
    }
}
