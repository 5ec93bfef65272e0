//! Generation: one [`Environment`] → every xDS resource of that shard, each encoded once.
//!
//! Each resource is built by a small function of only its own inputs (a service, a
//! port, a subset, the routes naming it), so that incremental generation can call them
//! per touched key. Versions are content hashes of the encoded body, so regenerating an
//! unchanged resource yields the same version and is dropped by the snapshot diff.
//! Naming is documented in `docs/xds.md`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use prost::Message;
use tributary_proto::envoy::envoy::config::cluster::v3::{
    Cluster, OutlierDetection, cluster::ClusterDiscoveryType, cluster::DiscoveryType,
    cluster::EdsClusterConfig, cluster::LbPolicy,
};
use tributary_proto::envoy::envoy::config::core::v3::Http2ProtocolOptions;
use tributary_proto::envoy::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus,
    Locality as PbLocality, SocketAddress, address, config_source::ConfigSourceSpecifier,
    socket_address::PortSpecifier,
};
use tributary_proto::envoy::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints,
    lb_endpoint::HostIdentifier,
};
use tributary_proto::envoy::envoy::config::listener::v3::{
    Filter, FilterChain, Listener, filter::ConfigType,
};
use tributary_proto::envoy::envoy::config::route::v3::{
    HeaderMatcher, Route as PbRoute, RouteAction, RouteMatch, VirtualHost, WeightedCluster,
    header_matcher::HeaderMatchSpecifier, route::Action, route_action::ClusterSpecifier,
    route_match::PathSpecifier, weighted_cluster::ClusterWeight,
};
use tributary_proto::envoy::envoy::extensions::filters::http::router::v3::Router;
use tributary_proto::envoy::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager::RouteSpecifier,
    http_filter::ConfigType as HttpFilterConfigType,
};
use tributary_proto::envoy::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options::ExplicitHttpConfig,
    http_protocol_options::explicit_http_config::ProtocolConfig,
};
use tributary_proto::envoy::envoy::r#type::matcher::v3::{
    RegexMatcher, StringMatcher, string_matcher::MatchPattern,
};
use tributary_proto::envoy::google::protobuf::{
    Any, BoolValue, Duration as PbDuration, UInt32Value,
};
use tributary_proto::type_url;
use tributary_proto::wire::EncodedResource;

use super::XdsType;
use crate::model::{
    Destination, Endpoint, Environment, GatewayListener, HeaderValueMatch, Health, ObjectKey,
    PathMatch, RouteRule, Service, ServicePort,
};

mod api_listener;
pub mod mtls;

pub use mtls::MeshTls;

/// Encoded virtual hosts of the shared route tables, kept between flushes by the
/// index: a route table is reassembled from these bytes (a repeated sub-message is
/// its length-delimited bytes on the wire), and only the virtual hosts of services
/// that changed are encoded again. Only default-route virtual hosts are kept: they
/// depend on their service alone. A service named by a Route (whose rules name other
/// services' clusters) is encoded every time; the index clears the cache when routes
/// change, and drops a service's entries when its hosts or ports change.
#[derive(Debug, Default)]
pub struct VirtualHostCache {
    /// Service → (route port, domain port, the encoded `VirtualHost`).
    entries: HashMap<ObjectKey, Vec<(Option<u16>, u16, bytes::Bytes)>>,
    /// Virtual hosts encoded so far (cache misses): a work counter for tests and metrics.
    pub encoded: u64,
}

impl VirtualHostCache {
    /// Forgets `key`'s virtual hosts (its hosts or ports changed, or it is gone).
    pub fn invalidate(&mut self, key: &ObjectKey) {
        self.entries.remove(key);
    }

    /// Forgets every virtual host (routes changed).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The encoded virtual host of `service` (see [`virtual_host_and_kind`]).
    fn get(
        &mut self,
        service: &Service,
        env: &Environment,
        route_port: Option<u16>,
        domain_port: u16,
    ) -> bytes::Bytes {
        if let Some(b) = self.entries.get(&service.key).and_then(|v| {
            v.iter()
                .find(|(r, d, _)| *r == route_port && *d == domain_port)
                .map(|(_, _, b)| b.clone())
        }) {
            return b;
        }
        self.encoded += 1;
        let (vh, default_route) = virtual_host_and_kind(service, env, route_port, domain_port);
        let bytes = bytes::Bytes::from(vh.encode_to_vec());
        if default_route {
            self.entries.entry(service.key.clone()).or_default().push((
                route_port,
                domain_port,
                bytes.clone(),
            ));
        }
        bytes
    }
}

