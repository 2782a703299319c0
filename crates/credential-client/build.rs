//! Generates the client stubs from the service's own contract, with protox (pure Rust, so no
//! system `protoc` is needed), exactly as the service's build does: one proto file, two sides.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/credential/v1/credential.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::Compiler::new(["../../proto"])?
        .include_imports(true)
        .open_files([proto])?
        .file_descriptor_set();
    // Messages that carry a token get a redacting Debug (src/proto.rs) instead of the derived one.
    tonic_prost_build::configure()
        .build_server(false)
        .skip_debug([
            "credential.v1.GetTokenResponse",
            "credential.v1.WatchTokenResponse",
            "credential.v1.CompleteAuthRequest",
            "credential.v1.BeginAuthResponse",
        ])
        .compile_fds(fds)?;
    Ok(())
}
