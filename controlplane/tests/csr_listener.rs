//! The CSR listener (`--csr-addr`): how a peer without a certificate gets its first
//! one from a hub that serves mutual TLS everywhere else. A hub whose CA (root in a
//! shared store) issued the hub's own certificate; peers hold only the CA bundle and
//! a credential (a join token, or a service-account token reviewed by a real
//! kube-apiserver), get a certificate over TLS without a client certificate, and use
//! it on the mTLS xDS port. Everything but the CSR route is 404 there; the bounds on
//! what an anonymous caller sends are enforced; the admin listener still refuses a
//! caller without a certificate.

mod common;
#[path = "common/kube_env.rs"]
mod kube_env;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tributary_controlplane::app::{Hub, HubConfig, StoreBackend};
use tributary_controlplane::http_client;
use tributary_controlplane::identity::ca::{Ca, CaConfig, Signer};
use tributary_controlplane::identity::client::{
    Credential, CsrServer, Obtained, request_certificate_from, write_atomically,
};
use tributary_controlplane::identity::csr_listener::CsrListenerConfig;
use tributary_controlplane::identity::tls::{self, ClientTls, TlsFiles, Transport};
use tributary_controlplane::identity::tokenreview::ReviewCluster;
use tributary_controlplane::identity::verify::verify_chain;
use tributary_controlplane::identity::{Identity, SpiffeId};
use tributary_proto::envoy::envoy::service::discovery::v3::DiscoveryRequest;
use tributary_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tributary_store::SharedStore;
use tributary_store::embedded::{Embedded, EmbeddedConfig};

const TD: &str = tls::DEFAULT_TRUST_DOMAIN;
const PROD_WEB: &str = "spiffe://tributary.local/env/prod/ns/shop/sa/web";
const STAGING_WEB: &str = "spiffe://tributary.local/env/staging/ns/shop/sa/web";

fn mesh_config() -> String {
    docs(&[
        service("checkout", "prod", 8080),
        endpoints("checkout", "prod", &["10.0.0.1"], 8080),
        service("checkout", "staging", 8080),
        endpoints("checkout", "staging", &["10.1.0.1"], 8080),
    ])
}

/// A hub serving mutual TLS with a certificate of its own CA, and what its peers
/// start from: the CA bundle, and an operator certificate for the admin API.
struct Secure {
    hub: TestHub,
    files: tempfile::TempDir,
    /// The CA bundle a new peer is given (no certificate, no key).
    bundle: PathBuf,
    operator: ClientTls,
}

/// Issues `identity` a certificate of the mesh intermediate and writes it, its key
/// and the trust bundle under `dir/name`, as the bootstrap CSR client would.
async fn issue_files(ca: &Ca, dir: &std::path::Path, name: &str, identity: Identity) -> TlsFiles {
    let id = SpiffeId::new(TD, identity);
    let cert = ca.issue_with(&id, &Signer::Mesh).await.unwrap();
    let dir = dir.join(name);
    write_atomically(
        &dir,
        &Obtained {
            spiffe_id: id.to_string(),
            cert,
            trust_bundle_pem: ca.trust_bundle_at(SystemTime::now()),
        },
    )
    .unwrap();
    TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        ca: dir.join("ca.pem"),
    }
}