/// A `RouteConfiguration` with only `name` and `virtual_hosts`, encoded from
/// pre-encoded virtual hosts: byte for byte what prost encodes for the typed message.
fn route_configuration(name: &str, virtual_hosts: &[bytes::Bytes]) -> EncodedResource {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let len: usize = virtual_hosts.iter().map(|v| v.len() + 11).sum::<usize>() + name.len() + 11;
    let mut body = Vec::with_capacity(len);
    if !name.is_empty() {
        encode_key(1, WireType::LengthDelimited, &mut body);
        encode_varint(name.len() as u64, &mut body);
        body.extend_from_slice(name.as_bytes());
    }
    for v in virtual_hosts {
        encode_key(2, WireType::LengthDelimited, &mut body);
        encode_varint(v.len() as u64, &mut body);
        body.extend_from_slice(v);
    }
    EncodedResource::from_body(
        XdsType::Route.type_url(),
        name,
        &content_version(&body),
        &body,
    )
}

/// Resources of one environment by type, in persistent maps: a snapshot is an O(1)
/// clone, and replacing one service's resources is O(log n).
pub type ResourceMap = imbl::OrdMap<Arc<str>, EncodedResource>;

/// Every resource of one environment, plus which listeners each role sees on a
/// wildcard subscription.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EnvResources {
    pub by_type: [ResourceMap; XdsType::COUNT],
    pub roles: RoleListeners,
    /// When the change that produced each resource's current version was first
    /// observed at its source: the start of its convergence.
    pub origins: [imbl::OrdMap<Arc<str>, std::time::SystemTime>; XdsType::COUNT],
}

/// Listener names a wildcard LDS subscription selects, per role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleListeners {
    pub sidecar: BTreeSet<Arc<str>>,
    pub gateways: BTreeMap<String, BTreeSet<Arc<str>>>,
    /// Per sidecar scope: the clusters its dependencies select (a scoped sidecar's
    /// wildcard CDS). Computed once per scope, never per proxy.
    pub scopes: BTreeMap<String, Arc<BTreeSet<Arc<str>>>>,
    /// Per sidecar scope: its listeners (a scoped sidecar's wildcard LDS), whose
    /// route tables hold only the services the scope depends on.
    pub scope_listeners: BTreeMap<String, Arc<BTreeSet<Arc<str>>>>,
    /// Per gateway: the credential secrets its listeners serve (the only secrets of
    /// the environment a stream may be sent, and only a stream of that gateway).
    pub gateway_secrets: BTreeMap<String, BTreeSet<Arc<str>>>,
}

/// Generated resources, before they are placed in a snapshot.
pub type Generated = Vec<(XdsType, EncodedResource)>;

pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
pub const VIRTUAL_OUTBOUND_PORT: u16 = 15001;
const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";

pub fn cluster_name(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

pub fn gateway_resource_name(gateway: &str, listener: &str) -> String {
    format!("gateway|{gateway}|{listener}")
}

/// Content version: FNV-1a 64 over the encoded body, as 16 hex digits. Stable across
/// hub restarts, so reconnecting Delta clients are not re-sent what they hold.
pub fn content_version(body: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn encode<M: Message>(ty: XdsType, name: &str, message: &M) -> EncodedResource {
    let body = message.encode_to_vec();
    EncodedResource::from_body(ty.type_url(), name, &content_version(&body), &body)
}

fn any<M: Message>(type_url: &str, message: &M) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: message.encode_to_vec(),
    }
}

fn ads_source() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

