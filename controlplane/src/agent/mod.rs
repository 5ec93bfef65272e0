//! The remote agent: streams one cluster's services and endpoints to a hub.
//!
//! A source (Kubernetes watchers in [`kube`], or static files in [`file`]) maintains
//! the cluster's current state and publishes it on a `watch` channel. The connection
//! loop here diffs that state against what it last sent and streams the difference.
//! It holds state, not a queue of events: while the hub is away the source keeps
//! watching, and on return the agent sends the net result (a diff from the last
//! acknowledged state when the hub still holds it, otherwise a full snapshot the hub
//! diffs itself), so memory stays bounded however long the outage.

pub mod file;
pub mod kube;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};
use tributary_proto::federation::v1::federation_client::FederationClient;
use tributary_proto::federation::v1::{self as pb, agent_message, change, hub_message};

use crate::federation::convert::to_unix_nanos;
use crate::model::ObjectKey;

/// Batches the agent keeps un-acknowledged before it waits for the hub.
const MAX_IN_FLIGHT: usize = 8;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// e.g. `http://127.0.0.1:18000` or `http://[::1]:18000`.
    pub hub: String,
    pub cluster_id: String,
    pub region: String,
    pub zone: String,
    pub network: String,
    /// Changes arriving within this window go out in one batch.
    pub debounce: Duration,
    pub heartbeat: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Most changes per incremental batch (larger diffs are split).
    pub max_batch: usize,
}

impl AgentConfig {
    pub fn new(hub: impl Into<String>, cluster_id: impl Into<String>) -> Self {
        Self {
            hub: hub.into(),
            cluster_id: cluster_id.into(),
            region: String::new(),
            zone: String::new(),
            network: String::new(),
            debounce: Duration::from_millis(50),
            heartbeat: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            max_batch: 5_000,
        }
    }
}

/// A value and when the source first observed it in this form (its origin time).
#[derive(Debug, Clone)]
pub struct Observed<T> {
    pub value: T,
    pub at: SystemTime,
}

impl<T: PartialEq> PartialEq for Observed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

/// Everything one cluster exports, as the source sees it now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    pub services: imbl::OrdMap<ObjectKey, Observed<pb::Service>>,
    pub endpoints: imbl::OrdMap<ObjectKey, Observed<pb::EndpointSet>>,
}

impl ClusterState {
    /// Sets `key` to `value`, keeping the observation time if it is unchanged.
    pub fn set_service(&mut self, key: ObjectKey, value: Option<pb::Service>, now: SystemTime) {
        set(&mut self.services, key, value, now)
    }

    pub fn set_endpoints(
        &mut self,
        key: ObjectKey,
        value: Option<pb::EndpointSet>,
        now: SystemTime,
    ) {
        set(&mut self.endpoints, key, value, now)
    }
}

fn set<T: PartialEq + Clone>(
    map: &mut imbl::OrdMap<ObjectKey, Observed<T>>,
    key: ObjectKey,
    value: Option<T>,
    now: SystemTime,
) {
    match value {
        Some(v) => {
            if map.get(&key).is_none_or(|o| o.value != v) {
                map.insert(key, Observed { value: v, at: now });
            }
        }
        None => {
            map.remove(&key);
        }
    }
}

fn change(at: SystemTime, kind: change::Kind) -> pb::Change {
    pb::Change {
        origin_unix_nanos: to_unix_nanos(at),
        kind: Some(kind),
    }
}

fn service_ref(k: &ObjectKey) -> pb::ServiceRef {
    pb::ServiceRef {
        namespace: k.namespace.clone(),
        name: k.name.clone(),
    }
}

/// The changes that turn `old` into `new`: services before endpoints on upsert,
/// endpoints before services on delete.
pub fn diff(old: &ClusterState, new: &ClusterState, now: SystemTime) -> Vec<pb::Change> {
    let mut out = Vec::new();
    for (k, s) in new.services.iter() {
        if old.services.get(k) != Some(s) {
            out.push(change(s.at, change::Kind::ServiceUpsert(s.value.clone())));
        }
    }
    for (k, e) in new.endpoints.iter() {
        if old.endpoints.get(k) != Some(e) {
            out.push(change(e.at, change::Kind::EndpointsUpsert(e.value.clone())));
        }
    }
    for k in old.endpoints.keys() {
        if !new.endpoints.contains_key(k) {
            out.push(change(now, change::Kind::EndpointsDelete(service_ref(k))));
        }
    }
    for k in old.services.keys() {
        if !new.services.contains_key(k) {
            out.push(change(now, change::Kind::ServiceDelete(service_ref(k))));
        }
    }
    out
}

/// The whole state as upserts (a full snapshot).
pub fn full(state: &ClusterState) -> Vec<pb::Change> {
    diff(&ClusterState::default(), state, SystemTime::now())
}

/// Survives reconnects: what the hub has acknowledged.
#[derive(Debug, Default)]
struct Memory {
    version: u64,
    acked_version: u64,
    acked: Arc<ClusterState>,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Retryable: the hub is unreachable or the stream broke.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("stream: {0}")]
    Stream(#[from] tonic::Status),
    /// Retryable after a while: the hub refused this agent (e.g. a live agent holds the cluster id).
    #[error("rejected by the hub: {0}")]
    Rejected(String),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Runs the agent until `shutdown` resolves: connects, streams, and reconnects with
/// exponential backoff and full jitter.
pub async fn run(
    cfg: AgentConfig,
    mut state: watch::Receiver<Arc<ClusterState>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut mem = Memory::default();
    let mut attempt: u32 = 0;
    let mut rng = Jitter::seeded();
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            r = session(&cfg, &mut state, &mut mem) => r,
            _ = &mut shutdown => return,
        };
        match result {
            Ok(()) => info!(hub = %cfg.hub, "hub closed the federation stream"),
            Err(e) => warn!(hub = %cfg.hub, error = %e, "federation session ended"),
        }
        // A session that lasted a while resets the backoff.
        if started.elapsed() > Duration::from_secs(30) {
            attempt = 0;
        }
        let cap = cfg
            .backoff_max
            .min(cfg.backoff_initial.saturating_mul(1u32 << attempt.min(16)));
        let delay = rng.upto(cap);
        attempt += 1;
        debug!(?delay, attempt, "reconnecting after backoff");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut shutdown => return,
        }
    }
}

