//! Intermediate rotation with an overlap, and revocation, on the hub's own mTLS
//! listener: a hub whose CA (a supplied root, so that its serving certificate can be
//! minted before it starts) issues agents their certificates; an agent of the old
//! intermediate federates during the overlap, and is refused at the handshake, with
//! the refusal naming revocation, once the rotation is finished; the agent of the new
//! intermediate keeps federating.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use rustls::pki_types::pem::PemObject;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tributary_controlplane::http_client;
use tributary_controlplane::identity::ca::{Ca, CaConfig, Signer, SuppliedRoot};
use tributary_controlplane::identity::testing::write_files;
use tributary_controlplane::identity::tls::{self, ClientTls, TlsFiles, Transport};
use tributary_controlplane::identity::{Identity, SpiffeId};
use tributary_proto::federation::v1::federation_client::FederationClient;
use tributary_proto::federation::v1::{self as pb, agent_message, hub_message};
use tributary_store::embedded::{Embedded, EmbeddedConfig};

const TD: &str = tls::DEFAULT_TRUST_DOMAIN;

fn mesh_config() -> String {
    docs(&[
        service("checkout", "prod", 8080),
        "apiVersion: tributary.io/v1alpha1\nkind: RemoteCluster\nmetadata: {name: cluster-b}\nspec: {environments: [prod], namespaces: [shop]}\n".to_string(),
    ])
}

/// A root the test holds the key of (rcgen, as the CA would generate it).
fn root() -> SuppliedRoot {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "revocation test root");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    p.not_before = (now - Duration::from_secs(3600)).into();
    p.not_after = (now + Duration::from_secs(20 * 365 * 86_400)).into();
    let cert = p.self_signed(&key).unwrap();
    SuppliedRoot {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        source: "the test's root".into(),
    }
}

struct Setup {
    hub: TestHub,
    dir: tempfile::TempDir,
    root: SuppliedRoot,
}

impl Setup {
    /// A hub on `host` serving mTLS with a certificate of `root` (minted by a CA on
    /// a store of its own), its own CA on the same root.
    async fn start(host: &str) -> Setup {
        let root = root();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = CaConfig::new(TD);
        cfg.root = Some(root.clone());
        let store = Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap());
        let minting = Ca::open(store, cfg.clone()).await.unwrap();
        let hub_id = SpiffeId::new(
            TD.to_string(),
            Identity::Hub {
                replica: "hub".into(),
            },
        );
        let serving = minting.issue_with(&hub_id, &Signer::Mesh).await.unwrap();
        let files = write_files(
            dir.path(),
            "hub",
            &serving.chain_pem,
            &serving.key_pem,
            &root.cert_pem,
        );
        let host = host.to_string();
        let hub = TestHub::start_with(&[("mesh.yaml", mesh_config())], move |c| {
            c.transport = Transport::Mtls(files);
            c.xds_addr = SocketAddr::new(host.parse().unwrap(), 0);
            c.admin_addr = SocketAddr::new(host.parse().unwrap(), 0);
            c.identity.ca = cfg;
            c.bootstrap_operators = vec!["admin".into()];
        })
        .await;
        Setup { hub, dir, root }
    }

    /// An agent certificate of `cluster-b` from the hub's CA, as files; its chain's
    /// intermediate is the current one of `cluster/cluster-b`.
    async fn agent(&self, name: &str) -> ClientTls {
        let id = SpiffeId::new(
            TD.to_string(),
            Identity::Agent {
                cluster: "cluster-b".into(),
            },
        );
        let issued = self
            .hub
            .hub
            .ca
            .issue_with(&id, &Signer::Cluster("cluster-b".into()))
            .await
            .unwrap();
        let files: TlsFiles = write_files(
            self.dir.path(),
            name,
            &issued.chain_pem,
            &issued.key_pem,
            &self.root.cert_pem,
        );
        ClientTls::load(&files, TD, tls::ALPN_GRPC).unwrap()
    }

    async fn operator(&self) -> ClientTls {
        let files = self
            .hub
            .hub
            .ca
            .issue_with(
                &SpiffeId::new(
                    TD.to_string(),
                    Identity::Operator {
                        name: "admin".into(),
                    },
                ),
                &Signer::Mesh,
            )
            .await
            .unwrap();
        let files = write_files(
            self.dir.path(),
            "admin",
            &files.chain_pem,
            &files.key_pem,
            &self.root.cert_pem,
        );
        ClientTls::load(&files, TD, tls::ALPN_HTTP1).unwrap()
    }

    /// `tributary_tls_handshakes_total{listener="xds",result}`.
    async fn handshakes(&self, result: &str) -> f64 {
        let (status, body) = http_client::request_with(
            &self.hub.hub.admin_addr.to_string(),
            Some(&self.operator().await),
            "GET",
            "/metrics",
            b"",
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let prefix =
            format!("tributary_tls_handshakes_total{{listener=\"xds\",result=\"{result}\"}}");
        String::from_utf8(body.to_vec())
            .unwrap()
            .lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0.0, |v| v.parse().unwrap())
    }
}

