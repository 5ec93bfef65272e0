//! The Kubernetes agent against a real kube-apiserver and etcd (tests/kube/kubeenv.py
//! starts both on loopback): objects written through the API reach an xDS client
//! connected to the hub.

mod common;
#[path = "common/kube_env.rs"]
mod kube_env;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube_env::KubeEnv;
use prost::Message;
use serde_json::json;
use tokio::sync::{oneshot, watch};
use tributary_controlplane::agent::kube::KubeOptions;
use tributary_controlplane::agent::{self, AgentConfig, ClusterState};
use tributary_controlplane::app::{Hub, HubConfig};
use tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use tributary_proto::envoy::envoy::service::discovery::v3::DeltaDiscoveryResponse;

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn slice(name: &str, family: &str, endpoints: serde_json::Value) -> EndpointSlice {
    obj(json!({
        "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": family,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
}

const CLA: &str = "outbound|80||web.shop.svc.cluster.local";

/// What a Delta client holds, kept up to date by ACKing every response.
struct View {
    d: Delta,
    clusters: HashMap<String, String>,
    cla: Option<ClusterLoadAssignment>,
}

impl View {
    fn apply(&mut self, r: &DeltaDiscoveryResponse) {
        for res in &r.resources {
            if r.type_url == CDS {
                self.clusters.insert(res.name.clone(), res.version.clone());
            } else if res.name == CLA {
                self.cla = Some(
                    ClusterLoadAssignment::decode(res.resource.as_ref().unwrap().value.as_slice())
                        .unwrap(),
                );
            }
        }
        for n in &r.removed_resources {
            self.clusters.remove(n);
            if n == CLA {
                self.cla = None;
            }
        }
    }

    /// Receives and ACKs until `done` holds.
    async fn until(&mut self, what: &str, done: impl Fn(&View) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done(self) {
            let r = tokio::time::timeout_at(deadline, self.d.rx.message())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
                .unwrap()
                .unwrap();
            self.apply(&r);
            self.d.ack(&r).await;
        }
    }
}

fn endpoints(v: &View) -> Vec<(String, i32)> {
    let mut out: Vec<(String, i32)> = v
        .cla
        .iter()
        .flat_map(|c| c.endpoints.iter().flat_map(|l| l.lb_endpoints.iter()))
        .map(|e| {
            use tributary_proto::envoy::envoy::config::core::v3::address::Address;
            use tributary_proto::envoy::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!()
            };
            let Some(Address::SocketAddress(sa)) = &ep.address.as_ref().unwrap().address else {
                panic!()
            };
            (sa.address.clone(), e.health_status)
        })
        .collect();
    out.sort();
    out
}

const HEALTHY: i32 = 1;
const UNHEALTHY: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_objects_reach_xds_clients() {
    let kube_env = KubeEnv::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.yaml"), "# federated only\n").unwrap();
    let mut cfg = HubConfig::local(vec![dir.path().to_path_buf()]);
    cfg.debounce.quiet = Duration::from_millis(20);
    let hub = Hub::start(cfg).await.unwrap();

    let opts = KubeOptions {
        kubeconfig: Some(kube_env.kubeconfig.clone()),
        default_env: None,
        zone: "az-default".into(),
        // One test lists from the apiserver's watch cache, the other from etcd.
        list_from_cache: true,
    };
    let client = agent::kube::client(&opts).await.unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let pp = PostParams::default();
    namespaces
        .create(
            &pp,
            &obj(json!({"metadata": {"name": "shop", "labels": {"tributary.io/env": "prod"}}})),
        )
        .await
        .unwrap();
    namespaces
        .create(&pp, &obj(json!({"metadata": {"name": "unlabelled"}})))
        .await
        .unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    let svc = json!({"metadata": {"name": "web"}, "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}], "ipFamilyPolicy": "PreferDualStack"}});
    services.create(&pp, &obj(svc.clone())).await.unwrap();
    Api::<Service>::namespaced(client.clone(), "unlabelled")
        .create(&pp, &obj(svc))
        .await
        .unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "shop");
    let ready = |a: &str| json!({"addresses": [a], "conditions": {"ready": true}, "zone": "az1"});
    slices
        .create(
            &pp,
            &slice(
                "web-v4",
                "IPv4",
                json!([ready("10.1.0.5"), ready("10.1.0.6")]),
            ),
        )
        .await
        .unwrap();
    slices
        .create(&pp, &slice("web-v6", "IPv6", json!([ready("fd00::1")])))
        .await
        .unwrap();

    let (tx, rx) = watch::channel(Arc::new(ClusterState::listing()));
    let source = tokio::spawn(agent::kube::run(client.clone(), opts, tx));
    let mut acfg = AgentConfig::new(format!("http://{}", hub.xds_addr), "kind-1");
    acfg.zone = "az-default".into();
    acfg.debounce = Duration::from_millis(20);
    let (stop, stopped) = oneshot::channel::<()>();
    let agent_task = tokio::spawn(agent::run(acfg, rx, async move {
        let _ = stopped.await;
    }));

    let mut view = View {
        d: Delta::open_addr(hub.xds_addr).await,
        clusters: HashMap::new(),
        cla: None,
    };
    view.d
        .subscribe(Some(node("proxy-1", "prod")), CDS, &[])
        .await;
    view.d.subscribe(None, EDS, &[CLA]).await;
    view.until("the service's three endpoints (IPv4 and IPv6)", |v| {
        endpoints(v).len() == 3
    })
    .await;
    assert_eq!(
        endpoints(&view),
        vec![
            ("10.1.0.5".into(), HEALTHY),
            ("10.1.0.6".into(), HEALTHY),
            ("fd00::1".into(), HEALTHY)
        ]
    );
    let loc = view.cla.as_ref().unwrap().endpoints[0]
        .locality
        .clone()
        .unwrap();
    assert_eq!(
        (loc.zone.as_str(), loc.sub_zone.as_str()),
        ("az1", "kind-1")
    );
    assert!(view.clusters.contains_key(CLA));
    assert!(
        view.clusters.keys().all(|c| !c.contains("unlabelled")),
        "a namespace without the env label is not exported: {:?}",
        view.clusters.keys()
    );

    // Not ready, then removed: the client sees both.
    let patch = |eps: serde_json::Value| Patch::Merge(json!({"endpoints": eps}));
    let not_ready =
        json!({"addresses": ["10.1.0.5"], "conditions": {"ready": false}, "zone": "az1"});
    slices
        .patch(
            "web-v4",
            &PatchParams::default(),
            &patch(json!([not_ready, ready("10.1.0.6")])),
        )
        .await
        .unwrap();
    view.until("10.1.0.5 not ready", |v| {
        endpoints(v).contains(&("10.1.0.5".into(), UNHEALTHY))
    })
    .await;
    slices
        .patch(
            "web-v4",
            &PatchParams::default(),
            &patch(json!([ready("10.1.0.6")])),
        )
        .await
        .unwrap();
    view.until("10.1.0.5 removed", |v| endpoints(v).len() == 2)
        .await;
    assert_eq!(
        endpoints(&view),
        vec![("10.1.0.6".into(), HEALTHY), ("fd00::1".into(), HEALTHY)]
    );

    // The Service is deleted: its cluster and endpoints disappear.
    services
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    view.until("the service gone", |v| {
        v.cla.is_none() && !v.clusters.contains_key(CLA)
    })
    .await;

    let _ = stop.send(());
    agent_task.await.unwrap();
    source.abort();
    hub.shutdown().await.unwrap();
}

/// (address, zone) of every endpoint the client holds for `CLA`.
fn zones(v: &View) -> Vec<(String, String)> {
    use tributary_proto::envoy::envoy::config::core::v3::address::Address;
    use tributary_proto::envoy::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    let mut out = Vec::new();
    for l in v.cla.iter().flat_map(|c| c.endpoints.iter()) {
        let zone = l
            .locality
            .as_ref()
            .map(|l| l.zone.clone())
            .unwrap_or_default();
        for e in &l.lb_endpoints {
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!()
            };
            let Some(Address::SocketAddress(sa)) = &ep.address.as_ref().unwrap().address else {
                panic!()
            };
            out.push((sa.address.clone(), zone.clone()));
        }
    }
    out.sort();
    out
}

/// Nodes and Namespaces are watched as metadata only: an endpoint without a zone takes
/// its node's zone label, and follows it when the label changes; a namespace that
/// gains the env label exports its services, and stops when it loses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_zones_and_namespace_labels_are_followed() {
    let kube_env = KubeEnv::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.yaml"), "# federated only\n").unwrap();
    let mut cfg = HubConfig::local(vec![dir.path().to_path_buf()]);
    cfg.debounce.quiet = Duration::from_millis(20);
    let hub = Hub::start(cfg).await.unwrap();
    let opts = KubeOptions {
        kubeconfig: Some(kube_env.kubeconfig.clone()),
        default_env: None,
        zone: "az-default".into(),
        list_from_cache: false,
    };
    let client = agent::kube::client(&opts).await.unwrap();
    let pp = PostParams::default();
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &pp,
            &obj(json!({"metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "az-node"}}})),
        )
        .await
        .unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(&pp, &obj(json!({"metadata": {"name": "shop"}})))
        .await
        .unwrap();
    let svc =
        json!({"metadata": {"name": "web"}, "spec": {"ports": [{"name": "http", "port": 80}]}});
    Api::<Service>::namespaced(client.clone(), "shop")
        .create(&pp, &obj(svc))
        .await
        .unwrap();
    let on_node =
        json!({"addresses": ["10.1.0.7"], "conditions": {"ready": true}, "nodeName": "node-a"});
    let zoned = json!({"addresses": ["10.1.0.8"], "conditions": {"ready": true}, "zone": "az1", "nodeName": "node-a"});
    Api::<EndpointSlice>::namespaced(client.clone(), "shop")
        .create(&pp, &slice("web-v4", "IPv4", json!([on_node, zoned])))
        .await
        .unwrap();

    let (tx, rx) = watch::channel(Arc::new(ClusterState::listing()));
    let source = tokio::spawn(agent::kube::run(client.clone(), opts, tx));
    let mut acfg = AgentConfig::new(format!("http://{}", hub.xds_addr), "kind-1");
    acfg.debounce = Duration::from_millis(20);
    let (stop, stopped) = oneshot::channel::<()>();
    let agent_task = tokio::spawn(agent::run(acfg, rx, async move {
        let _ = stopped.await;
    }));
    let mut view = View {
        d: Delta::open_addr(hub.xds_addr).await,
        clusters: HashMap::new(),
        cla: None,
    };
    view.d
        .subscribe(Some(node("proxy-1", "prod")), CDS, &[])
        .await;
    view.d.subscribe(None, EDS, &[CLA]).await;

    // The namespace has no env label yet: nothing is exported. Then it gets one.
    let label = |env: serde_json::Value| {
        Patch::Merge(json!({"metadata": {"labels": {"tributary.io/env": env}}}))
    };
    namespaces
        .patch("shop", &PatchParams::default(), &label(json!("prod")))
        .await
        .unwrap();
    view.until("the service exported once its namespace is labelled", |v| {
        zones(v).len() == 2
    })
    .await;
    assert_eq!(
        zones(&view),
        vec![
            ("10.1.0.7".into(), "az-node".into()),
            ("10.1.0.8".into(), "az1".into())
        ],
        "an endpoint without a zone takes its node's"
    );

    // The node's zone label changes: the endpoint without its own zone follows.
    nodes
        .patch(
            "node-a",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"topology.kubernetes.io/zone": "az-moved"}}}),
            ),
        )
        .await
        .unwrap();
    view.until("the node's new zone", |v| {
        zones(v).contains(&("10.1.0.7".into(), "az-moved".into()))
    })
    .await;
    assert!(zones(&view).contains(&("10.1.0.8".into(), "az1".into())));

    // The namespace loses the label: its service is withdrawn.
    namespaces
        .patch(
            "shop",
            &PatchParams::default(),
            &label(serde_json::Value::Null),
        )
        .await
        .unwrap();
    view.until("the service withdrawn with its namespace's label", |v| {
        v.cla.is_none() && !v.clusters.contains_key(CLA)
    })
    .await;

    let _ = stop.send(());
    agent_task.await.unwrap();
    source.abort();
    hub.shutdown().await.unwrap();
}
