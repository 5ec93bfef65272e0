//! The HTTP connection manager's data path: one request in, routed by the listener's
//! route table (virtual host by Host/`:authority`, then the first matching route), to
//! a cluster (weighted), to an endpoint (load balancing), with the route's timeout and
//! retry policy, under the cluster's circuit breakers; HTTP/1.1 and HTTP/2 (h2c, gRPC)
//! on both sides.
//!
//! Per request: one lock-free load of the config snapshot (kept to the end, so a
//! reconfiguration never changes a request in flight), hash lookups for the route
//! table and the cluster, precompiled matchers, pooled upstream connections. Headers
//! are moved, not copied, unless the route retries (which needs the request again).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::http::uri::{PathAndQuery, Scheme};
use hyper::http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version, header};

use crate::Shared;
use crate::cluster::{
    Admission, Cluster, Exchange, InFlight, RetrySlot, Unavailable, UpstreamBody,
};
use crate::config::{Outcome, RequestHeaders, RetryPolicy, RouteAction, Snapshot};
use crate::deadline::Deadline;

pub type ResponseBody = Either<Guarded, Full<Bytes>>;

/// An upstream response body that keeps its request counted, against the cluster's
/// `max_requests` and as active on its endpoint (least request), and its HTTP/1.1
/// connection busy (not to be closed for another endpoint's request), until it ends.
#[derive(Debug)]
pub struct Guarded {
    inner: Incoming,
    in_flight: Option<InFlight>,
    admission: Option<Admission>,
    exchange: Option<Exchange>,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let frame = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(None | Some(Err(_))) = &frame {
            self.in_flight = None;
            self.admission = None;
            self.exchange = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Largest request body buffered for a route that retries (Envoy's default buffer limit).
pub const RETRY_BUFFER_LIMIT: usize = 1 << 20;
/// Base of the jittered exponential back-off between retries (Envoy's default).
const RETRY_BASE: Duration = Duration::from_millis(25);

/// A reply the proxy makes itself (no route, a circuit breaker, an upstream failure),
/// the same on hyper's path and on the HTTP/1.1 fast path ([`crate::http1`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local {
    pub status: StatusCode,
    pub text: &'static str,
    /// A circuit breaker is open: Envoy's `x-envoy-overloaded: true`.
    pub overloaded: bool,
}

impl Local {
    pub const fn new(status: StatusCode, text: &'static str) -> Local {
        Local {
            status,
            text,
            overloaded: false,
        }
    }

    pub fn response(self) -> Response<ResponseBody> {
        let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
            self.text.as_bytes(),
        ))));
        *r.status_mut() = self.status;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        if self.overloaded {
            r.headers_mut()
                .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
        }
        r
    }
}

