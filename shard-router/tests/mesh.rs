//! `tributary-mesh` in process with the bundled examples: two environments × two
//! zones (four shards) on four hubs, two replicas each, the router in front, and two
//! file-mode agents (zones az1 and az2). A proxy of each shard, through the router,
//! lands on a replica of its shard and gets its environment's services — the config's
//! and the agents' — and nothing of the other environment; a prod proxy of az1 gets
//! az2's endpoints through az2's east-west gateway.
//!
//! As the README runs it, every hop is mutual TLS from the CA the mesh generates (the
//! proxies here use the sidecar certificates it issues, the agents are certified and in
//! the example's registry); with `--insecure`, plaintext.
//!
//! With its proxies (the README's main job): `tributary-proxy` gateways and sidecars
//! connected through the router, over mTLS and with `--insecure`; `curl` through a
//! gateway and through a sidecar's outbound listener gets the example backend's answer,
//! the README's route edit takes effect without a restart, and stopping the mesh kills
//! every proxy it started. These need the `tributary-proxy` binary next to the test's
//! target dir (`cargo test --workspace` builds it; or `cargo build -p tributary-proxy`,
//! or `TRIBUTARY_PROXY_BIN`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tributary_controlplane::identity::tls::{self, ClientTls};
use tributary_proto::envoy::envoy::config::core::v3::{Locality, Node, address};
use tributary_proto::envoy::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, lb_endpoint::HostIdentifier,
};
use tributary_proto::envoy::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tributary_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tributary_proto::envoy::google::protobuf::{Struct, Value, value::Kind};
use tributary_shard_router::app::RouterConfig;
use tributary_shard_router::mesh::{Mesh, MeshConfig};
use tributary_shard_router::mesh_proxies::ProxiesConfig;

const CDS: &str = tributary_proto::type_url::CLUSTER;
const EDS: &str = tributary_proto::type_url::ENDPOINT;

fn examples(dir: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(dir)
}

fn node(id: &str, env: &str, zone: &str) -> Node {
    let mut fields = std::collections::HashMap::new();
    fields.insert(
        "tributary.io/env".to_string(),
        Value {
            kind: Some(Kind::StringValue(env.into())),
        },
    );
    Node {
        id: id.into(),
        metadata: Some(Struct { fields }),
        locality: Some(Locality {
            zone: zone.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The README's main job as written: mutual TLS on every hop, from the CA the mesh
/// generates into its store; proxies present the sidecar certificates it issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_mesh_routes_each_shards_proxies_to_its_replicas_with_its_environment_only() {
    example_mesh(false).await;
}

/// The same with `--insecure`: plaintext on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_mesh_runs_in_plaintext_with_insecure() {
    example_mesh(true).await;
}

/// An xDS channel to the router: as the mesh's sidecar of `env` (mTLS), or plaintext.
async fn channel(mesh: &Mesh, addr: std::net::SocketAddr, env: &str) -> Channel {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10));
    match mesh.files(&format!("proxy-{env}")) {
        None => endpoint.connect().await.unwrap(),
        Some(files) => {
            let tls = ClientTls::load(&files, tls::DEFAULT_TRUST_DOMAIN, tls::ALPN_GRPC).unwrap();
            endpoint
                .connect_with_connector(tls.connector())
                .await
                .unwrap()
        }
    }
}

