//! Property test: random and malformed federation batches from one cluster never
//! crash the hub's conversion or index, and never change another cluster's state.
//!
//! Inputs come from a seeded generator (each failure prints its seed), mixing valid
//! items with every kind of damage the edge must catch: empty and oversized names,
//! unparsable and odd addresses, ports of 0 and above 65535, unknown protocols,
//! duplicate ports, empty changes, deletes of unknown keys, full and incremental
//! batches, and keys that collide with the other cluster's services and hosts.

use std::sync::Arc;

use prometheus_client::registry::Registry;
use prost::Message;
use tokio::time::Instant;
use tributary_controlplane::federation::ClusterInfo;
use tributary_controlplane::federation::{ChangeKind, Limits, convert};
use tributary_controlplane::index::{Index, IndexConfig};
use tributary_controlplane::metrics::Metrics;
use tributary_controlplane::xds::XdsType;
use tributary_controlplane::xds::snapshot::Snapshots;
use tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use tributary_proto::federation::v1 as pb;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const NAMES: &[&str] = &[
    "a",
    "b",
    "shared",
    "web",
    "",
    "UPPER",
    "x.y",
    "bad name",
    "é",
    "a-very-long-name-that-is-fine",
];
const NAMESPACES: &[&str] = &["shop", "", "other", "ns"];
const ADDRESSES: &[&str] = &[
    "10.0.0.1",
    "10.0.0.2",
    "fd00::1",
    "::1",
    "",
    "300.1.1.1",
    "not-an-ip",
    "1.2.3",
    "[fd00::2]",
    "10.0.0.1 ",
];
const PROTOCOLS: &[&str] = &["", "HTTP", "GRPC", "HTTP2", "TCP", "UDP", "http"];
const ENVS: &[&str] = &["prod", "staging", "", "PROD!"];

fn long_name(r: &mut Rng) -> String {
    if r.chance(3) {
        "n".repeat(300)
    } else {
        r.pick(NAMES).to_string()
    }
}

fn service(r: &mut Rng) -> pb::Service {
    let name = long_name(r);
    let ports = (0..r.below(3))
        .map(|_| pb::ServicePort {
            name: r.pick(&["http", "grpc", "", "http"]).to_string(),
            port: *r.pick(&[80u32, 0, 70000, 8080, 65535, 65536]),
            protocol: r.pick(PROTOCOLS).to_string(),
        })
        .collect();
    let hosts = (0..r.below(3))
        .map(|_| {
            if r.chance(20) {
                "shared.shop.svc.cluster.local".to_string()
            } else {
                format!("{}.{}", r.pick(NAMES), r.pick(NAMESPACES))
            }
        })
        .collect();
    pb::Service {
        namespace: r.pick(NAMESPACES).to_string(),
        name,
        hosts,
        ports,
        environment: r.pick(ENVS).to_string(),
    }
}

fn endpoints(r: &mut Rng) -> pb::EndpointSet {
    let eps = (0..r.below(4))
        .map(|_| pb::Endpoint {
            addresses: (0..r.below(3))
                .map(|_| r.pick(ADDRESSES).to_string())
                .collect(),
            ports: (0..r.below(3))
                .map(|_| {
                    (
                        r.pick(&["http", "", "grpc"]).to_string(),
                        *r.pick(&[80u32, 0, 99999, 8080]),
                    )
                })
                .collect(),
            zone: r.pick(&["", "az1", "z"]).to_string(),
            node: String::new(),
            ready: r.chance(70),
            serving: r.chance(70),
            terminating: r.chance(10),
            labels: Default::default(),
            ..Default::default()
        })
        .collect();
    pb::EndpointSet {
        namespace: r.pick(NAMESPACES).to_string(),
        service: long_name(r),
        endpoints: eps,
    }
}

