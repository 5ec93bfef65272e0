//! `tributary-router`: parse flags → [`Router::start`] → wait for a signal → drain.
//!
//! Membership comes from the store the hubs use. Across processes that is etcd
//! (`--store etcd --etcd-endpoints ...`, a build with the `etcd` feature): the
//! embedded store is one file that one process holds locked, so a router on the
//! embedded store runs in the same process as its hubs (the in-process tests, and
//! the one-command mesh).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tributary_controlplane::config::parse_positive_duration;
use tributary_controlplane::identity::tls;
use tributary_shard_router::app::{Router, RouterConfig};
use tributary_shard_router::relay::RelayLimits;
use tributary_store::SharedStore;

/// The shard router: relays each xDS stream to a live replica of its (environment, zone) shard.
#[derive(Debug, Parser)]
#[command(name = "tributary-router", version)]
struct Args {
    /// xDS address (repeatable: e.g. 127.0.0.1:18010 and [::1]:18010, or [::]:18010 for dual-stack).
    #[arg(
        long = "listen",
        default_value = "127.0.0.1:18010",
        env = "TRIBUTARY_ROUTER_LISTEN",
        value_delimiter = ','
    )]
    listen: Vec<SocketAddr>,
    /// Admin HTTP address (/healthz, /readyz, /metrics, /status/routes).
    #[arg(
        long,
        default_value = "127.0.0.1:19010",
        env = "TRIBUTARY_ROUTER_ADMIN_ADDR"
    )]
    admin_addr: SocketAddr,
    /// The store the hubs register in: only `etcd` across processes.
    #[arg(long, default_value = "etcd", env = "TRIBUTARY_STORE")]
    store: String,
    /// etcd members, e.g. http://10.0.0.1:2379,http://[fd00::2]:2379.
    #[arg(long, value_delimiter = ',', env = "TRIBUTARY_ETCD_ENDPOINTS")]
    etcd_endpoints: Vec<String>,
    /// Largest first request read to route a stream (bytes).
    #[arg(long, default_value_t = tributary_shard_router::relay::DEFAULT_MAX_FIRST_REQUEST_BYTES)]
    max_first_request_bytes: usize,
    /// A client must send its whole first request within this.
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    first_request_timeout: Duration,
    /// Connecting to a replica may take this long.
    #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
    connect_timeout: Duration,
    /// A replica the router could not reach (connect failed, or its connection broke)
    /// gets no new streams for this long while its shard has another replica (so a
    /// crashed replica's clients move at once, not after its lease expires).
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    avoid_unreachable_for: Duration,
    /// Gone with the HTTP/2 relay (the router relays bytes and holds no HTTP/2
    /// windows); accepted, with a warning, so that an existing command line still starts.
    #[arg(long, hide = true)]
    stream_window: Option<String>,
    /// Gone with the HTTP/2 relay; accepted, with a warning.
    #[arg(long, hide = true)]
    max_streams_per_connection: Option<String>,
    /// Most connections being routed at once (connecting to their replica, once their
    /// first request is read); the rest wait their turn.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_pending_streams: u32,
    /// Once ready, write {"xds": [ADDR...], "admin": ADDR} (JSON) to this file.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// This router's certificate chain (PEM, leaf first) with a router SPIFFE id
    /// (spiffe://DOMAIN/router/NAME): served to clients, and presented to the hubs.
    #[arg(long, env = "TRIBUTARY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "TRIBUTARY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The trust bundle: the roots a client's and a hub's certificate must chain to (PEM).
    #[arg(long, env = "TRIBUTARY_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The SPIFFE trust domain of the mesh: peers' ids must be spiffe://DOMAIN/...
    #[arg(long, default_value = tls::DEFAULT_TRUST_DOMAIN, env = "TRIBUTARY_TRUST_DOMAIN")]
    trust_domain: String,
    /// Serve plaintext instead of mutual TLS, and relay to the hubs in plaintext (they
    /// must run with --insecure too): no identities, and only on loopback addresses
    /// (local development and tests). Warns at start and every minute.
    #[arg(long, env = "TRIBUTARY_INSECURE")]
    insecure: bool,
}

fn main() -> anyhow::Result<()> {
    tributary_controlplane::config::init_logging("info");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    for (flag, given) in [
        ("--stream-window", args.stream_window.is_some()),
        (
            "--max-streams-per-connection",
            args.max_streams_per_connection.is_some(),
        ),
    ] {
        if given {
            tracing::warn!(
                "{flag} is ignored: the router relays each connection as bytes and holds no HTTP/2 windows or streams of its own (docs/router.md)"
            );
        }
    }
    let files = tls::TlsFiles::from_flags(
        args.tls_cert.clone(),
        args.tls_key.clone(),
        args.tls_ca.clone(),
    )
    .map_err(anyhow::Error::msg)?;
    let transport = tls::Transport::from_flags(files, args.insecure).map_err(anyhow::Error::msg)?;
    let store = open_store(&args).await?;
    let cfg = RouterConfig {
        listen: args.listen.clone(),
        admin_addr: args.admin_addr,
        limits: RelayLimits {
            max_first_request_bytes: args.max_first_request_bytes,
            first_request_timeout: args.first_request_timeout,
            connect_timeout: args.connect_timeout,
            avoid_unreachable_for: args.avoid_unreachable_for,
        },
        max_pending_streams: args.max_pending_streams as usize,
        transport,
        trust_domain: args.trust_domain.clone(),
    };
    tracing::info!(?cfg, store = %store.describe(), "starting router");
    let router = Router::start(cfg, store).await?;
    if let Some(path) = &args.ready_file {
        let xds: Vec<String> = router.xds_addrs.iter().map(ToString::to_string).collect();
        let body = serde_json::json!({ "xds": xds, "admin": router.admin_addr.to_string() });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body.to_string())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }
    router
        .run_until(tributary_shard_router::app::shutdown_signal())
        .await
}

async fn open_store(args: &Args) -> anyhow::Result<SharedStore> {
    match args.store.as_str() {
        "etcd" => etcd(args).await,
        "embedded" => anyhow::bail!(
            "--store embedded: the embedded store is a file that one process holds locked, so a router in its own process cannot share it with the hubs; use --store etcd (hubs and router on the same etcd), or run the hubs and the router in one process"
        ),
        other => anyhow::bail!("--store {other:?}: expected etcd"),
    }
}

#[cfg(feature = "etcd")]
async fn etcd(args: &Args) -> anyhow::Result<SharedStore> {
    use std::sync::Arc;
    use tributary_store::etcd::{Etcd, EtcdConfig};
    if args.etcd_endpoints.is_empty() {
        anyhow::bail!("--store etcd needs --etcd-endpoints (e.g. http://127.0.0.1:2379)");
    }
    let c = EtcdConfig::new(args.etcd_endpoints.clone());
    Ok(Arc::new(Etcd::connect(&c).await.with_context(|| {
        format!(
            "connecting to etcd (--etcd-endpoints {})",
            c.endpoints.join(",")
        )
    })?))
}

#[cfg(not(feature = "etcd"))]
async fn etcd(_args: &Args) -> anyhow::Result<SharedStore> {
    anyhow::bail!(
        "--store etcd: this tributary-router was built without etcd support; build it with `cargo build -p tributary-shard-router --features etcd` (needs protoc: Debian protobuf-compiler)"
    )
}
