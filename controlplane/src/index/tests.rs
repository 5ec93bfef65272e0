use std::net::IpAddr;

use prometheus_client::registry::Registry;

use super::*;
use crate::federation::{Change, EndpointSet, FedEndpoint};
use crate::model::{Endpoint, Health, Locality, Protocol, ServicePort};

fn index() -> (Index, Arc<Snapshots>) {
    let snapshots = Arc::new(Snapshots::default());
    let metrics = Arc::new(Metrics::new(&mut Registry::default()));
    (
        Index::new(IndexConfig::default(), snapshots.clone(), metrics),
        snapshots,
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

/// An endpoint set of anonymous endpoints.
fn set(endpoints: Vec<Endpoint>) -> EndpointSet {
    EndpointSet {
        endpoints: endpoints
            .into_iter()
            .map(|endpoint| FedEndpoint {
                name: String::new(),
                endpoint,
            })
            .collect(),
        keep: Vec::new(),
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
        incarnation: "agent-1".into(),
        ..Default::default()
    }
}

fn batch(version: u64, full: bool, changes: Vec<Change>) -> Batch {
    Batch {
        version,
        full,
        more: false,
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
            set(vec![endpoint(&format!("10.0.{octet}.{i}"), id)]),
        )));
    }
    ix.apply_batch(id, session, batch(1, true, changes), Instant::now())
        .unwrap();
}

#[test]
fn endpoint_only_change_regenerates_only_load_assignments() {
    let (mut ix, snapshots) = index();
    connect(&mut ix, "c1", 1, &["a", "b"]);
    ix.flush(Instant::now());
    let s1 = snapshots.current("prod");
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
            vec![change(ChangeKind::UpsertEndpoints(key("a"), set(eps)))],
        ),
        Instant::now(),
    )
    .unwrap();
    ix.flush(Instant::now());
    let s2 = snapshots.current("prod");
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
    let (mut ix, snapshots) = index();
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
    let s = snapshots.current("prod");
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
    let (mut ix, snapshots) = index();
    connect(&mut ix, "c1", 1, &["a", "b"]);
    ix.flush(Instant::now());
    ix.gone("c1", 1, Instant::now());
    // The agent comes back within the grace period and resends the same state.
    connect(&mut ix, "c1", 2, &["a", "b"]);
    assert!(!ix.debouncer.is_pending(), "nothing to regenerate");
    ix.flush(Instant::now());
    assert_eq!(snapshots.current("prod").seq, 1);
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
    let (mut ix, snapshots) = index();
    connect(&mut ix, "c1", 1, &["a"]);
    connect(&mut ix, "c2", 2, &["a"]);
    ix.flush(Instant::now());
    let cla = |snapshots: &Snapshots| {
        let s = snapshots.current("prod");
        let r = s
            .get(XdsType::Endpoint, &cluster_name("a"))
            .unwrap()
            .clone();
        use prost::Message;
        tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(r.body())
            .unwrap()
    };
    assert_eq!(
        cla(&snapshots).endpoints.len(),
        2,
        "one locality per cluster"
    );

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
    let eps = cla(&snapshots);
    assert_eq!(eps.endpoints.len(), 1);
    assert_eq!(eps.endpoints[0].locality.as_ref().unwrap().sub_zone, "c1");
    assert!(ix.status.borrow().iter().all(|c| c.id != "c2"));
}

#[test]
fn file_and_federated_endpoints_merge_and_hosts_stay_unique() {
    let (mut ix, snapshots) = index();
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
    let s = snapshots.current("prod");
    let a = s.get(XdsType::Endpoint, &cluster_name("a")).unwrap();
    use prost::Message;
    let a = tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(
        a.body(),
    )
    .unwrap();
    let lb: usize = a.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
    assert_eq!(lb, 2, "file endpoint + cluster endpoint");
    let t = &ix.envs["prod"].model.services[&key("thief")];
    assert_eq!(t.hosts, vec!["thief.ns".to_string()]);
    assert!(s.get(XdsType::Cluster, "outbound|80||thief.ns").is_some());
}

#[test]
fn environments_from_namespaces_are_isolated() {
    let (mut ix, snapshots) = index();
    ix.hello(info("c1"), 0, 1).unwrap();
    let changes = vec![
        change(ChangeKind::UpsertService(fed_service("p", "prod"))),
        change(ChangeKind::UpsertService(fed_service("s", "staging"))),
    ];
    ix.apply_batch("c1", 1, batch(1, true, changes), Instant::now())
        .unwrap();
    ix.flush(Instant::now());
    assert!(
        snapshots
            .current("prod")
            .get(XdsType::Cluster, &cluster_name("s"))
            .is_none()
    );
    assert!(
        snapshots
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
        snapshots
            .current("prod")
            .get(XdsType::Cluster, &cluster_name("p"))
            .is_none()
    );
    assert!(
        snapshots
            .current("staging")
            .get(XdsType::Cluster, &cluster_name("p"))
            .is_some()
    );
}

