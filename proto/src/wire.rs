//! Encode once, send many.
//!
//! A length-delimited sub-message and a `bytes` field share one wire format, so a
//! `DiscoveryResponse` whose `repeated google.protobuf.Any resources = 2` is declared
//! here as `repeated bytes` is wire-compatible with Envoy's. Each resource version is
//! serialized once into an [`EncodedResource`]; every response that carries it clones
//! a reference-counted [`Bytes`], never the message.
//!
//! The delta form is encoded as a whole `envoy.service.discovery.v3.Resource` (name,
//! version, Any), with the Any written last so that the SotW form is a zero-copy
//! suffix of the same buffer.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{
    WireType, decode_key, decode_varint, encode_key, encode_varint, encoded_len_varint, key_len,
};

/// Wire mirror of `envoy.service.discovery.v3.DiscoveryResponse`.
#[derive(Clone, PartialEq, Message)]
pub struct DiscoveryResponseWire {
    #[prost(string, tag = "1")]
    pub version_info: String,
    /// Each element is an encoded `google.protobuf.Any`.
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub resources: Vec<Bytes>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub nonce: String,
    #[prost(message, optional, tag = "6")]
    pub control_plane: Option<ControlPlaneWire>,
}

/// Wire mirror of `envoy.service.discovery.v3.DeltaDiscoveryResponse`.
#[derive(Clone, PartialEq, Message)]
pub struct DeltaDiscoveryResponseWire {
    #[prost(string, tag = "1")]
    pub system_version_info: String,
    /// Each element is an encoded `envoy.service.discovery.v3.Resource`.
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub resources: Vec<Bytes>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub nonce: String,
    #[prost(string, repeated, tag = "6")]
    pub removed_resources: Vec<String>,
    #[prost(message, optional, tag = "7")]
    pub control_plane: Option<ControlPlaneWire>,
}

/// Wire mirror of `envoy.config.core.v3.ControlPlane`.
#[derive(Clone, PartialEq, Message)]
pub struct ControlPlaneWire {
    #[prost(string, tag = "1")]
    pub identifier: String,
}

/// One version of one xDS resource, serialized once. Cloning is one reference-count
/// increment: snapshots, per-client records and in-flight responses share it.
#[derive(Clone, PartialEq, Eq)]
pub struct EncodedResource(std::sync::Arc<Inner>);

#[derive(PartialEq, Eq)]
struct Inner {
    name: std::sync::Arc<str>,
    version: Box<str>,
    /// `version` as a number, for cheap comparisons on the hot path.
    version_hash: u64,
    /// An encoded `envoy.service.discovery.v3.Resource{version=1, name=3, resource=2}`.
    delta: Bytes,
    /// Offset in `delta` at which the encoded `Any` starts.
    any_offset: usize,
}

impl std::fmt::Debug for EncodedResource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodedResource")
            .field("name", &self.name())
            .field("version", &self.version())
            .field("bytes", &self.0.delta.len())
            .finish()
    }
}

/// The numeric form of a resource version: the 16-hex-digit content hash parsed, or
/// (for a version string of another form, e.g. from a client's
/// `initial_resource_versions`) a hash of the string, which never equals a content
/// hash of ours by accident in practice.
pub fn version_hash(version: &str) -> u64 {
    if version.len() == 16
        && let Ok(v) = u64::from_str_radix(version, 16)
    {
        return v;
    }
    let mut h: u64 = 0x8422_2325_cbf2_9ce4;
    for b in version.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ 0x5555_5555_5555_5555
}

impl EncodedResource {
    /// Encodes `message` of type `type_url` under `name` at `version`.
    pub fn encode<M: Message>(type_url: &str, name: &str, version: &str, message: &M) -> Self {
        Self::from_body(type_url, name, version, &message.encode_to_vec())
    }

