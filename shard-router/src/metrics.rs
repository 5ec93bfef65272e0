//! The router's Prometheus metrics (served on its admin port's `/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub replica: String,
    pub shard: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    pub shard: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug)]
pub struct RouterMetrics {
    /// Relayed client connections open now, per replica and shard (Envoy and gRPC's
    /// xDS clients open one ADS stream per connection).
    pub connections: Family<ReplicaLabels, Gauge>,
    /// Connections routed to a replica, per shard.
    pub routed: Family<ShardLabel, Counter>,
    /// Connections whose first stream was refused or unreadable, per reason.
    pub refused: Family<ReasonLabel, Counter>,
    /// Relayed connections closed because their replica left the shard.
    pub ended_by_membership: Counter,
    /// Relayed connections closed because the connection to the replica failed.
    pub upstream_failures: Counter,
    /// Live replica registrations.
    pub replicas: Gauge,
}

impl RouterMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            connections: Family::default(),
            routed: Family::default(),
            refused: Family::default(),
            ended_by_membership: Counter::default(),
            upstream_failures: Counter::default(),
            replicas: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("tributary_router");
        r.register(
            "connections",
            "Relayed client connections open now, per replica and shard",
            m.connections.clone(),
        );
        r.register(
            "routed",
            "Client connections routed to a replica (by their first xDS stream), per shard",
            m.routed.clone(),
        );
        r.register(
            "refused",
            "Client connections whose first stream was refused or unreadable, per reason",
            m.refused.clone(),
        );
        r.register(
            "ended_by_membership",
            "Relayed connections closed because their replica left the shard",
            m.ended_by_membership.clone(),
        );
        r.register(
            "upstream_failures",
            "Relayed connections closed because the connection to their replica failed (or could not be made)",
            m.upstream_failures.clone(),
        );
        r.register(
            "replicas",
            "Live hub replicas registered in membership",
            m.replicas.clone(),
        );
        m
    }

    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }
}
