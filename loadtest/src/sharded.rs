//! The `sharded` scenario: the estate spread over environments x zones, each shard
//! served by `--replicas-per-shard` hub processes on a real etcd, every client
//! through `tributary-router` — against direct connections to the same replicas.
//!
//! Each run measures each way of connecting, rotating which goes first, each on a
//! fresh set of processes (etcd, `environments x zones x replicas-per-shard` hubs
//! with `--store etcd`, the router; pinned like the control plane of the `ebay`
//! scenario):
//! - **router**: every client connects to the router, which reads its first request
//!   and relays the stream to the replica that rendezvous hashing on its node id picks
//!   among the live replicas of its `(environment, zone)` shard;
//! - **direct**: every client connects straight to that same replica (the harness
//!   reads the router's table and makes the same choice with
//!   [`tributary_shard_router::rendezvous::pick`]); the router runs idle;
//! - **haproxy** (with `--haproxy-bin`): every client connects to HAProxy, a peer
//!   relay in TCP mode with one frontend per replica, on the frontend of that same
//!   replica; HAProxy is pinned as the router, which runs idle. It measures what the
//!   extra hop costs when the relay reads nothing and routes nothing.
//!
//! The harness's agents feed each replica what an agent following the directory
//! would: per remote cluster, one federation stream to every replica serving a shard
//! of the cluster's zone, carrying the services of that replica's environments only.
//! So a replica holds its environment's services with its zone's endpoints, and a
//! change of an endpoint reaches only the clients of its shard. After the initial
//! sync every hub's `/status/sync` must list exactly the clients rendezvous hashing
//! gives it (a client on any other replica is counted as misplaced).
//!
//! Per run and mode it records the usual figures (convergence per sample and per
//! client, CPU per phase summed over the control plane's processes, the content check
//! against each shard's model) and per process: CPU per phase, resident memory and
//! xDS streams at each phase's end. From those: the router's CPU per 1,000 streams
//! (initial sync, rounds) and its memory per stream (RSS with every stream open minus
//! RSS idle, over the streams), and per-replica streams, CPU and RSS.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tokio::sync::watch;
use tributary_controlplane::agent::{self, AgentConfig};

use crate::clients::Spec;
use crate::procs::{Proc, http};
use crate::report::{self, ProcFigures, Run, spread};
use crate::scenario::{self, ENVS, Scenario, ShardIx, Size, cluster_id, zone_name};
use crate::{
    AfterSync, Args, ControlPlane, Feed, Measured, Target, hub_argv, mark, phase_since, pinned,
    progress,
};

/// How the clients reach their replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Router,
    Direct,
    /// Through HAProxy, a peer relay (`--haproxy-bin`): the same extra hop as the
    /// router's, by a relay that reads nothing.
    Haproxy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Router => "router",
            Mode::Direct => "direct",
            Mode::Haproxy => "haproxy",
        }
    }
}

/// HAProxy relaying each replica's clients: one TCP frontend per replica.
struct PeerRelay {
    proc: Proc,
    /// A replica's xDS address to its frontend's.
    frontends: HashMap<String, String>,
}

