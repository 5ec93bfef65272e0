//! Fuzz target: random xDS request sequences against a model of what each client
//! should hold, over SotW and Delta.
//!
//! A small mesh (clusters with their load assignments, listeners naming route
//! tables, route tables naming clusters) changes at random; a simulated client that
//! behaves like Envoy (it follows the clusters and listeners it holds with its
//! endpoint and route subscriptions, applies the valid resources of a response and
//! rejects the invalid ones, or, in "whole" mode, rejects a response with an
//! invalid resource outright) talks to a real [`StreamState`]; the hub's
//! withdrawal hold toggles. After every response and at the end the model must
//! agree:
//!
//! - a rejected version is never received again until that resource changes;
//! - a full set never lacks a resource the client should hold, and nothing is
//!   removed from a client while the hub holds withdrawals;
//! - a client never holds a route naming a cluster it does not hold
//!   (make-before-break, both halves) unless it rejected that cluster;
//! - once the mesh stops changing, the client holds exactly the current version of
//!   every resource it can see, or its last good version of one it rejected.
//!
//! Known limits the model allows (docs/xds.md): a SotW client that reconnects
//! holding a resource the hub can no longer name loses it with the first full set
//! (make-before-break cannot cover it), and one that asks with an empty version
//! (every earlier response NACKed) is served like a new client during the hold.
//!
//! CI runs a few thousand cases; `scripts/fuzz` runs a million
//! (`TRIBUTARY_FUZZ_CASES`). `TRIBUTARY_FUZZ_TRACE=1` prints each step of a case
//! (for the `found_*` cases, which the fuzzer shrank from failures it found).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message;
use tributary_controlplane::metrics::Metrics;
use tributary_controlplane::status::ClientStatus;
use tributary_controlplane::xds::XdsType;
use tributary_controlplane::xds::generate::{EnvResources, RoleListeners};
use tributary_controlplane::xds::snapshot::{Changes, Snapshot};
use tributary_controlplane::xds::stream::{NodeInfo, Outgoing, Role, StreamLimits, StreamState};
use tributary_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest,
};
use tributary_proto::envoy::google::protobuf::Any;
use tributary_proto::envoy::google::rpc::Status as RpcStatus;
use tributary_proto::wire::EncodedResource;

const CLUSTERS: usize = 5;
const LISTENERS: usize = 2;
const ALL: [XdsType; 4] = [
    XdsType::Cluster,
    XdsType::Endpoint,
    XdsType::Listener,
    XdsType::Route,
];

