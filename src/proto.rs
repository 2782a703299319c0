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

/// Field names only for what carries a token, a code or a state (the authorize URL holds the state).
macro_rules! redacting_debug {
    ($($ty:ident { $($secret:ident),* ; $($plain:ident),* })*) => {$(
        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($ty))
                    $(.field(stringify!($secret), &"<redacted>"))*
                    $(.field(stringify!($plain), &self.$plain))*
                    .finish()
            }
        }
    )*};
}

redacting_debug! {
    GetTokenResponse { access_token; token_type, expires_at }
    WatchTokenResponse { access_token; token_type, expires_at }
    CompleteAuthRequest { code, state; }
    BeginAuthResponse { state, authorize_url; expires_at }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_with_secrets_print_no_secret() {
        let printed = format!(
            "{:?} {:?} {:?}",
            GetTokenResponse {
                access_token: "at-secret".into(),
                token_type: "Bearer".into(),
                expires_at: None
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
