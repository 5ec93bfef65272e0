//! Simulated xDS clients that behave like Envoy's: thousands in one process, Delta or
//! SotW, one connection each (as Envoy opens one per proxy).
//!
//! Each follows Envoy's sequence on an ADS stream: CDS wildcard (a sidecar's is scoped
//! by its node's `tributary.io/sidecar`), then EDS by the names in the EDS clusters it
//! received; once those clusters are warm (each has its load assignment), LDS
//! wildcard, then RDS by the route names in the listeners' HTTP connection managers.
//! Later CDS and LDS responses change the EDS and RDS subscriptions the same way.
//! Every response is ACKed.
//!
//! A client keeps, per type, the name, version and body of everything it holds
//! (bodies are interned: a body many clients hold is stored once), so that the
//! harness can check the final content against the model. When a response carries a
//! change the harness waits for, the client records the time from the injection to
//! its ACK.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tributary_controlplane::identity::tls::TlsConnector;
use tributary_proto::envoy::envoy::config::cluster::v3::Cluster;
use tributary_proto::envoy::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType,
};
use tributary_proto::envoy::envoy::config::core::v3::{Locality, Node};
use tributary_proto::envoy::envoy::config::listener::v3::Listener;
use tributary_proto::envoy::envoy::config::listener::v3::filter::ConfigType;
use tributary_proto::envoy::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use tributary_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tributary_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest,
};
use tributary_proto::envoy::google::protobuf::{Struct, Value, value::Kind};
use tributary_proto::type_url::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

/// Type slots of [`Holdings`], in Envoy's order of initialization.
pub const CDS: usize = 0;
pub const EDS: usize = 1;
pub const LDS: usize = 2;
pub const RDS: usize = 3;
pub const TYPE_URLS: [&str; 4] = [CLUSTER, ENDPOINT, LISTENER, ROUTE];

fn slot(type_url: &str) -> Option<usize> {
    TYPE_URLS.iter().position(|t| *t == type_url)
}

/// What one simulated proxy is.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Index into [`Shared::holdings`].
    pub index: usize,
    pub id: String,
    pub delta: bool,
    pub gateway: bool,
    /// The sidecar scope named in the node metadata (sidecars only).
    pub scope: Option<String>,
    /// The environment named in the node metadata (`tributary.io/env`).
    pub env: &'static str,
    /// The zone named in the node's locality (sharded scenarios: the router routes by
    /// environment and zone); `None` leaves the locality unset.
    pub zone: Option<String>,
    /// The shard whose replicas serve it (sharded scenarios).
    pub shard: Option<crate::scenario::ShardIx>,
    /// Clusters and listeners the client holds once initially synced (from the model).
    pub expect_cds: usize,
    pub expect_lds: usize,
}

/// The change a round waits for in one load assignment.
#[derive(Debug, Clone)]
pub struct Expect {
    pub phase: u64,
    pub address: String,
    /// The address it replaced: must be gone from the same response.
    pub old: String,
}

/// A config change (services added): every client's route tables name a new host
/// (a scoped sidecar: the one its scope declares; other clients: the last added of
/// their environment); gateways also hold the new clusters and their load assignments
/// (of their environment).
#[derive(Debug, Clone, Default)]
pub struct ConfigExpect {
    pub phase: u64,
    /// Per environment: the new clusters (and load assignments).
    pub names: HashMap<&'static str, HashSet<String>>,
    /// Per environment: the last added host.
    pub host: HashMap<&'static str, String>,
    /// Per sidecar scope, the new host its route tables must name.
    pub scope_hosts: HashMap<String, String>,
}

impl ConfigExpect {
    /// The new host `spec`'s route tables must name.
    pub fn host_for(&self, spec: &Spec) -> &str {
        let env_host = self.host.get(spec.env).map_or("", String::as_str);
        match (&spec.scope, spec.gateway) {
            (Some(scope), false) => self.scope_hosts.get(scope).map_or(env_host, String::as_str),
            _ => env_host,
        }
    }

    /// The new clusters a gateway of `spec`'s environment must hold.
    pub fn names_for(&self, spec: &Spec) -> impl Iterator<Item = &String> {
        self.names.get(spec.env).into_iter().flatten()
    }
}

/// One client's convergence sample: injection → its ACK of a response holding the change.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub client: u32,
    pub ms: f64,
}

/// What a client holds of one resource: its body (interned).
#[derive(Debug, Clone)]
pub struct Held {
    pub body: Bytes,
}

/// What a client holds, per type slot.
#[derive(Debug, Default)]
pub struct Holdings {
    pub by_type: [HashMap<String, Held>; 4],
}

