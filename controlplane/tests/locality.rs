//! The cross-zone catalog and locality, in process: hubs on one embedded store, the
//! config applied through the API.
//!
//! - each shard's summaries are written by its leader only, updated when the healthy
//!   count changes, removed when the service goes; a new leader takes over;
//! - a zone's load assignments carry the other zones' gateways as priority-1
//!   localities weighted by their healthy endpoints, with the local share as the
//!   overprovisioning factor; when every local endpoint is unhealthy (or there is
//!   none) the remote zones take the traffic;
//! - endpoints with no zone, and environments with one zone, are served exactly as
//!   before; a proxy is served its own zone's view over ADS.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::time::timeout;
use tributary_controlplane::app::{Hub, HubConfig, StoreBackend};
use tributary_controlplane::catalog::{Summary, summary_key};
use tributary_controlplane::http_client;
use tributary_controlplane::xds::XdsType;
use tributary_controlplane::xds::generate::load_assignment;
use tributary_proto::envoy::envoy::config::core::v3::{
    Locality, address, socket_address::PortSpecifier,
};
use tributary_proto::envoy::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, lb_endpoint::HostIdentifier,
};
use tributary_proto::type_url;
use tributary_store::SharedStore;
use tributary_store::embedded::{Embedded, EmbeddedConfig};

const WAIT: Duration = Duration::from_secs(15);
const REVIEWS: &str = "outbound|9080||reviews.prod";
const RATINGS: &str = "outbound|9090||ratings.prod";

