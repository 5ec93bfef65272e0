//! ADS protocol conformance against an in-process hub: each point of the xDS protocol
//! the hub promises (docs/xds.md), over both SotW and Delta.

mod common;

use common::*;
use prost::Message;
use tonic::Code;
use tributary_proto::envoy::envoy::config::listener::v3::Listener;
use tributary_proto::envoy::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use tributary_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
};

fn cluster(svc: &str) -> String {
    format!("outbound|8080||{svc}.prod")
}

fn subset_cluster(svc: &str) -> String {
    format!("outbound|8080|v1|{svc}.prod")
}

/// Two services, `a` and `b`, in `prod`.
async fn two_services() -> TestHub {
    TestHub::start(&[
        (
            "services.yaml",
            docs(&[service("a", "prod", 8080), service("b", "prod", 8080)]),
        ),
        (
            "endpoints.yaml",
            docs(&[
                endpoints("a", "prod", &["10.0.0.1"], 80),
                endpoints("b", "prod", &["10.0.0.2"], 80),
            ]),
        ),
    ])
    .await
}

fn all_clusters(svcs: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = svcs
        .iter()
        .flat_map(|s| [cluster(s), subset_cluster(s)])
        .collect();
    v.push("PassthroughCluster".into());
    v.sort();
    v
}

