//! The proxy against a real, in-process hub: the same config the hub gives Envoy.

mod common;

use std::collections::BTreeMap;

use common::*;

const ROUTE: &str = "apiVersion: tributary.io/v1alpha1\nkind: Route\nmetadata: {name: reviews, environment: prod}\nspec:\n  hosts: [reviews.prod]\n  port: 8080\n  http:\n  - match:\n      headers: [{name: x-canary, exact: \"true\"}]\n    destinations: [{service: reviews, subset: v2, weight: 100}]\n  - match:\n      path: {prefix: /split}\n    destinations: [{service: reviews, subset: v1, weight: 50}, {service: reviews, subset: v2, weight: 50}]\n  - match:\n      path: {regex: \"/re/[0-9]+\"}\n    destinations: [{service: reviews, subset: v2, weight: 100}]\n  - destinations: [{service: reviews, subset: v1, weight: 100}]\n";

struct Mesh {
    hub: TestHub,
    v1: Backend,
    v2: Backend,
    ratings: Backend,
}

async fn mesh(v1_mode: Mode) -> Mesh {
    let v1 = Backend::start("reviews-v1", v1_mode).await;
    let v2 = Backend::start("reviews-v2", Mode::Ok).await;
    let ratings = Backend::start("ratings", Mode::Ok).await;
    let hub = TestHub::start(&[
        (
            "services.yaml",
            docs(&[
                service("reviews", 8080, "HTTP"),
                service("ratings", 8080, "HTTP"),
            ]),
        ),
        (
            "endpoints.yaml",
            docs(&[
                endpoints("reviews", &[(v1.addr, "v1", "z1"), (v2.addr, "v2", "z1")]),
                endpoints("ratings", &[(ratings.addr, "v1", "z1")]),
            ]),
        ),
        ("route.yaml", ROUTE.to_string()),
    ])
    .await;
    Mesh {
        hub,
        v1,
        v2,
        ratings,
    }
}

async fn split(
    c: &TestClient,
    addr: std::net::SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        let (status, backend) = get(c, addr, host, path, headers).await;
        assert_eq!(status, 200, "{host}{path}");
        *m.entry(backend).or_default() += 1;
    }
    m
}

async fn routes_like_envoy(protocol: &str) {
    let m = mesh(Mode::Ok).await;
    let proxy = start_proxy(bootstrap(m.hub.hub.xds_addr, protocol, "")).await;
    ready(&proxy).await;
    let addr = proxy.listener_addr("0.0.0.0_8080").await;
    let c = client();

    // Virtual host by Host, with and without the port.
    assert_eq!(
        split(&c, addr, "ratings.prod", "/", &[], 5).await,
        [("ratings".into(), 5)].into()
    );
    assert_eq!(
        split(&c, addr, "ratings.prod:8080", "/", &[], 5).await,
        [("ratings".into(), 5)].into()
    );
    assert_eq!(get(&c, addr, "nobody.prod", "/", &[]).await.0, 404);
    // Header route, regex route, default route.
    assert_eq!(
        split(&c, addr, "reviews.prod", "/", &[("x-canary", "true")], 10).await,
        [("reviews-v2".into(), 10)].into()
    );
    assert_eq!(
        split(&c, addr, "reviews.prod", "/re/42", &[], 5).await,
        [("reviews-v2".into(), 5)].into()
    );
    assert_eq!(
        split(&c, addr, "reviews.prod", "/re/x", &[], 5).await,
        [("reviews-v1".into(), 5)].into()
    );
    assert_eq!(
        split(&c, addr, "reviews.prod", "/", &[("x-canary", "no")], 10).await,
        [("reviews-v1".into(), 10)].into()
    );
    // Weighted split 50/50 within tolerance (400 draws: 5 sigma is ±50).
    let w = split(&c, addr, "reviews.prod", "/split", &[], 400).await;
    let v1 = w.get("reviews-v1").copied().unwrap_or(0);
    assert!((150..=250).contains(&v1), "{w:?}");

    // Everything the hub generates for a sidecar is honoured, transparent mode's
    // virtualOutbound and PassthroughCluster included: the hub records no NACK.
    let status = m.hub.sync_status().to_string();
    assert!(!status.contains("use_original_dst"), "{status}");
    assert!(!status.contains("ORIGINAL_DST"), "{status}");
    assert!(!status.contains("not supported"), "{status}");
    let (code, dump) = admin(&proxy, "/config_dump").await;
    assert_eq!(code, 200);
    assert!(dump.contains("\"complete\": true"), "{dump}");
    assert_eq!(admin(&proxy, "/ready").await.0, 200);
    let (_, stats) = admin(&proxy, "/stats").await;
    assert!(
        stats.contains("tributary_proxy_xds_acks_total{type=\"LDS\"}"),
        "{stats}"
    );
    assert!(
        stats.contains(
            "tributary_proxy_upstream_requests_total{cluster=\"outbound|8080|v2|reviews.prod\"}"
        ),
        "{stats}"
    );
    let _ = (&m.v1, &m.v2, &m.ratings);
}

#[tokio::test]
async fn delta_sidecar_routes_by_host_header_regex_and_weight_and_nacks_by_name() {
    routes_like_envoy("delta").await;
}

