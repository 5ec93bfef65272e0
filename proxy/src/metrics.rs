//! The proxy's Prometheus metrics (`/stats`): xDS (responses, ACKs, NACKs per type),
//! downstream requests per listener, and per cluster the upstream requests, retries,
//! circuit-breaker overflows and outlier ejections.
//!
//! Per-cluster counters are plain atomics in one compact struct per cluster
//! ([`ClusterCounters`], 72 bytes), kept in the cluster, so the request path never
//! touches the registry's locks; a collector encodes them on each scrape. (Registered
//! series cost nine label sets, nine counters and nine copies of the cluster's name
//! per cluster: most of a sidecar's memory with 10,000 clusters, docs/proxy.md.)

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

/// Every metric of the proxy, registered once.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub xds_responses: Family<TypeLabel, Counter>,
    pub xds_acks: Family<TypeLabel, Counter>,
    pub xds_nacks: Family<TypeLabel, Counter>,
    pub xds_connected: Gauge,
    pub xds_connect_failures: Counter,
    pub ready: Gauge,
    /// Every held cluster's counters, by name, for the collector.
    clusters: Arc<ClusterSet>,
    pub no_route: Counter,
}

/// A monotonic counter: one atomic.
#[derive(Debug, Default)]
pub struct Count(AtomicU64);

impl Count {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One cluster's counters.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    pub requests: Count,
    pub responses_2xx: Count,
    pub responses_4xx: Count,
    pub responses_5xx: Count,
    pub failures: Count,
    pub retries: Count,
    pub overflow: Count,
    pub retry_overflow: Count,
    pub ejections: Count,
}

/// What a cluster holds: its counters, shared with the collector.
pub type ClusterStats = Arc<ClusterCounters>;

/// The held clusters' counters by name. The lock exists because the xDS client adds
/// and removes clusters while a scrape encodes them; neither holds it across an await.
#[derive(Debug, Default)]
struct ClusterSet(Mutex<BTreeMap<String, ClusterStats>>);

/// Reads one counter of a cluster.
type Field = fn(&ClusterCounters) -> &Count;

/// (name, help, the counter) of each per-cluster series but the responses.
type Series = (&'static str, &'static str, Field);

const SERIES: [Series; 5] = [
    (
        "upstream_requests",
        "Requests sent upstream (each try)",
        |c| &c.requests,
    ),
    ("upstream_retries", "Retries", |c| &c.retries),
    (
        "upstream_overflow",
        "Requests refused by a circuit breaker",
        |c| &c.overflow,
    ),
    (
        "upstream_retry_overflow",
        "Retries refused by the retry budget",
        |c| &c.retry_overflow,
    ),
    (
        "outlier_ejections",
        "Endpoints ejected by outlier detection",
        |c| &c.ejections,
    ),
];

const CLASSES: [(&str, Field); 4] = [
    ("2xx", |c| &c.responses_2xx),
    ("4xx", |c| &c.responses_4xx),
    ("5xx", |c| &c.responses_5xx),
    ("failure", |c| &c.failures),
];

impl Collector for ClusterSet {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let clusters = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (name, help, count) in SERIES {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (cluster, c) in clusters.iter() {
                let labels = [("cluster", cluster.as_str())];
                ConstCounter::new(count(c).get()).encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "upstream_responses",
            "Upstream answers by class (2xx, 4xx, 5xx, failure)",
            None,
            MetricType::Counter,
        )?;
        for (cluster, c) in clusters.iter() {
            for (class, count) in CLASSES {
                let labels = [("cluster", cluster.as_str()), ("class", class)];
                ConstCounter::new(count(c).get()).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tributary_proxy");
        let m = Metrics {
            xds_responses: Family::default(),
            xds_acks: Family::default(),
            xds_nacks: Family::default(),
            xds_connected: Gauge::default(),
            xds_connect_failures: Counter::default(),
            ready: Gauge::default(),
            clusters: Arc::default(),
            no_route: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "xds_responses",
            "xDS responses received",
            m.xds_responses.clone(),
        );
        registry.register("xds_acks", "xDS responses ACKed", m.xds_acks.clone());
        registry.register("xds_nacks", "xDS responses NACKed", m.xds_nacks.clone());
        registry.register(
            "xds_connected",
            "1 while the xDS stream is up",
            m.xds_connected.clone(),
        );
        registry.register(
            "xds_connect_failures",
            "Failed attempts to reach the xDS server",
            m.xds_connect_failures.clone(),
        );
        registry.register(
            "ready",
            "1 once the first complete config is applied",
            m.ready.clone(),
        );
        registry.register_collector(Box::new(m.clusters.clone()));
        registry.register(
            "no_route",
            "Requests that matched no route or cluster (404/503)",
            m.no_route.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The counters of cluster `name`, kept across redefinitions of the cluster.
    pub fn cluster(&self, name: &str) -> ClusterStats {
        let mut clusters = self.clusters.0.lock().unwrap_or_else(|e| e.into_inner());
        clusters.entry(name.to_string()).or_default().clone()
    }

    /// Forgets a removed cluster's series.
    pub fn remove_cluster(&self, name: &str) {
        let mut clusters = self.clusters.0.lock().unwrap_or_else(|e| e.into_inner());
        clusters.remove(name);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
