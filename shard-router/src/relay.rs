//! The relay: a `tower::Service` over HTTP/2 requests that routes each ADS stream by
//! its first request and then passes bytes through.
//!
//! For each stream it reads body frames until the first gRPC message is whole
//! ([`FirstMessage`]), decodes only the node from it ([`node_of`]), asks the
//! [`Table`] for a replica, and opens the same method on that replica with the bytes
//! read so far re-sent verbatim followed by the rest of the client's body as it comes.
//! The replica's response (headers, body frames, trailers) goes back as is. Nothing
//! after the first message is decoded, in either direction.
//!
//! The response body is wrapped ([`Relayed`]) so that the stream ends with
//! `UNAVAILABLE` trailers when the replica leaves the shard (the table's gone signal)
//! or the connection to it fails; the client then reconnects through the router and
//! lands on a live replica. A refused stream gets a trailers-only gRPC error naming
//! what was missing or unknown and which shards exist.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::HeaderMap;
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tonic::Status;
use tracing::{Instrument, debug, info, info_span, warn};
use tributary_controlplane::identity::SpiffeId;
use tributary_controlplane::identity::authz::PEER_ID_HEADER;
use tributary_controlplane::identity::tls::ClientTls;

use tributary_proto::directory::v1::directory_server::DirectoryServer;

use crate::directory::DirectoryService;
use crate::first::{Dialect, FirstMessage, FirstRequestError, node_of};

/// Paths of the directory API, which the router serves itself.
const DIRECTORY_PREFIX: &str = "/tributary.directory.v1.Directory/";
use crate::metrics::{ReplicaLabels, RouterMetrics, ShardLabel};
use crate::table::{Refusal, Route, Table};
use crate::upstream::Upstream;

/// Who the client of a request is: the SPIFFE id its certificate carries (put in the
/// request's extensions by the listener), `None` on a plaintext (`--insecure`)
/// listener. The relay forwards it to the replica in [`PEER_ID_HEADER`], and never a
/// value the client sent itself.
#[derive(Debug, Clone, Default)]
pub struct ClientIdentity(pub Option<SpiffeId>);

/// Sets [`PEER_ID_HEADER`] of a request going to a replica to the client's certified
/// id, removing whatever the client put there: a hub believes the header from a
/// router, so a client must not be able to choose it.
pub fn set_forwarded_identity(headers: &mut HeaderMap, client: &ClientIdentity) {
    headers.remove(PEER_ID_HEADER);
    if let Some(id) = &client.0
        && let Ok(v) = hyper::header::HeaderValue::from_str(&id.to_string())
    {
        headers.insert(PEER_ID_HEADER, v);
    }
}

/// Bounds of the relay (flags of `tributary-router`).
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Largest first request read (`--max-first-request-bytes`).
    pub max_first_request_bytes: usize,
    /// How long a client may take to send its first request (`--first-request-timeout`).
    pub first_request_timeout: Duration,
    /// How long connecting to a replica may take (`--connect-timeout`).
    pub connect_timeout: Duration,
    /// How long a replica the relay could not reach is avoided for new streams
    /// (`--avoid-unreachable-for`).
    pub avoid_unreachable_for: Duration,
    /// Bytes of a relayed stream the router holds at most in each direction
    /// (`--stream-window`): its HTTP/2 window on the replica's connection, what it
    /// queues for a client that has not taken the bytes yet, and its HTTP/2 stream
    /// window on the client's connection.
    pub stream_window: u32,
    /// Streams a client may have open at once on one connection
    /// (`--max-streams-per-connection`, HTTP/2's `SETTINGS_MAX_CONCURRENT_STREAMS`;
    /// a client opens more as earlier ones end).
    pub max_streams_per_connection: u32,
}

/// `--stream-window`'s default: HTTP/2's own initial window (65,535 bytes), rounded.
pub const DEFAULT_STREAM_WINDOW: u32 = 64 << 10;

/// `--max-streams-per-connection`'s default.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 1024;

impl RelayLimits {
    /// The HTTP/2 window of a client's connection: the sum of the windows of the
    /// streams it may open (`--stream-window` × `--max-streams-per-connection`), at
    /// most HTTP/2's largest. What one stream holds stays bounded by its own window;
    /// a connection window of one stream's made a client's streams share it, so that
    /// one stream whose replica does not read stalled its siblings, and h2 (which
    /// closes a connection buffering more small DATA frames than half its window's
    /// worth of framing overhead) closed a connection of a few hundred streams whose
    /// first requests arrived faster than the relay read them.
    pub fn client_connection_window(&self) -> u32 {
        let sum = u64::from(self.stream_window) * u64::from(self.max_streams_per_connection);
        sum.min(u64::from(REPLICA_CONNECTION_WINDOW)) as u32
    }
}

