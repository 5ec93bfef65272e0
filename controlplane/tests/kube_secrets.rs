//! Gateway credentials from a remote cluster's Kubernetes Secret, against a real
//! kube-apiserver and etcd (tests/kube/kubeenv.py): a TLS Secret created through the
//! API (a wildcard certificate issued by a test CA) is watched by the agent because the
//! hub asked for it, sent over the federation stream, checked by the hub and served
//! over SDS to the gateway; a rotation is pushed; a Secret outside the cluster's grant
//! is never asked for, and one sent anyway is refused; an invalid or deleted Secret
//! keeps the last good certificate served and is reported.

mod common;
#[path = "common/kube_env.rs"]
mod kube_env;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{Namespace, Secret as KubeSecret};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use kube_env::KubeEnv;
use prost::Message;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tributary_controlplane::agent::kube::KubeOptions;
use tributary_controlplane::agent::secrets::SecretWatch;
use tributary_controlplane::agent::{self, AgentConfig, ClusterState};
use tributary_controlplane::index::{ClusterStatus, SecretStatus};
use tributary_controlplane::metrics::{ClusterLabel, SecretLabel};
use tributary_controlplane::model::ObjectKey;
use tributary_proto::envoy::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use tributary_proto::federation::v1::federation_client::FederationClient;
use tributary_proto::federation::v1::{self as fed, agent_message, hub_message};

const SDS: &str = tributary_proto::type_url::SECRET;
const SERVED: &str = "credential/default/wild";
const OUTSIDE: &str = "credential/default/outside";
const CLUSTER: &str = "east-1";

fn config() -> String {
    docs(&[
        // east-1 may export namespace shop into prod: not namespace vault.
        format!(
            "apiVersion: tributary.io/v1alpha1\nkind: RemoteCluster\nmetadata: {{name: {CLUSTER}}}\nspec: {{environments: [prod], namespaces: [shop]}}\n"
        ),
        format!(
            "apiVersion: tributary.io/v1alpha1\nkind: Credential\nmetadata: {{name: wild, environment: prod}}\nspec:\n  kubernetesSecret: {{cluster: {CLUSTER}, namespace: shop, name: wild-tls}}\n"
        ),
        format!(
            "apiVersion: tributary.io/v1alpha1\nkind: Credential\nmetadata: {{name: outside, environment: prod}}\nspec:\n  kubernetesSecret: {{cluster: {CLUSTER}, namespace: vault, name: wild-tls}}\n"
        ),
        "apiVersion: tributary.io/v1alpha1\nkind: Gateway\nmetadata: {name: edge, environment: prod}\nspec:\n  listeners:\n  - {name: https, port: 8443, tls: {credential: wild}}\n  - {name: vault, port: 9443, tls: {credential: outside}}\n".to_string(),
    ])
}

/// A test CA issuing wildcard leaves.
struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl TestCa {
    fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }

    /// A leaf for `*.example.test` and its key, as PEM.
    fn wildcard(&self) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["*.example.test".to_string()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn tls_secret(name: &str, namespace: &str, chain: &str, key: &str, ca: &str) -> KubeSecret {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": chain, "tls.key": key, "ca.crt": ca},
    }))
    .unwrap()
}

/// The certificate chain of a `tls_certificate` secret.
fn chain_of(bytes: &[u8]) -> (String, String) {
    use tributary_proto::envoy::envoy::config::core::v3::data_source::Specifier;
    let s = Secret::decode(bytes).unwrap();
    let Some(secret::Type::TlsCertificate(c)) = s.r#type else {
        panic!("not a tls_certificate: {s:?}")
    };
    let text = |d: Option<tributary_proto::envoy::envoy::config::core::v3::DataSource>| match d
        .and_then(|d| d.specifier)
    {
        Some(Specifier::InlineString(s)) => s,
        other => panic!("expected an inline string, got {other:?}"),
    };
    (text(c.certificate_chain), text(c.private_key))
}

