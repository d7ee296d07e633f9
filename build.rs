//! Generates Rust from `proto/` with protox, a pure-Rust protobuf compiler, so that a bare
//! machine without `protoc` can build Solo.

const PROTOS: &[&str] = &["proto/solo/v1/events.proto", "proto/solo/v1/snapshot.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
