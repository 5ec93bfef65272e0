//! The CA's HTTP API: the CSR API peers get their certificates from, and the
//! operator's token and rotation endpoints.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /v1/certificates` | `{"csr": PEM, "join_token": "ID.SECRET"}` or `{"csr": PEM, "kubernetes": {"cluster": ID, "token": JWT}}` | [`CertificateResponse`] |
//! | `POST /v1/tokens` | `{"identity": "spiffe://...", "ttl": "1h", "uses": 1, "cluster": ID?}` | [`CreatedToken`] (201) |
//! | `DELETE /v1/tokens/{id}` | | 204 |
//! | `GET /v1/ca` | | [`CaStatus`] and the trust bundle |
//! | `POST /v1/ca/rotate` | `{"root": true, "trust_window": "24h", "overlap": "48h"}` or `{"intermediate": "CLUSTER" \| "mesh", "overlap": "24h"}` | [`CaStatus`] |
//! | `POST /v1/ca/promote` | | [`CaStatus`] (the new root signs now) |
//! | `POST /v1/ca/finish-rotation` | none, or `{"intermediate": "CLUSTER" \| "mesh"}` | [`CaStatus`] (the old roots leave the bundle now; or the old intermediates are revoked now) |
//!
//! [`csr_routes`] and [`ca_admin_routes`] are separate routers: the hub mounts both on
//! its admin listener (the admin routes need an operator identity there); peers that
//! have no certificate yet reach the CSR route on the CSR listener
//! ([`super::csr_listener`], `--csr-addr`), which serves nothing else.
//!
//! Errors are `{"error": "..."}`: 400 a malformed request or CSR, 401 a credential
//! that proves nothing (unknown, expired, revoked or used-up token; a TokenReview
//! that did not authenticate), 403 a CSR asking for another identity than the
//! credential proves, 503 the store or an API server could not be reached (retry).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use rcgen::{CertificateSigningRequestParams, SanType};
use serde::{Deserialize, Serialize};

use super::SpiffeId;
use super::ca::{Ca, CaError, CaStatus, DEFAULT_OVERLAP, DEFAULT_TRUST_WINDOW, Signer, rfc3339};
use super::tokenreview::{ReviewError, TokenReviewers};
use super::tokens::{CreatedToken, JoinTokens, TokenError};

/// What the CA's routes share.
#[derive(Clone, Debug)]
pub struct CaApi {
    pub ca: Arc<Ca>,
    pub tokens: JoinTokens,
    pub reviewers: Arc<TokenReviewers>,
}

/// `POST /v1/certificates`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRequest {
    /// A PEM `CERTIFICATE REQUEST`. Its key is certified; its subject is ignored; a
    /// URI SAN, if any, must be the identity the credential proves.
    pub csr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesCredential>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesCredential {
    /// The remote cluster the workload runs in: its API server reviews the token.
    pub cluster: String,
    /// The service-account token (a projected token, or one from the TokenRequest API).
    pub token: String,
}

impl std::fmt::Debug for KubernetesCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesCredential")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// The answer to a CSR.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertificateResponse {
    pub spiffe_id: String,
    /// The leaf, then its intermediate.
    pub chain_pem: String,
    /// The roots to trust (during a rotation, old and new).
    pub trust_bundle_pem: String,
    pub not_before: String,
    pub not_after: String,
}

