//! Proto ↔ domain conversion for federation, validating every item.
//!
//! A bad item (empty name, bad address, port out of range, unknown port name, ...)
//! becomes an [`ItemError`] naming the item and field; the rest of the batch is kept.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tributary_proto::federation::v1 as pb;

use super::{Batch, Change, ChangeKind, ClusterInfo, FedService, ItemError};
use crate::model::{Endpoint, Health, Locality, ObjectKey, Protocol, ServicePort};

/// Most changes one batch may carry; a larger batch is rejected whole.
pub const MAX_BATCH_CHANGES: usize = 50_000;
/// Most endpoints one endpoint set may carry.
pub const MAX_ENDPOINTS_PER_SET: usize = 20_000;

pub fn to_unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

pub fn from_unix_nanos(n: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n.max(0) as u64)
}

pub fn cluster_info(h: &pb::Hello) -> Result<ClusterInfo, String> {
    check_label("hello.cluster_id", &h.cluster_id)?;
    Ok(ClusterInfo {
        id: h.cluster_id.clone(),
        region: h.region.clone(),
        zone: h.zone.clone(),
        network: h.network.clone(),
        agent_version: h.agent_version.clone(),
    })
}

fn check_label(field: &str, v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 253
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field}: {v:?} is not a valid name (1..=253 of [A-Za-z0-9._-])"
        ))
    }
}

