//! xDS resources → the proxy's typed config: the only place that reads protobuf.
//!
//! Each function returns the typed resource, or the reason the proxy cannot honour
//! it: that reason goes into the NACK's `error_detail` next to the resource's name.
//! A field that would change what the proxy does, and that it does not implement, is
//! a reason to NACK: nothing the hub sends is silently ignored. The supported set is
//! what `controlplane/src/xds/generate.rs` emits, plus the common matchers and
//! policies listed in `docs/proxy.md`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tributary_proto::envoy::envoy::config::cluster::v3::{
    Cluster as PbCluster, cluster::ClusterDiscoveryType, cluster::DiscoveryType,
    cluster::LbPolicy as PbLb, cluster::common_lb_config::LocalityConfigSpecifier,
};
use tributary_proto::envoy::envoy::config::core::v3::{
    Address, ConfigSource, HealthStatus, RoutingPriority, address,
    config_source::ConfigSourceSpecifier, socket_address::PortSpecifier,
};
use tributary_proto::envoy::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, lb_endpoint::HostIdentifier,
};
use tributary_proto::envoy::envoy::config::listener::v3::{Listener, filter::ConfigType};
use tributary_proto::envoy::envoy::config::route::v3::{
    HeaderMatcher, RetryPolicy as PbRetry, Route as PbRoute, RouteConfiguration,
    header_matcher::HeaderMatchSpecifier, route::Action, route_action::ClusterSpecifier,
    route_match::PathSpecifier,
};
use tributary_proto::envoy::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::CodecType,
    http_connection_manager::ForwardClientCertDetails, http_connection_manager::RouteSpecifier,
    http_filter::ConfigType as HttpFilterConfig,
};
use tributary_proto::envoy::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy::ClusterSpecifier as TcpCluster,
};
use tributary_proto::envoy::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options::UpstreamProtocolOptions,
    http_protocol_options::explicit_http_config::ProtocolConfig,
};
use tributary_proto::envoy::envoy::r#type::matcher::v3::{
    RegexMatcher, string_matcher::MatchPattern,
};
use tributary_proto::envoy::google::protobuf::{Any, Duration as PbDuration};
use tributary_proto::type_url;

use crate::cluster::{
    Assignment, ClusterDef, EndpointDef, LbPolicy, Limits, LocalityEndpoints, OutlierConfig,
};
use crate::config::{
    ClusterChoice, Codec, HeaderMatch, HeaderValueMatch, InlineRoutes, ListenerConfig,
    NetworkFilter, PathMatch, RetryPolicy, Route, RouteAction, RouteTable, VirtualHost, Xfcc,
};

pub const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HTTP_PROTOCOL_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const HTTP_PROTOCOL_OPTIONS: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// Envoy's route timeout when a route names none.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a resource cannot be honoured (goes into the NACK next to its name).
pub type Reason = String;

/// Decodes an `Any` of the expected type.
pub fn decode<T: Message + Default>(any: &Any, expected: &str) -> Result<T, Reason> {
    if any.type_url != expected {
        return Err(format!(
            "type {} where {expected} was expected",
            any.type_url
        ));
    }
    T::decode(any.value.as_slice()).map_err(|e| format!("cannot decode {expected}: {e}"))
}

