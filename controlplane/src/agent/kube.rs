//! Kubernetes agent source: watches Services, EndpointSlices, Namespaces and Nodes
//! with kube-runtime watchers and keeps the cluster's exported state.
//!
//! Objects are reduced as they arrive to what the export reads ([`ServiceView`],
//! [`SliceView`], a namespace's env label, a node's zone label; Namespaces and Nodes
//! are watched as metadata only), so the agent never keeps whole objects: Services
//! and EndpointSlices are decoded straight into their views ([`KubeService`],
//! [`KubeSlice`]; the rest of each object is skipped by the JSON decoder), and every
//! kind is listed in pages from etcd, or from the apiserver's watch cache with
//! `--kube-list-from-cache` ([`watcher_config`]). Each
//! watcher event names what it touched (a service; a namespace's services when its
//! label changed; the services with endpoints on a node when its zone changed) and
//! only those services are recomputed ([`Source`]). A relist (`Init` … `InitDone`) is
//! buffered in reduced form and swapped in whole; a Services or EndpointSlices relist
//! recomputes every service once, a Namespaces or Nodes relist only what differs. So
//! a watch restart never exports a half-listed cluster, and the export is a
//! persistent map whose unchanged entries are shared with the previous one.
//!
//! What is exported: Services of namespaces labelled `tributary.io/env` (or of every
//! namespace into `--default-env`), except `ExternalName`; their hosts are
//! `name.ns.svc.cluster.local`, `name.ns.svc` and `name.ns`. Endpoints come from the
//! service's EndpointSlices (IPv4 and IPv6), with their ready / serving / terminating
//! conditions, and the endpoint's zone, or its node's `topology.kubernetes.io/zone`
//! label, or the agent's `--zone`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use tributary_proto::federation::v1 as pb;

use super::ClusterState;
use crate::model::ObjectKey;

pub const ENV_LABEL: &str = "tributary.io/env";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    pub kubeconfig: Option<PathBuf>,
    /// Environment for services of namespaces without the env label (else skipped).
    pub default_env: Option<String>,
    /// Zone of endpoints that name none and whose node has no zone label.
    pub zone: String,
    /// List from the apiserver's watch cache (`--kube-list-from-cache`; see
    /// [`watcher_config`]). Off: quorum reads from etcd in pages of 500.
    pub list_from_cache: bool,
}

/// A client from `--kubeconfig`, or the default (in-cluster, then `$KUBECONFIG`).
pub async fn client(opts: &KubeOptions) -> anyhow::Result<Client> {
    let config = match &opts.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("reading kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            anyhow::anyhow!("no Kubernetes config found (in-cluster or $KUBECONFIG): {e}")
        })?,
    };
    Ok(Client::try_from(config)?)
}

/// A Service, reduced to what the export reads (the agent never keeps whole objects).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceView {
    /// `ExternalName` services are not exported.
    pub external_name: bool,
    /// Ports as exported (an unnamed port is named by its number).
    pub ports: Vec<pb::ServicePort>,
}

/// An EndpointSlice, reduced to what the export reads.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceView {
    /// The service it belongs to (`kubernetes.io/service-name`).
    pub service: Option<ObjectKey>,
    /// IPv4 or IPv6 (FQDN slices carry no addresses to route to).
    pub routable: bool,
    /// (name, port); an unnamed port has no name.
    pub ports: Vec<(Option<String>, u32)>,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointView {
    pub addresses: Vec<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: String,
    /// Its pod (targetRef), else its hostname.
    pub name: String,
    /// Its own zone; else its node's zone label applies.
    pub zone: Option<String>,
}

impl SliceView {
    /// Nodes whose zone label this slice's endpoints fall back to.
    fn zone_nodes(&self) -> impl Iterator<Item = &str> {
        self.endpoints
            .iter()
            .filter(|e| e.zone.is_none() && !e.node.is_empty())
            .map(|e| e.node.as_str())
    }
}

/// A Service as the agent decodes it from the API: its identity and its
/// [`ServiceView`], built while the JSON is read. Everything else a Service carries
/// (`managedFields`, annotations, status, cluster IPs, selectors …) is skipped by the
/// decoder, never allocated: a list from the apiserver's watch cache comes in one
/// response, not in pages, and decoding it whole must stay small.
/// `tests::lean_decoding_matches_the_full_objects` checks it against k8s-openapi's
/// decoding of the same objects.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(from = "wire::Service")]
pub struct KubeService {
    /// Name, namespace, labels and resourceVersion only.
    pub metadata: ObjectMeta,
    pub view: ServiceView,
}

/// An EndpointSlice as the agent decodes it: its identity and its [`SliceView`] (see
/// [`KubeService`]). Its labels are read into [`SliceView::service`] and not kept.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(from = "wire::EndpointSlice")]
pub struct KubeSlice {
    /// Name, namespace and resourceVersion only.
    pub metadata: ObjectMeta,
    pub view: SliceView,
}

macro_rules! lean_resource {
    ($lean:ty, $full:ty) => {
        impl Resource for $lean {
            type DynamicType = ();
            type Scope = <$full as Resource>::Scope;
            fn kind(_: &()) -> std::borrow::Cow<'_, str> {
                <$full as Resource>::kind(&())
            }
            fn group(_: &()) -> std::borrow::Cow<'_, str> {
                <$full as Resource>::group(&())
            }
            fn version(_: &()) -> std::borrow::Cow<'_, str> {
                <$full as Resource>::version(&())
            }
            fn plural(_: &()) -> std::borrow::Cow<'_, str> {
                <$full as Resource>::plural(&())
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
lean_resource!(KubeService, Service);
lean_resource!(KubeSlice, EndpointSlice);

/// The wire shapes of the fields the agent reads (k8s-openapi's names and defaults:
/// a missing or `null` list is empty, a missing `port` is 0); serde skips the rest.
mod wire {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct Meta {
        pub name: Option<String>,
        pub namespace: Option<String>,
        pub labels: Option<BTreeMap<String, String>>,
        /// The watcher resumes from the last object's version.
        pub resource_version: Option<String>,
    }

    impl Meta {
        pub fn into_object_meta(self, keep_labels: bool) -> ObjectMeta {
            ObjectMeta {
                name: self.name,
                namespace: self.namespace,
                labels: if keep_labels { self.labels } else { None },
                resource_version: self.resource_version,
                ..Default::default()
            }
        }
    }

    #[derive(Debug, Deserialize)]
    pub struct Service {
        #[serde(default)]
        pub metadata: Option<Meta>,
        pub spec: Option<ServiceSpec>,
    }

