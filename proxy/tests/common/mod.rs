//! Test helpers: backends that say who they are, an in-process hub with a temp config
//! dir, a proxy on 127.0.0.1 with ephemeral listener ports, and a plain HTTP client.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;
use tributary_controlplane::app::{Hub, HubConfig};
use tributary_proxy::Proxy;
use tributary_proxy::bootstrap::Bootstrap;

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// How a backend answers.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Ok,
    /// Answers 503 to every other request (the first one fails).
    Flaky,
    /// Holds requests to `/slow` until released.
    Hold,
    /// Sends the headers of `/slow` at once and holds its body until released.
    HoldBody,
    /// Answers like a gRPC server: trailers `grpc-status: 0`, and `x-version` names
    /// the HTTP version it received.
    Grpc,
}

pub struct Backend {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// Requests to `/slow` that arrived (and wait for `release`).
    pub held: watch::Receiver<usize>,
    pub release: watch::Sender<bool>,
}

impl Backend {
    pub async fn start(name: &'static str, mode: Mode) -> Backend {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name, mode).await
    }

    pub async fn start_on(addr: SocketAddr, name: &'static str, mode: Mode) -> Backend {
        let socket = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let (held_tx, held) = watch::channel(0usize);
        let held_tx = Arc::new(held_tx);
        let (release, release_rx) = watch::channel(false);
        let h = hits.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = socket.accept().await.unwrap();
                let hits = h.clone();
                let held_tx = held_tx.clone();
                let release_rx = release_rx.clone();
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let n = hits.fetch_add(1, Ordering::SeqCst);
                        let held_tx = held_tx.clone();
                        let mut release_rx = release_rx.clone();
                        async move {
                            if matches!(mode, Mode::Hold) && req.uri().path() == "/slow" {
                                held_tx.send_modify(|n| *n += 1);
                                let _ = release_rx.wait_for(|r| *r).await;
                            }
                            let status = if matches!(mode, Mode::Flaky) && n.is_multiple_of(2) {
                                StatusCode::SERVICE_UNAVAILABLE
                            } else {
                                StatusCode::OK
                            };
                            let version = format!("{:?}", req.version());
                            // What the proxy told the app about an mTLS caller.
                            let xfcc = req.headers().get("x-forwarded-client-cert").cloned();
                            let body = Full::new(Bytes::from(name));
                            let body =
                                if matches!(mode, Mode::HoldBody) && req.uri().path() == "/slow" {
                                    held_tx.send_modify(|n| *n += 1);
                                    let (tx, rx) = tokio::sync::mpsc::channel::<
                                        Result<hyper::body::Frame<Bytes>, Infallible>,
                                    >(1);
                                    tokio::spawn(async move {
                                        let _ = release_rx.wait_for(|r| *r).await;
                                        let _ = tx
                                            .send(Ok(hyper::body::Frame::data(Bytes::from(name))))
                                            .await;
                                    });
                                    http_body_util::StreamBody::new(
                                        tokio_stream::wrappers::ReceiverStream::new(rx),
                                    )
                                    .boxed()
                                } else if matches!(mode, Mode::Grpc) {
                                    let mut trailers = hyper::HeaderMap::new();
                                    trailers.insert("grpc-status", "0".parse().unwrap());
                                    body.with_trailers(async move { Some(Ok(trailers)) })
                                        .boxed()
                                } else {
                                    body.boxed()
                                };
                            let mut r = Response::new(body);
                            *r.status_mut() = status;
                            r.headers_mut().insert("x-backend", name.parse().unwrap());
                            r.headers_mut()
                                .insert("x-version", version.parse().unwrap());
                            if let Some(v) = xfcc {
                                r.headers_mut().insert("x-echo-xfcc", v);
                            }
                            Ok::<_, Infallible>(r)
                        }
                    });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend {
            name,
            addr,
            hits,
            held,
            release,
        }
    }
}

pub struct TestHub {
    pub hub: Hub,
    pub dir: tempfile::TempDir,
}

