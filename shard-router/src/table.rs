//! The routing table: for every shard, its live replicas and their xDS addresses.
//!
//! One writer (the membership task, [`crate::membership`]) applies each new view of
//! the registrations and the assignment with [`Table::apply`]; every relayed stream
//! reads it once, on its first request ([`Table::route`]). The table is a `DashMap`
//! keyed by shard, so a lookup locks one shard's bucket briefly and never across an
//! `.await`.
//!
//! Each (replica, shard) membership carries a *gone* signal: a stream routed to that
//! replica for that shard holds its receiver, and when the replica leaves the shard
//! (its lease expired, it deregistered, it lost the shard, or it came back at another
//! address) the writer fires it, and the relay ends the stream with `UNAVAILABLE` so
//! the client reconnects through the router to a live replica.
//!
//! A replica that the relay could not reach (connect refused or timed out, or its
//! connection broke) is *avoided* for a while ([`Table::avoid`]): new streams of its
//! shard go to the shard's other replicas, by the same rendezvous order, so a crashed
//! replica's clients land elsewhere at once instead of after its lease expires. Only
//! when every replica of a shard is avoided does the router try them anyway.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use tributary_controlplane::membership::{Assignment, ReplicaInfo, Shard};

use crate::first::NodeIdentity;
use crate::rendezvous;

/// One replica serving one shard.
#[derive(Debug, Clone)]
struct Member {
    replica: Arc<str>,
    addr: SocketAddr,
    /// Fired (set to true) when the replica leaves the shard.
    gone: Arc<watch::Sender<bool>>,
}

/// Where a stream goes.
#[derive(Debug, Clone)]
pub struct Route {
    pub shard: Shard,
    pub replica: Arc<str>,
    pub addr: SocketAddr,
    /// Turns true when the replica leaves the shard.
    pub gone: watch::Receiver<bool>,
}

/// Why a stream is refused; each maps to one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `INVALID_ARGUMENT`.
    #[error("{0}")]
    Invalid(String),
    /// `NOT_FOUND`.
    #[error("{0}")]
    NotFound(String),
    /// `UNAVAILABLE` (retryable).
    #[error("{0}")]
    Unavailable(String),
}

impl Refusal {
    /// The gRPC code the client gets.
    pub fn code(&self) -> tonic::Code {
        match self {
            Refusal::Invalid(_) => tonic::Code::InvalidArgument,
            Refusal::NotFound(_) => tonic::Code::NotFound,
            Refusal::Unavailable(_) => tonic::Code::Unavailable,
        }
    }
}

/// The shards and their replicas, as `/status/routes` shows them.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ShardRoutes {
    pub shard: String,
    pub replicas: Vec<ReplicaRoute>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReplicaRoute {
    pub replica: String,
    pub xds_addr: String,
}

/// The routing table.
#[derive(Debug, Default)]
pub struct Table {
    shards: DashMap<Shard, Vec<Member>>,
    /// How many views were applied (0: membership not listed from the store yet).
    applied: watch::Sender<u64>,
    /// Replicas (at an address) the relay could not reach, avoided until then.
    avoided: DashMap<(Arc<str>, SocketAddr), Instant>,
    /// The store revision of the membership last applied.
    revision: AtomicI64,
}