/// A federation session as `tls` (a new connection, a Hello for cluster-b) that
/// reached its Welcome, then ended: `Ok` once the hub has released it (so that the
/// next agent of cluster-b is not refused as a second live agent), or the error
/// (with its sources) that refused it.
async fn hello(s: &Setup, tls: &ClientTls) -> Result<(), String> {
    let session = welcome(s.hub.hub.xds_addr, tls).await?;
    drop(session);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (status, body) = http_client::request_with(
            &s.hub.hub.admin_addr.to_string(),
            Some(&s.operator().await),
            "GET",
            "/status/clusters",
            b"",
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let live = v["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == "cluster-b" && c["state"] == "connected");
        if !live {
            return Ok(());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hub still holds the ended session: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the hub refuses `revoked` at the TLS layer (the listener rebuilds its
/// verifier when the CA announces the new CRLs: each attempt is a new handshake),
/// then checks what the refusal says (the alert names revocation) and that it was
/// counted as a revocation, not as an unknown CA.
async fn refused_as_revoked(s: &Setup, revoked: &ClientTls, revoked_before: f64) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let err = loop {
        match hello(s, revoked).await {
            Err(e) => break e,
            Ok(()) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the revoked certificate's agent is still served"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(!err.contains("Welcome"), "refused by the TLS layer: {err}");
    let mut conn = revoked
        .connect(&s.hub.hub.xds_addr.to_string())
        .await
        .expect("TLS 1.3: the client finishes its handshake first");
    let mut buf = [0u8; 64];
    let alert = tokio::time::timeout(TIMEOUT, conn.read(&mut buf))
        .await
        .expect("the hub answers within the timeout")
        .expect_err("the hub refuses the certificate");
    assert!(alert.to_string().contains("CertificateRevoked"), "{alert}");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while s.handshakes("revoked").await <= revoked_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no handshake counted as revoked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Session = (
    mpsc::Sender<pb::AgentMessage>,
    tonic::Streaming<pb::HubMessage>,
);

async fn welcome(addr: SocketAddr, tls: &ClientTls) -> Result<Session, String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(TIMEOUT)
        .connect_with_connector(tls.connector())
        .await
        .map_err(|e| format!("{e:?}"))?;
    let mut client = FederationClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::AgentMessage {
        kind: Some(agent_message::Kind::Hello(pb::Hello {
            cluster_id: "cluster-b".into(),
            zone: "az1".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut s = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("{e:?}"))?
        .into_inner();
    loop {
        let m = tokio::time::timeout(TIMEOUT, s.message())
            .await
            .expect("an answer within the timeout")
            .map_err(|e| format!("{e:?}"))?;
        match m.and_then(|m| m.kind) {
            Some(hub_message::Kind::Welcome(_)) => return Ok((tx, s)),
            Some(hub_message::Kind::Heartbeat(_)) => continue,
            other => return Err(format!("expected Welcome, got {other:?}")),
        }
    }
}

async fn rotation_then_revocation(host: &str) {
    let s = Setup::start(host).await;
    let old = s.agent("old").await;
    hello(&s, &old).await.expect("the agent federates");

    let cluster = Signer::Cluster("cluster-b".into());
    let status = s
        .hub
        .hub
        .ca
        .rotate_intermediate(&cluster, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(status.intermediates["cluster/cluster-b"].retiring.len(), 1);
    let new = s.agent("new").await;
    // During the overlap: both intermediates' agents are accepted.
    hello(&s, &old)
        .await
        .expect("the old intermediate during the overlap");
    hello(&s, &new).await.expect("the new intermediate");

    let revoked_before = s.handshakes("revoked").await;
    let status = s
        .hub
        .hub
        .ca
        .finish_intermediate_rotation(&cluster)
        .await
        .unwrap();
    assert_eq!(status.revoked.len(), 1, "{status:?}");
    refused_as_revoked(&s, &old, revoked_before).await;
    // The new intermediate's agent is unaffected.
    hello(&s, &new)
        .await
        .expect("the new intermediate after the finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_a_revoked_intermediate_is_refused_and_the_new_one_accepted() {
    rotation_then_revocation("127.0.0.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_a_revoked_intermediate_is_refused_over_ipv6() {
    rotation_then_revocation("::1").await;
}

/// `tributary ca revoke`'s API: one agent certificate of cluster-b, revoked by its
/// serial (the decommissioned agent), is refused at the hub's handshake with
/// `CertificateRevoked` and counted `revoked`; another agent certificate of the same
/// intermediate keeps federating, and `ca status` lists the revocation.
async fn a_revoked_leaf_is_refused(host: &str) {
    let s = Setup::start(host).await;
    let id = SpiffeId::new(
        TD.to_string(),
        Identity::Agent {
            cluster: "cluster-b".into(),
        },
    );
    let issued = s
        .hub
        .hub
        .ca
        .issue_with(&id, &Signer::Cluster("cluster-b".into()))
        .await
        .unwrap();
    let leaf =
        rustls::pki_types::CertificateDer::from_pem_slice(issued.chain_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let serial = cert.raw_serial_as_string();
    let files: TlsFiles = write_files(
        s.dir.path(),
        "decommissioned",
        &issued.chain_pem,
        &issued.key_pem,
        &s.root.cert_pem,
    );
    let decommissioned = ClientTls::load(&files, TD, tls::ALPN_GRPC).unwrap();
    let sibling = s.agent("sibling").await;
    hello(&s, &decommissioned)
        .await
        .expect("the agent federates");
    hello(&s, &sibling).await.expect("its sibling federates");

    let revoked_before = s.handshakes("revoked").await;
    let body = serde_json::json!({"serial": serial, "intermediate": "cluster-b"});
    let (status, resp) = http_client::request_with(
        &s.hub.hub.admin_addr.to_string(),
        Some(&s.operator().await),
        "POST",
        "/v1/ca/revoke",
        &serde_json::to_vec(&body).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    let resp: serde_json::Value = serde_json::from_slice(&resp).unwrap();
    assert!(
        resp["revoked"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["what"].as_str().unwrap().starts_with("leaf ")),
        "{resp}"
    );
    refused_as_revoked(&s, &decommissioned, revoked_before).await;
    hello(&s, &sibling)
        .await
        .expect("the sibling of the same intermediate still federates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_certificate_is_refused_at_the_hub() {
    a_revoked_leaf_is_refused("127.0.0.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_certificate_is_refused_at_the_hub_over_ipv6() {
    a_revoked_leaf_is_refused("::1").await;
}