#[derive(Debug)]
pub struct Shared {
    pub phase: AtomicU64,
    pub t0: Mutex<Option<Instant>>,
    pub expected: RwLock<HashMap<String, Expect>>,
    pub config: RwLock<Option<ConfigExpect>>,
    pub samples: Mutex<Vec<Sample>>,
    pub pending: AtomicUsize,
    pub done: Notify,
    pub synced: AtomicUsize,
    /// When the last client got its first connection (TCP, and TLS with `--mtls`).
    pub last_connected: Mutex<Option<Instant>>,
    pub bytes: AtomicU64,
    pub messages: AtomicU64,
    pub errors: AtomicUsize,
    /// Connections or streams that failed before their first response and were retried.
    pub reconnects: AtomicUsize,
    /// Load assignments that held the new address and still the old one.
    pub stale_at_sample: AtomicUsize,
    /// Per client (by [`Spec::index`]).
    pub holdings: Vec<Mutex<Holdings>>,
    /// Every distinct body received, so that a body thousands of clients hold is
    /// stored once (the content check compares them all at the end).
    bodies: Mutex<HashSet<Bytes, foldhash::fast::FixedState>>,
}

impl Shared {
    pub fn new(clients: usize) -> Self {
        Shared {
            phase: AtomicU64::new(0),
            t0: Mutex::new(None),
            expected: RwLock::default(),
            config: RwLock::default(),
            samples: Mutex::default(),
            pending: AtomicUsize::new(0),
            done: Notify::new(),
            synced: AtomicUsize::new(0),
            last_connected: Mutex::new(None),
            bytes: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            errors: AtomicUsize::new(0),
            reconnects: AtomicUsize::new(0),
            stale_at_sample: AtomicUsize::new(0),
            holdings: (0..clients).map(|_| Mutex::default()).collect(),
            bodies: Mutex::new(HashSet::with_hasher(foldhash::fast::FixedState::with_seed(
                0,
            ))),
        }
    }

    /// A client's first connection is up.
    fn first_connection(&self) {
        let mut last = self.last_connected.lock().unwrap();
        *last = Some(Instant::now());
    }

    fn sample(&self, client: usize) {
        let t0 = *self.t0.lock().unwrap();
        if let Some(t0) = t0 {
            self.samples.lock().unwrap().push(Sample {
                client: client as u32,
                ms: t0.elapsed().as_secs_f64() * 1000.0,
            });
        }
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_waiters();
        }
    }

    /// The stored copy of `body` (the same allocation for every client holding it).
    fn intern(&self, body: Vec<u8>) -> Bytes {
        let body = Bytes::from(body);
        let mut set = self.bodies.lock().unwrap();
        if let Some(b) = set.get(&body) {
            return b.clone();
        }
        set.insert(body.clone());
        body
    }
}

