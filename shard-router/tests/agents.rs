//! Agents that follow the router's directory, in process: hubs on one embedded store
//! (replicas registered under leases), the router in front, and agents started with
//! the router's address (`agent::directory::follow`).
//!
//! - each agent feeds every replica of the shards `(environment, its zone)` exactly
//!   those environments' services: a replica holds the endpoints of its own zones'
//!   clusters only, and nothing of an environment it does not serve, even where
//!   service names are equal across environments;
//! - an agent sees a replica join (full resync to it) and leave (its link dropped);
//! - a hub fed a service of a shard it does not serve (an agent pointed at it with
//!   `--hub`) does not hold it, and says so to the agent and in a metric.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};
use tributary_controlplane::agent::admin::Telemetry;
use tributary_controlplane::agent::{self, AgentConfig, ClusterState};
use tributary_controlplane::app::{Hub, HubConfig, StoreBackend};
use tributary_controlplane::model::ObjectKey;
use tributary_controlplane::xds::XdsType;
use tributary_proto::envoy::envoy::config::core::v3::address::Address as AddressKind;
use tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use tributary_proto::federation::v1 as pb;
use tributary_shard_router::app::{Router, RouterConfig};
use tributary_store::SharedStore;
use tributary_store::embedded::{Embedded, EmbeddedConfig};

const TIMEOUT: Duration = Duration::from_secs(20);

fn environment(name: &str, zones: &[&str]) -> String {
    format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Environment\nmetadata: {{name: {name}}}\nspec: {{zones: [{}]}}\n",
        zones.join(", ")
    )
}

/// Hubs on one in-memory embedded store reading one config, and a router.
struct Mesh {
    store: SharedStore,
    dir: tempfile::TempDir,
    per_shard: usize,
    hubs: BTreeMap<String, Hub>,
}

impl Mesh {
    async fn start(config: &str, ids: &[&str], per_shard: usize) -> Mesh {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let store: SharedStore = Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), config).unwrap();
        let mut mesh = Mesh {
            store,
            dir,
            per_shard,
            hubs: BTreeMap::new(),
        };
        for id in ids {
            mesh.add_hub(id).await;
        }
        mesh
    }

    async fn add_hub(&mut self, id: &str) {
        let mut cfg = HubConfig::local(vec![self.dir.path().to_path_buf()]);
        cfg.poll_interval = Duration::from_millis(20);
        cfg.store = StoreBackend::Shared(self.store.clone());
        cfg.replica_id = id.to_string();
        cfg.lease_ttl = Duration::from_secs(2);
        cfg.replicas_per_shard = self.per_shard;
        cfg.sync_wait = Duration::ZERO;
        self.hubs
            .insert(id.to_string(), Hub::start(cfg).await.expect("hub starts"));
    }

    async fn router(&self) -> Router {
        let mut cfg = RouterConfig::local();
        cfg.listen = vec!["[::1]:0".parse().unwrap()];
        Router::start(cfg, self.store.clone())
            .await
            .expect("router starts")
    }
}

/// `reviews` in namespace `shop` of each of `envs`, one endpoint each.
fn cluster_state(envs: &[(&str, &str)]) -> ClusterState {
    let mut s = ClusterState::default();
    for (env, address) in envs {
        let key = ObjectKey {
            namespace: format!("shop-{env}"),
            name: "reviews".into(),
        };
        // One name in both environments: only the namespace differs (a cluster's
        // namespace carries the environment label).
        s.set_service(
            key.clone(),
            Some(pb::Service {
                namespace: key.namespace.clone(),
                name: "reviews".into(),
                hosts: vec!["reviews.shop.svc.cluster.local".into()],
                ports: vec![pb::ServicePort {
                    name: "http".into(),
                    port: 9080,
                    protocol: "HTTP".into(),
                }],
                environment: env.to_string(),
            }),
            SystemTime::now(),
        );
        s.set_endpoints(
            key.clone(),
            Some(pb::EndpointSet {
                namespace: key.namespace.clone(),
                service: "reviews".into(),
                endpoints: vec![pb::Endpoint {
                    addresses: vec![address.to_string()],
                    ports: [("http".to_string(), 9080)].into(),
                    ready: true,
                    serving: true,
                    ..Default::default()
                }],
            }),
            SystemTime::now(),
        );
    }
    s
}