/// Why a CSR is refused.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("{0}")]
    Review(#[from] ReviewError),
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Ca(#[from] CaError),
}

impl CsrError {
    pub fn status(&self) -> StatusCode {
        match self {
            CsrError::BadRequest(_) => StatusCode::BAD_REQUEST,
            CsrError::Token(TokenError::Invalid(_)) => StatusCode::BAD_REQUEST,
            CsrError::Token(e) if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            CsrError::Token(_) => StatusCode::UNAUTHORIZED,
            CsrError::Review(ReviewError::Api { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            CsrError::Review(ReviewError::UnknownCluster { .. }) => StatusCode::BAD_REQUEST,
            CsrError::Review(_) => StatusCode::UNAUTHORIZED,
            CsrError::Mismatch(_) => StatusCode::FORBIDDEN,
            CsrError::Ca(e) if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            CsrError::Ca(CaError::Config(_)) => StatusCode::BAD_REQUEST,
            CsrError::Ca(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

pub(crate) fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": message.to_string() })),
    )
        .into_response()
}

impl IntoResponse for CsrError {
    fn into_response(self) -> Response {
        error(self.status(), self)
    }
}

/// Checks that the CSR asks for nothing but `id`: no other URI, no DNS name or IP
/// address (those are the operator's, for hubs and routers), not a CA.
fn check_csr(
    csr: &CertificateSigningRequestParams,
    id: &SpiffeId,
    proof: &str,
) -> Result<(), CsrError> {
    let want = id.to_string();
    for san in &csr.params.subject_alt_names {
        match san {
            SanType::URI(u) if u.as_str() == want => {}
            SanType::URI(u) => {
                return Err(CsrError::Mismatch(format!(
                    "the CSR asks for {} but {proof} proves {want}",
                    u.as_str()
                )));
            }
            other => {
                return Err(CsrError::Mismatch(format!(
                    "the CSR asks for {other:?}: certificates carry only the SPIFFE id {proof} proves ({want}); \
                     hub and router serving names come from --serving-san"
                )));
            }
        }
    }
    if !matches!(
        csr.params.is_ca,
        rcgen::IsCa::NoCa | rcgen::IsCa::ExplicitNoCa
    ) {
        return Err(CsrError::Mismatch(
            "the CSR asks for a CA certificate".into(),
        ));
    }
    Ok(())
}

impl CaApi {
    pub fn new(
        ca: Arc<Ca>,
        store: tributary_store::SharedStore,
        reviewers: TokenReviewers,
    ) -> Self {
        let tokens = JoinTokens::new(store, ca.trust_domain());
        Self {
            ca,
            tokens,
            reviewers: Arc::new(reviewers),
        }
    }

    /// Verifies the credential, checks the CSR against what it proves, and signs.
    pub async fn certificate(
        &self,
        req: CertificateRequest,
    ) -> Result<CertificateResponse, CsrError> {
        let csr = CertificateSigningRequestParams::from_pem(&req.csr).map_err(|e| {
            CsrError::BadRequest(format!(
                "csr: expected a PEM CERTIFICATE REQUEST with a valid signature: {e}"
            ))
        })?;
        let now = SystemTime::now();
        let issued = match (&req.join_token, &req.kubernetes) {
            (Some(token), None) => {
                // Check first, use up only once the CSR matches: a wrong CSR does not
                // cost the token its use.
                let mut grant = self.tokens.check(token, now).await?;
                check_csr(
                    &csr,
                    &grant.identity,
                    &format!("join token {}", grant.token_id),
                )?;
                loop {
                    match self.tokens.consume(&grant).await {
                        Ok(()) => break,
                        Err(TokenError::Contended(_)) => {
                            grant = self.tokens.check(token, now).await?
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                let cert = self
                    .ca
                    .sign_for(&grant.identity, &csr.public_key, &grant.signer)
                    .await?;
                tracing::info!(id = %grant.identity, token = %grant.token_id, "issued a certificate for a join token");
                (grant.identity, cert)
            }
            (None, Some(k)) => {
                let reviewed = self
                    .reviewers
                    .review(&k.cluster, &k.token, self.ca.trust_domain())
                    .await?;
                let proof = format!(
                    "the service-account token ({} of remote cluster {})",
                    reviewed.username, k.cluster
                );
                check_csr(&csr, &reviewed.id, &proof)?;
                let signer = Signer::Cluster(k.cluster.clone());
                let cert = self
                    .ca
                    .sign_for(&reviewed.id, &csr.public_key, &signer)
                    .await?;
                tracing::info!(id = %reviewed.id, cluster = %k.cluster, "issued a certificate for a service-account token");
                (reviewed.id, cert)
            }
            _ => {
                return Err(CsrError::BadRequest(
                    "expected exactly one credential: \"join_token\", or \"kubernetes\": {\"cluster\", \"token\"}".into(),
                ));
            }
        };
        let (id, cert) = issued;
        Ok(CertificateResponse {
            spiffe_id: id.to_string(),
            chain_pem: cert.chain_pem,
            trust_bundle_pem: self.ca.trust_file_pem_at(now),
            not_before: rfc3339(cert.not_before),
            not_after: rfc3339(cert.not_after),
        })
    }
}

/// `POST /v1/certificates`: see the module's table.
pub fn csr_routes(state: CaApi) -> Router {
    Router::new()
        .route("/v1/certificates", post(post_certificate))
        .with_state(state)
}

/// The operator's routes: join tokens and rotation.
pub fn ca_admin_routes(state: CaApi) -> Router {
    Router::new()
        .route("/v1/tokens", post(create_token))
        .route("/v1/tokens/{id}", delete(revoke_token))
        .route("/v1/ca", get(ca_status))
        .route("/v1/ca/rotate", post(rotate))
        .route("/v1/ca/promote", post(promote))
        .route("/v1/ca/finish-rotation", post(finish_rotation))
        .route("/v1/ca/revoke", post(revoke_leaf))
        .with_state(state)
}

async fn post_certificate(State(api): State<CaApi>, body: axum::body::Bytes) -> Response {
    match parse_certificate_request(&body) {
        Ok(req) => answer_certificate(&api, req).await,
        Err(why) => error(StatusCode::BAD_REQUEST, why),
    }
}

/// The body of `POST /v1/certificates`, or why it is refused (400) and what was
/// expected.
pub(crate) fn parse_certificate_request(body: &[u8]) -> Result<CertificateRequest, String> {
    serde_json::from_slice(body).map_err(|e| {
        format!(
            "request body: {e} (expected {{\"csr\": PEM, \"join_token\" | \"kubernetes\": ...}})"
        )
    })
}

/// Issues for `req` (see [`CaApi::certificate`]) and answers with the certificate or
/// the refusal, logged.
pub(crate) async fn answer_certificate(api: &CaApi, req: CertificateRequest) -> Response {
    match api.certificate(req).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => {
            tracing::info!(error = %e, "refused a certificate request");
            e.into_response()
        }
    }
}

/// `POST /v1/tokens`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub identity: String,
    /// A humantime duration, e.g. `1h`.
    pub ttl: String,
    #[serde(default = "one")]
    pub uses: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

fn one() -> u32 {
    1
}

fn duration(field: &str, s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{field} {s:?}: {e} (expected e.g. 1h, 30m)"))
}

async fn create_token(State(api): State<CaApi>, body: axum::body::Bytes) -> Response {
    let req: TokenRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("request body: {e}")),
    };
    let ttl = match duration("ttl", &req.ttl) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match api
        .tokens
        .create(&req.identity, ttl, req.uses, req.cluster, SystemTime::now())
        .await
    {
        Ok(created) => (StatusCode::CREATED, Json::<CreatedToken>(created)).into_response(),
        Err(e) => CsrError::from(e).into_response(),
    }
}

async fn revoke_token(State(api): State<CaApi>, Path(id): Path<String>) -> Response {
    match api.tokens.revoke(&id, SystemTime::now()).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e @ TokenError::Unknown(_)) => error(StatusCode::NOT_FOUND, e),
        Err(e) => CsrError::from(e).into_response(),
    }
}

/// `GET /v1/ca`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaView {
    #[serde(flatten)]
    pub status: CaStatus,
    pub trust_bundle_pem: String,
}

async fn ca_status(State(api): State<CaApi>) -> Response {
    Json(CaView {
        status: api.ca.status(),
        trust_bundle_pem: api.ca.trust_file_pem_at(SystemTime::now()),
    })
    .into_response()
}

/// `POST /v1/ca/rotate`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    #[serde(default)]
    pub root: bool,
    /// A remote cluster id, or `mesh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate: Option<String>,
    /// How long the old root stays trusted once the new one signs (default 48h), or
    /// the old intermediate before it is revoked (default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<String>,
    /// How long the new root is only trusted before it signs (root rotation only);
    /// default 24h; `0s` makes it sign at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_window: Option<String>,
}

async fn rotate(State(api): State<CaApi>, body: axum::body::Bytes) -> Response {
    let req: RotateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("request body: {e}")),
    };
    let result = match (req.root, &req.intermediate) {
        (true, None) => {
            let parse = |field: &str, value: &Option<String>, default: Duration| {
                value
                    .as_deref()
                    .map(|s| duration(field, s))
                    .transpose()
                    .map(|d| d.unwrap_or(default))
            };
            let (overlap, trust_window) = match (
                parse("overlap", &req.overlap, DEFAULT_OVERLAP),
                parse("trust_window", &req.trust_window, DEFAULT_TRUST_WINDOW),
            ) {
                (Ok(o), Ok(w)) => (o, w),
                (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, e),
            };
            api.ca.rotate_root(trust_window, overlap).await
        }
        (false, Some(name)) => {
            if req.trust_window.is_some() {
                return error(
                    StatusCode::BAD_REQUEST,
                    "trust_window applies to a root rotation: a new intermediate is trusted at once \
                     (it chains to the same root)",
                );
            }
            let overlap = match req.overlap.as_deref().map(|s| duration("overlap", s)) {
                None => api.ca.default_intermediate_overlap(),
                Some(Ok(d)) => d,
                Some(Err(e)) => return error(StatusCode::BAD_REQUEST, e),
            };
            let signer = match signer_named(name) {
                Ok(s) => s,
                Err(e) => return error(StatusCode::BAD_REQUEST, e),
            };
            api.ca.rotate_intermediate(&signer, overlap).await
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "expected exactly one of \"root\": true or \"intermediate\": CLUSTER",
            );
        }
    };
    match result {
        Ok(s) => Json(s).into_response(),
        Err(e) => CsrError::from(e).into_response(),
    }
}

