//! What one relayed stream costs the router's heap, over plaintext and over mutual TLS.
//!
//! Each proxy opens its own HTTP/2 connection to the router with one ADS stream, so
//! what a stream costs is what its client connection, its stream and its relay cost
//! together. The heap is counted with a counting allocator, so only the router may
//! run in this process: the hub and the clients run in a child process (this test
//! binary again, with [`PEER_ENV`] set), and the router's membership is written into
//! its store by hand, naming the child's hub. The child speaks a line protocol on
//! stdin/stdout (`hub ADDR`, then `open N` / `synced`, `push` / `pushed`, `quit`).
//!
//! Measured: the router's heap before and after `STREAMS` Delta streams have synced
//! (every client ACKed its CDS response at the hub), and again after a config change
//! pushed to every stream and ACKed. A warm-up stream goes first, so that one-time
//! costs (the thread's copy buffer, metric families) are not counted against the
//! streams.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use tracking_allocator::{AllocationGroupId, AllocationRegistry, AllocationTracker, Allocator};
use tributary_controlplane::identity::Identity;
use tributary_controlplane::identity::testing::TestCa;
use tributary_controlplane::identity::tls::{self, Transport};
use tributary_controlplane::membership::{
    ASSIGNMENT_KEY, Assignment, REPLICAS_PREFIX, ReplicaInfo, Shard, ShardAssignment,
};
use tributary_shard_router::app::{Router, RouterConfig};
use tributary_store::SharedStore;
use tributary_store::embedded::{Embedded, EmbeddedConfig};

/// Bytes allocated and not yet freed since tracking began (the router's: the hub and
/// the clients run in the child process).
static ALLOCATED: AtomicIsize = AtomicIsize::new(0);

struct Counter;

impl AllocationTracker for Counter {
    fn allocated(&self, _addr: usize, size: usize, _wrapped: usize, _group: AllocationGroupId) {
        ALLOCATED.fetch_add(size as isize, Ordering::Relaxed);
    }
    fn deallocated(
        &self,
        _addr: usize,
        size: usize,
        _wrapped: usize,
        _source: AllocationGroupId,
        _current: AllocationGroupId,
    ) {
        ALLOCATED.fetch_sub(size as isize, Ordering::Relaxed);
    }
}

#[global_allocator]
static HEAP: Allocator<std::alloc::System> = Allocator::system();

fn allocated() -> usize {
    ALLOCATED.load(Ordering::Relaxed).max(0) as usize
}

/// Set in the child: `plain DIR` or `mtls DIR` (the certificates are in `DIR`).
const PEER_ENV: &str = "TRIBUTARY_ROUTER_MEMORY_PEER";
/// This test's name, for the child to run it again.
const TEST_NAME: &str = "a_relayed_stream_costs_the_router_at_most_its_bound";
const TD: &str = tls::DEFAULT_TRUST_DOMAIN;
const TIMEOUT: Duration = Duration::from_secs(60);
/// Streams measured (each its own client connection).
const STREAMS: usize = 200;
/// Services in the config (one cluster each in the CDS response).
const SERVICES: usize = 20;

/// Bytes of the router's heap per relayed stream, at most: the goal, 10 KiB.
/// Measured 4,724 (see docs/benchmarks.md, "The router's memory per stream, counted"):
/// the router relays a connection as bytes and holds no HTTP/2 state, so an idle
/// relayed stream is its task, two sockets' registrations and the relay's state.
/// (Under the HTTP/2 relay it was 40,665–41,032, 28 KiB of it h2's fixed buffers
/// per client connection.)
const BOUND_PLAIN: usize = 10 << 10;
/// Mutual TLS adds two rustls sessions (the client's and the replica's): their read
/// buffers when idle, record keys, the peers' certificates and session tickets:
/// measured 22,827–22,880 (under the HTTP/2 relay, 51,629–52,159). ~1.7 KiB of room.
const BOUND_MTLS: usize = 24 << 10;