impl TestHub {
    pub async fn start(files: &[(&str, String)]) -> TestHub {
        Self::start_on("127.0.0.1:0".parse().unwrap(), files).await
    }

    pub async fn start_on(xds: SocketAddr, files: &[(&str, String)]) -> TestHub {
        Self::start_with(files, |cfg| cfg.xds_addr = xds).await
    }

    /// A hub whose config `tweak` adjusts (e.g. a mesh identity for `--mesh-mtls`).
    pub async fn start_with(
        files: &[(&str, String)],
        tweak: impl FnOnce(&mut HubConfig),
    ) -> TestHub {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let mut cfg = HubConfig::local(vec![dir.path().to_path_buf()]);
        cfg.poll_interval = Duration::from_millis(20);
        cfg.xds_addr = "127.0.0.1:0".parse().unwrap();
        tweak(&mut cfg);
        let hub = Hub::start(cfg).await.expect("hub starts");
        TestHub { hub, dir }
    }

    pub fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).unwrap();
    }

    pub fn sync_status(&self) -> serde_json::Value {
        serde_json::to_value(self.hub.sync.snapshot()).unwrap()
    }
}

/// A sidecar's bootstrap: outbound listeners bound on 127.0.0.1, ephemeral ports.
pub fn bootstrap(xds: SocketAddr, protocol: &str, extra_metadata: &str) -> Bootstrap {
    let text = format!(
        "node:\n  id: proxy-0\n  environment: prod\n  zone: z1\n  region: r1\n  metadata: {{{extra_metadata}}}\nxds:\n  address: http://{xds}\n  protocol: {protocol}\nadmin:\n  address: 127.0.0.1:0\nlisteners:\n  outbound_address: 127.0.0.1\n  port_override: 0\n  drain_timeout: 5\n"
    );
    Bootstrap::parse(Path::new("test-bootstrap.yaml"), &text).unwrap()
}

pub async fn start_proxy(b: Bootstrap) -> Proxy {
    Proxy::start(b).await.expect("proxy starts")
}

pub async fn ready(p: &Proxy) {
    tokio::time::timeout(TIMEOUT, p.ready())
        .await
        .expect("the proxy becomes ready");
}

pub type TestClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `path` on `addr` with `Host: host` and extra headers; returns (status, x-backend).
pub async fn get(
    c: &TestClient,
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut b = Request::get(format!("http://{addr}{path}")).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = tokio::time::timeout(TIMEOUT, c.request(b.body(Empty::new()).unwrap()))
        .await
        .expect("an answer within the timeout")
        .expect("the proxy answers");
    let status = resp.status().as_u16();
    let backend = resp
        .headers()
        .get("x-backend")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let _ = resp.into_body().collect().await;
    (status, backend)
}

/// GET on the admin endpoint: (status, body).
pub async fn admin(p: &Proxy, path: &str) -> (u16, String) {
    let c = client();
    let resp = c
        .request(
            Request::get(format!("http://{}{path}", p.admin_addr))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

pub fn service(name: &str, port: u16, protocol: &str) -> String {
    format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}, environment: prod}}\nspec:\n  hosts: [{name}.prod]\n  ports: [{{name: http, port: {port}, protocol: {protocol}}}]\n  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n"
    )
}

/// Endpoints of `name`: (address, version label, zone).
pub fn endpoints(name: &str, eps: &[(SocketAddr, &str, &str)]) -> String {
    let list: Vec<String> = eps
        .iter()
        .map(|(a, v, z)| {
            format!(
                "  - {{address: \"{}\", port: {}, labels: {{version: {v}}}, locality: {{region: r1, zone: {z}}}}}",
                a.ip(),
                a.port()
            )
        })
        .collect();
    format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Endpoints\nmetadata: {{name: {name}, environment: prod}}\nspec:\n  endpoints:\n{}\n",
        list.join("\n")
    )
}

pub fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

/// Waits until `f` holds, checking every 10 ms, failing after [`TIMEOUT`].
pub async fn until<F: FnMut() -> Fut, Fut: std::future::Future<Output = bool>>(
    what: &str,
    mut f: F,
) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
