//! Mutual TLS on every hop through the shard router, in process: two hubs on one
//! embedded store serving mTLS (one shard each: `prod/az1`, `staging/az1`), the
//! router in front serving mTLS with a router certificate, and clients holding
//! certificates of a test root. On 127.0.0.1 and on [::1].
//!
//! - a prod sidecar's Rust xDS client gets prod's resources through the router (the
//!   router forwards its certified id; the hub serves what the certificate says);
//! - a staging sidecar claiming prod gets `PERMISSION_DENIED` naming the mismatch, and
//!   nothing else;
//! - a client that sets `x-tributary-peer-id` itself (to a prod id) gets nothing of
//!   prod: the router relays the client's headers untouched and adds its certified id
//!   after them, and the hub refuses a stream that carries the header twice;
//! - a client without a certificate is refused at the handshake (and counted);
//! - an agent following the router's directory with cluster A's certificate cannot
//!   write as cluster B; as cluster A it may export what the registry grants A.
//! - a router whose certificate is not a router identity does not start.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tributary_controlplane::agent::admin::Telemetry;
use tributary_controlplane::agent::{self, AgentConfig, ClusterState};
use tributary_controlplane::app::{Hub, HubConfig, StoreBackend};
use tributary_controlplane::identity::testing::TestCa;
use tributary_controlplane::identity::tls::{self, ClientTls, TlsFiles, Transport};
use tributary_controlplane::identity::{Identity, SpiffeId};
use tributary_controlplane::model::ObjectKey;
use tributary_controlplane::xds::XdsType;
use tributary_proto::envoy::envoy::config::core::v3::{Locality, Node};
use tributary_proto::envoy::envoy::service::discovery::v3::DiscoveryRequest;
use tributary_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tributary_proto::envoy::google::protobuf::{Struct, Value, value::Kind};
use tributary_proto::federation::v1 as pb;
use tributary_shard_router::app::{Router, RouterConfig};
use tributary_store::SharedStore;
use tributary_store::embedded::{Embedded, EmbeddedConfig};

const TD: &str = tls::DEFAULT_TRUST_DOMAIN;
const TIMEOUT: Duration = Duration::from_secs(20);
const CDS: &str = tributary_proto::type_url::CLUSTER;

fn service(name: &str, env: &str) -> String {
    format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}, environment: {env}}}\nspec:\n  hosts: [{name}.{env}]\n  ports: [{{name: http, port: 8080, protocol: HTTP}}]\n"
    )
}

/// prod and staging in zone az1, each with its own `checkout`; the registry: cluster-a
/// may export staging's namespace `shop`, cluster-b prod's.
fn mesh_config() -> String {
    [
        "apiVersion: tributary.io/v1alpha1\nkind: Environment\nmetadata: {name: prod}\nspec: {zones: [az1]}\n".to_string(),
        "apiVersion: tributary.io/v1alpha1\nkind: Environment\nmetadata: {name: staging}\nspec: {zones: [az1]}\n".to_string(),
        service("checkout", "prod"),
        service("checkout", "staging"),
        "apiVersion: tributary.io/v1alpha1\nkind: RemoteCluster\nmetadata: {name: cluster-a}\nspec: {environments: [staging], namespaces: [shop]}\n".to_string(),
        "apiVersion: tributary.io/v1alpha1\nkind: RemoteCluster\nmetadata: {name: cluster-b}\nspec: {environments: [prod], namespaces: [shop]}\n".to_string(),
    ]
    .join("---\n")
}

fn workload(env: &str) -> Identity {
    Identity::Workload {
        env: env.into(),
        namespace: "shop".into(),
        service_account: "web".into(),
    }
}

/// Two mTLS hubs (one shard each) on one store, and an mTLS router, on `host`.
struct Mesh {
    ca: TestCa,
    dir: tempfile::TempDir,
    hubs: BTreeMap<String, Hub>,
    router: Router,
}

