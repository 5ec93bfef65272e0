//! Following the shard router's directory (`tributary remote --router`).
//!
//! Instead of one hub given on its command line, the agent asks the router's
//! directory (`tributary.directory.v1.Directory/Watch`, for its own zone) which live
//! replicas serve the shards `(environment, zone)` of its zone, and feeds each replica
//! the **slice** of its cluster that replica serves: the services of the environments
//! whose shard in this zone the replica holds, with their endpoint sets. Each replica
//! gets its own connection loop ([`super::run_with`]: resume or full resync, split
//! batches, backoff with full jitter) over its own slice, so a replica that joins gets
//! a full resync, a replica whose environments change gets the difference (the slice
//! changes, the connection diffs it like any change), and a replica that leaves the
//! zone's shards is dropped (its connection ends; the hub starts the cluster's grace
//! period). While the directory is unreachable the agent keeps feeding the replicas
//! it knows and reconnects to the directory with backoff and full jitter.
//!
//! A slice follows the cluster's state incrementally: each change of the source is
//! applied to the slice from the persistent maps' diff (what changed, not a walk over
//! every service); only a change of the slice's environments rebuilds it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use imbl::ordmap::DiffItem;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};
use tributary_proto::directory::v1::directory_client::DirectoryClient;
use tributary_proto::directory::v1::{LookupRequest, LookupResponse};

use super::admin::Telemetry;
use super::{AgentConfig, AgentError, ClusterState, backoff, full_jitter};

/// A replica the agent feeds, as the directory names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The replica's federation address, as a URL (`http://127.0.0.1:18000`).
    pub url: String,
    /// The environments whose shard in the agent's zone this replica serves.
    pub environments: BTreeSet<String>,
}

/// What the agent in `zone` feeds, by replica id: every replica of a shard of `zone`
/// with the environments of those shards.
pub fn targets(answer: &LookupResponse, zone: &str) -> BTreeMap<String, Target> {
    let mut out: BTreeMap<String, Target> = BTreeMap::new();
    for shard in answer.shards.iter().filter(|s| s.zone == zone) {
        for r in &shard.replicas {
            let addr = if r.federation_address.is_empty() {
                &r.xds_address
            } else {
                &r.federation_address
            };
            let t = out.entry(r.id.clone()).or_insert_with(|| Target {
                url: url(addr),
                environments: BTreeSet::new(),
            });
            t.environments.insert(shard.environment.clone());
        }
    }
    out
}

/// `127.0.0.1:18000` → `http://127.0.0.1:18000` (an address with a scheme is kept).
fn url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// The part of a cluster's state one replica serves: the services of `environments`
/// and their endpoint sets.
#[derive(Debug)]
pub struct Slicer {
    environments: BTreeSet<String>,
    source: Arc<ClusterState>,
    slice: Arc<ClusterState>,
}

impl Slicer {
    pub fn new(environments: BTreeSet<String>, source: Arc<ClusterState>) -> Self {
        let slice = Arc::new(slice_of(&source, &environments));
        Slicer {
            environments,
            source,
            slice,
        }
    }

    pub fn slice(&self) -> Arc<ClusterState> {
        self.slice.clone()
    }

    /// Follows the source to `new`, from the difference with the previous source.
    pub fn update(&mut self, new: Arc<ClusterState>) {
        let old = std::mem::replace(&mut self.source, new);
        let new = &self.source;
        let mut slice = (*self.slice).clone();
        for d in old.services.diff(&new.services) {
            match d {
                DiffItem::Add(k, s) | DiffItem::Update { new: (k, s), .. } => {
                    if self.environments.contains(&s.value.environment) {
                        slice.services.insert(k.clone(), s.clone());
                        match new.endpoints.get(k) {
                            Some(e) => slice.endpoints.insert(k.clone(), e.clone()),
                            None => slice.endpoints.remove(k),
                        };
                    } else if slice.services.remove(k).is_some() {
                        slice.endpoints.remove(k);
                    }
                }
                DiffItem::Remove(k, _) => {
                    slice.services.remove(k);
                    slice.endpoints.remove(k);
                }
            }
        }
        for d in old.endpoints.diff(&new.endpoints) {
            match d {
                DiffItem::Add(k, e) | DiffItem::Update { new: (k, e), .. } => {
                    if slice.services.contains_key(k) {
                        slice.endpoints.insert(k.clone(), e.clone());
                    }
                }
                DiffItem::Remove(k, _) => {
                    slice.endpoints.remove(k);
                }
            }
        }
        self.slice = Arc::new(slice);
    }