    #[derive(Debug, Deserialize)]
    pub struct ServiceSpec {
        #[serde(rename = "type")]
        pub type_: Option<String>,
        pub ports: Option<Vec<ServicePort>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ServicePort {
        pub name: Option<String>,
        pub port: Option<i32>,
        pub app_protocol: Option<String>,
        pub protocol: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EndpointSlice {
        pub metadata: Option<Meta>,
        pub address_type: Option<String>,
        pub ports: Option<Vec<EndpointPort>>,
        pub endpoints: Option<Vec<Endpoint>>,
    }

    #[derive(Debug, Deserialize)]
    pub struct EndpointPort {
        pub name: Option<String>,
        pub port: Option<i32>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Endpoint {
        pub addresses: Option<Vec<String>>,
        pub conditions: Option<Conditions>,
        pub node_name: Option<String>,
        pub target_ref: Option<TargetRef>,
        pub hostname: Option<String>,
        pub zone: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    pub struct Conditions {
        pub ready: Option<bool>,
        pub serving: Option<bool>,
        pub terminating: Option<bool>,
    }

    #[derive(Debug, Deserialize)]
    pub struct TargetRef {
        pub name: Option<String>,
    }
}

/// Views are kept for as long as their objects exist: their lists exactly sized (the
/// decoder grows a list by doubling from 4, so one address would hold room for four,
/// ten endpoints for sixteen).
trait Exact {
    fn exact(self) -> Self;
}

impl<T> Exact for Vec<T> {
    fn exact(mut self) -> Self {
        self.shrink_to_fit();
        self
    }
}

impl From<wire::Service> for KubeService {
    fn from(s: wire::Service) -> KubeService {
        let spec = s.spec;
        let external_name = spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("ExternalName");
        let ports = spec
            .and_then(|s| s.ports)
            .into_iter()
            .flatten()
            .map(|p| {
                let port = p.port.unwrap_or_default();
                let name = p
                    .name
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| port.to_string());
                pb::ServicePort {
                    protocol: protocol_of(&name, p.app_protocol.as_deref(), p.protocol.as_deref()),
                    name,
                    port: port as u32,
                }
            })
            .collect::<Vec<_>>()
            .exact();
        KubeService {
            metadata: s.metadata.unwrap_or_default().into_object_meta(true),
            view: ServiceView {
                external_name,
                ports,
            },
        }
    }
}

impl From<wire::EndpointSlice> for KubeSlice {
    fn from(s: wire::EndpointSlice) -> KubeSlice {
        let mut meta = s.metadata.unwrap_or_default();
        let service = meta
            .labels
            .as_mut()
            .and_then(|l| l.remove(SERVICE_NAME_LABEL))
            .map(|name| ObjectKey {
                namespace: meta.namespace.clone().unwrap_or_default(),
                name,
            });
        let view = SliceView {
            service,
            routable: matches!(s.address_type.as_deref(), Some("IPv4" | "IPv6")),
            ports: s
                .ports
                .into_iter()
                .flatten()
                .filter_map(|p| Some((p.name.filter(|n| !n.is_empty()), p.port? as u32)))
                .collect::<Vec<_>>()
                .exact(),
            endpoints: s
                .endpoints
                .into_iter()
                .flatten()
                .map(|e| {
                    let c = e.conditions.as_ref();
                    // Per the EndpointSlice API, an unset `ready` means ready.
                    let ready = c.and_then(|c| c.ready).unwrap_or(true);
                    EndpointView {
                        addresses: e.addresses.unwrap_or_default().exact(),
                        ready,
                        serving: c.and_then(|c| c.serving).unwrap_or(ready),
                        terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                        node: e.node_name.unwrap_or_default(),
                        name: e
                            .target_ref
                            .and_then(|r| r.name)
                            .or(e.hostname)
                            .unwrap_or_default(),
                        zone: e.zone,
                    }
                })
                .collect::<Vec<_>>()
                .exact(),
        };
        KubeSlice {
            metadata: meta.into_object_meta(false),
            view,
        }
    }
}

/// The watched objects, reduced to what the export needs, with the indexes that let
/// each event recompute only the services it touched.
#[derive(Debug, Default)]
pub struct Objects {
    pub services: HashMap<ObjectKey, ServiceView>,
    pub slices: HashMap<ObjectKey, SliceView>,
    /// Service → names of its slices.
    pub slices_by_service: HashMap<ObjectKey, BTreeSet<String>>,
    /// Namespace → names of its services (a namespace's label change touches these).
    pub services_by_namespace: HashMap<String, BTreeSet<String>>,
    /// Namespace → its `tributary.io/env` label.
    pub namespaces: HashMap<String, Option<String>>,
    /// Node → its zone label.
    pub nodes: HashMap<String, String>,
    /// Node → services with endpoints taking their zone from it (and how many).
    pub services_by_node: HashMap<String, HashMap<ObjectKey, usize>>,
}

fn key_of<K: Resource>(o: &K) -> ObjectKey {
    ObjectKey {
        namespace: o.namespace().unwrap_or_default(),
        name: o.name_any(),
    }
}

impl Objects {
    fn put_service(&mut self, key: ObjectKey, svc: ServiceView) {
        self.services_by_namespace
            .entry(key.namespace.clone())
            .or_default()
            .insert(key.name.clone());
        self.services.insert(key, svc);
    }

    fn remove_service(&mut self, key: &ObjectKey) {
        self.services.remove(key);
        if let Some(set) = self.services_by_namespace.get_mut(&key.namespace) {
            set.remove(&key.name);
            if set.is_empty() {
                self.services_by_namespace.remove(&key.namespace);
            }
        }
    }

    /// Swaps in a complete list of services (after a relist).
    fn replace_services(&mut self, all: HashMap<ObjectKey, ServiceView>) {
        self.services.clear();
        self.services_by_namespace.clear();
        for (k, v) in all {
            self.put_service(k, v);
        }
    }

    /// Puts a slice; returns the services it touched (its old and new one).
    fn put_slice(&mut self, key: ObjectKey, s: SliceView) -> Vec<ObjectKey> {
        let mut touched: Vec<ObjectKey> = self.remove_slice(&key).into_iter().collect();
        if let Some(svc) = &s.service {
            self.slices_by_service
                .entry(svc.clone())
                .or_default()
                .insert(key.name.clone());
            for node in s.zone_nodes() {
                *self
                    .services_by_node
                    .entry(node.to_string())
                    .or_default()
                    .entry(svc.clone())
                    .or_default() += 1;
            }
            if !touched.contains(svc) {
                touched.push(svc.clone());
            }
        }
        self.slices.insert(key, s);
        touched
    }

    fn remove_slice(&mut self, key: &ObjectKey) -> Option<ObjectKey> {
        let old = self.slices.remove(key)?;
        let svc = old.service.clone()?;
        if let Some(set) = self.slices_by_service.get_mut(&svc) {
            set.remove(&key.name);
            if set.is_empty() {
                self.slices_by_service.remove(&svc);
            }
        }
        for node in old.zone_nodes() {
            if let Some(by) = self.services_by_node.get_mut(node) {
                if let Some(n) = by.get_mut(&svc) {
                    *n -= 1;
                    if *n == 0 {
                        by.remove(&svc);
                    }
                }
                if by.is_empty() {
                    self.services_by_node.remove(node);
                }
            }
        }
        Some(svc)
    }

    /// Swaps in a complete list of slices (after a relist).
    fn replace_slices(&mut self, all: HashMap<ObjectKey, SliceView>) {
        self.slices.clear();
        self.slices_by_service.clear();
        self.services_by_node.clear();
        for (k, s) in all {
            self.put_slice(k, s);
        }
    }

    /// The services of `namespace` (touched when its env label changes).
    fn services_in(&self, namespace: &str) -> Vec<ObjectKey> {
        self.services_by_namespace
            .get(namespace)
            .into_iter()
            .flatten()
            .map(|name| ObjectKey {
                namespace: namespace.to_string(),
                name: name.clone(),
            })
            .collect()
    }

    /// The services whose endpoints take their zone from `node`.
    fn services_on(&self, node: &str) -> Vec<ObjectKey> {
        self.services_by_node
            .get(node)
            .into_iter()
            .flat_map(|by| by.keys().cloned())
            .collect()
    }

    /// Sets `namespace`'s env label (`None` inside: unlabelled; outer `None`: deleted);
    /// returns the services touched when it changed.
    fn set_namespace(&mut self, namespace: &str, env: Option<Option<String>>) -> Vec<ObjectKey> {
        if self.namespaces.get(namespace) == env.as_ref() {
            return Vec::new();
        }
        match env {
            Some(e) => self.namespaces.insert(namespace.to_string(), e),
            None => self.namespaces.remove(namespace),
        };
        self.services_in(namespace)
    }

    /// Sets `node`'s zone (`None`: deleted); returns the services touched when it changed.
    fn set_node(&mut self, node: &str, zone: Option<String>) -> Vec<ObjectKey> {
        if self.nodes.get(node) == zone.as_ref() {
            return Vec::new();
        }
        match zone {
            Some(z) => self.nodes.insert(node.to_string(), z),
            None => self.nodes.remove(node),
        };
        self.services_on(node)
    }

    fn env_of(&self, namespace: &str, opts: &KubeOptions) -> Option<String> {
        self.namespaces
            .get(namespace)
            .cloned()
            .flatten()
            .or_else(|| opts.default_env.clone())
    }

    /// What `key` exports: its service and endpoint set, or nothing.
    pub fn export(
        &self,
        key: &ObjectKey,
        opts: &KubeOptions,
    ) -> (Option<pb::Service>, Option<pb::EndpointSet>) {
        let Some(svc) = self.services.get(key) else {
            return (None, None);
        };
        let Some(env) = self.env_of(&key.namespace, opts) else {
            return (None, None);
        };
        if svc.external_name || svc.ports.is_empty() {
            return (None, None);
        }
        let ports = &svc.ports;
        let (ns, name) = (&key.namespace, &key.name);
        let service = pb::Service {
            namespace: ns.clone(),
            name: name.clone(),
            hosts: vec![
                format!("{name}.{ns}.svc.cluster.local"),
                format!("{name}.{ns}.svc"),
                format!("{name}.{ns}"),
            ],
            ports: ports.clone(),
            environment: env,
        };
        let slices: Vec<&SliceView> = self
            .slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|slice_name| {
                self.slices.get(&ObjectKey {
                    namespace: ns.clone(),
                    name: slice_name.clone(),
                })
            })
            .collect();
        // Exactly sized: the export is kept for as long as the service exists.
        let mut endpoints =
            Vec::with_capacity(slices.iter().map(|s| s.endpoints.len()).sum::<usize>());
        for slice in slices {
            if !slice.routable {
                continue;
            }
            let slice_ports: BTreeMap<String, u32> = slice
                .ports
                .iter()
                .filter_map(|(name, port)| {
                    // An unnamed slice port belongs to the service's only port.
                    let name = match name {
                        Some(n) => n.clone(),
                        None if ports.len() == 1 => ports[0].name.clone(),
                        None => return None,
                    };
                    Some((name, *port))
                })
                .collect();
            for e in &slice.endpoints {
                let zone = e
                    .zone
                    .clone()
                    .or_else(|| self.nodes.get(&e.node).cloned().filter(|z| !z.is_empty()))
                    .unwrap_or_else(|| opts.zone.clone());
                endpoints.push(pb::Endpoint {
                    addresses: e.addresses.clone(),
                    ports: slice_ports.clone().into_iter().collect(),
                    zone,
                    node: e.node.clone(),
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    labels: Default::default(),
                    name: e.name.clone(),
                });
            }
        }
        // Slices arrive in any order; export a stable one.
        endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
        let set = pb::EndpointSet {
            namespace: ns.clone(),
            service: name.clone(),
            endpoints,
        };
        (Some(service), Some(set))
    }
}

/// Istio's convention: `appProtocol`, else the port name's prefix.
fn protocol_of(name: &str, app: Option<&str>, l4: Option<&str>) -> String {
    if l4 == Some("UDP") || l4 == Some("SCTP") {
        return "TCP".into();
    }
    let hint = app.unwrap_or(name).to_ascii_lowercase();
    let proto = if hint.starts_with("grpc") {
        "GRPC"
    } else if hint.starts_with("http2")
        || hint.starts_with("h2c")
        || hint.starts_with("kubernetes.io/h2c")
    {
        "HTTP2"
    } else if hint.starts_with("http") {
        "HTTP"
    } else if hint.starts_with("tcp")
        || hint.starts_with("tls")
        || hint.starts_with("mongo")
        || hint.starts_with("redis")
        || hint.starts_with("mysql")
    {
        "TCP"
    } else {
        "HTTP"
    };
    proto.into()
}

/// What one event touched.
#[derive(Debug, PartialEq)]
enum Touched {
    Keys(Vec<ObjectKey>),
    All,
}

impl Touched {
    fn keys(keys: Vec<ObjectKey>) -> Touched {
        Touched::Keys(keys)
    }
}

/// The agent's view of its cluster, fed one watcher event at a time. Each event costs
/// O(what it touched): a service or slice touches its service; a namespace's label
/// change its services; a node's zone change the services with endpoints on it. Only
/// a relist's end (`InitDone`) touches everything of its kind, once. Events are
/// reduced to [`ServiceView`] / [`SliceView`] / labels as they arrive, relists are
/// buffered in that reduced form and swapped in whole.
#[derive(Debug, Default)]
pub struct Source {
    objs: Objects,
    svc_buf: Option<HashMap<ObjectKey, ServiceView>>,
    slice_buf: Option<HashMap<ObjectKey, SliceView>>,
    ns_buf: Option<HashMap<String, Option<String>>>,
    node_buf: Option<HashMap<String, String>>,
    /// Services, slices, namespaces and nodes have each been listed once.
    listed: [bool; 4],
    /// The first complete state was exported.
    exported_once: bool,
    /// The first partial state was exported (every listed service, once), and one
    /// with endpoints (every listed service's, once).
    partial_once: bool,
    partial_endpoints: bool,
    /// Keys exported so far: the source's work counter (tests).
    pub exports: u64,
    /// States published so far (tests).
    states: u64,
}

fn ns_env(n: &PartialObjectMeta<Namespace>) -> Option<String> {
    n.labels().get(ENV_LABEL).cloned()
}

fn node_zone(n: &PartialObjectMeta<Node>) -> String {
    n.labels().get(ZONE_LABEL).cloned().unwrap_or_default()
}

impl Source {
    fn on_service(&mut self, ev: Event<KubeService>) -> Touched {
        match ev {
            Event::Apply(s) => {
                let k = key_of(&s);
                self.objs.put_service(k.clone(), s.view);
                Touched::keys(vec![k])
            }
            Event::Delete(s) => {
                let k = key_of(&s);
                self.objs.remove_service(&k);
                Touched::keys(vec![k])
            }
            Event::Init => {
                self.svc_buf = Some(HashMap::new());
                Touched::keys(vec![])
            }
            Event::InitApply(s) => {
                let (k, view) = (key_of(&s), s.view);
                if !self.listed[0] {
                    // The first list: nothing complete to protect, and its services are
                    // exported as they come (`next_partial`); the swap at its end
                    // drops any left from an interrupted attempt.
                    self.objs.put_service(k.clone(), view.clone());
                }
                self.svc_buf
                    .get_or_insert_with(HashMap::new)
                    .insert(k.clone(), view);
                if self.listed[0] {
                    Touched::keys(vec![])
                } else {
                    Touched::keys(vec![k])
                }
            }
            Event::InitDone => {
                self.objs
                    .replace_services(self.svc_buf.take().unwrap_or_default());
                self.listed[0] = true;
                Touched::All
            }
        }
    }