fn change(r: &mut Rng) -> pb::Change {
    let kind = match r.below(6) {
        0 | 1 => Some(pb::change::Kind::ServiceUpsert(service(r))),
        2 | 3 => Some(pb::change::Kind::EndpointsUpsert(endpoints(r))),
        4 => Some(pb::change::Kind::ServiceDelete(pb::ServiceRef {
            namespace: r.pick(NAMESPACES).to_string(),
            name: long_name(r),
        })),
        _ if r.chance(50) => Some(pb::change::Kind::EndpointsDelete(pb::ServiceRef {
            namespace: r.pick(NAMESPACES).to_string(),
            name: long_name(r),
        })),
        _ => None,
    };
    // Origins anywhere, including the epoch, negative and the far future.
    let origin = *r.pick(&[0i64, -5, 1_700_000_000_000_000_000, i64::MAX]);
    pb::Change {
        origin_unix_nanos: origin,
        kind,
    }
}

/// The good cluster's contribution, as xDS clients would see it.
fn good_view(snapshots: &Snapshots) -> Vec<(String, usize)> {
    let snap = snapshots.current("prod");
    [
        "outbound|80||shared.shop.svc.cluster.local",
        "outbound|80||web.shop.svc.cluster.local",
    ]
    .iter()
    .map(|n| {
        let cla = snap
            .get(XdsType::Endpoint, n)
            .map(|r| ClusterLoadAssignment::decode(r.body()).unwrap());
        let good = cla
            .map(|c| {
                c.endpoints
                    .iter()
                    .filter(|l| l.locality.as_ref().is_some_and(|x| x.sub_zone == "good"))
                    .map(|l| l.lb_endpoints.len())
                    .sum()
            })
            .unwrap_or(0);
        (n.to_string(), good)
    })
    .collect()
}

fn good_batch() -> pb::ChangeBatch {
    let svc = |name: &str| pb::Service {
        namespace: "shop".into(),
        name: name.into(),
        hosts: vec![format!("{name}.shop.svc.cluster.local")],
        ports: vec![pb::ServicePort {
            name: "http".into(),
            port: 80,
            protocol: "HTTP".into(),
        }],
        environment: "prod".into(),
    };
    let eps = |name: &str| pb::EndpointSet {
        namespace: "shop".into(),
        service: name.into(),
        endpoints: vec![pb::Endpoint {
            addresses: vec!["10.9.0.1".into(), "fd00::9".into()],
            ports: [("http".to_string(), 8080)].into(),
            ready: true,
            serving: true,
            ..Default::default()
        }],
    };
    let changes = ["shared", "web"]
        .iter()
        .flat_map(|n| {
            [
                pb::Change {
                    origin_unix_nanos: 1,
                    kind: Some(pb::change::Kind::ServiceUpsert(svc(n))),
                },
                pb::Change {
                    origin_unix_nanos: 1,
                    kind: Some(pb::change::Kind::EndpointsUpsert(eps(n))),
                },
            ]
        })
        .collect();
    pb::ChangeBatch {
        version: 1,
        full: true,
        changes,
        ..Default::default()
    }
}