/// Starts HAProxy in TCP mode with a frontend on a free loopback port for every
/// replica in `routes`, pinned as the router, one thread; waits until each listens.
async fn start_haproxy(
    args: &Args,
    bin: &Path,
    routes: &Routes,
    dir: &Path,
    timeout: Duration,
) -> anyhow::Result<PeerRelay> {
    let mut cfg = String::from(
        "global\n    maxconn 8000\n    nbthread 1\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n",
    );
    let mut frontends = HashMap::new();
    for r in routes.values().flatten() {
        if frontends.contains_key(&r.xds) {
            continue;
        }
        let front = format!("127.0.0.1:{}", free_port()?);
        cfg += &format!(
            "\nlisten {}\n    bind {front}\n    server {} {}\n",
            r.id, r.id, r.xds
        );
        frontends.insert(r.xds.clone(), front);
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg)?;
    let cpus = args
        .cpu_router
        .as_deref()
        .or(args.cpu_control_plane.as_deref());
    let argv = pinned(
        cpus,
        vec![
            bin.to_string_lossy().into_owned(),
            "-db".into(),
            "-f".into(),
            path.to_string_lossy().into_owned(),
        ],
    );
    let mut proc = Proc::spawn("haproxy", &argv, dir)?;
    let deadline = Instant::now() + timeout;
    for front in frontends.values() {
        while tokio::net::TcpStream::connect(front).await.is_err() {
            if let Some(status) = proc.exited() {
                bail!("haproxy exited with {status}; log: {}", proc.log.display());
            }
            if Instant::now() > deadline {
                bail!(
                    "haproxy not listening on {front} within {timeout:?}; log: {}",
                    proc.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(PeerRelay { proc, frontends })
}

/// One replica as the router's table lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Replica {
    id: String,
    xds: String,
}

/// The shards and their live replicas, from the router's `/status/routes`.
type Routes = BTreeMap<ShardIx, Vec<Replica>>;

struct Hub {
    id: String,
    proc: Proc,
    xds: String,
    admin: String,
}

/// The processes of one sharded control plane.
struct Estate {
    etcd: Proc,
    hubs: Vec<Hub>,
    router: Proc,
    router_xds: String,
    router_admin: String,
    routes: Routes,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn sibling(bin: &Option<PathBuf>, name: &str) -> anyhow::Result<PathBuf> {
    Ok(match bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name(name),
    })
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A real etcd on free loopback ports with a fresh data dir; waits for `/health`.
async fn start_etcd(args: &Args, dir: &Path, timeout: Duration) -> anyhow::Result<(Proc, String)> {
    let data = dir.join("etcd-data");
    let _ = std::fs::remove_dir_all(&data);
    let client = format!("http://127.0.0.1:{}", free_port()?);
    let peer = format!("http://127.0.0.1:{}", free_port()?);
    let argv = strings(&[
        &args.etcd_bin,
        "--name",
        "loadtest",
        "--data-dir",
        &data.to_string_lossy(),
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &format!("loadtest={peer}"),
        "--logger",
        "zap",
        "--log-outputs",
        "stderr",
    ]);
    let mut etcd = Proc::spawn(
        "etcd",
        &pinned(args.cpu_control_plane.as_deref(), argv),
        dir,
    )?;
    let addr = client.trim_start_matches("http://").to_string();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = etcd.exited() {
            bail!(
                "etcd ({}) exited with {status}; log: {}",
                args.etcd_bin,
                etcd.log.display()
            );
        }
        if let Ok((200, body)) = http(&addr, "GET", "/health", b"").await
            && body.contains("true")
        {
            return Ok((etcd, client));
        }
        if Instant::now() > deadline {
            bail!(
                "etcd not healthy at {client} within {timeout:?}; log: {}",
                etcd.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The router's table, once every shard has `per_shard` replicas, every hub serves
/// and loads are within one of each other (the assigner rebalances as hubs join).
async fn settled_routes(
    sc: &Scenario,
    admin: &str,
    hubs: usize,
    per_shard: usize,
    timeout: Duration,
) -> anyhow::Result<Routes> {
    let deadline = Instant::now() + timeout;
    let shards = sc.shards().len();
    loop {
        let (code, body) = http(admin, "GET", "/status/routes", b"").await?;
        let routes = if code == 200 {
            parse_routes(&body)?
        } else {
            Routes::new()
        };
        let mut load: HashMap<&str, usize> = HashMap::new();
        for r in routes.values().flatten() {
            *load.entry(r.id.as_str()).or_default() += 1;
        }
        let balanced = load
            .values()
            .max()
            .zip(load.values().min())
            .is_some_and(|(a, b)| a - b <= 1);
        let per_shard = per_shard.min(hubs);
        if routes.len() == shards
            && routes.values().all(|r| r.len() == per_shard)
            && load.len() == hubs.min(shards * per_shard)
            && balanced
        {
            return Ok(routes);
        }
        if Instant::now() > deadline {
            bail!(
                "the router's table did not settle within {timeout:?} (want {shards} shards x {per_shard} replicas over {hubs} hubs): {body}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn parse_routes(body: &str) -> anyhow::Result<Routes> {
    let v: serde_json::Value = serde_json::from_str(body).context("router /status/routes")?;
    let mut routes = Routes::new();
    for s in v["shards"].as_array().into_iter().flatten() {
        let name = s["shard"].as_str().unwrap_or_default();
        let (env, zone) = name
            .split_once('/')
            .with_context(|| format!("shard {name:?}: expected ENV/ZONE"))?;
        let e = ENVS
            .iter()
            .position(|x| *x == env)
            .with_context(|| format!("shard {name:?}: unknown environment"))?;
        let z = zone
            .strip_prefix("az")
            .and_then(|z| z.parse().ok())
            .with_context(|| format!("shard {name:?}: zone is not azN"))?;
        let replicas = s["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| Replica {
                id: r["replica"].as_str().unwrap_or_default().to_string(),
                xds: r["xds_addr"].as_str().unwrap_or_default().to_string(),
            })
            .collect();
        routes.insert((e, z), replicas);
    }
    Ok(routes)
}

/// The replica the router picks for a client (and the one a direct client uses).
fn replica_for<'r>(routes: &'r Routes, spec: &Spec) -> Option<&'r Replica> {
    let replicas = routes.get(&spec.shard?)?;
    tributary_shard_router::rendezvous::pick(&spec.id, replicas.iter(), |r: &Replica| r.id.as_str())
}

/// Starts etcd, the hubs (`--store etcd`) and the router, and waits for the
/// assignment to settle.
async fn start_estate(args: &Args, sc: &Scenario, dir: &Path) -> anyhow::Result<Estate> {
    let timeout = Duration::from_secs(args.phase_timeout_s);
    let hub_bin = sibling(&args.hub_bin, "tributary")?;
    let router_bin = sibling(&args.router_bin, "tributary-router")?;
    for b in [&hub_bin, &router_bin] {
        if !b.exists() {
            bail!(
                "{} not found: build the hub and the router with etcd support (cargo build -p tributary-controlplane -p tributary-shard-router --features tributary-controlplane/etcd,tributary-shard-router/etcd), or pass --hub-bin / --router-bin",
                b.display()
            );
        }
    }
    let (etcd, etcd_url) = start_etcd(args, dir, timeout).await?;
    let config = dir.join("hub-config");
    std::fs::create_dir_all(&config)?;
    std::fs::write(config.join("mesh.yaml"), sc.sharded_config_yaml())?;
    let n = sc.shards().len() * args.replicas_per_shard;
    let rps = args.replicas_per_shard.to_string();
    let mut hubs = Vec::new();
    for k in 1..=n {
        let id = format!("hub-{k}");
        let argv = hub_argv(
            args,
            &hub_bin,
            &config,
            &dir.join(format!("{id}-state")),
            &[
                "--store",
                "etcd",
                "--etcd-endpoints",
                &etcd_url,
                "--replica-id",
                &id,
                "--replicas-per-shard",
                &rps,
            ],
        );
        let proc = Proc::start(&id, &argv, dir)?;
        let (xds, admin) = (proc.addr("xds")?, proc.addr("admin")?);
        hubs.push(Hub {
            id,
            proc,
            xds,
            admin,
        });
    }
    let wrapper = args
        .router_wrapper
        .iter()
        .flat_map(|w| w.split_whitespace());
    let argv: Vec<String> = wrapper
        .map(str::to_string)
        .chain(strings(&[
            &router_bin.to_string_lossy(),
            "--store",
            "etcd",
            "--etcd-endpoints",
            &etcd_url,
            "--listen",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            // Plaintext on loopback, as the hubs (a router needs mTLS files or --insecure).
            "--insecure",
        ]))
        .collect();
    let cpus = args
        .cpu_router
        .as_deref()
        .or(args.cpu_control_plane.as_deref());
    let router = Proc::start("router", &pinned(cpus, argv), dir)?;
    let router_xds = router.ready["xds"][0]
        .as_str()
        .context("router ready file has no xds address")?
        .to_string();
    let router_admin = router.addr("admin")?;
    let routes = settled_routes(sc, &router_admin, n, args.replicas_per_shard, timeout).await?;
    Ok(Estate {
        etcd,
        hubs,
        router,
        router_xds,
        router_admin,
        routes,
    })
}

impl Estate {
    /// The shards each hub serves.
    fn served(&self) -> HashMap<&str, Vec<ShardIx>> {
        let mut m: HashMap<&str, Vec<ShardIx>> = HashMap::new();
        for (shard, replicas) in &self.routes {
            for r in replicas {
                m.entry(r.id.as_str()).or_default().push(*shard);
            }
        }
        m
    }

    fn stop(self) {
        // Clients are gone; the router first, then the hubs, then the store.
        self.router.stop();
        for h in self.hubs {
            h.proc.stop();
        }
        self.etcd.stop();
    }
}

/// Load assignments each hub must hold once loaded: per environment it serves, the
/// environment's services x ports (every service has endpoints in every zone).
fn wanted_load(sc: &Scenario, shards: &[ShardIx]) -> BTreeMap<&'static str, usize> {
    shards
        .iter()
        .map(|(e, _)| {
            let services = (0..sc.active)
                .filter(|&i| sc.env_of_service(i) == *e)
                .count();
            (ENVS[*e], services * sc.size.ports)
        })
        .collect()
}

async fn wait_loaded(
    sc: &Scenario,
    est: &Estate,
    served: &HashMap<&str, Vec<ShardIx>>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let want: Vec<(&Hub, BTreeMap<&str, usize>)> = est
        .hubs
        .iter()
        .map(|h| {
            let shards = served.get(h.id.as_str()).cloned().unwrap_or_default();
            (h, wanted_load(sc, &shards))
        })
        .collect();
    let total: usize = want.iter().flat_map(|(_, w)| w.values()).sum();
    loop {
        let mut have_total = 0;
        let mut short = None;
        for (h, w) in &want {
            let (_, body) = http(&h.admin, "GET", "/status/environments", b"").await?;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            for (env, n) in w {
                let have = v["environments"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|s| s["environment"] == *env)
                    .and_then(|s| s["endpoints"].as_u64())
                    .unwrap_or(0) as usize;
                have_total += have.min(*n);
                if have < *n {
                    short = Some(format!(
                        "{} has {have} of {n} load assignments of {env}; log: {}",
                        h.id,
                        h.proc.log.display()
                    ));
                }
            }
        }
        progress("hubs loading (federation)", have_total, total);
        let Some(short) = short else { return Ok(()) };
        if Instant::now() > deadline {
            bail!("after the agents connected: {short}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every hub serves exactly the clients rendezvous hashing gives it: the number of
/// clients that are elsewhere or missing.
async fn misplaced(est: &Estate, specs: &[Spec]) -> anyhow::Result<usize> {
    let mut want: HashMap<&str, HashSet<&str>> = HashMap::new();
    for s in specs {
        if let Some(r) = replica_for(&est.routes, s) {
            want.entry(r.id.as_str()).or_default().insert(s.id.as_str());
        }
    }
    let mut bad = specs
        .iter()
        .filter(|s| replica_for(&est.routes, s).is_none())
        .count();
    for h in &est.hubs {
        let (_, body) = http(&h.admin, "GET", "/status/sync", b"").await?;
        let v: serde_json::Value = serde_json::from_str(&body).context("hub /status/sync")?;
        let have: HashSet<&str> = v["clients"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["node_id"].as_str())
            .collect();
        let want = want.remove(h.id.as_str()).unwrap_or_default();
        bad += want.symmetric_difference(&have).count();
    }
    Ok(bad)
}

/// One mode of one run on fresh processes: what [`crate::run`] measures, and the
/// clients misplaced after the initial sync.
async fn measure(
    args: &Args,
    sc: &Scenario,
    dir: &Path,
    mode: Mode,
    position: usize,
) -> anyhow::Result<(Run, usize)> {
    let timeout = Duration::from_secs(args.phase_timeout_s);
    eprintln!(
        "{}: starting etcd, {} hubs and the router",
        mode.name(),
        sc.shards().len() * args.replicas_per_shard
    );
    let est = start_estate(args, sc, dir).await?;
    let peer = match (mode, &args.haproxy_bin) {
        (Mode::Haproxy, Some(bin)) => {
            Some(start_haproxy(args, bin, &est.routes, dir, timeout).await?)
        }
        (Mode::Haproxy, None) => bail!("the haproxy mode needs --haproxy-bin"),
        _ => None,
    };
    let served = est.served();
    let mut procs: Vec<Measured<'_>> = est
        .hubs
        .iter()
        .map(|h| Measured {
            proc: &h.proc,
            label: h.id.clone(),
            role: "hub",
            streams: Some((h.admin.clone(), "tributary_xds_connections")),
            shards: served
                .get(h.id.as_str())
                .into_iter()
                .flatten()
                .map(|(e, z)| format!("{}/{}", ENVS[*e], zone_name(*z)))
                .collect(),
        })
        .collect();
    procs.push(Measured {
        proc: &est.router,
        label: "router".into(),
        role: "router",
        streams: Some((est.router_admin.clone(), "tributary_router_connections")),
        shards: Vec::new(),
    });
    procs.push(Measured {
        proc: &est.etcd,
        label: "etcd".into(),
        role: "etcd",
        streams: None,
        shards: Vec::new(),
    });
    if let Some(p) = &peer {
        procs.push(Measured {
            proc: &p.proc,
            label: "haproxy".into(),
            role: "haproxy",
            streams: None,
            shards: Vec::new(),
        });
    }
    let frontends = peer
        .as_ref()
        .map(|p| p.frontends.clone())
        .unwrap_or_default();
    let routes = est.routes.clone();
    let router_xds = est.router_xds.clone();
    let cp = ControlPlane {
        procs,
        xds: router_xds.clone(),
        addr_of: match mode {
            Mode::Router => Box::new(move |_: &Spec| router_xds.clone()),
            Mode::Direct => Box::new(move |s: &Spec| {
                replica_for(&routes, s)
                    .map(|r| r.xds.clone())
                    // No replica: the run reports the client as misplaced and lost.
                    .unwrap_or_else(|| "127.0.0.1:1".into())
            }),
            Mode::Haproxy => Box::new(move |s: &Spec| {
                replica_for(&routes, s)
                    .and_then(|r| frontends.get(&r.xds).cloned())
                    .unwrap_or_else(|| "127.0.0.1:1".into())
            }),
        },
        detail: true,
        records: Default::default(),
        mtls: None,
    };

    // The agents: per remote cluster, one stream to every replica serving a shard of
    // its zone, with that replica's environments.
    let batch = args
        .agent_batch
        .as_deref()
        .map(tributary_controlplane::config::parse_duration)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--agent-batch: {e}"))?;
    cp.record("start").await;
    let m = mark(&cp.procs(), &[]);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut agents: Vec<Vec<Feed>> = Vec::new();
    for c in 0..sc.size.clusters {
        let z = sc.zone_of(c);
        let mut feeds = Vec::new();
        for h in &est.hubs {
            let envs: Vec<usize> = served
                .get(h.id.as_str())
                .into_iter()
                .flatten()
                .filter(|(_, hz)| *hz == z)
                .map(|(e, _)| *e)
                .collect();
            if envs.is_empty() {
                continue;
            }
            let state = sc.cluster_slice(c, |e| envs.contains(&e));
            let (tx, rx) = watch::channel(Arc::new(state));
            let mut cfg = AgentConfig::new(format!("http://{}", h.xds), cluster_id(c));
            cfg.region = scenario::REGION.into();
            cfg.zone = sc.zone(c);
            if let Some(b) = batch {
                cfg.debounce = b;
            }
            let mut stop = stop_rx.clone();
            tokio::spawn(agent::run(cfg, rx, async move {
                let _ = stop.wait_for(|s| *s).await;
            }));
            feeds.push(Feed {
                envs: Some(envs),
                tx,
            });
        }
        agents.push(feeds);
    }
    let loaded = wait_loaded(sc, &est, &served, timeout).await;
    let load = phase_since(m, &cp.procs(), &[]);
    cp.record("load").await;
    if let Err(e) = loaded {
        let _ = stop_tx.send(true);
        drop(cp);
        drop(peer);
        est.stop();
        return Err(e);
    }
    let est_ref = &est;
    let after_sync: AfterSync<'_> =
        Box::new(move |specs| Box::pin(async move { misplaced(est_ref, &specs).await }));
    let r = crate::run_with(
        args,
        sc,
        mode.name(),
        position,
        &cp,
        Target::Ours { agents },
        load,
        dir,
        Some(after_sync),
    )
    .await;
    let _ = stop_tx.send(true);
    drop(cp);
    if let Some(p) = peer {
        p.proc.stop();
    }
    est.stop();
    r
}

/// Figures of the relay process (`role`: the router, or HAProxy) in one run of its
/// mode; `clients`: its streams when it has no gauge of its own (HAProxy).
fn relay_figures(run: &Run, role: &str, clients: usize) -> Option<serde_json::Value> {
    let p = run.processes.as_ref()?.iter().find(|p| p.role == role)?;
    let idle = p.phases.get("load")?.rss_bytes as f64;
    let sync = p.phases.get("initial_sync")?;
    let rounds = p.phases.get("rounds")?;
    let streams = if sync.streams > 0 {
        sync.streams as f64
    } else {
        clients as f64
    };
    let per_k = |cpu: f64| {
        if streams > 0.0 {
            cpu / streams * 1000.0
        } else {
            0.0
        }
    };
    let per_stream = |rss: f64| {
        if streams > 0.0 {
            (rss - idle) / streams
        } else {
            0.0
        }
    };
    Some(json!({
        "streams": streams as u64,
        "cpu_initial_sync_s": sync.cpu_s,
        "cpu_rounds_s": rounds.cpu_s,
        "cpu_per_1000_streams_initial_sync_s": per_k(sync.cpu_s),
        "cpu_per_1000_streams_rounds_s": per_k(rounds.cpu_s),
        "rss_idle_bytes": idle,
        "rss_after_sync_bytes": sync.rss_bytes,
        "rss_after_rounds_bytes": rounds.rss_bytes,
        "peak_rss_bytes": p.peak_rss_bytes,
        "bytes_per_stream_after_sync": per_stream(sync.rss_bytes as f64),
        "bytes_per_stream_after_rounds": per_stream(rounds.rss_bytes as f64),
        "bytes_per_stream_peak": per_stream(p.peak_rss_bytes as f64),
    }))
}

/// Per-replica figures of one run: each hub, and their spread.
fn replica_figures(run: &Run) -> serde_json::Value {
    let hubs: Vec<&ProcFigures> = run
        .processes
        .iter()
        .flatten()
        .filter(|p| p.role == "hub")
        .collect();
    let phase = |p: &ProcFigures, ph: &str, f: fn(&report::ProcPhase) -> f64| {
        p.phases.get(ph).map_or(0.0, f)
    };
    let over = |f: &dyn Fn(&ProcFigures) -> f64| spread(hubs.iter().map(|p| f(p)).collect());
    json!({
        "hubs": hubs.len(),
        "streams": over(&|p| phase(p, "initial_sync", |x| x.streams as f64)),
        "cpu_load_s": over(&|p| phase(p, "load", |x| x.cpu_s)),
        "cpu_initial_sync_s": over(&|p| phase(p, "initial_sync", |x| x.cpu_s)),
        "cpu_rounds_s": over(&|p| phase(p, "rounds", |x| x.cpu_s)),
        "cpu_config_change_s": over(&|p| phase(p, "config_change", |x| x.cpu_s)),
        "rss_after_rounds_bytes": over(&|p| phase(p, "rounds", |x| x.rss_bytes as f64)),
        "peak_rss_bytes": over(&|p| p.peak_rss_bytes as f64),
    })
}

/// Runs the scenario `args.runs` times, each measuring both modes (router first in
/// odd runs, direct first in even ones); prints the side-by-side table and writes the
/// JSON.
pub async fn main(args: &Args, sc: Scenario, size: Size, nofile: u64) -> anyhow::Result<()> {
    if args.real_envoys > 0 {
        bail!(
            "--real-envoys is not supported with --scenario {} yet",
            args.scenario
        );
    }
    if args.hub_addr.is_some() {
        bail!("--hub-addr: the sharded scenarios start their own hubs");
    }
    if args.replicas_per_shard == 0 {
        bail!("--replicas-per-shard must be at least 1");
    }
    let dir = std::env::temp_dir().join(format!("tributary-loadtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut by_mode: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
    let mut misplaced_total = 0;
    let mut runs_json = Vec::new();
    let write = |by_mode: &BTreeMap<&str, Vec<Run>>, runs_json: &[serde_json::Value]| {
        let v = to_json(args, &sc, &size, nofile, by_mode, runs_json);
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
        }
        anyhow::Ok(v)
    };
    let mut modes = vec![Mode::Router, Mode::Direct];
    if args.haproxy_bin.is_some() {
        modes.push(Mode::Haproxy);
    }
    let clients = sc.size.sidecars + sc.size.gateways;
    for r in 0..args.runs {
        // Which mode goes first rotates from run to run.
        let mut order = modes.clone();
        order.rotate_left(r % modes.len());
        eprintln!(
            "\n== run {}/{}: {} first",
            r + 1,
            args.runs,
            order[0].name()
        );
        let mut entry = serde_json::Map::new();
        entry.insert("run".into(), json!(r + 1));
        entry.insert("first".into(), json!(order[0].name()));
        for (pos, mode) in order.into_iter().enumerate() {
            let (run, misplaced) = measure(args, &sc, &dir, mode, pos + 1).await?;
            misplaced_total += misplaced;
            let mut v = serde_json::to_value(&run)?;
            v["misplaced_clients"] = json!(misplaced);
            v["replicas"] = replica_figures(&run);
            match mode {
                Mode::Router => {
                    if let Some(f) = relay_figures(&run, "router", clients) {
                        v["router"] = f;
                    }
                }
                Mode::Haproxy => {
                    if let Some(f) = relay_figures(&run, "haproxy", clients) {
                        v["relay"] = f;
                    }
                }
                Mode::Direct => {}
            }
            entry.insert(mode.name().into(), v);
            by_mode.entry(mode.name()).or_default().push(run);
        }
        runs_json.push(serde_json::Value::Object(entry));
        write(&by_mode, &runs_json)?;
    }
    let summary = write(&by_mode, &runs_json)?;
    println!("\n{}", table(&runs_json));
    println!(
        "\nmedians over {} runs: p99 per sample router / direct {:.2}x, p99 per client (sidecars) {:.2}x; router CPU per 1,000 streams: initial sync {:.3} s, rounds {:.3} s; router memory per stream {:.1} KiB",
        args.runs,
        summary["comparison"]["p99_per_sample_router_over_direct"]["median"]
            .as_f64()
            .unwrap_or(0.0),
        summary["comparison"]["p99_per_client_sidecars_router_over_direct"]["median"]
            .as_f64()
            .unwrap_or(0.0),
        summary["router_process"]["cpu_per_1000_streams_initial_sync_s"]["median"]
            .as_f64()
            .unwrap_or(0.0),
        summary["router_process"]["cpu_per_1000_streams_rounds_s"]["median"]
            .as_f64()
            .unwrap_or(0.0),
        summary["router_process"]["bytes_per_stream_after_sync"]["median"]
            .as_f64()
            .unwrap_or(0.0)
            / 1024.0,
    );
    if args.haproxy_bin.is_some() {
        let c = &summary["haproxy_comparison"];
        let m = |v: &serde_json::Value| v["median"].as_f64().unwrap_or(0.0);
        println!(
            "through HAProxy (the peer relay), medians: p99 per sample haproxy / direct {:.2}x, router / haproxy {:.2}x; p99 per client (sidecars) haproxy / direct {:.2}x; HAProxy CPU per 1,000 streams: initial sync {:.3} s, rounds {:.3} s",
            m(&c["p99_per_sample_haproxy_over_direct"]),
            m(&c["p99_per_sample_router_over_haproxy"]),
            m(&c["p99_per_client_sidecars_haproxy_over_direct"]),
            m(&summary["haproxy_process"]["cpu_per_1000_streams_initial_sync_s"]),
            m(&summary["haproxy_process"]["cpu_per_1000_streams_rounds_s"]),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let failures: Vec<String> = by_mode
        .values()
        .flatten()
        .filter(|r| r.lost_updates + r.version_mismatches + r.stale_at_sample + r.client_errors > 0)
        .map(|r| {
            format!(
                "{}: {} lost updates, {} content-check failures, {} stale at sample time, {} client errors",
                r.name, r.lost_updates, r.version_mismatches, r.stale_at_sample, r.client_errors
            )
        })
        .chain((misplaced_total > 0).then(|| {
            format!("{misplaced_total} clients not on the replica rendezvous hashing gives them")
        }))
        .collect();
    if !failures.is_empty() {
        bail!("correctness check failed: {}", failures.join("; "));
    }
    println!(
        "correctness: every client on its shard's rendezvous replica (both ways), every expected update arrived, the old address gone; every client holds exactly its shard's content"
    );
    Ok(())
}

fn to_json(
    args: &Args,
    sc: &Scenario,
    size: &Size,
    nofile: u64,
    by_mode: &BTreeMap<&str, Vec<Run>>,
    runs_json: &[serde_json::Value],
) -> serde_json::Value {
    let mode = |m: &str| -> Vec<&Run> { by_mode.get(m).into_iter().flatten().collect() };
    let (router, direct, haproxy) = (mode("router"), mode("direct"), mode("haproxy"));
    // Paired per run: the modes of one run share the machine's state at the time.
    let pair = |a: &[&Run], b: &[&Run], f: fn(&Run) -> f64| {
        spread(
            a.iter()
                .zip(b)
                .filter(|(_, d)| f(d) > 0.0)
                .map(|(r, d)| f(r) / f(d))
                .collect(),
        )
    };
    let ratio = |f: fn(&Run) -> f64| pair(&router, &direct, f);
    let clients = sc.size.sidecars + sc.size.gateways;
    let router_figs: Vec<serde_json::Value> = router
        .iter()
        .filter_map(|r| relay_figures(r, "router", clients))
        .collect();
    let haproxy_figs: Vec<serde_json::Value> = haproxy
        .iter()
        .filter_map(|r| relay_figures(r, "haproxy", clients))
        .collect();
    let process = |figs: &[serde_json::Value]| {
        let rf = |key: &str| spread(figs.iter().filter_map(|v| v[key].as_f64()).collect());
        json!({
            "streams": rf("streams"),
            "cpu_initial_sync_s": rf("cpu_initial_sync_s"),
            "cpu_rounds_s": rf("cpu_rounds_s"),
            "cpu_per_1000_streams_initial_sync_s": rf("cpu_per_1000_streams_initial_sync_s"),
            "cpu_per_1000_streams_rounds_s": rf("cpu_per_1000_streams_rounds_s"),
            "rss_idle_bytes": rf("rss_idle_bytes"),
            "rss_after_sync_bytes": rf("rss_after_sync_bytes"),
            "peak_rss_bytes": rf("peak_rss_bytes"),
            "bytes_per_stream_after_sync": rf("bytes_per_stream_after_sync"),
            "bytes_per_stream_after_rounds": rf("bytes_per_stream_after_rounds"),
            "bytes_per_stream_peak": rf("bytes_per_stream_peak"),
        })
    };
    let hubs = sc.shards().len() * args.replicas_per_shard;
    json!({
        "scenario": size,
        "layout": sc.layout,
        "settings": {
            "scenario": args.scenario,
            "runs": args.runs,
            "order": "router, direct (and haproxy with --haproxy-bin) in turn, the first mode rotating from run to run; each mode on fresh processes",
            "hubs": hubs,
            "replicas_per_shard": args.replicas_per_shard,
            "store": "etcd (one member, on the control plane's CPUs)",
            "agent_batch": args.agent_batch.clone().unwrap_or_else(|| "50ms (agent default)".into()),
            "hub_debounce_quiet": args.debounce.clone().unwrap_or_else(|| "100ms (hub default)".into()),
            "hub_args": args.hub_args,
            "sotw_fraction": args.sotw_fraction,
            "connections": "one per client; direct: to the replica the router would pick (rendezvous on the node id)",
            "agents": "per remote cluster, one federation stream to every replica serving a shard of its zone, with that replica's environments only",
            "pinning": {
                "control_plane_cpus": args.cpu_control_plane,
                "router_cpus": args.cpu_router.clone().or(args.cpu_control_plane.clone()),
                "harness_cpus": args.cpu_harness,
            },
            "nofile_limit": nofile,
            "control_plane_figures": "hub.cpu_s and phases.*.control_plane_cpu_s: the sum over every hub, the router, etcd (and HAProxy in its mode); hub.peak_rss_bytes: the sum of their peaks",
            "haproxy": args.haproxy_bin.as_ref().map(|_| "TCP mode, one frontend per replica, nbthread 1, pinned as the router; the router runs idle in this mode"),
        },
        "router": report::summary(&router),
        "direct": report::summary(&direct),
        "comparison": {
            "p99_per_sample_router_over_direct": ratio(|r| r.convergence_ms.p99),
            "p99_per_sample_sidecars_router_over_direct": ratio(|r| r.per_sample_ms.sidecars.p99),
            "p99_per_client_sidecars_router_over_direct": ratio(|r| r.per_client_ms.sidecars.p99),
            "p99_per_client_gateways_router_over_direct": ratio(|r| r.per_client_ms.gateways.p99),
            "p50_per_sample_router_over_direct": ratio(|r| r.convergence_ms.p50),
            "config_change_p99_router_over_direct": ratio(|r| r.config_change_ms.p99),
            "initial_sync_router_over_direct": ratio(|r| r.initial_sync_s),
            "rounds_cpu_router_over_direct": ratio(|r| r.phases.get("rounds").map_or(0.0, |p| p.control_plane_cpu_s)),
        },
        "router_process": process(&router_figs),
        "haproxy": (!haproxy.is_empty()).then(|| report::summary(&haproxy)),
        "haproxy_comparison": (!haproxy.is_empty()).then(|| json!({
            "p99_per_sample_haproxy_over_direct": pair(&haproxy, &direct, |r| r.convergence_ms.p99),
            "p99_per_client_sidecars_haproxy_over_direct": pair(&haproxy, &direct, |r| r.per_client_ms.sidecars.p99),
            "p99_per_client_gateways_haproxy_over_direct": pair(&haproxy, &direct, |r| r.per_client_ms.gateways.p99),
            "p99_per_sample_router_over_haproxy": pair(&router, &haproxy, |r| r.convergence_ms.p99),
            "rounds_cpu_haproxy_over_direct": pair(&haproxy, &direct, |r| r.phases.get("rounds").map_or(0.0, |p| p.control_plane_cpu_s)),
        })),
        "haproxy_process": (!haproxy.is_empty()).then(|| process(&haproxy_figs)),
        "runs": runs_json,
    })
}

/// Per run and mode: convergence, CPU and the router's and replicas' figures.
fn table(runs_json: &[serde_json::Value]) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING);
    t.set_header(vec![
        "run",
        "mode (order)",
        "p50/p99 per sample",
        "p99 per client sc/gw",
        "cfg p99",
        "initial sync",
        "CPU rounds cp/harness",
        "relay CPU sync/rounds",
        "relay streams",
        "relay KiB/stream",
        "hub RSS med/max",
        "hub streams min/max",
        "lost/bad/misplaced",
    ]);
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    for r in runs_json {
        for mode in ["router", "direct", "haproxy"] {
            let v = &r[mode];
            if v.is_null() {
                continue;
            }
            // The relay's figures: the router's, or HAProxy's.
            let rt = if v["router"].is_null() {
                &v["relay"]
            } else {
                &v["router"]
            };
            let rounds = &v["phases"]["rounds"];
            t.add_row(vec![
                format!("{}", r["run"]),
                format!("{mode} ({})", v["position"]),
                format!(
                    "{:.0} / {:.0} ms",
                    f(&v["convergence_ms"]["p50"]),
                    f(&v["convergence_ms"]["p99"])
                ),
                format!(
                    "{:.0} / {:.0} ms",
                    f(&v["per_client_ms"]["sidecars"]["p99"]),
                    f(&v["per_client_ms"]["gateways"]["p99"])
                ),
                format!("{:.0} ms", f(&v["config_change_ms"]["p99"])),
                format!("{:.2} s", f(&v["initial_sync_s"])),
                format!(
                    "{:.1} / {:.1} s",
                    f(&rounds["control_plane_cpu_s"]),
                    f(&rounds["harness_cpu_s"])
                ),
                if rt.is_null() {
                    "-".into()
                } else {
                    format!(
                        "{:.2} / {:.2} s",
                        f(&rt["cpu_initial_sync_s"]),
                        f(&rt["cpu_rounds_s"])
                    )
                },
                if rt.is_null() {
                    "-".into()
                } else {
                    format!("{}", rt["streams"])
                },
                if rt.is_null() {
                    "-".into()
                } else {
                    format!("{:.1}", f(&rt["bytes_per_stream_after_sync"]) / 1024.0)
                },
                format!(
                    "{:.0} / {:.0} MiB",
                    f(&v["replicas"]["peak_rss_bytes"]["median"]) / f64::from(1 << 20),
                    f(&v["replicas"]["peak_rss_bytes"]["max"]) / f64::from(1 << 20)
                ),
                format!(
                    "{:.0} / {:.0}",
                    f(&v["replicas"]["streams"]["min"]),
                    f(&v["replicas"]["streams"]["max"])
                ),
                format!(
                    "{} / {} / {}",
                    v["lost_updates"], v["version_mismatches"], v["misplaced_clients"]
                ),
            ]);
        }
    }
    for (i, column) in t.column_iter_mut().enumerate() {
        column.set_padding((if i == 0 { 0 } else { 2 }, 0));
        column.set_cell_alignment(comfy_table::CellAlignment::Right);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, shard: Option<ShardIx>) -> Spec {
        Spec {
            index: 0,
            id: id.into(),
            delta: true,
            gateway: false,
            scope: None,
            env: ENVS[0],
            zone: None,
            shard,
            expect_cds: 0,
            expect_lds: 0,
        }
    }

    #[test]
    fn direct_clients_go_where_the_router_table_would_send_them() {
        let routes = parse_routes(
            r#"{"shards": [
                {"shard": "prod/az0", "replicas": [{"replica": "hub-1", "xds_addr": "127.0.0.1:1"}, {"replica": "hub-7", "xds_addr": "127.0.0.1:7"}]},
                {"shard": "staging/az2", "replicas": [{"replica": "hub-3", "xds_addr": "[::1]:3"}]}
            ]}"#,
        )
        .unwrap();
        assert_eq!(routes.len(), 2);
        let ids = ["hub-1".to_string(), "hub-7".to_string()];
        for k in 0..50 {
            let id = format!("sidecar-{k}");
            let got = replica_for(&routes, &spec(&id, Some((0, 0)))).unwrap();
            // The router crate's own choice over the same replica ids.
            let want = tributary_shard_router::rendezvous::pick(&id, ids.iter(), |s| s.as_str());
            assert_eq!(Some(&got.id), want);
        }
        assert_eq!(
            replica_for(&routes, &spec("g", Some((1, 2)))).map(|r| r.xds.as_str()),
            Some("[::1]:3")
        );
        assert!(replica_for(&routes, &spec("g", Some((1, 0)))).is_none());
        assert!(replica_for(&routes, &spec("g", None)).is_none());
        assert!(parse_routes(r#"{"shards": [{"shard": "dev/az0", "replicas": []}]}"#).is_err());
    }

    #[test]
    fn gauges_are_summed_over_their_series() {
        let text = "# TYPE tributary_router_connections gauge\ntributary_router_connections{replica=\"a\",shard=\"prod/az0\"} 3\ntributary_router_connections{replica=\"b\",shard=\"prod/az1\"} 4\ntributary_router_connections_total 100\ntributary_xds_connections 2\n";
        assert_eq!(crate::sum_metric(text, "tributary_router_connections"), 7);
        assert_eq!(crate::sum_metric(text, "tributary_xds_connections"), 2);
        assert_eq!(crate::sum_metric(text, "tributary_missing"), 0);
    }
}
