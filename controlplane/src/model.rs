//! The mesh model: validated services, endpoints, routes and gateways, per environment.
//!
//! Pure data, no I/O and no protocol types. Config sources (files today, federation
//! and the store later) produce a [`Mesh`]; the xDS generator consumes one
//! [`Environment`] at a time.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

/// Everything the hub knows, keyed by environment (the shard and isolation boundary).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mesh {
    pub environments: BTreeMap<String, Environment>,
    /// Mesh-wide security config: which remote clusters may export what, and
    /// which operators may read or write which environments (`docs/security.md`).
    pub security: Security,
}

/// Mesh-wide grants, from the `RemoteCluster` and `Operator` kinds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// The registry of remote clusters, by cluster id.
    pub remote_clusters: BTreeMap<String, RemoteClusterGrant>,
    /// Operators' roles, by operator name (the `operator/{name}` SPIFFE id).
    pub operators: BTreeMap<String, OperatorGrant>,
}

/// Matches every environment (or namespace) in a grant.
pub const ANY: &str = "*";

/// What one remote cluster may export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteClusterGrant {
    /// Environments its services may be exported into (`*`: any).
    pub environments: Vec<String>,
    /// Namespaces its services may come from (`*`: any).
    pub namespaces: Vec<String>,
}

/// An operator's role and the environments it applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorGrant {
    pub role: OperatorRole,
    /// Environments the role applies to (`*`: all, and the mesh-wide views).
    pub environments: Vec<String>,
}

/// `read`: status, config dumps and config reads; `write`: also config writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorRole {
    Read,
    Write,
}

/// Whether `list` grants `name` (`*` grants everything).
pub fn granted(list: &[String], name: &str) -> bool {
    list.iter().any(|g| g == ANY || g == name)
}

/// One environment's config. Nothing here refers to another environment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Environment {
    pub services: BTreeMap<ObjectKey, Service>,
    pub routes: Vec<Route>,
    pub gateways: BTreeMap<String, Gateway>,
    /// Sidecar dependency scopes, by name.
    pub sidecars: BTreeMap<String, SidecarScope>,
    /// The availability zones of the environment (its `Environment` definition);
    /// each `(environment, zone)` is a shard. Empty without a definition.
    pub zones: Vec<String>,
    /// Cross-zone traffic: the zones' east-west gateways and the local share
    /// (`spec.eastWestGateways`, `spec.locality`; see `docs/locality.md`).
    pub locality: ZoneLocality,
    /// Mesh mTLS between its sidecars (`spec.mtls` of its `Environment`); `None`: the
    /// hub's default, on when the hub has a certificate issuer (docs/security.md).
    pub mtls: Option<bool>,
    /// Operator-supplied certificates that gateways serve (`Credential` objects).
    pub credentials: BTreeMap<ObjectKey, Credential>,
    /// Credentials whose certificate and key are a remote cluster's Kubernetes Secret
    /// (`spec.kubernetesSecret`): the hub asks that cluster's agent for it and keeps
    /// what it sends in memory only (`docs/security.md`).
    pub secret_credentials: BTreeMap<ObjectKey, SecretRef>,
}

/// A Kubernetes Secret of type `kubernetes.io/tls` in a remote cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretRef {
    /// The remote cluster's id (its agent's `--cluster-id`).
    pub cluster: String,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.cluster, self.namespace, self.name)
    }
}

/// A certificate chain and its private key, as PEM (a `Credential` object). Its
/// `Debug` never prints the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub certificate_pem: String,
    pub private_key_pem: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("certificate_pem", &self.certificate_pem.len())
            .field("private_key_pem", &"<redacted>")
            .finish()
    }
}

/// Percent of a service's traffic that stays in the proxy's zone while its local
/// endpoints are healthy, unless an `Environment` says otherwise: all of it.
pub const DEFAULT_LOCAL_PERCENT: u32 = 100;

/// How an environment's zones reach each other (see `docs/locality.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneLocality {
    /// Zone → where its east-west gateway listens: other zones' proxies reach the
    /// zone's endpoints through it.
    pub gateways: BTreeMap<String, std::net::SocketAddr>,
    /// Percent (1..=100) of traffic kept in the local zone while every local endpoint
    /// is healthy; the rest goes to the remote zones. It is Envoy's
    /// `overprovisioning_factor` of the zone's load assignments.
    pub local_percent: u32,
}

