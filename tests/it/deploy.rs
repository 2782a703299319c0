//! The files in `deploy/` cannot be run here (no Docker, no cluster, no systemd), so this checks
//! that they agree with the code: binary names, ports, environment variables, paths, the probed
//! gRPC service, and the hardening each file promises.

use std::{collections::BTreeSet, fs, path::Path};

use clap::{CommandFactory, Parser};
use credential_service::config::Settings;
use serde::Deserialize;
use serde_yaml_ng::Value;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
}

fn read(path: &str) -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// Every environment variable the service reads.
fn known_variables() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    names.insert("EDGETAG_CLIENT_SECRET".into()); // read by launch::Launch::build, not clap
    names
}

#[track_caller]
fn assert_known(name: &str) {
    assert!(
        known_variables().contains(name),
        "{name} is set in deploy/ but the service reads no such variable"
    );
}

/// The `[[bin]]` names in Cargo.toml.
fn binaries() -> BTreeSet<String> {
    // The binaries `cargo build` at the root builds: those of the workspace's default members
    // (the service and crates/credctl). Cargo.toml is TOML, but its `default-members` line and
    // [[bin]] tables are simple enough for line logic.
    let root = read("Cargo.toml");
    let members = root
        .lines()
        .find_map(|l| l.strip_prefix("default-members = "))
        .expect("default-members in Cargo.toml");
    let mut names = BTreeSet::new();
    for member in members.split('"').skip(1).step_by(2) {
        let manifest = read(&format!("{member}/Cargo.toml"));
        let mut in_bin = false;
        for line in manifest.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                in_bin = line == "[[bin]]";
            } else if in_bin && let Some(v) = line.strip_prefix("name = ") {
                names.insert(v.trim_matches('"').to_owned());
            }
        }
    }
    names
}

fn default_settings() -> Settings {
    Cli::try_parse_from(["credential-service"])
        .unwrap()
        .settings
}

/// `credential.v1.CredentialService`, from the proto file.
fn grpc_service_name() -> String {
    let proto = read("proto/credential/v1/credential.proto");
    let package = proto
        .lines()
        .find_map(|l| l.strip_prefix("package "))
        .unwrap()
        .trim_end_matches(';');
    let service = proto
        .lines()
        .find_map(|l| l.strip_prefix("service "))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    format!("{package}.{service}")
}

#[test]
fn dockerfile_builds_the_binaries_and_runs_them_unprivileged() {
    let docker = read("deploy/Dockerfile");
    let bins = binaries();
    let froms: Vec<&str> = docker.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: build, then run");
    let rust = read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    assert!(
        froms[0].starts_with(&format!("FROM rust:{rust}")),
        "the builder is the crate's rust-version ({rust})"
    );
    assert!(!froms[1].contains("rust:"), "a minimal runtime image");
    assert!(
        !docker.lines().any(|l| l.starts_with("HEALTHCHECK")),
        "orchestrators probe gRPC health"
    );

    let build = docker.lines().find(|l| l.contains("cargo build")).unwrap();
    for bin in build.split("--bin ").skip(1) {
        let bin = bin.split_whitespace().next().unwrap();
        assert!(bins.contains(bin), "no binary {bin} in Cargo.toml");
    }
    assert!(build.contains("--locked"));
    let user = docker
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .unwrap();
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "{user}"
    );
    let entry = docker
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .unwrap();
    assert_eq!(entry, r#"["/usr/local/bin/credential-service"]"#);
    assert!(bins.contains("credential-service"));

    let port = default_settings().listen.port();
    assert!(docker.contains(&format!("EXPOSE {port}")));
    let mut env = docker.split("ENV ").nth(1).unwrap().lines();
    let mut data_dir = None;
    for line in env.by_ref() {
        let pair = line.trim().trim_end_matches('\\').trim();
        let (name, value) = pair.split_once('=').unwrap();
        assert_known(name);
        if name == "CREDENTIAL_SERVICE_LISTEN" {
            assert!(value.ends_with(&format!(":{port}")), "{value}");
        }
        if name == "CREDENTIAL_SERVICE_DATA_DIR" {
            data_dir = Some(value.to_owned());
        }
        if !line.ends_with('\\') {
            break;
        }
    }
    let data_dir = data_dir.expect("the data directory is set");
    assert!(docker.contains(&format!("VOLUME [\"{data_dir}\"]")));
    assert!(docker.contains(&format!("--chown=65532:65532 /out{data_dir} {data_dir}")));
}

