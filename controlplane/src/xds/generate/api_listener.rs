//! gRPC proxyless API listeners, encoded without building a message per listener.
//!
//! A service has an API listener per host and HTTP port, and one per host for its
//! first port (`docs/xds.md`): 6 for the usual 3 hosts, 60,000 in a cluster of 10,000
//! services. Each is the same `Listener { name, api_listener: Any(HttpConnectionManager
//! { stat_prefix: name, rds: { ADS, route_config_name }, http_filters: [router] }) }`
//! but for its name and route table. Building and encoding that typed message costs
//! about a dozen allocations and three nested encodings per listener (the manager, its
//! router filter's `Any`, the listener), most of an ingest flush's encoding. Here the
//! parts that never vary (the router filter, the ADS config source, the type URL) are
//! encoded once, with prost, and each listener is written as those bytes spliced with
//! its name and route around length prefixes: byte for byte what prost encodes for
//! the typed message (tested, including `fuzz_api_listener_splice` over names and
//! routes), so versions and clients see no difference.

use std::sync::LazyLock;

use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tributary_proto::envoy::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, Rds,
};
use tributary_proto::type_url;
use tributary_proto::wire::EncodedResource;

use super::{XdsType, ads_source, content_version, router_filter};

/// The bytes every API listener shares, encoded once by prost.
struct Template {
    /// `HttpConnectionManager.http_filters` (field 5): the router filter, key included.
    http_filters: Vec<u8>,
    /// The body of `Rds` without its name: `config_source` (field 1), the ADS source.
    rds_config_source: Vec<u8>,
}

static TEMPLATE: LazyLock<Template> = LazyLock::new(|| Template {
    http_filters: HttpConnectionManager {
        http_filters: vec![router_filter()],
        ..Default::default()
    }
    .encode_to_vec(),
    rds_config_source: Rds {
        config_source: Some(ads_source()),
        route_config_name: String::new(),
    }
    .encode_to_vec(),
});

/// Length of a length-delimited field of `len` bytes under a tag below 2048.
fn field_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
}

/// Length of a proto3 string field (an empty string is not on the wire).
fn str_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        field_len(tag, s.len())
    }
}

fn put_header(buf: &mut Vec<u8>, tag: u32, len: usize) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

fn put_str(buf: &mut Vec<u8>, tag: u32, s: &str) {
    if !s.is_empty() {
        put_header(buf, tag, s.len());
        buf.extend_from_slice(s.as_bytes());
    }
}

/// The encoded `Listener` named `name` whose manager reads route table `route`: what
/// prost encodes for the typed message (each message's fields in tag order, a oneof
/// at its tag: the manager's `stat_prefix` = 2, `rds` = 3, `http_filters` = 5).
pub(super) fn body(name: &str, route: &str) -> Vec<u8> {
    let t = &*TEMPLATE;
    // Inside out: Rds ⊂ HttpConnectionManager ⊂ Any ⊂ ApiListener ⊂ Listener.
    let rds = t.rds_config_source.len() + str_len(2, route);
    let hcm = str_len(2, name) + t.http_filters.len() + field_len(3, rds);
    let any = str_len(1, type_url::HTTP_CONNECTION_MANAGER) + field_len(2, hcm);
    let api = field_len(1, any);
    let listener = str_len(1, name) + field_len(19, api);

    let mut buf = Vec::with_capacity(listener);
    put_str(&mut buf, 1, name); // Listener.name
    put_header(&mut buf, 19, api); // Listener.api_listener
    put_header(&mut buf, 1, any); // ApiListener.api_listener (Any)
    put_str(&mut buf, 1, type_url::HTTP_CONNECTION_MANAGER); // Any.type_url
    put_header(&mut buf, 2, hcm); // Any.value
    put_str(&mut buf, 2, name); // HttpConnectionManager.stat_prefix
    put_header(&mut buf, 3, rds); // HttpConnectionManager.rds
    buf.extend_from_slice(&t.rds_config_source); // Rds.config_source
    put_str(&mut buf, 2, route); // Rds.route_config_name
    buf.extend_from_slice(&t.http_filters); // HttpConnectionManager.http_filters
    debug_assert_eq!(buf.len(), listener);
    buf
}

/// The API listener `name` reading route table `route`, encoded and versioned.
pub(super) fn encoded(name: &str, route: &str) -> EncodedResource {
    let body = body(name, route);
    EncodedResource::from_body(
        XdsType::Listener.type_url(),
        name,
        &content_version(&body),
        &body,
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tributary_proto::envoy::envoy::config::listener::v3::{ApiListener, Listener};

    use super::super::{any as any_of, hcm};
    use super::*;

    /// The typed message the splice stands for (what the hub encoded before).
    fn typed(name: &str, route: &str) -> Listener {
        Listener {
            name: name.to_string(),
            api_listener: Some(ApiListener {
                api_listener: Some(any_of(type_url::HTTP_CONNECTION_MANAGER, &hcm(name, route))),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn spliced_listener_is_what_prost_encodes() {
        for (name, route) in [
            ("reviews.prod.svc.cluster.local:9080", "9080"),
            ("reviews", "80"),
            ("", ""),
            ("a", ""),
            ("", "1"),
            // Lengths that cross a varint boundary at some level of nesting.
            (&"h".repeat(127) as &str, "65535"),
            (&"h".repeat(300), "8080"),
            (&"x".repeat(20_000), "1"),
        ] {
            let expected = typed(name, route).encode_to_vec();
            assert_eq!(body(name, route), expected, "name {name:?} route {route:?}");
            let decoded = Listener::decode(&*body(name, route)).unwrap();
            assert_eq!(decoded, typed(name, route));
        }
        let r = encoded("reviews.prod:9080", "9080");
        let expected = typed("reviews.prod:9080", "9080").encode_to_vec();
        assert_eq!(r.name(), "reviews.prod:9080");
        assert_eq!(r.version(), content_version(&expected));
    }

    fn cases() -> u32 {
        std::env::var("TRIBUTARY_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000)
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: cases(),
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Any host (DNS-like or not, short or long enough to grow a length prefix at
        /// every level) with or without a port, and any route table name: the spliced
        /// bytes are prost's.
        #[test]
        fn fuzz_api_listener_splice(
            host in prop_oneof![
                "[a-z0-9.-]{0,80}",
                "\\PC{0,40}",
                (100usize..400).prop_map(|n| "h".repeat(n)),
            ],
            port in proptest::option::of(any::<u16>()),
            route in prop_oneof!["[0-9]{0,5}", "\\PC{0,20}"],
        ) {
            let name = match port {
                Some(p) => format!("{host}:{p}"),
                None => host,
            };
            prop_assert_eq!(body(&name, &route), typed(&name, &route).encode_to_vec());
        }
    }
}
