//! Mesh mTLS in generated resources: the transport sockets of sidecars' outbound
//! clusters and their inbound listeners, with certificates from SDS over ADS.
//!
//! Nothing here holds key material: resources name the secrets ([`DEFAULT_SECRET`],
//! [`ROOT_SECRET`]) and the proxy fetches them on its own ADS stream, where the hub
//! serves each proxy its own identity's certificate (`xds::secrets`). So a cluster or
//! listener is the same bytes for every proxy of an environment, and is generated
//! once per environment (inbound listeners once per sidecar scope), never per proxy.
//!
//! Peer checks (docs/security.md, "SDS and mesh mTLS"):
//! - **Outbound** (client side): the server's certificate must chain to the mesh
//!   roots (`ROOTCA`) and carry a URI SAN starting with
//!   `spiffe://{td}/env/{env}/ns/{namespace}/`, the destination service's namespace.
//!   The model does not know which service accounts a service's endpoints run as
//!   (EndpointSlices do not say), so the namespace is the narrowest claim that holds
//!   for every endpoint; a workload of another namespace or environment cannot
//!   answer for the service.
//! - **Inbound** (server side): a client certificate is required, must chain to the
//!   mesh roots and carry a URI SAN of the same environment,
//!   `spiffe://{td}/env/{env}/` (workloads and gateways alike): environments are the
//!   isolation boundary; finer rules are authorization's job, not the handshake's.

use std::collections::BTreeSet;
use std::sync::Arc;

use tributary_proto::envoy::envoy::config::cluster::v3::{
    Cluster, cluster::ClusterDiscoveryType, cluster::DiscoveryType, cluster::LbPolicy,
};
use tributary_proto::envoy::envoy::config::core::v3::{DataSource, data_source::Specifier};
use tributary_proto::envoy::envoy::config::core::v3::{
    Http2ProtocolOptions, TransportSocket, transport_socket,
};
use tributary_proto::envoy::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints,
    lb_endpoint::HostIdentifier,
};
use tributary_proto::envoy::envoy::config::listener::v3::{
    Filter, FilterChain, Listener, filter::ConfigType,
};
use tributary_proto::envoy::envoy::config::route::v3::{
    Route as PbRoute, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route::Action,
    route_action::ClusterSpecifier, route_match::PathSpecifier,
};
use tributary_proto::envoy::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::ForwardClientCertDetails,
    http_connection_manager::RouteSpecifier, http_connection_manager::SetCurrentClientCertDetails,
};
use tributary_proto::envoy::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret,
    SubjectAltNameMatcher, TlsCertificate, UpstreamTlsContext,
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    secret,
    subject_alt_name_matcher::SanType,
};
use tributary_proto::envoy::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options::ExplicitHttpConfig,
    http_protocol_options::UpstreamProtocolOptions,
    http_protocol_options::explicit_http_config::ProtocolConfig,
};
use tributary_proto::envoy::envoy::r#type::matcher::v3::{
    StringMatcher, string_matcher::MatchPattern,
};
use tributary_proto::envoy::google::protobuf::{BoolValue, Duration as PbDuration};
use tributary_proto::type_url;

use super::{Generated, ads_source, any, encode, router_filter, socket};
use crate::model::{Credential, InboundPort, ObjectKey, Protocol, SidecarScope};
use crate::xds::XdsType;

/// The SDS secret holding a proxy's own certificate and key (its `tls_certificate`).
pub const DEFAULT_SECRET: &str = "default";
/// The SDS secret holding the mesh's trust bundle (a `validation_context`).
pub const ROOT_SECRET: &str = "ROOTCA";

const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";
const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const DOWNSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Mesh mTLS of one environment, when it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshTls {
    pub trust_domain: String,
    pub environment: String,
}

impl MeshTls {
    /// The URI SAN prefix of the workloads of `namespace` in this environment.
    pub fn namespace_prefix(&self, namespace: &str) -> String {
        format!(
            "spiffe://{}/env/{}/ns/{namespace}/",
            self.trust_domain, self.environment
        )
    }

