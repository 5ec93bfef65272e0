//! The xDS server under faults, against an in-process hub: per-resource NACKs,
//! make-before-break in both halves (and under endpoint churn), the withdrawal hold
//! after a restart, and bounds on what a hostile client can make the hub hold.
//! docs/xds.md states each rule these tests check.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::*;
use prost::Message;
use tonic::Code;
use tributary_proto::envoy::envoy::config::cluster::v3::Cluster;
use tributary_proto::envoy::envoy::config::route::v3::{
    RouteConfiguration, route::Action, route_action::ClusterSpecifier,
};
use tributary_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};

fn cluster(svc: &str) -> String {
    format!("outbound|8080||{svc}.prod")
}

/// A service without subsets: exactly one cluster.
fn plain(name: &str, protocol: &str) -> String {
    format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}, environment: prod}}\nspec:\n  hosts: [{name}.prod]\n  ports: [{{name: http, port: 8080, protocol: {protocol}}}]\n"
    )
}

fn plains(names: &[&str]) -> String {
    docs(&names.iter().map(|n| plain(n, "HTTP")).collect::<Vec<_>>())
}

/// Envoy's message for clusters it could not add or update.
fn envoy_cds_nack(names: &[&str]) -> String {
    let parts: Vec<String> = names
        .iter()
        .map(|n| format!("{n}: Proto constraint validation failed (ClusterValidationError.ConnectTimeout: value must be greater than 0s)"))
        .collect();
    format!("Error adding/updating cluster(s) {}", parts.join(", "))
}

fn cds_nack(resp_nonce: &str, version: &str, message: String) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: CDS.into(),
        version_info: version.into(),
        response_nonce: resp_nonce.into(),
        error_detail: nack(&message),
        ..Default::default()
    }
}

fn versions(resp: &DiscoveryResponse) -> HashMap<String, Vec<u8>> {
    resp.resources
        .iter()
        .map(|a| (resource_name(a), a.value.clone()))
        .collect()
}

fn cds_nacks(hub: &TestHub) -> u64 {
    hub.sync_status()[0]["types"]["CDS"]["nacks_total"]
        .as_u64()
        .unwrap()
}

/// One SotW response with one invalid and three valid new clusters: the client
/// applies the three and rejects one (as Envoy does). Through five unrelated
/// changes after it, every full set keeps the three and everything older, never
/// carries the rejected version, and the client NACKs exactly once.
#[tokio::test]
async fn sotw_nack_of_one_cluster_keeps_the_others() {
    let hub = TestHub::start(&[("s.yaml", plains(&["old"]))]).await;
    let mut s = Sotw::open(&hub).await;
    s.request(Some(node("envoy-1", "prod")), CDS, &[], None)
        .await;
    let first = s.recv().await;
    s.ack(&first, &[]).await;

    hub.write_and_wait("prod", "s.yaml", plains(&["old", "c1", "c2", "c3", "bad"]))
        .await;
    let r = s.recv().await;
    assert_eq!(
        names(&r),
        sorted(
            ["old", "c1", "c2", "c3", "bad"]
                .iter()
                .map(|n| cluster(n))
                .chain(["PassthroughCluster".to_string()])
                .collect()
        )
    );
    s.send(cds_nack(
        &r.nonce,
        &first.version_info,
        envoy_cds_nack(&[&cluster("bad")]),
    ))
    .await;
    // Whether the client applied the three others is unknown (Envoy rejects a whole
    // response when a cluster fails validation while decoding): the next full set
    // carries them, and not the rejected one.
    let resend = s.recv().await;
    assert_eq!(
        names(&resend),
        sorted(
            ["old", "c1", "c2", "c3"]
                .iter()
                .map(|n| cluster(n))
                .chain(["PassthroughCluster".to_string()])
                .collect()
        )
    );
    s.ack(&resend, &[]).await;

    let mut present = vec!["old", "c1", "c2", "c3", "bad"];
    for i in 1..=5 {
        let u = format!("u{i}");
        present.push(Box::leak(u.into_boxed_str()));
        hub.write_and_wait("prod", "s.yaml", plains(&present)).await;
        let r = s.recv().await;
        assert_eq!(r.type_url, CDS);
        let got = names(&r);
        for keep in ["old", "c1", "c2", "c3"] {
            assert!(
                got.contains(&cluster(keep)),
                "change {i}: the full set lacks {keep}, which the client accepted: {got:?}"
            );
        }
        assert!(
            !got.contains(&cluster("bad")),
            "change {i}: the rejected cluster was sent again: {got:?}"
        );
        s.ack(&r, &[]).await;
    }
    assert_eq!(cds_nacks(&hub), 1, "exactly one NACK");
    let rec = &hub.sync_status()[0]["types"]["CDS"]["last_nack"];
    assert_eq!(rec["resources"], serde_json::json!([cluster("bad")]));
    assert_eq!(rec["resources_total"], 1);
}

