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
        let mut cfg = AgentConfig::new(format!("http://{hub}"), cluster);
        cfg.region = "region-1".into();
        cfg.zone = "az1".into();
        cfg.debounce = Duration::from_millis(10);
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
    let mut rx = hub.shards.subscribe_or_create(env);
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
    let published = |hub: &Hub| hub.shards.current("prod").seq;
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
    let snap = hub.shards.current("prod");
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
        cla(&hub.shards.current("prod"), &cla_name("svc-0"))
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
    let mut rx = hub.shards.subscribe_or_create("prod");
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
