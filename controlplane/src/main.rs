//! `tributary`: the hub binary. Thin: flags → [`HubConfig`] → [`Hub::start`] → wait
//! for a signal → drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::sync::Arc;

use tributary_controlplane::agent::{self, AgentConfig, ClusterState};
use tributary_controlplane::app::{Hub, HubConfig, StoreBackend};
use tributary_controlplane::config::watch::{WatchConfig, WatchMode};
use tributary_controlplane::config::{self, parse_duration, parse_positive_duration};
use tributary_controlplane::identity::tls;
use tributary_controlplane::index::debounce::DebounceConfig;
use tributary_controlplane::xds::server::StreamLimits;

#[derive(Debug, Parser)]
#[command(
    name = "tributary",
    version,
    about = "Tributary: a sharded multi-cluster service-mesh control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a hub: serve xDS for the mesh described by config files.
    Hub(HubArgs),
    /// Run a remote agent: stream one cluster's services and endpoints to a hub.
    Remote(RemoteArgs),
    /// Show a hub's status: federated clusters, connected proxies, environments (snapshots) or shards (the assignment).
    Status {
        #[command(subcommand)]
        what: StatusWhat,
        /// The hub's admin address.
        #[arg(
            long,
            global = true,
            default_value = "127.0.0.1:19001",
            env = "TRIBUTARY_ADMIN_ADDR"
        )]
        admin: String,
        /// Print the raw JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Config through a hub's admin API (apply, get, delete, diff, validate) and the
    /// shard assignment.
    Ctl(CtlArgs),
    /// Join tokens for peers without a service account (create, revoke).
    Token(tributary_controlplane::identity::cli::TokenArgs),
    /// The certificate authority: status, rotation of the root or an intermediate.
    Ca(tributary_controlplane::identity::cli::CaArgs),
    /// Request a certificate from a hub's CSR API (and keep it renewed).
    Cert(tributary_controlplane::identity::cli::CertArgs),
    /// Validate config files and exit (0: valid; 1: errors, printed one per line).
    Validate {
        /// Config files or directories of *.yaml / *.yml.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, Subcommand)]
enum StatusWhat {
    /// Federated clusters: connected or in grace, version, counts, lag.
    Clusters,
    /// Connected xDS clients: per type, sent / ACKed versions and NACKs.
    Sync,
    /// Environments: snapshot sequence and resource counts.
    Environments,
}

#[derive(Debug, clap::Args)]
struct CtlArgs {
    #[command(subcommand)]
    command: CtlCommand,
    /// The hub's admin address.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:19001",
        env = "TRIBUTARY_ADMIN_ADDR"
    )]
    admin: String,
    /// Output: table, json or yaml.
    #[arg(short = 'o', long = "output", global = true, default_value = "table")]
    output: tributary_controlplane::ctl::Output,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Mutual TLS: this process's certificate, its key and the trust bundle (PEM files,
/// reloaded when they change), and the SPIFFE trust domain of every peer.
#[derive(Debug, Clone, clap::Args)]
struct TlsArgs {
    /// This process's certificate chain (PEM, leaf first) with its SPIFFE id.
    #[arg(long, global = true, env = "TRIBUTARY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, global = true, env = "TRIBUTARY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The trust bundle: the roots a peer's certificate must chain to (PEM).
    #[arg(long, global = true, env = "TRIBUTARY_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The SPIFFE trust domain of the mesh: peers' ids must be spiffe://DOMAIN/...
    #[arg(long, global = true, default_value = tls::DEFAULT_TRUST_DOMAIN, env = "TRIBUTARY_TRUST_DOMAIN")]
    trust_domain: String,
}

impl TlsArgs {
    fn files(&self) -> anyhow::Result<Option<tls::TlsFiles>> {
        tls::TlsFiles::from_flags(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_ca.clone(),
        )
        .map_err(anyhow::Error::msg)
    }

