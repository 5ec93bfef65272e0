//! Static-file agent source: the same YAML format as the hub's file source, for
//! workloads outside Kubernetes and for load tests. Each `Service` (with its
//! `Endpoints`) is exported under its environment; a file change is picked up by
//! watching the files (see [`crate::config::watch`]), and only services whose content
//! changed get a new observation time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tracing::{error, info};
use tributary_proto::federation::v1 as pb;

use super::ClusterState;
use crate::config::watch::{PathWatcher, WatchConfig, list_files, panic_message, read_files};
use crate::config::{ConfigErrors, parse_files};
use crate::federation::FedService;
use crate::federation::convert::service_to_proto;
use crate::model::{Health, Mesh};

/// Turns a mesh into what a cluster exports, keeping observation times of
/// unchanged entries from `previous`.
pub fn cluster_state(mesh: &Mesh, previous: &ClusterState, now: SystemTime) -> ClusterState {
    let mut next = previous.clone();
    let mut seen_services = std::collections::BTreeSet::new();
    for (env, e) in &mesh.environments {
        for (key, s) in &e.services {
            seen_services.insert(key.clone());
            let fed = FedService {
                key: key.clone(),
                environment: env.clone(),
                hosts: s.hosts.clone(),
                ports: s.ports.clone(),
            };
            next.set_service(key.clone(), Some(service_to_proto(&fed)), now);
            let endpoints = s
                .endpoints
                .iter()
                .map(|ep| pb::Endpoint {
                    addresses: vec![ep.address.to_string()],
                    ports: s
                        .ports
                        .iter()
                        .filter_map(|p| ep.port_for(p).map(|n| (p.name.clone(), u32::from(n))))
                        .collect(),
                    zone: ep.locality.zone.clone(),
                    node: String::new(),
                    ready: matches!(ep.health, Health::Healthy | Health::Unknown),
                    serving: !matches!(ep.health, Health::Unhealthy),
                    terminating: matches!(ep.health, Health::Draining),
                    labels: ep.labels.clone().into_iter().collect(),
                    // File endpoints have no identity beyond their address.
                    name: String::new(),
                })
                .collect();
            let set = pb::EndpointSet {
                namespace: key.namespace.clone(),
                service: key.name.clone(),
                endpoints,
            };
            next.set_endpoints(key.clone(), Some(set), now);
        }
    }
    let gone: Vec<_> = next
        .services
        .keys()
        .filter(|k| !seen_services.contains(*k))
        .cloned()
        .collect();
    for k in gone {
        next.set_service(k.clone(), None, now);
        next.set_endpoints(k, None, now);
    }
    next
}

/// Loads the files once.
pub fn load(paths: &[PathBuf]) -> Result<Mesh, String> {
    let contents =
        read_files(&list_files(paths).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    parse_files(contents.iter().map(|(f, t)| (f.as_str(), t.as_str()))).map_err(
        |ConfigErrors(errs)| {
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        },
    )
}

/// Watches `paths` and publishes the exported state into `tx` until it has no
/// receivers. A file event (or, when polling, a changed file) triggers a read; a
/// state equal to the one exported publishes nothing.
pub async fn run(paths: Vec<PathBuf>, watch: WatchConfig, tx: watch::Sender<Arc<ClusterState>>) {
    let mut watcher = match PathWatcher::start(&paths, &watch) {
        Ok(w) => w,
        Err(e) => {
            error!(error = %e, "cannot watch the agent's files: edits are not exported until a restart");
            return;
        }
    };
    let mut last_error = String::new();
    loop {
        // Read once before waiting: an edit since the initial load is not missed.
        let p = paths.clone();
        let loaded = tokio::task::spawn_blocking(move || (list_files(&p).ok(), load(&p))).await;
        let result = match loaded {
            Ok((files, result)) => {
                if let Some(files) = files {
                    watcher.add_files(&paths, &files);
                }
                result
            }
            Err(e) => Err(format!("loading the files panicked: {}", panic_message(e))),
        };
        match result {
            Ok(mesh) => {
                last_error.clear();
                let current = tx.borrow().clone();
                let next = cluster_state(&mesh, &current, SystemTime::now());
                if next != *current {
                    info!(services = next.services.len(), "exported state changed");
                    tx.send_replace(Arc::new(next));
                }
            }
            Err(e) => {
                if e != last_error {
                    error!("agent config rejected, still exporting the last good state:\n{e}");
                    last_error = e;
                }
            }
        }
        tokio::select! {
            () = watcher.changed() => {}
            () = tx.closed() => return,
        }
    }
}
