//! The hub's Prometheus metrics, registered once into one registry.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::xds::XdsType;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: &'static str,
}

impl From<XdsType> for TypeLabel {
    fn from(t: XdsType) -> Self {
        TypeLabel { r#type: t.short() }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    pub protocol: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnvLabel {
    pub environment: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster: String,
}

/// A remote cluster's Kubernetes Secret (a gateway credential's source).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabel {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    pub federation_messages: Family<KindLabel, Counter>,
    pub federation_changes_applied: Counter,
    pub federation_item_errors: Counter,
    pub federation_items_unserved: Counter,
    pub federation_lag_seconds: Family<ClusterLabel, Gauge<f64, AtomicU64>>,
    pub federation_reconnects: Counter,
    pub federation_rejected: Counter,
    pub federation_batches_rejected: Counter,
    /// Services an agent exported that its cluster's registry entry does not grant.
    pub federation_exports_refused: Family<ClusterLabel, Counter>,
    /// Secrets an agent sent that the hub did not ask it for (or that its grant does
    /// not cover).
    pub federation_secrets_refused: Family<ClusterLabel, Counter>,
    /// Secret updates the hub could not serve (invalid, or deleted at the source):
    /// the last good credential stays served.
    pub credential_secret_errors: Family<SecretLabel, Counter>,
    pub federation_clusters_connected: Gauge,
    pub federation_clusters_grace: Gauge,
    pub debounce_seconds: Histogram,
    pub convergence_seconds: Family<TypeLabel, Histogram>,
    pub xds_ack_seconds: Histogram,
    pub xds_admission_waiting: Gauge,
    pub xds_connections: Family<ProtocolLabel, Gauge>,
    pub xds_requests: Family<TypeLabel, Counter>,
    pub xds_responses: Family<TypeLabel, Counter>,
    pub xds_resources_sent: Family<TypeLabel, Counter>,
    pub xds_bytes_sent: Family<TypeLabel, Counter>,
    pub xds_acks: Family<TypeLabel, Counter>,
    pub xds_nacks: Family<TypeLabel, Counter>,
    pub xds_pump_seconds: Histogram,
    pub config_reloads: Counter,
    pub config_reads: Counter,
    pub config_reload_errors: Counter,
    pub snapshots_published: Family<EnvLabel, Counter>,
    pub generation_seconds: Histogram,
}

impl Metrics {
    /// Creates the metrics and registers them under the `tributary` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            federation_messages: Family::default(),
            federation_changes_applied: Counter::default(),
            federation_item_errors: Counter::default(),
            federation_items_unserved: Counter::default(),
            federation_lag_seconds: Family::default(),
            federation_reconnects: Counter::default(),
            federation_rejected: Counter::default(),
            federation_batches_rejected: Counter::default(),
            federation_exports_refused: Family::default(),
            federation_secrets_refused: Family::default(),
            credential_secret_errors: Family::default(),
            federation_clusters_connected: Gauge::default(),
            federation_clusters_grace: Gauge::default(),
            debounce_seconds: Histogram::new(exponential_buckets(1e-3, 2.0, 12)),
            convergence_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1e-3, 1.5, 28))
            }),
            xds_ack_seconds: Histogram::new(exponential_buckets(1e-4, 2.0, 18)),
            xds_admission_waiting: Gauge::default(),
            xds_connections: Family::default(),
            xds_requests: Family::default(),
            xds_responses: Family::default(),
            xds_resources_sent: Family::default(),
            xds_bytes_sent: Family::default(),
            xds_acks: Family::default(),
            xds_nacks: Family::default(),
            xds_pump_seconds: Histogram::new(exponential_buckets(1e-6, 4.0, 12)),
            config_reloads: Counter::default(),
            config_reads: Counter::default(),
            config_reload_errors: Counter::default(),
            snapshots_published: Family::default(),
            generation_seconds: Histogram::new(exponential_buckets(1e-5, 4.0, 12)),
        };
        let r = registry.sub_registry_with_prefix("tributary");
        r.register(
            "xds_connections",
            "Connected xDS streams",
            m.xds_connections.clone(),
        );
        r.register(
            "xds_requests",
            "xDS requests received",
            m.xds_requests.clone(),
        );
        r.register(
            "xds_responses",
            "xDS responses sent",
            m.xds_responses.clone(),
        );
        r.register(
            "xds_resources_sent",
            "Resources carried by xDS responses",
            m.xds_resources_sent.clone(),
        );
        r.register(
            "xds_bytes_sent",
            "Encoded resource bytes carried by xDS responses",
            m.xds_bytes_sent.clone(),
        );
        r.register("xds_acks", "xDS responses ACKed", m.xds_acks.clone());
        r.register("xds_nacks", "xDS responses NACKed", m.xds_nacks.clone());
        r.register(
            "xds_pump_seconds",
            "Time one stream spends diffing and queueing responses for one wake-up",
            m.xds_pump_seconds.clone(),
        );
        r.register(
            "config_reloads",
            "Config file sets applied",
            m.config_reloads.clone(),
        );
        r.register(
            "config_reads",
            "Times the config files were read: at start and after a change event (a read that finds the content unchanged applies nothing)",
            m.config_reads.clone(),
        );
        r.register(
            "config_reload_errors",
            "Config file sets rejected",
            m.config_reload_errors.clone(),
        );
        r.register(
            "snapshots_published",
            "Snapshots published per environment",
            m.snapshots_published.clone(),
        );
        r.register(
            "generation_seconds",
            "Time to generate one environment's resources",
            m.generation_seconds.clone(),
        );
        r.register(
            "debounce_seconds",
            "How long the index waited between the first change of a burst and acting on it",
            m.debounce_seconds.clone(),
        );
        r.register(
            "convergence_seconds",
            "From a change's origin (agent or config file) to a client's ACK of it, by type",
            m.convergence_seconds.clone(),
        );
        r.register(
            "xds_ack_seconds",
            "From sending an xDS response to its ACK or NACK",
            m.xds_ack_seconds.clone(),
        );
        r.register(
            "xds_admission_waiting",
            "xDS streams waiting for an initial-sync slot (--max-initial-syncs)",
            m.xds_admission_waiting.clone(),
        );
        m.register_federation(r);
        m
    }

    fn register_federation(&self, r: &mut Registry) {
        r.register(
            "federation_messages",
            "Federation messages received, by kind",
            self.federation_messages.clone(),
        );
        r.register(
            "federation_changes_applied",
            "Federation changes applied to the index",
            self.federation_changes_applied.clone(),
        );
        r.register(
            "federation_item_errors",
            "Federation items rejected as invalid",
            self.federation_item_errors.clone(),
        );
        r.register(
            "federation_items_unserved",
            "Federated services not held because this replica does not serve their shard (environment, the agent's zone)",
            self.federation_items_unserved.clone(),
        );
        r.register(
            "federation_lag_seconds",
            "Apply time minus origin time of each cluster's last change",
            self.federation_lag_seconds.clone(),
        );
        r.register(
            "federation_reconnects",
            "Agents that connected again for a known cluster",
            self.federation_reconnects.clone(),
        );
        r.register(
            "federation_rejected",
            "Agent sessions rejected (cluster id already live)",
            self.federation_rejected.clone(),
        );
        r.register(
            "federation_batches_rejected",
            "Federation batches rejected and not applied (oversize, undecodable, session not live)",
            self.federation_batches_rejected.clone(),
        );
        r.register(
            "federation_exports_refused",
            "Services refused because the cluster's RemoteCluster grant does not cover their environment or namespace",
            self.federation_exports_refused.clone(),
        );
        r.register(
            "federation_secrets_refused",
            "Kubernetes Secrets an agent sent that the hub did not ask for, or that the cluster's RemoteCluster grant does not cover",
            self.federation_secrets_refused.clone(),
        );
        r.register(
            "credential_secret_errors",
            "Updates of a credential's Kubernetes Secret that were not served (invalid, or deleted in its cluster); the last good certificate stays served",
            self.credential_secret_errors.clone(),
        );
        r.register(
            "federation_clusters_connected",
            "Remote clusters with a live agent",
            self.federation_clusters_connected.clone(),
        );
        r.register(
            "federation_clusters_grace",
            "Remote clusters in their grace period",
            self.federation_clusters_grace.clone(),
        );
    }

    /// Counts a connection until the guard is dropped.
    pub fn connection_guard(&self, protocol: &'static str) -> ConnectionGuard {
        let gauge = self
            .xds_connections
            .get_or_create(&ProtocolLabel { protocol })
            .clone();
        gauge.inc();
        ConnectionGuard(gauge)
    }
}

#[derive(Debug)]
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the hub keeps is exported (four were kept but never registered).
    #[test]
    fn every_metric_is_exported() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.debounce_seconds.observe(0.1);
        m.convergence_seconds
            .get_or_create(&TypeLabel { r#type: "CDS" })
            .observe(0.1);
        m.xds_ack_seconds.observe(0.1);
        m.xds_admission_waiting.inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for name in [
            "tributary_debounce_seconds",
            "tributary_convergence_seconds",
            "tributary_xds_ack_seconds",
            "tributary_xds_admission_waiting",
            "tributary_federation_batches_rejected",
            "tributary_generation_seconds",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from:\n{text}"
            );
        }
    }
}
