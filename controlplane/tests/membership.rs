//! Shard membership: three replicas for four shards (two environments × two zones),
//! two replicas per shard. One replica dies without deregistering; within its lease
//! TTL its shards are reassigned and every shard keeps two live replicas.
//!
//! - in process, three hubs on one embedded store (the crash: every task aborted);
//! - as processes, three `tributary hub --store etcd` on a real etcd (the crash:
//!   `kill -9`).
//!
//! And a clean shutdown deregisters at once.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::{Instant, timeout};
use tributary_controlplane::app::{Hub, HubConfig, StoreBackend};
use tributary_controlplane::http_client;
use tributary_controlplane::membership::MembershipView;
use tributary_store::SharedStore;
use tributary_store::embedded::{Embedded, EmbeddedConfig};

const TTL: Duration = Duration::from_secs(2);

const ENVIRONMENTS: &str = "apiVersion: tributary.io/v1alpha1
kind: Environment
metadata: {name: prod}
spec: {zones: [az1, az2]}
---
apiVersion: tributary.io/v1alpha1
kind: Environment
metadata: {name: staging}
spec: {zones: [az1, az2]}
";

/// Every one of the four shards has two distinct replicas, all of them in `live`.
fn fully_assigned(assignment: &Value, live: &BTreeSet<String>) -> bool {
    let shards = assignment["shards"].as_array().cloned().unwrap_or_default();
    shards.len() == 4
        && shards.iter().all(|s| {
            let r: BTreeSet<String> = s["replicas"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(String::from))
                .collect();
            r.len() == 2 && r.is_subset(live)
        })
}

