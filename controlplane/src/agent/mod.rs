//! The remote agent: streams one cluster's services and endpoints to a hub.
//!
//! A source (Kubernetes watchers in [`kube`], or static files in [`file`]) maintains
//! the cluster's current state and publishes it on a `watch` channel. The connection
//! loop here diffs that state against what it last sent and streams the difference.
//! It holds state, not a queue of events: while the hub is away the source keeps
//! watching, and on return the agent sends the net result (a diff from the last
//! acknowledged state when the hub still holds it, otherwise a full snapshot the hub
//! diffs itself), so memory stays bounded however long the outage.
//!
//! Every batch is split to fit the hub's limits (advertised in its Welcome) and the
//! agent's own (`max_batch`, `max_batch_bytes`); a split full resync carries
//! `more = true` on all but its last part. A batch the hub rejects is never taken as
//! acknowledged: the agent logs it, counts it ([`admin`]), ends the session and
//! reconnects with backoff, resyncing from its last acknowledged state.
//!
//! With the shard router's address instead of a hub's, [`directory::follow`] runs one
//! such connection loop per replica of the agent's zone, each over its slice of the
//! cluster (the environments that replica serves in this zone).

pub mod admin;
pub mod directory;
pub mod file;
pub mod kube;
pub mod secrets;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::BackoffBuilder;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, error, info, warn};
use tributary_proto::federation::v1::federation_client::FederationClient;
use tributary_proto::federation::v1::{self as pb, agent_message, change, hub_message};

use self::admin::Telemetry;
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
    /// Connecting to a hub (or the router's directory) may take this long: while a
    /// partition drops packets, a connection attempt fails after it instead of waiting
    /// out the kernel's SYN retries, so the agent is back soon after the heal.
    pub connect_timeout: Duration,
    /// Most changes per batch (larger diffs and resyncs are split); the hub's
    /// advertised limit applies when it is lower.
    pub max_batch: usize,
    /// Most encoded bytes per batch; the hub's advertised message limit applies when
    /// it is lower.
    pub max_batch_bytes: usize,
    /// Mutual TLS to the hub (and the router's directory): this agent's certificate,
    /// `spiffe://{td}/cluster/{cluster-id}`. `None`: plaintext.
    pub tls: Option<crate::identity::tls::ClientTls>,
    /// Where the Kubernetes Secrets the hubs ask for are watched (gateway
    /// credentials, [`secrets`]); `None` (file mode): a hub's request is logged and
    /// nothing is sent.
    pub secrets: Option<secrets::SecretWatch>,
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
            connect_timeout: Duration::from_secs(5),
            max_batch: 5_000,
            max_batch_bytes: 256 << 10,
            tls: None,
            secrets: None,
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
        #[cfg(test)]
        tests::COMPARED.with(|c| c.set(c.get() + 1));
        self.value == other.value
    }
}

/// Everything one cluster exports, as the source sees it now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    pub services: imbl::OrdMap<ObjectKey, Observed<pb::Service>>,
    pub endpoints: imbl::OrdMap<ObjectKey, Observed<pb::EndpointSet>>,
    /// The source is still listing its cluster for the first time: this is the part
    /// it has listed so far, not the whole cluster. A session sends it as the opening
    /// parts of a full resync (`more = true`: the hub deletes nothing yet) and closes
    /// the resync only with a complete state, so a hub holding the cluster (e.g. from
    /// the agent's previous process) never withdraws what is merely not listed yet.
    pub listing: bool,
}

