//! The agent's telemetry and its small admin endpoint (`--admin-addr`).
//!
//! | path | what |
//! |---|---|
//! | `/healthz` | 200 while the process serves |
//! | `/metrics` | Prometheus text: `tributary_agent_*` |
//! | `/status` | JSON: hub connection state, incarnation, versions sent / acknowledged, rejected batches and the last rejection, item errors; with `--router`, the same for each replica the agent feeds (`replicas`) |
//!
//! The connection loop is the only writer; the status lock is held only to copy or
//! update a few fields, never across an await.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::response::{Json, Response};
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::AgentConfig;
use crate::status::unix_now;

/// The agent's Prometheus metrics.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    pub sessions: Counter,
    pub connected: Gauge,
    pub batches_sent: Counter,
    pub changes_sent: Counter,
    pub batches_acked: Counter,
    pub batches_rejected: Counter,
    pub item_errors: Counter,
}

/// A batch the hub did not apply.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rejection {
    pub version: u64,
    pub message: String,
    pub at_unix: f64,
}

/// What `/status` shows.
#[derive(Debug, Clone, Serialize, Default)]
pub struct AgentStatus {
    pub hub: String,
    pub cluster_id: String,
    pub incarnation: String,
    /// `connecting`, `connected`, `backoff` or `stopped`.
    pub state: &'static str,
    /// The current session resumed from the acknowledged version (no full resync).
    pub resumed: bool,
    pub sessions: u64,
    /// The last batch version sent, and the last complete state the hub acknowledged.
    pub version_sent: u64,
    pub version_acked: u64,
    pub batches_rejected: u64,
    pub last_rejection: Option<Rejection>,
    pub item_errors: u64,
    pub last_item_error: Option<String>,
    /// Why the last session ended.
    pub last_session_error: Option<String>,
    /// With `--router`: one entry per replica the agent feeds (its `hub` is the
    /// replica's address, `replica` its id); `state` above is the directory's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<AgentStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// Metrics and status of one agent.
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    pub metrics: Arc<AgentMetrics>,
    status: Mutex<AgentStatus>,
    /// With `--router`: the telemetry of each replica's connection, by replica id
    /// (they share `metrics`). The lock is held only to add, remove or list entries.
    replicas: Mutex<BTreeMap<String, Arc<Telemetry>>>,
    /// Bumped on every change of this status or of a replica's (shared with them).
    changes: Arc<watch::Sender<u64>>,
}

impl Telemetry {
    pub fn new(cfg: &AgentConfig, incarnation: String) -> Self {
        let metrics = Arc::new(AgentMetrics::default());
        let mut registry = Registry::default();
        let r = registry.sub_registry_with_prefix("tributary_agent");
        let m = &metrics;
        r.register(
            "sessions",
            "Sessions opened with the hub",
            m.sessions.clone(),
        );
        r.register(
            "connected",
            "Live sessions with hubs (with --hub: 1 while connected; with --router: one per replica fed)",
            m.connected.clone(),
        );
        r.register("batches_sent", "Batches sent", m.batches_sent.clone());
        r.register("changes_sent", "Changes sent", m.changes_sent.clone());
        r.register(
            "batches_acked",
            "Complete states the hub acknowledged",
            m.batches_acked.clone(),
        );
        r.register(
            "batches_rejected",
            "Batches the hub rejected (not applied)",
            m.batches_rejected.clone(),
        );
        r.register(
            "item_errors",
            "Items the hub (or the agent's size limit) rejected",
            m.item_errors.clone(),
        );
        Self {
            registry,
            metrics,
            status: Mutex::new(AgentStatus {
                hub: cfg.hub.clone(),
                cluster_id: cfg.cluster_id.clone(),
                incarnation,
                state: "connecting",
                ..Default::default()
            }),
            replicas: Mutex::default(),
            changes: Arc::new(watch::channel(0).0),
        }
    }

