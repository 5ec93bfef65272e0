//! The whole mesh in one process (`tributary-mesh`): the embedded store, hub replicas
//! for every shard, the shard router in front of them, and file-mode agents.
//!
//! Every role is the one a production deployment runs apart ([`Hub`], [`Router`], the
//! agent's [`agent::run`]); this only wires them to one embedded store, which a single
//! process must hold (its file is locked), so that a new user sees sharding at work with
//! one command. Each agent follows the router's directory ([`agent::directory`]): it
//! streams each environment's services to the replicas of shard `(environment, its
//! zone)` only, and follows them as the assignment moves.

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
use tributary_store::SharedStore;
use tributary_store::embedded::{Embedded, EmbeddedConfig};

use crate::app::{Router, RouterConfig};

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
}

/// A running mesh.
#[derive(Debug)]
pub struct Mesh {
    pub store: SharedStore,
    /// `(replica id, hub)`, in start order.
    pub hubs: Vec<(String, Hub)>,
    pub router: Router,
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
            let hub = Hub::start(h)
                .await
                .with_context(|| format!("starting hub {id}"))?;
            hubs.push((id, hub));
        }
        let router = Router::start(cfg.router.clone(), store.clone()).await?;
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
        info!(hubs = hubs.len(), agents = cfg.agents.len(), "mesh started");
        Ok(Mesh {
            store,
            hubs,
            router,
            stop_agents,
            agents,
        })
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
        for (id, hub) in &self.hubs {
            out.push_str(&format!(
                "hub {id}: xDS {}, admin http://{} (tributary ctl shards --admin {})\n",
                hub.xds_addr, hub.admin_addr, hub.admin_addr
            ));
        }
        for s in self.router.table.routes() {
            let r: Vec<&str> = s.replicas.iter().map(|r| r.replica.as_str()).collect();
            out.push_str(&format!("shard {}: {}\n", s.shard, r.join(", ")));
        }
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
                    "cross-zone locality: {} (each zone's view, other zones through their east-west gateways: http://{}/config_dump?env={first})\n",
                    views.join(", "),
                    serving.admin_addr
                ));
            }
        }
        out
    }

    /// Stops the agents, the router, then the hubs.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop_agents.send(true);
        self.agents.abort_all();
        self.router.shutdown().await?;
        for (_, hub) in self.hubs {
            hub.shutdown().await?;
        }
        Ok(())
    }
}