impl ClusterState {
    /// The state of a source that has listed nothing yet (unlike `default()`, an
    /// empty cluster): where a Kubernetes source's channel starts.
    pub fn listing() -> Self {
        ClusterState {
            listing: true,
            ..Default::default()
        }
    }

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
/// endpoints before services on delete. The persistent maps' own diff skips the
/// subtrees `old` and `new` share, so a state derived from `old` by a few changes
/// costs about those changes, not a walk over every service; and each change is
/// cloned only as it is taken (the first state after an empty one is every change).
pub fn diff<'a>(
    old: &'a ClusterState,
    new: &'a ClusterState,
    now: SystemTime,
) -> impl Iterator<Item = pb::Change> + 'a {
    use imbl::ordmap::DiffItem;
    let services = old.services.diff(&new.services).filter_map(|d| match d {
        DiffItem::Add(_, s) | DiffItem::Update { new: (_, s), .. } => {
            Some(change(s.at, change::Kind::ServiceUpsert(s.value.clone())))
        }
        DiffItem::Remove(..) => None,
    });
    let endpoints = old.endpoints.diff(&new.endpoints).filter_map(|d| match d {
        DiffItem::Add(_, e) | DiffItem::Update { new: (_, e), .. } => {
            Some(change(e.at, change::Kind::EndpointsUpsert(e.value.clone())))
        }
        DiffItem::Remove(..) => None,
    });
    let endpoint_deletes = old
        .endpoints
        .diff(&new.endpoints)
        .filter_map(move |d| match d {
            DiffItem::Remove(k, _) => {
                Some(change(now, change::Kind::EndpointsDelete(service_ref(k))))
            }
            _ => None,
        });
    let service_deletes = old
        .services
        .diff(&new.services)
        .filter_map(move |d| match d {
            DiffItem::Remove(k, _) => {
                Some(change(now, change::Kind::ServiceDelete(service_ref(k))))
            }
            _ => None,
        });
    services
        .chain(endpoints)
        .chain(endpoint_deletes)
        .chain(service_deletes)
}

/// The whole state as upserts (a full snapshot), services first, each change cloned
/// only as it is taken: a full resync is split into batches as it goes, never held
/// whole a second time.
pub fn full(state: &ClusterState) -> impl Iterator<Item = pb::Change> + '_ {
    let services = state
        .services
        .values()
        .map(|s| change(s.at, change::Kind::ServiceUpsert(s.value.clone())));
    let endpoints = state
        .endpoints
        .values()
        .map(|e| change(e.at, change::Kind::EndpointsUpsert(e.value.clone())));
    services.chain(endpoints)
}

/// Survives reconnects: who this agent process is, and what the hub acknowledged.
#[derive(Debug)]
struct Memory {
    /// Random per process: versions count per incarnation.
    incarnation: String,
    version: u64,
    acked_version: u64,
    acked: Arc<ClusterState>,
}

/// A new random incarnation id (not secret: it only tells agent processes apart).
pub fn new_incarnation() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
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
    /// Retryable: the hub did not apply batch `version`; the agent resyncs from its
    /// last acknowledged state on the next session.
    #[error("the hub rejected batch {version} (not applied): {message}")]
    BatchRejected { version: u64, message: String },
    #[error("protocol: {0}")]
    Protocol(String),
    /// The stream's sending half closed under a send: the hub ended the stream or the
    /// connection broke. Why is in what the hub sent before its end ([`closing`]).
    #[error("the stream closed while sending")]
    OutboundClosed,
}

/// Reconnect delay caps: `initial` doubling up to `max` (a fresh schedule after a
/// long session). Each delay is drawn uniformly below its cap (full jitter).
fn backoff(cfg: &AgentConfig) -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(cfg.backoff_initial)
        .with_max_delay(cfg.backoff_max)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

/// Full jitter: uniform in `[0, cap)`. (backon's own jitter adds up to one more
/// `cap` on top, which would double the documented maximum.)
fn full_jitter(cap: Duration) -> Duration {
    cap.mul_f64(fastrand::f64())
}

/// Runs the agent until `shutdown` resolves: connects, streams, and reconnects with
/// exponential backoff and full jitter.
pub async fn run(
    cfg: AgentConfig,
    state: watch::Receiver<Arc<ClusterState>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let telemetry = Arc::new(Telemetry::new(&cfg, new_incarnation()));
    run_with(cfg, state, shutdown, telemetry).await
}

