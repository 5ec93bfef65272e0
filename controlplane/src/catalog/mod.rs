//! The cross-zone catalog: what each zone tells the other zones of its environment.
//!
//! Each shard's leader publishes, per service, a [`Summary`] of its zone's endpoints
//! to the store: healthy endpoints and their weight per service port, and where the
//! zone's east-west gateway listens. Hubs of the same environment in other zones
//! watch the summaries and add the zone as a remote locality, reached through its
//! gateway, to their zone's load assignments (`xds::locality`).
//!
//! | key | value |
//! |---|---|
//! | `/tributary/catalog/{environment}/{zone}/{namespace}/{name}` | [`Summary`] (JSON), written only by the shard's leader |
//! | `/tributary/election/shard/{environment}/{zone}/{lease}` | a candidate to lead the shard: every replica the assignment gives it |
//!
//! A summary is computed from the endpoints the hub holds whose locality names the
//! zone — the hub's own zone's endpoints — so it does not matter whether the hub also
//! holds other zones' endpoints. The pure part (types, keys, [`local_summaries`]) is
//! here; the tasks that publish and watch are in [`publish`].

pub mod publish;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::model::{Environment, Health, ObjectKey, Service};

pub const CATALOG_PREFIX: &str = "/tributary/catalog/";
pub const SHARD_ELECTION_PREFIX: &str = "/tributary/election/shard/";

/// One zone's summary of one service, as the zone's shard leader publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Where the zone's east-west gateway listens.
    pub gateway: SocketAddr,
    /// The region of the zone's endpoints (empty when they name none or differ).
    #[serde(default)]
    pub region: String,
    /// Per service port, by number.
    pub ports: Vec<PortSummary>,
}

/// A service port's healthy endpoints in one zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSummary {
    pub port: u16,
    /// Endpoints serving the port that are healthy (`HEALTHY` or `UNKNOWN`, as Envoy
    /// counts them).
    pub healthy: u32,
    /// The sum of their load-balancing weights.
    pub weight: u32,
}

impl Summary {
    pub fn port(&self, port: u16) -> Option<&PortSummary> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// The key of `(environment, zone, service)`'s summary.
pub fn summary_key(environment: &str, zone: &str, service: &ObjectKey) -> String {
    format!(
        "{CATALOG_PREFIX}{environment}/{zone}/{}/{}",
        service.namespace, service.name
    )
}

/// The prefix of one shard's summaries.
pub fn shard_prefix(environment: &str, zone: &str) -> String {
    format!("{CATALOG_PREFIX}{environment}/{zone}/")
}

/// `(environment, zone, service)` of a summary key; `None` for any other key.
pub fn parse_summary_key(key: &str) -> Option<(String, String, ObjectKey)> {
    let rest = key.strip_prefix(CATALOG_PREFIX)?;
    let mut parts = rest.split('/');
    let (env, zone, namespace, name) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || [env, zone, namespace, name].iter().any(|p| p.is_empty()) {
        return None;
    }
    Some((
        env.to_string(),
        zone.to_string(),
        ObjectKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        },
    ))
}

/// Healthy as Envoy counts it for load balancing.
pub fn counts_as_healthy(h: Health) -> bool {
    matches!(h, Health::Healthy | Health::Unknown)
}

/// The summaries of `service` for each zone of `env` that has an east-west gateway
/// and holds at least one of the service's endpoints (healthy or not: a zone whose
/// endpoints are all unhealthy says so with zero). Costs one pass over the endpoints.
pub fn local_summaries(env: &Environment, service: &Service) -> BTreeMap<String, Summary> {
    let mut out: BTreeMap<String, Summary> = BTreeMap::new();
    if !env.zone_views() {
        return out;
    }
    let mut acc: BTreeMap<&str, ZoneAcc<'_>> = BTreeMap::new();
    for e in &service.endpoints {
        let zone = e.locality.zone.as_str();
        if !env.locality.gateways.contains_key(zone) {
            continue;
        }
        let entry = acc.entry(zone).or_insert_with(|| ZoneAcc {
            region: e.locality.region.as_str(),
            agree: true,
            ports: vec![(0, 0); service.ports.len()],
        });
        if entry.region != e.locality.region {
            entry.agree = false;
        }
        if !counts_as_healthy(e.health) {
            continue;
        }
        for (i, port) in service.ports.iter().enumerate() {
            if e.port_for(port).is_some() {
                let p = &mut entry.ports[i];
                p.0 = p.0.saturating_add(1);
                p.1 = p.1.saturating_add(e.weight);
            }
        }
    }
    for (
        zone,
        ZoneAcc {
            region,
            agree,
            ports,
        },
    ) in acc
    {
        out.insert(
            zone.to_string(),
            Summary {
                gateway: env.locality.gateways[zone],
                region: if agree {
                    region.to_string()
                } else {
                    String::new()
                },
                ports: service
                    .ports
                    .iter()
                    .zip(ports)
                    .map(|(p, (healthy, weight))| PortSummary {
                        port: p.port,
                        healthy,
                        weight,
                    })
                    .collect(),
            },
        );
    }
    out
}

