//! SDS and mesh mTLS against an in-process hub (docs/security.md, "SDS and mesh
//! mTLS"): secrets per identity over SotW and Delta, issued once per identity,
//! renewed at half-life and pushed to every stream of the identity; never another
//! identity's secret; no key material in config dumps; and the transport sockets
//! of generated clusters and inbound listeners.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use prost::Message;
use tonic::Code;
use tributary_controlplane::app::MeshIdentity;
use tributary_controlplane::identity::test_issuer::TestIssuer;
use tributary_controlplane::identity::{CertificateIssuer, IssuedCertificate, SpiffeId};
use tributary_proto::envoy::envoy::config::cluster::v3::Cluster;
use tributary_proto::envoy::envoy::config::listener::v3::Listener;
use tributary_proto::envoy::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, Secret, UpstreamTlsContext, common_tls_context::ValidationContextType,
    secret,
};
use tributary_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryResponse,
};
use tributary_proto::envoy::envoy::r#type::matcher::v3::string_matcher::MatchPattern;

const SDS: &str = tributary_proto::type_url::SECRET;
const TD: &str = "td.test";

/// A [`TestIssuer`] that records every identity it issues for.
#[derive(Debug)]
struct CountingIssuer {
    inner: TestIssuer,
    issued: Mutex<Vec<String>>,
}

impl CountingIssuer {
    fn new(lifetime: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: TestIssuer::new("sds test root", lifetime).unwrap(),
            issued: Mutex::default(),
        })
    }

    fn count(&self, id: &str) -> usize {
        self.issued
            .lock()
            .unwrap()
            .iter()
            .filter(|i| *i == id)
            .count()
    }
}

impl CertificateIssuer for CountingIssuer {
    fn issue(&self, id: &SpiffeId) -> anyhow::Result<IssuedCertificate> {
        self.issued.lock().unwrap().push(id.to_string());
        self.inner.issue(id)
    }
    fn trust_bundle_pem(&self) -> String {
        self.inner.trust_bundle_pem()
    }
}

fn mesh_docs() -> Vec<(&'static str, String)> {
    vec![
        ("services.yaml", docs(&[service("a", "prod", 8080)])),
        ("endpoints.yaml", endpoints("a", "prod", &["10.0.0.1"], 80)),
    ]
}

async fn hub_with(issuer: Arc<CountingIssuer>, files: &[(&str, String)]) -> TestHub {
    TestHub::start_with(files, move |cfg| {
        cfg.mesh_identity = Some(MeshIdentity {
            trust_domain: TD.into(),
            issuer,
        })
    })
    .await
}

fn workload(id: &str, ns: &str, sa: &str) -> tributary_proto::envoy::envoy::config::core::v3::Node {
    node_with(
        id,
        "prod",
        &[
            ("tributary.io/namespace", ns),
            ("tributary.io/service-account", sa),
        ],
    )
}

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/env/prod/ns/{ns}/sa/{sa}")
}

/// What a stream was sent: each secret by name.
#[derive(Debug, Default)]
struct Secrets {
    /// URI SANs of the `default` certificate, its chain and key.
    default_uris: Vec<String>,
    default_chain: String,
    default_key: String,
    root: String,
    names: Vec<String>,
}

fn uris_of(pem: &str) -> Vec<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
    let cert = pem.parse_x509().expect("a certificate");
    let san = cert
        .subject_alternative_name()
        .expect("valid extensions")
        .expect("a SAN");
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

fn read_secrets<'a>(anys: impl Iterator<Item = &'a [u8]>) -> Secrets {
    let mut out = Secrets::default();
    let inline = |d: &Option<tributary_proto::envoy::envoy::config::core::v3::DataSource>| {
        use tributary_proto::envoy::envoy::config::core::v3::data_source::Specifier;
        match d.as_ref().and_then(|d| d.specifier.as_ref()) {
            Some(Specifier::InlineString(s)) => s.clone(),
            other => panic!("expected an inline string, got {other:?}"),
        }
    };
    for bytes in anys {
        let s = Secret::decode(bytes).unwrap();
        out.names.push(s.name.clone());
        match s.r#type {
            Some(secret::Type::TlsCertificate(c)) => {
                assert_eq!(s.name, "default");
                out.default_chain = inline(&c.certificate_chain);
                out.default_key = inline(&c.private_key);
                out.default_uris = uris_of(&out.default_chain);
            }
            Some(secret::Type::ValidationContext(v)) => {
                assert_eq!(s.name, "ROOTCA");
                out.root = inline(&v.trusted_ca);
            }
            other => panic!("unexpected secret {other:?}"),
        }
    }
    out.names.sort();
    out
}

