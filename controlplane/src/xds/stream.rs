//! One xDS stream's state machine: what its client subscribes to, holds, has in
//! flight and has rejected, and which response it needs next.
//!
//! Pure logic, no I/O: [`super::server`] feeds it requests and snapshots and sends
//! what it builds. Keeping it free of tonic and tokio lets the fuzz target drive it
//! through millions of request sequences against a model of the client.
//!
//! The rules it keeps (docs/xds.md has them for operators):
//!
//! - **Per-resource NACKs.** Envoy applies the valid resources of an LDS or CDS
//!   response and rejects the others, naming them in `error_detail`; gRPC clients do
//!   the same for every type. A NACK marks only the resources its message names as
//!   rejected (all of them when it names none: the client rejected the response
//!   whole). The client keeps what it accepted; a rejected version is never sent
//!   again, and the last good version keeps being served, until that resource
//!   changes.
//! - **Make-before-break, both halves.** New clusters go first (CDS, then their
//!   endpoints), then the listeners and routes that use them, and a cluster that
//!   nothing references any more is removed only once the switch away from it is
//!   answered. Listeners and routes wait only for clusters that are still warming,
//!   never for endpoint churn of clusters the client already has.
//! - **Withdrawal hold.** While the hub may not yet hold everything its remote
//!   clusters provide (after a restart), removals are held back, and a SotW client
//!   that holds an unknown set from an earlier stream gets no full set that could
//!   lack one of them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tonic::Status;
use tracing::{debug, warn};
use tributary_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest,
};
use tributary_proto::wire::{EncodedResource, version_hash};

use super::XdsType;
use super::snapshot::Snapshot;
use crate::metrics::Metrics;
use crate::status::{ClientStatus, NackRecord, unix_now};

/// Default largest Delta response a stream builds at once (`--max-response-bytes`):
/// 3 MiB, leaving room under gRPC clients' default 4 MiB receive limit for the
/// per-resource framing and the response's other fields.
pub const MAX_RESPONSE_BYTES: usize = 3 * 1024 * 1024;

/// Longest NACK message kept in a stream's status record.
const MAX_NACK_MESSAGE_BYTES: usize = 4096;

/// Bounds on what one stream may make the hub hold (flags of `tributary hub`).
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Most resource names one stream may subscribe to per type (`--max-names-per-type`).
    pub max_names_per_type: usize,
    /// Most resource names a NACK record in `/status/sync` keeps (`--nack-record-names`).
    pub nack_record_names: usize,
    /// Largest Delta response body a stream builds at once (`--max-response-bytes`):
    /// a bigger diff goes out in several responses, each after the previous one's ACK.
    /// Each extra response costs the client a round trip. Responses are sent from the
    /// resources' own buffers (`tributary_proto::wire::ads`), so a stream's memory
    /// does not grow with this bound.
    pub max_response_bytes: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_names_per_type: 250_000,
            nack_record_names: 64,
            max_response_bytes: MAX_RESPONSE_BYTES,
        }
    }
}

/// Who a client is, from the first request's `Node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub cluster: String,
    pub environment: String,
    pub role: Role,
    /// A sidecar's dependency scope (a `Sidecar` object of its environment).
    pub scope: Option<String>,
    /// A workload's namespace and service account (metadata
    /// `tributary.io/namespace`, `tributary.io/service-account`): with the
    /// environment, its SPIFFE id until streams carry a verified one
    /// ([`NodeInfo::workload_identity`]).
    pub namespace: Option<String>,
    pub service_account: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Sidecar,
    Gateway(String),
}

/// One response, before dialect-specific encoding.
#[derive(Debug)]
pub struct Outgoing {
    pub version: String,
    pub nonce: String,
    pub resources: Vec<EncodedResource>,
    pub removed: Vec<Arc<str>>,
}

/// A resource the client holds.
#[derive(Debug, Clone)]
struct Held {
    /// [`EncodedResource::version_hash`] of the version held; `None` when the client
    /// holds some version we cannot name (it may or may not have applied our last
    /// one), so that any current version is sent again.
    version: Option<u64>,
    /// The version itself, kept for SotW full-state types: a full set can then keep
    /// serving it after a NACK, or while its removal waits.
    resource: Option<EncodedResource>,
}

/// A response awaiting ACK or NACK.
#[derive(Debug)]
struct Pending {
    nonce: String,
    version: String,
    /// The snapshot it was built from.
    seq: u64,
    sent: Vec<EncodedResource>,
    removed: Vec<Arc<str>>,
    /// A SotW full-state response: the client holds exactly what it accepted of it.
    full_set: bool,
    /// Origin of the oldest change this response carries: its ACK completes that
    /// change's convergence for this client.
    origin: Option<SystemTime>,
    sent_at: SystemTime,
}