#[derive(Debug, Clone, Copy)]
struct Figures {
    after_sync: usize,
    after_push: usize,
}

#[test]
fn a_relayed_stream_costs_the_router_at_most_its_bound() {
    if let Ok(spec) = std::env::var(PEER_ENV) {
        peer::run(&spec);
        return;
    }
    AllocationRegistry::set_global_tracker(Counter).expect("the only tracker");
    AllocationRegistry::enable_tracking();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let plain = rt.block_on(measure(false));
    let mtls = rt.block_on(measure(true));
    eprintln!(
        "router heap per relayed stream ({STREAMS} streams): plaintext {} B after the sync, {} B after a push; mutual TLS {} B, {} B",
        plain.after_sync, plain.after_push, mtls.after_sync, mtls.after_push
    );
    for (what, f, bound) in [
        ("plaintext", plain, BOUND_PLAIN),
        ("mutual TLS", mtls, BOUND_MTLS),
    ] {
        assert!(
            f.after_sync <= bound && f.after_push <= bound,
            "{what}: a relayed stream holds {} bytes of the router's heap after its sync and {} after a push (bound {bound})",
            f.after_sync,
            f.after_push
        );
    }
}

/// The heap once it stops moving: the same figure on 5 reads 20 ms apart.
async fn settled_heap() -> usize {
    tokio::time::timeout(TIMEOUT, async {
        let mut last = allocated();
        let mut same = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = allocated();
            same = if now == last { same + 1 } else { 0 };
            last = now;
            if same >= 5 {
                return now;
            }
        }
    })
    .await
    .expect("the router's heap settles")
}