#[test]
fn random_and_malformed_batches_never_crash_or_corrupt_another_cluster() {
    let cases: u64 = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let first: u64 = std::env::var("PROPTEST_FIRST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for seed in first..first + cases {
        let snapshots = Arc::new(Snapshots::default());
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let mut ix = Index::new(IndexConfig::default(), snapshots.clone(), metrics);
        let good = ClusterInfo {
            id: "good".into(),
            region: "r".into(),
            zone: "z".into(),
            ..Default::default()
        };
        let bad = ClusterInfo {
            id: "bad".into(),
            region: "r".into(),
            zone: "z".into(),
            ..Default::default()
        };
        ix.hello(good.clone(), 0, 1).unwrap();
        let (b, errs) = convert::batch(good_batch(), &good, &Limits::default()).unwrap();
        assert!(errs.is_empty());
        ix.apply_batch("good", 1, b, Instant::now()).unwrap();
        ix.flush(Instant::now());
        let expected = good_view(&snapshots);
        assert_eq!(
            expected.iter().map(|(_, n)| n).sum::<usize>(),
            4,
            "seed {seed}: setup"
        );

        ix.hello(bad.clone(), 0, 2).unwrap();
        let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        for round in 0..20 {
            let n = r.below(12) as usize;
            let raw = pb::ChangeBatch {
                version: round + 1,
                full: r.chance(25),
                changes: (0..n).map(|_| change(&mut r)).collect(),
                ..Default::default()
            };
            // The wire round trip as well: whatever was sent decodes the same.
            let raw = pb::ChangeBatch::decode(raw.encode_to_vec().as_slice()).unwrap();
            let total = raw.changes.len();
            if std::env::var("PROP_DEBUG").is_ok_and(|v| v == seed.to_string()) {
                eprintln!("round {round}: {raw:#?}");
            }
            let (batch, errors) =
                convert::batch(raw, &bad, &Limits::default()).expect("not oversize");
            // Every item is applied or reported: an item rejected whole is reported
            // (and may stand as a "keep" of its key); an endpoint set with bad
            // endpoints is applied and reports each of them.
            let per_endpoint = |m: &str| {
                m.ends_with("(endpoint dropped)") || m.ends_with("keeps its previous form)")
            };
            let rejected: std::collections::BTreeSet<u32> = errors
                .iter()
                .filter(|e| !per_endpoint(&e.message))
                .map(|e| e.index)
                .collect();
            let applied = batch
                .changes
                .iter()
                .filter(|c| {
                    !matches!(
                        c.kind,
                        ChangeKind::KeepService(_) | ChangeKind::KeepEndpoints(_)
                    )
                })
                .count();
            assert_eq!(
                applied + rejected.len(),
                total,
                "seed {seed}: every item is applied or reported"
            );
            assert!(errors.iter().all(|e| (e.index as usize) < total));
            ix.apply_batch("bad", 2, batch, Instant::now()).unwrap();
            if r.chance(50) {
                ix.flush(Instant::now());
                assert_eq!(
                    good_view(&snapshots),
                    expected,
                    "seed {seed} round {round}: the good cluster's endpoints changed"
                );
            }
        }
        ix.flush(Instant::now());
        assert_eq!(
            good_view(&snapshots),
            expected,
            "seed {seed}: the good cluster's endpoints changed"
        );
        // Whatever happened, every published resource is a valid message.
        let snap = snapshots.current("prod");
        for (_, r) in snap.of_type(XdsType::Endpoint).iter() {
            ClusterLoadAssignment::decode(r.body()).unwrap();
        }
    }
}

#[test]
fn oversize_batches_are_rejected_whole() {
    let info = ClusterInfo {
        id: "c".into(),
        ..Default::default()
    };
    let change = pb::Change {
        origin_unix_nanos: 1,
        kind: Some(pb::change::Kind::ServiceDelete(pb::ServiceRef {
            namespace: "a".into(),
            name: "b".into(),
        })),
    };
    let raw = pb::ChangeBatch {
        version: 3,
        full: false,
        changes: vec![change; Limits::default().max_batch_changes + 1],
        ..Default::default()
    };
    let err = convert::batch(raw, &info, &Limits::default()).unwrap_err();
    assert!(err.contains("exceed the limit"), "{err}");
}

// ---- fuzz_federation_batches: batches against a reference model ----------------
//
// One cluster's agent sends random sequences of batches: incremental ones, full
// resyncs split into parts, resyncs interrupted by an (invalid) incremental batch,
// and reconnects; items are valid or damaged (bad hosts, bad ports, bad addresses,
// empty changes), keys repeat within a batch, hosts come in case variants. After
// every batch, what the index holds for the cluster must equal a reference model of
// the documented semantics, and nothing may panic. `TRIBUTARY_FUZZ_CASES` sets the
// number of cases (`scripts/fuzz` runs 1,000,000 in release mode).

use std::collections::BTreeMap;

use proptest::prelude::*;
use tokio::sync::oneshot;
use tributary_controlplane::index::Command;
use tributary_controlplane::model::ObjectKey;