/// [`run`], reporting into `telemetry` (served by [`admin::serve`]); the agent's
/// incarnation is `telemetry`'s.
pub async fn run_with(
    cfg: AgentConfig,
    mut state: watch::Receiver<Arc<ClusterState>>,
    shutdown: impl std::future::Future<Output = ()>,
    telemetry: Arc<Telemetry>,
) {
    tokio::pin!(shutdown);
    let mut mem = Memory {
        incarnation: telemetry.incarnation().to_string(),
        version: 0,
        acked_version: 0,
        acked: Arc::default(),
    };
    let mut delays = backoff(&cfg);
    loop {
        let started = Instant::now();
        telemetry.set_state("connecting");
        let result = tokio::select! {
            r = session(&cfg, &mut state, &mut mem, &telemetry) => r,
            _ = &mut shutdown => {
                telemetry.set_state("stopped");
                return;
            }
        };
        telemetry.session_ended(result.as_ref().err().map(ToString::to_string));
        match result {
            Ok(()) => info!(hub = %cfg.hub, "hub closed the federation stream"),
            Err(e @ AgentError::BatchRejected { .. }) => {
                error!(hub = %cfg.hub, error = %e, "federation session ended: batch rejected; reconnecting to resync")
            }
            Err(e) => warn!(hub = %cfg.hub, error = %e, "federation session ended"),
        }
        // A session that lasted a while resets the backoff.
        if started.elapsed() > Duration::from_secs(30) {
            delays = backoff(&cfg);
        }
        let delay = full_jitter(delays.next().unwrap_or(cfg.backoff_max));
        debug!(?delay, "reconnecting after backoff");
        telemetry.set_state("backoff");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut shutdown => {
                telemetry.set_state("stopped");
                return;
            }
        }
    }
}

fn batch_msg(version: u64, full: bool, more: bool, changes: Vec<pb::Change>) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(agent_message::Kind::Batch(pb::ChangeBatch {
            version,
            full,
            changes,
            more,
        })),
    }
}

/// Bytes a batch needs besides its changes (version, flags, message framing).
const BATCH_ENVELOPE_BYTES: usize = 64;

/// Fills batches of at most `max_changes` changes and `max_bytes` encoded bytes each
/// from changes pushed one at a time, in order.
#[derive(Debug)]
struct Splitter {
    max_changes: usize,
    budget: usize,
    current: Vec<pb::Change>,
    bytes: usize,
}

