//! Config files are watched with file events (notify), with notify's polling watcher
//! as the fallback: the hub's file source and the file agent see edits, new files and
//! a Kubernetes ConfigMap's symlink swap without polling.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{TIMEOUT, TestHub, docs, endpoints, service};
use tributary_controlplane::agent::{self, ClusterState};
use tributary_controlplane::config::watch::{WatchConfig, WatchMode};

/// So long that only a file event can explain a reload within the test's timeout.
const NEVER: Duration = Duration::from_secs(3600);

async fn hub_watching(mode: WatchMode, poll_interval: Duration) -> TestHub {
    TestHub::start_with(
        &[
            ("services.yaml", service("a", "prod", 8080)),
            ("endpoints.yaml", endpoints("a", "prod", &["10.0.0.1"], 80)),
        ],
        |cfg| {
            cfg.watch_mode = mode;
            cfg.poll_interval = poll_interval;
        },
    )
    .await
}

fn endpoint_count(hub: &TestHub, env: &str) -> usize {
    let mesh_endpoints = hub.hub.snapshots.current(env);
    mesh_endpoints.resources.by_type[tributary_controlplane::xds::XdsType::Endpoint as usize].len()
}

#[tokio::test]
async fn hub_applies_an_edit_from_a_file_event_without_polling() {
    let hub = hub_watching(WatchMode::Auto, NEVER).await;
    hub.write_and_wait(
        "prod",
        "endpoints.yaml",
        endpoints("a", "prod", &["10.0.0.1", "10.0.0.2"], 80),
    )
    .await;
    // A new file in the directory is an event too.
    hub.write_and_wait("prod", "b.yaml", service("b", "prod", 9090))
        .await;
    assert!(endpoint_count(&hub, "prod") >= 4);
}

#[tokio::test]
async fn hub_polls_when_asked() {
    let hub = hub_watching(WatchMode::Poll, Duration::from_millis(20)).await;
    hub.write_and_wait("prod", "b.yaml", service("b", "prod", 9090))
        .await;
}

/// A ConfigMap volume: `mesh.yaml -> ..data/mesh.yaml`, `..data -> ..v1`; an update
/// writes `..v2` and renames a new `..data` symlink over the old one.
#[cfg(unix)]
#[tokio::test]
async fn hub_sees_a_configmap_symlink_swap() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let v1 = d.join("..v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("mesh.yaml"), service("a", "prod", 8080)).unwrap();
    symlink("..v1", d.join("..data")).unwrap();
    symlink("..data/mesh.yaml", d.join("mesh.yaml")).unwrap();

    let mut cfg = tributary_controlplane::app::HubConfig::local(vec![d.to_path_buf()]);
    cfg.poll_interval = NEVER;
    let hub = tributary_controlplane::app::Hub::start(cfg).await.unwrap();
    let mut rx = hub.snapshots.subscribe_or_create("prod");
    // Two swaps: the first may be read by the source's initial pass, the second is
    // seen only through a file event (the watcher is up by then).
    for (version, services) in [("..v2", vec!["b"]), ("..v3", vec!["b", "c"])] {
        let before = rx.borrow_and_update().seq;
        let dir = d.join(version);
        std::fs::create_dir(&dir).unwrap();
        let mut parts = vec![service("a", "prod", 8080)];
        parts.extend(services.iter().map(|s| service(s, "prod", 9090)));
        std::fs::write(dir.join("mesh.yaml"), docs(&parts)).unwrap();
        symlink(version, d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();

        let snap = tokio::time::timeout(TIMEOUT, rx.wait_for(|s| s.seq > before))
            .await
            .unwrap_or_else(|_| panic!("the symlink swap to {version} applied"))
            .unwrap()
            .clone();
        let clusters =
            &snap.resources.by_type[tributary_controlplane::xds::XdsType::Cluster as usize];
        for s in services {
            assert!(
                clusters.keys().any(|n| n.ends_with(&format!("|{s}.prod"))),
                "{version}: {:?}",
                clusters.keys().collect::<Vec<_>>()
            );
        }
    }
}

fn agent_files(dir: &Path, addrs: &[&str]) {
    std::fs::write(
        dir.join("mesh.yaml"),
        docs(&[
            service("a", "prod", 8080),
            endpoints("a", "prod", addrs, 80),
        ]),
    )
    .unwrap();
}

fn exported_addresses(state: &ClusterState) -> Vec<String> {
    state
        .endpoints
        .values()
        .flat_map(|o| o.value.endpoints.iter().flat_map(|e| e.addresses.clone()))
        .collect()
}

async fn agent_follows_an_edit(mode: WatchMode, poll_interval: Duration) {
    let dir = tempfile::tempdir().unwrap();
    agent_files(dir.path(), &["10.0.0.1"]);
    let paths = vec![dir.path().to_path_buf()];
    let mesh = agent::file::load(&paths).unwrap();
    let initial = agent::file::cluster_state(
        &mesh,
        &ClusterState::default(),
        std::time::SystemTime::now(),
    );
    let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(initial));
    rx.borrow_and_update();
    let watch = WatchConfig {
        mode,
        poll_interval,
        debounce: Duration::from_millis(10),
    };
    let task = tokio::spawn(agent::file::run(paths, watch, tx));
    // Two edits: the first may be read by the source's initial pass, the second is
    // seen only through the watcher (which is up by then).
    for addrs in [&["10.0.0.1", "10.0.0.2"][..], &["10.0.0.3"]] {
        agent_files(dir.path(), addrs);
        tokio::time::timeout(TIMEOUT, rx.changed())
            .await
            .unwrap_or_else(|_| panic!("the agent exported {addrs:?}"))
            .unwrap();
        let mut got = exported_addresses(&rx.borrow_and_update());
        got.sort();
        assert_eq!(got, addrs);
    }
    drop(rx);
    // The source ends once nobody listens.
    tokio::time::timeout(TIMEOUT, task)
        .await
        .expect("the file agent stops without receivers")
        .unwrap();
}

#[tokio::test]
async fn file_agent_exports_an_edit_from_a_file_event_without_polling() {
    agent_follows_an_edit(WatchMode::Auto, NEVER).await;
}

#[tokio::test]
async fn file_agent_polls_when_asked() {
    agent_follows_an_edit(WatchMode::Poll, Duration::from_millis(20)).await;
}
