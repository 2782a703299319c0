//! Compiles the gRPC contract with protox (pure Rust, so no system `protoc` is needed) and keeps the
//! descriptor set, with comments, for server reflection (`grpcurl describe` shows them).

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/credential/v1/credential.proto";
    println!("cargo:rerun-if-changed={proto}");

    let fds = protox::Compiler::new(["proto"])?
        .include_source_info(true)
        .include_imports(true)
        .open_files([proto])?
        .file_descriptor_set();

    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("credential_descriptor.bin"), fds.encode_to_vec())?;

    // Messages that carry a token, code or state get a redacting Debug (src/proto.rs), not the
    // derived one that would print them.
    tonic_prost_build::configure()
        .skip_debug([
            "credential.v1.GetTokenResponse",
            "credential.v1.WatchTokenResponse",
            "credential.v1.CompleteAuthRequest",
            "credential.v1.BeginAuthResponse",
        ])
        .compile_fds(fds)?;
    Ok(())
}