fn socket(address: IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: address.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// Generates every resource of `env`.
pub fn generate(env: &Environment) -> EnvResources {
    let mut out = EnvResources::default();
    let mut all = Generated::new();
    for service in env.services.values() {
        service_resources(service, &mut all);
    }
    out.roles = shared_resources(env, &mut all);
    for (ty, r) in all {
        out.by_type[ty as usize].insert(Arc::from(r.name()), r);
    }
    out
}

fn subsets(service: &Service) -> impl Iterator<Item = Option<&str>> {
    std::iter::once(None).chain(service.subsets.iter().map(|s| Some(s.name.as_str())))
}

/// Test hooks (`tributary hub --test-hooks`, for the conformance tests only): a
/// service port whose name starts with [`TEST_INVALID_PORT_PREFIX`] yields clusters
/// that Envoy rejects (a zero connect timeout), so that a real NACK of one cluster
/// can be provoked and watched. Off unless that hidden flag is given.
static TEST_HOOKS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
pub const TEST_INVALID_PORT_PREFIX: &str = "test-invalid";

pub fn enable_test_hooks() {
    TEST_HOOKS.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn invalid_for_tests(port: &ServicePort) -> bool {
    TEST_HOOKS.load(std::sync::atomic::Ordering::Relaxed)
        && port.name.starts_with(TEST_INVALID_PORT_PREFIX)
}

/// The resources that depend on `service` alone: its clusters, their load
/// assignments, and its gRPC API listeners.
pub fn service_resources(service: &Service, out: &mut Generated) {
    service_resources_tls(service, None, out)
}

/// [`service_resources`] of an environment with mesh mTLS `tls`: the clusters carry
/// its upstream transport socket.
pub fn service_resources_tls(service: &Service, tls: Option<&MeshTls>, out: &mut Generated) {
    let endpoints: Vec<&Endpoint> = service.endpoints.iter().collect();
    service_resources_with(service, &endpoints, tls, out)
}

/// [`service_resources_tls`] of `service`'s spec with `endpoints` in place of its own:
/// the index borrows a merged service's endpoints from the clusters that hold them
/// rather than copying every one into the service.
pub fn service_resources_with(
    service: &Service,
    endpoints: &[&Endpoint],
    tls: Option<&MeshTls>,
    out: &mut Generated,
) {
    for port in &service.ports {
        for subset in subsets(service) {
            let name = cluster_name(port.port, subset.unwrap_or(""), service.canonical_host());
            let mut c = cluster(&name, port);
            c.transport_socket =
                tls.map(|t| mtls::upstream(t, &service.key.namespace, port.protocol));
            if invalid_for_tests(port) {
                c.connect_timeout = Some(PbDuration::default());
            }
            out.push((XdsType::Cluster, encode(XdsType::Cluster, &name, &c)));
        }
    }
    endpoint_resources_with(service, endpoints, out);
    let first_port = service.ports.first().map(|p| p.port);
    for port in service.ports.iter().filter(|p| p.protocol.is_http()) {
        let route = port.port.to_string();
        for host in &service.hosts {
            let mut names = vec![format!("{host}:{}", port.port)];
            if first_port == Some(port.port) {
                names.push(host.clone());
            }
            for n in names {
                out.push((XdsType::Listener, api_listener::encoded(&n, &route)));
            }
        }
    }
}

/// The load assignments of `service`'s clusters: all an endpoint change touches.
pub fn endpoint_resources(service: &Service, out: &mut Generated) {
    let endpoints: Vec<&Endpoint> = service.endpoints.iter().collect();
    endpoint_resources_with(service, &endpoints, out)
}

/// [`endpoint_resources`] with `endpoints` in place of the service's own (see
/// [`service_resources_with`]).
pub fn endpoint_resources_with(service: &Service, endpoints: &[&Endpoint], out: &mut Generated) {
    for port in &service.ports {
        for subset in subsets(service) {
            let name = cluster_name(port.port, subset.unwrap_or(""), service.canonical_host());
            let cla = load_assignment_with(&name, service, endpoints.iter().copied(), port, subset);
            out.push((XdsType::Endpoint, encode(XdsType::Endpoint, &name, &cla)));
        }
    }
}

/// The resources that depend on many services: route tables, sidecar and gateway
/// listeners, the passthrough cluster. Regenerated only when a service's hosts or
/// ports, a route or a gateway change — never for an endpoint change.
pub fn shared_resources(env: &Environment, out: &mut Generated) -> RoleListeners {
    shared_resources_cached(env, &mut VirtualHostCache::default(), out)
}

/// [`shared_resources`], with the route tables' virtual hosts taken from `cache` (and
/// added to it): the index's incremental path.
pub fn shared_resources_cached(
    env: &Environment,
    cache: &mut VirtualHostCache,
    out: &mut Generated,
) -> RoleListeners {
    shared_resources_tls(env, None, cache, out)
}

/// [`shared_resources_cached`] of an environment with mesh mTLS `tls`: sidecar
/// scopes' inbound listeners terminate it.
pub fn shared_resources_tls(
    env: &Environment,
    tls: Option<&MeshTls>,
    cache: &mut VirtualHostCache,
    out: &mut Generated,
) -> RoleListeners {
    let mut roles = RoleListeners::default();
    out.push((
        XdsType::Cluster,
        encode(
            XdsType::Cluster,
            PASSTHROUGH_CLUSTER,
            &passthrough_cluster(),
        ),
    ));

    // Unscoped sidecar and proxyless route tables: one per HTTP service port number,
    // with every service of the environment.
    let all: Vec<&Service> = env.services.values().collect();
    let ports = sidecar_route_tables(env, &all, None, cache, out);
    if !ports.is_empty() {
        out.push((
            XdsType::Listener,
            encode(XdsType::Listener, VIRTUAL_OUTBOUND, &virtual_outbound()),
        ));
    }
    roles.sidecar = sidecar_listener_names(&ports);

    // Per sidecar scope: its clusters (wildcard CDS), and its own listeners and route
    // tables holding only the virtual hosts of the services it depends on, so that a
    // scoped sidecar is sent what it can reach, not the whole environment. Built once
    // per scope, never per proxy; the virtual hosts are spliced from `cache`.
    let selector = ScopeSelector::new(env);
    for scope in env.sidecars.values() {
        let services = selector.select(scope);
        let mut clusters: BTreeSet<Arc<str>> = BTreeSet::new();
        clusters.insert(Arc::from(PASSTHROUGH_CLUSTER));
        for service in &services {
            for port in &service.ports {
                for subset in subsets(service) {
                    clusters.insert(Arc::from(
                        cluster_name(port.port, subset.unwrap_or(""), service.canonical_host())
                            .as_str(),
                    ));
                }
            }
        }
        let mut inbound = BTreeSet::new();
        mtls::inbound(scope, tls, out, &mut clusters, &mut inbound);
        roles.scopes.insert(scope.name.clone(), Arc::new(clusters));
        let ports = sidecar_route_tables(env, &services, Some(&scope.name), cache, out);
        let mut listeners = sidecar_listener_names(&ports);
        listeners.extend(inbound);
        roles
            .scope_listeners
            .insert(scope.name.clone(), Arc::new(listeners));
    }

    for gateway in env.gateways.values() {
        let mut names = BTreeSet::new();
        let mut secrets = BTreeSet::new();
        for listener in &gateway.listeners {
            let name = gateway_resource_name(&gateway.name, &listener.name);
            out.push((XdsType::Route, gateway_routes(&name, env, listener, cache)));
            let mut chain = http_filter_chain(
                &format!("gateway_{}_{}", gateway.name, listener.name),
                &name,
            );
            if let Some(key) = &listener.tls {
                let secret = mtls::credential_secret_name(key);
                chain.transport_socket = Some(mtls::gateway_tls(&secret));
                secrets.insert(Arc::from(secret.as_str()));
            }
            let l = Listener {
                name: name.clone(),
                address: Some(socket(listener.address, listener.port)),
                filter_chains: vec![chain],
                ..Default::default()
            };
            out.push((XdsType::Listener, encode(XdsType::Listener, &name, &l)));
            names.insert(Arc::from(name.as_str()));
        }
        roles.gateways.insert(gateway.name.clone(), names);
        if !secrets.is_empty() {
            roles.gateway_secrets.insert(gateway.name.clone(), secrets);
        }
    }
    // The credentials some gateway serves, encoded once per environment.
    let served: BTreeSet<&str> = roles
        .gateway_secrets
        .values()
        .flatten()
        .map(|s| &**s)
        .collect();
    for (key, credential) in &env.credentials {
        let name = mtls::credential_secret_name(key);
        if served.contains(name.as_str()) {
            let secret = mtls::credential_secret(&name, credential);
            out.push((XdsType::Secret, encode(XdsType::Secret, &name, &secret)));
        }
    }
    roles
}

/// The route table of HTTP port `port` for sidecars of `scope` (`None`: unscoped
/// sidecars and proxyless clients). See `docs/xds.md`, "Resource names".
pub fn sidecar_route_name(scope: Option<&str>, port: u16) -> String {
    match scope {
        None => port.to_string(),
        Some(scope) => format!("sidecar|{scope}|{port}"),
    }
}

/// The outbound listener of HTTP port `port` for sidecars of `scope`.
pub fn sidecar_listener_name(scope: Option<&str>, port: u16) -> String {
    match scope {
        None => format!("0.0.0.0_{port}"),
        Some(scope) => format!("sidecar|{scope}|0.0.0.0_{port}"),
    }
}

/// Generates, for `services` (in the environment's order), one route table and one
/// outbound listener per HTTP port number, named for `scope`; returns the listener
/// names.
fn sidecar_route_tables(
    env: &Environment,
    services: &[&Service],
    scope: Option<&str>,
    cache: &mut VirtualHostCache,
    out: &mut Generated,
) -> BTreeSet<Arc<str>> {
    let mut http_ports: BTreeMap<u16, Vec<&Service>> = BTreeMap::new();
    for service in services {
        for port in service.ports.iter().filter(|p| p.protocol.is_http()) {
            http_ports.entry(port.port).or_default().push(service);
        }
    }
    let mut listeners = BTreeSet::new();
    for (port, services) in &http_ports {
        let route_name = sidecar_route_name(scope, *port);
        let vhosts: Vec<bytes::Bytes> = services
            .iter()
            .map(|s| cache.get(s, env, Some(*port), *port))
            .collect();
        out.push((XdsType::Route, route_configuration(&route_name, &vhosts)));

        let listener_name = sidecar_listener_name(scope, *port);
        let l = Listener {
            name: listener_name.clone(),
            address: Some(socket(IpAddr::V4(Ipv4Addr::UNSPECIFIED), *port)),
            bind_to_port: Some(BoolValue { value: false }),
            filter_chains: vec![http_filter_chain(&format!("outbound_{port}"), &route_name)],
            ..Default::default()
        };
        out.push((
            XdsType::Listener,
            encode(XdsType::Listener, &listener_name, &l),
        ));
        listeners.insert(Arc::from(listener_name.as_str()));
    }
    listeners
}

/// What a sidecar's wildcard LDS selects: its outbound HTTP listeners, plus the
/// original-destination passthrough listener when it has any.
fn sidecar_listener_names(http_listeners: &BTreeSet<Arc<str>>) -> BTreeSet<Arc<str>> {
    let mut names = http_listeners.clone();
    if !names.is_empty() {
        names.insert(Arc::from(VIRTUAL_OUTBOUND));
    }
    names
}

/// The original-destination listener that passes traffic for unknown destinations
/// through, shared by every sidecar.
fn virtual_outbound() -> Listener {
    Listener {
        name: VIRTUAL_OUTBOUND.into(),
        address: Some(socket(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            VIRTUAL_OUTBOUND_PORT,
        )),
        use_original_dst: Some(BoolValue { value: true }),
        filter_chains: vec![tcp_passthrough_chain()],
        ..Default::default()
    }
}

/// Finds the services a sidecar scope depends on through indexes by host and by
/// namespace, built once per generation: O(dependencies) per scope rather than a
/// scan of every service per scope.
struct ScopeSelector<'e> {
    by_host: HashMap<&'e str, Vec<&'e Service>>,
    by_namespace: HashMap<&'e str, Vec<&'e Service>>,
}

impl<'e> ScopeSelector<'e> {
    fn new(env: &'e Environment) -> Self {
        let mut by_host: HashMap<&str, Vec<&Service>> = HashMap::new();
        let mut by_namespace: HashMap<&str, Vec<&Service>> = HashMap::new();
        if !env.sidecars.is_empty() {
            for service in env.services.values() {
                by_namespace
                    .entry(service.key.namespace.as_str())
                    .or_default()
                    .push(service);
                for host in &service.hosts {
                    by_host.entry(host.as_str()).or_default().push(service);
                }
            }
        }
        ScopeSelector {
            by_host,
            by_namespace,
        }
    }

    /// The services `scope` selects ([`crate::model::SidecarScope::selects`]), each
    /// once, in the environment's order.
    fn select(&self, scope: &crate::model::SidecarScope) -> Vec<&'e Service> {
        let mut selected: BTreeMap<&ObjectKey, &'e Service> = BTreeMap::new();
        for dependency in &scope.dependencies {
            let found = match dependency {
                crate::model::Dependency::Namespace(ns) => self.by_namespace.get(ns.as_str()),
                crate::model::Dependency::Host(host) => self.by_host.get(host.as_str()),
            };
            for service in found.into_iter().flatten() {
                selected.insert(&service.key, service);
            }
        }
        selected.into_values().collect()
    }
}

