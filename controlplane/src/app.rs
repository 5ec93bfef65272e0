//! Assembles a hub from its config: opens the store, binds the ports, loads the
//! initial config (files, or the store), starts the index, the config source, the ADS
//! server, the admin endpoint and the replica's membership (registration under a
//! lease, the assigner election, the shard assignment).
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
use tributary_proto::wire::ads::AdsService;

use tributary_store::SharedStore;
use tributary_store::embedded::{Embedded, EmbeddedConfig};
#[cfg(feature = "etcd")]
use tributary_store::etcd::{Etcd, EtcdConfig};

use crate::admin::{self, AdminAuthz, AdminState};
use crate::catalog::publish::{CatalogConfig, CatalogStats};
use crate::config::store::{ConfigStore, StoreSource};
use crate::config::watch::{FileSource, WatchConfig, WatchMode};
use crate::federation::Limits;
use crate::federation::server::FederationService;
use crate::identity::tls::{self as tls, PeerAddr, ServerTls, TlsListener, TlsMetrics, Transport};
use crate::index::debounce::DebounceConfig;
use crate::index::known::{KnownClusters, StateDir, StoreKnown};
use crate::index::{Command, Index, IndexConfig, IndexHandle};
use crate::membership::{Membership, MembershipConfig};
use crate::metrics::Metrics;
use crate::model::Mesh;
use crate::status::SyncRegistry;
use crate::xds::server::{AdsServer, StreamLimits};
use crate::xds::snapshot::Snapshots;

/// Default of `--max-request-bytes`: an Envoy subscribed by name to every cluster
/// of a very large environment sends requests of a few MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 16 << 20;

/// Which store a hub uses.
#[derive(Debug, Clone)]
pub enum StoreBackend {
    /// `store.redb` in the state dir (in memory without one).
    Embedded,
    #[cfg(feature = "etcd")]
    Etcd(EtcdConfig),
    /// A store opened by the caller (tests run several hubs on one embedded store).
    Shared(SharedStore),
}

/// Everything a hub needs to start. Built by `main` from flags, or directly by tests.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Config files or directories of `*.yaml`; empty: the config is in the store.
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
    /// The xDS listener's accept queue: connections the kernel completes before the
    /// hub accepts them (capped by `net.core.somaxconn`). A fleet reconnecting at once
    /// arrives faster than a busy hub accepts; past the queue, connects are dropped
    /// and retried by the proxies seconds later.
    pub listen_backlog: u32,
    /// Bounds on what one xDS stream may make the hub hold.
    pub stream_limits: StreamLimits,
    /// Largest xDS request the hub decodes; a larger one ends its stream.
    pub max_request_bytes: usize,
    /// Where the hub remembers which clusters fed it (locked while it runs); `None`:
    /// nothing is remembered, so a restart does not wait for known clusters.
    pub state_dir: Option<PathBuf>,
    /// Bounds on what agents may send.
    pub federation: Limits,
    pub store: StoreBackend,
    /// Revisions of history the embedded store keeps for watches.
    pub store_history: u64,
    /// This replica's id: its registration and its known-cluster list are keyed by it.
    pub replica_id: String,
    /// The replica's registration expires this long after a crash.
    pub lease_ttl: Duration,
    /// Replicas the assignment gives each shard.
    pub replicas_per_shard: usize,
    /// A shard leader writes its changed catalog summaries this long after a change.
    pub catalog_interval: Duration,
    /// Mutual TLS on the xDS/federation and admin ports, or plaintext on loopback.
    pub transport: Transport,
    /// The SPIFFE trust domain of every peer's certificate.
    pub trust_domain: String,
    /// Operators granted write on everything, whatever the config's `Operator`
    /// objects say (`--bootstrap-operator`).
    pub bootstrap_operators: Vec<String>,
    /// Workload certificates over SDS and mesh mTLS (docs/security.md); `None`: the
    /// hub serves no secrets and generates plaintext clusters and listeners.
    pub mesh_identity: Option<MeshIdentity>,
    /// Mesh mTLS with the hub's own CA as the issuer (`--mesh-mtls`), when
    /// `mesh_identity` names none.
    pub mesh_mtls: bool,
    /// The certificate authority and the CSR API (see `docs/security.md`).
    pub identity: crate::identity::api::IdentityConfig,
}

/// Who issues the mesh's workload certificates, and its trust domain.
#[derive(Debug, Clone)]
pub struct MeshIdentity {
    pub trust_domain: String,
    pub issuer: Arc<dyn crate::identity::CertificateIssuer>,
}

/// Default accept queue of the xDS listener: above the 2,000+ proxies of one shard
/// reconnecting at once (tokio's own default is 1,024).
pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;

