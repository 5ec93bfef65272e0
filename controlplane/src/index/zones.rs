//! Each zone's view of an environment, and the environment's part of the local
//! catalog: kept by the index next to the environment's resources.
//!
//! A zone view is the environment's snapshot with the zone's own load assignments
//! (`xds::locality`) in place of the environment's where they differ. It is published
//! on its own snapshot channel, `{environment}/{zone}` ([`view_name`]), so a proxy of
//! that zone is served it — generated once per zone, never per proxy. Every other
//! resource is the environment's (an O(1) clone of persistent maps), so a view
//! costs only the load assignments that differ and the names that changed.
//!
//! Views exist for the zones of an environment whose locality is on
//! ([`Environment::zone_views`]); once created, a view follows the environment (with
//! no load assignments of its own when locality is turned off again), so its clients
//! keep a consistent stream.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use tributary_proto::wire::EncodedResource;

use crate::catalog::{Summary, local_summaries};
use crate::model::{Environment, ObjectKey, Service};
use crate::xds::XdsType;
use crate::xds::generate::{EnvResources, Generated};
use crate::xds::locality::zone_load_assignments;
use crate::xds::snapshot::{Changes, Snapshots};

/// The snapshot channel of `zone`'s view of `environment`.
pub fn view_name(environment: &str, zone: &str) -> String {
    format!("{environment}/{zone}")
}

/// One environment's zone views and local summaries.
#[derive(Debug, Default)]
pub(super) struct ZoneViews {
    /// Zone → its view's resources.
    views: BTreeMap<String, EnvResources>,
    /// Zone → its own load assignments by name (only those that differ).
    overrides: BTreeMap<String, HashMap<Arc<str>, EncodedResource>>,
    /// Service → the names of its load assignments overridden in some zone.
    owned: HashMap<ObjectKey, Vec<Arc<str>>>,
    /// Load assignment names settled since the last publish.
    touched: HashSet<Arc<str>>,
    /// Zone → service → the summary this hub computes of the zone's endpoints.
    pub(super) local: BTreeMap<String, imbl::OrdMap<ObjectKey, Summary>>,
    /// `local` changed since the index last published the local catalog.
    pub(super) local_changed: bool,
}

impl ZoneViews {
    /// Settles `key`'s zone load assignments and local summaries from its merged
    /// form (with its endpoints), `None` when the service is gone. `cfg` is the
    /// environment's config (zones, gateways, local share); `remote` the summaries
    /// other zones published of the service. Costs O(the service's endpoints × zones).
    pub(super) fn settle(
        &mut self,
        cfg: Option<&Environment>,
        key: &ObjectKey,
        service: Option<&Service>,
        remote: Option<&BTreeMap<String, Summary>>,
    ) {
        for name in self.owned.remove(key).unwrap_or_default() {
            for o in self.overrides.values_mut() {
                o.remove(&name);
            }
            self.touched.insert(name);
        }
        let active = cfg.filter(|c| c.zone_views());
        let mut names: Vec<Arc<str>> = Vec::new();
        if let (Some(cfg), Some(s)) = (active, service) {
            for zone in &cfg.zones {
                let mut out = Generated::new();
                zone_load_assignments(cfg, zone, s, remote, &mut out);
                for (_, r) in out {
                    let name = r.name_arc().clone();
                    self.touched.insert(name.clone());
                    if !names.contains(&name) {
                        names.push(name.clone());
                    }
                    self.overrides
                        .entry(zone.clone())
                        .or_default()
                        .insert(name, r);
                }
            }
        }
        if !names.is_empty() {
            self.owned.insert(key.clone(), names);
        }
        let mut sums = match (active, service) {
            (Some(cfg), Some(s)) => local_summaries(cfg, s),
            _ => BTreeMap::new(),
        };
        let zones: BTreeSet<String> = self.local.keys().chain(sums.keys()).cloned().collect();
        for zone in zones {
            let map = self.local.entry(zone.clone()).or_default();
            match sums.remove(&zone) {
                Some(s) => {
                    if map.get(key) != Some(&s) {
                        map.insert(key.clone(), s);
                        self.local_changed = true;
                    }
                }
                None => {
                    if map.remove(key).is_some() {
                        self.local_changed = true;
                    }
                }
            }
            if map.is_empty() {
                self.local.remove(&zone);
            }
        }
    }

    /// Brings every zone view up to date with the environment's new resources
    /// (`base`, which changed in `changes`) and the load assignments settled since
    /// the last call, and publishes each view that changed. Creates the views of an
    /// environment whose locality is on.
    pub(super) fn publish(
        &mut self,
        environment: &str,
        cfg: Option<&Environment>,
        base: &EnvResources,
        changes: &Changes,
        origin: Option<SystemTime>,
        snapshots: &Snapshots,
    ) {
        let mut fresh: BTreeSet<String> = BTreeSet::new();
        if let Some(cfg) = cfg.filter(|c| c.zone_views()) {
            for zone in &cfg.zones {
                if !self.views.contains_key(zone) {
                    self.views.insert(zone.clone(), EnvResources::default());
                    fresh.insert(zone.clone());
                }
            }
        }
        let origin_at = origin.unwrap_or_else(SystemTime::now);
        let eds = XdsType::Endpoint as usize;
        for (zone, view) in &mut self.views {
            let full = fresh.contains(zone);
            let mut zc: Changes = Default::default();
            for ty in XdsType::ALL {
                let i = ty as usize;
                if i == eds {
                    continue;
                }
                view.by_type[i] = base.by_type[i].clone();
                view.origins[i] = base.origins[i].clone();
                zc[i] = if full {
                    base.by_type[i].keys().cloned().collect()
                } else {
                    changes[i].clone()
                };
            }
            view.roles = base.roles.clone();
            let own = self.overrides.get(zone);
            let names: Vec<Arc<str>> = if full {
                base.by_type[eds]
                    .keys()
                    .chain(own.into_iter().flat_map(|o| o.keys()))
                    .cloned()
                    .collect()
            } else {
                changes[eds].iter().chain(&self.touched).cloned().collect()
            };
            for name in names {
                let want = own
                    .and_then(|o| o.get(&name))
                    .or_else(|| base.by_type[eds].get(&name));
                let have = view.by_type[eds].get(&name);
                if want.map(EncodedResource::version) == have.map(EncodedResource::version) {
                    continue;
                }
                match want {
                    Some(r) => {
                        view.by_type[eds].insert(name.clone(), r.clone());
                        view.origins[eds].insert(name.clone(), origin_at);
                    }
                    None => {
                        view.by_type[eds].remove(&name);
                        view.origins[eds].remove(&name);
                    }
                }
                zc[eds].insert(name);
            }
            snapshots.publish_changes(&view_name(environment, zone), view.clone(), zc, origin);
        }
        self.touched.clear();
    }
}
