//! Mutual TLS on the hub's ports and the authorization matrix, in process: a hub on
//! 127.0.0.1 or [::1] port 0 serving mTLS with certificates minted by a test root,
//! and clients holding the identities of the matrix: prod sidecar, staging sidecar,
//! gateway, agent of cluster A, agent of cluster B, read-only operator, and none.
//! One test per row; each asserts the expected error, and that nothing leaked (a
//! denied stream received no resource, a refused write changed nothing).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tributary_controlplane::app::HubConfig;
use tributary_controlplane::http_client;
use tributary_controlplane::identity::Identity;
use tributary_controlplane::identity::testing::{TestCa, Validity, write_files};
use tributary_controlplane::identity::tls::{self, ClientTls, TlsFiles, Transport};
use tributary_controlplane::xds::XdsType;
use tributary_proto::envoy::envoy::config::core::v3::Node;
use tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use tributary_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tributary_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest,
};
use tributary_proto::federation::v1::federation_client::FederationClient;
use tributary_proto::federation::v1::{self as pb, agent_message, hub_message};

const TD: &str = tls::DEFAULT_TRUST_DOMAIN;

/// The mesh of every test: `checkout` in prod and staging, the registry (cluster-a
/// may export staging's `shop`, cluster-b prod's), and two operators.
fn mesh_config() -> String {
    docs(&[
        service("checkout", "prod", 8080),
        endpoints("checkout", "prod", &["10.0.0.1"], 8080),
        service("checkout", "staging", 8080),
        endpoints("checkout", "staging", &["10.1.0.1"], 8080),
        "apiVersion: tributary.io/v1alpha1\nkind: RemoteCluster\nmetadata: {name: cluster-a}\nspec: {environments: [staging], namespaces: [shop]}\n".to_string(),
        "apiVersion: tributary.io/v1alpha1\nkind: RemoteCluster\nmetadata: {name: cluster-b}\nspec: {environments: [prod], namespaces: [shop]}\n".to_string(),
        "apiVersion: tributary.io/v1alpha1\nkind: Operator\nmetadata: {name: reader}\nspec: {role: read, environments: [prod]}\n".to_string(),
        "apiVersion: tributary.io/v1alpha1\nkind: Operator\nmetadata: {name: stager}\nspec: {role: write, environments: [staging]}\n".to_string(),
    ])
}

/// The identities of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    ProdSidecar,
    StagingSidecar,
    Gateway,
    AgentA,
    AgentB,
    Reader,
    Stager,
    Intruder,
}

impl Who {
    fn identity(self) -> Identity {
        let workload = |env: &str| Identity::Workload {
            env: env.into(),
            namespace: "shop".into(),
            service_account: "web".into(),
        };
        match self {
            Who::ProdSidecar => workload("prod"),
            Who::StagingSidecar => workload("staging"),
            Who::Gateway => Identity::Gateway {
                env: "prod".into(),
                name: "ingress".into(),
            },
            Who::AgentA => Identity::Agent {
                cluster: "cluster-a".into(),
            },
            Who::AgentB => Identity::Agent {
                cluster: "cluster-b".into(),
            },
            // A cluster that has a certificate of the mesh but no registry entry.
            Who::Intruder => Identity::Agent {
                cluster: "intruder".into(),
            },
            Who::Reader => Identity::Operator {
                name: "reader".into(),
            },
            Who::Stager => Identity::Operator {
                name: "stager".into(),
            },
        }
    }
}

struct Pki {
    ca: TestCa,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            ca: TestCa::new(TD),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn files(&self, name: &str, identity: Identity) -> TlsFiles {
        self.ca.write(self.dir.path(), name, identity)
    }

    fn client(&self, who: Who, alpn: &[&[u8]]) -> ClientTls {
        let files = self.files(&format!("{who:?}"), who.identity());
        ClientTls::load(&files, TD, alpn).unwrap()
    }
}

/// A hub serving mutual TLS on `host` (127.0.0.1 or ::1), config from files.
async fn mtls_hub(pki: &Pki, host: &str) -> TestHub {
    let files = pki.files(
        "hub",
        Identity::Hub {
            replica: "hub".into(),
        },
    );
    let host = host.to_string();
    TestHub::start_with(&[("mesh.yaml", mesh_config())], move |c| {
        tls_on(c, files, &host)
    })
    .await
}

