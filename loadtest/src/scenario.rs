//! The simulated estate: services spread over clusters, sidecars with dependency
//! lists, gateways, and the endpoint changes injected each round. Deterministic for a
//! given seed, so ours and the peer see exactly the same estate and changes.
//!
//! By default the whole estate is one environment (`prod`) that one hub serves. A
//! sharded estate ([`Scenario::sharded`]) spreads the same sizes over several
//! environments and zones: service `i` and scope `j` belong to environment
//! `i % environments` and `j % environments` (a scope depends only on services of its
//! environment), remote cluster `c` is in zone `c % zones`, and each client is placed
//! in one `(environment, zone)` shard. A shard's replicas hold its environment's
//! services with the endpoints of its zone's clusters only ([`Scenario::shard_model`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::SystemTime;

use tributary_controlplane::agent::ClusterState;
use tributary_controlplane::model::{
    Dependency, Endpoint, Environment, Gateway, GatewayListener, Health, Locality, ObjectKey,
    Protocol, Service, ServicePort, SidecarScope,
};
use tributary_proto::federation::v1 as pb;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Size {
    pub clusters: usize,
    pub services: usize,
    pub ports: usize,
    pub endpoints_per_service: usize,
    pub sidecars: usize,
    /// Sidecar scopes (applications): sidecar `k` belongs to scope `k % scopes`.
    pub scopes: usize,
    pub deps_per_sidecar: usize,
    pub gateways: usize,
    pub changes_per_round: usize,
    pub rounds: usize,
    pub added_services: usize,
}

impl Size {
    /// The reference deployment: 100 clusters, 2,000 services x 5 ports, ~20,000
    /// endpoints, 2,000 sidecars in 400 scopes (5 replicas each) x 50 dependencies,
    /// 32 gateways, 100 changes a round.
    pub fn ebay() -> Self {
        Size {
            clusters: 100,
            services: 2_000,
            ports: 5,
            endpoints_per_service: 10,
            sidecars: 2_000,
            scopes: 400,
            deps_per_sidecar: 50,
            gateways: 32,
            changes_per_round: 100,
            rounds: 20,
            added_services: 50,
        }
    }

    /// The CI correctness run.
    pub fn small() -> Self {
        Size {
            clusters: 10,
            services: 200,
            ports: 2,
            endpoints_per_service: 4,
            sidecars: 190,
            scopes: 38,
            deps_per_sidecar: 10,
            gateways: 10,
            changes_per_round: 20,
            rounds: 3,
            added_services: 5,
        }
    }
}

pub const ENV: &str = "prod";
pub const GATEWAY: &str = "edge";
/// The environments of a sharded estate, in order (environment `e` is `ENVS[e]`).
pub const ENVS: [&str; 6] = [ENV, "staging", "preprod", "feature", "loadtest", "pci"];

/// One endpoint: which cluster serves it and where.
#[derive(Debug, Clone)]
pub struct Ep {
    pub cluster: usize,
    pub address: Ipv4Addr,
}

/// How the estate is sharded: one environment and no zones in the node (the default,
/// served by one hub), or environments x zones.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Layout {
    pub environments: usize,
    pub zones: usize,
    /// Clients name their zone (`node.locality.zone`), so that a router can route them.
    pub sharded: bool,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            environments: 1,
            zones: 3,
            sharded: false,
        }
    }
}

/// `(environment index, zone index)`.
pub type ShardIx = (usize, usize);

#[derive(Debug, Clone)]
pub struct Scenario {
    pub size: Size,
    pub layout: Layout,
    /// Endpoints per service index (services beyond `size.services` are the ones the
    /// config-change phase adds).
    pub endpoints: Vec<Vec<Ep>>,
    /// Active services (grows in the config-change phase).
    pub active: usize,
}

pub fn service_name(i: usize) -> String {
    format!("svc-{i}")
}

pub fn namespace(i: usize) -> String {
    format!("ns-{}", i % 20)
}

pub fn host(i: usize) -> String {
    format!("{}.{}.svc.cluster.local", service_name(i), namespace(i))
}

pub fn port(p: usize) -> u16 {
    8080 + p as u16
}

/// The xDS cluster (and load assignment) name of service `i`, port index `p`.
pub fn resource_name(i: usize, p: usize) -> String {
    format!("outbound|{}||{}", port(p), host(i))
}

pub fn scope_name(j: usize) -> String {
    format!("app-{j}")
}