    fn on_slice(&mut self, ev: Event<KubeSlice>) -> Touched {
        match ev {
            Event::Apply(s) => Touched::keys(self.objs.put_slice(key_of(&s), s.view)),
            Event::Delete(s) => {
                Touched::keys(self.objs.remove_slice(&key_of(&s)).into_iter().collect())
            }
            Event::Init => {
                self.slice_buf = Some(HashMap::new());
                Touched::keys(vec![])
            }
            Event::InitApply(s) => {
                self.slice_buf
                    .get_or_insert_with(HashMap::new)
                    .insert(key_of(&s), s.view);
                Touched::keys(vec![])
            }
            Event::InitDone => {
                self.objs
                    .replace_slices(self.slice_buf.take().unwrap_or_default());
                self.listed[1] = true;
                Touched::All
            }
        }
    }

    fn on_namespace(&mut self, ev: Event<PartialObjectMeta<Namespace>>) -> Touched {
        match ev {
            Event::Apply(n) => {
                Touched::keys(self.objs.set_namespace(&n.name_any(), Some(ns_env(&n))))
            }
            Event::Delete(n) => Touched::keys(self.objs.set_namespace(&n.name_any(), None)),
            Event::Init => {
                self.ns_buf = Some(HashMap::new());
                Touched::keys(vec![])
            }
            Event::InitApply(n) => {
                self.ns_buf
                    .get_or_insert_with(HashMap::new)
                    .insert(n.name_any(), ns_env(&n));
                Touched::keys(vec![])
            }
            Event::InitDone => {
                // Only the namespaces whose label differs touch their services.
                let all = self.ns_buf.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .objs
                    .namespaces
                    .keys()
                    .filter(|n| !all.contains_key(*n))
                    .cloned()
                    .collect();
                let mut keys = Vec::new();
                for n in gone {
                    keys.extend(self.objs.set_namespace(&n, None));
                }
                for (n, env) in all {
                    keys.extend(self.objs.set_namespace(&n, Some(env)));
                }
                self.listed[2] = true;
                Touched::keys(keys)
            }
        }
    }