fn registered(view: &Value) -> BTreeSet<String> {
    view["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(String::from))
        .collect()
}

fn as_json(v: &MembershipView) -> Value {
    serde_json::to_value(v).unwrap()
}

async fn hub_on(store: &SharedStore, id: &str) -> Hub {
    let mut cfg = HubConfig::local(vec![]);
    cfg.store = StoreBackend::Shared(store.clone());
    cfg.replica_id = id.into();
    cfg.lease_ttl = TTL;
    Hub::start(cfg).await.expect("hub starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_a_dead_replicas_shards_move_within_the_lease_ttl() {
    let store: SharedStore = Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap());
    let a = hub_on(&store, "a").await;
    let b = hub_on(&store, "b").await;
    let c = hub_on(&store, "c").await;
    let (status, body) = http_client::request(
        &a.admin_addr.to_string(),
        "POST",
        "/config/apply",
        ENVIRONMENTS.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let all: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
    let mut view = b.membership.watch();
    timeout(
        Duration::from_secs(10),
        view.wait_for(|v| {
            let j = as_json(v);
            registered(&j) == all && fully_assigned(&j["assignment"], &all)
        }),
    )
    .await
    .expect("four shards on three replicas, two each")
    .unwrap();
    let before = as_json(&b.membership.view());
    // Balanced: 8 slots on 3 replicas.
    for r in &all {
        let n = before["assignment"]["shards"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                s["replicas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x == r.as_str())
            })
            .count();
        assert!((2..=3).contains(&n), "{r} has {n} shards: {before}");
    }
    // c crashes: nothing deregisters it; its lease runs out.
    let crashed = Instant::now();
    c.abort();
    let survivors: BTreeSet<String> = ["a", "b"].map(String::from).into();
    timeout(
        TTL + Duration::from_secs(3),
        view.wait_for(|v| {
            let j = as_json(v);
            registered(&j) == survivors && fully_assigned(&j["assignment"], &survivors)
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("not reassigned in time: {}", as_json(&b.membership.view())))
    .unwrap();
    let took = crashed.elapsed();
    assert!(took <= TTL + Duration::from_secs(2), "took {took:?}");
    // a clean shutdown deregisters at once (well within a TTL).
    let stopped = Instant::now();
    a.shutdown().await.unwrap();
    let only_b: BTreeSet<String> = ["b"].map(String::from).into();
    timeout(TTL, view.wait_for(|v| registered(&as_json(v)) == only_b))
        .await
        .expect("a deregistered at once")
        .unwrap();
    assert!(stopped.elapsed() < TTL);
    b.shutdown().await.unwrap();
}

/// The same on a real etcd, with hub processes (needs the `etcd` feature).
#[cfg(feature = "etcd")]
mod on_etcd {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use tributary_store::testing::EtcdServer;

    /// A `tributary hub` process on etcd.
    struct HubProcess {
        child: Child,
        admin: String,
        _dir: tempfile::TempDir,
    }

    impl HubProcess {
        async fn start(etcd: &str, id: &str) -> HubProcess {
            let dir = tempfile::tempdir().unwrap();
            let ready = dir.path().join("ready.json");
            let log = std::fs::File::create(dir.path().join("hub.log")).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_tributary"))
                .args([
                    "hub",
                    "--store",
                    "etcd",
                    "--etcd-endpoints",
                    etcd,
                    "--replica-id",
                    id,
                    "--lease-ttl",
                    "2s",
                    "--insecure",
                    "--xds-addr",
                    "127.0.0.1:0",
                    "--admin-addr",
                    "127.0.0.1:0",
                    "--csr-addr",
                    "127.0.0.1:0",
                    "--sync-wait",
                    "0s",
                    "--state-dir",
                    &dir.path().join("state").display().to_string(),
                    "--ready-file",
                    &ready.display().to_string(),
                ])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while !ready.exists() {
                assert!(Instant::now() < deadline, "hub {id} never got ready");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let info: Value = serde_json::from_slice(&std::fs::read(&ready).unwrap()).unwrap();
            HubProcess {
                child,
                admin: info["admin"].as_str().unwrap().to_string(),
                _dir: dir,
            }
        }

        async fn shards(&self) -> Value {
            http_client::get_json(&self.admin, "/status/shards")
                .await
                .unwrap_or(Value::Null)
        }

        fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Drop for HubProcess {
        fn drop(&mut self) {
            self.kill();
        }
    }

    async fn wait_view(
        hub: &HubProcess,
        within: Duration,
        what: &str,
        cond: impl Fn(&Value) -> bool,
    ) {
        let deadline = Instant::now() + within;
        loop {
            let v = hub.shards().await;
            if cond(&v) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {v:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn processes_on_etcd_a_killed_replicas_shards_move_within_the_lease_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let etcd = EtcdServer::start(dir.path(), "127.0.0.1").await;
        let mut hubs = Vec::new();
        for id in ["h1", "h2", "h3"] {
            hubs.push(HubProcess::start(&etcd.client_url, id).await);
        }
        let (status, body) = http_client::request(
            &hubs[0].admin,
            "POST",
            "/config/apply",
            ENVIRONMENTS.as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let all: BTreeSet<String> = ["h1", "h2", "h3"].map(String::from).into();
        wait_view(
            &hubs[1],
            Duration::from_secs(10),
            "four shards on three replicas",
            |v| registered(v) == all && fully_assigned(&v["assignment"], &all),
        )
        .await;
        // Kill the replica holding the most shards, whoever leads.
        let killed = Instant::now();
        hubs[2].kill();
        let survivors: BTreeSet<String> = ["h1", "h2"].map(String::from).into();
        wait_view(
            &hubs[0],
            TTL + Duration::from_secs(3),
            "h3's shards reassigned, two live replicas each",
            |v| registered(v) == survivors && fully_assigned(&v["assignment"], &survivors),
        )
        .await;
        let took = killed.elapsed();
        assert!(took <= TTL + Duration::from_secs(2), "took {took:?}");
        // Both survivors see the same assignment.
        let a = hubs[0].shards().await;
        let b = hubs[1].shards().await;
        assert_eq!(a["assignment"]["shards"], b["assignment"]["shards"]);
    }
}
