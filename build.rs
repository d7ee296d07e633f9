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
    // The messages and the client.
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        // Labels, the only maps, are few per service: a B-tree holds them in one node, needs
        // no hashing, and lists them in order, so equal labels always print alike.
        .btree_map(".")
        // Prost's codec with one change: a request that does not decode is INVALID_ARGUMENT,
        // not INTERNAL.
        .codec_path("crate::api::codec::SoloCodec")
        .compile_fds(descriptors.clone())?;
    // The server, on its own, over the messages above but for one: it sends Watch answers
    // already encoded, so that an event going to a thousand watchers is encoded once
    // (`crate::api::encoded`). The wire format is the same `WatchResponse`.
    let server_dir = out_dir.join("server");
    std::fs::create_dir_all(&server_dir)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .extern_path(".solo.v1", "crate::proto")
        .extern_path(".solo.v1.WatchResponse", "crate::api::encoded::WatchFrame")
        .codec_path("crate::api::codec::SoloCodec")
        .out_dir(server_dir)
        .compile_fds(descriptors)?;
    Ok(())
}
