//! `kubectl tether`: offline rendering driving a real server and agent, and
//! export/status against the in-memory API.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Deserialize;
use serde_json::{Value, json};
use tether::agent::{Agent, AgentArgs};
use tether::server::{RunningServer, ServerArgs};
use tether_operator::fake_api::FakeApi;
use tether_operator::settings::Settings;
use tokio_util::sync::CancellationToken;

const CLI: &str = env!("CARGO_BIN_EXE_kubectl-tether");

fn kubectl_tether(args: &[&str], kubeconfig: Option<&Path>) -> std::process::Output {
    let mut command = Command::new(CLI);
    command.args(args);
    if let Some(path) = kubeconfig {
        command.env("KUBECONFIG", path);
    }
    command.output().expect("kubectl-tether runs")
}

fn manifest(name: &str, public_url: &str, target: &str) -> String {
    format!(
        "apiVersion: tether.dev/v1alpha1\nkind: ProxiedCluster\nmetadata:\n  name: {name}\n  namespace: tenants\nspec:\n  publicUrl: {public_url}\n  targetAddress: \"{target}\"\n"
    )
}

/// The agent Secret's data from a rendered bundle, written as files.
fn agent_files(bundle: &str, dir: &Path) -> Value {
    let secret = serde_yaml_ng::Deserializer::from_str(bundle)
        .map(|doc| Value::deserialize(doc).expect("yaml"))
        .find(|doc| doc["kind"] == "Secret")
        .expect("agent Secret");
    use base64::Engine;
    let mut paths = json!({});
    for key in ["token", "tls.crt", "tls.key", "ca.crt"] {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(secret["data"][key].as_str().expect("data"))
            .expect("base64");
        let path = dir.join(key);
        std::fs::write(&path, bytes).expect("write");
        paths[key] = json!(path.display().to_string());
    }
    paths
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_render_runs_a_real_tunnel_and_keeps_clusters_apart() {
    tether::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // The customer's API server.
    let customer = support::customer_api_server(d).await;
    let backend = &customer.backend;

    // Render two clusters offline with one CA directory.
    let public = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("wss://localhost:{public}");
    for name in ["acme", "globex"] {
        std::fs::write(
            d.join(format!("{name}.yaml")),
            manifest(name, &url, &backend.addr.to_string()),
        )
        .expect("write");
        let out = kubectl_tether(
            &[
                "bundle",
                "render",
                "-f",
                &d.join(format!("{name}.yaml")).display().to_string(),
                "--ca-dir",
                &d.join("ca").display().to_string(),
                "-o",
                &d.join(format!("{name}-agent.yaml")).display().to_string(),
                "--server-dir",
                &d.join("server").display().to_string(),
            ],
            None,
        );
        assert!(
            out.status.success(),
            "render {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "nothing secret on the terminal");
    }
    let clusters: Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("server/clusters.json")).expect("read"),
    )
    .expect("json");
    assert_eq!(clusters.as_array().map(Vec::len), Some(2), "{clusters}");
    let server_objects =
        std::fs::read_to_string(d.join("server/server-objects.yaml")).expect("objects");
    assert!(server_objects.contains("argocd.argoproj.io/secret-type: cluster"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join("acme-agent.yaml"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "bundles are written private");
    }

    // tether-server straight from the rendered server side, mTLS on.
    let server = RunningServer::start(ServerArgs::parse_from([
        "tether-server",
        "--shutdown-delay",
        "0s",
        "--addr",
        &format!("127.0.0.1:{public}"),
        "--internal-addr",
        "127.0.0.1:0",
        "--clusters",
        &d.join("server/clusters.json").display().to_string(),
        "--tls-cert",
        &d.join("server/tls.crt").display().to_string(),
        "--tls-key",
        &d.join("server/tls.key").display().to_string(),
        "--tls-client-ca",
        &d.join("server/ca.crt").display().to_string(),
    ]))
    .await
    .expect("server");

    let agent_args = |token: &Value, cert: &Value| {
        AgentArgs::parse_from([
            "tether-agent",
            "--server",
            &url,
            "--token-file",
            token.as_str().expect("path"),
            "--client-cert",
            cert["tls.crt"].as_str().expect("path"),
            "--client-key",
            cert["tls.key"].as_str().expect("path"),
            "--server-ca-cert",
            cert["ca.crt"].as_str().expect("path"),
            "--target",
            &backend.addr.to_string(),
            "--ca-cert",
            &d.join("customer-ca.crt").display().to_string(),
            "--sa-token-path",
            &d.join("sa-token").display().to_string(),
            "--health-addr",
            "127.0.0.1:0",
            "--max-retry",
            "30s",
        ])
    };
    std::fs::create_dir_all(d.join("acme-files")).expect("dir");
    std::fs::create_dir_all(d.join("globex-files")).expect("dir");
    let acme = agent_files(
        &std::fs::read_to_string(d.join("acme-agent.yaml")).expect("read"),
        &d.join("acme-files"),
    );
    let globex = agent_files(
        &std::fs::read_to_string(d.join("globex-agent.yaml")).expect("read"),
        &d.join("globex-files"),
    );

    // globex's token with acme's certificate is refused and counted.
    let crossed = Agent::start(agent_args(&globex["token"], &acme))
        .await
        .expect("agent");
    eventually("identity mismatch counted", || {
        server
            .metrics_text()
            .contains("tunnel_identity_mismatch_total 1")
    })
    .await;
    assert!(!crossed.is_connected());
    crossed.shutdown().await;

    let _agent = Agent::start(agent_args(&acme["token"], &acme))
        .await
        .expect("agent");
    eventually("acme connects", || server.is_connected("acme")).await;
    // ArgoCD's rendered client certificate reaches the backend through the tunnel.
    let answer = support::argocd_get(
        server.internal_addr,
        &d.join("server/ca.crt"),
        &d.join("server/argocd.crt"),
        &d.join("server/argocd.key"),
        "/tunnel/acme/api/v1/namespaces",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("NamespaceList"),
        "{answer}"
    );

    // Re-rendering reuses the token (GitOps-friendly).
    let token_before =
        std::fs::read_to_string(acme["token"].as_str().expect("path")).expect("read");
    let out = kubectl_tether(
        &[
            "bundle",
            "render",
            "-f",
            &d.join("acme.yaml").display().to_string(),
            "--ca-dir",
            &d.join("ca").display().to_string(),
            "-o",
            &d.join("again.yaml").display().to_string(),
            "--server-dir",
            &d.join("server").display().to_string(),
        ],
        None,
    );
    assert!(out.status.success());
    std::fs::create_dir_all(d.join("again-files")).expect("dir");
    let again = agent_files(
        &std::fs::read_to_string(d.join("again.yaml")).expect("read"),
        &d.join("again-files"),
    );
    assert_eq!(
        std::fs::read_to_string(again["token"].as_str().expect("path")).expect("read"),
        token_before
    );
    server.shutdown().await;
}

/// A GitOps file holds ProxiedClusters beside other objects: each gets its
/// bundle; a file with none says so; `-f -` reads standard input.
#[test]
fn render_takes_every_proxied_cluster_of_a_multi_document_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let render = |file: &str, output: &Path| {
        kubectl_tether(
            &[
                "bundle",
                "render",
                "-f",
                file,
                "--ca-dir",
                &d.join("ca").display().to_string(),
                "-o",
                &output.display().to_string(),
                "--public-url",
                "wss://tether.example.com:8443",
            ],
            None,
        )
    };
    // The quick start's example: a Namespace, then the ProxiedCluster.
    let out = render(
        &format!("{examples}/proxiedcluster.yaml"),
        &d.join("a.yaml"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read_to_string(d.join("a.yaml"))
            .expect("bundle")
            .contains("kind: Deployment")
    );

    let several = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: tenants\n---\n{}---\n{}",
        manifest(
            "one",
            "wss://tether.example.com:8443",
            "kubernetes.default.svc:443"
        ),
        manifest(
            "two",
            "wss://tether.example.com:8443",
            "kubernetes.default.svc:443"
        ),
    );
    std::fs::write(d.join("several.yaml"), several).expect("write");
    let out = render(
        &d.join("several.yaml").display().to_string(),
        &d.join("bundles"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in ["one", "two"] {
        let bundle = std::fs::read_to_string(d.join("bundles").join(format!("{id}.yaml")))
            .expect("one bundle per ProxiedCluster");
        assert!(bundle.contains(&format!("for cluster {id}")));
    }

    let out = render(
        &format!("{examples}/argocd-application.yaml"),
        &d.join("x.yaml"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("holds no ProxiedCluster (found: Application"),
        "{stderr}"
    );

    let mut child = Command::new(CLI)
        .args([
            "bundle",
            "render",
            "-f",
            "-",
            "--ca-dir",
            &d.join("ca").display().to_string(),
            "-o",
            &d.join("stdin.yaml").display().to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(
            manifest(
                "piped",
                "wss://tether.example.com:8443",
                "kubernetes.default.svc:443",
            )
            .as_bytes(),
        )
        .expect("write");
    let out = child.wait_with_output().expect("ends");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.join("stdin.yaml").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_status_read_from_the_cluster() {
    tether::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeApi::start().await.expect("fake API");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: u\n    namespace: tenants\ncurrent-context: fake\n",
        api.addr
    )).expect("kubeconfig");
    let mut settings = Settings::defaults();
    settings.health_addr = "127.0.0.1:0".parse().expect("addr");
    settings.leader_election = false;
    settings.public_url = Some("wss://tether.example.com:8443".into());
    let stop = CancellationToken::new();
    let operator = tokio::spawn(tether_operator::run(api.client(), settings, stop.clone()));
    let pc: tether_operator::crd::ProxiedCluster = serde_yaml_ng::from_str(&manifest(
        "acme",
        "wss://tether.example.com:8443",
        "kubernetes.default.svc:443",
    ))
    .expect("pc");
    kube::Api::<tether_operator::crd::ProxiedCluster>::namespaced(api.client(), "tenants")
        .create(&kube::api::PostParams::default(), &pc)
        .await
        .expect("create");
    eventually("bundle rendered", || {
        api.get("/api/v1/namespaces/tenants/secrets/acme-tether-bundle")
            .is_some()
    })
    .await;

    let refused = kubectl_tether(&["bundle", "export", "acme"], Some(&kubeconfig));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("pass -o FILE"));
    assert!(refused.stdout.is_empty());

    let out_file = dir.path().join("agent.yaml");
    let exported = kubectl_tether(
        &[
            "bundle",
            "export",
            "acme",
            "-o",
            &out_file.display().to_string(),
        ],
        Some(&kubeconfig),
    );
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let stored = api
        .get("/api/v1/namespaces/tenants/secrets/acme-tether-bundle")
        .expect("secret");
    use base64::Engine;
    let stored = base64::engine::general_purpose::STANDARD
        .decode(stored["data"]["bundle.yaml"].as_str().expect("data"))
        .expect("b64");
    assert_eq!(std::fs::read(&out_file).expect("read"), stored);

    // A proxy the customer named late: set in this export, the rest as
    // the operator rendered it, the hash header true to the new body.
    let proxied_file = dir.path().join("proxied.yaml");
    let exported = kubectl_tether(
        &[
            "bundle",
            "export",
            "acme",
            "--proxy",
            "http://proxy.corp.example:3128",
            "--no-proxy",
            ".corp.example, 10.0.0.0/8",
            "-o",
            &proxied_file.display().to_string(),
        ],
        Some(&kubeconfig),
    );
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let proxied = std::fs::read_to_string(&proxied_file).expect("read");
    tether_operator::bundle::verify(&proxied).expect("a true hash header");
    for flag in [
        "--proxy=http://proxy.corp.example:3128",
        "--no-proxy=.corp.example,10.0.0.0/8",
    ] {
        assert!(proxied.contains(flag), "{flag}");
    }
    let original = String::from_utf8_lossy(&stored);
    let secret_of = |bundle: &str| {
        serde_yaml_ng::Deserializer::from_str(bundle)
            .map(|doc| Value::deserialize(doc).expect("yaml"))
            .find(|doc| doc["kind"] == "Secret")
            .expect("agent Secret")
    };
    assert_eq!(
        secret_of(&proxied),
        secret_of(&original),
        "same credentials"
    );
    for (args, problem) in [
        (
            vec!["--no-proxy", "x.example"],
            "--no-proxy needs a proxy: pass --proxy too",
        ),
        (
            vec!["--proxy", "http://u:pw@proxy:3128"],
            "must not hold credentials",
        ),
    ] {
        let mut command = vec!["bundle", "export", "acme", "-o", "/dev/null"];
        command.extend(args);
        let refused = kubectl_tether(&command, Some(&kubeconfig));
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains(problem),
            "{stderr}"
        );
        assert!(!stderr.contains("pw@"), "{stderr}");
    }

    eventually("ready", || {
        api.get("/apis/tether.dev/v1alpha1/namespaces/tenants/proxiedclusters/acme")
            .is_some_and(|pc| {
                pc["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            })
    })
    .await;
    let status = kubectl_tether(&["status", "-A"], Some(&kubeconfig));
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("tenants"))
        .expect("a row for acme");
    assert!(
        row.contains("acme") && row.contains("True") && row.contains("never"),
        "{table}"
    );
    stop.cancel();
    let _ = operator.await;
}
