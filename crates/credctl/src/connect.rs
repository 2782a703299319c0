//! How credctl reaches the service: the endpoint from `--server` (TLS with the system's roots and
//! `--ca-file` for `https://`), the bearer token on every call, and never that token in clear
//! text to anything but this machine.

use std::time::Duration;

use credential_client::{
    Bearer, EndpointError, GrpcClient as Client,
    proto::credential_service_client::CredentialServiceClient,
};
use secrecy::{ExposeSecret, SecretString};
use tonic::transport::{Certificate, ClientTlsConfig};

use crate::CliError;

/// Connects, refusing to send a bearer token in clear text anywhere but this machine.
pub(crate) async fn connect(
    server: &str,
    token: Option<SecretString>,
    ca_file: Option<&std::path::Path>,
) -> Result<Client, CliError> {
    let url = url::Url::parse(server)
        .map_err(|e| CliError::Usage(format!("--server {server:?} is not a URL: {e}")))?;
    let loopback = is_loopback(&url);
    let tls = match url.scheme() {
        "https" => {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(path) = ca_file {
                let pem = std::fs::read(path).map_err(|e| {
                    CliError::Usage(format!("cannot read --ca-file {}: {e}", path.display()))
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            Some(tls)
        }
        "http" if token.is_some() && !loopback => {
            return Err(CliError::Usage(format!(
                "refusing to send the bearer token in clear text to {}; use https://",
                printable(&url)
            )));
        }
        "http" => None,
        other => {
            return Err(CliError::Usage(format!(
                "--server must start with http:// or https://, not {other}://"
            )));
        }
    };
    let endpoint = credential_client::endpoint(server, tls).map_err(|e| match e {
        EndpointError::Tls(e) => CliError::Usage(format!("TLS set-up: {e}")),
        e => CliError::Usage(format!("--server {server:?}: {e}")),
    })?;
    let channel = endpoint
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .map_err(|e| CliError::Unreachable {
            server: printable(&url),
            cause: error_chain(&e),
        })?;
    let bearer = Bearer::new(token.as_ref().map(|t| t.expose_secret())).map_err(|_| {
        CliError::Usage("the token contains characters a header cannot carry".into())
    })?;
    Ok(CredentialServiceClient::with_interceptor(channel, bearer))
}

/// Whether `url` names this machine: only then may a token travel in clear text.
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// `url` without any `user:password@`, for messages.
fn printable(url: &url::Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        // Some errors repeat their cause in their own message ("tcp connect error: tcp connect
        // error: ..."): say each part once.
        let text = cause.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_repeated_in_its_error_is_said_once() {
        #[derive(Debug)]
        struct Layer(&'static str, Option<Box<Layer>>);
        impl std::fmt::Display for Layer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Layer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|l| l as _)
            }
        }
        let refused = Layer("Connection refused (os error 111)", None);
        let inner = Layer("tcp connect error", Some(Box::new(refused)));
        let outer = Layer("tcp connect error", Some(Box::new(inner)));
        assert_eq!(
            error_chain(&outer),
            "tcp connect error: Connection refused (os error 111)"
        );
    }

    #[tokio::test]
    async fn a_token_never_travels_in_clear_text_off_this_machine() {
        let e = connect(
            "http://credentials.example.com:50051",
            Some(SecretString::from("tok-secret")),
            None,
        )
        .await
        .err()
        .unwrap();
        assert_eq!(e.exit_code(), crate::exit::USAGE);
        assert!(e.to_string().contains("https://"), "{e}");
        assert!(!e.to_string().contains("tok-secret"));
    }
}