    /// Serves `environments` from now on (the slice is rebuilt).
    pub fn set_environments(&mut self, environments: BTreeSet<String>) {
        if environments != self.environments {
            self.slice = Arc::new(slice_of(&self.source, &environments));
            self.environments = environments;
        }
    }
}

/// The services of `environments` in `state`, with their endpoint sets.
pub fn slice_of(state: &ClusterState, environments: &BTreeSet<String>) -> ClusterState {
    let mut out = ClusterState::default();
    for (k, s) in state.services.iter() {
        if environments.contains(&s.value.environment) {
            out.services.insert(k.clone(), s.clone());
            if let Some(e) = state.endpoints.get(k) {
                out.endpoints.insert(k.clone(), e.clone());
            }
        }
    }
    out
}

/// One replica being fed: its connection task and the environments it serves.
struct Link {
    url: String,
    environments: watch::Sender<BTreeSet<String>>,
    task: JoinHandle<()>,
    telemetry: Arc<Telemetry>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
        self.telemetry.set_state("stopped");
    }
}

/// Runs the agent against the replicas the router at `router` names for
/// `cfg.zone`, until `shutdown` resolves. `cfg.hub` is ignored.
pub async fn follow(
    cfg: AgentConfig,
    router: String,
    state: watch::Receiver<Arc<ClusterState>>,
    shutdown: impl std::future::Future<Output = ()>,
    telemetry: Arc<Telemetry>,
) {
    tokio::pin!(shutdown);
    let router = url(&router);
    let mut links: BTreeMap<String, Link> = BTreeMap::new();
    let mut delays = backoff(&cfg);
    loop {
        let started = Instant::now();
        telemetry.set_state("connecting");
        let result = tokio::select! {
            r = watch_directory(&cfg, &router, &state, &telemetry, &mut links) => r,
            _ = &mut shutdown => break,
        };
        match &result {
            Ok(()) => info!(%router, "the directory stream ended"),
            Err(e) => {
                warn!(%router, error = %e, replicas = links.len(), "the directory is unreachable; feeding the replicas known so far")
            }
        }
        telemetry.session_ended(result.err().map(|e| format!("directory {router}: {e}")));
        if started.elapsed() > Duration::from_secs(30) {
            delays = backoff(&cfg);
        }
        let delay = full_jitter(delays.next().unwrap_or(cfg.backoff_max));
        debug!(?delay, "asking the directory again after backoff");
        telemetry.set_state("backoff");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut shutdown => break,
        }
    }
    telemetry.set_state("stopped");
    for id in std::mem::take(&mut links).into_keys() {
        telemetry.replica_gone(&id);
    }
}

/// One Watch of the directory: every answer reconciles the links.
async fn watch_directory(
    cfg: &AgentConfig,
    router: &str,
    state: &watch::Receiver<Arc<ClusterState>>,
    telemetry: &Arc<Telemetry>,
    links: &mut BTreeMap<String, Link>,
) -> Result<(), AgentError> {
    let mut client = DirectoryClient::new(super::connect(cfg, router).await?);
    let mut answers = client
        .watch(LookupRequest {
            environment: String::new(),
            zone: cfg.zone.clone(),
        })
        .await?
        .into_inner();
    telemetry.set_state("following");
    while let Some(answer) = answers.message().await? {
        let want = targets(&answer, &cfg.zone);
        reconcile(cfg, state, telemetry, links, want, answer.revision);
    }
    Ok(())
}