fn named(name: &str, addr: &str, cluster: &str) -> FedEndpoint {
    FedEndpoint {
        name: name.into(),
        endpoint: endpoint(addr, cluster),
    }
}

fn part(version: u64, more: bool, changes: Vec<Change>) -> Batch {
    Batch {
        version,
        full: true,
        more,
        changes,
    }
}

fn held_services(ix: &Index, id: &str) -> Vec<String> {
    ix.sources.clusters[id]
        .services
        .keys()
        .map(|k| k.name.clone())
        .collect()
}

#[test]
fn a_split_resync_deletes_only_at_its_end_and_never_a_rejected_key() {
    let (mut ix, snapshots) = index();
    connect(&mut ix, "c1", 1, &["a", "b", "c"]);
    ix.flush(Instant::now());
    ix.gone("c1", 1, Instant::now());
    ix.hello(info("c1"), 0, 2).unwrap();
    // Part 1 names a only: nothing is deleted yet, and it is not resumable.
    let p1 = vec![change(ChangeKind::UpsertService(fed_service("a", "prod")))];
    ix.apply_batch("c1", 2, part(2, true, p1), Instant::now())
        .unwrap();
    assert_eq!(held_services(&ix, "c1"), ["a", "b", "c"]);
    assert_eq!(ix.sources.clusters["c1"].resumable, None, "not resumable");
    // An incremental batch may not interleave with the resync.
    let err = ix
        .apply_batch("c1", 2, batch(3, false, vec![]), Instant::now())
        .unwrap_err();
    assert!(err.contains("full resync in progress"), "{err}");
    // The last part: b's new form was rejected (kept as named), c is not named.
    let p2 = vec![
        change(ChangeKind::KeepService(key("b"))),
        change(ChangeKind::KeepEndpoints(key("b"))),
        change(ChangeKind::UpsertEndpoints(
            key("a"),
            set(vec![endpoint("10.0.99.1", "c1")]),
        )),
    ];
    ix.apply_batch("c1", 2, part(4, false, p2), Instant::now())
        .unwrap();
    assert_eq!(held_services(&ix, "c1"), ["a", "b"]);
    assert_eq!(
        ix.sources.clusters["c1"].resumable,
        Some(("agent-1".into(), 4))
    );
    ix.flush(Instant::now());
    let s = snapshots.current("prod");
    assert!(s.get(XdsType::Cluster, &cluster_name("b")).is_some());
    assert!(s.get(XdsType::Endpoint, &cluster_name("b")).is_some());
    assert!(s.get(XdsType::Cluster, &cluster_name("c")).is_none());
}

/// `published_version` tells an operator (and the benchmark) when what the hub applied
/// is in the published snapshots: it follows `last_version` at the flush after a
/// batch, and at once for a batch that changed nothing (unless one still waits).
#[test]
fn the_published_version_follows_the_flush() {
    let (mut ix, _) = index();
    let status = |ix: &Index| {
        let c = &ix.sources.clusters["c1"];
        (c.last_version, c.published_version)
    };
    connect(&mut ix, "c1", 1, &["a"]);
    assert_eq!(status(&ix), (1, 0), "applied, not yet published");
    let unchanged = vec![change(ChangeKind::UpsertService(fed_service("a", "prod")))];
    ix.apply_batch("c1", 1, batch(2, false, unchanged.clone()), Instant::now())
        .unwrap();
    assert_eq!(status(&ix), (2, 0), "batch 1 still waits for the flush");
    ix.flush(Instant::now());
    assert_eq!(status(&ix), (2, 2));
    let shown = ix.status.borrow().clone();
    assert_eq!(shown[0].published_version, 2, "shown in /status/clusters");
    ix.apply_batch("c1", 1, batch(3, false, unchanged), Instant::now())
        .unwrap();
    assert_eq!(status(&ix), (3, 3), "nothing to publish");
    let moved = vec![change(ChangeKind::UpsertEndpoints(
        key("a"),
        set(vec![endpoint("10.0.97.1", "c1")]),
    ))];
    ix.apply_batch("c1", 1, batch(4, false, moved), Instant::now())
        .unwrap();
    assert_eq!(status(&ix), (4, 3));
    ix.flush(Instant::now());
    assert_eq!(status(&ix), (4, 4));
}