    fn on_node(&mut self, ev: Event<PartialObjectMeta<Node>>) -> Touched {
        match ev {
            Event::Apply(n) => {
                Touched::keys(self.objs.set_node(&n.name_any(), Some(node_zone(&n))))
            }
            Event::Delete(n) => Touched::keys(self.objs.set_node(&n.name_any(), None)),
            Event::Init => {
                self.node_buf = Some(HashMap::new());
                Touched::keys(vec![])
            }
            Event::InitApply(n) => {
                self.node_buf
                    .get_or_insert_with(HashMap::new)
                    .insert(n.name_any(), node_zone(&n));
                Touched::keys(vec![])
            }
            Event::InitDone => {
                // A node's zone is a fallback for its endpoints: only changed nodes touch.
                let all = self.node_buf.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .objs
                    .nodes
                    .keys()
                    .filter(|n| !all.contains_key(*n))
                    .cloned()
                    .collect();
                let mut keys = Vec::new();
                for n in gone {
                    keys.extend(self.objs.set_node(&n, None));
                }
                for (n, zone) in all {
                    keys.extend(self.objs.set_node(&n, Some(zone)));
                }
                self.listed[3] = true;
                Touched::keys(keys)
            }
        }
    }

    /// The next exported state after an event that touched `touched`, or `None` when
    /// nothing changed. Until every kind has been listed once, a partial state
    /// ([`Source::next_partial`]).
    fn next(
        &mut self,
        touched: Touched,
        current: &ClusterState,
        opts: &KubeOptions,
    ) -> Option<ClusterState> {
        if !self.listed.iter().all(|l| *l) {
            return self.next_partial(touched, current, opts);
        }
        let keys = match touched {
            _ if !self.exported_once => all_keys(&self.objs, current),
            Touched::All => all_keys(&self.objs, current),
            Touched::Keys(k) if k.is_empty() => return None,
            Touched::Keys(k) => k,
        };
        self.exported_once = true;
        let mut next = current.clone();
        next.listing = false;
        let now = SystemTime::now();
        for key in keys {
            self.exports += 1;
            let (svc, eps) = self.objs.export(&key, opts);
            next.set_service(key.clone(), svc, now);
            next.set_endpoints(key, eps, now);
        }
        // Cheap: the persistent maps compare by skipping the nodes they share.
        (next != *current).then_some(next)
    }
}

impl Source {
    /// While the cluster is listed for the first time: the part of its export that is
    /// final already, marked [`ClusterState::listing`] (the agent sends it as the
    /// opening parts of a full resync, so the hub works on it while the rest is
    /// listed). A service is exported once it and its namespace are listed; its
    /// endpoints once EndpointSlices and Nodes are listed too (a service's slices may
    /// come on any page, and an endpoint set short of some slices would withdraw
    /// endpoints that a hub still holds from the agent's previous process).
    fn next_partial(
        &mut self,
        touched: Touched,
        current: &ClusterState,
        opts: &KubeOptions,
    ) -> Option<ClusterState> {
        if !self.listed[2] {
            return None; // a namespace's env label decides whether its services export
        }
        let endpoints_final = self.listed[1] && self.listed[3];
        // Every service once: at the first partial state, and when endpoints become final.
        let everything = !self.partial_once || (endpoints_final && !self.partial_endpoints);
        let keys = match touched {
            _ if everything => all_keys(&self.objs, current),
            Touched::All => all_keys(&self.objs, current),
            Touched::Keys(k) if k.is_empty() => return None,
            Touched::Keys(k) => k,
        };
        self.partial_once = true;
        self.partial_endpoints = endpoints_final;
        let mut next = current.clone();
        next.listing = true;
        let now = SystemTime::now();
        for key in keys {
            self.exports += 1;
            let (svc, eps) = self.objs.export(&key, opts);
            next.set_service(key.clone(), svc, now);
            if endpoints_final {
                next.set_endpoints(key, eps, now);
            }
        }
        (next != *current).then_some(next)
    }
}

/// Watches the cluster and publishes its exported state into `tx` until it has no
/// receivers; `tx` starts at [`ClusterState::listing`] (the first list is exported as
/// it comes, as a partial state, then complete). Watch errors are retried with the watcher's default backoff. Namespaces
/// and Nodes are watched as metadata only (their labels are all the agent reads).
pub async fn run(client: Client, opts: KubeOptions, tx: watch::Sender<Arc<ClusterState>>) {
    let wc = watcher_config(&opts);
    let services = watcher::watcher(Api::<KubeService>::all(client.clone()), wc.clone())
        .default_backoff()
        .map(|e| WatchEvent::Service(Box::new(e)));
    let slices = watcher::watcher(Api::<KubeSlice>::all(client.clone()), wc.clone())
        .default_backoff()
        .map(|e| WatchEvent::Slice(Box::new(e)));
    let namespaces = watcher::watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        wc.clone(),
    )
    .default_backoff()
    .map(|e| WatchEvent::Namespace(Box::new(e)));
    let nodes = watcher::watcher(Api::<PartialObjectMeta<Node>>::all(client), wc)
        .default_backoff()
        .map(|e| WatchEvent::Node(Box::new(e)));
    let events = futures_util::stream::select_all([
        services.boxed(),
        slices.boxed(),
        namespaces.boxed(),
        nodes.boxed(),
    ]);
    publish(events, &mut Source::default(), &opts, &tx).await
}

/// How every kind is listed and watched. By default a list is a quorum read from
/// etcd in pages of 500 (kube-runtime's default), each page decoded lean
/// ([`KubeService`], [`KubeSlice`]) and dropped before the next. With
/// `list_from_cache` (`--kube-list-from-cache`), lists (the first one and every relist
/// after a watch expired) are served from the apiserver's watch cache
/// (`resourceVersion=0`, as client-go's informers list): no etcd reads, and the watch
/// resumes from the list's version, so nothing that changed after the cached list is
/// missed. The apiserver (1.30) answers such a list in one response (kube-rs leaves
/// `resourceVersion=0` out of a list with a page size, so none is set): tens of MiB at
/// 10,000 EndpointSlices, whose buffers glibc's malloc then partly keeps resident. At
/// 10,000 services it made the agent's peak RSS 144–154 MiB instead of 141–143 MiB
/// (docs/benchmarks.md), hence off by default.
fn watcher_config(opts: &KubeOptions) -> watcher::Config {
    if !opts.list_from_cache {
        return watcher::Config::default();
    }
    let mut wc = watcher::Config::default().any_semantic();
    wc.page_size = None;
    wc
}

/// Events already received are applied together (`ready_chunks`): a list page of 500
/// objects is one new state, not 500 (each of which copied the paths of the
/// persistent maps that the previous state still shares).
const MAX_EVENTS_PER_STATE: usize = 1_000;

/// One watcher event of any kind (boxed: a chunk holds up to a thousand).
enum WatchEvent {
    Service(Box<watcher::Result<Event<KubeService>>>),
    Slice(Box<watcher::Result<Event<KubeSlice>>>),
    Namespace(Box<watcher::Result<Event<PartialObjectMeta<Namespace>>>>),
    Node(Box<watcher::Result<Event<PartialObjectMeta<Node>>>>),
}

impl Source {
    fn on(&mut self, ev: WatchEvent) -> Touched {
        let none = || Touched::keys(vec![]);
        match ev {
            WatchEvent::Service(ev) => match *ev {
                Ok(ev) => self.on_service(ev),
                Err(e) => {
                    warn!(error = %e, "Service watch error (retrying)");
                    none()
                }
            },
            WatchEvent::Slice(ev) => match *ev {
                Ok(ev) => self.on_slice(ev),
                Err(e) => {
                    warn!(error = %e, "EndpointSlice watch error (retrying)");
                    none()
                }
            },
            WatchEvent::Namespace(ev) => match *ev {
                Ok(ev) => self.on_namespace(ev),
                Err(e) => {
                    warn!(error = %e, "Namespace watch error (retrying)");
                    none()
                }
            },
            WatchEvent::Node(ev) => match *ev {
                Ok(ev) => self.on_node(ev),
                Err(e) => {
                    warn!(error = %e, "Node watch error (retrying; zones fall back to --zone)");
                    none()
                }
            },
        }
    }
}

impl Touched {
    fn merge(self, other: Touched) -> Touched {
        match (self, other) {
            (Touched::Keys(mut a), Touched::Keys(b)) => {
                a.extend(b);
                Touched::Keys(a)
            }
            _ => Touched::All,
        }
    }
}

/// Applies `events` and publishes each new exported state into `tx` until the
/// events end or `tx` has no receivers.
async fn publish(
    events: impl futures_util::Stream<Item = WatchEvent>,
    source: &mut Source,
    opts: &KubeOptions,
    tx: &watch::Sender<Arc<ClusterState>>,
) {
    let mut chunks = std::pin::pin!(events.ready_chunks(MAX_EVENTS_PER_STATE));
    while let Some(chunk) = chunks.next().await {
        let touched = chunk
            .into_iter()
            .fold(Touched::keys(vec![]), |t, ev| t.merge(source.on(ev)));
        if tx.is_closed() {
            return;
        }
        let current = tx.borrow().clone();
        if let Some(next) = source.next(touched, &current, opts) {
            source.states += 1;
            debug!(
                services = next.services.len(),
                listing = next.listing,
                "exported state changed"
            );
            if current.listing && !next.listing {
                info!(
                    services = next.services.len(),
                    "initial Kubernetes state exported (every kind listed)"
                );
            }
            tx.send_replace(Arc::new(next));
        }
    }
}

/// Every key that exists now or was exported before.
fn all_keys(objs: &Objects, current: &ClusterState) -> Vec<ObjectKey> {
    let mut keys: BTreeSet<ObjectKey> = objs.services.keys().cloned().collect();
    keys.extend(current.services.keys().cloned());
    keys.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use kube::core::{ObjectMeta, PartialObjectMetaExt};
    use serde_json::json;

    use super::*;

    fn service(ns: &str, name: &str) -> KubeService {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": {"ports": [{"name": "http", "port": 80}]},
        }))
        .unwrap()
    }

    /// A slice of `svc` with one endpoint on `node` (no zone of its own).
    fn slice(ns: &str, svc: &str, node: &str, addr: &str) -> KubeSlice {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": format!("{svc}-x"),
                         "labels": {SERVICE_NAME_LABEL: svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [addr], "nodeName": node,
                           "targetRef": {"kind": "Pod", "name": format!("{svc}-pod")}}],
        }))
        .unwrap()
    }

    fn meta<K>(name: &str, label: (&str, &str)) -> PartialObjectMeta<K> {
        ObjectMeta {
            name: Some(name.into()),
            labels: Some([(label.0.to_string(), label.1.to_string())].into()),
            ..Default::default()
        }
        .into_response_partial()
    }

    fn key(ns: &str, name: &str) -> ObjectKey {
        ObjectKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    /// Lists `n` services in namespace `a` (endpoints on nodes n0..n9) and one, `lone`,
    /// in namespace `b` (its endpoint on node `rare`), then exports the first state.
    fn listed(n: usize) -> (Source, ClusterState, KubeOptions) {
        let opts = KubeOptions {
            zone: "fallback".into(),
            ..Default::default()
        };
        let mut src = Source::default();
        // Until every kind is listed, only partial states (services without their
        // endpoints while Nodes are not listed); then everything, once.
        let mut current = ClusterState::listing();
        let step = |src: &mut Source, t: Touched, current: &mut ClusterState| {
            if let Some(next) = src.next(t, current, &opts) {
                assert!(next.listing, "complete before every kind was listed");
                assert!(
                    next.endpoints.is_empty(),
                    "endpoints before Nodes were listed"
                );
                *current = next;
            }
        };
        let t = src.on_service(Event::Init);
        step(&mut src, t, &mut current);
        let t = src.on_slice(Event::Init);
        step(&mut src, t, &mut current);
        for i in 0..n {
            let name = format!("s{i}");
            let addr = format!("10.1.{}.{}", i / 250, i % 250);
            let t = src.on_service(Event::InitApply(service("a", &name)));
            step(&mut src, t, &mut current);
            let node = format!("n{}", i % 10);
            let t = src.on_slice(Event::InitApply(slice("a", &name, &node, &addr)));
            step(&mut src, t, &mut current);
        }
        let t = src.on_service(Event::InitApply(service("b", "lone")));
        step(&mut src, t, &mut current);
        let t = src.on_slice(Event::InitApply(slice("b", "lone", "rare", "10.2.0.1")));
        step(&mut src, t, &mut current);
        for t in [
            src.on_service(Event::InitDone),
            src.on_slice(Event::InitDone),
        ] {
            step(&mut src, t, &mut current);
        }
        assert_eq!(src.exports, 0, "nothing before namespaces are listed");
        for ev in [
            Event::Init,
            Event::InitApply(meta("a", (ENV_LABEL, "prod"))),
            Event::InitApply(meta("b", (ENV_LABEL, "prod"))),
            Event::InitDone,
        ] {
            let t = src.on_namespace(ev);
            step(&mut src, t, &mut current);
        }
        assert_eq!(current.services.len(), n + 1, "every service, partially");
        assert_eq!(src.exports, n as u64 + 1);
        let t = src.on_node(Event::Init);
        step(&mut src, t, &mut current);
        for i in 0..10 {
            let t = src.on_node(Event::InitApply(meta(
                &format!("n{i}"),
                (ZONE_LABEL, "az1"),
            )));
            step(&mut src, t, &mut current);
        }
        let t = src.on_node(Event::InitApply(meta("rare", (ZONE_LABEL, "az9"))));
        step(&mut src, t, &mut current);
        assert_eq!(src.exports, n as u64 + 1);
        let last = src.on_node(Event::InitDone);
        let state = src.next(last, &current, &opts).unwrap();
        assert!(!state.listing);
        assert_eq!(state.services.len(), n + 1);
        assert_eq!(state.endpoints.len(), n + 1);
        assert_eq!(src.exports, 2 * (n as u64 + 1));
        (src, state, opts)
    }

    /// The first list is exported as it arrives, marked partial: each listed service
    /// once namespaces are listed, endpoints only once EndpointSlices and Nodes are
    /// (a service's slices may be on any page), and a service that an interrupted,
    /// restarted list no longer holds leaves the partial state; the state is complete
    /// only when every kind is listed, and then equals the whole cluster's export.
    #[test]
    fn the_first_list_is_exported_as_it_comes() {
        let opts = KubeOptions::default();
        let mut src = Source::default();
        let mut current = ClusterState::listing();
        let mut step = |src: &mut Source, t: Touched| -> Option<ClusterState> {
            let next = src.next(t, &current, &opts)?;
            current = next.clone();
            Some(next)
        };
        for ev in [
            Event::Init,
            Event::InitApply(meta("a", (ENV_LABEL, "prod"))),
            Event::InitDone,
        ] {
            let t = src.on_namespace(ev);
            assert!(step(&mut src, t).is_none(), "nothing listed to export");
        }
        for ev in [
            Event::Init,
            Event::InitApply(meta("n0", (ZONE_LABEL, "az1"))),
            Event::InitDone,
        ] {
            let t = src.on_node(ev);
            assert!(step(&mut src, t).is_none());
        }
        let t = src.on_service(Event::Init);
        assert!(step(&mut src, t).is_none());
        let t = src.on_slice(Event::Init);
        assert!(step(&mut src, t).is_none());
        for i in 0..3 {
            let t = src.on_service(Event::InitApply(service("a", &format!("s{i}"))));
            let s = step(&mut src, t).expect("a listed service is exported at once");
            assert!(s.listing);
            assert_eq!(s.services.len(), i + 1);
            assert!(s.endpoints.is_empty());
            let t = src.on_slice(Event::InitApply(slice(
                "a",
                &format!("s{i}"),
                "n0",
                &format!("10.0.0.{i}"),
            )));
            assert!(
                step(&mut src, t).is_none(),
                "endpoints wait for the whole EndpointSlice list"
            );
        }
        // The Services list is interrupted and listed again: s2 is gone by then.
        for ev in [
            Event::Init,
            Event::InitApply(service("a", "s0")),
            Event::InitApply(service("a", "s1")),
        ] {
            let t = src.on_service(ev);
            let _ = step(&mut src, t);
        }
        let t = src.on_service(Event::InitDone);
        let s = step(&mut src, t).expect("s2 left");
        assert!(s.listing, "EndpointSlices are not listed yet");
        let names: Vec<&str> = s.services.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["s0", "s1"]);
        let t = src.on_slice(Event::InitDone);
        let s = step(&mut src, t).expect("the complete state");
        assert!(!s.listing);
        assert_eq!(s.endpoints.len(), 2);
        assert_eq!(
            s.endpoints[&key("a", "s1")].value.endpoints[0].addresses,
            ["10.0.0.1"]
        );
        assert!(!s.endpoints.contains_key(&key("a", "s2")));
        // What a source that waited for every list would have exported.
        let mut whole = ClusterState::default();
        for k in [key("a", "s0"), key("a", "s1")] {
            let (svc, eps) = src.objs.export(&k, &opts);
            whole.set_service(k.clone(), svc, SystemTime::UNIX_EPOCH);
            whole.set_endpoints(k, eps, SystemTime::UNIX_EPOCH);
        }
        assert_eq!(s, whole);
    }

    fn zone_of(state: &ClusterState, k: &ObjectKey) -> String {
        state.endpoints.get(k).unwrap().value.endpoints[0]
            .zone
            .clone()
    }

    /// Each watch event recomputes only the services it touched: a node's zone change
    /// the services with endpoints on it (before: every service); a namespace event
    /// that changes no label nothing (before: every service of the namespace).
    #[test]
    fn events_recompute_only_what_they_touch() {
        let (mut src, state, opts) = listed(2_000);
        let lone = key("b", "lone");
        assert_eq!(zone_of(&state, &lone), "az9");

        let before = src.exports;
        let t = src.on_node(Event::Apply(meta("rare", (ZONE_LABEL, "az8"))));
        let state = src.next(t, &state, &opts).expect("the zone changed");
        assert_eq!(src.exports - before, 1, "only the service on the node");
        assert_eq!(zone_of(&state, &lone), "az8");

        // A node status update that keeps its zone touches nothing.
        let before = src.exports;
        let t = src.on_node(Event::Apply(meta("n3", (ZONE_LABEL, "az1"))));
        assert!(src.next(t, &state, &opts).is_none());
        assert_eq!(src.exports, before);

        // A namespace event with an unchanged label touches nothing; a changed label
        // touches that namespace's services only.
        let t = src.on_namespace(Event::Apply(meta("a", (ENV_LABEL, "prod"))));
        assert!(src.next(t, &state, &opts).is_none());
        assert_eq!(src.exports, before);
        let t = src.on_namespace(Event::Apply(meta("b", (ENV_LABEL, "staging"))));
        let state = src.next(t, &state, &opts).expect("b moved");
        assert_eq!(src.exports - before, 1);
        assert_eq!(
            state.services.get(&lone).unwrap().value.environment,
            "staging"
        );

        // A node deleted: its services fall back to --zone.
        let t = src.on_node(Event::Delete(meta("rare", (ZONE_LABEL, "az8"))));
        let state = src.next(t, &state, &opts).unwrap();
        assert_eq!(zone_of(&state, &lone), "fallback");
        assert_eq!(src.exports - before, 2);

        // One slice moves to another node: later zone changes follow it.
        let t = src.on_slice(Event::Apply(slice("a", "s5", "rare", "10.1.0.5")));
        let state = src.next(t, &state, &opts).unwrap();
        let t = src.on_node(Event::Apply(meta("rare", (ZONE_LABEL, "az7"))));
        let state = src.next(t, &state, &opts).unwrap();
        assert_eq!(zone_of(&state, &key("a", "s5")), "az7");
        assert_eq!(zone_of(&state, &lone), "az7");
        assert_eq!(src.exports - before, 5);
    }

    /// A relist of nodes or namespaces that changes nothing recomputes nothing; one
    /// that changes one node's zone recomputes that node's services.
    #[test]
    fn a_relist_recomputes_only_what_differs() {
        let (mut src, state, opts) = listed(1_000);
        let before = src.exports;
        src.on_node(Event::Init);
        for i in 0..10 {
            let zone = if i == 4 { "az2" } else { "az1" };
            src.on_node(Event::InitApply(meta(&format!("n{i}"), (ZONE_LABEL, zone))));
        }
        src.on_node(Event::InitApply(meta("rare", (ZONE_LABEL, "az9"))));
        let t = src.on_node(Event::InitDone);
        let state = src.next(t, &state, &opts).unwrap();
        assert_eq!(src.exports - before, 100, "the services on n4");
        assert_eq!(zone_of(&state, &key("a", "s14")), "az2");
        assert_eq!(zone_of(&state, &key("a", "s15")), "az1");

        src.on_namespace(Event::Init);
        src.on_namespace(Event::InitApply(meta("a", (ENV_LABEL, "prod"))));
        src.on_namespace(Event::InitApply(meta("b", (ENV_LABEL, "prod"))));
        let t = src.on_namespace(Event::InitDone);
        assert!(src.next(t, &state, &opts).is_none());
        assert_eq!(src.exports - before, 100);
    }

    /// Events that have already arrived (a list page) are applied together and make
    /// one new state: 500 listed services are one state, not 500 (before, each was a
    /// state of its own, copying the paths of the maps the previous state shared).
    #[tokio::test]
    async fn a_page_of_events_makes_one_state() {
        let mut events = vec![
            WatchEvent::Namespace(Box::new(Ok(Event::Init))),
            WatchEvent::Namespace(Box::new(Ok(Event::InitApply(meta(
                "a",
                (ENV_LABEL, "prod"),
            ))))),
            WatchEvent::Namespace(Box::new(Ok(Event::InitDone))),
            WatchEvent::Service(Box::new(Ok(Event::Init))),
        ];
        for i in 0..500 {
            let s = service("a", &format!("s{i}"));
            events.push(WatchEvent::Service(Box::new(Ok(Event::InitApply(s)))));
        }
        let (tx, rx) = watch::channel(Arc::new(ClusterState::listing()));
        let mut src = Source::default();
        let opts = KubeOptions::default();
        publish(futures_util::stream::iter(events), &mut src, &opts, &tx).await;
        assert_eq!(src.states, 1, "one state for the page");
        let state = rx.borrow().clone();
        assert!(state.listing);
        assert_eq!(state.services.len(), 500);
    }

    /// The agent keeps reduced views, never whole objects: what the export reads.
    #[test]
    fn views_keep_what_the_export_reads() {
        let s: KubeService = serde_json::from_value(json!({
            "metadata": {"namespace": "a", "name": "web",
                         "annotations": {"big": "x".repeat(10_000)}},
            "spec": {"ports": [{"name": "http", "port": 80}]},
        }))
        .unwrap();
        assert_eq!(s.metadata.annotations, None, "annotations are not decoded");
        assert_eq!(
            s.view,
            ServiceView {
                external_name: false,
                ports: vec![pb::ServicePort {
                    name: "http".into(),
                    port: 80,
                    protocol: "HTTP".into()
                }],
            }
        );
        let sv = slice("a", "web", "n1", "10.0.0.1").view;
        assert_eq!(sv.service, Some(key("a", "web")));
        assert_eq!(sv.endpoints[0].name, "web-pod");
        assert!(sv.endpoints[0].ready && sv.endpoints[0].serving);
    }
}

