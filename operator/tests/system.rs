//! Operator, tether-server and tether-agent as one system against the
//! in-memory API: a new ProxiedCluster is accepted by a running server, its
//! agent connects with the bundle's credentials over mTLS, the connection
//! shows in status, and deletion closes the session, each within 5 s.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};
use tether::agent::{Agent, AgentArgs};
use tether::server::{RunningServer, ServerArgs};
use tether_operator::crd::ProxiedCluster;
use tether_operator::fake_api::FakeApi;
use tether_operator::settings::Settings;
use tokio_util::sync::CancellationToken;

const FIVE_SECONDS: Duration = Duration::from_secs(5);
const NS: &str = "tenants";

fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write");
    path
}

async fn within<T>(
    limit: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> (T, Duration) {
    let started = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return (value, started.elapsed());
        }
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// What the status says of the agent: tether-server's `connection.connected`
/// and the operator's AgentConnected condition.
fn shown_connection(pc: &ProxiedCluster) -> Option<(bool, String)> {
    let status = pc.status.as_ref()?;
    let connected = status.connection.as_ref()?.connected;
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "AgentConnected")?;
    Some((connected, condition.status.clone()))
}

fn secret_data(secret: &Secret, key: &str) -> Vec<u8> {
    secret.data.as_ref().expect("data")[key].0.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_cluster_goes_live_reports_status_and_is_removed() {
    tether::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeApi::start().await.expect("fake API");
    let client = api.client();

    // The customer's API server (its own CA, as in a real cluster).
    let customer = support::customer_api_server(dir.path()).await;
    let (backend, sa_token, customer_ca_path) = (
        &customer.backend,
        customer.sa_token.clone(),
        customer.ca.clone(),
    );

    // The operator.
    let mut settings = Settings::defaults();
    settings.health_addr = "127.0.0.1:0".parse().expect("addr");
    settings.leader_election = false;
    settings.public_url = Some("wss://localhost:1".into());
    let operator_metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    settings.metrics.metrics_addr = Some(operator_metrics);
    settings.metrics.metrics_auth = tether::metrics_port::MetricsAuth::None;
    let stop = CancellationToken::new();
    let operator = tokio::spawn(tether_operator::run(client.clone(), settings, stop.clone()));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "tether-system");
    let (server_tls, _) = within(Duration::from_secs(10), "shared certificates", async || {
        secrets
            .get_opt("tether-argocd-client-tls")
            .await
            .ok()
            .flatten()?;
        secrets.get_opt("tether-server-tls").await.ok().flatten()
    })
    .await;

    // tether-server, mTLS with the operator's certificates, clusters from the API.
    let server = RunningServer::start_with_client(
        ServerArgs::parse_from([
            "tether-server",
            "--shutdown-delay",
            "0s",
            "--addr",
            "127.0.0.1:0",
            "--internal-addr",
            "127.0.0.1:0",
            "--clusters-secret",
            "tether-system/tether-clusters",
            "--replica-name",
            "server-0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--metrics-auth",
            "none",
            "--tls-cert",
            &write(
                dir.path(),
                "server.crt",
                &secret_data(&server_tls, "tls.crt"),
            )
            .display()
            .to_string(),
            "--tls-key",
            &write(
                dir.path(),
                "server.key",
                &secret_data(&server_tls, "tls.key"),
            )
            .display()
            .to_string(),
            "--tls-client-ca",
            &write(dir.path(), "ca.crt", &secret_data(&server_tls, "ca.crt"))
                .display()
                .to_string(),
        ]),
        Some(client.clone()),
    )
    .await
    .expect("server");

    // A new ProxiedCluster...
    let clusters: Api<ProxiedCluster> = Api::namespaced(client.clone(), NS);
    let pc: ProxiedCluster = serde_json::from_value(json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "ProxiedCluster",
        "metadata": {"name": "acme", "namespace": NS},
        "spec": {"targetAddress": backend.addr.to_string(),
                 "publicUrl": format!("wss://localhost:{}", server.public_addr.port())}
    }))
    .expect("pc");
    clusters
        .create(&PostParams::default(), &pc)
        .await
        .expect("create");
    let tenant_secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let (bundle_secret, _) = within(Duration::from_secs(10), "bundle rendered", async || {
        tenant_secrets
            .get_opt("acme-tether-bundle")
            .await
            .ok()
            .flatten()
    })
    .await;

    // ... is handed to the customer as its bundle; the agent runs with exactly
    // the bundle's credentials.
    let bundle = String::from_utf8(secret_data(&bundle_secret, "bundle.yaml")).expect("utf-8");
    let agent_secret: Secret = serde_yaml_ng::Deserializer::from_str(&bundle)
        .map(|doc| Value::deserialize(doc).expect("yaml"))
        .find(|doc| doc["kind"] == "Secret")
        .map(|doc| serde_json::from_value(doc).expect("Secret"))
        .expect("bundle has the agent Secret");
    let file = |key: &str| {
        write(
            dir.path(),
            &format!("agent-{key}"),
            &secret_data(&agent_secret, key),
        )
        .display()
        .to_string()
    };
    let agent = Agent::start(AgentArgs::parse_from([
        "tether-agent",
        "--server",
        &format!("wss://localhost:{}", server.public_addr.port()),
        "--token-file",
        &file("token"),
        "--server-ca-cert",
        &file("ca.crt"),
        "--client-cert",
        &file("tls.crt"),
        "--client-key",
        &file("tls.key"),
        "--target",
        &backend.addr.to_string(),
        "--ca-cert",
        &customer_ca_path.display().to_string(),
        "--sa-token-path",
        &sa_token.display().to_string(),
        "--health-addr",
        "127.0.0.1:0",
        "--max-retry",
        "1s",
        "--metrics-addr",
        "127.0.0.1:0",
        "--metrics-auth",
        "none",
    ]))
    .await
    .expect("agent");
    let (_, accepted_after) = within(FIVE_SECONDS, "server accepts the new cluster", async || {
        server.is_connected("acme").then_some(())
    })
    .await;

    // Status flows back: the connection (from the server) and AgentConnected (from the operator).
    let (pc, _) = within(FIVE_SECONDS, "connection in status", async || {
        let pc = clusters.get("acme").await.ok()?;
        (shown_connection(&pc)? == (true, "True".to_owned())).then_some(pc)
    })
    .await;
    let connection = pc
        .status
        .as_ref()
        .and_then(|s| s.connection.clone())
        .expect("connection");
    assert_eq!(
        connection.agent_version.as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(connection.replicas.as_deref(), Some("1/1"));
    let session = &pc.status.as_ref().expect("status").agent_sessions["server-0"];
    assert!(session.connected);
    assert!(
        session
            .remote_address
            .as_ref()
            .is_some_and(|r| r.starts_with("127.0.0.1:"))
    );
    assert_eq!(
        pc.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.as_str()),
        Some("True"),
        "the server's write did not clobber the operator's conditions"
    );

    // Each binary's metrics port says what an operator of the system needs.
    let scrape = async |addr: std::net::SocketAddr| {
        let output = tokio::process::Command::new("curl")
            .args(["-sf", &format!("http://{addr}/metrics")])
            .output()
            .await
            .expect("curl runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let (operator_text, _) = within(FIVE_SECONDS, "operator metrics", async || {
        let text = scrape(operator_metrics).await;
        text.contains(
            r#"tether_operator_agent_connected{cluster="acme",proxiedcluster="acme",proxiedcluster_namespace="tenants"} 1"#,
        )
        .then_some(text)
    })
    .await;
    for line in [
        "tether_operator_leader 1",
        r#"tether_operator_proxied_clusters{condition="Ready",status="True"} 1"#,
        r#"tether_operator_reconciliations_total{result="ok"}"#,
        "tether_operator_reconcile_duration_seconds_bucket",
        r#"tether_operator_agent_certificate_expiry_timestamp_seconds{cluster="acme",proxiedcluster="acme",proxiedcluster_namespace="tenants"}"#,
    ] {
        assert!(
            operator_text.contains(line),
            "{line} missing in:\n{operator_text}"
        );
    }
    let server_text = scrape(server.metrics_addr.expect("server metrics port")).await;
    assert!(server_text.contains("agents_connected 1"), "{server_text}");
    let agent_text = scrape(agent.metrics_addr.expect("agent metrics port")).await;
    assert!(agent_text.contains("agent_connected 1"), "{agent_text}");

    // ArgoCD's view: its client certificate through the internal port.
    let argocd_tls = secrets
        .get("tether-argocd-client-tls")
        .await
        .expect("ArgoCD cert");
    let answer = support::argocd_get(
        server.internal_addr,
        &dir.path().join("ca.crt"),
        &write(
            dir.path(),
            "argocd.crt",
            &secret_data(&argocd_tls, "tls.crt"),
        ),
        &write(
            dir.path(),
            "argocd.key",
            &secret_data(&argocd_tls, "tls.key"),
        ),
        "/tunnel/acme/version",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("v1.33.0-tether-fake"));

    // The agent goes away: status says so within 5 s.
    let agent_args = agent.args().clone();
    agent.shutdown().await;
    within(FIVE_SECONDS, "disconnect in status", async || {
        let pc = clusters.get("acme").await.ok()?;
        (shown_connection(&pc)? == (false, "False".to_owned())).then_some(())
    })
    .await;
    let agent = Agent::start(agent_args).await.expect("agent again");
    within(FIVE_SECONDS, "agent back", async || {
        server.is_connected("acme").then_some(())
    })
    .await;

    // Deleting the ProxiedCluster closes its session and reports it.
    clusters
        .delete("acme", &DeleteParams::default())
        .await
        .expect("delete");
    let (_, closed_after) = within(FIVE_SECONDS, "session closed after deletion", async || {
        (!server.is_connected("acme") && !agent.is_connected()).then_some(())
    })
    .await;
    eprintln!(
        "accepted {accepted_after:?} after the bundle appeared; closed {closed_after:?} after deletion"
    );
    stop.cancel();
    let _ = operator.await;
    server.shutdown().await;
}
