//! `fuzz_zone_views`: the index keeps each zone's view incrementally (only the load
//! assignments a flush touched); after every flush of a random sequence of changes —
//! endpoints moving between zones and health states, other zones' summaries put and
//! deleted (one by one or by a resync), the environment's zones, gateways and local
//! share changing — every zone view must equal what is computed from scratch: the
//! environment's resources with `zone_load_assignments` of every service in place of
//! theirs, and the local summaries must be `local_summaries` of every service.
//!
//! Cases: `TRIBUTARY_FUZZ_CASES` (default 2000); `scripts/fuzz` runs a million in
//! release mode. A case is a few small services and no runtime: cheap.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use prometheus_client::registry::Registry;
use proptest::prelude::*;
use tokio::time::Instant;
use tributary_controlplane::catalog::{
    CatalogUpdate, PortSummary, RemoteCatalog, Summary, local_summaries,
};
use tributary_controlplane::index::{Command, Index, IndexConfig};
use tributary_controlplane::membership::Shard;
use tributary_controlplane::metrics::Metrics;
use tributary_controlplane::model::{
    Endpoint, Environment, Health, Locality, Mesh, ObjectKey, PortMap, Protocol, Service,
    ServicePort, ZoneLocality,
};
use tributary_controlplane::xds::XdsType;
use tributary_controlplane::xds::generate::Generated;
use tributary_controlplane::xds::locality::zone_load_assignments;
use tributary_controlplane::xds::snapshot::Snapshots;

const ZONES: [&str; 3] = ["az1", "az2", "az3"];
const SERVICES: usize = 3;

fn cases() -> u32 {
    std::env::var("TRIBUTARY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

#[derive(Debug, Clone)]
enum Op {
    /// Service `svc`'s endpoints: (zone index, 3 = none; healthy; weight).
    Endpoints(usize, Vec<(usize, bool, u32)>),
    /// Another zone's summary of service `svc` (3: one the hub does not know):
    /// `None` deletes it.
    Catalog(usize, usize, Option<u32>),
    /// The store's catalog re-listed: these summaries, nothing else.
    Resync(Vec<(usize, usize, u32)>),
    /// The environment: its first `n` zones, which of them have gateways, the share.
    Locality(usize, [bool; 3], u32),
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..SERVICES, prop::collection::vec((0..4usize, any::<bool>(), 1..4u32), 0..5))
            .prop_map(|(s, e)| Op::Endpoints(s, e)),
        3 => (0..3usize, 0..4usize, prop::option::of(0..4u32)).prop_map(|(z, s, h)| Op::Catalog(z, s, h)),
        1 => prop::collection::vec((0..3usize, 0..4usize, 0..4u32), 0..4).prop_map(Op::Resync),
        1 => (1..=3usize, any::<[bool; 3]>(), 1..=100u32).prop_map(|(n, g, p)| Op::Locality(n, g, p)),
        3 => Just(Op::Flush),
    ]
}

fn key(i: usize) -> ObjectKey {
    ObjectKey {
        namespace: "default".into(),
        name: format!("s{i}"),
    }
}

fn summary(zone: usize, healthy: u32) -> Summary {
    Summary {
        gateway: SocketAddr::new(IpAddr::from([10, 255, 0, zone as u8]), 15443),
        region: "r".into(),
        ports: vec![
            PortSummary {
                port: 80,
                healthy,
                weight: healthy * 2,
            },
            PortSummary {
                port: 81,
                healthy: healthy.saturating_sub(1),
                weight: healthy,
            },
        ],
    }
}

fn service(i: usize, eps: &[(usize, bool, u32)]) -> Service {
    let mut ports = vec![ServicePort {
        name: "http".into(),
        port: 80,
        protocol: Protocol::Http,
    }];
    if i == 0 {
        ports.push(ServicePort {
            name: "admin".into(),
            port: 81,
            protocol: Protocol::Http,
        });
    }
    Service {
        key: key(i),
        hosts: vec![format!("s{i}.prod")],
        ports,
        subsets: vec![],
        endpoints: eps
            .iter()
            .enumerate()
            .map(|(j, (zone, healthy, weight))| Endpoint {
                address: IpAddr::from([10, i as u8, 0, j as u8]),
                // Every other endpoint of s0 serves only "http".
                port: (j % 2 == 0 || i != 0).then_some(8080),
                ports: if j % 2 == 1 && i == 0 {
                    [("http".to_string(), 8080)].into()
                } else {
                    PortMap::new()
                },
                locality: Locality {
                    region: "r".into(),
                    zone: ZONES.get(*zone).copied().unwrap_or("").into(),
                    cluster: "c".into(),
                },
                labels: BTreeMap::new(),
                weight: *weight,
                health: if *healthy {
                    Health::Healthy
                } else {
                    Health::Unhealthy
                },
            })
            .collect(),
    }
}

struct Model {
    endpoints: Vec<Vec<(usize, bool, u32)>>,
    zones: usize,
    gateways: [bool; 3],
    local_percent: u32,
    remote: RemoteCatalog,
    /// Zone views created so far (a view, once created, is kept).
    views: BTreeSet<String>,
}

impl Model {
    fn mesh(&self) -> Mesh {
        let zones: Vec<String> = ZONES[..self.zones].iter().map(|z| z.to_string()).collect();
        let env = Environment {
            services: (0..SERVICES)
                .map(|i| (key(i), service(i, &self.endpoints[i])))
                .collect(),
            locality: ZoneLocality {
                gateways: (0..self.zones)
                    .filter(|z| self.gateways[*z])
                    .map(|z| {
                        (
                            ZONES[z].to_string(),
                            SocketAddr::new(IpAddr::from([10, 255, 0, z as u8]), 15443),
                        )
                    })
                    .collect(),
                local_percent: self.local_percent,
            },
            zones,
            ..Default::default()
        };
        Mesh {
            environments: [("prod".to_string(), env)].into(),
            ..Default::default()
        }
    }