/// An invalid update of an existing cluster: the full sets keep serving the last
/// good version, and the rejected one is never sent again (it used to come back at
/// every other change: the ACK of a full set carrying the old version cleared the
/// rejection).
#[tokio::test]
async fn sotw_nacked_update_keeps_serving_the_last_good_version() {
    let hub = TestHub::start(&[("s.yaml", plains(&["a", "b"]))]).await;
    let mut s = Sotw::open(&hub).await;
    s.request(Some(node("envoy-1", "prod")), CDS, &[], None)
        .await;
    let first = s.recv().await;
    let good = versions(&first)[&cluster("a")].clone();
    s.ack(&first, &[]).await;

    // a's port becomes GRPC: a new version of its cluster, which the client rejects.
    let a_grpc = plain("a", "GRPC");
    hub.write_and_wait(
        "prod",
        "s.yaml",
        docs(&[a_grpc.clone(), plain("b", "HTTP")]),
    )
    .await;
    let r = s.recv().await;
    let bad = versions(&r)[&cluster("a")].clone();
    assert_ne!(bad, good);
    s.send(cds_nack(
        &r.nonce,
        &first.version_info,
        envoy_cds_nack(&[&cluster("a")]),
    ))
    .await;

    let mut extra: Vec<String> = Vec::new();
    for i in 1..=5 {
        extra.push(plain(&format!("u{i}"), "HTTP"));
        let mut all = vec![a_grpc.clone(), plain("b", "HTTP")];
        all.extend(extra.iter().cloned());
        hub.write_and_wait("prod", "s.yaml", docs(&all)).await;
        let r = s.recv().await;
        let v = versions(&r);
        assert_eq!(
            v.get(&cluster("a")),
            Some(&good),
            "change {i}: a must be served at its last good version"
        );
        s.ack(&r, &[]).await;
    }
    assert_eq!(cds_nacks(&hub), 1, "exactly one NACK");
}

/// Delta: after a NACK naming one cluster, the client holds the three it accepted:
/// they are not sent again, and when one of them goes away the client is told.
#[tokio::test]
async fn delta_nack_of_one_cluster_keeps_the_others() {
    let hub = TestHub::start(&[("s.yaml", plains(&["old"]))]).await;
    let mut d = Delta::open(&hub).await;
    d.subscribe(Some(node("envoy-d", "prod")), CDS, &[]).await;
    let first = d.recv().await;
    d.ack(&first).await;

    hub.write_and_wait("prod", "s.yaml", plains(&["old", "c1", "c2", "c3", "bad"]))
        .await;
    let r = d.recv().await;
    assert_eq!(
        delta_names(&r),
        sorted(
            ["c1", "c2", "c3", "bad"]
                .iter()
                .map(|n| cluster(n))
                .collect()
        )
    );
    d.send(DeltaDiscoveryRequest {
        type_url: CDS.into(),
        response_nonce: r.nonce.clone(),
        error_detail: nack(&envoy_cds_nack(&[&cluster("bad")])),
        ..Default::default()
    })
    .await;
    // The three the message does not name are sent once more (the client may have
    // rejected the response whole); the rejected one is not.
    let resend = d.recv().await;
    assert_eq!(
        delta_names(&resend),
        sorted(["c1", "c2", "c3"].iter().map(|n| cluster(n)).collect())
    );
    d.ack(&resend).await;

    let mut present = vec!["old", "c1", "c2", "c3", "bad"];
    for i in 1..=5 {
        let u = format!("u{i}");
        present.push(Box::leak(u.into_boxed_str()));
        hub.write_and_wait("prod", "s.yaml", plains(&present)).await;
        let r = d.recv().await;
        assert_eq!(
            delta_names(&r),
            vec![cluster(&format!("u{i}"))],
            "change {i}: only the new cluster"
        );
        d.ack(&r).await;
    }
    // c1 goes away: the client, which holds it, is told.
    present.retain(|n| *n != "c1");
    hub.write_and_wait("prod", "s.yaml", plains(&present)).await;
    let r = d.recv().await;
    assert_eq!(r.removed_resources, vec![cluster("c1")]);
    assert_eq!(
        hub.sync_status()[0]["types"]["CDS"]["nacks_total"],
        1,
        "exactly one NACK"
    );
}

