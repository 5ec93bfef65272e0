//! The CSR listener (`--csr-addr`): the one way in for a peer that has no
//! certificate yet.
//!
//! The hub's xDS and admin ports ask every peer for a client certificate, so a new
//! workload, agent or gateway cannot reach the CSR API there. This listener presents
//! the hub's certificate (the same `--tls-cert`/`--tls-key`, reloaded on change) and
//! asks for none: the caller checks the hub against the CA bundle it was given, and
//! proves who it is with the credential in its request (a join token, or a Kubernetes
//! service-account token reviewed by its cluster's API server, [`super::api`]).
//!
//! It serves `POST /v1/certificates` and nothing else: every other path is 404, so no
//! admin, config or status page is reachable without an identity. What a caller
//! without identity can make the hub do is bounded ([`CsrListenerConfig`]): the body
//! (`--csr-max-body-bytes`) and the CSR in it (`--csr-max-csr-bytes`) are read up to
//! their limits (413 past them), at most `--csr-max-concurrent` requests are handled
//! at once (the next is answered 503 at once, not queued), each within
//! `--csr-request-timeout` (408); at most `--csr-max-connections` connections are
//! open at once (one more is closed as soon as it is accepted), and a connection
//! must send a request's headers within `--csr-header-read-timeout` (also when idle
//! between requests), or it is closed: a slow or silent caller cannot hold
//! connections open. TLS handshakes are bounded like every listener's
//! ([`super::tls::accept_tls`], counted as `listener="csr"`). With `--insecure` it
//! serves plaintext, on loopback only, like the hub's other ports.
//!
//! Renewal uses the same route: the peer sends a credential again (a service-account
//! token is re-read from its file at each renewal; a join token must allow enough
//! `--uses`). The route is also still served on the admin listener, for certified
//! peers over mutual TLS.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::Response;
use axum::routing::post;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{debug, warn};

use super::api::{CaApi, answer_certificate, error, parse_certificate_request};
use super::tls::{self, ServerTls, TlsConn, TlsError, TlsFiles, TlsMetrics, Transport};

/// Default of `--csr-addr`.
pub const DEFAULT_CSR_ADDR: &str = "127.0.0.1:19003";
/// Default of `--csr-max-body-bytes`: a CSR, a service-account token (a JWT of a
/// few KiB) and the JSON around them.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 << 10;
/// Default of `--csr-max-csr-bytes`: a P-256 CSR is about 500 bytes of PEM, an
/// RSA-4096 one about 1.7 KiB.
pub const DEFAULT_MAX_CSR_BYTES: usize = 8 << 10;
/// Default of `--csr-max-concurrent`.
pub const DEFAULT_MAX_CONCURRENT: usize = 32;
/// Default of `--csr-request-timeout`: reading the body, a TokenReview and signing.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of `--csr-max-connections`: as many as TLS handshakes may run at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default of `--csr-header-read-timeout`: as long as a TLS handshake may take.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The only route of the listener.
pub const CSR_PATH: &str = "/v1/certificates";

/// Where the CSR listener binds and what it accepts from callers without identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrListenerConfig {
    /// `--csr-addr` (repeatable: e.g. `127.0.0.1:19003` and `[::1]:19003`; `[::]`
    /// is a dual-stack socket that serves IPv4 too).
    pub addrs: Vec<SocketAddr>,
    /// `--csr-max-body-bytes`: the largest request body read.
    pub max_body_bytes: usize,
    /// `--csr-max-csr-bytes`: the largest CSR (PEM) in it.
    pub max_csr_bytes: usize,
    /// `--csr-max-concurrent`: requests handled at once; more are refused (503).
    pub max_concurrent: usize,
    /// `--csr-request-timeout`: the most one request may take (408 after).
    pub request_timeout: Duration,
    /// `--csr-max-connections`: connections open at once (per hub, over every
    /// `--csr-addr`); one more is closed at once.
    pub max_connections: usize,
    /// `--csr-header-read-timeout`: a connection that has not sent a whole request
    /// head this long after it was opened or answered its last request is closed.
    pub header_read_timeout: Duration,
}

impl Default for CsrListenerConfig {
    /// Port 0 on IPv4 loopback (tests); `main` passes the flags' defaults.
    fn default() -> Self {
        Self {
            addrs: vec!["127.0.0.1:0".parse().unwrap()],
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_csr_bytes: DEFAULT_MAX_CSR_BYTES,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
        }
    }
}

