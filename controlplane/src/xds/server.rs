//! The ADS server: `StreamAggregatedResources` (SotW) and `DeltaAggregatedResources`.
//!
//! Each stream runs one task that owns all of its state, so nothing here is shared
//! or locked on the response path except the client's own status record. The task
//! wakes on a client request or a new snapshot of its environment, and then, per type
//! in make-before-break order, diffs the newest snapshot against what its client holds
//! and sends only the difference, assembled from pre-encoded bytes.
//!
//! Flow control: at most one response per type is in flight. The next is built when
//! the client ACKs or NACKs, from the newest snapshot, so a slow client skips versions
//! and a stream's memory is bounded whatever the churn.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};
use tributary_proto::envoy::envoy::config::core::v3::Node;
use tributary_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest,
};
use tributary_proto::envoy::google::protobuf::value::Kind;
use tributary_proto::wire::{
    ControlPlaneWire, DeltaDiscoveryResponseWire, DiscoveryResponseWire, EncodedResource,
    ads_server::AggregatedDiscoveryService, version_hash,
};

use super::XdsType;
use super::snapshot::{Shards, Snapshot};
use crate::metrics::Metrics;
use crate::status::{ClientStatus, NackRecord, SyncRegistry, unix_now};

pub const ENV_METADATA_KEY: &str = "tributary.io/env";
pub const GATEWAY_METADATA_KEY: &str = "tributary.io/gateway";
pub const SIDECAR_METADATA_KEY: &str = "tributary.io/sidecar";
const CONTROL_PLANE_ID: &str = "tributary";

/// Outbound responses buffered per stream. One response per type is in flight at
/// most, so the stream task never waits on this.
const OUTBOUND_BUFFER: usize = XdsType::COUNT + 1;

/// Who a client is, from the first request's `Node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub cluster: String,
    pub environment: String,
    pub role: Role,
    /// A sidecar's dependency scope (a `Sidecar` object of its environment).
    pub scope: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Sidecar,
    Gateway(String),
}

impl NodeInfo {
    /// Reads identity from `node`; `default_env` when it names no environment.
    pub fn from_node(node: &Node, default_env: &str) -> Result<Self, Status> {
        if node.id.is_empty() {
            return Err(Status::invalid_argument(
                "node.id is empty: every xDS client must identify itself with a node id",
            ));
        }
        let meta = |key: &str| -> Option<String> {
            let v = node.metadata.as_ref()?.fields.get(key)?;
            match &v.kind {
                Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                _ => None,
            }
        };
        Ok(NodeInfo {
            id: node.id.clone(),
            cluster: node.cluster.clone(),
            environment: meta(ENV_METADATA_KEY).unwrap_or_else(|| default_env.to_string()),
            role: match meta(GATEWAY_METADATA_KEY) {
                Some(g) => Role::Gateway(g),
                None => Role::Sidecar,
            },
            scope: meta(SIDECAR_METADATA_KEY).filter(|_| meta(GATEWAY_METADATA_KEY).is_none()),
        })
    }
}

/// Shared by every stream of one hub.
#[derive(Debug)]
pub struct AdsServer {
    shards: Arc<Shards>,
    registry: Arc<SyncRegistry>,
    metrics: Arc<Metrics>,
    default_env: String,
    next_id: AtomicU64,
    /// False until the hub's start-up sync wait is over: streams hold their first
    /// response until then.
    synced: watch::Receiver<bool>,
    /// Turns true when the hub shuts down: every stream ends with UNAVAILABLE so its
    /// client reconnects elsewhere or later.
    stopping: watch::Receiver<bool>,
    /// Initial-sync slots: a reconnect storm is admitted through this, not all at once.
    admission: Arc<tokio::sync::Semaphore>,
}