    /// Builds the wire forms from an already encoded message body.
    pub fn from_body(type_url: &str, name: &str, version: &str, body: &[u8]) -> Self {
        let any_len = len_field(1, type_url.len()) + len_field(2, body.len());
        let total = len_field(1, version.len()) + len_field(3, name.len()) + len_field(2, any_len);
        let mut buf = BytesMut::with_capacity(total);
        put_len_field(&mut buf, 1, version.as_bytes());
        put_len_field(&mut buf, 3, name.as_bytes());
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(any_len as u64, &mut buf);
        let any_offset = buf.len();
        put_len_field(&mut buf, 1, type_url.as_bytes());
        put_len_field(&mut buf, 2, body);
        debug_assert_eq!(buf.len(), total);
        Self(std::sync::Arc::new(Inner {
            name: std::sync::Arc::from(name),
            version: version.into(),
            version_hash: version_hash(version),
            delta: buf.freeze(),
            any_offset,
        }))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The name, shared: cloning it allocates nothing.
    pub fn name_arc(&self) -> &std::sync::Arc<str> {
        &self.0.name
    }

    pub fn version(&self) -> &str {
        &self.0.version
    }

    /// [`version_hash`] of [`Self::version`], precomputed.
    pub fn version_hash(&self) -> u64 {
        self.0.version_hash
    }

    /// The encoded `google.protobuf.Any`, for SotW responses.
    pub fn any_bytes(&self) -> Bytes {
        self.0.delta.slice(self.0.any_offset..)
    }

    /// The encoded `envoy.service.discovery.v3.Resource`, for Delta responses.
    pub fn delta_bytes(&self) -> Bytes {
        self.0.delta.clone()
    }

    /// The serialized resource message itself (the `Any.value`).
    pub fn body(&self) -> Bytes {
        let any = self.any_bytes();
        let mut rest: &[u8] = &any;
        // Any{type_url = 1, value = 2}: both length-delimited; skip to field 2.
        while !rest.is_empty() {
            let Ok((tag, WireType::LengthDelimited)) = decode_key(&mut rest) else {
                break;
            };
            let Some(len) = decode_varint(&mut rest)
                .ok()
                .and_then(|l| usize::try_from(l).ok())
                .filter(|l| *l <= rest.len())
            else {
                break;
            };
            if tag == 2 {
                let start = any.len() - rest.len();
                return any.slice(start..start + len);
            }
            rest = &rest[len..];
        }
        Bytes::new()
    }

    /// Bytes held by this resource version.
    pub fn size(&self) -> usize {
        self.0.delta.len()
    }
}

fn len_field(tag: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }
}

fn put_len_field(buf: &mut BytesMut, tag: u32, value: &[u8]) {
    if value.is_empty() {
        return; // proto3: an empty string or bytes field is not written.
    }
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.put_slice(value);
}

#[allow(clippy::all, missing_debug_implementations)]
mod generated {
    include!(concat!(
        env!("OUT_DIR"),
        "/envoy.service.discovery.v3.AggregatedDiscoveryService.rs"
    ));
}

pub use generated::aggregated_discovery_service_server as ads_server;

pub mod ads;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::envoy::config::cluster::v3::Cluster;
    use crate::envoy::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};

    fn cluster(name: &str) -> Cluster {
        Cluster {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn sotw_wire_decodes_as_envoy_discovery_response() {
        let c = cluster("outbound|8080||reviews");
        let r = EncodedResource::encode(crate::type_url::CLUSTER, &c.name, "v1", &c);
        assert_eq!(r.name(), "outbound|8080||reviews");
        assert_eq!(r.version(), "v1");
        assert_eq!(r.version_hash(), version_hash("v1"));
        assert_eq!(version_hash("00000000000000ff"), 255);
        let wire = DiscoveryResponseWire {
            version_info: "7".into(),
            resources: vec![r.any_bytes(), r.any_bytes()],
            type_url: crate::type_url::CLUSTER.into(),
            nonce: "n1".into(),
            control_plane: None,
        };
        let decoded = DiscoveryResponse::decode(wire.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.version_info, "7");
        assert_eq!(decoded.nonce, "n1");
        assert_eq!(decoded.resources.len(), 2);
        assert_eq!(decoded.resources[0].type_url, crate::type_url::CLUSTER);
        let back = Cluster::decode(decoded.resources[0].value.as_slice()).unwrap();
        assert_eq!(back, c);
        assert_eq!(r.body().as_ref(), c.encode_to_vec().as_slice());
    }

    #[test]
    fn body_is_found_at_every_varint_length_boundary() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 2_097_152] {
            let body = vec![0xa5u8; len];
            let r = EncodedResource::from_body(crate::type_url::CLUSTER, "n", "v", &body);
            assert_eq!(r.body().len(), len, "{len}");
            assert!(r.body().iter().all(|b| *b == 0xa5));
        }
    }

    #[test]
    fn delta_wire_decodes_as_envoy_delta_response() {
        // A body above 127 bytes exercises multi-byte length varints.
        let c = cluster(&"x".repeat(300));
        let r = EncodedResource::encode(crate::type_url::CLUSTER, &c.name, "abc", &c);
        let wire = DeltaDiscoveryResponseWire {
            system_version_info: "3".into(),
            resources: vec![r.delta_bytes()],
            type_url: crate::type_url::CLUSTER.into(),
            nonce: "n2".into(),
            removed_resources: vec!["gone".into()],
            control_plane: None,
        };
        let d = DeltaDiscoveryResponse::decode(wire.encode_to_vec().as_slice()).unwrap();
        assert_eq!(d.removed_resources, vec!["gone".to_string()]);
        let res = &d.resources[0];
        assert_eq!(res.name, c.name);
        assert_eq!(res.version, "abc");
        let any = res.resource.as_ref().unwrap();
        assert_eq!(Cluster::decode(any.value.as_slice()).unwrap(), c);
        assert_eq!(r.body().as_ref(), c.encode_to_vec().as_slice());
    }
}
