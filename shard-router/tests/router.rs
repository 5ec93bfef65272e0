//! The shard router in process: hubs on one embedded store (each a replica registered
//! under a lease), a router in front of them on IPv4 and IPv6, and ADS clients
//! (envoy-types' generated client) connecting through it.
//!
//! - every proxy lands on a replica of its own `(environment, zone)` shard and gets
//!   only its environment's resources (SotW and Delta, over 127.0.0.1 and [::1]);
//! - an unknown or missing environment or zone gets NOT_FOUND / INVALID_ARGUMENT
//!   naming what was wrong and the shards that exist;
//! - a hub refuses a client of a shard it does not serve, naming the replicas that do;
//! - a replica leaving membership ends its relayed streams with UNAVAILABLE;
//! - killing a replica: its Delta client reconnects through the router to the other
//!   replica, resumes with `initial_resource_versions`, and is not sent again what it
//!   holds; the two live replicas publish identical resource versions.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};
use tributary_controlplane::app::{Hub, HubConfig, StoreBackend};
use tributary_controlplane::http_client;
use tributary_controlplane::membership::REPLICAS_PREFIX;
use tributary_proto::envoy::envoy::config::core::v3::{Locality, Node};
use tributary_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tributary_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tributary_proto::envoy::google::protobuf::{Struct, Value, value::Kind};
use tributary_shard_router::app::{Router, RouterConfig};
use tributary_store::SharedStore;
use tributary_store::embedded::{Embedded, EmbeddedConfig};

const CDS: &str = tributary_proto::type_url::CLUSTER;
const EDS: &str = tributary_proto::type_url::ENDPOINT;
const TIMEOUT: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(2);

fn environment(name: &str, zones: &[&str]) -> String {
    format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Environment\nmetadata: {{name: {name}}}\nspec: {{zones: [{}]}}\n",
        zones.join(", ")
    )
}

/// A service with one static endpoint, in `env`.
fn service(name: &str, env: &str, port: u16) -> String {
    format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}, environment: {env}}}\nspec:\n  hosts: [{name}.{env}]\n  ports: [{{name: http, port: {port}, protocol: HTTP}}]\n---\napiVersion: tributary.io/v1alpha1\nkind: Endpoints\nmetadata: {{name: {name}, environment: {env}}}\nspec:\n  endpoints:\n  - {{address: \"10.0.0.1\", port: {port}}}\n"
    )
}