pub fn cluster_id(c: usize) -> String {
    format!("cluster-{c}")
}

pub fn zone_name(z: usize) -> String {
    format!("az{z}")
}

pub const REGION: &str = "region-1";

impl Scenario {
    pub fn new(size: Size) -> Self {
        Self::with_layout(size, Layout::default())
    }

    /// The same sizes spread over `environments` x `zones` shards. Every service must
    /// have endpoints in every zone (so that each shard of its environment serves it):
    /// an error names the first that does not.
    pub fn sharded(size: Size, environments: usize, zones: usize) -> anyhow::Result<Self> {
        if environments == 0 || environments > ENVS.len() {
            anyhow::bail!(
                "--environments {environments}: expected 1 to {}",
                ENVS.len()
            );
        }
        if zones == 0 || zones > size.clusters {
            anyhow::bail!(
                "--zones {zones}: expected 1 to the number of clusters ({})",
                size.clusters
            );
        }
        let sc = Self::with_layout(
            size,
            Layout {
                environments,
                zones,
                sharded: true,
            },
        );
        for (i, eps) in sc.endpoints.iter().enumerate() {
            for z in 0..zones {
                if !eps.iter().any(|e| sc.zone_of(e.cluster) == z) {
                    anyhow::bail!(
                        "service {i} has no endpoint in zone {} (its {} endpoints are in clusters {:?}): raise --endpoints-per-service or --clusters so that every service has endpoints in every zone",
                        zone_name(z),
                        eps.len(),
                        eps.iter().map(|e| e.cluster).collect::<Vec<_>>()
                    );
                }
            }
        }
        Ok(sc)
    }

    fn with_layout(size: Size, layout: Layout) -> Self {
        let total = size.services + size.added_services;
        let endpoints = (0..total)
            .map(|i| {
                (0..size.endpoints_per_service)
                    .map(|j| Ep {
                        cluster: (i * 7 + j) % size.clusters,
                        address: Ipv4Addr::from(
                            0x0a00_0000u32 + (i * size.endpoints_per_service + j + 1) as u32,
                        ),
                    })
                    .collect()
            })
            .collect();
        Scenario {
            active: size.services,
            size,
            layout,
            endpoints,
        }
    }

    /// The zone (index) of remote cluster `c`.
    pub fn zone_of(&self, c: usize) -> usize {
        c % self.layout.zones
    }

    pub fn zone(&self, c: usize) -> String {
        zone_name(self.zone_of(c))
    }

    /// The environment (index) of service `i`.
    pub fn env_of_service(&self, i: usize) -> usize {
        i % self.layout.environments
    }

    /// The environment (index) of scope `j`.
    pub fn env_of_scope(&self, j: usize) -> usize {
        j % self.layout.environments
    }

    /// Every shard, environment-major.
    pub fn shards(&self) -> Vec<ShardIx> {
        (0..self.layout.environments)
            .flat_map(|e| (0..self.layout.zones).map(move |z| (e, z)))
            .collect()
    }

    /// The shard of sidecar `k`: its scope's environment, and zones in turn among the
    /// sidecars of that environment (a scope's sidecars land in different zones).
    pub fn sidecar_shard(&self, k: usize) -> ShardIx {
        let n = self.layout.environments;
        (
            self.env_of_scope(self.scope_of(k)),
            (k / n) % self.layout.zones,
        )
    }

    /// The shard of gateway `g`.
    pub fn gateway_shard(&self, g: usize) -> ShardIx {
        let n = self.layout.environments;
        (g % n, (g / n) % self.layout.zones)
    }

    /// The scope of sidecar `k`.
    pub fn scope_of(&self, k: usize) -> usize {
        k % self.size.scopes.max(1)
    }

    /// Service indexes scope `j` depends on (its sidecars' dependencies): services of
    /// its own environment (with one environment, any service).
    pub fn deps(&self, j: usize) -> Vec<usize> {
        let n = self.layout.environments;
        let e = self.env_of_scope(j);
        // Services of environment e: e, e + n, e + 2n, ... below `services`.
        let s = self.size.services.saturating_sub(e).div_ceil(n);
        let mut set = BTreeSet::new();
        let mut m = 0;
        while set.len() < self.size.deps_per_sidecar.min(s) {
            set.insert((j * 37 + m * 41) % s * n + e);
            m += 1;
        }
        set.into_iter().collect()
    }

