//! The work a snapshot costs one stream follows what changed, not what the client
//! holds, also when the stream skipped snapshots.
//!
//! A stream reconciles a type when it is woken and that type has no response in
//! flight. The snapshot channel coalesces, so a stream that waited for an ACK (or was
//! busy) sees several snapshots at once. It then walks the change sets of the
//! snapshots it skipped (kept on each snapshot), not every name it subscribes to or
//! holds: with wildcard CDS and LDS (as Envoy subscribes) that is the difference
//! between a few names and every cluster in the environment, on every stream.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tributary_controlplane::metrics::Metrics;
use tributary_controlplane::status::ClientStatus;
use tributary_controlplane::xds::XdsType;
use tributary_controlplane::xds::generate::EnvResources;
use tributary_controlplane::xds::snapshot::{CHANGE_HISTORY, Changes, Snapshot};
use tributary_controlplane::xds::stream::{NodeInfo, Outgoing, Role, StreamLimits, StreamState};
use tributary_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest,
};
use tributary_proto::wire::EncodedResource;

const CLUSTERS: usize = 2_000;

fn cluster(name: &str, version: u32) -> EncodedResource {
    let ty = XdsType::Cluster;
    let body = format!("{name} v{version}");
    EncodedResource::from_body(ty.type_url(), name, &format!("{version}"), body.as_bytes())
}

fn stream(sotw: bool) -> StreamState {
    stream_with(sotw, StreamLimits::default())
}

fn stream_with(sotw: bool, limits: StreamLimits) -> StreamState {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let status = Arc::new(Mutex::new(ClientStatus {
        node_id: "work".into(),
        cluster: String::new(),
        environment: "prod".into(),
        environment_served: true,
        role: "sidecar".into(),
        protocol: if sotw { "sotw" } else { "delta" },
        peer: None,
        connected_at_unix: 0.0,
        types: BTreeMap::new(),
    }));
    let node = NodeInfo {
        id: "work".into(),
        cluster: String::new(),
        environment: "prod".into(),
        role: Role::Sidecar,
        scope: None,
        namespace: None,
        service_account: None,
    };
    StreamState::new(node, sotw, limits, status, metrics)
}

/// `prev` with the clusters in `bump` at `version`.
fn next(prev: &Snapshot, bump: &[usize], version: u32) -> Snapshot {
    let mut resources: EnvResources = prev.resources.clone();
    let mut changed: Changes = Default::default();
    for &i in bump {
        let name = format!("c{i}");
        let map = &mut resources.by_type[XdsType::Cluster as usize];
        map.insert(Arc::from(name.as_str()), cluster(&name, version));
        changed[XdsType::Cluster as usize].insert(Arc::from(name.as_str()));
    }
    Snapshot::after(prev, resources, changed, false, None)
}

