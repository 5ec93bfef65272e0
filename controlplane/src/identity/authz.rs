//! Authorization: what a peer may do, decided from its certified identity.
//!
//! Pure functions of (identity, claim, grants), so that every row of the
//! authorization matrix is a plain function call to test; the listeners call them
//! once per stream or request.
//!
//! A peer without an identity (`None`) is one of a plaintext (`--insecure`) hub,
//! which asks for no certificates: its claims are taken as they come, as before
//! mutual TLS. A hub serving mutual TLS never sees `None`.

use std::collections::BTreeMap;

use tonic::Status;

use super::{Identity, SpiffeId};
use crate::model::{OperatorGrant, OperatorRole, RemoteClusterGrant, granted};
use crate::xds::server::{NodeInfo, Role};

/// The header in which a shard router forwards the SPIFFE id of the proxy whose
/// stream it relays. The hub believes it only from a peer certified as a router.
pub const PEER_ID_HEADER: &str = "x-tributary-peer-id";

/// Who a stream is for: the direct peer, or, when the direct peer is a router that
/// forwards [`PEER_ID_HEADER`], the proxy it vouches for. `forwarded` holds every
/// value of the header on the stream. The header of any other peer is ignored (a
/// workload cannot pose as another by setting it). A router adds exactly one value
/// after the client's own headers and passes those on untouched, so a stream from a
/// router with more than one value is a client that set the header itself: refused.
pub fn effective_peer(
    direct: Option<SpiffeId>,
    forwarded: &[&str],
    trust_domain: &str,
) -> Result<Option<SpiffeId>, Status> {
    let Some(SpiffeId {
        identity: Identity::Router { name },
        ..
    }) = &direct
    else {
        return Ok(direct);
    };
    let header = match forwarded {
        [] => return Ok(direct),
        [one] => *one,
        more => {
            return Err(Status::permission_denied(format!(
                "router {name} forwarded {} values of {PEER_ID_HEADER}; it adds exactly one, so its client set the header itself",
                more.len()
            )));
        }
    };
    let id = SpiffeId::parse(header).map_err(|e| {
        Status::permission_denied(format!(
            "router {name} forwarded {PEER_ID_HEADER} {header:?}, which is not a SPIFFE id: {e}"
        ))
    })?;
    if id.trust_domain != trust_domain {
        return Err(Status::permission_denied(format!(
            "router {name} forwarded {PEER_ID_HEADER} {id}, of trust domain {:?}; this mesh trusts {trust_domain:?}",
            id.trust_domain
        )));
    }
    Ok(Some(id))
}

fn kind(identity: &Identity) -> &'static str {
    match identity {
        Identity::Workload { .. } => "a workload",
        Identity::Gateway { .. } => "a gateway",
        Identity::Agent { .. } => "a remote cluster's agent",
        Identity::Hub { .. } => "a hub",
        Identity::Router { .. } => "a router",
        Identity::Operator { .. } => "an operator",
    }
}

/// The node a stream serves: its environment and role from the peer's certificate.
/// `claimed` is read from the node with no default environment (an empty
/// environment: none claimed); what it claims must match the certificate, what it
/// leaves out is inherited. Only workloads and gateways may subscribe.
pub fn authorize_node(
    peer: Option<&SpiffeId>,
    mut claimed: NodeInfo,
    default_env: &str,
) -> Result<NodeInfo, Status> {
    let Some(id) = peer else {
        if claimed.environment.is_empty() {
            claimed.environment = default_env.to_string();
        }
        return Ok(claimed);
    };
    let deny = |what: String| {
        Err(Status::permission_denied(format!(
            "node {:?}: {what}; its certificate is {id}",
            claimed.id
        )))
    };
    let (env, role) = match &id.identity {
        Identity::Workload {
            env,
            namespace,
            service_account,
        } => {
            if let Role::Gateway(g) = &claimed.role {
                return deny(format!(
                    "claims the gateway role {g:?} (metadata tributary.io/gateway) but is certified as a workload (sidecar)"
                ));
            }
            // The workload's SDS identity is the certified one.
            for (claim, certified, key) in [
                (&claimed.namespace, namespace, "tributary.io/namespace"),
                (
                    &claimed.service_account,
                    service_account,
                    "tributary.io/service-account",
                ),
            ] {
                if let Some(c) = claim
                    && c != certified
                {
                    return deny(format!(
                        "claims {c:?} (metadata {key}) but is certified as {certified:?}"
                    ));
                }
            }
            claimed.namespace = Some(namespace.clone());
            claimed.service_account = Some(service_account.clone());
            (env, Role::Sidecar)
        }
        Identity::Gateway { env, name } => {
            match &claimed.role {
                Role::Gateway(g) if g != name => {
                    return deny(format!(
                        "claims gateway {g:?} (metadata tributary.io/gateway) but is certified as gateway {name:?}"
                    ));
                }
                Role::Sidecar if claimed.scope.is_some() => {
                    return deny(format!(
                        "claims a sidecar scope {:?} (metadata tributary.io/sidecar) but is certified as gateway {name:?}",
                        claimed.scope.as_deref().unwrap_or_default()
                    ));
                }
                _ => {}
            }
            (env, Role::Gateway(name.clone()))
        }
        other => {
            return deny(format!(
                "{} may not subscribe to xDS; only workloads and gateways may",
                kind(other)
            ));
        }
    };
    if !claimed.environment.is_empty() && claimed.environment != *env {
        return deny(format!(
            "claims environment {:?} (metadata tributary.io/env) but is certified for environment {env:?}",
            claimed.environment
        ));
    }
    claimed.environment = env.clone();
    claimed.role = role;
    Ok(claimed)
}

