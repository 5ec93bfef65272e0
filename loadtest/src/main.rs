//! `tributary-loadtest`: runs a scenario against the hub and (optionally) a
//! go-control-plane peer, with the same simulated clusters, clients and changes.
//!
//! Each run starts both control planes in turn (which goes first alternates between
//! runs), and for each:
//! 1. start it (a child process, so its CPU and memory are its own), pinned to its
//!    own cores when asked (`--cpu-control-plane`, `--cpu-harness`);
//! 2. load the estate (ours: one agent per cluster over the federation protocol, with
//!    the agent's default batch window; the peer: the same resources, made by our
//!    generator, as protobuf over its gRPC control API);
//! 3. initial sync: every client connects at once (a reconnect storm), each on its
//!    own connection, following Envoy's sequence (see `clients`); real Envoys join
//!    here (`--real-envoys`);
//! 4. rounds: change N endpoints at once; each client that holds a changed load
//!    assignment records injection → its ACK of a version containing the change
//!    (the old address gone);
//! 5. a config change: add services; every route table names the new host, and
//!    gateways need the new clusters and their load assignments;
//! 6. the content check: every resource every client holds against the model.
//!
//! Wall time and CPU (control plane, harness, Envoys) are recorded per phase.

mod check;
mod clients;
mod envoys;
mod mtls;
mod peer_control;
mod procs;
mod report;
mod scenario;
mod sharded;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::sync::watch;
use tributary_controlplane::agent::{self, AgentConfig, ClusterState};
use tributary_controlplane::xds::XdsType;
use tributary_controlplane::xds::generate::{
    EnvResources, Generated, endpoint_resources, generate, service_resources, shared_resources,
};

use crate::check::Expected;
use crate::clients::{ConfigExpect, Expect, Sample, Shared, Spec};
use crate::procs::{Proc, http};
use crate::report::{
    EnvoyFigures, HarnessUsage, HubUsage, Phase, ProcFigures, Run, Split, percentiles,
};
use crate::scenario::{
    ENVS, Scenario, ShardIx, Size, cluster_id, host, resource_name, scope_name, zone_name,
};

#[derive(Debug, Parser)]
#[command(
    name = "tributary-loadtest",
    about = "Convergence load test: Tributary vs a go-control-plane peer"
)]
struct Args {
    /// `ebay` (100 clusters, 2,000 services x 5 ports, 2,000 sidecars in 400 scopes,
    /// 32 gateways) or `small`; `sharded` (the ebay sizes over --environments x
    /// --zones shards, --replicas-per-shard hub processes each on etcd, every client
    /// through `tributary-router`, against direct connections to the same replicas)
    /// or `sharded-small` (the small sizes, sharded).
    #[arg(long, default_value = "ebay")]
    scenario: String,
    /// Sharded scenarios: environments (prod, staging, ...).
    #[arg(long, default_value_t = 2)]
    environments: usize,
    /// Sharded scenarios: zones (remote cluster c is in zone c % zones).
    #[arg(long, default_value_t = 3)]
    zones: usize,
    /// Sharded scenarios: hub replicas per shard (`tributary hub --replicas-per-shard`);
    /// the run starts environments x zones x this many hub processes.
    #[arg(long, default_value_t = 2)]
    replicas_per_shard: usize,
    /// Sharded scenarios: the router binary (default: `tributary-router` next to this
    /// binary; built with `--features etcd`).
    #[arg(long)]
    router_bin: Option<PathBuf>,
    /// Sharded scenarios: the etcd binary.
    #[arg(long, default_value = "etcd")]
    etcd_bin: String,
    /// Sharded scenarios: CPUs for the router (`taskset -c` list); default: those of
    /// --cpu-control-plane (the router shares the hubs' cores).
    #[arg(long)]
    cpu_router: Option<String>,
    /// Sharded scenarios: a command to run the router under, for profiling, e.g.
    /// "valgrind --tool=massif --massif-out-file=/tmp/router.massif.%p" (its CPU and
    /// memory figures are then the wrapper's). The wrapper gets the router's SIGTERM: it
    /// must pass it on and wait (valgrind does; heaptrack's launcher script does not,
    /// and leaves the router running with an empty profile).
    #[arg(long)]
    router_wrapper: Option<String>,
    /// Sharded scenarios: also measure every client through HAProxy, a peer relay,
    /// side by side in each run: TCP mode, one frontend per replica forwarding to it,
    /// each client on the frontend of the replica the router would pick; pinned as the
    /// router, one thread (Debian's `haproxy`).
    #[arg(long)]
    haproxy_bin: Option<PathBuf>,
    #[arg(long)]
    clusters: Option<usize>,
    #[arg(long)]
    services: Option<usize>,
    #[arg(long)]
    ports: Option<usize>,
    #[arg(long)]
    endpoints_per_service: Option<usize>,
    #[arg(long)]
    sidecars: Option<usize>,
    /// Sidecar scopes (applications); sidecar k is in scope k % scopes.
    #[arg(long)]
    scopes: Option<usize>,
    #[arg(long)]
    deps_per_sidecar: Option<usize>,
    #[arg(long)]
    gateways: Option<usize>,
    #[arg(long)]
    changes: Option<usize>,
    #[arg(long)]
    rounds: Option<usize>,
    #[arg(long)]
    added_services: Option<usize>,
    /// Runs; each starts both control planes afresh, and which goes first alternates
    /// (ours first in odd runs, the peer first in even ones).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// The hub binary (default: `tributary` next to this binary).
    #[arg(long)]
    hub_bin: Option<PathBuf>,
    /// Use a hub that is already running: its xDS/federation address (no hub is
    /// started; pass --hub-admin too, and --hub-pid to measure its CPU and memory).
    /// Its config needs the scenario's gateway and scopes (`Scenario::hub_config_yaml`).
    #[arg(long, requires = "hub_admin")]
    hub_addr: Option<String>,
    /// The running hub's admin address.
    #[arg(long)]
    hub_admin: Option<String>,
    #[arg(long)]
    hub_pid: Option<u32>,
    /// The peer binary (default: loadtest/peer/bin/gcp-peer).
    #[arg(long)]
    peer_bin: Option<PathBuf>,
    /// Skip the peer.
    #[arg(long)]
    no_peer: bool,
    /// Run our control plane with mutual TLS instead of plaintext (`--insecure`): a
    /// CA in the work dir, certificates for the hub, every agent (`cluster/{id}`, with
    /// a `RemoteCluster` entry in the hub's config), every sidecar scope (a workload
    /// identity) and the gateway; simulated clients, agents and real Envoys connect
    /// over mTLS. The peer stays plaintext. Not with sharded scenarios or --hub-addr.
    #[arg(long, conflicts_with = "compare_mtls")]
    mtls: bool,
    /// Each run runs ours twice, plaintext and with mutual TLS (as --mtls), and the
    /// peer unless --no-peer; the order alternates between runs (odd runs: plaintext,
    /// mTLS, peer; even runs the reverse). The JSON gains an `mtls` block: per mode
    /// p99s, initial sync, hub CPU per phase, and the handshake cost.
    #[arg(long)]
    compare_mtls: bool,
    /// The hub's debounce quiet period (`--debounce-quiet`); default: the hub's own
    /// default (100 ms).
    #[arg(long)]
    debounce: Option<String>,
    /// The agents' batch window; default: the agent's own default (50 ms).
    #[arg(long)]
    agent_batch: Option<String>,
    /// Extra hub flag (repeatable), e.g. --hub-arg=--max-initial-syncs=64.
    #[arg(long = "hub-arg", allow_hyphen_values = true)]
    hub_args: Vec<String>,
    /// Fraction of sidecars using SotW (the rest and all gateways use Delta).
    #[arg(long, default_value_t = 0.5)]
    sotw_fraction: f64,
    /// Real Envoy sidecars in the run (each one worker, half Delta, half SotW).
    #[arg(long, default_value_t = 0)]
    real_envoys: usize,
    /// The Envoy binary for --real-envoys.
    #[arg(long, default_value = "envoy")]
    envoy_bin: String,
    /// How often each real Envoy's admin is polled while a change is pending.
    #[arg(long, default_value_t = 10)]
    envoy_poll_ms: u64,
    /// CPUs for the control plane under test (`taskset -c` list, e.g. 0).
    #[arg(long)]
    cpu_control_plane: Option<String>,
    /// CPUs for the harness and the real Envoys (`taskset -c` list, e.g. 1).
    #[arg(long)]
    cpu_harness: Option<String>,
    /// Longest wait for one phase.
    #[arg(long, default_value_t = 120)]
    phase_timeout_s: u64,
    /// Write the summary as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the convergence CDF chart (SVG).
    #[arg(long)]
    svg: Option<PathBuf>,
}