fn cases() -> u32 {
    std::env::var("TRIBUTARY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

// ---- the mesh (the hub's truth) ----------------------------------------------------

fn cname(i: usize) -> String {
    format!("outbound|80||c{i}.prod")
}

fn lname(i: usize) -> String {
    format!("0.0.0.0_{}", 8000 + i)
}

fn rname(i: usize) -> String {
    format!("{}", 8000 + i)
}

/// One resource version: its content, from which its name, version and (routes)
/// the clusters it names are read back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Res {
    version: u32,
    refs: BTreeSet<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Mesh {
    by_type: [BTreeMap<String, Res>; 4],
    next: u32,
}

fn idx(ty: XdsType) -> usize {
    ty as usize
}

impl Mesh {
    fn bump(&mut self) -> u32 {
        self.next += 1;
        self.next
    }

    fn set(&mut self, ty: XdsType, name: String, refs: BTreeSet<String>) {
        let version = self.bump();
        self.by_type[idx(ty)].insert(name, Res { version, refs });
    }

    fn apply(&mut self, op: &MeshOp) {
        match *op {
            MeshOp::UpsertCluster(i) => {
                self.set(XdsType::Cluster, cname(i), BTreeSet::new());
                if !self.by_type[idx(XdsType::Endpoint)].contains_key(&cname(i)) {
                    self.set(XdsType::Endpoint, cname(i), BTreeSet::new());
                }
            }
            MeshOp::RemoveCluster(i) => {
                let name = cname(i);
                if self.by_type[idx(XdsType::Cluster)].remove(&name).is_none() {
                    return;
                }
                self.by_type[idx(XdsType::Endpoint)].remove(&name);
                // Routes stop naming it in the same change (as generated config does).
                let routes: Vec<(String, BTreeSet<String>)> = self.by_type[idx(XdsType::Route)]
                    .iter()
                    .filter(|(_, r)| r.refs.contains(&name))
                    .map(|(n, r)| {
                        (
                            n.clone(),
                            r.refs.iter().filter(|c| **c != name).cloned().collect(),
                        )
                    })
                    .collect();
                for (n, refs) in routes {
                    self.set(XdsType::Route, n, refs);
                }
            }
            MeshOp::Endpoints(i) => {
                if self.by_type[idx(XdsType::Cluster)].contains_key(&cname(i)) {
                    self.set(XdsType::Endpoint, cname(i), BTreeSet::new());
                }
            }
            MeshOp::Route(r, mask) => {
                // A route names existing clusters (and makes sure they exist).
                let mut refs = BTreeSet::new();
                for i in 0..CLUSTERS {
                    if mask & (1 << i) != 0 {
                        if !self.by_type[idx(XdsType::Cluster)].contains_key(&cname(i)) {
                            self.apply(&MeshOp::UpsertCluster(i));
                        }
                        refs.insert(cname(i));
                    }
                }
                self.set(XdsType::Route, rname(r), refs);
                if !self.by_type[idx(XdsType::Listener)].contains_key(&lname(r)) {
                    self.set(XdsType::Listener, lname(r), BTreeSet::new());
                }
            }
            MeshOp::Listener(l) => {
                self.set(XdsType::Listener, lname(l), BTreeSet::new());
                if !self.by_type[idx(XdsType::Route)].contains_key(&rname(l)) {
                    self.set(XdsType::Route, rname(l), BTreeSet::new());
                }
            }
            MeshOp::RemoveListener(l) => {
                self.by_type[idx(XdsType::Listener)].remove(&lname(l));
            }
        }
    }
}

fn encode(ty: XdsType, name: &str, r: &Res) -> EncodedResource {
    let refs: Vec<&str> = r.refs.iter().map(String::as_str).collect();
    let body = format!("{name}\n{}\n{}", r.version, refs.join(","));
    EncodedResource::from_body(
        ty.type_url(),
        name,
        &format!("{:016x}", r.version),
        body.as_bytes(),
    )
}

fn decode(r: &EncodedResource) -> (String, Res) {
    let any = Any::decode(r.any_bytes()).expect("an Any");
    let text = String::from_utf8(any.value).expect("our test bodies are text");
    let mut lines = text.split('\n');
    let name = lines.next().unwrap().to_string();
    assert_eq!(name, r.name());
    let version: u32 = lines.next().unwrap().parse().unwrap();
    let refs = lines
        .next()
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    (name, Res { version, refs })
}

fn snapshot(before: &Snapshot, mesh: &Mesh, prev: &Mesh) -> Snapshot {
    let mut resources = EnvResources::default();
    let mut changed: Changes = Default::default();
    for ty in ALL {
        for (name, r) in &mesh.by_type[idx(ty)] {
            resources.by_type[idx(ty)].insert(Arc::from(name.as_str()), encode(ty, name, r));
            if prev.by_type[idx(ty)].get(name) != Some(r) {
                changed[idx(ty)].insert(Arc::from(name.as_str()));
            }
        }
        for name in prev.by_type[idx(ty)].keys() {
            if !mesh.by_type[idx(ty)].contains_key(name) {
                changed[idx(ty)].insert(Arc::from(name.as_str()));
            }
        }
    }
    let sidecar: BTreeSet<Arc<str>> = mesh.by_type[idx(XdsType::Listener)]
        .keys()
        .map(|n| Arc::from(n.as_str()))
        .collect();
    let prev_sidecar: BTreeSet<&String> = prev.by_type[idx(XdsType::Listener)].keys().collect();
    let roles_changed = prev_sidecar != mesh.by_type[idx(XdsType::Listener)].keys().collect();
    resources.roles = RoleListeners {
        sidecar,
        ..Default::default()
    };
    Snapshot::after(before, resources, changed, roles_changed, None)
}

// ---- the client ----------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum MeshOp {
    UpsertCluster(usize),
    RemoveCluster(usize),
    Endpoints(usize),
    Route(usize, u8),
    Listener(usize),
    RemoveListener(usize),
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Mesh(MeshOp),
    /// The client handles its next response.
    Deliver,
    Hold(bool),
    /// The client's stream breaks and it connects again, holding what it held.
    Reconnect,
}

fn mesh_op() -> impl Strategy<Value = MeshOp> {
    prop_oneof![
        3 => (0..CLUSTERS).prop_map(MeshOp::UpsertCluster),
        2 => (0..CLUSTERS).prop_map(MeshOp::RemoveCluster),
        4 => (0..CLUSTERS).prop_map(MeshOp::Endpoints),
        3 => (0..LISTENERS, any::<u8>()).prop_map(|(r, m)| MeshOp::Route(r, m)),
        1 => (0..LISTENERS).prop_map(MeshOp::Listener),
        1 => (0..LISTENERS).prop_map(MeshOp::RemoveListener),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => mesh_op().prop_map(Op::Mesh),
        8 => Just(Op::Deliver),
        1 => any::<bool>().prop_map(Op::Hold),
        1 => Just(Op::Reconnect),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    delta: bool,
    /// Rejects a response with an invalid resource outright (Envoy when a resource
    /// fails validation while decoding) instead of applying the valid ones.
    whole: bool,
    /// Which (name, version) pairs the client finds invalid: hash % modulus == 0.
    seed: u64,
    modulus: u64,
    initial: Vec<MeshOp>,
    ops: Vec<Op>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
        prop_oneof![Just(0u64), 3u64..9],
        prop::collection::vec(mesh_op(), 0..8),
        prop::collection::vec(op(), 1..60),
    )
        .prop_map(|(delta, whole, seed, modulus, initial, ops)| Case {
            delta,
            whole,
            seed,
            modulus,
            initial,
            ops,
        })
}

struct Client {
    delta: bool,
    whole: bool,
    seed: u64,
    modulus: u64,
    /// What the client holds, per type.
    held: [BTreeMap<String, Res>; 4],
    /// SotW: the version of the last accepted response per type.
    accepted_version: [String; 4],
    /// Explicit subscriptions (EDS: the clusters held; RDS: the routes the held
    /// listeners name).
    subscribed: [BTreeSet<String>; 4],
    /// Versions the client rejected, and whether the mesh changed that resource
    /// since (after which the version may legitimately come again).
    rejected: HashMap<(usize, String), (u32, bool)>,
    clusters_ever_rejected: HashSet<String>,
}

impl Client {
    fn invalid(&self, ty: XdsType, name: &str, version: u32) -> bool {
        // Routes are always valid: a rejected route switch keeps naming an old
        // cluster by design, which the make-before-break check would flag.
        if self.modulus == 0 || ty == XdsType::Route {
            return false;
        }
        let mut h = self.seed ^ (version as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h.is_multiple_of(self.modulus)
    }
}

fn nack_status(message: String) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: 3,
        message,
        details: vec![],
    })
}

