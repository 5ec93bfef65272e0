//! One large remote cluster, end to end: a real kube-apiserver (started by
//! `tests/kube/kubeenv.py`, as the tests do) holding N Services with E endpoints each
//! (written through the API in parallel), one `tributary remote` in Kubernetes mode and
//! one `tributary hub`, both the release binary, as child processes.
//!
//! Per size it reports, for each run: the time from the agent's start until the hub
//! holds every service and endpoint and has published every load assignment; the hub's
//! and the agent's CPU time and peak RSS at that moment (from `/proc`); then the time
//! for U EndpointSlice updates (one address each, patched in parallel) to reach a Delta
//! xDS client subscribed to those U load assignments. Results are recorded in
//! `docs/benchmarks.md`.
//!
//! ```sh
//! cargo build --release -p tributary-controlplane --bin tributary --example kube_bench
//! ./target/release/examples/kube_bench --sizes 2000,10000,20000 --runs 3
//! ```

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use prost::Message;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tributary_controlplane::agent::kube::KubeOptions;
use tributary_proto::envoy::envoy::config::core::v3::Node as XdsNode;
use tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use tributary_proto::envoy::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tributary_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tributary_proto::envoy::google::protobuf::{Struct, Value, value::Kind};

#[derive(Debug, Parser)]
#[command(about = "Federate one large Kubernetes cluster into a hub and measure it")]
struct Args {
    /// Numbers of Services (comma-separated); each size gets a fresh kube-apiserver.
    #[arg(long, value_delimiter = ',', default_value = "2000,10000,20000")]
    sizes: Vec<usize>,
    /// Endpoints per Service (one EndpointSlice each).
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Hub + agent runs per size (against the same apiserver contents).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// EndpointSlices updated after each run's ingest.
    #[arg(long, default_value_t = 100)]
    updates: usize,
    /// Requests in flight while writing objects through the API.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
    /// Nodes (with zone labels) the endpoints are spread over.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// The `tributary` binaries (comma-separated; default: the one built beside this
    /// example). With several, each run tries each of them in turn against the same
    /// apiserver contents (an A/B comparison under the same load). An entry may add
    /// agent flags after the path, separated by spaces (e.g.
    /// `"target/release/tributary --kube-list-from-cache"`).
    #[arg(long, value_delimiter = ',')]
    bin: Vec<String>,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value = "300", value_parser = |s: &str| s.parse::<u64>().map(Duration::from_secs))]
    timeout: Duration,
    /// Also write every run's figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Profile the hub and the agent during the ingest with `perf record` (cpu-clock
    /// samples with call graphs) into DIR/{hub,agent}-SIZE-RUN.data. The figures of a
    /// profiled run include perf's overhead.
    #[arg(long)]
    perf_dir: Option<PathBuf>,
    /// perf's `--call-graph` method for `--perf-dir`: `fp` (frame pointers, which
    /// release builds omit: callers are mostly lost) or `dwarf` (unwinds from copied
    /// stacks with the binary's unwind tables: whole call chains, larger files and
    /// more overhead).
    #[arg(long, default_value = "fp")]
    perf_call_graph: String,
    /// Run the hub under this command (split at spaces), e.g. `valgrind --tool=massif
    /// --massif-out-file=hub.massif` for a heap profile; its figures are then the
    /// wrapper's.
    #[arg(long)]
    hub_wrapper: Option<String>,
    /// The same for the agent.
    #[arg(long)]
    agent_wrapper: Option<String>,
}

/// `bin`, or `wrapper ... bin` when a wrapper is given.
fn command(bin: &Path, wrapper: Option<&String>) -> Command {
    match wrapper.map(|w| w.split_whitespace().collect::<Vec<_>>()) {
        Some(w) if !w.is_empty() => {
            let mut c = Command::new(w[0]);
            c.args(&w[1..]).arg(bin);
            c
        }
        _ => Command::new(bin),
    }
}

/// `perf record` attached to `pid` until [`Perf::stop`].
struct Perf(Child);

impl Perf {
    fn start(pid: u32, out: &Path, call_graph: &str) -> anyhow::Result<Perf> {
        Ok(Perf(
            Command::new("perf")
                .args(["record", "-e", "cpu-clock", "-F", "999", "--call-graph"])
                .arg(call_graph)
                .args(["-q", "-p"])
                .arg(pid.to_string())
                .arg("-o")
                .arg(out)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ))
    }

