//! Clusters at run time: their endpoints (from EDS or inline), load balancing (round
//! robin, least request; locality weights; priorities with failover), per-endpoint
//! passive health (outlier detection), circuit breakers, and the upstream connection
//! pools (one hyper client per cluster, pooling per endpoint, keep-alive, created on
//! the cluster's first request: a sidecar holds thousands of clusters it never uses).
//!
//! A [`Cluster`] lives as long as its definition is unchanged: an EDS update swaps its
//! endpoint set (an `ArcSwap`, read without locks), keeping the state of endpoints
//! that stay (active requests, failures, ejections) and the pooled connections.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Either;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Outcome;
use crate::metrics::ClusterStats;

/// The body sent upstream: the downstream body streamed, or a buffered copy (retries).
pub type UpstreamBody = Either<Incoming, Full<Bytes>>;
pub type UpstreamClient = Client<LimitedConnector, UpstreamBody>;

/// A cluster definition from CDS, as the proxy uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterDef {
    pub name: Arc<str>,
    /// The load assignment to subscribe to over EDS; `None` for a static cluster.
    pub eds_name: Option<Arc<str>>,
    /// A static cluster's endpoints.
    pub static_assignment: Option<Assignment>,
    /// `ORIGINAL_DST`: no endpoints; the TCP proxy connects to the downstream
    /// connection's original destination (transparent mode's `PassthroughCluster`).
    pub original_dst: bool,
    pub lb: LbPolicy,
    /// Weigh localities by their `load_balancing_weight` (Envoy's
    /// `locality_weighted_lb_config`); otherwise endpoints are weighed across localities.
    pub locality_weighted: bool,
    /// Speak HTTP/2 (prior knowledge) upstream.
    pub http2: bool,
    pub connect_timeout: Duration,
    pub outlier: Option<OutlierConfig>,
    pub limits: Limits,
    /// Upstream TLS (the cluster's `UpstreamTlsContext`).
    pub tls: Option<crate::tls::TlsContext>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    /// Power of two choices over active requests (Envoy's default `choice_count` 2).
    LeastRequest,
}

/// Circuit breakers: the default-priority thresholds (Envoy's defaults when unset).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_pending_requests: usize,
    pub max_requests: usize,
    /// Concurrent retries allowed (`max_retries`, or the retry budget's share).
    pub max_retries: usize,
    /// A retry budget: percent of active requests that may be retries, with a floor.
    pub retry_budget: Option<(f64, usize)>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
        }
    }
}

/// Passive health checking (Envoy's `outlier_detection`, the consecutive-failure kinds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierConfig {
    pub consecutive_5xx: u32,
    pub enforcing_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub enforcing_gateway_failure: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

/// A load assignment: endpoints by priority, then locality.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Assignment {
    /// Index = priority (0 first).
    pub priorities: Vec<Vec<LocalityEndpoints>>,
    /// Envoy's `overprovisioning_factor` in percent (default 140).
    pub overprovisioning: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LocalityEndpoints {
    pub zone: String,
    pub weight: u32,
    pub endpoints: Vec<EndpointDef>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointDef {
    pub address: SocketAddr,
    pub weight: u32,
    /// HEALTHY or UNKNOWN; UNHEALTHY, DRAINING, TIMEOUT and DEGRADED take no traffic.
    pub healthy: bool,
}

/// The passive state of one endpoint, kept across EDS updates while it stays.
#[derive(Debug, Default)]
pub struct EndpointState {
    pub active: AtomicUsize,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Milliseconds since the proxy's clock start until which it is ejected (0: not).
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    /// The HTTP/1.1 fast path's idle upstream connections to this endpoint, most
    /// recent last. The lock is only held to push or pop one (never across an await);
    /// it is uncontended on a one-worker proxy.
    h1_idle: std::sync::Mutex<Vec<H1Conn>>,
}

#[derive(Debug)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// `ADDRESS:PORT` (IPv6 in brackets): the upstream request URI's authority, which
    /// is also the connection pool's key.
    pub authority: hyper::http::uri::Authority,
    pub weight: u32,
    pub healthy: bool,
    pub locality: usize,
    pub state: Arc<EndpointState>,
}

#[derive(Debug)]
struct PrioritySet {
    endpoints: Vec<Arc<Endpoint>>,
    /// Locality weights by locality index of this priority.
    locality_weights: Vec<u32>,
    healthy: usize,
    equal_weights: bool,
}

/// One load assignment, ready for picking.
#[derive(Debug, Default)]
pub struct EndpointSet {
    priorities: Vec<PrioritySet>,
    overprovisioning: u32,
    /// Cumulative priority loads in percent when nothing is ejected.
    loads: Vec<u32>,
    total: usize,
}

/// A process-wide millisecond clock for ejection times.
fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

impl EndpointSet {
    fn build(a: &Assignment, previous: Option<&EndpointSet>) -> EndpointSet {
        let old = |addr: &SocketAddr| {
            previous.and_then(|p| {
                p.priorities
                    .iter()
                    .flat_map(|p| p.endpoints.iter())
                    .find(|e| e.address == *addr)
                    .map(|e| e.state.clone())
            })
        };
        let mut priorities = Vec::with_capacity(a.priorities.len());
        let mut total = 0;
        for localities in &a.priorities {
            let mut endpoints = Vec::new();
            let mut locality_weights = Vec::new();
            for (li, l) in localities.iter().enumerate() {
                locality_weights.push(l.weight);
                for e in &l.endpoints {
                    endpoints.push(Arc::new(Endpoint {
                        address: e.address,
                        authority: hyper::http::uri::Authority::try_from(e.address.to_string())
                            .expect("a socket address is an authority"),
                        weight: e.weight.max(1),
                        healthy: e.healthy,
                        locality: li,
                        state: old(&e.address).unwrap_or_default(),
                    }));
                }
            }
            total += endpoints.len();
            let healthy = endpoints.iter().filter(|e| e.healthy).count();
            let equal_weights = endpoints.windows(2).all(|w| w[0].weight == w[1].weight);
            priorities.push(PrioritySet {
                endpoints,
                locality_weights,
                healthy,
                equal_weights,
            });
        }
        let mut set = EndpointSet {
            priorities,
            overprovisioning: a.overprovisioning,
            loads: Vec::new(),
            total,
        };
        set.loads = set.priority_loads(|p| p.healthy);
        set
    }