    /// The URI SAN prefix of every workload and gateway of this environment.
    pub fn environment_prefix(&self) -> String {
        format!("spiffe://{}/env/{}/", self.trust_domain, self.environment)
    }
}

/// An SDS reference to `name`, fetched over the proxy's ADS stream.
fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ads_source()),
    }
}

/// Our certificate from SDS, and the peer's checked against the mesh roots (from
/// SDS) and a URI SAN prefix.
fn common_tls(san_prefix: String, alpn: &[&str]) -> CommonTlsContext {
    let san = SubjectAltNameMatcher {
        san_type: SanType::Uri as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(MatchPattern::Prefix(san_prefix)),
            ignore_case: false,
        }),
        ..Default::default()
    };
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(DEFAULT_SECRET)],
        validation_context_type: Some(ValidationContextType::CombinedValidationContext(
            CombinedCertificateValidationContext {
                default_validation_context: Some(CertificateValidationContext {
                    match_typed_subject_alt_names: vec![san],
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(sds(ROOT_SECRET)),
                ..Default::default()
            },
        )),
        alpn_protocols: alpn.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

fn transport_socket(type_url: &str, config: &impl prost::Message) -> TransportSocket {
    TransportSocket {
        name: TLS_TRANSPORT_SOCKET.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(
            type_url, config,
        ))),
    }
}

/// The transport socket of an outbound cluster to a service of `namespace`.
pub fn upstream(tls: &MeshTls, namespace: &str, protocol: Protocol) -> TransportSocket {
    let alpn: &[&str] = match protocol {
        Protocol::Http2 | Protocol::Grpc => &["h2"],
        Protocol::Http => &["http/1.1"],
        Protocol::Tcp => &[],
    };
    let context = UpstreamTlsContext {
        common_tls_context: Some(common_tls(tls.namespace_prefix(namespace), alpn)),
        ..Default::default()
    };
    transport_socket(UPSTREAM_TLS, &context)
}

/// The transport socket of an inbound listener: a client certificate of this
/// environment is required.
fn downstream(tls: &MeshTls, protocol: Protocol) -> TransportSocket {
    let alpn: &[&str] = match protocol {
        Protocol::Tcp => &[],
        _ => &["h2", "http/1.1"],
    };
    let context = DownstreamTlsContext {
        common_tls_context: Some(common_tls(tls.environment_prefix(), alpn)),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    transport_socket(DOWNSTREAM_TLS, &context)
}

/// The inbound listener of `port` for sidecars of `scope`.
pub fn inbound_listener_name(scope: &str, port: u16) -> String {
    format!("sidecar|{scope}|inbound|{port}")
}

/// The cluster an inbound listener forwards to: the local app.
pub fn inbound_cluster_name(scope: &str, port: u16) -> String {
    format!("inbound|{port}|{scope}")
}

/// Each inbound port of `scope`: a listener (TLS-terminating when `tls` is on) and a
/// static cluster to the local app. Adds their names to the scope's wildcard sets.
pub fn inbound(
    scope: &SidecarScope,
    tls: Option<&MeshTls>,
    out: &mut Generated,
    clusters: &mut BTreeSet<Arc<str>>,
    listeners: &mut BTreeSet<Arc<str>>,
) {
    for p in &scope.inbound {
        let cluster_name = inbound_cluster_name(&scope.name, p.port);
        let c = inbound_cluster(&cluster_name, p);
        out.push((
            XdsType::Cluster,
            encode(XdsType::Cluster, &cluster_name, &c),
        ));
        clusters.insert(Arc::from(cluster_name.as_str()));

        let listener_name = inbound_listener_name(&scope.name, p.port);
        let stat_prefix = format!("inbound_{}", p.port);
        let filter = if p.protocol.is_http() {
            Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(ConfigType::TypedConfig(any(
                    type_url::HTTP_CONNECTION_MANAGER,
                    &inbound_hcm(&stat_prefix, &cluster_name, tls.is_some()),
                ))),
            }
        } else {
            tcp_proxy(&stat_prefix, &cluster_name)
        };
        let l = Listener {
            name: listener_name.clone(),
            address: Some(socket(p.bind, p.port)),
            filter_chains: vec![FilterChain {
                filters: vec![filter],
                transport_socket: tls.map(|t| downstream(t, p.protocol)),
                ..Default::default()
            }],
            ..Default::default()
        };
        out.push((
            XdsType::Listener,
            encode(XdsType::Listener, &listener_name, &l),
        ));
        listeners.insert(Arc::from(listener_name.as_str()));
    }
}