fn key(field: &str, namespace: &str, name: &str) -> Result<ObjectKey, String> {
    check_label(&format!("{field}.namespace"), namespace)?;
    check_label(&format!("{field}.name"), name)?;
    Ok(ObjectKey {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

fn port(field: &str, p: u32) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{field}: {p} is out of range, expected 1..=65535"))
}

fn protocol(field: &str, p: &str) -> Result<Protocol, String> {
    match p {
        "" | "HTTP" => Ok(Protocol::Http),
        "HTTP2" => Ok(Protocol::Http2),
        "GRPC" => Ok(Protocol::Grpc),
        "TCP" => Ok(Protocol::Tcp),
        other => Err(format!(
            "{field}: {other:?} is not a protocol, expected HTTP, HTTP2, GRPC or TCP"
        )),
    }
}

fn service(s: &pb::Service) -> Result<FedService, String> {
    let key = key("service", &s.namespace, &s.name)?;
    check_label("service.environment", &s.environment)?;
    if s.hosts.is_empty() {
        return Err("service.hosts: must list at least one host".into());
    }
    for (i, h) in s.hosts.iter().enumerate() {
        check_label(&format!("service.hosts[{i}]"), h)?;
    }
    if s.ports.is_empty() {
        return Err("service.ports: must list at least one port".into());
    }
    let mut ports: Vec<ServicePort> = Vec::with_capacity(s.ports.len());
    for (i, p) in s.ports.iter().enumerate() {
        let f = format!("service.ports[{i}]");
        if p.name.is_empty() {
            return Err(format!("{f}.name: must not be empty"));
        }
        let number = port(&format!("{f}.port"), p.port)?;
        if ports.iter().any(|q| q.name == p.name || q.port == number) {
            return Err(format!("{f}: duplicate port {:?} / {number}", p.name));
        }
        ports.push(ServicePort {
            name: p.name.clone(),
            port: number,
            protocol: protocol(&format!("{f}.protocol"), &p.protocol)?,
        });
    }
    Ok(FedService {
        key,
        environment: s.environment.clone(),
        hosts: s.hosts.clone(),
        ports,
    })
}

fn endpoints(
    set: &pb::EndpointSet,
    cluster: &ClusterInfo,
) -> Result<(ObjectKey, Vec<Endpoint>), String> {
    let key = key("endpoints", &set.namespace, &set.service)?;
    if set.endpoints.len() > MAX_ENDPOINTS_PER_SET {
        return Err(format!(
            "endpoints: {} endpoints exceed the limit of {MAX_ENDPOINTS_PER_SET}",
            set.endpoints.len()
        ));
    }
    let mut out = Vec::with_capacity(set.endpoints.len());
    for (i, e) in set.endpoints.iter().enumerate() {
        let f = format!("endpoints[{i}]");
        if e.addresses.is_empty() {
            return Err(format!("{f}.addresses: must list at least one address"));
        }
        let mut ports = BTreeMap::new();
        for (name, p) in &e.ports {
            if name.is_empty() {
                return Err(format!("{f}.ports: a port name must not be empty"));
            }
            ports.insert(name.clone(), port(&format!("{f}.ports.{name}"), *p)?);
        }
        // EndpointSlice conditions: ready serves traffic; serving-but-terminating
        // drains; anything else is kept, marked unhealthy, so clients see it go.
        let health = if e.ready {
            Health::Healthy
        } else if e.serving && e.terminating {
            Health::Draining
        } else {
            Health::Unhealthy
        };
        for (j, a) in e.addresses.iter().enumerate() {
            let address: IpAddr = a
                .parse()
                .map_err(|_| format!("{f}.addresses[{j}]: {a:?} is not an IPv4 or IPv6 address"))?;
            out.push(Endpoint {
                address,
                port: None,
                ports: ports.clone(),
                locality: Locality {
                    region: cluster.region.clone(),
                    zone: if e.zone.is_empty() {
                        cluster.zone.clone()
                    } else {
                        e.zone.clone()
                    },
                    cluster: cluster.id.clone(),
                },
                labels: e.labels.clone().into_iter().collect(),
                weight: 1,
                health,
            });
        }
    }
    Ok((key, out))
}

/// Converts and validates a batch from `cluster`. Bad items are left out and
/// reported; an oversize batch is rejected whole (`Err`).
pub fn batch(b: pb::ChangeBatch, cluster: &ClusterInfo) -> Result<(Batch, Vec<ItemError>), String> {
    if b.changes.len() > MAX_BATCH_CHANGES {
        return Err(format!(
            "batch {}: {} changes exceed the limit of {MAX_BATCH_CHANGES}; split it",
            b.version,
            b.changes.len()
        ));
    }
    let mut errors = Vec::new();
    let mut changes = Vec::with_capacity(b.changes.len());
    for (i, c) in b.changes.iter().enumerate() {
        let kind = match &c.kind {
            None => Err("change: empty (no kind set)".to_string()),
            Some(pb::change::Kind::ServiceUpsert(s)) => service(s).map(ChangeKind::UpsertService),
            Some(pb::change::Kind::ServiceDelete(r)) => {
                key("service_delete", &r.namespace, &r.name).map(ChangeKind::DeleteService)
            }
            Some(pb::change::Kind::EndpointsUpsert(e)) => {
                endpoints(e, cluster).map(|(k, v)| ChangeKind::UpsertEndpoints(k, v))
            }
            Some(pb::change::Kind::EndpointsDelete(r)) => {
                key("endpoints_delete", &r.namespace, &r.name).map(ChangeKind::DeleteEndpoints)
            }
        };
        match kind {
            Ok(kind) => changes.push(Change {
                origin: from_unix_nanos(c.origin_unix_nanos),
                kind,
            }),
            Err(message) => errors.push(ItemError {
                index: i as u32,
                message,
            }),
        }
    }
    Ok((
        Batch {
            version: b.version,
            full: b.full,
            changes,
        },
        errors,
    ))
}

// ---- domain → proto (the agent side) --------------------------------------------

pub fn service_to_proto(s: &FedService) -> pb::Service {
    pb::Service {
        namespace: s.key.namespace.clone(),
        name: s.key.name.clone(),
        hosts: s.hosts.clone(),
        ports: s
            .ports
            .iter()
            .map(|p| pb::ServicePort {
                name: p.name.clone(),
                port: u32::from(p.port),
                protocol: match p.protocol {
                    Protocol::Http => "HTTP",
                    Protocol::Http2 => "HTTP2",
                    Protocol::Grpc => "GRPC",
                    Protocol::Tcp => "TCP",
                }
                .into(),
            })
            .collect(),
        environment: s.environment.clone(),
    }
}