impl Default for ZoneLocality {
    fn default() -> Self {
        Self {
            gateways: BTreeMap::new(),
            local_percent: DEFAULT_LOCAL_PERCENT,
        }
    }
}

impl Environment {
    /// Zones get load assignments of their own (local endpoints first, the other
    /// zones through their gateways): the environment has two zones or more and at
    /// least one of them has an east-west gateway.
    pub fn zone_views(&self) -> bool {
        self.zones.len() >= 2 && !self.locality.gateways.is_empty()
    }
}

/// What a scoped sidecar depends on: it receives only these services' clusters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarScope {
    pub name: String,
    pub dependencies: Vec<Dependency>,
    /// The ports its workload serves: each one an inbound listener of the scope's
    /// sidecars that forwards to the local app (with mTLS when the environment has it).
    pub inbound: Vec<InboundPort>,
}

/// One inbound port of a sidecar scope (`spec.inbound[]` of a `Sidecar`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundPort {
    /// Where the sidecar listens (`bind`, default `0.0.0.0`) for peers.
    pub bind: IpAddr,
    pub port: u16,
    /// The local app: `targetAddress` (default `127.0.0.1`) and `targetPort`.
    pub target: IpAddr,
    pub target_port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dependency {
    /// Every service of a namespace.
    Namespace(String),
    /// The service that has this host.
    Host(String),
}

impl SidecarScope {
    pub fn selects(&self, service: &Service) -> bool {
        self.dependencies.iter().any(|d| match d {
            Dependency::Namespace(ns) => service.key.namespace == *ns,
            Dependency::Host(h) => service.hosts.iter().any(|x| x == h),
        })
    }
}

/// `namespace/name` of an object within one environment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub key: ObjectKey,
    /// At least one; the first is canonical and names the service's clusters.
    pub hosts: Vec<String>,
    pub ports: Vec<ServicePort>,
    pub subsets: Vec<Subset>,
    /// Every endpoint of the service, from every `Endpoints` object that names it.
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    pub fn canonical_host(&self) -> &str {
        &self.hosts[0]
    }

    pub fn port(&self, number: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == number)
    }

    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
}

impl Protocol {
    /// Routed at L7 (HTTP route tables apply).
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }

    /// Upstream connections speak HTTP/2.
    pub fn is_http2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl Subset {
    pub fn selects(&self, endpoint: &Endpoint) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| endpoint.labels.get(k) == Some(v))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    /// The endpoint port for every service port not named in `ports`.
    pub port: Option<u16>,
    /// Service port name -> endpoint port.
    pub ports: PortMap,
    pub locality: Locality,
    pub labels: BTreeMap<String, String>,
    pub weight: u32,
    pub health: Health,
}

/// Service port name → endpoint port, sorted by name. A small sorted `Vec`: an
/// endpoint names one or a few ports, and the hub holds one per endpoint address
/// (a B-tree map costs a whole node, ~300 bytes, even for one entry).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PortMap(Vec<(String, u16)>);

impl PortMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, name: &str) -> Option<&u16> {
        self.0
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Sets `name` to `port`; returns the port it had.
    pub fn insert(&mut self, name: String, port: u16) -> Option<u16> {
        match self.0.binary_search_by(|(n, _)| n.as_str().cmp(&name)) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, port)),
            Err(i) => {
                self.0.insert(i, (name, port));
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// In name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &u16)> {
        self.0.iter().map(|(n, p)| (n, p))
    }
}

impl FromIterator<(String, u16)> for PortMap {
    /// A later entry for the same name wins, as in a map.
    fn from_iter<I: IntoIterator<Item = (String, u16)>>(iter: I) -> Self {
        let mut m = PortMap::new();
        for (n, p) in iter {
            m.insert(n, p);
        }
        m.0.shrink_to_fit();
        m
    }
}

impl<const N: usize> From<[(String, u16); N]> for PortMap {
    fn from(a: [(String, u16); N]) -> Self {
        a.into_iter().collect()
    }
}