fn tls_on(c: &mut HubConfig, files: TlsFiles, host: &str) {
    c.transport = Transport::Mtls(files);
    c.xds_addr = SocketAddr::new(host.parse().unwrap(), 0);
    c.admin_addr = SocketAddr::new(host.parse().unwrap(), 0);
}

async fn channel(addr: SocketAddr, tls: &ClientTls) -> Result<Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(TIMEOUT)
        .connect_with_connector(tls.connector())
        .await
}

fn sidecar_node(id: &str, meta: &[(&str, &str)]) -> Node {
    let mut n = node_with(id, "", meta);
    // `node_with` starts from `node(id, env)`: drop the empty env claim unless given.
    let fields = &mut n.metadata.as_mut().unwrap().fields;
    if !meta.iter().any(|(k, _)| *k == "tributary.io/env") {
        fields.remove("tributary.io/env");
    }
    n
}

/// Opens a SotW CDS stream as `who` with `node` and returns the first message: a
/// response or the stream's error status.
async fn subscribe(
    hub: &TestHub,
    tls: &ClientTls,
    node: Node,
    header: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel(hub.hub.xds_addr, tls).await.unwrap());
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
    let first = tokio::time::timeout(TIMEOUT, stream.message())
        .await
        .expect("an answer within the timeout")?;
    let resp = first.expect("a response, not the end of the stream");
    // Keep the stream (and its /status/sync record) until the test has looked.
    tokio::spawn(async move {
        let _keep = (tx, stream);
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    Ok(names(&resp))
}

/// The CDS of an environment holding `checkout` (with subset v1).
fn clusters_of(env: &str) -> Vec<String> {
    sorted(vec![
        "PassthroughCluster".to_string(),
        format!("outbound|8080|v1|checkout.{env}"),
        format!("outbound|8080||checkout.{env}"),
    ])
}

fn prod_clusters() -> Vec<String> {
    clusters_of("prod")
}

fn assert_denied(r: Result<Vec<String>, tonic::Status>, needles: &[&str]) {
    match r {
        Ok(names) => panic!("expected PERMISSION_DENIED, the stream received {names:?}"),
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
            for n in needles {
                assert!(s.message().contains(n), "{n:?} not in {:?}", s.message());
            }
        }
    }
}

// ---- transport -------------------------------------------------------------------