#[cfg(test)]
mod lean_tests {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::runtime::watcher::ListSemantic;
    use serde_json::json;

    use super::*;

    /// The views as the agent built them from k8s-openapi's whole objects before it
    /// decoded lean ones: the reference the lean decoding must match.
    fn full_service_view(svc: &Service) -> ServiceView {
        let spec = svc.spec.as_ref();
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .map(|p| {
                let name = p
                    .name
                    .clone()
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| p.port.to_string());
                pb::ServicePort {
                    protocol: protocol_of(&name, p.app_protocol.as_deref(), p.protocol.as_deref()),
                    name,
                    port: p.port as u32,
                }
            })
            .collect();
        ServiceView {
            external_name: spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName"),
            ports,
        }
    }

    fn full_slice_view(s: &EndpointSlice) -> SliceView {
        SliceView {
            service: s.labels().get(SERVICE_NAME_LABEL).map(|svc| ObjectKey {
                namespace: s.namespace().unwrap_or_default(),
                name: svc.clone(),
            }),
            routable: matches!(s.address_type.as_str(), "IPv4" | "IPv6"),
            ports: s
                .ports
                .iter()
                .flatten()
                .filter_map(|p| Some((p.name.clone().filter(|n| !n.is_empty()), p.port? as u32)))
                .collect(),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| {
                    let c = e.conditions.as_ref();
                    let ready = c.and_then(|c| c.ready).unwrap_or(true);
                    EndpointView {
                        addresses: e.addresses.clone(),
                        ready,
                        serving: c.and_then(|c| c.serving).unwrap_or(ready),
                        terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                        node: e.node_name.clone().unwrap_or_default(),
                        name: e
                            .target_ref
                            .as_ref()
                            .and_then(|r| r.name.clone())
                            .or_else(|| e.hostname.clone())
                            .unwrap_or_default(),
                        zone: e.zone.clone(),
                    }
                })
                .collect(),
        }
    }

    /// Metadata as an apiserver returns it: managed fields, annotations, owners.
    fn meta(ns: &str, name: &str, labels: serde_json::Value) -> serde_json::Value {
        json!({
            "name": name, "namespace": ns, "uid": "6f1c0a52-0000-4000-8000-000000000001",
            "resourceVersion": "48213", "generation": 3,
            "creationTimestamp": "2026-11-26T10:00:00Z",
            "labels": labels,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"big\":true}",
                            "endpoints.kubernetes.io/last-change-trigger-time": "2026-11-26T10:00:01Z"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name,
                                 "uid": "6f1c0a52-0000-4000-8000-000000000002",
                                 "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                               "apiVersion": "discovery.k8s.io/v1", "time": "2026-11-26T10:00:01Z",
                               "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:addressType": {}, "f:endpoints": {}, "f:metadata": {"f:labels": {".": {}}}}}],
        })
    }

    fn services() -> Vec<serde_json::Value> {
        vec![
            // Dual-stack, named and unnamed ports, appProtocol, UDP, status.
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": meta("shop", "web", json!({"app": "web"})),
                "spec": {"type": "ClusterIP", "clusterIP": "10.0.0.10",
                         "clusterIPs": ["10.0.0.10", "fd00:10:96::a"],
                         "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                         "selector": {"app": "web"}, "sessionAffinity": "None",
                         "internalTrafficPolicy": "Cluster",
                         "ports": [
                            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                            {"name": "api", "port": 8443, "targetPort": "https", "appProtocol": "kubernetes.io/h2c"},
                            {"port": 9090, "protocol": "TCP"},
                            {"name": "", "port": 9091},
                            {"name": "dns", "port": 53, "protocol": "UDP"},
                            {"name": "grpc-web", "port": 7070, "appProtocol": "tcp"},
                         ]},
                "status": {"loadBalancer": {}}}),
            // IPv6 only, headless.
            json!({"metadata": meta("shop", "db", json!(null)),
                "spec": {"clusterIP": "None", "ipFamilies": ["IPv6"],
                         "ports": [{"name": "mysql", "port": 3306}]}}),
            json!({"metadata": meta("shop", "ext", json!({})),
                "spec": {"type": "ExternalName", "externalName": "example.com",
                         "ports": [{"name": "https", "port": 443}]}}),
            json!({"metadata": meta("shop", "bare", json!({})), "spec": {"ports": null}}),
            json!({"metadata": {"name": "nospec"}}),
        ]
    }

    fn slices() -> Vec<serde_json::Value> {
        let labels = |svc: &str| json!({SERVICE_NAME_LABEL: svc, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io", "app": "web"});
        vec![
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": meta("shop", "web-abcde", labels("web")),
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "api", "port": 8443, "appProtocol": "kubernetes.io/h2c"},
                      {"name": "", "port": 9090}, {"name": "noport"}],
            "endpoints": [
                {"addresses": ["10.1.0.1"], "conditions": {"ready": true, "serving": true, "terminating": false},
                 "nodeName": "n1", "zone": "az1", "hints": {"forZones": [{"name": "az1"}]},
                 "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1", "uid": "u1"}},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true},
                 "nodeName": "n2", "targetRef": {"kind": "Pod", "name": "web-2"}},
                {"addresses": ["10.1.0.3"], "conditions": {"ready": false},
                 "hostname": "web-3", "zone": "az2"},
                {"addresses": ["10.1.0.4"], "conditions": {},
                 "hostname": "host-4", "targetRef": {"kind": "Pod", "name": "web-4"}},
                {"addresses": ["10.1.0.5"]},
            ]}),
            json!({"metadata": meta("shop", "web-v6", labels("web")),
                "addressType": "IPv6",
                "ports": [{"port": 8080}],
                "endpoints": [{"addresses": ["fd00:1::1"], "nodeName": "n3",
                               "conditions": {"ready": true, "serving": null, "terminating": null},
                               "deprecatedTopology": {"kubernetes.io/hostname": "n3"}}]}),
            json!({"metadata": meta("shop", "web-fqdn", labels("web")),
                "addressType": "FQDN", "endpoints": [{"addresses": ["web.example.com"]}]}),
            json!({"metadata": meta("shop", "orphan", json!({"app": "x"})),
                "addressType": "IPv4", "ports": null, "endpoints": null}),
        ]
    }

    /// The lean decoding keeps every field the agent exports: on realistic objects
    /// (dual-stack and headless Services, named and unnamed ports, EndpointSlice
    /// conditions, zones, hints, hostnames, FQDN slices) it yields the same views and
    /// identity as k8s-openapi's whole decoding, in objects and in a list page.
    #[test]
    fn lean_decoding_matches_the_full_objects() {
        for v in services() {
            let full: Service = serde_json::from_value(v.clone()).unwrap();
            let lean: KubeService = serde_json::from_value(v).unwrap();
            assert_eq!(
                lean.view,
                full_service_view(&full),
                "{:?}",
                full.metadata.name
            );
            assert_eq!(key_of(&lean), key_of(&full));
            assert_eq!(lean.resource_version(), full.resource_version());
            assert_eq!(lean.labels(), full.labels());
        }
        for v in slices() {
            let full: EndpointSlice = serde_json::from_value(v.clone()).unwrap();
            let lean: KubeSlice = serde_json::from_value(v).unwrap();
            assert_eq!(
                lean.view,
                full_slice_view(&full),
                "{:?}",
                full.metadata.name
            );
            assert_eq!(key_of(&lean), key_of(&full));
            assert_eq!(lean.resource_version(), full.resource_version());
        }
        // Views are kept: their lists hold no spare room.
        for v in slices() {
            let lean: KubeSlice = serde_json::from_value(v).unwrap();
            let view = &lean.view;
            assert_eq!(view.endpoints.capacity(), view.endpoints.len());
            assert_eq!(view.ports.capacity(), view.ports.len());
            for e in &view.endpoints {
                assert_eq!(e.addresses.capacity(), e.addresses.len());
            }
        }
        for v in services() {
            let lean: KubeService = serde_json::from_value(v).unwrap();
            assert_eq!(lean.view.ports.capacity(), lean.view.ports.len());
        }
        // As a list page arrives (what the watcher decodes).
        let page = json!({"apiVersion": "v1", "kind": "ServiceList",
            "metadata": {"resourceVersion": "48300"}, "items": services()});
        let lean: kube::core::ObjectList<KubeService> =
            serde_json::from_value(page.clone()).unwrap();
        let full: kube::core::ObjectList<Service> = serde_json::from_value(page).unwrap();
        assert_eq!(lean.metadata.resource_version.as_deref(), Some("48300"));
        let views = |l: &[KubeService]| l.iter().map(|s| s.view.clone()).collect::<Vec<_>>();
        assert_eq!(
            views(&lean.items),
            full.items.iter().map(full_service_view).collect::<Vec<_>>()
        );
        // What the export of the listed objects reads, end to end.
        let opts = KubeOptions {
            default_env: Some("prod".into()),
            zone: "fallback".into(),
            ..Default::default()
        };
        let mut objs = Objects::default();
        for v in services() {
            let s: KubeService = serde_json::from_value(v).unwrap();
            objs.put_service(key_of(&s), s.view);
        }
        for v in slices() {
            let s: KubeSlice = serde_json::from_value(v).unwrap();
            objs.put_slice(key_of(&s), s.view);
        }
        let (svc, eps) = objs.export(
            &ObjectKey {
                namespace: "shop".into(),
                name: "web".into(),
            },
            &opts,
        );
        assert_eq!(svc.unwrap().ports.len(), 6);
        let eps = eps.unwrap().endpoints;
        let addrs: Vec<&str> = eps.iter().map(|e| e.addresses[0].as_str()).collect();
        assert_eq!(
            addrs,
            [
                "10.1.0.1",
                "10.1.0.2",
                "10.1.0.3",
                "10.1.0.4",
                "10.1.0.5",
                "fd00:1::1"
            ]
        );
        assert_eq!(eps[1].name, "web-2");
        assert!(!eps[1].ready && eps[1].serving && eps[1].terminating);
        assert_eq!(
            (eps[2].name.as_str(), eps[2].zone.as_str()),
            ("web-3", "az2")
        );
        assert!(!eps[2].ready && !eps[2].serving);
    }

    /// The list request the watcher sends, as an apiserver receives it.
    async fn list_request(opts: &KubeOptions) -> String {
        use tokio::io::AsyncReadExt;
        let wc = watcher_config(opts);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let client = Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        let watch = tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher::watcher(Api::<KubeSlice>::all(client), wc));
            events.next().await; // Init
            events.next().await // the list
        });
        let (mut conn, _) =
            tokio::time::timeout(std::time::Duration::from_secs(10), listener.accept())
                .await
                .expect("the watcher lists")
                .unwrap();
        let mut buf = vec![0; 4096];
        let n = conn.read(&mut buf).await.unwrap();
        watch.abort();
        let request = String::from_utf8_lossy(&buf[..n]);
        let line = request.lines().next().unwrap().to_string();
        assert!(
            line.starts_with("GET /apis/discovery.k8s.io/v1/endpointslices?"),
            "{line}"
        );
        line
    }

    /// With `--kube-list-from-cache`, lists come from the apiserver's watch cache
    /// (`resourceVersion=0`, unpaged), not from etcd; by default they are quorum reads
    /// in pages of 500.
    #[tokio::test]
    async fn lists_come_from_the_watch_cache_when_asked() {
        let cached = KubeOptions {
            list_from_cache: true,
            ..Default::default()
        };
        assert_eq!(watcher_config(&cached).list_semantic, ListSemantic::Any);
        let line = list_request(&cached).await;
        assert!(
            line.contains("resourceVersion=0"),
            "not from the cache: {line}"
        );
        assert!(
            !line.contains("limit="),
            "kube-rs drops resourceVersion=0 from paged lists: {line}"
        );

        let line = list_request(&KubeOptions::default()).await;
        assert!(line.contains("limit=500"), "{line}");
        assert!(!line.contains("resourceVersion"), "{line}");
    }
}