/// An agent of `cluster` in `zone` following the router's directory.
fn follow(
    router: &Router,
    cluster: &str,
    zone: &str,
    state: watch::Receiver<Arc<ClusterState>>,
) -> (Arc<Telemetry>, watch::Sender<bool>) {
    let url = format!("http://{}", router.xds_addrs[0]);
    let mut cfg = AgentConfig::new(url.clone(), cluster);
    cfg.zone = zone.into();
    cfg.debounce = Duration::from_millis(10);
    cfg.backoff_initial = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(200);
    let telemetry = Arc::new(Telemetry::new(&cfg, agent::new_incarnation()));
    let (stop_tx, mut stop) = watch::channel(false);
    tokio::spawn(agent::directory::follow(
        cfg,
        url,
        state,
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
        telemetry.clone(),
    ));
    (telemetry, stop_tx)
}

/// Every endpoint address of the `reviews` clusters in `hub`'s snapshot of `env`.
fn reviews_addresses(hub: &Hub, env: &str) -> BTreeSet<String> {
    let snapshot = hub.snapshots.current(env);
    let mut out = BTreeSet::new();
    for (name, r) in snapshot.of_type(XdsType::Endpoint).iter() {
        if !name.contains("reviews") {
            continue;
        }
        let cla = ClusterLoadAssignment::decode(r.body()).unwrap();
        for l in cla.endpoints {
            for e in l.lb_endpoints {
                let Some(tributary_proto::envoy::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(ep)) = e.host_identifier else { continue };
                if let Some(AddressKind::SocketAddress(sa)) = ep.address.and_then(|a| a.address) {
                    out.insert(sa.address);
                }
            }
        }
    }
    out
}

/// `(services, endpoints)` each federated cluster holds on `hub`.
fn held(hub: &Hub) -> BTreeMap<String, (usize, usize)> {
    hub.index
        .clusters()
        .iter()
        .map(|c| (c.id.clone(), (c.services, c.endpoints)))
        .collect()
}

type Change<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Something whose change wakes a wait.
trait Changes: Send {
    fn changed(&mut self) -> Change<'_>;
}

impl<T: Send + Sync> Changes for watch::Receiver<T> {
    fn changed(&mut self) -> Change<'_> {
        Box::pin(async move {
            if watch::Receiver::changed(self).await.is_err() {
                std::future::pending::<()>().await
            }
        })
    }
}

/// Everything a wait on `mesh` wakes on: each hub's federated clusters and snapshots
/// of `envs`, and the router's table.
fn wake_ons(mesh: &Mesh, router: &Router, envs: &[&str]) -> Vec<Box<dyn Changes>> {
    let mut out: Vec<Box<dyn Changes>> = vec![Box::new(router.table.applied())];
    for h in mesh.hubs.values() {
        out.push(Box::new(h.index.watch_clusters()));
        for e in envs {
            out.push(Box::new(h.snapshots.subscribe_or_create(e)));
        }
    }
    out
}

/// Waits until `check` returns `Ok`, re-checking on every change of `wake`; on
/// timeout fails with the last `Err`.
async fn wait_until<T>(
    what: &str,
    wake: &mut [Box<dyn Changes>],
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let last = match check() {
            Ok(v) => return v,
            Err(e) => e,
        };
        let any = futures_util::future::select_all(wake.iter_mut().map(|w| w.changed()));
        if timeout(deadline.saturating_duration_since(Instant::now()), any)
            .await
            .is_err()
        {
            panic!("{what}: not within {TIMEOUT:?}; last: {last}");
        }
    }
}

/// The router's table: shard → replica ids.
fn routes(router: &Router) -> BTreeMap<String, BTreeSet<String>> {
    router
        .table
        .routes()
        .into_iter()
        .map(|s| (s.shard, s.replicas.into_iter().map(|r| r.replica).collect()))
        .collect()
}