    /// The added service (config change) scope `j` already declares as a dependency,
    /// as an application declares a service it is about to call before it is
    /// deployed: every scope names one, so the config change reaches every sidecar.
    pub fn added_dep(&self, j: usize) -> Option<usize> {
        let n = self.layout.environments;
        let e = self.env_of_scope(j);
        let (services, added) = (self.size.services, self.size.added_services);
        // The added services of environment e: services + first, + first + n, ...
        let first = (e + n - services % n) % n;
        let count = added.saturating_sub(first).div_ceil(n);
        (count > 0).then(|| services + first + (j / n % count) * n)
    }

    /// The last added service of environment `e` (what its gateways' route table must
    /// name after the config change).
    pub fn last_added(&self, e: usize) -> Option<usize> {
        (self.size.services..self.size.services + self.size.added_services)
            .rev()
            .find(|&i| self.env_of_service(i) == e)
    }

    /// Every host scope `j` declares: its dependencies and its added service.
    pub fn declared_deps(&self, j: usize) -> Vec<usize> {
        let mut deps = self.deps(j);
        deps.extend(self.added_dep(j));
        deps
    }

    /// Sidecar scope `j` as the model (and the hub's config) has it.
    pub fn scope(&self, j: usize) -> SidecarScope {
        SidecarScope {
            name: scope_name(j),
            dependencies: self
                .declared_deps(j)
                .into_iter()
                .map(|i| Dependency::Host(host(i)))
                .collect(),
            inbound: Vec::new(),
        }
    }

    fn pb_service(&self, i: usize) -> pb::Service {
        pb::Service {
            namespace: namespace(i),
            name: service_name(i),
            hosts: vec![host(i)],
            ports: (0..self.size.ports)
                .map(|p| pb::ServicePort {
                    name: format!("p{p}"),
                    port: u32::from(port(p)),
                    protocol: "HTTP".into(),
                })
                .collect(),
            environment: ENVS[self.env_of_service(i)].into(),
        }
    }

    /// What cluster `c` exports now.
    pub fn cluster_state(&self, c: usize) -> ClusterState {
        self.cluster_slice(c, |_| true)
    }

    /// What cluster `c` exports now of the environments `env` selects: the slice an
    /// agent streams to the replicas of those environments' shards in its zone.
    pub fn cluster_slice(&self, c: usize, env: impl Fn(usize) -> bool) -> ClusterState {
        let mut state = ClusterState::default();
        let now = SystemTime::now();
        for i in (0..self.active).filter(|&i| env(self.env_of_service(i))) {
            let eps: Vec<pb::Endpoint> = self.endpoints[i]
                .iter()
                .filter(|e| e.cluster == c)
                .map(|e| pb::Endpoint {
                    addresses: vec![e.address.to_string()],
                    ports: (0..self.size.ports)
                        .map(|p| (format!("p{p}"), 9080))
                        .collect(),
                    zone: self.zone(c),
                    node: String::new(),
                    ready: true,
                    serving: true,
                    terminating: false,
                    labels: Default::default(),
                    name: String::new(),
                })
                .collect();
            if eps.is_empty() {
                continue;
            }
            let key = ObjectKey {
                namespace: namespace(i),
                name: service_name(i),
            };
            state.set_service(key.clone(), Some(self.pb_service(i)), now);
            state.set_endpoints(
                key,
                Some(pb::EndpointSet {
                    namespace: namespace(i),
                    service: service_name(i),
                    endpoints: eps,
                }),
                now,
            );
        }
        state
    }

    /// The same estate as a model environment (what the hub builds from the agents),
    /// used to generate the peer's resources with the same generator.
    pub fn model_service(&self, i: usize) -> Service {
        self.model_service_in(i, None)
    }

    /// Service `i` with the endpoints of zone `zone` only (`None`: every zone).
    fn model_service_in(&self, i: usize, zone: Option<usize>) -> Service {
        Service {
            key: ObjectKey {
                namespace: namespace(i),
                name: service_name(i),
            },
            hosts: vec![host(i)],
            ports: (0..self.size.ports)
                .map(|p| ServicePort {
                    name: format!("p{p}"),
                    port: port(p),
                    protocol: Protocol::Http,
                })
                .collect(),
            subsets: vec![],
            endpoints: self.endpoints[i]
                .iter()
                .filter(|e| zone.is_none_or(|z| self.zone_of(e.cluster) == z))
                .map(|e| Endpoint {
                    address: e.address.into(),
                    port: None,
                    ports: (0..self.size.ports)
                        .map(|p| (format!("p{p}"), 9080))
                        .collect(),
                    locality: Locality {
                        region: REGION.into(),
                        zone: self.zone(e.cluster),
                        cluster: cluster_id(e.cluster),
                    },
                    labels: BTreeMap::new(),
                    weight: 1,
                    health: Health::Healthy,
                })
                .collect(),
        }
    }