impl CsrListenerConfig {
    /// Refuses a plaintext CSR listener on anything but loopback (as the hub's other
    /// ports), and an empty or invalid set of bounds, naming the flag.
    pub fn check(&self, transport: &Transport) -> Result<(), String> {
        if self.addrs.is_empty() {
            return Err("--csr-addr: expected at least one address (default 127.0.0.1:19003): peers without a certificate get their first one there".into());
        }
        for addr in &self.addrs {
            transport.check_bind("--csr-addr", *addr)?;
        }
        if self.max_csr_bytes > self.max_body_bytes {
            return Err(format!(
                "--csr-max-csr-bytes ({}) must not be larger than --csr-max-body-bytes ({}): the CSR is part of the body",
                self.max_csr_bytes, self.max_body_bytes
            ));
        }
        if self.max_concurrent == 0 || self.request_timeout.is_zero() {
            return Err(
                "--csr-max-concurrent and --csr-request-timeout must be more than 0".into(),
            );
        }
        if self.max_connections == 0 || self.header_read_timeout.is_zero() {
            return Err(
                "--csr-max-connections and --csr-header-read-timeout must be more than 0".into(),
            );
        }
        Ok(())
    }
}

/// The listener's TLS: the hub's certificate and key, reloaded on change, no client
/// certificate asked for.
pub fn server_tls(files: &TlsFiles, trust_domain: &str) -> Result<ServerTls, TlsError> {
    let f = files.clone();
    let config = tls::Reloading::watch(files, move || {
        tls::server_auth_only_config(&f, tls::ALPN_HTTP1)
    })?;
    Ok(ServerTls::server_auth_only(config, trust_domain))
}

/// Binds every `--csr-addr`.
pub async fn bind(cfg: &CsrListenerConfig) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(cfg.addrs.len());
    for addr in &cfg.addrs {
        listeners.push(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the CSR address (--csr-addr) {addr}"))?,
        );
    }
    Ok(listeners)
}

#[derive(Clone)]
struct CsrState {
    api: CaApi,
    max_body_bytes: usize,
    max_csr_bytes: usize,
    max_concurrent: usize,
    request_timeout: Duration,
    /// One permit per request being handled.
    slots: Arc<Semaphore>,
}

/// The listener's routes ([`routes`]) and its bounds on connections, for [`serve`].
#[derive(Clone, Debug)]
pub struct CsrApp {
    router: Router,
    /// One permit per open connection (`--csr-max-connections`).
    connections: Arc<Semaphore>,
    max_connections: usize,
    header_read_timeout: Duration,
}

/// `POST /v1/certificates` with the listener's bounds, and 404 for everything else.
pub fn routes(api: CaApi, cfg: &CsrListenerConfig) -> CsrApp {
    CsrApp {
        router: router(api, cfg),
        connections: Arc::new(Semaphore::new(cfg.max_connections)),
        max_connections: cfg.max_connections,
        header_read_timeout: cfg.header_read_timeout,
    }
}

fn router(api: CaApi, cfg: &CsrListenerConfig) -> Router {
    let state = CsrState {
        api,
        max_body_bytes: cfg.max_body_bytes,
        max_csr_bytes: cfg.max_csr_bytes,
        max_concurrent: cfg.max_concurrent,
        request_timeout: cfg.request_timeout,
        slots: Arc::new(Semaphore::new(cfg.max_concurrent)),
    };
    Router::new()
        .route(CSR_PATH, post(certificate))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), admit))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found(req: axum::extract::Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "{} {}: not found; this listener (--csr-addr) serves only POST {CSR_PATH}",
            req.method(),
            req.uri().path()
        ),
    )
}

/// Admits a request if fewer than `max_concurrent` are being handled (503 at once
/// otherwise: a caller without identity must not make the hub queue work), and
/// bounds its time.
async fn admit(
    State(s): State<CsrState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Ok(_permit) = s.slots.clone().try_acquire_owned() else {
        let mut resp = error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many certificate requests in progress (at most {}, --csr-max-concurrent): retry",
                s.max_concurrent
            ),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return resp;
    };
    match tokio::time::timeout(s.request_timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the certificate request took longer than {} (--csr-request-timeout)",
                humantime::format_duration(s.request_timeout)
            ),
        ),
    }
}

