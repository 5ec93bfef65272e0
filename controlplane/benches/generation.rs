//! Generation and encoding benchmarks.
//!
//! - `eds/<endpoints>x<services>` and `cds/<services>`: the sizes of Istio's
//!   `pilot/pkg/xds/bench_test.go` (BenchmarkEndpointGeneration: 1/100, 10/10, 100/10,
//!   1000/1 endpoints per service / services; BenchmarkClusterGeneration). Ours
//!   generate once per shard and include encoding to bytes; Istio's generate per proxy
//!   and exclude serialization, so ours is the stricter measurement.
//! - `send/*`: per-client cost of one Delta response carrying 100 changed load
//!   assignments: from pre-encoded bytes (what the hub does) versus re-serializing the
//!   typed messages for each client.
//!
//! Run: `cargo bench -p tributary-controlplane --bench generation`

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message;
use tributary_controlplane::model::{
    Endpoint, Health, Locality, ObjectKey, Protocol, Service, ServicePort,
};
use tributary_controlplane::xds::generate::{Generated, endpoint_resources, service_resources};
use tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use tributary_proto::envoy::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use tributary_proto::envoy::google::protobuf::Any;
use tributary_proto::wire::DeltaDiscoveryResponseWire;

fn service(i: usize, endpoints: usize) -> Service {
    let name = format!("svc-{i}");
    Service {
        key: ObjectKey {
            namespace: "bench".into(),
            name: name.clone(),
        },
        hosts: vec![format!("{name}.bench.svc.cluster.local")],
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Http,
        }],
        subsets: vec![],
        endpoints: (0..endpoints)
            .map(|e| Endpoint {
                address: std::net::Ipv4Addr::from(0x0a00_0000u32 + (i * 10_000 + e) as u32).into(),
                port: Some(8080),
                ports: Default::default(),
                locality: Locality {
                    region: "r1".into(),
                    zone: format!("z{}", e % 3),
                    cluster: format!("c{}", e % 10),
                },
                labels: BTreeMap::new(),
                weight: 1,
                health: Health::Healthy,
            })
            .collect(),
    }
}

fn five_ports(mut s: Service) -> Service {
    s.ports = (0..5)
        .map(|p| ServicePort {
            name: format!("p{p}"),
            port: 8080 + p,
            protocol: Protocol::Http,
        })
        .collect();
    s
}

fn eds(c: &mut Criterion) {
    let mut g = c.benchmark_group("eds");
    for (endpoints, services) in [(1, 100), (10, 10), (100, 10), (1000, 1)] {
        let svcs: Vec<Service> = (0..services).map(|i| service(i, endpoints)).collect();
        g.bench_function(format!("{endpoints}x{services}"), |b| {
            b.iter(|| {
                let mut out = Generated::new();
                for s in &svcs {
                    endpoint_resources(black_box(s), &mut out);
                }
                out
            })
        });
    }
    g.finish();
}

fn cds(c: &mut Criterion) {
    let mut g = c.benchmark_group("cds");
    for services in [100, 1000] {
        let svcs: Vec<Service> = (0..services).map(|i| five_ports(service(i, 10))).collect();
        g.bench_function(format!("{services}x5ports"), |b| {
            b.iter(|| {
                let mut out = Generated::new();
                for s in &svcs {
                    service_resources(black_box(s), &mut out);
                }
                out
            })
        });
    }
    g.finish();
}

fn send(c: &mut Criterion) {
    let svcs: Vec<Service> = (0..100).map(|i| service(i, 10)).collect();
    let mut encoded = Generated::new();
    for s in &svcs {
        endpoint_resources(s, &mut encoded);
    }
    let typed: Vec<(String, String, ClusterLoadAssignment)> = encoded
        .iter()
        .map(|(_, r)| {
            (
                r.name().to_string(),
                r.version().to_string(),
                ClusterLoadAssignment::decode(r.body()).unwrap(),
            )
        })
        .collect();
    let mut g = c.benchmark_group("send");
    g.bench_function("delta_100_cla_pre_encoded", |b| {
        b.iter(|| {
            let resp = DeltaDiscoveryResponseWire {
                system_version_info: "7".into(),
                resources: encoded.iter().map(|(_, r)| r.delta_bytes()).collect(),
                type_url: tributary_proto::type_url::ENDPOINT.into(),
                nonce: "1".into(),
                removed_resources: vec![],
                control_plane: None,
            };
            black_box(resp.encode_to_vec())
        })
    });
    g.bench_function("delta_100_cla_reserialized", |b| {
        b.iter(|| {
            let resp = DeltaDiscoveryResponse {
                system_version_info: "7".into(),
                resources: typed
                    .iter()
                    .map(|(name, version, cla)| Resource {
                        name: name.clone(),
                        version: version.clone(),
                        resource: Some(Any {
                            type_url: tributary_proto::type_url::ENDPOINT.into(),
                            value: cla.encode_to_vec(),
                        }),
                        ..Default::default()
                    })
                    .collect(),
                type_url: tributary_proto::type_url::ENDPOINT.into(),
                nonce: "1".into(),
                ..Default::default()
            };
            black_box(resp.encode_to_vec())
        })
    });
    g.finish();
}

criterion_group!(benches, eds, cds, send);
criterion_main!(benches);
