//! Tributary's protocol types.
//!
//! - [`envoy`]: Envoy's xDS v3 types and services, re-exported from `envoy-types` so
//!   the whole workspace shares one tonic and one prost.
//! - [`wire`]: encode-once mirrors of `DiscoveryResponse` and `DeltaDiscoveryResponse`
//!   whose resources are pre-encoded bytes, and the ADS server generated over them.
//! - [`federation`], [`directory`], [`admin`]: Tributary's own APIs, version 1.

pub use envoy_types::pb as envoy;

pub mod wire;

/// Agent → hub federation stream (v1).
pub mod federation {
    pub mod v1 {
        #![allow(clippy::all, missing_debug_implementations)]
        include!("generated/tributary.federation.v1.rs");
    }
}

/// Shard directory served by the router (v1).
pub mod directory {
    pub mod v1 {
        #![allow(clippy::all, missing_debug_implementations)]
        include!("generated/tributary.directory.v1.rs");
    }
}

/// Operator calls on a hub (v1).
pub mod admin {
    pub mod v1 {
        #![allow(clippy::all, missing_debug_implementations)]
        include!("generated/tributary.admin.v1.rs");
    }
}

/// Type URLs of the xDS resources Tributary serves.
pub mod type_url {
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    pub const HTTP_CONNECTION_MANAGER: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    pub const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
}