impl Secure {
    async fn start(host: &str, tweak: impl FnOnce(&mut HubConfig)) -> Secure {
        let store: SharedStore = Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap());
        // The hub's CA is the store's: open it first to issue the hub's own certificate
        // (what the one-command mesh and a deployment's bootstrap do).
        let ca = Ca::open(store.clone(), CaConfig::new(TD)).await.unwrap();
        let files = tempfile::tempdir().unwrap();
        let issue = async |name: &str, identity: Identity| {
            issue_files(&ca, files.path(), name, identity).await
        };
        let hub_files = issue(
            "hub",
            Identity::Hub {
                replica: "hub".into(),
            },
        )
        .await;
        let operator_files = issue(
            "operator",
            Identity::Operator {
                name: "admin".into(),
            },
        )
        .await;
        let bundle = files.path().join("bundle.pem");
        std::fs::write(&bundle, ca.trust_bundle_at(SystemTime::now())).unwrap();
        let ip: std::net::IpAddr = host.parse().unwrap();
        let hub = TestHub::start_with(&[("mesh.yaml", mesh_config())], move |c| {
            c.store = StoreBackend::Shared(store);
            c.transport = Transport::Mtls(hub_files);
            c.xds_addr = SocketAddr::new(ip, 0);
            c.admin_addr = SocketAddr::new(ip, 0);
            c.identity.csr.addrs = vec![SocketAddr::new(ip, 0)];
            c.bootstrap_operators = vec!["admin".into()];
            tweak(c);
        })
        .await;
        let operator = ClientTls::load(&operator_files, TD, tls::ALPN_HTTP1).unwrap();
        Secure {
            hub,
            files,
            bundle,
            operator,
        }
    }

    fn csr_addr(&self) -> String {
        self.hub.hub.csr_addrs[0].to_string()
    }

    fn csr_server(&self) -> CsrServer {
        CsrServer::new(
            &format!("https://{}", self.csr_addr()),
            Some(self.bundle.clone()),
            TD,
        )
        .unwrap()
    }

    /// TLS that checks the hub against the bundle and presents no certificate.
    fn anonymous(&self) -> ClientTls {
        ClientTls {
            config: Arc::new(tls::Reloading::fixed(
                tls::server_auth_only_client_config("--ca", &self.bundle, TD, tls::ALPN_HTTP1)
                    .unwrap(),
            )),
        }
    }

    /// A join token for `identity` from the admin API (an operator over mTLS).
    async fn token(&self, identity: &str, ttl: &str) -> serde_json::Value {
        let body = serde_json::json!({"identity": identity, "ttl": ttl, "uses": 1});
        let (status, resp) = http_client::request_with(
            &self.hub.hub.admin_addr.to_string(),
            Some(&self.operator),
            "POST",
            "/v1/tokens",
            &serde_json::to_vec(&body).unwrap(),
        )
        .await
        .unwrap();
        let resp: serde_json::Value = serde_json::from_slice(&resp).unwrap();
        assert_eq!(status, 201, "{resp}");
        resp
    }

    /// `method path` on the CSR listener without a certificate: status and JSON body.
    async fn csr_call(&self, method: &str, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
        let (status, resp) = http_client::request_with(
            &self.csr_addr(),
            Some(&self.anonymous()),
            method,
            path,
            body,
        )
        .await
        .unwrap();
        (
            status,
            serde_json::from_slice(&resp).unwrap_or(serde_json::Value::Null),
        )
    }
}

/// Opens a SotW CDS stream on the mTLS xDS port with `tls` and returns the names
/// of the first response.
async fn cds_names(xds: SocketAddr, tls: &ClientTls) -> Result<Vec<String>, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{xds}"))
        .unwrap()
        .connect_timeout(TIMEOUT)
        .connect_with_connector(tls.connector())
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node_with("new-web", "prod", &[])),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = tokio::time::timeout(TIMEOUT, stream.message())
        .await
        .expect("an answer within the timeout")?
        .expect("a response");
    Ok(names(&first))
}