    pub fn model(&self) -> Environment {
        let mut env = Environment::default();
        for i in 0..self.active {
            let s = self.model_service(i);
            env.services.insert(s.key.clone(), s);
        }
        env.gateways.insert(GATEWAY.into(), gateway());
        for j in 0..self.size.scopes {
            let scope = self.scope(j);
            env.sidecars.insert(scope.name.clone(), scope);
        }
        env
    }

    /// What the replicas of shard `(e, z)` hold: environment `e`'s services with the
    /// endpoints of zone `z`'s clusters, its gateway and its scopes.
    pub fn shard_model(&self, (e, z): ShardIx) -> Environment {
        let mut env = Environment::default();
        for i in (0..self.active).filter(|&i| self.env_of_service(i) == e) {
            let s = self.model_service_in(i, Some(z));
            env.services.insert(s.key.clone(), s);
        }
        env.gateways.insert(GATEWAY.into(), gateway());
        for j in (0..self.size.scopes).filter(|&j| self.env_of_scope(j) == e) {
            let scope = self.scope(j);
            env.sidecars.insert(scope.name.clone(), scope);
        }
        env
    }

    /// Changes `changes_per_round` endpoints of distinct services for `round`: returns
    /// the changed services with the old and the new address of the changed endpoint.
    pub fn change_round(&mut self, round: usize) -> Vec<(usize, Ipv4Addr, Ipv4Addr)> {
        let s = self.size.services;
        let mut picked = BTreeSet::new();
        let mut m = 0usize;
        while picked.len() < self.size.changes_per_round.min(s) {
            picked.insert((round * 7919 + m * 104_729) % s);
            m += 1;
        }
        picked
            .into_iter()
            .enumerate()
            .map(|(n, i)| {
                let j = (round + n) % self.endpoints[i].len();
                let addr = Ipv4Addr::new(
                    11,
                    (round % 250) as u8,
                    (n / 250) as u8,
                    (n % 250 + 1) as u8,
                );
                let old = std::mem::replace(&mut self.endpoints[i][j].address, addr);
                (i, old, addr)
            })
            .collect()
    }
}

pub fn gateway() -> Gateway {
    Gateway {
        name: GATEWAY.into(),
        listeners: vec![GatewayListener {
            name: "http".into(),
            address: Ipv4Addr::LOCALHOST.into(),
            port: 1,
            hosts: None,
            tls: None,
        }],
    }
}

impl Scenario {
    /// The hub's file config: the gateway and the sidecar scopes (services come from
    /// the agents).
    pub fn hub_config_yaml(&self) -> String {
        let mut out = format!(
            "apiVersion: tributary.io/v1alpha1\nkind: Gateway\nmetadata: {{name: {GATEWAY}, environment: {ENV}}}\nspec:\n  listeners: [{{name: http, address: 127.0.0.1, port: 1, protocol: HTTP}}]\n"
        );
        for j in 0..self.size.scopes {
            out += &format!(
                "---\napiVersion: tributary.io/v1alpha1\nkind: Sidecar\nmetadata: {{name: {}, environment: {ENV}}}\nspec:\n  dependencies:\n",
                scope_name(j)
            );
            for i in self.declared_deps(j) {
                out += &format!("  - {{host: {}}}\n", host(i));
            }
        }
        out
    }