struct Harness {
    state: StreamState,
    client: Client,
    mesh: Mesh,
    history: BTreeMap<u64, Mesh>,
    snap: Arc<Snapshot>,
    hold: bool,
    /// Responses sent and not yet handled by the client, with the hold at send time.
    queue: VecDeque<(XdsType, Outgoing, bool)>,
    /// Types the client has sent a request of.
    sent_types: HashSet<usize>,
    /// What the client held when its current stream started.
    inherited: HashSet<(usize, String)>,
    /// The current stream is not the client's first.
    reconnected: bool,
    /// What the client held at the start of any of its streams.
    ever_inherited: HashSet<(usize, String)>,
    /// What it held at the start of this one that the hub cannot know about.
    unknowable: HashSet<(usize, String)>,
}

impl Harness {
    fn stream(delta: bool) -> StreamState {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let status = Arc::new(Mutex::new(ClientStatus {
            node_id: "fuzz".into(),
            cluster: String::new(),
            environment: "prod".into(),
            environment_served: true,
            role: "sidecar".into(),
            protocol: if delta { "delta" } else { "sotw" },
            peer: None,
            connected_at_unix: 0.0,
            types: BTreeMap::new(),
        }));
        let node = NodeInfo {
            id: "fuzz".into(),
            cluster: String::new(),
            environment: "prod".into(),
            role: Role::Sidecar,
            scope: None,
            namespace: None,
            service_account: None,
        };
        StreamState::new(node, !delta, StreamLimits::default(), status, metrics)
    }

    fn new(c: &Case) -> Self {
        let state = Self::stream(c.delta);
        let mut mesh = Mesh::default();
        for op in &c.initial {
            mesh.apply(op);
        }
        let snap = Arc::new(snapshot(&Snapshot::empty("prod"), &mesh, &Mesh::default()));
        let mut history = BTreeMap::new();
        history.insert(1, mesh.clone());
        Harness {
            state,
            client: Client {
                delta: c.delta,
                whole: c.whole,
                seed: c.seed,
                modulus: c.modulus,
                held: Default::default(),
                accepted_version: Default::default(),
                subscribed: Default::default(),
                rejected: HashMap::new(),
                clusters_ever_rejected: HashSet::new(),
            },
            mesh,
            history,
            snap,
            hold: false,
            queue: VecDeque::new(),
            sent_types: HashSet::new(),
            inherited: HashSet::new(),
            reconnected: false,
            ever_inherited: HashSet::new(),
            unknowable: HashSet::new(),
        }
    }

    fn pump(&mut self) {
        for _ in 0..2 {
            for ty in XdsType::ALL {
                if self.state.gated(ty, &self.snap) {
                    continue;
                }
                if let Some(out) = self.state.build(ty, &self.snap, self.hold) {
                    if std::env::var_os("TRIBUTARY_FUZZ_TRACE").is_some() {
                        eprintln!(
                            "  built {ty:?} seq {} nonce {} ({} resources)",
                            out.version,
                            out.nonce,
                            out.resources.len()
                        );
                    }
                    self.queue.push_back((ty, out, self.hold));
                }
            }
        }
    }

