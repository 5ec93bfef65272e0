//! The one-command mesh's example backends: something real for its proxies to reach.
//! For every endpoint of the config on a loopback address (the bundled example's
//! `reviews` v1 on 127.0.0.1:19081 and v2 on [::1]:19082, …), a tiny HTTP server on
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

/// A backend for every loopback endpoint port of `mesh`'s HTTP services, by address
/// (the first service naming an address wins).
pub fn plan(mesh: &model::Mesh) -> Vec<BackendSpec> {
    let mut out: BTreeMap<SocketAddr, BackendSpec> = BTreeMap::new();
    for (env_name, env) in &mesh.environments {
        for service in env.services.values() {
            for port in service.ports.iter().filter(|p| p.protocol.is_http()) {
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
