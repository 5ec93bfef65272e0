//! The whole mesh in one process (`tributary-mesh`): the embedded store, hub replicas
//! for every shard, the shard router in front of them, and file-mode agents.
//!
//! Every role is the one a production deployment runs apart ([`Hub`], [`Router`], the
//! agent's [`agent::run`]); this only wires them to one embedded store, which a single
//! process must hold (its file is locked), so that a new user sees sharding at work with
//! one command. Each agent follows the router's directory ([`agent::directory`]): it
//! streams each environment's services to the replicas of shard `(environment, its
//! zone)` only, and follows them as the assignment moves.
//!
//! Every hop is mutual TLS unless `--insecure`: the hubs' certificate authority, its
//! root generated into the store (the state dir), issues each hub, the router and each
//! agent its identity ([`crate::pki`]), so a new user sees the secure path first. The
//! example's agents are in its registry of remote clusters
//! (`examples/mesh/remote-clusters.yaml`), or the hubs would refuse them.
//!
//! With [`MeshConfig::proxies`], it also runs the data plane a new user can `curl`:
//! example backends on the config's loopback endpoints ([`crate::mesh_backends`]) and
//! `tributary-proxy` gateways and sidecars connected through the router
//! ([`crate::mesh_proxies`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::info;
use tributary_controlplane::agent::{self, AgentConfig, ClusterState};
use tributary_controlplane::app::{Hub, HubConfig, StoreBackend};
use tributary_controlplane::config::watch::WatchConfig;
use tributary_controlplane::identity::Identity;
use tributary_controlplane::identity::tls::{self, ClientTls, TlsFiles, Transport};
use tributary_store::SharedStore;
use tributary_store::embedded::{Embedded, EmbeddedConfig};

use crate::app::{Router, RouterConfig};
use crate::mesh_backends::{self, Backends};
use crate::mesh_proxies::{self, Proxies, ProxiesConfig};
use crate::pki::MeshPki;

/// The router's name in its SPIFFE id (`router/mesh`).
pub const ROUTER_NAME: &str = "mesh";
/// The operator the mesh issues a certificate for (`operator/admin`): every hub's
/// bootstrap operator, allowed to read and write through the admin APIs.
pub const OPERATOR_NAME: &str = "admin";
/// The namespace and service account of the sidecar certificate issued per environment.
pub const PROXY_NAMESPACE: &str = "default";

/// One file-mode agent: a remote cluster exported from static files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSpec {
    pub zone: String,
    pub cluster_id: String,
    pub path: PathBuf,
}

impl std::str::FromStr for AgentSpec {
    type Err = String;

    /// `ZONE:CLUSTER_ID:PATH`, e.g. `az1:east-1:examples/agent`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(zone), Some(cluster_id), Some(path))
                if !zone.is_empty() && !cluster_id.is_empty() && !path.is_empty() =>
            {
                Ok(AgentSpec {
                    zone: zone.into(),
                    cluster_id: cluster_id.into(),
                    path: path.into(),
                })
            }
            _ => Err(format!(
                "{s:?}: expected ZONE:CLUSTER_ID:PATH, e.g. az1:east-1:examples/agent"
            )),
        }
    }
}

/// What `tributary-mesh` starts.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The config files or directories every hub reads (`--config`).
    pub config: Vec<PathBuf>,
    /// The embedded store's directory (`--state-dir`); `None`: in memory.
    pub state_dir: Option<PathBuf>,
    /// Hub replicas (`--hubs`).
    pub hubs: usize,
    pub replicas_per_shard: usize,
    pub lease_ttl: Duration,
    /// The hubs' xDS and admin addresses (port 0: any free port).
    pub hub_host: std::net::IpAddr,
    pub router: RouterConfig,
    pub agents: Vec<AgentSpec>,
    /// Plaintext on loopback (`--insecure`) instead of mutual TLS on every hop.
    pub insecure: bool,
    /// Run `tributary-proxy` gateways and sidecars and the example backends
    /// (`None`: `--no-proxies`).
    pub proxies: Option<ProxiesConfig>,
}

