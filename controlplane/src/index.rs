//! The index: the single writer of every shard's snapshots.
//!
//! It receives each new [`Mesh`] from the config source, regenerates only the
//! environments whose model changed, and publishes them; the snapshot diff then drops
//! every resource whose content version did not change, so an edit that changes
//! nothing pushes nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tracing::info;

use crate::metrics::{EnvLabel, Metrics};
use crate::model::{Environment, Mesh};
use crate::xds::generate::generate;
use crate::xds::snapshot::Shards;

/// Applies `mesh` on top of `previous`, publishing the environments that changed.
pub fn apply(previous: &Mesh, mesh: &Mesh, shards: &Shards, metrics: &Metrics) {
    let empty = Environment::default();
    let envs: BTreeSet<&String> = previous
        .environments
        .keys()
        .chain(mesh.environments.keys())
        .collect();
    for env in envs {
        let old = previous.environments.get(env);
        let new = mesh.environments.get(env).unwrap_or(&empty);
        if old == Some(new) {
            continue;
        }
        let started = Instant::now();
        let resources = generate(new);
        metrics
            .generation_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Some(seq) = shards.publish(env, resources) {
            metrics
                .snapshots_published
                .get_or_create(&EnvLabel {
                    environment: env.clone(),
                })
                .inc();
            info!(environment = %env, seq, "snapshot published");
        }
    }
}

/// Runs until the config source goes away. The mesh in `updates` when called must
/// already be applied (start-up applies it before serving, so readiness means "has
/// config").
pub async fn run(
    mut updates: watch::Receiver<Arc<Mesh>>,
    shards: Arc<Shards>,
    metrics: Arc<Metrics>,
) {
    let mut current = updates.borrow_and_update().clone();
    while updates.changed().await.is_ok() {
        let next = updates.borrow_and_update().clone();
        apply(&current, &next, &shards, &metrics);
        current = next;
    }
}
