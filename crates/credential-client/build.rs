//! Generates the client stubs from the service's own contract, exactly as the service's build
//! does (crates/proto-build): one proto file, two sides, one rule for which fields are secret.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let contract = credential_proto_build::Contract::compile("../../proto", false)?;
    contract.generate(
        tonic_prost_build::configure().build_server(false),
        credential_proto_build::out_dir()?,
    )
}
