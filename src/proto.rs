//! Generated protobuf and gRPC code, plus the descriptor set that server reflection serves.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod credential {
    pub mod v1 {
        tonic::include_proto!("credential.v1");
    }
}

pub use credential::v1::*;

/// The encoded `FileDescriptorSet` of `credential.proto`, comments included.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/credential_descriptor.bin"));