    fn set_remote(&mut self, zone: usize, svc: usize, s: Option<Summary>) {
        let services = self.remote.entry("prod".into()).or_default();
        let zones = services.entry(key(svc)).or_default();
        match s {
            Some(s) => {
                zones.insert(ZONES[zone].into(), s);
            }
            None => {
                zones.remove(ZONES[zone]);
            }
        }
        if zones.is_empty() {
            services.remove(&key(svc));
        }
        if services.is_empty() {
            self.remote.remove("prod");
        }
    }
}

fn check(ix: &Index, snapshots: &Snapshots, model: &mut Model) -> Result<(), TestCaseError> {
    let mesh = model.mesh();
    let env = &mesh.environments["prod"];
    if env.zone_views() {
        model.views.extend(env.zones.iter().cloned());
    }
    let base = snapshots.current("prod");
    for zone in ZONES {
        let name = format!("prod/{zone}");
        prop_assert_eq!(
            snapshots.contains(&name),
            model.views.contains(zone),
            "view {} exists",
            name
        );
    }
    for zone in &model.views {
        let view = snapshots.current(&format!("prod/{zone}"));
        for ty in [XdsType::Cluster, XdsType::Listener, XdsType::Route] {
            prop_assert_eq!(view.of_type(ty), base.of_type(ty), "{} {:?}", zone, ty);
        }
        let mut want: BTreeMap<String, String> = base
            .of_type(XdsType::Endpoint)
            .iter()
            .map(|(n, r)| (n.to_string(), r.version().to_string()))
            .collect();
        if env.zone_views() && env.zones.contains(zone) {
            for svc in env.services.values() {
                let remote = model.remote.get("prod").and_then(|c| c.get(&svc.key));
                let mut out = Generated::new();
                zone_load_assignments(env, zone, svc, remote, &mut out);
                for (_, r) in out {
                    prop_assert!(
                        want.contains_key(r.name()),
                        "{} not in the environment",
                        r.name()
                    );
                    want.insert(r.name().to_string(), r.version().to_string());
                }
            }
        }
        let got: BTreeMap<String, String> = view
            .of_type(XdsType::Endpoint)
            .iter()
            .map(|(n, r)| (n.to_string(), r.version().to_string()))
            .collect();
        prop_assert_eq!(got, want, "zone {}'s load assignments", zone);
    }
    // The local summaries: every service's, from scratch.
    let mut want: BTreeMap<Shard, BTreeMap<ObjectKey, Summary>> = BTreeMap::new();
    for svc in env.services.values() {
        for (zone, s) in local_summaries(env, svc) {
            want.entry(Shard {
                environment: "prod".into(),
                zone,
            })
            .or_default()
            .insert(svc.key.clone(), s);
        }
    }
    let got: BTreeMap<Shard, BTreeMap<ObjectKey, Summary>> = ix
        .local_catalog()
        .iter()
        .map(|(s, m)| {
            (
                s.clone(),
                m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            )
        })
        .collect();
    prop_assert_eq!(got, want);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn fuzz_zone_views(ops in prop::collection::vec(op(), 1..24)) {
        let snapshots = Arc::new(Snapshots::default());
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let mut ix = Index::new(IndexConfig::default(), snapshots.clone(), metrics);
        let mut model = Model {
            endpoints: vec![Vec::new(); SERVICES],
            zones: 3,
            gateways: [true, true, false],
            local_percent: 98,
            remote: RemoteCatalog::new(),
            views: BTreeSet::new(),
        };
        ix.handle(Command::File(Arc::new(model.mesh())), Instant::now());
        ix.flush(Instant::now());
        check(&ix, &snapshots, &mut model)?;
        for op in ops.into_iter().chain([Op::Flush]) {
            match op {
                Op::Endpoints(svc, eps) => {
                    model.endpoints[svc] = eps;
                    ix.handle(Command::File(Arc::new(model.mesh())), Instant::now());
                }
                Op::Locality(n, gateways, share) => {
                    model.zones = n;
                    model.gateways = gateways;
                    model.local_percent = share;
                    ix.handle(Command::File(Arc::new(model.mesh())), Instant::now());
                }
                Op::Catalog(zone, svc, healthy) => {
                    let s = healthy.map(|h| summary(zone, h));
                    model.set_remote(zone, svc, s.clone());
                    ix.handle(
                        Command::Catalog(CatalogUpdate::Events(vec![(
                            "prod".into(),
                            ZONES[zone].into(),
                            key(svc),
                            s,
                        )])),
                        Instant::now(),
                    );
                }
                Op::Resync(entries) => {
                    model.remote.clear();
                    let mut all = Vec::new();
                    for (zone, svc, h) in entries {
                        model.set_remote(zone, svc, Some(summary(zone, h)));
                    }
                    for (env, services) in &model.remote {
                        for (k, zones) in services {
                            for (z, s) in zones {
                                all.push((env.clone(), z.clone(), k.clone(), s.clone()));
                            }
                        }
                    }
                    ix.handle(Command::Catalog(CatalogUpdate::Resync(all)), Instant::now());
                }
                Op::Flush => {
                    ix.flush(Instant::now());
                    check(&ix, &snapshots, &mut model)?;
                }
            }
        }
    }
}