const KEYS: &[&str] = &["a", "b", "c"];
const HOSTS: &[&str] = &["a.ns", "A.NS", "b.ns", "shared.example", "Shared.Example"];
const GOOD_ADDRS: &[&str] = &["10.0.0.1", "10.0.0.2", "fd00::1", "10.0.0.3"];
const BAD_ADDRS: &[&str] = &["10.0.0.999", "", "fd00::zz"];
const EP_NAMES: &[&str] = &["", "p1", "p2", "p3"];
/// Sets with more endpoints than this are rejected whole (kept as they were).
const MAX_SET: usize = 3;

fn limits() -> Limits {
    Limits {
        max_endpoints_per_set: MAX_SET,
        ..Limits::default()
    }
}

#[derive(Debug, Clone)]
enum Item {
    /// A service upsert; `damage`: 0 none, 1 bad host, 2 no ports, 3 port 0.
    Service {
        key: usize,
        hosts: Vec<usize>,
        damage: u8,
    },
    DeleteService(usize),
    /// Endpoints: (name, address; `bad` picks from BAD_ADDRS).
    Endpoints {
        key: usize,
        eps: Vec<(usize, usize, bool)>,
    },
    DeleteEndpoints(usize),
    /// A change with an invalid key (empty name): rejected, names nothing.
    BadKey,
    Empty,
}

#[derive(Debug, Clone)]
enum Op {
    Incremental(Vec<Item>),
    /// A full resync in parts (each part non-empty or not).
    Resync(Vec<Vec<Item>>),
    /// The first part of a resync, then an incremental batch: rejected, the session
    /// ends, the agent reconnects.
    Interrupted(Vec<Item>, Vec<Item>),
    Reconnect,
}

fn item() -> impl Strategy<Value = Item> {
    let key = 0..KEYS.len();
    prop_oneof![
        4 => (key.clone(), prop::collection::vec(0..HOSTS.len(), 1..3), prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)])
            .prop_map(|(key, hosts, damage)| Item::Service { key, hosts, damage }),
        1 => key.clone().prop_map(Item::DeleteService),
        4 => (key.clone(), prop::collection::vec((0..EP_NAMES.len(), 0..GOOD_ADDRS.len(), prop::bool::weighted(0.2)), 0..MAX_SET + 2))
            .prop_map(|(key, eps)| Item::Endpoints { key, eps }),
        1 => key.prop_map(Item::DeleteEndpoints),
        1 => Just(Item::BadKey),
        1 => Just(Item::Empty),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let items = || prop::collection::vec(item(), 0..6);
    prop_oneof![
        4 => items().prop_map(Op::Incremental),
        3 => prop::collection::vec(items(), 1..4).prop_map(Op::Resync),
        1 => (items(), items()).prop_map(|(a, b)| Op::Interrupted(a, b)),
        1 => Just(Op::Reconnect),
    ]
}

fn okey(i: usize) -> ObjectKey {
    ObjectKey {
        namespace: "ns".into(),
        name: KEYS[i].into(),
    }
}

fn to_pb(item: &Item) -> pb::Change {
    use pb::change::Kind;
    let kind = match item {
        Item::Service { key, hosts, damage } => {
            let mut hosts: Vec<String> = hosts.iter().map(|h| HOSTS[*h].to_string()).collect();
            if *damage == 1 {
                hosts.push("bad host".into());
            }
            let ports = match damage {
                2 => vec![],
                3 => vec![pb::ServicePort {
                    name: "http".into(),
                    port: 0,
                    protocol: "HTTP".into(),
                }],
                _ => vec![pb::ServicePort {
                    name: "http".into(),
                    port: 80,
                    protocol: "HTTP".into(),
                }],
            };
            Some(Kind::ServiceUpsert(pb::Service {
                namespace: "ns".into(),
                name: KEYS[*key].into(),
                hosts,
                ports,
                environment: "prod".into(),
            }))
        }
        Item::DeleteService(k) => Some(Kind::ServiceDelete(pb::ServiceRef {
            namespace: "ns".into(),
            name: KEYS[*k].into(),
        })),
        Item::Endpoints { key, eps } => Some(Kind::EndpointsUpsert(pb::EndpointSet {
            namespace: "ns".into(),
            service: KEYS[*key].into(),
            endpoints: eps
                .iter()
                .map(|(name, addr, bad)| pb::Endpoint {
                    addresses: vec![
                        if *bad {
                            BAD_ADDRS[addr % BAD_ADDRS.len()]
                        } else {
                            GOOD_ADDRS[*addr]
                        }
                        .to_string(),
                    ],
                    ports: [("http".to_string(), 8080)].into(),
                    ready: true,
                    serving: true,
                    name: EP_NAMES[*name].into(),
                    ..Default::default()
                })
                .collect(),
        })),
        Item::DeleteEndpoints(k) => Some(Kind::EndpointsDelete(pb::ServiceRef {
            namespace: "ns".into(),
            name: KEYS[*k].into(),
        })),
        Item::BadKey => Some(Kind::ServiceDelete(pb::ServiceRef {
            namespace: "ns".into(),
            name: String::new(),
        })),
        Item::Empty => None,
    };
    pb::Change {
        origin_unix_nanos: 1,
        kind,
    }
}