#[test]
fn plaintext_needs_insecure_and_binds_only_loopback() {
    let err = Transport::from_flags(None, false).unwrap_err();
    assert!(
        err.contains("--tls-cert") && err.contains("--insecure"),
        "{err}"
    );
    let t = Transport::from_flags(None, true).unwrap();
    for ok in ["127.0.0.1:0", "[::1]:0"] {
        t.check_bind("--xds-addr", ok.parse().unwrap()).unwrap();
    }
    let err = t
        .check_bind("--xds-addr", "0.0.0.0:18000".parse().unwrap())
        .unwrap_err();
    assert!(
        err.contains("--insecure") && err.contains("--xds-addr") && err.contains("0.0.0.0:18000"),
        "{err}"
    );
    let err = t
        .check_bind("--admin-addr", "[::]:19001".parse().unwrap())
        .unwrap_err();
    assert!(err.contains("[::]:19001"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insecure_hub_refuses_a_non_loopback_address() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.yaml"), mesh_config()).unwrap();
    let mut cfg = HubConfig::local(vec![dir.path().to_path_buf()]);
    cfg.xds_addr = "0.0.0.0:0".parse().unwrap();
    let err = format!(
        "{:#}",
        tributary_controlplane::app::Hub::start(cfg)
            .await
            .unwrap_err()
    );
    assert!(
        err.contains("--insecure") && err.contains("0.0.0.0:0"),
        "{err}"
    );
}

async fn metric(hub: &TestHub, admin: &ClientTls, line_prefix: &str) -> f64 {
    let (status, body) = http_client::request_with(
        &hub.hub.admin_addr.to_string(),
        Some(admin),
        "GET",
        "/metrics",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let text = String::from_utf8(body.to_vec()).unwrap();
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

/// A root operator for reading metrics.
fn root_admin(pki: &Pki) -> ClientTls {
    let files = pki.files(
        "root",
        Identity::Hub {
            replica: "peer".into(),
        },
    );
    ClientTls::load(&files, TD, tls::ALPN_HTTP1).unwrap()
}

async fn refused_handshake(hub: &TestHub, pki: &Pki, tls: &ClientTls, reason: &str) {
    let before = metric(
        hub,
        &root_admin(pki),
        &format!("tributary_tls_handshakes_total{{listener=\"xds\",result=\"{reason}\"}}"),
    )
    .await;
    let err = match channel(hub.hub.xds_addr, tls).await {
        // TLS 1.3: the client finishes before the server has checked its certificate;
        // the refusal arrives with the first request.
        Ok(ch) => {
            let mut client = AggregatedDiscoveryServiceClient::new(ch);
            let (_tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(1);
            match client
                .delta_aggregated_resources(ReceiverStream::new(rx))
                .await
            {
                Ok(mut s) => s.get_mut().message().await.err().map(|e| e.to_string()),
                Err(e) => Some(e.to_string()),
            }
        }
        Err(e) => Some(format!("{e:?}")),
    };
    assert!(
        err.is_some(),
        "the hub served a peer it should have refused"
    );
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let now = metric(
            hub,
            &root_admin(pki),
            &format!("tributary_tls_handshakes_total{{listener=\"xds\",result=\"{reason}\"}}"),
        )
        .await;
        if now > before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no handshake counted as {reason:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    // Trusts the hub, presents nothing.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(pki.ca.bundle_pem().as_bytes()) {
            r.add(c.unwrap()).unwrap();
        }
        Arc::new(r)
    };
    use rustls::pki_types::pem::PemObject;
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(hub.hub.xds_addr)
        .await
        .unwrap();
    let conn = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await;
    // The server's refusal (certificate required) ends the connection at once.
    let refused = match conn {
        Err(_) => true,
        Ok(mut s) => {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 16];
            matches!(s.read(&mut buf).await, Err(_) | Ok(0))
        }
    };
    assert!(refused, "a peer without a certificate was served");
    let n = metric(
        &hub,
        &root_admin(&pki),
        "tributary_tls_handshakes_total{listener=\"xds\",result=\"no_certificate\"}",
    )
    .await;
    assert_eq!(n, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let (cert, key) = pki.ca.leaf(Who::ProdSidecar.identity(), Validity::Expired);
    let files = write_files(pki.dir.path(), "expired", &cert, &key, pki.ca.bundle_pem());
    let tls = ClientTls::load(&files, TD, tls::ALPN_GRPC).unwrap();
    refused_handshake(&hub, &pki, &tls, "expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_another_ca_is_refused() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let other = TestCa::new(TD);
    let (cert, key) = other.leaf(Who::ProdSidecar.identity(), Validity::Current);
    // Trusts our root (so it accepts the hub) but holds a foreign certificate.
    let files = write_files(pki.dir.path(), "foreign", &cert, &key, pki.ca.bundle_pem());
    let tls = ClientTls::load(&files, TD, tls::ALPN_GRPC).unwrap();
    refused_handshake(&hub, &pki, &tls, "unknown_ca").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_another_trust_domain_is_refused() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let (cert, key) = pki.ca.leaf_with_uris(
        &["spiffe://other.domain/env/prod/ns/shop/sa/web".to_string()],
        Validity::Current,
    );
    let files = write_files(
        pki.dir.path(),
        "otherdomain",
        &cert,
        &key,
        pki.ca.bundle_pem(),
    );
    let tls = ClientTls::load(&files, TD, tls::ALPN_GRPC).unwrap();
    refused_handshake(&hub, &pki, &tls, "bad_identity").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_hub_files_are_served_without_a_restart() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let tls = pki.client(Who::ProdSidecar, tls::ALPN_GRPC);
    let names = subscribe(&hub, &tls, sidecar_node("n1", &[]), None)
        .await
        .unwrap();
    assert_eq!(names, prod_clusters());
    // Rotate to a new root: the hub's own cert and bundle, then the client's.
    let new = TestCa::new(TD);
    let (cert, key) = new.leaf(
        Identity::Hub {
            replica: "hub".into(),
        },
        Validity::Current,
    );
    let hub_files = TlsFiles {
        cert: pki.dir.path().join("hub.crt"),
        key: pki.dir.path().join("hub.key"),
        ca: pki.dir.path().join("hub-ca.crt"),
    };
    let bundle = format!("{}{}", pki.ca.bundle_pem(), new.bundle_pem());
    // Written like a Secret volume: new files, then renamed into place.
    for (path, text) in [
        (&hub_files.key, &key),
        (&hub_files.cert, &cert),
        (&hub_files.ca, &bundle),
    ] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    let (ccert, ckey) = new.leaf(Who::ProdSidecar.identity(), Validity::Current);
    let files = write_files(pki.dir.path(), "renewed", &ccert, &ckey, new.bundle_pem());
    let renewed = ClientTls::load(&files, TD, tls::ALPN_GRPC).unwrap();
    // The hub picks the files up on its own: wait until a client of the new root is served.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    // Until then a client that trusts only the new root refuses the hub's old
    // certificate at connect (BadSignature), and the hub refuses the client's new one.
    loop {
        let connects = channel(hub.hub.xds_addr, &renewed).await.is_ok();
        if connects
            && let Ok(names) = subscribe(&hub, &renewed, sidecar_node("n2", &[]), None).await
        {
            assert_eq!(names, prod_clusters());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hub never served its renewed certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The old root is still in the hub's bundle: a client whose certificate is of
    // the old root (and that trusts both) is still served.
    let (ocert, okey) = pki.ca.leaf(Who::ProdSidecar.identity(), Validity::Current);
    let files = write_files(pki.dir.path(), "old-leaf", &ocert, &okey, &bundle);
    let old = ClientTls::load(&files, TD, tls::ALPN_GRPC).unwrap();
    assert_eq!(
        subscribe(&hub, &old, sidecar_node("n3", &[]), None)
            .await
            .unwrap(),
        prod_clusters()
    );
    drop(tls);
}

// ---- xDS subscribe ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_prod_sidecar_claiming_prod_gets_prod() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let tls = pki.client(Who::ProdSidecar, tls::ALPN_GRPC);
    let names = subscribe(
        &hub,
        &tls,
        sidecar_node("n1", &[("tributary.io/env", "prod")]),
        None,
    )
    .await
    .unwrap();
    assert_eq!(names, prod_clusters());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_prod_sidecar_claiming_nothing_inherits_prod_over_ipv6() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "::1").await;
    assert!(hub.hub.xds_addr.is_ipv6());
    let tls = pki.client(Who::ProdSidecar, tls::ALPN_GRPC);
    let names = subscribe(&hub, &tls, sidecar_node("n1", &[]), None)
        .await
        .unwrap();
    assert_eq!(names, prod_clusters());
    let status = hub.sync_status();
    assert_eq!(status[0]["environment"], "prod", "{status}");
    assert_eq!(status[0]["role"], "sidecar", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_prod_sidecar_claiming_staging_is_denied() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let tls = pki.client(Who::ProdSidecar, tls::ALPN_GRPC);
    let r = subscribe(
        &hub,
        &tls,
        sidecar_node("n1", &[("tributary.io/env", "staging")]),
        None,
    )
    .await;
    assert_denied(
        r,
        &[
            "claims environment \"staging\"",
            "certified for environment \"prod\"",
        ],
    );
    assert_eq!(
        hub.sync_status(),
        serde_json::json!([]),
        "a denied node was registered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_staging_sidecar_claiming_prod_is_denied() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let tls = pki.client(Who::StagingSidecar, tls::ALPN_GRPC);
    let r = subscribe(
        &hub,
        &tls,
        sidecar_node("n1", &[("tributary.io/env", "prod")]),
        None,
    )
    .await;
    assert_denied(r, &["claims environment \"prod\"", "\"staging\""]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_staging_sidecar_claiming_the_gateway_role_is_denied() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let tls = pki.client(Who::StagingSidecar, tls::ALPN_GRPC);
    let r = subscribe(
        &hub,
        &tls,
        sidecar_node("n1", &[("tributary.io/gateway", "ingress")]),
        None,
    )
    .await;
    assert_denied(r, &["gateway role \"ingress\"", "workload"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_gateway_inherits_its_role_and_may_not_claim_another() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let tls = pki.client(Who::Gateway, tls::ALPN_GRPC);
    subscribe(&hub, &tls, sidecar_node("gw", &[]), None)
        .await
        .unwrap();
    let status = hub.sync_status();
    assert_eq!(status[0]["role"], "gateway/ingress", "{status}");
    assert_eq!(status[0]["environment"], "prod", "{status}");
    let r = subscribe(
        &hub,
        &tls,
        sidecar_node("gw2", &[("tributary.io/gateway", "egress")]),
        None,
    )
    .await;
    assert_denied(
        r,
        &[
            "claims gateway \"egress\"",
            "certified as gateway \"ingress\"",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_agents_and_operators_may_not_subscribe() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    for who in [Who::AgentA, Who::AgentB, Who::Reader] {
        let tls = pki.client(who, tls::ALPN_GRPC);
        let r = subscribe(
            &hub,
            &tls,
            sidecar_node("x", &[("tributary.io/env", "prod")]),
            None,
        )
        .await;
        assert_denied(r, &["may not subscribe to xDS"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_a_workload_cannot_spoof_the_routers_peer_id_header() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let tls = pki.client(Who::StagingSidecar, tls::ALPN_GRPC);
    let prod = tributary_controlplane::identity::SpiffeId::new(TD, Who::ProdSidecar.identity())
        .to_string();
    // The header is ignored: the stream is the staging workload's own.
    let names = subscribe(&hub, &tls, sidecar_node("n1", &[]), Some(&prod))
        .await
        .unwrap();
    assert_eq!(names, clusters_of("staging"));
    let r = subscribe(
        &hub,
        &tls,
        sidecar_node("n2", &[("tributary.io/env", "prod")]),
        Some(&prod),
    )
    .await;
    assert_denied(r, &["claims environment \"prod\""]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_a_router_may_forward_a_proxys_identity() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let files = pki.files(
        "router",
        Identity::Router {
            name: "front".into(),
        },
    );
    let tls = ClientTls::load(&files, TD, tls::ALPN_GRPC).unwrap();
    let prod = tributary_controlplane::identity::SpiffeId::new(TD, Who::ProdSidecar.identity())
        .to_string();
    let names = subscribe(&hub, &tls, sidecar_node("n1", &[]), Some(&prod))
        .await
        .unwrap();
    assert_eq!(names, prod_clusters());
    // Without a forwarded identity the router is itself, which may not subscribe.
    let r = subscribe(&hub, &tls, sidecar_node("n2", &[]), None).await;
    assert_denied(r, &["a router may not subscribe"]);
}

// ---- federation write ------------------------------------------------------------

fn pb_service(name: &str, env: &str) -> pb::Service {
    pb::Service {
        namespace: "shop".into(),
        name: name.into(),
        hosts: vec![format!("{name}.{env}")],
        ports: vec![pb::ServicePort {
            name: "http".into(),
            port: 8080,
            protocol: "HTTP".into(),
        }],
        environment: env.into(),
    }
}

fn export(name: &str, env: &str, addr: &str) -> Vec<pb::Change> {
    vec![
        pb::Change {
            origin_unix_nanos: 1,
            kind: Some(pb::change::Kind::ServiceUpsert(pb_service(name, env))),
        },
        pb::Change {
            origin_unix_nanos: 1,
            kind: Some(pb::change::Kind::EndpointsUpsert(pb::EndpointSet {
                namespace: "shop".into(),
                service: name.into(),
                endpoints: vec![pb::Endpoint {
                    addresses: vec![addr.into()],
                    ports: [("http".to_string(), 8080)].into(),
                    ready: true,
                    serving: true,
                    ..Default::default()
                }],
            })),
        },
    ]
}

/// A federation session as `tls`'s identity naming `cluster` in its Hello: the
/// Welcome, then the Ack of one full batch of `changes`; or the error status.
async fn federate(
    hub: &TestHub,
    tls: &ClientTls,
    cluster: &str,
    changes: Vec<pb::Change>,
) -> Result<pb::Ack, tonic::Status> {
    let mut client = FederationClient::new(channel(hub.hub.xds_addr, tls).await.unwrap());
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::AgentMessage {
        kind: Some(agent_message::Kind::Hello(pb::Hello {
            cluster_id: cluster.into(),
            zone: "az1".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut s = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    loop {
        match next(&mut s).await?.and_then(|m| m.kind) {
            Some(hub_message::Kind::Welcome(_)) => break,
            Some(hub_message::Kind::Heartbeat(_)) => continue,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }
    tx.send(pb::AgentMessage {
        kind: Some(agent_message::Kind::Batch(pb::ChangeBatch {
            version: 1,
            full: true,
            changes,
            more: false,
        })),
    })
    .await
    .unwrap();
    loop {
        match next(&mut s).await?.and_then(|m| m.kind) {
            Some(hub_message::Kind::Ack(a)) => {
                // Keep the session (and what it applied) until the caller looked.
                tokio::spawn(async move {
                    let _keep = (tx, s);
                    tokio::time::sleep(Duration::from_secs(30)).await;
                });
                return Ok(a);
            }
            Some(hub_message::Kind::Heartbeat(_)) => continue,
            other => panic!("expected Ack, got {other:?}"),
        }
    }
}

async fn next(
    s: &mut tonic::Streaming<pb::HubMessage>,
) -> Result<Option<pb::HubMessage>, tonic::Status> {
    tokio::time::timeout(TIMEOUT, s.message())
        .await
        .expect("an answer within the timeout")
}

fn prod_checkout(hub: &TestHub) -> (String, Vec<String>) {
    let snap = hub.hub.snapshots.current("prod");
    let r = snap
        .get(XdsType::Endpoint, "outbound|8080||checkout.prod")
        .expect("prod checkout's endpoints");
    let cla = ClusterLoadAssignment::decode(r.body()).unwrap();
    let mut addrs: Vec<String> = cla
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .map(|e| format!("{e:?}"))
        .collect();
    addrs.sort();
    (r.version().to_string(), addrs)
}

async fn clusters(hub: &TestHub, pki: &Pki) -> serde_json::Value {
    let (status, body) = http_client::request_with(
        &hub.hub.admin_addr.to_string(),
        Some(&root_admin(pki)),
        "GET",
        "/status/clusters",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

/// The attack of issue 12, reproduced: an unknown cluster id joins a running hub
/// and exports prod `checkout` with `6.6.6.6`. Without a certificate it cannot
/// connect; with a certificate of the mesh but no registry entry it is refused; and
/// prod `checkout`'s load assignment does not change either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_an_unknown_cluster_cannot_join_and_add_6_6_6_6_to_prod_checkout() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let before = prod_checkout(&hub);
    let tls = pki.client(Who::Intruder, tls::ALPN_GRPC);
    let r = federate(
        &hub,
        &tls,
        "intruder",
        export("checkout", "prod", "6.6.6.6"),
    )
    .await;
    let s = r.unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("\"intruder\" is not in the registry"),
        "{}",
        s.message()
    );
    // Let anything that would have been applied be published, then look.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(prod_checkout(&hub), before, "prod checkout changed");
    let c = clusters(&hub, &pki).await;
    assert_eq!(c["clusters"], serde_json::json!([]), "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_an_agent_naming_another_cluster_is_denied() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let tls = pki.client(Who::AgentA, tls::ALPN_GRPC);
    let s = federate(
        &hub,
        &tls,
        "cluster-b",
        export("checkout", "prod", "6.6.6.6"),
    )
    .await
    .unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("\"cluster-b\"") && s.message().contains("\"cluster-a\""),
        "{}",
        s.message()
    );
    assert_eq!(
        clusters(&hub, &pki).await["clusters"],
        serde_json::json!([])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_a_registered_cluster_may_not_export_outside_its_grant() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let before = prod_checkout(&hub);
    let tls = pki.client(Who::AgentA, tls::ALPN_GRPC);
    // cluster-a may export staging's shop: its prod export is refused, its staging
    // one applied.
    let mut changes = export("checkout", "prod", "6.6.6.6");
    let mut staging = export("cart", "staging", "10.1.0.9");
    changes.append(&mut staging);
    let mut snapshots = hub.hub.snapshots.subscribe_or_create("staging");
    let ack = federate(&hub, &tls, "cluster-a", changes).await.unwrap();
    assert_eq!(ack.errors.len(), 1, "{ack:?}");
    assert_eq!(ack.errors[0].index, 0);
    assert!(
        ack.errors[0]
            .message
            .contains("may export into environments [\"staging\"], not \"prod\""),
        "{}",
        ack.errors[0].message
    );
    tokio::time::timeout(
        TIMEOUT,
        snapshots.wait_for(|s| {
            s.get(XdsType::Endpoint, "outbound|8080||cart.staging")
                .is_some()
        }),
    )
    .await
    .expect("the granted export applied")
    .unwrap();
    assert_eq!(prod_checkout(&hub), before, "prod checkout changed");
    let refused = metric(
        &hub,
        &root_admin(&pki),
        "tributary_federation_exports_refused_total{cluster=\"cluster-a\"}",
    )
    .await;
    assert_eq!(refused, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_the_granted_cluster_exports_into_prod() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let tls = pki.client(Who::AgentB, tls::ALPN_GRPC);
    let mut snapshots = hub.hub.snapshots.subscribe_or_create("prod");
    let ack = federate(
        &hub,
        &tls,
        "cluster-b",
        export("payments", "prod", "10.0.0.7"),
    )
    .await
    .unwrap();
    assert!(ack.errors.is_empty(), "{ack:?}");
    tokio::time::timeout(
        TIMEOUT,
        snapshots.wait_for(|s| {
            s.get(XdsType::Endpoint, "outbound|8080||payments.prod")
                .is_some()
        }),
    )
    .await
    .expect("the export applied")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_workloads_gateways_and_operators_may_not_federate() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let before = prod_checkout(&hub);
    for who in [Who::ProdSidecar, Who::Gateway, Who::Reader] {
        let tls = pki.client(who, tls::ALPN_GRPC);
        let s = federate(
            &hub,
            &tls,
            "cluster-b",
            export("checkout", "prod", "6.6.6.6"),
        )
        .await
        .unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{who:?}: {s:?}");
        assert!(
            s.message()
                .contains("only a remote cluster's agent may federate"),
            "{}",
            s.message()
        );
    }
    assert_eq!(prod_checkout(&hub), before);
}

// ---- admin read / write ----------------------------------------------------------

async fn admin(
    hub: &TestHub,
    tls: &ClientTls,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let (status, body) = http_client::request_with(
        &hub.hub.admin_addr.to_string(),
        Some(tls),
        method,
        path,
        body.as_bytes(),
    )
    .await
    .unwrap();
    // A refusal's message, unescaped; else the body as it came.
    let text = String::from_utf8_lossy(&body).into_owned();
    let error = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string));
    (status, error.unwrap_or(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_a_read_only_operator_reads_its_environment_only() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    let tls = pki.client(Who::Reader, tls::ALPN_HTTP1);
    let (status, body) = admin(&hub, &tls, "GET", "/config_dump?env=prod", "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("checkout.prod"), "{body}");
    let (status, body) = admin(&hub, &tls, "GET", "/config_dump?env=staging", "").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("may read environments [\"prod\"], not environment \"staging\""),
        "{body}"
    );
    assert!(!body.contains("checkout.staging"), "{body}");
    // Mesh-wide views need a grant on every environment.
    let (status, body) = admin(&hub, &tls, "GET", "/status/sync", "").await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_workloads_and_agents_may_not_read_config_dumps() {
    let pki = Pki::new();
    let hub = mtls_hub(&pki, "127.0.0.1").await;
    for (who, kind) in [
        (Who::StagingSidecar, "a workload"),
        (Who::Gateway, "a gateway"),
        (Who::AgentA, "a remote cluster's agent"),
    ] {
        let tls = pki.client(who, tls::ALPN_HTTP1);
        let (status, body) = admin(&hub, &tls, "GET", "/config_dump?env=prod", "").await;
        assert_eq!(status, 403, "{who:?}: {body}");
        assert!(body.contains(kind), "{body}");
        assert!(!body.contains("checkout"), "{body}");
    }
}

/// A hub whose config is in the store: written through the admin API by `root`, a
/// bootstrap operator.
async fn store_hub(pki: &Pki) -> TestHub {
    let files = pki.files(
        "hub",
        Identity::Hub {
            replica: "hub".into(),
        },
    );
    let hub = TestHub::start_with(&[], move |c| {
        c.config_paths.clear();
        c.bootstrap_operators = vec!["root".into()];
        tls_on(c, files, "127.0.0.1");
    })
    .await;
    let root = ClientTls::load(
        &pki.files(
            "root-op",
            Identity::Operator {
                name: "root".into(),
            },
        ),
        TD,
        tls::ALPN_HTTP1,
    )
    .unwrap();
    let mut prod = hub.hub.snapshots.subscribe_or_create("prod");
    let (status, body) = admin(&hub, &root, "POST", "/config/apply", &mesh_config()).await;
    assert_eq!(status, 200, "{body}");
    // The grants arrive with the config that published prod's snapshot.
    tokio::time::timeout(
        TIMEOUT,
        prod.wait_for(|s| {
            s.get(XdsType::Cluster, "outbound|8080||checkout.prod")
                .is_some()
        }),
    )
    .await
    .expect("the applied config is published")
    .unwrap();
    hub
}

fn stored(hub: &TestHub) -> String {
    let snap = hub.hub.snapshots.current("prod");
    format!(
        "{:?}",
        snap.of_type(XdsType::Cluster).keys().collect::<Vec<_>>()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_need_the_write_role_on_every_environment_they_touch() {
    let pki = Pki::new();
    let hub = store_hub(&pki).await;
    let reader = pki.client(Who::Reader, tls::ALPN_HTTP1);
    let stager = pki.client(Who::Stager, tls::ALPN_HTTP1);
    let prod_svc = service("payments", "prod", 8080);
    let staging_svc = service("payments", "staging", 8080);
    let before = stored(&hub);

    let (status, body) = admin(&hub, &reader, "POST", "/config/apply", &prod_svc).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("has the read role"), "{body}");
    // A dry run writes nothing: read is enough.
    let (status, body) = admin(
        &hub,
        &reader,
        "POST",
        "/config/apply?dry_run=true",
        &prod_svc,
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = admin(&hub, &stager, "POST", "/config/apply", &prod_svc).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not environment \"prod\""), "{body}");
    // One document outside the grant refuses the whole request.
    let both = docs(&[staging_svc.clone(), prod_svc.clone()]);
    let (status, body) = admin(&hub, &stager, "POST", "/config/apply", &both).await;
    assert_eq!(status, 403, "{body}");
    // Granting itself more is a mesh-wide write.
    let escalate = "apiVersion: tributary.io/v1alpha1\nkind: Operator\nmetadata: {name: stager}\nspec: {role: write, environments: [\"*\"]}\n";
    let (status, body) = admin(&hub, &stager, "POST", "/config/apply", escalate).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("the whole mesh"), "{body}");
    let (status, body) = admin(
        &hub,
        &stager,
        "DELETE",
        "/config/prod/Service/default/checkout",
        "",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(stored(&hub), before, "a refused write changed prod");

    let (status, body) = admin(&hub, &stager, "POST", "/config/apply", &staging_svc).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_a_plaintext_hub_serves_admin_unauthenticated_on_loopback() {
    let hub = TestHub::start(&[("mesh.yaml", mesh_config())]).await;
    let (status, _) = http_client::request(
        &hub.hub.admin_addr.to_string(),
        "GET",
        "/config_dump?env=prod",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
}