    /// The client side: mutual TLS when the files are given, else plaintext.
    fn client(&self, alpn: &[&[u8]]) -> anyhow::Result<Option<tls::ClientTls>> {
        self.files()?
            .map(|f| tls::ClientTls::load(&f, &self.trust_domain, alpn))
            .transpose()
            .context("loading the TLS files")
    }
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Apply the objects of YAML files (a file, or a directory's *.yaml): validated
    /// with the stored config, written all or nothing.
    Apply {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
    },
    /// Show stored objects of a kind (Service, Endpoints, Route, Gateway, Sidecar,
    /// Environment), or one by name.
    Get {
        kind: String,
        name: Option<String>,
        /// Only this environment.
        #[arg(long = "env")]
        env: Option<String>,
    },
    /// Delete one object (refused if what remains would be invalid).
    Delete {
        kind: String,
        name: String,
        #[arg(long = "env", default_value = config::DEFAULT_ENVIRONMENT)]
        env: String,
        #[arg(short = 'n', long, default_value = config::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// Show what applying the files would change (exit 1 when something differs).
    Diff {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
    },
    /// Validate files against the stored config without writing (exit 1 on errors).
    Validate {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
    },
    /// The shard assignment: live replicas, the assigner, each shard's replicas.
    Shards,
}

/// Which store a hub uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    Embedded,
    Etcd,
}

/// The default replica id: the host's name.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "hub".to_string())
}

