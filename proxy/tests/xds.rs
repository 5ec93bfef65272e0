//! The xDS state machine fed resources the hub does not generate (retry policies,
//! circuit breakers, unsupported features), and what the data path does with them.

mod common;

use std::net::SocketAddr;

use common::*;
use prost::Message;
use tributary_proto::envoy::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, circuit_breakers::Thresholds, cluster::ClusterDiscoveryType,
    cluster::DiscoveryType, cluster::EdsClusterConfig, cluster::LbPolicy,
};
use tributary_proto::envoy::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ConfigSource, SocketAddress, TransportSocket, address,
    config_source::ConfigSourceSpecifier, socket_address::PortSpecifier,
};
use tributary_proto::envoy::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};
use tributary_proto::envoy::envoy::config::listener::v3::{
    Filter, FilterChain, Listener, filter::ConfigType,
};
use tributary_proto::envoy::envoy::config::route::v3::{
    QueryParameterMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost, route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier,
};
use tributary_proto::envoy::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager::RouteSpecifier,
    http_filter::ConfigType as HttpFilterConfig,
};
use tributary_proto::envoy::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use tributary_proto::envoy::google::protobuf::{Any, UInt32Value};
use tributary_proto::type_url;
use tributary_proxy::Proxy;
use tributary_proxy::xds::XdsState;

fn any<M: Message>(url: &str, m: &M) -> Any {
    Any {
        type_url: url.into(),
        value: m.encode_to_vec(),
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

fn socket(a: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(a.port()))),
            ..Default::default()
        })),
    }
}

fn http_filter(name: &str, url: &str) -> HttpFilter {
    HttpFilter {
        name: name.into(),
        config_type: Some(HttpFilterConfig::TypedConfig(Any {
            type_url: url.into(),
            value: vec![],
        })),
        ..Default::default()
    }
}