    /// Stops recording (SIGINT, so perf writes its file) and waits for perf.
    fn stop(mut self) -> anyhow::Result<()> {
        Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status()?;
        self.0.wait()?;
        Ok(())
    }
}

/// etcd + kube-apiserver, stopped (by the helper, on stdin EOF) when dropped.
struct KubeEnv {
    child: Child,
    kubeconfig: PathBuf,
    /// The kube-apiserver's pid: its CPU during the ingest (serving the agent's lists)
    /// shares the two cores with the hub and the agent.
    apiserver_pid: Option<u32>,
}

impl KubeEnv {
    fn start() -> anyhow::Result<KubeEnv> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut child = Command::new("python3")
            .arg(repo.join("tests/kube/kubeenv.py"))
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped")).read_line(&mut line)?;
        let info: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
            let _ = child.kill();
            anyhow::anyhow!("kubeenv.py did not start a kube-apiserver ({e}): {line:?}")
        })?;
        Ok(KubeEnv {
            kubeconfig: PathBuf::from(info["kubeconfig"].as_str().unwrap_or_default()),
            apiserver_pid: info["apiserver_pid"].as_u64().map(|p| p as u32),
            child,
        })
    }
}

impl Drop for KubeEnv {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        for _ in 0..300 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process, stopped (by its pid) when dropped: SIGTERM, then SIGKILL if it
/// has not exited within 30 s (a profiler wrapping it writes its file on exit).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..300 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds (user + system) and peak RSS (MiB) of a live process, from /proc.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (in parentheses): utime and stime are the
    // 14th and 15th fields of the line, the 12th and 13th after the name.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / 100.0; // USER_HZ is 100 on Linux
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, hwm_kib / 1024.0)
}

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("a valid object")
}

fn address(k: usize) -> String {
    format!("10.{}.{}.{}", 1 + (k >> 16), (k >> 8) & 255, k & 255)
}

