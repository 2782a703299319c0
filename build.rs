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

    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