impl Table {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts applied views: 0 until membership was listed from the store; changes
    /// after every view (readiness, and tests that wait for a membership change).
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Applies a view of membership: the live registrations (each lists the shards its
    /// replica serves) and the assignment (every shard, even one without a live
    /// replica). Fires the gone signal of every (replica, shard) that left. Returns
    /// what left, for logs and metrics.
    pub fn apply(
        &self,
        replicas: &BTreeMap<String, ReplicaInfo>,
        assignment: &Assignment,
    ) -> Vec<(String, Shard)> {
        let mut want: BTreeMap<Shard, Vec<(String, SocketAddr)>> = assignment
            .shards
            .iter()
            .map(|s| (s.shard.clone(), Vec::new()))
            .collect();
        for info in replicas.values() {
            let addr = match info.xds_addr.parse::<SocketAddr>() {
                Ok(a) => a,
                Err(e) => {
                    warn!(replica = %info.id, xds_addr = %info.xds_addr, error = %e, "a replica registered an xDS address that is not ip:port; not routing to it");
                    continue;
                }
            };
            for s in &info.shards {
                want.entry(s.clone())
                    .or_default()
                    .push((info.id.clone(), addr));
            }
        }
        let mut left = Vec::new();
        // Shards no longer known: every member leaves.
        self.shards.retain(|shard, members| {
            if want.contains_key(shard) {
                return true;
            }
            for m in members.iter() {
                m.gone.send_replace(true);
                left.push((m.replica.to_string(), shard.clone()));
            }
            false
        });
        for (shard, now) in want {
            let mut entry = self.shards.entry(shard.clone()).or_default();
            let members = entry.value_mut();
            members.retain(|m| {
                let stays = now
                    .iter()
                    .any(|(id, addr)| **id == *m.replica && *addr == m.addr);
                if !stays {
                    m.gone.send_replace(true);
                    left.push((m.replica.to_string(), shard.clone()));
                }
                stays
            });
            for (id, addr) in now {
                if !members.iter().any(|m| *m.replica == *id) {
                    info!(replica = %id, %addr, shard = %shard, "replica serves shard");
                    members.push(Member {
                        replica: Arc::from(id.as_str()),
                        addr,
                        gone: Arc::new(watch::channel(false).0),
                    });
                }
            }
        }
        for (replica, shard) in &left {
            info!(%replica, %shard, "replica left shard: ending its relayed streams");
        }
        self.applied.send_modify(|n| *n += 1);
        left
    }

    /// The relay could not reach `replica` at `addr`: new streams avoid it for `hold`
    /// (while its shard has other replicas).
    pub fn avoid(&self, replica: &Arc<str>, addr: SocketAddr, hold: Duration) {
        let until = Instant::now() + hold;
        self.avoided.insert((replica.clone(), addr), until);
        // Forget expired entries (replicas that came back at another address).
        let now = Instant::now();
        self.avoided.retain(|_, t| *t > now);
    }

    fn is_avoided(&self, m: &Member, now: Instant) -> bool {
        self.avoided
            .get(&(m.replica.clone(), m.addr))
            .is_some_and(|t| *t > now)
    }

    /// Records the store revision of the membership about to be applied.
    pub fn set_revision(&self, revision: i64) {
        self.revision.fetch_max(revision, Ordering::Relaxed);
    }

    /// The store revision of the membership last applied.
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Relaxed)
    }

    /// Ends every relayed stream (the router is shutting down).
    pub fn close_all(&self) {
        for e in self.shards.iter() {
            for m in e.value() {
                m.gone.send_replace(true);
            }
        }
    }

    /// Every known shard, sorted, as `env/zone`.
    pub fn shard_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shards.iter().map(|e| e.key().to_string()).collect();
        v.sort();
        v
    }

    /// The table, for `/status/routes`.
    pub fn routes(&self) -> Vec<ShardRoutes> {
        let mut v: Vec<ShardRoutes> = self
            .shards
            .iter()
            .map(|e| {
                let mut replicas: Vec<ReplicaRoute> = e
                    .value()
                    .iter()
                    .map(|m| ReplicaRoute {
                        replica: m.replica.to_string(),
                        xds_addr: m.addr.to_string(),
                    })
                    .collect();
                replicas.sort_by(|a, b| a.replica.cmp(&b.replica));
                ShardRoutes {
                    shard: e.key().to_string(),
                    replicas,
                }
            })
            .collect();
        v.sort_by(|a, b| a.shard.cmp(&b.shard));
        v
    }

    /// Picks the replica for a node: its shard is `(environment, zone)`; among the
    /// shard's live replicas, the one with the highest rendezvous weight for its id.
    pub fn route(&self, node: &NodeIdentity) -> Result<Route, Refusal> {
        if node.id.is_empty() {
            return Err(Refusal::Invalid(
                "node.id is empty: every xDS client must identify itself with a node id (the shard router hashes it to pick a replica)".into(),
            ));
        }
        if *self.applied.borrow() == 0 {
            return Err(Refusal::Unavailable(
                "the shard router has not listed membership from the store yet; retry".into(),
            ));
        }
        let known = || {
            let names = self.shard_names();
            if names.is_empty() {
                "no shard is known yet (no Environment with zones in the config, or no replica registered)".to_string()
            } else {
                format!("known shards (environment/zone): {}", names.join(", "))
            }
        };
        let (env, zone) = match (&node.environment, &node.zone) {
            (Some(e), Some(z)) => (e, z),
            (e, z) => {
                let mut missing = Vec::new();
                if e.is_none() {
                    missing.push(format!(
                        "node.metadata[\"{}\"] (the environment)",
                        tributary_controlplane::xds::server::ENV_METADATA_KEY
                    ));
                }
                if z.is_none() {
                    missing.push("node.locality.zone (the zone)".to_string());
                }
                return Err(Refusal::Invalid(format!(
                    "node {:?} does not name its shard: {} missing; {}",
                    node.id,
                    missing.join(" and "),
                    known()
                )));
            }
        };
        let shard = Shard {
            environment: env.clone(),
            zone: zone.clone(),
        };
        let Some(members) = self.shards.get(&shard) else {
            let env_known = self.shards.iter().any(|e| e.key().environment == *env);
            let what = if env_known {
                format!("environment {env:?} has no zone {zone:?}")
            } else {
                format!("unknown environment {env:?}")
            };
            return Err(Refusal::NotFound(format!(
                "node {:?}: no shard {shard}: {what}; {}",
                node.id,
                known()
            )));
        };
        let now = Instant::now();
        let reachable = members.iter().filter(|m| !self.is_avoided(m, now));
        let Some(m) = rendezvous::pick(&node.id, reachable, |m| &m.replica)
            .or_else(|| rendezvous::pick(&node.id, members.iter(), |m| &m.replica))
        else {
            return Err(Refusal::Unavailable(format!(
                "shard {shard} has no live replica right now (node {:?}); retry later",
                node.id
            )));
        };
        Ok(Route {
            shard: shard.clone(),
            replica: m.replica.clone(),
            addr: m.addr,
            gone: m.gone.subscribe(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_controlplane::membership::ShardAssignment;

    fn shard(e: &str, z: &str) -> Shard {
        Shard {
            environment: e.into(),
            zone: z.into(),
        }
    }

    fn info(id: &str, port: u16, shards: Vec<Shard>) -> (String, ReplicaInfo) {
        (
            format!("/tributary/replicas/{id}"),
            ReplicaInfo {
                id: id.into(),
                xds_addr: format!("127.0.0.1:{port}"),
                admin_addr: String::new(),
                shards,
                streams: 0,
                started_unix: 0.0,
            },
        )
    }

    fn assignment(shards: &[Shard]) -> Assignment {
        Assignment {
            shards: shards
                .iter()
                .map(|s| ShardAssignment {
                    shard: s.clone(),
                    replicas: vec![],
                })
                .collect(),
            ..Default::default()
        }
    }

    fn node(id: &str, env: Option<&str>, zone: Option<&str>) -> NodeIdentity {
        NodeIdentity {
            id: id.into(),
            environment: env.map(String::from),
            zone: zone.map(String::from),
        }
    }

    #[test]
    fn routes_to_a_replica_of_the_shard_and_refuses_with_what_is_known() {
        let t = Table::new();
        let (pa, pz) = (shard("prod", "az1"), shard("prod", "az2"));
        let s = shard("staging", "az1");
        let replicas: BTreeMap<_, _> = [
            info("a", 1, vec![pa.clone(), s.clone()]),
            info("b", 2, vec![pa.clone()]),
        ]
        .into();
        t.apply(&replicas, &assignment(&[pa.clone(), pz.clone(), s.clone()]));
        let r = t.route(&node("n", Some("staging"), Some("az1"))).unwrap();
        assert_eq!(&*r.replica, "a");
        for i in 0..50 {
            let r = t
                .route(&node(&format!("n{i}"), Some("prod"), Some("az1")))
                .unwrap();
            assert!(["a", "b"].contains(&&*r.replica));
        }
        assert_eq!(
            t.route(&node("n", Some("dev"), Some("az1"))).unwrap_err(),
            Refusal::NotFound("node \"n\": no shard dev/az1: unknown environment \"dev\"; known shards (environment/zone): prod/az1, prod/az2, staging/az1".into())
        );
        assert_eq!(
            t.route(&node("n", Some("prod"), Some("az9"))).unwrap_err(),
            Refusal::NotFound("node \"n\": no shard prod/az9: environment \"prod\" has no zone \"az9\"; known shards (environment/zone): prod/az1, prod/az2, staging/az1".into())
        );
        let e = t.route(&node("n", None, None)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.to_string().contains("node.metadata[\"tributary.io/env\"] (the environment) and node.locality.zone (the zone) missing"),
            "{e}"
        );
        let e = t.route(&node("n", Some("prod"), Some("az2"))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        assert!(
            e.to_string().contains("prod/az2 has no live replica"),
            "{e}"
        );
    }

    #[test]
    fn an_unreachable_replica_is_avoided_while_its_shard_has_another() {
        let t = Table::new();
        let p = shard("prod", "az1");
        let replicas: BTreeMap<_, _> =
            [info("a", 1, vec![p.clone()]), info("b", 2, vec![p.clone()])].into();
        t.apply(&replicas, &assignment(std::slice::from_ref(&p)));
        let n = node("n", Some("prod"), Some("az1"));
        let first = t.route(&n).unwrap();
        t.avoid(&first.replica, first.addr, Duration::from_secs(60));
        let second = t.route(&n).unwrap();
        assert_ne!(second.replica, first.replica);
        // Both avoided: try them anyway, in rendezvous order.
        t.avoid(&second.replica, second.addr, Duration::from_secs(60));
        assert_eq!(t.route(&n).unwrap().replica, first.replica);
        // Expired: back to the rendezvous choice.
        let t = Table::new();
        t.apply(&replicas, &assignment(std::slice::from_ref(&p)));
        t.avoid(&first.replica, first.addr, Duration::ZERO);
        assert_eq!(t.route(&n).unwrap().replica, first.replica);
    }

    #[test]
    fn a_replica_leaving_a_shard_fires_only_its_streams() {
        let t = Table::new();
        let p = shard("prod", "az1");
        let s = shard("staging", "az1");
        let both: BTreeMap<_, _> = [
            info("a", 1, vec![p.clone(), s.clone()]),
            info("b", 2, vec![p.clone()]),
        ]
        .into();
        t.apply(&both, &assignment(&[p.clone(), s.clone()]));
        let mut on = BTreeMap::new();
        for i in 0..40 {
            let r = t
                .route(&node(&format!("n{i}"), Some("prod"), Some("az1")))
                .unwrap();
            on.entry(r.replica.to_string())
                .or_insert_with(Vec::new)
                .push(r);
        }
        let on_s = t.route(&node("x", Some("staging"), Some("az1"))).unwrap();
        // a drops prod/az1 but keeps staging/az1; b comes back at another port.
        let next: BTreeMap<_, _> =
            [info("a", 1, vec![s.clone()]), info("b", 3, vec![p.clone()])].into();
        let mut left = t.apply(&next, &assignment(&[p.clone(), s.clone()]));
        left.sort();
        assert_eq!(left, vec![("a".into(), p.clone()), ("b".into(), p.clone())]);
        for r in on.values().flatten() {
            assert!(*r.gone.borrow(), "{} not ended", r.replica);
        }
        assert!(!*on_s.gone.borrow());
        let r = t.route(&node("n0", Some("prod"), Some("az1"))).unwrap();
        assert_eq!((&*r.replica, r.addr.port()), ("b", 3));
        // An unchanged view fires nothing.
        assert!(t.apply(&next, &assignment(&[p, s])).is_empty());
        assert!(!*r.gone.borrow());
    }
}
