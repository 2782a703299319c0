//! Generated protobuf and gRPC code, plus the descriptor set that server reflection serves.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod credential {
    pub mod v1 {
        tonic::include_proto!("credential.v1");
        // `Debug` for the messages with a secret field (see build.rs).
        include!(concat!(env!("OUT_DIR"), "/credential_debug.rs"));
    }
}

pub use credential::v1::*;

/// The encoded `FileDescriptorSet` of `credential.proto`, comments included.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/credential_descriptor.bin"));

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field marked `[(credential.v1.secret) = true]` in the served descriptor set: its
    /// message's `Debug` hides it.
    #[test]
    fn no_secret_field_shows_in_debug() {
        let sentinels = credential_proto_build::sentinels(FILE_DESCRIPTOR_SET).unwrap();
        let fields: Vec<_> = sentinels.iter().map(|(_, _, s)| s.as_str()).collect();
        assert!(
            fields
                .iter()
                .any(|s| s.contains("credential.v1.GetTokenResponse.access_token")),
            "{fields:?}"
        );
        for (message, bytes, sentinel) in &sentinels {
            let printed = credential::v1::debug_of_encoded(message, bytes)
                .unwrap_or_else(|| panic!("{message} is not a generated message"));
            assert!(!printed.contains(sentinel.as_str()), "{printed}");
            assert!(printed.contains("<redacted>"), "{printed}");
        }
    }

    #[test]
    fn messages_with_secrets_print_no_secret() {
        let printed = format!(
            "{:?} {:?} {:?}",
            GetTokenResponse {
                access_token: "at-secret".into(),
                token_type: "Bearer".into(),
                expires_at: None,
                team_id: "team-1".into(),
            },
            CompleteAuthRequest {
                code: "code-secret".into(),
                state: "state-secret".into()
            },
            BeginAuthResponse {
                authorize_url: "https://x/".into(),
                state: "state-secret".into(),
                expires_at: None
            },
        );
        assert!(!printed.contains("secret"), "{printed}");
        assert!(printed.contains("Bearer") && !printed.contains("https://x/"));
    }
}