fn sotw_secrets(r: &DiscoveryResponse) -> Secrets {
    assert_eq!(r.type_url, SDS);
    read_secrets(r.resources.iter().map(|a| a.value.as_slice()))
}

fn delta_secrets(r: &DeltaDiscoveryResponse) -> Secrets {
    assert_eq!(r.type_url, SDS);
    read_secrets(
        r.resources
            .iter()
            .map(|res| res.resource.as_ref().unwrap().value.as_slice()),
    )
}

#[tokio::test]
async fn sotw_streams_get_their_own_identity_issued_once_per_identity() {
    let issuer = CountingIssuer::new(Duration::from_secs(24 * 3600));
    let hub = hub_with(issuer.clone(), &mesh_docs()).await;

    // Two proxies of one identity, one of another.
    let mut a1 = Sotw::open(&hub).await;
    a1.request(
        Some(workload("a1", "shop", "checkout")),
        SDS,
        &["default", "ROOTCA"],
        None,
    )
    .await;
    let r_a1 = a1.recv().await;
    let s_a1 = sotw_secrets(&r_a1);
    assert_eq!(s_a1.names, ["ROOTCA", "default"]);
    assert_eq!(s_a1.default_uris, [spiffe("shop", "checkout")]);
    assert_eq!(s_a1.root, issuer.trust_bundle_pem());
    assert!(s_a1.default_key.contains("PRIVATE KEY"));

    let mut a2 = Sotw::open(&hub).await;
    a2.request(
        Some(workload("a2", "shop", "checkout")),
        SDS,
        &["default", "ROOTCA"],
        None,
    )
    .await;
    let s_a2 = sotw_secrets(&a2.recv().await);
    assert_eq!(
        s_a2.default_chain, s_a1.default_chain,
        "proxies of one identity share its certificate"
    );
    assert_eq!(issuer.count(&spiffe("shop", "checkout")), 1);

    let mut b = Sotw::open(&hub).await;
    b.request(
        Some(workload("b", "shop", "payments")),
        SDS,
        &["default", "ROOTCA"],
        None,
    )
    .await;
    let s_b = sotw_secrets(&b.recv().await);
    assert_eq!(s_b.default_uris, [spiffe("shop", "payments")]);
    assert_ne!(s_b.default_key, s_a1.default_key);
    assert_eq!(issuer.count(&spiffe("shop", "payments")), 1);

    // The first stream ACKs; a new identity's issuance sends it nothing.
    a1.ack(&r_a1, &["default", "ROOTCA"]).await;
    let quiet = tokio::time::timeout(Duration::from_millis(300), a1.rx.message()).await;
    assert!(quiet.is_err(), "no response after the ACK: {quiet:?}");
}

#[tokio::test]
async fn delta_streams_get_only_their_own_identity_and_gateways_theirs() {
    let issuer = CountingIssuer::new(Duration::from_secs(24 * 3600));
    let hub = hub_with(issuer.clone(), &mesh_docs()).await;

    let mut w = Delta::open(&hub).await;
    w.subscribe(
        Some(workload("w", "shop", "checkout")),
        SDS,
        &["default", "ROOTCA"],
    )
    .await;
    let s_w = delta_secrets(&w.recv().await);
    assert_eq!(s_w.names, ["ROOTCA", "default"]);
    assert_eq!(s_w.default_uris, [spiffe("shop", "checkout")]);

    // A wildcard (no names) selects the identity's own secrets, nothing more.
    let mut g = Delta::open(&hub).await;
    g.subscribe(
        Some(node_with("g", "prod", &[("tributary.io/gateway", "edge")])),
        SDS,
        &[],
    )
    .await;
    let s_g = delta_secrets(&g.recv().await);
    assert_eq!(s_g.names, ["ROOTCA", "default"]);
    assert_eq!(
        s_g.default_uris,
        [format!("spiffe://{TD}/env/prod/gateway/edge")]
    );
    assert_ne!(s_g.default_key, s_w.default_key);
}