    /// Changes whenever the status (or a replica's) changes: for waiting on it.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// The telemetry of this agent's connection to replica `id` at `hub`: its own
    /// status (listed in this one's), the same incarnation and the same counters.
    pub fn replica(&self, id: &str, hub: &str) -> Arc<Telemetry> {
        let parent = self.status();
        let child = Arc::new(Telemetry {
            registry: Registry::default(),
            metrics: self.metrics.clone(),
            status: Mutex::new(AgentStatus {
                hub: hub.to_string(),
                cluster_id: parent.cluster_id,
                incarnation: parent.incarnation,
                state: "connecting",
                replica: Some(id.to_string()),
                ..Default::default()
            }),
            replicas: Mutex::default(),
            changes: self.changes.clone(),
        });
        self.replicas
            .lock()
            .unwrap()
            .insert(id.to_string(), child.clone());
        self.changed();
        child
    }

    /// Forgets replica `id`'s connection (it left the agent's shards).
    pub fn replica_gone(&self, id: &str) {
        self.replicas.lock().unwrap().remove(id);
        self.changed();
    }

    pub fn incarnation(&self) -> String {
        self.status.lock().unwrap().incarnation.clone()
    }

    pub fn status(&self) -> AgentStatus {
        let children: Vec<Arc<Telemetry>> =
            self.replicas.lock().unwrap().values().cloned().collect();
        let mut s = self.status.lock().unwrap().clone();
        s.replicas = children.iter().map(|c| c.status()).collect();
        s
    }

    fn update(&self, f: impl FnOnce(&mut AgentStatus)) {
        f(&mut self.status.lock().unwrap());
        self.changed();
    }

    /// Leaving `connected` (for `backoff` or `stopped`) ends a live session.
    pub(super) fn set_state(&self, state: &'static str) {
        self.update(|s| {
            if s.state == "connected" && state != "connected" {
                self.metrics.connected.dec();
            }
            s.state = state;
        });
    }

    pub(super) fn connected(&self, resumed: bool) {
        self.metrics.sessions.inc();
        self.update(|s| {
            // Under the status lock, as `set_state`'s decrement: the gauge counts
            // exactly the links whose state is `connected`.
            if s.state != "connected" {
                self.metrics.connected.inc();
            }
            s.state = "connected";
            s.resumed = resumed;
            s.sessions += 1;
        });
    }

    pub(super) fn session_ended(&self, error: Option<String>) {
        self.update(|s| {
            if error.is_some() {
                s.last_session_error = error;
            }
        });
    }

    pub(super) fn sent(&self, version: u64, changes: usize) {
        self.metrics.batches_sent.inc();
        self.metrics.changes_sent.inc_by(changes as u64);
        self.update(|s| s.version_sent = version);
    }

    pub(super) fn acked(&self, version: u64) {
        self.metrics.batches_acked.inc();
        self.update(|s| s.version_acked = version);
    }

    pub(super) fn batch_rejected(&self, version: u64, message: &str) {
        self.metrics.batches_rejected.inc();
        self.update(|s| {
            s.batches_rejected += 1;
            s.last_rejection = Some(Rejection {
                version,
                message: message.to_string(),
                at_unix: unix_now(),
            });
        });
    }

    pub(super) fn item_error(&self, message: String) {
        self.metrics.item_errors.inc();
        self.update(|s| {
            s.item_errors += 1;
            s.last_item_error = Some(message);
        });
    }
}

pub fn router(telemetry: Arc<Telemetry>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(telemetry)
}

async fn metrics(State(t): State<Arc<Telemetry>>) -> Response {
    crate::admin::metrics_response(&t.registry)
}

async fn status(State(t): State<Arc<Telemetry>>) -> Json<AgentStatus> {
    Json(t.status())
}

/// Serves the admin endpoint on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(telemetry))
        .with_graceful_shutdown(shutdown)
        .await
}
