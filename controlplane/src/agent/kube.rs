//! Kubernetes agent source: watches Services, EndpointSlices, Namespaces and Nodes
//! with kube-runtime watchers and keeps the cluster's exported state.
//!
//! Each watcher event names what it touched (a service, a namespace, or — for a
//! Node's zone — the endpoints on it); only those services are recomputed. A relist
//! (`Init` … `InitDone`) is buffered and swapped in whole, then everything of that
//! kind is recomputed, so a watch restart never exports a half-listed cluster.
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

/// The watched objects, reduced to what the export needs.
#[derive(Debug, Default)]
pub struct Objects {
    pub services: HashMap<ObjectKey, Service>,
    pub slices: HashMap<ObjectKey, EndpointSlice>,
    /// Service → names of its slices.
    pub slices_by_service: HashMap<ObjectKey, BTreeSet<String>>,
    /// Namespace → its `tributary.io/env` label.
    pub namespaces: HashMap<String, Option<String>>,
    /// Node → its zone label.
    pub nodes: HashMap<String, String>,
}

fn key_of<K: Resource>(o: &K) -> ObjectKey {
    ObjectKey {
        namespace: o.namespace().unwrap_or_default(),
        name: o.name_any(),
    }
}

fn slice_service(s: &EndpointSlice) -> Option<ObjectKey> {
    let svc = s.labels().get(SERVICE_NAME_LABEL)?;
    Some(ObjectKey {
        namespace: s.namespace().unwrap_or_default(),
        name: svc.clone(),
    })
}

impl Objects {
    fn put_slice(&mut self, s: EndpointSlice) -> Option<ObjectKey> {
        let key = key_of(&s);
        let old = self.remove_slice(&key);
        let svc = slice_service(&s);
        if let Some(svc) = &svc {
            self.slices_by_service
                .entry(svc.clone())
                .or_default()
                .insert(key.name.clone());
        }
        self.slices.insert(key, s);
        svc.or(old)
    }