async fn promote(State(api): State<CaApi>) -> Response {
    match api.ca.promote_root().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => CsrError::from(e).into_response(),
    }
}

/// An intermediate's name in the API: a remote cluster id, or `mesh`; the error says
/// what was expected.
fn signer_named(name: &str) -> Result<Signer, String> {
    match name {
        "mesh" => Ok(Signer::Mesh),
        id => Signer::parse(&format!("cluster/{id}")).ok_or_else(|| {
            format!(
                "intermediate {id:?}: expected a remote cluster id ([A-Za-z0-9._-]) or \"mesh\""
            )
        }),
    }
}

/// `POST /v1/ca/finish-rotation`: the root rotation's, or with `{"intermediate":
/// NAME}` that intermediate's (its previous intermediates are revoked now).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinishRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate: Option<String>,
}

async fn finish_rotation(State(api): State<CaApi>, body: axum::body::Bytes) -> Response {
    // No body, `null` or `{}`: the root rotation's.
    let req: FinishRequest = match body.iter().all(u8::is_ascii_whitespace) {
        true => FinishRequest::default(),
        false => match serde_json::from_slice::<Option<FinishRequest>>(&body) {
            Ok(r) => r.unwrap_or_default(),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("request body: {e}")),
        },
    };
    let result = match &req.intermediate {
        Some(name) => match signer_named(name) {
            Ok(signer) => api.ca.finish_intermediate_rotation(&signer).await,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        },
        None => api.ca.finish_rotation().await,
    };
    match result {
        Ok(s) => Json(s).into_response(),
        Err(e) => CsrError::from(e).into_response(),
    }
}