fn duration(d: &PbDuration, field: &str) -> Result<Duration, Reason> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(format!("{field} is negative"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

fn socket_address(a: Option<&Address>, field: &str) -> Result<SocketAddr, Reason> {
    match a.and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => {
            if s.protocol != 0 {
                return Err(format!("{field}: only TCP socket addresses are supported"));
            }
            let ip: IpAddr = s.address.parse().map_err(|_| {
                format!(
                    "{field}: {:?} is not an IP address (DNS names are not supported)",
                    s.address
                )
            })?;
            let port = match s.port_specifier {
                Some(PortSpecifier::PortValue(p)) if p <= u32::from(u16::MAX) => p as u16,
                Some(PortSpecifier::PortValue(p)) => {
                    return Err(format!("{field}: port {p} out of range"));
                }
                _ => return Err(format!("{field}: named ports are not supported")),
            };
            Ok(SocketAddr::new(ip, port))
        }
        Some(_) => Err(format!(
            "{field}: only socket addresses are supported (not pipes or internal addresses)"
        )),
        None => Err(format!("{field} is missing")),
    }
}

fn ads_only(source: Option<&ConfigSource>, what: &str) -> Result<(), Reason> {
    match source.and_then(|s| s.config_source_specifier.as_ref()) {
        Some(ConfigSourceSpecifier::Ads(_)) => Ok(()),
        _ => Err(format!("{what}: only an ADS config source is supported")),
    }
}

/// A Listener from LDS.
pub fn listener(l: &Listener) -> Result<ListenerConfig, Reason> {
    if l.api_listener.is_some() {
        return Err("API listeners are for proxyless gRPC clients, not for a proxy".into());
    }
    if !l.listener_filters.is_empty() {
        let names: Vec<&str> = l.listener_filters.iter().map(|f| f.name.as_str()).collect();
        return Err(format!(
            "listener filters are not supported ({})",
            names.join(", ")
        ));
    }
    if l.default_filter_chain.is_some() || l.filter_chain_matcher.is_some() {
        return Err("default_filter_chain and filter_chain_matcher are not supported".into());
    }
    if !l.additional_addresses.is_empty() {
        return Err("additional_addresses are not supported".into());
    }
    let address = socket_address(l.address.as_ref(), "address")?;
    let [chain] = l.filter_chains.as_slice() else {
        return Err(format!(
            "exactly one filter chain is supported, got {}",
            l.filter_chains.len()
        ));
    };
    if chain
        .filter_chain_match
        .as_ref()
        .is_some_and(|m| *m != Default::default())
    {
        return Err("filter_chain_match is not supported".into());
    }
    let tls = chain
        .transport_socket
        .as_ref()
        .map(crate::tls::downstream)
        .transpose()?;
    let [filter] = chain.filters.as_slice() else {
        return Err(format!(
            "exactly one network filter is supported, got {}",
            chain.filters.len()
        ));
    };
    let Some(ConfigType::TypedConfig(any)) = &filter.config_type else {
        return Err(format!(
            "network filter {:?} has no typed_config",
            filter.name
        ));
    };
    let filter = match any.type_url.as_str() {
        type_url::HTTP_CONNECTION_MANAGER => {
            http_connection_manager(&decode(any, type_url::HTTP_CONNECTION_MANAGER)?)?
        }
        TCP_PROXY => tcp_proxy(&decode(any, TCP_PROXY)?)?,
        other => {
            return Err(format!(
                "unsupported network filter {:?} ({other})",
                filter.name
            ));
        }
    };
    Ok(ListenerConfig {
        name: Arc::from(l.name.as_str()),
        address,
        bind_to_port: l.bind_to_port.as_ref().is_none_or(|b| b.value),
        use_original_dst: l.use_original_dst.as_ref().is_some_and(|b| b.value),
        filter,
        tls,
    })
}

fn http_connection_manager(h: &HttpConnectionManager) -> Result<NetworkFilter, Reason> {
    let (route_config, inline) = match &h.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => {
            ads_only(rds.config_source.as_ref(), "rds.config_source")?;
            (Arc::from(rds.route_config_name.as_str()), None)
        }
        Some(RouteSpecifier::RouteConfig(rc)) => {
            let table = route_table(rc).map_err(|e| format!("route_config: {e}"))?;
            (
                Arc::from(rc.name.as_str()),
                Some(InlineRoutes {
                    table: Arc::new(table),
                    encoded: Arc::from(rc.encode_to_vec()),
                }),
            )
        }
        _ => {
            return Err(
                "only RDS and inline route tables are supported (not scoped routes)".into(),
            );
        }
    };
    let xfcc = client_cert_details(h)?;
    let codec = match CodecType::try_from(h.codec_type) {
        Ok(CodecType::Auto) => Codec::Auto,
        Ok(CodecType::Http1) => Codec::Http1,
        Ok(CodecType::Http2) => Codec::Http2,
        _ => return Err(format!("codec_type {} is not supported", h.codec_type)),
    };
    let mut router = false;
    for (i, f) in h.http_filters.iter().enumerate() {
        let url = match &f.config_type {
            Some(HttpFilterConfig::TypedConfig(a)) => a.type_url.as_str(),
            _ => "",
        };
        if url == type_url::ROUTER && i + 1 == h.http_filters.len() {
            router = true;
        } else {
            return Err(format!("unsupported HTTP filter {:?} ({url})", f.name));
        }
    }
    if !router {
        return Err("the HTTP filter chain must end in the router filter".into());
    }
    if h.upgrade_configs
        .iter()
        .any(|u| u.enabled.as_ref().is_none_or(|e| e.value))
    {
        return Err("upgrades (websocket, CONNECT) are not supported".into());
    }
    Ok(NetworkFilter::Http {
        route_config,
        codec,
        inline,
        xfcc,
    })
}