fn node(id: &str, env: Option<&str>, zone: Option<&str>) -> Node {
    let mut fields = std::collections::HashMap::new();
    if let Some(env) = env {
        fields.insert(
            "tributary.io/env".to_string(),
            Value {
                kind: Some(Kind::StringValue(env.into())),
            },
        );
    }
    Node {
        id: id.into(),
        metadata: Some(Struct { fields }),
        locality: zone.map(|z| Locality {
            zone: z.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Hubs on one in-memory embedded store, reading one config dir.
struct Mesh {
    store: SharedStore,
    dir: tempfile::TempDir,
    hubs: BTreeMap<String, Hub>,
}

impl Mesh {
    async fn start(config: &str, ids: &[&str], per_shard: usize, ipv6: bool) -> Mesh {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let store: SharedStore = Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), config).unwrap();
        let mut hubs = BTreeMap::new();
        for id in ids {
            let mut cfg = HubConfig::local(vec![dir.path().to_path_buf()]);
            cfg.poll_interval = Duration::from_millis(20);
            cfg.store = StoreBackend::Shared(store.clone());
            cfg.replica_id = id.to_string();
            cfg.lease_ttl = TTL;
            cfg.replicas_per_shard = per_shard;
            if ipv6 {
                cfg.xds_addr = "[::1]:0".parse().unwrap();
            }
            hubs.insert(id.to_string(), Hub::start(cfg).await.expect("hub starts"));
        }
        Mesh { store, dir, hubs }
    }

    /// The hub serving `node_id` now (from each hub's sync registry).
    fn serving(&self, node_id: &str) -> Vec<String> {
        self.hubs
            .iter()
            .filter(|(_, h)| h.sync.snapshot().iter().any(|c| c.node_id == node_id))
            .map(|(id, _)| id.clone())
            .collect()
    }

    async fn router(&self, listen: &[&str]) -> Router {
        let mut cfg = RouterConfig::local();
        cfg.listen = listen.iter().map(|a| a.parse().unwrap()).collect();
        Router::start(cfg, self.store.clone())
            .await
            .expect("router starts")
    }
}

/// Waits until the router's table has exactly `want` (shard → replica count).
async fn wait_routes(router: &Router, want: &[(&str, usize)]) -> BTreeMap<String, Vec<String>> {
    wait_routes_where(router, want, |_| true).await
}

/// Waits until the router's table has exactly `want` (shard → replica count) and
/// `also` holds for it.
async fn wait_routes_where(
    router: &Router,
    want: &[(&str, usize)],
    also: impl Fn(&BTreeMap<String, Vec<String>>) -> bool,
) -> BTreeMap<String, Vec<String>> {
    let want: BTreeMap<String, usize> = want.iter().map(|(s, n)| (s.to_string(), *n)).collect();
    let mut applied = router.table.applied();
    let got = |r: &Router| -> BTreeMap<String, Vec<String>> {
        r.table
            .routes()
            .into_iter()
            .map(|s| (s.shard, s.replicas.into_iter().map(|r| r.replica).collect()))
            .collect()
    };
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let now = got(router);
        let counts: BTreeMap<String, usize> =
            now.iter().map(|(k, v)| (k.clone(), v.len())).collect();
        if counts == want && also(&now) {
            return now;
        }
        assert!(
            timeout(deadline - Instant::now(), applied.changed())
                .await
                .is_ok(),
            "routes never became {want:?}; last {now:?}"
        );
    }
}

struct DeltaClient {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

async fn client(addr: SocketAddr) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
    AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

impl DeltaClient {
    /// Opens a Delta stream whose first request is `first`; the router answers a
    /// refused stream with a trailers-only error, which surfaces here or on the
    /// first read.
    async fn open(addr: SocketAddr, first: DeltaDiscoveryRequest) -> Result<DeltaClient, Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.unwrap();
        let rx = client(addr)
            .await
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(DeltaClient { tx, rx })
    }

    async fn next(&mut self) -> Result<DeltaDiscoveryResponse, Status> {
        match timeout(TIMEOUT, self.rx.message()).await {
            Err(_) => panic!("no response within {TIMEOUT:?}"),
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => Err(Status::ok("stream ended")),
            Ok(Err(s)) => Err(s),
        }
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        self.next().await.expect("a response")
    }

    async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// The names of the `outbound|…` resources (not the built-in PassthroughCluster).
fn names(r: &DeltaDiscoveryResponse) -> BTreeSet<String> {
    r.resources
        .iter()
        .map(|x| x.name.clone())
        .filter(|n| n.starts_with("outbound|"))
        .collect()
}

async fn open_error(addr: SocketAddr, n: Node) -> Status {
    let first = DeltaDiscoveryRequest {
        node: Some(n),
        type_url: CDS.into(),
        ..Default::default()
    };
    match DeltaClient::open(addr, first).await {
        Err(s) => s,
        Ok(mut c) => c.next().await.expect_err("the stream is refused"),
    }
}

fn prod_and_staging() -> String {
    [
        environment("prod", &["az1", "az2"]),
        environment("staging", &["az1"]),
        service("web", "prod", 80),
        service("pay", "prod", 81),
        service("web", "staging", 80),
    ]
    .join("---\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_proxy_lands_on_a_replica_of_its_shard_over_ipv4_and_ipv6() {
    // Three shards, three replicas, one replica per shard: each replica serves one.
    let mesh = Mesh::start(&prod_and_staging(), &["a", "b", "c"], 1, true).await;
    let router = mesh.router(&["127.0.0.1:0", "[::1]:0"]).await;
    assert!(router.xds_addrs[0].is_ipv4() && router.xds_addrs[1].is_ipv6());
    // Settled: the three shards on three distinct replicas.
    let routes = wait_routes_where(
        &router,
        &[("prod/az1", 1), ("prod/az2", 1), ("staging/az1", 1)],
        |r| r.values().flatten().collect::<BTreeSet<_>>().len() == 3,
    )
    .await;
    let mut n = 0;
    let mut open = Vec::new();
    for addr in router.xds_addrs.clone() {
        for (env, zone, want) in [
            (
                "prod",
                "az1",
                ["outbound|80||web.prod", "outbound|81||pay.prod"].as_slice(),
            ),
            (
                "prod",
                "az2",
                ["outbound|80||web.prod", "outbound|81||pay.prod"].as_slice(),
            ),
            ("staging", "az1", ["outbound|80||web.staging"].as_slice()),
        ] {
            n += 1;
            let id = format!("sidecar-{n}");
            // Delta
            let mut c = DeltaClient::open(
                addr,
                DeltaDiscoveryRequest {
                    node: Some(node(&id, Some(env), Some(zone))),
                    type_url: CDS.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let r = c.recv().await;
            let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
            assert_eq!(names(&r), want, "{env}/{zone} through {addr}");
            assert_eq!(
                mesh.serving(&id),
                routes[&format!("{env}/{zone}")],
                "{id} of {env}/{zone} through {addr}"
            );
            // SotW
            let sotw_id = format!("{id}-sotw");
            let (tx, rx) = mpsc::channel(4);
            tx.send(DiscoveryRequest {
                node: Some(node(&sotw_id, Some(env), Some(zone))),
                type_url: CDS.into(),
                ..Default::default()
            })
            .await
            .unwrap();
            let mut s = client(addr)
                .await
                .stream_aggregated_resources(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let r: DiscoveryResponse = timeout(TIMEOUT, s.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let sotw_names: BTreeSet<String> = r
                .resources
                .iter()
                .filter_map(|any| {
                    use prost::Message;
                    let c = tributary_proto::envoy::envoy::config::cluster::v3::Cluster::decode(
                        any.value.as_slice(),
                    )
                    .ok()?;
                    c.name.starts_with("outbound|").then_some(c.name)
                })
                .collect();
            assert_eq!(sotw_names, want, "{env}/{zone} SotW");
            assert_eq!(mesh.serving(&sotw_id), routes[&format!("{env}/{zone}")]);
            open.push((c, s, tx));
        }
    }
    // The router's metrics count what it routed, per shard and per replica.
    let (status, body) =
        http_client::request(&router.admin_addr.to_string(), "GET", "/metrics", b"")
            .await
            .unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.contains("tributary_router_routed_total{shard=\"staging/az1\"} 4"),
        "{text}"
    );
    let replica = &routes["staging/az1"][0];
    assert!(
        text.contains(&format!(
            "tributary_router_connections{{replica=\"{replica}\",shard=\"staging/az1\"}} 4"
        )),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_missing_environment_or_zone_gets_an_error_naming_it_and_the_shards() {
    let mesh = Mesh::start(&prod_and_staging(), &["a"], 1, false).await;
    let router = mesh.router(&["127.0.0.1:0"]).await;
    wait_routes(
        &router,
        &[("prod/az1", 1), ("prod/az2", 1), ("staging/az1", 1)],
    )
    .await;
    let addr = router.xds_addrs[0];
    let shards = "known shards (environment/zone): prod/az1, prod/az2, staging/az1";

    let e = open_error(addr, node("n1", Some("dev"), Some("az1"))).await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(
        e.message(),
        format!("node \"n1\": no shard dev/az1: unknown environment \"dev\"; {shards}")
    );
    let e = open_error(addr, node("n2", Some("staging"), Some("az2"))).await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(
        e.message(),
        format!(
            "node \"n2\": no shard staging/az2: environment \"staging\" has no zone \"az2\"; {shards}"
        )
    );
    let e = open_error(addr, node("n3", Some("prod"), None)).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        e.message(),
        format!(
            "node \"n3\" does not name its shard: node.locality.zone (the zone) missing; {shards}"
        )
    );
    let e = open_error(addr, node("n4", None, Some("az1"))).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message()
            .contains("node.metadata[\"tributary.io/env\"] (the environment) missing"),
        "{e:?}"
    );
    let e = open_error(addr, node("", Some("prod"), Some("az1"))).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("node.id is empty"), "{e:?}");
    // No node at all.
    let e = match DeltaClient::open(
        addr,
        DeltaDiscoveryRequest {
            type_url: CDS.into(),
            ..Default::default()
        },
    )
    .await
    {
        Err(s) => s,
        Ok(mut c) => c.next().await.unwrap_err(),
    };
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("carries no node"), "{e:?}");
    assert!(
        mesh.hubs["a"].sync.snapshot().is_empty(),
        "nothing reached the hub"
    );

    let (_, body) = http_client::request(&router.admin_addr.to_string(), "GET", "/metrics", b"")
        .await
        .unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.contains("tributary_router_refused_total{reason=\"unknown_shard\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("tributary_router_refused_total{reason=\"invalid_node\"} 3"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_refuses_a_client_of_a_shard_it_does_not_serve_and_names_its_replicas() {
    let config = [
        environment("prod", &["az1", "az2"]),
        service("web", "prod", 80),
    ]
    .join("---\n");
    let mesh = Mesh::start(&config, &["a", "b"], 1, false).await;
    let router = mesh.router(&["127.0.0.1:0"]).await;
    let routes = wait_routes_where(&router, &[("prod/az1", 1), ("prod/az2", 1)], |r| {
        r["prod/az1"] != r["prod/az2"]
    })
    .await;
    let owner = &routes["prod/az1"][0];
    let other = if owner == "a" { "b" } else { "a" };
    let hub = &mesh.hubs[other];
    let e = open_error(hub.xds_addr, node("direct", Some("prod"), Some("az1"))).await;
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(
        e.message(),
        format!(
            "replica {other} does not serve shard prod/az1; its replicas are {owner} ({}); connect through the shard router (tributary-router), which routes each proxy to a replica of its shard",
            mesh.hubs[owner].xds_addr
        )
    );
    // Its own shard, and a client naming no zone, are served as before.
    let mut c = DeltaClient::open(
        hub.xds_addr,
        DeltaDiscoveryRequest {
            node: Some(node("own", Some("prod"), Some("az2"))),
            type_url: CDS.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(names(&c.recv().await).len(), 1);
    let mut c = DeltaClient::open(
        hub.xds_addr,
        DeltaDiscoveryRequest {
            node: Some(node("zoneless", Some("prod"), None)),
            type_url: CDS.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(names(&c.recv().await).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_leaving_membership_ends_its_relayed_streams_with_unavailable() {
    let config = [environment("prod", &["az1"]), service("web", "prod", 80)].join("---\n");
    let mesh = Mesh::start(&config, &["a", "b"], 2, false).await;
    let router = mesh.router(&["127.0.0.1:0"]).await;
    wait_routes(&router, &[("prod/az1", 2)]).await;
    let mut c = DeltaClient::open(
        router.xds_addrs[0],
        DeltaDiscoveryRequest {
            node: Some(node("n", Some("prod"), Some("az1"))),
            type_url: CDS.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let r = c.recv().await;
    c.ack(&r).await;
    let serving = mesh.serving("n");
    assert_eq!(serving.len(), 1);
    let replica = &serving[0];
    // Its registration goes (as when its lease runs out) while the hub itself stays
    // up: only the router can end the stream.
    mesh.store
        .delete(&format!("{REPLICAS_PREFIX}{replica}"))
        .await
        .unwrap();
    let e = c.next().await.expect_err("the stream ends");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().starts_with(&format!("replica {replica} ("))
            && e.message().contains("left its shard"),
        "{e:?}"
    );
    assert_eq!(router.metrics.ended_by_membership.get(), 1);
}

/// The held resources (name → version) a Delta client reports when it resumes.
fn held(responses: &[&DeltaDiscoveryResponse]) -> BTreeMap<String, String> {
    responses
        .iter()
        .flat_map(|r| {
            r.resources
                .iter()
                .map(|x| (x.name.clone(), x.version.clone()))
        })
        .collect()
}

async fn config_dump(hub: &Hub) -> serde_json::Value {
    let (status, body) = http_client::request(
        &hub.admin_addr.to_string(),
        "GET",
        "/config_dump?env=prod",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["resources"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_delta_client_resumes_on_the_other_without_resends_and_replicas_agree() {
    let config = [
        environment("prod", &["az1"]),
        service("web", "prod", 80),
        service("pay", "prod", 81),
    ]
    .join("---\n");
    let mut mesh = Mesh::start(&config, &["a", "b", "c"], 2, false).await;
    let router = mesh.router(&["127.0.0.1:0"]).await;
    let routes = wait_routes(&router, &[("prod/az1", 2)]).await;
    let id = "sidecar-1";
    let n = node(id, Some("prod"), Some("az1"));
    let mut c = DeltaClient::open(
        router.xds_addrs[0],
        DeltaDiscoveryRequest {
            node: Some(n.clone()),
            type_url: CDS.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let cds = c.recv().await;
    assert_eq!(cds.type_url, CDS);
    c.ack(&cds).await;
    let clusters: Vec<String> = names(&cds).into_iter().collect();
    c.tx.send(DeltaDiscoveryRequest {
        type_url: EDS.into(),
        resource_names_subscribe: clusters.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let eds = c.recv().await;
    assert_eq!(eds.type_url, EDS);
    assert_eq!(names(&eds).len(), 2);
    c.ack(&eds).await;
    let (held_cds, held_eds) = (held(&[&cds]), held(&[&eds]));

    let first = mesh.serving(id);
    assert_eq!(first.len(), 1);
    let dead = first[0].clone();
    assert!(routes["prod/az1"].contains(&dead));
    // kill it: every task aborted, nothing deregisters; its lease runs out.
    let killed = Instant::now();
    mesh.hubs.remove(&dead).unwrap().abort();
    let e = timeout(TTL + TIMEOUT, c.next())
        .await
        .expect("the stream ends")
        .expect_err("the stream ends with an error");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let ended = killed.elapsed();

    // Resume through the router with what it holds, retrying with a backoff as Envoy
    // does: until the dead replica's lease runs out, the router may still pick it
    // (and the stream is refused with UNAVAILABLE as it cannot be reached).
    let resume = || DeltaDiscoveryRequest {
        node: Some(n.clone()),
        type_url: CDS.into(),
        initial_resource_versions: held_cds.clone().into_iter().collect(),
        ..Default::default()
    };
    let resume_eds = || DeltaDiscoveryRequest {
        type_url: EDS.into(),
        resource_names_subscribe: clusters.clone(),
        initial_resource_versions: held_eds.clone().into_iter().collect(),
        ..Default::default()
    };
    let deadline = Instant::now() + TTL + TIMEOUT;
    let mut refused = Vec::new();
    // A live replica answers the resumed subscriptions (with nothing, as the client
    // holds everything); a stream routed to the dead one ends with UNAVAILABLE. (In
    // process, the aborted hub's connection task outlives it: a stream the router
    // sends there before the lease runs out may get an answer and then
    // UNAVAILABLE; a live hub registers a stream before answering it.)
    let (mut c, answer) = loop {
        match DeltaClient::open(router.xds_addrs[0], resume()).await {
            Ok(mut c) => {
                let _ = c.tx.send(resume_eds()).await;
                match c.next().await {
                    Ok(r) if !mesh.serving(id).is_empty() => break (c, r),
                    Ok(_) => {}
                    Err(e) => {
                        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                        refused.push(e);
                    }
                }
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                refused.push(e);
            }
        }
        assert!(
            Instant::now() < deadline,
            "never routed to a live replica: {refused:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let now = mesh.serving(id);
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], dead);
    let reconnected = killed.elapsed();

    // A change: the next thing the client gets is the new service, never what it holds.
    let mut watchers: Vec<_> = mesh
        .hubs
        .values()
        .map(|h| h.snapshots.subscribe("prod").unwrap())
        .collect();
    std::fs::write(
        mesh.dir.path().join("more.yaml"),
        service("cart", "prod", 82),
    )
    .unwrap();
    let mut got_cds = false;
    let mut got_eds = false;
    let mut pending = Some(answer);
    while !(got_cds && got_eds) {
        let r = match pending.take() {
            Some(r) => r,
            None => c.recv().await,
        };
        assert!(r.removed_resources.is_empty(), "{r:?}");
        for x in &r.resources {
            let held = if r.type_url == CDS {
                &held_cds
            } else {
                &held_eds
            };
            assert_ne!(
                held.get(&x.name),
                Some(&x.version),
                "{} resent at the version the client holds",
                x.name
            );
        }
        if r.resources.is_empty() {
            // What answers a resumed subscription that holds everything: nothing.
            c.ack(&r).await;
            continue;
        }
        if r.type_url == CDS {
            assert_eq!(
                names(&r),
                BTreeSet::from(["outbound|82||cart.prod".to_string()]),
                "{r:?}"
            );
            got_cds = true;
            // Subscribe to the new cluster's endpoints, as Envoy does.
            c.ack(&r).await;
            c.tx.send(DeltaDiscoveryRequest {
                type_url: EDS.into(),
                resource_names_subscribe: vec!["outbound|82||cart.prod".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        } else {
            assert_eq!(
                names(&r),
                BTreeSet::from(["outbound|82||cart.prod".to_string()])
            );
            got_eds = true;
            c.ack(&r).await;
        }
    }
    // Replicas agree: both live replicas of the shard publish the same versions.
    for w in &mut watchers {
        timeout(
            TIMEOUT,
            w.wait_for(|s| {
                s.get(
                    tributary_controlplane::xds::XdsType::Cluster,
                    "outbound|82||cart.prod",
                )
                .is_some()
            }),
        )
        .await
        .unwrap()
        .unwrap();
    }
    let mut live = mesh.hubs.values();
    let (x, y) = (live.next().unwrap(), live.next().unwrap());
    let (dx, dy) = (config_dump(x).await, config_dump(y).await);
    assert_eq!(dx, dy, "replicas disagree");
    assert_eq!(
        dx["CDS"].as_array().unwrap().len(),
        4,
        "three services and PassthroughCluster: {dx}"
    );
    eprintln!(
        "stream ended {ended:?} after the kill; resumed on a live replica {reconnected:?} after it (lease TTL {TTL:?}, {} attempts refused meanwhile)",
        refused.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_replica_is_avoided_so_its_clients_land_on_a_live_one_at_once() {
    let config = [environment("prod", &["az1"]), service("web", "prod", 80)].join("---\n");
    let mesh = Mesh::start(&config, &["a"], 2, false).await;
    // A replica that registered and died without its lease running out yet: nothing
    // listens at its address.
    let gone_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let ghost = tributary_controlplane::membership::ReplicaInfo {
        id: "ghost".into(),
        xds_addr: gone_addr.to_string(),
        admin_addr: String::new(),
        shards: vec![tributary_controlplane::membership::Shard {
            environment: "prod".into(),
            zone: "az1".into(),
        }],
        streams: 0,
        started_unix: 0.0,
    };
    mesh.store
        .put(
            &format!("{REPLICAS_PREFIX}ghost"),
            serde_json::to_vec(&ghost).unwrap(),
            0,
        )
        .await
        .unwrap();
    let router = mesh.router(&["127.0.0.1:0"]).await;
    wait_routes_where(&router, &[("prod/az1", 2)], |r| {
        r["prod/az1"].contains(&"ghost".to_string())
    })
    .await;
    // A node whose rendezvous choice is the ghost.
    let id = (0..)
        .map(|i| format!("sidecar-{i}"))
        .find(|n| {
            tributary_shard_router::rendezvous::weight(n, "ghost")
                > tributary_shard_router::rendezvous::weight(n, "a")
        })
        .unwrap();
    let first = || DeltaDiscoveryRequest {
        node: Some(node(&id, Some("prod"), Some("az1"))),
        type_url: CDS.into(),
        ..Default::default()
    };
    let e = match DeltaClient::open(router.xds_addrs[0], first()).await {
        Err(e) => e,
        Ok(mut c) => c.next().await.unwrap_err(),
    };
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("cannot reach replica ghost"), "{e:?}");
    // Its reconnect goes to the live replica, long before the ghost's registration
    // would go.
    let mut c = DeltaClient::open(router.xds_addrs[0], first())
        .await
        .unwrap();
    assert_eq!(names(&c.recv().await).len(), 1);
    assert_eq!(mesh.serving(&id), vec!["a".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_agree_on_every_nodes_replica_and_streams_go_there() {
    let config = [environment("prod", &["az1"]), service("web", "prod", 80)].join("---\n");
    let mesh = Mesh::start(&config, &["a", "b", "c"], 3, false).await;
    let r1 = mesh.router(&["127.0.0.1:0"]).await;
    let r2 = mesh.router(&["[::1]:0"]).await;
    wait_routes(&r1, &[("prod/az1", 3)]).await;
    wait_routes(&r2, &[("prod/az1", 3)]).await;
    let mut spread = BTreeMap::<String, usize>::new();
    for i in 0..300 {
        let n = tributary_shard_router::first::NodeIdentity {
            id: format!("sidecar-{i}"),
            environment: Some("prod".into()),
            zone: Some("az1".into()),
        };
        let (x, y) = (r1.table.route(&n).unwrap(), r2.table.route(&n).unwrap());
        assert_eq!(x.replica, y.replica, "{}", n.id);
        *spread.entry(x.replica.to_string()).or_default() += 1;
    }
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(spread.values().all(|&c| c >= 60), "uneven: {spread:?}");
    // Real streams land where the tables say, whichever router they go through.
    let mut open = Vec::new();
    for i in 0..6 {
        let id = format!("sidecar-{i}");
        let router = if i % 2 == 0 { &r1 } else { &r2 };
        let want = r1
            .table
            .route(&tributary_shard_router::first::NodeIdentity {
                id: id.clone(),
                environment: Some("prod".into()),
                zone: Some("az1".into()),
            })
            .unwrap()
            .replica
            .to_string();
        let mut c = DeltaClient::open(
            router.xds_addrs[0],
            DeltaDiscoveryRequest {
                node: Some(node(&id, Some("prod"), Some("az1"))),
                type_url: CDS.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        c.recv().await;
        assert_eq!(mesh.serving(&id), vec![want], "{id}");
        open.push(c);
    }
}

/// A client that multiplexes hundreds of ADS streams on one connection has each served
/// by the replica its connection was routed to (the router routes a connection by its
/// first stream, then relays it as bytes), over one relayed connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_streams_on_one_client_connection_are_relayed_to_its_replica() {
    let config = [environment("prod", &["az1"]), service("web", "prod", 80)].join("---\n");
    let mesh = Mesh::start(&config, &["a"], 1, false).await;
    let router = mesh.router(&["127.0.0.1:0"]).await;
    wait_routes(&router, &[("prod/az1", 1)]).await;
    // More than HTTP/2's customary 100-200 concurrent streams per connection.
    const N: usize = 300;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", router.xds_addrs[0]))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut streams = Vec::new();
    for i in 0..N {
        let (tx, rx) = mpsc::channel(2);
        tx.send(DeltaDiscoveryRequest {
            node: Some(node(&format!("sidecar-{i}"), Some("prod"), Some("az1"))),
            type_url: CDS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let s = AggregatedDiscoveryServiceClient::new(channel.clone())
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        streams.push((tx, s));
    }
    for (i, (tx, s)) in streams.iter_mut().enumerate() {
        let r = timeout(TIMEOUT, s.message())
            .await
            .unwrap_or_else(|_| panic!("stream {i}: no response"))
            .unwrap()
            .unwrap();
        assert_eq!(names(&r).len(), 1, "stream {i}");
        // The ACK gives the hub's initial-sync slot (--max-initial-syncs) back.
        tx.send(DeltaDiscoveryRequest {
            type_url: CDS.into(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert_eq!(mesh.hubs["a"].sync.snapshot().len(), N);
    let gauge = router
        .metrics
        .connections
        .get_or_create(&tributary_shard_router::metrics::ReplicaLabels {
            replica: "a".into(),
            shard: "prod/az1".into(),
        })
        .get();
    assert_eq!(gauge, 1, "one client connection, relayed as one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_names_each_shards_replicas_and_streams_membership_changes() {
    use tributary_proto::directory::v1::LookupRequest;
    use tributary_proto::directory::v1::directory_client::DirectoryClient;
    let mesh = Mesh::start(&prod_and_staging(), &["a", "b"], 2, false).await;
    let router = mesh.router(&["[::1]:0"]).await;
    wait_routes(
        &router,
        &[("prod/az1", 2), ("prod/az2", 2), ("staging/az1", 2)],
    )
    .await;
    let mut dir = DirectoryClient::connect(format!("http://{}", router.xds_addrs[0]))
        .await
        .unwrap();
    let shards = |r: &tributary_proto::directory::v1::LookupResponse| -> Vec<(String, Vec<(String, String)>)> {
        r.shards
            .iter()
            .map(|s| {
                (
                    format!("{}/{}", s.environment, s.zone),
                    s.replicas
                        .iter()
                        .map(|x| (x.id.clone(), x.xds_address.clone()))
                        .collect(),
                )
            })
            .collect()
    };
    let addr = |id: &str| mesh.hubs[id].xds_addr.to_string();
    let both = vec![("a".to_string(), addr("a")), ("b".to_string(), addr("b"))];
    // A zone of every environment.
    let r = dir
        .lookup(LookupRequest {
            environment: String::new(),
            zone: "az1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        shards(&r),
        vec![
            ("prod/az1".to_string(), both.clone()),
            ("staging/az1".to_string(), both.clone())
        ]
    );
    assert!(r.revision > 0);
    assert!(
        r.shards
            .iter()
            .flat_map(|s| &s.replicas)
            .all(|x| x.federation_address == x.xds_address)
    );
    // Watch one shard: now, then after b leaves.
    let mut w = dir
        .watch(LookupRequest {
            environment: "prod".into(),
            zone: "az2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = timeout(TIMEOUT, w.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(shards(&first), vec![("prod/az2".to_string(), both.clone())]);
    mesh.store
        .delete(&format!("{REPLICAS_PREFIX}b"))
        .await
        .unwrap();
    let next = timeout(TIMEOUT, w.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        shards(&next),
        vec![("prod/az2".to_string(), vec![("a".to_string(), addr("a"))])]
    );
    assert!(next.revision > first.revision);
    // An unknown shard: nothing matches.
    let r = dir
        .lookup(LookupRequest {
            environment: "dev".into(),
            zone: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.shards.is_empty());
}
