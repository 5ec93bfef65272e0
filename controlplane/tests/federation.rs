//! Federation end to end, in process: agents stream into a hub over real gRPC, and
//! xDS clients see the result.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use prost::Message;
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tributary_controlplane::agent::{self, AgentConfig, ClusterState};
use tributary_controlplane::app::{Hub, HubConfig};
use tributary_controlplane::index::ClusterStatus;
use tributary_controlplane::model::ObjectKey;
use tributary_controlplane::xds::XdsType;
use tributary_controlplane::xds::snapshot::Snapshot;
use tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use tributary_proto::envoy::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tributary_proto::federation::v1::federation_client::FederationClient;
use tributary_proto::federation::v1::{self as pb, agent_message, hub_message};

fn svc_key(name: &str) -> ObjectKey {
    ObjectKey {
        namespace: "shop".into(),
        name: name.into(),
    }
}

fn host(name: &str) -> String {
    format!("{name}.shop.svc.cluster.local")
}

fn cla_name(name: &str) -> String {
    format!("outbound|80||{}", host(name))
}

fn pb_service(name: &str, env: &str) -> pb::Service {
    pb::Service {
        namespace: "shop".into(),
        name: name.into(),
        hosts: vec![host(name)],
        ports: vec![pb::ServicePort {
            name: "http".into(),
            port: 80,
            protocol: "HTTP".into(),
        }],
        environment: env.into(),
    }
}

fn pb_endpoint(addr: &str, ready: bool) -> pb::Endpoint {
    pb::Endpoint {
        addresses: vec![addr.into()],
        ports: [("http".to_string(), 8080)].into(),
        zone: "az1".into(),
        node: "node-1".into(),
        ready,
        serving: ready,
        terminating: false,
        labels: Default::default(),
        ..Default::default()
    }
}

/// A cluster exporting `services`, each with the given endpoints.
fn state(services: &[&str], endpoints: &[pb::Endpoint]) -> ClusterState {
    let mut s = ClusterState::default();
    let now = SystemTime::now();
    for name in services {
        s.set_service(svc_key(name), Some(pb_service(name, "prod")), now);
        let set = pb::EndpointSet {
            namespace: "shop".into(),
            service: name.to_string(),
            endpoints: endpoints.to_vec(),
        };
        s.set_endpoints(svc_key(name), Some(set), now);
    }
    s
}

struct TestAgent {
    tx: watch::Sender<Arc<ClusterState>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestAgent {
    fn start(hub: std::net::SocketAddr, cluster: &str, initial: ClusterState) -> TestAgent {
        Self::start_with(hub, cluster, initial, Duration::from_millis(10))
    }

    /// With the agent's batching window (`--debounce`) set to `debounce`.
    fn start_with(
        hub: std::net::SocketAddr,
        cluster: &str,
        initial: ClusterState,
        debounce: Duration,
    ) -> TestAgent {
        let mut cfg = AgentConfig::new(format!("http://{hub}"), cluster);
        cfg.region = "region-1".into();
        cfg.zone = "az1".into();
        cfg.debounce = debounce;
        cfg.backoff_max = Duration::from_millis(200);
        let (tx, rx) = watch::channel(Arc::new(initial));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(agent::run(cfg, rx, async move {
            let _ = stopped.await;
        }));
        TestAgent {
            tx,
            stop: Some(stop),
            task,
        }
    }

    fn set(&self, s: ClusterState) {
        self.tx.send_replace(Arc::new(s));
    }

    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = self.task.await;
    }

    /// Dies without a goodbye (the stream just breaks).
    fn kill(self) {
        self.task.abort();
    }
}

async fn federated_hub(
    grace: Duration,
    sync_wait: Duration,
    addr: Option<std::net::SocketAddr>,
) -> (Hub, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.yaml"), "# no file config\n").unwrap();
    let mut cfg = HubConfig::local(vec![dir.path().to_path_buf()]);
    cfg.grace = grace;
    cfg.sync_wait = sync_wait;
    cfg.debounce.quiet = Duration::from_millis(20);
    if let Some(a) = addr {
        cfg.xds_addr = a;
    }
    (Hub::start(cfg).await.unwrap(), dir)
}

