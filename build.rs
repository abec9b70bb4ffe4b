//! Compiles proto/ with protox (pure Rust, no system protoc), generates the tonic server and client,
//! and writes the encoded descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO_ROOT: &str = "proto";
const PROTOS: &[&str] = &[
    "ivschat/v1/token_service.proto",
    "ivschat/v1/moderation_service.proto",
    "ivschat/v1/messaging_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    // Listing files replaces cargo's default of rerunning on any change: this script's own output
    // (the codec path) must follow it too.
    println!("cargo:rerun-if-changed=build.rs");

    // include_imports: reflection must be able to describe google.protobuf.Timestamp too.
    let descriptors = protox::compile(PROTOS, [PROTO_ROOT])?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("token_service_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Decode failures are the caller's: INVALID_ARGUMENT (src/proto/codec.rs).
        .codec_path("crate::proto::codec::ProstCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