fn subscribe_wildcard(s: &mut StreamState, sotw: bool) {
    let ty = XdsType::Cluster;
    if sotw {
        let req = DiscoveryRequest {
            type_url: ty.type_url().into(),
            ..Default::default()
        };
        s.sotw_request(&req, ty).unwrap();
    } else {
        let req = DeltaDiscoveryRequest {
            type_url: ty.type_url().into(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        };
        s.delta_request(req, ty).unwrap();
    }
}

fn ack(s: &mut StreamState, sotw: bool, out: &Outgoing) {
    let ty = XdsType::Cluster;
    if sotw {
        let req = DiscoveryRequest {
            type_url: ty.type_url().into(),
            version_info: out.version.clone(),
            response_nonce: out.nonce.clone(),
            ..Default::default()
        };
        s.sotw_request(&req, ty).unwrap();
    } else {
        let req = DeltaDiscoveryRequest {
            type_url: ty.type_url().into(),
            response_nonce: out.nonce.clone(),
            ..Default::default()
        };
        s.delta_request(req, ty).unwrap();
    }
}

/// A client holding every cluster; while a response waits for its ACK, `skipped`
/// snapshots each change one more cluster; then it reconciles once.
fn catch_up(sotw: bool, skipped: usize) -> (u64, Outgoing) {
    let all: Vec<usize> = (0..CLUSTERS).collect();
    let mut snap = next(&Snapshot::empty("prod"), &all, 1);
    let mut s = stream(sotw);
    subscribe_wildcard(&mut s, sotw);
    // The initial set (Delta sends it in chunks), each chunk ACKed.
    let mut sent = std::collections::HashSet::new();
    while let Some(out) = s.build(XdsType::Cluster, &snap, false) {
        sent.extend(out.resources.iter().map(|r| r.name().to_string()));
        ack(&mut s, sotw, &out);
    }
    assert_eq!(sent.len(), CLUSTERS);
    // One change goes out; more snapshots arrive while it waits for its ACK.
    snap = next(&snap, &[CLUSTERS - 1], 2);
    let waiting = s.build(XdsType::Cluster, &snap, false).expect("a change");
    for k in 0..skipped {
        snap = next(&snap, &[k], 2);
        assert!(s.build(XdsType::Cluster, &snap, false).is_none());
    }
    ack(&mut s, sotw, &waiting);
    let before = s.names_visited();
    let out = s
        .build(XdsType::Cluster, &snap, false)
        .expect("the skipped changes");
    (s.names_visited() - before, out)
}

#[test]
fn delta_stream_that_skipped_snapshots_walks_only_their_changes() {
    let (visited, out) = catch_up(false, 3);
    let mut names: Vec<&str> = out.resources.iter().map(|r| r.name()).collect();
    names.sort();
    assert_eq!(names, ["c0", "c1", "c2"]);
    assert_eq!(visited, 3, "names looked at for 3 changes among {CLUSTERS}");
}

#[test]
fn sotw_stream_that_skipped_snapshots_walks_only_their_changes() {
    // A SotW CDS response is the full set, but finding out whether to send one
    // needs only the changes.
    let (visited, out) = catch_up(true, 3);
    assert_eq!(out.resources.len(), CLUSTERS);
    assert!(
        out.resources
            .iter()
            .filter(|r| ["c0", "c1", "c2"].contains(&r.name()))
            .all(|r| r.version() == "2")
    );
    assert_eq!(visited, 3, "names looked at for 3 changes among {CLUSTERS}");
}

#[test]
fn a_stream_further_behind_than_the_history_compares_everything() {
    // Past the kept change sets there is nothing to walk but everything; the result
    // is the same.
    let skipped = CHANGE_HISTORY + 2;
    let (visited, out) = catch_up(false, skipped);
    assert_eq!(out.resources.len(), skipped);
    assert!(visited >= CLUSTERS as u64, "{visited}");
}

/// A Delta initial set larger than `--max-response-bytes` goes out in several
/// responses, each within the bound, the next only after the previous one's ACK;
/// with the default bound the same set is one response.
#[test]
fn delta_responses_respect_max_response_bytes() {
    let all: Vec<usize> = (0..CLUSTERS).collect();
    let snap = next(&Snapshot::empty("prod"), &all, 1);
    let total: usize = snap.resources.by_type[XdsType::Cluster as usize]
        .values()
        .map(|r| r.size())
        .sum();
    let limit = 4096;
    assert!(
        total > 4 * limit,
        "the set ({total} bytes) must need several responses"
    );
    let mut s = stream_with(
        false,
        StreamLimits {
            max_response_bytes: limit,
            ..StreamLimits::default()
        },
    );
    subscribe_wildcard(&mut s, false);
    let mut sent = std::collections::HashSet::new();
    let mut responses = 0;
    while let Some(out) = s.build(XdsType::Cluster, &snap, false) {
        responses += 1;
        let size: usize = out.resources.iter().map(|r| r.size()).sum();
        assert!(
            size <= limit,
            "response {responses} is {size} bytes, over {limit}"
        );
        // Nothing more until this one is ACKed.
        assert!(s.build(XdsType::Cluster, &snap, false).is_none());
        for r in &out.resources {
            assert!(sent.insert(r.name().to_string()), "{} sent twice", r.name());
        }
        ack(&mut s, false, &out);
    }
    assert_eq!(sent.len(), CLUSTERS);
    assert!(
        responses >= total / limit,
        "{responses} responses for {total} bytes"
    );

    let mut s = stream(false);
    subscribe_wildcard(&mut s, false);
    let out = s.build(XdsType::Cluster, &snap, false).expect("the set");
    assert_eq!(
        out.resources.len(),
        CLUSTERS,
        "the default bound holds it whole"
    );
}