/// Routes (one watch per route table in Envoy): a NACK naming one table rejects
/// that one; the others of the response may not have been applied, so they are sent
/// once more, and the rejected version never is.
#[tokio::test]
async fn rds_nack_resends_the_others_once_and_never_the_rejected_one() {
    let gw = |port: u16| {
        format!(
            "apiVersion: tributary.io/v1alpha1\nkind: Gateway\nmetadata: {{name: edge, environment: prod}}\nspec:\n  listeners:\n  - {{name: l1, address: 127.0.0.1, port: {port}}}\n  - {{name: l2, address: 127.0.0.1, port: {}}}\n",
            port + 1
        )
    };
    let hub = TestHub::start(&[("s.yaml", plains(&["a"])), ("gw.yaml", gw(18080))]).await;
    let mut s = Sotw::open(&hub).await;
    let n = node_with("gw-1", "prod", &[("tributary.io/gateway", "edge")]);
    let tables = ["gateway|edge|l1", "gateway|edge|l2"];
    s.request(Some(n), RDS, &tables, None).await;
    let r = s.recv().await;
    s.ack(&r, &tables).await;

    // A new service changes both tables.
    hub.write_and_wait("prod", "s.yaml", plains(&["a", "b"]))
        .await;
    let r = s.recv().await;
    assert_eq!(
        names(&r),
        sorted(tables.iter().map(|t| t.to_string()).collect())
    );
    s.send(DiscoveryRequest {
        type_url: RDS.into(),
        resource_names: tables.iter().map(|t| t.to_string()).collect(),
        response_nonce: r.nonce.clone(),
        error_detail: nack("route config gateway|edge|l1: regex too large"),
        ..Default::default()
    })
    .await;
    let again = s.recv().await;
    assert_eq!(
        names(&again),
        vec!["gateway|edge|l2".to_string()],
        "the table not named is sent once more; the rejected one is not"
    );
    s.ack(&again, &tables).await;
    hub.write_and_wait("prod", "s.yaml", plains(&["a", "b", "c"]))
        .await;
    let next = s.recv().await;
    assert_eq!(names(&next).len(), 2, "a new change sends both again");
    assert_eq!(hub.sync_status()[0]["types"]["RDS"]["nacks_total"], 1);
}

// ---- make-before-break ------------------------------------------------------------

/// Service `r` with subsets and a gateway routing r.prod to `subset`.
fn switch_mesh(subsets: &[&str], route_to: &str) -> String {
    let subsets: Vec<String> = subsets
        .iter()
        .map(|s| format!("{{name: {s}, labels: {{version: {s}}}}}"))
        .collect();
    docs(&[
        format!(
            "apiVersion: tributary.io/v1alpha1\nkind: Service\nmetadata: {{name: r, environment: prod}}\nspec:\n  hosts: [r.prod]\n  ports: [{{name: http, port: 8080, protocol: HTTP}}]\n  subsets: [{}]\n",
            subsets.join(", ")
        ),
        "apiVersion: tributary.io/v1alpha1\nkind: Endpoints\nmetadata: {name: r, environment: prod}\nspec:\n  endpoints:\n  - {address: 10.0.0.1, port: 80, labels: {version: a}}\n  - {address: 10.0.0.2, port: 80, labels: {version: b}}\n".to_string(),
        format!(
            "apiVersion: tributary.io/v1alpha1\nkind: Route\nmetadata: {{name: r, environment: prod}}\nspec:\n  hosts: [r.prod]\n  port: 8080\n  http:\n  - destinations: [{{service: r, subset: {route_to}}}]\n"
        ),
        "apiVersion: tributary.io/v1alpha1\nkind: Gateway\nmetadata: {name: edge, environment: prod}\nspec:\n  listeners: [{name: http, address: 127.0.0.1, port: 18080}]\n".to_string(),
    ])
}

