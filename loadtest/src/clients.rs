//! Lightweight simulated xDS clients: thousands in one process, Delta or SotW, each
//! holding the names and versions it has and decoding only what it must check.
//!
//! A client ACKs every response. When a response carries a resource the harness is
//! waiting for (a load assignment containing a changed endpoint, or a gateway's new
//! clusters and routes), the client records the time from the injection to its ACK.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use prost::Message;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tributary_proto::envoy::envoy::config::cluster::v3::Cluster;
use tributary_proto::envoy::envoy::config::core::v3::Node;
use tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use tributary_proto::envoy::envoy::config::route::v3::RouteConfiguration;
use tributary_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tributary_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest,
};
use tributary_proto::envoy::google::protobuf::{Struct, Value, value::Kind};
use tributary_proto::type_url::{CLUSTER, ENDPOINT, ROUTE};

/// What one simulated proxy subscribes to.
#[derive(Debug, Clone)]
pub struct Spec {
    pub id: String,
    pub delta: bool,
    pub gateway: bool,
    /// Empty: wildcard (gateways).
    pub cds: Vec<String>,
    pub eds: Vec<String>,
    pub rds: Option<String>,
    /// Resources of each type the client holds once initially synced.
    pub expect_cds: usize,
}

/// The change a phase waits for in one load assignment.
#[derive(Debug, Clone)]
pub struct Expect {
    pub phase: u64,
    pub address: String,
}

/// A gateway config change: new clusters (and their load assignments), and a route
/// table that names a new host.
#[derive(Debug, Clone, Default)]
pub struct GatewayExpect {
    pub phase: u64,
    pub names: HashSet<String>,
    pub host: String,
}

#[derive(Debug, Default)]
pub struct Shared {
    pub phase: AtomicU64,
    pub t0: Mutex<Option<Instant>>,
    pub expected: RwLock<HashMap<String, Expect>>,
    pub gateway: RwLock<Option<GatewayExpect>>,
    pub samples: Mutex<Vec<f64>>,
    pub pending: AtomicUsize,
    pub done: Notify,
    pub synced: AtomicUsize,
    pub bytes: AtomicU64,
    pub messages: AtomicU64,
    pub errors: AtomicUsize,
    /// Per client, at the end: EDS name -> version held.
    pub final_versions: Mutex<HashMap<String, HashMap<String, String>>>,
}

impl Shared {
    fn sample(&self) {
        let t0 = *self.t0.lock().unwrap();
        if let Some(t0) = t0 {
            self.samples
                .lock()
                .unwrap()
                .push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_waiters();
        }
    }
}

