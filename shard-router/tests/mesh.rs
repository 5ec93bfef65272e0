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

use std::collections::BTreeSet;
use std::path::PathBuf;
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