/// A full resync's last part publishes at once (nothing more of it is coming), unless
/// another cluster's resync is still open; parts before it and incremental batches
/// wait for the quiet period. (Before, the last part waited for the quiet period too:
/// 100 ms added to every cluster's initial sync.)
#[test]
fn a_resync_s_last_part_ends_the_debounce() {
    let (mut ix, _) = index();
    let cfg = ix.cfg.debounce;
    let ms = Duration::from_millis;
    let t0 = Instant::now();
    ix.hello(info("c1"), 0, 1).unwrap();
    ix.hello(info("c2"), 0, 2).unwrap();
    let svc = |n: &str| vec![change(ChangeKind::UpsertService(fed_service(n, "prod")))];
    ix.apply_batch("c1", 1, part(1, true, svc("a")), t0)
        .unwrap();
    let deadline = |ix: &Index| ix.debouncer.deadline(&cfg);
    assert_eq!(deadline(&ix), Some(t0 + cfg.quiet), "more parts to come");
    // c2's resync opens: c1's last part does not end the burst.
    ix.apply_batch("c2", 2, part(1, true, svc("b")), t0)
        .unwrap();
    let t1 = t0 + ms(30);
    ix.apply_batch("c1", 1, part(2, false, svc("c")), t1)
        .unwrap();
    assert_eq!(deadline(&ix), Some(t1 + cfg.quiet), "c2's resync is open");
    let t2 = t1 + ms(30);
    ix.apply_batch("c2", 2, part(2, false, svc("d")), t2)
        .unwrap();
    assert_eq!(deadline(&ix), Some(t2), "every resync ended: at once");
    ix.flush(t2);
    assert_eq!(deadline(&ix), None);
    // An incremental batch waits for the quiet period.
    let t3 = t2 + ms(500);
    ix.apply_batch("c1", 1, batch(3, false, svc("e")), t3)
        .unwrap();
    assert_eq!(deadline(&ix), Some(t3 + cfg.quiet));
}

/// An agent exporting its cluster as it lists it names a key in one part and may see
/// the object go before the list ends: a delete inside the resync takes the naming
/// back, so the last part deletes the key; nothing is deleted before that part.
#[test]
fn a_delete_inside_a_split_resync_unnames_the_key_and_waits_for_the_end() {
    let (mut ix, snapshots) = index();
    connect(&mut ix, "c1", 1, &["a", "b", "c"]);
    ix.flush(Instant::now());
    ix.gone("c1", 1, Instant::now());
    ix.hello(info("c1"), 0, 2).unwrap();
    let p1 = vec![
        change(ChangeKind::UpsertService(fed_service("a", "prod"))),
        change(ChangeKind::UpsertService(fed_service("b", "prod"))),
        change(ChangeKind::UpsertEndpoints(
            key("b"),
            set(vec![endpoint("10.0.98.1", "c1")]),
        )),
    ];
    ix.apply_batch("c1", 2, part(2, true, p1), Instant::now())
        .unwrap();
    // b (named by part 1) went away at the source: deleted inside the resync.
    let p2 = vec![
        change(ChangeKind::DeleteEndpoints(key("b"))),
        change(ChangeKind::DeleteService(key("b"))),
    ];
    ix.apply_batch("c1", 2, part(3, true, p2), Instant::now())
        .unwrap();
    assert_eq!(
        held_services(&ix, "c1"),
        ["a", "b", "c"],
        "nothing is deleted before the resync's last part"
    );
    ix.flush(Instant::now());
    assert!(
        snapshots
            .current("prod")
            .get(XdsType::Endpoint, &cluster_name("b"))
            .is_some()
    );
    let p3 = vec![change(ChangeKind::UpsertEndpoints(
        key("a"),
        set(vec![endpoint("10.0.99.1", "c1")]),
    ))];
    ix.apply_batch("c1", 2, part(4, false, p3), Instant::now())
        .unwrap();
    assert_eq!(held_services(&ix, "c1"), ["a"], "b and c were not named");
    assert!(!ix.sources.clusters["c1"].endpoints.contains_key(&key("b")));
    ix.flush(Instant::now());
    let s = snapshots.current("prod");
    assert!(s.get(XdsType::Cluster, &cluster_name("a")).is_some());
    assert!(s.get(XdsType::Cluster, &cluster_name("b")).is_none());
    assert!(s.get(XdsType::Endpoint, &cluster_name("b")).is_none());
}

#[test]
fn an_invalid_named_endpoint_keeps_its_previous_form() {
    let (mut ix, _) = index();
    ix.hello(info("c1"), 0, 1).unwrap();
    let first = EndpointSet {
        endpoints: vec![
            named("pod-1", "10.0.0.1", "c1"),
            named("pod-2", "10.0.0.2", "c1"),
        ],
        keep: vec![],
    };
    let changes = vec![
        change(ChangeKind::UpsertService(fed_service("a", "prod"))),
        change(ChangeKind::UpsertEndpoints(key("a"), first)),
    ];
    ix.apply_batch("c1", 1, batch(1, true, changes), Instant::now())
        .unwrap();
    // pod-2's new form was invalid; pod-1 moved; pod-3 is new.
    let second = EndpointSet {
        endpoints: vec![
            named("pod-1", "10.0.0.11", "c1"),
            named("pod-3", "10.0.0.3", "c1"),
        ],
        keep: vec!["pod-2".into()],
    };
    ix.apply_batch(
        "c1",
        1,
        batch(
            2,
            false,
            vec![change(ChangeKind::UpsertEndpoints(key("a"), second))],
        ),
        Instant::now(),
    )
    .unwrap();
    let mut held: Vec<(String, String)> = ix.sources.clusters["c1"].endpoints[&key("a")]
        .iter()
        .map(|e| (e.name.clone(), e.endpoint.address.to_string()))
        .collect();
    held.sort();
    assert_eq!(
        held,
        [
            ("pod-1".to_string(), "10.0.0.11".to_string()),
            ("pod-2".into(), "10.0.0.2".into()),
            ("pod-3".into(), "10.0.0.3".into())
        ]
    );
}