#[tokio::test]
async fn reissue_at_half_life_pushes_the_new_certificate_to_every_stream_of_the_identity() {
    // Leaves live 2 s: renewed after 1 s.
    let issuer = CountingIssuer::new(Duration::from_secs(2));
    let hub = hub_with(issuer.clone(), &mesh_docs()).await;
    let id = spiffe("shop", "checkout");

    let mut s = Sotw::open(&hub).await;
    s.request(
        Some(workload("s", "shop", "checkout")),
        SDS,
        &["default", "ROOTCA"],
        None,
    )
    .await;
    let first = s.recv().await;
    let before = sotw_secrets(&first);
    let mut d = Delta::open(&hub).await;
    d.subscribe(
        Some(workload("d", "shop", "checkout")),
        SDS,
        &["default", "ROOTCA"],
    )
    .await;
    let d_first = d.recv().await;
    assert_eq!(delta_secrets(&d_first).default_chain, before.default_chain);
    s.ack(&first, &["default", "ROOTCA"]).await;
    d.ack(&d_first).await;

    // The renewal: both streams are sent the same new certificate, and only the
    // secret that changed (SotW SDS, like RDS and EDS, is not a full set).
    let next = s.recv().await;
    let after = sotw_secrets(&next);
    assert_eq!(after.names, ["default"], "ROOTCA did not change");
    assert_ne!(after.default_chain, before.default_chain);
    assert_eq!(after.default_uris, std::slice::from_ref(&id));
    let d_next = d.recv().await;
    let d_after = delta_secrets(&d_next);
    assert_eq!(d_after.names, ["default"], "ROOTCA did not change");
    assert_eq!(d_after.default_chain, after.default_chain);
    assert_eq!(
        issuer.count(&id),
        2,
        "one issuance per identity per renewal, not per stream"
    );
}

#[tokio::test]
async fn a_node_without_identity_gets_no_secret_and_a_malformed_one_is_refused() {
    let issuer = CountingIssuer::new(Duration::from_secs(24 * 3600));
    let hub = hub_with(issuer.clone(), &mesh_docs()).await;

    // No namespace / service account: nothing is issued; Delta says it does not exist.
    let mut d = Delta::open(&hub).await;
    d.subscribe(Some(node("anon", "prod")), SDS, &["default"])
        .await;
    let r = d.recv().await;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, ["default"]);
    assert!(issuer.issued.lock().unwrap().is_empty());

    // A service account that cannot be a SPIFFE path segment: a clear refusal.
    let mut bad = Delta::open(&hub).await;
    bad.subscribe(Some(workload("bad", "shop", "a/b")), SDS, &["default"])
        .await;
    let err = bad.rx.message().await.expect_err("an error status");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("tributary.io/service-account") && err.message().contains("a/b"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn config_dump_never_holds_key_material() {
    let issuer = CountingIssuer::new(Duration::from_secs(24 * 3600));
    let hub = hub_with(issuer.clone(), &mesh_docs()).await;
    let mut s = Sotw::open(&hub).await;
    s.request(
        Some(workload("s", "shop", "checkout")),
        SDS,
        &["default", "ROOTCA"],
        None,
    )
    .await;
    let held = sotw_secrets(&s.recv().await);
    assert!(held.default_key.contains("PRIVATE KEY"));

    let (status, body) = tributary_controlplane::http_client::request(
        &hub.hub.admin_addr.to_string(),
        "GET",
        "/config_dump?env=prod",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let body = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        body.contains("outbound|8080||a.prod"),
        "a real dump: {body}"
    );
    let key_body: String = held
        .default_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(!body.contains("PRIVATE KEY"), "{body}");
    assert!(!body.contains(&key_body[..32]), "{body}");
    assert!(!body.contains("BEGIN CERTIFICATE"), "{body}");
}

// ---- generated transport sockets -------------------------------------------------

fn sidecar_scope(name: &str, inbound_port: u16, target_port: u16) -> String {
    format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Sidecar\nmetadata: {{name: {name}, environment: prod}}\nspec:\n  dependencies: [{{namespace: default}}]\n  inbound: [{{port: {inbound_port}, targetPort: {target_port}}}]\n"
    )
}

