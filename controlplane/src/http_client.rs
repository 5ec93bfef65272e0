//! A small HTTP/1.1 client for loopback admin and control endpoints (the CLI's
//! `tributary status`, the load test's hub and peer APIs), on `hyper-util`'s client;
//! with mutual TLS to a hub that serves it.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::identity::tls::ClientTls;

/// Sends `method path` with `body` (JSON when non-empty) to `addr` (`host:port`,
/// `[v6]:port`, optionally with an `http://` prefix) and returns the status code and
/// the whole response body.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, Bytes)> {
    request_with(addr, None, method, path, body).await
}

/// As [`request`], over mutual TLS when `tls` is given (`https://` in messages).
pub async fn request_with(
    addr: &str,
    tls: Option<&ClientTls>,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, Bytes)> {
    if let Some(tls) = tls {
        return request_tls(addr, tls, method, path, body).await;
    }
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body)))
        .with_context(|| format!("{method} http://{addr}{path}: invalid request"))?;
    let resp = client
        .request(req)
        .await
        .with_context(|| format!("{method} http://{addr}{path}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .with_context(|| format!("{method} http://{addr}{path}: reading the response"))?
        .to_bytes();
    Ok((status, body))
}

/// One request on a new mutual-TLS connection (HTTP/1.1).
async fn request_tls(
    addr: &str,
    tls: &ClientTls,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, Bytes)> {
    let addr = addr
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let url = format!("https://{addr}{path}");
    let io = tls
        .connect(addr)
        .await
        .with_context(|| format!("{method} {url}: connecting with mutual TLS"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .with_context(|| format!("{method} {url}: HTTP handshake"))?;
    let conn = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr);
    if !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body)))
        .with_context(|| format!("{method} {url}: invalid request"))?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .with_context(|| format!("{method} {url}: reading the response"))?
        .to_bytes();
    conn.abort();
    Ok((status, body))
}

/// GETs `path` from `addr` and parses the JSON body of a 200 answer.
pub async fn get_json(addr: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    get_json_with(addr, None, path).await
}

/// As [`get_json`], over mutual TLS when `tls` is given.
pub async fn get_json_with(
    addr: &str,
    tls: Option<&ClientTls>,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    let (status, body) = request_with(addr, tls, "GET", path, b"").await?;
    if status != 200 {
        anyhow::bail!(
            "GET {addr}{path}: HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    serde_json::from_slice(&body).with_context(|| format!("GET {addr}{path}: response is not JSON"))
}
