//! Service-account tokens exchanged for certificates through the CSR API, each
//! reviewed by the real kube-apiserver of the remote cluster it claims (two clusters,
//! each a kube-apiserver + etcd started by tests/kube/kubeenv.py).

mod common;
#[path = "common/kube_env.rs"]
mod kube_env;

use std::path::PathBuf;
use std::time::SystemTime;

use common::{TestHub, docs, service};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Api;
use kube::api::PostParams;
use kube_env::KubeEnv;
use serde_json::json;
use tributary_controlplane::identity::SpiffeId;
use tributary_controlplane::identity::client::{Credential, request_certificate};
use tributary_controlplane::identity::tokenreview::ReviewCluster;
use tributary_controlplane::identity::verify::{certs_from_pem, verify_chain};

async fn client(env: &KubeEnv) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(&env.kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

/// Creates namespace `ns` (labelled with `env` when given) and service account `sa`
/// in it, and returns a token for it from the TokenRequest API.
async fn sa_token(client: &kube::Client, ns: &str, env: Option<&str>, sa: &str) -> String {
    let mut meta = json!({"name": ns});
    if let Some(env) = env {
        meta["labels"] = json!({"tributary.io/env": env});
    }
    let namespace: Namespace = serde_json::from_value(json!({"metadata": meta})).unwrap();
    let pp = PostParams::default();
    Api::<Namespace>::all(client.clone())
        .create(&pp, &namespace)
        .await
        .unwrap();
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": sa, "namespace": ns}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&pp, &account)
        .await
        .unwrap();
    let req = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer: TokenRequest = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_subresource("token", sa, &pp, &req)
        .await
        .unwrap();
    answer.status.unwrap().token
}

fn token_file(dir: &std::path::Path, name: &str, token: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, token).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_token_reviewed_by_its_clusters_api_server_buys_its_workload_identity() {
    let (a, b) = (KubeEnv::start(), KubeEnv::start());
    let (ka, kb) = (client(&a).await, client(&b).await);
    let prod_checkout = sa_token(&ka, "shop", Some("prod"), "checkout").await;
    let unlabelled = sa_token(&ka, "plain", None, "web").await;
    let b_unlabelled = sa_token(&kb, "plain", None, "web").await;

    let clusters = vec![
        ReviewCluster {
            id: "a".into(),
            kubeconfig: a.kubeconfig.clone(),
            default_env: None,
            audiences: vec![],
        },
        ReviewCluster {
            id: "b".into(),
            kubeconfig: b.kubeconfig.clone(),
            default_env: Some("staging".into()),
            audiences: vec![],
        },
    ];
    let h = TestHub::start_with(&[("mesh.yaml", docs(&[service("x", "prod", 80)]))], |cfg| {
        cfg.identity.review_clusters = clusters
    })
    .await;
    let server = format!("http://{}", h.hub.admin_addr);
    let dir = h.dir.path().to_path_buf();
    let k8s = |cluster: &str, file: &str, token: &str| Credential::Kubernetes {
        cluster: cluster.into(),
        token_file: token_file(&dir, file, token),
    };

    // The identity comes from the review (namespace, service account) and the
    // namespace's environment label, signed by the cluster's intermediate.
    let got = request_certificate(&server, &k8s("a", "t1", &prod_checkout), None)
        .await
        .unwrap();
    let want = SpiffeId::parse("spiffe://tributary.local/env/prod/ns/shop/sa/checkout").unwrap();
    assert_eq!(got.spiffe_id, want.to_string());
    assert_eq!(
        verify_chain(
            &got.trust_bundle_pem,
            &got.cert.chain_pem,
            SystemTime::now()
        )
        .unwrap(),
        want
    );
    let chain = certs_from_pem("chain", &got.cert.chain_pem).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert!(
        leaf.issuer().to_string().contains("intermediate cluster/a"),
        "{}",
        leaf.issuer()
    );

    // Asking for the identity it proves is fine; for another one, refused with both.
    request_certificate(&server, &k8s("a", "t2", &prod_checkout), Some(&want))
        .await
        .unwrap();
    let admin = SpiffeId::parse("spiffe://tributary.local/env/prod/ns/shop/sa/admin").unwrap();
    let err = request_certificate(&server, &k8s("a", "t3", &prod_checkout), Some(&admin))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("HTTP 403"), "{err}");
    assert!(
        err.contains("asks for spiffe://tributary.local/env/prod/ns/shop/sa/admin")
            && err.contains("system:serviceaccount:shop:checkout of remote cluster a")
            && err.contains("proves spiffe://tributary.local/env/prod/ns/shop/sa/checkout"),
        "{err}"
    );

    // Cluster a's token claimed as cluster b's: b's API server does not know it.
    let err = request_certificate(&server, &k8s("b", "t4", &prod_checkout), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HTTP 401")
            && err.contains("API server of remote cluster b did not authenticate"),
        "{err}"
    );
    // A bogus token.
    let err = request_certificate(&server, &k8s("a", "t5", "not-a-token"), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HTTP 401") && err.contains("remote cluster a did not authenticate"),
        "{err}"
    );
    // A cluster the hub does not review.
    let err = request_certificate(&server, &k8s("c", "t6", &prod_checkout), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HTTP 400") && err.contains("known: a, b"),
        "{err}"
    );

    // A namespace without tributary.io/env: refused in a (no default_env), the
    // cluster's default_env in b.
    let err = request_certificate(&server, &k8s("a", "t7", &unlabelled), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("namespace plain of remote cluster a has no tributary.io/env label"),
        "{err}"
    );
    let got = request_certificate(&server, &k8s("b", "t8", &b_unlabelled), None)
        .await
        .unwrap();
    assert_eq!(
        got.spiffe_id,
        "spiffe://tributary.local/env/staging/ns/plain/sa/web"
    );
    h.hub.shutdown().await.unwrap();
}