/// Resource names a stream tracks. Looked up for every name a reconcile visits (on
/// every stream), so hashed with foldhash rather than SipHash: randomly seeded per
/// process, and the sets are bounded by `--max-names-per-type`.
type Names = HashSet<Arc<str>, foldhash::fast::RandomState>;
type NameMap<V> = HashMap<Arc<str>, V, foldhash::fast::RandomState>;

/// What a wildcard subscription selects: a named set (a role's listeners, a scope's
/// clusters; `None` when the role or scope does not exist), or every resource of the
/// type.
#[derive(Clone, Copy)]
enum Selection<'s> {
    Set(Option<&'s BTreeSet<Arc<str>>>),
    Everything,
}

#[derive(Debug, Default)]
struct TypeState {
    wildcard: bool,
    names: Names,
    held: NameMap<Held>,
    pending: Option<Pending>,
    /// Versions the client rejected: not sent to it again until the resource changes.
    /// Entries leave when the resource changes or goes away, so this never outgrows
    /// what the client can see.
    rejected: NameMap<u64>,
    /// Delta: subscribed names already reported as not existing.
    absent_told: Names,
    /// Removals held back (make-before-break, or the withdrawal hold): the client
    /// keeps these until they are released.
    deferred: Names,
    /// Snapshot seq this type was last reconciled against.
    seen_seq: u64,
    /// The snapshot seq up to which everything this type needs was sent and answered.
    settled_seq: u64,
    /// Reconcile against the whole snapshot, not just its change set.
    dirty_full: bool,
    /// Send a response even if it carries nothing (answers a subscription).
    force: bool,
    /// SotW: the client's first request carried a version, so it holds resources
    /// from an earlier stream that we cannot name (until a full set is answered).
    unknown_held: bool,
    /// SotW: a full set of this stream was ACKed, so we know what the client holds.
    /// (A client whose earlier stream's responses were all NACKed asks with an
    /// empty version, yet may hold what it applied of them.)
    set_confirmed: bool,

    /// The rest of a diff too large for one response, valid for `backlog_seq`.
    backlog: Vec<EncodedResource>,
    backlog_seq: u64,
}

impl TypeState {
    fn settled_at(&self, seq: u64) -> bool {
        self.pending.is_none() && self.backlog.is_empty() && self.settled_seq >= seq
    }
}

/// One stream's state. Owned by its task; nothing here is shared except the
/// client's status record.
#[derive(Debug)]
pub struct StreamState {
    pub node: NodeInfo,
    sotw: bool,
    limits: StreamLimits,
    types: [Option<TypeState>; XdsType::COUNT],
    /// Clusters sent (added or replaced) whose endpoints the client has not yet
    /// answered: listeners and routes wait for these, not for endpoint churn.
    warming: Names,
    nonce: u64,
    /// Names looked at while reconciling, all types: the work a snapshot costs this
    /// stream (a test checks it follows the change, not what the client holds).
    names_visited: u64,
    status: Arc<Mutex<ClientStatus>>,
    metrics: Arc<Metrics>,
}

