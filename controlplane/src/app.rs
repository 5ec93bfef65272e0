//! Assembles a hub from its config: binds the ports, loads the initial config, starts
//! the index, the file source, the ADS server and the admin endpoint.
//!
//! [`Hub::start`] returns once everything is bound and the initial config is applied,
//! with the bound addresses (tests bind port 0) and a handle that drains on shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::info;
use tributary_proto::wire::ads_server::AggregatedDiscoveryServiceServer;

use crate::admin::{self, AdminState};
use crate::config::watch::{FileSource, WatchConfig, WatchMode};
use crate::federation::Limits;
use crate::federation::server::FederationService;
use crate::index::debounce::DebounceConfig;
use crate::index::known::StateDir;
use crate::index::{Command, Index, IndexConfig, IndexHandle};
use crate::metrics::Metrics;
use crate::status::SyncRegistry;
use crate::xds::server::{AdsServer, StreamLimits};
use crate::xds::snapshot::Snapshots;

/// Default of `--max-request-bytes`: an Envoy subscribed by name to every cluster
/// of a very large environment sends requests of a few MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 16 << 20;

/// Everything a hub needs to start. Built by `main` from flags, or directly by tests.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Config files or directories of `*.yaml`.
    pub config_paths: Vec<PathBuf>,
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// How the polling fallback (or `watch_mode` poll) checks config files.
    pub poll_interval: Duration,
    /// Native file events with a polling fallback, or always polling.
    pub watch_mode: WatchMode,
    /// After a config file event, wait this long for the rest of its burst.
    pub watch_debounce: Duration,
    /// Environment of proxies whose node names none.
    pub default_env: String,
    pub debounce: DebounceConfig,
    /// How long a disconnected cluster's endpoints are kept.
    pub grace: Duration,
    /// Federation heartbeat interval (an agent silent for 3 of them is dropped).
    pub heartbeat: Duration,
    /// Hold xDS responses this long after start so agents can resync first.
    pub sync_wait: Duration,
    /// A client that has not ACKed a response for this long is marked STALE.
    pub stale_after: Duration,
    /// Most streams doing their initial sync at once; the rest wait (reconnect storms).
    pub max_initial_syncs: usize,
    /// Bounds on what one xDS stream may make the hub hold.
    pub stream_limits: StreamLimits,
    /// Largest xDS request the hub decodes; a larger one ends its stream.
    pub max_request_bytes: usize,
    /// Where the hub remembers which clusters fed it (locked while it runs); `None`:
    /// nothing is remembered, so a restart does not wait for known clusters.
    pub state_dir: Option<PathBuf>,
    /// Bounds on what agents may send.
    pub federation: Limits,
}