/// The window of the one HTTP/2 connection to a replica, shared by every stream
/// relayed there: HTTP/2's largest. Memory is bounded per stream (`stream_window`);
/// a smaller connection window would let a few clients that read slowly hold all of
/// it, and stall every other client of that replica (head-of-line blocking across
/// clients).
pub const REPLICA_CONNECTION_WINDOW: u32 = (1 << 31) - 1;

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_first_request_bytes: tributary_controlplane::app::DEFAULT_MAX_REQUEST_BYTES,
            first_request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            avoid_unreachable_for: Duration::from_secs(10),
            stream_window: DEFAULT_STREAM_WINDOW,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
        }
    }
}

/// The request body sent to the replica: the bytes read to route it, then the rest.
#[derive(Debug)]
pub struct Forwarded {
    first: Option<Bytes>,
    rest: Incoming,
}

impl Body for Forwarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(b) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }
}

/// Decrements a replica's stream gauge when the relayed stream ends.
#[derive(Debug)]
struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

type Gone = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The response body: the replica's, ended with `UNAVAILABLE` when the replica
/// leaves the shard or its connection fails.
pub struct Relayed {
    inner: Incoming,
    gone: Gone,
    ended: bool,
    route: Arc<str>,
    metrics: Arc<RouterMetrics>,
    /// Marks the replica unreachable when its connection breaks.
    on_failure: Option<Box<dyn FnOnce() + Send>>,
    _guard: StreamGuard,
}

impl std::fmt::Debug for Relayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relayed")
            .field("route", &self.route)
            .field("ended", &self.ended)
            .finish()
    }
}

fn trailers(status: &Status) -> HeaderMap {
    let mut h = HeaderMap::new();
    if status.add_header(&mut h).is_err() {
        // Only a message that cannot be a header value fails; the code alone still is.
        h.insert("grpc-status", (status.code() as i32).into());
    }
    h
}