fn environment(mtls: bool) -> String {
    format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Environment\nmetadata: {{name: prod}}\nspec:\n  zones: [az1]\n  mtls: {mtls}\n"
    )
}

/// The scoped sidecar's clusters and listeners, decoded.
async fn sidecar_config(hub: &TestHub, scope: &str) -> (Vec<Cluster>, Vec<Listener>) {
    let mut s = Sotw::open(hub).await;
    let n = node_with("p", "prod", &[("tributary.io/sidecar", scope)]);
    s.request(Some(n), CDS, &[], None).await;
    let cds = s.recv().await;
    s.ack(&cds, &[]).await;
    s.request(None, LDS, &[], None).await;
    let lds = s.recv().await;
    let clusters = cds
        .resources
        .iter()
        .map(|a| Cluster::decode(a.value.as_slice()).unwrap())
        .collect();
    let listeners = lds
        .resources
        .iter()
        .map(|a| Listener::decode(a.value.as_slice()).unwrap())
        .collect();
    (clusters, listeners)
}

fn san_prefix(
    common: &tributary_proto::envoy::envoy::extensions::transport_sockets::tls::v3::CommonTlsContext,
) -> String {
    let Some(ValidationContextType::CombinedValidationContext(c)) = &common.validation_context_type
    else {
        panic!("a combined validation context: {common:?}")
    };
    assert_eq!(
        c.validation_context_sds_secret_config
            .as_ref()
            .unwrap()
            .name,
        "ROOTCA"
    );
    let m = &c
        .default_validation_context
        .as_ref()
        .unwrap()
        .match_typed_subject_alt_names;
    assert_eq!(m.len(), 1);
    match m[0]
        .matcher
        .as_ref()
        .unwrap()
        .match_pattern
        .as_ref()
        .unwrap()
    {
        MatchPattern::Prefix(p) => p.clone(),
        other => panic!("a prefix matcher: {other:?}"),
    }
}

#[tokio::test]
async fn outbound_clusters_and_inbound_listeners_carry_sds_mtls() {
    let issuer = CountingIssuer::new(Duration::from_secs(24 * 3600));
    let mut files = mesh_docs();
    files.push(("sidecar.yaml", sidecar_scope("front", 15006, 8080)));
    let hub = hub_with(issuer, &files).await;
    let (clusters, listeners) = sidecar_config(&hub, "front").await;

    let outbound = clusters
        .iter()
        .find(|c| c.name == "outbound|8080||a.prod")
        .expect("the outbound cluster");
    let ts = outbound
        .transport_socket
        .as_ref()
        .expect("a transport socket");
    let Some(
        tributary_proto::envoy::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
            any,
        ),
    ) = &ts.config_type
    else {
        panic!()
    };
    let up = UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
    let common = up.common_tls_context.unwrap();
    assert_eq!(common.tls_certificate_sds_secret_configs[0].name, "default");
    assert!(
        common.tls_certificate_sds_secret_configs[0]
            .sds_config
            .as_ref()
            .is_some_and(|c| c.config_source_specifier.is_some()),
        "from ADS"
    );
    assert_eq!(
        san_prefix(&common),
        format!("spiffe://{TD}/env/prod/ns/default/")
    );

    let inbound = clusters
        .iter()
        .find(|c| c.name == "inbound|15006|front")
        .expect("the inbound cluster, part of the scope's wildcard");
    assert!(
        inbound.transport_socket.is_none(),
        "plaintext to the local app"
    );
    let listener = listeners
        .iter()
        .find(|l| l.name == "sidecar|front|inbound|15006")
        .expect("the inbound listener");
    let ts = listener.filter_chains[0].transport_socket.as_ref().unwrap();
    let Some(
        tributary_proto::envoy::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
            any,
        ),
    ) = &ts.config_type
    else {
        panic!()
    };
    let down = DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
    assert_eq!(down.require_client_certificate.map(|b| b.value), Some(true));
    assert_eq!(
        san_prefix(&down.common_tls_context.unwrap()),
        format!("spiffe://{TD}/env/prod/")
    );
}