/// `forward_client_cert_details` and `set_current_client_cert_details`: the element
/// the proxy adds names the client by its URI SAN (with `By` and `Hash`, as Envoy).
fn client_cert_details(h: &HttpConnectionManager) -> Result<Xfcc, Reason> {
    let xfcc = match ForwardClientCertDetails::try_from(h.forward_client_cert_details) {
        Ok(ForwardClientCertDetails::Sanitize) => Xfcc::Sanitize,
        Ok(ForwardClientCertDetails::ForwardOnly) => Xfcc::ForwardOnly,
        Ok(ForwardClientCertDetails::AppendForward) => Xfcc::AppendForward,
        Ok(ForwardClientCertDetails::SanitizeSet) => Xfcc::SanitizeSet,
        Ok(ForwardClientCertDetails::AlwaysForwardOnly) => Xfcc::AlwaysForwardOnly,
        Err(_) => {
            return Err(format!(
                "forward_client_cert_details {} is unknown",
                h.forward_client_cert_details
            ));
        }
    };
    if let Some(d) = &h.set_current_client_cert_details {
        let mut unsupported = Vec::new();
        for (set, name) in [
            (d.subject.as_ref().is_some_and(|b| b.value), "subject"),
            (d.cert, "cert"),
            (d.chain, "chain"),
            (d.dns, "dns"),
        ] {
            if set {
                unsupported.push(format!("set_current_client_cert_details.{name}"));
            }
        }
        if !unsupported.is_empty() {
            return Err(format!("{} not supported (uri is)", unsupported.join(", ")));
        }
        if !d.uri && matches!(xfcc, Xfcc::AppendForward | Xfcc::SanitizeSet) {
            return Err(
                "set_current_client_cert_details without uri is not supported (the element names the client by its URI SAN)"
                    .into(),
            );
        }
    }
    Ok(xfcc)
}

fn tcp_proxy(t: &TcpProxy) -> Result<NetworkFilter, Reason> {
    match &t.cluster_specifier {
        Some(TcpCluster::Cluster(c)) => Ok(NetworkFilter::Tcp {
            cluster: Arc::from(c.as_str()),
        }),
        _ => Err("tcp_proxy: only a single cluster is supported (not weighted clusters)".into()),
    }
}

fn compile_regex(r: &RegexMatcher, field: &str) -> Result<regex::Regex, Reason> {
    regex::RegexBuilder::new(&format!("^(?:{})$", r.regex))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("{field}: invalid regex {:?}: {e}", r.regex))
}