fn listener(name: &str, route: &str, filters: Vec<HttpFilter>) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: name.into(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route.into(),
        })),
        http_filters: filters,
        ..Default::default()
    };
    Listener {
        name: name.into(),
        address: Some(socket("127.0.0.1:0".parse().unwrap())),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(ConfigType::TypedConfig(any(
                    type_url::HTTP_CONNECTION_MANAGER,
                    &hcm,
                ))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn router() -> HttpFilter {
    http_filter("envoy.filters.http.router", type_url::ROUTER)
}

fn route_table(name: &str, cluster: &str, retry: Option<RetryPolicy>) -> RouteConfiguration {
    RouteConfiguration {
        name: name.into(),
        virtual_hosts: vec![VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
                    retry_policy: retry,
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn cluster(name: &str, max_retries: Option<u32>, max_requests: Option<u32>) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.into(),
        }),
        connect_timeout: Some(tributary_proto::envoy::google::protobuf::Duration {
            seconds: 1,
            nanos: 0,
        }),
        circuit_breakers: Some(CircuitBreakers {
            thresholds: vec![Thresholds {
                max_retries: max_retries.map(|value| UInt32Value { value }),
                max_requests: max_requests.map(|value| UInt32Value { value }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn cla(name: &str, addrs: &[SocketAddr]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: addrs
                .iter()
                .map(|a| LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(*a)),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn response(url: &str, resources: Vec<(&str, Any)>, removed: &[&str]) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: url.into(),
        nonce: "n".into(),
        resources: resources
            .into_iter()
            .map(|(name, a)| Resource {
                name: name.into(),
                version: "1".into(),
                resource: Some(a),
                ..Default::default()
            })
            .collect(),
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A proxy fed by hand: listener `l` → route table `r` → cluster `c` → `backends`.
async fn proxy_with(
    retry: Option<RetryPolicy>,
    max_retries: Option<u32>,
    max_requests: Option<u32>,
    backends: &[SocketAddr],
) -> (Proxy, XdsState, SocketAddr) {
    let b = bootstrap("127.0.0.1:1".parse().unwrap(), "delta", "");
    let proxy = Proxy::serve(&b).await.unwrap();
    let mut state = XdsState::new(tributary_proxy::xds::node(&b.node), true);
    let sh = &proxy.shared;
    for r in [
        response(
            type_url::CLUSTER,
            vec![(
                "c",
                any(type_url::CLUSTER, &cluster("c", max_retries, max_requests)),
            )],
            &[],
        ),
        response(
            type_url::ENDPOINT,
            vec![("c", any(type_url::ENDPOINT, &cla("c", backends)))],
            &[],
        ),
        response(
            type_url::LISTENER,
            vec![(
                "l",
                any(type_url::LISTENER, &listener("l", "r", vec![router()])),
            )],
            &[],
        ),
        response(
            type_url::ROUTE,
            vec![("r", any(type_url::ROUTE, &route_table("r", "c", retry)))],
            &[],
        ),
    ] {
        let out = state.on_delta(&r, sh);
        assert!(out[0].error_detail.is_none(), "{:?}", out[0].error_detail);
    }
    assert!(proxy.is_ready());
    let addr = proxy.listener_addr("l").await;
    (proxy, state, addr)
}

fn retry_5xx(n: u32) -> RetryPolicy {
    RetryPolicy {
        retry_on: "5xx,connect-failure".into(),
        num_retries: Some(UInt32Value { value: n }),
        ..Default::default()
    }
}

#[tokio::test]
async fn retries_hide_a_flaky_backend_and_the_budget_bounds_them() {
    let flaky = Backend::start("flaky", Mode::Flaky).await;
    let c = client();

    // With retry_on 5xx, every request succeeds although every other answer is a 503.
    let (proxy, _s, addr) = proxy_with(Some(retry_5xx(2)), None, None, &[flaky.addr]).await;
    for _ in 0..20 {
        assert_eq!(get(&c, addr, "any", "/", &[]).await, (200, "flaky".into()));
    }
    let (_, stats) = admin(&proxy, "/stats").await;
    assert!(
        stats.contains("tributary_proxy_upstream_retries_total{cluster=\"c\"} 20"),
        "{stats}"
    );

    // Without a retry policy, the 503s come through.
    let flaky = Backend::start("flaky", Mode::Flaky).await;
    let (_p, _s, addr) = proxy_with(None, None, None, &[flaky.addr]).await;
    let mut failed = 0;
    for _ in 0..20 {
        if get(&c, addr, "any", "/", &[]).await.0 == 503 {
            failed += 1;
        }
    }
    assert_eq!(failed, 10);

    // A retry budget of zero concurrent retries (max_retries 0): no retry is made.
    let flaky = Backend::start("flaky", Mode::Flaky).await;
    let (proxy, _s, addr) = proxy_with(Some(retry_5xx(2)), Some(0), None, &[flaky.addr]).await;
    assert_eq!(get(&c, addr, "any", "/", &[]).await.0, 503);
    let (_, stats) = admin(&proxy, "/stats").await;
    assert!(
        stats.contains("tributary_proxy_upstream_retry_overflow_total{cluster=\"c\"} 1"),
        "{stats}"
    );
}

#[tokio::test]
async fn max_requests_opens_the_circuit_breaker() {
    let slow = Backend::start("slow", Mode::Hold).await;
    let (_p, _s, addr) = proxy_with(None, None, Some(1), &[slow.addr]).await;
    let c = client();
    let held = tokio::spawn({
        let c = c.clone();
        async move { get(&c, addr, "any", "/slow", &[]).await }
    });
    let mut arrivals = slow.held.clone();
    tokio::time::timeout(TIMEOUT, arrivals.wait_for(|n| *n == 1))
        .await
        .unwrap()
        .unwrap();
    // The second request overflows at once, with Envoy's header.
    let req = hyper::Request::get(format!("http://{addr}/"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-envoy-overloaded"], "true");
    slow.release.send_replace(true);
    assert_eq!(held.await.unwrap(), (200, "slow".into()));
    assert_eq!(get(&c, addr, "any", "/", &[]).await, (200, "slow".into()));
}

#[tokio::test]
async fn a_removed_listener_drains_its_requests_in_flight_and_stops_accepting() {
    let slow = Backend::start("slow", Mode::Hold).await;
    let (proxy, mut state, addr) = proxy_with(None, None, None, &[slow.addr]).await;
    let c = client();
    let held = tokio::spawn({
        let c = c.clone();
        async move { get(&c, addr, "any", "/slow", &[]).await }
    });
    let mut arrivals = slow.held.clone();
    tokio::time::timeout(TIMEOUT, arrivals.wait_for(|n| *n == 1))
        .await
        .unwrap()
        .unwrap();
    let out = state.on_delta(&response(type_url::LISTENER, vec![], &["l"]), &proxy.shared);
    assert!(out[0].error_detail.is_none());
    let mut bound = proxy.shared.bound.subscribe();
    tokio::time::timeout(TIMEOUT, bound.wait_for(|b| !b.contains_key("l")))
        .await
        .unwrap()
        .unwrap();
    // New connections are refused once the socket is closed.
    until("the listener's socket is closed", || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    // The request in flight completes.
    slow.release.send_replace(true);
    assert_eq!(held.await.unwrap(), (200, "slow".into()));
}

#[tokio::test]
async fn every_resource_it_cannot_honour_is_nacked_by_name_and_the_rest_applied() {
    let b = bootstrap("127.0.0.1:1".parse().unwrap(), "delta", "");
    let proxy = Proxy::serve(&b).await.unwrap();
    let mut state = XdsState::new(tributary_proxy::xds::node(&b.node), true);
    let mut ring = cluster("ring", None, None);
    ring.lb_policy = LbPolicy::RingHash as i32;
    let mut tls = cluster("tls", None, None);
    tls.transport_socket = Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        ..Default::default()
    });
    let out = state.on_delta(
        &response(
            type_url::CLUSTER,
            vec![
                ("good", any(type_url::CLUSTER, &cluster("good", None, None))),
                ("ring", any(type_url::CLUSTER, &ring)),
                ("tls", any(type_url::CLUSTER, &tls)),
            ],
            &[],
        ),
        &proxy.shared,
    );
    let nack = out[0]
        .error_detail
        .as_ref()
        .expect("a NACK")
        .message
        .clone();
    assert!(
        nack.contains("ring: lb_policy RING_HASH is not supported"),
        "{nack}"
    );
    assert!(
        nack.contains(
            "tls: transport_socket \"envoy.transport_sockets.tls\": no typed_config (only TLS"
        ),
        "{nack}"
    );
    assert!(!nack.contains("good"), "{nack}");
    // The good cluster is applied, and its endpoints subscribed.
    assert_eq!(out[1].resource_names_subscribe, vec!["good".to_string()]);

    let mut query = route_table("q", "good", None);
    query.virtual_hosts[0].routes[0]
        .r#match
        .as_mut()
        .unwrap()
        .query_parameters = vec![QueryParameterMatcher {
        name: "a".into(),
        ..Default::default()
    }];
    let out = state.on_delta(
        &response(
            type_url::LISTENER,
            vec![
                (
                    "lua",
                    any(
                        type_url::LISTENER,
                        &listener(
                            "lua",
                            "r",
                            vec![
                                http_filter(
                                    "envoy.filters.http.lua",
                                    "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                                ),
                                router(),
                            ],
                        ),
                    ),
                ),
                (
                    "ok",
                    any(type_url::LISTENER, &listener("ok", "q", vec![router()])),
                ),
            ],
            &[],
        ),
        &proxy.shared,
    );
    let nack = out[0]
        .error_detail
        .as_ref()
        .expect("a NACK")
        .message
        .clone();
    assert!(
        nack.contains("lua: unsupported HTTP filter \"envoy.filters.http.lua\""),
        "{nack}"
    );
    assert_eq!(out[1].resource_names_subscribe, vec!["q".to_string()]);
    let out = state.on_delta(
        &response(
            type_url::ROUTE,
            vec![("q", any(type_url::ROUTE, &query))],
            &[],
        ),
        &proxy.shared,
    );
    let nack = out[0]
        .error_detail
        .as_ref()
        .expect("a NACK")
        .message
        .clone();
    assert!(
        nack.contains("q: virtual host \"all\": route 0: runtime fractions, query parameter"),
        "{nack}"
    );
    // A route table that was rejected is not held: the proxy is not ready.
    assert!(!proxy.is_ready());
}

#[tokio::test]
async fn churn_endpoint_updates_and_route_changes_under_traffic_lose_no_request() {
    let a = Backend::start("a", Mode::Ok).await;
    let b = Backend::start("b", Mode::Ok).await;
    let d = Backend::start("d", Mode::Ok).await;
    let (proxy, mut state, addr) = proxy_with(None, None, None, &[a.addr, b.addr]).await;
    // A second cluster for the route to move to and back.
    let out = state.on_delta(
        &response(
            type_url::CLUSTER,
            vec![
                ("c", any(type_url::CLUSTER, &cluster("c", None, None))),
                ("c2", any(type_url::CLUSTER, &cluster("c2", None, None))),
            ],
            &[],
        ),
        &proxy.shared,
    );
    assert!(out[0].error_detail.is_none());
    state.on_delta(
        &response(
            type_url::ENDPOINT,
            vec![("c2", any(type_url::ENDPOINT, &cla("c2", &[d.addr])))],
            &[],
        ),
        &proxy.shared,
    );

    // Constant traffic from four keep-alive clients until told to stop.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut traffic = Vec::new();
    for _ in 0..4 {
        let mut stopped = stopped.clone();
        traffic.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut failed) = (0usize, Vec::new());
            while !*stopped.borrow_and_update() {
                match get(&c, addr, "any", "/", &[]).await {
                    (200, _) => ok += 1,
                    other => failed.push(other),
                }
            }
            (ok, failed)
        }));
    }
    // 100 endpoint updates per second for two seconds (the set alternates between
    // {a, b} and {b}), and a route change every 20 updates.
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(10));
    for i in 0..200u32 {
        tick.tick().await;
        let set: &[SocketAddr] = if i % 2 == 0 {
            &[b.addr]
        } else {
            &[a.addr, b.addr]
        };
        let out = state.on_delta(
            &response(
                type_url::ENDPOINT,
                vec![("c", any(type_url::ENDPOINT, &cla("c", set)))],
                &[],
            ),
            &proxy.shared,
        );
        assert!(out[0].error_detail.is_none());
        if i % 20 == 10 {
            let to = if i % 40 == 10 { "c2" } else { "c" };
            let out = state.on_delta(
                &response(
                    type_url::ROUTE,
                    vec![("r", any(type_url::ROUTE, &route_table("r", to, None)))],
                    &[],
                ),
                &proxy.shared,
            );
            assert!(out[0].error_detail.is_none());
        }
    }
    stop.send_replace(true);
    let (mut ok, mut failed) = (0, Vec::new());
    for t in traffic {
        let (o, f) = t.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "traffic flowed during the churn: {ok}");
    assert!(
        d.hits.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the route changes took effect"
    );
}

#[tokio::test]
async fn a_streaming_response_counts_against_max_requests_until_its_body_ends() {
    let slow = Backend::start("slow", Mode::HoldBody).await;
    let (_p, _s, addr) = proxy_with(None, None, Some(1), &[slow.addr]).await;
    let c = client();
    let req = hyper::Request::get(format!("http://{addr}/slow"))
        .body(http_body_util::Empty::new())
        .unwrap();
    // The headers arrive; the body is still streaming.
    let streaming = c.request(req).await.unwrap();
    assert_eq!(streaming.status(), 200);
    let other = client();
    let resp = other
        .request(
            hyper::Request::get(format!("http://{addr}/"))
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        503,
        "the streaming request still holds the only slot"
    );
    assert_eq!(resp.headers()["x-envoy-overloaded"], "true");
    slow.release.send_replace(true);
    let body = http_body_util::BodyExt::collect(streaming.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"slow");
    assert_eq!(
        get(&other, addr, "any", "/", &[]).await,
        (200, "slow".into())
    );
}