/// The whole path of a new workload: only the CA bundle and a join token; its
/// first certificate over the CSR listener; then prod's clusters over mTLS xDS.
async fn a_new_workload_joins_with_a_join_token(host: &str) {
    let s = Secure::start(host, |_| {}).await;
    let token = s.token(PROD_WEB, "1h").await;
    let credential = Credential::JoinToken(token["token"].as_str().unwrap().to_string());

    // The admin listener (where the CSR API was the only way in) refuses a caller
    // without a client certificate: the token is not even read, so not used.
    let admin = CsrServer::new(
        &format!("https://{}", s.hub.hub.admin_addr),
        Some(s.bundle.clone()),
        TD,
    )
    .unwrap();
    let refused = request_certificate_from(&admin, &credential, None).await;
    assert!(
        refused.is_err(),
        "the admin listener served a caller without a certificate: {refused:?}"
    );

    let got = request_certificate_from(&s.csr_server(), &credential, None)
        .await
        .unwrap();
    assert_eq!(got.spiffe_id, PROD_WEB);
    assert_eq!(
        verify_chain(
            &got.trust_bundle_pem,
            &got.cert.chain_pem,
            SystemTime::now()
        )
        .unwrap()
        .to_string(),
        PROD_WEB
    );
    let dir = s.files.path().join("web");
    write_atomically(&dir, &got).unwrap();
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        ca: dir.join("ca.pem"),
    };
    let tls = ClientTls::load(&files, TD, tls::ALPN_GRPC).unwrap();
    assert_eq!(
        cds_names(s.hub.hub.xds_addr, &tls).await.unwrap(),
        sorted(vec![
            "PassthroughCluster".to_string(),
            "outbound|8080|v1|checkout.prod".to_string(),
            "outbound|8080||checkout.prod".to_string(),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_buys_a_first_certificate_used_on_the_mtls_xds_port_ipv4() {
    a_new_workload_joins_with_a_join_token("127.0.0.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_buys_a_first_certificate_used_on_the_mtls_xds_port_ipv6() {
    a_new_workload_joins_with_a_join_token("::1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_revoked_expired_and_other_environment_tokens_are_refused_with_a_reason() {
    let s = Secure::start("127.0.0.1", |_| {}).await;
    let server = s.csr_server();
    let (_, csr) = tributary_controlplane::identity::client::new_csr(None).unwrap();

    // No credential at all.
    let (status, body) = s
        .csr_call(
            "POST",
            "/v1/certificates",
            &serde_json::to_vec(&serde_json::json!({ "csr": csr })).unwrap(),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("expected exactly one credential"),
        "{body}"
    );

    // A revoked token.
    let revoked = s.token(PROD_WEB, "1h").await;
    let (status, _) = http_client::request_with(
        &s.hub.hub.admin_addr.to_string(),
        Some(&s.operator),
        "DELETE",
        &format!("/v1/tokens/{}", revoked["id"].as_str().unwrap()),
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 204);
    let err = request_certificate_from(
        &server,
        &Credential::JoinToken(revoked["token"].as_str().unwrap().into()),
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("HTTP 401") && err.contains("was revoked at"),
        "{err}"
    );

    // An expired token: wait (on the clock) until its expiry has passed.
    let expiring = s.token(PROD_WEB, "1s").await;
    let expires = humantime::parse_rfc3339(expiring["expires"].as_str().unwrap()).unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while SystemTime::now() <= expires + Duration::from_millis(10) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the token never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = request_certificate_from(
        &server,
        &Credential::JoinToken(expiring["token"].as_str().unwrap().into()),
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("HTTP 401") && err.contains("expired at"),
        "{err}"
    );

    // A token for staging cannot buy a prod certificate; the message names both,
    // and the token is not used up by the refusal.
    let staging = s.token(STAGING_WEB, "1h").await;
    let staging = Credential::JoinToken(staging["token"].as_str().unwrap().into());
    let err =
        request_certificate_from(&server, &staging, Some(&SpiffeId::parse(PROD_WEB).unwrap()))
            .await
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("HTTP 403")
            && err.contains(&format!("the CSR asks for {PROD_WEB}"))
            && err.contains(&format!("proves {STAGING_WEB}")),
        "{err}"
    );
    let got = request_certificate_from(&server, &staging, None)
        .await
        .unwrap();
    assert_eq!(got.spiffe_id, STAGING_WEB);

    // An unknown token.
    let err = request_certificate_from(
        &server,
        &Credential::JoinToken("0123456789abcdef.nope".into()),
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("HTTP 401"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_csr_route_is_served_and_the_admin_listener_still_needs_a_certificate() {
    let s = Secure::start("::1", |_| {}).await;
    for (method, path) in [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/config_dump?env=prod"),
        ("GET", "/config?env=prod"),
        ("POST", "/config/apply"),
        ("DELETE", "/config/prod/Service/default/checkout"),
        ("GET", "/status/clusters"),
        ("GET", "/status/sync"),
        ("GET", "/status/config"),
        ("GET", "/status/shards"),
        ("POST", "/v1/tokens"),
        ("DELETE", "/v1/tokens/x"),
        ("GET", "/v1/ca"),
        ("POST", "/v1/ca/rotate"),
        ("POST", "/v1/ca/promote"),
        ("GET", "/"),
    ] {
        let (status, body) = s.csr_call(method, path, b"{}").await;
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("serves only POST /v1/certificates"),
            "{method} {path}: {body}"
        );
    }
    // The same paths on the admin listener, without a certificate: refused at the
    // handshake (TLS 1.3 may report it at the first read, as an error either way).
    for path in ["/healthz", "/config_dump?env=prod", "/v1/certificates"] {
        let r = http_client::request_with(
            &s.hub.hub.admin_addr.to_string(),
            Some(&s.anonymous()),
            "GET",
            path,
            b"",
        )
        .await;
        assert!(
            r.is_err(),
            "the admin listener answered {path} without a certificate: {r:?}"
        );
    }
    // The operator still reaches it.
    let (status, _) = http_client::request_with(
        &s.hub.hub.admin_addr.to_string(),
        Some(&s.operator),
        "GET",
        "/healthz",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
}

/// Sends the head of a POST whose body never completes, on its own TLS
/// connection: the request holds its slot until the connection is used again.
async fn hold_a_request(s: &Secure) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut conn = s.anonymous().connect(&s.csr_addr()).await.unwrap();
    conn.write_all(
        format!(
            "POST /v1/certificates HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{",
            s.csr_addr()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    conn.flush().await.unwrap();
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_caller_is_bounded_in_body_csr_size_and_concurrent_requests() {
    let s = Secure::start("127.0.0.1", |c| {
        c.identity.csr = CsrListenerConfig {
            addrs: c.identity.csr.addrs.clone(),
            max_body_bytes: 4096,
            max_csr_bytes: 1024,
            max_concurrent: 1,
            ..CsrListenerConfig::default()
        }
    })
    .await;
    // A body past --csr-max-body-bytes.
    let big =
        serde_json::to_vec(&serde_json::json!({"csr": "x".repeat(5000), "join_token": "a.b"}))
            .unwrap();
    let (status, body) = s.csr_call("POST", "/v1/certificates", &big).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("--csr-max-body-bytes"),
        "{body}"
    );
    // A CSR past --csr-max-csr-bytes in a body within its bound.
    let fat =
        serde_json::to_vec(&serde_json::json!({"csr": "x".repeat(2000), "join_token": "a.b"}))
            .unwrap();
    let (status, body) = s.csr_call("POST", "/v1/certificates", &fat).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("2000 bytes")
            && body["error"]
                .as_str()
                .unwrap()
                .contains("--csr-max-csr-bytes"),
        "{body}"
    );

    // One request in progress (its body unfinished) takes the only slot: the next
    // is refused at once with 503, not queued.
    let mut held = hold_a_request(&s).await;
    let no_credential = serde_json::to_vec(&serde_json::json!({"csr": "x"})).unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (status, body) = s.csr_call("POST", "/v1/certificates", &no_credential).await;
        if status == 503 {
            assert!(
                body["error"]
                    .as_str()
                    .unwrap()
                    .contains("--csr-max-concurrent"),
                "{body}"
            );
            break;
        }
        // Until the held request has been admitted, this one is served (400).
        assert_eq!(status, 400, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "never refused with 503"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Finish the held request (99 more bytes, not JSON): it is answered 400 and
    // frees its slot, so the next request is served again.
    held.write_all(&[b' '; 99]).await.unwrap();
    held.flush().await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).contains("expected {") {
        let n = tokio::time::timeout(TIMEOUT, held.read(&mut buf))
            .await
            .expect("the held request is answered")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let (status, body) = s.csr_call("POST", "/v1/certificates", &no_credential).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insecure_hub_serves_the_csr_listener_in_plaintext_on_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.yaml"), mesh_config()).unwrap();
    let mut cfg = HubConfig::local(vec![dir.path().to_path_buf()]);
    cfg.identity.csr.addrs = vec!["[::]:0".parse().unwrap()];
    let err = format!("{:#}", Hub::start(cfg).await.unwrap_err());
    assert!(
        err.contains("--insecure") && err.contains("--csr-addr") && err.contains("[::]:0"),
        "{err}"
    );

    let h = TestHub::start_with(&[("m.yaml", mesh_config())], |c| {
        c.identity.csr.addrs = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()]
    })
    .await;
    assert_eq!(h.hub.csr_addrs.len(), 2);
    for addr in &h.hub.csr_addrs {
        let (status, _) = http_client::request(&addr.to_string(), "GET", "/status/clusters", b"")
            .await
            .unwrap();
        assert_eq!(status, 404, "{addr}");
        // A plaintext hub's CSR listener still demands a credential.
        let (status, body) = http_client::request(
            &addr.to_string(),
            "POST",
            "/v1/certificates",
            br#"{"csr": "x"}"#,
        )
        .await
        .unwrap();
        assert_eq!(status, 400, "{addr}: {}", String::from_utf8_lossy(&body));
    }
}

/// A Kubernetes workload: its service-account token, reviewed by the real
/// kube-apiserver of its cluster, buys its certificate over the CSR listener, which
/// it then uses on the mTLS xDS port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_token_buys_a_first_certificate_over_the_csr_listener() {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
    use kube::Api;
    use kube::api::PostParams;

    let kube = kube_env::KubeEnv::start();
    let kc = kube::config::Kubeconfig::read_from(&kube.kubeconfig).unwrap();
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let pp = PostParams::default();
    let ns: Namespace = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "shop", "labels": {"tributary.io/env": "prod"}}}),
    )
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&pp, &ns)
        .await
        .unwrap();
    let sa: ServiceAccount = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "web", "namespace": "shop"}}),
    )
    .unwrap();
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), "shop");
    accounts.create(&pp, &sa).await.unwrap();
    let answer: TokenRequest = accounts
        .create_subresource(
            "token",
            "web",
            &pp,
            &TokenRequest {
                spec: TokenRequestSpec {
                    expiration_seconds: Some(3600),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let token = answer.status.unwrap().token;

    let kubeconfig = kube.kubeconfig.clone();
    let s = Secure::start("::1", move |c| {
        c.identity.review_clusters = vec![ReviewCluster {
            id: "east-1".into(),
            kubeconfig,
            default_env: None,
            audiences: vec![],
        }]
    })
    .await;
    let token_file = s.files.path().join("sa-token");
    std::fs::write(&token_file, &token).unwrap();
    let credential = Credential::Kubernetes {
        cluster: "east-1".into(),
        token_file: token_file.clone(),
    };
    let got = request_certificate_from(&s.csr_server(), &credential, None)
        .await
        .unwrap();
    assert_eq!(got.spiffe_id, PROD_WEB);
    let dir = s.files.path().join("sa-web");
    write_atomically(&dir, &got).unwrap();
    let tls = ClientTls::load(
        &TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
        },
        TD,
        tls::ALPN_GRPC,
    )
    .unwrap();
    assert_eq!(
        cds_names(s.hub.hub.xds_addr, &tls).await.unwrap(),
        sorted(vec![
            "PassthroughCluster".to_string(),
            "outbound|8080|v1|checkout.prod".to_string(),
            "outbound|8080||checkout.prod".to_string(),
        ])
    );
    // A token the API server does not authenticate is refused with its reason.
    std::fs::write(&token_file, "not-a-token").unwrap();
    let err = request_certificate_from(&s.csr_server(), &credential, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("HTTP 401"), "{err}");
}

/// `tributary cert request` (the real binary) with only the CA bundle and a join
/// token: over the CSR listener; the files it writes serve on the mTLS xDS port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cert_request_command_uses_the_csr_listener_with_the_ca_bundle() {
    let s = Secure::start("::1", |_| {}).await;
    let token = s.token(PROD_WEB, "1h").await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let out = s.files.path().join("cli");
    let run = |server: String, ca: Option<PathBuf>| {
        let (out, token) = (out.clone(), token.clone());
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tributary"));
            cmd.args(["cert", "request", "--server", &server, "--token", &token])
                .arg("--out")
                .arg(&out)
                .env("RUST_LOG", "off");
            if let Some(ca) = ca {
                cmd.arg("--ca").arg(ca);
            }
            let o = cmd.output().expect("running tributary");
            (
                o.status.success(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
    };
    // https:// without the bundle is refused before anything is sent.
    let (ok, err) = run(format!("https://{}", s.csr_addr()), None)
        .await
        .unwrap();
    assert!(!ok && err.contains("--ca"), "{err}");
    let (ok, err) = run(format!("https://{}", s.csr_addr()), Some(s.bundle.clone()))
        .await
        .unwrap();
    assert!(ok, "{err}");
    assert!(err.contains(PROD_WEB), "{err}");
    let tls = ClientTls::load(
        &TlsFiles {
            cert: out.join("cert.pem"),
            key: out.join("key.pem"),
            ca: out.join("ca.pem"),
        },
        TD,
        tls::ALPN_GRPC,
    )
    .unwrap();
    assert_eq!(
        cds_names(s.hub.hub.xds_addr, &tls).await.unwrap().len(),
        3,
        "prod's clusters"
    );
}

/// A TLS server presenting the certificate of `files` (no client certificate asked
/// for), standing in for whatever a CSR client was pointed at: it records what the
/// one client sends (until the join token's secret is in it, or the connection
/// ends), answers 503 and closes. Returns its address and what it received.
async fn recording_server(
    files: TlsFiles,
    secret: &'static str,
) -> (SocketAddr, tokio::sync::oneshot::Receiver<Vec<u8>>) {
    let config = tls::server_auth_only_config(&files, tls::ALPN_HTTP1).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        if let Ok(mut conn) = acceptor.accept(tcp).await {
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains(secret) {
                match conn.read(&mut buf).await {
                    Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            let _ = conn
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
            let _ = conn.shutdown().await;
        }
        let _ = tx.send(got);
    });
    (addr, rx)
}

/// The CSR client sends its credential to a hub only: a router's certificate (of
/// the same CA and trust domain: a compromised router, or a client pointed at one)
/// is refused at the handshake, and so is a hub whose certificate a CRL of the
/// bundle file revokes; the token never leaves the client. A valid hub is sent it.
/// Before, any hub or router certificate was accepted and CRLs were not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_csr_client_sends_its_credential_only_to_a_hub_that_is_not_revoked() {
    const SECRET: &str = "s3cr3t-of-the-join-token";
    let store: SharedStore = Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap());
    let ca = Ca::open(store, CaConfig::new(TD)).await.unwrap();
    let files = tempfile::tempdir().unwrap();
    let issue =
        async |name: &str, identity: Identity| issue_files(&ca, files.path(), name, identity).await;
    let hub = |name: &str| Identity::Hub {
        replica: name.into(),
    };
    // A hub certificate of the mesh intermediate, which is then revoked (rotated
    // with no overlap): its serial is in the root's CRL.
    let revoked_hub = issue("revoked-hub", hub("old")).await;
    ca.rotate_intermediate(&Signer::Mesh, Duration::ZERO)
        .await
        .unwrap();
    let router = issue(
        "router",
        Identity::Router {
            name: "edge".into(),
        },
    )
    .await;
    let good_hub = issue("hub", hub("a")).await;
    // What `tributary cert request --ca` is given: the roots, then every CRL.
    let bundle = files.path().join("bundle.pem");
    std::fs::write(&bundle, ca.trust_file_pem_at(SystemTime::now())).unwrap();
    let credential = Credential::JoinToken(format!("tok3n.{SECRET}"));

    for (what, server_files, refusal) in [
        ("a router", router, "not a hub"),
        ("a revoked hub", revoked_hub, "Revoked"),
    ] {
        let (addr, received) = recording_server(server_files, SECRET).await;
        let server = CsrServer::new(&format!("https://{addr}"), Some(bundle.clone()), TD).unwrap();
        let err = format!(
            "{:#}",
            request_certificate_from(&server, &credential, None)
                .await
                .expect_err(what)
        );
        assert!(err.contains(refusal), "{what}: {err}");
        let received = tokio::time::timeout(TIMEOUT, received)
            .await
            .unwrap()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&received).contains(SECRET),
            "{what} was sent the join token"
        );
    }
    // A hub of the trust domain, not revoked, is sent the request (and its 503 is
    // the client's error).
    let (addr, received) = recording_server(good_hub, SECRET).await;
    let server = CsrServer::new(&format!("https://{addr}"), Some(bundle.clone()), TD).unwrap();
    let err = request_certificate_from(&server, &credential, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("HTTP 503"), "{err}");
    let received = tokio::time::timeout(TIMEOUT, received)
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&received).contains(SECRET));
}

