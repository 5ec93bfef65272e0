//! The shard router: Tributary's stateless front door for xDS clients.
//!
//! A proxy connects to the router as it would to a hub (the same ADS service and
//! methods, SotW and Delta). The router reads only the stream's first request
//! ([`first`]): the node id, the environment from `node.metadata["tributary.io/env"]`
//! and the zone from `node.locality.zone`. The shard `(environment, zone)` has live
//! replicas in membership ([`membership`] follows it in the store into the routing
//! [`table`]); the router picks one by rendezvous hashing on the node id
//! ([`rendezvous`]), so every router picks the same replica without talking to the
//! others, and relays the stream as bytes ([`relay`]). When that replica leaves the
//! shard, its relayed streams end with `UNAVAILABLE` and their clients reconnect
//! through the router to a live replica. [`app`] assembles it; [`admin`] serves
//! health, metrics and the routing table; [`directory`] answers which replicas
//! serve which shards (the directory API, on the xDS port); [`mesh`] runs the embedded store, hubs, the
//! router and file-mode agents in one process (`tributary-mesh`), with `tributary-proxy`
//! gateways and sidecars ([`mesh_proxies`]) and example backends ([`mesh_backends`]).

pub mod admin;
pub mod app;
pub mod directory;
pub mod first;
pub mod hpack;
pub mod membership;
pub mod mesh;
pub mod mesh_backends;
pub mod mesh_proxies;
pub mod metrics;
pub mod pki;
pub mod relay;
pub mod rendezvous;
pub mod table;
pub mod wire;