#[test]
fn the_image_is_built_without_the_fake_edgetag() {
    let docker = read("deploy/Dockerfile");
    let build = docker.lines().find(|l| l.contains("cargo build")).unwrap();
    assert!(
        build.contains("--no-default-features"),
        "the image carries no fake EdgeTag: {build}"
    );
    assert!(
        !build.contains("--features") && !build.contains("--all-features"),
        "{build}"
    );

    // What that leaves out: the fake comes in only through `dev`, a default feature.
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    let fake = &manifest["dependencies"]["fake-edgetag"];
    assert_eq!(fake.get("optional").and_then(|o| o.as_bool()), Some(true));
    let features = manifest["features"].as_table().unwrap();
    let enables = |name: &str, what: &str| {
        features[name]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str() == Some(what))
    };
    for name in features.keys() {
        assert_eq!(enables(name, "dep:fake-edgetag"), name == "dev", "{name}");
    }
    assert!(enables("default", "dev"));
}

fn manifests(path: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(&read(path))
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// The pod's one container, after checking that pod and container run unprivileged.
#[track_caller]
fn locked_down_container(pod: &Value) -> &Value {
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let containers = pod["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    c
}

#[test]
fn kubernetes_manifests_agree_with_the_service() {
    let docs = manifests("deploy/kubernetes/credential-service.yaml");
    let set = kind(&docs, "StatefulSet");
    assert_eq!(set["spec"]["replicas"], 1, "sled is single-writer");
    let pod = &set["spec"]["template"]["spec"];
    let c = locked_down_container(pod);

    let port = |name: &str| -> u64 {
        c["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    let env: Vec<(&str, &str)> = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (str_of(&e["name"]), str_of(&e["value"])))
        .collect();
    let var = |name: &str| {
        env.iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} is not set"))
            .1
    };
    for (name, _) in &env {
        assert_known(name);
    }
    assert_eq!(port("grpc"), u64::from(default_settings().listen.port()));
    for (variable, port_name) in [
        ("CREDENTIAL_SERVICE_LISTEN", "grpc"),
        ("CREDENTIAL_SERVICE_CALLBACK_LISTEN", "callback"),
        ("CREDENTIAL_SERVICE_METRICS_LISTEN", "metrics"),
    ] {
        let addr: std::net::SocketAddr = var(variable).parse().unwrap();
        assert_eq!(u64::from(addr.port()), port(port_name), "{variable}");
    }
    assert!(var("EDGETAG_REDIRECT_URI").ends_with(&default_settings().callback_path));

    // Probes: native gRPC on the gRPC port; readiness asks for the credential service itself.
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert_eq!(
            c[probe]["grpc"]["port"].as_u64(),
            Some(port("grpc")),
            "{probe}"
        );
    }
    assert_eq!(
        c["readinessProbe"]["grpc"]["service"],
        grpc_service_name().as_str()
    );

    // The data directory is the PersistentVolumeClaim.
    let mounts = c["volumeMounts"].as_sequence().unwrap();
    let mount = |name: &str| {
        str_of(
            &mounts
                .iter()
                .find(|m| m["name"] == name)
                .unwrap_or_else(|| panic!("no mount {name}"))["mountPath"],
        )
        .to_owned()
    };
    let claim = str_of(&set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]);
    assert_eq!(mount(claim), var("CREDENTIAL_SERVICE_DATA_DIR"));

    // Every *_FILE variable names a key of the Secret, mounted where the variable says.
    let secret = kind(&docs, "Secret");
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == secret["metadata"]["name"])
        .expect("the Secret is mounted");
    let secret_dir = mount(str_of(&volume["name"]));
    let files: Vec<_> = env.iter().filter(|(n, _)| n.ends_with("_FILE")).collect();
    assert_eq!(files.len(), 3, "client secret, encryption key, callers");
    for (name, path) in files {
        let (dir, key) = path.rsplit_once('/').unwrap();
        assert_eq!(dir, secret_dir, "{name}");
        assert!(
            !secret["stringData"][key].is_null(),
            "{name}: no key {key} in the Secret"
        );
    }

    // The Service and the NetworkPolicy only name ports the container has.
    let service = kind(&docs, "Service");
    for p in service["spec"]["ports"].as_sequence().unwrap() {
        port(str_of(&p["targetPort"]));
    }
    let policy = kind(&docs, "NetworkPolicy");
    assert_eq!(
        policy["spec"]["podSelector"], set["spec"]["selector"],
        "the policy covers the pod"
    );
    for rule in policy["spec"]["ingress"].as_sequence().unwrap() {
        for p in rule["ports"].as_sequence().unwrap() {
            port(str_of(&p["port"]));
        }
    }
    assert!(
        policy["spec"]["policyTypes"]
            .as_sequence()
            .unwrap()
            .contains(&"Egress".into())
    );
}