impl Mesh {
    async fn start(host: &str) -> Mesh {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let ca = TestCa::new(TD);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::create_dir_all(&config).unwrap();
        std::fs::write(config.join("mesh.yaml"), mesh_config()).unwrap();
        let store: SharedStore = Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap());
        let mut hubs = BTreeMap::new();
        for id in ["hub-1", "hub-2"] {
            let mut cfg = HubConfig::local(vec![config.clone()]);
            cfg.poll_interval = Duration::from_millis(20);
            cfg.store = StoreBackend::Shared(store.clone());
            cfg.replica_id = id.to_string();
            cfg.lease_ttl = Duration::from_secs(2);
            cfg.replicas_per_shard = 1;
            cfg.sync_wait = Duration::ZERO;
            cfg.xds_addr = SocketAddr::new(host.parse().unwrap(), 0);
            cfg.admin_addr = SocketAddr::new(host.parse().unwrap(), 0);
            cfg.transport =
                Transport::Mtls(ca.write(dir.path(), id, Identity::Hub { replica: id.into() }));
            hubs.insert(id.to_string(), Hub::start(cfg).await.expect("hub starts"));
        }
        let mut cfg = RouterConfig::local();
        cfg.listen = vec![SocketAddr::new(host.parse().unwrap(), 0)];
        cfg.transport = Transport::Mtls(ca.write(
            dir.path(),
            "router",
            Identity::Router {
                name: "front".into(),
            },
        ));
        let router = Router::start(cfg, store).await.expect("router starts");
        // Both shards have their replica in the router's table.
        let mut applied = router.table.applied();
        timeout(TIMEOUT, async {
            loop {
                let routes = router.table.routes();
                if routes.len() == 2 && routes.iter().all(|s| s.replicas.len() == 1) {
                    break;
                }
                applied.changed().await.unwrap();
            }
        })
        .await
        .expect("the router routes both shards");
        Mesh {
            ca,
            dir,
            hubs,
            router,
        }
    }

    fn files(&self, name: &str, identity: Identity) -> TlsFiles {
        self.ca.write(self.dir.path(), name, identity)
    }

    fn client(&self, name: &str, identity: Identity) -> ClientTls {
        ClientTls::load(&self.files(name, identity), TD, tls::ALPN_GRPC).unwrap()
    }

    fn xds(&self) -> SocketAddr {
        self.router.xds_addrs[0]
    }

    /// The hub serving `env`'s shard.
    fn hub_of(&self, env: &str) -> &Hub {
        let shard = format!("{env}/az1");
        let route = self
            .router
            .table
            .routes()
            .into_iter()
            .find(|s| s.shard == shard)
            .unwrap();
        &self.hubs[&route.replicas[0].replica]
    }

    /// The router's `tributary_tls_handshakes_total{listener="xds",result}`.
    async fn handshakes(&self, result: &str) -> f64 {
        let (status, body) = tributary_controlplane::http_client::request_with(
            &self.router.admin_addr.to_string(),
            None,
            "GET",
            "/metrics",
            b"",
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        let line =
            format!("tributary_tls_handshakes_total{{listener=\"xds\",result=\"{result}\"}}");
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

async fn channel(addr: SocketAddr, tls: &ClientTls) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(TIMEOUT)
        .connect_with_connector(tls.connector())
        .await
        .unwrap()
}

/// A node in zone az1 whose metadata claims `env` (or nothing).
fn node(id: &str, env: Option<&str>) -> Node {
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
        locality: Some(Locality {
            zone: "az1".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A SotW CDS stream through the router as `tls`'s identity, optionally setting
/// `x-tributary-peer-id` itself: the first response's cluster names, or the
/// stream's error.
async fn subscribe(
    mesh: &Mesh,
    tls: &ClientTls,
    node: Node,
    header: Option<&str>,
) -> Result<BTreeSet<String>, tonic::Status> {
    let mut client = AggregatedDiscoveryServiceClient::new(channel(mesh.xds(), tls).await);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(h) = header {
        req.metadata_mut()
            .insert("x-tributary-peer-id", h.parse().unwrap());
    }
    let mut stream = client.stream_aggregated_resources(req).await?.into_inner();
    let first = timeout(TIMEOUT, stream.message())
        .await
        .expect("an answer within the timeout")?
        .expect("a response, not the end of the stream");
    drop(tx);
    Ok(first
        .resources
        .iter()
        .map(|r| {
            use prost::Message;
            tributary_proto::envoy::envoy::config::cluster::v3::Cluster::decode(r.value.as_slice())
                .unwrap()
                .name
        })
        .collect())
}

fn checkout_of(env: &str) -> String {
    format!("outbound|8080||checkout.{env}")
}

/// Prod's clusters and nothing of staging's.
fn assert_env(names: &BTreeSet<String>, env: &str, other: &str) {
    assert!(names.contains(&checkout_of(env)), "{names:?}");
    assert!(
        !names.iter().any(|n| n.ends_with(&format!(".{other}"))),
        "{other} leaked: {names:?}"
    );
}

async fn a_prod_sidecar_gets_prod_through_the_router(host: &str) {
    let mesh = Mesh::start(host).await;
    let tls = mesh.client("prod", workload("prod"));
    let names = subscribe(&mesh, &tls, node("p1", Some("prod")), None)
        .await
        .expect("served");
    assert_env(&names, "prod", "staging");
    // Claiming nothing, it is routed and served by its certificate's environment.
    let names = subscribe(&mesh, &tls, node("p2", None), None)
        .await
        .expect("served");
    assert_env(&names, "prod", "staging");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prod_sidecar_gets_prod_through_the_router_over_ipv4() {
    a_prod_sidecar_gets_prod_through_the_router("127.0.0.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prod_sidecar_gets_prod_through_the_router_over_ipv6() {
    a_prod_sidecar_gets_prod_through_the_router("::1").await;
}

async fn a_staging_sidecar_claiming_prod_is_denied(host: &str) {
    let mesh = Mesh::start(host).await;
    let tls = mesh.client("staging", workload("staging"));
    let s = subscribe(&mesh, &tls, node("s1", Some("prod")), None)
        .await
        .expect_err("a staging certificate must not be served prod");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    for needle in [
        "claims environment \"prod\"",
        "certified for environment \"staging\"",
        "spiffe://tributary.local/env/staging/ns/shop/sa/web",
    ] {
        assert!(s.message().contains(needle), "{needle:?} not in {s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staging_sidecar_claiming_prod_through_the_router_is_denied_over_ipv4() {
    a_staging_sidecar_claiming_prod_is_denied("127.0.0.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staging_sidecar_claiming_prod_through_the_router_is_denied_over_ipv6() {
    a_staging_sidecar_claiming_prod_is_denied("::1").await;
}

/// The hub believes `x-tributary-peer-id` from the router; a client must therefore
/// never get a value it chose believed. The router relays a client's headers as
/// bytes and adds the certified id after them, so a client that set the header itself
/// reaches the hub with two values, and is refused, whatever it claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_set_peer_id_header_is_refused_through_the_router() {
    let mesh = Mesh::start("127.0.0.1").await;
    let tls = mesh.client("staging", workload("staging"));
    let prod = SpiffeId::new(TD, workload("prod")).to_string();
    for (id, env) in [("s1", "prod"), ("s2", "staging")] {
        let s = subscribe(&mesh, &tls, node(id, Some(env)), Some(&prod))
            .await
            .expect_err("a stream with a forged header must be refused");
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
        assert!(s.message().contains("set the header itself"), "{s:?}");
    }
    // Without the forged header, the same client is served as itself.
    let names = subscribe(&mesh, &tls, node("s3", Some("staging")), None)
        .await
        .expect("served as itself");
    assert_env(&names, "staging", "prod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused_at_the_handshake() {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mesh = Mesh::start("::1").await;
    let before = mesh.handshakes("no_certificate").await;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(mesh.ca.bundle_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(mesh.xds()).await.unwrap();
    let conn = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await;
    // TLS 1.3: the client may finish before the server has checked; the server's
    // refusal (certificate required) then ends the connection at the first read.
    let refused = match conn {
        Err(_) => true,
        Ok(mut s) => {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 16];
            matches!(s.read(&mut buf).await, Err(_) | Ok(0))
        }
    };
    assert!(refused, "the router served a client without a certificate");
    let deadline = Instant::now() + TIMEOUT;
    while mesh.handshakes("no_certificate").await <= before {
        assert!(
            Instant::now() < deadline,
            "the refused handshake was not counted as no_certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A plaintext client gets no HTTP/2 from it either.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.xds()))
        .unwrap()
        .connect_timeout(TIMEOUT)
        .connect()
        .await;
    if let Ok(ch) = plain {
        let mut client = AggregatedDiscoveryServiceClient::new(ch);
        let (_tx, rx) = mpsc::channel::<DiscoveryRequest>(1);
        let r = timeout(
            TIMEOUT,
            client.stream_aggregated_resources(ReceiverStream::new(rx)),
        )
        .await
        .expect("refused within the timeout");
        assert!(r.is_err(), "a plaintext client was served");
    }
}

/// `reviews` in namespace `shop` of `env`, one endpoint at `address`.
fn exported(env: &str, address: &str) -> ClusterState {
    let mut s = ClusterState::default();
    let key = ObjectKey {
        namespace: "shop".into(),
        name: "reviews".into(),
    };
    s.set_service(
        key.clone(),
        Some(pb::Service {
            namespace: "shop".into(),
            name: "reviews".into(),
            hosts: vec![format!("reviews.{env}")],
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port: 9080,
                protocol: "HTTP".into(),
            }],
            environment: env.to_string(),
        }),
        SystemTime::now(),
    );
    s.set_endpoints(
        key,
        Some(pb::EndpointSet {
            namespace: "shop".into(),
            service: "reviews".into(),
            endpoints: vec![pb::Endpoint {
                addresses: vec![address.to_string()],
                ports: [("http".to_string(), 9080)].into(),
                ready: true,
                serving: true,
                ..Default::default()
            }],
        }),
        SystemTime::now(),
    );
    s
}

/// An agent of `cluster_id` (its Hello) in az1 following the router's directory with
/// `tls` (its certificate), exporting `state`.
fn follow(
    mesh: &Mesh,
    cluster_id: &str,
    tls: ClientTls,
    state: ClusterState,
) -> (
    Arc<Telemetry>,
    watch::Sender<bool>,
    watch::Sender<Arc<ClusterState>>,
) {
    let url = format!("http://{}", mesh.xds());
    let mut cfg = AgentConfig::new(url.clone(), cluster_id);
    cfg.zone = "az1".into();
    cfg.tls = Some(tls);
    cfg.debounce = Duration::from_millis(10);
    cfg.backoff_initial = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(200);
    let telemetry = Arc::new(Telemetry::new(&cfg, agent::new_incarnation()));
    let (state_tx, state_rx) = watch::channel(Arc::new(state));
    let (stop_tx, mut stop) = watch::channel(false);
    tokio::spawn(agent::directory::follow(
        cfg,
        url,
        state_rx,
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
        telemetry.clone(),
    ));
    (telemetry, stop_tx, state_tx)
}

/// Waits until `check` of the agent's status is `Some`, on its changes.
async fn wait_status<T>(
    what: &str,
    telemetry: &Telemetry,
    mut check: impl FnMut(&tributary_controlplane::agent::admin::AgentStatus) -> Option<T>,
) -> T {
    let mut changes = telemetry.changes();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let status = telemetry.status();
        if let Some(v) = check(&status) {
            return v;
        }
        assert!(
            timeout(
                deadline.saturating_duration_since(Instant::now()),
                changes.changed()
            )
            .await
            .is_ok(),
            "{what}: not within {TIMEOUT:?}; status: {status:#?}"
        );
    }
}

/// The endpoint clusters of `env` on `hub` naming `reviews`.
fn reviews_in(hub: &Hub, env: &str) -> Vec<String> {
    hub.snapshots
        .current(env)
        .of_type(XdsType::Endpoint)
        .iter()
        .map(|(name, _)| name.to_string())
        .filter(|n| n.contains("reviews"))
        .collect()
}

/// Cluster A's certificate, naming cluster-b in its Hello and exporting prod (which
/// cluster-b, not cluster-a, may export): every replica it finds through the router
/// refuses it, naming both clusters, and nothing of it reaches any hub. The same
/// certificate naming its own cluster exports what cluster-a is granted (staging).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_through_the_router_with_cluster_as_certificate_cannot_write_cluster_b() {
    let mesh = Mesh::start("::1").await;
    let cert_a = || {
        mesh.client(
            "agent-a",
            Identity::Agent {
                cluster: "cluster-a".into(),
            },
        )
    };
    let (telemetry, _stop, _state) =
        follow(&mesh, "cluster-b", cert_a(), exported("prod", "6.6.6.6"));
    let refusals = wait_status("both replicas refuse the agent", &telemetry, |s| {
        let errors: Vec<String> = s
            .replicas
            .iter()
            .filter_map(|r| r.last_session_error.clone())
            .collect();
        (errors.len() == 2).then_some(errors)
    })
    .await;
    for e in &refusals {
        // PERMISSION_DENIED (tonic's words for it), naming the claim and the certificate.
        assert!(e.contains("does not have permission"), "{e}");
        assert!(
            e.contains("Hello names cluster")
                && e.contains("cluster-b")
                && e.contains("spiffe://tributary.local/cluster/cluster-a"),
            "the refusal does not name the claim and the certificate: {e}"
        );
    }
    for (id, hub) in &mesh.hubs {
        assert!(
            hub.index.clusters().is_empty(),
            "{id} holds {:?}",
            hub.index.clusters()
        );
        assert!(
            reviews_in(hub, "prod").is_empty(),
            "{id} serves reviews in prod"
        );
    }

    // Cluster A as itself: its staging export arrives at staging's replica.
    let (telemetry, _stop_a, _state_a) = follow(
        &mesh,
        "cluster-a",
        cert_a(),
        exported("staging", "10.9.9.9"),
    );
    let staging = mesh.hub_of("staging");
    let mut snapshots = staging.snapshots.subscribe_or_create("staging");
    timeout(TIMEOUT, async {
        while reviews_in(staging, "staging").is_empty() {
            snapshots.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "cluster-a's export never arrived: {:#?}",
            telemetry.status()
        )
    });
    let held: Vec<String> = staging
        .index
        .clusters()
        .iter()
        .map(|c| c.id.clone())
        .collect();
    assert_eq!(held, vec!["cluster-a".to_string()]);
    assert!(reviews_in(mesh.hub_of("prod"), "prod").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_certificate_that_is_not_a_router_identity_is_refused_at_start() {
    let ca = TestCa::new(TD);
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap());
    let mut cfg = RouterConfig::local();
    cfg.transport = Transport::Mtls(ca.write(dir.path(), "router", workload("prod")));
    let err = Router::start(cfg, store.clone()).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("router.crt")
            && msg.contains("env/prod/ns/shop/sa/web")
            && msg.contains("router identity"),
        "{msg}"
    );
    // And plaintext binds only loopback.
    let mut cfg = RouterConfig::local();
    cfg.listen = vec!["0.0.0.0:0".parse().unwrap()];
    let err = Router::start(cfg, store).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("--insecure") && msg.contains("--listen") && msg.contains("0.0.0.0:0"),
        "{msg}"
    );
}
