//! Config in the store, through the hub's admin API: applies reach the snapshots, an
//! invalid apply changes nothing and names the object and field, a multi-object apply
//! is all or nothing, concurrent writers never half-apply, deletes are validated, and
//! a hub that reads files refuses writes. Known clusters live in the store too.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TIMEOUT, docs, endpoints, service};
use serde_json::Value;
use tributary_controlplane::app::{Hub, HubConfig, StoreBackend};
use tributary_controlplane::http_client;
use tributary_controlplane::xds::XdsType;
use tributary_store::SharedStore;
use tributary_store::embedded::{Embedded, EmbeddedConfig};

async fn store_hub(tweak: impl FnOnce(&mut HubConfig)) -> Hub {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    // No --config: the config is in the store (here in memory).
    let mut cfg = HubConfig::local(vec![]);
    tweak(&mut cfg);
    Hub::start(cfg).await.expect("hub starts")
}

async fn call(hub: &Hub, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, bytes) =
        http_client::request(&hub.admin_addr.to_string(), method, path, body.as_bytes())
            .await
            .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Applies `body` and waits for `env`'s snapshot to move past where it was.
async fn apply_and_wait(hub: &Hub, env: &str, body: &str) -> Value {
    let mut rx = hub.snapshots.subscribe_or_create(env);
    let before = rx.borrow_and_update().seq;
    let (status, v) = call(hub, "POST", "/config/apply", body).await;
    assert_eq!(status, 200, "{v}");
    tokio::time::timeout(TIMEOUT, rx.wait_for(|s| s.seq > before))
        .await
        .expect("the applied config is published")
        .unwrap();
    v
}

fn route(name: &str, env: &str, to: &str, port: u16) -> String {
    format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Route\nmetadata: {{name: {name}, environment: {env}}}\nspec:\n  hosts: [{to}.{env}]\n  http:\n  - destinations: [{{service: {to}, port: {port}}}]\n"
    )
}