impl Splitter {
    fn new(max_changes: usize, max_bytes: usize) -> Self {
        Splitter {
            max_changes: max_changes.max(1),
            budget: max_bytes.saturating_sub(BATCH_ENVELOPE_BYTES),
            current: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds `c`; returns the batch it closed, if it did not fit in the current one, or
    /// `Err(c)` when `c` is too large for any batch on its own.
    fn push(&mut self, c: pb::Change) -> Result<Option<Vec<pb::Change>>, Box<pb::Change>> {
        let len = c.encoded_len();
        let cost = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
        if cost > self.budget {
            return Err(Box::new(c));
        }
        let mut closed = None;
        if !self.current.is_empty()
            && (self.current.len() >= self.max_changes || self.bytes + cost > self.budget)
        {
            closed = Some(std::mem::take(&mut self.current));
            self.bytes = 0;
        }
        self.bytes += cost;
        self.current.push(c);
        Ok(closed)
    }

    /// The last (maybe empty) batch.
    fn finish(self) -> Vec<pb::Change> {
        self.current
    }
}

/// Splits `changes` into batches of at most `max_changes` changes and `max_bytes`
/// encoded bytes each, in order. A change too large for any batch on its own is
/// returned apart (it can never be sent). Always returns at least one (maybe empty)
/// batch, so an empty full resync is still sent.
pub fn split(
    changes: impl IntoIterator<Item = pb::Change>,
    max_changes: usize,
    max_bytes: usize,
) -> (Vec<Vec<pb::Change>>, Vec<pb::Change>) {
    let mut splitter = Splitter::new(max_changes, max_bytes);
    let mut batches = Vec::new();
    let mut too_large = Vec::new();
    for c in changes {
        match splitter.push(c) {
            Ok(closed) => batches.extend(closed),
            Err(c) => too_large.push(*c),
        }
    }
    batches.push(splitter.finish());
    (batches, too_large)
}

/// What one session may put in a batch: the lower of the agent's and the hub's limits.
#[derive(Debug, Clone, Copy)]
struct BatchLimits {
    changes: usize,
    bytes: usize,
}

impl BatchLimits {
    fn new(cfg: &AgentConfig, w: &pb::Welcome) -> Self {
        let hub = |v: u64| if v == 0 { usize::MAX } else { v as usize };
        BatchLimits {
            changes: cfg.max_batch.min(hub(u64::from(w.max_batch_changes))),
            bytes: cfg.max_batch_bytes.min(hub(w.max_message_bytes)),
        }
    }
}

/// What a call to [`send_split`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parts {
    /// An incremental diff (its last part completes a state).
    Diff,
    /// Parts of a full resync; `close`: the last of them ends the resync (`more =
    /// false`), else every part has `more = true` and the resync stays open.
    Resync { close: bool },
}

/// Sends `changes` as one or more batches, all but the last with `more` (and the last
/// too for the parts of a resync that stays open), each sent as soon as it is full:
/// one batch is built ahead of the channel. Returns the last version sent, if any was.
async fn send_split(
    tx: &mpsc::Sender<pb::AgentMessage>,
    mem: &mut Memory,
    telemetry: &Telemetry,
    limits: BatchLimits,
    parts_of: Parts,
    changes: impl IntoIterator<Item = pb::Change>,
) -> Result<Option<u64>, AgentError> {
    let full = matches!(parts_of, Parts::Resync { .. });
    let close = parts_of != Parts::Resync { close: false };
    let send = |mem: &mut Memory, chunk: Vec<pb::Change>, more: bool| {
        mem.version += 1;
        let (version, n) = (mem.version, chunk.len());
        let msg = batch_msg(version, full, more, chunk);
        async move {
            tx.send(msg).await.map_err(|_| AgentError::OutboundClosed)?;
            telemetry.sent(version, n);
            Ok::<(), AgentError>(())
        }
    };
    let mut splitter = Splitter::new(limits.changes, limits.bytes);
    let (mut total, mut parts) = (0usize, 0usize);
    for c in changes {
        total += 1;
        match splitter.push(c) {
            Ok(None) => {}
            // A batch is closed by a change that starts the next: more follow it.
            Ok(Some(batch)) => {
                send(mem, batch, true).await?;
                parts += 1;
            }
            Err(c) => {
                let message = format!(
                    "a change of {} bytes exceeds the batch limit of {} bytes on its own; not sent",
                    c.encoded_len(),
                    limits.bytes
                );
                error!(%message, "change dropped");
                telemetry.item_error(message);
            }
        }
    }
    // An empty diff or open part is not sent; an empty resync's closing part is.
    if total == 0 && !(full && close) {
        return Ok(None);
    }
    send(mem, splitter.finish(), !close).await?;
    parts += 1;
    debug!(
        changes = total,
        parts,
        full,
        version = mem.version,
        "batch sent"
    );
    Ok(Some(mem.version))
}

async fn session(
    cfg: &AgentConfig,
    state: &mut watch::Receiver<Arc<ClusterState>>,
    mem: &mut Memory,
    telemetry: &Telemetry,
) -> Result<(), AgentError> {
    let mut client = FederationClient::new(connect(cfg, &cfg.hub).await?)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(usize::MAX);
    // One: a diff or resync is produced as the stream takes it, so that a single
    // decoded batch waits here (a decoded batch is several times its encoded size;
    // the in-flight window is counted apart, in `in_flight`).
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(1);
    let hello = pb::Hello {
        cluster_id: cfg.cluster_id.clone(),
        region: cfg.region.clone(),
        zone: cfg.zone.clone(),
        network: cfg.network.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        last_acked_version: mem.acked_version,
        incarnation: mem.incarnation.clone(),
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
    let limits = BatchLimits::new(cfg, &welcome);
    info!(hub = %cfg.hub, resume = welcome.resume, hub_version = welcome.hub_version, max_changes = limits.changes, max_bytes = limits.bytes, "connected to hub");
    telemetry.connected(welcome.resume);
    let mut in_flight = VecDeque::new();
    let mut secrets = secrets::SessionSecrets::new(cfg.secrets.as_ref());
    let live = Live {
        cfg,
        tx: &tx,
        limits,
        resume: welcome.resume,
    };
    let mut ctx = Ctx {
        mem,
        telemetry,
        in_flight: &mut in_flight,
        secrets: &mut secrets,
    };
    match exchange(live, state, &mut ctx, &mut inbound).await {
        Err(AgentError::OutboundClosed) => Err(closing(cfg, &mut ctx, &mut inbound).await),
        other => other,
    }
}

/// The versions sent and not yet acknowledged, each with the state it completes.
type InFlight = VecDeque<(u64, Arc<ClusterState>)>;

/// What a session's hub messages update.
struct Ctx<'a> {
    mem: &'a mut Memory,
    telemetry: &'a Telemetry,
    in_flight: &'a mut InFlight,
    secrets: &'a mut secrets::SessionSecrets,
}

/// What a session sends with, once welcomed.
struct Live<'a> {
    cfg: &'a AgentConfig,
    tx: &'a mpsc::Sender<pb::AgentMessage>,
    limits: BatchLimits,
    resume: bool,
}

