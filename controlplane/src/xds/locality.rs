//! Zone load assignments: one zone's view of a service's endpoints, with the other
//! zones of its environment reached through their east-west gateways.
//!
//! Generated once per zone of an environment (never per proxy), for each service's
//! all-endpoints clusters (`outbound|{port}||{host}`), and only where the zone's view
//! differs from the environment's load assignment — when another zone published a
//! summary of the service ([`crate::catalog`]). Then, for a proxy of zone `Z`:
//!
//! - **priority 0**: the endpoints the hub holds of `Z` (and of zones that published
//!   no summary of the service, or of no zone: those stay exactly as in the
//!   environment's load assignment), grouped by locality as always;
//! - **priority 1**: each other zone that published a summary with healthy endpoints
//!   on the port, as a locality `{region, zone}` whose one endpoint is the zone's
//!   east-west gateway, weighted by the summary's weight (the sum of its healthy
//!   endpoints' weights); the individual endpoints the hub may hold of that zone are
//!   left out (the summary replaces them);
//! - `policy.overprovisioning_factor` = the environment's `localPercent`: Envoy gives
//!   priority 0 `min(100, localPercent × healthy share)` percent of requests and
//!   spills the rest to priority 1. With every local endpoint healthy and
//!   `localPercent: 98`, that is exactly 98% local and 2% split over the remote zones
//!   by weight; with none healthy, everything goes to the remote zones.
//!
//! When the zone holds no endpoint of the service on the port, the remote zones are
//! priority 0 (priorities must start at 0 for gRPC clients). Subset clusters are not
//! given remote zones: a gateway address cannot select a subset.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use tributary_proto::envoy::envoy::config::core::v3::{
    Address, HealthStatus, Locality as PbLocality, SocketAddress, address,
    socket_address::PortSpecifier,
};
use tributary_proto::envoy::envoy::config::endpoint::v3::{
    Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints, cluster_load_assignment::Policy,
    lb_endpoint::HostIdentifier,
};
use tributary_proto::envoy::google::protobuf::UInt32Value;
use tributary_proto::wire::EncodedResource;

use super::XdsType;
use super::generate::{Generated, cluster_name, content_version, load_assignment};
use crate::catalog::Summary;
use crate::model::{Environment, Service};

/// The load assignments of `service`'s all-endpoints clusters as zone `zone` of `env`
/// sees them, given the summaries other zones published of it (`remote`: zone →
/// summary). Emits only those that differ from the environment's.
pub fn zone_load_assignments(
    env: &Environment,
    zone: &str,
    service: &Service,
    remote: Option<&BTreeMap<String, Summary>>,
    out: &mut Generated,
) {
    let Some(remote) = remote else { return };
    // Zones whose summary replaces the individual endpoints the hub holds of them.
    let replaced: BTreeSet<&str> = remote
        .keys()
        .map(String::as_str)
        .filter(|z| *z != zone && env.zones.iter().any(|x| x == z))
        .collect();
    if replaced.is_empty() {
        return;
    }
    let mut local = service.clone();
    local
        .endpoints
        .retain(|e| !replaced.contains(e.locality.zone.as_str()));
    let excluded = local.endpoints.len() != service.endpoints.len();
    for port in &service.ports {
        let gateways: Vec<LocalityLbEndpoints> = replaced
            .iter()
            .filter_map(|z| {
                let s = &remote[*z];
                let p = s.port(port.port).filter(|p| p.healthy > 0)?;
                Some(gateway_locality(z, s, p.weight.max(1)))
            })
            .collect();
        if !excluded && gateways.is_empty() {
            continue;
        }
        let name = cluster_name(port.port, "", service.canonical_host());
        let mut cla = load_assignment(&name, &local, port, None);
        if !gateways.is_empty() {
            let has_local = !cla.endpoints.is_empty();
            for mut g in gateways {
                g.priority = u32::from(has_local);
                cla.endpoints.push(g);
            }
            if has_local {
                cla.policy = Some(Policy {
                    overprovisioning_factor: Some(UInt32Value {
                        value: env.locality.local_percent,
                    }),
                    ..Default::default()
                });
            }
        }
        let body = cla.encode_to_vec();
        out.push((
            XdsType::Endpoint,
            EncodedResource::from_body(
                XdsType::Endpoint.type_url(),
                &name,
                &content_version(&body),
                &body,
            ),
        ));
    }
}

