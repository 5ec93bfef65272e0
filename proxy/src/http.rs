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
use crate::cluster::{Admission, Cluster, InFlight, Unavailable, UpstreamBody};
use crate::config::{Outcome, RetryPolicy};

pub type ResponseBody = Either<Guarded, Full<Bytes>>;

/// An upstream response body that keeps its request counted, against the cluster's
/// `max_requests` and as active on its endpoint (least request), until it ends.
#[derive(Debug)]
pub struct Guarded {
    inner: Incoming,
    in_flight: Option<InFlight>,
    admission: Option<Admission>,
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

fn local(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn overflow() -> Response<ResponseBody> {
    let mut r = local(StatusCode::SERVICE_UNAVAILABLE, "upstream overflow");
    r.headers_mut()
        .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    r
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
    for name in [
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(name);
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

/// Serves one request arriving on a listener whose manager is `downstream`.
pub async fn handle(
    shared: Arc<Shared>,
    downstream: Arc<Downstream>,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    downstream.client_cert_header(req.headers_mut());
    let snapshot = shared.snapshot.load_full();
    let table = match &downstream.inline {
        Some(t) => t,
        None => match snapshot.routes.get(&downstream.route_config) {
            Some(t) => t,
            None => {
                shared.metrics.no_route.inc();
                return Ok(local(StatusCode::NOT_FOUND, "no route table"));
            }
        },
    };
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
    let Some(vhost) = table.virtual_host(host) else {
        shared.metrics.no_route.inc();
        return Ok(local(StatusCode::NOT_FOUND, "no virtual host"));
    };
    let Some(route) = vhost.route(req.uri().path(), req.headers()) else {
        shared.metrics.no_route.inc();
        return Ok(local(StatusCode::NOT_FOUND, "no route"));
    };
    let action = &route.action;
    let name = action.clusters.pick(|total| fastrand::u64(0..total));
    let Some(cluster) = snapshot.clusters.get(name) else {
        shared.metrics.no_route.inc();
        return Ok(local(StatusCode::SERVICE_UNAVAILABLE, "cluster not found"));
    };
    let cluster = cluster.clone();
    let Ok(admission) = cluster.admit() else {
        return Ok(overflow());
    };
    let retry = action.retry.clone().filter(|r| r.num_retries > 0);
    let forward = forward(cluster, req, retry);
    let mut response = match action.timeout {
        Some(t) => match tokio::time::timeout(t, forward).await {
            Ok(r) => r,
            Err(_) => local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
        },
        None => forward.await,
    };
    if let Either::Left(body) = response.body_mut() {
        body.admission = Some(admission);
    }
    Ok(response)
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
        cluster.record(&endpoint.endpoint, outcome);
        count(&cluster, outcome);
        return response;
    };

    // Retries: the body is buffered so that each try can send it.
    let body = match Limited::new(body, RETRY_BUFFER_LIMIT).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return local(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large to retry",
            );
        }
    };
    let head = Head {
        method: parts.method,
        path_and_query,
        headers: parts.headers,
        version,
    };
    let mut avoid = None;
    let mut slot = None;
    let mut tries = 0u32;
    loop {
        let endpoint = match cluster.pick(avoid) {
            Ok(e) => e,
            Err(u) => return unavailable(u),
        };
        let request = head.request(&endpoint.endpoint, Either::Right(Full::new(body.clone())));
        cluster.stats.requests.inc();
        let attempt = cluster.client().request(request);
        let (outcome, response) = match policy.per_try_timeout {
            Some(t) => match tokio::time::timeout(t, attempt).await {
                Ok(r) => classify(r, &endpoint),
                Err(_) => (
                    Outcome::Timeout,
                    local(StatusCode::GATEWAY_TIMEOUT, "upstream per-try timeout"),
                ),
            },
            None => classify(attempt.await, &endpoint),
        };
        cluster.record(&endpoint.endpoint, outcome);
        count(&cluster, outcome);
        if tries >= policy.num_retries || !policy.retries(outcome) {
            return response;
        }
        // One retry slot from the budget per request, held while it retries.
        if slot.is_none() {
            slot = cluster.retry_slot();
            if slot.is_none() {
                return response;
            }
        }
        tries += 1;
        cluster.stats.retries.inc();
        avoid = Some(endpoint.endpoint.address);
        drop(endpoint);
        drop(response);
        let cap = RETRY_BASE.as_millis() as u64 * (1u64 << tries.min(6));
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..cap.max(1)))).await;
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

fn count(cluster: &Cluster, outcome: Outcome) {
    match outcome {
        Outcome::Status(s) if s >= 500 => cluster.stats.responses_5xx.inc(),
        Outcome::Status(s) if s >= 400 => cluster.stats.responses_4xx.inc(),
        Outcome::Status(_) => cluster.stats.responses_2xx.inc(),
        _ => cluster.stats.failures.inc(),
    };
}

fn unavailable(u: Unavailable) -> Response<ResponseBody> {
    match u {
        Unavailable::NoHealthyUpstream => {
            local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream")
        }
        Unavailable::Overflow => overflow(),
    }
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
            (
                Outcome::Status(status),
                Response::from_parts(
                    parts,
                    Either::Left(Guarded {
                        inner: body,
                        in_flight: Some(endpoint.again()),
                        admission: None,
                    }),
                ),
            )
        }
        Err(e) if e.is_connect() => (
            Outcome::ConnectFailure,
            local(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error"),
        ),
        Err(e) => {
            tracing::debug!(error = %e, "upstream reset before headers");
            (
                Outcome::Reset,
                local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream reset before headers",
                ),
            )
        }
    }
}
