//! `/metrics` after real traffic: RPCs by method and code, upstream requests and refreshes,
//! accounts by status, single-flight waiters. And the shipped alerts and dashboard
//! (`deploy/monitoring`) name only metrics and labels the real binary exports. The series are
//! process-wide: only the first test serves in this process; the second runs the binary.

#[allow(dead_code, unused_macros, unused_imports)] // this suite uses a part of the harness
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Stdio,
    time::Duration,
};

use common::{Options, TestApp};
use credential_service::proto::{
    BeginAuthRequest, CompleteAuthRequest, GetTokenRequest, RefreshTokenRequest,
    credential_service_client::CredentialServiceClient,
};
use fake_edgetag::{FakeConfig, FakeEdgeTag, Fault};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The value of the series whose line starts with `series ` exactly (name and labels).
#[track_caller]
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_count_calls_upstream_requests_refreshes_and_accounts() {
    let app = TestApp::spawn_with(Options {
        metrics: true,
        ..Options::default()
    })
    .await;
    app.connect("acme").await;
    app.connect("bad").await;
    for _ in 0..3 {
        app.get_token("acme").await.unwrap();
    }
    assert!(app.get_token("nobody").await.is_err());
    app.clock.advance(Duration::from_secs(7000));
    app.get_token("acme").await.unwrap(); // refreshes
    app.fake.push_faults([Fault::InvalidGrant]);
    assert!(app.get_token("bad").await.is_err()); // refresh rejected: needs re-authorization

    let text = app.metrics().await;
    let rpc = |method: &str, code: &str| {
        value(
            &text,
            &format!(
                "credential_rpc_duration_seconds_count{{service=\"credential.v1.CredentialService\",method=\"{method}\",code=\"{code}\"}}"
            ),
        )
    };
    assert_eq!(rpc("GetToken", "OK"), 4.0);
    assert_eq!(rpc("GetToken", "NOT_FOUND"), 1.0);
    assert_eq!(rpc("GetToken", "FAILED_PRECONDITION"), 1.0);
    assert_eq!(rpc("BeginAuth", "OK"), 2.0);
    assert_eq!(rpc("CompleteAuth", "OK"), 2.0);
    assert!(text.contains("# TYPE credential_rpc_duration_seconds histogram"));

    let upstream = |operation: &str, status: &str| {
        value(
            &text,
            &format!(
                "credential_upstream_request_duration_seconds_count{{operation=\"{operation}\",status=\"{status}\"}}"
            ),
        )
    };
    assert_eq!(upstream("exchange_code", "200"), 2.0);
    assert_eq!(upstream("refresh", "200"), 1.0);
    assert_eq!(upstream("refresh", "400"), 1.0);
    assert_eq!(
        value(&text, "credential_refreshes_total{outcome=\"succeeded\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "credential_refreshes_total{outcome=\"rejected\"}"),
        1.0
    );
    assert_eq!(value(&text, "credential_accounts{status=\"active\"}"), 1.0);
    assert_eq!(
        value(&text, "credential_accounts{status=\"needs_reauth\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "credential_accounts{status=\"refreshing_failed\"}"),
        0.0
    );
    assert_eq!(value(&text, "credential_single_flight_waiters"), 0.0);

    // Waiters show while a slow refresh is in flight.
    app.fake.set_token_delay(Duration::from_millis(500));
    app.clock.advance(Duration::from_secs(7000));
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let mut client = app.client.clone();
            tokio::spawn(async move {
                client
                    .get_token(credential_service::proto::GetTokenRequest {
                        account: "acme".into(),
                        min_validity: None,
                    })
                    .await
            })
        })
        .collect();
    // Scrape until all five callers have joined the one refresh (it takes 500 ms at the fake).
    let all_waiting = async {
        while value(&app.metrics().await, "credential_single_flight_waiters") < 5.0 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), all_waiting)
        .await
        .expect("five waiters show");
    assert_eq!(
        app.fake.token_requests_in_flight(),
        1,
        "one refresh for all"
    );
    for w in waiting {
        w.await.unwrap().unwrap();
    }
    let after = app.metrics().await;
    assert_eq!(value(&after, "credential_single_flight_waiters"), 0.0);
    assert_eq!(
        value(&after, "credential_refreshes_total{outcome=\"succeeded\"}"),
        2.0
    );

    credential_service::metrics::record_refresh_lag(Duration::from_millis(1500));
    assert_eq!(
        value(&app.metrics().await, "credential_refresh_lag_seconds"),
        1.5
    );
}