/// A listening socket with an accept queue of `backlog` connections.
pub fn bind_listener(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std and tokio do for listeners: a restarted hub can bind its port while
    // connections of the previous one are in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
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
            listen_backlog: DEFAULT_LISTEN_BACKLOG,
            stream_limits: StreamLimits::default(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            state_dir: None,
            federation: Limits::default(),
            store: StoreBackend::Embedded,
            store_history: tributary_store::embedded::DEFAULT_HISTORY,
            replica_id: "hub".into(),
            lease_ttl: Duration::from_secs(10),
            replicas_per_shard: 2,
            catalog_interval: CatalogConfig::default().interval,
            // Tests bind loopback; mutual TLS is opted into per test.
            transport: Transport::Insecure,
            trust_domain: tls::DEFAULT_TRUST_DOMAIN.to_string(),
            bootstrap_operators: Vec::new(),
            mesh_identity: None,
            mesh_mtls: false,
            identity: crate::identity::api::IdentityConfig::default(),
        }
    }

    /// Reads its config from the store (no `--config`).
    pub fn config_in_store(&self) -> bool {
        self.config_paths.is_empty()
    }
}

/// Opens the configured store.
async fn open_store(cfg: &HubConfig) -> anyhow::Result<SharedStore> {
    let embedded = EmbeddedConfig {
        history: cfg.store_history,
    };
    Ok(match &cfg.store {
        StoreBackend::Embedded => match &cfg.state_dir {
            Some(dir) => {
                let file = tributary_store::embedded::file_in(dir);
                Arc::new(Embedded::open(&file, embedded).with_context(|| {
                    format!(
                        "opening the embedded store in --state-dir {}",
                        dir.display()
                    )
                })?)
            }
            None => Arc::new(Embedded::in_memory(embedded)?),
        },
        #[cfg(feature = "etcd")]
        StoreBackend::Etcd(c) => Arc::new(Etcd::connect(c).await.with_context(|| {
            format!(
                "connecting to etcd (--etcd-endpoints {})",
                c.endpoints.join(",")
            )
        })?),
        StoreBackend::Shared(s) => s.clone(),
    })
}

/// The config source chosen by the config: files (`--config`) or the store.
enum Source {
    Files(FileSource, Vec<(String, String)>),
    Store(
        StoreSource,
        tributary_store::watcher::Watcher,
        std::collections::BTreeMap<String, String>,
    ),
}

