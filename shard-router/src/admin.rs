//! The router's admin HTTP: `/healthz`, `/readyz` (membership listed), `/metrics`
//! (Prometheus) and `/status/routes` (every shard and its live replicas).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;

use crate::table::Table;

#[derive(Debug, Clone)]
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub table: Arc<Table>,
}

pub fn router(state: AdminState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status/routes", get(routes))
        .with_state(state)
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if *s.table.applied().borrow() > 0 {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: membership not listed from the store yet\n",
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    tributary_controlplane::admin::metrics_response(&s.registry)
}

async fn routes(State(s): State<AdminState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "shards": s.table.routes() }))
}