/// Labels Prometheus itself attaches to every scraped series.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

/// Each sample name in an exposition (`credential_refreshes_total`, `..._bucket`) with the label
/// names its series carry. Every family announced by a `# TYPE` line must have a series, so that
/// its labels are known.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut families = Vec::new();
    let mut samples: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.push(rest.split_whitespace().next().unwrap().to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap();
        let labels = samples.entry(line[..end].to_owned()).or_default();
        if line[end..].starts_with('{') {
            // name="value",... up to the closing brace; values may hold escaped quotes.
            let mut rest = &line[end + 1..];
            while let Some(eq) = rest.find("=\"") {
                labels.insert(rest[..eq].trim_start_matches(',').to_owned());
                let value = &rest[eq + 2..];
                let mut close = 0;
                let mut escaped = false;
                for (i, c) in value.char_indices() {
                    match c {
                        _ if escaped => escaped = false,
                        '\\' => escaped = true,
                        '"' => {
                            close = i;
                            break;
                        }
                        _ => {}
                    }
                }
                rest = &value[close + 1..];
                if rest.starts_with('}') {
                    break;
                }
            }
        }
    }
    for family in &families {
        assert!(
            samples.keys().any(|s| s == family
                || s.strip_prefix(family.as_str()).is_some_and(|suffix| {
                    ["_total", "_bucket", "_count", "_sum"].contains(&suffix)
                })),
            "family {family} has no series: drive a call that creates one, so its labels are known\n{text}"
        );
    }
    assert!(families.len() >= 10, "{families:?}");
    samples
}

/// What is wrong with one PromQL expression: metric names (identifiers starting `credential_`)
/// that are not exported, and label names (in `{...}` matchers, `by`/`without`/`on`/`ignoring`/
/// `group_left`/`group_right` lists) that the metrics it names do not carry. Grafana's `$var` is
/// skipped. Returns the metrics named, and the problems.
fn check_expr(
    expr: &str,
    exported: &BTreeMap<String, BTreeSet<String>>,
) -> (BTreeSet<String>, Vec<String>) {
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut tokens: Vec<(bool, String)> = Vec::new(); // (is a string literal, text)
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != c {
                j += if chars[j] == '\\' { 2 } else { 1 };
            }
            tokens.push((true, chars[i + 1..j.min(chars.len())].iter().collect()));
            i = j + 1;
        } else if c == '$' {
            i += 1;
            while i < chars.len() && (ident(chars[i]) || chars[i] == '{' || chars[i] == '}') {
                i += 1;
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if ident(c) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            tokens.push((false, chars[start..i].iter().collect()));
        } else if c.is_whitespace() {
            i += 1;
        } else {
            // Operators: the two-character matchers as one token.
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            if ["!=", "=~", "!~", "=="].contains(&two.as_str()) {
                tokens.push((false, two));
                i += 2;
            } else {
                tokens.push((false, c.to_string()));
                i += 1;
            }
        }
    }
    let mut metrics = BTreeSet::new();
    let mut problems = Vec::new();
    for (is_string, t) in &tokens {
        if !is_string && t.starts_with("credential_") {
            if exported.contains_key(t) {
                metrics.insert(t.clone());
            } else {
                problems.push(format!("metric {t} is not exported"));
            }
        }
    }
    let labels_of = |metric: Option<&String>| -> BTreeSet<String> {
        let mut labels: BTreeSet<String> = TARGET_LABELS.iter().map(|l| (*l).to_owned()).collect();
        for m in metric.map_or_else(|| metrics.iter().collect::<Vec<_>>(), |m| vec![m]) {
            labels.extend(exported.get(m).into_iter().flatten().cloned());
        }
        labels
    };
    let word = |k: usize| tokens.get(k).filter(|(s, _)| !s).map(|(_, t)| t.as_str());
    let mut selector: Option<Option<String>> = None; // inside {...}: the metric it selects, if any
    let mut k = 0;
    while k < tokens.len() {
        match word(k) {
            Some("{") => {
                let metric = k
                    .checked_sub(1)
                    .and_then(word)
                    .filter(|w| w.starts_with("credential_"))
                    .map(str::to_owned);
                selector = Some(metric);
            }
            Some("}") => selector = None,
            Some(label)
                if selector.is_some()
                    && ["=", "!=", "=~", "!~"].contains(&word(k + 1).unwrap_or("")) =>
            {
                let allowed = labels_of(selector.as_ref().unwrap().as_ref());
                if !allowed.contains(label) {
                    problems.push(format!("label {label} is not exported by {selector:?}"));
                }
            }
            Some("by" | "without" | "on" | "ignoring" | "group_left" | "group_right")
                if word(k + 1) == Some("(") =>
            {
                let allowed = labels_of(None);
                k += 2;
                while let Some(w) = word(k).filter(|w| *w != ")") {
                    if w != "," && !allowed.contains(w) {
                        problems.push(format!(
                            "label {w} (in a grouping) is not exported by {metrics:?}"
                        ));
                    }
                    k += 1;
                }
            }
            _ => {}
        }
        k += 1;
    }
    if metrics.is_empty() {
        problems.push("names no credential_ metric".to_owned());
    }
    (metrics, problems)
}