#[test]
fn resume_needs_the_same_incarnation() {
    let (mut ix, _) = index();
    let with = |inc: &str| ClusterInfo {
        incarnation: inc.into(),
        ..info("c1")
    };
    ix.hello(with("one"), 0, 1).unwrap();
    ix.apply_batch("c1", 1, batch(1, true, vec![]), Instant::now())
        .unwrap();
    ix.gone("c1", 1, Instant::now());
    // Another agent process whose counter happens to match: no resume.
    assert!(!ix.hello(with("two"), 1, 2).unwrap().resume);
    ix.gone("c1", 2, Instant::now());
    assert!(
        !ix.hello(with(""), 1, 3).unwrap().resume,
        "no incarnation: never resumed"
    );
    ix.gone("c1", 3, Instant::now());
    assert!(ix.hello(with("one"), 1, 4).unwrap().resume);
}

/// Every resource of `env` with its version.
fn resources(snapshots: &Snapshots, env: &str) -> Vec<(XdsType, String, String)> {
    let s = snapshots.current(env);
    let mut v = Vec::new();
    for ty in XdsType::ALL {
        for (name, r) in s.of_type(ty).iter() {
            v.push((ty, name.to_string(), r.version().to_string()));
        }
    }
    v.sort_by(|a, b| (a.0 as usize, &a.1).cmp(&(b.0 as usize, &b.1)));
    v
}

#[test]
fn host_ownership_does_not_depend_on_arrival_order_and_returns_on_release() {
    // `b` declares a's conventional host: `a` owns it (rule 2) whichever comes first.
    let mut b_svc = fed_service("b", "prod");
    b_svc.hosts = vec![
        "b.ns.svc.cluster.local".into(),
        "a.ns.svc.cluster.local".into(),
    ];
    // `z` and `y` both claim "shared.example": the lower namespace/name (`y`) owns it.
    let mut z_svc = fed_service("z", "prod");
    z_svc.hosts.push("shared.example".into());
    let mut y_svc = fed_service("y", "prod");
    y_svc.hosts.push("shared.example".into());
    let run = |order: &[&FedService]| {
        let (mut ix, snapshots) = index();
        ix.hello(info("c1"), 0, 1).unwrap();
        for (i, s) in order.iter().enumerate() {
            ix.apply_batch(
                "c1",
                1,
                batch(
                    i as u64 + 1,
                    false,
                    vec![change(ChangeKind::UpsertService((*s).clone()))],
                ),
                Instant::now(),
            )
            .unwrap();
            ix.flush(Instant::now());
        }
        (ix, snapshots)
    };
    let a_svc = fed_service("a", "prod");
    let (_, s1) = run(&[&a_svc, &b_svc, &z_svc, &y_svc]);
    let (mut ix, s2) = run(&[&y_svc, &z_svc, &b_svc, &a_svc]);
    let first = resources(&s1, "prod");
    assert_eq!(
        first,
        resources(&s2, "prod"),
        "arrival order changed the snapshot"
    );
    let hosts = |ix: &Index, n: &str| ix.envs["prod"].model.services[&key(n)].hosts.clone();
    assert_eq!(hosts(&ix, "a"), ["a.ns.svc.cluster.local"]);
    assert_eq!(hosts(&ix, "b"), ["b.ns.svc.cluster.local"]);
    assert_eq!(
        hosts(&ix, "y"),
        ["y.ns.svc.cluster.local", "shared.example"]
    );
    assert_eq!(hosts(&ix, "z"), ["z.ns.svc.cluster.local"]);

    // The owners let go: the losers get the hosts back in the same flush.
    let deletes = vec![
        change(ChangeKind::DeleteService(key("a"))),
        change(ChangeKind::DeleteService(key("y"))),
    ];
    ix.apply_batch("c1", 1, batch(9, false, deletes), Instant::now())
        .unwrap();
    ix.flush(Instant::now());
    assert_eq!(
        hosts(&ix, "b"),
        ["b.ns.svc.cluster.local", "a.ns.svc.cluster.local"]
    );
    assert_eq!(
        hosts(&ix, "z"),
        ["z.ns.svc.cluster.local", "shared.example"]
    );
    let s = s2.current("prod");
    use prost::Message;
    let route = tributary_proto::envoy::envoy::config::route::v3::RouteConfiguration::decode(
        s.get(XdsType::Route, "80").unwrap().body(),
    )
    .unwrap();
    let vh = |domain: &str| {
        route
            .virtual_hosts
            .iter()
            .find(|v| v.domains.iter().any(|d| d == domain))
            .map(|v| v.name.clone())
    };
    assert!(vh("a.ns.svc.cluster.local").is_some_and(|n| n.contains("b.ns")));
    assert!(vh("shared.example").is_some_and(|n| n.contains("z.ns")));
}