#[test]
fn systemd_unit_is_hardened_and_agrees_with_the_service() {
    let unit = read("deploy/systemd/credential-service.service");
    let entries: Vec<(&str, &str)> = unit
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .collect();
    let get = |key: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .collect()
    };
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("KillSignal", "SIGTERM"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(get(key), [value], "{key}");
    }
    let exec = get("ExecStart")[0];
    assert!(
        binaries().contains(exec.rsplit('/').next().unwrap()),
        "{exec}"
    );

    let env: Vec<(&str, &str)> = get("Environment")
        .into_iter()
        .map(|e| e.split_once('=').unwrap())
        .collect();
    let credentials: Vec<&str> = get("LoadCredential")
        .into_iter()
        .map(|c| c.split_once(':').unwrap().0)
        .collect();
    for (name, value) in &env {
        assert_known(name);
        if let Some(credential) = value.strip_prefix("%d/") {
            assert!(
                credentials.contains(&credential),
                "{name}: no LoadCredential={credential}"
            );
        }
    }
    let data_dir = env
        .iter()
        .find(|(n, _)| *n == "CREDENTIAL_SERVICE_DATA_DIR")
        .unwrap()
        .1;
    assert_eq!(data_dir, format!("/var/lib/{}", get("StateDirectory")[0]));
    let listen = env
        .iter()
        .find(|(n, _)| *n == "CREDENTIAL_SERVICE_LISTEN")
        .unwrap()
        .1;
    assert_eq!(listen, default_settings().listen.to_string());
}

const REPLICATED: &str = "deploy/kubernetes/replicated.yaml";

/// Every long flag the service accepts, with its dashes.
fn known_flags() -> BTreeSet<String> {
    Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_long())
        .map(|l| format!("--{l}"))
        .collect()
}

/// A container's environment: each variable's literal value, or `None` when it comes from
/// elsewhere (`valueFrom`).
fn env_of(c: &Value) -> Vec<(&str, Option<&str>)> {
    c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (str_of(&e["name"]), e["value"].as_str()))
        .collect()
}

#[track_caller]
fn container_port(c: &Value, name: &str) -> u64 {
    c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
        .as_u64()
        .unwrap()
}

#[test]
fn replicated_manifest_keeps_two_of_three_replicas_through_any_one_failure() {
    let docs = manifests(REPLICATED);
    assert!(
        docs.iter()
            .all(|d| d["kind"] != "StatefulSet" && d["kind"] != "PersistentVolumeClaim"),
        "the replicas share PostgreSQL, not a volume"
    );
    let deployment = kind(&docs, "Deployment");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 3);
    assert_eq!(
        spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0,
        "a rolling deploy never drops below three"
    );
    let selector = &spec["selector"]["matchLabels"];
    let labels = &spec["template"]["metadata"]["labels"];
    assert!(!selector.is_null());
    for (key, value) in selector.as_mapping().unwrap() {
        assert_eq!(&labels[key], value, "the Deployment selects its own pods");
    }

    let budget = kind(&docs, "PodDisruptionBudget");
    assert_eq!(budget["spec"]["minAvailable"], 2);
    assert_eq!(budget["spec"]["selector"]["matchLabels"], *selector);

    // One replica per zone, and per node, so that losing either leaves two.
    let constraints = spec["template"]["spec"]["topologySpreadConstraints"]
        .as_sequence()
        .expect("topology spread constraints");
    for key in ["topology.kubernetes.io/zone", "kubernetes.io/hostname"] {
        let c = constraints
            .iter()
            .find(|c| c["topologyKey"] == key)
            .unwrap_or_else(|| panic!("no spread across {key}"));
        assert_eq!(c["maxSkew"], 1, "{key}");
        assert_eq!(c["whenUnsatisfiable"], "DoNotSchedule", "{key}");
        assert_eq!(c["labelSelector"]["matchLabels"], *selector, "{key}");
    }
}

