//! Federation: remote agents stream one cluster's services and endpoints into the hub.
//!
//! - this module: the domain form of the protocol (no protobuf, no I/O);
//! - [`convert`]: proto ↔ domain at the edge, validating every item;
//! - [`server`]: the hub side of the stream (one session per agent);
//! - [`secrets`]: gateway credentials from the agents' Kubernetes Secrets (what to
//!   ask each agent for, and checking what it sends);
//! - [`slice`]: a replica holds only the shards it serves (services of other shards'
//!   environments are refused at the edge);
//! - the agent side lives in [`crate::agent`].

pub mod convert;
pub mod secrets;
pub mod server;
pub mod slice;

use std::time::SystemTime;

use crate::model::{Endpoint, ObjectKey, ServicePort};

/// Who an agent speaks for, from its Hello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterInfo {
    pub id: String,
    pub region: String,
    pub zone: String,
    pub network: String,
    pub agent_version: String,
    /// The agent process's random id: resume needs the same incarnation.
    pub incarnation: String,
}

/// A service as one cluster declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FedService {
    pub key: ObjectKey,
    pub environment: String,
    pub hosts: Vec<String>,
    pub ports: Vec<ServicePort>,
}

/// One endpoint address of a cluster, with the name of the endpoint it came from
/// (empty: anonymous). An endpoint with several addresses gives one per address.
#[derive(Debug, Clone, PartialEq)]
pub struct FedEndpoint {
    pub name: String,
    pub endpoint: Endpoint,
}

/// Every endpoint of one service in the agent's cluster, as validated.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EndpointSet {
    pub endpoints: Vec<FedEndpoint>,
    /// Named endpoints whose new form was invalid: the hub keeps their previous form.
    pub keep: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChangeKind {
    UpsertService(FedService),
    DeleteService(ObjectKey),
    /// Every endpoint of one service in the agent's cluster.
    UpsertEndpoints(ObjectKey, EndpointSet),
    DeleteEndpoints(ObjectKey),
    /// A service upsert that was rejected: the hub keeps what it held for the key, and
    /// a full resync counts the key as named (a rejection never becomes a deletion).
    KeepService(ObjectKey),
    /// The same for a rejected endpoint set.
    KeepEndpoints(ObjectKey),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// When the agent observed it.
    pub origin: SystemTime,
    pub kind: ChangeKind,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    pub version: u64,
    /// (Part of) the complete state of the cluster: anything held and not named by
    /// the whole resync is deleted when its last part arrives.
    pub full: bool,
    /// More parts of this diff or resync follow.
    pub more: bool,
    pub changes: Vec<Change>,
}

/// Bounds on what one agent may send; each is a hub flag (see `docs/federation.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most changes in one batch; a larger batch is rejected (not applied).
    pub max_batch_changes: usize,
    /// Most bytes of one federation message (the decode limit).
    pub max_message_bytes: usize,
    /// Most endpoints in one endpoint set; a larger set is rejected as an item.
    pub max_endpoints_per_set: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch_changes: 10_000,
            max_message_bytes: 16 << 20,
            max_endpoints_per_set: 20_000,
        }
    }
}

/// A rejected item of a batch (the rest is applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemError {
    pub index: u32,
    pub message: String,
}