/// An agent's session: the cluster id its Hello names must be the one its
/// certificate names, and a certified cluster must be in the registry.
pub fn authorize_agent(
    peer: Option<&SpiffeId>,
    claimed_cluster: &str,
    registry: &BTreeMap<String, RemoteClusterGrant>,
) -> Result<(), Status> {
    let Some(id) = peer else {
        return Ok(());
    };
    match &id.identity {
        Identity::Agent { cluster } if cluster == claimed_cluster => {
            if registry.contains_key(cluster) {
                Ok(())
            } else {
                Err(Status::permission_denied(format!(
                    "cluster {cluster:?} is not in the registry of remote clusters: add a RemoteCluster {cluster:?} naming the environments and namespaces it may export"
                )))
            }
        }
        Identity::Agent { cluster } => Err(Status::permission_denied(format!(
            "the agent's Hello names cluster {claimed_cluster:?} but its certificate {id} is of cluster {cluster:?}"
        ))),
        other => Err(Status::permission_denied(format!(
            "{id} is {}; only a remote cluster's agent may federate",
            kind(other)
        ))),
    }
}

/// Why `cluster` may not export a service of `namespace` into `environment`, if it
/// may not. A cluster without an entry is refused when its agent is certified, and
/// not checked on a plaintext hub (where cluster ids are only claims).
pub fn export_refusal(
    registry: &BTreeMap<String, RemoteClusterGrant>,
    cluster: &str,
    certified: bool,
    environment: &str,
    namespace: &str,
) -> Option<String> {
    let Some(grant) = registry.get(cluster) else {
        return certified.then(|| {
            format!("cluster {cluster:?} is not in the registry of remote clusters (RemoteCluster)")
        });
    };
    if !granted(&grant.environments, environment) {
        return Some(format!(
            "cluster {cluster:?} may export into environments {:?}, not {environment:?} (RemoteCluster {cluster})",
            grant.environments
        ));
    }
    if !granted(&grant.namespaces, namespace) {
        return Some(format!(
            "cluster {cluster:?} may export namespaces {:?}, not {namespace:?} (RemoteCluster {cluster})",
            grant.namespaces
        ));
    }
    None
}

/// What an admin request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAction {
    Read,
    Write,
}