#[derive(Debug, clap::Args)]
struct HubArgs {
    /// Config file or directory of *.yaml / *.yml (repeatable). Without it, the config
    /// is read from the store (written with `tributary ctl apply`).
    #[arg(long = "config", env = "TRIBUTARY_CONFIG")]
    config: Vec<PathBuf>,
    /// The store: `embedded` (a file in --state-dir; no external service) or `etcd`.
    #[arg(long, value_enum, default_value = "embedded", env = "TRIBUTARY_STORE")]
    store: StoreKind,
    /// etcd members (with --store etcd), e.g. http://10.0.0.1:2379,http://[fd00::2]:2379.
    #[arg(long, value_delimiter = ',', env = "TRIBUTARY_ETCD_ENDPOINTS")]
    etcd_endpoints: Vec<String>,
    /// Revisions of history the embedded store keeps for watches to resume from.
    #[arg(long, default_value_t = tributary_store::embedded::DEFAULT_HISTORY, value_parser = clap::value_parser!(u64).range(100..))]
    store_history: u64,
    /// This replica's id (its registration and known-cluster list in the store).
    #[arg(long, default_value_t = hostname(), env = "TRIBUTARY_REPLICA_ID")]
    replica_id: String,
    /// A crashed replica's registration expires after this (whole seconds, at least 2s).
    #[arg(long, default_value = "10s", value_parser = parse_lease_ttl)]
    lease_ttl: Duration,
    /// Live replicas the assignment gives each shard.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    replicas_per_shard: u32,
    /// A shard leader writes its changed catalog summaries this long after a change
    /// (the debounce of cross-zone summaries: at most one write round per interval).
    #[arg(long, default_value = "500ms", value_parser = parse_positive_duration)]
    catalog_interval: Duration,
    /// Address for xDS (ADS, SotW and Delta); `[::]:18000` for IPv6/dual-stack.
    #[arg(long, default_value = "127.0.0.1:18000", env = "TRIBUTARY_XDS_ADDR")]
    xds_addr: SocketAddr,
    /// Address for the admin HTTP endpoint (/healthz, /readyz, /metrics, /status/*).
    #[arg(long, default_value = "127.0.0.1:19001", env = "TRIBUTARY_ADMIN_ADDR")]
    admin_addr: SocketAddr,
    /// How config files are watched: `auto` (inotify, falling back to polling when it
    /// cannot start) or `poll` (always poll, e.g. on NFS).
    #[arg(long = "watch", default_value = "auto")]
    watch_mode: WatchMode,
    /// How often config files are checked when polling (e.g. 200ms, 1s).
    #[arg(long, default_value = "500ms", value_parser = parse_positive_duration)]
    poll_interval: Duration,
    /// After a config file event, wait this long for the rest of its burst.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    watch_debounce: Duration,
    /// Environment of proxies whose node metadata has no "tributary.io/env".
    #[arg(long, default_value = config::DEFAULT_ENVIRONMENT)]
    default_env: String,
    /// Once ready, write {"xds": ADDR, "admin": ADDR} (JSON) to this file.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Push after this much quiet following a change (trailing-edge debounce).
    #[arg(long, default_value = "100ms", value_parser = parse_positive_duration)]
    debounce_quiet: Duration,
    /// ... but never later than this after the first change of a burst.
    #[arg(long, default_value = "1s", value_parser = parse_positive_duration)]
    debounce_cap: Duration,
    /// Keep a disconnected cluster's endpoints this long before withdrawing them.
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    grace: Duration,
    /// Federation heartbeat interval; an agent silent for three is dropped.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    heartbeat: Duration,
    #[command(flatten)]
    tls: TlsArgs,
    /// Serve plaintext instead of mutual TLS: no identities, no authorization, and
    /// only on loopback addresses (local development and tests). Warns at start and
    /// every minute.
    #[arg(long, env = "TRIBUTARY_INSECURE")]
    insecure: bool,
    /// The NAME of an operator (certificate id spiffe://DOMAIN/operator/NAME; the
    /// full id of this trust domain is accepted too) allowed to read and write
    /// everything whatever the config's Operator objects say (repeatable): who
    /// writes the first Operator objects into a store. Keep the list short.
    #[arg(
        long = "bootstrap-operator",
        env = "TRIBUTARY_BOOTSTRAP_OPERATORS",
        value_delimiter = ','
    )]
    bootstrap_operators: Vec<String>,
    /// After start, hold xDS responses this long so agents can resync first (a
    /// restarted hub must not tell proxies that federated endpoints vanished).
    /// 0s when no agents feed this hub.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    sync_wait: Duration,
    /// Mark a client STALE in /status/sync when a response waits this long for its ACK.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    stale_after: Duration,
    /// Streams doing their initial sync at once; more wait their turn (reconnect storms).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    max_initial_syncs: u32,
    /// The xDS listener's accept queue (connections completed before the hub accepts
    /// them; the kernel caps it at net.core.somaxconn).
    #[arg(long, default_value_t = tributary_controlplane::app::DEFAULT_LISTEN_BACKLOG, value_parser = clap::value_parser!(u32).range(1..))]
    listen_backlog: u32,
    /// Most resource names one xDS stream may subscribe to per type; a client asking
    /// for more gets RESOURCE_EXHAUSTED (wildcards are not counted).
    #[arg(long, default_value_t = StreamLimits::default().max_names_per_type)]
    max_names_per_type: usize,
    /// Most resource names a NACK record in /status/sync keeps.
    #[arg(long, default_value_t = StreamLimits::default().nack_record_names)]
    nack_record_names: usize,
    /// Largest Delta xDS response (bytes of resources) one stream builds at once; a
    /// bigger diff goes out in several responses, each after the previous one's ACK.
    /// Responses are not copied into a per-stream buffer, so this costs no memory per
    /// stream; keep it under clients' 4 MiB gRPC receive limit (framing adds a few %).
    #[arg(long, default_value_t = StreamLimits::default().max_response_bytes, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..=(4 << 20)))]
    max_response_bytes: usize,
    /// Largest xDS request (bytes) the hub decodes; a larger one ends its stream.
    #[arg(long, default_value_t = tributary_controlplane::app::DEFAULT_MAX_REQUEST_BYTES)]
    max_request_bytes: usize,
    /// Conformance tests only: ports named test-invalid* yield clusters Envoy rejects.
    #[arg(long, hide = true)]
    test_hooks: bool,
    /// Tests and local trials only: issue workload certificates from a root generated
    /// at start (its certificate written to DIR/root.pem) instead of the hub's CA.
    #[arg(long, hide = true, value_name = "DIR")]
    test_issuer: Option<PathBuf>,
    /// Mesh mTLS: serve workload certificates from the hub's CA over SDS and give
    /// sidecars' clusters and inbound listeners mTLS (per environment, `mtls: false`
    /// opts out). Off by default: gRPC proxyless clients cannot use SDS-based clusters.
    #[arg(long, env = "TRIBUTARY_MESH_MTLS")]
    mesh_mtls: bool,
    /// The certificate authority and the CSR API (docs/security.md).
    #[command(flatten)]
    identity: Box<tributary_controlplane::identity::cli::HubIdentityArgs>,
    /// The hub's state: the embedded store (`store.redb`: config, the clusters that
    /// fed it, membership) and a lock (one hub per dir). Give it a persistent volume.
    #[arg(
        long,
        default_value = "/var/lib/tributary",
        env = "TRIBUTARY_STATE_DIR"
    )]
    state_dir: PathBuf,
    /// Most changes in one federation batch; a larger one is rejected (not applied).
    /// Advertised to agents, which split their batches to fit.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    federation_max_batch: u32,
    /// Most bytes of one federation message (the decode limit); advertised to agents.
    #[arg(long, default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(4096..=(1 << 30)))]
    federation_max_message_bytes: u64,
    /// Most endpoints in one federated endpoint set; a larger set is rejected as an item.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    federation_max_endpoints_per_set: u32,
}

