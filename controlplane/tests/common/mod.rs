//! An in-process hub on 127.0.0.1:0 with a temp config dir, and thin xDS stream
//! clients built on envoy-types' generated ADS client.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tributary_controlplane::app::{Hub, HubConfig};
use tributary_proto::envoy::envoy::config::core::v3::Node;
use tributary_proto::envoy::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tributary_proto::envoy::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tributary_proto::envoy::google::protobuf::{Struct, Value, value::Kind};
use tributary_proto::envoy::google::rpc::Status as RpcStatus;

pub const CDS: &str = tributary_proto::type_url::CLUSTER;
pub const EDS: &str = tributary_proto::type_url::ENDPOINT;
pub const LDS: &str = tributary_proto::type_url::LISTENER;
pub const RDS: &str = tributary_proto::type_url::ROUTE;

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub fn service(name: &str, env: &str, port: u16) -> String {
    format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}, environment: {env}}}\nspec:\n  hosts: [{name}.{env}]\n  ports: [{{name: http, port: {port}, protocol: HTTP}}]\n  subsets: [{{name: v1, labels: {{version: v1}}}}]\n"
    )
}

pub fn endpoints(name: &str, env: &str, addrs: &[&str], port: u16) -> String {
    let list: Vec<String> = addrs
        .iter()
        .map(|a| format!("  - {{address: \"{a}\", port: {port}, labels: {{version: v1}}}}"))
        .collect();
    format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Endpoints\nmetadata: {{name: {name}, environment: {env}}}\nspec:\n  endpoints:\n{}\n",
        list.join("\n")
    )
}

pub fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

pub struct TestHub {
    pub hub: Hub,
    pub dir: tempfile::TempDir,
}

impl TestHub {
    pub async fn start(files: &[(&str, String)]) -> TestHub {
        Self::start_with(files, |_| {}).await
    }

    pub async fn start_with(
        files: &[(&str, String)],
        tweak: impl FnOnce(&mut HubConfig),
    ) -> TestHub {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let mut cfg = HubConfig::local(vec![dir.path().to_path_buf()]);
        cfg.poll_interval = Duration::from_millis(20);
        tweak(&mut cfg);
        let hub = Hub::start(cfg).await.expect("hub starts");
        TestHub { hub, dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a config file and waits until `env`'s snapshot moves past its current seq.
    pub async fn write_and_wait(&self, env: &str, name: &str, text: String) -> u64 {
        let mut rx = self.hub.snapshots.subscribe_or_create(env);
        let before = rx.borrow_and_update().seq;
        std::fs::write(self.path(name), text).unwrap();
        tokio::time::timeout(TIMEOUT, rx.wait_for(|s| s.seq > before))
            .await
            .expect("snapshot published after config change")
            .unwrap()
            .seq
    }

    pub async fn client(&self) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", self.hub.xds_addr))
            .await
            .unwrap()
    }

    pub fn sync_status(&self) -> serde_json::Value {
        serde_json::to_value(self.hub.sync.snapshot()).unwrap()
    }
}

/// A node with extra string metadata (e.g. `tributary.io/sidecar`).
pub fn node_with(id: &str, env: &str, extra: &[(&str, &str)]) -> Node {
    let mut n = node(id, env);
    let fields = &mut n.metadata.as_mut().unwrap().fields;
    for (k, v) in extra {
        fields.insert(
            k.to_string(),
            Value {
                kind: Some(Kind::StringValue(v.to_string())),
            },
        );
    }
    n
}

pub fn node(id: &str, env: &str) -> Node {
    let mut fields = std::collections::HashMap::new();
    fields.insert(
        "tributary.io/env".to_string(),
        Value {
            kind: Some(Kind::StringValue(env.into())),
        },
    );
    Node {
        id: id.into(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

pub fn nack(message: &str) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: 3,
        message: message.into(),
        details: vec![],
    })
}

pub struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    pub rx: Streaming<DiscoveryResponse>,
}

impl Sotw {
    pub async fn open(hub: &TestHub) -> Sotw {
        let (tx, rx) = mpsc::channel(16);
        let stream = hub
            .client()
            .await
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap();
        Sotw {
            tx,
            rx: stream.into_inner(),
        }
    }

    pub async fn send(&self, req: DiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    pub async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(TIMEOUT, self.rx.message())
            .await
            .expect("a response within the timeout")
            .expect("stream healthy")
            .expect("stream open")
    }

    /// Subscribes (first request carries the node when given).
    pub async fn request(
        &self,
        node: Option<Node>,
        type_url: &str,
        names: &[&str],
        ack_of: Option<&DiscoveryResponse>,
    ) {
        self.send(DiscoveryRequest {
            node,
            type_url: type_url.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: ack_of.map(|r| r.version_info.clone()).unwrap_or_default(),
            response_nonce: ack_of.map(|r| r.nonce.clone()).unwrap_or_default(),
            ..Default::default()
        })
        .await
    }

    pub async fn ack(&self, resp: &DiscoveryResponse, names: &[&str]) {
        self.request(None, &resp.type_url, names, Some(resp)).await
    }
}

pub struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    pub rx: Streaming<DeltaDiscoveryResponse>,
}

impl Delta {
    pub async fn open_addr(addr: std::net::SocketAddr) -> Delta {
        let (tx, rx) = mpsc::channel(16);
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let stream = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap();
        Delta {
            tx,
            rx: stream.into_inner(),
        }
    }

    pub async fn open(hub: &TestHub) -> Delta {
        let (tx, rx) = mpsc::channel(16);
        let stream = hub
            .client()
            .await
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap();
        Delta {
            tx,
            rx: stream.into_inner(),
        }
    }

    pub async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(TIMEOUT, self.rx.message())
            .await
            .expect("a response within the timeout")
            .expect("stream healthy")
            .expect("stream open")
    }

    pub async fn subscribe(&self, node: Option<Node>, type_url: &str, names: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            node,
            type_url: type_url.into(),
            resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
    }

    pub async fn ack(&self, resp: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await
    }
}

pub fn names(resp: &DiscoveryResponse) -> Vec<String> {
    let mut v: Vec<String> = resp.resources.iter().map(resource_name).collect();
    v.sort();
    v
}

pub fn delta_names(resp: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut v: Vec<String> = resp.resources.iter().map(|r| r.name.clone()).collect();
    v.sort();
    v
}

/// The `name` of an encoded Cluster / ClusterLoadAssignment / Listener / RouteConfiguration.
pub fn resource_name(any: &tributary_proto::envoy::google::protobuf::Any) -> String {
    use tributary_proto::envoy::envoy::config::{
        cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
        route::v3::RouteConfiguration,
    };
    let v = any.value.as_slice();
    match any.type_url.as_str() {
        CDS => Cluster::decode(v).unwrap().name,
        EDS => ClusterLoadAssignment::decode(v).unwrap().cluster_name,
        LDS => Listener::decode(v).unwrap().name,
        RDS => RouteConfiguration::decode(v).unwrap().name,
        other => panic!("unexpected type {other}"),
    }
}

pub fn arc_str(s: &str) -> Arc<str> {
    Arc::from(s)
}

pub fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}