#[test]
fn replicated_manifest_agrees_with_the_service() {
    let docs = manifests(REPLICATED);
    let deployment = kind(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let c = locked_down_container(pod);
    for field in ["command", "args"] {
        for arg in c[field].as_sequence().into_iter().flatten() {
            let flag = str_of(arg).split('=').next().unwrap();
            assert_ne!(flag, "--dev", "dev mode runs a fake EdgeTag");
            if flag.starts_with("--") {
                assert!(known_flags().contains(flag), "{flag}: no such flag");
            }
        }
    }

    let port = |name: &str| container_port(c, name);
    let env = env_of(c);
    let entry = |name: &str| {
        c["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not set"))
    };
    let var = |name: &str| {
        str_of(&entry(name)["value"]).to_owned() // a literal, not from a Secret
    };
    assert_eq!(port("grpc"), u64::from(default_settings().listen.port()));
    for (variable, port_name) in [
        ("CREDENTIAL_SERVICE_LISTEN", "grpc"),
        ("CREDENTIAL_SERVICE_CALLBACK_LISTEN", "callback"),
        ("CREDENTIAL_SERVICE_METRICS_LISTEN", "metrics"),
    ] {
        let addr: std::net::SocketAddr = var(variable).parse().unwrap();
        assert_eq!(u64::from(addr.port()), port(port_name), "{variable}");
    }
    assert!(var("EDGETAG_REDIRECT_URI").ends_with(&default_settings().callback_path));

    // Probes: native gRPC on the gRPC port; readiness asks for the credential service itself.
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert_eq!(
            c[probe]["grpc"]["port"].as_u64(),
            Some(port("grpc")),
            "{probe}"
        );
    }
    assert_eq!(
        c["readinessProbe"]["grpc"]["service"],
        grpc_service_name().as_str()
    );

    // The store URL comes from the Secret, and names PostgreSQL without a password.
    let secret = kind(&docs, "Secret");
    let store = &entry("CREDENTIAL_SERVICE_STORE")["valueFrom"]["secretKeyRef"];
    assert_eq!(store["name"], secret["metadata"]["name"]);
    let url: url::Url = str_of(&secret["stringData"][str_of(&store["key"])])
        .parse()
        .unwrap();
    assert_eq!(url.scheme(), "postgres");
    assert!(!url.username().is_empty());
    assert_eq!(url.password(), None, "the password comes from its own file");
    let sslmode = url
        .query_pairs()
        .find(|(k, _)| k == "sslmode")
        .expect("sslmode is explicit")
        .1;
    assert_eq!(
        sslmode, "verify-full",
        "the replicas leave the pod for the database"
    );
    let store_port = url.port().unwrap();

    // Every secret is a file from the Secret: the password, the CA, and the encryption key that
    // PostgreSQL requires (every replica seals with the same key).
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == secret["metadata"]["name"])
        .expect("the Secret is mounted");
    let secret_dir = str_of(
        &c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume["name"])
            .expect("the Secret's volume is mounted")["mountPath"],
    );
    let mounted: BTreeSet<&str> = volume["secret"]["items"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|i| {
            assert_eq!(i["key"], i["path"]);
            str_of(&i["key"])
        })
        .collect();
    let files: BTreeSet<&str> = env
        .iter()
        .filter(|(n, _)| n.ends_with("_FILE"))
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(
        files,
        BTreeSet::from([
            "CREDENTIAL_SERVICE_STORE_PASSWORD_FILE",
            "CREDENTIAL_SERVICE_STORE_CA_FILE",
            "EDGETAG_CLIENT_SECRET_FILE",
            "CREDENTIAL_SERVICE_ENCRYPTION_KEY_FILE",
            "CREDENTIAL_SERVICE_CALLERS_FILE",
        ])
    );
    for name in files {
        let path = var(name);
        let (dir, key) = path.rsplit_once('/').unwrap();
        assert_eq!(dir, secret_dir, "{name}");
        assert!(mounted.contains(key), "{name}: {key} is not mounted");
        assert_eq!(
            secret["stringData"][key], "CHANGE-ME",
            "{name}: no value is committed for {key}"
        );
    }
    // Nothing secret as a literal variable (EDGETAG_CLIENT_SECRET would put it in the pod spec).
    for (name, value) in &env {
        let secret_like = ["SECRET", "PASSWORD", "KEY", "STORE"]
            .iter()
            .any(|w| name.contains(w));
        assert!(
            value.is_none() || !secret_like || name.ends_with("_FILE"),
            "{name} is set in the manifest itself"
        );
    }

    // The Service and the NetworkPolicy only name ports the container has; PostgreSQL is reachable.
    let service = kind(&docs, "Service");
    for p in service["spec"]["ports"].as_sequence().unwrap() {
        port(str_of(&p["targetPort"]));
    }
    let policy = kind(&docs, "NetworkPolicy");
    assert_eq!(
        policy["spec"]["podSelector"], deployment["spec"]["selector"],
        "the policy covers the pods"
    );
    for rule in policy["spec"]["ingress"].as_sequence().unwrap() {
        for p in rule["ports"].as_sequence().unwrap() {
            port(str_of(&p["port"]));
        }
    }
    assert!(
        policy["spec"]["egress"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|r| r["ports"].as_sequence().unwrap())
            .any(|p| p["port"].as_u64() == Some(u64::from(store_port))),
        "egress to PostgreSQL on {store_port}"
    );
}