/// A circuit breaker is open (503, `x-envoy-overloaded`).
pub const OVERFLOW: Local = Local {
    status: StatusCode::SERVICE_UNAVAILABLE,
    text: "upstream overflow",
    overloaded: true,
};
/// The route's timeout passed before the upstream's response head arrived.
pub const ROUTE_TIMEOUT: Local =
    Local::new(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
/// A try's `per_try_timeout` passed.
pub const PER_TRY_TIMEOUT: Local =
    Local::new(StatusCode::GATEWAY_TIMEOUT, "upstream per-try timeout");
/// The upstream connection could not be made.
pub const CONNECT_ERROR: Local =
    Local::new(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error");
/// The upstream closed, reset or answered garbage before a response head.
pub const RESET: Local = Local::new(
    StatusCode::SERVICE_UNAVAILABLE,
    "upstream reset before headers",
);
/// A route that retries buffers the request body, up to [`RETRY_BUFFER_LIMIT`].
pub const TOO_LARGE_TO_RETRY: Local = Local::new(
    StatusCode::PAYLOAD_TOO_LARGE,
    "request body too large to retry",
);

/// A request the proxy will not forward as it is (several `Host` fields, a `Host`
/// that disagrees with the target's authority).
pub const BAD_REQUEST: Local = Local::new(StatusCode::BAD_REQUEST, "bad request");

/// Whether a request names its host ambiguously: several `Host` fields (RFC 9112
/// §3.2), or a `Host` other than the authority of its absolute-form target (or of
/// HTTP/2's `:authority`, RFC 9113 §8.3.1). Routing by one while the upstream reads
/// the other would let a client pick a route its `Host` does not.
fn ambiguous_host(uri: &Uri, headers: &HeaderMap) -> bool {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return true;
    }
    match (uri.authority(), host) {
        (Some(a), Some(h)) => {
            let a = a.as_str();
            let a = a.rsplit_once('@').map_or(a, |(_, a)| a);
            !a.as_bytes().eq_ignore_ascii_case(h.as_bytes())
        }
        _ => false,
    }
}

/// Hop-by-hop headers, never forwarded (RFC 9110 §7.6.1); `te` survives as `trailers` (gRPC).
fn strip_hop_by_hop(h: &mut HeaderMap) {
    if let Some(c) = h.get(header::CONNECTION).cloned() {
        if let Ok(c) = c.to_str() {
            for name in c.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                h.remove(name);
            }
        }
        h.remove(header::CONNECTION);
    }
    for name in ["keep-alive", "proxy-connection", "upgrade"] {
        h.remove(name);
    }
    // `chunked` is the connection's framing (hyper writes its own), but other codings
    // (`gzip, chunked`) describe the content and go on: hyper keeps a
    // `transfer-encoding` it is given and frames it with `chunked` last.
    let codings = h.get_all(header::TRANSFER_ENCODING).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .map(<[u8]>::trim_ascii)
            .any(|t| !t.is_empty() && !t.eq_ignore_ascii_case(b"chunked"))
    });
    if !codings {
        h.remove(header::TRANSFER_ENCODING);
    }
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

/// What one downstream connection's requests are served with: the listener's HTTP
/// connection manager, and the client's certificate element when it presented one.
#[derive(Debug, Clone)]
pub struct Downstream {
    /// The route table, read over RDS from the snapshot unless `inline`.
    pub route_config: Arc<str>,
    pub inline: Option<Arc<crate::config::RouteTable>>,
    pub xfcc: crate::config::Xfcc,
    /// The `x-forwarded-client-cert` element of an mTLS client ([`crate::tls::Accepted`]).
    pub client_cert: Option<HeaderValue>,
}

const XFCC: &str = "x-forwarded-client-cert";

impl Downstream {
    /// Whether a request without a client certificate (plaintext, the HTTP/1.1 fast
    /// path) keeps the `x-forwarded-client-cert` it came with; [`Self::client_cert_header`]
    /// decides the same for hyper's path.
    pub fn keeps_xfcc_without_cert(&self) -> bool {
        self.xfcc == crate::config::Xfcc::AlwaysForwardOnly
    }

    /// Applies `forward_client_cert_details` to the request's headers.
    fn client_cert_header(&self, h: &mut HeaderMap) {
        use crate::config::Xfcc;
        match (self.xfcc, &self.client_cert) {
            (Xfcc::AlwaysForwardOnly, _) | (Xfcc::ForwardOnly, Some(_)) => {}
            (Xfcc::SanitizeSet, Some(v)) => {
                h.insert(XFCC, v.clone());
            }
            (Xfcc::AppendForward, Some(v)) => {
                let joined = match h.get(XFCC) {
                    Some(old) => {
                        let mut b = old.as_bytes().to_vec();
                        b.push(b',');
                        b.extend_from_slice(v.as_bytes());
                        HeaderValue::from_bytes(&b).unwrap_or_else(|_| v.clone())
                    }
                    None => v.clone(),
                };
                h.insert(XFCC, joined);
            }
            _ => {
                h.remove(XFCC);
            }
        }
    }
}

/// The route action for a request (virtual host by `host`, then the first route whose
/// match accepts `path` and `headers`): the one place both paths decide routes.
pub fn route<'a, H: RequestHeaders + ?Sized>(
    shared: &Shared,
    downstream: &'a Downstream,
    snapshot: &'a Snapshot,
    host: &str,
    path: &str,
    headers: &H,
) -> Result<&'a RouteAction, Local> {
    let table = match &downstream.inline {
        Some(t) => t,
        None => match snapshot.routes.get(&downstream.route_config) {
            Some(t) => t,
            None => {
                shared.metrics.no_route.inc();
                return Err(Local::new(StatusCode::NOT_FOUND, "no route table"));
            }
        },
    };
    let Some(vhost) = table.virtual_host(host) else {
        shared.metrics.no_route.inc();
        return Err(Local::new(StatusCode::NOT_FOUND, "no virtual host"));
    };
    let Some(route) = vhost.route(path, headers) else {
        shared.metrics.no_route.inc();
        return Err(Local::new(StatusCode::NOT_FOUND, "no route"));
    };
    Ok(&route.action)
}