/// A RouteConfiguration from RDS, its matchers compiled.
// Deprecated fields are read on purpose: what a client is sent, it must honour or NACK.
#[allow(deprecated)]
pub fn route_table(rc: &RouteConfiguration) -> Result<RouteTable, Reason> {
    if rc.vhds.is_some() {
        return Err("VHDS is not supported".into());
    }
    if !rc.request_headers_to_add.is_empty()
        || !rc.response_headers_to_add.is_empty()
        || !rc.request_headers_to_remove.is_empty()
        || !rc.response_headers_to_remove.is_empty()
    {
        return Err("header mutations are not supported".into());
    }
    let mut table = RouteTable {
        name: Arc::from(rc.name.as_str()),
        virtual_hosts: Vec::with_capacity(rc.virtual_hosts.len()),
        exact: HashMap::new(),
        suffixes: Vec::new(),
        prefixes: Vec::new(),
        any: None,
    };
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let at = |e: String| format!("virtual host {:?}: {e}", vh.name);
        if !vh.request_headers_to_add.is_empty()
            || !vh.response_headers_to_add.is_empty()
            || !vh.request_headers_to_remove.is_empty()
            || !vh.response_headers_to_remove.is_empty()
            || !vh.typed_per_filter_config.is_empty()
            || !vh.rate_limits.is_empty()
            || vh.cors.is_some()
            || vh.hedge_policy.is_some()
            || vh.require_tls != 0
            || !vh.request_mirror_policies.is_empty()
        {
            return Err(at("header mutations, per-filter config, rate limits, CORS, hedging, require_tls and mirrors are not supported".into()));
        }
        let vh_retry = vh
            .retry_policy
            .as_ref()
            .map(retry_policy)
            .transpose()
            .map_err(at)?;
        for d in &vh.domains {
            let d = d.to_ascii_lowercase();
            let duplicate = if d == "*" {
                table.any.replace(i).is_some()
            } else if let Some(s) = d.strip_prefix('*') {
                let dup = table.suffixes.iter().any(|(x, _)| x == s);
                table.suffixes.push((s.to_string(), i));
                dup
            } else if let Some(p) = d.strip_suffix('*') {
                let dup = table.prefixes.iter().any(|(x, _)| x == p);
                table.prefixes.push((p.to_string(), i));
                dup
            } else {
                table.exact.insert(d.clone(), i).is_some()
            };
            if duplicate {
                // Envoy rejects a domain that two virtual hosts (or one, twice) claim.
                return Err(at(format!("domain {d:?} is claimed twice")));
            }
        }
        let routes = vh
            .routes
            .iter()
            .enumerate()
            .map(|(ri, r)| route(r, vh_retry.as_ref()).map_err(|e| at(format!("route {ri}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        table.virtual_hosts.push(VirtualHost {
            name: vh.name.clone(),
            routes,
        });
    }
    table
        .suffixes
        .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    table
        .prefixes
        .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    Ok(table)
}

// Deprecated fields are read on purpose: what a client is sent, it must honour or NACK.
#[allow(deprecated)]
fn route(r: &PbRoute, vh_retry: Option<&RetryPolicy>) -> Result<Route, Reason> {
    let m = r.r#match.as_ref().ok_or("no match")?;
    if m.case_sensitive.as_ref().is_some_and(|c| !c.value) {
        return Err("case-insensitive path matching is not supported".into());
    }
    if m.runtime_fraction.is_some()
        || !m.query_parameters.is_empty()
        || !m.cookies.is_empty()
        || m.tls_context.is_some()
        || !m.dynamic_metadata.is_empty()
        || !m.filter_state.is_empty()
    {
        return Err("runtime fractions, query parameter, cookie, TLS context, metadata and filter state matches are not supported".into());
    }
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(PathSpecifier::SafeRegex(re)) => PathMatch::Regex(compile_regex(re, "path regex")?),
        Some(_) => {
            return Err("only prefix, exact path and safe_regex path matches are supported".into());
        }
        None => return Err("no path match".into()),
    };
    let headers = m
        .headers
        .iter()
        .map(header_match)
        .collect::<Result<Vec<_>, _>>()?;
    if !r.typed_per_filter_config.is_empty()
        || !r.request_headers_to_add.is_empty()
        || !r.response_headers_to_add.is_empty()
        || !r.request_headers_to_remove.is_empty()
        || !r.response_headers_to_remove.is_empty()
    {
        return Err("header mutations and per-filter config are not supported".into());
    }
    let a = match &r.action {
        Some(Action::Route(a)) => a,
        Some(_) => {
            return Err(
                "only route actions are supported (not redirects or direct responses)".into(),
            );
        }
        None => return Err("no action".into()),
    };
    if !a.prefix_rewrite.is_empty()
        || a.regex_rewrite.is_some()
        || a.path_rewrite_policy.is_some()
        || !a.path_rewrite.is_empty()
        || a.host_rewrite_specifier.is_some()
        || !a.hash_policy.is_empty()
        || !a.request_mirror_policies.is_empty()
        || !a.rate_limits.is_empty()
        || a.hedge_policy.is_some()
        || a.cors.is_some()
        || a.metadata_match.is_some()
        || !a.upgrade_configs.is_empty()
        || a.retry_policy_typed_config.is_some()
        || a.max_stream_duration.is_some()
        || a.internal_redirect_policy.is_some()
        || a.priority != RoutingPriority::Default as i32
    {
        return Err("rewrites, hash policies, mirrors, rate limits, hedging, CORS, metadata matches, upgrades, stream durations, redirects and non-default priorities are not supported".into());
    }
    let clusters = match &a.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => ClusterChoice::One(Arc::from(c.as_str())),
        Some(ClusterSpecifier::WeightedClusters(w)) => {
            let mut cumulative = 0u64;
            let mut items = Vec::with_capacity(w.clusters.len());
            for c in &w.clusters {
                if !c.cluster_header.is_empty()
                    || c.metadata_match.is_some()
                    || !c.request_headers_to_add.is_empty()
                    || !c.request_headers_to_remove.is_empty()
                    || !c.response_headers_to_add.is_empty()
                    || !c.response_headers_to_remove.is_empty()
                    || !c.typed_per_filter_config.is_empty()
                {
                    return Err(format!("weighted cluster {:?}: only name and weight are supported", c.name));
                }
                let weight = c.weight.as_ref().map_or(0, |w| u64::from(w.value));
                if weight > 0 {
                    cumulative += weight;
                    items.push((Arc::from(c.name.as_str()), cumulative));
                }
            }
            if items.is_empty() {
                return Err("weighted clusters with no positive weight".into());
            }
            ClusterChoice::Weighted(items)
        }
        _ => return Err("only cluster and weighted_clusters are supported (not cluster_header or cluster specifier plugins)".into()),
    };
    let timeout = match &a.timeout {
        Some(t) => {
            let t = duration(t, "timeout")?;
            (!t.is_zero()).then_some(t)
        }
        None => Some(DEFAULT_ROUTE_TIMEOUT),
    };
    let retry = match &a.retry_policy {
        Some(p) => Some(retry_policy(p)?),
        None => vh_retry.cloned(),
    };
    Ok(Route {
        path,
        headers,
        grpc: m.grpc.is_some(),
        action: RouteAction {
            clusters,
            timeout,
            retry,
        },
    })
}

