use std::net::IpAddr;

use prometheus_client::registry::Registry;

use super::*;
use crate::federation::Change;
use crate::model::{Health, Locality, Protocol, ServicePort};

fn index() -> (Index, Arc<Shards>) {
    let shards = Arc::new(Shards::default());
    let metrics = Arc::new(Metrics::new(&mut Registry::default()));
    (
        Index::new(IndexConfig::default(), shards.clone(), metrics),
        shards,
    )
}

fn key(name: &str) -> ObjectKey {
    ObjectKey {
        namespace: "ns".into(),
        name: name.into(),
    }
}

fn fed_service(name: &str, env: &str) -> FedService {
    FedService {
        key: key(name),
        environment: env.into(),
        hosts: vec![format!("{name}.ns.svc.cluster.local")],
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Http,
        }],
    }
}

fn endpoint(addr: &str, cluster: &str) -> Endpoint {
    Endpoint {
        address: addr.parse::<IpAddr>().unwrap(),
        port: None,
        ports: [("http".to_string(), 8080)].into(),
        locality: Locality {
            region: "r".into(),
            zone: "z".into(),
            cluster: cluster.into(),
        },
        labels: Default::default(),
        weight: 1,
        health: Health::Healthy,
    }
}

fn change(kind: ChangeKind) -> Change {
    Change {
        origin: SystemTime::now(),
        kind,
    }
}

fn info(id: &str) -> ClusterInfo {
    ClusterInfo {
        id: id.into(),
        region: "r".into(),
        zone: "z".into(),
        ..Default::default()
    }
}

fn batch(version: u64, full: bool, changes: Vec<Change>) -> Batch {
    Batch {
        version,
        full,
        changes,
    }
}

fn cluster_name(svc: &str) -> String {
    format!("outbound|80||{svc}.ns.svc.cluster.local")
}

/// Connects cluster `id` and applies a full batch of `services` with one endpoint each.
fn connect(ix: &mut Index, id: &str, session: u64, services: &[&str]) {
    let w = ix.hello(info(id), 0, session).unwrap();
    assert!(!w.resume);
    let mut changes = Vec::new();
    let octet = id.bytes().map(u32::from).sum::<u32>() % 250;
    for (i, s) in services.iter().enumerate() {
        changes.push(change(ChangeKind::UpsertService(fed_service(s, "prod"))));
        changes.push(change(ChangeKind::UpsertEndpoints(
            key(s),
            vec![endpoint(&format!("10.0.{octet}.{i}"), id)],
        )));
    }
    ix.apply_batch(id, session, batch(1, true, changes), Instant::now())
        .unwrap();
}

#[test]
fn endpoint_only_change_regenerates_only_load_assignments() {
    let (mut ix, shards) = index();
    connect(&mut ix, "c1", 1, &["a", "b"]);
    ix.flush(Instant::now());
    let s1 = shards.current("prod");
    assert_eq!(s1.seq, 1);
    assert!(s1.get(XdsType::Cluster, &cluster_name("a")).is_some());
    assert!(
        s1.get(XdsType::Listener, "a.ns.svc.cluster.local:80")
            .is_some(),
        "API listener"
    );

    let eps = vec![endpoint("10.9.9.9", "c1"), endpoint("fd00::9", "c1")];
    ix.apply_batch(
        "c1",
        1,
        batch(
            2,
            false,
            vec![change(ChangeKind::UpsertEndpoints(key("a"), eps))],
        ),
        Instant::now(),
    )
    .unwrap();
    ix.flush(Instant::now());
    let s2 = shards.current("prod");
    assert_eq!(s2.seq, 2);
    assert_eq!(
        s2.changed[XdsType::Endpoint as usize]
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>(),
        vec![cluster_name("a")]
    );
    for ty in [XdsType::Cluster, XdsType::Listener, XdsType::Route] {
        assert!(
            s2.changed[ty as usize].is_empty(),
            "{ty:?} changed on an endpoint-only change"
        );
    }
}