/// The cluster `action` picks (weighted), admitted under its circuit breakers.
pub fn admit(
    shared: &Shared,
    snapshot: &Snapshot,
    action: &RouteAction,
) -> Result<(Arc<Cluster>, Admission), Local> {
    let name = action.clusters.pick(|total| fastrand::u64(0..total));
    let Some(cluster) = snapshot.clusters.get(name) else {
        shared.metrics.no_route.inc();
        return Err(Local::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster not found",
        ));
    };
    let cluster = cluster.clone();
    let Ok(admission) = cluster.admit() else {
        return Err(OVERFLOW);
    };
    Ok((cluster, admission))
}

/// One downstream connection's route timer on hyper's path: a [`Deadline`] kept from
/// one request to the next, as the fast path keeps one per connection, so that a
/// route timeout does not register (and remove) a timer with tokio's driver per
/// request. It is lent to one request at a time: HTTP/1.1's requests come one after
/// another; HTTP/2's streams run at once, and one that finds it lent to another
/// stream times itself with its own timer (one `Sleep` serves one deadline; sharing it
/// among streams would take a timer queue per connection).
#[derive(Debug, Default)]
pub struct RouteTimer(std::sync::Mutex<TimerSlot>);

#[derive(Debug, Default)]
enum TimerSlot {
    /// Not made yet (a connection whose routes have no timeout never needs one).
    #[default]
    None,
    Home(Deadline),
    Lent,
}

impl RouteTimer {
    /// The connection's timer, unless another request holds it.
    fn lend(&self) -> Option<LentTimer<'_>> {
        let mut slot = self.0.lock().ok()?;
        let deadline = match std::mem::replace(&mut *slot, TimerSlot::Lent) {
            TimerSlot::Home(d) => d,
            TimerSlot::None => Deadline::new(),
            TimerSlot::Lent => return None,
        };
        Some(LentTimer {
            home: self,
            deadline: Some(deadline),
        })
    }
}

/// The connection's timer while a request holds it; back home when dropped (the
/// request answered, timed out, or cancelled).
struct LentTimer<'a> {
    home: &'a RouteTimer,
    deadline: Option<Deadline>,
}

impl LentTimer<'_> {
    fn deadline(&mut self) -> &mut Deadline {
        self.deadline.as_mut().expect("held until dropped")
    }
}

impl Drop for LentTimer<'_> {
    fn drop(&mut self) {
        if let (Some(d), Ok(mut slot)) = (self.deadline.take(), self.home.0.lock()) {
            *slot = TimerSlot::Home(d);
        }
    }
}

/// Serves one request arriving on a listener whose manager is `downstream`, on a
/// connection whose route timer is `timer`.
pub async fn handle(
    shared: Arc<Shared>,
    downstream: Arc<Downstream>,
    timer: Arc<RouteTimer>,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    if ambiguous_host(req.uri(), req.headers()) {
        let mut r = BAD_REQUEST.response();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(r);
    }
    downstream.client_cert_header(req.headers_mut());
    let snapshot = shared.snapshot.load_full();
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    let action = match route(
        &shared,
        &downstream,
        &snapshot,
        host,
        req.uri().path(),
        req.headers(),
    ) {
        Ok(a) => a,
        Err(l) => return Ok(l.response()),
    };
    let (cluster, admission) = match admit(&shared, &snapshot, action) {
        Ok(c) => c,
        Err(l) => return Ok(l.response()),
    };
    let retry = action.retry.clone().filter(|r| r.num_retries > 0);
    let forward = forward(cluster, req, retry);
    let mut response = match action.timeout {
        Some(t) => {
            let answered = match timer.lend() {
                Some(mut lent) => tokio::select! {
                    biased;
                    r = forward => Some(r),
                    () = lent.deadline().after(t) => None,
                },
                None => tokio::time::timeout(t, forward).await.ok(),
            };
            answered.unwrap_or_else(|| ROUTE_TIMEOUT.response())
        }
        None => forward.await,
    };
    if let Either::Left(body) = response.body_mut() {
        body.admission = Some(admission);
    }
    Ok(response)
}