impl StreamState {
    pub fn new(
        node: NodeInfo,
        sotw: bool,
        limits: StreamLimits,
        status: Arc<Mutex<ClientStatus>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            node,
            sotw,
            limits,
            types: Default::default(),
            warming: Names::default(),
            nonce: 0,
            names_visited: 0,
            status,
            metrics,
        }
    }

    /// Names looked at while reconciling so far (see the field).
    pub fn names_visited(&self) -> u64 {
        self.names_visited
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether the client has asked for `ty` on this stream.
    pub fn subscribed(&self, ty: XdsType) -> bool {
        self.types[ty as usize].is_some()
    }

    /// Whether every type the client asked for has been answered and nothing is in
    /// flight (the end of an initial sync).
    pub fn synced(&self) -> bool {
        self.nonce > 0 && self.types.iter().flatten().all(|t| t.pending.is_none())
    }

    fn check_names(&self, ty: XdsType, count: usize) -> Result<(), Status> {
        if count > self.limits.max_names_per_type {
            return Err(Status::resource_exhausted(format!(
                "{}: a subscription to {count} resource names exceeds this hub's limit of {} per type (--max-names-per-type); subscribe with a wildcard or to fewer names",
                ty.short(),
                self.limits.max_names_per_type
            )));
        }
        Ok(())
    }

    // ---- requests ---------------------------------------------------------------

    /// A SotW request: an ACK or NACK of the pending response (by nonce), and the
    /// client's complete subscription for the type.
    pub fn sotw_request(&mut self, req: &DiscoveryRequest, ty: XdsType) -> Result<(), Status> {
        let first = self.types[ty as usize].is_none();
        if !req.response_nonce.is_empty() {
            let pending = self.types[ty as usize]
                .as_ref()
                .and_then(|ts| ts.pending.as_ref());
            match pending.map(|p| p.nonce == req.response_nonce) {
                Some(true) => {
                    let error = req.error_detail.as_ref().map(|e| e.message.as_str());
                    self.complete(ty, &req.version_info, error);
                }
                // A stale nonce: the client has not seen our latest response yet;
                // it will send its current subscription again when it does.
                Some(false) => return Ok(()),
                None => {}
            }
        }
        self.check_names(ty, req.resource_names.len())?;
        let ts = self.types[ty as usize].get_or_insert_with(TypeState::default);
        if first && ty.sotw_full_state() && !req.version_info.is_empty() {
            ts.unknown_held = true;
        }
        let wildcard = ty.sotw_full_state()
            && (req.resource_names.is_empty() || req.resource_names.iter().any(|n| n == "*"));
        // An ACK re-lists every name: compare before allocating anything.
        let explicit = req.resource_names.iter().filter(|n| n.as_str() != "*");
        let unchanged = !first
            && wildcard == ts.wildcard
            && explicit.clone().count() == ts.names.len()
            && explicit.clone().all(|n| ts.names.contains(n.as_str()));
        if !unchanged {
            let names: Names = explicit.map(|n| Arc::from(n.as_str())).collect();
            if !ty.sotw_full_state() {
                // The client forgets what it unsubscribed; send it again if re-added.
                // (What it rejected stays rejected: subscribing again does not
                // make that version valid.)
                ts.held.retain(|n, _| names.contains(n));
                ts.deferred.retain(|n| names.contains(n));
                if ty == XdsType::Endpoint {
                    self.warming.retain(|n| names.contains(n));
                }
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

    /// A Delta request: an ACK or NACK (by nonce), subscription changes, and on the
    /// first request of a type the versions the client already holds.
    pub fn delta_request(&mut self, req: DeltaDiscoveryRequest, ty: XdsType) -> Result<(), Status> {
        let first = self.types[ty as usize].is_none();
        if !first && !req.response_nonce.is_empty() {
            let matches = self.types[ty as usize]
                .as_ref()
                .and_then(|ts| ts.pending.as_ref())
                .is_some_and(|p| p.nonce == req.response_nonce);
            if matches {
                let error = req.error_detail.as_ref().map(|e| e.message.as_str());
                self.complete(ty, "", error);
            }
        }
        let subscribed_now = self.types[ty as usize]
            .as_ref()
            .map_or(0, |ts| ts.names.len());
        self.check_names(ty, subscribed_now + req.resource_names_subscribe.len())?;
        if first {
            self.check_names(ty, req.initial_resource_versions.len())?;
        }
        let ts = self.types[ty as usize].get_or_insert_with(TypeState::default);
        if first {
            // What the client already holds from an earlier stream: not sent again
            // while the version is unchanged.
            for (name, version) in req.initial_resource_versions {
                ts.held.insert(
                    Arc::from(name.as_str()),
                    Held {
                        version: Some(version_hash(&version)),
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
                ts.deferred.remove(name.as_str());
                if ty == XdsType::Endpoint {
                    self.warming.remove(name.as_str());
                }
            }
            ts.dirty_full = true;
        }
        Ok(())
    }

    /// Reconcile every type against the whole snapshot (e.g. when the hub's
    /// withdrawal hold ends).
    pub fn reconcile_all(&mut self) {
        for ts in self.types.iter_mut().flatten() {
            ts.dirty_full = true;
        }
    }

    // ---- ACK / NACK -------------------------------------------------------------

    /// ACK (`error` is `None`) or NACK of the pending response of `ty`.
    fn complete(&mut self, ty: XdsType, client_version: &str, error: Option<&str>) {
        let Some(ts) = self.types[ty as usize].as_mut() else {
            return;
        };
        let Some(p) = ts.pending.take() else { return };
        let now = SystemTime::now();
        if let Ok(rtt) = now.duration_since(p.sent_at) {
            self.metrics.xds_ack_seconds.observe(rtt.as_secs_f64());
        }
        if ts.backlog.is_empty() {
            ts.settled_seq = ts.settled_seq.max(p.seq);
        }
        // What the client rejected: the resources the message names; all of them
        // when it names none (the response failed as a whole).
        let rejected: HashSet<Arc<str>> = match error {
            None => HashSet::new(),
            Some(message) => rejected_by_message(message, &p.sent)
                .unwrap_or_else(|| p.sent.iter().map(|r| r.name_arc().clone()).collect()),
        };
        // After a NACK, the resources it does not name may or may not have been
        // applied: Envoy applies the valid listeners and clusters of a response when
        // adding one fails, but rejects the whole response when one fails validation
        // while decoding (naming it all the same), and a client with one watch per
        // route table or load assignment may stop before reaching the others. Those
        // that changed are sent once more; a client that has them ignores the
        // duplicate. Those that did not change, it holds either way.
        let previous = if p.full_set {
            std::mem::take(&mut ts.held)
        } else {
            NameMap::default()
        };
        let mut uncertain = false;
        for r in &p.sent {
            let name = r.name_arc();
            if !ty.sotw_full_state() && !ts.wildcard && !ts.names.contains(name) {
                // Unsubscribed while the response was in flight: the client drops it.
                continue;
            }
            let prior = if p.full_set {
                previous.get(name).cloned()
            } else {
                ts.held.get(name).cloned()
            };
            if rejected.contains(name) {
                ts.rejected.insert(name.clone(), r.version_hash());
                // The client keeps its last good version (a full set that named the
                // resource at a rejected version does not remove it).
                if let Some(h) = prior.filter(|_| p.full_set) {
                    ts.held.insert(name.clone(), h);
                }
                continue;
            }
            let v = r.version_hash();
            // Certain: ACKed, or the client held this version already. (Resending
            // the uncertain ones cannot loop: each NACK rejects at least one more
            // version, and a rejected version is not sent again.)
            let certain = error.is_none() || prior.as_ref().is_some_and(|h| h.version == Some(v));
            let held = if certain {
                Held {
                    version: Some(v),
                    resource: p.full_set.then(|| r.clone()),
                }
            } else {
                // Sent again until answered; meanwhile a full set that must keep it
                // (a removal waits) serves the version it may hold.
                uncertain = true;
                Held {
                    version: None,
                    resource: p.full_set.then(|| r.clone()),
                }
            };
            ts.held.insert(name.clone(), held);
        }
        if error.is_none() {
            for n in &p.removed {
                ts.held.remove(n);
            }
        } else {
            // A NACKed response may not have been applied at all: its removals (Delta)
            // and what its full set left out (SotW) are sent again.
            for n in &p.removed {
                if let Some(h) = ts.held.get_mut(n) {
                    h.version = None;
                    uncertain = true;
                }
            }
            for (n, h) in previous {
                if !ts.held.contains_key(&n) && !rejected.contains(&n) {
                    uncertain = true;
                    ts.held.insert(
                        n,
                        Held {
                            version: None,
                            resource: h.resource,
                        },
                    );
                }
            }
        }
        if p.full_set {
            if error.is_none() {
                ts.unknown_held = false;
                ts.set_confirmed = true;
            } else if !ts.set_confirmed {
                // What the client holds is not known (it may have rejected the set
                // whole, and hold what it had before this stream): send the set
                // again, without what it rejected, to settle it.
                uncertain = true;
                ts.force = true;
            }
        }
        match ty {
            XdsType::Endpoint => {
                for r in &p.sent {
                    self.warming.remove(r.name());
                }
            }
            XdsType::Cluster => {
                // Clusters whose endpoints the client will not ask for do not warm here.
                let eds = self.types[XdsType::Endpoint as usize].as_ref();
                let ts = self.types[ty as usize].as_ref();
                self.warming.retain(|n| {
                    ts.is_some_and(|t| t.held.contains_key(n))
                        && eds.is_some_and(|e| e.wildcard || e.names.contains(n))
                });
            }
            _ => {}
        }
        let ts = self.types[ty as usize].as_mut().expect("checked above");
        let mut status = self.status.lock().unwrap();
        let st = status.types.entry(ty.short()).or_default();
        match error {
            None => {
                if let Some(origin) = p.origin
                    && let Ok(d) = now.duration_since(origin)
                {
                    self.metrics
                        .convergence_seconds
                        .get_or_create(&ty.into())
                        .observe(d.as_secs_f64());
                }
                st.last_acked_version = p.version.clone();
                st.last_acked_at_unix = Some(unix_now());
                self.metrics.xds_acks.get_or_create(&ty.into()).inc();
                debug!(r#type = ty.short(), version = %p.version, "ACK");
            }
            Some(message) => {
                if uncertain {
                    ts.dirty_full = true;
                }
                let mut names: Vec<String> = rejected.iter().map(|n| n.to_string()).collect();
                names.sort();
                let total = names.len();
                names.truncate(self.limits.nack_record_names);
                st.nacks_total += 1;
                st.last_nack = Some(NackRecord {
                    version: p.version.clone(),
                    nonce: p.nonce.clone(),
                    client_version: client_version.to_string(),
                    message: truncate(message, MAX_NACK_MESSAGE_BYTES),
                    resources: names,
                    resources_total: total,
                    at_unix: unix_now(),
                });
                self.metrics.xds_nacks.get_or_create(&ty.into()).inc();
                warn!(
                    r#type = ty.short(),
                    version = %p.version,
                    rejected = total,
                    accepted = p.sent.len() - total,
                    error = %truncate(message, 512),
                    "NACK: the client keeps its last good version of the rejected resources; they are not sent again until they change"
                );
            }
        }
        st.resources = ts.held.len();
        st.pending_nonce = None;
        st.pending_since_unix = None;
    }

    // ---- building responses -----------------------------------------------------

    /// LDS and RDS wait while CDS is in flight or not yet sent for this snapshot, or
    /// a cluster they may name is still warming (its endpoints sent but not
    /// answered): a listener or route must not reach a client before the clusters
    /// it names.
    pub fn gated(&mut self, ty: XdsType, snap: &Snapshot) -> bool {
        if !matches!(ty, XdsType::Listener | XdsType::Route) {
            return false;
        }
        // Clusters go first: in flight, not yet built from this snapshot (e.g. a full
        // set withheld during the withdrawal hold), or not all sent.
        if self.types[XdsType::Cluster as usize]
            .as_ref()
            .is_some_and(|c| {
                c.pending.is_some()
                    || !c.backlog.is_empty()
                    || c.seen_seq != snap.seq
                    || c.dirty_full
                    || c.force
            })
        {
            return true;
        }
        if !self.warming.is_empty() {
            // A warming cluster's endpoints go out (again) even if the client holds
            // them at the current version: Envoy warms a created or re-created cluster
            // only when they arrive.
            let endpoints = snap.of_type(XdsType::Endpoint);
            if let Some(eds) = self.types[XdsType::Endpoint as usize].as_mut()
                && eds.pending.is_none()
            {
                for n in &self.warming {
                    let current = endpoints.get(n).map(EncodedResource::version_hash);
                    if current.is_some() && eds.held.get(n).is_some_and(|h| h.version == current) {
                        eds.held.remove(n);
                        eds.dirty_full = true;
                    }
                }
            }
            // A cluster warms only while its endpoints can still arrive: they exist
            // at a version the client has not rejected, and the client holds the
            // cluster and asks for its endpoints.
            let eds = self.types[XdsType::Endpoint as usize].as_ref();
            let cds = self.types[XdsType::Cluster as usize].as_ref();
            let endpoints = snap.of_type(XdsType::Endpoint);
            self.warming.retain(|n| {
                let Some(cla) = endpoints.get(n) else {
                    return false;
                };
                cds.is_some_and(|c| c.held.contains_key(n))
                    && eds.is_some_and(|e| {
                        (e.wildcard || e.names.contains(n))
                            && e.rejected.get(n) != Some(&cla.version_hash())
                    })
            });
        }
        !self.warming.is_empty()
    }

    /// Whether listeners and routes are settled at `seq`: a cluster that vanished in
    /// that snapshot is no longer referenced by anything the client holds.
    fn switched(&self, seq: u64) -> bool {
        [XdsType::Listener, XdsType::Route].iter().all(|t| {
            self.types[*t as usize]
                .as_ref()
                .is_none_or(|s| s.settled_at(seq))
        })
    }

    /// Whether the removal of `name` may go out now.
    fn removal_allowed(&self, ty: XdsType, name: &str, seq: u64, hold: bool) -> bool {
        if hold {
            return false;
        }
        match ty {
            XdsType::Cluster => self.switched(seq),
            // A Delta client drops a cluster's endpoints with the cluster itself.
            XdsType::Endpoint if !self.sotw => !self.types[XdsType::Cluster as usize]
                .as_ref()
                .is_some_and(|c| c.held.contains_key(name)),
            _ => true,
        }
    }

    /// Builds the next response for `ty` if the client needs one. `hold` is the
    /// hub's withdrawal hold.
    pub fn build(&mut self, ty: XdsType, snap: &Snapshot, hold: bool) -> Option<Outgoing> {
        let sotw = self.sotw;
        let ts = self.types[ty as usize].as_mut()?;
        if ts.pending.is_some() {
            return None;
        }
        if !ts.backlog.is_empty() {
            if ts.backlog_seq == snap.seq && !ts.dirty_full {
                // Continue a large diff: the snapshot has not moved since it was made.
                let chunk = take_chunk(&mut ts.backlog, self.limits.max_response_bytes);
                let origin = origin_of(snap, ty, &chunk, &[]);
                return Some(self.respond(ty, snap, chunk, Vec::new(), false, origin));
            }
            // The snapshot moved on: what is left may be stale; reconcile afresh.
            ts.backlog.clear();
            ts.dirty_full = true;
        }
        let ts = self.types[ty as usize].as_ref()?;
        let full_set = sotw && ty.sotw_full_state();
        if full_set && hold && ts.unknown_held {
            // The client holds an earlier stream's set, which we cannot name: any
            // full set now could lack one of them. Wait for the hold to end.
            return None;
        }
        let release: Vec<Arc<str>> = ts
            .deferred
            .iter()
            .filter(|n| self.removal_allowed(ty, n, snap.seq, hold))
            .cloned()
            .collect();
        // Nothing new since this type was last reconciled: nothing to do. (Every ACK
        // wakes the stream; this keeps an ACK from costing a scan.)
        if ts.seen_seq == snap.seq && !ts.dirty_full && !ts.force && release.is_empty() {
            let ts = self.types[ty as usize].as_mut()?;
            ts.settled_seq = snap.seq;
            return None;
        }
        // What changed since the snapshot this type last saw: one change set, or
        // several when the stream skipped snapshots (the watch coalesces them while a
        // response waits for its ACK). Only a stream that fell further behind than the
        // snapshots keep, or whose subscriptions changed, compares everything.
        let since = if ts.dirty_full || ts.seen_seq == 0 {
            None
        } else if ts.seen_seq == snap.seq {
            Some(Vec::new())
        } else {
            snap.changes_since(ts.seen_seq)
        };
        let full_scan = match &since {
            None => true,
            Some(deltas) => {
                matches!(ty, XdsType::Listener | XdsType::Cluster)
                    && deltas.iter().any(|(_, roles)| *roles)
            }
        };
        let mut updates = Vec::new();
        let mut removed = Vec::new();
        let mut newly_absent = Vec::new();
        let mut deferred_now = Vec::new();
        let mut released = Vec::new();
        let mut unrejected = Vec::new();
        let mut visited = 0u64;
        // What a wildcard selects, resolved once per reconcile rather than per name.
        let selected = self.wildcard_selection(snap, ty);
        let mut visit_known = |name: &Arc<str>, known: Option<bool>| {
            visited += 1;
            let visible = known.unwrap_or_else(|| {
                ts.names.contains(name)
                    || (ts.wildcard
                        && match selected {
                            Selection::Set(set) => set.is_some_and(|s| s.contains(name)),
                            Selection::Everything => snap.get(ty, name).is_some(),
                        })
            });
            let current = if visible { snap.get(ty, name) } else { None };
            let held = ts.held.get(name);
            match current {
                Some(r) => {
                    let v = r.version_hash();
                    if ts.deferred.contains(name) {
                        released.push(name.clone());
                    }
                    match ts.rejected.get(name) {
                        Some(bad) if *bad == v => return,
                        Some(_) => unrejected.push(name.clone()),
                        None => {}
                    }
                    if held.is_none_or(|h| h.version != Some(v)) {
                        updates.push(r.clone());
                    }
                }
                None => {
                    if ts.rejected.contains_key(name) {
                        unrejected.push(name.clone());
                    }
                    if held.is_some() {
                        if self.removal_allowed(ty, name, snap.seq, hold) {
                            if ts.deferred.contains(name) {
                                released.push(name.clone());
                            }
                            removed.push(name.clone());
                        } else if !ts.deferred.contains(name) {
                            deferred_now.push(name.clone());
                        }
                    } else if visible && !sotw && !hold && !ts.absent_told.contains(name) {
                        // Delta: tell the client a name it asked for does not exist.
                        newly_absent.push(name.clone());
                        removed.push(name.clone());
                    }
                }
            }
        };
        if full_scan {
            // Every name the client asks for, its wildcard selects, or it holds, once,
            // with its visibility known from where it came from.
            let wildcard = if ts.wildcard {
                Some(self.wildcard_names(snap, ty))
            } else {
                None
            };
            let mut all: NameMap<bool> = NameMap::with_capacity_and_hasher(
                ts.names.len() + ts.held.len(),
                Default::default(),
            );
            for name in wildcard.into_iter().flatten().chain(ts.names.iter()) {
                all.insert(name.clone(), true);
            }
            for name in ts.held.keys() {
                all.entry(name.clone()).or_insert(false);
            }
            all.iter()
                .for_each(|(name, visible)| visit_known(name, Some(*visible)));
            // Rejections of resources that changed or went away (including ones the
            // client no longer asks for) are forgotten: this bounds them by what exists.
            unrejected.extend(
                ts.rejected
                    .iter()
                    .filter(|(n, v)| snap.get(ty, n).is_none_or(|r| r.version_hash() != **v))
                    .map(|(n, _)| n.clone()),
            );
        } else {
            let mut visit = |name: &Arc<str>| visit_known(name, None);
            // The fast path: only what changed since the snapshot this client saw,
            // walking whichever is smaller: the change sets or this client's names.
            let deltas = since.unwrap_or_default();
            let sets: Vec<&HashSet<Arc<str>>> =
                deltas.iter().map(|(c, _)| &c[ty as usize]).collect();
            let changed_len: usize = sets.iter().map(|c| c.len()).sum();
            let is_changed = |n: &Arc<str>| sets.iter().any(|c| c.contains(n));
            if ts.wildcard || changed_len <= ts.names.len() + ts.held.len() {
                if let [only] = sets.as_slice() {
                    only.iter().for_each(&mut visit);
                } else {
                    // Several change sets: visit each name once.
                    let mut seen: HashSet<&Arc<str>> = HashSet::with_capacity(changed_len);
                    sets.iter()
                        .flat_map(|c| c.iter())
                        .filter(|n| seen.insert(*n))
                        .for_each(&mut visit);
                }
            } else {
                ts.names
                    .iter()
                    .filter(|n| is_changed(n))
                    .for_each(&mut visit);
                ts.held
                    .keys()
                    .filter(|n| is_changed(n) && !ts.names.contains(*n))
                    .for_each(&mut visit);
            }
            release.iter().for_each(&mut visit);
        }
        self.names_visited += visited;
        let force = ts.force;
        if ty == XdsType::Cluster {
            // New and replaced clusters warm: listeners and routes wait for their
            // endpoints. Envoy re-creates an updated cluster, and the new one warms
            // only when its endpoints arrive again: re-send the load assignments of
            // clusters the client held at another version (right after this CDS
            // response).
            let eds_map = snap.of_type(XdsType::Endpoint);
            let warm: Vec<Arc<str>> = updates
                .iter()
                .filter(|r| eds_map.contains_key(r.name()))
                .map(|r| r.name_arc().clone())
                .collect();
            if let Some(eds) = self.types[XdsType::Endpoint as usize].as_mut() {
                for name in &warm {
                    if eds.held.remove(name).is_some() {
                        eds.dirty_full = true;
                    }
                }
            }
            self.warming.extend(warm);
        }
        let ts = self.types[ty as usize].as_mut()?;
        ts.seen_seq = snap.seq;
        ts.dirty_full = false;
        ts.force = false;
        ts.absent_told.extend(newly_absent);
        for n in &unrejected {
            ts.rejected.remove(n);
        }
        for n in &released {
            ts.deferred.remove(n);
        }
        ts.deferred.extend(deferred_now);
        if sotw && !ty.sotw_full_state() {
            // SotW RDS/EDS: a vanished resource is dropped by unsubscribing, not by a
            // response; forget it so it is sent again if it comes back.
            for n in &removed {
                ts.held.remove(n);
            }
            removed.clear();
        }
        let changed = !updates.is_empty() || !removed.is_empty();
        if !(changed || force) {
            ts.settled_seq = snap.seq;
            return None;
        }
        // Convergence counts from the oldest change this client is sent.
        let origin = origin_of(snap, ty, &updates, &removed);
        let resources = if full_set {
            self.full_set(ty, snap)
        } else {
            let first = take_chunk(&mut updates, self.limits.max_response_bytes);
            if !updates.is_empty() {
                ts.backlog = updates;
                ts.backlog_seq = snap.seq;
            }
            first
        };
        let removed = if full_set { Vec::new() } else { removed };
        Some(self.respond(ty, snap, resources, removed, full_set, origin))
    }

    /// A SotW full-state response: every visible resource at its current version,
    /// except that a rejected version is replaced by the last good one (or left out
    /// if the client never had one), and resources whose removal waits are kept.
    fn full_set(&self, ty: XdsType, snap: &Snapshot) -> Vec<EncodedResource> {
        let Some(ts) = self.types[ty as usize].as_ref() else {
            return Vec::new();
        };
        let mut names: BTreeSet<&Arc<str>> = ts
            .names
            .iter()
            .filter(|n| snap.get(ty, n).is_some())
            .collect();
        if ts.wildcard {
            names.extend(self.wildcard_names(snap, ty));
        }
        let kept = |n: &Arc<str>| ts.held.get(n).and_then(|h| h.resource.clone());
        let mut out: Vec<EncodedResource> = names
            .into_iter()
            .filter_map(|n| {
                let r = snap.get(ty, n)?;
                if ts.rejected.get(n) == Some(&r.version_hash()) {
                    // The last good version, or nothing if we never sent it one. (A
                    // client that kept one from an earlier stream loses it here: we
                    // cannot name it, and sending the rejected version again would
                    // have a client that rejects whole responses reject every one.)
                    kept(n)
                } else {
                    Some(r.clone())
                }
            })
            .collect();
        let mut waiting: Vec<&Arc<str>> = ts.deferred.iter().collect();
        waiting.sort();
        out.extend(waiting.into_iter().filter_map(kept));
        out
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
                seq: snap.seq,
                sent: out.resources.clone(),
                removed: out.removed.clone(),
                full_set,
                origin,
                sent_at: SystemTime::now(),
            });
        }
        self.record_sent(ty, &out);
        out
    }

    /// What a wildcard subscription of `ty` selects for this client.
    fn wildcard_selection<'s>(&self, snap: &'s Snapshot, ty: XdsType) -> Selection<'s> {
        match ty {
            XdsType::Listener => Selection::Set(self.role_listeners(snap)),
            XdsType::Cluster if self.node.scope.is_some() => Selection::Set(self.scope(snap)),
            _ => Selection::Everything,
        }
    }

    /// A scoped sidecar's clusters (`None` for an unknown scope: it gets nothing, so
    /// a typo never widens what a proxy sees).
    fn scope<'s>(&self, snap: &'s Snapshot) -> Option<&'s BTreeSet<Arc<str>>> {
        let name = self.node.scope.as_ref()?;
        snap.roles().scopes.get(name).map(|s| s.as_ref())
    }

    /// The listeners a wildcard LDS selects: the gateway's, a scoped sidecar's own
    /// (`None` for an unknown scope, like its clusters), or the unscoped sidecars'.
    fn role_listeners<'s>(&self, snap: &'s Snapshot) -> Option<&'s BTreeSet<Arc<str>>> {
        match (&self.node.role, &self.node.scope) {
            (Role::Gateway(g), _) => snap.roles().gateways.get(g),
            (Role::Sidecar, Some(scope)) => {
                snap.roles().scope_listeners.get(scope).map(|s| s.as_ref())
            }
            (Role::Sidecar, None) => Some(&snap.roles().sidecar),
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

    pub fn record_subscription(&self, ty: XdsType) {
        let Some(ts) = self.types[ty as usize].as_ref() else {
            return;
        };
        let mut status = self.status.lock().unwrap();
        let st = status.types.entry(ty.short()).or_default();
        st.type_url = ty.type_url();
        st.wildcard = ts.wildcard;
        st.subscribed = ts.names.len();
        st.deferred_removals = ts.deferred.len();
    }
}

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
fn take_chunk(updates: &mut Vec<EncodedResource>, max_bytes: usize) -> Vec<EncodedResource> {
    let mut size = 0;
    let n = updates
        .iter()
        .take_while(|r| {
            size += r.size();
            size <= max_bytes
        })
        .count()
        .max(1)
        .min(updates.len());
    let rest = updates.split_off(n);
    std::mem::replace(updates, rest)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &s[..end], s.len())
}

