//! The xDS client: Delta ADS (SotW as a fallback, chosen in the bootstrap).
//!
//! [`XdsState`] is the protocol state machine, free of I/O: it turns responses into
//! held resources, ACKs and NACKs, and subscription changes, and publishes the typed
//! config. [`client`] runs it over a gRPC stream and reconnects with jittered backoff.
//!
//! - LDS and CDS are wildcard subscriptions; RDS and EDS are subscribed by name, as the
//!   held listeners and clusters name them, and unsubscribed when no longer named.
//! - Every resource is translated ([`translate`]); those that cannot be honoured are
//!   NACKed, each named in `error_detail` with its reason, and the rest are applied
//!   (Envoy's per-resource behaviour). A rejected resource keeps its last good version.
//! - After a reconnect, Delta resumes with `initial_resource_versions` (what it holds);
//!   SotW with the last accepted `version_info` per type.

pub mod client;
pub mod tls;
pub mod translate;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tributary_proto::envoy::envoy::config::cluster::v3::Cluster as PbCluster;
use tributary_proto::envoy::envoy::config::core::v3::{Locality, Node};
use tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use tributary_proto::envoy::envoy::config::listener::v3::Listener;
use tributary_proto::envoy::envoy::config::route::v3::RouteConfiguration;
use tributary_proto::envoy::envoy::extensions::transport_sockets::tls::v3::Secret;
use tributary_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tributary_proto::envoy::google::protobuf::{Any, Struct, Value, value::Kind};
use tributary_proto::envoy::google::rpc::Status as RpcStatus;
use tributary_proto::type_url;

use crate::Shared;
use crate::bootstrap::NodeConfig;
use crate::cluster::{Assignment, Cluster};
use crate::config::{ListenerConfig, NetworkFilter, RouteTable, Snapshot};

/// The resource types (the four of routing, and SDS secrets), in the order a
/// (re)connect subscribes to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind4 {
    Cluster = 0,
    Listener = 1,
    Endpoint = 2,
    Route = 3,
    Secret = 4,
}

impl Kind4 {
    pub const ALL: [Kind4; 5] = [
        Kind4::Cluster,
        Kind4::Listener,
        Kind4::Endpoint,
        Kind4::Route,
        Kind4::Secret,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            Kind4::Cluster => type_url::CLUSTER,
            Kind4::Listener => type_url::LISTENER,
            Kind4::Endpoint => type_url::ENDPOINT,
            Kind4::Route => type_url::ROUTE,
            Kind4::Secret => type_url::SECRET,
        }
    }

    pub fn from_url(url: &str) -> Option<Kind4> {
        Kind4::ALL.into_iter().find(|k| k.type_url() == url)
    }

    /// The word Envoy uses in its NACK messages.
    pub fn noun(self) -> &'static str {
        match self {
            Kind4::Cluster => "cluster",
            Kind4::Listener => "listener",
            Kind4::Endpoint => "cluster load assignment",
            Kind4::Route => "route configuration",
            Kind4::Secret => "secret",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Kind4::Cluster => "CDS",
            Kind4::Listener => "LDS",
            Kind4::Endpoint => "EDS",
            Kind4::Route => "RDS",
            Kind4::Secret => "SDS",
        }
    }

    fn wildcard(self) -> bool {
        matches!(self, Kind4::Cluster | Kind4::Listener)
    }
}

/// A resource the proxy holds, with the version it ACKed.
#[derive(Debug, Clone)]
struct Held<T> {
    version: String,
    value: T,
}

/// Per-type protocol bookkeeping.
#[derive(Debug, Default, Clone)]
struct TypeState {
    /// Names subscribed (RDS, EDS; empty for the wildcard types).
    subscribed: BTreeSet<String>,
    /// Names the server said do not exist (Delta), answered for readiness.
    absent: BTreeSet<String>,
    /// At least one response was answered on any stream.
    answered: bool,
    /// SotW: the last accepted `version_info`, and the last nonce on this stream.
    version_info: String,
    nonce: String,
    /// The last NACK message sent (for `/config_dump`).
    last_nack: Option<String>,
}