/// The documented semantics, on their own: per key, the service (its lower-cased,
/// de-duplicated hosts) and the endpoints as (name, address).
#[derive(Debug, Default, Clone, PartialEq)]
struct Model {
    services: BTreeMap<ObjectKey, Vec<String>>,
    endpoints: BTreeMap<ObjectKey, Vec<(String, String)>>,
}

#[derive(Debug, Default)]
struct Named {
    services: std::collections::BTreeSet<ObjectKey>,
    endpoints: std::collections::BTreeSet<ObjectKey>,
}

impl Model {
    fn apply(&mut self, item: &Item, resync: Option<&mut Named>) {
        match item {
            Item::Service { key, hosts, damage } => {
                let k = okey(*key);
                if let Some(n) = resync {
                    n.services.insert(k.clone());
                }
                if *damage != 0 {
                    return; // rejected: the previous form stays
                }
                let mut hs: Vec<String> = Vec::new();
                for h in hosts {
                    let h = HOSTS[*h].to_ascii_lowercase();
                    if !hs.contains(&h) {
                        hs.push(h);
                    }
                }
                self.services.insert(k, hs);
            }
            Item::Endpoints { key, eps } => {
                let k = okey(*key);
                if let Some(n) = resync {
                    n.endpoints.insert(k.clone());
                }
                if eps.len() > MAX_SET {
                    return; // the set is rejected whole: the previous one stays
                }
                let mut new = Vec::new();
                let mut keep = Vec::new();
                for (name, addr, bad) in eps {
                    let name = EP_NAMES[*name].to_string();
                    if *bad {
                        if !name.is_empty() {
                            keep.push(name);
                        }
                    } else {
                        let a: std::net::IpAddr = GOOD_ADDRS[*addr].parse().unwrap();
                        new.push((name, a.to_string()));
                    }
                }
                let old = self.endpoints.get(&k).cloned().unwrap_or_default();
                new.extend(old.into_iter().filter(|(n, _)| keep.contains(n)));
                self.endpoints.insert(k, new);
            }
            // Inside a resync a delete takes back the key's naming (the resync's
            // end deletes it); otherwise it deletes at once.
            Item::DeleteService(k) => match resync {
                Some(n) => {
                    n.services.remove(&okey(*k));
                }
                None => {
                    self.services.remove(&okey(*k));
                }
            },
            Item::DeleteEndpoints(k) => match resync {
                Some(n) => {
                    n.endpoints.remove(&okey(*k));
                }
                None => {
                    self.endpoints.remove(&okey(*k));
                }
            },
            _ => {}
        }
    }

    fn finish(&mut self, named: &Named) {
        self.services.retain(|k, _| named.services.contains(k));
        self.endpoints.retain(|k, _| named.endpoints.contains(k));
    }
}

struct Harness {
    ix: Index,
    snapshots: Arc<Snapshots>,
    info: ClusterInfo,
    session: u64,
    version: u64,
    model: Model,
}