/// Consecutive gateway failures (502, 503, 504, and connect failures, resets and
/// timeouts, which Envoy counts as such) that eject an endpoint.
pub const OUTLIER_CONSECUTIVE_GATEWAY_FAILURES: u32 = 5;
/// At most this share of a cluster's endpoints is ejected at once.
pub const OUTLIER_MAX_EJECTION_PERCENT: u32 = 50;
/// How often ejected endpoints are considered for return (Envoy's sweep).
pub const OUTLIER_INTERVAL_SECONDS: i64 = 5;
/// An ejected endpoint stays out this long times the number of its ejections.
pub const OUTLIER_BASE_EJECTION_SECONDS: i64 = 30;

/// Passive health checking of every EDS cluster: an endpoint that fails
/// [`OUTLIER_CONSECUTIVE_GATEWAY_FAILURES`] requests in a row at the gateway level (it
/// cannot be reached or does not answer) is ejected at once, at most
/// [`OUTLIER_MAX_EJECTION_PERCENT`] of the cluster. Only gateway failures eject: an
/// application's own 5xx answers (`consecutive_5xx`) and success-rate outliers are not
/// enforced, so a bad request pattern never costs capacity. gRPC proxyless clients
/// (gRFC A50) ignore the consecutive-failure fields; with success-rate and
/// failure-percentage ejection off, their outlier detection passes through (they
/// already skip endpoints they cannot connect to).
pub fn outlier_detection() -> OutlierDetection {
    let seconds = |seconds| PbDuration { seconds, nanos: 0 };
    OutlierDetection {
        consecutive_gateway_failure: Some(UInt32Value {
            value: OUTLIER_CONSECUTIVE_GATEWAY_FAILURES,
        }),
        enforcing_consecutive_gateway_failure: Some(UInt32Value { value: 100 }),
        enforcing_consecutive_5xx: Some(UInt32Value { value: 0 }),
        enforcing_success_rate: Some(UInt32Value { value: 0 }),
        max_ejection_percent: Some(UInt32Value {
            value: OUTLIER_MAX_EJECTION_PERCENT,
        }),
        interval: Some(seconds(OUTLIER_INTERVAL_SECONDS)),
        base_ejection_time: Some(seconds(OUTLIER_BASE_EJECTION_SECONDS)),
        ..Default::default()
    }
}