/// A gateway's SDS stream (Delta), subscribed to `names`.
struct Gateway {
    d: Delta,
    /// name → (version, chain, key) of what it holds.
    held: std::collections::HashMap<String, (String, String, String)>,
    /// Every name the hub ever sent a resource for.
    ever: std::collections::BTreeSet<String>,
}

impl Gateway {
    async fn open(addr: std::net::SocketAddr, names: &[&str]) -> Gateway {
        let d = Delta::open_addr(addr).await;
        let edge = node_with("edge-1", "prod", &[("tributary.io/gateway", "edge")]);
        d.subscribe(Some(edge), SDS, names).await;
        Gateway {
            d,
            held: Default::default(),
            ever: Default::default(),
        }
    }

    /// Receives and ACKs until `done` holds.
    async fn until(&mut self, what: &str, done: impl Fn(&Gateway) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done(self) {
            let r = tokio::time::timeout_at(deadline, self.d.rx.message())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
                .unwrap()
                .unwrap();
            assert_eq!(r.type_url, SDS);
            for res in &r.resources {
                let (chain, key) = chain_of(&res.resource.as_ref().unwrap().value);
                self.ever.insert(res.name.clone());
                self.held
                    .insert(res.name.clone(), (res.version.clone(), chain, key));
            }
            for n in &r.removed_resources {
                self.held.remove(n);
            }
            self.d.ack(&r).await;
        }
    }

    fn chain(&self, name: &str) -> Option<&str> {
        self.held.get(name).map(|(_, c, _)| c.as_str())
    }
}

/// Waits until the hub's status of `CLUSTER` satisfies `done`.
async fn status_until(
    rx: &mut watch::Receiver<Arc<Vec<ClusterStatus>>>,
    what: &str,
    done: impl Fn(&SecretStatus) -> bool,
) -> SecretStatus {
    let found = |all: &Arc<Vec<ClusterStatus>>| {
        all.iter()
            .filter(|c| c.id == CLUSTER)
            .flat_map(|c| c.secrets.iter())
            .find(|s| s.namespace == "shop" && s.name == "wild-tls" && done(s))
            .cloned()
    };
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        rx.wait_for(|all| found(all).is_some()),
    )
    .await
    .ok()
    .map(|r| r.unwrap().clone());
    match got {
        Some(all) => found(&all).unwrap(),
        None => panic!(
            "timed out waiting for the status: {what}; it is {:?}",
            rx.borrow()
        ),
    }
}

async fn next(inbound: &mut tonic::Streaming<fed::HubMessage>) -> hub_message::Kind {
    tokio::time::timeout(TIMEOUT, inbound.message())
        .await
        .expect("a hub message")
        .unwrap()
        .unwrap()
        .kind
        .unwrap()
}

