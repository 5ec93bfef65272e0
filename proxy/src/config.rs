//! The typed, validated config the data path reads: route tables, clusters and their
//! endpoints, and listeners. Built from xDS resources by [`crate::xds::translate`]
//! (the only place that sees protobuf), published as one immutable [`Snapshot`] behind
//! an `ArcSwap`: a request loads it once (no lock) and keeps its `Arc` to the end, so
//! a reconfiguration never changes a request in flight.
//!
//! Route matchers are compiled here once per route table (lower-cased domains in a
//! hash map, regexes compiled, header names parsed), never per request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::http::{HeaderMap, HeaderName};

use crate::cluster::Cluster;

/// Everything the data path reads, swapped whole on every accepted change.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub routes: HashMap<Arc<str>, Arc<RouteTable>>,
    pub clusters: HashMap<Arc<str>, Arc<Cluster>>,
}

/// A listener from LDS.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: Arc<str>,
    pub address: SocketAddr,
    /// `bind_to_port: false`: bound only when the bootstrap asks for it.
    pub bind_to_port: bool,
    /// `use_original_dst`: a connection redirected here (iptables REDIRECT) is handed
    /// to the listener of its original destination, if any (transparent mode).
    pub use_original_dst: bool,
    pub filter: NetworkFilter,
    /// Downstream TLS (the filter chain's `DownstreamTlsContext`).
    pub tls: Option<crate::tls::TlsContext>,
}

/// The one network filter of a listener's filter chain.
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkFilter {
    /// HTTP connection manager reading route table `route_config` over RDS, or
    /// its own `inline` table (named `route_config`).
    Http {
        route_config: Arc<str>,
        codec: Codec,
        inline: Option<InlineRoutes>,
        xfcc: Xfcc,
    },
    /// TCP proxy to one cluster.
    Tcp { cluster: Arc<str> },
}

/// A route table inside the HTTP connection manager (`route_config`), compiled; equal
/// when its encoded resource is.
#[derive(Debug, Clone)]
pub struct InlineRoutes {
    pub table: Arc<RouteTable>,
    pub encoded: Arc<[u8]>,
}

impl PartialEq for InlineRoutes {
    fn eq(&self, other: &Self) -> bool {
        self.encoded == other.encoded
    }
}

/// What the HTTP connection manager does with `x-forwarded-client-cert`
/// (`forward_client_cert_details`; with `set_current_client_cert_details.uri`, the
/// element it adds names the client's URI SAN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Xfcc {
    /// Remove it (Envoy's default).
    Sanitize,
    /// Keep it on mTLS connections, remove it otherwise.
    ForwardOnly,
    /// On mTLS connections append the client's element, otherwise remove it.
    AppendForward,
    /// On mTLS connections replace it with the client's element, otherwise remove it.
    SanitizeSet,
    /// Keep it.
    AlwaysForwardOnly,
}

/// Which HTTP versions a listener speaks downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// HTTP/1.1 or HTTP/2 prior knowledge (h2c), detected per connection.
    Auto,
    Http1,
    Http2,
}

/// A route table from RDS, with its matchers compiled.
#[derive(Debug)]
pub struct RouteTable {
    pub name: Arc<str>,
    pub virtual_hosts: Vec<VirtualHost>,
    /// Lower-cased exact domains → virtual host index.
    pub exact: HashMap<String, usize>,
    /// `*.example.com` (stored as `.example.com`), longest first.
    pub suffixes: Vec<(String, usize)>,
    /// `example.*` (stored as `example.`), longest first.
    pub prefixes: Vec<(String, usize)>,
    pub any: Option<usize>,
}

impl RouteTable {
    /// The virtual host for `host` (the Host header or `:authority`), as Envoy picks
    /// it: exact, then the longest suffix wildcard, the longest prefix wildcard, `*`.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let found = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.find(&host.to_ascii_lowercase())
        } else {
            self.find(host)
        };
        found.map(|i| &self.virtual_hosts[i])
    }

    fn find(&self, host: &str) -> Option<usize> {
        if let Some(i) = self.exact.get(host) {
            return Some(*i);
        }
        // A wildcard matches at least one character (Envoy: `*.foo.com` does not match `.foo.com`).
        if let Some((_, i)) = self
            .suffixes
            .iter()
            .find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str()))
        {
            return Some(*i);
        }
        if let Some((_, i)) = self
            .prefixes
            .iter()
            .find(|(p, _)| host.len() > p.len() && host.starts_with(p.as_str()))
        {
            return Some(*i);
        }
        self.any
    }
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub routes: Vec<Route>,
}

/// The request headers a route reads: hyper's `HeaderMap`, or the HTTP/1.1 fast path's
/// parsed header slice ([`crate::http1`]), so that one matcher serves both paths and no
/// map is built per request on the fast path.
pub trait RequestHeaders {
    /// The first value of header `name`, as bytes.
    fn first_value(&self, name: &HeaderName) -> Option<&[u8]>;
}

impl RequestHeaders for HeaderMap {
    fn first_value(&self, name: &HeaderName) -> Option<&[u8]> {
        self.get(name).map(|v| v.as_bytes())
    }
}

