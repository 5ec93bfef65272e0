//! SPIFFE ids and the identities they name.
//!
//! One trust domain per mesh. The path says what kind of peer holds the certificate:
//!
//! | identity | SPIFFE id |
//! |---|---|
//! | workload (sidecar, proxyless client) | `spiffe://{td}/env/{env}/ns/{namespace}/sa/{service-account}` |
//! | gateway | `spiffe://{td}/env/{env}/gateway/{name}` |
//! | remote agent | `spiffe://{td}/cluster/{cluster-id}` |
//! | hub replica | `spiffe://{td}/hub/{replica}` |
//! | shard router | `spiffe://{td}/router/{name}` |
//! | operator (CLI, API) | `spiffe://{td}/operator/{name}` |
//!
//! Segments are non-empty and hold only `[A-Za-z0-9._-]` (SPIFFE's path rules, and
//! what Kubernetes names and our environment names use), so an id round-trips through
//! [`SpiffeId::parse`] and `Display` unchanged.

use std::fmt;

const SCHEME: &str = "spiffe://";

/// What a certificate's SPIFFE id says its holder is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A sidecar or proxyless client: its environment, namespace and service account.
    Workload {
        env: String,
        namespace: String,
        service_account: String,
    },
    /// A gateway of an environment.
    Gateway { env: String, name: String },
    /// The agent of one remote cluster: it may write that cluster's endpoints only.
    Agent { cluster: String },
    /// A hub replica.
    Hub { replica: String },
    /// A shard router: it relays proxies' streams and vouches for their identities.
    Router { name: String },
    /// A person or tool using the CLI or the admin API; its role comes from config.
    Operator { name: String },
}

/// A SPIFFE id: a trust domain and the identity it names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub identity: Identity,
}

/// Why a string is not a SPIFFE id of this mesh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE id {0:?} does not start with \"spiffe://\"")]
    Scheme(String),
    #[error(
        "SPIFFE id {id:?} has an invalid trust domain {domain:?}: expected lowercase [a-z0-9.-_], non-empty"
    )]
    TrustDomain { id: String, domain: String },
    #[error(
        "SPIFFE id {id:?} has an invalid path segment {segment:?}: expected non-empty [A-Za-z0-9._-]"
    )]
    Segment { id: String, segment: String },
    #[error(
        "SPIFFE id {0:?} names no known identity: expected /env/{{env}}/ns/{{namespace}}/sa/{{service-account}}, \
         /env/{{env}}/gateway/{{name}}, /cluster/{{id}}, /hub/{{replica}}, /router/{{name}} or /operator/{{name}}"
    )]
    Shape(String),
}

fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// A path segment: non-empty, not `.` or `..`, and only `[A-Za-z0-9._-]`.
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl SpiffeId {
    pub fn new(trust_domain: impl Into<String>, identity: Identity) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            identity,
        }
    }

    /// Parses a URI SAN such as `spiffe://mesh.local/env/prod/ns/shop/sa/checkout`.
    pub fn parse(uri: &str) -> Result<Self, SpiffeIdError> {
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::Scheme(uri.to_string()))?;
        let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !valid_trust_domain(domain) {
            return Err(SpiffeIdError::TrustDomain {
                id: uri.to_string(),
                domain: domain.to_string(),
            });
        }
        let segments: Vec<&str> = path.split('/').collect();
        if let Some(bad) = segments.iter().find(|s| !valid_segment(s)) {
            return Err(SpiffeIdError::Segment {
                id: uri.to_string(),
                segment: (*bad).to_string(),
            });
        }
        let s = |x: &str| x.to_string();
        let identity = match segments.as_slice() {
            ["env", env, "ns", ns, "sa", sa] => Identity::Workload {
                env: s(env),
                namespace: s(ns),
                service_account: s(sa),
            },
            ["env", env, "gateway", name] => Identity::Gateway {
                env: s(env),
                name: s(name),
            },
            ["cluster", id] => Identity::Agent { cluster: s(id) },
            ["hub", r] => Identity::Hub { replica: s(r) },
            ["router", n] => Identity::Router { name: s(n) },
            ["operator", n] => Identity::Operator { name: s(n) },
            _ => return Err(SpiffeIdError::Shape(uri.to_string())),
        };
        Ok(Self {
            trust_domain: domain.to_string(),
            identity,
        })
    }
}

impl Identity {
    /// The environment a workload or gateway belongs to; `None` for the others.
    pub fn environment(&self) -> Option<&str> {
        match self {
            Identity::Workload { env, .. } | Identity::Gateway { env, .. } => Some(env),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/", self.trust_domain)?;
        match &self.identity {
            Identity::Workload {
                env,
                namespace,
                service_account,
            } => write!(f, "env/{env}/ns/{namespace}/sa/{service_account}"),
            Identity::Gateway { env, name } => write!(f, "env/{env}/gateway/{name}"),
            Identity::Agent { cluster } => write!(f, "cluster/{cluster}"),
            Identity::Hub { replica } => write!(f, "hub/{replica}"),
            Identity::Router { name } => write!(f, "router/{name}"),
            Identity::Operator { name } => write!(f, "operator/{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_identity_round_trips() {
        for uri in [
            "spiffe://mesh.local/env/prod/ns/shop/sa/checkout",
            "spiffe://mesh.local/env/staging/gateway/ingress",
            "spiffe://mesh.local/cluster/eu-west-1a",
            "spiffe://mesh.local/hub/hub-0",
            "spiffe://mesh.local/router/front",
            "spiffe://mesh.local/operator/alice",
        ] {
            let id = SpiffeId::parse(uri).unwrap();
            assert_eq!(id.to_string(), uri);
        }
        let id = SpiffeId::parse("spiffe://td/env/prod/ns/shop/sa/checkout").unwrap();
        assert_eq!(id.identity.environment(), Some("prod"));
    }

    #[test]
    fn malformed_ids_name_what_is_wrong() {
        let err = |u: &str| SpiffeId::parse(u).unwrap_err();
        assert!(matches!(
            err("https://td/cluster/a"),
            SpiffeIdError::Scheme(_)
        ));
        assert!(matches!(
            err("spiffe://TD/cluster/a"),
            SpiffeIdError::TrustDomain { .. }
        ));
        assert!(matches!(
            err("spiffe:///cluster/a"),
            SpiffeIdError::TrustDomain { .. }
        ));
        assert!(matches!(
            err("spiffe://td/cluster/"),
            SpiffeIdError::Segment { .. }
        ));
        assert!(matches!(
            err("spiffe://td/cluster/a/../b"),
            SpiffeIdError::Segment { .. }
        ));
        assert!(matches!(
            err("spiffe://td/env/prod/ns/x"),
            SpiffeIdError::Shape(_)
        ));
        assert!(matches!(
            err("spiffe://td/cluster/a%2fb"),
            SpiffeIdError::Segment { .. }
        ));
        let msg = err("spiffe://td/env/prod").to_string();
        assert!(
            msg.contains("/env/{env}/ns/{namespace}/sa/{service-account}"),
            "{msg}"
        );
    }
}
