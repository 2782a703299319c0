//! OpenTelemetry traces from the real binary, received by an OTLP collector started here (the
//! collector's TraceService from the published protos, served by tonic on loopback): a span per
//! sampled call continuing the caller's `traceparent` (sent by the client crate from the caller's
//! current context), none for an unsampled caller, a refresh's children, a single-flight waiter's link, no secret in any attribute, and
//! no trace context sent to EdgeTag.

use std::{
    collections::HashMap,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use credential_service::proto::{
    BeginAuthRequest, CompleteAuthRequest, GetTokenRequest, RefreshTokenRequest,
    credential_service_client::CredentialServiceClient,
};
use fake_edgetag::{FakeConfig, FakeEdgeTag};
use opentelemetry::{
    Context,
    context::FutureExt as _,
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
    trace::v1::Span,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::Notify,
};
use tonic::{
    Request, Response, Status, service::interceptor::InterceptedService, transport::Channel,
};

use crate::common::{Bearer, REDIRECT_URI};

const BIN: &str = env!("CARGO_BIN_EXE_credential-service");
/// Longest wait for anything the test awaits.
const PATIENCE: Duration = Duration::from_secs(30);

/// What the collector received: every span, and every attribute value of the requests (resource,
/// scope, spans, events, links) as text.
#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    values: Vec<String>,
}

/// An OTLP/gRPC trace collector on loopback.
#[derive(Clone, Default)]
struct Collector {
    received: Arc<Mutex<Received>>,
    arrived: Arc<Notify>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let request = request.into_inner();
        let mut received = self.received.lock().unwrap();
        for resource_spans in request.resource_spans {
            if let Some(resource) = &resource_spans.resource {
                collect_values(&resource.attributes, &mut received.values);
            }
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    collect_values(&span.attributes, &mut received.values);
                    for event in &span.events {
                        received.values.push(event.name.clone());
                        collect_values(&event.attributes, &mut received.values);
                    }
                    for link in &span.links {
                        collect_values(&link.attributes, &mut received.values);
                    }
                    received.values.push(span.name.clone());
                    received.spans.push(span);
                }
            }
        }
        drop(received);
        self.arrived.notify_waiters();
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

fn collect_values(attributes: &[KeyValue], out: &mut Vec<String>) {
    for kv in attributes {
        out.push(kv.key.clone());
        if let Some(value) = &kv.value {
            out.push(text(value));
        }
    }
}

fn text(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::ArrayValue(a)) => a.values.iter().map(text).collect(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

impl Collector {
    /// Serves on an ephemeral loopback port; returns its `http://` URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        format!("http://{addr}")
    }

    /// Waits until the spans received satisfy `done`; returns them then.
    async fn spans_until(&self, mut done: impl FnMut(&[Span]) -> bool) -> Vec<Span> {
        let wait = async {
            loop {
                let arrived = self.arrived.notified();
                {
                    let received = self.received.lock().unwrap();
                    if done(&received.spans) {
                        return received.spans.clone();
                    }
                }
                arrived.await;
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .expect("the expected spans arrive at the collector")
    }
}

/// A caller's own span, as a remote parent: the client sends it as `traceparent`.
fn caller_span(trace: u128, span: u64) -> Context {
    caller_span_with(trace, span, TraceFlags::SAMPLED)
}

fn caller_span_with(trace: u128, span: u64, flags: TraceFlags) -> Context {
    Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from(trace),
        SpanId::from(span),
        flags,
        true,
        TraceState::default(),
    ))
}

fn trace_id(trace: u128) -> Vec<u8> {
    trace.to_be_bytes().to_vec()
}

fn span_id(span: u64) -> Vec<u8> {
    span.to_be_bytes().to_vec()
}

type Client = CredentialServiceClient<InterceptedService<Channel, Bearer>>;

