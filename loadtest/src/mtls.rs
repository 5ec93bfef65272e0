//! Mutual TLS for our control plane in the load test (`--mtls`, `--compare-mtls`).
//!
//! The harness makes a throwaway root in its work dir and, from it, the certificates
//! of everyone who talks to the hub, as a mesh would have them:
//! - the hub: `spiffe://{td}/hub/hub` (`--tls-cert/--tls-key/--tls-ca`);
//! - one agent per remote cluster: `cluster/cluster-{c}`, each granted by a
//!   `RemoteCluster` entry (prod, any namespace) that the hub's config gains;
//! - one identity per sidecar scope (a workload's service account: many proxies of one
//!   workload share it, as in Kubernetes): `env/prod/ns/loadtest/sa/app-{j}`;
//! - the gateway: `env/prod/gateway/edge`;
//! - the harness itself, for the hub's admin (`/status/...`, `/metrics`): an operator
//!   `loadtest` with the read role on `*`.
//!
//! Every simulated client makes a full handshake: client configs do not resume
//! sessions, since each stands for its own proxy process (a real Envoy starting cold
//! resumes nothing either).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tributary_controlplane::identity::testing::TestCa;
use tributary_controlplane::identity::tls::{
    self, ClientTls, DEFAULT_TRUST_DOMAIN, Reloading, TlsFiles,
};
use tributary_controlplane::identity::{Identity, SpiffeId};

use crate::clients::Spec;
use crate::scenario::{ENV, GATEWAY, Scenario, cluster_id, scope_name};

/// The namespace of the sidecars' workload identities.
pub const NAMESPACE: &str = "loadtest";
/// The operator the harness reads the hub's admin as.
pub const OPERATOR: &str = "loadtest";

/// The certificates of one run of our control plane with mutual TLS.
pub struct Pki {
    /// The hub's certificate, key and the trust bundle.
    pub hub: TlsFiles,
    /// The hub's SPIFFE id (what real Envoys check its certificate for).
    pub hub_id: String,
    /// The harness's admin client (the operator `loadtest`), HTTP/1.1.
    pub admin: ClientTls,
    /// Per remote cluster (index `c`): its agent's client, h2.
    agents: Vec<ClientTls>,
    /// Per sidecar scope (by name): its identity's files (real Envoys) and client.
    scopes: HashMap<String, (TlsFiles, ClientTls)>,
    gateway: (TlsFiles, ClientTls),
}

impl Pki {
    /// Makes the root and every certificate of `sc` under `dir` (emptied first).
    pub fn new(dir: &Path, sc: &Scenario) -> anyhow::Result<Arc<Pki>> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = TestCa::new(DEFAULT_TRUST_DOMAIN);
        let write = |name: &str, identity: Identity| ca.write(dir, name, identity);
        let hub_identity = Identity::Hub {
            replica: "hub".into(),
        };
        let hub_id = SpiffeId::new(DEFAULT_TRUST_DOMAIN, hub_identity.clone()).to_string();
        let hub = write("hub", hub_identity);
        let admin = client(
            &write(
                "operator",
                Identity::Operator {
                    name: OPERATOR.into(),
                },
            ),
            tls::ALPN_HTTP1,
        )?;
        let agents = (0..sc.size.clusters)
            .map(|c| {
                let files = write(
                    &cluster_id(c),
                    Identity::Agent {
                        cluster: cluster_id(c),
                    },
                );
                client(&files, tls::ALPN_GRPC)
            })
            .collect::<anyhow::Result<_>>()?;
        let scopes = (0..sc.size.scopes)
            .map(|j| {
                let files = write(&format!("sidecar-{}", scope_name(j)), workload(j));
                let c = client(&files, tls::ALPN_GRPC)?;
                Ok((scope_name(j), (files, c)))
            })
            .collect::<anyhow::Result<_>>()?;
        let files = write(
            "gateway",
            Identity::Gateway {
                env: ENV.into(),
                name: GATEWAY.into(),
            },
        );
        let gateway = (files.clone(), client(&files, tls::ALPN_GRPC)?);
        Ok(Arc::new(Pki {
            hub,
            hub_id,
            admin,
            agents,
            scopes,
            gateway,
        }))
    }

    /// The agent of remote cluster `c`.
    pub fn agent(&self, c: usize) -> ClientTls {
        self.agents[c].clone()
    }

    /// The client of a simulated proxy: its scope's workload identity, or the
    /// gateway's.
    pub fn client(&self, spec: &Spec) -> anyhow::Result<ClientTls> {
        match &spec.scope {
            _ if spec.gateway => Ok(self.gateway.1.clone()),
            Some(scope) => Ok(self.scope(scope)?.1.clone()),
            None => anyhow::bail!("client {} is neither a gateway nor in a scope", spec.id),
        }
    }

    /// The files of `scope`'s identity (a real Envoy sidecar of that scope).
    pub fn scope_files(&self, scope: &str) -> anyhow::Result<&TlsFiles> {
        Ok(&self.scope(scope)?.0)
    }

    fn scope(&self, scope: &str) -> anyhow::Result<&(TlsFiles, ClientTls)> {
        self.scopes
            .get(scope)
            .with_context(|| format!("no certificate was made for sidecar scope {scope:?}"))
    }

    /// The hub's flags in place of `--insecure`.
    pub fn hub_flags(&self) -> Vec<String> {
        [
            ("--tls-cert", &self.hub.cert),
            ("--tls-key", &self.hub.key),
            ("--tls-ca", &self.hub.ca),
        ]
        .into_iter()
        .flat_map(|(f, p)| [f.to_string(), p.to_string_lossy().into_owned()])
        .collect()
    }
}

