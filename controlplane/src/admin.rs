//! The hub's admin HTTP endpoint: health, readiness, metrics, sync and config status.
//!
//! | path | what |
//! |---|---|
//! | `/healthz` | 200 while the process serves |
//! | `/readyz` | 200 once the initial config is applied and the xDS port is bound |
//! | `/metrics` | Prometheus text format |
//! | `/status/sync` | JSON: every connected xDS client, per type: sent, ACKed, NACKed |
//! | `/status/config` | JSON: config files, last applied generation, last errors |
//! | `/status/environments` | JSON: per environment: snapshot seq and resource counts |
//! | `/status/shards` | JSON: the shard assignment: live replicas, the assigner, each shard's replicas, what this replica serves; `catalog`: the shards it leads and the summaries it wrote |
//! | `GET /config?kind=&env=&name=` | JSON: config objects in the store (private keys replaced by `<redacted: private key>`, [`crate::config::redact`]) |
//! | `POST /config/apply[?dry_run=true]` | apply a multi-document YAML body (all or nothing); dry run: validate and compare only |
//! | `DELETE /config/{env}/{kind}/{namespace}/{name}[?dry_run=true]` | delete one object (validated: what remains must be valid) |
//! | `/status/clusters` | JSON: federated clusters: connected or in grace, version, counts, lag, rejected batches; known clusters pending resync after a restart, and whether withdrawals are held |
//! | `/config_dump?env=E&type=CDS` | JSON: resource names and versions of a shard |
//!
//! With mutual TLS every request is authorized by the peer's identity
//! ([`authorize`]): `/healthz` and `/readyz` for any certified peer; reads need an
//! operator with the read (or write) role on the environment the request names
//! (`?env=`, the path's environment), or on `*` for mesh-wide views; config writes
//! need the write role on every environment they touch. Hubs and routers may read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{delete, get, post};
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::config::redact::redact_document;
use crate::config::store::{ConfigStore, ObjectId, WriteError, WriteResult};
use crate::config::watch::ConfigStatus;
use crate::identity::authz::{AdminAction, authorize_admin};
use crate::identity::tls::PeerAddr;
use crate::index::IndexHandle;
use crate::membership::Membership;
use crate::model::Mesh;
use crate::status::SyncRegistry;
use crate::xds::XdsType;
use crate::xds::snapshot::Snapshots;

#[derive(Debug, Clone)]
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub sync: Arc<SyncRegistry>,
    pub snapshots: Arc<Snapshots>,
    pub config: Arc<Mutex<ConfigStatus>>,
    pub ready: Arc<AtomicBool>,
    pub index: IndexHandle,
    /// A client that has not ACKed a response for this long is STALE.
    pub stale_after: std::time::Duration,
    /// Config writes through the API; `None` when the hub reads config files.
    pub config_api: Option<ConfigStore>,
    pub membership: Membership,
    /// What this replica did as a shard leader for the cross-zone catalog.
    pub catalog: Arc<crate::catalog::publish::CatalogStats>,
    /// Whether requests are authorized, and the config with the operators' grants.
    pub authz: AdminAuthz,
}

/// The admin endpoint's authorization.
#[derive(Debug, Clone)]
pub struct AdminAuthz {
    /// False on a plaintext (`--insecure`) hub: there are no identities to check.
    pub enforce: bool,
    /// The config whose `Operator` objects grant roles.
    pub config: tokio::sync::watch::Receiver<Arc<Mesh>>,
    /// Operators with write on everything whatever the config says
    /// (`--bootstrap-operator`): who writes the first `Operator` objects into a store.
    pub bootstrap: Vec<String>,
}

/// Largest config apply body.
const MAX_APPLY_BYTES: usize = 16 << 20;

pub fn router(state: AdminState) -> Router {
    router_with(state, Router::new())
}

/// The admin routes plus `extra` (the CA's), all behind the same authorization.
pub fn router_with(state: AdminState, extra: Router) -> Router {
    let authz = state.authz.clone();
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status/sync", get(sync_status))
        .route("/status/config", get(config_status))
        .route("/status/environments", get(environments))
        .route("/status/clusters", get(clusters))
        .route("/status/shards", get(shards))
        .route("/config", get(config_list))
        .route("/config/apply", post(config_apply))
        .route(
            "/config/{env}/{kind}/{namespace}/{name}",
            delete(config_delete),
        )
        .route("/config_dump", get(config_dump))
        .with_state(state)
        .merge(extra)
        .layer(DefaultBodyLimit::max(MAX_APPLY_BYTES))
        .layer(axum::middleware::from_fn_with_state(authz, authorize))
}