/// The binary pointed at `fake` and at the collector, every new trace sampled, batches sent every
/// 50 ms, logs at WARN (but for the serving line); returns it and its gRPC client.
async fn start_service(
    fake: &FakeEdgeTag,
    dir: &std::path::Path,
    collector: &str,
) -> (Child, Client) {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--client-id", fake.client_id()])
        .args(["--redirect-uri", REDIRECT_URI])
        .args(["--authorize-url", &fake.authorize_url()])
        .args(["--token-url", &fake.token_url()])
        .args(["--revoke-url", &fake.revoke_url()])
        .args(["--otel-endpoint", collector])
        .env_clear()
        .env("EDGETAG_CLIENT_SECRET", fake.client_secret())
        // The default sampler: every new trace, and callers' sampled flags followed.
        .env("OTEL_TRACES_SAMPLER", "parentbased_always_on")
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        // Quiet logs, but for the line with the address: the spans are exported all the same.
        .env("RUST_LOG", "warn,credential_service::server=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = tokio::time::timeout(PATIENCE, async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the service serves");
            if line.contains("credential-service serving") {
                return line;
            }
        }
    })
    .await
    .expect("the service starts");
    // Keep reading stderr so the service never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let addr = serving
        .split("addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (
        child,
        CredentialServiceClient::with_interceptor(channel, Bearer::new(None).unwrap()),
    )
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

const GET_TOKEN: &str = "credential.v1.CredentialService/GetToken";
const REFRESH_TOKEN: &str = "credential.v1.CredentialService/RefreshToken";