async fn example_mesh(insecure: bool) {
    let mut router = RouterConfig::local();
    router.listen = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
    let mesh = Mesh::start(MeshConfig {
        config: vec![examples("mesh")],
        state_dir: None,
        hubs: 4,
        replicas_per_shard: 2,
        lease_ttl: Duration::from_secs(2),
        hub_host: "127.0.0.1".parse().unwrap(),
        router,
        agents: vec![
            format!("az1:east-1:{}", examples("agent").display())
                .parse()
                .unwrap(),
            format!("az2:west-1:{}", examples("agent-west").display())
                .parse()
                .unwrap(),
        ],
        insecure,
        proxies: None,
    })
    .await
    .expect("the mesh starts");
    assert_eq!(mesh.pki.is_none(), insecure);
    if !insecure {
        // Without a certificate, nothing: the router refuses a plaintext client.
        let plain =
            tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.router.xds_addrs[0]))
                .unwrap()
                .connect()
                .await;
        if let Ok(ch) = plain {
            let (_tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(1);
            let r = timeout(
                Duration::from_secs(10),
                AggregatedDiscoveryServiceClient::new(ch)
                    .delta_aggregated_resources(ReceiverStream::new(rx)),
            )
            .await
            .expect("refused within the timeout");
            assert!(r.is_err(), "the mesh's router served a plaintext client");
        }
    }
    // Settled: four shards, two replicas each, every hub serving two.
    let mut applied = mesh.router.table.applied();
    timeout(Duration::from_secs(10), async {
        loop {
            let routes = mesh.router.table.routes();
            let per_hub = |h: &str| {
                routes
                    .iter()
                    .filter(|s| s.replicas.iter().any(|r| r.replica == h))
                    .count()
            };
            if routes.len() == 4
                && routes.iter().all(|s| s.replicas.len() == 2)
                && mesh.hubs.iter().all(|(id, _)| per_hub(id) == 2)
            {
                break;
            }
            applied.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not settled: {:?}", mesh.router.table.routes()));
    let text = mesh.describe();
    assert!(text.contains("shard staging/az2: hub-"), "{text}");
    let transport = if insecure {
        "transport: plaintext (--insecure)"
    } else {
        "transport: mutual TLS on every hop"
    };
    assert!(text.contains(transport), "{text}");
    // The operator certificate it issued reads a hub's admin API (its bootstrap
    // operator); nothing without it.
    let admin = mesh.hubs[0].1.admin_addr.to_string();
    let operator = mesh
        .files("operator")
        .map(|f| ClientTls::load(&f, tls::DEFAULT_TRUST_DOMAIN, tls::ALPN_HTTP1).unwrap());
    let (status, body) = tributary_controlplane::http_client::request_with(
        &admin,
        operator.as_ref(),
        "GET",
        "/status/shards",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    if !insecure {
        let plain =
            tributary_controlplane::http_client::request(&admin, "GET", "/status/shards", b"")
                .await;
        assert!(
            plain.is_err(),
            "a hub of the mesh answered plaintext: {plain:?}"
        );
    }
    assert!(
        text.contains("cross-zone locality: prod/az1, prod/az2 "),
        "{text}"
    );

    let cases = [
        (
            "prod",
            "az1",
            "reviews.prod",
            "checkout.shop",
            ["staging", "cart.shop"],
        ),
        (
            "staging",
            "az2",
            "reviews.staging",
            "cart.shop",
            ["prod", "checkout.shop"],
        ),
    ];
    for (i, (env, zone, from_config, from_agent, other)) in cases.into_iter().enumerate() {
        let addr = mesh.router.xds_addrs[i % 2];
        let id = format!("proxy-{env}-{zone}");
        let (tx, rx) = mpsc::channel(8);
        tx.send(DeltaDiscoveryRequest {
            node: Some(node(&id, env, zone)),
            type_url: CDS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut stream = AggregatedDiscoveryServiceClient::new(channel(&mesh, addr, env).await)
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        // Until both the config's and the agent's services are there (the agents
        // may feed the hubs after the first response).
        let mut held = BTreeSet::new();
        while !(held.iter().any(|n: &String| n.contains(from_config))
            && held.iter().any(|n| n.contains(from_agent)))
        {
            let r = timeout(Duration::from_secs(10), stream.message())
                .await
                .unwrap_or_else(|_| panic!("{env}/{zone}: only {held:?}"))
                .unwrap()
                .unwrap();
            for x in &r.resources {
                for o in other {
                    assert!(!x.name.contains(o), "{env} proxy got {}", x.name);
                }
                held.insert(x.name.clone());
            }
            tx.send(DeltaDiscoveryRequest {
                type_url: CDS.into(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        if env == "prod" {
            // Cross-zone locality: az1's view of checkout has az1's endpoints first
            // and az2 (whose agent west-1 holds one) through az2's east-west gateway.
            let name = "outbound|8080||checkout.shop.svc.cluster.local";
            tx.send(DeltaDiscoveryRequest {
                type_url: EDS.into(),
                resource_names_subscribe: vec![name.into()],
                ..Default::default()
            })
            .await
            .unwrap();
            let want = (String::from("az2"), 1, String::from("fd00:30::ffff"));
            let mut seen = Vec::new();
            while !seen.contains(&want) {
                let r = timeout(Duration::from_secs(10), stream.message())
                    .await
                    .unwrap_or_else(|_| panic!("az1's view of checkout: {seen:?}"))
                    .unwrap()
                    .unwrap();
                for x in r.resources.iter().filter(|x| x.name == name) {
                    let cla = ClusterLoadAssignment::decode(
                        x.resource.as_ref().unwrap().value.as_slice(),
                    )
                    .unwrap();
                    seen = cla
                        .endpoints
                        .iter()
                        .flat_map(|l| {
                            l.lb_endpoints.iter().map(|e| {
                                let addr = match &e.host_identifier {
                                    Some(HostIdentifier::Endpoint(ep)) => {
                                        match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
                                            Some(address::Address::SocketAddress(sa)) => {
                                                sa.address.clone()
                                            }
                                            _ => String::new(),
                                        }
                                    }
                                    _ => String::new(),
                                };
                                (
                                    l.locality.clone().unwrap_or_default().zone,
                                    l.priority,
                                    addr,
                                )
                            })
                        })
                        .collect();
                }
                tx.send(DeltaDiscoveryRequest {
                    type_url: r.type_url.clone(),
                    response_nonce: r.nonce.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
            assert!(
                seen.iter().any(|(z, p, _)| z == "az1" && *p == 0),
                "{seen:?}"
            );
            assert!(!seen.iter().any(|(_, _, a)| a == "10.30.0.11"), "{seen:?}");
        }
        // It is served by a replica of its shard.
        let shard = format!("{env}/{zone}");
        let replicas: Vec<String> = mesh
            .router
            .table
            .routes()
            .into_iter()
            .find(|s| s.shard == shard)
            .unwrap()
            .replicas
            .into_iter()
            .map(|r| r.replica)
            .collect();
        let serving: Vec<&String> = mesh
            .hubs
            .iter()
            .filter(|(_, h)| h.sync.snapshot().iter().any(|c| c.node_id == id))
            .map(|(id, _)| id)
            .collect();
        assert_eq!(serving.len(), 1, "{serving:?}");
        assert!(
            replicas.contains(serving[0]),
            "{id} on {serving:?}, shard {shard} on {replicas:?}"
        );
    }
    mesh.shutdown().await.unwrap();
}

/// The `tributary-proxy` binary: `TRIBUTARY_PROXY_BIN`, or the one cargo built into
/// this test's target dir (`target/debug/deps/mesh-…` → `target/debug/tributary-proxy`).
fn proxy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TRIBUTARY_PROXY_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("tributary-proxy");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p tributary-proxy` (`cargo test --workspace` builds it), or set TRIBUTARY_PROXY_BIN",
        bin.display()
    );
    bin
}

/// The example binds fixed ports (gateways on 18080/18081, backends on 19081…): the
/// tests that start its proxies run one at a time.
static FIXED_PORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `GET /` with `Host: host` over HTTP/1.1, as `curl -H 'Host: …'` sends it:
/// (status, body), or why it failed.
async fn curl(addr: SocketAddr, host: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    };
    let text = timeout(Duration::from_secs(10), io)
        .await
        .map_err(|_| format!("{addr}: no answer within 10 s"))?
        .map_err(|e| format!("{addr}: {e}"))?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{addr}: not HTTP: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// Copies the example config into a temporary directory (the test edits it).
fn example_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(examples("mesh")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// The README's documented edit: every request for `reviews.prod` to v2.
fn all_reviews_to_v2(config: &Path) {
    let path = config.join("routes.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text
        .replace("subset: v1, weight: 80}", "subset: v1, weight: 0}")
        .replace("subset: v2, weight: 20}", "subset: v2, weight: 100}");
    assert_ne!(
        text, edited,
        "the README's edit no longer applies to routes.yaml"
    );
    // Renamed into place: the hubs' watcher never reads half a file.
    let tmp = config.join(".routes.yaml.tmp");
    std::fs::write(&tmp, edited).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

const REVIEWS_V1: &str = "reviews (version=v1) of prod, zone az1, at 127.0.0.1:19081";
const REVIEWS_V2: &str = "reviews (version=v2) of prod, zone az1, at [::1]:19082";

/// The README's main job with its proxies: mTLS through the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_example_meshs_gateway_and_sidecar_and_watch_a_route_edit() {
    mesh_with_proxies(false).await;
}

/// The same with `--insecure`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_example_mesh_with_insecure() {
    mesh_with_proxies(true).await;
}

async fn mesh_with_proxies(insecure: bool) {
    let _one_at_a_time = FIXED_PORTS.lock().await;
    let config = example_copy();
    let state = tempfile::tempdir().unwrap();
    let mesh = Mesh::start(MeshConfig {
        config: vec![config.path().to_path_buf()],
        state_dir: Some(state.path().to_path_buf()),
        hubs: 2,
        replicas_per_shard: 2,
        lease_ttl: Duration::from_secs(2),
        hub_host: "127.0.0.1".parse().unwrap(),
        router: RouterConfig::local(),
        agents: vec![
            format!("az1:east-1:{}", examples("agent").display())
                .parse()
                .unwrap(),
        ],
        insecure,
        proxies: Some(ProxiesConfig {
            binary: proxy_bin(),
        }),
    })
    .await
    .expect("the mesh starts with its proxies, all ready");
    let proxies = mesh.proxies.as_ref().unwrap();
    let names: Vec<&str> = proxies
        .running
        .iter()
        .map(|p| p.spec.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "gateway-prod-edge",
            "sidecar-prod",
            "gateway-staging-edge",
            "sidecar-staging"
        ]
    );
    // Each proxy's bootstrap: through the router, mTLS unless --insecure.
    for p in &proxies.running {
        let b = std::fs::read_to_string(&p.bootstrap).unwrap();
        assert_eq!(b.contains("tls:"), !insecure, "{b}");
        let scheme = if insecure { "http" } else { "https" };
        assert!(
            b.contains(&format!("{scheme}://{}", mesh.router.xds_addrs[0])),
            "{b}"
        );
    }
    // It prints the curl commands that work; run them.
    let text = mesh.describe();
    let gateway = "curl -s -H 'Host: reviews.prod' http://127.0.0.1:18080/";
    let sidecar = "curl -s -H 'Host: reviews.prod' http://127.0.0.1:9080/";
    let staging = "curl -s -H 'Host: reviews.staging' http://127.0.0.1:18081/";
    for c in [gateway, sidecar, staging] {
        assert!(text.contains(c), "{c} is not printed:\n{text}");
    }
    let prod_gw: SocketAddr = "127.0.0.1:18080".parse().unwrap();
    let prod_sidecar: SocketAddr = "127.0.0.1:9080".parse().unwrap();
    let (status, body) = curl("127.0.0.1:18081".parse().unwrap(), "reviews.staging")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("reviews of staging, zone az2, at 127.0.0.1:19083"),
        "{body}"
    );
    // 80/20 before the edit: v1 answers (the chance of 40 misses is 0.2^40).
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        for addr in [prod_gw, prod_sidecar] {
            let (status, body) = curl(addr, "reviews.prod").await.unwrap();
            assert_eq!(status, 200, "{addr}: {body}");
            let who = [REVIEWS_V1, REVIEWS_V2]
                .into_iter()
                .find(|w| body.starts_with(w))
                .unwrap_or_else(|| panic!("{addr}: not a reviews backend: {body}"));
            seen.insert(who);
        }
    }
    assert!(seen.contains(REVIEWS_V1), "{seen:?}");

    // The documented edit: without a restart, every answer comes from v2 — through
    // the gateway and the sidecar — within the deadline.
    all_reviews_to_v2(config.path());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut streak = 0;
    let mut last = String::new();
    while streak < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the route edit did not take effect within 30 s; last answer: {last}"
        );
        let addr = if streak % 2 == 0 {
            prod_gw
        } else {
            prod_sidecar
        };
        let (status, body) = curl(addr, "reviews.prod").await.unwrap();
        if status == 200 && body.starts_with(REVIEWS_V2) {
            streak += 1;
        } else {
            streak = 0;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        last = body;
    }

    // Stop kills every proxy it started, by pid.
    let pids: Vec<u32> = proxies.running.iter().map(|p| p.pid()).collect();
    mesh.shutdown().await.unwrap();
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "proxy pid {pid} still runs after the mesh stopped"
        );
    }
    // Nothing answers on the gateway's port any more.
    assert!(curl(prod_gw, "reviews.prod").await.is_err());
}