/// A request's retries under its route's policy, for both paths: counts the tries,
/// holds one slot from the cluster's retry budget while it retries, and names the
/// endpoint the next try avoids.
#[derive(Debug)]
pub struct Retries {
    pub policy: RetryPolicy,
    tries: u32,
    slot: Option<RetrySlot>,
    /// The endpoint the last try failed on.
    pub avoid: Option<std::net::SocketAddr>,
}

impl Retries {
    pub fn new(policy: RetryPolicy) -> Retries {
        Retries {
            policy,
            tries: 0,
            slot: None,
            avoid: None,
        }
    }

    /// After a try to `endpoint` ended with `outcome` (already [`finished`]): the
    /// jittered back-off to wait before the next try, or `None` when this try's
    /// answer is the request's.
    pub fn again(
        &mut self,
        cluster: &Arc<Cluster>,
        endpoint: std::net::SocketAddr,
        outcome: Outcome,
    ) -> Option<Duration> {
        if self.tries >= self.policy.num_retries || !self.policy.retries(outcome) {
            return None;
        }
        // One retry slot from the budget per request, held while it retries.
        if self.slot.is_none() {
            self.slot = cluster.retry_slot();
            self.slot.as_ref()?;
        }
        self.tries += 1;
        cluster.stats.retries.inc();
        self.avoid = Some(endpoint);
        let cap = RETRY_BASE.as_millis() as u64 * (1u64 << self.tries.min(6));
        Some(Duration::from_millis(fastrand::u64(0..cap.max(1))))
    }
}

/// Records how a try to `endpoint` ended: outlier detection's input and the stats.
pub fn finished(cluster: &Cluster, endpoint: &crate::cluster::Endpoint, outcome: Outcome) {
    cluster.record(endpoint, outcome);
    count(cluster, outcome);
}

/// The upstream request's head, reusable across tries.
struct Head {
    method: hyper::Method,
    path_and_query: PathAndQuery,
    headers: HeaderMap,
    version: Version,
}

impl Head {
    fn request(
        &self,
        endpoint: &crate::cluster::Endpoint,
        body: UpstreamBody,
    ) -> Request<UpstreamBody> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = upstream_uri(endpoint, self.path_and_query.clone());
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

async fn forward(
    cluster: Arc<Cluster>,
    req: Request<Incoming>,
    retry: Option<RetryPolicy>,
) -> Response<ResponseBody> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let version = if cluster.def.http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };

    let Some(policy) = retry else {
        // No retries: the request is moved upstream as it is, body streamed.
        let endpoint = match cluster.pick(None) {
            Ok(e) => e,
            Err(u) => return unavailable(u),
        };
        let mut r = Request::from_parts(parts, Either::Left(body));
        *r.uri_mut() = upstream_uri(&endpoint.endpoint, path_and_query);
        *r.version_mut() = version;
        cluster.stats.requests.inc();
        let result = cluster.client().request(r).await;
        let (outcome, response) = classify(result, &endpoint);
        finished(&cluster, &endpoint.endpoint, outcome);
        return response;
    };

    // Retries: the body is buffered so that each try can send it. One declared over
    // the limit is refused before it is first read, so before hyper tells a client
    // that sent `Expect: 100-continue` to send it.
    if hyper::body::Body::size_hint(&body).lower() > RETRY_BUFFER_LIMIT as u64 {
        return TOO_LARGE_TO_RETRY.response();
    }
    let body = match Limited::new(body, RETRY_BUFFER_LIMIT).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return TOO_LARGE_TO_RETRY.response(),
    };
    let head = Head {
        method: parts.method,
        path_and_query,
        headers: parts.headers,
        version,
    };
    let mut retries = Retries::new(policy);
    loop {
        let endpoint = match cluster.pick(retries.avoid) {
            Ok(e) => e,
            Err(u) => return unavailable(u),
        };
        let request = head.request(&endpoint.endpoint, Either::Right(Full::new(body.clone())));
        cluster.stats.requests.inc();
        let attempt = cluster.client().request(request);
        let (outcome, response) = match retries.policy.per_try_timeout {
            Some(t) => match tokio::time::timeout(t, attempt).await {
                Ok(r) => classify(r, &endpoint),
                Err(_) => (Outcome::Timeout, PER_TRY_TIMEOUT.response()),
            },
            None => classify(attempt.await, &endpoint),
        };
        finished(&cluster, &endpoint.endpoint, outcome);
        let Some(backoff) = retries.again(&cluster, endpoint.endpoint.address, outcome) else {
            return response;
        };
        drop(endpoint);
        drop(response);
        tokio::time::sleep(backoff).await;
    }
}