/// Starts a link for each new replica (or a replica at a new address), updates the
/// environments of the others, and drops the links of replicas no longer named.
fn reconcile(
    cfg: &AgentConfig,
    state: &watch::Receiver<Arc<ClusterState>>,
    telemetry: &Arc<Telemetry>,
    links: &mut BTreeMap<String, Link>,
    want: BTreeMap<String, Target>,
    revision: i64,
) {
    let gone: Vec<String> = links
        .iter()
        .filter(|(id, l)| want.get(*id).is_none_or(|t| t.url != l.url))
        .map(|(id, _)| id.clone())
        .collect();
    for id in gone {
        if let Some(l) = links.remove(&id) {
            info!(replica = %id, url = %l.url, revision, "replica left this zone's shards: no longer fed");
            // The link's session ends (its `connected` gauge drops) before the status
            // stops listing it: whoever sees the status change sees the gauge too.
            drop(l);
            telemetry.replica_gone(&id);
        }
    }
    for (id, t) in want {
        if let Some(l) = links.get(&id) {
            l.environments.send_if_modified(|e| {
                let changed = *e != t.environments;
                if changed {
                    info!(replica = %id, environments = ?t.environments, revision, "replica's environments changed");
                    *e = t.environments.clone();
                }
                changed
            });
            continue;
        }
        info!(replica = %id, url = %t.url, environments = ?t.environments, revision, "feeding replica");
        let mut link_cfg = cfg.clone();
        link_cfg.hub = t.url.clone();
        let child = telemetry.replica(&id, &t.url);
        let (env_tx, env_rx) = watch::channel(t.environments);
        let span = info_span!("replica", replica = %id, url = %t.url);
        let task =
            tokio::spawn(feed(link_cfg, state.clone(), env_rx, child.clone()).instrument(span));
        links.insert(
            id,
            Link {
                url: t.url,
                environments: env_tx,
                task,
                telemetry: child,
            },
        );
    }
}

