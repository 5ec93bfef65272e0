//! Compiles Tributary's own protos, and generates the ADS server over the encode-once
//! wire mirrors (see `src/wire.rs`): requests decode into envoy-types messages,
//! responses are assembled from pre-encoded resource bytes.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/tributary/federation/v1/federation.proto",
        "proto/tributary/directory/v1/directory.proto",
        "proto/tributary/admin/v1/admin.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&protos, &["proto"])?;

    let discovery = "envoy_types::pb::envoy::service::discovery::v3";
    let method = |name: &str, route: &str, input: &str, output: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("{discovery}::{input}"))
            .output_type(format!("crate::wire::{output}"))
            .codec_path("tonic_prost::ProstCodec")
            .client_streaming()
            .server_streaming()
            .build()
    };
    let ads = tonic_build::manual::Service::builder()
        .name("AggregatedDiscoveryService")
        .package("envoy.service.discovery.v3")
        .method(method(
            "stream_aggregated_resources",
            "StreamAggregatedResources",
            "DiscoveryRequest",
            "DiscoveryResponseWire",
        ))
        .method(method(
            "delta_aggregated_resources",
            "DeltaAggregatedResources",
            "DeltaDiscoveryRequest",
            "DeltaDiscoveryResponseWire",
        ))
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[ads]);
    Ok(())
}