#[test]
fn a_host_in_two_spellings_is_one_host() {
    use prost::Message;
    let (mut ix, snapshots) = index();
    let mesh = crate::config::parse_files([(
        "f.yaml",
        "apiVersion: tributary.io/v1alpha1\nkind: Service\nmetadata: {name: reviews, namespace: ns, environment: prod}\nspec:\n  hosts: [reviews.prod]\n  ports: [{name: http, port: 80}]\n",
    )])
    .unwrap();
    ix.set_file(Arc::new(mesh), Instant::now());
    ix.hello(info("c1"), 0, 1).unwrap();
    let info1 = info("c1");
    let raw = tributary_proto::federation::v1::ChangeBatch {
        version: 1,
        full: true,
        more: false,
        changes: vec![tributary_proto::federation::v1::Change {
            origin_unix_nanos: 1,
            kind: Some(
                tributary_proto::federation::v1::change::Kind::ServiceUpsert(
                    tributary_proto::federation::v1::Service {
                        namespace: "ns".into(),
                        name: "reviews".into(),
                        hosts: vec!["Reviews.prod".into(), "REVIEWS.ns".into()],
                        ports: vec![tributary_proto::federation::v1::ServicePort {
                            name: "http".into(),
                            port: 80,
                            protocol: "HTTP".into(),
                        }],
                        environment: "prod".into(),
                    },
                ),
            ),
        }],
    };
    let (b, errors) =
        crate::federation::convert::batch(raw, &info1, &crate::federation::Limits::default())
            .unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    ix.apply_batch("c1", 1, b, Instant::now()).unwrap();
    ix.flush(Instant::now());
    let s = snapshots.current("prod");
    let route = tributary_proto::envoy::envoy::config::route::v3::RouteConfiguration::decode(
        s.get(XdsType::Route, "80").unwrap().body(),
    )
    .unwrap();
    // Envoy rejects a route table whose domains repeat (case-insensitively).
    let mut domains: Vec<String> = route
        .virtual_hosts
        .iter()
        .flat_map(|v| v.domains.iter().map(|d| d.to_ascii_lowercase()))
        .collect();
    let n = domains.len();
    domains.sort();
    domains.dedup();
    assert_eq!(
        domains.len(),
        n,
        "duplicate domains: {:?}",
        route.virtual_hosts
    );
    assert_eq!(
        ix.envs["prod"].model.services[&key("reviews")].hosts,
        ["reviews.prod", "reviews.ns"]
    );
}

/// Records what the index saves (the state dir's interface, in memory).
#[derive(Debug, Clone, Default)]
struct Saved(Arc<std::sync::Mutex<Vec<Vec<KnownCluster>>>>);

impl KnownClusters for Saved {
    fn save(&mut self, clusters: &[KnownCluster]) -> Result<(), known::StateError> {
        self.0.lock().unwrap().push(clusters.to_vec());
        Ok(())
    }
}

fn known(id: &str) -> KnownCluster {
    KnownCluster {
        id: id.into(),
        region: "r".into(),
        zone: "z".into(),
        last_seen_unix: 1.0,
    }
}

#[test]
fn withdrawals_are_held_until_every_known_cluster_resync_is_published() {
    let (mut ix, snapshots) = index();
    let held = snapshots.withdrawals_held();
    let t0 = Instant::now();
    let saved = Saved::default();
    ix.restore(vec![known("c1"), known("c2")], Box::new(saved.clone()), t0);
    assert!(*held.borrow(), "held from the start");
    assert_eq!(ix.pending_status.borrow().len(), 2);

    connect(&mut ix, "c1", 1, &["a"]);
    ix.flush(t0);
    assert!(*held.borrow(), "c2 has not resynced");

    // c2 resyncs in two parts: the first does not end its pending state.
    ix.hello(info("c2"), 0, 2).unwrap();
    let p1 = vec![change(ChangeKind::UpsertService(fed_service("b", "prod")))];
    ix.apply_batch("c2", 2, part(1, true, p1), t0).unwrap();
    ix.flush(t0);
    assert!(*held.borrow(), "a resync is complete only at its last part");
    let p2 = vec![change(ChangeKind::UpsertService(fed_service("d", "prod")))];
    ix.apply_batch("c2", 2, part(2, false, p2), t0).unwrap();
    assert!(ix.pending_status.borrow().is_empty());
    assert!(
        *held.borrow(),
        "not released before the snapshot with the resync is published"
    );
    let has_d = |snapshots: &Snapshots| {
        snapshots
            .current("prod")
            .get(XdsType::Cluster, &cluster_name("d"))
            .is_some()
    };
    assert!(!has_d(&snapshots));
    ix.flush(t0);
    assert!(has_d(&snapshots));
    assert!(
        !*held.borrow(),
        "released at the end of the publishing flush"
    );
    // Nothing new to remember so far; a new cluster is saved at once.
    assert!(saved.0.lock().unwrap().is_empty());
    connect(&mut ix, "c3", 3, &["e"]);
    let last = saved.0.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        last.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
        ["c1", "c2", "c3"]
    );
}