fn cluster(name: &str, port: &ServicePort) -> Cluster {
    let mut c = Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads_source()),
            service_name: name.to_string(),
        }),
        connect_timeout: Some(PbDuration {
            seconds: 1,
            nanos: 0,
        }),
        lb_policy: LbPolicy::RoundRobin as i32,
        outlier_detection: Some(outlier_detection()),
        ..Default::default()
    };
    if port.protocol.is_http2() {
        let options = HttpProtocolOptions {
            upstream_protocol_options: Some(
                tributary_proto::envoy::envoy::extensions::upstreams::http::v3::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    ExplicitHttpConfig {
                        protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())),
                    },
                ),
            ),
            ..Default::default()
        };
        c.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            any(
                "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                &options,
            ),
        );
    }
    c
}

fn passthrough_cluster() -> Cluster {
    Cluster {
        name: PASSTHROUGH_CLUSTER.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(PbDuration {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// The endpoints of `service` serving `port`, selected by `subset`, grouped by locality.
pub fn load_assignment(
    name: &str,
    service: &Service,
    port: &ServicePort,
    subset: Option<&str>,
) -> ClusterLoadAssignment {
    load_assignment_with(name, service, &service.endpoints, port, subset)
}

/// [`load_assignment`] of `endpoints` in place of the service's own.
pub fn load_assignment_with<'a>(
    name: &str,
    service: &Service,
    endpoints: impl IntoIterator<Item = &'a Endpoint>,
    port: &ServicePort,
    subset: Option<&str>,
) -> ClusterLoadAssignment {
    let selector = subset.and_then(|s| service.subset(s));
    let mut by_locality: BTreeMap<&crate::model::Locality, (u32, Vec<LbEndpoint>)> =
        BTreeMap::new();
    for e in endpoints {
        if selector.is_some_and(|s| !s.selects(e)) {
            continue;
        }
        let Some(p) = e.port_for(port) else { continue };
        let entry = by_locality.entry(&e.locality).or_default();
        entry.0 = entry.0.saturating_add(e.weight);
        entry.1.push(lb_endpoint(e, p));
    }
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: by_locality
            .into_iter()
            .map(|(l, (weight, lb_endpoints))| LocalityLbEndpoints {
                locality: Some(PbLocality {
                    region: l.region.clone(),
                    zone: l.zone.clone(),
                    sub_zone: l.cluster.clone(),
                }),
                lb_endpoints,
                // gRPC clients drop localities without a weight.
                load_balancing_weight: Some(UInt32Value {
                    value: weight.max(1),
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn lb_endpoint(e: &Endpoint, port: u16) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(HostIdentifier::Endpoint(PbEndpoint {
            address: Some(socket(e.address, port)),
            ..Default::default()
        })),
        health_status: match e.health {
            Health::Healthy => HealthStatus::Healthy,
            Health::Unhealthy => HealthStatus::Unhealthy,
            Health::Draining => HealthStatus::Draining,
            Health::Unknown => HealthStatus::Unknown,
        } as i32,
        load_balancing_weight: Some(UInt32Value { value: e.weight }),
        ..Default::default()
    }
}

fn router_filter() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(HttpFilterConfigType::TypedConfig(any(
            type_url::ROUTER,
            &Router::default(),
        ))),
        ..Default::default()
    }
}

fn hcm(stat_prefix: &str, route_config_name: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads_source()),
            route_config_name: route_config_name.to_string(),
        })),
        http_filters: vec![router_filter()],
        ..Default::default()
    }
}