/// Service `s{i}`'s slice; `first` replaces its first endpoint's address.
fn slice(i: usize, eps: usize, nodes: usize, first: Option<String>) -> EndpointSlice {
    let endpoints: Vec<serde_json::Value> = (0..eps)
        .map(|j| {
            let k = i * eps + j;
            let addr = match (&first, j) {
                (Some(a), 0) => a.clone(),
                _ => address(k),
            };
            // As the EndpointSlice controller writes them: the node and its zone.
            let node = k % nodes.max(1);
            json!({
                "addresses": [addr],
                "conditions": {"ready": true},
                "nodeName": format!("node-{node}"),
                "zone": format!("az{}", node % 3),
                "targetRef": {"kind": "Pod", "namespace": "bench", "name": format!("s{i}-{j}")},
            })
        })
        .collect();
    obj(json!({
        "metadata": {"name": format!("s{i}-x"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("s{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
}

async fn write_all(client: &kube::Client, args: &Args, n: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let pp = PostParams::default();
    Api::<Namespace>::all(client.clone())
        .create(
            &pp,
            &obj(json!({"metadata": {"name": "bench", "labels": {"tributary.io/env": "bench"}}})),
        )
        .await?;
    let nodes: Api<Node> = Api::all(client.clone());
    for i in 0..args.nodes {
        let zone = format!("az{}", i % 3);
        nodes
            .create(
                &pp,
                &obj(json!({"metadata": {"name": format!("node-{i}"),
                                         "labels": {"topology.kubernetes.io/zone": zone}}})),
            )
            .await?;
    }
    let services: Api<Service> = Api::namespaced(client.clone(), "bench");
    let results: Vec<_> = stream::iter(0..n)
        .map(|i| {
            let (services, pp) = (services.clone(), pp.clone());
            async move {
                let svc = json!({"metadata": {"name": format!("s{i}")},
                                 "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}});
                services.create(&pp, &obj(svc)).await.map(|_| ())
            }
        })
        .buffer_unordered(args.parallel)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "bench");
    let results: Vec<_> = stream::iter(0..n)
        .map(|i| {
            let (slices, pp) = (slices.clone(), pp.clone());
            let s = slice(i, args.endpoints, args.nodes, None);
            async move { slices.create(&pp, &s).await.map(|_| ()) }
        })
        .buffer_unordered(args.parallel)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(started.elapsed())
}

/// A plain HTTP/1.1 GET on loopback: the body.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// Whether the hub holds `n` services and `n * eps` endpoints of the cluster and has
/// published `n` load assignments in the `bench` environment.
async fn federated(admin: SocketAddr, n: usize, eps: usize) -> anyhow::Result<bool> {
    let v: serde_json::Value = serde_json::from_str(&http_get(admin, "/status/clusters").await?)?;
    let held = v["clusters"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == "bench"))
        .is_some_and(|c| {
            // Applied, and published: the flush after the last batch has run (an
            // agent that exports as it lists has load assignments in the snapshot
            // before their endpoints arrive). A hub without the field: applied only.
            let published = c
                .get("published_version")
                .is_none_or(|p| *p == c["last_version"]);
            c["services"].as_u64() == Some(n as u64)
                && c["endpoints"].as_u64() == Some((n * eps) as u64)
                && published
        });
    if !held {
        return Ok(false);
    }
    // Per environment: the published snapshot's resource counts. (`/status/shards`
    // shows the shard assignment since the store landed.)
    let v: serde_json::Value =
        serde_json::from_str(&http_get(admin, "/status/environments").await?)?;
    let list = v.get("environments").unwrap_or(&v);
    Ok(list.as_array().is_some_and(|a| {
        a.iter()
            .any(|s| s["environment"] == "bench" && s["endpoints"].as_u64() == Some(n as u64))
    }))
}

fn xds_node() -> XdsNode {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "tributary.io/env".to_string(),
        Value {
            kind: Some(Kind::StringValue("bench".into())),
        },
    );
    XdsNode {
        id: "bench-client".into(),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        ..Default::default()
    }
}

fn cla_name(i: usize) -> String {
    format!("outbound|80||s{i}.bench.svc.cluster.local")
}

fn cla_has(cla: &ClusterLoadAssignment, addr: &str) -> bool {
    use tributary_proto::envoy::envoy::config::core::v3::address::Address;
    use tributary_proto::envoy::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .any(|e| match &e.host_identifier {
            Some(HostIdentifier::Endpoint(ep)) => matches!(
                ep.address.as_ref().and_then(|a| a.address.as_ref()),
                Some(Address::SocketAddress(sa)) if sa.address == addr
            ),
            _ => false,
        })
}

/// Subscribes a Delta client to `updates` load assignments, waits for them, patches
/// their slices in parallel (a new address each) and returns when each change arrived,
/// counted from the moment the patches start.
async fn update_latency(
    xds: SocketAddr,
    client: &kube::Client,
    args: &Args,
    n: usize,
    round: usize,
) -> anyhow::Result<Vec<Duration>> {
    let updates = args.updates.min(n);
    let (tx, rx) = mpsc::channel(16);
    let mut ads = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}")).await?;
    let mut inbound = ads
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    tx.send(DeltaDiscoveryRequest {
        node: Some(xds_node()),
        type_url: tributary_proto::type_url::ENDPOINT.into(),
        resource_names_subscribe: (0..updates).map(cla_name).collect(),
        ..Default::default()
    })
    .await?;
    let names: HashMap<String, usize> = (0..updates).map(|i| (cla_name(i), i)).collect();
    // A new address per round (each round must change every slice it patches).
    let new_addr = |i: usize| format!("10.{}.{}.{}", 200 + round % 50, i >> 8, i & 255);
    let mut held: HashSet<usize> = HashSet::new();
    let deadline = tokio::time::Instant::now() + args.timeout;
    while held.len() < updates {
        let r = tokio::time::timeout_at(deadline, inbound.message())
            .await?
            .map_err(|e| anyhow::anyhow!("xDS stream: {e}"))?
            .ok_or_else(|| anyhow::anyhow!("xDS stream closed"))?;
        held.extend(r.resources.iter().filter_map(|x| names.get(&x.name)));
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await?;
    }
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "bench");
    let started = Instant::now();
    let patches = stream::iter(0..updates)
        .map(|i| {
            let slices = slices.clone();
            let s = slice(i, args.endpoints, args.nodes, Some(new_addr(i)));
            async move {
                let patch = Patch::Merge(json!({"endpoints": s.endpoints}));
                slices
                    .patch(&format!("s{i}-x"), &PatchParams::default(), &patch)
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(updates.max(1))
        .collect::<Vec<_>>();
    let receive = async {
        let mut arrived: HashMap<usize, Duration> = HashMap::new();
        while arrived.len() < updates {
            let r = tokio::time::timeout_at(deadline, inbound.message())
                .await?
                .map_err(|e| anyhow::anyhow!("xDS stream: {e}"))?
                .ok_or_else(|| anyhow::anyhow!("xDS stream closed"))?;
            for x in &r.resources {
                let Some(&i) = names.get(&x.name) else {
                    continue;
                };
                let Some(any) = &x.resource else { continue };
                let cla = ClusterLoadAssignment::decode(any.value.as_slice())?;
                if cla_has(&cla, &new_addr(i)) {
                    arrived.entry(i).or_insert_with(|| started.elapsed());
                }
            }
            tx.send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await?;
        }
        anyhow::Ok(arrived.into_values().collect::<Vec<_>>())
    };
    let (patched, arrived) = tokio::join!(patches, receive);
    patched.into_iter().collect::<Result<Vec<()>, _>>()?;
    let mut arrived = arrived?;
    arrived.sort();
    Ok(arrived)
}

#[derive(Debug, Clone, serde::Serialize)]
struct RunResult {
    bin: String,
    services: usize,
    endpoints: usize,
    run: usize,
    load_before: String,
    federate_seconds: f64,
    hub_cpu_seconds: f64,
    agent_cpu_seconds: f64,
    hub_peak_rss_mib: f64,
    agent_peak_rss_mib: f64,
    /// The kube-apiserver's CPU from the agent's start until the hub held everything.
    apiserver_cpu_seconds: f64,
    update_p50_ms: f64,
    update_max_ms: f64,
}

async fn one_run(
    (bin, agent_flags): &(PathBuf, Vec<String>),
    kube: &KubeEnv,
    client: &kube::Client,
    args: &Args,
    n: usize,
    run: usize,
    round: usize,
) -> anyhow::Result<RunResult> {
    let load_before = load();
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    std::fs::create_dir(&config)?;
    std::fs::write(config.join("empty.yaml"), "# federated only\n")?;
    let ready = dir.path().join("ready.json");
    let hub = Proc(
        command(bin, args.hub_wrapper.as_ref())
            .args(["hub", "--config"])
            .arg(&config)
            .args([
                "--insecure",
                "--xds-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--csr-addr",
                "127.0.0.1:0",
            ])
            .args(["--sync-wait", "0s", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", log_filter())
            .stdout(Stdio::null())
            .spawn()?,
    );
    let started = Instant::now();
    let (xds, admin) = loop {
        if let Ok(text) = std::fs::read_to_string(&ready)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            let addr = |k: &str| v[k].as_str().unwrap_or_default().parse::<SocketAddr>();
            break (addr("xds")?, addr("admin")?);
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the hub did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let hub_perf = match &args.perf_dir {
        Some(d) => Some(Perf::start(
            hub.0.id(),
            &d.join(format!("hub-{n}-{run}.data")),
            &args.perf_call_graph,
        )?),
        None => None,
    };
    let apiserver_cpu = || kube.apiserver_pid.map_or(f64::NAN, |p| usage(p).0);
    let apiserver_before = apiserver_cpu();
    let t0 = Instant::now();
    let agent = Proc(
        command(bin, args.agent_wrapper.as_ref())
            .args(["remote", "--hub", &format!("http://{xds}")])
            .args([
                "--cluster-id",
                "bench",
                "--zone",
                "az-default",
                "--kubeconfig",
            ])
            .arg(&kube.kubeconfig)
            .args(agent_flags)
            .env("RUST_LOG", log_filter())
            .stdout(Stdio::null())
            .spawn()?,
    );
    let agent_perf = match &args.perf_dir {
        Some(d) => Some(Perf::start(
            agent.0.id(),
            &d.join(format!("agent-{n}-{run}.data")),
            &args.perf_call_graph,
        )?),
        None => None,
    };
    while !federated(admin, n, args.endpoints).await? {
        anyhow::ensure!(
            t0.elapsed() < args.timeout,
            "not federated within {:?}",
            args.timeout
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let federate = t0.elapsed();
    let (hub_cpu, hub_rss) = usage(hub.0.id());
    let (agent_cpu, agent_rss) = usage(agent.0.id());
    let apiserver = apiserver_cpu() - apiserver_before;
    for p in [hub_perf, agent_perf].into_iter().flatten() {
        p.stop()?;
    }
    let arrived = update_latency(xds, client, args, n, round).await?;
    let ms = |d: Option<&Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    Ok(RunResult {
        bin: std::iter::once(
            bin.file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default(),
        )
        .chain(agent_flags.iter().cloned())
        .collect::<Vec<_>>()
        .join(" "),
        services: n,
        endpoints: n * args.endpoints,
        run,
        load_before,
        federate_seconds: federate.as_secs_f64(),
        hub_cpu_seconds: hub_cpu,
        agent_cpu_seconds: agent_cpu,
        hub_peak_rss_mib: hub_rss,
        agent_peak_rss_mib: agent_rss,
        apiserver_cpu_seconds: apiserver,
        update_p50_ms: ms(arrived.get(arrived.len() / 2)),
        update_max_ms: ms(arrived.last()),
    })
}

/// The hub's and agent's log filter: `$KUBE_BENCH_LOG`, else `warn` (their logs go to
/// this program's stderr).
fn log_filter() -> String {
    std::env::var("KUBE_BENCH_LOG").unwrap_or_else(|_| "warn".into())
}

/// The 1, 5 and 15 minute load averages (the machine is shared: note them per run).
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bins: Vec<(PathBuf, Vec<String>)> = if args.bin.is_empty() {
        vec![(
            std::env::current_exe()?
                .parent()
                .and_then(Path::parent)
                .map(|d| d.join("tributary"))
                .ok_or_else(|| anyhow::anyhow!("cannot locate the tributary binary; pass --bin"))?,
            Vec::new(),
        )]
    } else {
        args.bin
            .iter()
            .map(|entry| {
                let mut words = entry.split_whitespace().map(String::from);
                let path = PathBuf::from(words.next().unwrap_or_default());
                (path, words.collect())
            })
            .collect()
    };
    for (bin, _) in &bins {
        anyhow::ensure!(
            bin.exists(),
            "{} does not exist: cargo build --release -p tributary-controlplane --bin tributary",
            bin.display()
        );
    }
    let mut all = Vec::new();
    println!(
        "| binary | services × endpoints | run | load before | time to federate | hub CPU | agent CPU | apiserver CPU | hub peak RSS | agent peak RSS | {} updates p50 / max |",
        args.updates
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &args.sizes {
        let kube = KubeEnv::start()?;
        let opts = KubeOptions {
            kubeconfig: Some(kube.kubeconfig.clone()),
            ..Default::default()
        };
        let client = tributary_controlplane::agent::kube::client(&opts).await?;
        let wrote = write_all(&client, &args, n).await?;
        eprintln!(
            "wrote {n} Services and {n} EndpointSlices ({} endpoints) in {:.1} s",
            n * args.endpoints,
            wrote.as_secs_f64()
        );
        for run in 1..=args.runs {
            for (b, bin) in bins.iter().enumerate() {
                let round = (run - 1) * bins.len() + b + 1;
                let r = one_run(bin, &kube, &client, &args, n, run, round).await?;
                println!(
                    "| {} | {} × {} | {} | {} | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.0} MiB | {:.0} MiB | {:.0} / {:.0} ms |",
                    r.bin,
                    n,
                    args.endpoints,
                    run,
                    r.load_before,
                    r.federate_seconds,
                    r.hub_cpu_seconds,
                    r.agent_cpu_seconds,
                    r.apiserver_cpu_seconds,
                    r.hub_peak_rss_mib,
                    r.agent_peak_rss_mib,
                    r.update_p50_ms,
                    r.update_max_ms
                );
                all.push(r);
            }
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&all)?)?;
    }
    Ok(())
}