// Deprecated fields are read on purpose: what a client is sent, it must honour or NACK.
#[allow(deprecated)]
fn header_match(h: &HeaderMatcher) -> Result<HeaderMatch, Reason> {
    let name = hyper::http::HeaderName::from_bytes(h.name.as_bytes())
        .map_err(|_| format!("header match: {:?} is not a header name", h.name))?;
    if h.treat_missing_header_as_empty {
        return Err(format!(
            "header match {:?}: treat_missing_header_as_empty is not supported",
            h.name
        ));
    }
    let value = match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::PresentMatch(p)) => HeaderValueMatch::Present(*p),
        Some(HeaderMatchSpecifier::ExactMatch(v)) => HeaderValueMatch::Exact(v.clone()),
        Some(HeaderMatchSpecifier::PrefixMatch(v)) => HeaderValueMatch::Prefix(v.clone()),
        Some(HeaderMatchSpecifier::SuffixMatch(v)) => HeaderValueMatch::Suffix(v.clone()),
        Some(HeaderMatchSpecifier::ContainsMatch(v)) => HeaderValueMatch::Contains(v.clone()),
        Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => {
            HeaderValueMatch::Regex(compile_regex(r, "header regex")?)
        }
        Some(HeaderMatchSpecifier::StringMatch(s)) => {
            if s.ignore_case {
                return Err(format!(
                    "header match {:?}: ignore_case is not supported",
                    h.name
                ));
            }
            match &s.match_pattern {
                Some(MatchPattern::Exact(v)) => HeaderValueMatch::Exact(v.clone()),
                Some(MatchPattern::Prefix(v)) => HeaderValueMatch::Prefix(v.clone()),
                Some(MatchPattern::Suffix(v)) => HeaderValueMatch::Suffix(v.clone()),
                Some(MatchPattern::Contains(v)) => HeaderValueMatch::Contains(v.clone()),
                Some(MatchPattern::SafeRegex(r)) => {
                    HeaderValueMatch::Regex(compile_regex(r, "header regex")?)
                }
                _ => {
                    return Err(format!(
                        "header match {:?}: unsupported string matcher",
                        h.name
                    ));
                }
            }
        }
        Some(HeaderMatchSpecifier::RangeMatch(_)) => {
            return Err(format!(
                "header match {:?}: range matches are not supported",
                h.name
            ));
        }
        // No specifier: Envoy matches presence.
        None => HeaderValueMatch::Present(true),
    };
    Ok(HeaderMatch {
        name,
        value,
        invert: h.invert_match,
    })
}