fn size(a: &Args) -> anyhow::Result<Size> {
    let mut s = match a.scenario.as_str() {
        "ebay" | "sharded" => Size::ebay(),
        "small" | "sharded-small" => Size::small(),
        other => bail!("--scenario {other:?}: expected ebay, small, sharded or sharded-small"),
    };
    let set = |v: &mut usize, o: Option<usize>| {
        if let Some(o) = o {
            *v = o;
        }
    };
    set(&mut s.clusters, a.clusters);
    set(&mut s.services, a.services);
    set(&mut s.ports, a.ports);
    set(&mut s.endpoints_per_service, a.endpoints_per_service);
    set(&mut s.sidecars, a.sidecars);
    set(&mut s.scopes, a.scopes);
    set(&mut s.deps_per_sidecar, a.deps_per_sidecar);
    set(&mut s.gateways, a.gateways);
    set(&mut s.changes_per_round, a.changes);
    set(&mut s.rounds, a.rounds);
    set(&mut s.added_services, a.added_services);
    if s.clusters == 0 || s.services == 0 || s.ports == 0 || s.endpoints_per_service == 0 {
        bail!("clusters, services, ports and endpoints per service must be at least 1");
    }
    if s.scopes == 0 {
        bail!("--scopes must be at least 1");
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(s)
}

fn progress(label: &str, done: usize, total: usize) {
    let width = 30;
    let filled = (done * width)
        .checked_div(total)
        .unwrap_or(width)
        .min(width);
    eprint!(
        "\r  {label:<28} [{}{}] {done}/{total}   ",
        "#".repeat(filled),
        ".".repeat(width - filled)
    );
    if done >= total {
        eprintln!();
    }
}

/// Which model each client's view comes from: the whole estate (`None`), or its
/// shard's (sharded scenarios).
type ShardKey = Option<ShardIx>;

/// What each shard's replicas generate (one entry, `None`, when not sharded).
fn models(sc: &Scenario) -> HashMap<ShardKey, EnvResources> {
    if sc.layout.sharded {
        sc.shards()
            .into_iter()
            .map(|s| (Some(s), generate(&sc.shard_model(s))))
            .collect()
    } else {
        HashMap::from([(None, generate(&sc.model()))])
    }
}

/// Places a client in its shard: its environment, and its zone in its node.
fn place(spec: &mut Spec, sc: &Scenario, shard: ShardIx) {
    if sc.layout.sharded {
        spec.shard = Some(shard);
        spec.env = ENVS[shard.0];
        spec.zone = Some(zone_name(shard.1));
    }
}

/// The simulated proxies: sidecars (scoped, half SotW) and gateways (Delta).
fn specs(sc: &Scenario, models: &HashMap<ShardKey, EnvResources>, sotw_fraction: f64) -> Vec<Spec> {
    let expected: HashMap<ShardKey, Expected<'_>> =
        models.iter().map(|(k, m)| (*k, Expected::new(m))).collect();
    let mut v = Vec::new();
    let sotw_every = if sotw_fraction <= 0.0 {
        usize::MAX
    } else {
        (1.0 / sotw_fraction).round().max(1.0) as usize
    };
    for k in 0..sc.size.sidecars {
        let mut spec = Spec {
            index: v.len(),
            id: format!("sidecar-{k}"),
            delta: k % sotw_every != 0,
            gateway: false,
            scope: Some(scope_name(sc.scope_of(k))),
            env: scenario::ENV,
            zone: None,
            shard: None,
            expect_cds: 0,
            expect_lds: 0,
        };
        place(&mut spec, sc, sc.sidecar_shard(k));
        let expected = &expected[&spec.shard];
        spec.expect_cds = expected.clusters(&spec).len();
        spec.expect_lds = expected.listeners(&spec).len();
        v.push(spec);
    }
    for g in 0..sc.size.gateways {
        let mut spec = Spec {
            index: v.len(),
            id: format!("gateway-{g}"),
            delta: true,
            gateway: true,
            scope: None,
            env: scenario::ENV,
            zone: None,
            shard: None,
            expect_cds: 0,
            expect_lds: 0,
        };
        place(&mut spec, sc, sc.gateway_shard(g));
        let expected = &expected[&spec.shard];
        spec.expect_cds = expected.clusters(&spec).len();
        spec.expect_lds = expected.listeners(&spec).len();
        v.push(spec);
    }
    v
}

/// One agent's feed of a remote cluster: what it exports of the environments it
/// streams (`None`: every environment).
struct Feed {
    envs: Option<Vec<usize>>,
    tx: watch::Sender<Arc<ClusterState>>,
}

/// How the harness changes the control plane under test.
enum Target {
    Ours {
        /// Per remote cluster, its agents (one; a sharded estate: one per replica
        /// that serves a shard of the cluster's zone).
        agents: Vec<Vec<Feed>>,
    },
    Peer {
        control: tonic::transport::Channel,
    },
}

impl Target {
    /// The agents' next states (ours: cluster, feed, state), computed before the
    /// clock starts.
    fn prepare(&self, sc: &Scenario, clusters: &[usize]) -> Vec<(usize, usize, Arc<ClusterState>)> {
        match self {
            Target::Ours { agents } => clusters
                .iter()
                .flat_map(|&c| {
                    agents[c].iter().enumerate().map(move |(f, feed)| {
                        let state = match &feed.envs {
                            None => sc.cluster_state(c),
                            Some(envs) => sc.cluster_slice(c, |e| envs.contains(&e)),
                        };
                        (c, f, Arc::new(state))
                    })
                })
                .collect(),
            Target::Peer { .. } => Vec::new(),
        }
    }

    /// Pushes the scenario's current state of `services` (and, for the peer, the
    /// shared resources when `new_services`).
    async fn push(
        &self,
        sc: &Scenario,
        prepared: Vec<(usize, usize, Arc<ClusterState>)>,
        services: &[usize],
        new_services: bool,
    ) -> anyhow::Result<()> {
        match self {
            Target::Ours { agents, .. } => {
                for (c, f, state) in prepared {
                    agents[c][f].tx.send_replace(state);
                }
                Ok(())
            }
            Target::Peer { control } => {
                let mut generated = Generated::new();
                for &i in services {
                    let s = sc.model_service(i);
                    if new_services {
                        service_resources(&s, &mut generated);
                    } else {
                        endpoint_resources(&s, &mut generated);
                    }
                }
                // New services change the route tables and the groups (a scope's
                // clusters and listeners) that select them: the peer gets both.
                let roles = new_services.then(|| shared_resources(&sc.model(), &mut generated));
                feed_peer(control.clone(), generated, roles.as_ref()).await
            }
        }
    }
}

/// Sends resources (and, with `roles`, the groups that select them on a wildcard) to
/// the peer's control API: one request, one update per type.
async fn feed_peer(
    control: tonic::transport::Channel,
    generated: Generated,
    roles: Option<&tributary_controlplane::xds::generate::RoleListeners>,
) -> anyhow::Result<()> {
    use peer_control::{Group, Resource, TypeUpdate, UpdateRequest};
    let mut by_type: BTreeMap<&'static str, TypeUpdate> = BTreeMap::new();
    for (ty, r) in generated {
        let t = match ty {
            XdsType::Cluster => "CDS",
            XdsType::Endpoint => "EDS",
            XdsType::Route => "RDS",
            XdsType::Listener => "LDS",
            XdsType::Secret => continue,
        };
        by_type
            .entry(t)
            .or_insert_with(|| TypeUpdate {
                r#type: t.into(),
                ..Default::default()
            })
            .upsert
            .push(Resource {
                name: r.name().to_string(),
                body: r.body(),
            });
    }
    if let Some(roles) = roles {
        let names =
            |s: &std::collections::BTreeSet<Arc<str>>| s.iter().map(|n| n.to_string()).collect();
        let cds = by_type.entry("CDS").or_insert_with(|| TypeUpdate {
            r#type: "CDS".into(),
            ..Default::default()
        });
        for (scope, clusters) in &roles.scopes {
            cds.groups.push(Group {
                name: format!("scope:{scope}"),
                names: names(clusters),
            });
        }
        let lds = by_type.entry("LDS").or_insert_with(|| TypeUpdate {
            r#type: "LDS".into(),
            ..Default::default()
        });
        lds.groups.push(Group {
            name: "sidecar".into(),
            names: names(&roles.sidecar),
        });
        for (scope, listeners) in &roles.scope_listeners {
            lds.groups.push(Group {
                name: format!("scope:{scope}"),
                names: names(listeners),
            });
        }
        for (gw, listeners) in &roles.gateways {
            lds.groups.push(Group {
                name: format!("gateway:{gw}"),
                names: names(listeners),
            });
        }
    }
    // Clusters before listeners and routes, as the resources are made.
    let order = ["CDS", "EDS", "LDS", "RDS"];
    let updates = order.iter().filter_map(|t| by_type.remove(t)).collect();
    peer_control::update(control, UpdateRequest { updates })
        .await
        .context("peer control API: Update")?;
    Ok(())
}

async fn wait_phase(shared: &Shared, label: &str, total: usize, timeout: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = shared.done.notified();
        let left = shared.pending.load(Ordering::Acquire);
        progress(label, total - left, total);
        if left == 0 {
            return 0;
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = tokio::time::sleep_until(deadline) => {
                let left = shared.pending.load(Ordering::Acquire);
                eprintln!("\n  {label}: {left} of {total} expected updates did not arrive within {timeout:?}");
                return left;
            }
        }
    }
}

