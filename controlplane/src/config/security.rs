//! The mesh-wide security kinds: `RemoteCluster` (the registry of remote clusters:
//! what each may export) and `Operator` (an operator's role and environments).
//!
//! Both are mesh-wide, like nothing else in the config: their metadata names no
//! environment and no namespace, and the store keeps them under the pseudo
//! environment [`MESH_SCOPE`], which no real environment can be named (it is not a
//! DNS name).

use serde::Deserialize;

use super::{ConfigError, Doc, check_dns_name};
use crate::identity::spiffe::valid_segment;
use crate::model::{ANY, Mesh, OperatorGrant, OperatorRole, RemoteClusterGrant};

/// The kinds that belong to the whole mesh rather than to one environment.
pub const MESH_KINDS: &[&str] = &["RemoteCluster", "Operator"];

/// Where mesh-wide objects live in the store's key space, and what the admin API's
/// paths name as their environment.
pub const MESH_SCOPE: &str = "_mesh";

/// Whether `kind` is mesh-wide.
pub fn is_mesh_kind(kind: &str) -> bool {
    MESH_KINDS.contains(&kind)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRemoteCluster {
    #[serde(default)]
    environments: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOperator {
    role: Option<String>,
    #[serde(default)]
    environments: Vec<String>,
}

/// A list of environment or namespace names, or `*`; must not be empty.
fn names<T>(
    doc: &Doc<T>,
    field: &str,
    list: &[String],
    errors: &mut Vec<ConfigError>,
) -> Vec<String> {
    if list.is_empty() {
        errors.push(doc.err(
            field,
            format!("must list at least one name, or {ANY:?} for all"),
        ));
    }
    let mut out = Vec::new();
    for (i, n) in list.iter().enumerate() {
        if n != ANY
            && let Err(m) = check_dns_name(n)
        {
            errors.push(doc.err(format!("{field}[{i}]"), m));
            continue;
        }
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    out
}

/// The cluster id is the object's name; it is also a SPIFFE path segment
/// (`spiffe://{td}/cluster/{id}`).
fn check_id<T>(doc: &Doc<T>, what: &str, errors: &mut Vec<ConfigError>) -> bool {
    if valid_segment(&doc.key.name) {
        return true;
    }
    errors.push(doc.err(
        "metadata.name",
        format!(
            "{:?} is not a valid {what}: expected [A-Za-z0-9._-] (it is a SPIFFE id segment)",
            doc.key.name
        ),
    ));
    false
}

pub(super) fn build_remote_cluster(
    doc: &Doc<RawRemoteCluster>,
    mesh: &mut Mesh,
    errors: &mut Vec<ConfigError>,
) {
    let before = errors.len();
    check_id(doc, "cluster id", errors);
    let environments = names(doc, "spec.environments", &doc.spec.environments, errors);
    let namespaces = names(doc, "spec.namespaces", &doc.spec.namespaces, errors);
    if errors.len() == before {
        mesh.security.remote_clusters.insert(
            doc.key.name.clone(),
            RemoteClusterGrant {
                environments,
                namespaces,
            },
        );
    }
}

pub(super) fn build_operator(
    doc: &Doc<RawOperator>,
    mesh: &mut Mesh,
    errors: &mut Vec<ConfigError>,
) {
    let before = errors.len();
    check_id(doc, "operator name", errors);
    let role = match doc.spec.role.as_deref() {
        Some("read") => Some(OperatorRole::Read),
        Some("write") => Some(OperatorRole::Write),
        Some(other) => {
            errors.push(doc.err(
                "spec.role",
                format!("{other:?} is not a role, expected \"read\" or \"write\""),
            ));
            None
        }
        None => {
            errors.push(doc.err("spec.role", "missing, expected \"read\" or \"write\""));
            None
        }
    };
    let environments = names(doc, "spec.environments", &doc.spec.environments, errors);
    if let (Some(role), true) = (role, errors.len() == before) {
        mesh.security
            .operators
            .insert(doc.key.name.clone(), OperatorGrant { role, environments });
    }
}
