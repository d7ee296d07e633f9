//! Generates Rust from `proto/` with protox, a pure-Rust protobuf compiler, so that a bare
//! machine without `protoc` can build Solo. Also writes the descriptor set that the gRPC
//! reflection service serves.

use prost::Message as _;

const PROTOS: &[&str] = &[
    "proto/solo/v1/events.proto",
    "proto/solo/v1/snapshot.proto",
    "proto/solo/v1/solo.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("solo_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Labels, the only maps, are few per service: a B-tree holds them in one node, needs
        // no hashing, and lists them in order, so equal labels always print alike.
        .btree_map(".")
        // Prost's codec with one change: a request that does not decode is INVALID_ARGUMENT,
        // not INTERNAL.
        .codec_path("crate::api::codec::SoloCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
