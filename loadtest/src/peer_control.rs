//! The go-control-plane peer's control API (`loadtest/peer/control.proto`): resources
//! as encoded protobuf over gRPC. The messages mirror the proto with prost derives
//! (one small file does not earn a build script); the peer's generated Go code
//! decodes them, so a mismatch fails the first update of every run.

use bytes::Bytes;
use tonic::transport::Channel;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub body: Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Group {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, repeated, tag = "2")]
    pub names: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TypeUpdate {
    /// CDS, EDS, LDS or RDS.
    #[prost(string, tag = "1")]
    pub r#type: String,
    #[prost(message, repeated, tag = "2")]
    pub upsert: Vec<Resource>,
    #[prost(string, repeated, tag = "3")]
    pub delete: Vec<String>,
    #[prost(message, repeated, tag = "4")]
    pub groups: Vec<Group>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateRequest {
    #[prost(message, repeated, tag = "1")]
    pub updates: Vec<TypeUpdate>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateResponse {
    #[prost(map = "string, uint64", tag = "1")]
    pub versions: std::collections::HashMap<String, u64>,
}

/// `PeerControl.Update`: returns once the peer has applied every update.
pub async fn update(channel: Channel, request: UpdateRequest) -> anyhow::Result<UpdateResponse> {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(16 << 20);
    grpc.ready().await?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/tributary.loadtest.peer.v1.PeerControl/Update",
    );
    let response = grpc
        .unary(
            tonic::Request::new(request),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await?;
    Ok(response.into_inner())
}