/// Two environments × two zones, four hubs, two replicas per shard; an agent in each
/// zone exports `reviews` in both environments (one name, four addresses). Each hub
/// ends up holding, per environment, exactly the addresses of the zones whose shard of
/// that environment it serves — and only from the clusters of those zones — with no
/// service refused anywhere (the agents sent nothing a replica does not serve).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_feed_each_replica_only_the_environments_of_its_shards() {
    let config = format!(
        "{}---\n{}",
        environment("prod", &["az1", "az2"]),
        environment("staging", &["az1", "az2"])
    );
    let mesh = Mesh::start(&config, &["h1", "h2", "h3", "h4"], 2).await;
    let router = mesh.router().await;
    let address = |env: &str, zone: &str| {
        format!("10.{}.{}.1", &zone[2..], if env == "prod" { 0 } else { 1 })
    };
    let zones = [("az1", "east-1"), ("az2", "west-1")];
    let envs = ["prod", "staging"];
    let mut wake = wake_ons(&mesh, &router, &envs);
    // The agents start once the assignment has settled: an agent that joined while
    // replicas were still being assigned could feed one that ends up serving none of
    // its zone, which then keeps that cluster's (empty) record for the grace period.
    wait_until("the assignment settles", &mut wake, || {
        let table = routes(&router);
        (table.len() == 4
            && table.values().all(|r| r.len() == 2)
            && mesh
                .hubs
                .keys()
                .all(|h| table.values().filter(|r| r.contains(h)).count() == 2))
        .then_some(())
        .ok_or(format!("{table:?}"))
    })
    .await;
    let mut agents = Vec::new();
    for (zone, cluster) in zones {
        let state = cluster_state(&[
            ("prod", &address("prod", zone)),
            ("staging", &address("staging", zone)),
        ]);
        let (_tx, rx) = watch::channel(Arc::new(state));
        let agent = follow(&router, cluster, zone, rx);
        agents.push((agent, _tx));
    }
    let table = wait_until(
        "every hub holds exactly its shards' slices",
        &mut wake,
        || {
            let table = routes(&router);
            let settled = table.len() == 4
                && table.values().all(|r| r.len() == 2)
                && mesh
                    .hubs
                    .keys()
                    .all(|h| table.values().filter(|r| r.contains(h)).count() == 2);
            if !settled {
                return Err(format!("assignment not settled: {table:?}"));
            }
            for (id, hub) in &mesh.hubs {
                let serves = |env: &str, zone: &str| table[&format!("{env}/{zone}")].contains(id);
                // Each environment's reviews: the addresses of the zones it serves there.
                for env in envs {
                    let want: BTreeSet<String> = zones
                        .iter()
                        .filter(|(z, _)| serves(env, z))
                        .map(|(z, _)| address(env, z))
                        .collect();
                    let got = reviews_addresses(hub, env);
                    if got != want {
                        return Err(format!(
                            "{id} {env}: {got:?}, want {want:?} (routes {table:?})"
                        ));
                    }
                }
                // A cluster is held only where the hub serves a shard of its zone, with one
                // service per environment served there.
                let want: BTreeMap<String, (usize, usize)> = zones
                    .iter()
                    .filter_map(|(z, c)| {
                        let n = envs.iter().filter(|e| serves(e, z)).count();
                        (n > 0).then(|| (c.to_string(), (n, n)))
                    })
                    .collect();
                let got = held(hub);
                if got != want {
                    return Err(format!(
                        "{id} holds {got:?}, want {want:?} (routes {table:?})"
                    ));
                }
            }
            Ok(table)
        },
    )
    .await;
    for (id, hub) in &mesh.hubs {
        assert_eq!(
            hub.metrics.federation_items_unserved.get(),
            0,
            "{id} was sent a service of a shard it does not serve"
        );
    }
    // Each agent feeds exactly the replicas of its zone's shards.
    for ((telemetry, _), _) in &agents {
        let status = telemetry.status();
        let zone = if status.cluster_id == "east-1" {
            "az1"
        } else {
            "az2"
        };
        let want: BTreeSet<String> = table
            .iter()
            .filter(|(s, _)| s.ends_with(&format!("/{zone}")))
            .flat_map(|(_, r)| r.iter().cloned())
            .collect();
        let fed: BTreeSet<String> = status
            .replicas
            .iter()
            .filter_map(|r| r.replica.clone())
            .collect();
        assert_eq!(fed, want, "{}", status.cluster_id);
    }
    router.shutdown().await.unwrap();
    for (_, h) in mesh.hubs {
        h.shutdown().await.unwrap();
    }
}