fn cla_addresses(hub: &Hub, env: &str, cluster: &str) -> Vec<String> {
    use prost::Message;
    use tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
    let snap = hub.snapshots.current(env);
    let Some(r) = snap.get(XdsType::Endpoint, cluster) else {
        return Vec::new();
    };
    let cla = ClusterLoadAssignment::decode(r.body()).unwrap();
    let mut out: Vec<String> = cla
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| {
            use tributary_proto::envoy::envoy::config::core::v3::address::Address as A;
            use tributary_proto::envoy::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
            match e.host_identifier.as_ref()? {
                HostIdentifier::Endpoint(ep) => match ep.address.as_ref()?.address.as_ref()? {
                    A::SocketAddress(s) => Some(s.address.clone()),
                    _ => None,
                },
                _ => None,
            }
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_change_and_delete_reach_the_snapshots() {
    let hub = store_hub(|_| {}).await;
    let cluster = "outbound|8080||a.prod";
    let v = apply_and_wait(
        &hub,
        "prod",
        &docs(&[
            service("a", "prod", 8080),
            endpoints("a", "prod", &["10.0.0.1"], 80),
        ]),
    )
    .await;
    let actions: Vec<&str> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["created", "created"], "{v}");
    assert_eq!(cla_addresses(&hub, "prod", cluster), ["10.0.0.1"]);

    // A change: the endpoints move; the unchanged service is reported as such.
    let v = apply_and_wait(
        &hub,
        "prod",
        &docs(&[
            service("a", "prod", 8080),
            endpoints("a", "prod", &["10.0.0.2", "::1"], 80),
        ]),
    )
    .await;
    let actions: Vec<&str> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["unchanged", "configured"], "{v}");
    assert_eq!(cla_addresses(&hub, "prod", cluster), ["10.0.0.2", "::1"]);

    // Listing.
    let (status, v) = call(&hub, "GET", "/config?kind=Service", "").await;
    assert_eq!(status, 200);
    let objects = v["objects"].as_array().unwrap();
    assert_eq!(objects.len(), 1, "{v}");
    assert_eq!(
        objects[0]["key"],
        "/tributary/config/prod/Service/default/a"
    );

    // Deleting the Service while its Endpoints name it is refused, naming them.
    let (status, v) = call(&hub, "DELETE", "/config/prod/Service/default/a", "").await;
    assert_eq!(status, 422, "{v}");
    let errors = v["errors"].to_string();
    assert!(
        errors.contains("/tributary/config/prod/Endpoints/default/a")
            && errors.contains("spec.service"),
        "{v}"
    );
    // Endpoints first, then the Service: the cluster goes.
    let mut rx = hub.snapshots.subscribe_or_create("prod");
    rx.borrow_and_update();
    let (status, v) = call(&hub, "DELETE", "/config/prod/Endpoints/default/a", "").await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = call(&hub, "DELETE", "/config/prod/Service/default/a", "").await;
    assert_eq!(status, 200, "{v}");
    tokio::time::timeout(
        TIMEOUT,
        rx.wait_for(|s| s.get(XdsType::Cluster, cluster).is_none()),
    )
    .await
    .expect("the deleted service's cluster is withdrawn")
    .unwrap();
    let (status, v) = call(&hub, "DELETE", "/config/prod/Service/default/a", "").await;
    assert_eq!(status, 404, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("Service prod/default/a does not exist"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_apply_changes_nothing_and_names_the_object_and_field() {
    let hub = store_hub(|_| {}).await;
    apply_and_wait(
        &hub,
        "prod",
        &docs(&[
            service("a", "prod", 8080),
            endpoints("a", "prod", &["10.0.0.1"], 80),
        ]),
    )
    .await;
    let (_, before) = call(&hub, "GET", "/config?kind=Endpoints", "").await;
    let seq = hub.snapshots.current("prod").seq;
    // One valid change (new endpoints) and one invalid object (a route to a port the
    // service does not have): nothing of it is written.
    let body = docs(&[
        endpoints("a", "prod", &["10.9.9.9"], 80),
        service("b", "prod", 9090),
        route("r", "prod", "a", 9999),
    ]);
    let (status, v) = call(&hub, "POST", "/config/apply", &body).await;
    assert_eq!(status, 422, "{v}");
    let errors: Vec<String> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    assert!(
        errors.iter().any(|e| e.starts_with(
            "/tributary/config/prod/Route/default/r: document 1 (Route prod/default/r): spec.http[0].destinations[0]"
        ) && e.contains("9999")),
        "{errors:#?}"
    );
    let (_, after) = call(&hub, "GET", "/config?kind=Endpoints", "").await;
    assert_eq!(
        before["objects"], after["objects"],
        "the valid part was not written"
    );
    let (_, services) = call(&hub, "GET", "/config?kind=Service", "").await;
    assert_eq!(
        services["objects"].as_array().unwrap().len(),
        1,
        "{services}"
    );
    // A dry run of a valid change says what would change and writes nothing.
    let (status, v) = call(
        &hub,
        "POST",
        "/config/apply?dry_run=true",
        &endpoints("a", "prod", &["10.9.9.9"], 80),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["changes"][0]["action"], "configured");
    assert!(
        v["changes"][0]["before"]
            .as_str()
            .unwrap()
            .contains("10.0.0.1")
    );
    assert!(
        v["changes"][0]["after"]
            .as_str()
            .unwrap()
            .contains("10.9.9.9")
    );
    // Unparsable and unidentifiable documents name the request document.
    let (status, v) = call(
        &hub,
        "POST",
        "/config/apply",
        "apiVersion: tributary.io/v1alpha1\nkind: Service\nmetadata: {namespace: x}\n",
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert!(
        v["errors"][0]
            .as_str()
            .unwrap()
            .starts_with("request: document 1"),
        "{v}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hub.snapshots.current("prod").seq,
        seq,
        "nothing was published"
    );
    assert_eq!(
        cla_addresses(&hub, "prod", "outbound|8080||a.prod"),
        ["10.0.0.1"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_two_hubs_never_half_apply() {
    // Two hubs on one store: writers through one hub queue, writers through the two
    // race on the store and the losers re-validate and retry.
    let store: SharedStore = Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap());
    let hubs: Vec<Arc<Hub>> = vec![
        Arc::new(
            store_hub(|c| {
                c.store = StoreBackend::Shared(store.clone());
                c.replica_id = "a".into();
            })
            .await,
        ),
        Arc::new(
            store_hub(|c| {
                c.store = StoreBackend::Shared(store.clone());
                c.replica_id = "b".into();
            })
            .await,
        ),
    ];
    let mut tasks = Vec::new();
    for i in 0..16 {
        let hub = hubs[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("s{i}");
            let body = docs(&[
                service(&name, "prod", 8080),
                endpoints(&name, "prod", &[&format!("10.1.0.{}", i + 1)], 80),
            ]);
            call(&hub, "POST", "/config/apply", &body).await
        }));
    }
    for t in tasks {
        let (status, v) = t.await.unwrap();
        assert_eq!(status, 200, "{v}");
    }
    let (_, services) = call(&hubs[1], "GET", "/config?kind=Service", "").await;
    let (_, eps) = call(&hubs[0], "GET", "/config?kind=Endpoints", "").await;
    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&services), names(&eps), "a write landed half");
    assert_eq!(names(&services).len(), 16);
    // Every write bumped the guard once: 16 transactions, none half.
    let guard = store
        .get("/tributary/config-revision")
        .await
        .unwrap()
        .0
        .unwrap();
    assert_eq!(guard.version, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_reading_files_refuses_config_writes() {
    let hub = common::TestHub::start(&[("m.yaml", service("a", "prod", 8080))]).await;
    let (status, v) = call(&hub.hub, "POST", "/config/apply", &service("b", "prod", 80)).await;
    assert_eq!(status, 409, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("--config") && e.contains(&hub.dir.path().display().to_string()),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_on_one_store_share_config_and_environment_definitions_make_shards() {
    let store: SharedStore = Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap());
    let a = store_hub(|c| {
        c.store = StoreBackend::Shared(store.clone());
        c.replica_id = "a".into();
    })
    .await;
    let b = store_hub(|c| {
        c.store = StoreBackend::Shared(store.clone());
        c.replica_id = "b".into();
    })
    .await;
    let mut rx = b.snapshots.subscribe_or_create("prod");
    let env = "apiVersion: tributary.io/v1alpha1\nkind: Environment\nmetadata: {name: prod}\nspec: {zones: [az1, az2]}\n";
    let (status, v) = call(
        &a,
        "POST",
        "/config/apply",
        &docs(&[env.to_string(), service("x", "prod", 80)]),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    tokio::time::timeout(
        TIMEOUT,
        rx.wait_for(|s| s.get(XdsType::Cluster, "outbound|80||x.prod").is_some()),
    )
    .await
    .expect("the other hub applies what one wrote")
    .unwrap();
    let mut view = b.membership.watch();
    tokio::time::timeout(
        TIMEOUT,
        view.wait_for(|v| {
            v.assignment.shards.len() == 2
                && v.assignment.shards.iter().all(|s| s.replicas == ["a", "b"])
        }),
    )
    .await
    .expect("both shards assigned to both replicas")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_clusters_move_from_clusters_json_into_the_store() {
    let state = tempfile::tempdir().unwrap();
    std::fs::write(
        state.path().join("clusters.json"),
        r#"{"version":1,"clusters":[{"id":"east-1","region":"r","zone":"z","last_seen_unix":1.0}]}"#,
    )
    .unwrap();
    let start = || {
        let dir = state.path().to_path_buf();
        store_hub(move |c| {
            c.state_dir = Some(dir);
            c.grace = Duration::from_secs(60);
        })
    };
    let hub = start().await;
    let pending: Vec<String> = hub
        .index
        .resync_pending()
        .iter()
        .map(|p| p.id.clone())
        .collect();
    assert_eq!(pending, ["east-1"]);
    assert!(!state.path().join("clusters.json").exists());
    assert!(state.path().join("clusters.json.migrated").exists());
    let key = tributary_controlplane::index::known::store_key("hub");
    // The writer task saves it in the background.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while hub.store.get(&key).await.unwrap().0.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saved in the store"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hub.shutdown().await.unwrap();
    // Restarted: read back from the store (the file is gone).
    let hub = start().await;
    let pending: Vec<String> = hub
        .index
        .resync_pending()
        .iter()
        .map(|p| p.id.clone())
        .collect();
    assert_eq!(pending, ["east-1"]);
    hub.shutdown().await.unwrap();
}

/// `GET /config`, and the apply's own report, never return a Credential's private key:
/// the key is replaced by a marker, the certificate is returned as stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reads_and_write_reports_redact_private_keys() {
    use tributary_controlplane::config::redact::REDACTED;
    let hub = store_hub(|_| {}).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["*.example.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .pem();
    let key_pem = key.serialize_pem();
    let secret_line = key_pem.lines().nth(1).unwrap().to_string();
    let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let doc = format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Credential\nmetadata: {{name: wild, environment: prod}}\nspec:\n  certificate: |\n{}  privateKey: |\n{}",
        indent(&cert),
        indent(&key_pem)
    );
    let (status, applied) = call(&hub, "POST", "/config/apply", &doc).await;
    assert_eq!(status, 200, "{applied}");
    let applied = applied.to_string();
    assert!(!applied.contains(&secret_line), "{applied}");
    assert!(applied.contains(REDACTED), "{applied}");

    let (status, listed) = call(&hub, "GET", "/config?kind=Credential", "").await;
    assert_eq!(status, 200, "{listed}");
    let text = listed.to_string();
    assert!(!text.contains(&secret_line), "the key leaked: {text}");
    assert!(!text.contains("PRIVATE KEY"), "the key leaked: {text}");
    let objects = listed["objects"].as_array().unwrap();
    assert_eq!(objects.len(), 1, "{listed}");
    let stored: serde_yaml::Value =
        serde_yaml::from_str(objects[0]["document"].as_str().unwrap()).unwrap();
    assert_eq!(stored["spec"]["privateKey"].as_str(), Some(REDACTED));
    assert_eq!(stored["spec"]["certificate"].as_str(), Some(cert.as_str()));

    // The store itself still holds the key (gateways are served it over SDS).
    let (kv, _) = hub
        .store
        .get("/tributary/config/prod/Credential/default/wild")
        .await
        .unwrap();
    let raw = String::from_utf8(kv.expect("stored").value).unwrap();
    assert!(raw.contains(&secret_line));

    // A delete's report (the document before) is redacted too.
    let (status, deleted) = call(&hub, "DELETE", "/config/prod/Credential/default/wild", "").await;
    assert_eq!(status, 200, "{deleted}");
    assert!(!deleted.to_string().contains(&secret_line), "{deleted}");
    hub.shutdown().await.unwrap();
}