#[test]
fn adding_a_service_touches_its_resources_and_the_shared_tables() {
    let (mut ix, shards) = index();
    connect(&mut ix, "c1", 1, &["a"]);
    ix.flush(Instant::now());
    ix.apply_batch(
        "c1",
        1,
        batch(
            2,
            false,
            vec![change(ChangeKind::UpsertService(fed_service("n", "prod")))],
        ),
        Instant::now(),
    )
    .unwrap();
    ix.flush(Instant::now());
    let s = shards.current("prod");
    let changed = |t: XdsType| {
        s.changed[t as usize]
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(changed(XdsType::Cluster), vec![cluster_name("n")]);
    assert_eq!(changed(XdsType::Endpoint), vec![cluster_name("n")]);
    assert_eq!(
        changed(XdsType::Route),
        vec!["80".to_string()],
        "the port's route table gains a virtual host"
    );
    assert!(changed(XdsType::Listener).contains(&"n.ns.svc.cluster.local:80".to_string()));
}

#[test]
fn a_full_snapshot_that_changes_nothing_publishes_nothing() {
    let (mut ix, shards) = index();
    connect(&mut ix, "c1", 1, &["a", "b"]);
    ix.flush(Instant::now());
    ix.gone("c1", 1, Instant::now());
    // The agent comes back within the grace period and resends the same state.
    connect(&mut ix, "c1", 2, &["a", "b"]);
    assert!(!ix.debouncer.is_pending(), "nothing to regenerate");
    ix.flush(Instant::now());
    assert_eq!(shards.current("prod").seq, 1);
}

#[test]
fn resume_when_the_hub_holds_the_acknowledged_version() {
    let (mut ix, _) = index();
    connect(&mut ix, "c1", 1, &["a"]);
    ix.gone("c1", 1, Instant::now());
    let w = ix.hello(info("c1"), 1, 2).unwrap();
    assert!(w.resume);
    assert_eq!(w.hub_version, 1);
    ix.gone("c1", 2, Instant::now());
    assert!(
        !ix.hello(info("c1"), 7, 3).unwrap().resume,
        "a version the hub never acknowledged"
    );
}

#[test]
fn a_second_live_agent_for_a_cluster_is_rejected() {
    let (mut ix, _) = index();
    connect(&mut ix, "c1", 1, &["a"]);
    let err = ix.hello(info("c1"), 0, 2).unwrap_err();
    assert!(err.contains("already has a live agent"), "{err}");
    // The rejected session cannot write.
    assert!(
        ix.apply_batch("c1", 2, batch(9, true, vec![]), Instant::now())
            .is_err()
    );
}

#[test]
fn grace_period_keeps_then_withdraws_endpoints() {
    let (mut ix, shards) = index();
    connect(&mut ix, "c1", 1, &["a"]);
    connect(&mut ix, "c2", 2, &["a"]);
    ix.flush(Instant::now());
    let cla = |shards: &Shards| {
        let s = shards.current("prod");
        let r = s
            .get(XdsType::Endpoint, &cluster_name("a"))
            .unwrap()
            .clone();
        use prost::Message;
        tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(r.body())
            .unwrap()
    };
    assert_eq!(cla(&shards).endpoints.len(), 2, "one locality per cluster");

    let t0 = Instant::now();
    ix.gone("c2", 2, t0);
    ix.expire(t0 + Duration::from_secs(59));
    assert!(
        !ix.debouncer.is_pending(),
        "not withdrawn before the grace period ends"
    );
    assert_eq!(
        ix.status
            .borrow()
            .iter()
            .find(|c| c.id == "c2")
            .unwrap()
            .state,
        "grace"
    );
    ix.expire(t0 + Duration::from_secs(60));
    ix.flush(t0 + Duration::from_secs(60));
    let eps = cla(&shards);
    assert_eq!(eps.endpoints.len(), 1);
    assert_eq!(eps.endpoints[0].locality.as_ref().unwrap().sub_zone, "c1");
    assert!(ix.status.borrow().iter().all(|c| c.id != "c2"));
}

#[test]
fn file_and_federated_endpoints_merge_and_hosts_stay_unique() {
    let (mut ix, shards) = index();
    let mesh = crate::config::parse_files([(
        "f.yaml",
        "apiVersion: tributary.io/v1alpha1\nkind: Service\nmetadata: {name: a, namespace: ns, environment: prod}\nspec:\n  hosts: [a.ns.svc.cluster.local]\n  ports: [{name: http, port: 80}]\n---\napiVersion: tributary.io/v1alpha1\nkind: Endpoints\nmetadata: {name: a, namespace: ns, environment: prod}\nspec:\n  endpoints: [{address: 192.168.0.1, port: 8080}]\n",
    )])
    .unwrap();
    ix.set_file(Arc::new(mesh), Instant::now());
    connect(&mut ix, "c1", 1, &["a"]);
    // Another service claiming a's host is ignored for that host.
    let mut thief = fed_service("thief", "prod");
    thief.hosts = vec!["a.ns.svc.cluster.local".into(), "thief.ns".into()];
    ix.apply_batch(
        "c1",
        1,
        batch(2, false, vec![change(ChangeKind::UpsertService(thief))]),
        Instant::now(),
    )
    .unwrap();
    ix.flush(Instant::now());
    let s = shards.current("prod");
    let a = &ix.envs["prod"].model.services[&key("a")];
    assert_eq!(a.endpoints.len(), 2, "file endpoint + cluster endpoint");
    let t = &ix.envs["prod"].model.services[&key("thief")];
    assert_eq!(t.hosts, vec!["thief.ns".to_string()]);
    assert!(s.get(XdsType::Cluster, "outbound|80||thief.ns").is_some());
}

#[test]
fn environments_from_namespaces_are_isolated() {
    let (mut ix, shards) = index();
    ix.hello(info("c1"), 0, 1).unwrap();
    let changes = vec![
        change(ChangeKind::UpsertService(fed_service("p", "prod"))),
        change(ChangeKind::UpsertService(fed_service("s", "staging"))),
    ];
    ix.apply_batch("c1", 1, batch(1, true, changes), Instant::now())
        .unwrap();
    ix.flush(Instant::now());
    assert!(
        shards
            .current("prod")
            .get(XdsType::Cluster, &cluster_name("s"))
            .is_none()
    );
    assert!(
        shards
            .current("staging")
            .get(XdsType::Cluster, &cluster_name("s"))
            .is_some()
    );
    // Moving a service to another environment withdraws it from the first.
    let moved = change(ChangeKind::UpsertService(fed_service("p", "staging")));
    ix.apply_batch("c1", 1, batch(2, false, vec![moved]), Instant::now())
        .unwrap();
    ix.flush(Instant::now());
    assert!(
        shards
            .current("prod")
            .get(XdsType::Cluster, &cluster_name("p"))
            .is_none()
    );
    assert!(
        shards
            .current("staging")
            .get(XdsType::Cluster, &cluster_name("p"))
            .is_some()
    );
}