impl Body for Relayed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if self.gone.as_mut().poll(cx).is_ready() {
            self.ended = true;
            self.metrics.ended_by_membership.inc();
            info!(route = %self.route, "replica left the shard: ending the relayed stream with UNAVAILABLE");
            let s = Status::unavailable(format!(
                "{} left its shard (lease expired, deregistered or reassigned); reconnect to be routed to a live replica",
                self.route
            ));
            return Poll::Ready(Some(Ok(Frame::trailers(trailers(&s)))));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_trailers() {
                    self.ended = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.ended = true;
                self.metrics.upstream_failures.inc();
                if let Some(f) = self.on_failure.take() {
                    f();
                }
                debug!(route = %self.route, error = %e, "the connection to the replica failed");
                let s = Status::unavailable(format!(
                    "the connection to {} failed: {e}; reconnect to be routed to a live replica",
                    self.route
                ));
                Poll::Ready(Some(Ok(Frame::trailers(trailers(&s)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A response body: relayed, the router's own gRPC service (the directory), or empty
/// (a trailers-only error).
#[derive(Debug, Default)]
pub enum RelayBody {
    Relayed(Box<Relayed>),
    Own(tonic::body::Body),
    #[default]
    Empty,
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        match self.get_mut() {
            RelayBody::Relayed(r) => Pin::new(r.as_mut())
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(|e| match e {}))),
            RelayBody::Own(b) => Pin::new(b).poll_frame(cx),
            RelayBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RelayBody::Relayed(r) => r.is_end_stream(),
            RelayBody::Own(b) => b.is_end_stream(),
            RelayBody::Empty => true,
        }
    }
}

/// Shared by every stream.
#[derive(Debug)]
struct Inner {
    /// The directory API, served here rather than relayed.
    directory: DirectoryServer<DirectoryService>,
    table: Arc<Table>,
    client: Client<Upstream, Forwarded>,
    metrics: Arc<RouterMetrics>,
    limits: RelayLimits,
}

/// The relay service (one clone per connection; they share everything).
#[derive(Debug, Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

impl Relay {
    /// `upstream_tls`: the router's own mutual TLS to the replicas; `None`: plaintext.
    pub fn new(
        table: Arc<Table>,
        metrics: Arc<RouterMetrics>,
        limits: RelayLimits,
        upstream_tls: Option<ClientTls>,
    ) -> Self {
        let connector = Upstream::new(upstream_tls, limits.connect_timeout);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .http2_initial_stream_window_size(limits.stream_window)
            .http2_initial_connection_window_size(REPLICA_CONNECTION_WINDOW)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(20))
            .build(connector);
        Self {
            inner: Arc::new(Inner {
                directory: DirectoryServer::new(DirectoryService::new(table.clone())),
                table,
                client,
                metrics,
                limits,
            }),
        }
    }
}

impl tower::Service<Request<Incoming>> for Relay {
    type Response = Response<RelayBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RelayBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        if req.uri().path().starts_with(DIRECTORY_PREFIX) {
            let mut directory = self.inner.directory.clone();
            return Box::pin(async move {
                let r = match tower::Service::call(&mut directory, req).await {
                    Ok(r) => r,
                    Err(e) => match e {},
                };
                Ok(r.map(RelayBody::Own))
            });
        }
        let inner = self.inner.clone();
        // Routing runs in a span that names the stream once its node is read.
        let span = info_span!(
            "route",
            node = tracing::field::Empty,
            shard = tracing::field::Empty,
            replica = tracing::field::Empty
        );
        Box::pin(
            async move {
                Ok(match inner.relay(req).await {
                    Ok(r) => r,
                    Err((reason, status)) => {
                        inner.metrics.refuse(reason);
                        info!(code = ?status.code(), message = status.message(), "stream refused");
                        status.into_http()
                    }
                })
            }
            .instrument(span),
        )
    }
}

type Refused = (&'static str, Status);

fn refusal(r: Refusal) -> Refused {
    let reason = match &r {
        Refusal::Invalid(_) => "invalid_node",
        Refusal::NotFound(_) => "unknown_shard",
        Refusal::Unavailable(_) => "no_live_replica",
    };
    (reason, Status::new(r.code(), r.to_string()))
}

impl Inner {
    async fn relay(&self, req: Request<Incoming>) -> Result<Response<RelayBody>, Refused> {
        let Some(dialect) = Dialect::from_path(req.uri().path()) else {
            return Err((
                "unknown_method",
                Status::unimplemented(format!(
                    "the shard router relays {} and {} (and serves {DIRECTORY_PREFIX}) only, not {}",
                    Dialect::SOTW_PATH,
                    Dialect::DELTA_PATH,
                    req.uri().path()
                )),
            ));
        };
        let (parts, mut body) = req.into_parts();
        let client = parts
            .extensions
            .get::<ClientIdentity>()
            .cloned()
            .unwrap_or_default();
        let mut first = FirstMessage::new(self.limits.max_first_request_bytes);
        let bad = |e: FirstRequestError| {
            let reason = match e {
                FirstRequestError::TooLarge { .. } => "first_request_too_large",
                _ => "bad_first_request",
            };
            (reason, Status::invalid_argument(e.to_string()))
        };
        let read = async {
            loop {
                match body.frame().await {
                    None => return Ok(None),
                    Some(Err(e)) => {
                        return Err((
                            "client_error",
                            Status::cancelled(format!("reading the first request failed: {e}")),
                        ));
                    }
                    Some(Ok(f)) => {
                        if let Ok(data) = f.into_data()
                            && let Some(len) = first.push(&data).map_err(bad)?
                        {
                            return Ok(Some(len));
                        }
                    }
                }
            }
        };
        let len = match tokio::time::timeout(self.limits.first_request_timeout, read).await {
            Err(_) => {
                return Err((
                    "first_request_timeout",
                    Status::deadline_exceeded(format!(
                        "no whole first request within --first-request-timeout ({})",
                        humantime::format_duration(self.limits.first_request_timeout)
                    )),
                ));
            }
            Ok(r) => r?,
        };
        let Some(len) = len else {
            // The client closed before its first request: nothing to route.
            return Err((
                "no_first_request",
                Status::invalid_argument("the stream ended before its first request"),
            ));
        };
        let mut node = node_of(dialect, first.message(len)).map_err(bad)?;
        // A certified workload or gateway that claims no environment is routed by the
        // one its certificate names (the replica checks any claim against it).
        if node.environment.is_none()
            && let Some(env) = client.0.as_ref().and_then(|id| id.identity.environment())
        {
            node.environment = Some(env.to_string());
        }
        let span = tracing::Span::current();
        span.record("node", node.id.as_str());
        let route = self.table.route(&node).map_err(refusal)?;
        let shard = route.shard.to_string();
        span.record("shard", shard.as_str());
        span.record("replica", &*route.replica);
        self.metrics
            .routed
            .get_or_create(&ShardLabel {
                shard: shard.clone(),
            })
            .inc();
        debug!(node = %node.id, %shard, replica = %route.replica, protocol = dialect.name(), "routed");
        self.forward(parts, first.into_bytes(), body, route, &client)
            .await
    }

    async fn forward(
        &self,
        parts: hyper::http::request::Parts,
        first: Bytes,
        rest: Incoming,
        route: Route,
        client: &ClientIdentity,
    ) -> Result<Response<RelayBody>, Refused> {
        let Route {
            shard,
            replica,
            addr,
            mut gone,
        } = route;
        let label = format!("replica {replica} ({addr}) of shard {shard}");
        let uri: Uri = match format!(
            "http://{addr}{}",
            parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
        )
        .parse()
        {
            Ok(u) => u,
            Err(e) => {
                return Err((
                    "bad_request",
                    Status::internal(format!("building the replica's URI: {e}")),
                ));
            }
        };
        let mut up = Request::from_parts(
            parts,
            Forwarded {
                first: Some(first),
                rest,
            },
        );
        *up.uri_mut() = uri;
        up.headers_mut().remove(hyper::header::HOST);
        set_forwarded_identity(up.headers_mut(), client);
        let gauge = self
            .metrics
            .streams
            .get_or_create(&ReplicaLabels {
                replica: replica.to_string(),
                shard: shard.to_string(),
            })
            .clone();
        let response = tokio::select! {
            r = self.client.request(up) => r,
            _ = gone.wait_for(|g| *g) => {
                return Err(("replica_left", Status::unavailable(format!("{label} left its shard while connecting; reconnect"))));
            }
        };
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                warn!(%replica, %addr, error = %e, "cannot reach the replica; avoiding it for new streams");
                self.metrics.upstream_failures.inc();
                self.table
                    .avoid(&replica, addr, self.limits.avoid_unreachable_for);
                return Err((
                    "replica_unreachable",
                    Status::unavailable(format!("cannot reach {label}: {e}; reconnect")),
                ));
            }
        };
        gauge.inc();
        let (parts, inner) = response.into_parts();
        let body = Relayed {
            inner,
            gone: Box::pin(async move {
                let _ = gone.wait_for(|g| *g).await;
            }),
            ended: false,
            route: Arc::from(label),
            metrics: self.metrics.clone(),
            on_failure: Some({
                let (table, hold) = (self.table.clone(), self.limits.avoid_unreachable_for);
                Box::new(move || table.avoid(&replica, addr, hold))
            }),
            _guard: StreamGuard(gauge),
        };
        Ok(Response::from_parts(
            parts,
            RelayBody::Relayed(Box::new(body)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_controlplane::identity::Identity;

    /// Whatever the client sent in `x-tributary-peer-id` never reaches a replica: a
    /// certified client's header is its certificate's id, a plaintext one's is gone.
    #[test]
    fn the_forwarded_identity_is_the_certified_one_never_the_clients() {
        let forged = "spiffe://tributary.local/env/prod/ns/shop/sa/web";
        let staging = SpiffeId::new(
            "tributary.local",
            Identity::Workload {
                env: "staging".into(),
                namespace: "shop".into(),
                service_account: "web".into(),
            },
        );
        let mut h = HeaderMap::new();
        h.insert(PEER_ID_HEADER, forged.parse().unwrap());
        set_forwarded_identity(&mut h, &ClientIdentity(Some(staging.clone())));
        let sent: Vec<_> = h.get_all(PEER_ID_HEADER).iter().collect();
        assert_eq!(sent, vec![staging.to_string().as_str()]);

        let mut h = HeaderMap::new();
        h.append(PEER_ID_HEADER, forged.parse().unwrap());
        h.append(PEER_ID_HEADER, forged.parse().unwrap());
        set_forwarded_identity(&mut h, &ClientIdentity(None));
        assert!(h.get(PEER_ID_HEADER).is_none(), "{h:?}");
    }
}
