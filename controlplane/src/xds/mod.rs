//! xDS: generation, snapshots and the ADS server.
//!
//! - [`generate`]: one environment's model → encoded resources (once per shard).
//! - [`snapshot`]: immutable per-environment snapshots and the shard registry that
//!   publishes them (single writer, many readers, a dirty signal for fan-out).
//! - [`stream`]: one stream's state machine: subscriptions, what the client holds,
//!   NACKs, make-before-break ordering; pure logic, fuzzed against a client model.
//! - [`secrets`]: SDS: each stream's own identity's certificate and the trust
//!   bundle, issued once per identity and renewed at half-life.
//! - [`server`]: SotW and Delta ADS streams (the tonic side), each driving a
//!   [`stream::StreamState`] with requests and the newest snapshot.

pub mod generate;
pub mod locality;
pub mod secrets;
pub mod server;
pub mod snapshot;
pub mod stream;

use tributary_proto::type_url;

/// The resource types Tributary serves, in make-before-break push order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum XdsType {
    Cluster = 0,
    Endpoint = 1,
    Listener = 2,
    Route = 3,
    Secret = 4,
}

impl XdsType {
    pub const COUNT: usize = 5;
    pub const ALL: [XdsType; Self::COUNT] = [
        XdsType::Cluster,
        XdsType::Endpoint,
        XdsType::Listener,
        XdsType::Route,
        XdsType::Secret,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            XdsType::Cluster => type_url::CLUSTER,
            XdsType::Endpoint => type_url::ENDPOINT,
            XdsType::Listener => type_url::LISTENER,
            XdsType::Route => type_url::ROUTE,
            XdsType::Secret => type_url::SECRET,
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// `CDS`, `EDS`, ... for logs and metric labels.
    pub fn short(self) -> &'static str {
        match self {
            XdsType::Cluster => "CDS",
            XdsType::Endpoint => "EDS",
            XdsType::Listener => "LDS",
            XdsType::Route => "RDS",
            XdsType::Secret => "SDS",
        }
    }

    /// SotW responses of these types carry the client's complete set: a resource left
    /// out is deleted by the client.
    pub fn sotw_full_state(self) -> bool {
        matches!(self, XdsType::Cluster | XdsType::Listener)
    }
}