fn begin(
    shared: &Shared,
    expected: HashMap<String, Expect>,
    config: Option<ConfigExpect>,
    pending: usize,
    phase: u64,
) {
    *shared.expected.write().unwrap() = expected;
    *shared.config.write().unwrap() = config;
    shared.pending.store(pending, Ordering::Release);
    shared.phase.store(phase, Ordering::Release);
    *shared.t0.lock().unwrap() = Some(Instant::now());
}

/// After a round timed out: which clients hold a changed load assignment without the
/// new address (the control plane did not deliver it), for the log.
fn report_missing(shared: &Shared, specs: &[Spec]) {
    let expected = shared.expected.read().unwrap().clone();
    let mut shown = 0;
    for spec in specs {
        let h = shared.holdings[spec.index].lock().unwrap();
        let missing: Vec<&String> = expected
            .iter()
            .filter(|(n, e)| {
                h.by_type[clients::EDS]
                    .get(*n)
                    .is_some_and(|held| !clients::contains_address(&held.body, &e.address))
            })
            .map(|(n, _)| n)
            .collect();
        if !missing.is_empty() && shown < 10 {
            shown += 1;
            eprintln!(
                "  {} ({}): holds {} changed load assignments without the new address, e.g. {:?}",
                spec.id,
                if spec.delta { "delta" } else { "sotw" },
                missing.len(),
                missing.first()
            );
        }
    }
}

/// CPU clocks read at a phase boundary.
#[derive(Clone, Copy)]
struct Mark {
    at: Instant,
    control_plane: f64,
    harness: f64,
    envoys: f64,
}

fn harness_cpu() -> f64 {
    procfs::process::Process::myself()
        .and_then(|p| p.stat())
        .map_or(0.0, |s| {
            (s.utime + s.stime) as f64 / procfs::ticks_per_second() as f64
        })
}

/// The control plane's CPU: the sum over its processes.
fn mark(procs: &[&Proc], envoys: &[envoys::Envoy]) -> Mark {
    Mark {
        at: Instant::now(),
        control_plane: procs.iter().map(|p| p.cpu_seconds()).sum(),
        harness: harness_cpu(),
        envoys: envoys::usage(envoys).0,
    }
}

fn phase_since(m: Mark, procs: &[&Proc], envoys: &[envoys::Envoy]) -> Phase {
    let now = mark(procs, envoys);
    Phase {
        wall_s: now.at.duration_since(m.at).as_secs_f64(),
        control_plane_cpu_s: now.control_plane - m.control_plane,
        harness_cpu_s: now.harness - m.harness,
        envoys_cpu_s: now.envoys - m.envoys,
    }
}

/// Splits one round's samples by role, and reduces them per client to the time by
/// which it held every change of the round.
#[derive(Default)]
struct Collected {
    sample: [Vec<f64>; 2],
    client: [Vec<f64>; 2],
}

impl Collected {
    fn add_round(&mut self, samples: Vec<Sample>, specs: &[Spec]) {
        let mut last: HashMap<u32, f64> = HashMap::new();
        for s in samples {
            let role = usize::from(specs[s.client as usize].gateway);
            self.sample[role].push(s.ms);
            let e = last.entry(s.client).or_insert(0.0);
            *e = e.max(s.ms);
        }
        for (c, ms) in last {
            self.client[usize::from(specs[c as usize].gateway)].push(ms);
        }
    }

    fn split_samples(&self) -> Split {
        Split::of(&self.sample[0], &self.sample[1])
    }

