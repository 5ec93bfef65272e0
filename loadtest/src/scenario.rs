//! The simulated estate: services spread over clusters, sidecars with dependency
//! lists, gateways, and the endpoint changes injected each round. Deterministic for a
//! given seed, so ours and the peer see exactly the same estate and changes.

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

/// One endpoint: which cluster serves it and where.
#[derive(Debug, Clone)]
pub struct Ep {
    pub cluster: usize,
    pub address: Ipv4Addr,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub size: Size,
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

fn zone(c: usize) -> String {
    format!("az{}", c % 3)
}

pub const REGION: &str = "region-1";

impl Scenario {
    pub fn new(size: Size) -> Self {
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
            endpoints,
        }
    }

    /// The scope of sidecar `k`.
    pub fn scope_of(&self, k: usize) -> usize {
        k % self.size.scopes.max(1)
    }

    /// Service indexes scope `j` depends on (its sidecars' dependencies).
    pub fn deps(&self, j: usize) -> Vec<usize> {
        let s = self.size.services;
        let mut set = BTreeSet::new();
        let mut m = 0;
        while set.len() < self.size.deps_per_sidecar.min(s) {
            set.insert((j * 37 + m * 41) % s);
            m += 1;
        }
        set.into_iter().collect()
    }

    /// The added service (config change) scope `j` already declares as a dependency,
    /// as an application declares a service it is about to call before it is
    /// deployed: every scope names one, so the config change reaches every sidecar.
    pub fn added_dep(&self, j: usize) -> Option<usize> {
        (self.size.added_services > 0).then(|| self.size.services + j % self.size.added_services)
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
            environment: ENV.into(),
        }
    }

    /// What cluster `c` exports now.
    pub fn cluster_state(&self, c: usize) -> ClusterState {
        let mut state = ClusterState::default();
        let now = SystemTime::now();
        for i in 0..self.active {
            let eps: Vec<pb::Endpoint> = self.endpoints[i]
                .iter()
                .filter(|e| e.cluster == c)
                .map(|e| pb::Endpoint {
                    addresses: vec![e.address.to_string()],
                    ports: (0..self.size.ports)
                        .map(|p| (format!("p{p}"), 9080))
                        .collect(),
                    zone: zone(c),
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
                .map(|e| Endpoint {
                    address: e.address.into(),
                    port: None,
                    ports: (0..self.size.ports)
                        .map(|p| (format!("p{p}"), 9080))
                        .collect(),
                    locality: Locality {
                        region: REGION.into(),
                        zone: zone(e.cluster),
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
}