/// Why the stream ended, read from what the hub sent before its end: a send found the
/// stream closed, and the hub's last words (a rejection, acknowledgements, its
/// status) may still be queued behind it. Bounded by the heartbeat period.
async fn closing(
    cfg: &AgentConfig,
    ctx: &mut Ctx<'_>,
    inbound: &mut tonic::Streaming<pb::HubMessage>,
) -> AgentError {
    let rest = async {
        loop {
            match inbound.message().await {
                Ok(Some(msg)) => {
                    if let Err(e) = on_hub_message(msg, ctx) {
                        return e;
                    }
                }
                Ok(None) => return AgentError::Protocol("the hub ended the stream".into()),
                Err(status) => return AgentError::Stream(status),
            }
        }
    };
    tokio::time::timeout(cfg.heartbeat, rest)
        .await
        .unwrap_or(AgentError::OutboundClosed)
}

/// Applies one hub message; `Err` ends the session.
fn on_hub_message(msg: pb::HubMessage, ctx: &mut Ctx<'_>) -> Result<(), AgentError> {
    let Ctx {
        mem,
        telemetry,
        in_flight,
        secrets,
    } = ctx;
    match msg.kind {
        Some(hub_message::Kind::Ack(ack)) => {
            for e in &ack.errors {
                warn!(version = ack.version, item = e.index, error = %e.message, "the hub rejected an item");
                telemetry.item_error(format!(
                    "batch {} item {}: {}",
                    ack.version, e.index, e.message
                ));
            }
            while in_flight.front().is_some_and(|(v, _)| *v <= ack.version) {
                let (v, s) = in_flight.pop_front().unwrap_or_default();
                mem.acked_version = v;
                mem.acked = s;
                telemetry.acked(v);
            }
            Ok(())
        }
        Some(hub_message::Kind::BatchRejected(r)) => {
            // Not applied: the acknowledged state stays where it was.
            telemetry.batch_rejected(r.version, &r.message);
            Err(AgentError::BatchRejected {
                version: r.version,
                message: r.message,
            })
        }
        Some(hub_message::Kind::Heartbeat(_)) => Ok(()),
        Some(hub_message::Kind::WatchSecrets(w)) => {
            secrets.on_watch(w);
            Ok(())
        }
        Some(hub_message::Kind::Reject(r)) => Err(AgentError::Rejected(r.message)),
        other => {
            warn!(?other, "unexpected hub message ignored");
            Ok(())
        }
    }
}