/// Every expression in the shipped rules and dashboard, with where it is, and the label names a
/// dashboard legend (`{{label}}`) or template query (`label_values(expr, label)`) uses with it.
fn monitoring_expressions(root: &Path) -> Vec<(String, String, Vec<String>)> {
    let mut found = Vec::new();
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root.join("deploy/monitoring/alerts.yaml")).unwrap(),
    )
    .unwrap();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().or(rule["record"].as_str()).unwrap();
            assert!(
                ["critical", "warning", "info"]
                    .contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
                "{name} has no severity"
            );
            for annotation in ["summary", "description"] {
                assert!(
                    rule["annotations"][annotation]
                        .as_str()
                        .is_some_and(|a| !a.is_empty()),
                    "{name} has no {annotation}"
                );
            }
            found.push((
                format!("alerts.yaml {name}"),
                rule["expr"].as_str().unwrap().to_owned(),
                vec![],
            ));
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/monitoring/dashboard.json")).unwrap(),
    )
    .unwrap();
    fn walk(v: &serde_json::Value, at: &str, found: &mut Vec<(String, String, Vec<String>)>) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(expr) = map.get("expr").and_then(|e| e.as_str()) {
                    let legend = map
                        .get("legendFormat")
                        .and_then(|l| l.as_str())
                        .unwrap_or("");
                    let labels = legend
                        .split("{{")
                        .skip(1)
                        .map(|l| l.split("}}").next().unwrap().trim().to_owned())
                        .collect();
                    found.push((at.to_owned(), expr.to_owned(), labels));
                }
                if let Some(query) = map.get("definition").and_then(|q| q.as_str()) {
                    let inner = query
                        .strip_prefix("label_values(")
                        .and_then(|q| q.strip_suffix(')'))
                        .unwrap_or_else(|| panic!("{at}: an unexpected template query {query}"));
                    let (expr, label) = inner.rsplit_once(',').unwrap();
                    found.push((
                        at.to_owned(),
                        expr.to_owned(),
                        vec![label.trim().to_owned()],
                    ));
                }
                let title = map
                    .get("title")
                    .or(map.get("name"))
                    .and_then(|t| t.as_str());
                for (key, value) in map {
                    let at = title.map_or_else(|| format!("{at}.{key}"), |t| format!("{at} {t:?}"));
                    walk(value, &at, found);
                }
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    walk(item, at, found);
                }
            }
            _ => {}
        }
    }
    walk(&dashboard, "dashboard.json", &mut found);
    found
}

/// Every problem with the shipped monitoring against `exposition`.
fn monitoring_problems(root: &Path, exposition: &str) -> Vec<String> {
    let exported = exported(exposition);
    let expressions = monitoring_expressions(root);
    let alerts = expressions
        .iter()
        .filter(|(at, _, _)| at.starts_with("alerts.yaml"))
        .count();
    assert!(
        alerts >= 12 && expressions.len() - alerts >= 15,
        "{expressions:#?}"
    );
    let mut problems = Vec::new();
    for (at, expr, labels) in &expressions {
        let (metrics, mut found) = check_expr(expr, &exported);
        for label in labels {
            let known = TARGET_LABELS.contains(&label.as_str())
                || metrics.iter().any(|m| exported[m].contains(label));
            if !known {
                found.push(format!(
                    "label {label} (legend or template) is not exported by {metrics:?}"
                ));
            }
        }
        problems.extend(found.into_iter().map(|p| format!("{at}: {p}\n    {expr}")));
    }
    problems
}

