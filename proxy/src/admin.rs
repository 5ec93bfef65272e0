//! The admin endpoint: `/ready` (200 only once the first complete config is applied),
//! `/stats` (Prometheus text), `/config_dump` (JSON: what the proxy holds, with live
//! endpoint health and ejections), `/listeners` (JSON: name → bound address).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::http::{Request, Response, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::Shared;

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn route(shared: &Shared, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/ready" => {
            if *shared.ready.borrow() {
                reply(StatusCode::OK, "text/plain", "LIVE\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "PRE_INITIALIZING\n".into(),
                )
            }
        }
        "/stats" | "/stats/prometheus" | "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(),
        ),
        "/config_dump" => {
            let mut dump = shared
                .dump
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let snapshot = shared.snapshot.load_full();
            let mut endpoints = serde_json::Map::new();
            for (name, c) in &snapshot.clusters {
                let list: Vec<_> = c
                    .endpoint_addresses()
                    .into_iter()
                    .map(|(priority, address, healthy, ejected)| {
                        serde_json::json!({"priority": priority, "address": address.to_string(), "healthy": healthy, "ejected": ejected})
                    })
                    .collect();
                endpoints.insert(name.to_string(), list.into());
            }
            dump["endpoint_state"] = endpoints.into();
            dump["ready"] = (*shared.ready.borrow()).into();
            reply(StatusCode::OK, "application/json", format!("{dump:#}\n"))
        }
        "/listeners" => {
            let bound = shared.bound.borrow().clone();
            let map: serde_json::Map<String, serde_json::Value> = bound
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string().into()))
                .collect();
            reply(
                StatusCode::OK,
                "application/json",
                format!("{:#}\n", serde_json::Value::Object(map)),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "endpoints: /ready /stats /config_dump /listeners\n".into(),
        ),
    }
}

/// Binds the admin endpoint; returns its address. Serves until the runtime ends.
pub async fn serve(shared: Arc<Shared>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let socket = TcpListener::bind(addr).await?;
    let local = socket.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = socket.accept().await else {
                continue;
            };
            let shared = shared.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = route(&shared, req.uri().path());
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}
