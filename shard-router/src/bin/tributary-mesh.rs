//! `tributary-mesh`: the whole mesh in one command — the embedded store, hub replicas
//! for every shard, the shard router and file-mode agents, and `tributary-proxy`
//! gateways and sidecars with example backends to `curl` through — printing where
//! proxies and the admin connect. See `docs/router.md` and [`tributary_shard_router::mesh`].
//!
//! (A binary of the router's crate rather than a `tributary` subcommand: the router
//! builds on the hub's crate, so the hub's binary cannot embed the router.)

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tributary_controlplane::config::parse_duration;
use tributary_shard_router::app::{RouterConfig, shutdown_signal};
use tributary_shard_router::mesh::{AgentSpec, Mesh, MeshConfig};
use tributary_shard_router::mesh_proxies::ProxiesConfig;

/// Runs the embedded store, hub replicas, the shard router and file-mode agents in one process.
#[derive(Debug, Parser)]
#[command(name = "tributary-mesh", version)]
struct Args {
    /// Config file or directory every hub reads (repeatable), e.g. examples/mesh.
    #[arg(long, required = true)]
    config: Vec<PathBuf>,
    /// The embedded store's directory; without it the store is in memory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Hub replicas to run.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    hubs: u32,
    /// Live replicas the assignment gives each shard.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    replicas_per_shard: u32,
    /// A replica that stops renewing its registration leaves after this.
    #[arg(long, default_value = "10s", value_parser = parse_ttl)]
    lease_ttl: Duration,
    /// Where the hubs listen (xDS and admin on free ports of this address).
    #[arg(long, default_value = "127.0.0.1")]
    hub_host: IpAddr,
    /// The router's xDS address: where proxies connect (repeatable).
    #[arg(
        long = "listen",
        default_value = "127.0.0.1:18000",
        value_delimiter = ','
    )]
    listen: Vec<SocketAddr>,
    /// The router's admin address.
    #[arg(long, default_value = "127.0.0.1:19010")]
    admin_addr: SocketAddr,
    /// A file-mode agent: ZONE:CLUSTER_ID:PATH (repeatable), e.g. az1:east-1:examples/agent.
    #[arg(long = "agent")]
    agents: Vec<AgentSpec>,
    /// Plaintext on loopback instead of mutual TLS on every hop (no identities, no
    /// authorization). Without it, the hubs' CA (its root in the store, so in
    /// --state-dir) issues the hubs, the router and the agents their certificates.
    #[arg(long)]
    insecure: bool,
    /// The `tributary-proxy` binary for the gateways and sidecars; default: next to
    /// this binary (`cargo build -p tributary-proxy` puts it there).
    #[arg(long)]
    proxy_bin: Option<PathBuf>,
    /// Start no proxies and no example backends (only the control plane).
    #[arg(long, conflicts_with = "proxy_bin")]
    no_proxies: bool,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

fn main() -> anyhow::Result<()> {
    tributary_controlplane::config::init_logging("warn");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let proxies = if args.no_proxies {
        None
    } else {
        let binary = match args.proxy_bin {
            Some(p) => p,
            None => std::env::current_exe()?.with_file_name("tributary-proxy"),
        };
        Some(ProxiesConfig { binary })
    };
    let mut router = RouterConfig::local();
    router.listen = args.listen;
    router.admin_addr = args.admin_addr;
    let cfg = MeshConfig {
        config: args.config,
        state_dir: args.state_dir,
        hubs: args.hubs as usize,
        replicas_per_shard: args.replicas_per_shard as usize,
        lease_ttl: args.lease_ttl,
        hub_host: args.hub_host,
        router,
        agents: args.agents,
        insecure: args.insecure,
        proxies,
    };
    let mesh = Mesh::start(cfg).await?;
    // Show the assignment once it has settled — every shard with its replicas, every
    // hub serving, loads within one of each other (the assigner rebalances as hubs
    // join) — or whatever it is after a few seconds.
    let mut applied = mesh.router.table.applied();
    let per_shard = (args.replicas_per_shard as usize).min(args.hubs as usize);
    let slots = |routes: &[_]| routes.len() * per_shard;
    let settle = async {
        loop {
            let routes = mesh.router.table.routes();
            let mut load: std::collections::HashMap<&str, usize> = Default::default();
            for s in &routes {
                for r in &s.replicas {
                    *load.entry(r.replica.as_str()).or_default() += 1;
                }
            }
            let balanced = load
                .values()
                .max()
                .zip(load.values().min())
                .is_some_and(|(a, b)| a - b <= 1);
            if !routes.is_empty()
                && load.len() == (args.hubs as usize).min(slots(&routes))
                && balanced
                && routes.iter().all(|s| {
                    s.replicas.len() == (args.replicas_per_shard as usize).min(args.hubs as usize)
                })
            {
                break;
            }
            if applied.changed().await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), settle).await;
    println!("{}", mesh.describe());
    println!("Ctrl-C stops it.");
    shutdown_signal().await;
    mesh.shutdown().await
}