/// A welcomed session: sends the state's changes and heartbeats, applies what the hub
/// answers, until the stream ends.
async fn exchange(
    live: Live<'_>,
    state: &mut watch::Receiver<Arc<ClusterState>>,
    ctx: &mut Ctx<'_>,
    inbound: &mut tonic::Streaming<pb::HubMessage>,
) -> Result<(), AgentError> {
    let Live {
        cfg,
        tx,
        limits,
        resume,
    } = live;
    let mut sent: Arc<ClusterState>;
    let mut dirty_at: Option<Instant>;
    // A full resync whose last part is not sent yet: the source is still listing, and
    // what it lists is sent as more parts of that resync (diffs from what was sent,
    // so a delete takes back an earlier part's naming) until its state is complete.
    let mut resync_open = false;
    if resume {
        sent = ctx.mem.acked.clone();
        dirty_at = Some(Instant::now()); // send what changed while away, at once
    } else {
        let current = state.borrow_and_update().clone();
        let close = !current.listing;
        let parts = Parts::Resync { close };
        if let Some(v) =
            send_split(tx, ctx.mem, ctx.telemetry, limits, parts, full(&current)).await?
            && close
        {
            ctx.in_flight.push_back((v, current.clone()));
        }
        resync_open = !close;
        sent = current;
        dirty_at = None;
    }

    let mut heartbeat = tokio::time::interval(cfg.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    loop {
        let can_send = ctx.in_flight.len() < MAX_IN_FLIGHT;
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return Ok(()); // the source stopped: the agent is shutting down
                }
                // The state that completes an open resync (the end of the source's first
                // list) is sent at once: nothing more is coming for the window to gather.
                let at = if resync_open && !state.borrow().listing {
                    Instant::now()
                } else {
                    Instant::now() + cfg.debounce
                };
                dirty_at = Some(dirty_at.map_or(at, |d| d.min(at)));
            }
            _ = sleep_until(dirty_at), if can_send => {
                dirty_at = None;
                let current = state.borrow_and_update().clone();
                let close = !current.listing;
                let parts = if resync_open {
                    Parts::Resync { close }
                } else if close {
                    Parts::Diff
                } else {
                    // A source never lists anew after its first complete state (a
                    // relist is swapped in whole): nothing partial follows a complete state.
                    warn!("the source published a partial state after a complete one; not sent");
                    continue;
                };
                let changes = diff(&sent, &current, SystemTime::now());
                // Only the last part's version stands for a complete state.
                if let Some(v) = send_split(tx, ctx.mem, ctx.telemetry, limits, parts, changes).await?
                    && close
                {
                    ctx.in_flight.push_back((v, current.clone()));
                }
                resync_open &= !close;
                sent = current;
            }
            msg = inbound.message() => {
                let Some(msg) = msg? else { return Ok(()) };
                last_heard = Instant::now();
                on_hub_message(msg, ctx)?;
                // A new list from the hub: send what is already known of it.
                send_secrets(tx, ctx.secrets).await?;
            }
            _ = ctx.secrets.changed() => {
                // A watched Secret changed (rotated, deleted): send it to this hub if it asked.
                send_secrets(tx, ctx.secrets).await?;
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > cfg.heartbeat * 3 {
                    return Err(AgentError::Protocol(format!("nothing heard from the hub for {:?}", last_heard.elapsed())));
                }
                let hb = pb::Heartbeat { unix_nanos: to_unix_nanos(SystemTime::now()) };
                tx.send(pb::AgentMessage { kind: Some(agent_message::Kind::Heartbeat(hb)) })
                    .await
                    .map_err(|_| AgentError::OutboundClosed)?;
            }
        }
    }
}

