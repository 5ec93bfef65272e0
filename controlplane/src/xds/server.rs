//! The ADS server: `StreamAggregatedResources` (SotW) and `DeltaAggregatedResources`.
//!
//! Each stream runs one task that owns all of its state (a [`StreamState`]), so
//! nothing here is shared or locked on the response path except the client's own
//! status record. The task wakes on a client request, a new snapshot of its
//! environment, or a change of the hub's withdrawal hold, and then, per type in
//! make-before-break order, sends whatever the state machine says the client needs,
//! assembled from pre-encoded bytes.
//!
//! Flow control: at most one response per type is in flight. The next is built when
//! the client ACKs or NACKs, from the newest snapshot, so a slow client skips versions
//! and a stream's memory is bounded whatever the churn.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, Stream};
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
    ads_server::AggregatedDiscoveryService,
};

use super::XdsType;
use super::secrets::Secrets;
use super::snapshot::{Snapshot, Snapshots};
pub use super::stream::{NodeInfo, Role, StreamLimits};
use super::stream::{Outgoing, StreamState};
use crate::identity::SpiffeId;
use crate::identity::authz::{PEER_ID_HEADER, authorize_node, effective_peer};
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::status::{ClientStatus, SyncRegistry, unix_now};

pub const ENV_METADATA_KEY: &str = "tributary.io/env";
pub const GATEWAY_METADATA_KEY: &str = "tributary.io/gateway";
pub const SIDECAR_METADATA_KEY: &str = "tributary.io/sidecar";
pub const NAMESPACE_METADATA_KEY: &str = "tributary.io/namespace";
pub const SERVICE_ACCOUNT_METADATA_KEY: &str = "tributary.io/service-account";
const CONTROL_PLANE_ID: &str = "tributary";

/// Outbound responses buffered per stream. One response per type is in flight at
/// most, so the stream task never waits on this.
const OUTBOUND_BUFFER: usize = XdsType::COUNT + 1;

/// Most requests applied together before the stream answers.
const MAX_BURST: usize = 64;

/// How long a stream keeps its initial-sync slot if its client never ACKs.
const ADMISSION_TIMEOUT: Duration = Duration::from_secs(10);

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
            namespace: meta(NAMESPACE_METADATA_KEY),
            service_account: meta(SERVICE_ACCOUNT_METADATA_KEY),
        })
    }
}

/// Shared by every stream of one hub.
#[derive(Debug)]
pub struct AdsServer {
    snapshots: Arc<Snapshots>,
    registry: Arc<SyncRegistry>,
    metrics: Arc<Metrics>,
    default_env: String,
    limits: StreamLimits,
    next_id: AtomicU64,
    /// False until the hub's start-up sync wait is over: streams hold their first
    /// response until then.
    synced: watch::Receiver<bool>,
    /// Turns true when the hub shuts down: every stream ends with UNAVAILABLE so its
    /// client reconnects elsewhere or later.
    stopping: watch::Receiver<bool>,
    /// Initial-sync slots: a reconnect storm is admitted through this, not all at once.
    admission: Arc<tokio::sync::Semaphore>,
    /// The replica's membership: clients of shards assigned to other replicas are refused.
    membership: Option<Membership>,
    /// The trust domain of peers' SPIFFE ids (mutual TLS).
    trust_domain: String,
    /// Workload certificates (SDS); `None`: the hub serves no secrets.
    secrets: Option<Arc<Secrets>>,
}

