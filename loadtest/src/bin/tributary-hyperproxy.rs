//! `tributary-hyperproxy`: a plain hyper 1.x HTTP/1.1 reverse proxy on a current-thread
//! runtime, the floor of a hyper-based design in the proxy benchmark
//! (`tributary-proxybench`, docs/benchmarks.md "Proxy").
//!
//! It is deliberately what a first hyper proxy looks like and nothing more: hyper's
//! HTTP/1.1 server connection per downstream connection, and hyper-util's pooled
//! client (keep-alive) to one upstream address; the request is forwarded as it came,
//! its URI made absolute. No routing, no xDS: whatever a tuned design adds must pay for
//! itself against this.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Debug, Parser)]
#[command(
    name = "tributary-hyperproxy",
    about = "A plain hyper HTTP/1.1 reverse proxy (one thread), the proxy benchmark's floor"
)]
struct Args {
    /// Where to listen (IPv4 or IPv6, port 0 for any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The upstream every request goes to, host:port (IPv6 as [addr]:port).
    #[arg(long)]
    upstream: SocketAddr,
    /// Write {"addr": "host:port"} here once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One worker: the benchmark compares proxies with one worker each.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
    let local = listener.local_addr()?;
    if let Some(path) = &args.ready_file {
        std::fs::write(
            path,
            serde_json::json!({"addr": local.to_string()}).to_string(),
        )
        .with_context(|| format!("--ready-file {}", path.display()))?;
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let authority = args.upstream.to_string();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            // Out of file descriptors and the like: keep serving the connections we have.
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let authority = authority.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| forward(client.clone(), authority.clone(), req));
            // A client that goes away mid-request is not the proxy's error.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A response: the upstream's, or a 502 naming why the upstream failed.
type Body = Either<Incoming, Full<Bytes>>;

async fn forward(
    client: Client<HttpConnector, Incoming>,
    authority: String,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, hyper::http::Error> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *req.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(path)
        .build()?;
    match client.request(req).await {
        Ok(resp) => Ok(resp.map(Either::Left)),
        Err(e) => Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(Either::Right(Full::new(Bytes::from(format!(
                "upstream {authority}: {e}\n"
            ))))),
    }
}