#[test]
fn a_known_cluster_that_never_returns_stops_the_hold_at_its_grace() {
    let (mut ix, snapshots) = index();
    let held = snapshots.withdrawals_held();
    let t0 = Instant::now();
    let saved = Saved::default();
    ix.restore(vec![known("gone")], Box::new(saved.clone()), t0);
    assert!(*held.borrow());
    assert_eq!(ix.next_expiry(), Some(t0 + ix.cfg.grace));
    ix.expire(t0 + ix.cfg.grace - Duration::from_millis(1));
    assert!(*held.borrow(), "still within its grace period");
    ix.expire(t0 + ix.cfg.grace);
    assert!(!*held.borrow());
    assert!(ix.pending_status.borrow().is_empty());
    assert_eq!(
        saved.0.lock().unwrap().last().cloned(),
        Some(vec![]),
        "forgotten"
    );
}

/// Ingests `n` services of 10 endpoints each from `n / 100` clusters, as agents send
/// them: each cluster declares 100 services of its own and 20 of the next cluster's
/// (one service, two clusters), as a full resync split into batches of 50 changes, each
/// batch applied and flushed on its own (batches slower than the debounce: the worst
/// case). Returns the index's work counters.
fn ingest_work(n: usize) -> Work {
    let (mut ix, _shards) = index();
    let clusters = n / 100;
    let now = Instant::now();
    for c in 0..clusters {
        let id = format!("c{c}");
        let session = c as u64 + 1;
        ix.hello(info(&id), 0, session).unwrap();
        let mut changes = Vec::new();
        for i in (c * 100..c * 100 + 120).map(|i| i % n) {
            let name = format!("s{i}");
            changes.push(change(ChangeKind::UpsertService(fed_service(
                &name, "prod",
            ))));
            let eps = (0..10)
                .map(|j| {
                    let a = (c * 1_000_000 + i * 10 + j) as u32;
                    endpoint(&std::net::Ipv4Addr::from(0x0a00_0000 + a).to_string(), &id)
                })
                .collect();
            changes.push(change(ChangeKind::UpsertEndpoints(key(&name), set(eps))));
        }
        let parts: Vec<Vec<Change>> = changes.chunks(50).map(<[Change]>::to_vec).collect();
        let last = parts.len();
        for (p, part) in parts.into_iter().enumerate() {
            let b = Batch {
                version: p as u64 + 1,
                full: true,
                more: p + 1 < last,
                changes: part,
            };
            ix.apply_batch(&id, session, b, now).unwrap();
            ix.flush(now);
        }
    }
    let snap = _shards.current("prod");
    assert_eq!(
        snap.of_type(XdsType::Endpoint).len(),
        n,
        "every service published"
    );
    ix.work()
}

/// Ingesting 4× the services costs about 4× the work in every step that used to be
/// super-linear (host ownership, merging over every cluster, shared route tables
/// rebuilt per flush, status rebuilt per batch). Counts, not timings.
#[test]
fn ingest_work_is_linear_in_services() {
    let small = ingest_work(1_000);
    let large = ingest_work(4_000);
    type Step = (&'static str, fn(&Work) -> u64);
    let steps: [Step; 6] = [
        ("host_ops", |w| w.host_ops),
        ("merge_visits", |w| w.merge_visits),
        ("services_merged", |w| w.services_merged),
        ("resources_encoded", |w| w.resources_encoded),
        ("virtual_hosts_encoded", |w| w.virtual_hosts_encoded),
        ("status_entries", |w| w.status_entries),
    ];
    let mut report = Vec::new();
    for (name, get) in steps {
        let (a, b) = (get(&small), get(&large));
        assert!(a > 0, "{name}: no work counted for 1,000 services");
        report.push(format!("{name}: {a} -> {b} ({:.2}x)", b as f64 / a as f64));
    }
    println!("{}", report.join("\n"));
    let ratios_ok = steps.iter().all(|(_, get)| {
        let (a, b) = (get(&small) as f64, get(&large) as f64);
        b / a <= 5.0
    });
    assert!(
        ratios_ok,
        "work for 4,000 services must stay within 5x the work for 1,000:\n{}",
        report.join("\n")
    );
}

/// Applies one incremental batch on `c1` (session 1) moving every service of `names`
/// to new endpoint addresses (`round` picks them), then flushes.
fn move_endpoints(ix: &mut Index, version: u64, names: &[String], round: u8) {
    let changes = names
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let a = format!("10.{round}.{}.{}", i / 250, i % 250);
            change(ChangeKind::UpsertEndpoints(
                key(s),
                set(vec![endpoint(&a, "c1")]),
            ))
        })
        .collect();
    ix.apply_batch("c1", 1, batch(version, false, changes), Instant::now())
        .unwrap();
    ix.flush(Instant::now());
}