fn upstream_uri(endpoint: &crate::cluster::Endpoint, path_and_query: PathAndQuery) -> Uri {
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(endpoint.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .expect("scheme, authority and path make a URI")
}

pub fn count(cluster: &Cluster, outcome: Outcome) {
    match outcome {
        Outcome::Status(s) if s >= 500 => cluster.stats.responses_5xx.inc(),
        Outcome::Status(s) if s >= 400 => cluster.stats.responses_4xx.inc(),
        Outcome::Status(_) => cluster.stats.responses_2xx.inc(),
        _ => cluster.stats.failures.inc(),
    };
}

/// The reply when no endpoint could take a request.
pub fn unavailable_reply(u: Unavailable) -> Local {
    match u {
        Unavailable::NoHealthyUpstream => {
            Local::new(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream")
        }
        Unavailable::Overflow => OVERFLOW,
    }
}

fn unavailable(u: Unavailable) -> Response<ResponseBody> {
    unavailable_reply(u).response()
}

fn classify(
    result: Result<Response<Incoming>, hyper_util::client::legacy::Error>,
    endpoint: &InFlight,
) -> (Outcome, Response<ResponseBody>) {
    match result {
        Ok(r) => {
            let status = r.status().as_u16();
            let (mut parts, body) = r.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let exchange = Exchange::of(&mut parts.extensions);
            (
                Outcome::Status(status),
                Response::from_parts(
                    parts,
                    Either::Left(Guarded {
                        inner: body,
                        in_flight: Some(endpoint.again()),
                        admission: None,
                        exchange,
                    }),
                ),
            )
        }
        Err(e) if e.is_connect() => (Outcome::ConnectFailure, CONNECT_ERROR.response()),
        Err(e) => {
            tracing::debug!(error = %e, "upstream reset before headers");
            (Outcome::Reset, RESET.response())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    /// A connection's route timer goes to one request at a time, and comes back with
    /// its registration when the request ends however it ends: the next request
    /// within the slack keeps it (no new timer with the driver) and still times out
    /// exactly on its own deadline; a request that finds it lent times itself.
    #[tokio::test(start_paused = true)]
    async fn a_connections_route_timer_is_kept_from_one_request_to_the_next() {
        let timer = RouteTimer::default();
        let t = Duration::from_secs(15);
        let first = Instant::now();
        {
            let mut lent = timer.lend().expect("free");
            assert!(timer.lend().is_none(), "lent to one request at a time");
            // Answered after 10 ms: the timer stays registered for first + 15 s.
            tokio::select! {
                () = lent.deadline().after(t) => panic!("fired early"),
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
        let mut lent = timer.lend().expect("back home once the request ended");
        assert_eq!(lent.deadline().registered(), first + t);
        // The next request's deadline is 10 ms later, within the slack: the timer is
        // not moved, fires 10 ms ahead and waits out the rest.
        let second = Instant::now();
        lent.deadline().after(t).await;
        assert_eq!(Instant::now(), second + t, "never early, never late");
        drop(lent);

        // A request cancelled while it holds the timer gives it back too.
        let held = async {
            let mut lent = timer.lend().unwrap();
            lent.deadline().after(t).await;
        };
        tokio::select! {
            () = held => panic!("fired early"),
            () = tokio::time::sleep(Duration::from_millis(1)) => {}
        }
        assert!(timer.lend().is_some());
    }
}