/// Sends the Secrets whose state this session's hub has not been sent yet.
async fn send_secrets(
    tx: &mpsc::Sender<pb::AgentMessage>,
    secrets: &mut secrets::SessionSecrets,
) -> Result<(), AgentError> {
    for msg in secrets.updates() {
        tx.send(msg).await.map_err(|_| AgentError::OutboundClosed)?;
    }
    Ok(())
}

/// A channel to `url` within `cfg.connect_timeout`.
pub(crate) async fn connect(
    cfg: &AgentConfig,
    url: &str,
) -> Result<tonic::transport::Channel, AgentError> {
    let target = match &cfg.tls {
        // TLS is the connector's: tonic's own cannot reload renewed certificates.
        Some(_) => crate::identity::tls::plain_scheme(url),
        None => url.to_string(),
    };
    let endpoint = tonic::transport::Endpoint::from_shared(target)
        .map_err(|e| AgentError::Protocol(format!("{url:?} is not a valid URL: {e}")))?
        .connect_timeout(cfg.connect_timeout);
    Ok(match &cfg.tls {
        Some(tls) => endpoint.connect_with_connector(tls.connector()).await?,
        None => endpoint.connect().await?,
    })
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// `Observed` values compared on this thread (the cost of a diff).
        pub(super) static COMPARED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    fn observed_service(i: usize) -> (ObjectKey, Observed<pb::Service>) {
        let key = ObjectKey {
            namespace: "ns".into(),
            name: format!("s{i}"),
        };
        let value = pb::Service {
            namespace: "ns".into(),
            name: format!("s{i}"),
            hosts: vec![format!("s{i}.ns.svc.cluster.local")],
            ..Default::default()
        };
        (
            key,
            Observed {
                value,
                at: SystemTime::UNIX_EPOCH,
            },
        )
    }

    /// Sending after a few changes costs about those changes: the diff compares only
    /// entries outside the structure the two states share (before: every service).
    #[test]
    fn diff_of_a_derived_state_compares_only_what_changed() {
        let mut old = ClusterState::default();
        for i in 0..20_000 {
            let (k, v) = observed_service(i);
            old.services.insert(k, v);
        }
        let mut new = old.clone();
        let (k, mut v) = observed_service(777);
        v.value.hosts.push("extra.example".into());
        new.services.insert(k, v.clone());
        let (gone, _) = observed_service(12_345);
        new.services.remove(&gone);
        let (added, a) = observed_service(30_000);
        new.services.insert(added, a.clone());

        COMPARED.with(|c| c.set(0));
        let changes: Vec<pb::Change> = diff(&old, &new, SystemTime::UNIX_EPOCH).collect();
        let compared = COMPARED.with(|c| c.get());
        assert_eq!(
            changes,
            vec![
                // In key order: "s30000" < "s777".
                change(a.at, change::Kind::ServiceUpsert(a.value)),
                change(v.at, change::Kind::ServiceUpsert(v.value)),
                change(
                    SystemTime::UNIX_EPOCH,
                    change::Kind::ServiceDelete(service_ref(&gone))
                ),
            ]
        );
        assert!(
            compared < 1_000,
            "{compared} values compared for 3 changes among 20,000 services"
        );
        // A state built apart (nothing shared) still diffs correctly.
        let mut rebuilt = ClusterState::default();
        for (k, v) in new.services.iter() {
            rebuilt.services.insert(k.clone(), v.clone());
        }
        assert_eq!(diff(&new, &rebuilt, SystemTime::UNIX_EPOCH).count(), 0);
    }

    #[test]
    fn backoff_doubles_from_initial_to_max_with_full_jitter() {
        let mut cfg = AgentConfig::new("http://127.0.0.1:1", "c");
        cfg.backoff_initial = Duration::from_millis(100);
        cfg.backoff_max = Duration::from_secs(10);
        let caps: Vec<Duration> = backoff(&cfg).take(10).collect();
        let ms: Vec<u128> = caps.iter().map(Duration::as_millis).collect();
        assert_eq!(
            ms,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        let delays: Vec<Duration> = (0..1000).map(|_| full_jitter(cfg.backoff_max)).collect();
        assert!(delays.iter().all(|d| *d < cfg.backoff_max));
        assert!(
            delays.iter().any(|d| *d < cfg.backoff_max / 4),
            "full jitter reaches far below the cap"
        );
    }

    fn upsert(name: &str, payload: usize) -> pb::Change {
        change(
            SystemTime::UNIX_EPOCH,
            change::Kind::ServiceUpsert(pb::Service {
                namespace: "ns".into(),
                name: name.into(),
                hosts: vec!["h".repeat(payload)],
                ..Default::default()
            }),
        )
    }

    /// A full resync is split as it is produced: while the hub does not read, the
    /// agent has taken no more than a few batches' worth of changes from its state
    /// (it used to clone the whole state into one list first).
    #[tokio::test]
    async fn a_full_resync_is_built_batch_by_batch() {
        let cfg = AgentConfig::new("http://127.0.0.1:1", "c");
        let telemetry = Telemetry::new(&cfg, "i".into());
        let mut mem = Memory {
            incarnation: "i".into(),
            version: 0,
            acked_version: 0,
            acked: Arc::default(),
        };
        let (tx, mut rx) = mpsc::channel(1);
        let limits = BatchLimits {
            changes: 100,
            bytes: 1 << 20,
        };
        let taken = std::cell::Cell::new(0usize);
        let changes = (0..10_000).map(|i| {
            taken.set(taken.get() + 1);
            upsert(&format!("s{i}"), 10)
        });
        let send = send_split(
            &tx,
            &mut mem,
            &telemetry,
            limits,
            Parts::Resync { close: true },
            changes,
        );
        tokio::pin!(send);
        // Polled once: it stops at the full channel.
        let blocked = tokio::time::timeout(Duration::ZERO, &mut send).await;
        assert!(blocked.is_err(), "the channel of one is full");
        assert!(
            taken.get() <= 2 * limits.changes + 1,
            "{} of 10,000 changes taken before the first batch was read",
            taken.get()
        );
        // Reading lets it finish: 100 batches, all but the last with `more`.
        let reader = async {
            let mut got = Vec::new();
            while let Some(m) = rx.recv().await {
                let Some(agent_message::Kind::Batch(b)) = m.kind else {
                    panic!()
                };
                let last = !b.more;
                got.push((b.version, b.changes.len(), b.more));
                if last {
                    break;
                }
            }
            got
        };
        let (sent, got) = tokio::join!(send, reader);
        assert_eq!(sent.unwrap(), Some(100));
        assert_eq!(got.len(), 100);
        assert!(got.iter().all(|(_, n, _)| *n == 100));
        assert!(got[..99].iter().all(|(_, _, more)| *more) && !got[99].2);
        assert_eq!(taken.get(), 10_000);
    }

    #[test]
    fn split_respects_count_and_bytes_and_keeps_order() {
        let changes: Vec<pb::Change> = (0..25).map(|i| upsert(&format!("s{i}"), 100)).collect();
        let (batches, too_large) = split(changes.clone(), 10, usize::MAX);
        assert!(too_large.is_empty());
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            [10, 10, 5]
        );
        assert_eq!(batches.concat(), changes);
        let max_bytes = 1_000;
        let (batches, _) = split(changes.clone(), 1_000, max_bytes);
        assert!(batches.len() > 3);
        for b in &batches {
            let msg = batch_msg(u64::MAX, true, true, b.clone());
            assert!(msg.encoded_len() <= max_bytes, "{}", msg.encoded_len());
        }
        assert_eq!(batches.concat(), changes);
        // A change that cannot fit alone is set apart; an empty input is one empty batch.
        let (batches, too_large) = split(vec![upsert("big", 5_000)], 10, max_bytes);
        assert_eq!((batches, too_large.len()), (vec![vec![]], 1));
    }
}