/// One shard, replicas joining and leaving: the agent feeds the first replica; a
/// second one that joins gets a full resync (not a resume) and holds the cluster; when
/// the first leaves (a clean shutdown revokes its registration) the agent drops it and
/// keeps feeding the second, which receives a later change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_follows_replicas_joining_and_leaving() {
    let mut mesh = Mesh::start(&environment("prod", &["az1"]), &["a"], 2).await;
    let router = mesh.router().await;
    let (state_tx, rx) = watch::channel(Arc::new(cluster_state(&[("prod", "10.1.0.1")])));
    let (telemetry, stop) = follow(&router, "east-1", "az1", rx);
    let fed = |t: &Telemetry| -> Vec<(String, &'static str)> {
        t.status()
            .replicas
            .into_iter()
            .map(|r| (r.replica.unwrap_or_default(), r.state))
            .collect()
    };
    let mut wake = wake_ons(&mesh, &router, &["prod"]);
    wait_until("a holds the cluster", &mut wake, || {
        let got = reviews_addresses(&mesh.hubs["a"], "prod");
        (got == BTreeSet::from(["10.1.0.1".to_string()]))
            .then_some(())
            .ok_or(format!("a: {got:?}; agent feeds {:?}", fed(&telemetry)))
    })
    .await;

    mesh.add_hub("b").await;
    let mut wake = wake_ons(&mesh, &router, &["prod"]);
    wait_until("b joins and is fed", &mut wake, || {
        let got = reviews_addresses(&mesh.hubs["b"], "prod");
        (got == BTreeSet::from(["10.1.0.1".to_string()]) && held(&mesh.hubs["b"]).len() == 1)
            .then_some(())
            .ok_or(format!("b: {got:?}; agent feeds {:?}", fed(&telemetry)))
    })
    .await;
    let b = telemetry
        .status()
        .replicas
        .into_iter()
        .find(|r| r.replica.as_deref() == Some("b"))
        .expect("the agent feeds b");
    assert!(
        !b.resumed && b.sessions >= 1,
        "a new replica gets a full resync: {b:?}"
    );
    assert_eq!(
        (telemetry.metrics.connected.get(), telemetry.status().state),
        (2, "following")
    );

    // a leaves: the agent drops it, and b alone gets the next change.
    let a = mesh.hubs.remove("a").unwrap();
    a.shutdown().await.unwrap();
    let mut wake = wake_ons(&mesh, &router, &["prod"]);
    // The agent's own status changes too (its link to a dropped).
    wake.push(Box::new(telemetry.changes()));
    wait_until("the agent drops a", &mut wake, || {
        let f = fed(&telemetry);
        (f == vec![("b".to_string(), "connected")])
            .then_some(())
            .ok_or(format!("agent feeds {f:?}"))
    })
    .await;
    assert_eq!(telemetry.metrics.connected.get(), 1);
    state_tx.send_replace(Arc::new(cluster_state(&[("prod", "10.1.0.2")])));
    wait_until("b receives the later change", &mut wake, || {
        let got = reviews_addresses(&mesh.hubs["b"], "prod");
        (got == BTreeSet::from(["10.1.0.2".to_string()]))
            .then_some(())
            .ok_or(format!("b: {got:?}"))
    })
    .await;
    let _ = stop.send(true);
    router.shutdown().await.unwrap();
    for (_, h) in mesh.hubs {
        h.shutdown().await.unwrap();
    }
}

/// An agent pointed at one hub with `--hub` (not following the directory) sends it
/// both environments; the hub serves only prod/az1, so it holds the prod service and
/// not the staging one (nor its endpoints), reports the staging service to the agent
/// as an item error naming the shard, and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_does_not_hold_a_slice_of_a_shard_it_does_not_serve() {
    let config = format!(
        "{}---\n{}",
        environment("prod", &["az1"]),
        environment("staging", &["az1"])
    );
    let mesh = Mesh::start(&config, &["a", "b"], 1).await;
    let router = mesh.router().await;
    let mut wake = wake_ons(&mesh, &router, &["prod", "staging"]);
    let table = wait_until("one shard each", &mut wake, || {
        let t = routes(&router);
        (t.len() == 2 && t.values().all(|r| r.len() == 1) && t["prod/az1"] != t["staging/az1"])
            .then(|| t.clone())
            .ok_or(format!("{t:?}"))
    })
    .await;
    let prod_hub = table["prod/az1"].iter().next().unwrap().clone();
    let staging_hub = table["staging/az1"].iter().next().unwrap().clone();
    let hub = &mesh.hubs[&prod_hub];

    let mut cfg = AgentConfig::new(format!("http://{}", hub.xds_addr), "east-1");
    cfg.zone = "az1".into();
    cfg.debounce = Duration::from_millis(10);
    let telemetry = Arc::new(Telemetry::new(&cfg, agent::new_incarnation()));
    // The agent's ACK can come after the hub's last change (the hub flushes at a
    // resync's last part): the wait wakes on the agent's status too.
    wake.push(Box::new(telemetry.changes()));
    let (_state, rx) = watch::channel(Arc::new(cluster_state(&[
        ("prod", "10.1.0.1"),
        ("staging", "10.1.1.1"),
    ])));
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(agent::run_with(
        cfg,
        rx,
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
        telemetry.clone(),
    ));
    wait_until("the prod hub applied the agent's resync", &mut wake, || {
        let s = telemetry.status();
        (s.version_acked > 0 && reviews_addresses(hub, "prod").len() == 1)
            .then_some(())
            .ok_or(format!("agent {s:?}; held {:?}", held(hub)))
    })
    .await;
    assert_eq!(
        held(hub),
        BTreeMap::from([("east-1".to_string(), (1, 1))]),
        "{prod_hub} holds only the prod slice"
    );
    assert!(
        reviews_addresses(hub, "staging").is_empty(),
        "{prod_hub} serves no staging endpoint"
    );
    assert_eq!(hub.metrics.federation_items_unserved.get(), 1);
    let s = telemetry.status();
    assert_eq!(s.item_errors, 1);
    let err = s.last_item_error.unwrap_or_default();
    assert!(
        err.contains(&format!(
            "replica {prod_hub} does not serve shard staging/az1"
        )) && err.contains(&format!("its replicas are {staging_hub}")),
        "{err}"
    );
    let _ = stop.send(true);
    task.await.unwrap();
    router.shutdown().await.unwrap();
    for (_, h) in mesh.hubs {
        h.shutdown().await.unwrap();
    }
}