/// Characters that can continue a resource name (ours are built from DNS names,
/// port numbers and `|`, `_`, `:`; a client may also quote or list them).
fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '|' | '.' | '-' | '_' | ':' | '/' | '*')
}

/// Whether `name` occurs in `message` as a whole token: not inside a longer name.
/// A `:` or `.` right after it ends the token when what follows is not part of a
/// name (`listener(s) a: error`, `rejected b.`), so `reviews.prod` does not match
/// `reviews.prod:9080`.
fn names_token(message: &str, name: &str) -> bool {
    if name.is_empty() {
        return false;
    }
    let mut from = 0;
    while let Some(i) = message[from..].find(name) {
        let start = from + i;
        let end = start + name.len();
        let before_ok = message[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !name_char(c));
        let mut rest = message[end..].chars();
        let after_ok = match rest.next() {
            None => true,
            Some(':' | '.') => rest.next().is_none_or(|d| !name_char(d)),
            Some(c) => !name_char(c),
        };
        if before_ok && after_ok {
            return true;
        }
        from = start + message[start..].chars().next().map_or(1, char::len_utf8);
    }
    false
}

/// The resources of a NACKed response that its error message names: Envoy lists
/// each rejected listener or cluster (`Error adding/updating cluster(s) NAME: why`),
/// gRPC each rejected resource. `None` when it names none of them: the response was
/// rejected whole (e.g. it failed to decode).
pub fn rejected_by_message(message: &str, sent: &[EncodedResource]) -> Option<HashSet<Arc<str>>> {
    // A message is at most a few KiB; a pathological one is not scanned past this.
    let message = &message[..floor_char_boundary(message, 256 * 1024)];
    let named: HashSet<Arc<str>> = sent
        .iter()
        .filter(|r| names_token(message, r.name()))
        .map(|r| r.name_arc().clone())
        .collect();
    if named.is_empty() {
        if let [only] = sent {
            return Some(HashSet::from([only.name_arc().clone()]));
        }
        return None;
    }
    Some(named)
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

#[cfg(test)]
mod tests;