/// Needs `--store`, `--store-password-file` and `--store-ca-file` in `config::Settings`.
#[test]
fn replicated_manifest_sets_only_variables_the_service_reads() {
    let docs = manifests(REPLICATED);
    let c = &kind(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    for (name, _) in env_of(c) {
        assert_known(name);
    }
}

/// The identity example (issue 27): the callers file loads; the caller pod's projected token has
/// the issuer's audience and lands where its CREDCTL_TOKEN_FILE says; the service's patch mounts
/// the CA and token where the `[[issuer]]` reads them, into the service's own container.
#[test]
fn identity_example_agrees_with_the_service() {
    let callers = read("deploy/kubernetes/callers-identity.toml");
    let file: toml::Value = toml::from_str(&callers).unwrap();
    let issuer = &file["issuer"][0];
    let audiences: Vec<&str> = issuer["audiences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let (ca_file, token_file) = (
        issuer["ca_file"].as_str().unwrap(),
        issuer["token_file"].as_str().unwrap(),
    );
    let jwt = file["caller"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|c| c.get("jwt"))
        .expect("a jwt caller");
    let (namespace, account) = jwt["subject"]
        .as_str()
        .unwrap()
        .strip_prefix("system:serviceaccount:")
        .and_then(|s| s.split_once(':'))
        .expect("a service-account subject");

    // The service loads it, once its CA file exists.
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    let key = rcgen::KeyPair::generate().unwrap();
    let pem = rcgen::CertificateParams::new(vec!["kubernetes.default.svc".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .pem();
    std::fs::write(&ca, pem).unwrap();
    let path = dir.path().join("callers.toml");
    std::fs::write(&path, callers.replace(ca_file, ca.to_str().unwrap())).unwrap();
    credential_service::auth::Callers::load(&path).expect("the example callers file loads");

    // The caller pod.
    let docs = manifests("deploy/kubernetes/identity.yaml");
    let deployment = kind(&docs, "Deployment");
    assert_eq!(deployment["metadata"]["namespace"], namespace);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], account);
    assert!(
        pod["securityContext"]["runAsUser"].as_u64().is_some(),
        "one runAsUser makes the projected token 0600"
    );
    assert_eq!(kind(&docs, "ServiceAccount")["metadata"]["name"], account);
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["credential-service/client"], "true",
        "let in by the service's NetworkPolicy"
    );
    let volume = &pod["volumes"][0];
    let projected = &volume["projected"]["sources"][0]["serviceAccountToken"];
    assert!(audiences.contains(&str_of(&projected["audience"])));
    assert_eq!(projected["expirationSeconds"], 3600);
    let c = &pod["containers"][0];
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the token volume is mounted");
    let token_path = format!(
        "{}/{}",
        str_of(&mount["mountPath"]),
        str_of(&projected["path"])
    );
    let env = env_of(c);
    assert!(
        env.contains(&("CREDCTL_TOKEN_FILE", Some(token_path.as_str()))),
        "{env:?}"
    );
    let credctl = credctl::Cli::command();
    for (name, _) in &env {
        assert!(
            credctl
                .get_arguments()
                .any(|a| a.get_env().is_some_and(|e| e == *name)),
            "credctl reads no {name}"
        );
    }

    // The service's patch: its container, the CA and its own token where the issuer reads them.
    let patch: Value =
        serde_yaml_ng::from_str(&read("deploy/kubernetes/identity-service-patch.yaml")).unwrap();
    let service = manifests("deploy/kubernetes/credential-service.yaml");
    let set = kind(&service, "StatefulSet");
    let patched = &patch["spec"]["template"]["spec"];
    assert_eq!(
        patched["containers"][0]["name"],
        set["spec"]["template"]["spec"]["containers"][0]["name"]
    );
    let mount = &patched["containers"][0]["volumeMounts"][0];
    let volume = &patched["volumes"][0];
    assert_eq!(mount["name"], volume["name"]);
    let dir = str_of(&mount["mountPath"]);
    let sources = volume["projected"]["sources"].as_sequence().unwrap();
    let token = sources
        .iter()
        .find_map(|s| s.get("serviceAccountToken"))
        .unwrap();
    assert_eq!(format!("{dir}/{}", str_of(&token["path"])), token_file);
    let ca = sources.iter().find_map(|s| s.get("configMap")).unwrap();
    assert_eq!(ca["name"], "kube-root-ca.crt");
    assert_eq!(
        format!("{dir}/{}", str_of(&ca["items"][0]["path"])),
        ca_file
    );
}