    /// The hubs' file config of a sharded estate: each environment with its zones (its
    /// shards), its gateway, and its scopes.
    pub fn sharded_config_yaml(&self) -> String {
        let zones: Vec<String> = (0..self.layout.zones).map(zone_name).collect();
        let mut docs = Vec::new();
        for (e, env) in ENVS.iter().enumerate().take(self.layout.environments) {
            docs.push(format!(
                "apiVersion: tributary.io/v1alpha1\nkind: Environment\nmetadata: {{name: {env}}}\nspec: {{zones: [{}]}}\n",
                zones.join(", ")
            ));
            docs.push(format!(
                "apiVersion: tributary.io/v1alpha1\nkind: Gateway\nmetadata: {{name: {GATEWAY}, environment: {env}}}\nspec:\n  listeners: [{{name: http, address: 127.0.0.1, port: 1, protocol: HTTP}}]\n"
            ));
            for j in (0..self.size.scopes).filter(|&j| self.env_of_scope(j) == e) {
                let mut d = format!(
                    "apiVersion: tributary.io/v1alpha1\nkind: Sidecar\nmetadata: {{name: {}, environment: {env}}}\nspec:\n  dependencies:\n",
                    scope_name(j)
                );
                for i in self.declared_deps(j) {
                    d += &format!("  - {{host: {}}}\n", host(i));
                }
                docs.push(d);
            }
        }
        docs.join("---\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default layout is today's estate: deps and added services as before.
    #[test]
    fn one_environment_keeps_the_estate_as_it_was() {
        let sc = Scenario::new(Size::ebay());
        let s = sc.size.services;
        for j in [0, 1, 7, 399] {
            let mut old = BTreeSet::new();
            let mut m = 0;
            while old.len() < sc.size.deps_per_sidecar {
                old.insert((j * 37 + m * 41) % s);
                m += 1;
            }
            assert_eq!(sc.deps(j), old.into_iter().collect::<Vec<_>>());
            assert_eq!(sc.added_dep(j), Some(s + j % sc.size.added_services));
        }
        assert_eq!(sc.last_added(0), Some(s + sc.size.added_services - 1));
        assert!(!sc.hub_config_yaml().contains("kind: Environment"));
    }

    #[test]
    fn a_sharded_estate_keeps_each_scope_in_its_environment_and_fills_every_shard() {
        let sc = Scenario::sharded(Size::ebay(), 2, 3).unwrap();
        for j in 0..sc.size.scopes {
            let e = sc.env_of_scope(j);
            let deps = sc.deps(j);
            assert_eq!(deps.len(), sc.size.deps_per_sidecar, "scope {j}");
            assert!(
                deps.iter()
                    .all(|&i| sc.env_of_service(i) == e && i < sc.size.services)
            );
            let added = sc.added_dep(j).unwrap();
            assert!(added >= sc.size.services && sc.env_of_service(added) == e);
        }
        let mut sidecars: BTreeMap<ShardIx, usize> = BTreeMap::new();
        for k in 0..sc.size.sidecars {
            *sidecars.entry(sc.sidecar_shard(k)).or_default() += 1;
        }
        let mut gateways: BTreeMap<ShardIx, usize> = BTreeMap::new();
        for g in 0..sc.size.gateways {
            *gateways.entry(sc.gateway_shard(g)).or_default() += 1;
        }
        assert_eq!(sidecars.keys().copied().collect::<Vec<_>>(), sc.shards());
        assert_eq!(gateways.keys().copied().collect::<Vec<_>>(), sc.shards());
        // 2,000 sidecars over 6 shards: 333 or 334 each.
        assert!(
            sidecars.values().all(|n| (333..=334).contains(n)),
            "{sidecars:?}"
        );
        // A shard's model: its environment's services, its zone's endpoints.
        let m = sc.shard_model((1, 2));
        assert_eq!(m.services.len(), sc.size.services / 2);
        for s in m.services.values() {
            assert!(!s.endpoints.is_empty());
            assert!(s.endpoints.iter().all(|e| e.locality.zone == "az2"));
        }
        assert!(m.sidecars.len() == sc.size.scopes / 2);
        // An agent's slice carries only the environments asked for.
        let slice = sc.cluster_slice(5, |e| e == 1);
        let all = sc.cluster_state(5);
        assert!(!slice.services.is_empty() && slice.services.len() < all.services.len());
        assert!(
            slice
                .services
                .values()
                .all(|s| s.value.environment == "staging")
        );
        let yaml = sc.sharded_config_yaml();
        assert!(yaml.contains(
            "kind: Environment\nmetadata: {name: staging}\nspec: {zones: [az0, az1, az2]}"
        ));
    }

    #[test]
    fn a_sharded_estate_refuses_a_service_missing_from_a_zone() {
        let mut size = Size::small();
        size.endpoints_per_service = 1;
        let e = Scenario::sharded(size, 2, 3).unwrap_err().to_string();
        assert!(e.contains("has no endpoint in zone"), "{e}");
    }
}