fn retry_policy(p: &PbRetry) -> Result<RetryPolicy, Reason> {
    let mut r = RetryPolicy {
        num_retries: p.num_retries.as_ref().map_or(1, |n| n.value),
        on_5xx: false,
        on_gateway_error: false,
        on_connect_failure: false,
        on_reset: false,
        status_codes: Vec::new(),
        per_try_timeout: p
            .per_try_timeout
            .as_ref()
            .map(|d| duration(d, "per_try_timeout"))
            .transpose()?,
    };
    for token in p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        match token {
            "5xx" => r.on_5xx = true,
            "gateway-error" => r.on_gateway_error = true,
            "connect-failure" => r.on_connect_failure = true,
            "reset" => r.on_reset = true,
            "retriable-status-codes" => {
                r.status_codes = p
                    .retriable_status_codes
                    .iter()
                    .map(|c| {
                        u16::try_from(*c)
                            .map_err(|_| format!("retriable status code {c} out of range"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            other => {
                return Err(format!(
                    "retry_on {other:?} is not supported (5xx, gateway-error, connect-failure, reset, retriable-status-codes are)"
                ));
            }
        }
    }
    if p.retry_priority.is_some()
        || !p.retry_host_predicate.is_empty()
        || !p.retriable_headers.is_empty()
        || !p.retriable_request_headers.is_empty()
        || p.rate_limited_retry_back_off.is_some()
        || p.per_try_idle_timeout.is_some()
    {
        return Err("retry priorities, host predicates, retriable headers, rate-limited back-off and per-try idle timeouts are not supported".into());
    }
    Ok(r)
}

/// A Cluster from CDS.
// Deprecated fields are read on purpose: what a client is sent, it must honour or NACK.
#[allow(deprecated)]
pub fn cluster(c: &PbCluster) -> Result<ClusterDef, Reason> {
    let kind = match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => {
            DiscoveryType::try_from(*t).map_err(|_| format!("discovery type {t} unknown"))?
        }
        Some(ClusterDiscoveryType::ClusterType(t)) => {
            return Err(format!("custom cluster type {:?} is not supported", t.name));
        }
        None => DiscoveryType::Static,
    };
    let (eds_name, static_assignment) = match kind {
        DiscoveryType::Eds => {
            let eds = c.eds_cluster_config.as_ref();
            ads_only(
                eds.and_then(|e| e.eds_config.as_ref()),
                "eds_cluster_config.eds_config",
            )?;
            let service = eds
                .map(|e| e.service_name.as_str())
                .filter(|s| !s.is_empty())
                .unwrap_or(&c.name);
            (Some(Arc::from(service)), None)
        }
        DiscoveryType::Static => {
            let cla = c
                .load_assignment
                .as_ref()
                .ok_or("a STATIC cluster needs load_assignment")?;
            (None, Some(assignment(cla)?))
        }
        // The upstream is the downstream connection's original destination (the
        // sidecar's `PassthroughCluster`); served by the TCP proxy.
        DiscoveryType::OriginalDst => (None, None),
        other => {
            return Err(format!(
                "discovery type {} is not supported (EDS, STATIC and ORIGINAL_DST are)",
                other.as_str_name()
            ));
        }
    };
    let original_dst = kind == DiscoveryType::OriginalDst;
    let lb = match PbLb::try_from(c.lb_policy) {
        // ORIGINAL_DST clusters pick no endpoint: CLUSTER_PROVIDED is their only
        // policy, as in Envoy.
        Ok(PbLb::ClusterProvided) if original_dst => LbPolicy::RoundRobin,
        Ok(PbLb::ClusterProvided) => {
            return Err("lb_policy CLUSTER_PROVIDED needs an ORIGINAL_DST cluster".into());
        }
        Ok(other) if original_dst => {
            return Err(format!(
                "lb_policy {} is not valid for an ORIGINAL_DST cluster (CLUSTER_PROVIDED is)",
                other.as_str_name()
            ));
        }
        Ok(PbLb::RoundRobin) => LbPolicy::RoundRobin,
        Ok(PbLb::LeastRequest) => LbPolicy::LeastRequest,
        Ok(other) => {
            return Err(format!(
                "lb_policy {} is not supported (ROUND_ROBIN and LEAST_REQUEST are)",
                other.as_str_name()
            ));
        }
        Err(_) => return Err(format!("lb_policy {} unknown", c.lb_policy)),
    };
    if c.load_balancing_policy.is_some() || c.lb_config.is_some() || c.lb_subset_config.is_some() {
        return Err(
            "load_balancing_policy, lb_config and subset load balancing are not supported".into(),
        );
    }
    if !c.transport_socket_matches.is_empty() {
        return Err("transport_socket_matches are not supported (one transport_socket is)".into());
    }
    let tls = c
        .transport_socket
        .as_ref()
        .map(crate::tls::upstream)
        .transpose()?;
    if !c.health_checks.is_empty() {
        return Err("active health checks are not supported (outlier detection is)".into());
    }
    if !c.filters.is_empty() {
        return Err("upstream network filters are not supported".into());
    }
    let connect_timeout = match &c.connect_timeout {
        Some(d) => duration(d, "connect_timeout")?,
        None => Duration::from_secs(5),
    };
    if connect_timeout.is_zero() {
        return Err("connect_timeout must be greater than 0".into());
    }
    let locality_weighted = match c
        .common_lb_config
        .as_ref()
        .and_then(|l| l.locality_config_specifier.as_ref())
    {
        None => false,
        Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_)) => true,
        Some(LocalityConfigSpecifier::ZoneAwareLbConfig(_)) => {
            return Err("zone-aware load balancing is not supported (locality-weighted is)".into());
        }
    };
    let mut http2 = c.http2_protocol_options.is_some();
    for (key, any) in &c.typed_extension_protocol_options {
        if key != HTTP_PROTOCOL_OPTIONS_KEY {
            return Err(format!(
                "typed_extension_protocol_options {key:?} is not supported"
            ));
        }
        let o: HttpProtocolOptions = decode(any, HTTP_PROTOCOL_OPTIONS)?;
        match o.upstream_protocol_options {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match e.protocol_config {
                Some(ProtocolConfig::Http2ProtocolOptions(_)) => http2 = true,
                Some(ProtocolConfig::HttpProtocolOptions(_)) => http2 = false,
                _ => return Err("explicit HTTP/3 upstreams are not supported".into()),
            },
            Some(_) => return Err("auto and downstream-matching upstream protocols are not supported (explicit HTTP/1.1 or HTTP/2 are)".into()),
            None => {}
        }
    }
    Ok(ClusterDef {
        name: Arc::from(c.name.as_str()),
        eds_name,
        static_assignment,
        original_dst,
        lb,
        locality_weighted,
        http2,
        connect_timeout,
        outlier: c.outlier_detection.as_ref().map(outlier).transpose()?,
        limits: limits(c)?,
        tls,
    })
}

fn outlier(
    o: &tributary_proto::envoy::envoy::config::cluster::v3::OutlierDetection,
) -> Result<OutlierConfig, Reason> {
    let v = |x: &Option<tributary_proto::envoy::google::protobuf::UInt32Value>, d: u32| {
        x.as_ref().map_or(d, |x| x.value)
    };
    if v(&o.enforcing_success_rate, 100) > 0 && o.success_rate_minimum_hosts.is_none() {
        // Envoy enforces success-rate ejection by default; the proxy does not implement it.
        return Err("outlier_detection: success-rate ejection is not supported; set enforcing_success_rate to 0".into());
    }
    if v(&o.enforcing_success_rate, 100) > 0 {
        return Err("outlier_detection: success-rate ejection is not supported; set enforcing_success_rate to 0".into());
    }
    if v(&o.enforcing_failure_percentage, 0) > 0
        || v(&o.enforcing_failure_percentage_local_origin, 0) > 0
        || o.split_external_local_origin_errors
    {
        return Err("outlier_detection: failure-percentage ejection and split local-origin errors are not supported".into());
    }
    let base = o
        .base_ejection_time
        .as_ref()
        .map(|d| duration(d, "base_ejection_time"))
        .transpose()?;
    let max = o
        .max_ejection_time
        .as_ref()
        .map(|d| duration(d, "max_ejection_time"))
        .transpose()?;
    Ok(OutlierConfig {
        consecutive_5xx: v(&o.consecutive_5xx, 5),
        enforcing_5xx: v(&o.enforcing_consecutive_5xx, 100),
        consecutive_gateway_failure: v(&o.consecutive_gateway_failure, 5),
        enforcing_gateway_failure: v(&o.enforcing_consecutive_gateway_failure, 0),
        base_ejection_time: base.unwrap_or(Duration::from_secs(30)),
        max_ejection_time: max.unwrap_or(Duration::from_secs(300)),
        max_ejection_percent: v(&o.max_ejection_percent, 10).min(100),
    })
}

fn limits(c: &PbCluster) -> Result<Limits, Reason> {
    let mut l = Limits::default();
    let Some(cb) = &c.circuit_breakers else {
        return Ok(l);
    };
    if !cb.per_host_thresholds.is_empty() {
        return Err("per-host circuit breaker thresholds are not supported".into());
    }
    for t in &cb.thresholds {
        if t.priority != RoutingPriority::Default as i32 {
            // Routes never ask for the high priority (NACKed above), so its limits never apply.
            continue;
        }
        let v = |x: &Option<tributary_proto::envoy::google::protobuf::UInt32Value>, d: usize| {
            x.as_ref().map_or(d, |x| x.value as usize)
        };
        l.max_connections = v(&t.max_connections, l.max_connections);
        l.max_pending_requests = v(&t.max_pending_requests, l.max_pending_requests);
        l.max_requests = v(&t.max_requests, l.max_requests);
        l.max_retries = v(&t.max_retries, l.max_retries);
        if let Some(b) = &t.retry_budget {
            l.retry_budget = Some((
                b.budget_percent.as_ref().map_or(20.0, |p| p.value),
                v(&b.min_retry_concurrency, 3),
            ));
        }
        if t.max_connection_pools.is_some() {
            return Err("max_connection_pools is not supported".into());
        }
    }
    if l.max_connections == 0 {
        return Err("circuit_breakers: max_connections 0 would refuse every request".into());
    }
    Ok(l)
}

/// A ClusterLoadAssignment from EDS (or a static cluster's).
pub fn assignment(cla: &ClusterLoadAssignment) -> Result<Assignment, Reason> {
    if !cla.named_endpoints.is_empty() {
        return Err("named_endpoints are not supported".into());
    }
    let mut overprovisioning = 140;
    if let Some(p) = &cla.policy {
        if !p.drop_overloads.is_empty() {
            return Err("drop_overloads are not supported".into());
        }
        if let Some(f) = &p.overprovisioning_factor {
            overprovisioning = f.value;
        }
    }
    let mut priorities: Vec<Vec<LocalityEndpoints>> = Vec::new();
    for l in &cla.endpoints {
        if l.lb_config.is_some() {
            return Err("per-locality endpoint lists (leds) are not supported".into());
        }
        let p = l.priority as usize;
        if p > 128 {
            return Err(format!("priority {p} is too large"));
        }
        if priorities.len() <= p {
            priorities.resize_with(p + 1, Vec::new);
        }
        let mut endpoints = Vec::with_capacity(l.lb_endpoints.len());
        for e in &l.lb_endpoints {
            let address = match &e.host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => {
                    socket_address(ep.address.as_ref(), "endpoint address")?
                }
                _ => return Err("only inline endpoints are supported (not named endpoints)".into()),
            };
            let healthy = matches!(
                HealthStatus::try_from(e.health_status),
                Ok(HealthStatus::Healthy | HealthStatus::Unknown)
            );
            endpoints.push(EndpointDef {
                address,
                weight: e.load_balancing_weight.as_ref().map_or(1, |w| w.value),
                healthy,
            });
        }
        priorities[p].push(LocalityEndpoints {
            zone: l
                .locality
                .as_ref()
                .map(|l| l.zone.clone())
                .unwrap_or_default(),
            weight: l.load_balancing_weight.as_ref().map_or(1, |w| w.value),
            endpoints,
        });
    }
    Ok(Assignment {
        priorities,
        overprovisioning,
    })
}