impl HubConfig {
    pub fn local(config_paths: Vec<PathBuf>) -> Self {
        Self {
            config_paths,
            xds_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            poll_interval: Duration::from_millis(500),
            watch_mode: WatchMode::Auto,
            watch_debounce: WatchConfig::default().debounce,
            default_env: crate::config::DEFAULT_ENVIRONMENT.to_string(),
            debounce: DebounceConfig::default(),
            grace: Duration::from_secs(60),
            heartbeat: Duration::from_secs(10),
            sync_wait: Duration::ZERO,
            stale_after: Duration::from_secs(10),
            max_initial_syncs: 256,
            stream_limits: StreamLimits::default(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            state_dir: None,
            federation: Limits::default(),
        }
    }
}

/// A running hub.
#[derive(Debug)]
pub struct Hub {
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub snapshots: Arc<Snapshots>,
    pub sync: Arc<SyncRegistry>,
    pub metrics: Arc<Metrics>,
    pub index: IndexHandle,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl Hub {
    pub async fn start(cfg: HubConfig) -> anyhow::Result<Hub> {
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let snapshots = Arc::new(Snapshots::default());
        let sync = Arc::new(SyncRegistry::default());
        let ready = Arc::new(AtomicBool::new(false));

        let source = FileSource::new(
            cfg.config_paths.clone(),
            WatchConfig {
                mode: cfg.watch_mode,
                poll_interval: cfg.poll_interval,
                debounce: cfg.watch_debounce,
            },
            metrics.clone(),
        );
        let config_status = source.status();
        let (contents, mesh) = source.initial().context("loading the initial config")?;
        // The initial config is applied before anything is served: ready means "has config".
        let mut index = Index::new(
            IndexConfig {
                debounce: cfg.debounce,
                grace: cfg.grace,
            },
            snapshots.clone(),
            metrics.clone(),
        );
        let now = tokio::time::Instant::now();
        if let Some(dir) = &cfg.state_dir {
            let (state, known) = StateDir::open(dir)?;
            info!(dir = %dir.display(), known = known.len(), "state dir opened");
            index.restore(known, Box::new(state), now);
        }
        index.set_file(Arc::new(mesh.clone()), now);
        index.flush(now);
        let (mesh_tx, mut mesh_rx) = watch::channel(Arc::new(mesh));
        mesh_rx.borrow_and_update();
        let (index, index_task) = index.spawn(1024);

        let xds_listener = TcpListener::bind(cfg.xds_addr)
            .await
            .with_context(|| format!("binding the xDS address {}", cfg.xds_addr))?;
        let admin_listener = TcpListener::bind(cfg.admin_addr)
            .await
            .with_context(|| format!("binding the admin address {}", cfg.admin_addr))?;
        let xds_addr = xds_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let stop_rx = shutdown_rx.clone();
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let mut tasks = JoinSet::new();

        tasks.spawn({
            let stop = stopped();
            async move {
                let abort = index_task.abort_handle();
                tokio::select! {
                    r = index_task => r.context("index task")?,
                    _ = stop => abort.abort(),
                }
                Ok(())
            }
        });
        tasks.spawn({
            let index = index.clone();
            let mut stopping = shutdown_rx.clone();
            async move {
                while tokio::select! {
                    changed = mesh_rx.changed() => changed.is_ok(),
                    _ = stopping.wait_for(|s| *s) => false,
                } {
                    let mesh = mesh_rx.borrow_and_update().clone();
                    if index.send(Command::File(mesh)).await.is_err() {
                        break;
                    }
                }
                Ok(())
            }
        });
        tasks.spawn({
            let stop = stopped();
            async move {
                tokio::select! {
                    _ = source.run(contents, mesh_tx) => {}
                    _ = stop => {}
                }
                Ok(())
            }
        });

        let (synced_tx, synced) = watch::channel(cfg.sync_wait.is_zero());
        if !cfg.sync_wait.is_zero() {
            let (wait, ready) = (cfg.sync_wait, ready.clone());
            let stop = stopped();
            tasks.spawn(async move {
                tokio::pin!(stop);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {
                        info!(?wait, "sync wait over: serving xDS");
                        let _ = synced_tx.send(true);
                        ready.store(true, Ordering::Release);
                        // Keep the channel open for the hub's lifetime.
                        (&mut stop).await;
                    }
                    _ = &mut stop => {}
                }
                Ok(())
            });
        }
        let ads = AdsServer::new(
            snapshots.clone(),
            sync.clone(),
            metrics.clone(),
            cfg.default_env.clone(),
            cfg.stream_limits,
            synced,
            shutdown_rx.clone(),
            cfg.max_initial_syncs,
        );
        let ads = AggregatedDiscoveryServiceServer::new(ads)
            .max_decoding_message_size(cfg.max_request_bytes)
            .max_encoding_message_size(usize::MAX);
        let federation = tributary_proto::federation::v1::federation_server::FederationServer::new(
            FederationService::new(
                index.clone(),
                metrics.clone(),
                cfg.heartbeat,
                cfg.federation,
                shutdown_rx.clone(),
            ),
        )
        .max_decoding_message_size(cfg.federation.max_message_bytes);
        tasks.spawn({
            let stop = stopped();
            async move {
                tonic::transport::Server::builder()
                    .tcp_nodelay(true)
                    .http2_keepalive_interval(Some(Duration::from_secs(30)))
                    .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                    .add_service(ads)
                    .add_service(federation)
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(xds_listener),
                        stop,
                    )
                    .await
                    .context("xDS server")
            }
        });

        let state = AdminState {
            registry: Arc::new(registry),
            sync: sync.clone(),
            snapshots: snapshots.clone(),
            config: config_status,
            ready: ready.clone(),
            index: index.clone(),
            stale_after: cfg.stale_after,
        };
        tasks.spawn({
            let stop = stopped();
            async move {
                axum::serve(admin_listener, admin::router(state))
                    .with_graceful_shutdown(stop)
                    .await
                    .context("admin server")
            }
        });

        if cfg.sync_wait.is_zero() {
            ready.store(true, Ordering::Release);
        }
        info!(%xds_addr, %admin_addr, environments = ?snapshots.environments(), "hub ready");
        Ok(Hub {
            xds_addr,
            admin_addr,
            snapshots,
            sync,
            metrics,
            index,
            shutdown,
            tasks,
        })
    }

    /// Stops accepting, ends every stream and waits for the tasks.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        // Streams end on the signal and the servers drain; give them a bounded time.
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(r) = self.tasks.join_next().await {
                match r {
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(())) => {}
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })
        .await;
        self.tasks.abort_all();
        drained.unwrap_or(Ok(()))
    }

    /// Runs until `signal` resolves or a task fails.
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::select! {
            _ = signal => {
                info!("shutting down");
                self.shutdown().await
            }
            Some(r) = self.tasks.join_next() => {
                match r {
                    Ok(Ok(())) => Err(anyhow::anyhow!("a hub task ended unexpectedly")),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }
}