#[tokio::test]
async fn the_shipped_alerts_and_dashboard_name_only_exported_metrics_and_labels() {
    const REDIRECT_URI: &str = "https://ops.example.com/oauth/callback";
    let fake = FakeEdgeTag::start(FakeConfig {
        redirect_uris: vec![REDIRECT_URI.to_owned()],
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Over TLS, so that the certificate's expiry is exported too.
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, signing_key.serialize_pem()).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_credential-service"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(&cert_file)
        .arg("--tls-key")
        .arg(&key_file)
        // Room for the test's one client: a second connection is refused, a limit hit.
        .args(["--max-connections", "1"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "--client-id",
            fake.client_id(),
            "--redirect-uri",
            REDIRECT_URI,
        ])
        .args(["--authorize-url", &fake.authorize_url()])
        .args(["--token-url", &fake.token_url()])
        .args(["--revoke-url", &fake.revoke_url()])
        .env_clear()
        .env("EDGETAG_CLIENT_SECRET", fake.client_secret())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut grpc, mut metrics) = (None, None);
    let addrs = async {
        while grpc.is_none() || metrics.is_none() {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the service logs its addresses");
            let addr = || {
                line.split(" addr=")
                    .nth(1)
                    .map(|a| a.split_whitespace().next().unwrap().to_owned())
            };
            if line.contains("credential-service serving") {
                grpc = addr();
            } else if line.contains("metrics serving") {
                metrics = addr();
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), addrs)
        .await
        .expect("the service starts");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (grpc, metrics) = (grpc.unwrap(), metrics.unwrap());

    // Traffic, so that every labelled family has a series: calls, an exchange and a refresh at
    // EdgeTag, a refused connection.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert.pem()))
        .domain_name("localhost");
    let channel = tonic::transport::Channel::from_shared(format!("https://{grpc}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = CredentialServiceClient::new(channel);
    let begun = client
        .begin_auth(BeginAuthRequest {
            account: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let redirect = fake.approve(&begun.authorize_url).await.unwrap();
    client
        .complete_auth(CompleteAuthRequest {
            code: redirect.code,
            state: redirect.state,
        })
        .await
        .unwrap();
    let get = |account: &str| GetTokenRequest {
        account: account.into(),
        min_validity: None,
    };
    client.get_token(get("acme")).await.unwrap();
    client.get_token(get("nobody")).await.unwrap_err();
    client
        .refresh_token(RefreshTokenRequest {
            account: "acme".into(),
        })
        .await
        .unwrap();
    let _refused = tokio::net::TcpStream::connect(&grpc).await.unwrap();
    let scrape = || async {
        reqwest::get(format!("http://{metrics}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let mut text = scrape().await;
    let started = tokio::time::Instant::now();
    while !text.contains("credential_limit_hits_total{") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no limit hit in\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = scrape().await;
    }

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let problems = monitoring_problems(root, &text);
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The check itself catches a misspelt metric, a family name without its `_total`, a label
    // the metric lacks, and a grouping by a label nobody exports.
    let exported = exported(&text);
    for wrong in [
        r#"credential_acounts{status="needs_reauth"} > 0"#,
        "rate(credential_refreshes[5m])",
        r#"credential_store_up{status="x"} == 0"#,
        "sum by (account) (credential_accounts)",
        "histogram_quantile(0.9, sum by (lee) (rate(credential_rpc_duration_seconds_bucket[5m])))",
    ] {
        assert!(!check_expr(wrong, &exported).1.is_empty(), "{wrong} passed");
    }
    let right = r#"histogram_quantile(0.9, sum by (le, code) (rate(credential_rpc_duration_seconds_bucket{method="GetToken",job=~"$job"}[$__rate_interval])))"#;
    assert_eq!(check_expr(right, &exported).1, Vec::<String>::new());
    child.kill().await.unwrap();
}
