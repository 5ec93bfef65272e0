//! Kubernetes service-account tokens, proven by a TokenReview against the API server
//! of the remote cluster the workload says it runs in.
//!
//! The hub knows each remote cluster's API server from `--token-review-clusters FILE`:
//!
//! ```yaml
//! clusters:
//!   - id: eu-west-1a                 # the remote cluster id (as its agent's --cluster-id)
//!     kubeconfig: /etc/tributary/eu-west-1a.kubeconfig
//!     default_env: prod              # optional: for namespaces without tributary.io/env
//!     audiences: [tributary]         # optional: the token must be bound to one of them
//! ```
//!
//! The kubeconfig's user needs `create` on `tokenreviews` (the `system:auth-delegator`
//! ClusterRole) and `get` on `namespaces`. The identity issued is derived only from the
//! review: `system:serviceaccount:{namespace}:{name}` and the namespace's
//! `tributary.io/env` label (else the cluster's `default_env`) give
//! `spiffe://{td}/env/{env}/ns/{namespace}/sa/{name}`. A token the cluster's API server
//! does not authenticate (another cluster's, expired, bound to a deleted pod, forged)
//! is refused with the API server's reason.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::PostParams;
use serde::Deserialize;

use super::{Identity, SpiffeId};
use crate::agent::kube::ENV_LABEL;

/// One remote cluster whose service-account tokens the CSR API accepts.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReviewCluster {
    pub id: String,
    pub kubeconfig: PathBuf,
    #[serde(default)]
    pub default_env: Option<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewFile {
    clusters: Vec<ReviewCluster>,
}

/// Reads `--token-review-clusters FILE`.
pub fn read_clusters(path: &std::path::Path) -> anyhow::Result<Vec<ReviewCluster>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--token-review-clusters {}: {e}", path.display()))?;
    let file: ReviewFile = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(&text))
        .map_err(|e| anyhow::anyhow!("--token-review-clusters {}: {e} (expected clusters: [{{id, kubeconfig, default_env?, audiences?}}])", path.display()))?;
    let mut seen = std::collections::BTreeSet::new();
    for (i, c) in file.clusters.iter().enumerate() {
        if !super::spiffe::valid_segment(&c.id) {
            anyhow::bail!(
                "--token-review-clusters {}: clusters[{i}].id {:?}: expected [A-Za-z0-9._-]",
                path.display(),
                c.id
            );
        }
        if !seen.insert(&c.id) {
            anyhow::bail!(
                "--token-review-clusters {}: clusters[{i}].id {:?} appears twice",
                path.display(),
                c.id
            );
        }
    }
    Ok(file.clusters)
}

/// Why a service-account token is refused. `Api` is retryable (the API server could
/// not be asked); the others are answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error(
        "remote cluster {cluster:?} is not one whose service-account tokens this hub reviews (known: {known})"
    )]
    UnknownCluster { cluster: String, known: String },
    #[error(
        "the API server of remote cluster {cluster} did not authenticate the service-account token: {reason}"
    )]
    Unauthenticated { cluster: String, reason: String },
    #[error(
        "the token of remote cluster {cluster} is {username:?}'s, not a service account's (system:serviceaccount:NAMESPACE:NAME)"
    )]
    NotServiceAccount { cluster: String, username: String },
    #[error(
        "namespace {namespace} of remote cluster {cluster} has no {ENV_LABEL} label and the cluster has no default_env: no environment to issue for"
    )]
    NoEnvironment { cluster: String, namespace: String },
    #[error("asking the API server of remote cluster {cluster}: {message}")]
    Api { cluster: String, message: String },
}

impl ReviewError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ReviewError::Api { .. })
    }
}

struct Reviewer {
    client: kube::Client,
    cfg: ReviewCluster,
}

/// The remote clusters whose service-account tokens the hub can review.
#[derive(Default)]
pub struct TokenReviewers {
    clusters: BTreeMap<String, Reviewer>,
}

impl std::fmt::Debug for TokenReviewers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.clusters.keys()).finish()
    }
}

/// What a review proved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reviewed {
    pub id: SpiffeId,
    /// The reviewed user, `system:serviceaccount:{ns}:{name}`.
    pub username: String,
}

impl TokenReviewers {
    /// Builds a client per cluster from its kubeconfig.
    pub async fn connect(clusters: Vec<ReviewCluster>) -> anyhow::Result<Self> {
        let mut out = BTreeMap::new();
        for c in clusters {
            let kc = kube::config::Kubeconfig::read_from(&c.kubeconfig).map_err(|e| {
                anyhow::anyhow!(
                    "remote cluster {}: kubeconfig {}: {e}",
                    c.id,
                    c.kubeconfig.display()
                )
            })?;
            let config = kube::Config::from_custom_kubeconfig(
                kc,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "remote cluster {}: kubeconfig {}: {e}",
                    c.id,
                    c.kubeconfig.display()
                )
            })?;
            let client = kube::Client::try_from(config)?;
            out.insert(c.id.clone(), Reviewer { client, cfg: c });
        }
        Ok(Self { clusters: out })
    }

    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }

    /// Reviews `token` with `cluster`'s API server and derives the workload identity.
    pub async fn review(
        &self,
        cluster: &str,
        token: &str,
        trust_domain: &str,
    ) -> Result<Reviewed, ReviewError> {
        let r = self
            .clusters
            .get(cluster)
            .ok_or_else(|| ReviewError::UnknownCluster {
                cluster: cluster.to_string(),
                known: if self.clusters.is_empty() {
                    "none: see --token-review-clusters".to_string()
                } else {
                    self.clusters.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            })?;
        let api = |e: kube::Error| ReviewError::Api {
            cluster: cluster.to_string(),
            message: e.to_string(),
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!r.cfg.audiences.is_empty()).then(|| r.cfg.audiences.clone()),
            },
            ..TokenReview::default()
        };
        let answer = Api::<TokenReview>::all(r.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(api)?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(ReviewError::Unauthenticated {
                cluster: cluster.to_string(),
                reason: status
                    .error
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "not authenticated".into()),
            });
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        let (namespace, name) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(|| ReviewError::NotServiceAccount {
                cluster: cluster.to_string(),
                username: username.clone(),
            })?;
        let ns = Api::<Namespace>::all(r.client.clone())
            .get(namespace)
            .await
            .map_err(api)?;
        let env = ns
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ENV_LABEL))
            .cloned()
            .or_else(|| r.cfg.default_env.clone())
            .ok_or_else(|| ReviewError::NoEnvironment {
                cluster: cluster.to_string(),
                namespace: namespace.to_string(),
            })?;
        let id = SpiffeId::new(
            trust_domain,
            Identity::Workload {
                env,
                namespace: namespace.to_string(),
                service_account: name.to_string(),
            },
        );
        // Kubernetes names fit the SPIFFE segment rules; an env label might not.
        SpiffeId::parse(&id.to_string()).map_err(|e| ReviewError::Unauthenticated {
            cluster: cluster.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Reviewed { id, username })
    }
}