impl AdsServer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        snapshots: Arc<Snapshots>,
        registry: Arc<SyncRegistry>,
        metrics: Arc<Metrics>,
        default_env: String,
        limits: StreamLimits,
        synced: watch::Receiver<bool>,
        stopping: watch::Receiver<bool>,
        max_initial_syncs: usize,
    ) -> Self {
        Self {
            snapshots,
            registry,
            metrics,
            default_env,
            limits,
            next_id: AtomicU64::new(1),
            synced,
            stopping,
            admission: Arc::new(tokio::sync::Semaphore::new(max_initial_syncs.max(1))),
            membership: None,
            trust_domain: crate::identity::tls::DEFAULT_TRUST_DOMAIN.to_string(),
            secrets: None,
        }
    }

    /// Serves each stream its own identity's secrets (SDS) from `secrets`.
    pub fn with_secrets(mut self, secrets: Arc<Secrets>) -> Self {
        self.secrets = Some(secrets);
        self
    }

    /// The trust domain whose SPIFFE ids peers' certificates carry.
    pub fn with_trust_domain(mut self, trust_domain: String) -> Self {
        self.trust_domain = trust_domain;
        self
    }

    /// Who the stream is for, from its TLS session (and a router's forwarded id).
    fn stream_peer<T>(&self, request: &Request<T>) -> Result<Option<SpiffeId>, Status> {
        let direct = crate::identity::tls::request_peer(request, &self.trust_domain)?;
        let forwarded: Vec<&str> = request
            .metadata()
            .get_all(PEER_ID_HEADER)
            .iter()
            .map(|v| v.to_str().unwrap_or(""))
            .collect();
        effective_peer(direct, &forwarded, &self.trust_domain)
    }

    /// Refuses clients of shards that `membership`'s assignment gives to other replicas.
    pub fn with_membership(mut self, membership: Membership) -> Self {
        self.membership = Some(membership);
        self
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
        let peer_id = self.stream_peer(&request)?;
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let ctx = self.context(peer, peer_id);
        tokio::spawn(run::<Sotw>(ctx, request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        let peer_id = self.stream_peer(&request)?;
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let ctx = self.context(peer, peer_id);
        tokio::spawn(run::<Delta>(ctx, request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl AdsServer {
    fn context(&self, peer: Option<SocketAddr>, peer_id: Option<SpiffeId>) -> StreamContext {
        StreamContext {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            peer_id,
            snapshots: self.snapshots.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            default_env: self.default_env.clone(),
            limits: self.limits,
            synced: self.synced.clone(),
            stopping: self.stopping.clone(),
            admission: self.admission.clone(),
            membership: self.membership.clone(),
            secrets: self.secrets.clone(),
        }
    }
}

struct StreamContext {
    id: u64,
    peer: Option<SocketAddr>,
    /// The certified identity the stream serves; `None` on a plaintext hub.
    peer_id: Option<SpiffeId>,
    snapshots: Arc<Snapshots>,
    registry: Arc<SyncRegistry>,
    metrics: Arc<Metrics>,
    default_env: String,
    limits: StreamLimits,
    synced: watch::Receiver<bool>,
    stopping: watch::Receiver<bool>,
    admission: Arc<tokio::sync::Semaphore>,
    membership: Option<Membership>,
    secrets: Option<Arc<Secrets>>,
}

// ---- the two wire dialects ------------------------------------------------------

/// What differs between SotW and Delta: decoding requests, encoding responses.
trait Dialect: Send + 'static {
    type Req: Send + 'static;
    type Resp: Send + 'static;
    const NAME: &'static str;
    const SOTW: bool;
    fn node(req: &Self::Req) -> Option<&Node>;
    fn type_url(req: &Self::Req) -> &str;
    /// Applies the request to the stream's state for its type.
    fn apply(req: Self::Req, ty: XdsType, state: &mut StreamState) -> Result<(), Status>;
    fn response(out: Outgoing, ty: XdsType) -> Self::Resp;
}

struct Sotw;
struct Delta;

impl Dialect for Sotw {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponseWire;
    const NAME: &'static str = "sotw";
    const SOTW: bool = true;

    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn type_url(req: &DiscoveryRequest) -> &str {
        &req.type_url
    }

    fn apply(req: DiscoveryRequest, ty: XdsType, state: &mut StreamState) -> Result<(), Status> {
        state.sotw_request(&req, ty)
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
    const SOTW: bool = false;

    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn type_url(req: &DeltaDiscoveryRequest) -> &str {
        &req.type_url
    }

    fn apply(
        req: DeltaDiscoveryRequest,
        ty: XdsType,
        state: &mut StreamState,
    ) -> Result<(), Status> {
        state.delta_request(req, ty)
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

// ---- the stream task ------------------------------------------------------------

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

/// The snapshots a node is served: its zone's view of its environment when the
/// environment has zone views (cross-zone locality, `index::zones`), else the
/// environment's. Chosen once per stream.
fn subscribe_view(
    snapshots: &Snapshots,
    environment: &str,
    zone: Option<&str>,
) -> Option<watch::Receiver<Arc<Snapshot>>> {
    zone.filter(|z| !z.is_empty())
        .and_then(|z| snapshots.subscribe(&crate::index::zones::view_name(environment, z)))
        .or_else(|| snapshots.subscribe(environment))
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
    let zone = node.locality.as_ref().map(|l| l.zone.clone());
    // Environment and role come from the certificate; the node's metadata may only
    // repeat them (nothing is sent to a node whose claims differ).
    let node = authorize_node(
        ctx.peer_id.as_ref(),
        NodeInfo::from_node(node, "")?,
        &ctx.default_env,
    )?;
    if let Some(why) =
        (ctx.membership.as_ref()).and_then(|m| m.refusal(&node.environment, zone.as_deref()))
    {
        return Err(Status::failed_precondition(why));
    }
    let mut own_secrets = super::secrets::StreamSecrets::new(ctx.secrets.clone(), &node)?;
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

    // An environment the hub does not serve (yet) costs nothing: the stream waits
    // for it to appear without creating it.
    let mut created = ctx.snapshots.watch_created();
    created.borrow_and_update();
    let mut snapshots: Option<watch::Receiver<Arc<Snapshot>>> =
        subscribe_view(&ctx.snapshots, &node.environment, zone.as_deref());
    if snapshots.is_none() {
        warn!(
            environment = %node.environment,
            known = ?ctx.snapshots.environments(),
            "the node names an environment this hub does not serve; it gets nothing until that environment has config"
        );
    }
    let mut held = ctx.snapshots.withdrawals_held();
    let status = Arc::new(Mutex::new(ClientStatus {
        node_id: node.id.clone(),
        cluster: node.cluster.clone(),
        environment: node.environment.clone(),
        environment_served: snapshots.is_some(),
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
    let mut state = StreamState::new(
        node,
        D::SOTW,
        ctx.limits,
        status.clone(),
        ctx.metrics.clone(),
    );

    let mut next = Some(first);
    loop {
        // Apply this request and any that have already arrived before answering: a
        // client that (re)connects sends a burst (Envoy: every type, with what it
        // holds), and answering the first before reading the rest would, e.g.,
        // remove a cluster that a route the client has not yet told us about names.
        let mut burst = 0;
        while let Some(req) = next.take() {
            let url = D::type_url(&req).to_string();
            let Some(ty) = XdsType::from_type_url(&url) else {
                let supported: Vec<&str> = XdsType::ALL.iter().map(|t| t.type_url()).collect();
                return Err(Status::invalid_argument(format!(
                    "unsupported type_url {url:?}; this server serves {}",
                    supported.join(", ")
                )));
            };
            ctx.metrics.xds_requests.get_or_create(&ty.into()).inc();
            D::apply(req, ty, &mut state)?;
            state.record_subscription(ty);
            burst += 1;
            if burst < MAX_BURST {
                match inbound.message().now_or_never() {
                    Some(Ok(Some(req))) => next = Some(req),
                    Some(Ok(None)) => return Ok(()),
                    Some(Err(status)) => {
                        debug!(%status, "client stream error");
                        return Ok(());
                    }
                    None => {}
                }
            }
        }
        own_secrets.start_if_asked(&state);
        if let Some(rx) = snapshots.as_mut() {
            let snap = rx.borrow_and_update().clone();
            let hold = *held.borrow_and_update();
            let secrets = own_secrets.current(&snap);
            pump::<D>(&mut state, &snap, secrets.as_deref(), hold, tx).await?;
        }
        if admitted
            .as_ref()
            .is_some_and(|(_, since)| state.synced() || since.elapsed() > ADMISSION_TIMEOUT)
        {
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
            changed = async { snapshots.as_mut()?.changed().await.ok() }, if snapshots.is_some() => {
                if changed.is_none() {
                    break;
                }
            }
            _ = own_secrets.changed() => {}
            _ = created.changed(), if snapshots.is_none() => {
                snapshots = subscribe_view(&ctx.snapshots, &state.node.environment, zone.as_deref());
                if snapshots.is_some() {
                    info!("the node's environment now has config");
                    status.lock().unwrap().environment_served = true;
                }
            }
            changed = held.changed() => {
                if changed.is_err() {
                    break;
                }
                if !*held.borrow() {
                    // Withheld removals and full sets go out now.
                    state.reconcile_all();
                }
            }
            _ = stopping.wait_for(|s| *s) => {
                return Err(Status::unavailable("the hub is shutting down"));
            }
            // A client that never ACKs its initial sync gives its slot back.
            _ = tokio::time::sleep(ADMISSION_TIMEOUT), if admitted.is_some() => {}
        }
    }
    info!("disconnected");
    Ok(())
}

/// Sends whatever the client needs, type by type in make-before-break order. A
/// second pass lets what the first settled release held-back removals (a cluster
/// leaves once the routes that named it are answered). Secrets come from
/// `secrets` (the stream's own, see [`super::secrets`]), never from `snap`.
async fn pump<D: Dialect>(
    state: &mut StreamState,
    snap: &Snapshot,
    secrets: Option<&Snapshot>,
    hold: bool,
    tx: &mpsc::Sender<Result<D::Resp, Status>>,
) -> Result<(), Status> {
    let started = Instant::now();
    for _pass in 0..2 {
        for ty in XdsType::ALL {
            let snap = match (ty, secrets) {
                // Secrets only ever come from the stream's own (`secrets::StreamSecrets`);
                // none while its certificate is being issued (not even "does not exist").
                (XdsType::Secret, Some(own)) => own,
                (XdsType::Secret, None) => continue,
                _ => snap,
            };
            if state.gated(ty, snap) {
                continue;
            }
            if let Some(out) = state.build(ty, snap, hold)
                && tx.send(Ok(D::response(out, ty))).await.is_err()
            {
                return Err(Status::cancelled("client went away"));
            }
        }
    }
    state
        .metrics()
        .xds_pump_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(())
}
