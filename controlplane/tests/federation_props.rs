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
use tributary_controlplane::federation::convert;
use tributary_controlplane::index::{Index, IndexConfig};
use tributary_controlplane::metrics::Metrics;
use tributary_controlplane::xds::XdsType;
use tributary_controlplane::xds::snapshot::Shards;
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
fn good_view(shards: &Shards) -> Vec<(String, usize)> {
    let snap = shards.current("prod");
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
        let shards = Arc::new(Shards::default());
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let mut ix = Index::new(IndexConfig::default(), shards.clone(), metrics);
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
        let (b, errs) = convert::batch(good_batch(), &good).unwrap();
        assert!(errs.is_empty());
        ix.apply_batch("good", 1, b, Instant::now()).unwrap();
        ix.flush(Instant::now());
        let expected = good_view(&shards);
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
            };
            // The wire round trip as well: whatever was sent decodes the same.
            let raw = pb::ChangeBatch::decode(raw.encode_to_vec().as_slice()).unwrap();
            let total = raw.changes.len();
            if std::env::var("PROP_DEBUG").is_ok_and(|v| v == seed.to_string()) {
                eprintln!("round {round}: {raw:#?}");
            }
            let (batch, errors) = convert::batch(raw, &bad).expect("not oversize");
            assert_eq!(
                batch.changes.len() + errors.len(),
                total,
                "seed {seed}: every item is applied or reported"
            );
            ix.apply_batch("bad", 2, batch, Instant::now()).unwrap();
            if r.chance(50) {
                ix.flush(Instant::now());
                assert_eq!(
                    good_view(&shards),
                    expected,
                    "seed {seed} round {round}: the good cluster's endpoints changed"
                );
            }
        }
        ix.flush(Instant::now());
        assert_eq!(
            good_view(&shards),
            expected,
            "seed {seed}: the good cluster's endpoints changed"
        );
        // Whatever happened, every published resource is a valid message.
        let snap = shards.current("prod");
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
        changes: vec![change; convert::MAX_BATCH_CHANGES + 1],
    };
    let err = convert::batch(raw, &info).unwrap_err();
    assert!(err.contains("exceed the limit"), "{err}");
}