/// A hand-driven agent of `CLUSTER`: what the hub asks it for, and what happens to a
/// Secret it was not asked for.
async fn rogue_agent(hub: std::net::SocketAddr, ca: &TestCa) -> Vec<fed::SecretRef> {
    let mut client = FederationClient::connect(format!("http://{hub}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let msg = |kind| fed::AgentMessage { kind: Some(kind) };
    tx.send(msg(agent_message::Kind::Hello(fed::Hello {
        cluster_id: CLUSTER.into(),
        incarnation: "rogue".into(),
        ..Default::default()
    })))
    .await
    .unwrap();
    let mut inbound = client
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next(&mut inbound).await,
        hub_message::Kind::Welcome(_)
    ));
    // The first thing after the Welcome: the Secrets to watch.
    let hub_message::Kind::WatchSecrets(asked) = next(&mut inbound).await else {
        panic!("expected WatchSecrets")
    };
    // Sends vault/wild-tls anyway (a valid pair), then a batch: its Ack says the hub
    // has read the Secret before it.
    let (chain, key) = ca.wildcard();
    tx.send(msg(agent_message::Kind::Secret(fed::SecretUpdate {
        namespace: "vault".into(),
        name: "wild-tls".into(),
        state: Some(fed::secret_update::State::Tls(fed::TlsSecret {
            certificate_chain: chain.into(),
            private_key: key.into(),
            ca_certificate: Default::default(),
        })),
    })))
    .await
    .unwrap();
    tx.send(msg(agent_message::Kind::Batch(fed::ChangeBatch {
        version: 1,
        full: true,
        ..Default::default()
    })))
    .await
    .unwrap();
    loop {
        match next(&mut inbound).await {
            hub_message::Kind::Ack(a) => {
                assert_eq!(a.version, 1);
                break;
            }
            hub_message::Kind::Heartbeat(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    asked.secrets
}

/// The certificate chain a gateway connecting now is served.
async fn served_to_a_new_gateway(xds: std::net::SocketAddr) -> String {
    let mut g = Gateway::open(xds, &[SERVED]).await;
    g.until("a certificate", |g| g.chain(SERVED).is_some())
        .await;
    g.chain(SERVED).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_serves_a_kubernetes_secret_and_follows_its_rotation() {
    let kube_env = KubeEnv::start();
    let hub = TestHub::start_with(&[("mesh.yaml", config())], |cfg| {
        cfg.debounce.quiet = Duration::from_millis(20);
    })
    .await;
    let xds = hub.hub.xds_addr;
    let ca = TestCa::new();

    let opts = KubeOptions {
        kubeconfig: Some(kube_env.kubeconfig.clone()),
        default_env: None,
        zone: "az1".into(),
        list_from_cache: false,
    };
    let client = agent::kube::client(&opts).await.unwrap();
    let pp = PostParams::default();
    for ns in ["shop", "vault"] {
        Api::<Namespace>::all(client.clone())
            .create(
                &pp,
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await
            .unwrap();
    }
    let shop: Api<KubeSecret> = Api::namespaced(client.clone(), "shop");
    let vault: Api<KubeSecret> = Api::namespaced(client.clone(), "vault");
    let (chain1, key1) = ca.wildcard();
    shop.create(
        &pp,
        &tls_secret("wild-tls", "shop", &chain1, &key1, &ca.pem),
    )
    .await
    .unwrap();
    let (vault_chain, vault_key) = ca.wildcard();
    vault
        .create(
            &pp,
            &tls_secret("wild-tls", "vault", &vault_chain, &vault_key, &ca.pem),
        )
        .await
        .unwrap();

    // (3) Outside the grant: an agent of the cluster is asked for shop/wild-tls only,
    // and vault/wild-tls sent anyway is refused and counted.
    let asked = rogue_agent(xds, &ca).await;
    assert_eq!(
        asked,
        [fed::SecretRef {
            namespace: "shop".into(),
            name: "wild-tls".into()
        }]
    );
    let refused = hub
        .hub
        .metrics
        .federation_secrets_refused
        .get_or_create(&ClusterLabel {
            cluster: CLUSTER.into(),
        })
        .get();
    assert_eq!(refused, 1, "the unasked Secret is counted");

    // The real agent, watching Secrets only (it exports no services here).
    let secrets = SecretWatch::new();
    let watcher = tokio::spawn(agent::secrets::run_kube(client.clone(), secrets.clone()));
    let (_state_tx, state_rx) = watch::channel(Arc::new(ClusterState::default()));
    let mut acfg = AgentConfig::new(format!("http://{xds}"), CLUSTER);
    acfg.zone = "az1".into();
    acfg.debounce = Duration::from_millis(20);
    acfg.backoff_initial = Duration::from_millis(20);
    acfg.backoff_max = Duration::from_millis(200);
    acfg.secrets = Some(secrets.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let agent_task = tokio::spawn(agent::run(acfg, state_rx, async move {
        let _ = stopped.await;
    }));

    // (1) The gateway gets the Secret's certificate over SDS, byte for byte.
    let mut gw = Gateway::open(xds, &[SERVED, OUTSIDE]).await;
    gw.until("the Secret's certificate", |g| {
        g.chain(SERVED) == Some(&chain1)
    })
    .await;
    assert_eq!(gw.held[SERVED].2, key1);
    assert_eq!(
        *secrets.watched().borrow(),
        [ObjectKey {
            namespace: "shop".into(),
            name: "wild-tls".into()
        }]
        .into(),
        "the agent watches only the Secret it was asked for"
    );
    let mut status = hub.hub.index.watch_clusters();
    let s = status_until(&mut status, "valid", |s| s.state == "valid").await;
    assert!(
        s.serving && s.error.is_none() && s.not_after_unix.is_some(),
        "{s:?}"
    );

    // (2) A rotation is pushed: a new certificate, a new version.
    let version1 = gw.held[SERVED].0.clone();
    let (chain2, key2) = ca.wildcard();
    shop.replace("wild-tls", &pp, &{
        let mut s = shop.get("wild-tls").await.unwrap();
        let fresh = tls_secret("wild-tls", "shop", &chain2, &key2, &ca.pem);
        s.data = None;
        s.string_data = fresh.string_data;
        s
    })
    .await
    .unwrap();
    gw.until("the rotated certificate", |g| {
        g.chain(SERVED) == Some(&chain2)
    })
    .await;
    assert_ne!(gw.held[SERVED].0, version1, "the SDS version changed");
    assert_eq!(gw.held[SERVED].2, key2);

    // (4) An invalid Secret (a key that is not the certificate's) is reported and the
    // last good certificate stays served.
    let (chain3, _) = ca.wildcard();
    let (_, wrong_key) = ca.wildcard();
    shop.replace("wild-tls", &pp, &{
        let mut s = shop.get("wild-tls").await.unwrap();
        s.data = None;
        s.string_data = tls_secret("wild-tls", "shop", &chain3, &wrong_key, "").string_data;
        s
    })
    .await
    .unwrap();
    let s = status_until(&mut status, "invalid", |s| s.state == "invalid").await;
    assert!(s.serving, "{s:?}");
    let why = s.error.unwrap();
    assert!(why.contains("does not match"), "{why}");
    assert!(
        !why.contains("PRIVATE KEY"),
        "the key is never quoted: {why}"
    );
    let label = SecretLabel {
        cluster: CLUSTER.into(),
        namespace: "shop".into(),
        name: "wild-tls".into(),
    };
    let errors = || {
        hub.hub
            .metrics
            .credential_secret_errors
            .get_or_create(&label)
            .get()
    };
    assert_eq!(errors(), 1);
    // A gateway connecting now is served the last good pair.
    assert_eq!(served_to_a_new_gateway(xds).await, chain2);

    // Deleted: reported, the last good pair still served.
    shop.delete("wild-tls", &DeleteParams::default())
        .await
        .unwrap();
    let s = status_until(&mut status, "deleted", |s| s.state == "deleted").await;
    assert!(s.serving, "{s:?}");
    assert_eq!(errors(), 2);
    assert_eq!(served_to_a_new_gateway(xds).await, chain2);

    // Re-created: served again.
    let (chain4, key4) = ca.wildcard();
    shop.create(
        &pp,
        &tls_secret("wild-tls", "shop", &chain4, &key4, &ca.pem),
    )
    .await
    .unwrap();
    gw.until("the re-created Secret's certificate", |g| {
        g.chain(SERVED) == Some(&chain4)
    })
    .await;

    // The Secret outside the grant was never served, to anyone; the real agent never
    // sent one the hub did not ask for.
    assert!(!gw.ever.contains(OUTSIDE), "{:?}", gw.ever);
    assert_eq!(
        hub.hub
            .metrics
            .federation_secrets_refused
            .get_or_create(&ClusterLabel {
                cluster: CLUSTER.into(),
            })
            .get(),
        1
    );

    let _ = stop.send(());
    agent_task.await.unwrap();
    watcher.abort();
}