    fn send(&mut self, ty: XdsType, req: Req) -> Result<(), TestCaseError> {
        self.apply(ty, req)?;
        self.pump();
        Ok(())
    }

    /// Applies a request without pumping (requests that arrive together).
    fn apply(&mut self, ty: XdsType, req: Req) -> Result<(), TestCaseError> {
        if std::env::var_os("TRIBUTARY_FUZZ_TRACE").is_some() {
            match &req {
                Req::Sotw(r) => eprintln!(
                    "  request {ty:?} names {:?} nonce {:?} nack {}",
                    r.resource_names,
                    r.response_nonce,
                    r.error_detail.is_some()
                ),
                Req::Delta(r) => eprintln!(
                    "  request {ty:?} +{:?} -{:?} nonce {:?} nack {}",
                    r.resource_names_subscribe,
                    r.resource_names_unsubscribe,
                    r.response_nonce,
                    r.error_detail.is_some()
                ),
            }
        }
        let r = match req {
            Req::Sotw(r) => self.state.sotw_request(&r, ty),
            Req::Delta(r) => self.state.delta_request(r, ty),
        };
        prop_assert!(r.is_ok(), "request refused: {r:?}");
        self.sent_types.insert(idx(ty));
        Ok(())
    }

    fn start(&mut self) -> Result<(), TestCaseError> {
        // Envoy's start: CDS and LDS wildcard.
        for ty in [XdsType::Cluster, XdsType::Listener] {
            let req = if self.client.delta {
                Req::Delta(DeltaDiscoveryRequest {
                    type_url: ty.type_url().into(),
                    ..Default::default()
                })
            } else {
                Req::Sotw(DiscoveryRequest {
                    type_url: ty.type_url().into(),
                    ..Default::default()
                })
            };
            self.send(ty, req)?;
        }
        Ok(())
    }

    /// A new stream: the client asks for what it asked for before, telling the hub
    /// what it holds (Delta: each version; SotW: the last accepted version).
    fn reconnect(&mut self) -> Result<(), TestCaseError> {
        self.state = Self::stream(self.client.delta);
        self.queue.clear();
        self.sent_types.clear();
        self.reconnected = true;
        let now_held: Vec<(usize, String)> = ALL
            .iter()
            .flat_map(|ty| {
                self.client.held[idx(*ty)]
                    .keys()
                    .map(|n| (idx(*ty), n.clone()))
            })
            .collect();
        self.inherited = now_held.iter().cloned().collect();
        self.ever_inherited.extend(now_held.iter().cloned());
        // A SotW client whose every response of a type was NACKed asks with an empty
        // version, like a new client: the hub cannot know what it applied.
        self.unknowable = now_held
            .into_iter()
            .filter(|(t, _)| !self.client.delta && self.client.accepted_version[*t].is_empty())
            .collect();
        // What a stream remembers of rejections dies with it; the client rejects
        // those versions again if it is sent them again.
        self.client.rejected.clear();
        for ty in [
            XdsType::Cluster,
            XdsType::Listener,
            XdsType::Endpoint,
            XdsType::Route,
        ] {
            let t = idx(ty);
            let wildcard = ty.sotw_full_state();
            if !wildcard && self.client.subscribed[t].is_empty() {
                continue;
            }
            let names: Vec<String> = self.client.subscribed[t].iter().cloned().collect();
            let req = if self.client.delta {
                Req::Delta(DeltaDiscoveryRequest {
                    type_url: ty.type_url().into(),
                    resource_names_subscribe: if wildcard { Vec::new() } else { names },
                    initial_resource_versions: self.client.held[t]
                        .iter()
                        .map(|(n, r)| (n.clone(), format!("{:016x}", r.version)))
                        .collect(),
                    ..Default::default()
                })
            } else {
                Req::Sotw(DiscoveryRequest {
                    type_url: ty.type_url().into(),
                    version_info: self.client.accepted_version[t].clone(),
                    resource_names: if wildcard { Vec::new() } else { names },
                    ..Default::default()
                })
            };
            // Envoy sends these in one burst when its stream is up again; the hub
            // reads what has arrived before it answers.
            self.apply(ty, req)?;
        }
        self.pump();
        Ok(())
    }

    fn mesh_change(&mut self, op: &MeshOp) {
        if std::env::var_os("TRIBUTARY_FUZZ_TRACE").is_some() {
            eprintln!("mesh {op:?}");
        }
        let prev = self.mesh.clone();
        self.mesh.apply(op);
        if self.mesh == prev {
            return;
        }
        // A resource the client rejected changed: its rejected version may come again.
        for ((t, name), (v, changed)) in self.client.rejected.iter_mut() {
            let now = self.mesh.by_type[*t].get(name).map(|r| r.version);
            if now != Some(*v) {
                *changed = true;
            }
        }
        self.snap = Arc::new(snapshot(&self.snap, &self.mesh, &prev));
        let seq = self.snap.seq;
        self.history.insert(seq, self.mesh.clone());
        self.pump();
    }

