//! A replica holds only the slices of the shards it serves.
//!
//! An agent in zone `z` feeds each replica the services of the environments `e` whose
//! shard `(e, z)` that replica serves (it follows the shard router's directory). A
//! batch that still names a service of a shard the assignment gives to other replicas
//! (an agent pointed at this hub with `--hub`, or one that has not yet seen the
//! assignment move) is not held: before the batch is converted, each such service
//! upsert becomes a deletion of that service, reported to the agent as an item error
//! naming the shard and its replicas, and the endpoint sets of a refused service
//! become deletions too (so the hub keeps no endpoint of another zone's shard). A
//! deletion is always applied. Everything else passes unchanged, and the item indexes
//! stay those of the agent's batch.

use std::collections::HashSet;

use tributary_proto::federation::v1 as pb;

use super::ItemError;

/// One session's record of the services it refused (their endpoint sets follow them).
#[derive(Debug, Default)]
pub struct SliceGuard {
    /// `(namespace, name)` of services whose last upsert on this session was refused.
    refused: HashSet<(String, String)>,
}

impl SliceGuard {
    /// Rewrites `batch` in place: the upserts `refusal` refuses (by the service's
    /// environment: `Some(why)`) become deletions. Returns one error per refused
    /// service, at its index in the batch.
    pub fn apply(
        &mut self,
        batch: &mut pb::ChangeBatch,
        refusal: impl Fn(&str) -> Option<String>,
    ) -> Vec<ItemError> {
        self.apply_by_namespace(batch, |env, _| refusal(env))
    }

    /// As [`Self::apply`], with `refusal` deciding by the service's environment and
    /// namespace (the registry of remote clusters grants both).
    pub fn apply_by_namespace(
        &mut self,
        batch: &mut pb::ChangeBatch,
        refusal: impl Fn(&str, &str) -> Option<String>,
    ) -> Vec<ItemError> {
        use pb::change::Kind;
        let mut errors = Vec::new();
        for (i, c) in batch.changes.iter_mut().enumerate() {
            match &c.kind {
                Some(Kind::ServiceUpsert(s)) => {
                    let key = (s.namespace.clone(), s.name.clone());
                    match refusal(&s.environment, &s.namespace) {
                        Some(why) => {
                            errors.push(ItemError {
                                index: i as u32,
                                message: format!(
                                    "service {}/{} of environment {:?}: {why}",
                                    s.namespace, s.name, s.environment
                                ),
                            });
                            c.kind = Some(Kind::ServiceDelete(pb::ServiceRef {
                                namespace: s.namespace.clone(),
                                name: s.name.clone(),
                            }));
                            self.refused.insert(key);
                        }
                        None => {
                            self.refused.remove(&key);
                        }
                    }
                }
                Some(Kind::ServiceDelete(r)) => {
                    self.refused.remove(&(r.namespace.clone(), r.name.clone()));
                }
                Some(Kind::EndpointsUpsert(e)) => {
                    let key = (e.namespace.clone(), e.service.clone());
                    if self.refused.contains(&key) {
                        c.kind = Some(Kind::EndpointsDelete(pb::ServiceRef {
                            namespace: key.0,
                            name: key.1,
                        }));
                    }
                }
                Some(Kind::EndpointsDelete(_)) | None => {}
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::change::Kind;

    fn upsert(name: &str, env: &str) -> pb::Change {
        pb::Change {
            origin_unix_nanos: 1,
            kind: Some(Kind::ServiceUpsert(pb::Service {
                namespace: "ns".into(),
                name: name.into(),
                hosts: vec![format!("{name}.ns")],
                environment: env.into(),
                ..Default::default()
            })),
        }
    }

    fn endpoints(name: &str) -> pb::Change {
        pb::Change {
            origin_unix_nanos: 1,
            kind: Some(Kind::EndpointsUpsert(pb::EndpointSet {
                namespace: "ns".into(),
                service: name.into(),
                endpoints: vec![pb::Endpoint {
                    addresses: vec!["10.0.0.1".into()],
                    ..Default::default()
                }],
            })),
        }
    }

    fn kinds(b: &pb::ChangeBatch) -> Vec<&'static str> {
        b.changes
            .iter()
            .map(|c| match c.kind {
                Some(Kind::ServiceUpsert(_)) => "service",
                Some(Kind::ServiceDelete(_)) => "delete service",
                Some(Kind::EndpointsUpsert(_)) => "endpoints",
                Some(Kind::EndpointsDelete(_)) => "delete endpoints",
                None => "none",
            })
            .collect()
    }

    /// Services of an unserved environment, and their endpoint sets (in this batch or
    /// a later one), become deletions; the served environment passes; an upsert that
    /// becomes served again passes again.
    #[test]
    fn unserved_environments_become_deletions_with_an_error_each() {
        let refusal = |env: &str| (env == "staging").then(|| "not here".to_string());
        let mut guard = SliceGuard::default();
        let mut b = pb::ChangeBatch {
            version: 1,
            full: true,
            changes: vec![
                upsert("a", "prod"),
                upsert("b", "staging"),
                endpoints("a"),
                endpoints("b"),
            ],
            more: false,
        };
        let errors = guard.apply(&mut b, refusal);
        assert_eq!(
            kinds(&b),
            ["service", "delete service", "endpoints", "delete endpoints"]
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].index, 1);
        assert!(
            errors[0]
                .message
                .contains("service ns/b of environment \"staging\": not here"),
            "{}",
            errors[0].message
        );
        // A later batch's endpoints of the refused service are not held either.
        let mut later = pb::ChangeBatch {
            version: 2,
            changes: vec![endpoints("b")],
            ..Default::default()
        };
        assert!(guard.apply(&mut later, refusal).is_empty());
        assert_eq!(kinds(&later), ["delete endpoints"]);
        // Once served (e.g. moved to prod), the service and its endpoints pass.
        let mut moved = pb::ChangeBatch {
            version: 3,
            changes: vec![upsert("b", "prod"), endpoints("b")],
            ..Default::default()
        };
        assert!(guard.apply(&mut moved, refusal).is_empty());
        assert_eq!(kinds(&moved), ["service", "endpoints"]);
    }
}