#[tokio::test]
async fn sotw_first_request_without_node_is_rejected() {
    let hub = two_services().await;
    let mut s = Sotw::open(&hub).await;
    s.request(None, CDS, &[], None).await;
    let err = s.rx.message().await.expect_err("an error status");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("must carry a node"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn delta_first_request_without_node_is_rejected() {
    let hub = two_services().await;
    let mut d = Delta::open(&hub).await;
    d.subscribe(None, CDS, &[]).await;
    let err = d.rx.message().await.expect_err("an error status");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("must carry a node"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn unknown_type_url_gets_a_clear_error() {
    let hub = two_services().await;
    let mut s = Sotw::open(&hub).await;
    s.request(
        Some(node("n1", "prod")),
        "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        &[],
        None,
    )
    .await;
    let err = s.rx.message().await.expect_err("an error status");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("unsupported type_url"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(CDS),
        "lists the supported types: {}",
        err.message()
    );

    let mut d = Delta::open(&hub).await;
    d.subscribe(
        Some(node("n2", "prod")),
        "type.googleapis.com/nope.Nope",
        &[],
    )
    .await;
    let err = d.rx.message().await.expect_err("an error status");
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn secret_type_is_recognized_and_answered_empty() {
    let hub = two_services().await;
    let mut d = Delta::open(&hub).await;
    d.subscribe(
        Some(node("n1", "prod")),
        tributary_proto::type_url::SECRET,
        &["default"],
    )
    .await;
    let r = d.recv().await;
    assert_eq!(r.type_url, tributary_proto::type_url::SECRET);
    assert!(r.resources.is_empty());
    assert_eq!(
        r.removed_resources,
        vec!["default".to_string()],
        "the secret does not exist yet"
    );
}

#[tokio::test]
async fn sotw_cds_carries_the_full_set_and_eds_only_what_changed() {
    let hub = two_services().await;
    let mut s = Sotw::open(&hub).await;
    s.request(Some(node("n1", "prod")), CDS, &[], None).await;
    let cds = s.recv().await;
    assert_eq!(names(&cds), all_clusters(&["a", "b"]));
    s.ack(&cds, &[]).await;

    let (ca, cb) = (cluster("a"), cluster("b"));
    s.request(None, EDS, &[&ca, &cb], None).await;
    let eds = s.recv().await;
    assert_eq!(names(&eds), vec![ca.clone(), cb.clone()]);
    s.ack(&eds, &[&ca, &cb]).await;

    // An endpoint-only change to `b`: EDS carries b alone, and no CDS is sent (the
    // next message on the stream is the EDS response).
    let eps = docs(&[
        endpoints("a", "prod", &["10.0.0.1"], 80),
        endpoints("b", "prod", &["10.0.0.2", "10.0.0.3"], 80),
    ]);
    hub.write_and_wait("prod", "endpoints.yaml", eps).await;
    let eds2 = s.recv().await;
    assert_eq!(eds2.type_url, EDS);
    assert_eq!(names(&eds2), vec![cb.clone()]);
    assert_ne!(eds2.version_info, eds.version_info);
    s.ack(&eds2, &[&ca, &cb]).await;

    // A new service: CDS carries the full set again.
    let svcs = docs(&[
        service("a", "prod", 8080),
        service("b", "prod", 8080),
        service("c", "prod", 8080),
    ]);
    hub.write_and_wait("prod", "services.yaml", svcs).await;
    let cds2 = s.recv().await;
    assert_eq!(cds2.type_url, CDS);
    assert_eq!(names(&cds2), all_clusters(&["a", "b", "c"]));
}

#[tokio::test]
async fn sotw_resource_names_subscribe_and_unsubscribe() {
    let hub = two_services().await;
    let mut s = Sotw::open(&hub).await;
    let (ca, cb) = (cluster("a"), cluster("b"));
    s.request(Some(node("n1", "prod")), EDS, &[&ca], None).await;
    let r1 = s.recv().await;
    assert_eq!(names(&r1), vec![ca.clone()]);

    // Adding b sends b (a is unchanged and held).
    s.ack(&r1, &[&ca, &cb]).await;
    let r2 = s.recv().await;
    assert_eq!(names(&r2), vec![cb.clone()]);

    // Dropping a, then adding it back, sends a again: the client forgot it.
    s.ack(&r2, &[&cb]).await;
    s.ack(&r2, &[&cb, &ca]).await;
    let r3 = s.recv().await;
    assert_eq!(names(&r3), vec![ca.clone()]);
    s.ack(&r3, &[&cb, &ca]).await;

    // LDS with explicit names (as gRPC asks): the full set of what exists.
    s.request(None, LDS, &["a.prod:8080", "missing:1"], None)
        .await;
    let l = s.recv().await;
    assert_eq!(names(&l), vec!["a.prod:8080".to_string()]);
}

#[tokio::test]
async fn sotw_nack_keeps_last_good_and_is_not_resent() {
    let hub = two_services().await;
    let mut s = Sotw::open(&hub).await;
    s.request(Some(node("nacker", "prod")), CDS, &[], None)
        .await;
    let good = s.recv().await;
    s.ack(&good, &[]).await;
    let ca = cluster("a");
    s.request(None, EDS, &[&ca], None).await;
    let eds = s.recv().await;
    s.ack(&eds, &[&ca]).await;

    // The hub sends a new cluster; the client rejects the response.
    let svcs = docs(&[
        service("a", "prod", 8080),
        service("b", "prod", 8080),
        service("c", "prod", 8080),
    ]);
    hub.write_and_wait("prod", "services.yaml", svcs).await;
    let bad = s.recv().await;
    assert_eq!(bad.type_url, CDS);
    s.send(DiscoveryRequest {
        type_url: CDS.into(),
        version_info: good.version_info.clone(),
        response_nonce: bad.nonce.clone(),
        error_detail: nack("cluster outbound|8080||c.prod: simulated rejection"),
        ..Default::default()
    })
    .await;

    // What the message does not name may not have been applied: it is sent once
    // more, without the rejected cluster.
    let resend = s.recv().await;
    assert_eq!(resend.type_url, CDS);
    let got = names(&resend);
    assert!(
        !got.contains(&cluster("c")),
        "the rejected version was re-sent: {got:?}"
    );
    assert!(got.contains(&subset_cluster("c")), "{got:?}");
    s.ack(&resend, &[]).await;

    // The next change is endpoint-only: the next message must be that EDS update,
    // not the rejected CDS version again.
    let eps = docs(&[
        endpoints("a", "prod", &["10.0.0.9"], 80),
        endpoints("b", "prod", &["10.0.0.2"], 80),
    ]);
    hub.write_and_wait("prod", "endpoints.yaml", eps).await;
    let next = s.recv().await;
    assert_eq!(next.type_url, EDS, "the NACKed CDS version was re-sent");
    s.ack(&next, &[&ca]).await;

    let status = hub.sync_status();
    let cds = &status[0]["types"]["CDS"];
    assert_eq!(cds["nacks_total"], 1);
    assert_eq!(cds["last_acked_version"], resend.version_info.as_str());
    assert_eq!(cds["last_nack"]["version"], bad.version_info.as_str());
    assert!(
        cds["last_nack"]["message"]
            .as_str()
            .unwrap()
            .contains("simulated rejection")
    );

    // A later CDS change is sent, still without the rejected version of c.
    let svcs = docs(&[
        service("a", "prod", 8080),
        service("b", "prod", 8080),
        service("c", "prod", 8080),
        service("d", "prod", 8080),
    ]);
    hub.write_and_wait("prod", "services.yaml", svcs).await;
    let later = s.recv().await;
    assert_eq!(later.type_url, CDS);
    let got = names(&later);
    assert!(
        got.contains(&cluster("d")) && got.contains(&cluster("a")),
        "{got:?}"
    );
    assert!(
        !got.contains(&cluster("c")),
        "the rejected version of c is not sent again: {got:?}"
    );
}

#[tokio::test]
async fn delta_wildcard_removal_and_content_versions() {
    let hub = two_services().await;
    let mut d = Delta::open(&hub).await;
    d.subscribe(Some(node("d1", "prod")), CDS, &[]).await;
    let r = d.recv().await;
    assert_eq!(delta_names(&r), all_clusters(&["a", "b"]));
    assert!(
        r.resources.iter().all(|x| x.version.len() == 16),
        "content-hash versions"
    );
    d.ack(&r).await;

    // Removing service b: exactly its clusters are removed, nothing is re-sent.
    let svcs = docs(&[service("a", "prod", 8080)]);
    let eps = docs(&[endpoints("a", "prod", &["10.0.0.1"], 80)]);
    std::fs::write(hub.path("endpoints.yaml"), eps).unwrap();
    hub.write_and_wait("prod", "services.yaml", svcs).await;
    let r2 = d.recv().await;
    assert!(
        r2.resources.is_empty(),
        "nothing else changed: {:?}",
        delta_names(&r2)
    );
    let mut removed = r2.removed_resources.clone();
    removed.sort();
    assert_eq!(removed, sorted(vec![cluster("b"), subset_cluster("b")]));
    d.ack(&r2).await;

    // Adding one service sends its clusters only.
    let svcs = docs(&[service("a", "prod", 8080), service("e", "prod", 8080)]);
    hub.write_and_wait("prod", "services.yaml", svcs).await;
    let r3 = d.recv().await;
    assert_eq!(
        delta_names(&r3),
        sorted(vec![cluster("e"), subset_cluster("e")])
    );
    assert!(r3.removed_resources.is_empty());
}

#[tokio::test]
async fn delta_initial_resource_versions_are_not_resent() {
    let hub = two_services().await;
    let mut d = Delta::open(&hub).await;
    d.subscribe(Some(node("d1", "prod")), CDS, &[]).await;
    let first = d.recv().await;
    d.ack(&first).await;
    drop(d);

    // Reconnect holding everything at the current versions except one stale entry.
    let mut versions: std::collections::HashMap<String, String> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    versions.insert(cluster("a"), "stale".into());
    let mut d2 = Delta::open(&hub).await;
    d2.send(DeltaDiscoveryRequest {
        node: Some(node("d1", "prod")),
        type_url: CDS.into(),
        initial_resource_versions: versions,
        ..Default::default()
    })
    .await;
    let r = d2.recv().await;
    assert_eq!(
        delta_names(&r),
        vec![cluster("a")],
        "only the resource whose version differs"
    );
}

#[tokio::test]
async fn delta_explicit_subscribe_unsubscribe_and_absent_names() {
    let hub = two_services().await;
    let mut d = Delta::open(&hub).await;
    let (ca, cb) = (cluster("a"), cluster("b"));
    d.subscribe(Some(node("d1", "prod")), EDS, &[&ca]).await;
    let r1 = d.recv().await;
    assert_eq!(delta_names(&r1), vec![ca.clone()]);
    d.ack(&r1).await;

    d.subscribe(None, EDS, &["outbound|1|x|nope"]).await;
    let r2 = d.recv().await;
    assert!(r2.resources.is_empty());
    assert_eq!(
        r2.removed_resources,
        vec!["outbound|1|x|nope".to_string()],
        "absent names are reported"
    );
    d.ack(&r2).await;

    // Unsubscribe from a, subscribe to b; then change a's endpoints: nothing for a.
    d.send(DeltaDiscoveryRequest {
        type_url: EDS.into(),
        resource_names_unsubscribe: vec![ca.clone()],
        resource_names_subscribe: vec![cb.clone()],
        ..Default::default()
    })
    .await;
    let r3 = d.recv().await;
    assert_eq!(delta_names(&r3), vec![cb.clone()]);
    d.ack(&r3).await;
    let eps = docs(&[
        endpoints("a", "prod", &["10.0.0.7"], 80),
        endpoints("b", "prod", &["10.0.0.8"], 80),
    ]);
    hub.write_and_wait("prod", "endpoints.yaml", eps).await;
    let r4 = d.recv().await;
    assert_eq!(delta_names(&r4), vec![cb.clone()], "a is unsubscribed");
}

#[tokio::test]
async fn delta_nack_is_recorded_and_not_resent() {
    let hub = two_services().await;
    let mut d = Delta::open(&hub).await;
    d.subscribe(Some(node("dn", "prod")), CDS, &[]).await;
    let r1 = d.recv().await;
    d.ack(&r1).await;
    let ca = cluster("a");
    d.subscribe(None, EDS, &[&ca]).await;
    let e1 = d.recv().await;
    d.ack(&e1).await;

    let svcs = docs(&[
        service("a", "prod", 8080),
        service("b", "prod", 8080),
        service("c", "prod", 8080),
    ]);
    hub.write_and_wait("prod", "services.yaml", svcs).await;
    let bad = d.recv().await;
    assert_eq!(
        delta_names(&bad),
        sorted(vec![cluster("c"), subset_cluster("c")])
    );
    d.send(DeltaDiscoveryRequest {
        type_url: CDS.into(),
        response_nonce: bad.nonce.clone(),
        error_detail: nack("simulated delta rejection"),
        ..Default::default()
    })
    .await;
    let eps = docs(&[
        endpoints("a", "prod", &["10.0.0.9"], 80),
        endpoints("b", "prod", &["10.0.0.2"], 80),
    ]);
    hub.write_and_wait("prod", "endpoints.yaml", eps).await;
    let next = d.recv().await;
    assert_eq!(next.type_url, EDS, "the NACKed CDS resources were re-sent");
    let status = hub.sync_status();
    assert_eq!(status[0]["protocol"], "delta");
    assert_eq!(status[0]["types"]["CDS"]["nacks_total"], 1);
    assert_eq!(
        status[0]["types"]["CDS"]["last_nack"]["message"],
        "simulated delta rejection"
    );
}

/// A route to a new service waits until the cluster it names is ACKed.
#[tokio::test]
async fn make_before_break_clusters_before_routes() {
    let gw = "apiVersion: tributary.io/v1alpha1\nkind: Gateway\nmetadata: {name: edge, environment: prod}\nspec:\n  listeners: [{name: http, address: 127.0.0.1, port: 18080}]\n".to_string();
    let hub = TestHub::start(&[
        ("services.yaml", docs(&[service("a", "prod", 8080)])),
        ("gw.yaml", gw),
    ])
    .await;
    let mut d = Delta::open(&hub).await;
    let mut n = node("gw1", "prod");
    n.metadata.as_mut().unwrap().fields.insert(
        "tributary.io/gateway".into(),
        tributary_proto::envoy::google::protobuf::Value {
            kind: Some(
                tributary_proto::envoy::google::protobuf::value::Kind::StringValue("edge".into()),
            ),
        },
    );
    d.subscribe(Some(n), CDS, &[]).await;
    let c = d.recv().await;
    d.ack(&c).await;
    d.subscribe(None, LDS, &[]).await;
    let l = d.recv().await;
    assert_eq!(delta_names(&l), vec!["gateway|edge|http".to_string()]);
    d.ack(&l).await;
    d.subscribe(None, RDS, &["gateway|edge|http"]).await;
    let r = d.recv().await;
    d.ack(&r).await;

    // A new service changes both CDS (new clusters) and RDS (a new virtual host).
    hub.write_and_wait(
        "prod",
        "services.yaml",
        docs(&[service("a", "prod", 8080), service("n", "prod", 8080)]),
    )
    .await;
    let c2 = d.recv().await;
    assert_eq!(c2.type_url, CDS, "clusters first");
    assert_eq!(
        delta_names(&c2),
        sorted(vec![cluster("n"), subset_cluster("n")])
    );
    // While CDS is un-ACKed, RDS waits: an EDS subscription is answered first.
    d.subscribe(None, EDS, &[&cluster("n")]).await;
    let e = d.recv().await;
    assert_eq!(e.type_url, EDS);
    d.ack(&e).await;
    d.ack(&c2).await;
    let r2 = d.recv().await;
    assert_eq!(r2.type_url, RDS, "routes after their clusters are ACKed");
}

#[tokio::test]
async fn environments_are_isolated() {
    let hub = TestHub::start(&[(
        "s.yaml",
        docs(&[service("a", "prod", 8080), service("s", "staging", 8080)]),
    )])
    .await;
    let mut d = Delta::open(&hub).await;
    d.subscribe(Some(node("stg", "staging")), CDS, &[]).await;
    let r = d.recv().await;
    let got = delta_names(&r);
    assert!(
        got.contains(&"outbound|8080||s.staging".to_string()),
        "{got:?}"
    );
    assert!(
        got.iter().all(|n| !n.contains(".prod")),
        "a staging proxy saw prod: {got:?}"
    );
    // Asking prod's cluster by name from staging: it does not exist there.
    d.subscribe(None, EDS, &[&cluster("a")]).await;
    let e = d.recv().await;
    assert!(e.resources.is_empty());
    assert_eq!(e.removed_resources, vec![cluster("a")]);
}

#[tokio::test]
async fn grpc_api_listeners_are_served_by_name() {
    let hub = two_services().await;
    let mut s = Sotw::open(&hub).await;
    s.request(Some(node("grpc-1", "prod")), LDS, &["a.prod:8080"], None)
        .await;
    let l = s.recv().await;
    assert_eq!(l.resources.len(), 1);
    let listener = Listener::decode(l.resources[0].value.as_slice()).unwrap();
    assert_eq!(listener.name, "a.prod:8080");
    let hcm_any = listener.api_listener.unwrap().api_listener.unwrap();
    let hcm = HttpConnectionManager::decode(hcm_any.value.as_slice()).unwrap();
    match hcm.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => assert_eq!(rds.route_config_name, "8080"),
        other => panic!("expected RDS, got {other:?}"),
    }
    // A wildcard LDS (a sidecar) never includes API listeners.
    let mut w = Sotw::open(&hub).await;
    w.request(Some(node("sidecar-1", "prod")), LDS, &[], None)
        .await;
    let all = names(&w.recv().await);
    assert_eq!(
        all,
        vec!["0.0.0.0_8080".to_string(), "virtualOutbound".to_string()]
    );
}

#[tokio::test]
async fn unchanged_config_rewrite_pushes_nothing() {
    let hub = two_services().await;
    let before = hub.hub.snapshots.current("prod").seq;
    // Same content, different formatting and order of documents: no new snapshot.
    let svcs = docs(&[service("b", "prod", 8080), service("a", "prod", 8080)]);
    std::fs::write(hub.path("services.yaml"), svcs).unwrap();
    // Wait for the reload to be applied, observed through a config change that does
    // change something in another environment.
    hub.write_and_wait("other", "other.yaml", service("x", "other", 1))
        .await;
    assert_eq!(hub.hub.snapshots.current("prod").seq, before);
}

/// Envoy re-creates an updated cluster and warms it only when its endpoints arrive:
/// an updated cluster's load assignment follows its CDS response even though the
/// endpoints did not change.
#[tokio::test]
async fn updated_cluster_is_followed_by_its_endpoints() {
    let hub = two_services().await;
    let mut s = Sotw::open(&hub).await;
    s.request(Some(node("n1", "prod")), CDS, &[], None).await;
    let cds = s.recv().await;
    s.ack(&cds, &[]).await;
    let (ca, cb) = (cluster("a"), cluster("b"));
    s.request(None, EDS, &[&ca, &cb], None).await;
    let eds = s.recv().await;
    s.ack(&eds, &[&ca, &cb]).await;

    // b's port becomes GRPC: its clusters change (HTTP/2 upstream), its endpoints do not.
    let grpc_b = service("b", "prod", 8080).replace("protocol: HTTP", "protocol: GRPC");
    hub.write_and_wait(
        "prod",
        "services.yaml",
        docs(&[service("a", "prod", 8080), grpc_b]),
    )
    .await;
    let cds2 = s.recv().await;
    assert_eq!(cds2.type_url, CDS);
    let eds2 = s.recv().await;
    assert_eq!(eds2.type_url, EDS);
    assert_eq!(
        names(&eds2),
        vec![cb.clone()],
        "only the replaced, subscribed cluster's endpoints"
    );
}

/// A scoped sidecar's wildcard CDS carries only its dependencies; an unknown scope
/// carries nothing; an unscoped sidecar gets its whole environment.
#[tokio::test]
async fn sidecar_scope_limits_wildcard_clusters() {
    let scope = "apiVersion: tributary.io/v1alpha1\nkind: Sidecar\nmetadata: {name: frontend, environment: prod}\nspec:\n  dependencies: [{host: a.prod}]\n".to_string();
    let hub = TestHub::start(&[
        (
            "services.yaml",
            docs(&[service("a", "prod", 8080), service("b", "prod", 8080)]),
        ),
        ("scope.yaml", scope),
    ])
    .await;
    let mut scoped = Delta::open(&hub).await;
    scoped
        .subscribe(
            Some(node_with(
                "fe-1",
                "prod",
                &[("tributary.io/sidecar", "frontend")],
            )),
            CDS,
            &[],
        )
        .await;
    let r = scoped.recv().await;
    assert_eq!(
        delta_names(&r),
        sorted(vec![
            cluster("a"),
            subset_cluster("a"),
            "PassthroughCluster".into()
        ])
    );
    scoped.ack(&r).await;

    let mut unknown = Delta::open(&hub).await;
    unknown
        .subscribe(
            Some(node_with(
                "x-1",
                "prod",
                &[("tributary.io/sidecar", "typo")],
            )),
            CDS,
            &[],
        )
        .await;
    assert!(
        unknown.recv().await.resources.is_empty(),
        "an unknown scope selects nothing"
    );

    let mut all = Delta::open(&hub).await;
    all.subscribe(Some(node("plain-1", "prod")), CDS, &[]).await;
    assert_eq!(delta_names(&all.recv().await), all_clusters(&["a", "b"]));

    // Widening the scope sends the new dependency's clusters, and only those.
    let wider = "apiVersion: tributary.io/v1alpha1\nkind: Sidecar\nmetadata: {name: frontend, environment: prod}\nspec:\n  dependencies: [{host: a.prod}, {namespace: default}]\n".to_string();
    hub.write_and_wait("prod", "scope.yaml", wider).await;
    let r2 = scoped.recv().await;
    assert_eq!(
        delta_names(&r2),
        sorted(vec![cluster("b"), subset_cluster("b")])
    );
}

/// The virtual hosts' domains of an encoded route table.
fn route_domains(resp: &DeltaDiscoveryResponse) -> Vec<Vec<String>> {
    use tributary_proto::envoy::envoy::config::route::v3::RouteConfiguration;
    assert_eq!(resp.resources.len(), 1, "one route table");
    let any = resp.resources[0].resource.as_ref().expect("a resource");
    let rc = RouteConfiguration::decode(any.value.as_slice()).unwrap();
    rc.virtual_hosts
        .into_iter()
        .map(|v| v.domains.into_iter().filter(|d| !d.contains(':')).collect())
        .collect()
}

/// The route table an encoded HTTP listener references.
fn listener_route(resp: &DeltaDiscoveryResponse, listener: &str) -> String {
    let any = resp
        .resources
        .iter()
        .find(|r| r.name == listener)
        .and_then(|r| r.resource.as_ref())
        .unwrap_or_else(|| panic!("listener {listener} in {:?}", delta_names(resp)));
    let l = Listener::decode(any.value.as_slice()).unwrap();
    let hcm = &l.filter_chains[0].filters[0];
    let Some(tributary_proto::envoy::envoy::config::listener::v3::filter::ConfigType::TypedConfig(
        a,
    )) = &hcm.config_type
    else {
        panic!("listener {listener} has no typed HCM");
    };
    match HttpConnectionManager::decode(a.value.as_slice())
        .unwrap()
        .route_specifier
    {
        Some(RouteSpecifier::Rds(rds)) => rds.route_config_name,
        other => panic!("expected RDS, got {other:?}"),
    }
}

/// A scoped sidecar's wildcard LDS carries its own listeners, whose route tables hold
/// only the services it depends on (not every service of the environment); an
/// unknown scope gets no listeners; an unscoped sidecar keeps the environment's.
#[tokio::test]
async fn sidecar_scope_limits_listeners_and_route_tables() {
    let scope = "apiVersion: tributary.io/v1alpha1\nkind: Sidecar\nmetadata: {name: frontend, environment: prod}\nspec:\n  dependencies: [{host: a.prod}]\n".to_string();
    let hub = TestHub::start(&[
        (
            "services.yaml",
            docs(&[
                service("a", "prod", 8080),
                service("b", "prod", 8080),
                service("c", "prod", 9090),
            ]),
        ),
        ("scope.yaml", scope),
    ])
    .await;
    let frontend = || {
        Some(node_with(
            "fe-1",
            "prod",
            &[("tributary.io/sidecar", "frontend")],
        ))
    };
    let mut scoped = Delta::open(&hub).await;
    scoped.subscribe(frontend(), LDS, &[]).await;
    let l = scoped.recv().await;
    assert_eq!(
        delta_names(&l),
        sorted(vec![
            "sidecar|frontend|0.0.0.0_8080".into(),
            "virtualOutbound".into()
        ]),
        "only the ports of the scope's services"
    );
    let route = listener_route(&l, "sidecar|frontend|0.0.0.0_8080");
    assert_eq!(route, "sidecar|frontend|8080");
    scoped.ack(&l).await;
    scoped.subscribe(None, RDS, &[&route]).await;
    let r = scoped.recv().await;
    assert_eq!(route_domains(&r), vec![vec!["a.prod".to_string()]]);
    scoped.ack(&r).await;

    let mut plain = Delta::open(&hub).await;
    plain
        .subscribe(Some(node("plain-1", "prod")), LDS, &[])
        .await;
    let pl = plain.recv().await;
    assert_eq!(
        delta_names(&pl),
        sorted(vec![
            "0.0.0.0_8080".into(),
            "0.0.0.0_9090".into(),
            "virtualOutbound".into()
        ])
    );
    assert_eq!(listener_route(&pl, "0.0.0.0_8080"), "8080");
    plain.ack(&pl).await;
    plain.subscribe(None, RDS, &["8080"]).await;
    assert_eq!(
        route_domains(&plain.recv().await),
        vec![vec!["a.prod".to_string()], vec!["b.prod".to_string()]]
    );

    let mut unknown = Delta::open(&hub).await;
    unknown
        .subscribe(
            Some(node_with(
                "x-1",
                "prod",
                &[("tributary.io/sidecar", "typo")],
            )),
            LDS,
            &[],
        )
        .await;
    assert!(
        unknown.recv().await.resources.is_empty(),
        "an unknown scope selects no listener"
    );

    // Widening the scope to b: the scope's 8080 table gains b's virtual host; its
    // listener is unchanged (same route table name), so only the table is sent.
    let wider = "apiVersion: tributary.io/v1alpha1\nkind: Sidecar\nmetadata: {name: frontend, environment: prod}\nspec:\n  dependencies: [{host: a.prod}, {host: b.prod}]\n".to_string();
    hub.write_and_wait("prod", "scope.yaml", wider).await;
    let r2 = scoped.recv().await;
    assert_eq!(r2.type_url, RDS);
    assert_eq!(
        route_domains(&r2),
        vec![vec!["a.prod".to_string()], vec!["b.prod".to_string()]]
    );
}

/// On ACK the hub records end-to-end convergence from the change's origin.
#[tokio::test]
async fn convergence_is_recorded_on_ack() {
    let hub = two_services().await;
    let mut d = Delta::open(&hub).await;
    d.subscribe(Some(node("c-1", "prod")), EDS, &[&cluster("a")])
        .await;
    let r = d.recv().await;
    d.ack(&r).await;
    let eps = docs(&[
        endpoints("a", "prod", &["10.0.0.5"], 80),
        endpoints("b", "prod", &["10.0.0.2"], 80),
    ]);
    hub.write_and_wait("prod", "endpoints.yaml", eps).await;
    let r2 = d.recv().await;
    let before = convergence_count(&hub);
    d.ack(&r2).await;
    // The ACK is processed asynchronously: wait for the sample.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while convergence_count(&hub) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no convergence sample recorded"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

fn convergence_count(hub: &TestHub) -> u64 {
    let mut text = String::new();
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register("c", "c", hub.hub.metrics.convergence_seconds.clone());
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    text.lines()
        .filter(|l| l.starts_with("c_count{type=\"EDS\"}"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// A client that does not ACK is marked STALE; one that ACKs is not.
#[tokio::test]
async fn unacked_clients_are_marked_stale() {
    let hub = TestHub::start_with(&[("s.yaml", docs(&[service("a", "prod", 8080)]))], |c| {
        c.stale_after = std::time::Duration::from_millis(100);
    })
    .await;
    let mut slow = Delta::open(&hub).await;
    slow.subscribe(Some(node("slow", "prod")), CDS, &[]).await;
    let _ = slow.recv().await; // never ACKed
    let mut fast = Delta::open(&hub).await;
    fast.subscribe(Some(node("fast", "prod")), CDS, &[]).await;
    let r = fast.recv().await;
    fast.ack(&r).await;
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let clients = hub
            .hub
            .sync
            .snapshot_marking_stale(std::time::Duration::from_millis(100));
        let stale = |id: &str| {
            clients
                .iter()
                .find(|c| c.node_id == id)
                .is_some_and(|c| c.types.values().any(|t| t.stale))
        };
        if stale("slow") {
            assert!(!stale("fast"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slow client never became stale"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Initial syncs are admitted through a limit: with one slot, the second stream
/// waits until the first has ACKed its initial sync, then completes.
#[tokio::test]
async fn reconnect_storm_is_admitted_through_a_limit() {
    let hub = TestHub::start_with(&[("s.yaml", docs(&[service("a", "prod", 8080)]))], |c| {
        c.max_initial_syncs = 1
    })
    .await;
    let mut first = Delta::open(&hub).await;
    first.subscribe(Some(node("n1", "prod")), CDS, &[]).await;
    let r1 = first.recv().await;
    let mut second = Delta::open(&hub).await;
    second.subscribe(Some(node("n2", "prod")), CDS, &[]).await;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while hub.hub.metrics.xds_admission_waiting.get() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second stream was not held"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    first.ack(&r1).await;
    let r2 = second.recv().await;
    assert_eq!(delta_names(&r2), all_clusters(&["a"]));
    assert_eq!(hub.hub.metrics.xds_admission_waiting.get(), 0);
}

/// A diff larger than one response (`--max-response-bytes`, here 128 KiB) goes out in
/// several, each after the previous ACK, and together they carry everything exactly once.
#[tokio::test]
async fn large_diffs_are_sent_in_bounded_responses() {
    let names: Vec<String> = (0..600).map(|i| format!("svc{i}")).collect();
    let svcs: Vec<String> = names.iter().map(|n| service(n, "prod", 8080)).collect();
    let hub = TestHub::start_with(&[("s.yaml", docs(&svcs))], |cfg| {
        cfg.stream_limits.max_response_bytes = 128 * 1024;
    })
    .await;
    let mut d = Delta::open(&hub).await;
    d.subscribe(Some(node("big", "prod")), CDS, &[]).await;
    let mut got: Vec<String> = Vec::new();
    let mut responses = 0;
    while got.len() < 2 * names.len() + 1 {
        let r = d.recv().await;
        let size: usize = r.resources.iter().map(|x| x.encoded_len()).sum();
        assert!(size <= 160 * 1024, "response of {size} bytes");
        got.extend(delta_names(&r));
        responses += 1;
        d.ack(&r).await;
    }
    assert!(responses > 1, "expected the diff to be split");
    let total = got.len();
    got.sort();
    got.dedup();
    assert_eq!(got.len(), total, "a resource was sent twice");
    assert_eq!(got.len(), 2 * names.len() + 1);
}