#[derive(Debug, clap::Args)]
struct RemoteArgs {
    /// The hub's gRPC address (federation is served on the xDS port).
    #[arg(long, default_value = "http://127.0.0.1:18000", env = "TRIBUTARY_HUB")]
    hub: String,
    /// Follow the shard router's directory at this address instead of --hub: stream
    /// each environment's services to every replica of shard (environment, --zone),
    /// following replicas as they join and leave. Needs --zone.
    #[arg(long, env = "TRIBUTARY_ROUTER")]
    router: Option<String>,
    /// This cluster's id: unique across the mesh.
    #[arg(long, env = "TRIBUTARY_CLUSTER_ID")]
    cluster_id: String,
    #[arg(long, default_value = "", env = "TRIBUTARY_REGION")]
    region: String,
    /// Default zone of endpoints that name none (Kubernetes: also the nodes' zone labels).
    #[arg(long, default_value = "", env = "TRIBUTARY_ZONE")]
    zone: String,
    #[arg(long, default_value = "")]
    network: String,
    /// Export the services of these YAML files (same format as the hub's config)
    /// instead of watching Kubernetes.
    #[arg(long = "file", conflicts_with = "kubeconfig")]
    files: Vec<PathBuf>,
    /// Watch the Kubernetes API with this kubeconfig (default: in-cluster config or
    /// $KUBECONFIG).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Export services of namespaces without a "tributary.io/env" label into this
    /// environment (default: do not export them).
    #[arg(long)]
    default_env: Option<String>,
    /// List Kubernetes objects from the apiserver's watch cache (resourceVersion=0,
    /// unpaged, as client-go informers do) instead of quorum reads from etcd in pages.
    #[arg(long)]
    kube_list_from_cache: bool,
    /// Changes within this window are sent in one batch.
    #[arg(long, default_value = "50ms", value_parser = parse_positive_duration)]
    debounce: Duration,
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    heartbeat: Duration,
    /// The first reconnect delay's cap (each delay is drawn uniformly below its cap,
    /// which doubles after each failed session up to --backoff-max).
    #[arg(long, default_value = "100ms", value_parser = parse_positive_duration)]
    backoff_initial: Duration,
    /// The largest reconnect delay's cap: after a partition heals, the agent is back
    /// within this.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    backoff_max: Duration,
    /// Connecting to the hub (or the router) may take this long before the attempt
    /// counts as failed (a partition drops packets rather than refusing them).
    #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
    connect_timeout: Duration,
    /// How --file sources are watched: `auto` (inotify, falling back to polling when
    /// it cannot start) or `poll` (always poll, e.g. on NFS).
    #[arg(long = "watch", default_value = "auto")]
    watch_mode: WatchMode,
    /// How often --file sources are checked when polling.
    #[arg(long, default_value = "500ms", value_parser = parse_positive_duration)]
    poll_interval: Duration,
    /// Most changes per batch (the hub's advertised limit applies when lower).
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_batch: u32,
    /// Most encoded bytes per batch (the hub's advertised limit applies when lower).
    #[arg(long, default_value_t = 256 << 10, value_parser = clap::value_parser!(u64).range(4096..=(1 << 30)))]
    max_batch_bytes: u64,
    /// Serve /healthz, /metrics and /status here (e.g. 0.0.0.0:19002); off by default.
    #[arg(long, env = "TRIBUTARY_AGENT_ADMIN_ADDR")]
    admin_addr: Option<SocketAddr>,
    /// After a --file event, wait this long for the rest of its burst.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    watch_debounce: Duration,
    /// Mutual TLS to the hub (and the router): a certificate of spiffe://DOMAIN/cluster/CLUSTER-ID.
    /// Without the files the agent speaks plaintext (to a hub started with --insecure).
    #[command(flatten)]
    tls: TlsArgs,
}

fn parse_lease_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(2) {
        return Err("must be at least 2s (etcd's shortest lease)".into());
    }
    Ok(d)
}