impl AdsServer {
    pub fn new(
        shards: Arc<Shards>,
        registry: Arc<SyncRegistry>,
        metrics: Arc<Metrics>,
        default_env: String,
        synced: watch::Receiver<bool>,
        stopping: watch::Receiver<bool>,
        max_initial_syncs: usize,
    ) -> Self {
        Self {
            shards,
            registry,
            metrics,
            default_env,
            next_id: AtomicU64::new(1),
            synced,
            stopping,
            admission: Arc::new(tokio::sync::Semaphore::new(max_initial_syncs.max(1))),
        }
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponseWire>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponseWire>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let ctx = self.context(peer);
        tokio::spawn(run::<Sotw>(ctx, request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let ctx = self.context(peer);
        tokio::spawn(run::<Delta>(ctx, request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl AdsServer {
    fn context(&self, peer: Option<SocketAddr>) -> StreamContext {
        StreamContext {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            shards: self.shards.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            default_env: self.default_env.clone(),
            synced: self.synced.clone(),
            stopping: self.stopping.clone(),
            admission: self.admission.clone(),
        }
    }
}

struct StreamContext {
    id: u64,
    peer: Option<SocketAddr>,
    shards: Arc<Shards>,
    registry: Arc<SyncRegistry>,
    metrics: Arc<Metrics>,
    default_env: String,
    synced: watch::Receiver<bool>,
    stopping: watch::Receiver<bool>,
    admission: Arc<tokio::sync::Semaphore>,
}

// ---- the two wire dialects ------------------------------------------------------

/// What differs between SotW and Delta: decoding requests, encoding responses.
trait Dialect: Send + 'static {
    type Req: Send + 'static;
    type Resp: Send + 'static;
    const NAME: &'static str;
    fn node(req: &Self::Req) -> Option<&Node>;
    fn type_url(req: &Self::Req) -> &str;
    /// Applies the request to the stream's state for its type.
    fn apply(req: Self::Req, ty: XdsType, conn: &mut Conn) -> Result<(), Status>;
    fn response(out: Outgoing, ty: XdsType) -> Self::Resp;
}

struct Sotw;
struct Delta;

/// One response, before dialect-specific encoding.
struct Outgoing {
    version: String,
    nonce: String,
    resources: Vec<EncodedResource>,
    removed: Vec<Arc<str>>,
}

impl Dialect for Sotw {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponseWire;
    const NAME: &'static str = "sotw";

    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn type_url(req: &DiscoveryRequest) -> &str {
        &req.type_url
    }

    fn apply(req: DiscoveryRequest, ty: XdsType, conn: &mut Conn) -> Result<(), Status> {
        let first = conn.types[ty as usize].is_none();
        if !req.response_nonce.is_empty() {
            let pending = conn.types[ty as usize]
                .as_ref()
                .and_then(|ts| ts.pending.as_ref());
            match pending.map(|p| p.nonce == req.response_nonce) {
                Some(true) => {
                    let error = req.error_detail.as_ref().map(|e| e.message.clone());
                    conn.complete(ty, &req.version_info, error);
                }
                // A stale nonce: the client has not seen our latest response yet;
                // it will send its current subscription again when it does.
                Some(false) => return Ok(()),
                None => {}
            }
        }
        let ts = conn.types[ty as usize].get_or_insert_with(TypeState::default);
        let wildcard = ty.sotw_full_state()
            && (req.resource_names.is_empty() || req.resource_names.iter().any(|n| n == "*"));
        // An ACK re-lists every name: compare before allocating anything.
        let explicit = req.resource_names.iter().filter(|n| n.as_str() != "*");
        let unchanged = !first
            && wildcard == ts.wildcard
            && explicit.clone().count() == ts.names.len()
            && explicit.clone().all(|n| ts.names.contains(n.as_str()));
        if !unchanged {
            let names: HashSet<Arc<str>> = explicit.map(|n| Arc::from(n.as_str())).collect();
            if !ty.sotw_full_state() {
                // The client forgets what it unsubscribed; send it again if re-added.
                ts.held.retain(|n, _| names.contains(n));
            }
            ts.wildcard = wildcard;
            ts.names = names;
            ts.dirty_full = true;
            // LDS and CDS answer every subscription change with the full set (which
            // may be empty: that tells the client what does not exist).
            ts.force = ty.sotw_full_state();
        }
        Ok(())
    }

    fn response(out: Outgoing, ty: XdsType) -> DiscoveryResponseWire {
        DiscoveryResponseWire {
            version_info: out.version,
            resources: out
                .resources
                .iter()
                .map(EncodedResource::any_bytes)
                .collect(),
            type_url: ty.type_url().to_string(),
            nonce: out.nonce,
            control_plane: Some(ControlPlaneWire {
                identifier: CONTROL_PLANE_ID.into(),
            }),
        }
    }
}

impl Dialect for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponseWire;
    const NAME: &'static str = "delta";

    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn type_url(req: &DeltaDiscoveryRequest) -> &str {
        &req.type_url
    }

    fn apply(req: DeltaDiscoveryRequest, ty: XdsType, conn: &mut Conn) -> Result<(), Status> {
        let first = conn.types[ty as usize].is_none();
        if !first && !req.response_nonce.is_empty() {
            let matches = conn.types[ty as usize]
                .as_ref()
                .and_then(|ts| ts.pending.as_ref())
                .is_some_and(|p| p.nonce == req.response_nonce);
            if matches {
                let error = req.error_detail.as_ref().map(|e| e.message.clone());
                conn.complete(ty, "", error);
            }
        }
        let ts = conn.types[ty as usize].get_or_insert_with(TypeState::default);
        if first {
            // What the client already holds from an earlier stream: not sent again
            // while the version is unchanged.
            for (name, version) in req.initial_resource_versions {
                ts.held.insert(
                    Arc::from(name.as_str()),
                    Held {
                        version: version_hash(&version),
                        resource: None,
                    },
                );
            }
            // Legacy wildcard: a first request naming nothing subscribes to everything.
            ts.wildcard = req.resource_names_subscribe.is_empty();
            ts.force = true;
            ts.dirty_full = true;
        }
        for name in req.resource_names_subscribe {
            if name == "*" {
                ts.wildcard = true;
            } else {
                let name: Arc<str> = Arc::from(name.as_str());
                ts.absent_told.remove(&name);
                ts.names.insert(name);
            }
            ts.force = true;
            ts.dirty_full = true;
        }
        for name in req.resource_names_unsubscribe {
            if name == "*" {
                ts.wildcard = false;
            } else {
                ts.names.remove(name.as_str());
                ts.held.remove(name.as_str());
                ts.absent_told.remove(name.as_str());
            }
            ts.dirty_full = true;
        }
        Ok(())
    }

    fn response(out: Outgoing, ty: XdsType) -> DeltaDiscoveryResponseWire {
        DeltaDiscoveryResponseWire {
            system_version_info: out.version,
            resources: out
                .resources
                .iter()
                .map(EncodedResource::delta_bytes)
                .collect(),
            type_url: ty.type_url().to_string(),
            nonce: out.nonce,
            removed_resources: out.removed.iter().map(|n| n.to_string()).collect(),
            control_plane: Some(ControlPlaneWire {
                identifier: CONTROL_PLANE_ID.into(),
            }),
        }
    }
}

// ---- per-stream state -----------------------------------------------------------

/// A resource version the client holds. `resource` is kept when we sent it, so a
/// SotW full-state response can keep serving the last good version after a NACK.
#[derive(Debug, Clone)]
struct Held {
    /// [`EncodedResource::version_hash`] of the version held.
    version: u64,
    /// Kept for SotW full-state types only.
    resource: Option<EncodedResource>,
}

/// A response awaiting ACK or NACK.
#[derive(Debug)]
struct Pending {
    nonce: String,
    version: String,
    sent: Vec<EncodedResource>,
    removed: Vec<Arc<str>>,
    /// A SotW full-state response: on ACK, the client holds exactly `sent`.
    full_set: bool,
    /// Origin of the oldest change this response carries: its ACK completes that
    /// change's convergence for this client.
    origin: Option<SystemTime>,
    sent_at: SystemTime,
}

#[derive(Debug, Default)]
struct TypeState {
    wildcard: bool,
    names: HashSet<Arc<str>>,
    held: HashMap<Arc<str>, Held>,
    pending: Option<Pending>,
    /// Versions the client NACKed: never sent to it again.
    rejected: HashMap<Arc<str>, u64>,
    /// Delta: subscribed names already reported as not existing.
    absent_told: HashSet<Arc<str>>,
    /// Snapshot seq this type was last reconciled against.
    seen_seq: u64,
    /// Reconcile against the whole snapshot, not just its change set.
    dirty_full: bool,
    /// Send a response even if it carries nothing (answers a subscription).
    force: bool,
    /// The rest of a diff too large for one response, valid for `backlog_seq`.
    backlog: Vec<EncodedResource>,
    backlog_seq: u64,
}

/// Largest response body a stream builds at once (bigger diffs go out in several
/// responses, each after the previous one's ACK). Bounds the encoder buffer every
/// stream keeps, which is what a fleet's memory is made of.
const MAX_RESPONSE_BYTES: usize = 128 * 1024;

/// When the oldest change among `sent` and `removed` was observed at its source.
fn origin_of(
    snap: &Snapshot,
    ty: XdsType,
    sent: &[EncodedResource],
    removed: &[Arc<str>],
) -> Option<SystemTime> {
    let origins = &snap.resources.origins[ty as usize];
    sent.iter()
        .filter_map(|r| origins.get(r.name()).copied())
        .chain(snap.origin.filter(|_| !removed.is_empty()))
        .min()
}

/// Splits off the first response's worth of `updates`, leaving the rest.
fn take_chunk(updates: &mut Vec<EncodedResource>) -> Vec<EncodedResource> {
    let mut size = 0;
    let n = updates
        .iter()
        .take_while(|r| {
            size += r.size();
            size <= MAX_RESPONSE_BYTES
        })
        .count()
        .max(1)
        .min(updates.len());
    let rest = updates.split_off(n);
    std::mem::replace(updates, rest)
}

struct Conn {
    node: NodeInfo,
    dialect: &'static str,
    types: [Option<TypeState>; XdsType::COUNT],
    nonce: u64,
    status: Arc<Mutex<ClientStatus>>,
    metrics: Arc<Metrics>,
}

impl Conn {
    fn visible(&self, snap: &Snapshot, ty: XdsType, ts: &TypeState, name: &str) -> bool {
        ts.names.contains(name) || (ts.wildcard && self.in_wildcard(snap, ty, name))
    }

    fn in_wildcard(&self, snap: &Snapshot, ty: XdsType, name: &str) -> bool {
        match ty {
            XdsType::Listener => self.role_listeners(snap).is_some_and(|s| s.contains(name)),
            XdsType::Cluster if self.node.scope.is_some() => {
                self.scope(snap).is_some_and(|s| s.contains(name))
            }
            _ => snap.get(ty, name).is_some(),
        }
    }

    /// A scoped sidecar's clusters (`None` for an unknown scope: it gets nothing, so
    /// a typo never widens what a proxy sees).
    fn scope<'s>(&self, snap: &'s Snapshot) -> Option<&'s BTreeSet<Arc<str>>> {
        let name = self.node.scope.as_ref()?;
        snap.roles().scopes.get(name).map(|s| s.as_ref())
    }

    fn role_listeners<'s>(&self, snap: &'s Snapshot) -> Option<&'s BTreeSet<Arc<str>>> {
        match &self.node.role {
            Role::Sidecar => Some(&snap.roles().sidecar),
            Role::Gateway(g) => snap.roles().gateways.get(g),
        }
    }