/// An endpoint change leaves host ownership alone: the service claims the hosts it
/// claimed, so the flush releases and places no claim and moves no host; it only
/// reads each host's owner (one look-up per host). Before, every touched service
/// released and placed all its claims again (five operations per host), which was a
/// large part of the flush that ends a big cluster's first resync.
#[test]
fn an_endpoint_change_releases_and_places_no_host_claims() {
    let (mut ix, snapshots) = index();
    let names: Vec<String> = (0..200).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    connect(&mut ix, "c1", 1, &refs);
    ix.flush(Instant::now());
    let placed = ix.work();
    let before = resources(&snapshots, "prod");
    move_endpoints(&mut ix, 2, &names, 1);
    let w = ix.work();
    assert_eq!(w.services_merged - placed.services_merged, 200);
    assert_eq!(
        w.host_ops - placed.host_ops,
        200,
        "one owner look-up per host, no claim released or placed"
    );
    // Only the load assignments changed, and every one of them did.
    let after = resources(&snapshots, "prod");
    let changed: Vec<_> = after
        .iter()
        .filter(|r| !before.contains(r))
        .map(|r| r.0)
        .collect();
    assert_eq!(changed.len(), 200);
    assert!(changed.iter().all(|t| *t == XdsType::Endpoint));
    assert_eq!(
        ix.envs["prod"].claimed.len(),
        200,
        "every service still claims its host"
    );
}

/// A claim's rank changes when its service becomes (or stops being) defined in the
/// file, with the same hosts: ownership follows the rank, not the host list alone.
#[test]
fn a_claim_whose_rank_alone_changes_moves_the_host() {
    let (mut ix, _snapshots) = index();
    // `y` and `z` both claim "shared.example": `y` owns it (the lower name).
    let mut y_svc = fed_service("y", "prod");
    y_svc.hosts.push("shared.example".into());
    let mut z_svc = fed_service("z", "prod");
    z_svc.hosts.push("shared.example".into());
    ix.hello(info("c1"), 0, 1).unwrap();
    let ups = vec![
        change(ChangeKind::UpsertService(y_svc)),
        change(ChangeKind::UpsertService(z_svc)),
    ];
    ix.apply_batch("c1", 1, batch(1, false, ups), Instant::now())
        .unwrap();
    ix.flush(Instant::now());
    let hosts = |ix: &Index, n: &str| ix.envs["prod"].model.services[&key(n)].hosts.clone();
    assert_eq!(hosts(&ix, "z"), ["z.ns.svc.cluster.local"]);
    // The file defines `z` with the hosts it already claims, in the same order: only
    // the rank of its claims changes (file services own first).
    let file = |hosts: &str| {
        let text = format!(
            "apiVersion: tributary.io/v1alpha1\nkind: Service\nmetadata: {{name: z, namespace: ns, environment: prod}}\nspec:\n  hosts: {hosts}\n  ports: [{{name: http, port: 80}}]\n"
        );
        crate::config::parse_files([("f.yaml", text.as_str())]).unwrap()
    };
    ix.set_file(
        Arc::new(file("[z.ns.svc.cluster.local, shared.example]")),
        Instant::now(),
    );
    ix.flush(Instant::now());
    assert_eq!(
        hosts(&ix, "z"),
        ["z.ns.svc.cluster.local", "shared.example"]
    );
    assert_eq!(hosts(&ix, "y"), ["y.ns.svc.cluster.local"]);
    // And back when the file lets it go.
    ix.set_file(Arc::new(Mesh::default()), Instant::now());
    ix.flush(Instant::now());
    assert_eq!(hosts(&ix, "z"), ["z.ns.svc.cluster.local"]);
    assert_eq!(
        hosts(&ix, "y"),
        ["y.ns.svc.cluster.local", "shared.example"]
    );
}