    /// Envoy's priority loads: each priority's health is `overprovisioning × available
    /// / total` capped at 100%; priorities take load in order until 100% is placed; if
    /// all of them together are below 100%, loads are scaled up. Cumulative percents.
    fn priority_loads(&self, available: impl Fn(&PrioritySet) -> usize) -> Vec<u32> {
        let health: Vec<u32> = self
            .priorities
            .iter()
            .map(|p| {
                if p.endpoints.is_empty() {
                    0
                } else {
                    ((self.overprovisioning as usize * available(p)) / p.endpoints.len()).min(100)
                        as u32
                }
            })
            .collect();
        let sum: u32 = health.iter().sum::<u32>().min(100);
        let mut out = Vec::with_capacity(health.len());
        if sum == 0 {
            return out;
        }
        let mut left = 100u32;
        let mut cumulative = 0;
        for h in health {
            let share = (h * 100 / sum).min(left);
            left -= share;
            cumulative += share;
            out.push(cumulative);
        }
        if let Some(last) = out.iter_mut().rev().find(|_| true) {
            *last += left;
        }
        out
    }
}

/// A cluster at run time.
#[derive(Debug)]
pub struct Cluster {
    pub def: ClusterDef,
    /// Shared with the connector, which looks at the endpoints' idle fast-path
    /// connections when it waits for a connection slot ([`acquire_slot`]).
    endpoints: Arc<ArcSwap<EndpointSet>>,
    /// Whether a load assignment was received (EDS) or given (static).
    assigned: std::sync::atomic::AtomicBool,
    /// The connection pool, built on first use ([`Cluster::client`]).
    client: std::sync::OnceLock<UpstreamClient>,
    rr: AtomicUsize,
    active: AtomicUsize,
    retries_active: AtomicUsize,
    /// Endpoints currently ejected by outlier detection.
    ejected: AtomicUsize,
    connections: Arc<Semaphore>,
    /// Who holds those slots idle, and who waits for one ([`acquire_slot`]).
    slots: Arc<Slots>,
    pub stats: ClusterStats,
    /// Upstream TLS, for the TCP proxy (HTTP connections get it from the connector).
    pub tls: Option<Arc<crate::tls::ClientTls>>,
}

/// Why no request could be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// No healthy endpoint (503 `no healthy upstream`).
    NoHealthyUpstream,
    /// A circuit breaker is open (503 overflow, `x-envoy-overloaded`).
    Overflow,
}