/// One zone's endpoints of a service, while [`local_summaries`] counts them.
struct ZoneAcc<'a> {
    region: &'a str,
    /// Every endpoint of the zone names `region`.
    agree: bool,
    /// Per service port (in order): healthy endpoints and their summed weight.
    ports: Vec<(u32, u32)>,
}

/// Summaries other zones published, as a hub holds them: environment → service →
/// zone → summary.
pub type RemoteCatalog = BTreeMap<String, BTreeMap<ObjectKey, BTreeMap<String, Summary>>>;

/// What changed in the store's catalog, for the index.
#[derive(Debug, Clone, PartialEq)]
pub enum CatalogUpdate {
    /// Summaries put (`Some`) or deleted (`None`), in store order.
    Events(Vec<(String, String, ObjectKey, Option<Summary>)>),
    /// Everything the store holds now (after a (re)list): replaces what the hub held.
    Resync(Vec<(String, String, ObjectKey, Summary)>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Locality, PortMap, Protocol, ServicePort, ZoneLocality};

    fn ep(last: u8, zone: &str, health: Health, weight: u32) -> Endpoint {
        Endpoint {
            address: format!("10.0.0.{last}").parse().unwrap(),
            port: Some(8080),
            ports: PortMap::new(),
            locality: Locality {
                region: "r1".into(),
                zone: zone.into(),
                cluster: "c".into(),
            },
            labels: BTreeMap::new(),
            weight,
            health,
        }
    }

    #[test]
    fn summaries_count_each_gatewayed_zones_healthy_endpoints_per_port() {
        let gw: SocketAddr = "[fd00::1]:15443".parse().unwrap();
        let env = Environment {
            zones: vec!["az1".into(), "az2".into(), "az3".into()],
            locality: ZoneLocality {
                gateways: [("az1".to_string(), gw), ("az2".to_string(), gw)].into(),
                local_percent: 98,
            },
            ..Default::default()
        };
        let mut s = Service {
            key: ObjectKey {
                namespace: "default".into(),
                name: "reviews".into(),
            },
            hosts: vec!["reviews.prod".into()],
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    port: 9080,
                    protocol: Protocol::Http,
                },
                ServicePort {
                    name: "admin".into(),
                    port: 9901,
                    protocol: Protocol::Http,
                },
            ],
            subsets: vec![],
            endpoints: vec![
                ep(1, "az1", Health::Healthy, 1),
                ep(2, "az1", Health::Unknown, 3),
                ep(3, "az1", Health::Unhealthy, 5),
                ep(4, "az2", Health::Unhealthy, 1),
                ep(5, "az3", Health::Healthy, 1),
                ep(6, "", Health::Healthy, 1),
            ],
        };
        // az1's second endpoint serves only 9080.
        s.endpoints[1].port = None;
        s.endpoints[1].ports = [("http".to_string(), 8080)].into();
        let got = local_summaries(&env, &s);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            ["az1", "az2"],
            "az3 has no gateway, '' no zone"
        );
        assert_eq!(
            got["az1"],
            Summary {
                gateway: gw,
                region: "r1".into(),
                ports: vec![
                    PortSummary {
                        port: 9080,
                        healthy: 2,
                        weight: 4
                    },
                    PortSummary {
                        port: 9901,
                        healthy: 1,
                        weight: 1
                    },
                ],
            }
        );
        assert!(
            got["az2"]
                .ports
                .iter()
                .all(|p| p.healthy == 0 && p.weight == 0)
        );
        // One zone: no summaries at all.
        let one = Environment {
            zones: vec!["az1".into()],
            ..env.clone()
        };
        assert!(local_summaries(&one, &s).is_empty());
    }

    #[test]
    fn summary_keys_round_trip() {
        let k = ObjectKey {
            namespace: "bookinfo".into(),
            name: "reviews".into(),
        };
        let key = summary_key("prod", "az2", &k);
        assert_eq!(key, "/tributary/catalog/prod/az2/bookinfo/reviews");
        assert_eq!(
            parse_summary_key(&key),
            Some(("prod".into(), "az2".into(), k))
        );
        assert_eq!(parse_summary_key("/tributary/catalog/prod/az2/x"), None);
        assert_eq!(parse_summary_key("/tributary/catalog/prod/az2/x/y/z"), None);
    }
}