/// Whether `peer` may do `action` on `environment` (`None`: a mesh-wide view or
/// object, which needs a grant of `*`). `Err` says why not, for a 403.
pub fn authorize_admin(
    peer: Option<&SpiffeId>,
    operators: &BTreeMap<String, OperatorGrant>,
    action: AdminAction,
    environment: Option<&str>,
) -> Result<(), String> {
    let Some(id) = peer else {
        return Err("this admin endpoint needs a client certificate (mutual TLS)".into());
    };
    let scope = environment.map_or_else(
        || "the whole mesh".to_string(),
        |e| format!("environment {e:?}"),
    );
    let verb = match action {
        AdminAction::Read => "read",
        AdminAction::Write => "write",
    };
    match &id.identity {
        // Replicas and routers read each other's status; they never write config.
        Identity::Hub { .. } | Identity::Router { .. } if action == AdminAction::Read => Ok(()),
        Identity::Operator { name } => {
            let Some(grant) = operators.get(name) else {
                return Err(format!(
                    "{id}: operator {name:?} has no Operator grant, so it may not {verb} {scope}"
                ));
            };
            if action == AdminAction::Write && grant.role == OperatorRole::Read {
                return Err(format!(
                    "{id}: operator {name:?} has the read role; writing {scope} needs the write role"
                ));
            }
            let ok = match environment {
                Some(e) => granted(&grant.environments, e),
                None => granted(&grant.environments, crate::model::ANY),
            };
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "{id}: operator {name:?} may {verb} environments {:?}, not {scope}",
                    grant.environments
                ))
            }
        }
        other => Err(format!(
            "{id} is {}, which may not {verb} {scope}",
            kind(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "tributary.local";

    fn id(identity: Identity) -> SpiffeId {
        SpiffeId::new(TD, identity)
    }

    fn workload(env: &str) -> SpiffeId {
        id(Identity::Workload {
            env: env.into(),
            namespace: "shop".into(),
            service_account: "web".into(),
        })
    }

    fn node(env: &str, role: Role) -> NodeInfo {
        NodeInfo {
            id: "n1".into(),
            cluster: String::new(),
            environment: env.into(),
            role,
            scope: None,
            namespace: None,
            service_account: None,
        }
    }

    #[test]
    fn a_workload_gets_its_certified_namespace_and_service_account() {
        let id = SpiffeId::parse("spiffe://tributary.local/env/prod/ns/shop/sa/web").unwrap();
        let n = authorize_node(Some(&id), node("", Role::Sidecar), "prod").unwrap();
        assert_eq!(n.namespace.as_deref(), Some("shop"));
        assert_eq!(n.service_account.as_deref(), Some("web"));
        let mut claims = node("prod", Role::Sidecar);
        claims.service_account = Some("admin".into());
        let err = authorize_node(Some(&id), claims, "prod").unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("\"admin\""), "{}", err.message());
    }

    #[test]
    fn a_node_inherits_what_it_does_not_claim() {
        let n =
            authorize_node(Some(&workload("prod")), node("", Role::Sidecar), "default").unwrap();
        assert_eq!(n.environment, "prod");
        assert_eq!(n.role, Role::Sidecar);
        let gw = id(Identity::Gateway {
            env: "staging".into(),
            name: "ingress".into(),
        });
        let n = authorize_node(Some(&gw), node("", Role::Sidecar), "default").unwrap();
        assert_eq!(
            (n.environment.as_str(), n.role),
            ("staging", Role::Gateway("ingress".into()))
        );
        // Plaintext: the claim, or the default.
        let n = authorize_node(None, node("", Role::Sidecar), "default").unwrap();
        assert_eq!(n.environment, "default");
    }

    #[test]
    fn a_claim_that_differs_from_the_certificate_is_denied_naming_both() {
        let e = authorize_node(Some(&workload("staging")), node("prod", Role::Sidecar), "d")
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("\"prod\"") && e.message().contains("\"staging\""),
            "{}",
            e.message()
        );
        let e = authorize_node(
            Some(&workload("prod")),
            node("prod", Role::Gateway("ingress".into())),
            "d",
        )
        .unwrap_err();
        assert!(e.message().contains("gateway role"), "{}", e.message());
        for who in [
            Identity::Agent {
                cluster: "a".into(),
            },
            Identity::Operator {
                name: "alice".into(),
            },
            Identity::Hub {
                replica: "h".into(),
            },
            Identity::Router { name: "r".into() },
        ] {
            let e = authorize_node(Some(&id(who)), node("", Role::Sidecar), "d").unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(e.message().contains("may not subscribe"), "{}", e.message());
        }
    }

    #[test]
    fn only_a_router_may_forward_a_peer_id() {
        let forwarded = workload("prod").to_string();
        let router = id(Identity::Router { name: "r".into() });
        let got = effective_peer(Some(router.clone()), &[&forwarded], TD).unwrap();
        assert_eq!(got, Some(workload("prod")));
        // A staging workload setting the header stays itself.
        let got = effective_peer(Some(workload("staging")), &[&forwarded], TD).unwrap();
        assert_eq!(got, Some(workload("staging")));
        // Plaintext: the header means nothing.
        assert_eq!(effective_peer(None, &[&forwarded], TD).unwrap(), None);
        // A client behind a router that set the header itself: the router's value
        // comes after the client's, and the stream is refused.
        let e = effective_peer(
            Some(router),
            &[&forwarded, &workload("staging").to_string()],
            TD,
        )
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("set the header itself"),
            "{}",
            e.message()
        );
    }
}
