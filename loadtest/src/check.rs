//! The content check: every resource each client holds at the end, against what the
//! model generates (the scenario's final state, through Tributary's generator) — for
//! both control planes. A client must hold exactly the names its role selects
//! (its scope's clusters, their load assignments, its role's listeners and the route
//! tables they name), each with the model's content: byte-identical, or, where the
//! bytes differ (the peer re-encodes in Go; the hub orders a load assignment's
//! endpoints as its clusters reported them), equal once both are decoded (load
//! assignments with their localities and endpoints in a canonical order).

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use prost::Message;
use serde::Serialize;
use tributary_controlplane::xds::XdsType;
use tributary_controlplane::xds::generate::EnvResources;
use tributary_proto::envoy::envoy::config::cluster::v3::Cluster;
use tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use tributary_proto::envoy::envoy::config::listener::v3::Listener;
use tributary_proto::envoy::envoy::config::route::v3::RouteConfiguration;

use crate::clients::{CDS, EDS, Holdings, LDS, RDS, Spec, eds_name, rds_names};

const SLOTS: [(usize, XdsType, &str); 4] = [
    (CDS, XdsType::Cluster, "CDS"),
    (EDS, XdsType::Endpoint, "EDS"),
    (LDS, XdsType::Listener, "LDS"),
    (RDS, XdsType::Route, "RDS"),
];

#[derive(Debug, Clone, Default, Serialize)]
pub struct ContentCheck {
    pub clients: usize,
    /// (client, resource) pairs compared.
    pub resources_checked: usize,
    /// Held with other content than the model's.
    pub wrong_content: usize,
    /// Expected and not held.
    pub missing: usize,
    /// Held and not expected (e.g. another scope's cluster).
    pub unexpected: usize,
    /// Held resources whose bytes differ from the model's but decode to the same message.
    pub equal_after_decoding: usize,
    /// Up to ten failures, for the log.
    pub examples: Vec<String>,
}

impl ContentCheck {
    pub fn failures(&self) -> usize {
        self.wrong_content + self.missing + self.unexpected
    }

    /// Adds another group of clients' check (e.g. another shard's, against its model).
    pub fn merge(&mut self, other: ContentCheck) {
        self.clients += other.clients;
        self.resources_checked += other.resources_checked;
        self.wrong_content += other.wrong_content;
        self.missing += other.missing;
        self.unexpected += other.unexpected;
        self.equal_after_decoding += other.equal_after_decoding;
        let room = 10usize.saturating_sub(self.examples.len());
        self.examples.extend(other.examples.into_iter().take(room));
    }
}

/// The names each type of client holds once converged, from the model.
pub struct Expected<'a> {
    model: &'a EnvResources,
    eds_of: HashMap<String, String>,
    rds_of: HashMap<String, Vec<String>>,
}

impl<'a> Expected<'a> {
    pub fn new(model: &'a EnvResources) -> Self {
        let eds_of = model.by_type[XdsType::Cluster as usize]
            .iter()
            .filter_map(|(n, r)| Some((n.to_string(), eds_name(&Cluster::decode(r.body()).ok()?)?)))
            .collect();
        let rds_of = model.by_type[XdsType::Listener as usize]
            .iter()
            .filter_map(|(n, r)| {
                Some((n.to_string(), rds_names(&Listener::decode(r.body()).ok()?)))
            })
            .collect();
        Expected {
            model,
            eds_of,
            rds_of,
        }
    }

    /// The clusters a client of `spec`'s role receives on its wildcard CDS.
    pub fn clusters(&self, spec: &Spec) -> BTreeSet<String> {
        match (&spec.scope, spec.gateway) {
            (Some(scope), false) => self
                .model
                .roles
                .scopes
                .get(scope)
                .map(|s| s.iter().map(|n| n.to_string()).collect())
                .unwrap_or_default(),
            _ => self.model.by_type[XdsType::Cluster as usize]
                .keys()
                .map(|n| n.to_string())
                .collect(),
        }
    }