/// Sends one certificate request without a credential on `conn` (keep-alive) and
/// reads the answer: its status line and body, or `None` when the listener closes
/// the connection first.
async fn ask_without_credential<S>(conn: &mut S) -> Option<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let body = r#"{"csr": "x"}"#;
    let head = format!(
        "POST /v1/certificates HTTP/1.1\r\nhost: hub\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.ok()?;
    conn.flush().await.ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return Some(format!("{} {body}", head.lines().next().unwrap()));
            }
        }
        match tokio::time::timeout(TIMEOUT, conn.read(&mut buf))
            .await
            .expect("an answer or the connection closed, within the timeout")
        {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

/// A slow-loris caller (a request head that never completes) is closed after
/// `--csr-header-read-timeout`, and so is one that opens a connection and sends
/// nothing; a caller that sends its request in time is answered. Before, the
/// listener (axum's server, without a timer) held such connections forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_does_not_send_its_request_head_in_time_is_closed() {
    let timeout = Duration::from_millis(500);
    let s = Secure::start("127.0.0.1", |c| {
        c.identity.csr.header_read_timeout = timeout
    })
    .await;
    // Half a request head, then nothing.
    let started = tokio::time::Instant::now();
    let mut slow = s.anonymous().connect(&s.csr_addr()).await.unwrap();
    slow.write_all(b"POST /v1/certificates HTTP/1.1\r\nhost: hub\r\ncontent-type: appl")
        .await
        .unwrap();
    slow.flush().await.unwrap();
    // Nothing at all.
    let mut silent = s.anonymous().connect(&s.csr_addr()).await.unwrap();
    let mut buf = [0u8; 1024];
    for (what, conn) in [("half a head", &mut slow), ("nothing", &mut silent)] {
        let read = tokio::time::timeout(TIMEOUT, conn.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!("a connection that sent {what} is still open after {TIMEOUT:?}")
            });
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "a connection that sent {what} got {read:?}"
        );
    }
    assert!(
        started.elapsed() >= timeout,
        "closed before the timeout: {:?}",
        started.elapsed()
    );
    // A whole request in time is served.
    let mut conn = s.anonymous().connect(&s.csr_addr()).await.unwrap();
    let answer = ask_without_credential(&mut conn).await.expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

/// With `--csr-max-connections 2`, two open connections (served, kept alive) are
/// all there is: a third is closed without an answer; once one of the two ends, a
/// new connection is served again. Before, there was no bound on connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed() {
    let s = Secure::start("127.0.0.1", |c| {
        c.identity.csr.max_connections = 2;
        c.identity.csr.header_read_timeout = Duration::from_secs(600);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = s.anonymous().connect(&s.csr_addr()).await.unwrap();
        let answer = ask_without_credential(&mut conn).await.expect("an answer");
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        held.push(conn);
    }
    let mut third = s.anonymous().connect(&s.csr_addr()).await.unwrap();
    assert_eq!(ask_without_credential(&mut third).await, None);
    // The held ones are still served.
    let answer = ask_without_credential(&mut held[0])
        .await
        .expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // One ends: its slot is free once the listener has seen it close.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let mut conn = s.anonymous().connect(&s.csr_addr()).await.unwrap();
        if let Some(answer) = ask_without_credential(&mut conn).await {
            assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no connection served after one of the two closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