async fn wait_snapshot(
    hub: &Hub,
    env: &str,
    what: &str,
    f: impl FnMut(&Arc<Snapshot>) -> bool,
) -> Arc<Snapshot> {
    let mut rx = hub.snapshots.subscribe_or_create(env);
    tokio::time::timeout(Duration::from_secs(30), rx.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
        .unwrap()
        .clone()
}

async fn wait_clusters(
    hub: &Hub,
    what: &str,
    f: impl FnMut(&Arc<Vec<ClusterStatus>>) -> bool,
) -> Arc<Vec<ClusterStatus>> {
    let mut rx = hub.index.watch_clusters();
    tokio::time::timeout(Duration::from_secs(30), rx.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
        .unwrap()
        .clone()
}

fn cla(snap: &Snapshot, name: &str) -> Option<ClusterLoadAssignment> {
    snap.get(XdsType::Endpoint, name)
        .map(|r| ClusterLoadAssignment::decode(r.body()).unwrap())
}

fn endpoint_count(c: &ClusterLoadAssignment) -> usize {
    c.endpoints.iter().map(|l| l.lb_endpoints.len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_changes_reach_an_xds_client() {
    let (hub, _dir) = federated_hub(Duration::from_secs(60), Duration::ZERO, None).await;
    let agent = TestAgent::start(
        hub.xds_addr,
        "c1",
        state(
            &["web"],
            &[pb_endpoint("10.1.0.1", true), pb_endpoint("fd00::1", true)],
        ),
    );
    wait_snapshot(&hub, "prod", "web's endpoints", |s| {
        cla(s, &cla_name("web")).is_some_and(|c| endpoint_count(&c) == 2)
    })
    .await;

    // A real Delta xDS client on the hub.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut client = tributary_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::connect(format!("http://{}", hub.xds_addr)).await.unwrap();
    let mut stream = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let sub = |names: Vec<String>, nonce: String| DeltaDiscoveryRequest {
        node: Some(node("proxy-1", "prod")),
        type_url: EDS.into(),
        resource_names_subscribe: names,
        response_nonce: nonce,
        ..Default::default()
    };
    tx.send(sub(vec![cla_name("web")], String::new()))
        .await
        .unwrap();
    async fn next(
        stream: &mut tonic::Streaming<
            tributary_proto::envoy::envoy::service::discovery::v3::DeltaDiscoveryResponse,
        >,
    ) -> (String, ClusterLoadAssignment) {
        let r = tokio::time::timeout(TIMEOUT, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let c = ClusterLoadAssignment::decode(
            r.resources[0].resource.as_ref().unwrap().value.as_slice(),
        )
        .unwrap();
        (r.nonce.clone(), c)
    }
    let (nonce, c) = next(&mut stream).await;
    assert_eq!(endpoint_count(&c), 2);
    let loc = c.endpoints[0].locality.as_ref().unwrap();
    assert_eq!(
        (
            loc.region.as_str(),
            loc.zone.as_str(),
            loc.sub_zone.as_str()
        ),
        ("region-1", "az1", "c1")
    );
    tx.send(sub(vec![], nonce)).await.unwrap();

    // Not ready: the client sees it unhealthy; then removed: the client sees it gone.
    agent.set(state(
        &["web"],
        &[pb_endpoint("10.1.0.1", false), pb_endpoint("fd00::1", true)],
    ));
    let (nonce, c) = next(&mut stream).await;
    let health: Vec<i32> = c
        .endpoints
        .iter()
        .flat_map(|l| l.lb_endpoints.iter().map(|e| e.health_status))
        .collect();
    assert!(
        health.contains(&2),
        "UNHEALTHY endpoint present: {health:?}"
    );
    tx.send(sub(vec![], nonce)).await.unwrap();
    agent.set(state(&["web"], &[pb_endpoint("fd00::1", true)]));
    let (nonce, c) = next(&mut stream).await;
    assert_eq!(endpoint_count(&c), 1);
    tx.send(sub(vec![], nonce)).await.unwrap();

    // Service deleted: it disappears.
    agent.set(ClusterState::default());
    let r = tokio::time::timeout(TIMEOUT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.removed_resources, vec![cla_name("web")]);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_lose_nothing_and_push_nothing() {
    let (hub, _dir) = federated_hub(Duration::from_secs(60), Duration::ZERO, None).await;
    let addr = hub.xds_addr;
    let eps = [pb_endpoint("10.2.0.1", true), pb_endpoint("10.2.0.2", true)];
    let agent = TestAgent::start(addr, "c1", state(&["a", "b", "c"], &eps));
    let snap = wait_snapshot(&hub, "prod", "three services", |s| {
        s.of_type(XdsType::Endpoint).len() == 3
    })
    .await;
    let published = |hub: &Hub| hub.snapshots.current("prod").seq;
    let seq = snap.seq;

    // A Delta client holding everything.
    let mut d = Delta::open_addr(addr).await;
    d.subscribe(
        Some(node("p1", "prod")),
        EDS,
        &[&cla_name("a"), &cla_name("b"), &cla_name("c")],
    )
    .await;
    let first = d.recv().await;
    assert_eq!(first.resources.len(), 3);
    d.ack(&first).await;
    let held: std::collections::HashMap<String, String> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();

    // Restart the agent: it sends a full snapshot that changes nothing.
    agent.stop().await;
    wait_clusters(&hub, "c1 in grace", |c| {
        c.iter().any(|c| c.id == "c1" && c.state == "grace")
    })
    .await;
    let agent = TestAgent::start(addr, "c1", state(&["a", "b", "c"], &eps));
    wait_clusters(&hub, "c1 back with its full snapshot applied", |c| {
        c.iter().any(|c| {
            c.id == "c1"
                && c.state == "connected"
                && c.sessions == 2
                && c.last_version >= 1
                && c.changes_applied >= 12
        })
    })
    .await;
    assert_eq!(
        published(&hub),
        seq,
        "an unchanged reconnect published a snapshot"
    );

    // Restart the hub on the same port: the agent reconnects and resyncs; the client
    // reconnects holding its versions and is sent nothing.
    hub.shutdown().await.unwrap();
    drop(d);
    let (hub, _dir2) = federated_hub(
        Duration::from_secs(60),
        Duration::from_millis(1500),
        Some(addr),
    )
    .await;
    wait_snapshot(&hub, "prod", "resynced after hub restart", |s| {
        s.of_type(XdsType::Endpoint).len() == 3
    })
    .await;
    let mut d2 = Delta::open_addr(addr).await;
    d2.send(DeltaDiscoveryRequest {
        node: Some(node("p1", "prod")),
        type_url: EDS.into(),
        resource_names_subscribe: held.keys().cloned().collect(),
        initial_resource_versions: held.clone(),
        ..Default::default()
    })
    .await;
    let r = d2.recv().await;
    assert!(
        r.resources.is_empty() && r.removed_resources.is_empty(),
        "re-sent {:?} / removed {:?}",
        delta_names(&r),
        r.removed_resources
    );
    let sent = hub
        .metrics
        .xds_resources_sent
        .get_or_create(&XdsType::Endpoint.into())
        .get();
    assert_eq!(
        sent, 0,
        "no endpoint resource was pushed after the restarts"
    );
    // Exactly the same endpoints, none lost or duplicated.
    let snap = hub.snapshots.current("prod");
    for n in ["a", "b", "c"] {
        let c = cla(&snap, &cla_name(n)).unwrap();
        assert_eq!(endpoint_count(&c), 2, "{n}");
        assert_eq!(
            snap.get(XdsType::Endpoint, &cla_name(n)).unwrap().version(),
            held[&cla_name(n)]
        );
    }
    agent.stop().await;
}

/// An agent that starts again while its cluster is still being listed sends what it
/// has listed as the opening parts of a full resync: the hub, still holding the
/// cluster from the agent's previous process, withdraws nothing until the list is
/// complete (not even a service the list saw go), then exactly what the complete state
/// lacks. Before, the new agent sent an empty full resync at once: every service was
/// withdrawn until the list ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_while_listing_withdraws_nothing_before_its_list_ends() {
    let (hub, _dir) = federated_hub(Duration::from_secs(60), Duration::ZERO, None).await;
    let eps = [pb_endpoint("10.3.0.1", true), pb_endpoint("10.3.0.2", true)];
    let agent = TestAgent::start(hub.xds_addr, "c1", state(&["a", "b", "c"], &eps));
    let two_each = |s: &Snapshot, names: &[&str]| {
        names
            .iter()
            .all(|n| cla(s, &cla_name(n)).is_some_and(|c| endpoint_count(&c) == 2))
    };
    wait_snapshot(&hub, "prod", "a, b and c with their endpoints", |s| {
        two_each(s, &["a", "b", "c"])
    })
    .await;
    agent.stop().await;
    wait_clusters(&hub, "c1 in grace", |c| {
        c.iter().any(|c| c.id == "c1" && c.state == "grace")
    })
    .await;

    // The new process has listed nothing, then its services (a new one, d, among
    // them) without their endpoints: the hub keeps every endpoint it holds.
    let agent = TestAgent::start(hub.xds_addr, "c1", ClusterState::listing());
    let mut listed = state(&["a", "b", "c", "d"], &[]);
    listed.endpoints.clear();
    listed.listing = true;
    agent.set(listed.clone());
    let snap = wait_snapshot(&hub, "prod", "d, listed", |s| {
        s.get(XdsType::Cluster, &format!("outbound|80||{}", host("d")))
            .is_some()
    })
    .await;
    assert!(
        two_each(&snap, &["a", "b", "c"]),
        "endpoints withdrawn by a partial export"
    );
    let status = wait_clusters(&hub, "c1's resync open", |c| {
        c.iter()
            .any(|c| c.id == "c1" && c.sessions == 2 && c.resync_in_progress)
    })
    .await;
    assert!(status.iter().any(|c| c.id == "c1" && c.services == 4));

    // c goes while the list goes on (and e is listed): still nothing is withdrawn.
    listed.set_service(svc_key("c"), None, SystemTime::now());
    listed.set_service(
        svc_key("e"),
        Some(pb_service("e", "prod")),
        SystemTime::now(),
    );
    agent.set(listed);
    let snap = wait_snapshot(&hub, "prod", "e, listed", |s| {
        s.get(XdsType::Cluster, &format!("outbound|80||{}", host("e")))
            .is_some()
    })
    .await;
    assert!(
        two_each(&snap, &["a", "b", "c"]),
        "withdrawn before the list ended"
    );

    // The list is complete: c is withdrawn, everything else has its endpoints.
    agent.set(state(&["a", "b", "d", "e"], &eps));
    let snap = wait_snapshot(&hub, "prod", "c withdrawn", |s| {
        cla(s, &cla_name("c")).is_none()
    })
    .await;
    assert!(two_each(&snap, &["a", "b", "d", "e"]));
    assert!(
        snap.get(XdsType::Cluster, &format!("outbound|80||{}", host("c")))
            .is_none()
    );
    let status = wait_clusters(&hub, "c1's resync closed", |c| {
        c.iter()
            .any(|c| c.id == "c1" && !c.resync_in_progress && c.endpoints == 8)
    })
    .await;
    assert!(status.iter().any(|c| c.id == "c1" && c.services == 4));
    agent.stop().await;
}

/// The state that completes an agent's first list (it closes the open resync) is sent
/// at once, not after the agent's batching window: nothing more is coming for the
/// window to gather. The window here is 60 s; the complete state must be applied and
/// published within 10 s (before, it waited the whole window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_that_completes_the_first_list_is_sent_at_once() {
    let (hub, _dir) = federated_hub(Duration::from_secs(60), Duration::ZERO, None).await;
    let window = Duration::from_secs(60);
    // The agent has listed service a (its endpoints not yet): sent at connect as the
    // open resync's first part.
    let mut listed = state(&["a"], &[]);
    listed.endpoints.clear();
    listed.listing = true;
    let agent = TestAgent::start_with(hub.xds_addr, "c1", listed, window);
    wait_clusters(&hub, "c1's resync open with a", |c| {
        c.iter()
            .any(|c| c.id == "c1" && c.resync_in_progress && c.services == 1)
    })
    .await;
    let eps = [pb_endpoint("10.4.0.1", true), pb_endpoint("10.4.0.2", true)];
    let mut rx = hub.index.watch_clusters();
    agent.set(state(&["a", "b"], &eps));
    let done = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|c| {
            c.iter().any(|c| {
                c.id == "c1"
                    && !c.resync_in_progress
                    && c.services == 2
                    && c.endpoints == 4
                    && c.published_version == c.last_version
            })
        }),
    )
    .await
    .is_ok();
    assert!(
        done,
        "the complete state was not sent within 10 s (the agent's window is {window:?})"
    );
    let snap = hub.snapshots.current("prod");
    assert!(cla(&snap, &cla_name("b")).is_some_and(|c| endpoint_count(&c) == 2));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_clusters_then_ten_die() {
    const CLUSTERS: usize = 100;
    const SERVICES: usize = 200;
    let grace = Duration::from_secs(3);
    let (hub, _dir) = federated_hub(grace, Duration::ZERO, None).await;
    let names: Vec<String> = (0..SERVICES).map(|i| format!("svc-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut agents = Vec::new();
    for c in 0..CLUSTERS {
        let eps = [pb_endpoint(&format!("10.{}.{}.1", c / 250, c % 250), true)];
        agents.push(TestAgent::start(
            hub.xds_addr,
            &format!("cluster-{c}"),
            state(&refs, &eps),
        ));
    }
    let full = |s: &Arc<Snapshot>| {
        s.of_type(XdsType::Endpoint).len() == SERVICES
            && cla(s, &cla_name("svc-0")).is_some_and(|c| c.endpoints.len() == CLUSTERS)
            && cla(s, &cla_name(&format!("svc-{}", SERVICES - 1)))
                .is_some_and(|c| c.endpoints.len() == CLUSTERS)
    };
    let snap = wait_snapshot(&hub, "prod", "the union of all clusters", full).await;
    let c = cla(&snap, &cla_name("svc-7")).unwrap();
    let mut subzones: Vec<String> = c
        .endpoints
        .iter()
        .map(|l| l.locality.as_ref().unwrap().sub_zone.clone())
        .collect();
    subzones.sort();
    subzones.dedup();
    assert_eq!(subzones.len(), CLUSTERS, "one locality per cluster");
    let status = hub.index.clusters();
    assert_eq!(status.len(), CLUSTERS);
    assert!(
        status
            .iter()
            .all(|c| c.services == SERVICES && c.endpoints == SERVICES && c.state == "connected")
    );

    // Kill ten agents.
    let killed_at = Instant::now();
    for a in agents.drain(..10) {
        a.kill();
    }
    wait_clusters(&hub, "ten clusters in grace", |c| {
        c.iter().filter(|c| c.state == "grace").count() == 10
    })
    .await;
    // Still present during the grace period.
    assert!(
        cla(&hub.snapshots.current("prod"), &cla_name("svc-0"))
            .is_some_and(|c| c.endpoints.len() == CLUSTERS)
    );
    let snap = wait_snapshot(&hub, "prod", "withdrawn after grace", |s| {
        cla(s, &cla_name("svc-0")).is_some_and(|c| c.endpoints.len() == CLUSTERS - 10)
    })
    .await;
    assert!(
        killed_at.elapsed() >= grace,
        "withdrawn after {:?}, before the grace period",
        killed_at.elapsed()
    );
    assert!(cla(&snap, &cla_name("svc-199")).is_some_and(|c| c.endpoints.len() == CLUSTERS - 10));
    assert_eq!(hub.index.clusters().len(), CLUSTERS - 10);
    for a in agents {
        a.stop().await;
    }
}

async fn raw_session(
    hub: &Hub,
    cluster: &str,
) -> (
    tokio::sync::mpsc::Sender<pb::AgentMessage>,
    tonic::Streaming<pb::HubMessage>,
) {
    let mut client = FederationClient::connect(format!("http://{}", hub.xds_addr))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let hello = pb::Hello {
        cluster_id: cluster.into(),
        zone: "az1".into(),
        ..Default::default()
    };
    tx.send(pb::AgentMessage {
        kind: Some(agent_message::Kind::Hello(hello)),
    })
    .await
    .unwrap();
    let inbound = client
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, inbound)
}

async fn next_kind(s: &mut tonic::Streaming<pb::HubMessage>) -> hub_message::Kind {
    loop {
        let m = tokio::time::timeout(TIMEOUT, s.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match m.kind.unwrap() {
            hub_message::Kind::Heartbeat(_) => continue,
            k => return k,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_for_a_live_cluster_is_rejected() {
    let (hub, _dir) = federated_hub(Duration::from_secs(60), Duration::ZERO, None).await;
    let (_tx1, mut s1) = raw_session(&hub, "dup").await;
    assert!(matches!(
        next_kind(&mut s1).await,
        hub_message::Kind::Welcome(_)
    ));
    let (_tx2, mut s2) = raw_session(&hub, "dup").await;
    match next_kind(&mut s2).await {
        hub_message::Kind::Reject(r) => assert!(
            r.message.contains("already has a live agent"),
            "{}",
            r.message
        ),
        other => panic!("expected Reject, got {other:?}"),
    }
    let err = tokio::time::timeout(TIMEOUT, s2.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_items_are_rejected_and_the_rest_applied() {
    let (hub, _dir) = federated_hub(Duration::from_secs(60), Duration::ZERO, None).await;
    let (tx, mut s) = raw_session(&hub, "c9").await;
    assert!(matches!(
        next_kind(&mut s).await,
        hub_message::Kind::Welcome(_)
    ));
    let mut bad_port = pb_service("bad", "prod");
    bad_port.ports[0].port = 70000;
    let mut bad_name = pb_service("x", "prod");
    bad_name.name = String::new();
    let bad_addr = pb::EndpointSet {
        namespace: "shop".into(),
        service: "good".into(),
        endpoints: vec![pb_endpoint("999.1.1.1", true)],
    };
    let changes = vec![
        pb::Change {
            origin_unix_nanos: 1,
            kind: Some(pb::change::Kind::ServiceUpsert(bad_port)),
        },
        pb::Change {
            origin_unix_nanos: 1,
            kind: Some(pb::change::Kind::ServiceUpsert(pb_service("good", "prod"))),
        },
        pb::Change {
            origin_unix_nanos: 1,
            kind: Some(pb::change::Kind::ServiceUpsert(bad_name)),
        },
        pb::Change {
            origin_unix_nanos: 1,
            kind: Some(pb::change::Kind::EndpointsUpsert(bad_addr)),
        },
        pb::Change {
            origin_unix_nanos: 1,
            kind: None,
        },
    ];
    let batch = pb::ChangeBatch {
        version: 1,
        full: false,
        changes,
        ..Default::default()
    };
    tx.send(pb::AgentMessage {
        kind: Some(agent_message::Kind::Batch(batch)),
    })
    .await
    .unwrap();
    let hub_message::Kind::Ack(ack) = next_kind(&mut s).await else {
        panic!("expected Ack")
    };
    assert_eq!(ack.version, 1);
    let indexes: Vec<u32> = ack.errors.iter().map(|e| e.index).collect();
    assert_eq!(indexes, vec![0, 2, 3, 4]);
    assert!(
        ack.errors[0].message.contains("70000 is out of range"),
        "{}",
        ack.errors[0].message
    );
    assert!(
        ack.errors[2]
            .message
            .contains("not an IPv4 or IPv6 address"),
        "{}",
        ack.errors[2].message
    );
    wait_snapshot(&hub, "prod", "the good service", |snap| {
        snap.get(XdsType::Cluster, &cla_name("good")).is_some()
    })
    .await;
    // The stream carries on.
    let batch = pb::ChangeBatch {
        version: 2,
        full: false,
        changes: vec![],
        ..Default::default()
    };
    tx.send(pb::AgentMessage {
        kind: Some(agent_message::Kind::Batch(batch)),
    })
    .await
    .unwrap();
    assert!(matches!(
        next_kind(&mut s).await,
        hub_message::Kind::Ack(pb::Ack { version: 2, .. })
    ));
}

// ---- resyncs, rejection, per-item validation, incarnations, restarts ------------

async fn hub_with(tweak: impl FnOnce(&mut HubConfig)) -> (Hub, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.yaml"), "# no file config\n").unwrap();
    let mut cfg = HubConfig::local(vec![dir.path().to_path_buf()]);
    cfg.debounce.quiet = Duration::from_millis(20);
    tweak(&mut cfg);
    (Hub::start(cfg).await.unwrap(), dir)
}

/// A plain HTTP/1.1 GET on loopback: (status line, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn batch_msg(b: pb::ChangeBatch) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(agent_message::Kind::Batch(b)),
    }
}

fn upsert_eps(name: &str, endpoints: Vec<pb::Endpoint>) -> pb::Change {
    pb::Change {
        origin_unix_nanos: 1,
        kind: Some(pb::change::Kind::EndpointsUpsert(pb::EndpointSet {
            namespace: "shop".into(),
            service: name.into(),
            endpoints,
        })),
    }
}

fn upsert_svc(name: &str) -> pb::Change {
    pb::Change {
        origin_unix_nanos: 1,
        kind: Some(pb::change::Kind::ServiceUpsert(pb_service(name, "prod"))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_200000_endpoints_resyncs_completely() {
    // 26,000 services x 8 endpoints: 52,000 changes in the agent's full resync (the
    // reproduction in issue 7: once sent as one batch that the hub dropped).
    const SERVICES: usize = 26_000;
    const PER_SERVICE: usize = 8;
    let (hub, _dir) = hub_with(|_| {}).await;
    let mut s = ClusterState::default();
    let now = SystemTime::now();
    for i in 0..SERVICES {
        let name = format!("s{i}");
        s.set_service(svc_key(&name), Some(pb_service(&name, "prod")), now);
        let endpoints = (0..PER_SERVICE)
            .map(|j| {
                let n = i * PER_SERVICE + j;
                pb_endpoint(
                    &format!("10.{}.{}.{}", n >> 16, (n >> 8) & 255, n & 255),
                    true,
                )
            })
            .collect();
        let set = pb::EndpointSet {
            namespace: "shop".into(),
            service: name.clone(),
            endpoints,
        };
        s.set_endpoints(svc_key(&name), Some(set), now);
    }
    let agent = TestAgent::start(hub.xds_addr, "big", s);
    let status = wait_clusters(&hub, "every service and endpoint applied", |c| {
        c.iter().any(|c| {
            c.id == "big" && c.services == SERVICES && c.endpoints == SERVICES * PER_SERVICE
        })
    })
    .await;
    let big = status.iter().find(|c| c.id == "big").unwrap();
    assert_eq!(big.batches_rejected, 0, "{:?}", big.last_batch_error);
    assert!(!big.resync_in_progress);
    assert!(
        big.last_version > 1,
        "the resync was split into several batches"
    );
    let last = cla_name(&format!("s{}", SERVICES - 1));
    let snap = wait_snapshot(&hub, "prod", "the last service's endpoints", |s| {
        cla(s, &last).is_some_and(|c| endpoint_count(&c) == PER_SERVICE)
    })
    .await;
    assert_eq!(snap.of_type(XdsType::Endpoint).len(), SERVICES);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_address_among_1000_keeps_the_other_999_and_its_previous_form() {
    let (hub, _dir) = hub_with(|_| {}).await;
    let (tx, mut s) = raw_session(&hub, "c7").await;
    assert!(matches!(
        next_kind(&mut s).await,
        hub_message::Kind::Welcome(_)
    ));
    let endpoint = |i: usize, addr: String, port: u32| pb::Endpoint {
        addresses: vec![addr],
        ports: [("http".to_string(), port)].into(),
        ready: true,
        serving: true,
        name: format!("pod-{i}"),
        ..Default::default()
    };
    let addr = |i: usize| format!("10.0.{}.{}", i / 250, i % 250 + 1);
    let first: Vec<pb::Endpoint> = (0..1000).map(|i| endpoint(i, addr(i), 8080)).collect();
    tx.send(batch_msg(pb::ChangeBatch {
        version: 1,
        full: true,
        changes: vec![upsert_svc("web"), upsert_eps("web", first)],
        ..Default::default()
    }))
    .await
    .unwrap();
    assert!(matches!(
        next_kind(&mut s).await,
        hub_message::Kind::Ack(pb::Ack { version: 1, .. })
    ));
    // Every endpoint moves to port 9090; endpoint 17's new address is invalid.
    let second: Vec<pb::Endpoint> = (0..1000)
        .map(|i| {
            let a = if i == 17 {
                "10.0.0.999".to_string()
            } else {
                addr(i)
            };
            endpoint(i, a, 9090)
        })
        .collect();
    tx.send(batch_msg(pb::ChangeBatch {
        version: 2,
        changes: vec![upsert_eps("web", second)],
        ..Default::default()
    }))
    .await
    .unwrap();
    let hub_message::Kind::Ack(ack) = next_kind(&mut s).await else {
        panic!("expected Ack")
    };
    assert_eq!(ack.version, 2);
    assert_eq!(ack.errors.len(), 1, "{:?}", ack.errors);
    assert_eq!(ack.errors[0].index, 0);
    assert!(
        ack.errors[0].message.starts_with(
            r#"endpoints[17].addresses[0]: "10.0.0.999" is not an IPv4 or IPv6 address"#
        ),
        "{}",
        ack.errors[0].message
    );
    let ports = |c: &ClusterLoadAssignment| {
        let mut v: Vec<(String, u32)> = c
            .endpoints
            .iter()
            .flat_map(|l| l.lb_endpoints.iter())
            .map(|e| {
                use tributary_proto::envoy::envoy::config::core::v3::address::Address;
                use tributary_proto::envoy::envoy::config::core::v3::socket_address::PortSpecifier;
                use tributary_proto::envoy::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
                let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    panic!("no endpoint")
                };
                let Some(Address::SocketAddress(sa)) =
                    ep.address.as_ref().and_then(|a| a.address.as_ref())
                else {
                    panic!("no socket address")
                };
                let Some(PortSpecifier::PortValue(p)) = sa.port_specifier else {
                    panic!("no port")
                };
                (sa.address.clone(), p)
            })
            .collect();
        v.sort();
        v
    };
    let snap = wait_snapshot(&hub, "prod", "999 endpoints on the new port", |s| {
        cla(s, &cla_name("web"))
            .is_some_and(|c| ports(&c).iter().filter(|(_, p)| *p == 9090).count() == 999)
    })
    .await;
    let all = ports(&cla(&snap, &cla_name("web")).unwrap());
    assert_eq!(all.len(), 1000);
    let old: Vec<_> = all.iter().filter(|(_, p)| *p == 8080).collect();
    assert_eq!(
        old,
        [&(addr(17), 8080)],
        "endpoint 17 keeps its previous form"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_batches_and_messages_are_rejected_not_acknowledged() {
    let (hub, _dir) = hub_with(|c| {
        c.federation.max_batch_changes = 100;
        c.federation.max_message_bytes = 64 << 10;
        c.federation.max_endpoints_per_set = 20;
    })
    .await;
    // Over the endpoint-set limit: that item is rejected, the batch applied.
    let (tx, mut s) = raw_session(&hub, "sets").await;
    assert!(matches!(
        next_kind(&mut s).await,
        hub_message::Kind::Welcome(_)
    ));
    let eps = |n: usize| {
        (0..n)
            .map(|i| pb_endpoint(&format!("10.8.0.{}", i + 1), true))
            .collect()
    };
    tx.send(batch_msg(pb::ChangeBatch {
        version: 1,
        full: true,
        changes: vec![
            upsert_svc("fine"),
            upsert_eps("fine", eps(20)),
            upsert_svc("wide"),
            upsert_eps("wide", eps(21)),
        ],
        ..Default::default()
    }))
    .await
    .unwrap();
    let hub_message::Kind::Ack(ack) = next_kind(&mut s).await else {
        panic!("expected Ack")
    };
    assert_eq!(ack.errors.len(), 1, "{:?}", ack.errors);
    assert_eq!(ack.errors[0].index, 3);
    assert!(
        ack.errors[0]
            .message
            .contains("21 endpoints exceed the limit of 20 (--federation-max-endpoints-per-set)"),
        "{}",
        ack.errors[0].message
    );
    drop(tx);
    // Over the change limit: a BatchRejected, never an Ack, then the stream ends.
    let (tx, mut s) = raw_session(&hub, "big").await;
    let hub_message::Kind::Welcome(w) = next_kind(&mut s).await else {
        panic!("expected Welcome")
    };
    assert_eq!((w.max_batch_changes, w.max_message_bytes), (100, 64 << 10));
    let changes: Vec<pb::Change> = (0..101).map(|i| upsert_svc(&format!("s{i}"))).collect();
    tx.send(batch_msg(pb::ChangeBatch {
        version: 1,
        full: true,
        changes,
        ..Default::default()
    }))
    .await
    .unwrap();
    match next_kind(&mut s).await {
        hub_message::Kind::BatchRejected(r) => {
            assert_eq!(r.version, 1);
            assert!(
                r.message.contains("101 changes exceed the limit of 100"),
                "{}",
                r.message
            );
        }
        other => panic!("expected BatchRejected, got {other:?}"),
    }
    let end = tokio::time::timeout(TIMEOUT, s.message()).await.unwrap();
    assert_eq!(end.unwrap_err().code(), tonic::Code::Aborted);
    let status = wait_clusters(&hub, "the rejection in status", |c| {
        c.iter().any(|c| c.id == "big" && c.batches_rejected == 1)
    })
    .await;
    let big = status.iter().find(|c| c.id == "big").unwrap();
    assert_eq!(
        (big.services, big.last_version),
        (0, 0),
        "nothing applied, nothing acknowledged"
    );
    assert!(
        big.last_batch_error
            .as_deref()
            .unwrap()
            .contains("exceed the limit")
    );

    // Over the decode limit: a clear error, and the hub stays up.
    let (tx, mut s) = raw_session(&hub, "huge").await;
    assert!(matches!(
        next_kind(&mut s).await,
        hub_message::Kind::Welcome(_)
    ));
    let mut fat = pb_service("fat", "prod");
    fat.hosts = (0..2000)
        .map(|i| format!("host-{i:04}.shop.example.internal"))
        .collect();
    tx.send(batch_msg(pb::ChangeBatch {
        version: 1,
        changes: vec![pb::Change {
            origin_unix_nanos: 1,
            kind: Some(pb::change::Kind::ServiceUpsert(fat)),
        }],
        ..Default::default()
    }))
    .await
    .unwrap();
    match next_kind(&mut s).await {
        hub_message::Kind::BatchRejected(r) => {
            assert!(
                r.message.contains("exceeds the hub's limit of 65536 bytes"),
                "{}",
                r.message
            )
        }
        other => panic!("expected BatchRejected, got {other:?}"),
    }
    let err = tokio::time::timeout(TIMEOUT, s.message())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        err.message().contains("--federation-max-message-bytes"),
        "{err}"
    );
    let rejected = hub.metrics.federation_batches_rejected.get();
    assert_eq!(rejected, 2);
    let (_, body) = http_get(hub.admin_addr, "/metrics").await;
    assert!(
        body.contains("tributary_federation_batches_rejected_total 2"),
        "{body}"
    );
    // Still serving: a well-behaved agent federates.
    let agent = TestAgent::start(
        hub.xds_addr,
        "ok",
        state(&["web"], &[pb_endpoint("10.3.0.1", true)]),
    );
    wait_snapshot(&hub, "prod", "the next agent's service", |s| {
        cla(s, &cla_name("web")).is_some_and(|c| endpoint_count(&c) == 1)
    })
    .await;
    agent.stop().await;
}

/// A scripted hub: rejects the first batch of the first session, acknowledges
/// everything after; reports each Hello.
#[derive(Debug, Clone)]
struct ScriptedHub {
    hellos: tokio::sync::mpsc::UnboundedSender<pb::Hello>,
    sessions: Arc<std::sync::atomic::AtomicU32>,
}

#[tonic::async_trait]
impl tributary_proto::federation::v1::federation_server::Federation for ScriptedHub {
    type StreamStream = ReceiverStream<Result<pb::HubMessage, tonic::Status>>;

    async fn stream(
        &self,
        request: tonic::Request<tonic::Streaming<pb::AgentMessage>>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let n = self
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let hellos = self.hellos.clone();
        tokio::spawn(async move {
            let msg = |k| Ok(pb::HubMessage { kind: Some(k) });
            while let Ok(Some(m)) = inbound.message().await {
                match m.kind {
                    Some(agent_message::Kind::Hello(h)) => {
                        let _ = hellos.send(h);
                        let w = pb::Welcome::default();
                        let _ = tx.send(msg(hub_message::Kind::Welcome(w))).await;
                    }
                    Some(agent_message::Kind::Batch(b)) if n == 0 => {
                        let r = pb::BatchRejected {
                            version: b.version,
                            message: "scripted rejection".into(),
                        };
                        let _ = tx.send(msg(hub_message::Kind::BatchRejected(r))).await;
                        let _ = tx.send(Err(tonic::Status::aborted("rejected"))).await;
                        return;
                    }
                    Some(agent_message::Kind::Batch(b)) => {
                        let ack = pb::Ack {
                            version: b.version,
                            errors: vec![],
                        };
                        let _ = tx.send(msg(hub_message::Kind::Ack(ack))).await;
                    }
                    _ => {}
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves a [`ScriptedHub`] on a free loopback port: its address and the Hellos it gets.
async fn scripted_hub() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<pb::Hello>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (hellos_tx, hellos) = tokio::sync::mpsc::unbounded_channel();
    let scripted = ScriptedHub {
        hellos: hellos_tx,
        sessions: Arc::default(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                tributary_proto::federation::v1::federation_server::FederationServer::new(scripted),
            )
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, hellos)
}

async fn next_hello(h: &mut tokio::sync::mpsc::UnboundedReceiver<pb::Hello>) -> pb::Hello {
    tokio::time::timeout(TIMEOUT, h.recv())
        .await
        .unwrap()
        .unwrap()
}

/// The hub rejects the first batch of a long resync and ends the stream while the
/// agent is still sending the rest: the agent's sends fail, and it must still read
/// why the hub ended the stream (the rejection queued behind them), not just report
/// "outbound stream closed" and lose it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_is_read_even_when_the_hub_closes_the_stream_mid_send() {
    use tributary_controlplane::agent::admin::Telemetry;
    let (addr, mut hellos) = scripted_hub().await;
    let mut cfg = AgentConfig::new(format!("http://{addr}"), "c1");
    cfg.backoff_initial = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(50);
    // One change per batch: thousands of batches, far more than the stream's flow
    // window holds once the hub stops reading after the first.
    cfg.max_batch = 1;
    let names: Vec<String> = (0..20_000).map(|i| format!("svc-{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let telemetry = Arc::new(Telemetry::new(&cfg, agent::new_incarnation()));
    let (_tx, rx) = watch::channel(Arc::new(state(&names, &[pb_endpoint("10.4.0.1", true)])));
    let task = tokio::spawn(agent::run_with(
        cfg,
        rx,
        std::future::pending(),
        telemetry.clone(),
    ));
    next_hello(&mut hellos).await;
    let second = next_hello(&mut hellos).await;
    assert_eq!(second.last_acked_version, 0);
    let status = telemetry.status();
    assert_eq!(
        (
            status.batches_rejected,
            status.last_session_error.as_deref()
        ),
        (
            1,
            Some("the hub rejected batch 1 (not applied): scripted rejection")
        ),
        "the first session ended on the hub's rejection"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reports_a_rejected_batch_and_resyncs() {
    use tributary_controlplane::agent::admin::Telemetry;
    let (addr, mut hellos) = scripted_hub().await;
    let mut cfg = AgentConfig::new(format!("http://{addr}"), "c1");
    cfg.backoff_initial = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(50);
    let telemetry = Arc::new(Telemetry::new(&cfg, agent::new_incarnation()));
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    tokio::spawn(agent::admin::serve(
        admin,
        telemetry.clone(),
        std::future::pending(),
    ));
    let (_tx, rx) = watch::channel(Arc::new(state(&["web"], &[pb_endpoint("10.4.0.1", true)])));
    let task = tokio::spawn(agent::run_with(
        cfg,
        rx,
        std::future::pending(),
        telemetry.clone(),
    ));

    let first = next_hello(&mut hellos).await;
    let second = next_hello(&mut hellos).await;
    assert_eq!(first.incarnation, telemetry.incarnation());
    assert_eq!(second.incarnation, first.incarnation, "the same process");
    assert_eq!(
        second.last_acked_version, 0,
        "the rejected batch was not taken as acknowledged"
    );
    let status = telemetry.status();
    assert_eq!(status.batches_rejected, 1);
    let r = status.last_rejection.as_ref().unwrap();
    assert_eq!((r.version, r.message.as_str()), (1, "scripted rejection"));
    // The resync on the second session is acknowledged.
    tokio::time::timeout(TIMEOUT, async {
        while telemetry.status().version_acked < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the resync is acknowledged");
    let (line, body) = http_get(admin_addr, "/metrics").await;
    assert!(line.contains("200"), "{line}");
    assert!(
        body.contains("tributary_agent_batches_rejected_total 1"),
        "{body}"
    );
    let (_, body) = http_get(admin_addr, "/status").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["batches_rejected"], 1);
    assert_eq!(v["last_rejection"]["message"], "scripted rejection");
    assert_eq!(v["state"], "connected");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_process_with_a_matching_counter_does_not_resume() {
    let (hub, _dir) = hub_with(|_| {}).await;
    let agent = TestAgent::start(
        hub.xds_addr,
        "c1",
        state(&["web"], &[pb_endpoint("10.5.0.1", true)]),
    );
    let status = wait_clusters(&hub, "c1 synced", |c| {
        c.iter()
            .any(|c| c.id == "c1" && c.last_version >= 1 && c.services == 1)
    })
    .await;
    let version = status.iter().find(|c| c.id == "c1").unwrap().last_version;
    agent.stop().await;
    wait_clusters(&hub, "c1 in grace", |c| {
        c.iter().any(|c| c.id == "c1" && c.state == "grace")
    })
    .await;
    // Another process, whose own counter happens to be at the same version.
    let mut client = FederationClient::connect(format!("http://{}", hub.xds_addr))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::AgentMessage {
        kind: Some(agent_message::Kind::Hello(pb::Hello {
            cluster_id: "c1".into(),
            last_acked_version: version,
            incarnation: agent::new_incarnation(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut s = client
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    match next_kind(&mut s).await {
        hub_message::Kind::Welcome(w) => assert!(!w.resume, "resumed another process's state"),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_may_not_share_a_state_dir() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_path_buf();
    let (_hub, _d1) = hub_with(|c| c.state_dir = Some(dir.clone())).await;
    let d2 = tempfile::tempdir().unwrap();
    std::fs::write(d2.path().join("empty.yaml"), "# none\n").unwrap();
    let mut cfg = HubConfig::local(vec![d2.path().to_path_buf()]);
    cfg.state_dir = Some(dir.clone());
    let err = format!("{:#}", Hub::start(cfg).await.unwrap_err());
    assert!(
        err.contains(&dir.display().to_string()) && err.contains("in use by another hub (pid "),
        "{err}"
    );
}

/// What a reconnecting xDS client saw: (when, held withdrawals at that moment,
/// names added or listed, names removed).
type Log = Arc<std::sync::Mutex<Vec<(Instant, bool, Vec<String>, Vec<String>)>>>;

/// A Delta CDS client that reconnects like Envoy: wildcard, announcing what it holds
/// in `initial_resource_versions`; records every response and ACKs it.
async fn delta_client(addr: std::net::SocketAddr, log: Log, held: watch::Receiver<bool>) {
    use tributary_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let mut have: std::collections::HashMap<String, String> = Default::default();
    loop {
        if let Ok(mut client) =
            AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await
        {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let first = DeltaDiscoveryRequest {
                node: Some(node("delta-1", "prod")),
                type_url: CDS.into(),
                initial_resource_versions: have.clone(),
                ..Default::default()
            };
            tx.send(first).await.unwrap();
            if let Ok(resp) = client
                .delta_aggregated_resources(ReceiverStream::new(rx))
                .await
            {
                let mut stream = resp.into_inner();
                while let Ok(Some(r)) = stream.message().await {
                    for res in &r.resources {
                        have.insert(res.name.clone(), res.version.clone());
                    }
                    for n in &r.removed_resources {
                        have.remove(n);
                    }
                    log.lock().unwrap().push((
                        Instant::now(),
                        *held.borrow(),
                        r.resources.iter().map(|x| x.name.clone()).collect(),
                        r.removed_resources.clone(),
                    ));
                    let ack = DeltaDiscoveryRequest {
                        type_url: CDS.into(),
                        response_nonce: r.nonce.clone(),
                        ..Default::default()
                    };
                    if tx.send(ack).await.is_err() {
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A SotW CDS client that reconnects like Envoy: wildcard, with the last ACKed
/// `version_info`; records the full set of every response and ACKs it.
async fn sotw_client(addr: std::net::SocketAddr, log: Log, held: watch::Receiver<bool>) {
    use tributary_proto::envoy::envoy::service::discovery::v3::DiscoveryRequest;
    use tributary_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let mut version = String::new();
    loop {
        if let Ok(mut client) =
            AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await
        {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let first = DiscoveryRequest {
                node: Some(node("sotw-1", "prod")),
                type_url: CDS.into(),
                version_info: version.clone(),
                ..Default::default()
            };
            tx.send(first).await.unwrap();
            if let Ok(resp) = client
                .stream_aggregated_resources(ReceiverStream::new(rx))
                .await
            {
                let mut stream = resp.into_inner();
                while let Ok(Some(r)) = stream.message().await {
                    log.lock()
                        .unwrap()
                        .push((Instant::now(), *held.borrow(), names(&r), vec![]));
                    version = r.version_info.clone();
                    let ack = DiscoveryRequest {
                        type_url: CDS.into(),
                        version_info: r.version_info.clone(),
                        response_nonce: r.nonce.clone(),
                        ..Default::default()
                    };
                    if tx.send(ack).await.is_err() {
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn cds_name(name: &str) -> String {
    format!("outbound|80||{}", host(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_restart_withdraws_nothing_while_agents_return() {
    const CLUSTERS: usize = 20;
    let state_dir = tempfile::tempdir().unwrap();
    let start = |addr: Option<std::net::SocketAddr>| {
        let dir = state_dir.path().to_path_buf();
        hub_with(move |c| {
            c.state_dir = Some(dir);
            c.grace = Duration::from_secs(60);
            if let Some(a) = addr {
                c.xds_addr = a;
            }
        })
    };
    let (hub, _cfg1) = start(None).await;
    let addr = hub.xds_addr;
    let services: Vec<String> = (0..CLUSTERS).map(|i| format!("svc-{i}")).collect();
    let agent_for = |i: usize| {
        TestAgent::start(
            addr,
            &format!("cluster-{i}"),
            state(
                &[services[i].as_str()],
                &[pb_endpoint(&format!("10.6.0.{}", i + 1), true)],
            ),
        )
    };
    let agents: Vec<TestAgent> = (0..CLUSTERS).map(agent_for).collect();
    let all = |s: &Arc<Snapshot>| {
        services
            .iter()
            .all(|n| s.get(XdsType::Cluster, &cds_name(n)).is_some())
    };
    wait_snapshot(&hub, "prod", "every cluster's service", all).await;

    // Clients that outlive the hub; `held` follows whichever hub is running.
    let (held_tx, held_rx) = watch::channel(false);
    let (delta_log, sotw_log): (Log, Log) = Default::default();
    let clients = [
        tokio::spawn(delta_client(addr, delta_log.clone(), held_rx.clone())),
        tokio::spawn(sotw_client(addr, sotw_log.clone(), held_rx.clone())),
    ];
    let complete = |log: &Log| {
        log.lock()
            .unwrap()
            .iter()
            .any(|(_, _, names, _)| services.iter().all(|n| names.contains(&cds_name(n))))
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        while !(complete(&delta_log) && complete(&sotw_log)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("both clients hold every federated service");

    // The hub goes away for 30 s; then it returns, and the agents come back one by
    // one over 11 s (new processes: they resync in full).
    hub.shutdown().await.unwrap();
    for a in agents {
        a.stop().await;
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    let restarted = Instant::now();
    let (hub, _cfg2) = start(Some(addr)).await;
    let mut hold = hub.snapshots.withdrawals_held();
    assert!(
        *hold.borrow(),
        "the restarted hub holds withdrawals for its known clusters"
    );
    let forward = tokio::spawn(async move {
        loop {
            let h = *hold.borrow_and_update();
            held_tx.send_replace(h);
            if hold.changed().await.is_err() {
                return;
            }
        }
    });
    let mut agents = Vec::new();
    for i in 0..CLUSTERS {
        agents.push(agent_for(i));
        tokio::time::sleep(Duration::from_millis(550)).await;
    }
    wait_snapshot(&hub, "prod", "every cluster's service again", all).await;
    let mut held = hub.snapshots.withdrawals_held();
    tokio::time::timeout(Duration::from_secs(30), held.wait_for(|h| !*h))
        .await
        .expect("the hold is lifted once every known cluster resynced")
        .unwrap();
    assert!(hub.index.resync_pending().is_empty());
    // Let the clients settle on the final state.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let fed: Vec<String> = services.iter().map(|n| cds_name(n)).collect();
    for (at, held, _, removed) in delta_log.lock().unwrap().iter().filter(|e| e.0 > restarted) {
        let lost: Vec<&String> = removed.iter().filter(|n| fed.contains(n)).collect();
        assert!(
            lost.is_empty(),
            "a Delta client was told {lost:?} were removed {:?} after the restart (hold on: {held})",
            *at - restarted
        );
    }
    let sotw = sotw_log.lock().unwrap().clone();
    let after: Vec<_> = sotw.iter().filter(|e| e.0 > restarted).collect();
    assert!(!after.is_empty(), "the SotW client reconnected");
    for (at, held, names, _) in after {
        let missing: Vec<&String> = fed.iter().filter(|n| !names.contains(n)).collect();
        assert!(
            missing.is_empty(),
            "a SotW set {:?} after the restart lacked {missing:?} (hold on: {held})",
            *at - restarted
        );
    }
    for c in clients {
        c.abort();
    }
    forward.abort();
    for a in agents {
        a.stop().await;
    }
}

/// A disconnected cluster's endpoints are served unchanged — HEALTHY — in every
/// snapshot until its grace period ends, then withdrawn; an endpoint that is really
/// dead is handled by the proxies' outlier detection (docs/xds.md), not by the hub.
#[tokio::test]
async fn a_disconnected_clusters_endpoints_stay_healthy_for_the_whole_grace_period() {
    use tributary_proto::envoy::envoy::config::core::v3::HealthStatus;
    use tributary_proto::envoy::envoy::config::core::v3::address::Address;
    use tributary_proto::envoy::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier as Host;
    let grace = Duration::from_secs(2);
    let (hub, _dir) = federated_hub(grace, Duration::ZERO, None).await;
    let a = TestAgent::start(
        hub.xds_addr,
        "c1",
        state(&["svc"], &[pb_endpoint("10.0.0.1", true)]),
    );
    let b = TestAgent::start(
        hub.xds_addr,
        "c2",
        state(&["svc"], &[pb_endpoint("10.0.0.2", true)]),
    );
    let addresses = |s: &Snapshot| -> Vec<(String, i32)> {
        cla(s, &cla_name("svc"))
            .map(|c| {
                c.endpoints
                    .iter()
                    .flat_map(|l| &l.lb_endpoints)
                    .map(|e| {
                        let Some(Host::Endpoint(ep)) = &e.host_identifier else {
                            panic!("{e:?}")
                        };
                        let Some(Address::SocketAddress(sa)) =
                            ep.address.as_ref().and_then(|a| a.address.clone())
                        else {
                            panic!("{ep:?}")
                        };
                        (sa.address, e.health_status)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_snapshot(&hub, "prod", "both clusters' endpoints", |s| {
        addresses(s).len() == 2
    })
    .await;
    let mut rx = hub.snapshots.subscribe_or_create("prod");
    rx.borrow_and_update();
    let killed_at = Instant::now();
    a.kill();
    // Every snapshot until the withdrawal still holds 10.0.0.1, HEALTHY.
    let withdrawn = loop {
        tokio::time::timeout(TIMEOUT, rx.changed())
            .await
            .expect("a snapshot after the disconnect")
            .unwrap();
        let snap = rx.borrow_and_update().clone();
        let eps = addresses(&snap);
        if !eps.iter().any(|(a, _)| a == "10.0.0.1") {
            break eps;
        }
        let healthy = HealthStatus::Healthy as i32;
        assert!(eps.iter().all(|(_, h)| *h == healthy), "{eps:?}");
    };
    assert!(
        killed_at.elapsed() >= grace,
        "withdrawn after {:?}, before the grace period",
        killed_at.elapsed()
    );
    assert_eq!(
        withdrawn,
        [("10.0.0.2".to_string(), HealthStatus::Healthy as i32)]
    );
    b.stop().await;
}