/// The directory going away does not stop an agent: while the router is down it keeps
/// feeding the replicas it knows (a change still reaches them) and asks the directory
/// again with backoff; once a router serves the same address again, it follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_keeps_feeding_its_replicas_while_the_router_is_down() {
    let mesh = Mesh::start(&environment("prod", &["az1"]), &["a"], 2).await;
    let router = mesh.router().await;
    let addr = router.xds_addrs[0];
    let (state_tx, rx) = watch::channel(Arc::new(cluster_state(&[("prod", "10.1.0.1")])));
    let (telemetry, stop) = follow(&router, "east-1", "az1", rx);
    let hub = &mesh.hubs["a"];
    let mut wake = wake_ons(&mesh, &router, &["prod"]);
    wake.push(Box::new(telemetry.changes()));
    wait_until("a is fed", &mut wake, || {
        let got = reviews_addresses(hub, "prod");
        (got == BTreeSet::from(["10.1.0.1".to_string()]))
            .then_some(())
            .ok_or(format!("a: {got:?}"))
    })
    .await;

    router.shutdown().await.unwrap();
    let mut wake: Vec<Box<dyn Changes>> = vec![
        Box::new(telemetry.changes()),
        Box::new(hub.snapshots.subscribe_or_create("prod")),
    ];
    wait_until("the agent lost the directory", &mut wake, || {
        let s = telemetry.status();
        (s.state != "following" && s.last_session_error.is_some())
            .then_some(())
            .ok_or(format!("{} {:?}", s.state, s.last_session_error))
    })
    .await;
    let err = telemetry.status().last_session_error.unwrap_or_default();
    assert!(err.contains("directory http://"), "{err}");
    state_tx.send_replace(Arc::new(cluster_state(&[("prod", "10.1.0.2")])));
    wait_until("a change still reaches a", &mut wake, || {
        let got = reviews_addresses(hub, "prod");
        (got == BTreeSet::from(["10.1.0.2".to_string()]))
            .then_some(())
            .ok_or(format!("a: {got:?}"))
    })
    .await;
    assert_eq!(
        telemetry
            .status()
            .replicas
            .iter()
            .map(|r| (r.replica.clone().unwrap_or_default(), r.state))
            .collect::<Vec<_>>(),
        vec![("a".to_string(), "connected")]
    );

    // A router on the same address again: the agent follows it.
    let mut cfg = RouterConfig::local();
    cfg.listen = vec![addr];
    let router = Router::start(cfg, mesh.store.clone())
        .await
        .expect("a router on the same address");
    wait_until("the agent follows the directory again", &mut wake, || {
        let s = telemetry.status();
        (s.state == "following")
            .then_some(())
            .ok_or(s.state.to_string())
    })
    .await;
    let _ = stop.send(true);
    router.shutdown().await.unwrap();
    for (_, h) in mesh.hubs {
        h.shutdown().await.unwrap();
    }
}