/// A remote zone as one locality: its east-west gateway, weighted by its healthy
/// endpoints' weight.
fn gateway_locality(zone: &str, summary: &Summary, weight: u32) -> LocalityLbEndpoints {
    LocalityLbEndpoints {
        locality: Some(PbLocality {
            region: summary.region.clone(),
            zone: zone.to_string(),
            sub_zone: String::new(),
        }),
        lb_endpoints: vec![LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(PbEndpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: summary.gateway.ip().to_string(),
                        port_specifier: Some(PortSpecifier::PortValue(u32::from(
                            summary.gateway.port(),
                        ))),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            health_status: HealthStatus::Healthy as i32,
            load_balancing_weight: Some(UInt32Value { value: weight }),
            ..Default::default()
        }],
        load_balancing_weight: Some(UInt32Value { value: weight }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;

    use super::*;
    use crate::catalog::PortSummary;
    use crate::model::{
        Endpoint, Health, Locality, ObjectKey, PortMap, Protocol, ServicePort, ZoneLocality,
    };

    fn ep(last: u8, zone: &str, health: Health) -> Endpoint {
        Endpoint {
            address: format!("10.0.0.{last}").parse().unwrap(),
            port: Some(8080),
            ports: PortMap::new(),
            locality: Locality {
                region: "r1".into(),
                zone: zone.into(),
                cluster: format!("c-{zone}"),
            },
            labels: BTreeMap::new(),
            weight: 1,
            health,
        }
    }

    fn env() -> Environment {
        Environment {
            zones: vec!["az1".into(), "az2".into(), "az3".into()],
            locality: ZoneLocality {
                gateways: [
                    ("az2".to_string(), "10.2.0.1:15443".parse().unwrap()),
                    ("az3".to_string(), "[fd00::3]:15443".parse().unwrap()),
                ]
                .into(),
                local_percent: 98,
            },
            ..Default::default()
        }
    }

    fn service(endpoints: Vec<Endpoint>) -> Service {
        Service {
            key: ObjectKey {
                namespace: "default".into(),
                name: "reviews".into(),
            },
            hosts: vec!["reviews.prod".into()],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 9080,
                protocol: Protocol::Http,
            }],
            subsets: vec![],
            endpoints,
        }
    }

    fn summary(gateway: &str, healthy: u32) -> Summary {
        Summary {
            gateway: gateway.parse::<SocketAddr>().unwrap(),
            region: "r1".into(),
            ports: vec![PortSummary {
                port: 9080,
                healthy,
                weight: healthy,
            }],
        }
    }

    fn decode(out: &Generated) -> ClusterLoadAssignment {
        assert_eq!(out.len(), 1);
        ClusterLoadAssignment::decode(out[0].1.body()).unwrap()
    }

    /// (zone, priority, weight, addresses) of each locality.
    fn shape(cla: &ClusterLoadAssignment) -> Vec<(String, u32, u32, Vec<String>)> {
        cla.endpoints
            .iter()
            .map(|l| {
                let addrs = l
                    .lb_endpoints
                    .iter()
                    .map(|e| match &e.host_identifier {
                        Some(HostIdentifier::Endpoint(PbEndpoint {
                            address: Some(a), ..
                        })) => match &a.address {
                            Some(address::Address::SocketAddress(s)) => {
                                format!("{}:{:?}", s.address, s.port_specifier)
                            }
                            _ => String::new(),
                        },
                        _ => String::new(),
                    })
                    .collect();
                (
                    l.locality.as_ref().unwrap().zone.clone(),
                    l.priority,
                    l.load_balancing_weight.as_ref().unwrap().value,
                    addrs,
                )
            })
            .collect()
    }

    #[test]
    fn remote_zones_are_priority_one_gateways_and_replace_their_endpoints() {
        let s = service(vec![
            ep(1, "az1", Health::Healthy),
            ep(2, "az1", Health::Healthy),
            ep(3, "az2", Health::Healthy),
            ep(4, "", Health::Healthy),
        ]);
        let remote: BTreeMap<String, Summary> = [
            ("az2".to_string(), summary("10.2.0.1:15443", 4)),
            ("az3".to_string(), summary("[fd00::3]:15443", 4)),
        ]
        .into();
        let mut out = Generated::new();
        zone_load_assignments(&env(), "az1", &s, Some(&remote), &mut out);
        let cla = decode(&out);
        assert_eq!(out[0].1.name(), "outbound|9080||reviews.prod");
        let got = shape(&cla);
        // The zone-less endpoint stays local; az2's own endpoint is replaced by its gateway.
        assert_eq!(got.len(), 4, "{got:#?}");
        assert_eq!((got[0].0.as_str(), got[0].1), ("", 0));
        assert_eq!((got[1].0.as_str(), got[1].1, got[1].2), ("az1", 0, 2));
        assert_eq!(
            got[2],
            (
                "az2".into(),
                1,
                4,
                vec!["10.2.0.1:Some(PortValue(15443))".into()]
            )
        );
        assert_eq!(
            got[3],
            (
                "az3".into(),
                1,
                4,
                vec!["fd00::3:Some(PortValue(15443))".into()]
            )
        );
        assert_eq!(
            cla.policy.unwrap().overprovisioning_factor.unwrap().value,
            98
        );
    }

    #[test]
    fn without_local_endpoints_the_remote_zones_are_priority_zero() {
        let s = service(vec![ep(3, "az2", Health::Healthy)]);
        let remote: BTreeMap<String, Summary> =
            [("az2".to_string(), summary("10.2.0.1:15443", 1))].into();
        let mut out = Generated::new();
        zone_load_assignments(&env(), "az1", &s, Some(&remote), &mut out);
        let cla = decode(&out);
        assert_eq!(shape(&cla).iter().map(|l| l.1).collect::<Vec<_>>(), [0]);
        assert!(cla.policy.is_none());
    }

    #[test]
    fn a_zone_with_no_healthy_endpoint_is_not_a_locality_and_without_summaries_nothing_changes() {
        let s = service(vec![ep(1, "az1", Health::Healthy)]);
        let mut out = Generated::new();
        zone_load_assignments(&env(), "az1", &s, None, &mut out);
        assert!(out.is_empty());
        // The zone's own summary is not a remote locality.
        let own: BTreeMap<String, Summary> =
            [("az1".to_string(), summary("10.1.0.1:15443", 1))].into();
        zone_load_assignments(&env(), "az1", &s, Some(&own), &mut out);
        assert!(out.is_empty());
        // az2 says it has none healthy: no locality, and nothing of az2 to leave out.
        let none: BTreeMap<String, Summary> =
            [("az2".to_string(), summary("10.2.0.1:15443", 0))].into();
        zone_load_assignments(&env(), "az1", &s, Some(&none), &mut out);
        assert!(out.is_empty());
    }
}
