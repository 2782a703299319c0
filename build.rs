//! Compiles the gRPC contract (crates/proto-build: protox, so no system `protoc` is needed) and
//! keeps the descriptor set, with comments, for server reflection (`grpcurl describe` shows them).
//! Messages with a field marked `[(credential.v1.secret) = true]` get a redacting `Debug`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let contract = credential_proto_build::Contract::compile("proto", true)?;
    contract.generate(
        tonic_prost_build::configure(),
        credential_proto_build::out_dir()?,
    )
}