impl Harness {
    fn new() -> Self {
        let snapshots = Arc::new(Snapshots::default());
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let mut ix = Index::new(IndexConfig::default(), snapshots.clone(), metrics);
        let info = ClusterInfo {
            id: "c".into(),
            region: "r".into(),
            zone: "z".into(),
            incarnation: "fuzz".into(),
            ..Default::default()
        };
        ix.hello(info.clone(), 0, 1).unwrap();
        Harness {
            ix,
            snapshots,
            info,
            session: 1,
            version: 0,
            model: Model::default(),
        }
    }

    /// Sends a batch through the index's command path; `Ok` if it was applied.
    fn send(&mut self, full: bool, more: bool, items: &[Item]) -> Result<(), String> {
        self.version += 1;
        let raw = pb::ChangeBatch {
            version: self.version,
            full,
            more,
            changes: items.iter().map(to_pb).collect(),
        };
        let batch = convert::batch(raw, &self.info, &limits()).map(|(b, _errors)| b);
        let (reply, mut answer) = oneshot::channel();
        self.ix.handle(
            Command::Batch {
                cluster: "c".into(),
                session: self.session,
                version: self.version,
                batch,
                reply,
            },
            Instant::now(),
        );
        answer.try_recv().expect("the index answers at once")
    }

    fn reconnect(&mut self) {
        self.ix.gone("c", self.session, Instant::now());
        self.session += 1;
        self.ix.hello(self.info.clone(), 0, self.session).unwrap();
    }

    fn held(&self) -> Model {
        let h = self.ix.held("c").expect("cluster held");
        Model {
            services: h
                .services
                .iter()
                .map(|(k, s)| (k.clone(), s.hosts.clone()))
                .collect(),
            endpoints: h
                .endpoints
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .iter()
                        .map(|e| (e.name.clone(), e.endpoint.address.to_string()))
                        .collect();
                    (k.clone(), v)
                })
                .collect(),
        }
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::Incremental(items) => {
                self.send(false, false, items).expect("applied");
                for i in items {
                    self.model.apply(i, None);
                }
            }
            Op::Resync(parts) => {
                let mut named = Named::default();
                for (n, items) in parts.iter().enumerate() {
                    let more = n + 1 < parts.len();
                    self.send(true, more, items).expect("applied");
                    for i in items {
                        self.model.apply(i, Some(&mut named));
                    }
                    if more {
                        assert_eq!(self.held(), self.model, "mid-resync: nothing deleted yet");
                    }
                }
                self.model.finish(&named);
            }
            Op::Interrupted(first, incremental) => {
                self.send(true, true, first).expect("applied");
                let mut named = Named::default();
                for i in first {
                    self.model.apply(i, Some(&mut named));
                }
                let err = self.send(false, false, incremental).unwrap_err();
                assert!(err.contains("full resync"), "{err}");
                self.reconnect();
            }
            Op::Reconnect => self.reconnect(),
        }
    }
}

fn fuzz_cases() -> u32 {
    std::env::var("TRIBUTARY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: fuzz_cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn fuzz_federation_batches(ops in prop::collection::vec(op(), 1..8)) {
        let mut h = Harness::new();
        for op in &ops {
            h.run(op);
            prop_assert_eq!(h.held(), h.model.clone(), "after {:?}", op);
        }
        // Whatever was sent, the published config is valid: no route table repeats a
        // domain (Envoy would NACK it), and every resource decodes.
        h.ix.flush(Instant::now());
        let snap = h.snapshots.current("prod");
        if let Some(r) = snap.get(XdsType::Route, "80") {
            use tributary_proto::envoy::envoy::config::route::v3::RouteConfiguration;
            let route = RouteConfiguration::decode(r.body()).unwrap();
            let mut domains: Vec<String> = route
                .virtual_hosts
                .iter()
                .flat_map(|v| v.domains.iter().map(|d| d.to_ascii_lowercase()))
                .collect();
            let n = domains.len();
            domains.sort();
            domains.dedup();
            prop_assert_eq!(domains.len(), n, "a domain repeats");
        }
        for (_, r) in snap.of_type(XdsType::Endpoint).iter() {
            ClusterLoadAssignment::decode(r.body()).unwrap();
        }
    }
}
