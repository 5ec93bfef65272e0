//! The Tributary hub.
//!
//! Data flow (see `ARCHITECTURE.md`): a config source ([`config`]) produces a validated
//! [`model::Mesh`]; the [`index`] — the single writer — regenerates the environments
//! that changed ([`xds::generate`]) and publishes immutable per-environment snapshots
//! ([`xds::snapshot`]); each ADS stream ([`xds::server`]) diffs the newest snapshot
//! against what its client holds and sends only the difference from pre-encoded
//! bytes. [`admin`] serves health, metrics, sync status and the config API; [`app`]
//! wires it together. The config may live in the store (`tributary-store`, embedded
//! or etcd), where [`membership`] also registers the hub's replicas and assigns
//! shards; [`ctl`] is the operator's client.

pub mod admin;
pub mod agent;
pub mod app;
pub mod catalog;
pub mod config;
pub mod ctl;
pub mod federation;
pub mod http_client;
pub mod identity;
pub mod index;
pub mod membership;
pub mod metrics;
pub mod model;
pub mod status;
pub mod xds;