/// `POST /v1/ca/revoke`: one leaf certificate, by serial (hex), in the CRLs of
/// `intermediate`'s intermediates (a remote cluster id or `mesh`; default every one).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    pub serial: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate: Option<String>,
}

async fn revoke_leaf(State(api): State<CaApi>, body: axum::body::Bytes) -> Response {
    let req: RevokeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("request body: {e}")),
    };
    let signer = match req.intermediate.as_deref().map(signer_named).transpose() {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match api.ca.revoke_leaf(&req.serial, signer.as_ref()).await {
        Ok(s) => Json(s).into_response(),
        Err(e) => CsrError::from(e).into_response(),
    }
}

/// The hub's identity settings (`--trust-domain`, `--cert-lifetime`, the CA's root,
/// `--token-review-clusters`, the CSR listener's `--csr-*`).
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    pub ca: super::ca::CaConfig,
    pub review_clusters: Vec<super::tokenreview::ReviewCluster>,
    /// Where peers without a certificate get their first one.
    pub csr: super::csr_listener::CsrListenerConfig,
}

/// The default trust domain (`--trust-domain`).
pub const DEFAULT_TRUST_DOMAIN: &str = super::tls::DEFAULT_TRUST_DOMAIN;

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            ca: super::ca::CaConfig::new(DEFAULT_TRUST_DOMAIN),
            review_clusters: Vec::new(),
            csr: Default::default(),
        }
    }
}

/// Opens the CA in `store` and connects the TokenReview clients. The caller runs
/// [`Ca::run`] to follow the store (rotations, other replicas' intermediates).
pub async fn start(
    store: tributary_store::SharedStore,
    cfg: &IdentityConfig,
) -> anyhow::Result<CaApi> {
    let ca = Ca::open(store.clone(), cfg.ca.clone()).await?;
    let reviewers = TokenReviewers::connect(cfg.review_clusters.clone()).await?;
    Ok(CaApi::new(ca, store, reviewers))
}