fn subset(s: &str) -> String {
    format!("outbound|8080|{s}|r.prod")
}

const TABLE: &str = "gateway|edge|http";

/// The clusters a gateway route table sends traffic to.
fn route_targets(any: &tributary_proto::envoy::google::protobuf::Any) -> BTreeSet<String> {
    let rc = RouteConfiguration::decode(any.value.as_slice()).unwrap();
    let mut out = BTreeSet::new();
    for vh in rc.virtual_hosts {
        for r in vh.routes {
            if let Some(Action::Route(a)) = r.action {
                match a.cluster_specifier {
                    Some(ClusterSpecifier::Cluster(c)) => {
                        out.insert(c);
                    }
                    Some(ClusterSpecifier::WeightedClusters(w)) => {
                        out.extend(w.clusters.into_iter().map(|c| c.name));
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// Delta: a route moves from subset a to subset b and a's cluster goes away. Order:
/// add b (CDS, then EDS) → switch (RDS) → remove a, and the removal leaves only after
/// the switch is ACKed.
#[tokio::test]
async fn delta_cluster_removal_waits_for_the_switch() {
    let hub = TestHub::start(&[("m.yaml", switch_mesh(&["a", "b"], "a"))]).await;
    let mut d = Delta::open(&hub).await;
    let n = node_with("gw-d", "prod", &[("tributary.io/gateway", "edge")]);
    d.subscribe(Some(n), CDS, &[]).await;
    let c = d.recv().await;
    d.subscribe(None, EDS, &[&subset("a"), &subset("b"), &cluster("r")])
        .await;
    d.ack(&c).await;
    let e = d.recv().await;
    d.ack(&e).await;
    d.subscribe(None, LDS, &[]).await;
    let l = d.recv().await;
    d.ack(&l).await;
    d.subscribe(None, RDS, &[TABLE]).await;
    let r = d.recv().await;
    assert_eq!(
        route_targets(&tributary_proto::envoy::google::protobuf::Any {
            type_url: RDS.into(),
            value: r.resources[0].resource.as_ref().unwrap().value.clone()
        }),
        BTreeSet::from([subset("a")])
    );
    d.ack(&r).await;

    // Route to b only, and drop subset a.
    hub.write_and_wait("prod", "m.yaml", switch_mesh(&["b"], "b"))
        .await;
    let mut log: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    let mut rds_acked = false;
    let mut removal_seen_after = None;
    for _ in 0..6 {
        let resp = tokio::time::timeout(Duration::from_secs(3), d.rx.message()).await;
        let Ok(Ok(Some(resp))) = resp else { break };
        let kind = short(&resp.type_url);
        log.push((
            kind.clone(),
            delta_names(&resp),
            resp.removed_resources.clone(),
        ));
        if kind == "CDS" && resp.removed_resources.contains(&subset("a")) {
            removal_seen_after = Some(rds_acked);
            d.ack(&resp).await;
            break;
        }
        d.ack(&resp).await;
        if kind == "RDS" {
            rds_acked = true;
        }
    }
    assert_eq!(
        removal_seen_after,
        Some(true),
        "a's cluster must be removed, and only after the route switch is ACKed: {log:?}"
    );
}

/// SotW: the full CDS sets keep a's cluster until the switch is ACKed.
#[tokio::test]
async fn sotw_cluster_removal_waits_for_the_switch() {
    let hub = TestHub::start(&[("m.yaml", switch_mesh(&["a", "b"], "a"))]).await;
    let mut s = Sotw::open(&hub).await;
    let n = node_with("gw-s", "prod", &[("tributary.io/gateway", "edge")]);
    s.request(Some(n), CDS, &[], None).await;
    let c = s.recv().await;
    let eds_names = [subset("a"), subset("b"), cluster("r")];
    let eds_refs: Vec<&str> = eds_names.iter().map(String::as_str).collect();
    s.request(None, EDS, &eds_refs, None).await;
    s.ack(&c, &[]).await;
    let e = s.recv().await;
    s.ack(&e, &eds_refs).await;
    s.request(None, LDS, &[], None).await;
    let l = s.recv().await;
    s.ack(&l, &[]).await;
    s.request(None, RDS, &[TABLE], None).await;
    let r = s.recv().await;
    s.ack(&r, &[TABLE]).await;

    hub.write_and_wait("prod", "m.yaml", switch_mesh(&["b"], "b"))
        .await;
    let mut rds_acked = false;
    let mut log = Vec::new();
    loop {
        let resp = s.recv().await;
        let kind = short(&resp.type_url);
        let got = names(&resp);
        log.push((kind.clone(), got.clone()));
        match kind.as_str() {
            "CDS" if !got.contains(&subset("a")) => {
                assert!(
                    rds_acked,
                    "a full CDS set dropped a's cluster before the route switch was ACKed: {log:?}"
                );
                break;
            }
            "CDS" => s.ack(&resp, &[]).await,
            "EDS" => s.ack(&resp, &eds_refs).await,
            "RDS" => {
                assert_eq!(
                    route_targets(&resp.resources[0]),
                    BTreeSet::from([subset("b")])
                );
                s.ack(&resp, &[TABLE]).await;
                rds_acked = true;
            }
            _ => s.ack(&resp, &[]).await,
        }
        assert!(log.len() < 10, "no CDS set without a: {log:?}");
    }
}

fn short(type_url: &str) -> String {
    match type_url {
        CDS => "CDS",
        EDS => "EDS",
        LDS => "LDS",
        RDS => "RDS",
        _ => "?",
    }
    .to_string()
}

/// Under continuous endpoint churn, with a client slow enough that an endpoint
/// update is in flight whenever it answers, a route change still reaches it at once
/// (it does not wait for endpoint churn of clusters it already has).
#[tokio::test]
async fn routes_do_not_wait_for_endpoint_churn() {
    let hub = TestHub::start_with(&[("m.yaml", switch_mesh(&["a", "b"], "a"))], |c| {
        c.debounce.quiet = Duration::from_millis(5);
        c.debounce.cap = Duration::from_millis(20);
    })
    .await;
    let mut d = Delta::open(&hub).await;
    let n = node_with("gw-churn", "prod", &[("tributary.io/gateway", "edge")]);
    d.subscribe(Some(n), CDS, &[]).await;
    let c = d.recv().await;
    let eds = [subset("a"), subset("b"), cluster("r")];
    let eds_refs: Vec<&str> = eds.iter().map(String::as_str).collect();
    d.subscribe(None, EDS, &eds_refs).await;
    d.ack(&c).await;
    let e = d.recv().await;
    d.ack(&e).await;
    d.subscribe(None, RDS, &[TABLE]).await;
    let r = d.recv().await;
    d.ack(&r).await;

    // Endpoint churn: a new address for subset a's endpoint in every file write.
    let path = hub.path("churn.yaml");
    let churn_env = |i: u32| {
        format!(
            "apiVersion: tributary.io/v1alpha1\nkind: Endpoints\nmetadata: {{name: r-extra, environment: prod}}\nspec:\n  service: r\n  endpoints:\n  - {{address: 10.1.{}.{}, port: 80, labels: {{version: a}}}}\n",
            i / 250,
            i % 250 + 1
        )
    };
    let mut snaps = hub.hub.snapshots.subscribe_or_create("prod");
    // The client answers an endpoint update only once a newer snapshot exists, so an
    // endpoint update is always in flight when it answers.
    let mut i = 0u32;
    let churn = |i: &mut u32| {
        *i += 1;
        std::fs::write(&path, churn_env(*i)).unwrap();
    };
    churn(&mut i);
    let first_eds = d.recv().await;
    assert_eq!(first_eds.type_url, EDS);
    // The route switch lands while that update is unanswered.
    let before = snaps.borrow_and_update().seq;
    let text = switch_mesh(&["a", "b"], "b");
    std::fs::write(hub.path("m.yaml"), text).unwrap();
    tokio::time::timeout(TIMEOUT, snaps.wait_for(|s| s.seq > before))
        .await
        .unwrap()
        .unwrap();
    let mut pending_eds = Some(first_eds);
    let mut eds_answered = 0;
    loop {
        if let Some(e) = pending_eds.take() {
            // Answer it only after more churn has been published.
            let seen = snaps.borrow_and_update().seq;
            churn(&mut i);
            tokio::time::timeout(TIMEOUT, snaps.wait_for(|s| s.seq > seen))
                .await
                .unwrap()
                .unwrap();
            d.ack(&e).await;
            eds_answered += 1;
        }
        let resp: DeltaDiscoveryResponse = d.recv().await;
        if resp.type_url == RDS {
            break;
        }
        assert_eq!(resp.type_url, EDS);
        pending_eds = Some(resp);
        assert!(
            eds_answered < 3,
            "the route change waited behind {eds_answered} endpoint updates"
        );
    }
}

// ---- the withdrawal hold (after a hub restart) -------------------------------------

/// While the hub holds withdrawals, a Delta client is told of no removal and a SotW
/// client that holds an earlier stream's set gets no full set that could lack one of
/// its resources; a brand-new SotW client is served at once. When the hold ends,
/// everything goes out.
#[tokio::test]
async fn the_withdrawal_hold_withholds_removals_and_partial_full_sets() {
    let hub = TestHub::start(&[("s.yaml", plains(&["a", "b"]))]).await;
    let mut d = Delta::open(&hub).await;
    d.subscribe(Some(node("delta", "prod")), CDS, &[]).await;
    let r = d.recv().await;
    d.ack(&r).await;

    hub.hub.snapshots.hold_withdrawals(true);
    d.subscribe(None, EDS, &["outbound|1||nope.prod"]).await;
    // The subscription is answered, without the absent notice (a removal).
    let e = d.recv().await;
    assert_eq!(e.type_url, EDS);
    assert!(e.resources.is_empty() && e.removed_resources.is_empty());
    d.ack(&e).await;
    hub.write_and_wait("prod", "s.yaml", plains(&["a", "c"]))
        .await;
    // Delta: c arrives, b's removal (and the absent notice for `nope`) wait.
    let r = d.recv().await;
    assert_eq!(r.type_url, CDS);
    assert_eq!(delta_names(&r), vec![cluster("c")]);
    assert!(r.removed_resources.is_empty(), "{:?}", r.removed_resources);
    d.ack(&r).await;

    // A SotW client reconnecting with a version: nothing until the hold ends.
    let mut back = Sotw::open(&hub).await;
    back.send(DiscoveryRequest {
        node: Some(node("sotw-back", "prod")),
        type_url: CDS.into(),
        version_info: "7".into(),
        ..Default::default()
    })
    .await;
    // A new SotW client (no version) has nothing to lose: served now.
    let mut fresh = Sotw::open(&hub).await;
    fresh
        .request(Some(node("sotw-new", "prod")), CDS, &[], None)
        .await;
    let f = fresh.recv().await;
    assert!(names(&f).contains(&cluster("c")));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), back.rx.message())
            .await
            .is_err(),
        "a reconnecting SotW client got a full set during the hold"
    );

    hub.hub.snapshots.hold_withdrawals(false);
    let r = d.recv().await;
    let mut removed = r.removed_resources.clone();
    removed.sort();
    assert_eq!(
        removed,
        sorted(vec![cluster("b")]),
        "b's removal goes out when the hold ends"
    );
    let e = d.recv().await;
    assert_eq!(
        e.removed_resources,
        vec!["outbound|1||nope.prod".to_string()]
    );
    let full = back.recv().await;
    assert_eq!(
        names(&full),
        sorted(vec![
            cluster("a"),
            cluster("c"),
            "PassthroughCluster".into()
        ])
    );
}

// ---- bounds on what a client can make the hub hold --------------------------------

#[tokio::test]
async fn too_many_subscribed_names_get_a_clear_error() {
    let hub = TestHub::start_with(&[("s.yaml", plains(&["a"]))], |c| {
        c.stream_limits.max_names_per_type = 100;
    })
    .await;
    let many: Vec<String> = (0..101).map(|i| format!("outbound|{i}||x.prod")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();

    let mut d = Delta::open(&hub).await;
    d.subscribe(Some(node("greedy", "prod")), EDS, &refs[..60])
        .await;
    let _ = d.recv().await;
    d.subscribe(None, EDS, &refs[60..]).await;
    let err = loop {
        match d.rx.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream closed without an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("--max-names-per-type"),
        "{}",
        err.message()
    );

    let mut s = Sotw::open(&hub).await;
    s.request(Some(node("greedy-sotw", "prod")), EDS, &refs, None)
        .await;
    let err = s.rx.message().await.expect_err("an error status");
    assert_eq!(err.code(), Code::ResourceExhausted);

    // The hub keeps serving.
    let mut ok = Delta::open(&hub).await;
    ok.subscribe(Some(node("fine", "prod")), CDS, &[]).await;
    assert!(!ok.recv().await.resources.is_empty());
}

/// A node naming an environment the hub does not serve gets nothing and creates
/// nothing; once that environment has config, the stream is served.
#[tokio::test]
async fn unknown_environments_allocate_nothing() {
    let hub = TestHub::start(&[("s.yaml", plains(&["a"]))]).await;
    let before = hub.hub.snapshots.environments();
    let mut streams = Vec::new();
    for i in 0..50 {
        let d = Delta::open(&hub).await;
        d.subscribe(
            Some(node(&format!("n{i}"), &format!("bogus-{i}"))),
            CDS,
            &[],
        )
        .await;
        streams.push(d);
    }
    let mut late = Delta::open(&hub).await;
    late.subscribe(Some(node("late", "later")), CDS, &[]).await;
    // Every stream is registered (so its request was read) ...
    tokio::time::timeout(TIMEOUT, async {
        while hub.hub.sync.snapshot().len() < 51 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("all streams registered");
    // ... and no environment was created for them.
    assert_eq!(hub.hub.snapshots.environments(), before);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), streams[0].rx.message())
            .await
            .is_err(),
        "a stream of an unknown environment was answered"
    );
    let status = hub.sync_status();
    let rec = status
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["node_id"] == "late")
        .unwrap();
    assert_eq!(rec["environment_served"], false);

    // The environment gets config: the waiting stream is served.
    let later = "apiVersion: tributary.io/v1alpha1\nkind: Service\nmetadata: {name: z, environment: later}\nspec:\n  hosts: [z.later]\n  ports: [{name: http, port: 8080, protocol: HTTP}]\n";
    std::fs::write(hub.path("later.yaml"), later).unwrap();
    let r = late.recv().await;
    assert!(delta_names(&r).contains(&"outbound|8080||z.later".to_string()));
}

/// A NACK naming a thousand resources, with a huge message, leaves a bounded record.
#[tokio::test]
async fn nack_records_are_bounded() {
    let svcs: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = svcs.iter().map(String::as_str).collect();
    let hub = TestHub::start(&[("s.yaml", plains(&refs))]).await;
    let mut s = Sotw::open(&hub).await;
    s.request(Some(node("nacker", "prod")), CDS, &[], None)
        .await;
    let r = s.recv().await;
    let all: Vec<String> = svcs.iter().map(|n| cluster(n)).collect();
    let all_refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut message = envoy_cds_nack(&all_refs);
    message.push_str(&"x".repeat(100_000));
    s.send(cds_nack(&r.nonce, "", message)).await;
    let rec = tokio::time::timeout(TIMEOUT, async {
        loop {
            let st = hub.sync_status();
            let rec = st[0]["types"]["CDS"]["last_nack"].clone();
            if !rec.is_null() {
                return rec;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(rec["resources"].as_array().unwrap().len(), 64);
    assert_eq!(rec["resources_total"], 1000);
    assert!(rec["message"].as_str().unwrap().len() < 5000);
}

/// A request above `--max-request-bytes` ends that stream; the hub serves on.
#[tokio::test]
async fn oversize_requests_end_the_stream() {
    let hub = TestHub::start_with(&[("s.yaml", plains(&["a"]))], |c| {
        c.max_request_bytes = 64 * 1024;
    })
    .await;
    let many: Vec<String> = (0..5000)
        .map(|i| format!("outbound|{i}||some-service.prod"))
        .collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let mut s = Sotw::open(&hub).await;
    s.request(Some(node("big", "prod")), EDS, &refs, None).await;
    let err = s.rx.message().await.expect_err("an error status");
    assert!(
        matches!(
            err.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::Internal
        ),
        "{err:?}"
    );
    let mut ok = Delta::open(&hub).await;
    ok.subscribe(Some(node("fine", "prod")), CDS, &[]).await;
    let r = ok.recv().await;
    let c = Cluster::decode(r.resources[0].resource.as_ref().unwrap().value.as_slice());
    assert!(c.is_ok());
}