fn node(spec: &Spec) -> Node {
    let mut fields = HashMap::new();
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.into())),
    };
    fields.insert("tributary.io/env".to_string(), s(spec.env));
    if spec.gateway {
        fields.insert(
            "tributary.io/gateway".to_string(),
            s(crate::scenario::GATEWAY),
        );
    }
    if let Some(scope) = &spec.scope {
        fields.insert("tributary.io/sidecar".to_string(), s(scope));
    }
    Node {
        id: spec.id.clone(),
        cluster: "loadtest".into(),
        metadata: Some(Struct { fields }),
        locality: spec.zone.as_ref().map(|z| Locality {
            region: crate::scenario::REGION.into(),
            zone: z.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether an encoded message has a length-delimited field `field` equal to `value`:
/// the field's key, the length as a varint and the bytes (the length prefix rules out
/// a longer string that merely starts with `value`). For a ClusterLoadAssignment,
/// field 2 is `SocketAddress.address`; for a RouteConfiguration, field 2 is
/// `VirtualHost.domains`. Checked against a full decode in the tests below.
pub fn contains_field(body: &[u8], field: u32, value: &str) -> bool {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let a = value.as_bytes();
    let mut needle = Vec::with_capacity(a.len() + 6);
    encode_key(field, WireType::LengthDelimited, &mut needle);
    encode_varint(a.len() as u64, &mut needle);
    needle.extend_from_slice(a);
    memchr::memmem::find(body, &needle).is_some()
}

pub fn contains_address(body: &[u8], address: &str) -> bool {
    contains_field(body, 2, address)
}

/// The load assignment an EDS cluster asks for (`None`: not an EDS cluster).
pub fn eds_name(cluster: &Cluster) -> Option<String> {
    let eds = matches!(
        cluster.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32
    );
    eds.then(|| {
        cluster
            .eds_cluster_config
            .as_ref()
            .map(|c| c.service_name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| cluster.name.clone())
    })
}

/// The route tables a listener's HTTP connection managers ask for over RDS.
pub fn rds_names(listener: &Listener) -> Vec<String> {
    listener
        .filter_chains
        .iter()
        .flat_map(|c| &c.filters)
        .filter_map(|f| match &f.config_type {
            Some(ConfigType::TypedConfig(any)) => HttpConnectionManager::decode(&any.value[..])
                .ok()
                .and_then(|hcm| match hcm.route_specifier {
                    Some(RouteSpecifier::Rds(rds)) => Some(rds.route_config_name),
                    _ => None,
                }),
            _ => None,
        })
        .collect()
}

/// The name of a Cluster, ClusterLoadAssignment (`cluster_name`), Listener or
/// RouteConfiguration: field 1 of each. Decoding only it skips the rest by its
/// length (a sidecar's route tables are hundreds of kilobytes each).
#[derive(Clone, PartialEq, prost::Message)]
struct NameOnly {
    #[prost(string, tag = "1")]
    name: String,
}

/// One client's view of the protocol: what it subscribes to and what it has seen.
struct Client<'a> {
    spec: &'a Spec,
    shared: &'a Shared,
    /// EDS name of each held EDS cluster; RDS names of each held listener.
    cluster_eds: HashMap<String, String>,
    listener_rds: HashMap<String, Vec<String>>,
    subscribed: [HashSet<String>; 4],
    cds_received: bool,
    lds_requested: bool,
    synced: bool,
    seen: HashSet<(u64, String)>,
    /// Per route table: the config-change phase whose host it names.
    route_has_host: HashMap<String, u64>,
    config_done: u64,
}

impl<'a> Client<'a> {
    fn new(spec: &'a Spec, shared: &'a Shared) -> Self {
        Client {
            spec,
            shared,
            cluster_eds: HashMap::new(),
            listener_rds: HashMap::new(),
            subscribed: Default::default(),
            cds_received: false,
            lds_requested: false,
            synced: false,
            seen: HashSet::new(),
            route_has_host: HashMap::new(),
            config_done: 0,
        }
    }

    /// Applies one received resource; returns the samples it completes.
    fn receive(&mut self, h: &mut Holdings, i: usize, name: String, body: Vec<u8>) -> usize {
        let mut completed = 0;
        match i {
            CDS => {
                if let Ok(c) = Cluster::decode(&body[..]) {
                    match eds_name(&c) {
                        Some(e) => self.cluster_eds.insert(name.clone(), e),
                        None => self.cluster_eds.remove(&name),
                    };
                }
            }
            EDS => completed += self.check_cla(&name, &body),
            LDS => {
                if let Ok(l) = Listener::decode(&body[..]) {
                    self.listener_rds.insert(name.clone(), rds_names(&l));
                }
            }
            _ => self.check_route(&name, &body),
        }
        let body = self.shared.intern(body);
        h.by_type[i].insert(name, Held { body });
        completed
    }

    fn remove(&mut self, h: &mut Holdings, i: usize, name: &str) {
        h.by_type[i].remove(name);
        match i {
            CDS => {
                self.cluster_eds.remove(name);
            }
            LDS => {
                self.listener_rds.remove(name);
            }
            _ => {}
        }
    }

    /// A load assignment: a sample when it holds the round's new address (and the
    /// old one must be gone).
    fn check_cla(&mut self, name: &str, body: &[u8]) -> usize {
        let exp = self.shared.expected.read().unwrap().get(name).cloned();
        let Some(exp) = exp else { return 0 };
        if exp.phase != self.shared.phase.load(Ordering::Acquire)
            || self.seen.contains(&(exp.phase, name.to_string()))
            || !contains_address(body, &exp.address)
        {
            return 0;
        }
        if contains_address(body, &exp.old) {
            self.shared.stale_at_sample.fetch_add(1, Ordering::Relaxed);
        }
        self.seen.insert((exp.phase, name.to_string()));
        1
    }

    fn check_route(&mut self, name: &str, body: &[u8]) {
        let phase = self
            .shared
            .config
            .read()
            .unwrap()
            .as_ref()
            .map(|c| (c.phase, contains_field(body, 2, c.host_for(self.spec))));
        match phase {
            Some((p, true)) => {
                self.route_has_host.insert(name.to_string(), p);
            }
            _ => {
                self.route_has_host.remove(name);
            }
        }
    }

    /// A config change completes when every route table the client holds names the
    /// new host and (gateways) it holds every new cluster and load assignment.
    fn check_config(&mut self, h: &Holdings) -> usize {
        let g = self.shared.config.read().unwrap().clone();
        let Some(g) = g else { return 0 };
        if g.phase != self.shared.phase.load(Ordering::Acquire) || self.config_done == g.phase {
            return 0;
        }
        let routes = !h.by_type[RDS].is_empty()
            && h.by_type[RDS]
                .keys()
                .all(|n| self.route_has_host.get(n) == Some(&g.phase));
        let clusters = !self.spec.gateway
            || g.names_for(self.spec)
                .all(|n| h.by_type[CDS].contains_key(n) && h.by_type[EDS].contains_key(n));
        if routes && clusters {
            self.config_done = g.phase;
            1
        } else {
            0
        }
    }

    /// The EDS names the held clusters ask for.
    fn wanted_eds(&self) -> HashSet<String> {
        self.cluster_eds.values().cloned().collect()
    }

    fn wanted_rds(&self) -> HashSet<String> {
        self.listener_rds.values().flatten().cloned().collect()
    }

    /// Envoy requests listeners once its clusters are warm: each EDS cluster holds
    /// its load assignment.
    fn warm(&self, h: &Holdings) -> bool {
        self.cds_received
            && self.subscribed[EDS]
                .iter()
                .all(|n| h.by_type[EDS].contains_key(n))
    }

    fn check_synced(&mut self, h: &Holdings) {
        if !self.synced
            && h.by_type[CDS].len() >= self.spec.expect_cds
            && h.by_type[LDS].len() >= self.spec.expect_lds
            && self.warm(h)
            && !self.subscribed[RDS].is_empty()
            && self.subscribed[RDS]
                .iter()
                .all(|n| h.by_type[RDS].contains_key(n))
        {
            self.synced = true;
            self.shared.synced.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Connects (one connection per client) and runs the client until the stream ends
/// or `stop` fires. Like Envoy, a client whose connection or stream fails before its
/// first response tries again after a jittered exponential backoff (500 ms base, 30 s
/// cap: Envoy's defaults for its xDS stream); each retry is counted. A stream that
/// fails later is an error. With `tls`, the connection is mutual TLS (the endpoint's
/// URL is `http://`: the connector does TLS).
pub async fn run(
    endpoint: tonic::transport::Endpoint,
    tls: Option<TlsConnector>,
    spec: Spec,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    let mut connected = false;
    loop {
        let mut answered = false;
        let channel = match &tls {
            Some(c) => endpoint.connect_with_connector(c.clone()).await,
            None => endpoint.connect().await,
        };
        if channel.is_ok() && !connected {
            connected = true;
            shared.first_connection();
        }
        let r = match channel {
            Ok(channel) if spec.delta => {
                delta(channel, &spec, &shared, &mut stop, &mut answered).await
            }
            Ok(channel) => sotw(channel, &spec, &shared, &mut stop, &mut answered).await,
            Err(e) => Err(anyhow::Error::from(e).context("connecting")),
        };
        let Err(e) = r else { return };
        if *stop.borrow() {
            return;
        }
        if answered || attempt >= 8 {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %spec.id, error = %e, "client stream failed");
            return;
        }
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        let cap = (500u64 << attempt).min(30_000);
        attempt += 1;
        tokio::time::sleep(std::time::Duration::from_millis(fastrand::u64(0..cap))).await;
    }
}

fn delta_sub(
    type_url: &str,
    sub: Vec<String>,
    unsub: Vec<String>,
    node: Option<Node>,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node,
        type_url: type_url.into(),
        resource_names_subscribe: sub,
        resource_names_unsubscribe: unsub,
        ..Default::default()
    }
}

/// The names to subscribe and unsubscribe to move from `have` to `want`.
fn diff(have: &HashSet<String>, want: &HashSet<String>) -> (Vec<String>, Vec<String>) {
    let mut sub: Vec<String> = want.difference(have).cloned().collect();
    let mut unsub: Vec<String> = have.difference(want).cloned().collect();
    sub.sort();
    unsub.sort();
    (sub, unsub)
}

async fn delta(
    channel: Channel,
    spec: &Spec,
    shared: &Shared,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    answered: &mut bool,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(16);
    // Wildcard CDS: no names on the first request.
    tx.send(delta_sub(CLUSTER, Vec::new(), Vec::new(), Some(node(spec))))
        .await?;
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut c = Client::new(spec, shared);
    loop {
        let msg = tokio::select! {
            m = stream.message() => m?,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some(resp) = msg else { break };
        *answered = true;
        shared
            .bytes
            .fetch_add(resp.encoded_len() as u64, Ordering::Relaxed);
        shared.messages.fetch_add(1, Ordering::Relaxed);
        let Some(i) = slot(&resp.type_url) else {
            continue;
        };
        let mut completed = 0;
        let mut requests = Vec::new();
        {
            let mut h = shared.holdings[spec.index].lock().unwrap();
            for r in resp.resources {
                let body = r.resource.map(|a| a.value).unwrap_or_default();
                completed += c.receive(&mut h, i, r.name, body);
            }
            for n in &resp.removed_resources {
                c.remove(&mut h, i, n);
            }
            requests.push(DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            });
            // New clusters ask for their endpoints; new listeners for their routes.
            let follow = match i {
                CDS => {
                    c.cds_received = true;
                    Some((EDS, c.wanted_eds()))
                }
                LDS => Some((RDS, c.wanted_rds())),
                _ => None,
            };
            if let Some((j, want)) = follow {
                let (sub, unsub) = diff(&c.subscribed[j], &want);
                if !sub.is_empty() || !unsub.is_empty() {
                    for n in &unsub {
                        h.by_type[j].remove(n);
                    }
                    c.subscribed[j] = want;
                    requests.push(delta_sub(TYPE_URLS[j], sub, unsub, None));
                }
            }
            if !c.lds_requested && c.warm(&h) {
                c.lds_requested = true;
                requests.push(delta_sub(LISTENER, Vec::new(), Vec::new(), None));
            }
            completed += c.check_config(&h);
            c.check_synced(&h);
        }
        for r in requests {
            tx.send(r).await?;
        }
        for _ in 0..completed {
            shared.sample(spec.index);
        }
    }
    Ok(())
}

async fn sotw(
    channel: Channel,
    spec: &Spec,
    shared: &Shared,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    answered: &mut bool,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(16);
    let req = |type_url: &str,
               names: &HashSet<String>,
               node: Option<Node>,
               version: &str,
               nonce: &str| {
        let mut names: Vec<String> = names.iter().cloned().collect();
        names.sort();
        DiscoveryRequest {
            node,
            type_url: type_url.into(),
            resource_names: names,
            version_info: version.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    };
    // Wildcard CDS: no names.
    tx.send(req(CLUSTER, &HashSet::new(), Some(node(spec)), "", ""))
        .await?;
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut c = Client::new(spec, shared);
    // Per type: the last accepted version and the last nonce.
    let mut accepted: [(String, String); 4] = Default::default();
    loop {
        let msg = tokio::select! {
            m = stream.message() => m?,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some(resp) = msg else { break };
        *answered = true;
        shared
            .bytes
            .fetch_add(resp.encoded_len() as u64, Ordering::Relaxed);
        shared.messages.fetch_add(1, Ordering::Relaxed);
        let Some(i) = slot(&resp.type_url) else {
            continue;
        };
        let mut completed = 0;
        let mut requests = Vec::new();
        {
            let mut h = shared.holdings[spec.index].lock().unwrap();
            // CDS and LDS responses carry the full set: what is not in them is gone.
            let mut absent: HashSet<String> = if i == CDS || i == LDS {
                h.by_type[i].keys().cloned().collect()
            } else {
                HashSet::new()
            };
            for any in resp.resources {
                let body = any.value;
                let Ok(NameOnly { name }) = NameOnly::decode(&body[..]) else {
                    continue;
                };
                absent.remove(&name);
                completed += c.receive(&mut h, i, name, body);
            }
            for n in &absent {
                c.remove(&mut h, i, n);
            }
            accepted[i] = (resp.version_info.clone(), resp.nonce.clone());
            requests.push(req(
                &resp.type_url,
                &c.subscribed[i],
                None,
                &resp.version_info,
                &resp.nonce,
            ));
            let follow = match i {
                CDS => {
                    c.cds_received = true;
                    Some((EDS, c.wanted_eds()))
                }
                LDS => Some((RDS, c.wanted_rds())),
                _ => None,
            };
            if let Some((j, want)) = follow
                && want != c.subscribed[j]
            {
                for n in c.subscribed[j].difference(&want) {
                    h.by_type[j].remove(n);
                }
                c.subscribed[j] = want;
                let (v, n) = &accepted[j];
                requests.push(req(TYPE_URLS[j], &c.subscribed[j], None, v, n));
            }
            if !c.lds_requested && c.warm(&h) {
                c.lds_requested = true;
                requests.push(req(LISTENER, &HashSet::new(), None, "", ""));
            }
            completed += c.check_config(&h);
            c.check_synced(&h);
        }
        for r in requests {
            tx.send(r).await?;
        }
        for _ in 0..completed {
            shared.sample(spec.index);
        }
    }
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
    use tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
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