/// A static cluster to the local app of `p` (plaintext: it is on the same host).
fn inbound_cluster(name: &str, p: &InboundPort) -> Cluster {
    let mut c = Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(PbDuration {
            seconds: 1,
            nanos: 0,
        }),
        lb_policy: LbPolicy::RoundRobin as i32,
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.to_string(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(PbEndpoint {
                        address: Some(socket(p.target, p.target_port)),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    if p.protocol.is_http2() {
        let options = HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                        Http2ProtocolOptions::default(),
                    )),
                },
            )),
            ..Default::default()
        };
        c.typed_extension_protocol_options.insert(
            HTTP_PROTOCOL_OPTIONS.into(),
            any(
                &format!("type.googleapis.com/{HTTP_PROTOCOL_OPTIONS}"),
                &options,
            ),
        );
    }
    c
}

/// HTTP to the local app. With mTLS the app is told who called: the client's URI SAN
/// in `x-forwarded-client-cert` (set by the sidecar, never passed through from the
/// caller).
fn inbound_hcm(stat_prefix: &str, cluster: &str, mtls: bool) -> HttpConnectionManager {
    let route = PbRoute {
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.to_string())),
            ..Default::default()
        })),
        ..Default::default()
    };
    HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        route_specifier: Some(RouteSpecifier::RouteConfig(RouteConfiguration {
            name: cluster.to_string(),
            virtual_hosts: vec![VirtualHost {
                name: cluster.to_string(),
                domains: vec!["*".into()],
                routes: vec![route],
                ..Default::default()
            }],
            ..Default::default()
        })),
        http_filters: vec![router_filter()],
        forward_client_cert_details: if mtls {
            ForwardClientCertDetails::SanitizeSet as i32
        } else {
            ForwardClientCertDetails::Sanitize as i32
        },
        set_current_client_cert_details: mtls.then(|| SetCurrentClientCertDetails {
            uri: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn tcp_proxy(stat_prefix: &str, cluster: &str) -> Filter {
    use tributary_proto::envoy::envoy::extensions::filters::network::tcp_proxy::v3::{
        TcpProxy, tcp_proxy::ClusterSpecifier as TcpCluster,
    };
    let proxy = TcpProxy {
        stat_prefix: stat_prefix.to_string(),
        cluster_specifier: Some(TcpCluster::Cluster(cluster.to_string())),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(ConfigType::TypedConfig(any(
            "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            &proxy,
        ))),
    }
}

// ---- gateways: operator-supplied certificates -------------------------------------

/// The SDS secret of a `Credential`: `credential/{namespace}/{name}`.
pub fn credential_secret_name(key: &ObjectKey) -> String {
    format!("credential/{}/{}", key.namespace, key.name)
}

/// A `Credential` as a `tls_certificate` secret. Served only to the gateways whose
/// listeners name it (`xds::secrets`), never in a config dump.
pub fn credential_secret(name: &str, credential: &Credential) -> Secret {
    let inline = |s: &str| DataSource {
        specifier: Some(Specifier::InlineString(s.to_string())),
        ..Default::default()
    };
    Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(&credential.certificate_pem)),
            private_key: Some(inline(&credential.private_key_pem)),
            ..Default::default()
        })),
    }
}

/// The transport socket of a gateway listener serving `secret` (HTTPS; clients are
/// not asked for certificates).
pub fn gateway_tls(secret: &str) -> TransportSocket {
    let context = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds(secret)],
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    transport_socket(DOWNSTREAM_TLS, &context)
}