fn environments(local_percent: u32) -> String {
    format!(
        "apiVersion: tributary.io/v1alpha1
kind: Environment
metadata: {{name: prod}}
spec:
  zones: [az1, az2]
  eastWestGateways:
  - {{zone: az1, address: 10.1.255.1, port: 15443}}
  - {{zone: az2, address: \"fd00::2:ffff\", port: 15443}}
  locality: {{localPercent: {local_percent}}}
---
apiVersion: tributary.io/v1alpha1
kind: Environment
metadata: {{name: solo}}
spec:
  zones: [az1]
  eastWestGateways:
  - {{zone: az1, address: 10.9.255.1, port: 15443}}
"
    )
}

const SERVICES: &str = "apiVersion: tributary.io/v1alpha1
kind: Service
metadata: {name: reviews, environment: prod}
spec:
  hosts: [reviews.prod]
  ports: [{name: http, port: 9080, protocol: HTTP}]
---
apiVersion: tributary.io/v1alpha1
kind: Service
metadata: {name: ratings, environment: prod}
spec:
  hosts: [ratings.prod]
  ports: [{name: http, port: 9090, protocol: HTTP}]
---
apiVersion: tributary.io/v1alpha1
kind: Endpoints
metadata: {name: ratings, environment: prod}
spec:
  endpoints:
  - {address: 10.3.0.1, port: 8080}
  - {address: 10.3.0.2, port: 8080, locality: {region: r, zone: '', cluster: c3}}
---
apiVersion: tributary.io/v1alpha1
kind: Service
metadata: {name: reviews, environment: solo}
spec:
  hosts: [reviews.solo]
  ports: [{name: http, port: 9080, protocol: HTTP}]
---
apiVersion: tributary.io/v1alpha1
kind: Endpoints
metadata: {name: reviews, environment: solo}
spec:
  endpoints:
  - {address: 10.9.0.1, port: 8080, locality: {region: r, zone: az1, cluster: c9}}
";

/// The prod reviews endpoints: az1's and az2's, `(address, healthy)`.
fn reviews_endpoints(az1: &[(&str, bool)], az2: &[(&str, bool)]) -> String {
    let mut s = String::from(
        "apiVersion: tributary.io/v1alpha1\nkind: Endpoints\nmetadata: {name: reviews, environment: prod}\nspec:\n  endpoints:\n",
    );
    for (zone, eps) in [("az1", az1), ("az2", az2)] {
        for (addr, healthy) in eps {
            let health = if *healthy { "HEALTHY" } else { "UNHEALTHY" };
            s.push_str(&format!(
                "  - {{address: \"{addr}\", port: 8080, health: {health}, locality: {{region: r, zone: {zone}, cluster: c-{zone}}}}}\n"
            ));
        }
    }
    if az1.is_empty() && az2.is_empty() {
        s.push_str("  []\n");
    }
    s
}

/// One hub on an in-memory store, serving prod in two zones (98% local) with
/// `reviews` whose endpoints are `endpoints`.
async fn two_zones_with_reviews(endpoints: &str) -> (SharedStore, Hub) {
    let store: SharedStore = Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap());
    let hub = hub_on(&store, "a").await;
    apply(&hub, &environments(98)).await;
    apply(&hub, SERVICES).await;
    apply(&hub, endpoints).await;
    (store, hub)
}

async fn hub_on(store: &SharedStore, id: &str) -> Hub {
    let mut cfg = HubConfig::local(vec![]);
    cfg.store = StoreBackend::Shared(store.clone());
    cfg.replica_id = id.into();
    cfg.lease_ttl = Duration::from_secs(2);
    cfg.catalog_interval = Duration::from_millis(50);
    Hub::start(cfg).await.expect("hub starts")
}

async fn apply(hub: &Hub, yaml: &str) {
    let (status, body) = http_client::request(
        &hub.admin_addr.to_string(),
        "POST",
        "/config/apply",
        yaml.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

async fn delete(hub: &Hub, path: &str) {
    let (status, body) = http_client::request(&hub.admin_addr.to_string(), "DELETE", path, b"")
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

/// Waits (up to [`WAIT`]) until `check` returns `Some`, re-checking every 20 ms.
async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    timeout(WAIT, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn summary(store: &SharedStore, zone: &str, name: &str) -> Option<Summary> {
    let key = summary_key(
        "prod",
        zone,
        &tributary_controlplane::model::ObjectKey {
            namespace: "default".into(),
            name: name.into(),
        },
    );
    let kv = store.get(&key).await.unwrap().0?;
    Some(serde_json::from_slice(&kv.value).unwrap())
}

fn healthy(s: &Summary) -> u32 {
    s.port(9080).map_or(0, |p| p.healthy)
}

fn cla_of(hub: &Hub, channel: &str, name: &str) -> Option<ClusterLoadAssignment> {
    let snap = hub.snapshots.current(channel);
    let r = snap.get(XdsType::Endpoint, name)?;
    Some(ClusterLoadAssignment::decode(r.body()).unwrap())
}

/// (zone, priority, weight, [(address, health)]) per locality.
type Shape = Vec<(String, u32, u32, Vec<(String, i32)>)>;

fn shape(cla: &ClusterLoadAssignment) -> Shape {
    cla.endpoints
        .iter()
        .map(|l| {
            (
                l.locality.clone().unwrap_or_default().zone,
                l.priority,
                l.load_balancing_weight.map_or(0, |w| w.value),
                l.lb_endpoints
                    .iter()
                    .map(|e| {
                        let a = match &e.host_identifier {
                            Some(HostIdentifier::Endpoint(ep)) => {
                                match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
                                    Some(address::Address::SocketAddress(s)) => format!(
                                        "{}:{}",
                                        s.address,
                                        match s.port_specifier {
                                            Some(PortSpecifier::PortValue(p)) => p,
                                            _ => 0,
                                        }
                                    ),
                                    _ => String::new(),
                                }
                            }
                            _ => String::new(),
                        };
                        (a, e.health_status)
                    })
                    .collect(),
            )
        })
        .collect()
}

fn overprovisioning(cla: &ClusterLoadAssignment) -> Option<u32> {
    cla.policy
        .as_ref()
        .and_then(|p| p.overprovisioning_factor.as_ref())
        .map(|f| f.value)
}

const HEALTHY: i32 = 1;
const UNHEALTHY: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summaries_are_written_by_each_shards_leader_and_a_new_leader_takes_over() {
    let store: SharedStore = Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap());
    let a = hub_on(&store, "a").await;
    let b = hub_on(&store, "b").await;
    apply(&a, &environments(98)).await;
    apply(&a, SERVICES).await;
    apply(
        &a,
        &reviews_endpoints(
            &[("10.1.0.1", true), ("10.1.0.2", true)],
            &[("10.2.0.1", true), ("10.2.0.2", true), ("10.2.0.3", true)],
        ),
    )
    .await;
    let s1 = until("az1's summary", || async {
        summary(&store, "az1", "reviews")
            .await
            .filter(|s| healthy(s) == 2)
    })
    .await;
    assert_eq!(s1.gateway.to_string(), "10.1.255.1:15443");
    assert_eq!(s1.region, "r");
    let s2 = until("az2's summary", || async {
        summary(&store, "az2", "reviews")
            .await
            .filter(|s| healthy(s) == 3)
    })
    .await;
    assert_eq!(s2.gateway.to_string(), "[fd00::2:ffff]:15443");
    assert_eq!(s2.port(9080).unwrap().weight, 3);
    // ratings' endpoints name no zone: no zone summarizes them.
    assert_eq!(summary(&store, "az1", "ratings").await, None);
    assert_eq!(summary(&store, "az2", "ratings").await, None);

    // Each shard has one leader; only it wrote the shard's summaries, though both
    // replicas serve both shards and compute the same summaries.
    let shard = "prod/az2";
    let leads = |h: &Hub| h.catalog.view().leading.iter().any(|s| s == shard);
    let (leader, follower) = until("one leader of prod/az2", || async {
        match (leads(&a), leads(&b)) {
            (true, false) => Some((&a, &b)),
            (false, true) => Some((&b, &a)),
            _ => None,
        }
    })
    .await;
    assert!(leader.catalog.view().summaries_written[shard] >= 1);
    assert_eq!(
        follower.catalog.view().summaries_written.get(shard),
        None,
        "the follower wrote nothing of {shard}: {:?}",
        follower.catalog.view()
    );
    // One zone: nothing to tell another zone.
    for h in [&a, &b] {
        assert!(!h.catalog.view().summaries_written.contains_key("solo/az1"));
    }

    // The healthy count changes: the summary follows.
    apply(
        &a,
        &reviews_endpoints(
            &[("10.1.0.1", true), ("10.1.0.2", true)],
            &[("10.2.0.1", true), ("10.2.0.2", false), ("10.2.0.3", true)],
        ),
    )
    .await;
    until("az2's summary with 2 healthy", || async {
        summary(&store, "az2", "reviews")
            .await
            .filter(|s| healthy(s) == 2)
    })
    .await;
    assert!(leader.catalog.view().summaries_written[shard] >= 2);

    // The leader goes (a clean stop: its lease is revoked, its candidacy with it);
    // the other replica takes over and writes the next change.
    let (leader, follower) = if std::ptr::eq(leader, &a) {
        (a, b)
    } else {
        (b, a)
    };
    let follower_written = follower
        .catalog
        .view()
        .summaries_written
        .get(shard)
        .copied()
        .unwrap_or(0);
    assert_eq!(follower_written, 0);
    leader.shutdown().await.unwrap();
    until("the follower leads prod/az2", || async {
        follower
            .catalog
            .view()
            .leading
            .iter()
            .any(|s| s == shard)
            .then_some(())
    })
    .await;
    apply(
        &follower,
        &reviews_endpoints(
            &[("10.1.0.1", true), ("10.1.0.2", true)],
            &[("10.2.0.1", true), ("10.2.0.2", false), ("10.2.0.3", false)],
        ),
    )
    .await;
    until(
        "az2's summary with 1 healthy, from the new leader",
        || async {
            summary(&store, "az2", "reviews")
                .await
                .filter(|s| healthy(s) == 1)
        },
    )
    .await;
    assert!(follower.catalog.view().summaries_written[shard] >= 1);

    // The service goes: its summaries go.
    delete(&follower, "/config/prod/Endpoints/default/reviews").await;
    delete(&follower, "/config/prod/Service/default/reviews").await;
    until("reviews' summaries removed", || async {
        (summary(&store, "az1", "reviews").await.is_none()
            && summary(&store, "az2", "reviews").await.is_none())
        .then_some(())
    })
    .await;
    follower.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zones_load_assignments_reach_the_other_zones_through_their_gateways() {
    let (_store, hub) = two_zones_with_reviews(&reviews_endpoints(
        &[("10.1.0.1", true), ("10.1.0.2", true)],
        &[("10.2.0.1", true), ("10.2.0.2", true), ("10.2.0.3", true)],
    ))
    .await;
    // az1's view: its own endpoints at priority 0, az2 through its gateway at
    // priority 1 (weighted by its 3 healthy endpoints), 98% local.
    let az1 = until("az1's view with az2's gateway", || async {
        cla_of(&hub, "prod/az1", REVIEWS).filter(|c| shape(c).iter().any(|l| l.1 == 1))
    })
    .await;
    assert_eq!(
        shape(&az1),
        vec![
            (
                "az1".to_string(),
                0,
                2,
                vec![
                    ("10.1.0.1:8080".to_string(), HEALTHY),
                    ("10.1.0.2:8080".to_string(), HEALTHY)
                ]
            ),
            (
                "az2".to_string(),
                1,
                3,
                vec![("fd00::2:ffff:15443".to_string(), HEALTHY)]
            ),
        ]
    );
    assert_eq!(overprovisioning(&az1), Some(98));
    // And az2's, the other way round.
    let az2 = until("az2's view with az1's gateway", || async {
        cla_of(&hub, "prod/az2", REVIEWS).filter(|c| shape(c).iter().any(|l| l.1 == 1))
    })
    .await;
    let s = shape(&az2);
    assert_eq!((s[0].0.as_str(), s[0].1, s[0].3.len()), ("az2", 0, 3));
    assert_eq!(
        (s[1].0.as_str(), s[1].1, s[1].2, s[1].3.clone()),
        ("az1", 1, 2, vec![("10.1.255.1:15443".to_string(), HEALTHY)])
    );
    // The environment's own load assignment (proxies naming no zone) is unchanged.
    let env = cla_of(&hub, "prod", REVIEWS).unwrap();
    assert_eq!(shape(&env).len(), 2);
    assert!(shape(&env).iter().all(|l| l.1 == 0));
    assert_eq!(overprovisioning(&env), None);

    // Failover: every az1 endpoint unhealthy. Priority 0 has no healthy endpoint, so
    // Envoy sends everything to priority 1, the remote zone.
    apply(
        &hub,
        &reviews_endpoints(
            &[("10.1.0.1", false), ("10.1.0.2", false)],
            &[("10.2.0.1", true), ("10.2.0.2", true), ("10.2.0.3", true)],
        ),
    )
    .await;
    let az1 = until("az1's view with unhealthy local endpoints", || async {
        cla_of(&hub, "prod/az1", REVIEWS)
            .filter(|c| shape(c)[0].3.iter().all(|(_, h)| *h == UNHEALTHY))
    })
    .await;
    let s = shape(&az1);
    assert_eq!((s[0].1, s[1].0.as_str(), s[1].1), (0, "az2", 1));
    assert_eq!(s[1].3, vec![("fd00::2:ffff:15443".to_string(), HEALTHY)]);
    // az2's view: az1 has no healthy endpoint, so it is no locality at all.
    until("az2's view without az1", || async {
        cla_of(&hub, "prod/az2", REVIEWS)
            .filter(|c| shape(c).iter().all(|l| l.0 == "az2" && l.1 == 0))
    })
    .await;
    // No local endpoint at all: the remote zone is priority 0 (gRPC clients need
    // priorities from 0), with no overprovisioning factor.
    apply(
        &hub,
        &reviews_endpoints(
            &[],
            &[("10.2.0.1", true), ("10.2.0.2", true), ("10.2.0.3", true)],
        ),
    )
    .await;
    let az1 = until("az1's view with only the remote zone", || async {
        cla_of(&hub, "prod/az1", REVIEWS).filter(|c| c.endpoints.len() == 1)
    })
    .await;
    assert_eq!(
        shape(&az1),
        vec![(
            "az2".to_string(),
            0,
            3,
            vec![("fd00::2:ffff:15443".to_string(), HEALTHY)]
        )]
    );
    assert_eq!(overprovisioning(&az1), None);

    // The local share is config: 90 now.
    apply(&hub, &environments(90)).await;
    apply(
        &hub,
        &reviews_endpoints(
            &[("10.1.0.1", true)],
            &[("10.2.0.1", true), ("10.2.0.2", true), ("10.2.0.3", true)],
        ),
    )
    .await;
    until("az1's view at 90% local", || async {
        cla_of(&hub, "prod/az1", REVIEWS).filter(|c| overprovisioning(c) == Some(90))
    })
    .await;
    hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_without_a_zone_and_one_zone_environments_are_served_as_before() {
    let (store, hub) = two_zones_with_reviews(&reviews_endpoints(
        &[("10.1.0.1", true)],
        &[("10.2.0.1", true)],
    ))
    .await;
    until("both zones' summaries of reviews", || async {
        (summary(&store, "az1", "reviews").await.is_some()
            && summary(&store, "az2", "reviews").await.is_some()
            && cla_of(&hub, "prod/az1", REVIEWS)
                .is_some_and(|c| shape(&c).iter().any(|l| l.1 == 1)))
        .then_some(())
    })
    .await;
    // ratings' endpoints carry no zone: each zone's view is byte for byte the
    // environment's (same version), and that is what the generator makes of it.
    let env = hub.snapshots.current("prod");
    let want = env.get(XdsType::Endpoint, RATINGS).unwrap().clone();
    for zone in ["prod/az1", "prod/az2"] {
        let view = hub.snapshots.current(zone);
        let got = view.get(XdsType::Endpoint, RATINGS).unwrap();
        assert_eq!(got.version(), want.version(), "{zone}");
        assert_eq!(got.body(), want.body(), "{zone}");
        // Every other type is the environment's.
        for ty in [XdsType::Cluster, XdsType::Listener, XdsType::Route] {
            assert_eq!(view.of_type(ty), env.of_type(ty), "{zone} {ty:?}");
        }
    }
    let ratings = ClusterLoadAssignment::decode(want.body()).unwrap();
    assert_eq!(shape(&ratings).len(), 2);
    assert!(shape(&ratings).iter().all(|l| l.0.is_empty() && l.1 == 0));
    assert_eq!(overprovisioning(&ratings), None);

    // One zone: no zone view, no summary, the load assignment the generator has
    // always made.
    assert!(hub.snapshots.subscribe("solo/az1").is_none());
    assert!(
        !hub.snapshots
            .environments()
            .iter()
            .any(|e| e.starts_with("solo/"))
    );
    let solo = hub.snapshots.current("solo");
    let got = solo
        .get(XdsType::Endpoint, "outbound|9080||reviews.solo")
        .unwrap();
    let mesh = tributary_controlplane::config::parse_files([
        ("e.yaml", environments(98).as_str()),
        ("s.yaml", SERVICES),
    ])
    .unwrap();
    let svc = mesh.environments["solo"].services.values().next().unwrap();
    let cla = load_assignment("outbound|9080||reviews.solo", svc, &svc.ports[0], None);
    assert_eq!(got.body().as_ref(), cla.encode_to_vec().as_slice());
    assert_eq!(
        shape(&cla)[0].0,
        "az1",
        "the solo endpoint keeps its zone: {:?}",
        shape(&cla)
    );
    hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_is_served_its_own_zones_view() {
    let (_store, hub) = two_zones_with_reviews(&reviews_endpoints(
        &[("10.1.0.1", true)],
        &[("10.2.0.1", true)],
    ))
    .await;
    until("az1's view with az2's gateway", || async {
        cla_of(&hub, "prod/az1", REVIEWS).filter(|c| shape(c).iter().any(|l| l.1 == 1))
    })
    .await;
    let mut by_zone: BTreeMap<&str, Shape> = BTreeMap::new();
    for zone in ["az1", "az2", ""] {
        let mut d = common::Delta::open_addr(hub.xds_addr).await;
        let mut node = common::node(&format!("n-{zone}"), "prod");
        node.locality = Some(Locality {
            zone: zone.into(),
            ..Default::default()
        });
        d.subscribe(Some(node), type_url::ENDPOINT, &[REVIEWS])
            .await;
        let resp = d.recv().await;
        assert_eq!(resp.resources.len(), 1, "{zone}");
        let cla = ClusterLoadAssignment::decode(
            resp.resources[0]
                .resource
                .as_ref()
                .unwrap()
                .value
                .as_slice(),
        )
        .unwrap();
        by_zone.insert(zone, shape(&cla));
    }
    assert_eq!(by_zone["az1"][0].0, "az1");
    assert_eq!(by_zone["az1"][1].3[0].0, "fd00::2:ffff:15443");
    assert_eq!(by_zone["az2"][0].0, "az2");
    assert_eq!(by_zone["az2"][1].3[0].0, "10.1.255.1:15443");
    // No zone: the environment's load assignment, both zones' endpoints, priority 0.
    assert_eq!(
        by_zone[""]
            .iter()
            .map(|l| (l.0.as_str(), l.1))
            .collect::<Vec<_>>(),
        [("az1", 0), ("az2", 0)]
    );
    hub.shutdown().await.unwrap();
}