/// An admitted request: counts against `max_requests` until dropped.
#[derive(Debug)]
pub struct Admission {
    cluster: Arc<Cluster>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.cluster.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request in flight to one endpoint: counts as active for least-request.
#[derive(Debug)]
pub struct InFlight {
    pub endpoint: Arc<Endpoint>,
}

impl InFlight {
    /// One more count on the same endpoint (a response body that outlives its try).
    pub fn again(&self) -> InFlight {
        self.endpoint.state.active.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self.endpoint.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry slot from the retry budget.
#[derive(Debug)]
pub struct RetrySlot {
    cluster: Arc<Cluster>,
}

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.cluster.retries_active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Cluster {
    pub fn new(def: ClusterDef, stats: ClusterStats) -> Cluster {
        Self::with_secrets(def, stats, Default::default())
    }

    /// A cluster whose upstream TLS (if any) takes its certificates from `secrets`.
    pub fn with_secrets(
        def: ClusterDef,
        stats: ClusterStats,
        secrets: Arc<ArcSwap<crate::tls::SecretSet>>,
    ) -> Cluster {
        let connections = Arc::new(Semaphore::new(def.limits.max_connections));
        let tls = def
            .tls
            .clone()
            .map(|t| Arc::new(crate::tls::ClientTls::new(t, secrets)));
        let assigned = def.static_assignment.is_some() || def.original_dst;
        let set = def
            .static_assignment
            .as_ref()
            .map(|a| EndpointSet::build(a, None))
            .unwrap_or_default();
        Cluster {
            def,
            endpoints: Arc::new(ArcSwap::from_pointee(set)),
            assigned: assigned.into(),
            client: std::sync::OnceLock::new(),
            rr: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            retries_active: AtomicUsize::new(0),
            ejected: AtomicUsize::new(0),
            connections,
            slots: Arc::default(),
            stats,
            tls,
        }
    }

    /// The upstream connection pool (HTTP/1.1 or HTTP/2 as the cluster says; at most
    /// `max_connections` connections), built on the first request.
    pub fn client(&self) -> &UpstreamClient {
        self.client.get_or_init(|| {
            let mut http = HttpConnector::new();
            http.set_nodelay(true);
            http.set_connect_timeout(Some(self.def.connect_timeout));
            let connector = LimitedConnector {
                inner: http,
                permits: self.connections.clone(),
                slots: self.slots.clone(),
                http2: self.def.http2,
                endpoints: self.endpoints.clone(),
                tls: self.tls.clone(),
                timeout: self.def.connect_timeout,
            };
            let mut builder = Client::builder(TokioExecutor::new());
            builder
                .pool_idle_timeout(Duration::from_secs(60))
                .http2_only(self.def.http2);
            builder.build(connector)
        })
    }

    /// Replaces the endpoints (an EDS update), keeping the state of those that stay.
    pub fn assign(&self, a: &Assignment) {
        let old = self.endpoints.load();
        let set = EndpointSet::build(a, Some(&old));
        let still_ejected = set
            .priorities
            .iter()
            .flat_map(|p| p.endpoints.iter())
            .filter(|e| e.state.ejected_until.load(Ordering::Relaxed) != 0)
            .count();
        self.endpoints.store(Arc::new(set));
        self.ejected.store(still_ejected, Ordering::Relaxed);
        self.assigned.store(true, Ordering::Release);
    }

    pub fn has_assignment(&self) -> bool {
        self.assigned.load(Ordering::Acquire)
    }

    /// Endpoint count (every priority), for `/config_dump`.
    pub fn endpoint_addresses(&self) -> Vec<(usize, SocketAddr, bool, bool)> {
        let set = self.endpoints.load();
        let now = now_ms();
        set.priorities
            .iter()
            .enumerate()
            .flat_map(|(p, ps)| {
                ps.endpoints.iter().map(move |e| {
                    let until = e.state.ejected_until.load(Ordering::Relaxed);
                    (p, e.address, e.healthy, until != 0 && now < until)
                })
            })
            .collect()
    }

    /// Admits a request under the circuit breakers (`max_requests`, and
    /// `max_pending_requests` once every allowed connection is open).
    pub fn admit(self: &Arc<Self>) -> Result<Admission, Unavailable> {
        let active = self.active.fetch_add(1, Ordering::Relaxed);
        let admission = Admission {
            cluster: self.clone(),
        };
        let limits = &self.def.limits;
        let mut open = limits.max_connections - self.connections.available_permits();
        if open >= limits.max_connections {
            // Idle fast-path connections the upstream closed are not open: they give
            // their slots back before the request is counted as pending.
            reap_idle_h1(&self.endpoints.load(), None);
            open = limits.max_connections - self.connections.available_permits();
        }
        let waiting = active.saturating_sub(open);
        if active >= limits.max_requests
            || (open >= limits.max_connections && waiting >= limits.max_pending_requests)
        {
            self.stats.overflow.inc();
            return Err(Unavailable::Overflow);
        }
        Ok(admission)
    }

    /// A slot for one retry, if the budget allows.
    pub fn retry_slot(self: &Arc<Self>) -> Option<RetrySlot> {
        let allowed = match self.def.limits.retry_budget {
            Some((percent, floor)) => {
                let active = self.active.load(Ordering::Relaxed) as f64;
                ((active * percent / 100.0) as usize).max(floor)
            }
            None => self.def.limits.max_retries,
        };
        let n = self.retries_active.fetch_add(1, Ordering::Relaxed);
        let slot = RetrySlot {
            cluster: self.clone(),
        };
        if n >= allowed {
            self.stats.retry_overflow.inc();
            return None;
        }
        Some(slot)
    }

    /// Picks an endpoint, avoiding `avoid` (the one a retry just failed on) when another is available.
    pub fn pick(&self, avoid: Option<SocketAddr>) -> Result<InFlight, Unavailable> {
        let set = self.endpoints.load();
        let now = now_ms();
        let any_ejected = self.ejected.load(Ordering::Relaxed) > 0;
        let available = |e: &Endpoint| {
            e.healthy && (!any_ejected || !self.is_ejected(e, now)) && Some(e.address) != avoid
        };
        let endpoint = self
            .pick_from(&set, any_ejected || avoid.is_some(), &available)
            .or_else(|| avoid.and_then(|_| self.pick_from(&set, true, &|e: &Endpoint| e.healthy)))
            // Panic mode (Envoy's, when nothing is healthy): every endpoint of the first
            // priority that has any.
            .or_else(|| self.pick_from(&set, true, &|_: &Endpoint| true))
            .ok_or(Unavailable::NoHealthyUpstream)?;
        endpoint.state.active.fetch_add(1, Ordering::Relaxed);
        Ok(InFlight { endpoint })
    }

    fn pick_from(
        &self,
        set: &EndpointSet,
        filtered: bool,
        available: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let recomputed;
        let loads: &[u32] = if filtered {
            recomputed =
                set.priority_loads(|p| p.endpoints.iter().filter(|e| available(e)).count());
            &recomputed
        } else {
            &set.loads
        };
        let priority = match loads.len() {
            0 => {
                // Nothing available by load: the first priority with a candidate.
                return set
                    .priorities
                    .iter()
                    .find_map(|p| self.pick_in(p, available));
            }
            1 => 0,
            _ => {
                let r = fastrand::u32(0..100);
                loads.partition_point(|c| *c <= r).min(loads.len() - 1)
            }
        };
        self.pick_in(&set.priorities[priority], available)
            .or_else(|| {
                set.priorities
                    .iter()
                    .find_map(|p| self.pick_in(p, available))
            })
    }

    fn pick_in(
        &self,
        p: &PrioritySet,
        available: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<Arc<Endpoint>> {
        if p.endpoints.is_empty() {
            return None;
        }
        if self.def.locality_weighted && p.locality_weights.len() > 1 {
            // A locality by weight × the share of its endpoints that are available.
            let mut weights: Vec<(usize, u64)> = Vec::with_capacity(p.locality_weights.len());
            for (li, w) in p.locality_weights.iter().enumerate() {
                let (n, ok) = p
                    .endpoints
                    .iter()
                    .filter(|e| e.locality == li)
                    .fold((0u64, 0u64), |(n, ok), e| {
                        (n + 1, ok + u64::from(available(e)))
                    });
                if ok > 0 {
                    weights.push((li, u64::from(*w).max(1) * 1000 * ok / n));
                }
            }
            let total: u64 = weights.iter().map(|(_, w)| w).sum();
            if total == 0 {
                return None;
            }
            let mut r = fastrand::u64(0..total);
            let locality = weights
                .iter()
                .find(|(_, w)| {
                    if r < *w {
                        true
                    } else {
                        r -= w;
                        false
                    }
                })
                .map(|(li, _)| *li)?;
            return self.pick_endpoint(p, &|e: &Endpoint| e.locality == locality && available(e));
        }
        self.pick_endpoint(p, available)
    }

    fn pick_endpoint(
        &self,
        p: &PrioritySet,
        available: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let n = p.endpoints.len();
        match self.def.lb {
            LbPolicy::RoundRobin if p.equal_weights => {
                let start = self.rr.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &p.endpoints[(start + i) % n])
                    .find(|e| available(e))
                    .cloned()
            }
            LbPolicy::RoundRobin => {
                let total: u64 = p
                    .endpoints
                    .iter()
                    .filter(|e| available(e))
                    .map(|e| u64::from(e.weight))
                    .sum();
                if total == 0 {
                    return None;
                }
                let mut r = fastrand::u64(0..total);
                p.endpoints
                    .iter()
                    .filter(|e| available(e))
                    .find(|e| {
                        let w = u64::from(e.weight);
                        if r < w {
                            true
                        } else {
                            r -= w;
                            false
                        }
                    })
                    .cloned()
            }
            LbPolicy::LeastRequest => {
                let a = fastrand::usize(0..n);
                let b = fastrand::usize(0..n);
                let (a, b) = (&p.endpoints[a], &p.endpoints[b]);
                let best = match (available(a), available(b)) {
                    (true, true) => {
                        if b.state.active.load(Ordering::Relaxed)
                            < a.state.active.load(Ordering::Relaxed)
                        {
                            b
                        } else {
                            a
                        }
                    }
                    (true, false) => a,
                    (false, true) => b,
                    (false, false) => {
                        return (0..n)
                            .map(|i| &p.endpoints[(a.locality + i + fastrand::usize(0..n)) % n])
                            .filter(|e| available(e))
                            .min_by_key(|e| e.state.active.load(Ordering::Relaxed))
                            .cloned();
                    }
                };
                Some(best.clone())
            }
        }
    }

    /// Whether `e` is ejected at `now`; returns an endpoint whose ejection ended.
    fn is_ejected(&self, e: &Endpoint, now: u64) -> bool {
        let until = e.state.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if now < until {
            return true;
        }
        if e.state
            .ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.ejected.fetch_sub(1, Ordering::Relaxed);
        }
        false
    }

    /// Records how a request to `endpoint` ended: outlier detection's input.
    pub fn record(&self, endpoint: &Endpoint, outcome: Outcome) {
        let Some(od) = self.def.outlier else { return };
        let s = &endpoint.state;
        let (five, gateway) = match outcome {
            Outcome::Status(c) if c >= 500 => (true, matches!(c, 502..=504)),
            Outcome::Status(_) => (false, false),
            // Local failures count as gateway errors (and as 5xx), as Envoy maps them to 503.
            Outcome::ConnectFailure | Outcome::Reset | Outcome::Timeout => (true, true),
        };
        if !five {
            s.consecutive_5xx.store(0, Ordering::Relaxed);
            s.consecutive_gateway.store(0, Ordering::Relaxed);
            return;
        }
        let n5 = s.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        let ng = if gateway {
            s.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            s.consecutive_gateway.store(0, Ordering::Relaxed);
            0
        };
        let enforce = |percent: u32| percent >= 100 || fastrand::u32(0..100) < percent;
        let eject = (od.consecutive_gateway_failure > 0
            && ng >= od.consecutive_gateway_failure
            && enforce(od.enforcing_gateway_failure))
            || (od.consecutive_5xx > 0 && n5 >= od.consecutive_5xx && enforce(od.enforcing_5xx));
        if eject {
            self.eject(endpoint, &od);
        }
    }

    fn eject(&self, endpoint: &Endpoint, od: &OutlierConfig) {
        let now = now_ms();
        if self.is_ejected(endpoint, now) {
            return;
        }
        let total = self.endpoints.load().total.max(1);
        let ejected = self.ejected.load(Ordering::Relaxed);
        // At most max_ejection_percent of the cluster, but always one endpoint.
        if ejected > 0 && (ejected + 1) * 100 > total * od.max_ejection_percent as usize {
            return;
        }
        let s = &endpoint.state;
        let n = s.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let time = (od.base_ejection_time * n).min(od.max_ejection_time.max(od.base_ejection_time));
        if s.ejected_until
            .compare_exchange(
                0,
                now + time.as_millis() as u64,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            self.ejected.fetch_add(1, Ordering::Relaxed);
            s.consecutive_5xx.store(0, Ordering::Relaxed);
            s.consecutive_gateway.store(0, Ordering::Relaxed);
            self.stats.ejections.inc();
            tracing::info!(cluster = %self.def.name, endpoint = %endpoint.address, seconds = time.as_secs(), "outlier ejected");
        }
    }
}

/// How long the HTTP/1.1 fast path keeps an idle upstream connection (hyper's pool:
/// `pool_idle_timeout` 60 s above).
const H1_IDLE: Duration = Duration::from_secs(60);

/// A plaintext HTTP/1.1 upstream connection of the fast path ([`crate::http1`]): its
/// socket, its read buffer (kept across requests), and its permit under the cluster's
/// `max_connections` (shared with hyper's pool: both paths count against one limit).
#[derive(Debug)]
pub struct H1Conn {
    pub stream: tokio::net::TcpStream,
    pub buf: bytes::BytesMut,
    /// It served a request before (the upstream may have closed it while it was idle).
    pub reused: bool,
    idle_since: Instant,
    _permit: OwnedSemaphorePermit,
}

impl H1Conn {
    /// Whether the upstream has not closed it, without a system call unless the
    /// reactor saw it readable (an idle connection that is readable has closed, or
    /// sent bytes nobody asked for: either way it is not reused).
    fn is_open(&self) -> bool {
        // `try_read` reads only when the reactor saw the socket readable, and leaves
        // the task registered for its readiness (if any) alone.
        let mut b = [0u8; 1];
        matches!(self.stream.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Whether it is still open, waking `cx` when that may change (it turns readable).
    fn poll_open(&self, cx: &mut Context<'_>) -> bool {
        loop {
            match self.stream.poll_read_ready(cx) {
                Poll::Pending => return true,
                Poll::Ready(Err(_)) => return false,
                // Readable but nothing to read (the readiness is cleared): ask again,
                // which registers `cx`.
                Poll::Ready(Ok(())) if self.is_open() => {}
                Poll::Ready(Ok(())) => return false,
            }
        }
    }

    fn expired(&self) -> bool {
        self.idle_since.elapsed() >= H1_IDLE
    }
}

/// An idle fast-path connection to `endpoint` that is still open, most recent first.
fn pooled_h1(endpoint: &Endpoint) -> Option<H1Conn> {
    let mut idle = endpoint.state.h1_idle.lock().ok()?;
    while let Some(c) = idle.pop() {
        if !c.expired() && c.is_open() {
            return Some(c);
        }
    }
    None
}

/// Drops the idle fast-path connections of `set` that the upstream closed (or that
/// idled too long), which gives their slots under `max_connections` back; with `cx`,
/// the task is woken when one of those left may have closed. How many it dropped.
fn reap_idle_h1(set: &EndpointSet, mut cx: Option<&mut Context<'_>>) -> usize {
    let mut dropped = 0;
    for e in set.priorities.iter().flat_map(|p| p.endpoints.iter()) {
        let Ok(mut idle) = e.state.h1_idle.lock() else {
            continue;
        };
        let before = idle.len();
        idle.retain(|c| {
            !c.expired()
                && match cx.as_deref_mut() {
                    Some(cx) => c.poll_open(cx),
                    None => c.is_open(),
                }
        });
        dropped += before - idle.len();
    }
    dropped
}

/// A cluster's upstream connections as the keeper of its `max_connections` slots
/// sees them (the slots themselves are the cluster's semaphore): hyper's HTTP/1.1
/// connections and whether each is idle, and how many new connections wait for a slot.
#[derive(Debug, Default)]
pub struct Slots {
    /// hyper's open HTTP/1.1 connections (each removes itself when it closes).
    hyper: std::sync::Mutex<Vec<Arc<ConnState>>>,
    /// New connections waiting for a slot ([`acquire_slot`]).
    waiting: AtomicUsize,
    /// Notified when a connection turns idle while some wait.
    idle: tokio::sync::Notify,
}

impl Slots {
    /// After a connection turned idle (its state stored first): wakes those that
    /// wait for a slot, so that they close it rather than wait for its idle timeout.
    fn turned_idle(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.idle.notify_waiters();
        }
    }

    /// Closes one idle connection of the cluster to give its slot back: the fast
    /// path's (its slot comes back at once), else one of hyper's (once its connection
    /// task has seen it end); never one that the waiting connection's own pool would
    /// take instead (`wanted`). Whether there was one.
    fn close_idle(&self, set: &EndpointSet, wanted: Wanted<'_>) -> bool {
        for e in set.priorities.iter().flat_map(|p| p.endpoints.iter()) {
            if matches!(wanted, Wanted::FastPath(w) if w == e.address) {
                continue;
            }
            let Ok(mut idle) = e.state.h1_idle.lock() else {
                continue;
            };
            if !idle.is_empty() {
                // The one idle longest.
                drop(idle.remove(0));
                return true;
            }
        }
        let Ok(conns) = self.hyper.lock() else {
            return false;
        };
        conns.iter().any(|c| {
            !matches!(wanted, Wanted::Hyper(w) if c.endpoint.as_ref() == Some(w))
                && c.close_if_idle()
        })
    }
}

/// Whom a new connection waiting for a slot is for.
#[derive(Debug, Clone, Copy)]
enum Wanted<'a> {
    /// The fast path, to this endpoint: an idle fast-path connection to it that turns
    /// up meanwhile is taken instead.
    FastPath(SocketAddr),
    /// hyper's pool, to this endpoint: the pool itself takes an idle connection of its
    /// own to it that turns up meanwhile.
    Hyper(&'a hyper::http::uri::Authority),
}

/// What a new connection waiting for a slot gets: a slot, or (the fast path) an idle
/// connection to its endpoint that turned up meanwhile.
enum Slot<T> {
    Free(OwnedSemaphorePermit),
    Idle(T),
}

/// A connection of hyper's pool that is busy: it was given a request, its answer
/// has not ended.
const BUSY: u8 = 0;
/// Its last answer ended: it sits in hyper's pool.
const IDLE: u8 = 1;
/// Closed while idle to give its slot to another endpoint: it reads as ended.
const CLOSING: u8 = 2;

/// The state of one of hyper's HTTP/1.1 upstream connections (HTTP/2 ones carry many
/// streams and are not tracked): busy from the moment hyper writes a request on it
/// until the response body ends ([`Exchange`]), idle between; an idle one can be
/// closed ([`Slots::close_idle`]): its reads then end, and hyper drops it as a
/// connection the upstream closed while idle.
#[derive(Debug)]
pub struct ConnState {
    state: AtomicU8,
    /// The connection task's reader, woken to see it closing.
    reader: std::sync::Mutex<Option<Waker>>,
    slots: std::sync::Weak<Slots>,
    /// The endpoint (hyper's pool key).
    endpoint: Option<hyper::http::uri::Authority>,
}

impl ConnState {
    fn close_if_idle(&self) -> bool {
        if self
            .state
            .compare_exchange(IDLE, CLOSING, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return false;
        }
        if let Some(w) = self.reader.lock().ok().and_then(|mut r| r.take()) {
            w.wake();
        }
        true
    }