/// The xDS client's state: what the proxy holds, per type.
#[derive(Debug)]
pub struct XdsState {
    node: Node,
    delta: bool,
    listeners: BTreeMap<String, Held<ListenerConfig>>,
    routes: BTreeMap<String, Held<Arc<RouteTable>>>,
    clusters: BTreeMap<String, Held<Arc<Cluster>>>,
    endpoints: BTreeMap<String, Held<Assignment>>,
    secrets: BTreeMap<String, Held<crate::tls::SecretValue>>,
    /// Bumped whenever a held secret changes or goes (TLS configs rebuild on it).
    secrets_generation: u64,
    /// The first complete config was applied (readiness then also needs certificates).
    configured: bool,
    types: [TypeState; 5],
    /// The first request of a stream carries the node.
    node_sent: bool,
}

/// What a response asks the stream to send back.
pub type Outbox<R> = Vec<R>;

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// The xDS `Node` for `node` (bootstrap): id, cluster, locality, and metadata with
/// `tributary.io/env`.
pub fn node(node: &NodeConfig) -> Node {
    let mut fields: std::collections::HashMap<String, Value> = node
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), string_value(v)))
        .collect();
    fields.insert("tributary.io/env".into(), string_value(&node.environment));
    Node {
        id: node.id.clone(),
        cluster: node.cluster.clone(),
        metadata: Some(Struct { fields }),
        locality: Some(Locality {
            region: node.region.clone(),
            zone: node.zone.clone(),
            sub_zone: String::new(),
        }),
        user_agent_name: "tributary-proxy".into(),
        ..Default::default()
    }
}

/// A resource of a response: name, version, body.
struct Incoming<'a> {
    name: &'a str,
    version: &'a str,
    body: Option<&'a Any>,
}

impl XdsState {
    pub fn new(node: Node, delta: bool) -> XdsState {
        XdsState {
            node,
            delta,
            listeners: BTreeMap::new(),
            routes: BTreeMap::new(),
            clusters: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            secrets: BTreeMap::new(),
            secrets_generation: 0,
            configured: false,
            types: Default::default(),
            node_sent: false,
        }
    }

    fn take_node(&mut self) -> Option<Node> {
        if self.node_sent {
            None
        } else {
            self.node_sent = true;
            Some(self.node.clone())
        }
    }

    fn held_versions(&self, kind: Kind4) -> std::collections::HashMap<String, String> {
        fn v<T>(m: &BTreeMap<String, Held<T>>) -> std::collections::HashMap<String, String> {
            m.iter()
                .map(|(k, h)| (k.clone(), h.version.clone()))
                .collect()
        }
        match kind {
            Kind4::Listener => v(&self.listeners),
            Kind4::Route => v(&self.routes),
            Kind4::Cluster => v(&self.clusters),
            Kind4::Endpoint => v(&self.endpoints),
            Kind4::Secret => v(&self.secrets),
        }
    }

    /// The first requests of a new Delta stream: every type, with what is held.
    pub fn delta_start(&mut self) -> Outbox<DeltaDiscoveryRequest> {
        self.node_sent = false;
        let mut out = Vec::new();
        for kind in Kind4::ALL {
            let t = &mut self.types[kind as usize];
            t.nonce.clear();
            if !kind.wildcard() && t.subscribed.is_empty() {
                continue;
            }
            let subscribe: Vec<String> = t.subscribed.iter().cloned().collect();
            let initial_resource_versions = self.held_versions(kind);
            out.push(DeltaDiscoveryRequest {
                node: self.take_node(),
                type_url: kind.type_url().into(),
                resource_names_subscribe: subscribe,
                initial_resource_versions,
                ..Default::default()
            });
        }
        out
    }

    /// The first requests of a new SotW stream.
    pub fn sotw_start(&mut self) -> Outbox<DiscoveryRequest> {
        self.node_sent = false;
        let mut out = Vec::new();
        for kind in Kind4::ALL {
            self.types[kind as usize].nonce.clear();
            if !kind.wildcard() && self.types[kind as usize].subscribed.is_empty() {
                continue;
            }
            out.push(self.sotw_request(kind, None));
        }
        out
    }

    fn sotw_request(&mut self, kind: Kind4, error: Option<String>) -> DiscoveryRequest {
        let node = self.take_node();
        let t = &self.types[kind as usize];
        DiscoveryRequest {
            node,
            type_url: kind.type_url().into(),
            version_info: t.version_info.clone(),
            resource_names: t.subscribed.iter().cloned().collect(),
            response_nonce: t.nonce.clone(),
            error_detail: error.map(nack_status),
            ..Default::default()
        }
    }