async fn certificate(State(s): State<CsrState>, body: axum::body::Body) -> Response {
    let body = match axum::body::to_bytes(body, s.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|e| e.is::<http_body_util::LengthLimitError>());
            return if too_large {
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "request body: larger than the {} bytes this listener reads (--csr-max-body-bytes)",
                        s.max_body_bytes
                    ),
                )
            } else {
                error(
                    StatusCode::BAD_REQUEST,
                    format!("reading the request body: {e}"),
                )
            };
        }
    };
    let req = match parse_certificate_request(&body) {
        Ok(r) => r,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    if req.csr.len() > s.max_csr_bytes {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "csr: {} bytes, larger than the {} this listener accepts (--csr-max-csr-bytes)",
                req.csr.len(),
                s.max_csr_bytes
            ),
        );
    }
    answer_certificate(&s.api, req).await
}

/// Serves [`routes`] on every listener, over TLS when `tls` is given (plaintext
/// otherwise: `--insecure`), until `shutdown` turns true; then lets requests in
/// progress finish for up to 5 s.
pub async fn serve(
    listeners: Vec<TcpListener>,
    app: CsrApp,
    tls: Option<ServerTls>,
    metrics: TlsMetrics,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut servers = tokio::task::JoinSet::new();
    for listener in listeners {
        let addr = listener.local_addr()?;
        let incoming = match &tls {
            None => Incoming::Plain(listener),
            Some(t) => Incoming::Tls(tls::accept_tls(listener, t.clone(), metrics.clone(), "csr")),
        };
        servers.spawn(accept(incoming, addr, app.clone(), shutdown.clone()));
    }
    while let Some(r) = servers.join_next().await {
        r.context("CSR listener task")?;
    }
    Ok(())
}

/// Connections of one listener: plaintext, or handshaken by [`tls::accept_tls`].
enum Incoming {
    Plain(TcpListener),
    Tls(mpsc::Receiver<io::Result<TlsConn>>),
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

impl Incoming {
    async fn next(&mut self, addr: SocketAddr) -> (Conn, SocketAddr) {
        loop {
            match self {
                Incoming::Plain(l) => match l.accept().await {
                    Ok((tcp, peer)) => return (Conn::Plain(tcp), peer),
                    Err(e) => {
                        // Out of file descriptors, say: the connection waits in the
                        // backlog while we back off.
                        warn!(%addr, error = %e, "accepting a connection on the CSR listener");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Incoming::Tls(rx) => match rx.recv().await {
                    Some(Ok(conn)) => {
                        let peer = conn.get_ref().0.peer_addr().unwrap_or(addr);
                        return (Conn::Tls(Box::new(conn)), peer);
                    }
                    // Failed handshakes were logged and counted by `accept_tls`.
                    Some(Err(_)) => continue,
                    // The accept task only ends when this listener is dropped.
                    None => std::future::pending::<()>().await,
                },
            }
        }
    }
}

/// Accepts connections until `shutdown`, each served in its own task while one of
/// `--csr-max-connections` permits is free (closed at once otherwise).
async fn accept(
    mut incoming: Incoming,
    addr: SocketAddr,
    app: CsrApp,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (conn, peer) = tokio::select! {
            c = incoming.next(addr) => c,
            () = stopped(&mut shutdown) => break,
        };
        let Ok(permit) = app.connections.clone().try_acquire_owned() else {
            warn!(%addr, %peer, max = app.max_connections, "closed a connection to the CSR listener: --csr-max-connections are open already");
            drop(conn);
            continue;
        };
        let (app, stop) = (app.clone(), shutdown.clone());
        match conn {
            Conn::Plain(io) => conns.spawn(serve_connection(io, peer, app, permit, stop)),
            Conn::Tls(io) => conns.spawn(serve_connection(*io, peer, app, permit, stop)),
        };
        // Reap finished connection tasks so the set stays as large as the live ones.
        while conns.try_join_next().is_some() {}
    }
    let drain = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Serves one connection over HTTP/1.1, holding its `permit` until it ends. hyper
/// closes it when a request head takes longer than `--csr-header-read-timeout`.
async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    app: CsrApp,
    _permit: OwnedSemaphorePermit,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = TowerToHyperService::new(app.router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(app.header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(%peer, error = %e, "a CSR listener connection ended with an error");
            }
        }
        () = stopped(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