/// What a request does: its action and the environments it touches (`None`: the
/// whole mesh). `Err` (why) for a body that cannot be read.
fn request_scope(
    method: &axum::http::Method,
    path: &str,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Result<(AdminAction, Vec<Option<String>>), String> {
    let env = || vec![query.get("env").cloned()];
    if path == "/config/apply" {
        let action = if dry_run(query) {
            AdminAction::Read
        } else {
            AdminAction::Write
        };
        let text =
            std::str::from_utf8(body).map_err(|_| "the body is not UTF-8 YAML".to_string())?;
        // Documents the parser cannot identify are refused by the apply itself; an
        // unreadable body touches nothing, and the apply says why.
        let envs: Vec<Option<String>> = crate::config::store::split_documents(text)
            .map(|docs| {
                docs.into_iter()
                    .map(|(id, _)| Some(id.environment))
                    .collect()
            })
            .unwrap_or_default();
        // Nothing identifiable: only a grant on the whole mesh may try it.
        return Ok((action, if envs.is_empty() { vec![None] } else { envs }));
    }
    if let Some(rest) = path.strip_prefix("/config/")
        && *method == axum::http::Method::DELETE
    {
        let action = if dry_run(query) {
            AdminAction::Read
        } else {
            AdminAction::Write
        };
        let env = rest.split('/').next().unwrap_or_default().to_string();
        return Ok((action, vec![Some(env)]));
    }
    // The CA's token and rotation API acts on the whole mesh.
    if path.starts_with("/v1/tokens") || path.starts_with("/v1/ca") {
        let action = if *method == axum::http::Method::GET {
            AdminAction::Read
        } else {
            AdminAction::Write
        };
        return Ok((action, vec![None]));
    }
    Ok((AdminAction::Read, env()))
}

/// Refuses (403, naming the identity and what it lacks) a request its peer may not
/// make. The mesh-wide objects (`RemoteCluster`, `Operator`) count as the whole mesh.
async fn authorize(
    State(authz): State<AdminAuthz>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !authz.enforce {
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<PeerAddr>>()
        .and_then(|c| c.0.id.clone());
    let path = req.uri().path().to_string();
    if (path == "/healthz" || path == "/readyz") && peer.is_some() {
        return next.run(req).await;
    }
    // A CSR is authorized by the credential it carries (a join token or a
    // service-account token), not by the connection's certificate.
    if path == "/v1/certificates" {
        return next.run(req).await;
    }
    let query: HashMap<String, String> = Query::try_from_uri(req.uri())
        .map(|q: Query<HashMap<String, String>>| q.0)
        .unwrap_or_default();
    let method = req.method().clone();
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_APPLY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return error_json(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("reading the request body: {e}"),
                Vec::new(),
            );
        }
    };
    let (action, envs) = match request_scope(&method, &path, &query, &body) {
        Ok(s) => s,
        Err(why) => return error_json(StatusCode::BAD_REQUEST, why, Vec::new()),
    };
    if let Some(crate::identity::SpiffeId {
        identity: crate::identity::Identity::Operator { name },
        ..
    }) = &peer
        && authz.bootstrap.contains(name)
    {
        return next
            .run(axum::extract::Request::from_parts(
                parts,
                axum::body::Body::from(body),
            ))
            .await;
    }
    let mesh = authz.config.borrow().clone();
    for env in envs {
        let env = env.filter(|e| e != crate::config::security::MESH_SCOPE);
        if let Err(why) = authorize_admin(
            peer.as_ref(),
            &mesh.security.operators,
            action,
            env.as_deref(),
        ) {
            tracing::warn!(%path, %method, reason = %why, "admin request refused");
            return error_json(StatusCode::FORBIDDEN, why, Vec::new());
        }
    }
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(body),
    ))
    .await
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        let pending = s.index.resync_pending();
        if pending.is_empty() {
            return "ready\n".into_response();
        }
        let ids: Vec<&str> = pending.iter().map(|p| p.id.as_str()).collect();
        format!(
            "ready; withdrawals held until these known clusters resync (or their grace period ends): {}\n",
            ids.join(", ")
        )
        .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: initial config not applied\n",
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    metrics_response(&s.registry)
}

/// A registry in the OpenMetrics text format (the hub's and the agent's `/metrics`).
pub fn metrics_response(registry: &Registry) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn sync_status(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let clients = s.sync.snapshot_marking_stale(s.stale_after);
    let stale = clients
        .iter()
        .filter(|c| c.types.values().any(|t| t.stale))
        .count();
    Json(
        json!({ "stale_after_seconds": s.stale_after.as_secs_f64(), "stale_clients": stale, "clients": clients }),
    )
}

async fn config_status(State(s): State<AdminState>) -> Json<ConfigStatus> {
    Json(s.config.lock().unwrap().clone())
}

async fn clusters(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let held = *s.snapshots.withdrawals_held().borrow();
    Json(json!({
        "clusters": *s.index.clusters(),
        "resync_pending": *s.index.resync_pending(),
        "withdrawals_held": held,
    }))
}

