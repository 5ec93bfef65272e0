//! The one-command mesh's example backends: something real for its proxies to reach.
//! For every endpoint of the config's HTTP/1.1 services on a loopback address (the
//! bundled example's `reviews` v1 on `127.0.0.1:19081` and v2 on `[::1]:19082`, …; not the
//! gRPC `ratings`), a tiny HTTP/1.1 server on
//! that address answers every request with who it is — service, labels, environment,
//! zone and address — so that `curl` through a gateway or a sidecar shows which
//! backend the route picked. They are started once, from the config at start; endpoints
//! added later get no server. Endpoints of agents' clusters are not started (they are
//! other clusters' addresses).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Context;
use tokio::task::JoinSet;
use tributary_controlplane::model;

/// One backend: where it listens and what it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    /// `x-backend` of its answers, e.g. `reviews-v1`.
    pub name: String,
    /// The first line of its answers, e.g.
    /// `reviews (version=v1) of prod, zone az1, at 127.0.0.1:19081`.
    pub answer: String,
}

/// A backend for every loopback endpoint port of `mesh`'s HTTP/1.1 service ports, by
/// address (the first service naming an address wins).
pub fn plan(mesh: &model::Mesh) -> Vec<BackendSpec> {
    let mut out: BTreeMap<SocketAddr, BackendSpec> = BTreeMap::new();
    for (env_name, env) in &mesh.environments {
        for service in env.services.values() {
            // HTTP/1.1 ports only: the backends do not speak HTTP/2 (gRPC).
            let http1 = |p: &&model::ServicePort| p.protocol.is_http() && !p.protocol.is_http2();
            for port in service.ports.iter().filter(http1) {
                for e in service.endpoints.iter().filter(|e| e.address.is_loopback()) {
                    let number = e
                        .ports
                        .get(&port.name)
                        .copied()
                        .or(e.port)
                        .unwrap_or(port.port);
                    let addr = SocketAddr::new(e.address, number);
                    let labels: Vec<String> =
                        e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    let name = match e.labels.get("version") {
                        Some(v) => format!("{}-{v}", service.key.name),
                        None => service.key.name.clone(),
                    };
                    let labels = if labels.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", labels.join(", "))
                    };
                    let zone = if e.locality.zone.is_empty() {
                        String::new()
                    } else {
                        format!(", zone {}", e.locality.zone)
                    };
                    out.entry(addr).or_insert_with(|| BackendSpec {
                        addr,
                        name,
                        answer: format!(
                            "{}{labels} of {env_name}{zone}, at {addr}",
                            service.key.name
                        ),
                    });
                }
            }
        }
    }
    out.into_values().collect()
}

/// The running backends (stopped when dropped).
#[derive(Debug)]
pub struct Backends {
    pub specs: Vec<BackendSpec>,
    _tasks: JoinSet<()>,
}

/// Binds every backend of `specs`; an address in use is an error naming it.
pub async fn start(specs: Vec<BackendSpec>) -> anyhow::Result<Backends> {
    let mut tasks = JoinSet::new();
    for spec in &specs {
        let listener = tokio::net::TcpListener::bind(spec.addr).await.with_context(|| {
            format!(
                "the example backend {} ({}) cannot listen on {}, where the config's endpoint is: stop what listens there, or run with --no-proxies",
                spec.name, spec.answer, spec.addr
            )
        })?;
        let (name, answer) = (spec.name.clone(), spec.answer.clone());
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (name, answer) = (name.clone(), answer.clone());
            async move {
                let host = req
                    .headers()
                    .get("host")
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                (
                    [("x-backend", name)],
                    format!("{answer}: {} {} (Host {host})\n", req.method(), req.uri()),
                )
            }
        });
        tasks.spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "an example backend stopped");
            }
        });
    }
    Ok(Backends {
        specs,
        _tasks: tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bundled example: its three HTTP/1.1 loopback endpoints, not gRPC `ratings`.
    #[test]
    fn the_examples_backends() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh");
        let (_, mesh) = tributary_controlplane::config::watch::load(&[dir]).unwrap();
        let got: Vec<(String, String)> = plan(&mesh)
            .into_iter()
            .map(|b| (b.addr.to_string(), b.answer))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "127.0.0.1:19081",
                    "reviews (version=v1) of prod, zone az1, at 127.0.0.1:19081"
                ),
                (
                    "127.0.0.1:19083",
                    "reviews of staging, zone az2, at 127.0.0.1:19083"
                ),
                (
                    "[::1]:19082",
                    "reviews (version=v2) of prod, zone az1, at [::1]:19082"
                ),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }
}
