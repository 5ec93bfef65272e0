//! Build script for `tributary-proto`.
//!
//! 1. Generates the ADS server over the encode-once wire mirrors (see `src/wire.rs`):
//!    requests decode into envoy-types messages, responses are assembled from
//!    pre-encoded resource bytes. Needs no protoc.
//! 2. Tributary's own protos (federation, directory, admin) are generated code checked
//!    in under `src/generated/`, so building needs no protoc. Where protoc is
//!    available (CI installs it), they are regenerated and compared: a stale copy fails
//!    the build, and `TRIBUTARY_UPDATE_PROTOS=1` rewrites it.

use std::path::{Path, PathBuf};

const PROTOS: [&str; 3] = [
    "proto/tributary/federation/v1/federation.proto",
    "proto/tributary/directory/v1/directory.proto",
    "proto/tributary/admin/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    generate_ads_server();
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-env-changed=TRIBUTARY_UPDATE_PROTOS");
    println!("cargo:rerun-if-env-changed=PROTOC");
    if protoc_available() {
        check_generated()?;
    }
    Ok(())
}

fn protoc_available() -> bool {
    let protoc = std::env::var_os("PROTOC").unwrap_or_else(|| "protoc".into());
    std::process::Command::new(protoc)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn check_generated() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("protos");
    std::fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .bytes(".")
        .out_dir(&out)
        .compile_protos(&PROTOS, &["proto"])?;
    let checked_in = Path::new("src/generated");
    let update = std::env::var_os("TRIBUTARY_UPDATE_PROTOS").is_some();
    for entry in std::fs::read_dir(&out)? {
        let path = entry?.path();
        let name = path.file_name().ok_or("no file name")?;
        let fresh = std::fs::read_to_string(&path)?;
        let target = checked_in.join(name);
        let current = std::fs::read_to_string(&target).unwrap_or_default();
        if fresh != current {
            if update {
                std::fs::create_dir_all(checked_in)?;
                std::fs::write(&target, fresh)?;
            } else {
                return Err(format!(
                    "{} is stale relative to the .proto files: run `TRIBUTARY_UPDATE_PROTOS=1 cargo build -p tributary-proto` and commit the result",
                    target.display()
                )
                .into());
            }
        }
    }
    Ok(())
}

fn generate_ads_server() {
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
}