    pub fn listeners(&self, spec: &Spec) -> BTreeSet<String> {
        let roles = &self.model.roles;
        let set = match (&spec.scope, spec.gateway) {
            (_, true) => roles
                .gateways
                .get(crate::scenario::GATEWAY)
                .cloned()
                .unwrap_or_default(),
            (Some(scope), false) => roles
                .scope_listeners
                .get(scope)
                .map(|s| s.as_ref().clone())
                .unwrap_or_default(),
            (None, false) => roles.sidecar.clone(),
        };
        set.iter().map(|n| n.to_string()).collect()
    }

    /// Every name a client of `spec`'s role holds, per type slot.
    pub fn names(&self, spec: &Spec) -> [BTreeSet<String>; 4] {
        let cds = self.clusters(spec);
        let eds = cds
            .iter()
            .filter_map(|c| self.eds_of.get(c).cloned())
            .collect();
        let lds = self.listeners(spec);
        let rds = lds
            .iter()
            .flat_map(|l| self.rds_of.get(l).cloned().unwrap_or_default())
            .collect();
        [cds, eds, lds, rds]
    }
}

/// A load assignment's meaning does not depend on the order of its localities, nor of
/// the endpoints within one (the hub orders them as its remote clusters reported them;
/// the model, as the scenario lists them): sort both before comparing.
fn normalized(mut cla: ClusterLoadAssignment) -> ClusterLoadAssignment {
    for l in &mut cla.endpoints {
        l.lb_endpoints.sort_by_cached_key(|e| e.encode_to_vec());
    }
    cla.endpoints.sort_by_cached_key(|l| l.encode_to_vec());
    cla
}

fn decoded_equal(ty: XdsType, a: &[u8], b: &[u8]) -> bool {
    fn eq<M: Message + Default + PartialEq>(a: &[u8], b: &[u8]) -> bool {
        match (M::decode(a), M::decode(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
    }
    match ty {
        XdsType::Cluster => eq::<Cluster>(a, b),
        XdsType::Endpoint => match (
            ClusterLoadAssignment::decode(a),
            ClusterLoadAssignment::decode(b),
        ) {
            (Ok(x), Ok(y)) => normalized(x) == normalized(y),
            _ => false,
        },
        XdsType::Listener => eq::<Listener>(a, b),
        XdsType::Route => eq::<RouteConfiguration>(a, b),
        XdsType::Secret => false,
    }
}

/// Checks every client's holdings against the model.
pub fn check(
    model: &EnvResources,
    specs: &[Spec],
    holdings: &[std::sync::Mutex<Holdings>],
) -> ContentCheck {
    let expected = Expected::new(model);
    let mut out = ContentCheck {
        clients: specs.len(),
        ..ContentCheck::default()
    };
    // A body many clients hold is one allocation: decode and compare it once.
    let mut verdicts: HashMap<(usize, String, *const u8, usize), (bool, bool)> = HashMap::new();
    let fail = |out: &mut ContentCheck, what: String| {
        if out.examples.len() < 10 {
            out.examples.push(what);
        }
    };
    for spec in specs {
        let want = expected.names(spec);
        let held = holdings[spec.index].lock().unwrap();
        for (slot, ty, label) in SLOTS {
            let have = &held.by_type[slot];
            for name in &want[slot] {
                let Some(h) = have.get(name) else {
                    out.missing += 1;
                    fail(&mut out, format!("{}: {label} {name}: missing", spec.id));
                    continue;
                };
                out.resources_checked += 1;
                let Some(m) = model.by_type[ty as usize].get(name.as_str()) else {
                    continue;
                };
                let key = (slot, name.clone(), h.body.as_ptr(), h.body.len());
                let (ok, decoded) = *verdicts.entry(key).or_insert_with(|| {
                    let model_body: Bytes = m.body();
                    if model_body == h.body {
                        (true, false)
                    } else {
                        (decoded_equal(ty, &model_body, &h.body), true)
                    }
                });
                if !ok {
                    out.wrong_content += 1;
                    fail(
                        &mut out,
                        format!(
                            "{}: {label} {name}: content differs from the model",
                            spec.id
                        ),
                    );
                } else if decoded {
                    out.equal_after_decoding += 1;
                }
            }
            for name in have.keys().filter(|n| !want[slot].contains(*n)) {
                out.unexpected += 1;
                fail(
                    &mut out,
                    format!("{}: {label} {name}: held, not expected", spec.id),
                );
            }
        }
    }
    out
}
