//! Federation: remote agents stream one cluster's services and endpoints into the hub.
//!
//! - this module: the domain form of the protocol (no protobuf, no I/O);
//! - [`convert`]: proto ↔ domain at the edge, validating every item;
//! - [`server`]: the hub side of the stream (one session per agent);
//! - the agent side lives in [`crate::agent`].

pub mod convert;
pub mod server;

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
}

/// A service as one cluster declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FedService {
    pub key: ObjectKey,
    pub environment: String,
    pub hosts: Vec<String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChangeKind {
    UpsertService(FedService),
    DeleteService(ObjectKey),
    /// Every endpoint of one service in the agent's cluster.
    UpsertEndpoints(ObjectKey, Vec<Endpoint>),
    DeleteEndpoints(ObjectKey),
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
    /// The complete state of the cluster: anything held and not in it is deleted.
    pub full: bool,
    pub changes: Vec<Change>,
}

/// A rejected item of a batch (the rest is applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemError {
    pub index: u32,
    pub message: String,
}