/// Feeds one replica its slice: a connection loop over a state channel that the
/// slicer keeps up to date with the source and the replica's environments.
async fn feed(
    cfg: AgentConfig,
    mut source: watch::Receiver<Arc<ClusterState>>,
    mut environments: watch::Receiver<BTreeSet<String>>,
    telemetry: Arc<Telemetry>,
) {
    let mut slicer = Slicer::new(
        environments.borrow_and_update().clone(),
        source.borrow_and_update().clone(),
    );
    let (tx, rx) = watch::channel(slicer.slice());
    let slicing = async move {
        loop {
            tokio::select! {
                r = source.changed() => {
                    if r.is_err() {
                        return; // the source stopped: the agent is shutting down
                    }
                    slicer.update(source.borrow_and_update().clone());
                }
                r = environments.changed() => {
                    if r.is_err() {
                        return;
                    }
                    slicer.set_environments(environments.borrow_and_update().clone());
                }
            }
            tx.send_replace(slicer.slice());
        }
    };
    tokio::select! {
        () = slicing => {}
        () = super::run_with(cfg, rx, std::future::pending(), telemetry) => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use tributary_proto::directory::v1::{Replica, Shard};
    use tributary_proto::federation::v1 as pb;

    use super::*;
    use crate::model::ObjectKey;

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    fn with_service(state: &mut ClusterState, name: &str, env: &str, address: &str) {
        let at = SystemTime::UNIX_EPOCH;
        state.set_service(
            key(name),
            Some(pb::Service {
                namespace: "ns".into(),
                name: name.into(),
                environment: env.into(),
                ..Default::default()
            }),
            at,
        );
        state.set_endpoints(
            key(name),
            Some(pb::EndpointSet {
                namespace: "ns".into(),
                service: name.into(),
                endpoints: vec![pb::Endpoint {
                    addresses: vec![address.into()],
                    ..Default::default()
                }],
            }),
            at,
        );
    }

    fn envs(e: &[&str]) -> BTreeSet<String> {
        e.iter().map(ToString::to_string).collect()
    }

    fn names(s: &ClusterState) -> (Vec<String>, Vec<String>) {
        (
            s.services.keys().map(|k| k.name.clone()).collect(),
            s.endpoints.keys().map(|k| k.name.clone()).collect(),
        )
    }

    /// The incremental slice always equals the slice computed from scratch, through
    /// adds, endpoint changes, a service moving between environments, removals and a
    /// change of the slice's environments.
    #[test]
    fn a_slice_follows_its_source_incrementally() {
        let mut state = ClusterState::default();
        with_service(&mut state, "a", "prod", "10.0.0.1");
        with_service(&mut state, "b", "staging", "10.0.0.2");
        let mut slicer = Slicer::new(envs(&["prod"]), Arc::new(state.clone()));
        assert_eq!(names(&slicer.slice()), (vec!["a".into()], vec!["a".into()]));

        type Step = Box<dyn Fn(&mut ClusterState)>;
        let mut steps: Vec<Step> = vec![
            Box::new(|s| with_service(s, "c", "prod", "10.0.0.3")),
            Box::new(|s| with_service(s, "a", "prod", "10.0.0.9")),
            // b moves into prod, c out of it.
            Box::new(|s| with_service(s, "b", "prod", "10.0.0.2")),
            Box::new(|s| with_service(s, "c", "staging", "10.0.0.3")),
            Box::new(|s| s.set_endpoints(key("a"), None, SystemTime::UNIX_EPOCH)),
            Box::new(|s| {
                s.set_service(key("b"), None, SystemTime::UNIX_EPOCH);
                s.set_endpoints(key("b"), None, SystemTime::UNIX_EPOCH);
            }),
        ];
        for step in steps.drain(..) {
            step(&mut state);
            slicer.update(Arc::new(state.clone()));
            assert_eq!(*slicer.slice(), slice_of(&state, &envs(&["prod"])));
        }
        assert_eq!(names(&slicer.slice()), (vec!["a".into()], vec![]));
        slicer.set_environments(envs(&["staging"]));
        assert_eq!(names(&slicer.slice()), (vec!["c".into()], vec!["c".into()]));
    }

    #[test]
    fn targets_are_the_replicas_of_the_zone_with_their_environments() {
        let replica = |id: &str, addr: &str| Replica {
            id: id.into(),
            xds_address: addr.into(),
            federation_address: addr.into(),
            leader: false,
        };
        let shard = |env: &str, zone: &str, r: Vec<Replica>| Shard {
            environment: env.into(),
            zone: zone.into(),
            replicas: r,
        };
        let answer = LookupResponse {
            shards: vec![
                shard(
                    "prod",
                    "az1",
                    vec![replica("h1", "127.0.0.1:1"), replica("h2", "[::1]:2")],
                ),
                shard("staging", "az1", vec![replica("h2", "[::1]:2")]),
                shard("prod", "az2", vec![replica("h3", "127.0.0.1:3")]),
            ],
            revision: 7,
        };
        let t = targets(&answer, "az1");
        assert_eq!(
            t.into_iter()
                .map(|(id, t)| (id, t.url, t.environments.into_iter().collect::<Vec<_>>()))
                .collect::<Vec<_>>(),
            vec![
                (
                    "h1".into(),
                    "http://127.0.0.1:1".into(),
                    vec!["prod".into()]
                ),
                (
                    "h2".into(),
                    "http://[::1]:2".into(),
                    vec!["prod".into(), "staging".into()]
                ),
            ]
        );
    }
}
