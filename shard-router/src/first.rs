//! The first request of an ADS stream: cut out of the gRPC body, decoded just enough to
//! route it.
//!
//! A gRPC message on the wire is a 5-byte prefix (a compression flag and a big-endian
//! length) followed by the protobuf bytes. [`FirstMessage`] collects body bytes until
//! the first whole message is in; the bytes themselves are re-sent to the replica
//! verbatim, so nothing here re-encodes anything.
//!
//! The messages below mirror only the fields the router reads
//! (`DiscoveryRequest.node = 2`, `DeltaDiscoveryRequest.node = 1`, `Node.id = 1`,
//! `Node.metadata = 3`, `Node.locality = 4`, `Locality.zone = 2`,
//! `Struct.fields = 1`, `Value.string_value = 3`); prost skips every other field, so
//! a large first request (SotW resource names, Envoy's extensions list) costs a skip.

use std::collections::BTreeMap;

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;

use tributary_controlplane::xds::server::ENV_METADATA_KEY;

/// Which of the two ADS methods a stream calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sotw,
    Delta,
}

impl Dialect {
    pub const SOTW_PATH: &'static str =
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
    pub const DELTA_PATH: &'static str =
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            Self::SOTW_PATH => Some(Dialect::Sotw),
            Self::DELTA_PATH => Some(Dialect::Delta),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dialect::Sotw => "sotw",
            Dialect::Delta => "delta",
        }
    }
}

#[derive(Clone, PartialEq, Message)]
struct SotwRequestHead {
    #[prost(message, optional, tag = "2")]
    node: Option<NodeHead>,
}

#[derive(Clone, PartialEq, Message)]
struct DeltaRequestHead {
    #[prost(message, optional, tag = "1")]
    node: Option<NodeHead>,
}

#[derive(Clone, PartialEq, Message)]
struct NodeHead {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(message, optional, tag = "3")]
    metadata: Option<StructHead>,
    #[prost(message, optional, tag = "4")]
    locality: Option<LocalityHead>,
}

#[derive(Clone, PartialEq, Message)]
struct StructHead {
    #[prost(btree_map = "string, message", tag = "1")]
    fields: BTreeMap<String, ValueHead>,
}

#[derive(Clone, PartialEq, Message)]
struct ValueHead {
    #[prost(string, optional, tag = "3")]
    string_value: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct LocalityHead {
    #[prost(string, tag = "2")]
    zone: String,
}

/// What the router reads of a node. Empty strings count as missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    pub id: String,
    pub environment: Option<String>,
    pub zone: Option<String>,
}

/// Why a first request could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FirstRequestError {
    #[error("the first request is not a valid {dialect} DiscoveryRequest: {reason}")]
    Malformed {
        dialect: &'static str,
        reason: String,
    },
    #[error(
        "the first request is compressed (gRPC compression flag set); the shard router reads the node of an uncompressed first request only"
    )]
    Compressed,
    #[error("the first request is {len} bytes, more than --max-first-request-bytes ({max}) allows")]
    TooLarge { len: usize, max: usize },
    #[error(
        "the first request carries no node: node.id, node.locality.zone and node.metadata[\"{ENV_METADATA_KEY}\"] pick the shard"
    )]
    NoNode,
    #[error("the stream ended before its first request")]
    Ended,
}

/// Decodes the node of one first request (the protobuf bytes, without the prefix).
pub fn node_of(dialect: Dialect, message: &[u8]) -> Result<NodeIdentity, FirstRequestError> {
    let malformed = |e: prost::DecodeError| FirstRequestError::Malformed {
        dialect: dialect.name(),
        reason: e.to_string(),
    };
    let node = match dialect {
        Dialect::Sotw => SotwRequestHead::decode(message).map_err(malformed)?.node,
        Dialect::Delta => DeltaRequestHead::decode(message).map_err(malformed)?.node,
    }
    .ok_or(FirstRequestError::NoNode)?;
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    Ok(NodeIdentity {
        id: node.id,
        environment: node
            .metadata
            .and_then(|mut m| m.fields.remove(ENV_METADATA_KEY))
            .and_then(|v| v.string_value)
            .and_then(non_empty),
        zone: node.locality.map(|l| l.zone).and_then(non_empty),
    })
}

/// Collects a request body's bytes until its first gRPC message is whole.
#[derive(Debug)]
pub struct FirstMessage {
    buf: BytesMut,
    max: usize,
}