async fn ctl(args: CtlArgs) -> anyhow::Result<i32> {
    use tributary_controlplane::ctl::Command as C;
    let cmd = match args.command {
        CtlCommand::Apply { files } => C::Apply { files },
        CtlCommand::Validate { files } => C::Validate { files },
        CtlCommand::Diff { files } => C::Diff { files },
        CtlCommand::Get { kind, name, env } => C::Get { kind, name, env },
        CtlCommand::Delete {
            kind,
            name,
            env,
            namespace,
        } => C::Delete {
            kind,
            name,
            env,
            namespace,
        },
        CtlCommand::Shards => C::Shards,
    };
    let admin = tributary_controlplane::ctl::Admin {
        addr: args.admin,
        tls: args.tls.client(tls::ALPN_HTTP1)?,
    };
    tributary_controlplane::ctl::run(cmd, &admin, args.output).await
}

fn main() -> anyhow::Result<()> {
    tributary_controlplane::config::init_logging("info");
    // The one TLS provider of the process (rustls, kube's client).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { paths } => validate(&paths),
        Command::Hub(args) => runtime()?.block_on(hub(args)),
        Command::Remote(args) => runtime()?.block_on(remote(args)),
        Command::Status {
            what,
            admin,
            json,
            tls,
        } => runtime()?.block_on(status(what, &admin, json, &tls)),
        Command::Token(args) => {
            runtime()?.block_on(tributary_controlplane::identity::cli::token(args))
        }
        Command::Ca(args) => runtime()?.block_on(tributary_controlplane::identity::cli::ca(args)),
        Command::Cert(args) => {
            runtime()?.block_on(tributary_controlplane::identity::cli::cert(args))
        }
        Command::Ctl(args) => {
            let code = runtime()?.block_on(ctl(args))?;
            std::process::exit(code)
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn validate(paths: &[PathBuf]) -> anyhow::Result<()> {
    match config::watch::load(paths) {
        Ok((files, mesh)) => {
            let services: usize = mesh.environments.values().map(|e| e.services.len()).sum();
            println!(
                "ok: {} file(s), {} environment(s), {} service(s)",
                files.len(),
                mesh.environments.len(),
                services
            );
            Ok(())
        }
        Err(config::watch::LoadError::Invalid(errors)) => {
            for e in &errors.0 {
                println!("{e}");
            }
            std::process::exit(1);
        }
        Err(e) => Err(e.into()),
    }
}

/// `--bootstrap-operator`: operator names, given bare or as the operator's full SPIFFE
/// id of this trust domain (what `tributary ca status` and the certificates show).
fn operator_names(values: &[String], trust_domain: &str) -> anyhow::Result<Vec<String>> {
    use tributary_controlplane::identity::{Identity, SpiffeId};
    values
        .iter()
        .map(|v| {
            if !v.starts_with("spiffe://") {
                return if v.is_empty() || v.contains('/') {
                    Err(anyhow::anyhow!(
                        "--bootstrap-operator {v:?}: expected an operator NAME or spiffe://{trust_domain}/operator/NAME"
                    ))
                } else {
                    Ok(v.clone())
                };
            }
            match SpiffeId::parse(v) {
                Ok(SpiffeId {
                    trust_domain: td,
                    identity: Identity::Operator { name },
                }) if td == trust_domain => Ok(name),
                _ => Err(anyhow::anyhow!(
                    "--bootstrap-operator {v:?}: expected spiffe://{trust_domain}/operator/NAME (an operator of this hub's trust domain) or a bare NAME"
                )),
            }
        })
        .collect()
}

/// `--test-issuer DIR`: a throwaway root whose certificate tests read from DIR.
fn test_issuer(
    dir: &std::path::Path,
    trust_domain: &str,
) -> anyhow::Result<tributary_controlplane::app::MeshIdentity> {
    use tributary_controlplane::identity::test_issuer::TestIssuer;
    tracing::warn!(
        dir = %dir.display(),
        "--test-issuer: workload certificates come from a throwaway root without any proof of identity; never use this outside tests"
    );
    tributary_controlplane::identity::SpiffeId::parse(&format!("spiffe://{trust_domain}/hub/x"))
        .map_err(|_| {
            anyhow::anyhow!(
                "--trust-domain {trust_domain:?} is not a SPIFFE trust domain, expected lowercase [a-z0-9.-_], non-empty (e.g. cluster.local)"
            )
        })?;
    let issuer = TestIssuer::new("tributary test root", Duration::from_secs(24 * 3600))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let root = dir.join("root.pem");
    std::fs::write(&root, issuer.root_pem())
        .with_context(|| format!("writing {}", root.display()))?;
    Ok(tributary_controlplane::app::MeshIdentity {
        trust_domain: trust_domain.to_string(),
        issuer: std::sync::Arc::new(issuer),
    })
}

async fn hub(args: HubArgs) -> anyhow::Result<()> {
    if args.test_hooks {
        tracing::warn!(
            "--test-hooks: ports named test-invalid* yield invalid clusters; never use this outside tests"
        );
        tributary_controlplane::xds::generate::enable_test_hooks();
    }
    let transport =
        tls::Transport::from_flags(args.tls.files()?, args.insecure).map_err(anyhow::Error::msg)?;
    let mesh_identity = match &args.test_issuer {
        Some(dir) => Some(test_issuer(dir, &args.tls.trust_domain)?),
        None => None,
    };
    let cfg = HubConfig {
        transport,
        trust_domain: args.tls.trust_domain.clone(),
        bootstrap_operators: operator_names(&args.bootstrap_operators, &args.tls.trust_domain)?,
        mesh_identity,
        mesh_mtls: args.mesh_mtls,
        config_paths: args.config,
        xds_addr: args.xds_addr,
        admin_addr: args.admin_addr,
        poll_interval: args.poll_interval,
        watch_mode: args.watch_mode,
        watch_debounce: args.watch_debounce,
        default_env: args.default_env,
        debounce: DebounceConfig {
            quiet: args.debounce_quiet,
            cap: args.debounce_cap,
        },
        grace: args.grace,
        heartbeat: args.heartbeat,
        sync_wait: args.sync_wait,
        stale_after: args.stale_after,
        max_initial_syncs: args.max_initial_syncs as usize,
        listen_backlog: args.listen_backlog,
        stream_limits: StreamLimits {
            max_names_per_type: args.max_names_per_type,
            nack_record_names: args.nack_record_names,
            max_response_bytes: args.max_response_bytes,
        },
        max_request_bytes: args.max_request_bytes,
        state_dir: Some(args.state_dir),
        store: match args.store {
            StoreKind::Embedded => StoreBackend::Embedded,
            StoreKind::Etcd => {
                if args.etcd_endpoints.is_empty() {
                    anyhow::bail!(
                        "--store etcd needs --etcd-endpoints (e.g. http://127.0.0.1:2379)"
                    );
                }
                etcd_backend(args.etcd_endpoints)?
            }
        },
        store_history: args.store_history,
        replica_id: args.replica_id,
        lease_ttl: args.lease_ttl,
        replicas_per_shard: args.replicas_per_shard as usize,
        catalog_interval: args.catalog_interval,
        federation: tributary_controlplane::federation::Limits {
            max_batch_changes: args.federation_max_batch as usize,
            max_message_bytes: args.federation_max_message_bytes as usize,
            max_endpoints_per_set: args.federation_max_endpoints_per_set as usize,
        },
        identity: (*args.identity).into_config(args.tls.trust_domain.clone())?,
    };
    if cfg.debounce.cap < cfg.debounce.quiet {
        anyhow::bail!(
            "--debounce-cap ({:?}) must not be shorter than --debounce-quiet ({:?})",
            cfg.debounce.cap,
            cfg.debounce.quiet
        );
    }
    tracing::info!(?cfg, "starting hub");
    let hub = Hub::start(cfg).await?;
    if let Some(path) = &args.ready_file {
        let body = serde_json::json!({
            "xds": hub.xds_addr.to_string(),
            "admin": hub.admin_addr.to_string(),
            "csr": hub.csr_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body.to_string())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }
    hub.run_until(shutdown_signal()).await
}

async fn remote(args: RemoteArgs) -> anyhow::Result<()> {
    if args.router.is_some() && args.zone.is_empty() {
        anyhow::bail!(
            "--router needs --zone: the agent streams to the replicas of the shards (environment, zone) of its zone"
        );
    }
    let hub = args.router.clone().unwrap_or(args.hub);
    let mut cfg = AgentConfig::new(hub, args.cluster_id);
    cfg.region = args.region;
    cfg.zone = args.zone;
    cfg.network = args.network;
    cfg.debounce = args.debounce;
    cfg.heartbeat = args.heartbeat;
    if args.backoff_initial > args.backoff_max {
        anyhow::bail!(
            "--backoff-initial {:?} exceeds --backoff-max {:?}",
            args.backoff_initial,
            args.backoff_max
        );
    }
    cfg.backoff_initial = args.backoff_initial;
    cfg.backoff_max = args.backoff_max;
    cfg.connect_timeout = args.connect_timeout;
    cfg.max_batch = args.max_batch as usize;
    cfg.max_batch_bytes = args.max_batch_bytes as usize;
    cfg.tls = args.tls.client(tls::ALPN_GRPC)?;
    if cfg.tls.is_none() {
        tracing::warn!(
            "no --tls-cert/--tls-key/--tls-ca: the agent speaks plaintext, which only a hub started with --insecure accepts"
        );
    }
    let telemetry = Arc::new(agent::admin::Telemetry::new(&cfg, agent::new_incarnation()));
    if let Some(addr) = args.admin_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the agent's admin address {addr} (--admin-addr)"))?;
        tracing::info!(addr = %listener.local_addr()?, "agent admin endpoint");
        tokio::spawn(agent::admin::serve(
            listener,
            telemetry.clone(),
            std::future::pending(),
        ));
    }
    // Nothing listed yet (not an empty cluster): a file source replaces it before the
    // agent starts; a Kubernetes source exports as it lists (`ClusterState::listing`).
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(ClusterState::listing()));
    let source = if !args.files.is_empty() {
        // Refuse to start on an invalid file: nothing would be exported.
        let mesh = agent::file::load(&args.files).map_err(|e| anyhow::anyhow!("{e}"))?;
        tx.send_replace(Arc::new(agent::file::cluster_state(
            &mesh,
            &ClusterState::default(),
            std::time::SystemTime::now(),
        )));
        let watch = WatchConfig {
            mode: args.watch_mode,
            poll_interval: args.poll_interval,
            debounce: args.watch_debounce,
        };
        tokio::spawn(agent::file::run(args.files, watch, tx))
    } else {
        let opts = agent::kube::KubeOptions {
            kubeconfig: args.kubeconfig,
            default_env: args.default_env,
            zone: cfg.zone.clone(),
            list_from_cache: args.kube_list_from_cache,
        };
        let client = agent::kube::client(&opts).await?;
        // The Secrets of gateway credentials, each watched only once a hub asks for it.
        let secrets = agent::secrets::SecretWatch::new();
        tokio::spawn(agent::secrets::run_kube(client.clone(), secrets.clone()));
        cfg.secrets = Some(secrets);
        tokio::spawn(agent::kube::run(client, opts, tx))
    };
    tracing::info!(?cfg, router = ?args.router, "starting agent");
    match args.router {
        Some(router) => {
            agent::directory::follow(cfg, router, rx, shutdown_signal(), telemetry).await
        }
        None => agent::run_with(cfg, rx, shutdown_signal(), telemetry).await,
    }
    source.abort();
    Ok(())
}

/// GET a JSON status document from the hub's admin endpoint.
async fn admin_get(
    admin: &str,
    tls: Option<&tls::ClientTls>,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    tributary_controlplane::http_client::get_json_with(admin, tls, path)
        .await
        .with_context(|| format!("asking the hub's admin endpoint {admin} (--admin)"))
}

async fn status(what: StatusWhat, admin: &str, json: bool, tls: &TlsArgs) -> anyhow::Result<()> {
    let tls = tls.client(tls::ALPN_HTTP1)?;
    let path = match what {
        StatusWhat::Clusters => "/status/clusters",
        StatusWhat::Sync => "/status/sync",
        StatusWhat::Environments => "/status/environments",
    };
    let v = admin_get(admin, tls.as_ref(), path).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut rows: Vec<Vec<String>> = Vec::new();
    match what {
        StatusWhat::Clusters => {
            rows.push(
                [
                    "CLUSTER",
                    "STATE",
                    "REGION",
                    "ZONE",
                    "VERSION",
                    "SERVICES",
                    "ENDPOINTS",
                    "LAG",
                    "SESSIONS",
                    "REJECTED",
                ]
                .map(String::from)
                .to_vec(),
            );
            for c in v["clusters"].as_array().into_iter().flatten() {
                let lag = c["lag_seconds"]
                    .as_f64()
                    .map_or("-".into(), |l| format!("{:.0}ms", l * 1000.0));
                let state = match c["grace_until_unix"].as_f64() {
                    Some(until) => {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs_f64())
                            .unwrap_or_default();
                        format!("grace ({:.0}s left)", (until - now).max(0.0))
                    }
                    None => s(&c["state"]),
                };
                rows.push(vec![
                    s(&c["id"]),
                    state,
                    s(&c["region"]),
                    s(&c["zone"]),
                    s(&c["last_version"]),
                    s(&c["services"]),
                    s(&c["endpoints"]),
                    lag,
                    s(&c["sessions"]),
                    s(&c["batches_rejected"]),
                ]);
            }
            let pending: Vec<String> = v["resync_pending"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| s(&p["id"]))
                .collect();
            if !pending.is_empty() {
                println!(
                    "withdrawals held until these known clusters resync: {}",
                    pending.join(", ")
                );
            }
        }
        StatusWhat::Sync => {
            rows.push(
                [
                    "NODE",
                    "ENV",
                    "ROLE",
                    "PROTOCOL",
                    "TYPE",
                    "SENT",
                    "ACKED",
                    "NACKS",
                    "LAST NACK",
                ]
                .map(String::from)
                .to_vec(),
            );
            for c in v["clients"].as_array().into_iter().flatten() {
                for (ty, t) in c["types"].as_object().into_iter().flatten() {
                    let nack = t["last_nack"]["message"]
                        .as_str()
                        .map(|m| m.chars().take(60).collect())
                        .unwrap_or_else(|| "-".into());
                    rows.push(vec![
                        s(&c["node_id"]),
                        s(&c["environment"]),
                        s(&c["role"]),
                        s(&c["protocol"]),
                        ty.clone(),
                        s(&t["last_sent_version"]),
                        s(&t["last_acked_version"]),
                        s(&t["nacks_total"]),
                        nack,
                    ]);
                }
            }
        }
        StatusWhat::Environments => {
            rows.push(
                [
                    "ENVIRONMENT",
                    "SEQ",
                    "CLUSTERS",
                    "ENDPOINTS",
                    "LISTENERS",
                    "ROUTES",
                ]
                .map(String::from)
                .to_vec(),
            );
            for e in v["environments"].as_array().into_iter().flatten() {
                rows.push(vec![
                    s(&e["environment"]),
                    s(&e["seq"]),
                    s(&e["clusters"]),
                    s(&e["endpoints"]),
                    s(&e["listeners"]),
                    s(&e["routes"]),
                ]);
            }
        }
    }
    // Borderless, two spaces between columns, no wrapping.
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    let mut rows = rows.into_iter();
    table.set_header(rows.next().unwrap_or_default());
    table.add_rows(rows);
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    println!("{}", table.trim_fmt());
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(feature = "etcd")]
fn etcd_backend(endpoints: Vec<String>) -> anyhow::Result<StoreBackend> {
    Ok(StoreBackend::Etcd(tributary_store::etcd::EtcdConfig::new(
        endpoints,
    )))
}

#[cfg(not(feature = "etcd"))]
fn etcd_backend(_endpoints: Vec<String>) -> anyhow::Result<StoreBackend> {
    anyhow::bail!(
        "--store etcd: this tributary was built without etcd support; build it with `cargo build --release -p tributary-controlplane --features etcd` (needs protoc: Debian protobuf-compiler)"
    )
}

#[cfg(test)]
mod tests {
    use super::operator_names;

    #[test]
    fn bootstrap_operators_are_names_or_this_domains_operator_ids() {
        let given = [
            "admin".to_string(),
            "spiffe://mesh.example/operator/oncall".to_string(),
        ];
        assert_eq!(
            operator_names(&given, "mesh.example").unwrap(),
            ["admin", "oncall"]
        );
        for bad in [
            "spiffe://other.example/operator/oncall",
            "spiffe://mesh.example/env/prod/ns/a/sa/b",
            "operator/oncall",
            "",
        ] {
            let err = operator_names(&[bad.to_string()], "mesh.example")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("--bootstrap-operator") && err.contains(bad),
                "{err}"
            );
        }
    }
}