async fn environments(State(s): State<AdminState>) -> Json<serde_json::Value> {
    Json(json!({ "environments": s.snapshots.summaries() }))
}

async fn config_dump(
    State(s): State<AdminState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(env) = q.get("env") else {
        return (
            StatusCode::BAD_REQUEST,
            format!("missing ?env=, one of {:?}\n", s.snapshots.environments()),
        )
            .into_response();
    };
    let types: Vec<XdsType> = match q.get("type") {
        None => XdsType::ALL.to_vec(),
        Some(t) => match XdsType::ALL
            .into_iter()
            .find(|x| x.short().eq_ignore_ascii_case(t))
        {
            Some(x) => vec![x],
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("unknown type {t:?}, expected CDS, EDS, LDS, RDS or SDS\n"),
                )
                    .into_response();
            }
        },
    };
    if !s.snapshots.contains(env) {
        return (
            StatusCode::NOT_FOUND,
            format!(
                "environment {env:?} is not served by this hub, expected one of {:?}\n",
                s.snapshots.environments()
            ),
        )
            .into_response();
    }
    let snap = s.snapshots.current(env);
    let mut out = serde_json::Map::new();
    for ty in types {
        let list: Vec<_> = snap
            .of_type(ty)
            .values()
            .map(|r| json!({ "name": r.name(), "version": r.version(), "bytes": r.size() }))
            .collect();
        out.insert(ty.short().to_string(), list.into());
    }
    Json(json!({ "environment": env, "seq": snap.seq, "resources": out })).into_response()
}

async fn shards(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let mut v = json!(*s.membership.view());
    v["catalog"] = json!(s.catalog.view());
    Json(v)
}

fn error_json(status: StatusCode, error: String, errors: Vec<String>) -> Response {
    (status, Json(json!({ "error": error, "errors": errors }))).into_response()
}

/// Why this hub does not take config writes: it reads files.
fn reads_files(s: &AdminState) -> Response {
    let paths = s.config.lock().unwrap().paths.join(", ");
    error_json(
        StatusCode::CONFLICT,
        format!(
            "this hub reads its config from files ({paths}, --config); the config API serves hubs started without --config"
        ),
        Vec::new(),
    )
}

fn write_error(e: WriteError) -> Response {
    match e {
        WriteError::Invalid(errors) => {
            let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
            error_json(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{} config error(s); nothing was written", lines.len()),
                lines,
            )
        }
        WriteError::Store(e) if e.is_retryable() => error_json(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{e}: nothing was written"),
            Vec::new(),
        ),
        WriteError::Store(e) => error_json(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e}: nothing was written"),
            Vec::new(),
        ),
        e @ WriteError::Conflict { .. } => {
            error_json(StatusCode::CONFLICT, e.to_string(), Vec::new())
        }
        e @ WriteError::NotFound(_) => error_json(StatusCode::NOT_FOUND, e.to_string(), Vec::new()),
    }
}

fn dry_run(q: &HashMap<String, String>) -> bool {
    q.get("dry_run").is_some_and(|v| v == "true" || v == "1")
}

async fn config_list(
    State(s): State<AdminState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(api) = s.config_api.as_ref() else {
        return reads_files(&s);
    };
    match api
        .list(
            q.get("kind").map(String::as_str),
            q.get("env").map(String::as_str),
            q.get("name").map(String::as_str),
        )
        .await
    {
        Ok((mut objects, revision)) => {
            for o in &mut objects {
                o.document = redact_document(&o.document);
            }
            Json(json!({ "revision": revision, "objects": objects })).into_response()
        }
        Err(e) => write_error(WriteError::Store(e)),
    }
}

/// A write's report without key material (the `before`/`after` documents).
fn redact_changes(mut r: WriteResult) -> WriteResult {
    for c in &mut r.changes {
        for doc in [&mut c.before, &mut c.after].into_iter().flatten() {
            *doc = redact_document(doc);
        }
    }
    r
}

async fn config_apply(
    State(s): State<AdminState>,
    Query(q): Query<HashMap<String, String>>,
    body: String,
) -> Response {
    let Some(api) = s.config_api.as_ref() else {
        return reads_files(&s);
    };
    match api.apply(&body, dry_run(&q)).await {
        Ok(r) => Json(json!(redact_changes(r))).into_response(),
        Err(e) => write_error(e),
    }
}

async fn config_delete(
    State(s): State<AdminState>,
    Path((environment, kind, namespace, name)): Path<(String, String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(api) = s.config_api.as_ref() else {
        return reads_files(&s);
    };
    let id = ObjectId {
        environment,
        kind,
        namespace,
        name,
    };
    match api.delete(&[id], dry_run(&q)).await {
        Ok(r) => Json(json!(redact_changes(r))).into_response(),
        Err(e) => write_error(e),
    }
}