fn batch_msg(version: u64, full: bool, changes: Vec<pb::Change>) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(agent_message::Kind::Batch(pb::ChangeBatch {
            version,
            full,
            changes,
        })),
    }
}

async fn session(
    cfg: &AgentConfig,
    state: &mut watch::Receiver<Arc<ClusterState>>,
    mem: &mut Memory,
) -> Result<(), AgentError> {
    let mut client = FederationClient::connect(cfg.hub.clone())
        .await?
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(MAX_IN_FLIGHT + 4);
    let hello = pb::Hello {
        cluster_id: cfg.cluster_id.clone(),
        region: cfg.region.clone(),
        zone: cfg.zone.clone(),
        network: cfg.network.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        last_acked_version: mem.acked_version,
    };
    tx.send(pb::AgentMessage {
        kind: Some(agent_message::Kind::Hello(hello)),
    })
    .await
    .map_err(|_| AgentError::Protocol("outbound stream closed".into()))?;
    let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    let welcome = match inbound.message().await?.and_then(|m| m.kind) {
        Some(hub_message::Kind::Welcome(w)) => w,
        Some(hub_message::Kind::Reject(r)) => return Err(AgentError::Rejected(r.message)),
        other => {
            return Err(AgentError::Protocol(format!(
                "expected Welcome, got {other:?}"
            )));
        }
    };
    info!(hub = %cfg.hub, resume = welcome.resume, hub_version = welcome.hub_version, "connected to hub");

    let send = |m: pb::AgentMessage| {
        let tx = tx.clone();
        async move {
            tx.send(m)
                .await
                .map_err(|_| AgentError::Protocol("outbound stream closed".into()))
        }
    };
    let mut in_flight: VecDeque<(u64, Arc<ClusterState>)> = VecDeque::new();
    let mut sent: Arc<ClusterState>;
    let mut dirty_at: Option<Instant>;
    if welcome.resume {
        sent = mem.acked.clone();
        dirty_at = Some(Instant::now()); // send what changed while away, at once
    } else {
        let current = state.borrow_and_update().clone();
        mem.version += 1;
        send(batch_msg(mem.version, true, full(&current))).await?;
        in_flight.push_back((mem.version, current.clone()));
        sent = current;
        dirty_at = None;
    }

    let mut heartbeat = tokio::time::interval(cfg.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    loop {
        let can_send = in_flight.len() < MAX_IN_FLIGHT;
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return Ok(()); // the source stopped: the agent is shutting down
                }
                dirty_at.get_or_insert(Instant::now() + cfg.debounce);
            }
            _ = sleep_until(dirty_at), if can_send => {
                dirty_at = None;
                let current = state.borrow_and_update().clone();
                let changes = diff(&sent, &current, SystemTime::now());
                if !changes.is_empty() {
                    let total = changes.len();
                    let mut chunks = changes.chunks(cfg.max_batch.max(1)).peekable();
                    while let Some(chunk) = chunks.next() {
                        mem.version += 1;
                        send(batch_msg(mem.version, false, chunk.to_vec())).await?;
                        // Only the last chunk's version stands for a complete state.
                        if chunks.peek().is_none() {
                            in_flight.push_back((mem.version, current.clone()));
                        }
                    }
                    debug!(changes = total, version = mem.version, "batch sent");
                }
                sent = current;
            }
            msg = inbound.message() => {
                let Some(msg) = msg? else { return Ok(()) };
                last_heard = Instant::now();
                match msg.kind {
                    Some(hub_message::Kind::Ack(ack)) => {
                        for e in &ack.errors {
                            warn!(version = ack.version, item = e.index, error = %e.message, "the hub rejected an item");
                        }
                        while in_flight.front().is_some_and(|(v, _)| *v <= ack.version) {
                            let (v, s) = in_flight.pop_front().unwrap_or_default();
                            mem.acked_version = v;
                            mem.acked = s;
                        }
                    }
                    Some(hub_message::Kind::Heartbeat(_)) => {}
                    Some(hub_message::Kind::Reject(r)) => return Err(AgentError::Rejected(r.message)),
                    other => warn!(?other, "unexpected hub message ignored"),
                }
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > cfg.heartbeat * 3 {
                    return Err(AgentError::Protocol(format!("nothing heard from the hub for {:?}", last_heard.elapsed())));
                }
                let hb = pb::Heartbeat { unix_nanos: to_unix_nanos(SystemTime::now()) };
                send(pb::AgentMessage { kind: Some(agent_message::Kind::Heartbeat(hb)) }).await?;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Full jitter for reconnect backoff (xorshift; no need for a crypto RNG here).
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Self {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Jitter(t ^ (u64::from(std::process::id()) << 32) | 1)
    }

    fn upto(&mut self, cap: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let nanos = cap.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(if nanos == 0 { 0 } else { self.0 % nanos })
    }
}