#[tokio::test]
async fn calls_refreshes_and_waiters_are_traced_without_secrets_or_context_to_edgetag() {
    let fake = FakeEdgeTag::start(FakeConfig {
        redirect_uris: vec![REDIRECT_URI.to_owned()],
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut client) = start_service(&fake, dir.path(), &endpoint).await;

    // Connect an account, inside a caller's trace.
    let connect = caller_span(
        0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
        0xb7ad_6b71_6920_3331,
    );
    let begun = client
        .begin_auth(BeginAuthRequest {
            account: "acme".into(),
        })
        .with_context(connect.clone())
        .await
        .unwrap()
        .into_inner();
    let redirect = fake.approve(&begun.authorize_url).await.unwrap();
    client
        .complete_auth(CompleteAuthRequest {
            code: redirect.code.clone(),
            state: redirect.state.clone(),
        })
        .with_context(connect)
        .await
        .unwrap();

    // A read continues its caller's trace: the call's span is the child of the caller's span.
    let (read_trace, read_span) = (
        0x1111_2222_3333_4444_5555_6666_7777_8888u128,
        0x0102_0304_0506_0708u64,
    );
    let token = client
        .get_token(GetTokenRequest {
            account: "acme".into(),
            min_validity: None,
        })
        .with_context(caller_span(read_trace, read_span))
        .await
        .unwrap()
        .into_inner()
        .access_token;

    // A caller that does not sample its trace: the service makes no span for its call.
    let unsampled_trace = 0x3333_0000_0000_0000_0000_0000_0000_0003u128;
    client
        .get_token(GetTokenRequest {
            account: "acme".into(),
            min_validity: None,
        })
        .with_context(caller_span_with(
            unsampled_trace,
            0xc3,
            TraceFlags::default(),
        ))
        .await
        .unwrap();

    // An operator's refresh, held at EdgeTag long enough for a second caller to join it.
    let (starter_trace, starter_span) = (0xaaaa_0000_0000_0000_0000_0000_0000_0001u128, 0xa1u64);
    let (waiter_trace, waiter_span) = (0xbbbb_0000_0000_0000_0000_0000_0000_0002u128, 0xb2u64);
    fake.set_token_delay(Duration::from_secs(3));
    let starter = {
        let mut client = client.clone();
        tokio::spawn(
            async move {
                client
                    .refresh_token(RefreshTokenRequest {
                        account: "acme".into(),
                    })
                    .await
            }
            .with_context(caller_span(starter_trace, starter_span)),
        )
    };
    tokio::time::timeout(PATIENCE, fake.until_token_requests_in_flight(|n| n > 0))
        .await
        .expect("the refresh reaches EdgeTag");
    client
        .refresh_token(RefreshTokenRequest {
            account: "acme".into(),
        })
        .with_context(caller_span(waiter_trace, waiter_span))
        .await
        .unwrap();
    starter.await.unwrap().unwrap();
    assert_eq!(
        fake.stats().refreshes_ok,
        1,
        "the second caller joined the first refresh"
    );
    let refreshed = client
        .get_token(GetTokenRequest {
            account: "acme".into(),
            min_validity: None,
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    assert_ne!(refreshed, token);

    let spans = collector
        .spans_until(|spans| {
            named(spans, "refresh").len() == 1
                && ["claim", "upstream.refresh", "commit"]
                    .iter()
                    .all(|n| !named(spans, n).is_empty())
                && named(spans, REFRESH_TOKEN).len() == 2
                && named(spans, GET_TOKEN).len() == 2
                && spans.iter().any(|s| !s.links.is_empty())
        })
        .await;
    let by_id: HashMap<&[u8], &Span> = spans.iter().map(|s| (&s.span_id[..], s)).collect();
    let ancestors = |span: &Span| {
        let mut chain = Vec::new();
        let mut parent = span.parent_span_id.clone();
        while let Some(p) = by_id.get(&parent[..]) {
            chain.push(p.name.clone());
            parent = p.parent_span_id.clone();
        }
        (chain, parent)
    };

    // The read: one span in the caller's trace, its parent the caller's span, kind SERVER.
    let read = named(&spans, GET_TOKEN)
        .into_iter()
        .find(|s| s.trace_id == trace_id(read_trace))
        .expect("the read's span is in the caller's trace");
    assert_eq!(read.parent_span_id, span_id(read_span));
    assert_eq!(read.kind, 2, "SPAN_KIND_SERVER");
    assert!(
        !spans
            .iter()
            .any(|s| s.trace_id == trace_id(unsampled_trace)),
        "an unsampled caller's call is not traced"
    );

    // The refresh: in the starter's trace, under its call, with claim, EdgeTag request and
    // commit as its children.
    let refresh = named(&spans, "refresh")[0];
    assert_eq!(refresh.trace_id, trace_id(starter_trace));
    let (chain, root_parent) = ancestors(refresh);
    assert!(chain.contains(&REFRESH_TOKEN.to_owned()), "{chain:?}");
    assert_eq!(
        root_parent,
        span_id(starter_span),
        "the caller's span is the root's parent"
    );
    for child in ["claim", "upstream.refresh", "commit"] {
        let children = named(&spans, child);
        assert!(
            children.iter().all(|c| c.parent_span_id == refresh.span_id),
            "{child} is a child of the refresh"
        );
    }

    // The waiter: its call is in its own trace, and links to the refresh it waited for.
    let waiter_call = named(&spans, REFRESH_TOKEN)
        .into_iter()
        .find(|s| s.trace_id == trace_id(waiter_trace))
        .expect("the waiter's call is in its caller's trace");
    assert_eq!(waiter_call.parent_span_id, span_id(waiter_span));
    let linked: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == trace_id(waiter_trace))
        .filter(|s| {
            s.links
                .iter()
                .any(|l| l.span_id == refresh.span_id && l.trace_id == refresh.trace_id)
        })
        .collect();
    assert_eq!(
        linked.len(),
        1,
        "one span of the waiter's call links to the refresh"
    );

    // Nothing secret anywhere: tokens, refresh tokens, code, state, verifiers, client secret.
    let mut secrets = vec![
        token,
        refreshed,
        redirect.code,
        redirect.state,
        fake.client_secret(),
    ];
    secrets.extend(fake.issued_refresh_tokens());
    secrets.extend(fake.received_code_verifiers());
    assert!(secrets.len() >= 7);
    let values = collector.received.lock().unwrap().values.clone();
    assert!(
        values.iter().any(|v| v == "acme"),
        "attributes were collected"
    );
    for secret in &secrets {
        assert!(
            !values.iter().any(|v| v.contains(secret.as_str())),
            "a span attribute carries a secret"
        );
    }
    // EdgeTag is a third party: none of its requests carried trace context.
    assert!(fake.stats().token_requests >= 2);
    assert_eq!(fake.stats().trace_context_requests, 0);

    // SIGTERM: the service stops cleanly with its exporter.
    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("stops in time")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_sampler_ratio_out_of_range_stops_the_start_naming_flag_and_variable() {
    let out = Command::new(BIN)
        .args([
            "--client-id",
            "cid",
            "--redirect-uri",
            REDIRECT_URI,
            "--otel-endpoint",
            "http://127.0.0.1:4317",
        ])
        .env_clear()
        .env("EDGETAG_CLIENT_SECRET", "s3cret")
        .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        .env("OTEL_TRACES_SAMPLER_ARG", "2")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("--otel-traces-sampler-arg / OTEL_TRACES_SAMPLER_ARG"),
        "{err}"
    );
}