    fn set_hold(&mut self, hold: bool) {
        if self.hold == hold {
            return;
        }
        self.hold = hold;
        if !hold {
            self.state.reconcile_all();
        }
        self.pump();
    }

    /// The client handles its next response: checks it, applies it, updates its
    /// subscriptions, and ACKs or NACKs.
    fn deliver(&mut self) -> Result<bool, TestCaseError> {
        let Some((ty, out, hold)) = self.queue.pop_front() else {
            return Ok(false);
        };
        let seq: u64 = out.version.parse().unwrap();
        let truth = self.history[&seq].clone();
        let t = idx(ty);
        let full_set = !self.client.delta && ty.sotw_full_state();
        let got: Vec<(String, Res)> = out.resources.iter().map(decode).collect();
        if std::env::var_os("TRIBUTARY_FUZZ_TRACE").is_some() {
            let shown: Vec<String> = got
                .iter()
                .map(|(n, r)| format!("{n}@{}", r.version))
                .collect();
            eprintln!(
                "deliver {ty:?} seq {seq} hold {hold}: {shown:?} removed {:?}",
                out.removed
            );
        }

        // Never a rejected version again, until the resource changed.
        for (name, r) in &got {
            if let Some((v, changed)) = self.client.rejected.get(&(t, name.clone())) {
                prop_assert!(
                    *changed || *v != r.version,
                    "{ty:?} {name} v{} sent again after the client rejected it",
                    r.version
                );
            }
        }
        // A full set carries every visible resource (less what the client rejected
        // and never had), and during the hold everything the client holds.
        if full_set {
            let names: HashSet<&String> = got.iter().map(|(n, _)| n).collect();
            for (name, r) in &truth.by_type[t] {
                // (A SotW client that reconnected holding a version the hub cannot
                // name, and rejects the current one, loses it: a documented limit.)
                let rejected_never_held = self
                    .client
                    .rejected
                    .get(&(t, name.clone()))
                    .is_some_and(|(v, _)| *v == r.version)
                    && (!self.client.held[t].contains_key(name)
                        || self.inherited.contains(&(t, name.clone())));
                prop_assert!(
                    names.contains(name) || rejected_never_held,
                    "{ty:?} full set of seq {seq} lacks {name}"
                );
            }
            if hold {
                for name in self.client.held[t].keys() {
                    if self.unknowable.contains(&(t, name.clone())) {
                        continue;
                    }
                    prop_assert!(
                        names.contains(name),
                        "{ty:?} full set during the hold lacks held {name}"
                    );
                }
            }
        }
        if hold {
            prop_assert!(
                out.removed.is_empty(),
                "removal during the hold: {:?}",
                out.removed
            );
        }

        // Apply, as Envoy does.
        let invalid: Vec<&String> = got
            .iter()
            .filter(|(n, _)| ty.sotw_full_state() || self.client.subscribed[t].contains(n))
            .filter(|(n, r)| self.client.invalid(ty, n, r.version))
            .map(|(n, _)| n)
            .collect();
        let nack = !invalid.is_empty();
        let apply_valid = !nack || !self.client.whole;
        if apply_valid {
            let mut next = if full_set {
                BTreeMap::new()
            } else {
                self.client.held[t].clone()
            };
            for (name, r) in &got {
                if !ty.sotw_full_state() && !self.client.subscribed[t].contains(name) {
                    // A response built before an unsubscribe: ignored, as Envoy does.
                    continue;
                }
                if invalid.contains(&name) {
                    if let Some(old) = self.client.held[t].get(name) {
                        next.insert(name.clone(), old.clone());
                    }
                } else {
                    next.insert(name.clone(), r.clone());
                }
            }
            for name in &out.removed {
                next.remove(&**name);
            }
            self.client.held[t] = next;
        }
        for name in &invalid {
            let v = got.iter().find(|(n, _)| n == *name).unwrap().1.version;
            self.client
                .rejected
                .insert((t, (*name).clone()), (v, false));
            if ty == XdsType::Cluster {
                self.client.clusters_ever_rejected.insert((*name).clone());
            }
        }
        self.check_make_before_break()?;

        // Follow the clusters and listeners held with EDS and RDS subscriptions
        // (Envoy sends these before it answers the response).
        let follow = match ty {
            XdsType::Cluster => Some((
                XdsType::Endpoint,
                self.client.held[t].keys().cloned().collect::<BTreeSet<_>>(),
            )),
            XdsType::Listener => Some((
                XdsType::Route,
                self.client.held[t]
                    .keys()
                    .map(|l| l.trim_start_matches("0.0.0.0_").to_string())
                    .collect(),
            )),
            _ => None,
        };
        if let Some((fty, names)) = follow {
            self.subscribe(fty, names)?;
        }

        // ACK or NACK.
        let message = (!invalid.is_empty()).then(|| {
            let parts: Vec<String> = invalid.iter().map(|n| format!("{n}: invalid")).collect();
            format!("Error adding/updating resource(s) {}", parts.join(", "))
        });
        if message.is_none() {
            self.client.accepted_version[t] = out.version.clone();
        }
        let req = if self.client.delta {
            Req::Delta(DeltaDiscoveryRequest {
                type_url: ty.type_url().into(),
                response_nonce: out.nonce.clone(),
                error_detail: message.and_then(nack_status),
                ..Default::default()
            })
        } else {
            Req::Sotw(DiscoveryRequest {
                type_url: ty.type_url().into(),
                version_info: self.client.accepted_version[t].clone(),
                resource_names: self.client.subscribed[t].iter().cloned().collect(),
                response_nonce: out.nonce.clone(),
                error_detail: message.and_then(nack_status),
                ..Default::default()
            })
        };
        self.send(ty, req)?;
        Ok(true)
    }