#[tokio::test]
async fn an_environment_turns_mtls_off_and_on_again() {
    let issuer = CountingIssuer::new(Duration::from_secs(24 * 3600));
    let mut files = mesh_docs();
    files.push(("sidecar.yaml", sidecar_scope("front", 15006, 8080)));
    files.push(("env.yaml", environment(false)));
    let hub = hub_with(issuer, &files).await;
    let (clusters, listeners) = sidecar_config(&hub, "front").await;
    assert!(clusters.iter().all(|c| c.transport_socket.is_none()));
    let inbound = listeners
        .iter()
        .find(|l| l.name == "sidecar|front|inbound|15006")
        .expect("inbound listeners exist without mTLS too");
    assert!(inbound.filter_chains[0].transport_socket.is_none());

    hub.write_and_wait("prod", "env.yaml", environment(true))
        .await;
    let (clusters, listeners) = sidecar_config(&hub, "front").await;
    let outbound = clusters
        .iter()
        .find(|c| c.name == "outbound|8080||a.prod")
        .unwrap();
    assert!(
        outbound.transport_socket.is_some(),
        "every cluster is regenerated"
    );
    let inbound = listeners
        .iter()
        .find(|l| l.name == "sidecar|front|inbound|15006")
        .unwrap();
    assert!(inbound.filter_chains[0].transport_socket.is_some());
}

#[tokio::test]
async fn without_an_issuer_everything_stays_plaintext() {
    let mut files = mesh_docs();
    files.push(("sidecar.yaml", sidecar_scope("front", 15006, 8080)));
    let hub = TestHub::start(&files).await;
    let (clusters, listeners) = sidecar_config(&hub, "front").await;
    assert!(clusters.iter().all(|c| c.transport_socket.is_none()));
    assert!(
        listeners
            .iter()
            .all(|l| l.filter_chains.iter().all(|f| f.transport_socket.is_none()))
    );
}

// ---- gateways: operator-supplied certificates --------------------------------------

/// A self-signed certificate for `*.example.test` and its key, as PEM.
fn wildcard_certificate() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["*.example.test".to_string()]).unwrap();
    (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

fn credential_doc(name: &str, cert: &str, key: &str) -> String {
    let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Credential\nmetadata: {{name: {name}, environment: prod}}\nspec:\n  certificate: |\n{}  privateKey: |\n{}",
        indent(cert),
        indent(key)
    )
}

fn gateway_doc(name: &str, credential: Option<&str>) -> String {
    let tls = credential.map_or(String::new(), |c| format!(", tls: {{credential: {c}}}"));
    format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Gateway\nmetadata: {{name: {name}, environment: prod}}\nspec:\n  listeners: [{{name: https, port: 8443{tls}}}]\n"
    )
}

