//! The proxy's Prometheus metrics (`/stats`): xDS (responses, ACKs, NACKs per type),
//! downstream requests per listener, and per cluster the upstream requests, retries,
//! circuit-breaker overflows and outlier ejections. Per-cluster counters are looked up
//! once when the cluster is created and kept in it: the request path never touches
//! the registry's locks.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabel {
    pub cluster: String,
    pub class: &'static str,
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
    upstream_requests: Family<ClusterLabel, Counter>,
    upstream_responses: Family<ResponseLabel, Counter>,
    retries: Family<ClusterLabel, Counter>,
    overflow: Family<ClusterLabel, Counter>,
    retry_overflow: Family<ClusterLabel, Counter>,
    ejections: Family<ClusterLabel, Counter>,
    pub no_route: Counter,
}

/// One cluster's counters (clones of the registered ones).
#[derive(Debug, Clone, Default)]
pub struct ClusterStats {
    pub requests: Counter,
    pub responses_2xx: Counter,
    pub responses_4xx: Counter,
    pub responses_5xx: Counter,
    pub failures: Counter,
    pub retries: Counter,
    pub overflow: Counter,
    pub retry_overflow: Counter,
    pub ejections: Counter,
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
            upstream_requests: Family::default(),
            upstream_responses: Family::default(),
            retries: Family::default(),
            overflow: Family::default(),
            retry_overflow: Family::default(),
            ejections: Family::default(),
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
        registry.register(
            "upstream_requests",
            "Requests sent upstream (each try)",
            m.upstream_requests.clone(),
        );
        registry.register(
            "upstream_responses",
            "Upstream answers by class (2xx, 4xx, 5xx, failure)",
            m.upstream_responses.clone(),
        );
        registry.register("upstream_retries", "Retries", m.retries.clone());
        registry.register(
            "upstream_overflow",
            "Requests refused by a circuit breaker",
            m.overflow.clone(),
        );
        registry.register(
            "upstream_retry_overflow",
            "Retries refused by the retry budget",
            m.retry_overflow.clone(),
        );
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection",
            m.ejections.clone(),
        );
        registry.register(
            "no_route",
            "Requests that matched no route or cluster (404/503)",
            m.no_route.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn cluster(&self, name: &str) -> ClusterStats {
        let l = ClusterLabel {
            cluster: name.to_string(),
        };
        let r = |class| {
            self.upstream_responses
                .get_or_create(&ResponseLabel {
                    cluster: name.to_string(),
                    class,
                })
                .clone()
        };
        ClusterStats {
            requests: self.upstream_requests.get_or_create(&l).clone(),
            responses_2xx: r("2xx"),
            responses_4xx: r("4xx"),
            responses_5xx: r("5xx"),
            failures: r("failure"),
            retries: self.retries.get_or_create(&l).clone(),
            overflow: self.overflow.get_or_create(&l).clone(),
            retry_overflow: self.retry_overflow.get_or_create(&l).clone(),
            ejections: self.ejections.get_or_create(&l).clone(),
        }
    }

    /// Forgets a removed cluster's series.
    pub fn remove_cluster(&self, name: &str) {
        let l = ClusterLabel {
            cluster: name.to_string(),
        };
        for f in [
            &self.upstream_requests,
            &self.retries,
            &self.overflow,
            &self.retry_overflow,
            &self.ejections,
        ] {
            f.remove(&l);
        }
        for class in ["2xx", "4xx", "5xx", "failure"] {
            self.upstream_responses.remove(&ResponseLabel {
                cluster: name.to_string(),
                class,
            });
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