/// A running mesh.
#[derive(Debug)]
pub struct Mesh {
    pub store: SharedStore,
    /// `(replica id, hub)`, in start order.
    pub hubs: Vec<(String, Hub)>,
    pub router: Router,
    /// The certificates (`None` with `--insecure`).
    pub pki: Option<Arc<MeshPki>>,
    /// The environments of the config (one sidecar certificate each).
    pub environments: Vec<String>,
    /// The example backends (with [`MeshConfig::proxies`]).
    pub backends: Option<Backends>,
    /// The `tributary-proxy` processes (with [`MeshConfig::proxies`]).
    pub proxies: Option<Proxies>,
    stop_agents: watch::Sender<bool>,
    agents: JoinSet<()>,
}

impl Mesh {
    pub async fn start(cfg: MeshConfig) -> anyhow::Result<Mesh> {
        if cfg.hubs == 0 {
            anyhow::bail!("--hubs must be at least 1");
        }
        let embedded = EmbeddedConfig::default();
        let store: SharedStore = match &cfg.state_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating --state-dir {}", dir.display()))?;
                let file = tributary_store::embedded::file_in(dir);
                Arc::new(Embedded::open(&file, embedded).with_context(|| {
                    format!(
                        "opening the embedded store in --state-dir {}",
                        dir.display()
                    )
                })?)
            }
            None => Arc::new(Embedded::in_memory(embedded)?),
        };
        let (_, config) = tributary_controlplane::config::watch::load(&cfg.config)
            .map_err(|e| anyhow::anyhow!("--config: {e}"))?;
        let environments: Vec<String> = config.environments.keys().cloned().collect();
        let hub_defaults = HubConfig::local(cfg.config.clone());
        let trust_domain = hub_defaults.identity.ca.trust_domain.clone();
        let pki = if cfg.insecure {
            None
        } else {
            let pki = MeshPki::open(
                store.clone(),
                hub_defaults.identity.ca.clone(),
                cfg.state_dir.as_ref().map(|d| d.join("pki")),
            )
            .await?;
            for env in &environments {
                pki.issue(
                    &format!("proxy-{env}"),
                    Identity::Workload {
                        env: env.clone(),
                        namespace: PROXY_NAMESPACE.into(),
                        service_account: PROXY_NAMESPACE.into(),
                    },
                )
                .await?;
            }
            pki.issue(
                "operator",
                Identity::Operator {
                    name: OPERATOR_NAME.into(),
                },
            )
            .await?;
            Some(Arc::new(pki))
        };
        let transport = async |name: &str, identity: Identity| -> anyhow::Result<Transport> {
            Ok(match &pki {
                None => Transport::Insecure,
                Some(pki) => Transport::Mtls(pki.issue(name, identity).await?),
            })
        };
        let mut hubs = Vec::new();
        for i in 0..cfg.hubs {
            let id = format!("hub-{}", i + 1);
            let mut h = HubConfig::local(cfg.config.clone());
            h.xds_addr = SocketAddr::new(cfg.hub_host, 0);
            h.admin_addr = SocketAddr::new(cfg.hub_host, 0);
            h.store = StoreBackend::Shared(store.clone());
            h.replica_id = id.clone();
            h.replicas_per_shard = cfg.replicas_per_shard;
            h.lease_ttl = cfg.lease_ttl;
            h.trust_domain = trust_domain.clone();
            h.transport = transport(
                &id,
                Identity::Hub {
                    replica: id.clone(),
                },
            )
            .await?;
            if pki.is_some() {
                // By name: the hub matches `operator/NAME` certificates of its trust domain.
                h.bootstrap_operators = vec![OPERATOR_NAME.to_string()];
            }
            let hub = Hub::start(h)
                .await
                .with_context(|| format!("starting hub {id}"))?;
            hubs.push((id, hub));
        }
        let mut router_cfg = cfg.router.clone();
        router_cfg.trust_domain = trust_domain.clone();
        router_cfg.transport = transport(
            "router",
            Identity::Router {
                name: ROUTER_NAME.into(),
            },
        )
        .await?;
        let router = Router::start(router_cfg, store.clone()).await?;
        let (stop_agents, stop) = watch::channel(false);
        let mut agents = JoinSet::new();
        for spec in &cfg.agents {
            let mesh = agent::file::load(std::slice::from_ref(&spec.path))
                .map_err(|e| anyhow::anyhow!("agent {}: {e}", spec.cluster_id))?;
            let (tx, rx) = watch::channel(Arc::new(agent::file::cluster_state(
                &mesh,
                &ClusterState::default(),
                std::time::SystemTime::now(),
            )));
            agents.spawn(agent::file::run(
                vec![spec.path.clone()],
                WatchConfig::default(),
                tx,
            ));
            let directory = format!("http://{}", router.xds_addrs[0]);
            let mut a = AgentConfig::new(directory.clone(), &spec.cluster_id);
            a.zone = spec.zone.clone();
            if let Transport::Mtls(files) = transport(
                &format!("agent-{}", spec.cluster_id),
                Identity::Agent {
                    cluster: spec.cluster_id.clone(),
                },
            )
            .await?
            {
                a.tls = Some(
                    ClientTls::load(&files, &trust_domain, tls::ALPN_GRPC).with_context(|| {
                        format!("agent {}: loading its certificate", spec.cluster_id)
                    })?,
                );
            }
            let telemetry = Arc::new(agent::admin::Telemetry::new(&a, agent::new_incarnation()));
            let mut stop = stop.clone();
            agents.spawn(agent::directory::follow(
                a,
                directory,
                rx,
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
                telemetry,
            ));
        }
        if let Some(pki) = &pki {
            let mut stop = stop.clone();
            agents.spawn(pki.clone().keep_renewed(async move {
                let _ = stop.wait_for(|s| *s).await;
            }));
        }
        // From here on, a failure drops what was started (proxies are killed by pid).
        let (backends, proxies) = match &cfg.proxies {
            None => (None, None),
            Some(p) => {
                let backends = mesh_backends::start(mesh_backends::plan(&config)).await?;
                let proxies = Proxies::start(
                    p,
                    mesh_proxies::plan(&config),
                    router.xds_addrs[0],
                    pki.as_deref(),
                    cfg.state_dir.as_ref().map(|d| d.join("proxies")),
                )
                .await?;
                (Some(backends), Some(proxies))
            }
        };
        info!(
            hubs = hubs.len(),
            agents = cfg.agents.len(),
            mtls = pki.is_some(),
            proxies = proxies.as_ref().map_or(0, |p| p.running.len()),
            "mesh started"
        );
        Ok(Mesh {
            store,
            hubs,
            router,
            pki,
            environments,
            backends,
            proxies,
            stop_agents,
            agents,
        })
    }

    /// The files of an identity the mesh issued (`proxy-<env>`, `operator`, `router`,
    /// `hub-<n>`, `agent-<cluster>`); `None` with `--insecure`.
    pub fn files(&self, name: &str) -> Option<TlsFiles> {
        self.pki
            .as_ref()
            .map(|p| crate::pki::files_in(p.dir(), name))
    }

    /// Where proxies and operators connect, for the terminal.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let xds: Vec<String> = self
            .router
            .xds_addrs
            .iter()
            .map(ToString::to_string)
            .collect();
        out.push_str(&format!(
            "proxies (xDS, SotW and Delta): {}  — node metadata \"tributary.io/env\" and node.locality.zone pick the shard\n",
            xds.join(", ")
        ));
        out.push_str(&format!(
            "router admin:                  http://{}/status/routes, /metrics\n",
            self.router.admin_addr
        ));
        let (scheme, admin_tls) = match self.files("operator") {
            None => ("http", String::new()),
            Some(f) => (
                "https",
                format!(
                    " --tls-cert {} --tls-key {} --tls-ca {}",
                    f.cert.display(),
                    f.key.display(),
                    f.ca.display()
                ),
            ),
        };
        match &self.pki {
            None => out.push_str(
                "transport: plaintext (--insecure): no identities, no authorization; loopback only\n",
            ),
            Some(pki) => {
                out.push_str(&format!(
                    "transport: mutual TLS on every hop; certificates of trust domain {} in {} (renewed at half-life)\n",
                    pki.trust_domain(),
                    pki.dir().display()
                ));
                for env in &self.environments {
                    let f = crate::pki::files_in(pki.dir(), &format!("proxy-{env}"));
                    out.push_str(&format!(
                        "  a {env} sidecar ({}): cert {}, key {}, trust bundle {}\n",
                        pki.id(Identity::Workload {
                            env: env.clone(),
                            namespace: PROXY_NAMESPACE.into(),
                            service_account: PROXY_NAMESPACE.into(),
                        }),
                        f.cert.display(),
                        f.key.display(),
                        f.ca.display()
                    ));
                }
                out.push_str(&format!(
                    "  the admin APIs as {}: {}/operator/{{cert,key,ca}}.pem\n",
                    pki.id(Identity::Operator {
                        name: OPERATOR_NAME.into()
                    }),
                    pki.dir().display()
                ));
            }
        }
        for (id, hub) in &self.hubs {
            out.push_str(&format!(
                "hub {id}: xDS {}, admin {scheme}://{} (tributary ctl shards --admin {}{admin_tls})\n",
                hub.xds_addr, hub.admin_addr, hub.admin_addr
            ));
        }
        for s in self.router.table.routes() {
            let r: Vec<&str> = s.replicas.iter().map(|r| r.replica.as_str()).collect();
            out.push_str(&format!("shard {}: {}\n", s.shard, r.join(", ")));
        }
        out.push_str(&self.describe_proxies());
        // Zones with load assignments of their own: the other zones through their
        // east-west gateways (docs/locality.md).
        if let Some((_, hub)) = self.hubs.first() {
            let views: Vec<String> = hub
                .snapshots
                .environments()
                .into_iter()
                .filter(|e| e.contains('/'))
                .collect();
            if let Some(first) = views.first() {
                // Point at a replica that serves that shard: only it holds the zone's
                // endpoints (agents feed each replica its own shards).
                let serving = self
                    .router
                    .table
                    .routes()
                    .into_iter()
                    .find(|s| s.shard == *first)
                    .and_then(|s| s.replicas.first().map(|r| r.replica.clone()))
                    .and_then(|id| self.hubs.iter().find(|(h, _)| *h == id))
                    .map_or(hub, |(_, h)| h);
                out.push_str(&format!(
                    "cross-zone locality: {} (each zone's view, other zones through their east-west gateways: {scheme}://{}/config_dump?env={first})\n",
                    views.join(", "),
                    serving.admin_addr
                ));
            }
        }
        out
    }

    /// The proxies, the backends and the `curl` commands that reach them.
    fn describe_proxies(&self) -> String {
        let (Some(proxies), Some(backends)) = (&self.proxies, &self.backends) else {
            return String::new();
        };
        let mut out = String::new();
        for b in &backends.specs {
            out.push_str(&format!("example backend {}: {}\n", b.name, b.answer));
        }
        for p in &proxies.running {
            out.push_str(&format!(
                "tributary-proxy {} (pid {}): admin http://{}/ready, /config_dump; log {}\n",
                p.spec.name,
                p.pid(),
                p.admin,
                p.log.display()
            ));
        }
        out.push_str(
            "through the mesh (each answer names the backend, its environment and zone):\n",
        );
        for c in proxies.curls() {
            out.push_str(&format!("  {c}\n"));
        }
        out
    }

    /// Stops the proxies (killed by pid) and the example backends, the agents, the
    /// router, then the hubs.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(p) = self.proxies.take() {
            p.stop();
        }
        self.backends = None;
        let _ = self.stop_agents.send(true);
        self.agents.abort_all();
        self.router.shutdown().await?;
        for (_, hub) in self.hubs {
            hub.shutdown().await?;
        }
        Ok(())
    }
}