    fn closing(&self) -> bool {
        self.state.load(Ordering::Acquire) == CLOSING
    }

    /// hyper writes on it: a request (HTTP/1.1 writes nothing else). `false` once
    /// it is closing.
    fn begin(&self) -> bool {
        match self.state.load(Ordering::Acquire) {
            BUSY => true,
            _ => self
                .state
                .compare_exchange(IDLE, BUSY, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok(),
        }
    }
}

/// Put in each response's extensions by hyper's pool (`Connected::extra`): the
/// connection it came on.
#[derive(Debug, Clone)]
struct ConnHandle(Arc<ConnState>);

/// One request's exchange on a connection of hyper's pool: while it is held the
/// connection is busy; dropped when the response body ends (or is dropped).
#[derive(Debug)]
pub struct Exchange(Arc<ConnState>);

impl Exchange {
    /// The exchange of the response whose `extensions` these are (none for an HTTP/2
    /// connection).
    pub fn of(extensions: &mut hyper::http::Extensions) -> Option<Exchange> {
        extensions.remove::<ConnHandle>().map(|h| Exchange(h.0))
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if self
            .0
            .state
            .compare_exchange(BUSY, IDLE, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
            && let Some(slots) = self.0.slots.upgrade()
        {
            slots.turned_idle();
        }
    }
}

/// Counts a new connection as waiting for a slot while it lives.
struct Waiting<'a>(&'a Slots);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A slot under the cluster's `max_connections` for a new upstream connection, for
/// both paths (shared with hyper's pool). While none is free, an idle connection of
/// the cluster (to another endpoint: one to this endpoint would have been used) is
/// closed to make room, and one that turns idle later is closed then, rather than
/// hold its slot until its idle timeout (60 s); an idle fast-path connection the
/// upstream closes gives its slot back at once too.
async fn acquire_slot<T>(
    permits: &Arc<Semaphore>,
    endpoints: &ArcSwap<EndpointSet>,
    slots: &Slots,
    wanted: Wanted<'_>,
    mut idle_own: impl FnMut() -> Option<T>,
) -> Result<Slot<T>, tokio::sync::AcquireError> {
    if let Ok(p) = permits.clone().try_acquire_owned() {
        return Ok(Slot::Free(p));
    }
    slots.waiting.fetch_add(1, Ordering::SeqCst);
    let _waiting = Waiting(slots);
    // Closes one idle connection, then waits for a slot; closes another only when
    // one more turns idle (the slot of the one closed may go to another waiter).
    let mut close = true;
    loop {
        let idle = slots.idle.notified();
        tokio::pin!(idle);
        idle.as_mut().enable();
        if let Some(c) = idle_own() {
            return Ok(Slot::Idle(c));
        }
        if close && slots.close_idle(&endpoints.load(), wanted) {
            close = false;
        }
        let closed = std::future::poll_fn(|cx| {
            if reap_idle_h1(&endpoints.load(), Some(cx)) > 0 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        tokio::select! {
            p = permits.clone().acquire_owned() => return p.map(Slot::Free),
            () = closed => {}
            () = &mut idle => close = true,
        }
    }
}

impl Cluster {
    /// Whether the HTTP/1.1 fast path speaks to this cluster itself: plaintext
    /// HTTP/1.1 to its endpoints (not HTTP/2, not TLS, not `ORIGINAL_DST`).
    pub fn speaks_plain_http1(&self) -> bool {
        !self.def.http2 && self.tls.is_none() && !self.def.original_dst
    }

    /// An idle fast-path connection to `endpoint` that is still open, most recent first.
    pub fn pooled_h1(&self, endpoint: &Endpoint) -> Option<H1Conn> {
        pooled_h1(endpoint)
    }

    /// Returns a connection whose last exchange ended cleanly to `endpoint`'s pool.
    pub fn release_h1(&self, endpoint: &Endpoint, mut c: H1Conn) {
        c.reused = true;
        c.idle_since = Instant::now();
        if let Ok(mut idle) = endpoint.state.h1_idle.lock() {
            // Drop the ones that idled too long (oldest first) while here.
            let stale = idle
                .iter()
                .take_while(|c| c.idle_since.elapsed() >= H1_IDLE)
                .count();
            idle.drain(..stale);
            idle.push(c);
        }
        self.slots.turned_idle();
    }

    /// A new fast-path connection to `endpoint`: waits for a permit under
    /// `max_connections` (the request counts as pending meanwhile), then connects
    /// within the cluster's connect timeout; or, if one to `endpoint` turns idle
    /// while it waits, that one.
    pub async fn connect_h1(&self, endpoint: &Endpoint) -> std::io::Result<H1Conn> {
        let permit = match acquire_slot(
            &self.connections,
            &self.endpoints,
            &self.slots,
            Wanted::FastPath(endpoint.address),
            || pooled_h1(endpoint),
        )
        .await
        .map_err(std::io::Error::other)?
        {
            Slot::Free(p) => p,
            Slot::Idle(c) => return Ok(c),
        };
        let stream = tokio::time::timeout(
            self.def.connect_timeout,
            tokio::net::TcpStream::connect(endpoint.address),
        )
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        stream.set_nodelay(true)?;
        Ok(H1Conn {
            stream,
            buf: bytes::BytesMut::with_capacity(8 * 1024),
            reused: false,
            idle_since: Instant::now(),
            _permit: permit,
        })
    }
}

/// The upstream connector: `HttpConnector` under the cluster's `max_connections`. A
/// new connection waits for a permit (requests meanwhile count as pending); the
/// permit is released when the connection closes.
#[derive(Debug, Clone)]
pub struct LimitedConnector {
    inner: HttpConnector,
    permits: Arc<Semaphore>,
    slots: Arc<Slots>,
    /// The cluster speaks HTTP/2 (its connections are not tracked in `slots`).
    http2: bool,
    /// The cluster's endpoints, whose idle fast-path connections hold slots too.
    endpoints: Arc<ArcSwap<EndpointSet>>,
    /// Upstream TLS, handshaken after connecting (bounded by the connect timeout).
    tls: Option<Arc<crate::tls::ClientTls>>,
    timeout: Duration,
}

impl tower::Service<hyper::Uri> for LimitedConnector {
    type Response = LimitedConnection;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let mut inner = self.inner.clone();
        let permits = self.permits.clone();
        let slots = self.slots.clone();
        let http2 = self.http2;
        let endpoints = self.endpoints.clone();
        let tls = self.tls.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let endpoint = uri.authority().cloned();
            let permit = match endpoint.as_ref() {
                Some(a) => {
                    match acquire_slot(&permits, &endpoints, &slots, Wanted::Hyper(a), || {
                        None::<std::convert::Infallible>
                    })
                    .await?
                    {
                        Slot::Free(p) => p,
                        Slot::Idle(never) => match never {},
                    }
                }
                None => permits.clone().acquire_owned().await?,
            };
            let tcp = inner
                .call(uri)
                .await
                .map_err(|e| Box::new(ConnectError(e.to_string())))?
                .into_inner();
            let io = crate::tls::upgrade(tcp, tls.as_deref(), timeout)
                .await
                .map_err(|e| Box::new(ConnectError(e.to_string())))?;
            // Busy from the start: it is made for a request.
            let state = (!http2 && !io.negotiated_h2()).then(|| {
                let c = Arc::new(ConnState {
                    state: AtomicU8::new(BUSY),
                    reader: std::sync::Mutex::new(None),
                    slots: Arc::downgrade(&slots),
                    endpoint,
                });
                if let Ok(mut conns) = slots.hyper.lock() {
                    conns.push(c.clone());
                }
                c
            });
            Ok(LimitedConnection {
                io: TokioIo::new(io),
                state,
                _permit: permit,
            })
        })
    }
}

/// A failed upstream connect (distinguished from failures after connecting).
#[derive(Debug, thiserror::Error)]
#[error("upstream connect error: {0}")]
pub struct ConnectError(String);

#[derive(Debug)]
pub struct LimitedConnection {
    io: TokioIo<crate::tls::Stream>,
    /// An HTTP/1.1 connection's state, in the cluster's [`Slots`].
    state: Option<Arc<ConnState>>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for LimitedConnection {
    fn drop(&mut self) {
        if let Some(c) = &self.state
            && let Some(slots) = c.slots.upgrade()
            && let Ok(mut conns) = slots.hyper.lock()
        {
            conns.retain(|o| !Arc::ptr_eq(o, c));
        }
    }
}

impl Connection for LimitedConnection {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        match &self.state {
            Some(s) => c.extra(ConnHandle(s.clone())),
            None if self.io.inner().negotiated_h2() => c.negotiated_h2(),
            None => c,
        }
    }
}

impl LimitedConnection {
    /// Whether the connection was closed to make room (it then reads as ended).
    fn closing(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.closing())
    }

