//! Sync status: what each connected xDS client was sent, ACKed and NACKed.
//!
//! Each stream owns its [`ClientStatus`] behind its own mutex (uncontended except
//! when an operator reads it); the registry only maps stream ids to those records
//! and is locked at connect, disconnect and read.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

#[derive(Debug, Clone, Serialize)]
pub struct ClientStatus {
    pub node_id: String,
    pub cluster: String,
    pub environment: String,
    /// False while the hub serves no such environment: the client gets nothing.
    pub environment_served: bool,
    /// `sidecar` or `gateway/<name>`.
    pub role: String,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    pub peer: Option<String>,
    pub connected_at_unix: f64,
    /// Keyed by `CDS`, `EDS`, `LDS`, `RDS`, `SDS`.
    pub types: BTreeMap<&'static str, TypeStatus>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    pub type_url: &'static str,
    pub wildcard: bool,
    /// Names subscribed explicitly.
    pub subscribed: usize,
    /// Removals held back: make-before-break (a cluster leaves once the routes that
    /// named it are answered) or the hub's withdrawal hold after a restart.
    pub deferred_removals: usize,
    /// Resources the client holds, as of its last ACK.
    pub resources: usize,
    pub last_sent_version: String,
    pub last_sent_at_unix: Option<f64>,
    pub last_acked_version: String,
    pub last_acked_at_unix: Option<f64>,
    /// Nonce of the response awaiting ACK, if any.
    pub pending_nonce: Option<String>,
    /// When that response was sent.
    pub pending_since_unix: Option<f64>,
    /// Sent a version and has not ACKed or NACKed it within the stale threshold.
    pub stale: bool,
    pub responses_total: u64,
    pub nacks_total: u64,
    pub last_nack: Option<NackRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NackRecord {
    /// Our version the client rejected.
    pub version: String,
    pub nonce: String,
    /// The version the client says it still runs.
    pub client_version: String,
    /// The client's `error_detail.message`.
    pub message: String,
    /// The resources the client rejected (those its message names; every resource
    /// of the response when it names none), at most `--nack-record-names` of them.
    pub resources: Vec<String>,
    /// How many resources it rejected in all.
    pub resources_total: usize,
    pub at_unix: f64,
}

#[derive(Debug, Default)]
pub struct SyncRegistry {
    clients: Mutex<BTreeMap<u64, Arc<Mutex<ClientStatus>>>>,
}

/// Removes a stream's record when the stream ends.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<SyncRegistry>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.clients.lock().unwrap().remove(&self.id);
    }
}

impl SyncRegistry {
    pub fn register(self: &Arc<Self>, id: u64, status: Arc<Mutex<ClientStatus>>) -> Registration {
        self.clients.lock().unwrap().insert(id, status);
        Registration {
            registry: self.clone(),
            id,
        }
    }

    /// How many xDS streams are connected (the replica's load figure).
    pub fn len(&self) -> usize {
        self.clients.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of every client's record, in connection order.
    pub fn snapshot(&self) -> Vec<ClientStatus> {
        self.snapshot_marking_stale(std::time::Duration::MAX)
    }

    /// Like [`Self::snapshot`], marking as stale every type whose response has waited
    /// for its ACK longer than `threshold`.
    pub fn snapshot_marking_stale(&self, threshold: std::time::Duration) -> Vec<ClientStatus> {
        let records: Vec<_> = self.clients.lock().unwrap().values().cloned().collect();
        let now = unix_now();
        records
            .iter()
            .map(|r| {
                let mut c = r.lock().unwrap().clone();
                for t in c.types.values_mut() {
                    t.stale = t
                        .pending_since_unix
                        .is_some_and(|since| now - since > threshold.as_secs_f64());
                }
                c
            })
            .collect()
    }
}
