//! Proto ↔ domain conversion for federation, validating every item.
//!
//! A bad item (empty name, bad address, port out of range, unknown port name, ...)
//! becomes an [`ItemError`] naming the item and field; the rest of the batch is kept.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tributary_proto::federation::v1 as pb;

use super::{
    Batch, Change, ChangeKind, ClusterInfo, EndpointSet, FedEndpoint, FedService, ItemError, Limits,
};
use crate::model::{
    Endpoint, Health, Locality, ObjectKey, PortMap, Protocol, ServicePort, normalize_host,
};

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
    if !h.incarnation.is_empty() {
        check_label("hello.incarnation", &h.incarnation)?;
    }
    // Stored per cluster and shown in status: bounded like names.
    for (field, v) in [
        ("hello.region", &h.region),
        ("hello.zone", &h.zone),
        ("hello.network", &h.network),
        ("hello.agent_version", &h.agent_version),
    ] {
        if v.len() > 253 {
            return Err(format!(
                "{field}: {} bytes exceed the limit of 253",
                v.len()
            ));
        }
    }
    Ok(ClusterInfo {
        id: h.cluster_id.clone(),
        region: h.region.clone(),
        zone: h.zone.clone(),
        network: h.network.clone(),
        agent_version: h.agent_version.clone(),
        incarnation: h.incarnation.clone(),
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
    let mut hosts: Vec<String> = Vec::with_capacity(s.hosts.len());
    for (i, h) in s.hosts.iter().enumerate() {
        let host = normalize_host(h).map_err(|m| format!("service.hosts[{i}]: {m}"))?;
        // `Reviews.prod` and `reviews.prod` are one host: keep it once.
        if !hosts.contains(&host) {
            hosts.push(host);
        }
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
        hosts,
        ports,
    })
}

/// One endpoint's addresses, or the error naming its field (`endpoints[i]...`).
fn endpoint(
    f: &str,
    e: &pb::Endpoint,
    cluster: &ClusterInfo,
    out: &mut Vec<FedEndpoint>,
) -> Result<(), String> {
    if e.addresses.is_empty() {
        return Err(format!("{f}.addresses: must list at least one address"));
    }
    let mut ports = PortMap::new();
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
    let first = out.len();
    for (j, a) in e.addresses.iter().enumerate() {
        let Ok(address) = a.parse::<IpAddr>() else {
            out.truncate(first);
            return Err(format!(
                "{f}.addresses[{j}]: {a:?} is not an IPv4 or IPv6 address"
            ));
        };
        out.push(FedEndpoint {
            name: e.name.clone(),
            endpoint: Endpoint {
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
            },
        });
    }
    Ok(())
}

/// Validates every endpoint on its own: an invalid one is reported (its field named)
/// and left out, or — when it has a name — kept in its previous form by the index;
/// the rest of the set is applied.
fn endpoints(
    set: &pb::EndpointSet,
    cluster: &ClusterInfo,
    limits: &Limits,
    errors: &mut Vec<String>,
) -> Result<EndpointSet, String> {
    if set.endpoints.len() > limits.max_endpoints_per_set {
        return Err(format!(
            "endpoints: {} endpoints exceed the limit of {} (--federation-max-endpoints-per-set)",
            set.endpoints.len(),
            limits.max_endpoints_per_set
        ));
    }
    let mut out = EndpointSet {
        endpoints: Vec::with_capacity(set.endpoints.len()),
        keep: Vec::new(),
    };
    for (i, e) in set.endpoints.iter().enumerate() {
        if let Err(message) = endpoint(&format!("endpoints[{i}]"), e, cluster, &mut out.endpoints) {
            if e.name.is_empty() {
                errors.push(format!("{message} (endpoint dropped)"));
            } else {
                errors.push(format!(
                    "{message} (endpoint {:?} keeps its previous form)",
                    e.name
                ));
                out.keep.push(e.name.clone());
            }
        }
    }
    Ok(out)
}

/// Converts and validates a batch from `cluster`. Bad items are reported and stand
/// in the batch as "keep" changes for their key (when the key itself is valid), so
/// the index keeps what it held and a full resync never deletes them. A batch over
/// `limits.max_batch_changes` is rejected whole (`Err`): nothing of it is applied.
pub fn batch(
    b: pb::ChangeBatch,
    cluster: &ClusterInfo,
    limits: &Limits,
) -> Result<(Batch, Vec<ItemError>), String> {
    if b.changes.len() > limits.max_batch_changes {
        return Err(format!(
            "batch {}: {} changes exceed the limit of {} (--federation-max-batch); the agent must split it",
            b.version,
            b.changes.len(),
            limits.max_batch_changes
        ));
    }
    let mut errors = Vec::new();
    let mut changes = Vec::with_capacity(b.changes.len());
    for (i, c) in b.changes.iter().enumerate() {
        let mut item_errors = Vec::new();
        let kind = match &c.kind {
            None => Err(("change: empty (no kind set)".to_string(), None)),
            Some(pb::change::Kind::ServiceUpsert(s)) => {
                service(s).map(ChangeKind::UpsertService).map_err(|m| {
                    let keep = key("service", &s.namespace, &s.name)
                        .ok()
                        .map(ChangeKind::KeepService);
                    (m, keep)
                })
            }
            Some(pb::change::Kind::ServiceDelete(r)) => {
                key("service_delete", &r.namespace, &r.name)
                    .map(ChangeKind::DeleteService)
                    .map_err(|m| (m, None))
            }
            Some(pb::change::Kind::EndpointsUpsert(e)) => {
                match key("endpoints", &e.namespace, &e.service) {
                    Err(m) => Err((m, None)),
                    Ok(k) => match endpoints(e, cluster, limits, &mut item_errors) {
                        Ok(set) => Ok(ChangeKind::UpsertEndpoints(k, set)),
                        Err(m) => Err((m, Some(ChangeKind::KeepEndpoints(k)))),
                    },
                }
            }
            Some(pb::change::Kind::EndpointsDelete(r)) => {
                key("endpoints_delete", &r.namespace, &r.name)
                    .map(ChangeKind::DeleteEndpoints)
                    .map_err(|m| (m, None))
            }
        };
        let origin = from_unix_nanos(c.origin_unix_nanos);
        errors.extend(item_errors.into_iter().map(|message| ItemError {
            index: i as u32,
            message,
        }));
        match kind {
            Ok(kind) => changes.push(Change { origin, kind }),
            Err((message, keep)) => {
                errors.push(ItemError {
                    index: i as u32,
                    message,
                });
                if let Some(kind) = keep {
                    changes.push(Change { origin, kind });
                }
            }
        }
    }
    Ok((
        Batch {
            version: b.version,
            full: b.full,
            more: b.more,
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