#[tokio::test]
async fn sotw_sidecar_routes_the_same() {
    routes_like_envoy("sotw").await;
}

#[tokio::test]
async fn not_ready_while_the_hub_is_unreachable_then_ready_once_it_serves() {
    // A port with nothing behind it yet: the hub starts there later.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let xds = reserved.local_addr().unwrap();
    drop(reserved);
    let proxy = start_proxy(bootstrap(xds, "delta", "")).await;
    until("two failed connection attempts", || async {
        proxy.shared.metrics.xds_connect_failures.get() >= 2
    })
    .await;
    assert!(!proxy.is_ready());
    assert_eq!(admin(&proxy, "/ready").await.0, 503);

    let backend = Backend::start("ratings", Mode::Ok).await;
    let _hub = TestHub::start_on(
        xds,
        &[
            ("services.yaml", service("ratings", 8080, "HTTP")),
            (
                "endpoints.yaml",
                endpoints("ratings", &[(backend.addr, "v1", "z1")]),
            ),
        ],
    )
    .await;
    ready(&proxy).await;
    assert_eq!(admin(&proxy, "/ready").await.0, 200);
    let addr = proxy.listener_addr("0.0.0.0_8080").await;
    assert_eq!(
        get(&client(), addr, "ratings.prod", "/", &[]).await,
        (200, "ratings".into())
    );
}

#[tokio::test]
async fn in_flight_requests_complete_across_a_route_change() {
    let m = mesh(Mode::Hold).await;
    let proxy = start_proxy(bootstrap(m.hub.hub.xds_addr, "delta", "")).await;
    ready(&proxy).await;
    let addr = proxy.listener_addr("0.0.0.0_8080").await;
    // Five long requests to v1, held by the backend.
    let mut held = Vec::new();
    for _ in 0..5 {
        let c = client();
        held.push(tokio::spawn(async move {
            get(&c, addr, "reviews.prod", "/slow", &[]).await
        }));
    }
    let mut arrivals = m.v1.held.clone();
    tokio::time::timeout(TIMEOUT, arrivals.wait_for(|n| *n == 5))
        .await
        .unwrap()
        .unwrap();
    // The default route moves to v2.
    m.hub.write(
        "route.yaml",
        &ROUTE.replace("subset: v1, weight: 100", "subset: v2, weight: 100"),
    );
    let c = client();
    until("the route change is applied", || async {
        get(&c, addr, "reviews.prod", "/", &[]).await.1 == "reviews-v2"
    })
    .await;
    // The requests in flight on the old route complete.
    m.v1.release.send_replace(true);
    for h in held {
        assert_eq!(h.await.unwrap(), (200, "reviews-v1".into()));
    }
}

#[tokio::test]
async fn a_dead_endpoint_is_ejected_after_consecutive_gateway_failures() {
    let live = Backend::start("live", Mode::Ok).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let hub = TestHub::start(&[
        ("services.yaml", service("ratings", 8080, "HTTP")),
        (
            "endpoints.yaml",
            endpoints("ratings", &[(live.addr, "v1", "z1"), (dead, "v1", "z1")]),
        ),
    ])
    .await;
    let proxy = start_proxy(bootstrap(hub.hub.xds_addr, "delta", "")).await;
    ready(&proxy).await;
    let addr = proxy.listener_addr("0.0.0.0_8080").await;
    let c = client();
    let mut failures = 0;
    for _ in 0..20 {
        if get(&c, addr, "ratings.prod", "/", &[]).await.0 != 200 {
            failures += 1;
        }
    }
    // The hub's outlier detection: 5 consecutive gateway failures eject.
    assert_eq!(
        failures, 5,
        "the dead endpoint fails five times, then is ejected"
    );
    for _ in 0..20 {
        assert_eq!(
            get(&c, addr, "ratings.prod", "/", &[]).await,
            (200, "live".into())
        );
    }
    let (_, dump) = admin(&proxy, "/config_dump").await;
    assert!(dump.contains("\"ejected\": true"), "{dump}");
}

#[tokio::test]
async fn h2c_and_grpc_pass_through_with_trailers() {
    use http_body_util::BodyExt;
    let grpc = Backend::start("greeter", Mode::Grpc).await;
    let hub = TestHub::start(&[
        ("services.yaml", service("greeter", 9090, "GRPC")),
        (
            "endpoints.yaml",
            endpoints("greeter", &[(grpc.addr, "v1", "z1")]),
        ),
    ])
    .await;
    let proxy = start_proxy(bootstrap(hub.hub.xds_addr, "delta", "")).await;
    ready(&proxy).await;
    let addr = proxy.listener_addr("0.0.0.0_9090").await;
    // HTTP/2 prior knowledge downstream, `:authority` naming the service (as gRPC
    // clients send it in clear text).
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut c, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("http://greeter.prod:9090/helloworld.Greeter/SayHello")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"\0\0\0\0\0",
        )))
        .unwrap();
    let resp = tokio::time::timeout(TIMEOUT, c.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backend"], "greeter");
    // The GRPC port's cluster speaks HTTP/2 upstream.
    assert_eq!(resp.headers()["x-version"], "HTTP/2.0");
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers pass through");
    assert_eq!(trailers["grpc-status"], "0");
}