impl From<BTreeMap<String, u16>> for PortMap {
    fn from(m: BTreeMap<String, u16>) -> Self {
        // Already sorted and unique.
        PortMap(m.into_iter().collect())
    }
}

impl IntoIterator for PortMap {
    type Item = (String, u16);
    type IntoIter = std::vec::IntoIter<(String, u16)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl Endpoint {
    /// The port this endpoint serves `service_port` on, if it serves it.
    pub fn port_for(&self, service_port: &ServicePort) -> Option<u16> {
        self.ports.get(&service_port.name).copied().or(self.port)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    /// The Kubernetes cluster; xDS `sub_zone`.
    pub cluster: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Unhealthy,
    Draining,
    Unknown,
}

/// HTTP routing for some hosts on one service port.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub key: ObjectKey,
    pub hosts: Vec<String>,
    pub port: u16,
    pub rules: Vec<RouteRule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteRule {
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
    pub destinations: Vec<Destination>,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    pub name: String,
    pub value: HeaderValueMatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValueMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
    Present,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub service: ObjectKey,
    pub port: u16,
    pub subset: Option<String>,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    pub name: String,
    pub listeners: Vec<GatewayListener>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayListener {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    /// Service hosts routed here; `None` routes every service of the environment.
    pub hosts: Option<Vec<String>>,
    /// HTTPS with this credential (`Credential` in the gateway's namespace); `None`:
    /// plain HTTP.
    pub tls: Option<ObjectKey>,
}

impl GatewayListener {
    pub fn routes_host(&self, host: &str) -> bool {
        self.hosts
            .as_ref()
            .is_none_or(|hosts| hosts.iter().any(|h| h == host))
    }
}

/// The one host validation, for every source (files, federation): lower-cases `value`
/// (DNS names are case-insensitive, and two spellings of one host must be one host)
/// and checks it is a DNS name: labels of letters, digits and '-', separated by '.',
/// each 1..=63 characters and not starting or ending with '-', at most 253 in all.
/// The error says what was wrong; the caller prefixes the field.
pub fn normalize_host(value: &str) -> Result<String, String> {
    let host = value.to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !host.is_empty() && host.len() <= 253 && host.split('.').all(label_ok) {
        Ok(host)
    } else {
        Err(format!(
            "{value:?} is not a valid host, expected a DNS name: labels of letters, digits and '-' (1..=63 characters, not starting or ending with '-') separated by '.', at most 253 characters"
        ))
    }
}

#[cfg(test)]
mod host_tests {
    use super::{PortMap, normalize_host};

    #[test]
    fn port_maps_are_sorted_maps() {
        let a: PortMap = [("http".to_string(), 80), ("grpc".to_string(), 90)].into();
        let mut b = PortMap::new();
        assert_eq!(b.insert("grpc".into(), 1), None);
        assert_eq!(b.insert("http".into(), 80), None);
        assert_eq!(b.insert("grpc".into(), 90), Some(1));
        assert_eq!(a, b, "order of insertion does not matter");
        assert_eq!(
            (a.get("http"), a.get("grpc"), a.get("x")),
            (Some(&80), Some(&90), None)
        );
        let names: Vec<&String> = a.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["grpc", "http"]);
        let later_wins: PortMap = [("p".to_string(), 1), ("p".to_string(), 2)].into();
        assert_eq!((later_wins.len(), later_wins.get("p")), (1, Some(&2)));
    }

    #[test]
    fn hosts_are_lower_cased_and_validated() {
        assert_eq!(normalize_host("Reviews.PROD").unwrap(), "reviews.prod");
        assert_eq!(
            normalize_host("a-1.b.svc.cluster.local").unwrap(),
            "a-1.b.svc.cluster.local"
        );
        for bad in ["", "a..b", "-a.b", "a-.b", "a b", "a_b", ".a", "a.", "é.b"] {
            assert!(normalize_host(bad).is_err(), "{bad:?} accepted");
        }
        assert!(normalize_host(&"a".repeat(64)).is_err(), "label over 63");
        let long = vec!["a".repeat(63); 4].join(".");
        assert!(normalize_host(&long).is_err(), "host over 253");
    }
}