fn http_filter_chain(stat_prefix: &str, route_config_name: &str) -> FilterChain {
    FilterChain {
        filters: vec![Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(ConfigType::TypedConfig(any(
                type_url::HTTP_CONNECTION_MANAGER,
                &hcm(stat_prefix, route_config_name),
            ))),
        }],
        ..Default::default()
    }
}

fn tcp_passthrough_chain() -> FilterChain {
    use tributary_proto::envoy::envoy::extensions::filters::network::tcp_proxy::v3::{
        TcpProxy, tcp_proxy::ClusterSpecifier as TcpCluster,
    };
    let proxy = TcpProxy {
        stat_prefix: PASSTHROUGH_CLUSTER.into(),
        cluster_specifier: Some(TcpCluster::Cluster(PASSTHROUGH_CLUSTER.into())),
        ..Default::default()
    };
    FilterChain {
        filters: vec![Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: Some(ConfigType::TypedConfig(any(
                "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                &proxy,
            ))),
        }],
        ..Default::default()
    }
}

/// Domains of a service's virtual host: each host, and each host with `:port`.
fn domains(service: &Service, port: u16) -> Vec<String> {
    let mut d = Vec::with_capacity(service.hosts.len() * 2);
    for h in &service.hosts {
        d.push(h.clone());
        d.push(format!("{h}:{port}"));
    }
    d
}

