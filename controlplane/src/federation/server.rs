//! The hub side of the federation stream: one session task per agent.
//!
//! A session reads the agent's Hello, asks the index to admit the cluster (a second
//! live agent for the same cluster id is rejected), answers Welcome, then converts and
//! validates each batch at the edge and hands it to the index, acknowledging its
//! version with the items it rejected. A batch that cannot be applied (over the
//! limits, undecodable, or the session is no longer live) is never acknowledged: the
//! agent gets a `BatchRejected`, the index counts it, and the stream ends. When the
//! stream ends the index starts the cluster's grace period. Sessions never touch the
//! index's state directly. With membership, a session refuses the services of shards
//! this replica does not serve ([`super::slice`]) before converting a batch.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures_util::Stream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};
use tributary_proto::federation::v1::federation_server::Federation;
use tributary_proto::federation::v1::{self as pb, agent_message, hub_message};

use super::slice::SliceGuard;
use super::{Limits, convert, secrets};
use crate::identity::SpiffeId;
use crate::identity::authz::{authorize_agent, export_refusal};
use crate::index::{Command, IndexHandle};
use crate::membership::Membership;
use crate::metrics::{ClusterLabel, KindLabel, Metrics};
use crate::model::{Mesh, ObjectKey, SecretRef};

#[derive(Debug)]
pub struct FederationService {
    index: IndexHandle,
    metrics: Arc<Metrics>,
    heartbeat: Duration,
    limits: Limits,
    next_session: AtomicU64,
    stopping: watch::Receiver<bool>,
    /// The shards this replica serves; `None`: it holds every agent's whole export.
    membership: Option<Membership>,
    /// The trust domain of agents' SPIFFE ids, and the config holding the registry
    /// of remote clusters (`None`: no registry, every export is taken).
    trust_domain: String,
    config: Option<watch::Receiver<Arc<Mesh>>>,
}

impl FederationService {
    pub fn new(
        index: IndexHandle,
        metrics: Arc<Metrics>,
        heartbeat: Duration,
        limits: Limits,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            index,
            metrics,
            heartbeat,
            limits,
            next_session: AtomicU64::new(1),
            stopping,
            membership: None,
            trust_domain: crate::identity::tls::DEFAULT_TRUST_DOMAIN.to_string(),
            config: None,
        }
    }

    /// Authorizes agents by their certificates (of `trust_domain`) and what they
    /// export by the registry of remote clusters in `config`.
    pub fn with_security(
        mut self,
        trust_domain: String,
        config: watch::Receiver<Arc<Mesh>>,
    ) -> Self {
        self.trust_domain = trust_domain;
        self.config = Some(config);
        self
    }

    /// Holds only the services of the shards this replica serves.
    pub fn with_membership(mut self, membership: Membership) -> Self {
        self.membership = Some(membership);
        self
    }
}

fn hub(kind: hub_message::Kind) -> Result<pb::HubMessage, Status> {
    Ok(pb::HubMessage { kind: Some(kind) })
}

fn now_nanos() -> i64 {
    convert::to_unix_nanos(SystemTime::now())
}

#[tonic::async_trait]
impl Federation for FederationService {
    type StreamStream = Pin<Box<dyn Stream<Item = Result<pb::HubMessage, Status>> + Send>>;