    /// Applies a Delta response; returns the ACK or NACK, then subscription changes.
    pub fn on_delta(
        &mut self,
        resp: &DeltaDiscoveryResponse,
        shared: &Shared,
    ) -> Outbox<DeltaDiscoveryRequest> {
        let Some(kind) = Kind4::from_url(&resp.type_url) else {
            return vec![DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail: Some(nack_status(format!(
                    "type {} is not supported",
                    resp.type_url
                ))),
                ..Default::default()
            }];
        };
        let incoming: Vec<Incoming<'_>> = resp
            .resources
            .iter()
            .map(|r| Incoming {
                name: &r.name,
                version: &r.version,
                body: r.resource.as_ref(),
            })
            .collect();
        let removed: Vec<&str> = resp.removed_resources.iter().map(String::as_str).collect();
        let error = self.apply(kind, &incoming, &removed, None, shared);
        let mut out = vec![DeltaDiscoveryRequest {
            type_url: kind.type_url().into(),
            response_nonce: resp.nonce.clone(),
            error_detail: error.map(nack_status),
            ..Default::default()
        }];
        for (k, subscribe, unsubscribe) in self.resubscribe() {
            out.push(DeltaDiscoveryRequest {
                type_url: k.type_url().into(),
                resource_names_subscribe: subscribe,
                resource_names_unsubscribe: unsubscribe,
                ..Default::default()
            });
        }
        self.publish(shared);
        out
    }

    /// Applies a SotW response; returns the ACK or NACK, then subscription changes.
    pub fn on_sotw(
        &mut self,
        resp: &DiscoveryResponse,
        shared: &Shared,
    ) -> Outbox<DiscoveryRequest> {
        let Some(kind) = Kind4::from_url(&resp.type_url) else {
            return vec![DiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail: Some(nack_status(format!(
                    "type {} is not supported",
                    resp.type_url
                ))),
                ..Default::default()
            }];
        };
        // SotW carries no per-resource name or version outside the body: decode names
        // first (a body that does not decode is named by its index).
        let names: Vec<String> = resp
            .resources
            .iter()
            .enumerate()
            .map(|(i, a)| resource_name(kind, a).unwrap_or_else(|| format!("#{i}")))
            .collect();
        let incoming: Vec<Incoming<'_>> = resp
            .resources
            .iter()
            .zip(&names)
            .map(|(a, n)| Incoming {
                name: n,
                version: &resp.version_info,
                body: Some(a),
            })
            .collect();
        // LDS and CDS are full sets: what is not in the response is gone.
        let full: Option<BTreeSet<&str>> = kind
            .wildcard()
            .then(|| names.iter().map(String::as_str).collect());
        let error = self.apply(kind, &incoming, &[], full.as_ref(), shared);
        let t = &mut self.types[kind as usize];
        t.nonce = resp.nonce.clone();
        if error.is_none() {
            t.version_info = resp.version_info.clone();
        }
        let mut out = vec![self.sotw_request(kind, error)];
        for (k, _, _) in self.resubscribe() {
            out.push(self.sotw_request(k, None));
        }
        self.publish(shared);
        out
    }

    /// Applies resources and removals of one type; returns the NACK message naming
    /// every resource that cannot be honoured, if any.
    fn apply(
        &mut self,
        kind: Kind4,
        incoming: &[Incoming<'_>],
        removed: &[&str],
        full_set: Option<&BTreeSet<&str>>,
        shared: &Shared,
    ) -> Option<String> {
        let label = crate::metrics::TypeLabel {
            r#type: kind.short().into(),
        };
        shared.metrics.xds_responses.get_or_create(&label).inc();
        let mut errors: Vec<String> = Vec::new();
        for r in incoming {
            let Some(body) = r.body else {
                errors.push(format!("{}: no resource body", r.name));
                continue;
            };
            let result = match kind {
                Kind4::Listener => translate::decode::<Listener>(body, kind.type_url())
                    .and_then(|l| check_name(r.name, &l.name).and(translate::listener(&l)))
                    .map(|v| {
                        self.listeners.insert(
                            r.name.into(),
                            Held {
                                version: r.version.into(),
                                value: v,
                            },
                        );
                    }),
                Kind4::Route => translate::decode::<RouteConfiguration>(body, kind.type_url())
                    .and_then(|rc| check_name(r.name, &rc.name).and(translate::route_table(&rc)))
                    .map(|v| {
                        self.routes.insert(
                            r.name.into(),
                            Held {
                                version: r.version.into(),
                                value: Arc::new(v),
                            },
                        );
                    }),
                Kind4::Cluster => translate::decode::<PbCluster>(body, kind.type_url())
                    .and_then(|c| check_name(r.name, &c.name).and(translate::cluster(&c)))
                    .map(|def| {
                        let reuse = self
                            .clusters
                            .get(r.name)
                            .filter(|h| h.value.def == def)
                            .map(|h| h.value.clone());
                        let cluster = reuse.unwrap_or_else(|| {
                            let c = Arc::new(Cluster::with_secrets(
                                def,
                                shared.metrics.cluster(r.name),
                                shared.secrets.clone(),
                            ));
                            if let Some(a) = c
                                .def
                                .eds_name
                                .as_deref()
                                .and_then(|n| self.endpoints.get(n))
                            {
                                c.assign(&a.value);
                            }
                            c
                        });
                        self.clusters.insert(
                            r.name.into(),
                            Held {
                                version: r.version.into(),
                                value: cluster,
                            },
                        );
                    }),
                Kind4::Secret => translate::decode::<Secret>(body, kind.type_url())
                    .and_then(|s| check_name(r.name, &s.name).and(crate::tls::secret(&s)))
                    .map(|v| {
                        self.secrets.insert(
                            r.name.into(),
                            Held {
                                version: r.version.into(),
                                value: v,
                            },
                        );
                        self.secrets_generation += 1;
                    }),
                Kind4::Endpoint => {
                    translate::decode::<ClusterLoadAssignment>(body, kind.type_url())
                        .and_then(|cla| {
                            check_name(r.name, &cla.cluster_name).and(translate::assignment(&cla))
                        })
                        .map(|a| {
                            for c in self.clusters.values() {
                                if c.value.def.eds_name.as_deref() == Some(r.name) {
                                    c.value.assign(&a);
                                }
                            }
                            self.endpoints.insert(
                                r.name.into(),
                                Held {
                                    version: r.version.into(),
                                    value: a,
                                },
                            );
                        })
                }
            };
            match result {
                Ok(()) => {
                    self.types[kind as usize].absent.remove(r.name);
                }
                Err(reason) => errors.push(format!("{}: {reason}", r.name)),
            }
        }
        let mut gone: Vec<String> = removed.iter().map(|s| s.to_string()).collect();
        if let Some(full) = full_set {
            let held: Vec<String> = self.held_versions(kind).into_keys().collect();
            gone.extend(held.into_iter().filter(|n| !full.contains(n.as_str())));
        }
        for name in gone {
            match kind {
                Kind4::Listener => {
                    self.listeners.remove(&name);
                }
                Kind4::Route => {
                    self.routes.remove(&name);
                }
                Kind4::Cluster => {
                    if self.clusters.remove(&name).is_some() {
                        shared.metrics.remove_cluster(&name);
                    }
                }
                Kind4::Secret => {
                    if self.secrets.remove(&name).is_some() {
                        self.secrets_generation += 1;
                        tracing::warn!(secret = %name, "secret removed by the server: handshakes that need it are refused");
                    }
                }
                Kind4::Endpoint => {
                    self.endpoints.remove(&name);
                    for c in self.clusters.values() {
                        if c.value.def.eds_name.as_deref() == Some(name.as_str()) {
                            c.value.assign(&Assignment::default());
                        }
                    }
                }
            }
            if !kind.wildcard() && self.types[kind as usize].subscribed.contains(&name) {
                self.types[kind as usize].absent.insert(name);
            }
        }
        let t = &mut self.types[kind as usize];
        t.answered = true;
        if errors.is_empty() {
            shared.metrics.xds_acks.get_or_create(&label).inc();
            None
        } else {
            shared.metrics.xds_nacks.get_or_create(&label).inc();
            let message = format!(
                "Error adding/updating {}(s) {}",
                kind.noun(),
                errors.join("; ")
            );
            tracing::warn!(r#type = kind.short(), %message, "NACK");
            t.last_nack = Some(message.clone());
            Some(message)
        }
    }

    /// Brings RDS and EDS subscriptions in line with what held listeners and clusters
    /// name; returns the changes per type (subscribe, unsubscribe), dropping resources
    /// no longer named.
    fn resubscribe(&mut self) -> Vec<(Kind4, Vec<String>, Vec<String>)> {
        let routes: BTreeSet<String> = self
            .listeners
            .values()
            .filter_map(|l| match &l.value.filter {
                NetworkFilter::Http {
                    route_config,
                    inline: None,
                    ..
                } => Some(route_config.to_string()),
                NetworkFilter::Http { .. } | NetworkFilter::Tcp { .. } => None,
            })
            .collect();
        // The certificates and trust bundles of held listeners and clusters.
        let secrets: BTreeSet<String> = self
            .listeners
            .values()
            .filter_map(|l| l.value.tls.as_ref())
            .chain(
                self.clusters
                    .values()
                    .filter_map(|c| c.value.def.tls.as_ref()),
            )
            .flat_map(|t| t.secret_names().map(str::to_string))
            .collect();
        let endpoints: BTreeSet<String> = self
            .clusters
            .values()
            .filter_map(|c| c.value.def.eds_name.as_deref().map(str::to_string))
            .collect();
        let mut out = Vec::new();
        for (kind, wanted) in [
            (Kind4::Endpoint, endpoints),
            (Kind4::Route, routes),
            (Kind4::Secret, secrets),
        ] {
            let t = &mut self.types[kind as usize];
            if t.subscribed == wanted {
                continue;
            }
            let subscribe: Vec<String> = wanted.difference(&t.subscribed).cloned().collect();
            let unsubscribe: Vec<String> = t.subscribed.difference(&wanted).cloned().collect();
            for n in &unsubscribe {
                t.absent.remove(n);
                match kind {
                    Kind4::Route => {
                        self.routes.remove(n);
                    }
                    Kind4::Secret => {
                        if self.secrets.remove(n).is_some() {
                            self.secrets_generation += 1;
                        }
                    }
                    _ => {
                        self.endpoints.remove(n);
                    }
                }
            }
            self.types[kind as usize].subscribed = wanted;
            out.push((kind, subscribe, unsubscribe));
        }
        out
    }

    /// Whether the first complete config is here: LDS and CDS answered, and every
    /// route table and load assignment they name answered (held or known absent).
    pub fn complete(&self) -> bool {
        let answered = |k: Kind4, held: &dyn Fn(&str) -> bool| {
            let t = &self.types[k as usize];
            t.subscribed.iter().all(|n| held(n) || t.absent.contains(n))
        };
        self.types[Kind4::Listener as usize].answered
            && self.types[Kind4::Cluster as usize].answered
            && answered(Kind4::Route, &|n| self.routes.contains_key(n))
            && answered(Kind4::Endpoint, &|n| self.endpoints.contains_key(n))
    }

    /// Whether every secret that held listeners and clusters name is held (a
    /// NACKed, absent or removed one is not).
    pub fn certificates_loaded(&self) -> bool {
        self.types[Kind4::Secret as usize]
            .subscribed
            .iter()
            .all(|n| self.secrets.contains_key(n))
    }

    /// Publishes the held config: the data path's secrets and snapshot, the listener
    /// set, the dump, and readiness.
    pub fn publish(&mut self, shared: &Shared) {
        if shared.secrets.load().generation != self.secrets_generation {
            shared.secrets.store(Arc::new(crate::tls::SecretSet {
                generation: self.secrets_generation,
                secrets: self
                    .secrets
                    .iter()
                    .map(|(k, v)| (k.clone(), v.value.clone()))
                    .collect(),
            }));
        }
        let snapshot = Snapshot {
            routes: self
                .routes
                .iter()
                .map(|(k, v)| (Arc::from(k.as_str()), v.value.clone()))
                .collect(),
            clusters: self
                .clusters
                .iter()
                .map(|(k, v)| (Arc::from(k.as_str()), v.value.clone()))
                .collect(),
        };
        shared.snapshot.store(Arc::new(snapshot));
        let listeners: BTreeMap<Arc<str>, ListenerConfig> = self
            .listeners
            .iter()
            .map(|(k, v)| (Arc::from(k.as_str()), v.value.clone()))
            .collect();
        shared.listeners.send_if_modified(|current| {
            if *current == listeners {
                false
            } else {
                *current = listeners;
                true
            }
        });
        *shared.dump.lock().unwrap_or_else(|e| e.into_inner()) = self.dump();
        // Readiness: the first complete config (latched: a proxy that loses its hub
        // keeps serving), and, always, every certificate it names.
        if !self.configured && self.complete() {
            self.configured = true;
            tracing::info!("first complete config applied");
        }
        let ready = self.configured && self.certificates_loaded();
        if shared
            .ready
            .send_if_modified(|r| std::mem::replace(r, ready) != ready)
        {
            shared.metrics.ready.set(i64::from(ready));
            if ready {
                tracing::info!("ready");
            } else {
                tracing::warn!("not ready: a certificate or trust bundle it needs is missing");
            }
        }
    }

    /// What `/config_dump` shows (besides live endpoint state).
    fn dump(&self) -> serde_json::Value {
        use serde_json::json;
        let versions = |m: std::collections::HashMap<String, String>| -> BTreeMap<String, String> {
            m.into_iter().collect()
        };
        json!({
            "node": { "id": self.node.id, "dialect": if self.delta { "delta" } else { "sotw" } },
            "listeners": self.listeners.iter().map(|(n, h)| json!({
                "name": n, "version": h.version, "address": h.value.address.to_string(),
                "bind_to_port": h.value.bind_to_port,
                "filter": match &h.value.filter {
                    NetworkFilter::Http { route_config, codec, inline, xfcc } => json!({"http": {"route_config": &**route_config, "inline": inline.is_some(), "codec": format!("{codec:?}"), "forward_client_cert_details": format!("{xfcc:?}")}}),
                    NetworkFilter::Tcp { cluster } => json!({"tcp_proxy": {"cluster": &**cluster}}),
                },
            })).collect::<Vec<_>>(),
            "routes": self.routes.iter().map(|(n, h)| json!({
                "name": n, "version": h.version,
                "virtual_hosts": h.value.virtual_hosts.iter().map(|v| json!({"name": v.name, "routes": v.routes.len()})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "clusters": self.clusters.iter().map(|(n, h)| json!({
                "name": n, "version": h.version, "eds": h.value.def.eds_name.as_deref(),
                "lb": format!("{:?}", h.value.def.lb), "http2": h.value.def.http2,
                "locality_weighted": h.value.def.locality_weighted,
                "limits": format!("{:?}", h.value.def.limits),
                "outlier_detection": h.value.def.outlier.is_some(),
            })).collect::<Vec<_>>(),
            "endpoints": versions(self.held_versions(Kind4::Endpoint)),
            // Names, versions and kinds only: never key material.
            "secrets": self.secrets.iter().map(|(n, h)| json!({"name": n, "version": h.version, "kind": h.value.kind()})).collect::<Vec<_>>(),
            "subscriptions": {
                "RDS": self.types[Kind4::Route as usize].subscribed,
                "EDS": self.types[Kind4::Endpoint as usize].subscribed,
                "SDS": self.types[Kind4::Secret as usize].subscribed,
            },
            "certificates_loaded": self.certificates_loaded(),
            "last_nack": Kind4::ALL.iter().filter_map(|k| self.types[*k as usize].last_nack.as_ref().map(|m| (k.short(), m.clone()))).collect::<BTreeMap<_, _>>(),
            "complete": self.complete(),
        })
    }
}

fn check_name(expected: &str, inner: &str) -> Result<(), String> {
    if expected == inner {
        Ok(())
    } else {
        Err(format!("the resource names itself {inner:?}"))
    }
}

fn resource_name(kind: Kind4, a: &Any) -> Option<String> {
    use prost::Message;
    let b = a.value.as_slice();
    match kind {
        Kind4::Listener => Listener::decode(b).ok().map(|l| l.name),
        Kind4::Route => RouteConfiguration::decode(b).ok().map(|r| r.name),
        Kind4::Cluster => PbCluster::decode(b).ok().map(|c| c.name),
        Kind4::Secret => Secret::decode(b).ok().map(|s| s.name),
        Kind4::Endpoint => ClusterLoadAssignment::decode(b)
            .ok()
            .map(|c| c.cluster_name),
    }
}

fn nack_status(message: String) -> RpcStatus {
    // INVALID_ARGUMENT, as Envoy sends; the hub cuts long messages at 4 KiB.
    RpcStatus {
        code: 3,
        message,
        details: vec![],
    }
}