/// The child: its stdin, and its stdout's protocol lines.
struct Peer {
    child: std::process::Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    fn spawn(spec: &str) -> Peer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(PEER_ENV, spec)
            // A heap profiler preloaded into this process (`heaptrack`) profiles the
            // router alone.
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Peer {
            child,
            stdin,
            stdout,
        }
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The next protocol line (`> ...`; the test harness prints others, and its
    /// `test NAME ... ` just before the first on the same line).
    fn recv(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "the peer process ended");
            if let Some((_, l)) = line.trim_end().split_once("> ") {
                return l.to_string();
            }
        }
    }

    fn expect(&mut self, want: &str) -> String {
        let got = self.recv();
        assert!(got.starts_with(want), "the peer said {got:?}, not {want:?}");
        got
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        // Stopped by its pid if it does not quit.
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn measure(mtls: bool) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RouterConfig::local();
    if mtls {
        let ca = TestCa::new(TD);
        ca.write(
            dir.path(),
            "hub",
            Identity::Hub {
                replica: "hub-1".into(),
            },
        );
        ca.write(
            dir.path(),
            "client",
            Identity::Workload {
                env: "prod".into(),
                namespace: "shop".into(),
                service_account: "web".into(),
            },
        );
        cfg.transport = Transport::Mtls(ca.write(
            dir.path(),
            "router",
            Identity::Router {
                name: "front".into(),
            },
        ));
    }
    let mode = if mtls { "mtls" } else { "plain" };
    let mut peer = Peer::spawn(&format!("{mode} {}", dir.path().display()));
    let hub = peer.expect("hub ");
    let hub: SocketAddr = hub["hub ".len()..].parse().unwrap();

    // Membership as the hub would register it, in the router's own store.
    let store: SharedStore = Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap());
    let shard = Shard {
        environment: "prod".into(),
        zone: "az1".into(),
    };
    let info = ReplicaInfo {
        id: "hub-1".into(),
        xds_addr: hub.to_string(),
        admin_addr: String::new(),
        shards: vec![shard.clone()],
        streams: 0,
        started_unix: 0.0,
    };
    let assignment = Assignment {
        leader: "hub-1".into(),
        replicas_per_shard: 1,
        shards: vec![ShardAssignment {
            shard,
            replicas: vec!["hub-1".into()],
        }],
        updated_unix: 0.0,
    };
    store
        .put(
            &format!("{REPLICAS_PREFIX}hub-1"),
            serde_json::to_vec(&info).unwrap(),
            0,
        )
        .await
        .unwrap();
    store
        .put(ASSIGNMENT_KEY, serde_json::to_vec(&assignment).unwrap(), 0)
        .await
        .unwrap();
    let router = Router::start(cfg, store).await.expect("router starts");
    tokio::time::timeout(TIMEOUT, async {
        while !router
            .table
            .routes()
            .iter()
            .any(|s| s.shard == "prod/az1" && s.replicas.len() == 1)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the router lists the hub");

    peer.send(&format!("router {}", router.xds_addrs[0]));
    // The warm-up stream: one-time costs (the copy buffer, metric families) first.
    peer.send("open 1");
    peer.expect("synced");
    let before = settled_heap().await;
    peer.send(&format!("open {STREAMS}"));
    peer.expect("synced");
    let synced = settled_heap().await;
    peer.send("push");
    peer.expect("pushed");
    let pushed = settled_heap().await;
    let per = |heap: usize| heap.saturating_sub(before) / STREAMS;
    let f = Figures {
        after_sync: per(synced),
        after_push: per(pushed),
    };
    drop(peer);
    router.shutdown().await.unwrap();
    f
}

/// The child process: a hub, and the clients that connect through the router.
mod peer {
    use std::collections::BTreeMap;
    use std::io::BufRead;
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::transport::{Channel, Endpoint};
    use tributary_controlplane::app::{Hub, HubConfig};
    use tributary_controlplane::identity::tls::{self, ClientTls, TlsFiles, Transport};
    use tributary_proto::envoy::envoy::config::core::v3::{Locality, Node};
    use tributary_proto::envoy::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    use tributary_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use tributary_proto::envoy::google::protobuf::{Struct, Value, value::Kind};

    use super::{SERVICES, TD, TIMEOUT};

    fn files(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join(format!("{name}-ca.crt")),
        }
    }

    fn config(services: usize) -> String {
        let mut docs = vec![
            "apiVersion: tributary.io/v1alpha1\nkind: Environment\nmetadata: {name: prod}\nspec: {zones: [az1]}\n".to_string(),
        ];
        for i in 0..services {
            docs.push(format!(
                "apiVersion: tributary.io/v1alpha1\nkind: Service\nmetadata: {{name: svc{i}, environment: prod}}\nspec:\n  hosts: [svc{i}.prod]\n  ports: [{{name: http, port: 8080, protocol: HTTP}}]\n"
            ));
        }
        docs.join("---\n")
    }

    fn node(id: &str) -> Node {
        Node {
            id: id.into(),
            locality: Some(Locality {
                zone: "az1".into(),
                ..Default::default()
            }),
            metadata: Some(Struct {
                fields: [(
                    "tributary.io/env".to_string(),
                    Value {
                        kind: Some(Kind::StringValue("prod".into())),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        }
    }

    fn say(line: &str) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "> {line}").unwrap();
        out.flush().unwrap();
    }

    /// One Delta client on its own connection: subscribes to every cluster and ACKs
    /// every response, until the process ends. `Err` when the stream is refused.
    async fn client(
        router: SocketAddr,
        tls: Option<ClientTls>,
        id: String,
    ) -> Result<(), tonic::Status> {
        let endpoint = Endpoint::from_shared(format!("http://{router}"))
            .unwrap()
            .connect_timeout(TIMEOUT);
        let channel: Channel = match &tls {
            Some(t) => endpoint.connect_with_connector(t.connector()).await,
            None => endpoint.connect().await,
        }
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(4);
        tx.send(DeltaDiscoveryRequest {
            node: Some(node(&id)),
            type_url: tributary_proto::type_url::CLUSTER.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut responses = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        while let Some(r) = responses.message().await? {
            let ack = DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            };
            if tx.send(ack).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Until every client in `ids` has ACKed everything sent to it and holds at
    /// least `clusters` clusters as of that ACK, at the hub; returns the fewest held.
    async fn acked(hub: &Hub, ids: &[String], clusters: usize) -> usize {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                let held: BTreeMap<String, (usize, bool)> = hub
                    .sync
                    .snapshot()
                    .into_iter()
                    .filter_map(|c| {
                        let t = c.types.get("CDS")?;
                        Some((c.node_id, (t.resources, t.pending_nonce.is_none())))
                    })
                    .collect();
                let counts: Option<Vec<usize>> = ids
                    .iter()
                    .map(|id| match held.get(id) {
                        Some(&(n, true)) if n >= clusters => Some(n),
                        _ => None,
                    })
                    .collect();
                if let Some(fewest) = counts.and_then(|c| c.into_iter().min()) {
                    return fewest;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("every client ACKs the hub's clusters")
    }

    pub fn run(spec: &str) {
        let (mode, dir) = spec.split_once(' ').expect("MODE DIR");
        let dir = PathBuf::from(dir);
        let mtls = mode == "mtls";
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let config_dir = dir.join("config");
            std::fs::create_dir_all(&config_dir).unwrap();
            let config_file = config_dir.join("mesh.yaml");
            std::fs::write(&config_file, config(SERVICES)).unwrap();
            let mut cfg = HubConfig::local(vec![config_dir]);
            cfg.poll_interval = Duration::from_millis(20);
            cfg.replica_id = "hub-1".into();
            cfg.replicas_per_shard = 1;
            if mtls {
                cfg.transport = Transport::Mtls(files(&dir, "hub"));
            }
            let hub = Hub::start(cfg).await.expect("hub starts");
            let tls = mtls.then(|| ClientTls::load(&files(&dir, "client"), TD, tls::ALPN_GRPC).unwrap());
            say(&format!("hub {}", hub.xds_addr));

            let (lines_tx, mut lines) = mpsc::unbounded_channel::<String>();
            std::thread::spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { break };
                    if lines_tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let mut router: Option<SocketAddr> = None;
            let mut ids: Vec<String> = Vec::new();
            let mut clusters = SERVICES;
            let mut services = SERVICES;
            while let Some(line) = lines.recv().await {
                let (cmd, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
                match cmd {
                    "router" => router = Some(arg.parse().unwrap()),
                    "open" => {
                        let router = router.expect("the router's address first");
                        let n: usize = arg.parse().unwrap();
                        let batch: Vec<String> =
                            (ids.len()..ids.len() + n).map(|i| format!("sidecar-{i}")).collect();
                        for id in &batch {
                            let (tls, id) = (tls.clone(), id.clone());
                            if ids.is_empty() {
                                // The first stream may come before the hub has taken its
                                // shard, which it refuses: opened again until served.
                                let one = [id.clone()];
                                tokio::time::timeout(TIMEOUT, async {
                                    loop {
                                        let h = tokio::spawn(client(router, tls.clone(), id.clone()));
                                        tokio::select! {
                                            _ = acked(&hub, &one, SERVICES) => break,
                                            r = h => {
                                                eprintln!("the first stream ended ({r:?}); opening it again");
                                                tokio::time::sleep(Duration::from_millis(50)).await;
                                            }
                                        }
                                    }
                                })
                                .await
                                .expect("the hub serves the first stream");
                            } else {
                                tokio::spawn(async move {
                                    if let Err(e) = client(router, tls, id.clone()).await {
                                        panic!("{id}: {e}");
                                    }
                                });
                            }
                        }
                        ids.extend(batch);
                        clusters = acked(&hub, &ids, SERVICES).await;
                        say("synced");
                    }
                    "push" => {
                        services += 1;
                        std::fs::write(&config_file, config(services)).unwrap();
                        clusters = acked(&hub, &ids, clusters + 1).await;
                        say("pushed");
                    }
                    _ => break,
                }
            }
        });
        std::process::exit(0);
    }
}