    async fn stream(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("federation", session, cluster = tracing::field::Empty);
        let (index, metrics, heartbeat, limits, membership) = (
            self.index.clone(),
            self.metrics.clone(),
            self.heartbeat,
            self.limits,
            self.membership.clone(),
        );
        let peer = request.remote_addr();
        let security = Security {
            peer: crate::identity::tls::request_peer(&request, &self.trust_domain)?,
            config: self.config.clone(),
        };
        let mut stopping = self.stopping.clone();
        tokio::spawn(
            async move {
                let result = tokio::select! {
                    r = run(session, index.clone(), metrics, heartbeat, limits, membership, security, request.into_inner(), &tx) => r,
                    _ = stopping.wait_for(|s| *s) => Err(Status::unavailable("the hub is shutting down")),
                };
                if let Err(status) = result {
                    warn!(code = ?status.code(), message = status.message(), ?peer, "federation session ended with an error");
                    let _ = tx.send(Err(status)).await;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Who the agent is (its certificate) and the registry that says what it may export.
struct Security {
    /// `None` on a plaintext hub.
    peer: Option<SpiffeId>,
    config: Option<watch::Receiver<Arc<Mesh>>>,
}

impl Security {
    /// The session may start: the Hello's cluster id is the certified one, and a
    /// certified cluster is registered.
    fn admit(&self, cluster: &str) -> Result<(), Status> {
        let mesh = self.config.as_ref().map(|c| c.borrow().clone());
        let empty = Default::default();
        let registry = mesh
            .as_ref()
            .map_or(&empty, |m| &m.security.remote_clusters);
        authorize_agent(self.peer.as_ref(), cluster, registry)
    }

    /// Why `cluster` may not export a service of `namespace` into `environment`.
    fn refusal(
        &self,
        mesh: Option<&Mesh>,
        cluster: &str,
        environment: &str,
        namespace: &str,
    ) -> Option<String> {
        let mesh = mesh?;
        export_refusal(
            &mesh.security.remote_clusters,
            cluster,
            self.peer.is_some(),
            environment,
            namespace,
        )
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    session: u64,
    index: IndexHandle,
    metrics: Arc<Metrics>,
    heartbeat: Duration,
    limits: Limits,
    membership: Option<Membership>,
    security: Security,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: &mpsc::Sender<Result<pb::HubMessage, Status>>,
) -> Result<(), Status> {
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| Status::cancelled("stream closed before Hello"))?;
    let Some(agent_message::Kind::Hello(hello)) = first.kind else {
        return Err(Status::invalid_argument(
            "the first federation message must be a Hello",
        ));
    };
    let info = convert::cluster_info(&hello).map_err(Status::invalid_argument)?;
    let cluster = info.id.clone();
    tracing::Span::current().record("cluster", cluster.as_str());
    if let Err(status) = security.admit(&cluster) {
        metrics.federation_rejected.inc();
        return Err(status);
    }
    let (reply, answer) = oneshot::channel();
    index
        .send(Command::Hello {
            info: info.clone(),
            last_acked: hello.last_acked_version,
            session,
            reply,
        })
        .await
        .map_err(Status::unavailable)?;
    let welcome = match answer
        .await
        .map_err(|_| Status::unavailable("the index has stopped"))?
    {
        Ok(w) => w,
        Err(message) => {
            let _ = tx
                .send(hub(hub_message::Kind::Reject(pb::Reject {
                    message: message.clone(),
                })))
                .await;
            return Err(Status::already_exists(message));
        }
    };
    if tx
        .send(hub(hub_message::Kind::Welcome(pb::Welcome {
            resume: welcome.resume,
            hub_version: welcome.hub_version,
            max_batch_changes: u32::try_from(limits.max_batch_changes).unwrap_or(u32::MAX),
            max_message_bytes: limits.max_message_bytes as u64,
        })))
        .await
        .is_err()
    {
        index.send(Command::Gone { cluster, session }).await.ok();
        return Ok(());
    }

    let result = serve(
        Session {
            id: session,
            cluster: &cluster,
            info: &info,
            index: &index,
            metrics: &metrics,
            limits: &limits,
            tx,
            membership,
            guard: SliceGuard::default(),
            security,
            grants: SliceGuard::default(),
            secrets_asked: None,
        },
        heartbeat,
        &mut inbound,
    )
    .await;
    index
        .send(Command::Gone {
            cluster: cluster.clone(),
            session,
        })
        .await
        .ok();
    info!("agent session ended");
    result
}

/// One live session's context.
struct Session<'a> {
    id: u64,
    cluster: &'a str,
    info: &'a crate::federation::ClusterInfo,
    index: &'a IndexHandle,
    metrics: &'a Metrics,
    limits: &'a Limits,
    tx: &'a mpsc::Sender<Result<pb::HubMessage, Status>>,
    membership: Option<Membership>,
    /// The services this session refused (not this replica's shards).
    guard: SliceGuard,
    security: Security,
    /// The services this session refused because the registry does not grant them.
    grants: SliceGuard,
    /// The Secrets this session last asked the agent for (`None`: not asked yet).
    secrets_asked: Option<std::collections::BTreeSet<ObjectKey>>,
}

impl Session<'_> {
    /// The Secrets the agent must send now (credentials of the environments this
    /// replica serves, granted to the cluster), and why the others are not asked for.
    fn secrets_wanted(
        &self,
    ) -> (
        std::collections::BTreeSet<ObjectKey>,
        Vec<(SecretRef, String)>,
    ) {
        let Some(config) = &self.security.config else {
            return Default::default();
        };
        let mesh = config.borrow().clone();
        let zone = &self.info.zone;
        secrets::requested(&mesh, self.cluster, self.security.peer.is_some(), |env| {
            self.membership
                .as_ref()
                .is_none_or(|m| m.federation_refusal(env, zone).is_none())
        })
    }

    /// Tells the agent which Secrets to watch when that changed (the config, the
    /// grant or the shards this replica serves). `Err`: the stream closed.
    async fn ask_secrets(&mut self) -> Result<(), ()> {
        let (asked, refused) = self.secrets_wanted();
        if self.secrets_asked.as_ref() == Some(&asked)
            || (self.secrets_asked.is_none() && asked.is_empty() && refused.is_empty())
        {
            return Ok(());
        }
        for (secret, why) in &refused {
            warn!(%secret, reason = %why, "credential Secret not asked for: the cluster's grant does not cover it");
        }
        info!(
            secrets = asked.len(),
            "asking the agent for credential Secrets"
        );
        let msg = pb::WatchSecrets {
            secrets: asked
                .iter()
                .map(|k| pb::SecretRef {
                    namespace: k.namespace.clone(),
                    name: k.name.clone(),
                })
                .collect(),
        };
        self.secrets_asked = Some(asked);
        self.tx
            .send(hub(hub_message::Kind::WatchSecrets(msg)))
            .await
            .map_err(|_| ())
    }

    /// A Secret from the agent: refused (counted) unless this session asked for it
    /// and the grant still covers it; else checked and handed to the index.
    async fn on_secret(&mut self, u: pb::SecretUpdate) -> Result<(), String> {
        let key = ObjectKey {
            namespace: u.namespace.clone(),
            name: u.name.clone(),
        };
        let secret = SecretRef {
            cluster: self.cluster.to_string(),
            namespace: u.namespace,
            name: u.name,
        };
        let (wanted, refused) = self.secrets_wanted();
        let asked = self
            .secrets_asked
            .as_ref()
            .is_some_and(|a| a.contains(&key));
        if !asked || !wanted.contains(&key) {
            let why = refused
                .iter()
                .find(|(s, _)| *s == secret)
                .map_or("the hub did not ask for it", |(_, w)| w.as_str());
            self.metrics
                .federation_secrets_refused
                .get_or_create(&ClusterLabel {
                    cluster: self.cluster.to_string(),
                })
                .inc();
            warn!(%secret, reason = %why, "Secret refused: not held");
            return Ok(());
        }
        use tributary_proto::federation::v1::secret_update::State;
        let event = match u.state {
            Some(State::Tls(tls)) => {
                // Parsing and signing checks are CPU work: off the async workers.
                let now = SystemTime::now();
                tokio::task::spawn_blocking(move || {
                    secrets::validate(&tls.certificate_chain, &tls.private_key, now)
                })
                .await
                .map_err(|e| format!("checking the Secret failed: {e}"))?
                .unwrap_or_else(secrets::SecretEvent::Invalid)
            }
            Some(State::Deleted(_)) => secrets::SecretEvent::Deleted,
            Some(State::Invalid(why)) => secrets::SecretEvent::Invalid(why),
            None => secrets::SecretEvent::Invalid("the agent sent no state".into()),
        };
        self.index.send(Command::Secret { secret, event }).await
    }

    /// Converts a batch and has the index apply it: `Ok` with the items rejected, or
    /// the reason the whole batch was not applied (the index has recorded it).
    async fn apply(&mut self, mut b: pb::ChangeBatch) -> Result<Vec<pb::ItemError>, String> {
        let version = b.version;
        let mut unserved = Vec::new();
        let mesh = self.security.config.as_ref().map(|c| c.borrow().clone());
        let (security, cluster) = (&self.security, self.cluster);
        let refused = self.grants.apply_by_namespace(&mut b, |env, ns| {
            security.refusal(mesh.as_deref(), cluster, env, ns)
        });
        if !refused.is_empty() {
            self.metrics
                .federation_exports_refused
                .get_or_create(&ClusterLabel {
                    cluster: cluster.to_string(),
                })
                .inc_by(refused.len() as u64);
            for e in &refused {
                warn!(version, cluster, refused = %e.message, "export refused: not granted by the registry of remote clusters");
            }
        }
        if let Some(m) = &self.membership {
            let zone = &self.info.zone;
            unserved = self
                .guard
                .apply(&mut b, |env| m.federation_refusal(env, zone));
            if !unserved.is_empty() {
                self.metrics
                    .federation_items_unserved
                    .inc_by(unserved.len() as u64);
                warn!(version, services = unserved.len(), first = %unserved[0].message, "services of shards this replica does not serve are not held");
            }
        }
        let converted = convert::batch(b, self.info, self.limits);
        let mut errors = match &converted {
            Ok((_, errors)) => errors.clone(),
            Err(_) => Vec::new(),
        };
        if !errors.is_empty() {
            self.metrics
                .federation_item_errors
                .inc_by(errors.len() as u64);
            for e in errors.iter().take(5) {
                warn!(version, item = e.index, error = %e.message, "invalid federation item rejected");
            }
        }
        self.submit(version, converted.map(|(batch, _)| batch))
            .await?;
        errors.extend(unserved);
        errors.extend(refused);
        errors.sort_by_key(|e| e.index);
        Ok(errors
            .into_iter()
            .map(|e| pb::ItemError {
                index: e.index,
                message: e.message,
            })
            .collect())
    }

    async fn submit(
        &self,
        version: u64,
        batch: Result<crate::federation::Batch, String>,
    ) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.index
            .send(Command::Batch {
                cluster: self.cluster.to_string(),
                session: self.id,
                version,
                batch,
                reply,
            })
            .await?;
        answer
            .await
            .map_err(|_| "the index has stopped".to_string())?
    }

    /// Tells the agent batch `version` was not applied, and ends the stream: later
    /// batches on it were built on top of the rejected one.
    async fn rejected(&self, version: u64, message: String) -> Status {
        let _ = self
            .tx
            .send(hub(hub_message::Kind::BatchRejected(pb::BatchRejected {
                version,
                message: message.clone(),
            })))
            .await;
        Status::aborted(format!(
            "batch {version} rejected, not applied: {message}; reconnect and resync"
        ))
    }
}

async fn serve(
    mut s: Session<'_>,
    heartbeat: Duration,
    inbound: &mut Streaming<pb::AgentMessage>,
) -> Result<(), Status> {
    let (metrics, tx) = (s.metrics, s.tx);
    if s.ask_secrets().await.is_err() {
        return Ok(());
    }
    let mut config = s.security.config.clone();
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = tokio::time::Instant::now();
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok(()),
                    Err(status) if status.code() == tonic::Code::OutOfRange => {
                        // Over the decode limit: a hostile or misconfigured agent. Say so
                        // clearly; the hub never buffers more than the limit.
                        let message = format!(
                            "a federation message exceeds the hub's limit of {} bytes (--federation-max-message-bytes): {}",
                            s.limits.max_message_bytes,
                            status.message()
                        );
                        let _ = s.submit(0, Err(message.clone())).await;
                        return Err(s.rejected(0, message).await);
                    }
                    Err(status) => {
                        info!(%status, "agent stream error");
                        return Ok(());
                    }
                };
                last_seen = tokio::time::Instant::now();
                match msg.kind {
                    Some(agent_message::Kind::Batch(b)) => {
                        metrics.federation_messages.get_or_create(&KindLabel { kind: "batch" }).inc();
                        let version = b.version;
                        match s.apply(b).await {
                            Ok(errors) => {
                                let ack = pb::Ack { version, errors };
                                if tx.send(hub(hub_message::Kind::Ack(ack))).await.is_err() {
                                    return Ok(());
                                }
                            }
                            Err(message) => return Err(s.rejected(version, message).await),
                        }
                    }
                    Some(agent_message::Kind::Heartbeat(_)) => {
                        metrics.federation_messages.get_or_create(&KindLabel { kind: "heartbeat" }).inc();
                    }
                    Some(agent_message::Kind::Secret(u)) => {
                        metrics.federation_messages.get_or_create(&KindLabel { kind: "secret" }).inc();
                        s.on_secret(u).await.map_err(Status::unavailable)?;
                    }
                    Some(agent_message::Kind::Hello(_)) => {
                        return Err(Status::invalid_argument("Hello may only be the first message of a stream"));
                    }
                    None => {
                        metrics.federation_item_errors.inc();
                        warn!("empty federation message ignored");
                    }
                }
            }
            Ok(()) = changed(&mut config) => {
                // The config changed: its credentials may name other Secrets.
                if s.ask_secrets().await.is_err() {
                    return Ok(());
                }
            }
            _ = ticker.tick() => {
                // The shards this replica serves may have moved.
                if s.ask_secrets().await.is_err() {
                    return Ok(());
                }
                if last_seen.elapsed() > heartbeat * 3 {
                    return Err(Status::deadline_exceeded(format!("no message from the agent for {:?}", last_seen.elapsed())));
                }
                if tx.send(hub(hub_message::Kind::Heartbeat(pb::Heartbeat { unix_nanos: now_nanos() }))).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// Resolves when the config changes (never without one; `Err` when it is gone).
async fn changed(config: &mut Option<watch::Receiver<Arc<Mesh>>>) -> Result<(), ()> {
    match config {
        Some(rx) => rx.changed().await.map_err(|_| ()),
        None => std::future::pending().await,
    }
}