#[tokio::test]
async fn a_gateway_serves_its_credential_and_nobody_else_gets_it() {
    let (cert, key) = wildcard_certificate();
    let mut files = mesh_docs();
    files.push(("credential.yaml", credential_doc("wild", &cert, &key)));
    files.push((
        "gateways.yaml",
        docs(&[
            gateway_doc("edge", Some("wild")),
            gateway_doc("other", None),
        ]),
    ));
    // No issuer: credentials do not need the mesh CA.
    let hub = TestHub::start(&files).await;
    const SECRET: &str = "credential/default/wild";

    // The gateway's listener terminates TLS with the credential, from SDS.
    let mut g = Delta::open(&hub).await;
    let edge = node_with("edge", "prod", &[("tributary.io/gateway", "edge")]);
    g.subscribe(Some(edge), LDS, &[]).await;
    let lds = g.recv().await;
    let l = Listener::decode(lds.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    assert_eq!(l.name, "gateway|edge|https");
    let ts = l.filter_chains[0].transport_socket.as_ref().expect("TLS");
    let Some(
        tributary_proto::envoy::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
            any,
        ),
    ) = &ts.config_type
    else {
        panic!()
    };
    let down = DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
    let common = down.common_tls_context.unwrap();
    assert_eq!(common.tls_certificate_sds_secret_configs[0].name, SECRET);
    assert!(
        common.validation_context_type.is_none(),
        "clients are not asked for certificates"
    );
    g.ack(&lds).await;
    g.subscribe(None, SDS, &[SECRET]).await;
    let sds = g.recv().await;
    assert_eq!(delta_names(&sds), [SECRET]);
    let s = Secret::decode(sds.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    let Some(secret::Type::TlsCertificate(c)) = s.r#type else {
        panic!("{s:?}")
    };
    use tributary_proto::envoy::envoy::config::core::v3::data_source::Specifier;
    assert_eq!(
        c.private_key.and_then(|d| d.specifier),
        Some(Specifier::InlineString(key.clone()))
    );

    // A sidecar, and a gateway that does not serve it, asking for it by name: it
    // does not exist for them.
    for n in [
        node("sidecar", "prod"),
        node_with("other", "prod", &[("tributary.io/gateway", "other")]),
    ] {
        let mut d = Delta::open(&hub).await;
        d.subscribe(Some(n), SDS, &[SECRET]).await;
        let r = d.recv().await;
        assert!(r.resources.is_empty(), "{r:?}");
        assert_eq!(r.removed_resources, [SECRET]);
        let mut s = Sotw::open(&hub).await;
        s.request(
            Some(node_with("sotw", "prod", &[("tributary.io/sidecar", "x")])),
            SDS,
            &[SECRET],
            None,
        )
        .await;
        let quiet = tokio::time::timeout(Duration::from_millis(300), s.rx.message()).await;
        assert!(quiet.is_err(), "SotW leaves it out: {quiet:?}");
    }

    // The dump names it, never its content.
    let (status, body) = tributary_controlplane::http_client::request(
        &hub.hub.admin_addr.to_string(),
        "GET",
        "/config_dump?env=prod&type=SDS",
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let body = String::from_utf8(body.to_vec()).unwrap();
    assert!(body.contains(SECRET), "{body}");
    assert!(
        !body.contains("PRIVATE KEY") && !body.contains("CERTIFICATE"),
        "{body}"
    );
}

#[tokio::test]
async fn a_changed_credential_is_pushed_to_its_gateway() {
    let (cert, key) = wildcard_certificate();
    let mut files = mesh_docs();
    files.push(("credential.yaml", credential_doc("wild", &cert, &key)));
    files.push(("gateways.yaml", gateway_doc("edge", Some("wild"))));
    let hub = TestHub::start(&files).await;
    const SECRET: &str = "credential/default/wild";
    let mut s = Sotw::open(&hub).await;
    let edge = node_with("edge", "prod", &[("tributary.io/gateway", "edge")]);
    s.request(Some(edge), SDS, &[SECRET], None).await;
    let first = s.recv().await;
    assert_eq!(names_of_secrets(&first), [SECRET]);
    s.ack(&first, &[SECRET]).await;

    let (cert2, key2) = wildcard_certificate();
    hub.write_and_wait(
        "prod",
        "credential.yaml",
        credential_doc("wild", &cert2, &key2),
    )
    .await;
    let next = s.recv().await;
    let secret = Secret::decode(next.resources[0].value.as_slice()).unwrap();
    let Some(secret::Type::TlsCertificate(c)) = secret.r#type else {
        panic!()
    };
    use tributary_proto::envoy::envoy::config::core::v3::data_source::Specifier;
    assert_eq!(
        c.certificate_chain.and_then(|d| d.specifier),
        Some(Specifier::InlineString(cert2))
    );
}

fn names_of_secrets(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| Secret::decode(a.value.as_slice()).unwrap().name)
        .collect()
}

#[test]
fn credentials_are_validated_without_quoting_the_key() {
    use tributary_controlplane::config::parse_files;
    let (cert, key) = wildcard_certificate();
    let bad_key = "-----BEGIN CERTIFICATE-----\nTUlJQg==\n-----END CERTIFICATE-----\n";
    let text = docs(&[
        credential_doc("wild", &cert, bad_key),
        gateway_doc("edge", Some("missing")),
    ]);
    let err = parse_files([("gw.yaml", text.as_str())])
        .unwrap_err()
        .to_string();
    assert!(err.contains("spec.privateKey"), "{err}");
    assert!(!err.contains("TUlJQg"), "the key is not quoted: {err}");
    assert!(
        err.contains("spec.listeners[0].tls.credential") && err.contains("\"missing\""),
        "{err}"
    );
    let ok = docs(&[
        credential_doc("wild", &cert, &key),
        gateway_doc("edge", Some("wild")),
    ]);
    let mesh = parse_files([("gw.yaml", ok.as_str())]).unwrap();
    let debug = format!("{mesh:?}");
    let key_line = key.lines().nth(1).unwrap();
    assert!(!debug.contains(key_line), "Debug never prints a key");
}