    /// Every name a wildcard subscription of `ty` selects.
    fn wildcard_names<'s>(
        &self,
        snap: &'s Snapshot,
        ty: XdsType,
    ) -> Box<dyn Iterator<Item = &'s Arc<str>> + 's> {
        match ty {
            XdsType::Listener => Box::new(self.role_listeners(snap).into_iter().flatten()),
            XdsType::Cluster if self.node.scope.is_some() => {
                Box::new(self.scope(snap).into_iter().flatten())
            }
            _ => Box::new(snap.of_type(ty).keys()),
        }
    }

    /// ACK (`error` is `None`) or NACK of the pending response of `ty`.
    fn complete(&mut self, ty: XdsType, client_version: &str, error: Option<String>) {
        let Some(ts) = self.types[ty as usize].as_mut() else {
            return;
        };
        let Some(p) = ts.pending.take() else { return };
        let mut status = self.status.lock().unwrap();
        let st = status.types.entry(ty.short()).or_default();
        match error {
            None => {
                if p.full_set {
                    ts.held.clear();
                }
                for r in p.sent {
                    if !ts.rejected.is_empty() {
                        ts.rejected.remove(r.name());
                    }
                    let held = Held {
                        version: r.version_hash(),
                        resource: p.full_set.then(|| r.clone()),
                    };
                    ts.held.insert(r.name_arc().clone(), held);
                }
                for n in &p.removed {
                    ts.held.remove(n);
                }
                if let Some(origin) = p.origin {
                    let now = SystemTime::now();
                    if let Ok(d) = now.duration_since(origin) {
                        self.metrics
                            .convergence_seconds
                            .get_or_create(&ty.into())
                            .observe(d.as_secs_f64());
                    }
                }
                if let Ok(rtt) = SystemTime::now().duration_since(p.sent_at) {
                    self.metrics.xds_ack_seconds.observe(rtt.as_secs_f64());
                }
                st.last_acked_version = p.version.clone();
                st.last_acked_at_unix = Some(unix_now());
                st.resources = ts.held.len();
                self.metrics.xds_acks.get_or_create(&ty.into()).inc();
                debug!(r#type = ty.short(), version = %p.version, "ACK");
            }
            Some(message) => {
                for r in &p.sent {
                    ts.rejected.insert(r.name_arc().clone(), r.version_hash());
                }
                // Reconcile again: the response is void, what the client holds is not.
                ts.dirty_full = true;
                st.nacks_total += 1;
                st.last_nack = Some(NackRecord {
                    version: p.version.clone(),
                    nonce: p.nonce.clone(),
                    client_version: client_version.to_string(),
                    message: message.clone(),
                    resources: p.sent.iter().map(|r| r.name().to_string()).collect(),
                    at_unix: unix_now(),
                });
                self.metrics.xds_nacks.get_or_create(&ty.into()).inc();
                warn!(r#type = ty.short(), version = %p.version, error = %message, "NACK: the client keeps its last good config; not re-sending these versions");
            }
        }
        st.pending_nonce = None;
        st.pending_since_unix = None;
    }

    /// Builds the next response for `ty` if the client needs one.
    fn build(&mut self, ty: XdsType, snap: &Snapshot, sotw: bool) -> Option<Outgoing> {
        let ts = self.types[ty as usize].as_mut()?;
        if ts.pending.is_some() {
            return None;
        }
        if !ts.backlog.is_empty() {
            if ts.backlog_seq == snap.seq && !ts.dirty_full {
                // Continue a large diff: the snapshot has not moved since it was made.
                let chunk = take_chunk(&mut ts.backlog);
                let origin = origin_of(snap, ty, &chunk, &[]);
                return Some(self.respond(ty, snap, chunk, Vec::new(), false, origin));
            }
            // The snapshot moved on: what is left may be stale; reconcile afresh.
            ts.backlog.clear();
            ts.dirty_full = true;
        }
        let ts = self.types[ty as usize].as_ref()?;
        // Nothing new since this type was last reconciled: nothing to do. (Every ACK
        // wakes the stream; this keeps an ACK from costing a scan.)
        if ts.seen_seq == snap.seq && !ts.dirty_full && !ts.force {
            return None;
        }
        let full_scan = ts.dirty_full
            || ts.seen_seq + 1 != snap.seq
            || (matches!(ty, XdsType::Listener | XdsType::Cluster) && snap.roles_changed);
        let mut updates = Vec::new();
        let mut removed = Vec::new();
        let mut newly_absent = Vec::new();
        let mut visit = |name: &Arc<str>| {
            let visible = self.visible(snap, ty, ts, name);
            let current = if visible { snap.get(ty, name) } else { None };
            let held = ts.held.get(name);
            match current {
                Some(r) => {
                    let v = r.version_hash();
                    let same = held.is_some_and(|h| h.version == v);
                    let rejected = !ts.rejected.is_empty() && ts.rejected.get(name) == Some(&v);
                    if !same && !rejected {
                        updates.push(r.clone());
                    }
                }
                None if held.is_some() => removed.push(name.clone()),
                None if visible && !sotw && !ts.absent_told.contains(name) => {
                    // Delta: tell the client a name it asked for does not exist.
                    newly_absent.push(name.clone());
                    removed.push(name.clone());
                }
                None => {}
            }
        };
        if full_scan {
            let mut all: HashSet<Arc<str>> = ts.names.clone();
            if ts.wildcard {
                all.extend(self.wildcard_names(snap, ty).cloned());
            }
            all.extend(ts.held.keys().cloned());
            all.iter().for_each(&mut visit);
        } else if ts.seen_seq != snap.seq {
            // The fast path: only what changed since the snapshot this client saw,
            // walking whichever is smaller — the change set or this client's names.
            let changed = &snap.changed[ty as usize];
            if ts.wildcard || changed.len() <= ts.names.len() + ts.held.len() {
                changed.iter().for_each(&mut visit);
            } else {
                ts.names
                    .iter()
                    .filter(|n| changed.contains(*n))
                    .for_each(&mut visit);
                ts.held
                    .keys()
                    .filter(|n| changed.contains(*n) && !ts.names.contains(*n))
                    .for_each(&mut visit);
            }
        }
        let force = ts.force;
        let full_set = sotw && ty.sotw_full_state();
        let changed = !updates.is_empty() || !removed.is_empty();
        if ty == XdsType::Cluster {
            // Envoy re-creates an updated cluster, and the new one warms only when
            // its endpoints arrive again: re-send the load assignments of clusters
            // the client held at another version (right after this CDS response).
            let replaced: Vec<Arc<str>> = updates
                .iter()
                .filter(|r| ts.held.contains_key(r.name()))
                .map(|r| r.name_arc().clone())
                .collect();
            if let Some(eds) = self.types[XdsType::Endpoint as usize].as_mut() {
                for name in replaced {
                    if eds.held.remove(&name).is_some() {
                        eds.dirty_full = true;
                    }
                }
            }
        }
        let ts = self.types[ty as usize].as_mut()?;
        ts.seen_seq = snap.seq;
        ts.dirty_full = false;
        ts.force = false;
        ts.absent_told.extend(newly_absent);
        if sotw && !ty.sotw_full_state() {
            // SotW RDS/EDS: a vanished resource is dropped by unsubscribing, not by a
            // response; forget it so it is sent again if it comes back.
            for n in &removed {
                ts.held.remove(n);
            }
            removed.clear();
        }
        let send = if full_set {
            changed || force
        } else {
            !updates.is_empty() || !removed.is_empty() || force
        };
        if !send {
            return None;
        }
        // Convergence counts from the oldest change this client is sent.
        let origin = origin_of(snap, ty, &updates, &removed);
        let resources = if full_set {
            // The complete set, keeping the last good version of anything NACKed.
            let mut names: BTreeSet<Arc<str>> = ts
                .names
                .iter()
                .filter(|n| snap.get(ty, n).is_some())
                .cloned()
                .collect();
            if ts.wildcard {
                names.extend(self.wildcard_names(snap, ty).cloned());
            }
            let ts = self.types[ty as usize].as_ref()?;
            names
                .into_iter()
                .filter_map(|n| {
                    let r = snap.get(ty, &n)?;
                    let rejected = ts.rejected.get(&n) == Some(&r.version_hash());
                    if rejected {
                        ts.held.get(&n).and_then(|h| h.resource.clone())
                    } else {
                        Some(r.clone())
                    }
                })
                .collect()
        } else {
            let mut updates = updates;
            let first = take_chunk(&mut updates);
            if !updates.is_empty() {
                let ts = self.types[ty as usize].as_mut()?;
                ts.backlog = updates;
                ts.backlog_seq = snap.seq;
            }
            first
        };
        let removed = if full_set { Vec::new() } else { removed };
        Some(self.respond(ty, snap, resources, removed, full_set, origin))
    }

    /// Records `resources` and `removed` as the pending response of `ty`.
    fn respond(
        &mut self,
        ty: XdsType,
        snap: &Snapshot,
        resources: Vec<EncodedResource>,
        removed: Vec<Arc<str>>,
        full_set: bool,
        origin: Option<SystemTime>,
    ) -> Outgoing {
        self.nonce += 1;
        let out = Outgoing {
            version: snap.seq.to_string(),
            nonce: self.nonce.to_string(),
            resources,
            removed,
        };
        if let Some(ts) = self.types[ty as usize].as_mut() {
            ts.pending = Some(Pending {
                nonce: out.nonce.clone(),
                version: out.version.clone(),
                sent: out.resources.clone(),
                removed: out.removed.clone(),
                full_set,
                origin,
                sent_at: SystemTime::now(),
            });
        }
        out
    }

    /// LDS and RDS wait while CDS or EDS is in flight: a listener or route must not
    /// reach a client before the clusters it names.
    fn gated(&self, ty: XdsType) -> bool {
        let in_flight = |t: XdsType| {
            self.types[t as usize]
                .as_ref()
                .is_some_and(|s| s.pending.is_some())
        };
        matches!(ty, XdsType::Listener | XdsType::Route)
            && (in_flight(XdsType::Cluster) || in_flight(XdsType::Endpoint))
    }

    fn record_sent(&self, ty: XdsType, out: &Outgoing) {
        let bytes: usize = out.resources.iter().map(EncodedResource::size).sum();
        let label = ty.into();
        self.metrics.xds_responses.get_or_create(&label).inc();
        self.metrics
            .xds_resources_sent
            .get_or_create(&label)
            .inc_by(out.resources.len() as u64);
        self.metrics
            .xds_bytes_sent
            .get_or_create(&label)
            .inc_by(bytes as u64);
        let mut status = self.status.lock().unwrap();
        let st = status.types.entry(ty.short()).or_default();
        st.type_url = ty.type_url();
        st.last_sent_version = out.version.clone();
        st.last_sent_at_unix = Some(unix_now());
        st.pending_nonce = Some(out.nonce.clone());
        st.pending_since_unix = Some(unix_now());
        st.responses_total += 1;
        debug!(r#type = ty.short(), version = %out.version, resources = out.resources.len(), removed = out.removed.len(), bytes, "sent");
    }

    fn record_subscription(&self, ty: XdsType) {
        let Some(ts) = self.types[ty as usize].as_ref() else {
            return;
        };
        let mut status = self.status.lock().unwrap();
        let st = status.types.entry(ty.short()).or_default();
        st.type_url = ty.type_url();
        st.wildcard = ts.wildcard;
        st.subscribed = ts.names.len();
    }
}

async fn run<D: Dialect>(
    ctx: StreamContext,
    inbound: Streaming<D::Req>,
    tx: mpsc::Sender<Result<D::Resp, Status>>,
) where
    Streaming<D::Req>: Send,
{
    let span = info_span!(
        "ads",
        stream = ctx.id,
        protocol = D::NAME,
        node = tracing::field::Empty,
        env = tracing::field::Empty
    );
    async move {
        if let Err(status) = serve::<D>(&ctx, inbound, &tx).await {
            info!(code = ?status.code(), message = status.message(), "stream ended with an error");
            let _ = tx.send(Err(status)).await;
        }
    }
    .instrument(span)
    .await
}

async fn serve<D: Dialect>(
    ctx: &StreamContext,
    mut inbound: Streaming<D::Req>,
    tx: &mpsc::Sender<Result<D::Resp, Status>>,
) -> Result<(), Status> {
    let Some(first) = inbound.message().await? else {
        return Ok(());
    };
    let Some(node) = D::node(&first) else {
        return Err(Status::invalid_argument(
            "the first request of an xDS stream must carry a node (node.id, and metadata \"tributary.io/env\" to pick an environment)",
        ));
    };
    let node = NodeInfo::from_node(node, &ctx.default_env)?;
    let mut stopping = ctx.stopping.clone();
    let mut synced = ctx.synced.clone();
    if synced.wait_for(|s| *s).await.is_err() {
        return Ok(());
    }
    // Held until the initial sync is ACKed (or 10 s pass): a reconnect storm is
    // admitted a bounded number of streams at a time.
    ctx.metrics.xds_admission_waiting.inc();
    let permit = ctx.admission.clone().acquire_owned().await;
    ctx.metrics.xds_admission_waiting.dec();
    let mut admitted = permit.ok().map(|p| (p, Instant::now()));
    let span = tracing::Span::current();
    span.record("node", node.id.as_str());
    span.record("env", node.environment.as_str());

    let mut snapshots: watch::Receiver<Arc<Snapshot>> =
        ctx.shards.subscribe_or_create(&node.environment);
    let status = Arc::new(Mutex::new(ClientStatus {
        node_id: node.id.clone(),
        cluster: node.cluster.clone(),
        environment: node.environment.clone(),
        role: match &node.role {
            Role::Sidecar => "sidecar".into(),
            Role::Gateway(g) => format!("gateway/{g}"),
        },
        protocol: D::NAME,
        peer: ctx.peer.map(|p| p.to_string()),
        connected_at_unix: unix_now(),
        types: BTreeMap::new(),
    }));
    let _registration = ctx.registry.register(ctx.id, status.clone());
    let _connected = ctx.metrics.connection_guard(D::NAME);
    info!(role = ?node.role, "connected");
    let mut conn = Conn {
        node,
        dialect: D::NAME,
        types: Default::default(),
        nonce: 0,
        status,
        metrics: ctx.metrics.clone(),
    };

    let mut next = Some(first);
    loop {
        if let Some(req) = next.take() {
            let url = D::type_url(&req).to_string();
            let Some(ty) = XdsType::from_type_url(&url) else {
                let supported: Vec<&str> = XdsType::ALL.iter().map(|t| t.type_url()).collect();
                return Err(Status::invalid_argument(format!(
                    "unsupported type_url {url:?}; this server serves {}",
                    supported.join(", ")
                )));
            };
            ctx.metrics.xds_requests.get_or_create(&ty.into()).inc();
            D::apply(req, ty, &mut conn)?;
            conn.record_subscription(ty);
        }
        let snap = snapshots.borrow_and_update().clone();
        pump::<D>(&mut conn, &snap, tx).await?;
        if admitted.as_ref().is_some_and(|(_, since)| {
            let synced = conn.nonce > 0 && conn.types.iter().flatten().all(|t| t.pending.is_none());
            synced || since.elapsed() > std::time::Duration::from_secs(10)
        }) {
            admitted = None;
        }

        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => next = Some(req),
                Ok(None) => break,
                Err(status) => {
                    debug!(%status, "client stream error");
                    break;
                }
            },
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = stopping.wait_for(|s| *s) => {
                return Err(Status::unavailable("the hub is shutting down"));
            }
            // A client that never ACKs its initial sync gives its slot back.
            _ = tokio::time::sleep(std::time::Duration::from_secs(10)), if admitted.is_some() => {}
        }
    }
    info!(dialect = conn.dialect, "disconnected");
    Ok(())
}

/// Sends whatever the client needs, type by type in make-before-break order.
async fn pump<D: Dialect>(
    conn: &mut Conn,
    snap: &Snapshot,
    tx: &mpsc::Sender<Result<D::Resp, Status>>,
) -> Result<(), Status> {
    let sotw = D::NAME == Sotw::NAME;
    let started = Instant::now();
    for ty in XdsType::ALL {
        if conn.gated(ty) {
            continue;
        }
        if let Some(out) = conn.build(ty, snap, sotw) {
            conn.record_sent(ty, &out);
            if tx.send(Ok(D::response(out, ty))).await.is_err() {
                return Err(Status::cancelled("client went away"));
            }
        }
    }
    conn.metrics
        .xds_pump_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(())
}