    fn remove_slice(&mut self, key: &ObjectKey) -> Option<ObjectKey> {
        let old = self.slices.remove(key)?;
        let svc = slice_service(&old)?;
        if let Some(set) = self.slices_by_service.get_mut(&svc) {
            set.remove(&key.name);
            if set.is_empty() {
                self.slices_by_service.remove(&svc);
            }
        }
        Some(svc)
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
        let Some(spec) = &svc.spec else {
            return (None, None);
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            return (None, None);
        }
        let ports: Vec<pb::ServicePort> = spec
            .ports
            .iter()
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
        if ports.is_empty() {
            return (None, None);
        }
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
        let mut endpoints = Vec::new();
        for slice_name in self.slices_by_service.get(key).into_iter().flatten() {
            let Some(slice) = self.slices.get(&ObjectKey {
                namespace: ns.clone(),
                name: slice_name.clone(),
            }) else {
                continue;
            };
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue; // FQDN slices carry no addresses to route to
            }
            let slice_ports: BTreeMap<String, u32> = slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    let port = p.port? as u32;
                    // An unnamed slice port belongs to the service's only port.
                    let name = match p.name.as_deref() {
                        Some(n) if !n.is_empty() => n.to_string(),
                        _ if ports.len() == 1 => ports[0].name.clone(),
                        _ => return None,
                    };
                    Some((name, port))
                })
                .collect();
            for e in &slice.endpoints {
                let c = e.conditions.as_ref();
                // Per the EndpointSlice API, an unset `ready` means ready.
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                let node = e.node_name.clone().unwrap_or_default();
                // The endpoint's identity: its pod (targetRef), else its hostname.
                let name = e
                    .target_ref
                    .as_ref()
                    .and_then(|r| r.name.clone())
                    .or_else(|| e.hostname.clone())
                    .unwrap_or_default();
                let zone = e
                    .zone
                    .clone()
                    .or_else(|| self.nodes.get(&node).cloned().filter(|z| !z.is_empty()))
                    .unwrap_or_else(|| opts.zone.clone());
                endpoints.push(pb::Endpoint {
                    addresses: e.addresses.clone(),
                    ports: slice_ports.clone().into_iter().collect(),
                    zone,
                    node,
                    ready,
                    serving,
                    terminating,
                    labels: Default::default(),
                    name,
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
enum Touched {
    Keys(Vec<ObjectKey>),
    Namespace(String),
    All,
    Nothing,
}

/// Applies a watcher event to `map`, buffering a relist in `buffer`.
fn apply<K: Clone, Key: std::hash::Hash + Eq>(
    event: Event<K>,
    map: &mut HashMap<Key, K>,
    buffer: &mut Option<HashMap<Key, K>>,
    key: impl Fn(&K) -> Key,
) -> Option<Result<K, K>> {
    match event {
        Event::Apply(o) => {
            map.insert(key(&o), o.clone());
            Some(Ok(o))
        }
        Event::Delete(o) => {
            map.remove(&key(&o));
            Some(Err(o))
        }
        Event::Init => {
            *buffer = Some(HashMap::new());
            None
        }
        Event::InitApply(o) => {
            buffer.get_or_insert_with(HashMap::new).insert(key(&o), o);
            None
        }
        Event::InitDone => {
            *map = buffer.take().unwrap_or_default();
            None
        }
    }
}

/// Watches the cluster and publishes its exported state into `tx` until it has no
/// receivers. Watch errors are retried with the watcher's default backoff.
pub async fn run(client: Client, opts: KubeOptions, tx: watch::Sender<Arc<ClusterState>>) {
    let wc = watcher::Config::default();
    let mut services = watcher::watcher(Api::<Service>::all(client.clone()), wc.clone())
        .default_backoff()
        .boxed();
    let mut slices = watcher::watcher(Api::<EndpointSlice>::all(client.clone()), wc.clone())
        .default_backoff()
        .boxed();
    let mut namespaces = watcher::watcher(Api::<Namespace>::all(client.clone()), wc.clone())
        .default_backoff()
        .boxed();
    let mut nodes = watcher::watcher(Api::<Node>::all(client), wc)
        .default_backoff()
        .boxed();

    let mut objs = Objects::default();
    let mut svc_buf = None;
    let mut slice_buf: Option<HashMap<ObjectKey, EndpointSlice>> = None;
    let mut ns_buf = None;
    let mut node_buf = None;
    let mut ns_objs: HashMap<String, Namespace> = HashMap::new();
    let mut node_objs: HashMap<String, Node> = HashMap::new();
    // Nothing is exported until every kind has been listed once.
    let mut listed = [false; 4];

    loop {
        let touched = tokio::select! {
            Some(ev) = services.next() => match ev {
                Ok(Event::InitDone) => {
                    apply(Event::InitDone, &mut objs.services, &mut svc_buf, key_of);
                    listed[0] = true;
                    Touched::All
                }
                Ok(ev) => match apply(ev, &mut objs.services, &mut svc_buf, key_of) {
                    Some(Ok(o)) | Some(Err(o)) => Touched::Keys(vec![key_of(&o)]),
                    None => Touched::Nothing,
                },
                Err(e) => { warn!(error = %e, "Service watch error (retrying)"); Touched::Nothing }
            },
            Some(ev) = slices.next() => match ev {
                Ok(Event::Apply(s)) => Touched::Keys(objs.put_slice(s).into_iter().collect()),
                Ok(Event::Delete(s)) => Touched::Keys(objs.remove_slice(&key_of(&s)).into_iter().collect()),
                Ok(Event::Init) => { slice_buf = Some(HashMap::new()); Touched::Nothing }
                Ok(Event::InitApply(s)) => { slice_buf.get_or_insert_with(HashMap::new).insert(key_of(&s), s); Touched::Nothing }
                Ok(Event::InitDone) => {
                    objs.slices.clear();
                    objs.slices_by_service.clear();
                    for (_, s) in slice_buf.take().unwrap_or_default() {
                        objs.put_slice(s);
                    }
                    listed[1] = true;
                    Touched::All
                }
                Err(e) => { warn!(error = %e, "EndpointSlice watch error (retrying)"); Touched::Nothing }
            },
            Some(ev) = namespaces.next() => match ev {
                Ok(ev) => {
                    let done = matches!(ev, Event::InitDone);
                    let t = apply(ev, &mut ns_objs, &mut ns_buf, |n: &Namespace| n.name_any());
                    objs.namespaces = ns_objs.iter().map(|(k, n)| (k.clone(), n.labels().get(ENV_LABEL).cloned())).collect();
                    if done {
                        listed[2] = true;
                        Touched::All
                    } else {
                        match t { Some(Ok(n)) | Some(Err(n)) => Touched::Namespace(n.name_any()), None => Touched::Nothing }
                    }
                }
                Err(e) => { warn!(error = %e, "Namespace watch error (retrying)"); Touched::Nothing }
            },
            Some(ev) = nodes.next() => match ev {
                Ok(ev) => {
                    let done = matches!(ev, Event::InitDone);
                    let t = apply(ev, &mut node_objs, &mut node_buf, |n: &Node| n.name_any());
                    let zones: HashMap<String, String> = node_objs.iter().map(|(k, n)| (k.clone(), n.labels().get(ZONE_LABEL).cloned().unwrap_or_default())).collect();
                    let changed = zones != objs.nodes;
                    objs.nodes = zones;
                    if done { listed[3] = true; }
                    // A node's zone is a fallback for its endpoints: recompute on change.
                    if (done || t.is_some()) && changed { Touched::All } else { Touched::Nothing }
                }
                Err(e) => { warn!(error = %e, "Node watch error (retrying; zones fall back to --zone)"); Touched::Nothing }
            },
            else => return,
        };
        if tx.is_closed() {
            return;
        }
        if !listed.iter().all(|l| *l) {
            continue;
        }
        let current = tx.borrow().clone();
        let mut next = (*current).clone();
        let now = SystemTime::now();
        let keys: Vec<ObjectKey> = match touched {
            Touched::Nothing if current.services.is_empty() && !objs.services.is_empty() => {
                all_keys(&objs, &current)
            }
            Touched::Nothing => continue,
            Touched::Keys(k) => k,
            Touched::Namespace(ns) => all_keys(&objs, &current)
                .into_iter()
                .filter(|k| k.namespace == ns)
                .collect(),
            Touched::All => all_keys(&objs, &current),
        };
        for key in keys {
            let (svc, eps) = objs.export(&key, &opts);
            next.set_service(key.clone(), svc, now);
            next.set_endpoints(key, eps, now);
        }
        if next != *current {
            debug!(services = next.services.len(), "exported state changed");
            if current.services.is_empty() {
                info!(
                    services = next.services.len(),
                    "initial Kubernetes state exported"
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