    fn subscribe(&mut self, ty: XdsType, names: BTreeSet<String>) -> Result<(), TestCaseError> {
        let t = idx(ty);
        let first = !self.state_has(ty);
        if names == self.client.subscribed[t] && !first {
            return Ok(());
        }
        if first && names.is_empty() && self.client.delta {
            // A first Delta request naming nothing would subscribe to everything.
            return Ok(());
        }
        let old = std::mem::replace(&mut self.client.subscribed[t], names.clone());
        // The client forgets what it no longer asks for.
        self.client.held[t].retain(|n, _| names.contains(n));
        let req = if self.client.delta {
            Req::Delta(DeltaDiscoveryRequest {
                type_url: ty.type_url().into(),
                resource_names_subscribe: names.difference(&old).cloned().collect(),
                resource_names_unsubscribe: old.difference(&names).cloned().collect(),
                ..Default::default()
            })
        } else {
            Req::Sotw(DiscoveryRequest {
                type_url: ty.type_url().into(),
                version_info: self.client.accepted_version[t].clone(),
                resource_names: names.iter().cloned().collect(),
                ..Default::default()
            })
        };
        self.send(ty, req)
    }

    fn state_has(&self, ty: XdsType) -> bool {
        self.sent_types.contains(&idx(ty))
    }

    /// Make-before-break: every cluster a held route names is held, unless the
    /// client rejected that cluster at some point. (A SotW client that reconnects
    /// holding a cluster the hub no longer has loses it with the first full set:
    /// the hub cannot name it, let alone serve it.)
    fn check_make_before_break(&self) -> Result<(), TestCaseError> {
        for (rname, r) in &self.client.held[idx(XdsType::Route)] {
            for c in &r.refs {
                if self.client.clusters_ever_rejected.contains(c) {
                    continue;
                }
                if !self.client.delta
                    && self
                        .ever_inherited
                        .contains(&(idx(XdsType::Cluster), c.clone()))
                {
                    continue;
                }
                prop_assert!(
                    self.client.held[idx(XdsType::Cluster)].contains_key(c),
                    "route {rname} (v{}) names {c}, which the client does not hold",
                    r.version
                );
            }
        }
        Ok(())
    }

    /// The mesh stops changing, the hold ends, and the client handles everything:
    /// it must end holding the model's answer.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        self.set_hold(false);
        let mut steps = 0;
        while self.deliver()? {
            steps += 1;
            prop_assert!(steps < 500, "no quiescence after 500 responses");
        }
        let truth = &self.mesh;
        for ty in ALL {
            let t = idx(ty);
            let visible: BTreeSet<&String> = match ty {
                XdsType::Cluster | XdsType::Listener => truth.by_type[t].keys().collect(),
                _ => truth.by_type[t]
                    .keys()
                    .filter(|n| self.client.subscribed[t].contains(*n))
                    .collect(),
            };
            for name in &visible {
                let want = truth.by_type[t][*name].version;
                let rejected = self
                    .client
                    .rejected
                    .get(&(t, (*name).clone()))
                    .is_some_and(|(v, _)| *v == want);
                let have = self.client.held[t].get(*name).map(|r| r.version);
                if rejected {
                    prop_assert!(
                        have != Some(want),
                        "{ty:?} {name}: holds a version it rejected"
                    );
                } else {
                    prop_assert_eq!(have, Some(want), "{:?} {} at the end", ty, name);
                }
            }
            let sotw_partial = !self.client.delta && !ty.sotw_full_state();
            if !sotw_partial {
                for name in self.client.held[t].keys() {
                    prop_assert!(
                        visible.contains(name),
                        "{ty:?} {name}: still held though the mesh no longer has it"
                    );
                }
            }
        }
        Ok(())
    }
}