    fn split_clients(&self) -> Split {
        Split::of(&self.client[0], &self.client[1])
    }
}

/// One process of the control plane under test, with what is recorded of it per
/// phase when the control plane has several ([`ControlPlane::detail`]).
struct Measured<'a> {
    proc: &'a Proc,
    label: String,
    role: &'static str,
    /// Its admin address and the gauge there that counts its xDS streams.
    streams: Option<(String, &'static str)>,
    shards: Vec<String>,
}

/// Cumulative figures of one process at a phase boundary.
#[derive(Debug, Clone, Copy, Default)]
struct ProcSample {
    cpu_s: f64,
    rss_bytes: u64,
    streams: u64,
}

/// The control plane under test: its processes (their CPU is summed into the
/// phases' `control_plane_cpu_s`) and where each client connects.
struct ControlPlane<'a> {
    procs: Vec<Measured<'a>>,
    /// The address real Envoys connect to.
    xds: String,
    /// Where each client connects (its own connection).
    addr_of: Box<dyn Fn(&Spec) -> String + 'a>,
    /// Record every process's CPU, RSS and streams at each phase boundary.
    detail: bool,
    /// Taken at phase boundaries while the phases' code holds the processes (a lock
    /// only for the push; never held across an await).
    records: std::sync::Mutex<Vec<(String, Vec<ProcSample>)>>,
    /// With mutual TLS (`--mtls`): the certificates, and the hub's admin address
    /// (its handshake counter).
    mtls: Option<(Arc<mtls::Pki>, String)>,
}

impl<'a> ControlPlane<'a> {
    /// One process that every client connects to (the hub, or the peer).
    fn single(proc: &'a Proc, xds: &str) -> Self {
        let xds = xds.to_string();
        ControlPlane {
            procs: vec![Measured {
                proc,
                label: proc.name.clone(),
                role: "control-plane",
                streams: None,
                shards: Vec::new(),
            }],
            addr_of: Box::new({
                let xds = xds.clone();
                move |_| xds.clone()
            }),
            xds,
            detail: false,
            records: Default::default(),
            mtls: None,
        }
    }