impl FirstMessage {
    /// `max`: the largest first message accepted (its protobuf bytes).
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Adds body bytes. `Ok(Some(len))` once the first message (of `len` protobuf
    /// bytes) is whole.
    pub fn push(&mut self, data: &[u8]) -> Result<Option<usize>, FirstRequestError> {
        self.buf.extend_from_slice(data);
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(FirstRequestError::Compressed);
        }
        let len = (&self.buf[1..5]).get_u32() as usize;
        if len > self.max {
            return Err(FirstRequestError::TooLarge { len, max: self.max });
        }
        Ok((self.buf.len() >= 5 + len).then_some(len))
    }

    /// The first message's protobuf bytes (after [`push`](Self::push) said it is whole).
    pub fn message(&self, len: usize) -> &[u8] {
        &self.buf[5..5 + len]
    }

    /// Everything read so far, to be re-sent as is.
    pub fn into_bytes(self) -> Bytes {
        self.buf.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_proto::envoy::envoy::config::core::v3::{Locality, Node};
    use tributary_proto::envoy::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DiscoveryRequest,
    };
    use tributary_proto::envoy::google::protobuf::{Struct, Value, value::Kind};

    fn node(id: &str, env: Option<&str>, zone: Option<&str>) -> Node {
        let mut fields = std::collections::HashMap::new();
        fields.insert(
            "other".to_string(),
            Value {
                kind: Some(Kind::NumberValue(3.0)),
            },
        );
        if let Some(env) = env {
            fields.insert(
                ENV_METADATA_KEY.to_string(),
                Value {
                    kind: Some(Kind::StringValue(env.into())),
                },
            );
        }
        Node {
            id: id.into(),
            cluster: "c".into(),
            metadata: Some(Struct { fields }),
            locality: zone.map(|z| Locality {
                region: "r".into(),
                zone: z.into(),
                sub_zone: "s".into(),
            }),
            ..Default::default()
        }
    }

    fn framed(msg: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        v.extend_from_slice(msg);
        v
    }

    #[test]
    fn reads_env_and_zone_of_both_dialects() {
        let sotw = DiscoveryRequest {
            version_info: "v".into(),
            node: Some(node("n1", Some("prod"), Some("az1"))),
            resource_names: vec!["a".into(); 50],
            type_url: "t".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let want = NodeIdentity {
            id: "n1".into(),
            environment: Some("prod".into()),
            zone: Some("az1".into()),
        };
        assert_eq!(node_of(Dialect::Sotw, &sotw).unwrap(), want);
        let delta = DeltaDiscoveryRequest {
            node: Some(node("n1", Some("prod"), Some("az1"))),
            type_url: "t".into(),
            resource_names_subscribe: vec!["x".into()],
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(node_of(Dialect::Delta, &delta).unwrap(), want);
        let bare = DeltaDiscoveryRequest {
            node: Some(node("n2", None, Some(""))),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(
            node_of(Dialect::Delta, &bare).unwrap(),
            NodeIdentity {
                id: "n2".into(),
                environment: None,
                zone: None
            }
        );
        let none = DeltaDiscoveryRequest::default().encode_to_vec();
        assert_eq!(
            node_of(Dialect::Delta, &none),
            Err(FirstRequestError::NoNode)
        );
    }

    #[test]
    fn the_first_message_is_whole_across_split_frames_and_kept_verbatim() {
        let msg = DiscoveryRequest {
            node: Some(node("n", Some("e"), Some("z"))),
            ..Default::default()
        }
        .encode_to_vec();
        let mut wire = framed(&msg);
        wire.extend_from_slice(&framed(b"\x22\x01x")); // a second message follows
        let mut f = FirstMessage::new(1 << 20);
        let mut whole = None;
        for chunk in wire.chunks(3) {
            if whole.is_none() {
                whole = f.push(chunk).unwrap();
            } else {
                f.push(chunk).unwrap();
            }
        }
        let len = whole.expect("whole");
        assert_eq!(f.message(len), msg.as_slice());
        assert_eq!(f.into_bytes().as_ref(), wire.as_slice());
    }

    #[test]
    fn too_large_and_compressed_first_messages_are_refused() {
        let mut f = FirstMessage::new(10);
        assert_eq!(
            f.push(&framed(&[0; 11])),
            Err(FirstRequestError::TooLarge { len: 11, max: 10 })
        );
        let mut f = FirstMessage::new(10);
        assert_eq!(
            f.push(&[1, 0, 0, 0, 1, 0]),
            Err(FirstRequestError::Compressed)
        );
    }
}