#[test]
fn inbound_ports_are_validated() {
    use tributary_controlplane::config::parse_files;
    let text = "apiVersion: tributary.io/v1alpha1\nkind: Sidecar\nmetadata: {name: s, environment: prod}\nspec:\n  dependencies: [{namespace: default}]\n  inbound:\n  - {port: 15001}\n  - {port: 9080, targetPort: 0}\n  - {port: 9080, bind: nowhere}\n";
    let err = parse_files([("s.yaml", text)]).unwrap_err().to_string();
    assert!(
        err.contains("spec.inbound[0].port") && err.contains("virtualOutbound"),
        "{err}"
    );
    assert!(err.contains("spec.inbound[1].targetPort"), "{err}");
    assert!(err.contains("spec.inbound[2].bind"), "{err}");
}

/// A root rotation reaches connected proxies at each phase, without waiting for the
/// half-life renewal: (1) the two-root bundle while certificates still come from the
/// old root, (2) a certificate of the new root (the bundle still holds both), (3) the
/// bundle of the new root alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_phase_of_a_root_rotation_is_pushed_to_connected_proxies() {
    use tributary_controlplane::identity::verify::{certs_from_pem, verify_chain};
    let hub = TestHub::start_with(&mesh_docs(), |cfg| cfg.mesh_mtls = true).await;
    let ca = hub.hub.ca.clone();
    let mut s = Sotw::open(&hub).await;
    s.request(
        Some(workload("s", "shop", "checkout")),
        SDS,
        &["default", "ROOTCA"],
        None,
    )
    .await;
    // What the proxy holds: each response carries only the secrets that changed.
    let mut chain = String::new();
    let mut bundle = String::new();
    let next_until = async |s: &mut Sotw,
                            chain: &mut String,
                            bundle: &mut String,
                            done: &dyn Fn(&str, &str) -> bool| {
        while !done(chain, bundle) {
            let r = s.recv().await;
            let got = sotw_secrets(&r);
            if !got.default_chain.is_empty() {
                *chain = got.default_chain.clone();
            }
            if !got.root.is_empty() {
                *bundle = got.root.clone();
            }
            s.ack(&r, &["default", "ROOTCA"]).await;
        }
    };
    let roots = |pem: &str| certs_from_pem("bundle", pem).map(|c| c.len()).unwrap_or(0);
    next_until(&mut s, &mut chain, &mut bundle, &|c, b| {
        !c.is_empty() && !b.is_empty()
    })
    .await;
    let old_root = bundle.clone();
    let first_chain = chain.clone();
    assert_eq!(roots(&old_root), 1);

    // Phase 1: the two-root bundle is pushed; the certificate is still the old root's.
    let status = ca
        .rotate_root(Duration::from_secs(3600), Duration::from_secs(3600))
        .await
        .unwrap();
    let new_fp = status.incoming.unwrap().root;
    next_until(&mut s, &mut chain, &mut bundle, &|_, b| roots(b) == 2).await;
    let now = std::time::SystemTime::now();
    verify_chain(&old_root, &chain, now).expect("phase 1 still issues from the old root");

    // Phase 2: a certificate of the new root is pushed; the bundle keeps both.
    ca.promote_root().await.unwrap();
    let new_root_only = |c: &str| verify_chain(&old_root, c, now).is_err();
    next_until(&mut s, &mut chain, &mut bundle, &|c, _| new_root_only(c)).await;
    assert_eq!(roots(&bundle), 2);
    verify_chain(&bundle, &chain, now).unwrap();
    verify_chain(&bundle, &first_chain, now).expect("old-chain peers still verify");
    assert_eq!(ca.status().root, new_fp);

    // Phase 3: the old root leaves; the bundle pushed holds the new root alone.
    ca.finish_rotation().await.unwrap();
    next_until(&mut s, &mut chain, &mut bundle, &|_, b| roots(b) == 1).await;
    verify_chain(&bundle, &chain, now).unwrap();
    assert!(verify_chain(&bundle, &first_chain, now).is_err());
}