/// The load assignment `name` of `env` as published, decoded: (address, port) of each
/// endpoint, sorted.
fn published_endpoints(snapshots: &Snapshots, env: &str, name: &str) -> Vec<(String, u32)> {
    use prost::Message;
    use tributary_proto::envoy::envoy::config::core::v3::address::Address;
    use tributary_proto::envoy::envoy::config::core::v3::socket_address::PortSpecifier;
    use tributary_proto::envoy::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    let s = snapshots.current(env);
    let r = s.get(XdsType::Endpoint, name).expect("load assignment");
    let cla = tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(
        r.body(),
    )
    .unwrap();
    let mut v: Vec<(String, u32)> = cla
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|lb| match &lb.host_identifier {
            Some(HostIdentifier::Endpoint(e)) => match e.address.as_ref()?.address.as_ref()? {
                Address::SocketAddress(sa) => match sa.port_specifier {
                    Some(PortSpecifier::PortValue(p)) => Some((sa.address.clone(), p)),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// A flush after an endpoint change reads the touched services' endpoints where the
/// clusters hold them: none is copied into the merged service (before, every endpoint
/// of every touched service was, at every flush), and the load assignments carry the
/// new endpoints.
#[test]
fn an_endpoint_change_copies_no_endpoint() {
    let (mut ix, snapshots) = index();
    let names: Vec<String> = (0..200).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    connect(&mut ix, "c1", 1, &refs);
    ix.flush(Instant::now());
    let before = ix.work();
    move_endpoints(&mut ix, 2, &names, 7);
    let w = ix.work();
    assert_eq!(w.services_merged - before.services_merged, 200);
    assert_eq!(w.endpoints_copied, 0, "no endpoint copied while merging");
    assert_eq!(
        published_endpoints(&snapshots, "prod", &cluster_name("s3")),
        [("10.7.0.3".to_string(), 8080)]
    );
}

/// Two clusters name port 80 of one service differently: the merged service names it
/// as the first declaring cluster does, and the other cluster's endpoints are copied
/// with their port renamed (the only copies a merge makes), so both serve port 80.
#[test]
fn endpoints_of_a_cluster_naming_a_port_differently_are_renamed() {
    let (mut ix, snapshots) = index();
    connect(&mut ix, "c1", 1, &["a"]);
    ix.hello(info("c2"), 0, 2).unwrap();
    let mut web = fed_service("a", "prod");
    web.ports[0].name = "web".into();
    let mut e = endpoint("10.9.0.1", "c2");
    e.ports = [("web".to_string(), 9090)].into();
    let changes = vec![
        change(ChangeKind::UpsertService(web)),
        change(ChangeKind::UpsertEndpoints(key("a"), set(vec![e]))),
    ];
    ix.apply_batch("c2", 2, batch(1, true, changes), Instant::now())
        .unwrap();
    ix.flush(Instant::now());
    let octet = "c1".bytes().map(u32::from).sum::<u32>() % 250;
    assert_eq!(
        published_endpoints(&snapshots, "prod", &cluster_name("a")),
        [
            (format!("10.0.{octet}.0"), 8080),
            ("10.9.0.1".to_string(), 9090)
        ]
    );
    assert_eq!(
        ix.envs["prod"].model.services[&key("a")].ports[0].name,
        "http"
    );
    assert!(
        ix.envs["prod"].model.services[&key("a")]
            .endpoints
            .is_empty(),
        "the model holds specs only"
    );
    assert_eq!(ix.work().endpoints_copied, 1, "c2's endpoint, renamed");
}

/// Every resource of `env` has an origin and nothing else has one.
fn assert_origins_follow_resources(ix: &Index, env: &str) {
    let res = &ix.envs[env].resources;
    for ty in XdsType::ALL {
        let i = ty as usize;
        let names: Vec<&Arc<str>> = res.by_type[i].keys().collect();
        let origins: Vec<&Arc<str>> = res.origins[i].keys().collect();
        assert_eq!(names, origins, "{ty:?}: origins follow the resources");
    }
}

/// A resource's origin (where its convergence starts) is the oldest change of the
/// flush that last changed it: kept while it does not change, dropped with it.
#[test]
fn a_resource_s_origin_is_the_flush_that_last_changed_it() {
    let (mut ix, _snapshots) = index();
    connect(&mut ix, "c1", 1, &["a", "b"]);
    ix.flush(Instant::now());
    assert_origins_follow_resources(&ix, "prod");
    let eds = XdsType::Endpoint as usize;
    let origin = |ix: &Index, name: &str| ix.envs["prod"].resources.origins[eds].get(name).copied();
    let b_before = origin(&ix, &cluster_name("b")).unwrap();
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let moved = Change {
        origin: at,
        kind: ChangeKind::UpsertEndpoints(key("a"), set(vec![endpoint("10.1.1.1", "c1")])),
    };
    ix.apply_batch("c1", 1, batch(2, false, vec![moved]), Instant::now())
        .unwrap();
    ix.flush(Instant::now());
    assert_eq!(origin(&ix, &cluster_name("a")), Some(at));
    assert_eq!(origin(&ix, &cluster_name("b")), Some(b_before), "unchanged");
    assert_origins_follow_resources(&ix, "prod");
    let gone = change(ChangeKind::DeleteService(key("b")));
    ix.apply_batch("c1", 1, batch(3, false, vec![gone]), Instant::now())
        .unwrap();
    ix.flush(Instant::now());
    assert_eq!(origin(&ix, &cluster_name("b")), None, "withdrawn");
    assert_origins_follow_resources(&ix, "prod");
}