/// The virtual host of `service`: rules of every Route naming one of its hosts (on
/// `route_port`, or any port when `None`), else a default route to `default_port`;
/// and whether it is that default route (no Route names the service: the virtual
/// host depends on the service alone).
fn virtual_host_and_kind(
    service: &Service,
    env: &Environment,
    route_port: Option<u16>,
    domain_port: u16,
) -> (VirtualHost, bool) {
    let mut routes = Vec::new();
    for route in &env.routes {
        let names_service = route.hosts.iter().any(|h| service.hosts.contains(h));
        if names_service && route_port.is_none_or(|p| p == route.port) {
            routes.extend(route.rules.iter().map(|r| route_rule(r, env)));
        }
    }
    let default_route = routes.is_empty();
    if default_route {
        let port = route_port
            .or_else(|| {
                service
                    .ports
                    .iter()
                    .find(|p| p.protocol.is_http())
                    .map(|p| p.port)
            })
            .unwrap_or(domain_port);
        routes.push(PbRoute {
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(cluster_name(
                    port,
                    "",
                    service.canonical_host(),
                ))),
                ..Default::default()
            })),
            ..Default::default()
        });
    }
    let vh = VirtualHost {
        name: format!("{}:{domain_port}", service.canonical_host()),
        domains: domains(service, domain_port),
        routes,
        ..Default::default()
    };
    (vh, default_route)
}

fn gateway_routes(
    name: &str,
    env: &Environment,
    listener: &GatewayListener,
    cache: &mut VirtualHostCache,
) -> EncodedResource {
    let vhosts: Vec<bytes::Bytes> = env
        .services
        .values()
        .filter(|s| s.ports.iter().any(|p| p.protocol.is_http()))
        .filter(|s| s.hosts.iter().any(|h| listener.routes_host(h)))
        .map(|s| cache.get(s, env, None, listener.port))
        .collect();
    route_configuration(name, &vhosts)
}

fn destination_cluster(d: &Destination, env: &Environment) -> String {
    let host = env
        .services
        .get(&d.service)
        .map(|s| s.canonical_host())
        .unwrap_or_default();
    cluster_name(d.port, d.subset.as_deref().unwrap_or(""), host)
}

fn regex(pattern: &str) -> RegexMatcher {
    RegexMatcher {
        regex: pattern.to_string(),
        ..Default::default()
    }
}