impl RequestHeaders for [httparse::Header<'_>] {
    fn first_value(&self, name: &HeaderName) -> Option<&[u8]> {
        let name = name.as_str();
        self.iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// A header value as text when it is visible ASCII (and tabs), as `HeaderValue::to_str`.
pub fn visible_ascii(v: &[u8]) -> Option<&str> {
    if v.iter().all(|&b| b == b'\t' || (32..127).contains(&b)) {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

impl VirtualHost {
    /// The first route whose match accepts the request.
    pub fn route<H: RequestHeaders + ?Sized>(&self, path: &str, headers: &H) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(path, headers))
    }
}

#[derive(Debug)]
pub struct Route {
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
    /// Match only gRPC requests (`content-type: application/grpc…`).
    pub grpc: bool,
    pub action: RouteAction,
}

impl Route {
    /// `path` is the request path without its query.
    pub fn matches<H: RequestHeaders + ?Sized>(&self, path: &str, headers: &H) -> bool {
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
            PathMatch::Regex(r) => r.is_match(path),
        };
        path_ok
            && (!self.grpc
                || headers
                    .first_value(&hyper::header::CONTENT_TYPE)
                    .is_some_and(|v| v.starts_with(b"application/grpc")))
            && self.headers.iter().all(|h| h.matches(headers))
    }
}

#[derive(Debug)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    /// Anchored: the whole path must match (Envoy's `safe_regex`).
    Regex(regex::Regex),
}

#[derive(Debug)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: HeaderValueMatch,
    pub invert: bool,
}

#[derive(Debug)]
pub enum HeaderValueMatch {
    Present(bool),
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    /// Anchored, over the whole value.
    Regex(regex::Regex),
}

impl HeaderMatch {
    pub fn matches<H: RequestHeaders + ?Sized>(&self, headers: &H) -> bool {
        let value = headers.first_value(&self.name);
        let hit = match (&self.value, value) {
            (HeaderValueMatch::Present(p), v) => v.is_some() == *p,
            (_, None) => false,
            (m, Some(v)) => {
                let Some(v) = visible_ascii(v) else {
                    return false;
                };
                match m {
                    HeaderValueMatch::Present(_) => unreachable!("handled above"),
                    HeaderValueMatch::Exact(s) => v == s,
                    HeaderValueMatch::Prefix(s) => v.starts_with(s.as_str()),
                    HeaderValueMatch::Suffix(s) => v.ends_with(s.as_str()),
                    HeaderValueMatch::Contains(s) => v.contains(s.as_str()),
                    HeaderValueMatch::Regex(r) => r.is_match(v),
                }
            }
        };
        // Envoy: a missing header never matches, inverted or not (except `present`).
        if value.is_none() && !matches!(self.value, HeaderValueMatch::Present(_)) {
            return false;
        }
        hit != self.invert
    }
}

#[derive(Debug)]
pub struct RouteAction {
    pub clusters: ClusterChoice,
    /// The whole request's deadline, retries included (Envoy's default: 15 s); `None`
    /// disables it (a zero timeout in the route).
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
}

#[derive(Debug)]
pub enum ClusterChoice {
    One(Arc<str>),
    /// Weighted clusters, with cumulative weights (last = total).
    Weighted(Vec<(Arc<str>, u64)>),
}

impl ClusterChoice {
    /// Every cluster the choice may pick.
    pub fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        let (one, weighted) = match self {
            ClusterChoice::One(c) => (Some(c), &[][..]),
            ClusterChoice::Weighted(items) => (None, &items[..]),
        };
        one.into_iter().chain(weighted.iter().map(|(c, _)| c))
    }

    /// The cluster for a request, drawing `random` in `0..total` for a weighted split.
    pub fn pick(&self, random: impl FnOnce(u64) -> u64) -> &Arc<str> {
        match self {
            ClusterChoice::One(c) => c,
            ClusterChoice::Weighted(items) => {
                let total = items.last().map_or(1, |(_, w)| *w);
                let r = random(total);
                let i = items.partition_point(|(_, cumulative)| *cumulative <= r);
                &items[i.min(items.len() - 1)].0
            }
        }
    }
}

/// When to try again (Envoy's `retry_on` tokens that the proxy implements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub num_retries: u32,
    /// `5xx`: any 5xx answer, or no answer.
    pub on_5xx: bool,
    /// `gateway-error`: 502, 503, 504, or no answer.
    pub on_gateway_error: bool,
    /// `connect-failure`: the upstream connection could not be made.
    pub on_connect_failure: bool,
    /// `reset`: the upstream reset or closed before answering.
    pub on_reset: bool,
    /// `retriable-status-codes`: these codes.
    pub status_codes: Vec<u16>,
    pub per_try_timeout: Option<Duration>,
}

/// How a request to an upstream ended, for the retry and outlier decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    ConnectFailure,
    Reset,
    Timeout,
}

impl RetryPolicy {
    pub fn retries(&self, outcome: Outcome) -> bool {
        match outcome {
            Outcome::Status(s) => {
                (self.on_5xx && s >= 500)
                    || (self.on_gateway_error && matches!(s, 502..=504))
                    || self.status_codes.contains(&s)
            }
            Outcome::ConnectFailure => {
                self.on_connect_failure || self.on_5xx || self.on_gateway_error
            }
            Outcome::Reset | Outcome::Timeout => {
                self.on_reset || self.on_5xx || self.on_gateway_error
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_pick_follows_cumulative_weights() {
        let c = ClusterChoice::Weighted(vec![("a".into(), 80), ("b".into(), 100)]);
        assert_eq!(&**c.pick(|_| 0), "a");
        assert_eq!(&**c.pick(|_| 79), "a");
        assert_eq!(&**c.pick(|_| 80), "b");
        assert_eq!(&**c.pick(|_| 99), "b");
    }

    #[test]
    fn missing_header_never_matches_even_inverted() {
        let m = HeaderMatch {
            name: HeaderName::from_static("x-canary"),
            value: HeaderValueMatch::Exact("true".into()),
            invert: true,
        };
        assert!(!m.matches(&HeaderMap::new()));
        let mut h = HeaderMap::new();
        h.insert("x-canary", "false".parse().unwrap());
        assert!(m.matches(&h));
        h.insert("x-canary", "true".parse().unwrap());
        assert!(!m.matches(&h));
    }
}