enum Req {
    Sotw(DiscoveryRequest),
    Delta(DeltaDiscoveryRequest),
}

fn run(c: Case) -> Result<(), TestCaseError> {
    let mut h = Harness::new(&c);
    h.start()?;
    for op in &c.ops {
        match op {
            Op::Mesh(m) => h.mesh_change(m),
            Op::Deliver => {
                h.deliver()?;
            }
            Op::Hold(on) => h.set_hold(*on),
            Op::Reconnect => h.reconnect()?,
        }
    }
    h.settle()
}

#[test]
fn fuzz_xds_streams_against_a_client_model() {
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    runner.run(&case(), run).unwrap_or_else(|e| panic!("{e}"));
}

/// Found by the fuzzer: a warming cluster whose load assignment the client rejected held routes back forever.
#[test]
fn found_1() {
    run(Case {
        delta: false,
        whole: false,
        seed: 1008805521474473792,
        modulus: 4,
        initial: vec![MeshOp::Route(0, 11)],
        ops: vec![Op::Deliver, Op::Mesh(MeshOp::UpsertCluster(0))],
    })
    .unwrap();
}

/// Found by the fuzzer: a response in flight across an unsubscribe made the hub think the client held it.
#[test]
fn found_2() {
    use MeshOp::*;
    run(Case {
        delta: false,
        whole: false,
        seed: 2282763335452498767,
        modulus: 0,
        initial: vec![],
        ops: vec![
            Op::Mesh(Listener(0)),
            Op::Deliver,
            Op::Mesh(Route(0, 156)),
            Op::Mesh(RemoveListener(0)),
            Op::Mesh(UpsertCluster(2)),
            Op::Deliver,
            Op::Deliver,
            Op::Deliver,
            Op::Deliver,
            Op::Mesh(RemoveCluster(2)),
        ],
    })
    .unwrap();
}

/// Found by the fuzzer: an uncertain cluster had no bytes to keep serving during the withdrawal hold.
#[test]
fn found_3() {
    use MeshOp::*;
    run(Case {
        delta: false,
        whole: false,
        seed: 2120592342912164645,
        modulus: 3,
        initial: vec![],
        ops: vec![
            Op::Mesh(UpsertCluster(2)),
            Op::Mesh(RemoveCluster(2)),
            Op::Deliver,
            Op::Mesh(Route(0, 237)),
            Op::Mesh(RemoveCluster(3)),
            Op::Hold(true),
            Op::Deliver,
            Op::Deliver,
        ],
    })
    .unwrap();
}

/// Found by the fuzzer: a full set after a NACK left out a cluster the client held.
#[test]
fn found_4() {
    use MeshOp::*;
    run(Case {
        delta: false,
        whole: false,
        seed: 3562919034147902201,
        modulus: 7,
        initial: vec![],
        ops: vec![
            Op::Mesh(Route(1, 208)),
            Op::Mesh(Route(0, 163)),
            Op::Deliver,
            Op::Mesh(Route(0, 244)),
            Op::Mesh(RemoveCluster(4)),
            Op::Mesh(Route(0, 16)),
        ],
    })
    .unwrap();
}

/// Found by the fuzzer: Delta reconnect: a warming cluster whose endpoints the client already held.
#[test]
fn found_5() {
    use MeshOp::*;
    run(Case {
        delta: true,
        whole: false,
        seed: 2485454376154524087,
        modulus: 0,
        initial: vec![],
        ops: vec![
            Op::Mesh(Route(0, 116)),
            Op::Deliver,
            Op::Deliver,
            Op::Deliver,
            Op::Mesh(UpsertCluster(2)),
            Op::Reconnect,
        ],
    })
    .unwrap();
}

/// Found by the fuzzer: SotW reconnect during the hold: routes went out while the full CDS set was withheld.
#[test]
fn found_6() {
    use MeshOp::*;
    run(Case {
        delta: false,
        whole: false,
        seed: 0,
        modulus: 0,
        initial: vec![Route(0, 0), UpsertCluster(0)],
        ops: vec![
            Op::Hold(true),
            Op::Mesh(UpsertCluster(0)),
            Op::Deliver,
            Op::Reconnect,
            Op::Deliver,
            Op::Deliver,
            Op::Mesh(Route(0, 2)),
            Op::Mesh(UpsertCluster(0)),
            Op::Deliver,
        ],
    })
    .unwrap();
}

/// Found by the fuzzer: reconnect and NACK: the resend left out a cluster the client held.
#[test]
fn found_7() {
    use MeshOp::*;
    run(Case {
        delta: false,
        whole: false,
        seed: 6114495177067230353,
        modulus: 4,
        initial: vec![],
        ops: vec![
            Op::Mesh(Route(1, 80)),
            Op::Mesh(UpsertCluster(4)),
            Op::Mesh(UpsertCluster(4)),
            Op::Mesh(Endpoints(4)),
            Op::Mesh(Route(1, 59)),
            Op::Deliver,
            Op::Mesh(UpsertCluster(4)),
            Op::Deliver,
            Op::Reconnect,
        ],
    })
    .unwrap();
}