impl Source {
    async fn open(
        cfg: &HubConfig,
        store: &SharedStore,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<(Source, Mesh)> {
        if cfg.config_in_store() {
            let source = StoreSource::new(store.clone(), cfg.watch_debounce, metrics.clone());
            let (w, docs, mesh) = source
                .initial()
                .await
                .with_context(|| format!("loading the initial config from {}", store.describe()))?;
            return Ok((Source::Store(source, w, docs), mesh));
        }
        let source = FileSource::new(
            cfg.config_paths.clone(),
            WatchConfig {
                mode: cfg.watch_mode,
                poll_interval: cfg.poll_interval,
                debounce: cfg.watch_debounce,
            },
            metrics.clone(),
        );
        let (contents, mesh) = source.initial().context("loading the initial config")?;
        Ok((Source::Files(source, contents), mesh))
    }

    fn status(&self) -> Arc<std::sync::Mutex<crate::config::watch::ConfigStatus>> {
        match self {
            Source::Files(s, _) => s.status(),
            Source::Store(s, _, _) => s.status(),
        }
    }

    async fn run(self, tx: watch::Sender<Arc<Mesh>>) {
        match self {
            Source::Files(s, contents) => s.run(contents, tx).await,
            Source::Store(s, w, docs) => s.run(w, docs, tx).await,
        }
    }
}

/// A running hub.
#[derive(Debug)]
pub struct Hub {
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The CSR listener's addresses (`--csr-addr`): the CSR API for peers without a
    /// certificate (`identity::csr_listener`).
    pub csr_addrs: Vec<SocketAddr>,
    pub snapshots: Arc<Snapshots>,
    pub sync: Arc<SyncRegistry>,
    pub metrics: Arc<Metrics>,
    pub index: IndexHandle,
    pub store: SharedStore,
    pub membership: Membership,
    /// What this replica did as a shard leader for the cross-zone catalog.
    pub catalog: Arc<CatalogStats>,
    /// Workload certificates served over SDS (with `HubConfig::mesh_identity`): the
    /// CA calls `reissue_all` on it when its roots or intermediates change.
    pub secrets: Option<Arc<crate::xds::secrets::Secrets>>,
    /// The certificate authority, shared through the store with the other replicas.
    pub ca: Arc<crate::identity::ca::Ca>,
    /// Holds the state dir's lock while the hub runs.
    _state_dir: Option<StateDir>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl Hub {
    pub async fn start(cfg: HubConfig) -> anyhow::Result<Hub> {
        // Refused before anything is opened: plaintext only on loopback.
        for (flag, addr) in [
            ("--xds-addr", cfg.xds_addr),
            ("--admin-addr", cfg.admin_addr),
        ] {
            cfg.transport
                .check_bind(flag, addr)
                .map_err(anyhow::Error::msg)?;
        }
        cfg.identity
            .csr
            .check(&cfg.transport)
            .map_err(anyhow::Error::msg)?;
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let tls_metrics = TlsMetrics::new(&mut registry);
        let server_tls = |alpn: &[&[u8]]| -> anyhow::Result<Option<ServerTls>> {
            cfg.transport
                .files()
                .map(|files| ServerTls::load(files, &cfg.trust_domain, alpn))
                .transpose()
                .context("loading the TLS files")
        };
        let (xds_tls, admin_tls) = (server_tls(tls::ALPN_GRPC)?, server_tls(tls::ALPN_HTTP1)?);
        let snapshots = Arc::new(Snapshots::default());
        let sync = Arc::new(SyncRegistry::default());
        let ready = Arc::new(AtomicBool::new(false));

        // The state dir's lock first: a second hub on the same dir is refused before
        // it touches the embedded store.
        let (state_dir, legacy_known) = match &cfg.state_dir {
            Some(dir) => {
                let (state, known) = StateDir::open(dir)?;
                info!(dir = %dir.display(), "state dir opened");
                (Some(state), known)
            }
            None => (None, Vec::new()),
        };
        let store = open_store(&cfg).await?;
        info!(store = %store.describe(), replica = %cfg.replica_id, "store opened");
        let (source, mesh) = Source::open(&cfg, &store, &metrics).await?;
        let ca_api = crate::identity::api::start(store.clone(), &cfg.identity).await?;
        // Who issues workload certificates for SDS: the one given, or the hub's CA.
        let mesh_identity = cfg.mesh_identity.clone().or_else(|| {
            cfg.mesh_mtls.then(|| MeshIdentity {
                trust_domain: cfg.trust_domain.clone(),
                issuer: ca_api.ca.clone() as Arc<dyn crate::identity::CertificateIssuer>,
            })
        });
        let config_status = source.status();
        // The initial config is applied before anything is served: ready means "has config".
        let mut index = Index::new(
            IndexConfig {
                debounce: cfg.debounce,
                grace: cfg.grace,
                mesh_trust_domain: mesh_identity.as_ref().map(|m| m.trust_domain.clone()),
            },
            snapshots.clone(),
            metrics.clone(),
        );
        let now = tokio::time::Instant::now();
        let (known_store, mut known) = StoreKnown::open(store.clone(), &cfg.replica_id)
            .await
            .with_context(|| format!("reading the known clusters from {}", store.describe()))?;
        let mut known_store: Box<dyn KnownClusters> = Box::new(known_store);
        if known.is_empty() && !legacy_known.is_empty() {
            // An earlier version's clusters.json: moved into the store once.
            info!(
                clusters = legacy_known.len(),
                "moving clusters.json into the store"
            );
            known = legacy_known;
            known_store.save(&known)?;
            if let Some(state) = &state_dir {
                state.retire_legacy_file()?;
            }
        }
        info!(known = known.len(), "known clusters read");
        index.restore(known, known_store, now);
        index.set_file(Arc::new(mesh.clone()), now);
        index.flush(now);
        let (mesh_tx, mut mesh_rx) = watch::channel(Arc::new(mesh));
        mesh_rx.borrow_and_update();
        let membership_mesh = mesh_tx.subscribe();
        let security_mesh = mesh_tx.subscribe();
        let (index, index_task) = index.spawn(1024);

        let xds_listener = bind_listener(cfg.xds_addr, cfg.listen_backlog)
            .with_context(|| format!("binding the xDS address {}", cfg.xds_addr))?;
        let admin_listener = TcpListener::bind(cfg.admin_addr)
            .await
            .with_context(|| format!("binding the admin address {}", cfg.admin_addr))?;
        let xds_addr = xds_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let csr_listeners = crate::identity::csr_listener::bind(&cfg.identity.csr).await?;
        let csr_addrs = csr_listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<std::io::Result<Vec<_>>>()?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let stop_rx = shutdown_rx.clone();
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let mut tasks = JoinSet::new();
        // The CA follows the store: rotations and the other replicas' intermediates.
        let ca_follow = ca_api.ca.clone().run(shutdown_rx.clone());
        tasks.spawn(async move {
            ca_follow.await;
            Ok(())
        });
        // Our listeners refuse what the CA revoked, from its next change on.
        for server in [&xds_tls, &admin_tls].into_iter().flatten() {
            let follow = server
                .clone()
                .follow_ca_crls(ca_api.ca.clone(), shutdown_rx.clone());
            tasks.spawn(async move {
                follow.await;
                Ok(())
            });
        }

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
        let config_api = cfg
            .config_in_store()
            .then(|| ConfigStore::new(store.clone()));
        tasks.spawn({
            let stop = stopped();
            async move {
                tokio::select! {
                    _ = source.run(mesh_tx) => {}
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
        let (membership, membership_tasks) = crate::membership::start(
            store.clone(),
            MembershipConfig {
                replica_id: cfg.replica_id.clone(),
                lease_ttl: cfg.lease_ttl,
                replicas_per_shard: cfg.replicas_per_shard,
                xds_addr: xds_addr.to_string(),
                admin_addr: admin_addr.to_string(),
            },
            membership_mesh,
            sync.clone(),
            shutdown_rx.clone(),
        );
        for t in membership_tasks {
            tasks.spawn(async move {
                t.await;
                Ok(())
            });
        }
        // The cross-zone catalog: lead this replica's shards (publish their
        // summaries), and follow every zone's.
        let catalog = Arc::new(CatalogStats::default());
        let lead = crate::catalog::publish::lead_shards(
            store.clone(),
            cfg.replica_id.clone(),
            membership.clone(),
            index.local_catalog(),
            CatalogConfig {
                interval: cfg.catalog_interval,
                ..CatalogConfig::default()
            },
            catalog.clone(),
            shutdown_rx.clone(),
        );
        tasks.spawn(async move {
            lead.await;
            Ok(())
        });
        let follow = crate::catalog::publish::watch_catalog(
            store.clone(),
            index.clone(),
            shutdown_rx.clone(),
        );
        tasks.spawn(async move {
            follow.await;
            Ok(())
        });

        let ads = AdsServer::new(
            snapshots.clone(),
            sync.clone(),
            metrics.clone(),
            cfg.default_env.clone(),
            cfg.stream_limits,
            synced,
            shutdown_rx.clone(),
            cfg.max_initial_syncs,
        )
        .with_membership(membership.clone())
        .with_trust_domain(cfg.trust_domain.clone());
        let secrets = mesh_identity
            .as_ref()
            .map(|m| crate::xds::secrets::Secrets::new(m.issuer.clone(), m.trust_domain.clone()));
        let ads = match &secrets {
            Some(s) => ads.with_secrets(s.clone()),
            None => ads,
        };
        // Responses are written from the resources' own buffers, without a
        // per-stream encoder buffer (`tributary_proto::wire::ads`).
        let ads = AdsService::new(ads).max_decoding_message_size(cfg.max_request_bytes);
        let federation = tributary_proto::federation::v1::federation_server::FederationServer::new(
            FederationService::new(
                index.clone(),
                metrics.clone(),
                cfg.heartbeat,
                cfg.federation,
                shutdown_rx.clone(),
            )
            .with_membership(membership.clone())
            .with_security(cfg.trust_domain.clone(), security_mesh.clone()),
        )
        .max_decoding_message_size(cfg.federation.max_message_bytes);
        tasks.spawn({
            let stop = stopped();
            let tls_metrics = tls_metrics.clone();
            async move {
                let server = tonic::transport::Server::builder()
                    .tcp_nodelay(true)
                    .http2_keepalive_interval(Some(Duration::from_secs(30)))
                    .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                    .add_service(ads)
                    .add_service(federation);
                match xds_tls {
                    None => {
                        server
                            .serve_with_incoming_shutdown(
                                tonic::transport::server::TcpIncoming::from(xds_listener),
                                stop,
                            )
                            .await
                    }
                    Some(t) => {
                        let incoming = tls::accept_tls(xds_listener, t, tls_metrics, "xds");
                        server
                            .serve_with_incoming_shutdown(
                                tokio_stream::wrappers::ReceiverStream::new(incoming),
                                stop,
                            )
                            .await
                    }
                }
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
            config_api,
            membership: membership.clone(),
            catalog: catalog.clone(),
            authz: AdminAuthz {
                enforce: admin_tls.is_some(),
                config: security_mesh,
                bootstrap: cfg.bootstrap_operators.clone(),
            },
        };
        // The CA's routes share the admin listener: the CSR API
        // (`identity::api::csr_routes`) and the operator's token and rotation API.
        // They are authorized like the rest: tokens and rotation need write on the
        // whole mesh; a CSR is authorized by the credential it carries.
        let admin_routes = admin::router_with(
            state,
            crate::identity::api::csr_routes(ca_api.clone())
                .merge(crate::identity::api::ca_admin_routes(ca_api.clone())),
        );
        // The CSR API alone, for peers without a certificate: the hub's certificate,
        // none asked for.
        let csr_tls = cfg
            .transport
            .files()
            .map(|files| crate::identity::csr_listener::server_tls(files, &cfg.trust_domain))
            .transpose()
            .context("loading the TLS files for --csr-addr")?;
        tasks.spawn(crate::identity::csr_listener::serve(
            csr_listeners,
            crate::identity::csr_listener::routes(ca_api.clone(), &cfg.identity.csr),
            csr_tls,
            tls_metrics.clone(),
            shutdown_rx.clone(),
        ));
        tasks.spawn({
            let stop = stopped();
            async move {
                let app = admin_routes.into_make_service_with_connect_info::<PeerAddr>();
                match admin_tls {
                    None => {
                        axum::serve(admin_listener, app)
                            .with_graceful_shutdown(stop)
                            .await
                    }
                    Some(t) => {
                        axum::serve(TlsListener::new(admin_listener, t, tls_metrics)?, app)
                            .with_graceful_shutdown(stop)
                            .await
                    }
                }
                .context("admin server")
            }
        });
        tasks.spawn({
            let (transport, stop) = (cfg.transport.clone(), stopped());
            let warn_csr = csr_addrs.clone();
            async move {
                transport
                    .warn_while_insecure(
                        "the hub",
                        [vec![xds_addr, admin_addr], warn_csr].concat(),
                        stop,
                    )
                    .await;
                Ok(())
            }
        });

        if cfg.sync_wait.is_zero() {
            ready.store(true, Ordering::Release);
        }
        info!(%xds_addr, %admin_addr, ?csr_addrs, environments = ?snapshots.environments(), "hub ready");
        Ok(Hub {
            xds_addr,
            admin_addr,
            csr_addrs,
            snapshots,
            sync,
            metrics,
            index,
            store,
            membership,
            catalog,
            secrets,
            ca: ca_api.ca.clone(),
            _state_dir: state_dir,
            shutdown,
            tasks,
        })
    }

    /// Stops accepting, ends every stream and waits for the tasks.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        // Streams end on the signal and the servers drain; give them a bounded time.
        // A restart in the same process may reopen the embedded store at once:
        // `Embedded::open` waits for this opening's database to close.
        drain(&mut self.tasks, Duration::from_secs(10)).await
    }

    /// Stops every task at once, without draining or deregistering: what a crash
    /// leaves behind (the replica's lease expires after its TTL). For tests.
    pub fn abort(mut self) {
        self.tasks.abort_all();
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

/// Waits up to `limit` for every task of a process to end, then aborts what is left:
/// the first task error, if any, else `Ok` (also when the limit ran out).
pub async fn drain(tasks: &mut JoinSet<anyhow::Result<()>>, limit: Duration) -> anyhow::Result<()> {
    let drained = tokio::time::timeout(limit, async {
        while let Some(r) = tasks.join_next().await {
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
    tasks.abort_all();
    drained.unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fleet reconnecting at once reaches a hub that is busy and accepts nothing for
    /// a while: every connect must still complete at once, up to the accept queue.
    /// With tokio's default queue (1,024) the connects past it were dropped, and the
    /// clients tried again only after their first SYN retransmit (1 s).
    #[tokio::test]
    async fn a_reconnect_storm_fits_the_accept_queue() {
        let n = 1_500u64;
        let limit = rlimit::increase_nofile_limit(n + 256).unwrap();
        assert!(
            limit >= n + 256,
            "open-files limit {limit} is below this test's {n} connections"
        );
        let backlog = HubConfig::local(Vec::new()).listen_backlog;
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), backlog).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut connects = JoinSet::new();
        for _ in 0..n {
            connects.spawn(tokio::net::TcpStream::connect(addr));
        }
        let mut streams = Vec::new();
        let all = async {
            while let Some(r) = connects.join_next().await {
                streams.push(r.unwrap().unwrap());
            }
        };
        tokio::time::timeout(Duration::from_millis(900), all)
            .await
            .unwrap_or_else(|_| panic!("connects still pending after 900 ms (a SYN was dropped)"));
        assert_eq!(streams.len() as u64, n);
        drop(listener);
    }
}