    /// The hub's completed and failed xDS handshakes so far (`None`: plaintext).
    async fn tls_handshakes(&self) -> anyhow::Result<Option<(u64, u64)>> {
        let Some((pki, admin)) = &self.mtls else {
            return Ok(None);
        };
        let (code, body) = tributary_controlplane::http_client::request_with(
            admin,
            Some(&pki.admin),
            "GET",
            "/metrics",
            b"",
        )
        .await?;
        if code != 200 {
            bail!(
                "GET https://{admin}/metrics: {code}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(Some(mtls::handshakes(
            &String::from_utf8_lossy(&body),
            "xds",
        )))
    }

    fn procs(&self) -> Vec<&Proc> {
        self.procs.iter().map(|m| m.proc).collect()
    }

    fn log(&self) -> String {
        self.procs
            .iter()
            .map(|m| m.proc.log.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// With `detail`: every process's CPU so far, resident memory and streams now.
    async fn record(&self, boundary: &str) {
        if !self.detail {
            return;
        }
        let mut v = Vec::new();
        for m in &self.procs {
            let streams = match &m.streams {
                Some((admin, metric)) => match http(admin, "GET", "/metrics", b"").await {
                    Ok((200, body)) => sum_metric(&body, metric),
                    _ => 0,
                },
                None => 0,
            };
            v.push(ProcSample {
                cpu_s: m.proc.cpu_seconds(),
                rss_bytes: m.proc.rss_bytes(),
                streams,
            });
        }
        self.records.lock().unwrap().push((boundary.to_string(), v));
    }

    /// Per process: CPU in each phase (between consecutive boundaries), RSS and
    /// streams at its end.
    fn figures(&self) -> Option<Vec<ProcFigures>> {
        if !self.detail {
            return None;
        }
        let records = self.records.lock().unwrap();
        Some(
            self.procs
                .iter()
                .enumerate()
                .map(|(k, m)| {
                    let mut phases = BTreeMap::new();
                    for w in records.windows(2) {
                        let (a, b) = (&w[0].1[k], &w[1].1[k]);
                        phases.insert(
                            w[1].0.clone(),
                            report::ProcPhase {
                                cpu_s: b.cpu_s - a.cpu_s,
                                rss_bytes: b.rss_bytes,
                                streams: b.streams,
                            },
                        );
                    }
                    ProcFigures {
                        name: m.label.clone(),
                        role: m.role.to_string(),
                        shards: m.shards.clone(),
                        phases,
                        peak_rss_bytes: m.proc.peak_rss_bytes(),
                    }
                })
                .collect(),
        )
    }
}

/// The sum of a Prometheus gauge's series (`name{...} value` or `name value`).
fn sum_metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The real Envoys' samples over the rounds.
#[derive(Default)]
struct EnvoyCollected {
    samples: Vec<f64>,
    clients: Vec<f64>,
    resolution: Vec<f64>,
    lost: usize,
}

/// Called once every client has synced, with the clients: a count of problems (the
/// sharded scenarios: clients not on their rendezvous replica).
type AfterSync<'a> = Box<
    dyn FnOnce(
            Vec<Spec>,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<usize>> + 'a>>
        + 'a,
>;

#[allow(clippy::too_many_arguments)]
async fn run(
    args: &Args,
    sc0: &Scenario,
    name: &str,
    position: usize,
    cp: &ControlPlane<'_>,
    target: Target,
    load: Phase,
    dir: &std::path::Path,
) -> anyhow::Result<Run> {
    Ok(
        run_with(args, sc0, name, position, cp, target, load, dir, None)
            .await?
            .0,
    )
}

/// [`run`], with `after_sync` called once every client has synced; its count is
/// returned with the run.
#[allow(clippy::too_many_arguments)]
async fn run_with(
    args: &Args,
    sc0: &Scenario,
    name: &str,
    position: usize,
    cp: &ControlPlane<'_>,
    target: Target,
    load: Phase,
    dir: &std::path::Path,
    after_sync: Option<AfterSync<'_>>,
) -> anyhow::Result<(Run, usize)> {
    let mut sc = sc0.clone();
    let timeout = Duration::from_secs(args.phase_timeout_s);
    let specs = specs(&sc, &models(&sc), args.sotw_fraction);
    let procs = cp.procs();
    let xds = cp.xds.clone();
    let shared = Arc::new(Shared::new(specs.len()));
    let (stop_tx, stop) = watch::channel(false);
    let mut phases = BTreeMap::new();
    phases.insert("load".to_string(), load);

    // Initial sync: every client at once, each on its own connection.
    eprintln!("{name}: {} clients connecting", specs.len());
    let handshakes0 = cp.tls_handshakes().await?;
    let m = mark(&procs, &[]);
    let started = Instant::now();
    let mut endpoints: HashMap<String, tonic::transport::Endpoint> = HashMap::new();
    let mut tasks = Vec::new();
    for spec in &specs {
        let addr = (cp.addr_of)(spec);
        let ep = match endpoints.get(&addr) {
            Some(ep) => ep.clone(),
            None => {
                let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                    .initial_connection_window_size(16 << 20)
                    .initial_stream_window_size(4 << 20)
                    .tcp_nodelay(true);
                endpoints.insert(addr, ep.clone());
                ep
            }
        };
        let tls = match &cp.mtls {
            Some((pki, _)) => Some(pki.client(spec)?.connector()),
            None => None,
        };
        tasks.push(tokio::spawn(clients::run(
            ep,
            tls,
            spec.clone(),
            shared.clone(),
            stop.clone(),
        )));
    }
    let envoys = if args.real_envoys > 0 {
        envoys::start(
            args.real_envoys,
            &args.envoy_bin,
            &xds,
            &dir.join(format!("envoys-{name}")),
            args.cpu_harness.as_deref(),
            |k| scope_name(sc.scope_of(k)),
            cp.mtls.as_ref().map(|(pki, _)| &**pki),
        )?
    } else {
        Vec::new()
    };
    let envoys_cpu0 = envoys::usage(&envoys).0;
    let deadline = Instant::now() + timeout;
    loop {
        let synced = shared.synced.load(Ordering::Acquire);
        progress("initial sync", synced, specs.len());
        if synced == specs.len() {
            break;
        }
        if Instant::now() > deadline {
            envoys::stop(envoys);
            bail!(
                "{name}: only {synced} of {} clients synced within {timeout:?}; log: {}",
                specs.len(),
                cp.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let initial_sync_s = started.elapsed().as_secs_f64();
    let connect_s = shared
        .last_connected
        .lock()
        .unwrap()
        .map_or(0.0, |t| t.duration_since(started).as_secs_f64());
    let envoy_ready = match envoys::wait_ready(&envoys, started, timeout).await {
        Ok(r) => r,
        Err(e) => {
            envoys::stop(envoys);
            return Err(e);
        }
    };
    let mut sync_phase = phase_since(m, &procs, &envoys);
    sync_phase.envoys_cpu_s += envoys_cpu0; // the Envoys' start-up belongs to the sync
    phases.insert("initial_sync".to_string(), sync_phase);
    cp.record("initial_sync").await;
    let tls = match (handshakes0, cp.tls_handshakes().await?) {
        (Some((ok0, failed0)), Some((ok1, failed1))) => Some(report::TlsFigures {
            handshakes: ok1 - ok0,
            handshake_failures: failed1 - failed0,
        }),
        _ => None,
    };
    let after_sync = match after_sync {
        Some(f) => f(specs.clone()).await?,
        None => 0,
    };

    // Subscribers of each service: sidecars whose scope depends on it (gateways hold
    // every load assignment) — per shard when sharded: a change of an endpoint in
    // zone z reaches only the clients of its environment's shard in z.
    let mut subscribers: HashMap<(ShardKey, usize), usize> = HashMap::new();
    let mut gateways: HashMap<ShardKey, usize> = HashMap::new();
    for spec in &specs {
        if spec.gateway {
            *gateways.entry(spec.shard).or_default() += 1;
        } else {
            // Sidecar k is specs[k].
            for i in sc.deps(sc.scope_of(spec.index)) {
                *subscribers.entry((spec.shard, i)).or_default() += 1;
            }
        }
    }
    let shard_of_change = |sc: &Scenario, i: usize, cluster: usize| -> ShardKey {
        sc.layout
            .sharded
            .then(|| (sc.env_of_service(i), sc.zone_of(cluster)))
    };
    let envoy_deps: Vec<HashSet<usize>> = (0..envoys.len())
        .map(|k| sc.deps(sc.scope_of(k)).into_iter().collect())
        .collect();

    let mut lost = 0;
    let mut phase = 0u64;
    let mut collected = Collected::default();
    let mut from_envoys = EnvoyCollected::default();
    let m = mark(&procs, &envoys);
    for round in 0..sc.size.rounds {
        phase += 1;
        let changes = sc.change_round(round);
        let mut expected = HashMap::new();
        let mut total = 0;
        let mut clusters = Vec::new();
        for (i, old, new) in &changes {
            let j = sc.endpoints[*i]
                .iter()
                .position(|e| e.address == *new)
                .context("changed endpoint")?;
            let cluster = sc.endpoints[*i][j].cluster;
            let shard = shard_of_change(&sc, *i, cluster);
            for p in 0..sc.size.ports {
                expected.insert(
                    resource_name(*i, p),
                    Expect {
                        phase,
                        address: new.to_string(),
                        old: old.to_string(),
                    },
                );
                total += subscribers.get(&(shard, *i)).copied().unwrap_or(0)
                    + gateways.get(&shard).copied().unwrap_or(0);
            }
            clusters.push(cluster);
        }
        clusters.sort();
        clusters.dedup();
        let services: Vec<usize> = changes.iter().map(|(i, _, _)| *i).collect();
        // The harness's own work (the clusters' next state) happens before the clock
        // starts; the injection itself is inside the measurement.
        let prepared = target.prepare(&sc, &clusters);
        begin(&shared, expected, None, total, phase);
        let t0 = (*shared.t0.lock().unwrap()).context("t0")?;
        target.push(&sc, prepared, &services, false).await?;
        let polls: Vec<_> = envoys
            .iter()
            .zip(&envoy_deps)
            .filter_map(|(e, deps)| {
                // One watch per changed service in the Envoy's scope: its clusters.
                let watches: Vec<envoys::Watch> = changes
                    .iter()
                    .filter(|(i, _, _)| deps.contains(i))
                    .map(|(i, old, new)| envoys::Watch {
                        filter: format!(".*\\|{}", envoys::regex_escape(&host(*i))),
                        changes: (0..sc.size.ports)
                            .map(|p| (resource_name(*i, p), new.to_string(), old.to_string()))
                            .collect(),
                    })
                    .collect();
                (!watches.is_empty()).then(|| {
                    tokio::spawn(envoys::poll_round(
                        e.admin.clone(),
                        watches,
                        t0,
                        Duration::from_millis(args.envoy_poll_ms),
                        timeout,
                    ))
                })
            })
            .collect();
        let missed = wait_phase(
            &shared,
            &format!("round {}/{}", round + 1, sc.size.rounds),
            total,
            timeout,
        )
        .await;
        if missed > 0 {
            report_missing(&shared, &specs);
        }
        lost += missed;
        for p in polls {
            let polled = p.await?;
            if let Some(last) = polled.samples.iter().map(|s| s.0).reduce(f64::max) {
                from_envoys.clients.push(last);
            }
            for (ms, res) in polled.samples {
                from_envoys.samples.push(ms);
                from_envoys.resolution.push(res);
            }
            from_envoys.lost += polled.lost;
        }
        let samples = std::mem::take(&mut *shared.samples.lock().unwrap());
        collected.add_round(samples, &specs);
    }
    phases.insert("rounds".to_string(), phase_since(m, &procs, &envoys));
    cp.record("rounds").await;

    // Config change: add services.
    let mut config_change = Collected::default();
    if sc.size.added_services > 0 {
        let m = mark(&procs, &envoys);
        phase += 1;
        let first = sc.active;
        sc.active += sc.size.added_services;
        let new: Vec<usize> = (first..sc.active).collect();
        let mut names: HashMap<&'static str, HashSet<String>> = HashMap::new();
        for &i in &new {
            names
                .entry(ENVS[sc.env_of_service(i)])
                .or_default()
                .extend((0..sc.size.ports).map(|p| resource_name(i, p)));
        }
        let g = ConfigExpect {
            phase,
            names,
            host: (0..sc.layout.environments)
                .filter_map(|e| Some((ENVS[e], host(sc.last_added(e)?))))
                .collect(),
            scope_hosts: (0..sc.size.scopes)
                .filter_map(|j| Some((scope_name(j), host(sc.added_dep(j)?))))
                .collect(),
        };
        let mut clusters: Vec<usize> = new
            .iter()
            .flat_map(|i| sc.endpoints[*i].iter().map(|e| e.cluster))
            .collect();
        clusters.sort();
        clusters.dedup();
        let prepared = target.prepare(&sc, &clusters);
        begin(&shared, HashMap::new(), Some(g), specs.len(), phase);
        target.push(&sc, prepared, &new, true).await?;
        lost += wait_phase(&shared, "config change", specs.len(), timeout).await;
        let samples = std::mem::take(&mut *shared.samples.lock().unwrap());
        config_change.add_round(samples, &specs);
        phases.insert("config_change".to_string(), phase_since(m, &procs, &envoys));
        cp.record("config_change").await;
    }

    // The content check, against the final model. Every client has ACKed what the
    // last phase waited for; a client may still be taking a response that carries
    // nothing new (e.g. a route table's second update), so the check is repeated
    // until it passes or the phase times out.
    let m = mark(&procs, &envoys);
    let models = models(&sc);
    let deadline = Instant::now() + timeout.min(Duration::from_secs(30));
    let content = loop {
        let mut c = check::ContentCheck::default();
        for (key, model) in &models {
            let of_shard: Vec<Spec> = specs.iter().filter(|s| s.shard == *key).cloned().collect();
            c.merge(check::check(model, &of_shard, &shared.holdings));
        }
        if c.failures() == 0 || Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if content.failures() > 0 {
        eprintln!(
            "{name}: content check: {} failures, e.g. {:?}",
            content.failures(),
            content.examples
        );
    }
    phases.insert("check".to_string(), phase_since(m, &procs, &envoys));
    cp.record("check").await;

    let (envoy_cpu, envoy_rss) = envoys::usage(&envoys);
    let real_envoys = (!envoys.is_empty()).then(|| EnvoyFigures {
        count: envoys.len(),
        initial_sync_ms: percentiles(&envoy_ready.iter().map(|s| s * 1000.0).collect::<Vec<_>>()),
        per_sample_ms: percentiles(&from_envoys.samples),
        per_client_ms: percentiles(&from_envoys.clients),
        resolution_ms: percentiles(&from_envoys.resolution),
        poll_interval_ms: args.envoy_poll_ms,
        lost_updates: from_envoys.lost,
        cpu_s: envoy_cpu,
        peak_rss_bytes: envoy_rss,
    });
    envoys::stop(envoys);
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let all_samples: Vec<f64> = collected.sample.iter().flatten().copied().collect();
    let all_config: Vec<f64> = config_change.sample.iter().flatten().copied().collect();
    let result = Run {
        name: name.to_string(),
        position,
        convergence_ms: percentiles(&all_samples),
        per_sample_ms: collected.split_samples(),
        per_client_ms: collected.split_clients(),
        config_change_ms: percentiles(&all_config),
        config_change_per_client_ms: config_change.split_clients(),
        initial_sync_s,
        hub: HubUsage {
            cpu_s: procs.iter().map(|p| p.cpu_seconds()).sum(),
            peak_rss_bytes: procs.iter().map(|p| p.peak_rss_bytes()).sum(),
        },
        harness: HarnessUsage {
            cpu_s: phases.values().map(|p| p.harness_cpu_s).sum(),
        },
        phases,
        bytes_sent: shared.bytes.load(Ordering::Relaxed),
        messages_sent: shared.messages.load(Ordering::Relaxed),
        lost_updates: lost + real_envoys.as_ref().map_or(0, |e| e.lost_updates),
        version_mismatches: content.failures(),
        stale_at_sample: shared.stale_at_sample.load(Ordering::Relaxed),
        client_errors: shared.errors.load(Ordering::Relaxed),
        reconnects: shared.reconnects.load(Ordering::Relaxed),
        content_check: content,
        real_envoys,
        processes: cp.figures(),
        connect_s,
        tls,
        client_samples: collected.client.iter().flatten().copied().collect(),
        samples: all_samples,
    };
    if let Target::Ours { agents, .. } = target {
        drop(agents);
    }
    Ok((result, after_sync))
}

/// `tributary hub` as every scenario runs it — `config` dir, `state` dir (emptied
/// first), ephemeral loopback ports, no sync wait — plus `extra`, `--debounce` and the
/// `--hub-arg`s, pinned to the control plane's CPUs.
fn hub_argv(
    args: &Args,
    hub_bin: &std::path::Path,
    config: &std::path::Path,
    state: &std::path::Path,
    extra: &[&str],
) -> Vec<String> {
    hub_argv_tls(args, hub_bin, config, state, extra, None)
}

/// [`hub_argv`], serving mutual TLS with `pki`'s hub certificate instead of
/// `--insecure` when given.
fn hub_argv_tls(
    args: &Args,
    hub_bin: &std::path::Path,
    config: &std::path::Path,
    state: &std::path::Path,
    extra: &[&str],
    pki: Option<&mtls::Pki>,
) -> Vec<String> {
    let _ = std::fs::remove_dir_all(state);
    let transport = match pki {
        Some(pki) => pki.hub_flags(),
        // Loopback only: plaintext.
        None => vec!["--insecure".to_string()],
    };
    let mut argv: Vec<String> = [
        hub_bin.to_string_lossy().as_ref(),
        "hub",
        "--config",
        &config.to_string_lossy(),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .chain(transport.iter().map(String::as_str))
    .chain([
        "--xds-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--csr-addr",
        "127.0.0.1:0",
        "--sync-wait",
        "0s",
        "--state-dir",
        &state.to_string_lossy(),
    ])
    .map(str::to_string)
    .collect();
    if let Some(d) = &args.debounce {
        argv.extend(["--debounce-quiet".to_string(), d.clone()]);
    }
    argv.extend(args.hub_args.iter().cloned());
    pinned(args.cpu_control_plane.as_deref(), argv)
}

/// `taskset -c CPUS` in front of `argv` when pinning is asked for.
fn pinned(cpus: Option<&str>, argv: Vec<String>) -> Vec<String> {
    match cpus {
        Some(c) => ["taskset".to_string(), "-c".into(), c.into()]
            .into_iter()
            .chain(argv)
            .collect(),
        None => argv,
    }
}

/// The name of our control plane's runs with mutual TLS.
const OURS_MTLS: &str = "tributary+mtls";

/// Our control plane: plaintext, or with mutual TLS (`tls`) everywhere.
async fn ours(
    args: &Args,
    sc: &Scenario,
    dir: &std::path::Path,
    position: usize,
    tls: bool,
) -> anyhow::Result<Run> {
    let hub_bin = match &args.hub_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("tributary"),
    };
    let config = dir.join("hub-config");
    std::fs::create_dir_all(&config)?;
    let pki = if tls {
        Some(mtls::Pki::new(&dir.join("pki"), sc)?)
    } else {
        None
    };
    let mut yaml = sc.hub_config_yaml();
    if pki.is_some() {
        yaml = format!("{yaml}---\n{}", mtls::registry_yaml(sc));
    }
    std::fs::write(config.join("mesh.yaml"), yaml)?;
    let argv = hub_argv_tls(
        args,
        &hub_bin,
        &config,
        &dir.join("hub-state"),
        &[],
        pki.as_deref(),
    );
    let proc = match (&args.hub_addr, &args.hub_admin) {
        (Some(x), Some(a)) => Proc::attach(
            "hub",
            serde_json::json!({ "xds": x, "admin": a }),
            args.hub_pid,
        ),
        _ => Proc::start("hub", &argv, dir)?,
    };
    let (xds, admin) = (proc.addr("xds")?, proc.addr("admin")?);
    let batch = args
        .agent_batch
        .as_deref()
        .map(tributary_controlplane::config::parse_duration)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--agent-batch: {e}"))?;

    // The estate arrives through the federation protocol, one agent per cluster.
    let m = mark(&[&proc], &[]);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut agents = Vec::new();
    for c in 0..sc.size.clusters {
        let (tx, rx) = watch::channel(Arc::new(sc.cluster_state(c)));
        let mut cfg = AgentConfig::new(format!("http://{xds}"), cluster_id(c));
        cfg.tls = pki.as_ref().map(|p| p.agent(c));
        cfg.region = scenario::REGION.into();
        cfg.zone = format!("az{}", c % 3);
        if let Some(b) = batch {
            cfg.debounce = b;
        }
        let mut stop = stop_rx.clone();
        tokio::spawn(agent::run(cfg, rx, async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
        agents.push(vec![Feed { envs: None, tx }]);
    }
    let want = sc.size.services * sc.size.ports;
    let deadline = Instant::now() + Duration::from_secs(args.phase_timeout_s);
    let admin_tls = pki.as_ref().map(|p| &p.admin);
    loop {
        let (code, body) = tributary_controlplane::http_client::request_with(
            &admin,
            admin_tls,
            "GET",
            "/status/environments",
            b"",
        )
        .await?;
        // Not ready yet is retried; refused is not (the harness's operator grant).
        if code == 401 || code == 403 {
            bail!(
                "GET {admin}/status/environments: {code}: {}; log: {}",
                String::from_utf8_lossy(&body),
                proc.log.display()
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let have = v["environments"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["environment"] == "prod")
            .and_then(|s| s["endpoints"].as_u64())
            .unwrap_or(0) as usize;
        progress("hub loading (federation)", have, want);
        if have >= want {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the hub has {have} of {want} load assignments after the agents connected; log: {}",
                proc.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let load = phase_since(m, &[&proc], &[]);
    let mut cp = ControlPlane::single(&proc, &xds);
    cp.mtls = pki.map(|p| (p, admin.clone()));
    let r = run(
        args,
        sc,
        if tls { OURS_MTLS } else { "tributary" },
        position,
        &cp,
        Target::Ours { agents },
        load,
        dir,
    )
    .await;
    drop(cp);
    let _ = stop_tx.send(true);
    proc.stop();
    r
}

async fn peer(
    args: &Args,
    sc: &Scenario,
    dir: &std::path::Path,
    position: usize,
) -> anyhow::Result<Run> {
    let bin = match &args.peer_bin {
        Some(p) => p.clone(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peer/bin/gcp-peer"),
    };
    if !bin.exists() {
        bail!(
            "peer binary {} not found: run loadtest/peer/build.sh, or pass --no-peer",
            bin.display()
        );
    }
    let argv: Vec<String> = [
        bin.to_string_lossy().as_ref(),
        "-xds",
        "127.0.0.1:0",
        "-control",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let argv = pinned(args.cpu_control_plane.as_deref(), argv);
    let proc = Proc::start("peer", &argv, dir)?;
    let (xds, control) = (proc.addr("xds")?, proc.addr("control")?);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{control}"))?;
    // The peer listens before it writes its ready file; a connect can still fail while
    // the previous run's sockets drain, so try for a few seconds.
    let mut attempt = 0;
    let control = loop {
        match endpoint.connect().await {
            Ok(c) => break c,
            Err(e) if attempt < 20 => {
                attempt += 1;
                tracing::warn!(error = ?e, "connecting to the peer's control API; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "connecting to the peer's control API at {control}: {e:?}; log: {}",
                    proc.log.display()
                ));
            }
        }
    };
    eprintln!("go-control-plane peer: loading the estate");
    let m = mark(&[&proc], &[]);
    let resources = generate(&sc.model());
    let mut all = Generated::new();
    for ty in XdsType::ALL {
        for (_, r) in resources.by_type[ty as usize].iter() {
            all.push((ty, r.clone()));
        }
    }
    feed_peer(control.clone(), all, Some(&resources.roles)).await?;
    let load = phase_since(m, &[&proc], &[]);
    let cp = ControlPlane::single(&proc, &xds);
    let r = run(
        args,
        sc,
        "go-control-plane",
        position,
        &cp,
        Target::Peer { control },
        load,
        dir,
    )
    .await;
    drop(cp);
    proc.stop();
    r
}

/// The settings of this invocation, recorded with its figures.
fn settings(args: &Args, nofile: u64) -> serde_json::Value {
    serde_json::json!({
        "runs": args.runs,
        "order": if args.compare_mtls {
            "tributary, tributary+mtls, go-control-plane in odd runs; the reverse in even runs"
        } else {
            "tributary first in odd runs, go-control-plane first in even runs"
        },
        "mtls": if args.compare_mtls { "compare" } else if args.mtls { "on" } else { "off" },
        "agent_batch": args.agent_batch.clone().unwrap_or_else(|| "50ms (agent default)".into()),
        "hub_debounce_quiet": args.debounce.clone().unwrap_or_else(|| "100ms (hub default)".into()),
        "hub_args": args.hub_args,
        "sotw_fraction": args.sotw_fraction,
        "connections": "one per client",
        "clients": "Envoy-like: CDS wildcard (scoped) -> EDS by name; once warm, LDS wildcard -> RDS by name",
        "real_envoys": args.real_envoys,
        "envoy_poll_ms": args.envoy_poll_ms,
        "pinning": {
            "control_plane_cpus": args.cpu_control_plane,
            "harness_cpus": args.cpu_harness,
        },
        "nofile_limit": nofile,
    })
}

/// The JSON file: [`report::to_json`] of ours (plaintext; with --mtls alone, mTLS)
/// and the peer, with an `mtls` block when mutual TLS ran
/// ([`report::mtls_json`]).
fn summary_json(
    args: &Args,
    size: &Size,
    nofile: u64,
    ours: &[Run],
    mtls: &[Run],
    peer: &[Run],
    runs: &[serde_json::Value],
) -> serde_json::Value {
    let o: Vec<&Run> = ours.iter().collect();
    let p: Vec<&Run> = peer.iter().collect();
    let mut v = report::to_json(
        size,
        settings(args, nofile),
        &o,
        &p,
        serde_json::Value::Array(runs.to_vec()),
    );
    if args.compare_mtls {
        let t: Vec<&Run> = mtls.iter().collect();
        v["mtls"] = report::mtls_json(&o, &t);
    } else if args.mtls {
        v["mtls"] = report::mtls_json(&[], &o);
    }
    v
}

/// The console line of the `mtls` block, when both modes ran.
fn mtls_line(m: &serde_json::Value) -> Option<String> {
    let h = m.get("handshake")?;
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let p99 = &m["p99_mtls_over_plaintext"];
    Some(format!(
        "mutual TLS vs plaintext (medians of per-run figures): p99 per sample {:.2}x, per client sidecars {:.2}x, gateways {:.2}x (goal <= 1.10x: {}); {:.0} handshakes, {:+.2} s hub CPU in the initial sync ({:.2} ms per handshake), connecting {:+.2} s, initial sync {:+.2} s",
        f(p99, "per_sample_all"),
        f(p99, "per_client_sidecars"),
        f(p99, "per_client_gateways"),
        if m["goal_met"].as_bool() == Some(true) {
            "met"
        } else {
            "not met"
        },
        f(h, "handshakes"),
        f(h, "extra_initial_sync_cpu_s"),
        f(h, "cpu_per_handshake_ms"),
        f(h, "extra_connect_s"),
        f(h, "extra_initial_sync_s"),
    ))
}

/// Pins this process (every thread it has now; later ones inherit) to `cpus`.
fn pin_self(cpus: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running taskset")?;
    if !status.success() {
        bail!("taskset -a -p -c {cpus} (this process): {status}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tributary_controlplane::config::init_logging("warn");
    let args = Args::parse();
    let size = size(&args)?;
    eprintln!("scenario: {size:?}");
    // One connection per client (and one per agent): raise the open-files limit to
    // the hard limit; the control planes started below inherit it.
    let nofile = rlimit::increase_nofile_limit(u64::MAX).context("raising RLIMIT_NOFILE")?;
    // Sharded: an agent per remote cluster and replica of its zone's shards.
    let agents = if args.scenario.starts_with("sharded") {
        size.clusters * args.environments * args.replicas_per_shard
    } else {
        size.clusters
    };
    let needed = (size.sidecars + size.gateways + agents + 64) as u64;
    if nofile < needed {
        bail!(
            "open-files limit {nofile} (hard) is below the {needed} connections this scenario opens: raise it (ulimit -Hn) or shrink the scenario"
        );
    }
    if let Some(c) = &args.cpu_harness {
        pin_self(c)?;
    }
    if (args.mtls || args.compare_mtls)
        && (args.scenario.starts_with("sharded") || args.hub_addr.is_some())
    {
        bail!(
            "--mtls and --compare-mtls start one hub of their own with certificates they make: they take --scenario ebay or small (got {:?}) and no --hub-addr",
            args.scenario
        );
    }
    if args.scenario.starts_with("sharded") {
        let sc = Scenario::sharded(size.clone(), args.environments, args.zones)?;
        return sharded::main(&args, sc, size, nofile).await;
    }
    let sc = Scenario::new(size.clone());
    let dir = std::env::temp_dir().join(format!("tributary-loadtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    // What each run runs, in order (reversed in even runs).
    let mut order: Vec<&str> = match (args.compare_mtls, args.mtls) {
        (true, _) => vec!["tributary", OURS_MTLS],
        (false, true) => vec![OURS_MTLS],
        (false, false) => vec!["tributary"],
    };
    if !args.no_peer {
        order.push("go-control-plane");
    }
    // Ours (plaintext; with --mtls alone, mTLS), ours with mTLS (--compare-mtls), the peer.
    let mut ours_runs: Vec<Run> = Vec::new();
    let mut mtls_runs: Vec<Run> = Vec::new();
    let mut peer_runs: Vec<Run> = Vec::new();
    let mut run_json = Vec::new();
    for r in 0..args.runs {
        let mut this: Vec<&str> = order.clone();
        if r % 2 == 1 {
            this.reverse();
        }
        eprintln!("\n== run {}/{}: {}", r + 1, args.runs, this.join(", then "));
        let mut entry = serde_json::Map::new();
        entry.insert("run".into(), serde_json::json!(r + 1));
        entry.insert("first".into(), serde_json::json!(this[0]));
        for (i, &name) in this.iter().enumerate() {
            let run = match name {
                "go-control-plane" => peer(&args, &sc, &dir, i + 1).await?,
                _ => ours(&args, &sc, &dir, i + 1, name == OURS_MTLS).await?,
            };
            entry.insert(name.into(), serde_json::json!(run));
            match name {
                "go-control-plane" => peer_runs.push(run),
                OURS_MTLS if args.compare_mtls => mtls_runs.push(run),
                _ => ours_runs.push(run),
            }
        }
        run_json.push(serde_json::Value::Object(entry));
        // Each run's figures are on disk as soon as it ends.
        if let Some(path) = &args.json {
            let partial = summary_json(
                &args, &size, nofile, &ours_runs, &mtls_runs, &peer_runs, &run_json,
            );
            std::fs::write(path, serde_json::to_string_pretty(&partial)?)?;
        }
    }

    let all: Vec<Run> = (0..args.runs)
        .flat_map(|r| [ours_runs.get(r), mtls_runs.get(r), peer_runs.get(r)])
        .flatten()
        .cloned()
        .collect();
    println!("\n{}", report::table(&all));
    let numbered: Vec<(usize, &Run)> = ours_runs
        .iter()
        .enumerate()
        .chain(mtls_runs.iter().enumerate())
        .chain(peer_runs.iter().enumerate())
        .collect();
    println!("\n{}", report::details(&numbered));
    let summary = summary_json(
        &args, &size, nofile, &ours_runs, &mtls_runs, &peer_runs, &run_json,
    );
    if let Some(line) = mtls_line(&summary["mtls"]) {
        println!("\n{line}");
    }
    if !peer_runs.is_empty() {
        println!(
            "\nmedians over {} runs, peer / ours: p99 per sample {:.1}x, p99 sidecars per client {:.1}x, initial sync {:.2}x, rounds CPU {:.1}x, peak RSS {:.1}x",
            args.runs,
            summary["ratios"]["p99_convergence_peer_over_ours"]
                .as_f64()
                .unwrap_or(0.0),
            summary["ratios"]["p99_per_client_sidecars_peer_over_ours"]
                .as_f64()
                .unwrap_or(0.0),
            summary["ratios"]["initial_sync_peer_over_ours"]
                .as_f64()
                .unwrap_or(0.0),
            summary["ratios"]["rounds_cpu_peer_over_ours"]
                .as_f64()
                .unwrap_or(0.0),
            summary["ratios"]["peak_rss_peer_over_ours"]
                .as_f64()
                .unwrap_or(0.0),
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, report::svg(&all))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let failures: Vec<String> = all
        .iter()
        .filter(|r| r.lost_updates + r.version_mismatches + r.stale_at_sample + r.client_errors > 0)
        .map(|r| {
            format!(
                "{}: {} lost updates, {} content-check failures, {} stale at sample time, {} client errors",
                r.name, r.lost_updates, r.version_mismatches, r.stale_at_sample, r.client_errors
            )
        })
        .collect();
    if !failures.is_empty() {
        bail!("correctness check failed: {}", failures.join("; "));
    }
    println!(
        "correctness: every expected update arrived at every client, the old address gone; every client holds exactly the model's content"
    );
    Ok(())
}