/// Found by the fuzzer: a rejected version served again to a reconnected client: a NACK loop.
#[test]
fn found_8() {
    use MeshOp::*;
    run(Case {
        delta: false,
        whole: false,
        seed: 69932111737174213,
        modulus: 3,
        initial: vec![],
        ops: vec![
            Op::Mesh(UpsertCluster(0)),
            Op::Mesh(Route(0, 6)),
            Op::Deliver,
            Op::Reconnect,
        ],
    })
    .unwrap();
}

/// Found by the fuzzer: a SotW client whose responses were all NACKed reconnects during the hold.
#[test]
fn found_9() {
    use MeshOp::*;
    run(Case {
        delta: false,
        whole: false,
        seed: 2552843464045564197,
        modulus: 3,
        initial: vec![UpsertCluster(1), Route(0, 29)],
        ops: vec![
            Op::Mesh(RemoveCluster(0)),
            Op::Hold(true),
            Op::Deliver,
            Op::Reconnect,
        ],
    })
    .unwrap();
}

/// Found by the fuzzer: whole-response rejection of a listener update.
#[test]
fn found_10() {
    use MeshOp::*;
    run(Case {
        delta: false,
        whole: true,
        seed: 14891544286269501847,
        modulus: 5,
        initial: vec![],
        ops: vec![
            Op::Mesh(Route(0, 112)),
            Op::Deliver,
            Op::Deliver,
            Op::Mesh(Listener(0)),
            Op::Mesh(RemoveListener(0)),
            Op::Mesh(Endpoints(4)),
            Op::Deliver,
            Op::Mesh(Endpoints(0)),
            Op::Mesh(Endpoints(0)),
            Op::Deliver,
        ],
    })
    .unwrap();
}

/// Found by the fuzzer: whole-response rejection of the first full set of a reconnected stream.
#[test]
fn found_11() {
    use MeshOp::*;
    run(Case {
        delta: false,
        whole: true,
        seed: 7394092541406859008,
        modulus: 3,
        initial: vec![UpsertCluster(2), UpsertCluster(0), Listener(1)],
        ops: vec![
            Op::Mesh(Route(0, 26)),
            Op::Deliver,
            Op::Deliver,
            Op::Deliver,
            Op::Deliver,
            Op::Deliver,
            Op::Deliver,
            Op::Mesh(RemoveListener(1)),
            Op::Reconnect,
        ],
    })
    .unwrap();
}

/// Found by the fuzzer: a resend after a NACK counted as applied though rejected whole again.
#[test]
fn found_12() {
    use MeshOp::*;
    run(Case {
        delta: false,
        whole: true,
        seed: 7110362685857796330,
        modulus: 8,
        initial: vec![UpsertCluster(1), UpsertCluster(2), UpsertCluster(4)],
        ops: vec![
            Op::Mesh(Route(0, 30)),
            Op::Mesh(RemoveCluster(0)),
            Op::Deliver,
            Op::Mesh(RemoveCluster(0)),
            Op::Mesh(RemoveCluster(0)),
        ],
    })
    .unwrap();
}

/// Found by the fuzzer: a rejection forgotten when the client unsubscribed and subscribed again.
#[test]
fn found_13() {
    use MeshOp::*;
    run(Case {
        delta: false,
        whole: false,
        seed: 50408759011913065,
        modulus: 5,
        initial: vec![Route(1, 166), Listener(1)],
        ops: vec![
            Op::Mesh(UpsertCluster(0)),
            Op::Deliver,
            Op::Mesh(RemoveCluster(1)),
            Op::Mesh(UpsertCluster(1)),
            Op::Reconnect,
            Op::Deliver,
            Op::Mesh(UpsertCluster(1)),
        ],
    })
    .unwrap();
}

/// Found by the fuzzer: a NACKed first full set of a stream whose set the hub could not know.
#[test]
fn found_14() {
    use MeshOp::*;
    run(Case {
        delta: false,
        whole: false,
        seed: 11429122583839971895,
        modulus: 5,
        initial: vec![
            Route(0, 222),
            Listener(0),
            Endpoints(1),
            Endpoints(1),
            Route(1, 188),
            RemoveCluster(3),
        ],
        ops: vec![
            Op::Mesh(UpsertCluster(1)),
            Op::Mesh(Endpoints(1)),
            Op::Mesh(UpsertCluster(4)),
            Op::Mesh(UpsertCluster(2)),
            Op::Deliver,
            Op::Reconnect,
            Op::Mesh(RemoveCluster(2)),
        ],
    })
    .unwrap();
}