    /// Whether hyper may write on it (marks it busy).
    fn begin(&self) -> std::io::Result<()> {
        match &self.state {
            Some(s) if !s.begin() => Err(std::io::ErrorKind::BrokenPipe.into()),
            _ => Ok(()),
        }
    }
}

impl hyper::rt::Read for LimitedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.closing() {
            return Poll::Ready(Ok(()));
        }
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if r.is_pending()
            && let Some(s) = &self.state
        {
            if let Ok(mut w) = s.reader.lock() {
                match &mut *w {
                    Some(w) => w.clone_from(cx.waker()),
                    None => *w = Some(cx.waker().clone()),
                }
            }
            // Closed since it was looked at: its reader was not there to be woken.
            if s.closing() {
                return Poll::Ready(Ok(()));
            }
        }
        r
    }
}

impl hyper::rt::Write for LimitedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.begin()?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.begin()?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(lb: LbPolicy, locality_weighted: bool) -> ClusterDef {
        ClusterDef {
            name: "c".into(),
            eds_name: Some("c".into()),
            static_assignment: None,
            original_dst: false,
            lb,
            locality_weighted,
            http2: false,
            connect_timeout: Duration::from_secs(1),
            outlier: Some(OutlierConfig {
                consecutive_5xx: 0,
                enforcing_5xx: 0,
                consecutive_gateway_failure: 5,
                enforcing_gateway_failure: 100,
                base_ejection_time: Duration::from_secs(30),
                max_ejection_time: Duration::from_secs(300),
                max_ejection_percent: 50,
            }),
            limits: Limits::default(),
            tls: None,
        }
    }

    fn ep(port: u16, healthy: bool) -> EndpointDef {
        EndpointDef {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            weight: 1,
            healthy,
        }
    }

    fn locality(zone: &str, weight: u32, eps: Vec<EndpointDef>) -> LocalityEndpoints {
        LocalityEndpoints {
            zone: zone.into(),
            weight,
            endpoints: eps,
        }
    }

    fn counts(c: &Cluster, n: usize) -> std::collections::BTreeMap<u16, usize> {
        let mut m = std::collections::BTreeMap::new();
        for _ in 0..n {
            let f = c.pick(None).unwrap();
            *m.entry(f.endpoint.address.port()).or_default() += 1;
        }
        m
    }

    #[tokio::test]
    async fn priority_failover_when_the_first_priority_is_unhealthy() {
        let c = Cluster::new(def(LbPolicy::RoundRobin, false), ClusterStats::default());
        let a = |healthy| Assignment {
            priorities: vec![
                vec![locality("z1", 1, vec![ep(1, healthy), ep(2, healthy)])],
                vec![locality("z2", 1, vec![ep(3, true)])],
            ],
            overprovisioning: 140,
        };
        c.assign(&a(true));
        assert_eq!(
            counts(&c, 100).keys().copied().collect::<Vec<_>>(),
            vec![1, 2]
        );
        c.assign(&a(false));
        assert_eq!(counts(&c, 100), [(3, 100)].into());
    }

    #[tokio::test]
    async fn partial_health_spills_over_by_the_overprovisioning_factor() {
        let c = Cluster::new(def(LbPolicy::RoundRobin, false), ClusterStats::default());
        // P0: 1 of 4 healthy → health 35% at factor 140; P1 takes the other 65%.
        c.assign(&Assignment {
            priorities: vec![
                vec![locality(
                    "z1",
                    1,
                    vec![ep(1, true), ep(2, false), ep(4, false), ep(5, false)],
                )],
                vec![locality("z2", 1, vec![ep(3, true)])],
            ],
            overprovisioning: 140,
        });
        let m = counts(&c, 4000);
        let p0 = m[&1] as f64 / 4000.0;
        assert!((0.30..0.40).contains(&p0), "{m:?}");
    }

    #[tokio::test]
    async fn locality_weights_split_traffic() {
        let c = Cluster::new(def(LbPolicy::RoundRobin, true), ClusterStats::default());
        c.assign(&Assignment {
            priorities: vec![vec![
                locality("z1", 90, vec![ep(1, true)]),
                locality("z2", 10, vec![ep(2, true)]),
            ]],
            overprovisioning: 140,
        });
        let m = counts(&c, 4000);
        let z1 = m[&1] as f64 / 4000.0;
        assert!((0.86..0.94).contains(&z1), "{m:?}");
    }

    #[tokio::test]
    async fn consecutive_gateway_failures_eject_at_most_half_and_state_survives_eds_updates() {
        let c = Cluster::new(def(LbPolicy::RoundRobin, false), ClusterStats::default());
        let a = Assignment {
            priorities: vec![vec![locality(
                "z1",
                1,
                vec![ep(1, true), ep(2, true), ep(3, true), ep(4, true)],
            )]],
            overprovisioning: 140,
        };
        c.assign(&a);
        let endpoint = |port: u16| {
            (0..8)
                .map(|_| c.pick(None).unwrap().endpoint.clone())
                .find(|e| e.address.port() == port)
                .unwrap()
        };
        let e1 = endpoint(1);
        for _ in 0..4 {
            c.record(&e1, Outcome::ConnectFailure);
        }
        // An application 500 is not a gateway failure: it resets the count.
        c.record(&e1, Outcome::Status(500));
        c.record(&e1, Outcome::Status(503));
        assert_eq!(counts(&c, 40).len(), 4, "not ejected yet");
        for _ in 0..4 {
            c.record(&e1, Outcome::Status(503));
        }
        assert!(!counts(&c, 40).contains_key(&1), "ejected after 5 in a row");
        // The ejection survives an EDS update that keeps the endpoint.
        c.assign(&a);
        assert!(!counts(&c, 40).contains_key(&1));
        let e2 = endpoint(2);
        let e3 = endpoint(3);
        for _ in 0..5 {
            c.record(&e2, Outcome::Reset);
            c.record(&e3, Outcome::Reset);
        }
        let m = counts(&c, 80);
        assert_eq!(m.len(), 2, "at most 50% ejected: {m:?}");
    }

    #[tokio::test]
    async fn least_request_prefers_the_idle_endpoint() {
        let c = Arc::new(Cluster::new(
            def(LbPolicy::LeastRequest, false),
            ClusterStats::default(),
        ));
        c.assign(&Assignment {
            priorities: vec![vec![locality("z1", 1, vec![ep(1, true), ep(2, true)])]],
            overprovisioning: 140,
        });
        let mut held = Vec::new();
        while held.len() < 10 {
            let f = c.pick(None).unwrap();
            if f.endpoint.address.port() == 1 {
                held.push(f);
            }
        }
        let m = counts(&c, 200);
        assert!(
            m.get(&2).copied().unwrap_or(0) > m.get(&1).copied().unwrap_or(0),
            "{m:?}"
        );
    }

    #[tokio::test]
    async fn max_requests_is_a_circuit_breaker() {
        let mut d = def(LbPolicy::RoundRobin, false);
        d.limits.max_requests = 2;
        let c = Arc::new(Cluster::new(d, ClusterStats::default()));
        let a = c.admit().unwrap();
        let _b = c.admit().unwrap();
        assert_eq!(c.admit().unwrap_err(), Unavailable::Overflow);
        drop(a);
        assert!(c.admit().is_ok());
    }
}