/// The workload identity of scope `j`'s sidecars.
fn workload(j: usize) -> Identity {
    Identity::Workload {
        env: ENV.into(),
        namespace: NAMESPACE.into(),
        service_account: scope_name(j),
    }
}

/// A client config of `files` that never resumes a session (see the module doc).
fn client(files: &TlsFiles, alpn: &[&[u8]]) -> anyhow::Result<ClientTls> {
    let mut config = tls::client_config(files, DEFAULT_TRUST_DOMAIN, alpn)
        .with_context(|| format!("loading {}", files.cert.display()))?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(ClientTls {
        config: Arc::new(Reloading::fixed(config)),
    })
}

/// What the hub's config gains: a `RemoteCluster` per agent (prod, any namespace),
/// and the harness's read-only operator.
pub fn registry_yaml(sc: &Scenario) -> String {
    let mut docs: Vec<String> = (0..sc.size.clusters)
        .map(|c| {
            format!(
                "apiVersion: tributary.io/v1alpha1\nkind: RemoteCluster\nmetadata: {{name: {}}}\nspec: {{environments: [{ENV}], namespaces: [\"*\"]}}\n",
                cluster_id(c)
            )
        })
        .collect();
    docs.push(format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Operator\nmetadata: {{name: {OPERATOR}}}\nspec: {{role: read, environments: [\"*\"]}}\n"
    ));
    docs.join("---\n")
}

/// The TLS handshakes the hub's `listener` completed (`ok`) and failed (any other
/// result), from its `/metrics` text (`tributary_tls_handshakes_total`).
pub fn handshakes(metrics: &str, listener: &str) -> (u64, u64) {
    let (mut ok, mut failed) = (0, 0);
    let want = format!("listener=\"{listener}\"");
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("tributary_tls_handshakes_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        if !labels.split(',').any(|l| l == want) {
            continue;
        }
        let Ok(n) = value.trim().parse::<f64>() else {
            continue;
        };
        if labels.split(',').any(|l| l == "result=\"ok\"") {
            ok += n as u64;
        } else {
            failed += n as u64;
        }
    }
    (ok, failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{Size, namespace};
    use tributary_controlplane::identity::authz::{
        AdminAction, authorize_admin, authorize_agent, export_refusal,
    };

    /// The hub's config with the registry parses, lets every agent's certificate
    /// federate and export every service of the scenario, and lets the harness's
    /// operator read the mesh-wide admin views (and write nothing).
    #[test]
    fn the_hub_config_grants_every_agent_its_exports_and_the_harness_its_reads() {
        let sc = Scenario::new(Size::small());
        let yaml = format!("{}---\n{}", sc.hub_config_yaml(), registry_yaml(&sc));
        let mesh = tributary_controlplane::config::parse_files([("mesh.yaml", yaml.as_str())])
            .unwrap_or_else(|e| panic!("the hub's config does not parse: {e:?}"));
        let registry = &mesh.security.remote_clusters;
        assert_eq!(registry.len(), sc.size.clusters);
        for c in 0..sc.size.clusters {
            let id = SpiffeId::new(
                DEFAULT_TRUST_DOMAIN,
                Identity::Agent {
                    cluster: cluster_id(c),
                },
            );
            authorize_agent(Some(&id), &cluster_id(c), registry).unwrap();
            for i in 0..sc.size.services + sc.size.added_services {
                assert_eq!(
                    export_refusal(registry, &cluster_id(c), true, ENV, &namespace(i)),
                    None
                );
            }
        }
        let operator = SpiffeId::new(
            DEFAULT_TRUST_DOMAIN,
            Identity::Operator {
                name: OPERATOR.into(),
            },
        );
        let operators = &mesh.security.operators;
        for env in [None, Some(ENV)] {
            authorize_admin(Some(&operator), operators, AdminAction::Read, env).unwrap();
            authorize_admin(Some(&operator), operators, AdminAction::Write, env).unwrap_err();
        }
    }

    #[test]
    fn handshakes_are_read_per_listener_and_outcome() {
        let text = "# HELP tributary_tls_handshakes_total TLS handshakes\n\
            # TYPE tributary_tls_handshakes_total counter\n\
            tributary_tls_handshakes_total{listener=\"xds\",result=\"ok\"} 2032\n\
            tributary_tls_handshakes_total{listener=\"admin\",result=\"ok\"} 7\n\
            tributary_tls_handshakes_total{listener=\"xds\",result=\"timeout\"} 2\n\
            tributary_tls_handshakes_total{listener=\"xds\",result=\"unknown_ca\"} 1\n\
            tributary_xds_connections 2032\n";
        assert_eq!(handshakes(text, "xds"), (2032, 3));
        assert_eq!(handshakes(text, "admin"), (7, 0));
        assert_eq!(handshakes("", "xds"), (0, 0));
    }
}