fn route_rule(rule: &RouteRule, env: &Environment) -> PbRoute {
    let path = match &rule.path {
        PathMatch::Prefix(p) => PathSpecifier::Prefix(p.clone()),
        PathMatch::Exact(p) => PathSpecifier::Path(p.clone()),
        PathMatch::Regex(p) => PathSpecifier::SafeRegex(regex(p)),
    };
    let headers = rule
        .headers
        .iter()
        .map(|h| HeaderMatcher {
            name: h.name.clone(),
            header_match_specifier: Some(match &h.value {
                HeaderValueMatch::Present => HeaderMatchSpecifier::PresentMatch(true),
                HeaderValueMatch::Exact(v) => string_match(MatchPattern::Exact(v.clone())),
                HeaderValueMatch::Prefix(v) => string_match(MatchPattern::Prefix(v.clone())),
                HeaderValueMatch::Regex(v) => string_match(MatchPattern::SafeRegex(regex(v))),
            }),
            ..Default::default()
        })
        .collect();
    let weighted: Vec<&Destination> = rule.destinations.iter().filter(|d| d.weight > 0).collect();
    let cluster_specifier = if weighted.len() == 1 {
        ClusterSpecifier::Cluster(destination_cluster(weighted[0], env))
    } else {
        ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: weighted
                .iter()
                .map(|d| ClusterWeight {
                    name: destination_cluster(d, env),
                    weight: Some(UInt32Value { value: d.weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    PbRoute {
        r#match: Some(RouteMatch {
            path_specifier: Some(path),
            headers,
            ..Default::default()
        }),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(cluster_specifier),
            timeout: rule.timeout.map(|t| PbDuration {
                seconds: t.as_secs() as i64,
                nanos: t.subsec_nanos() as i32,
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn string_match(pattern: MatchPattern) -> HeaderMatchSpecifier {
    HeaderMatchSpecifier::StringMatch(StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    })
}

#[cfg(test)]
mod outlier_tests {
    use super::*;
    use crate::model::Protocol;

    #[test]
    fn every_eds_cluster_ejects_on_consecutive_gateway_failures() {
        for protocol in [Protocol::Http, Protocol::Grpc, Protocol::Tcp] {
            let port = ServicePort {
                name: "p".into(),
                port: 8080,
                protocol,
            };
            let c = Cluster::decode(
                encode(XdsType::Cluster, "c", &cluster("c", &port))
                    .body()
                    .as_ref(),
            )
            .unwrap();
            let od = c.outlier_detection.expect("outlier_detection");
            let v = |x: Option<UInt32Value>| x.map(|x| x.value);
            assert_eq!(v(od.consecutive_gateway_failure), Some(5));
            assert_eq!(v(od.enforcing_consecutive_gateway_failure), Some(100));
            assert_eq!(v(od.enforcing_consecutive_5xx), Some(0));
            assert_eq!(v(od.enforcing_success_rate), Some(0));
            assert_eq!(v(od.max_ejection_percent), Some(50));
            // gRFC A50's checks: percentages <= 100, valid durations.
            for d in [od.interval, od.base_ejection_time] {
                let d = d.unwrap();
                assert!(d.seconds > 0 && d.seconds <= 315_576_000_000 && d.nanos == 0);
            }
        }
        assert!(passthrough_cluster().outlier_detection.is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, Route};
    use tributary_proto::envoy::envoy::config::route::v3::RouteConfiguration;

    fn service(name: &str, port: u16) -> Service {
        Service {
            key: ObjectKey {
                namespace: "ns".into(),
                name: name.into(),
            },
            hosts: vec![format!("{name}.ns.svc.cluster.local"), format!("{name}.ns")],
            ports: vec![ServicePort {
                name: "http".into(),
                port,
                protocol: Protocol::Http,
            }],
            subsets: vec![],
            endpoints: vec![],
        }
    }

    fn env(services: &[Service], routes: Vec<Route>) -> Environment {
        Environment {
            services: services
                .iter()
                .map(|s| (s.key.clone(), s.clone()))
                .collect(),
            routes,
            ..Default::default()
        }
    }

    fn routes_of(g: &Generated) -> BTreeMap<String, EncodedResource> {
        g.iter()
            .filter(|(t, _)| *t == XdsType::Route)
            .map(|(_, r)| (r.name().to_string(), r.clone()))
            .collect()
    }

    #[test]
    fn route_tables_from_cached_virtual_hosts_match_the_typed_encoding() {
        let a = service("a", 80);
        let e = env(&[a.clone(), service("b", 80)], vec![]);
        let vhosts: Vec<VirtualHost> = e
            .services
            .values()
            .map(|s| virtual_host_and_kind(s, &e, Some(80), 80).0)
            .collect();
        let typed = RouteConfiguration {
            name: "80".into(),
            virtual_hosts: vhosts.clone(),
            ..Default::default()
        };
        let bytes: Vec<bytes::Bytes> = vhosts
            .iter()
            .map(|v| bytes::Bytes::from(v.encode_to_vec()))
            .collect();
        let ours = route_configuration("80", &bytes);
        assert_eq!(&ours.body()[..], &typed.encode_to_vec()[..]);
        assert_eq!(ours.version(), content_version(&typed.encode_to_vec()));
    }

    #[test]
    fn a_warm_cache_encodes_only_changed_services_and_yields_the_same_tables() {
        let mut cache = VirtualHostCache::default();
        let services: Vec<Service> = (0..50).map(|i| service(&format!("s{i}"), 80)).collect();
        let e = env(&services, vec![]);
        let mut first = Generated::new();
        shared_resources_cached(&e, &mut cache, &mut first);
        assert_eq!(cache.encoded, 50);
        // One service gains a port: only it is encoded again (after invalidation).
        let mut changed = services.clone();
        changed[7].ports.push(ServicePort {
            name: "http-alt".into(),
            port: 8080,
            protocol: Protocol::Http,
        });
        let e2 = env(&changed, vec![]);
        cache.invalidate(&changed[7].key);
        let mut warm = Generated::new();
        shared_resources_cached(&e2, &mut cache, &mut warm);
        assert_eq!(cache.encoded, 52, "s7 on port 80 and on 8080");
        let mut cold = Generated::new();
        shared_resources(&e2, &mut cold);
        assert_eq!(routes_of(&warm), routes_of(&cold));
        // A Route naming a service: its virtual host is never cached.
        let route = Route {
            key: ObjectKey {
                namespace: "ns".into(),
                name: "r".into(),
            },
            hosts: vec!["s3.ns".into()],
            port: 80,
            rules: vec![RouteRule {
                path: PathMatch::Prefix("/".into()),
                headers: vec![],
                destinations: vec![Destination {
                    service: changed[4].key.clone(),
                    port: 80,
                    subset: None,
                    weight: 100,
                }],
                timeout: None,
            }],
        };
        let e3 = env(&changed, vec![route]);
        cache.clear();
        let mut warm = Generated::new();
        shared_resources_cached(&e3, &mut cache, &mut warm);
        let before = cache.encoded;
        shared_resources_cached(&e3, &mut cache, &mut Generated::new());
        assert_eq!(cache.encoded, before + 1, "only the routed service again");
        let mut cold = Generated::new();
        shared_resources(&e3, &mut cold);
        assert_eq!(routes_of(&warm), routes_of(&cold));
    }
}