fn node(spec: &Spec) -> Node {
    let mut fields = HashMap::new();
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.into())),
    };
    fields.insert("tributary.io/env".to_string(), s(crate::scenario::ENV));
    if spec.gateway {
        fields.insert(
            "tributary.io/gateway".to_string(),
            s(crate::scenario::GATEWAY),
        );
    }
    Node {
        id: spec.id.clone(),
        cluster: "loadtest".into(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

/// Whether an encoded ClusterLoadAssignment has an endpoint at `address`, without
/// decoding it: `SocketAddress.address` is field 2, so the address appears as its key,
/// its length as a varint and its bytes (the length prefix rules out a longer address
/// that merely starts with this one). Checked against a full decode in the tests below.
pub fn contains_address(body: &[u8], address: &str) -> bool {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let a = address.as_bytes();
    let mut needle = Vec::with_capacity(a.len() + 3);
    encode_key(2, WireType::LengthDelimited, &mut needle);
    encode_varint(a.len() as u64, &mut needle);
    needle.extend_from_slice(a);
    body.windows(needle.len()).any(|w| w == needle.as_slice())
}

/// Client-side progress towards the current phase's expectations.
#[derive(Default)]
struct Progress {
    seen: HashSet<(u64, String)>,
    gateway_phase_done: u64,
    route_has_host: Option<(u64, bool)>,
    synced: bool,
}

impl Progress {
    /// Checks a received load assignment against the current expectations; returns
    /// how many samples it completes (recorded after the ACK is sent).
    fn check_cla(&mut self, shared: &Shared, name: &str, body: &[u8]) -> usize {
        let exp = shared.expected.read().unwrap().get(name).cloned();
        let Some(exp) = exp else { return 0 };
        if exp.phase != shared.phase.load(Ordering::Acquire)
            || self.seen.contains(&(exp.phase, name.to_string()))
        {
            return 0;
        }
        if contains_address(body, &exp.address) {
            self.seen.insert((exp.phase, name.to_string()));
            1
        } else {
            0
        }
    }

    fn check_route(&mut self, shared: &Shared, body: &[u8]) {
        let g = shared.gateway.read().unwrap().clone();
        let Some(g) = g else { return };
        if let Ok(rc) = RouteConfiguration::decode(body) {
            let has = rc.virtual_hosts.iter().any(|v| v.domains.contains(&g.host));
            self.route_has_host = Some((g.phase, has));
        }
    }

    /// A gateway completes the config change when it holds every new cluster and load
    /// assignment and a route table naming the new host.
    fn check_gateway(&mut self, shared: &Shared, held: &[HashMap<String, String>; 3]) -> usize {
        let g = shared.gateway.read().unwrap().clone();
        let Some(g) = g else { return 0 };
        if g.phase != shared.phase.load(Ordering::Acquire) || self.gateway_phase_done == g.phase {
            return 0;
        }
        let routes = self.route_has_host == Some((g.phase, true));
        let all = g
            .names
            .iter()
            .all(|n| held[0].contains_key(n) && held[1].contains_key(n));
        if routes && all {
            self.gateway_phase_done = g.phase;
            1
        } else {
            0
        }
    }

    fn check_synced(&mut self, shared: &Shared, spec: &Spec, held: &[HashMap<String, String>; 3]) {
        if !self.synced
            && held[0].len() >= spec.expect_cds
            && held[1].len() >= spec.eds.len()
            && (spec.rds.is_none() || !held[2].is_empty())
        {
            self.synced = true;
            shared.synced.fetch_add(1, Ordering::AcqRel);
        }
    }
}

fn slot(type_url: &str) -> Option<usize> {
    match type_url {
        CLUSTER => Some(0),
        ENDPOINT => Some(1),
        ROUTE => Some(2),
        _ => None,
    }
}

/// Runs one client until the stream ends or `stop` fires.
pub async fn run(
    channel: Channel,
    spec: Spec,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let r = if spec.delta {
        delta(channel, &spec, &shared, &mut stop).await
    } else {
        sotw(channel, &spec, &shared, &mut stop).await
    };
    if let Err(e) = r
        && !*stop.borrow()
    {
        shared.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(client = %spec.id, error = %e, "client stream failed");
    }
}

async fn delta(
    channel: Channel,
    spec: &Spec,
    shared: &Shared,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(16);
    let sub = |type_url: &str, names: Vec<String>, node: Option<Node>| DeltaDiscoveryRequest {
        node,
        type_url: type_url.into(),
        resource_names_subscribe: names,
        ..Default::default()
    };
    tx.send(sub(CLUSTER, spec.cds.clone(), Some(node(spec))))
        .await?;
    tx.send(sub(ENDPOINT, spec.eds.clone(), None)).await?;
    if let Some(r) = &spec.rds {
        tx.send(sub(ROUTE, vec![r.clone()], None)).await?;
    }
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut held: [HashMap<String, String>; 3] = Default::default();
    let mut p = Progress::default();
    let eds_names: HashSet<&String> = spec.eds.iter().collect();
    loop {
        let msg = tokio::select! {
            m = stream.message() => m?,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some(resp) = msg else { break };
        shared
            .bytes
            .fetch_add(resp.encoded_len() as u64, Ordering::Relaxed);
        shared.messages.fetch_add(1, Ordering::Relaxed);
        let Some(i) = slot(&resp.type_url) else {
            continue;
        };
        let mut completed = 0;
        let mut new_clusters = Vec::new();
        for r in &resp.resources {
            let body = r
                .resource
                .as_ref()
                .map(|a| a.value.as_slice())
                .unwrap_or_default();
            if i == 1 {
                completed += p.check_cla(shared, &r.name, body);
            } else if i == 2 {
                p.check_route(shared, body);
            } else if spec.gateway
                && !held[0].contains_key(&r.name)
                && !eds_names.contains(&r.name)
                && r.name.starts_with("outbound|")
            {
                new_clusters.push(r.name.clone());
            }
            held[i].insert(r.name.clone(), r.version.clone());
        }
        for n in &resp.removed_resources {
            held[i].remove(n);
        }
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await?;
        // Like Envoy: a gateway subscribes to the load assignments of new clusters.
        if !new_clusters.is_empty() && !held[1].is_empty() {
            tx.send(sub(ENDPOINT, new_clusters, None)).await?;
        }
        if spec.gateway {
            completed += p.check_gateway(shared, &held);
        }
        for _ in 0..completed {
            shared.sample();
        }
        p.check_synced(shared, spec, &held);
    }
    shared
        .final_versions
        .lock()
        .unwrap()
        .insert(spec.id.clone(), std::mem::take(&mut held[1]));
    Ok(())
}

async fn sotw(
    channel: Channel,
    spec: &Spec,
    shared: &Shared,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(16);
    let names_of = |i: usize| match i {
        0 => spec.cds.clone(),
        1 => spec.eds.clone(),
        _ => spec.rds.iter().cloned().collect(),
    };
    let req =
        |type_url: &str, names: Vec<String>, node: Option<Node>, version: String, nonce: String| {
            DiscoveryRequest {
                node,
                type_url: type_url.into(),
                resource_names: names,
                version_info: version,
                response_nonce: nonce,
                ..Default::default()
            }
        };
    tx.send(req(
        CLUSTER,
        names_of(0),
        Some(node(spec)),
        String::new(),
        String::new(),
    ))
    .await?;
    tx.send(req(
        ENDPOINT,
        names_of(1),
        None,
        String::new(),
        String::new(),
    ))
    .await?;
    if spec.rds.is_some() {
        tx.send(req(ROUTE, names_of(2), None, String::new(), String::new()))
            .await?;
    }
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut held: [HashMap<String, String>; 3] = Default::default();
    let mut p = Progress::default();
    loop {
        let msg = tokio::select! {
            m = stream.message() => m?,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some(resp) = msg else { break };
        shared
            .bytes
            .fetch_add(resp.encoded_len() as u64, Ordering::Relaxed);
        shared.messages.fetch_add(1, Ordering::Relaxed);
        let Some(i) = slot(&resp.type_url) else {
            continue;
        };
        let mut completed = 0;
        if i == 0 {
            held[0].clear(); // SotW CDS carries the full set
        }
        for any in &resp.resources {
            let body = any.value.as_slice();
            let version = tributary_controlplane::xds::generate::content_version(body);
            match i {
                0 => {
                    if let Ok(c) = Cluster::decode(body) {
                        held[0].insert(c.name, version);
                    }
                }
                1 => {
                    if let Ok(cla) = ClusterLoadAssignment::decode(body) {
                        completed += p.check_cla(shared, &cla.cluster_name, body);
                        held[1].insert(cla.cluster_name, version);
                    }
                }
                _ => {
                    p.check_route(shared, body);
                    held[2].insert(spec.rds.clone().unwrap_or_default(), version);
                }
            }
        }
        tx.send(req(
            &resp.type_url,
            names_of(i),
            None,
            resp.version_info.clone(),
            resp.nonce.clone(),
        ))
        .await?;
        for _ in 0..completed {
            shared.sample();
        }
        p.check_synced(shared, spec, &held);
    }
    shared
        .final_versions
        .lock()
        .unwrap()
        .insert(spec.id.clone(), std::mem::take(&mut held[1]));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_controlplane::model::{
        Endpoint, Health, Locality, ObjectKey, Protocol, Service, ServicePort,
    };
    use tributary_controlplane::xds::generate::load_assignment;
    use tributary_proto::envoy::envoy::config::core::v3::address::Address;
    use tributary_proto::envoy::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;

    fn cla_has(cla: &ClusterLoadAssignment, address: &str) -> bool {
        cla.endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .any(|e| match &e.host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => {
                    match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
                        Some(Address::SocketAddress(sa)) => sa.address == address,
                        _ => false,
                    }
                }
                _ => false,
            })
    }

    #[test]
    fn byte_search_agrees_with_decoding() {
        let ep = |a: &str| Endpoint {
            address: a.parse().unwrap(),
            port: Some(9080),
            ports: Default::default(),
            locality: Locality::default(),
            labels: Default::default(),
            weight: 1,
            health: Health::Healthy,
        };
        let svc = Service {
            key: ObjectKey {
                namespace: "n".into(),
                name: "s".into(),
            },
            hosts: vec!["s.n".into()],
            ports: vec![ServicePort {
                name: "p".into(),
                port: 80,
                protocol: Protocol::Http,
            }],
            subsets: vec![],
            endpoints: vec![ep("11.3.0.51"), ep("10.0.0.1"), ep("fd00::1")],
        };
        let cla = load_assignment("c", &svc, &svc.ports[0], None);
        let body = cla.encode_to_vec();
        for a in [
            "11.3.0.51",
            "10.0.0.1",
            "fd00::1",
            "11.3.0.5",
            "10.0.0.11",
            "fd00::",
        ] {
            assert_eq!(contains_address(&body, a), cla_has(&cla, a), "{a}");
        }
    }
}
