//! The real Controller, finalizer and event Recorder against the in-memory
//! API server: every reconcile branch end to end.

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tether::pki::{CertInfo, CertificateAuthority, LeafRequest};
use tether_operator::crd::ProxiedCluster;
use tether_operator::fake_api::FakeApi;
use tether_operator::settings::Settings;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const NS: &str = "tenants";

struct Operator {
    api: FakeApi,
    client: Client,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

fn settings() -> Settings {
    let mut settings = Settings::defaults();
    settings.health_addr = "127.0.0.1:0".parse().expect("addr");
    settings.public_url = Some("wss://tether.example.com:8443".into());
    settings.leader_election = false;
    settings
}

async fn start_with(settings: Settings) -> Operator {
    tether::install_crypto_provider();
    // RUST_LOG=debug shows the operator's own logs for a failing test.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let api = FakeApi::start().await.expect("fake API");
    let client = api.client();
    let stop = CancellationToken::new();
    let task = tokio::spawn(tether_operator::run(client.clone(), settings, stop.clone()));
    Operator {
        api,
        client,
        stop,
        task,
    }
}

async fn start() -> Operator {
    start_with(settings()).await
}

fn proxied(name: &str, spec: Value) -> ProxiedCluster {
    serde_json::from_value(json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "ProxiedCluster",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }))
    .expect("valid ProxiedCluster")
}

impl Operator {
    fn clusters(&self) -> Api<ProxiedCluster> {
        Api::namespaced(self.client.clone(), NS)
    }

    async fn create(&self, name: &str, spec: Value) {
        self.clusters()
            .create(&PostParams::default(), &proxied(name, spec))
            .await
            .expect("create");
    }

    /// Waits until `check` holds for the named ProxiedCluster.
    async fn wait_for(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&ProxiedCluster) -> bool,
    ) -> ProxiedCluster {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(Some(pc)) = self.clusters().get_opt(name).await
                && check(&pc)
            {
                return pc;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {name}: {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_ready(&self, name: &str) -> ProxiedCluster {
        self.wait_for(name, "Ready", |pc| {
            condition(pc, "Ready").is_some_and(|(s, _)| s == "True")
        })
        .await
    }

    fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        self.api
            .get(&format!("/api/v1/namespaces/{namespace}/secrets/{name}"))
            .map(|v| serde_json::from_value(v).expect("Secret"))
    }

    fn clusters_config(&self) -> Vec<Value> {
        let secret = self
            .secret("tether-system", "tether-clusters")
            .expect("clusters Secret");
        serde_json::from_slice(&secret.data.expect("data")["clusters.json"].0).expect("JSON")
    }

    fn events(&self) -> Vec<String> {
        self.api
            .list("/apis/events.k8s.io/v1/events", Some(NS))
            .iter()
            .filter_map(|e| e["reason"].as_str().map(str::to_owned))
            .collect()
    }
}

fn condition(pc: &ProxiedCluster, type_: &str) -> Option<(String, String)> {
    pc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// The Ready condition's message.
fn ready_message(pc: ProxiedCluster) -> String {
    pc.status
        .expect("status")
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready")
        .message
}

fn reason(pc: &ProxiedCluster, type_: &str) -> String {
    condition(pc, type_).map(|(_, r)| r).unwrap_or_default()
}

fn data(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().expect("data")[key].0.clone()).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_reconcile_creates_everything() {
    let op = start().await;
    op.create(
        "customer-a",
        json!({"argocd": {"project": "customers", "labels": {"tier": "gold"}}}),
    )
    .await;
    let pc = op.wait_ready("customer-a").await;

    let status = pc.status.clone().expect("status");
    assert_eq!(status.cluster_id.as_deref(), Some("customer-a"));
    assert_eq!(status.observed_generation, Some(1));
    for type_ in [
        "TokenIssued",
        "CertificatesIssued",
        "ArgoCDRegistered",
        "BundleReady",
    ] {
        assert_eq!(
            condition(&pc, type_).map(|c| c.0),
            Some("True".into()),
            "{type_}"
        );
    }
    assert_eq!(
        condition(&pc, "AgentConnected"),
        Some(("False".into(), "NeverConnected".into()))
    );
    assert!(
        status
            .certificates
            .and_then(|c| c.agent_not_after)
            .is_some()
    );

    // Token: owned, 32 random bytes; the server side has only its hash.
    let token_secret = op
        .secret(NS, "customer-a-tether-token")
        .expect("token Secret");
    let token = data(&token_secret, "token");
    assert_eq!(token.len(), 64);
    let owner = &token_secret
        .metadata
        .owner_references
        .clone()
        .expect("owned")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("ProxiedCluster", "customer-a", Some(true))
    );
    let config = op.clusters_config();
    assert_eq!(
        config,
        [
            json!({"id": "customer-a", "tokenSha256": hex::encode(Sha256::digest(token.as_bytes())),
        "targetAddr": "kubernetes.default.svc:443", "resource": "tenants/customer-a"})
        ]
    );
    let parsed = tether::clusters::Clusters::parse(&serde_json::to_string(&config).expect("json"))
        .expect("server accepts it");
    assert_eq!(
        parsed
            .authenticate(
                &tether::clusters::token_sha256(&token),
                std::time::SystemTime::now()
            )
            .map(|(c, _)| c.id.as_str()),
        Some("customer-a")
    );
    assert!(
        !serde_json::to_string(&config)
            .expect("json")
            .contains(&token),
        "no token in the server config"
    );

    // ArgoCD cluster Secret in ArgoCD's namespace.
    let argocd = op
        .secret("argocd", "tether-customer-a")
        .expect("ArgoCD Secret");
    let labels = argocd.metadata.labels.clone().expect("labels");
    assert_eq!(labels["argocd.argoproj.io/secret-type"], "cluster");
    assert_eq!(labels["tier"], "gold");
    assert_eq!(
        data(&argocd, "server"),
        "https://tether-server-internal.tether-system.svc:8080/tunnel/customer-a"
    );
    assert_eq!(data(&argocd, "project"), "customers");
    let config: Value = serde_json::from_str(&data(&argocd, "config")).expect("config JSON");
    assert_eq!(config["tlsClientConfig"]["insecure"], false);
    let argocd_tls = op
        .secret("tether-system", "tether-argocd-client-tls")
        .expect("ArgoCD client cert");
    assert_eq!(
        config["tlsClientConfig"]["certData"],
        STANDARD.encode(data(&argocd_tls, "tls.crt"))
    );

    // Bundle: stored, hashed, holding the token and the agent certificate.
    let bundle_secret = op
        .secret(NS, "customer-a-tether-bundle")
        .expect("bundle Secret");
    let bundle = data(&bundle_secret, "bundle.yaml");
    let bundle_ref = status.bundle.expect("bundle ref");
    assert!(bundle.contains(&format!(
        "sha256 of the non-comment lines: {}",
        bundle_ref.sha256
    )));
    assert!(bundle.contains("--server=wss://tether.example.com:8443"));
    assert!(
        bundle.contains(&STANDARD.encode(&token)),
        "token in the bundle's Secret"
    );

    // Shared PKI in the operator namespace.
    for name in ["tether-ca", "tether-server-tls", "tether-argocd-client-tls"] {
        assert!(op.secret("tether-system", name).is_some(), "{name}");
    }
    let events = op.events();
    for reason in [
        "TokenIssued",
        "CertificateIssued",
        "ArgoCDRegistered",
        "BundleRendered",
    ] {
        assert!(
            events.iter().any(|e| e == reason),
            "event {reason} in {events:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_reconcile_writes_nothing() {
    let op = start().await;
    op.create("quiet", json!({})).await;
    op.wait_ready("quiet").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    op.api.clear_calls();
    // Any change to the object triggers a reconcile; a label does not
    // change what the operator produces.
    let patch = json!({"metadata": {"labels": {"poke": "1"}}});
    op.clusters()
        .patch("quiet", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("poke");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let writes = op.api.writes();
    assert_eq!(writes.len(), 1, "only the test's own write: {writes:?}");
    assert!(
        op.api
            .calls()
            .iter()
            .any(|c| c.path.ends_with("/secrets/quiet-tether-token")),
        "it did reconcile"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_changes_the_token_and_nothing_else() {
    let op = start().await;
    op.create("rotating", json!({})).await;
    let before = op.wait_ready("rotating").await;
    let token_before = data(
        &op.secret(NS, "rotating-tether-token").expect("token"),
        "token",
    );
    let cert_before = data(
        &op.secret(NS, "rotating-tether-agent-tls").expect("cert"),
        "tls.crt",
    );
    let argocd_before = op
        .secret("argocd", "tether-rotating")
        .expect("argocd")
        .metadata
        .resource_version;
    let patch = json!({"spec": {"tokenRotation": "2026-11-24"}});
    op.clusters()
        .patch("rotating", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("rotate");
    let after = op
        .wait_for("rotating", "rotated", |pc| {
            pc.status.as_ref().and_then(|s| s.token_rotation.as_deref()) == Some("2026-11-24")
        })
        .await;
    let token_after = data(
        &op.secret(NS, "rotating-tether-token").expect("token"),
        "token",
    );
    assert_ne!(token_before, token_after);
    assert_eq!(
        cert_before,
        data(
            &op.secret(NS, "rotating-tether-agent-tls").expect("cert"),
            "tls.crt"
        ),
        "certificate kept"
    );
    assert_eq!(
        argocd_before,
        op.secret("argocd", "tether-rotating")
            .expect("argocd")
            .metadata
            .resource_version,
        "ArgoCD untouched"
    );
    let new_sha256 = hex::encode(Sha256::digest(token_after.as_bytes()));
    let entry = op.clusters_config()[0].clone();
    assert_eq!(entry["tokenSha256"], new_sha256.as_str());
    // The overlap: the previous token still accepted, the new one to hand
    // over through the tunnel.
    assert_eq!(
        entry["previousTokenSha256"],
        hex::encode(Sha256::digest(token_before.as_bytes())).as_str()
    );
    assert_eq!(entry["pendingToken"], token_after.as_str());
    assert!(entry["previousTokenExpires"].is_string());
    assert!(
        after
            .status
            .as_ref()
            .and_then(|s| s.token_overlap_until.as_ref())
            .is_some()
    );
    assert_ne!(
        before.status.and_then(|s| s.bundle).map(|b| b.sha256),
        after.status.and_then(|s| s.bundle).map(|b| b.sha256)
    );
    assert!(op.events().iter().any(|e| e == "TokenRotated"));

    // A replica reports the agent connected with the new token: the
    // overlap ends, and the token leaves the server's configuration.
    let session = json!({"status": {"agentSessions": {"replica-0": {
        "connected": true,
        "lastSeen": k8s_openapi::jiff::Timestamp::now().to_string(),
        "tokenSha256Prefix": &new_sha256[..12],
    }}}});
    op.clusters()
        .patch_status("rotating", &PatchParams::default(), &Patch::Merge(&session))
        .await
        .expect("report");
    op.wait_for("rotating", "overlap ended", |pc| {
        pc.status
            .as_ref()
            .is_some_and(|s| s.token_overlap_until.is_none())
    })
    .await;
    let entry = op.clusters_config()[0].clone();
    assert!(entry.get("pendingToken").is_none(), "{entry}");
    assert!(entry.get("previousTokenSha256").is_none(), "{entry}");
    assert!(op.events().iter().any(|e| e == "TokenRotationConfirmed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_rotation_is_asked_of_the_agent_until_a_renewal_is_signed() {
    let op = start().await;
    op.create("leaky", json!({})).await;
    op.wait_ready("leaky").await;
    let patch = json!({"spec": {"certificates": {"rotation": "leak-2026-12"}}});
    op.clusters()
        .patch("leaky", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("rotate");
    op.wait_for("leaky", "rotation pending", |pc| {
        pc.status
            .as_ref()
            .and_then(|s| s.certificates.as_ref())
            .is_some_and(|c| c.rotation_pending.as_deref() == Some("leak-2026-12"))
    })
    .await;
    assert_eq!(
        op.clusters_config()[0]["certificateRotation"],
        "leak-2026-12"
    );
    // The signer records a renewal it signed after the request.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let signed = json!({"status": {"certificates": {
        "lastSigned": k8s_openapi::jiff::Timestamp::now().to_string(),
    }}});
    op.clusters()
        .patch_status("leaky", &PatchParams::default(), &Patch::Merge(&signed))
        .await
        .expect("signed");
    let done = op
        .wait_for("leaky", "rotation done", |pc| {
            pc.status
                .as_ref()
                .and_then(|s| s.certificates.as_ref())
                .is_some_and(|c| c.rotation.as_deref() == Some("leak-2026-12"))
        })
        .await;
    let certificates = done
        .status
        .and_then(|s| s.certificates)
        .expect("certificates");
    assert_eq!(certificates.rotation_pending, None);
    let entry = op.clusters_config()[0].clone();
    assert!(entry.get("certificateRotation").is_none(), "{entry}");
    assert!(entry["certificatesNotBefore"].is_string(), "{entry}");
    let events = op.events();
    for reason in ["CertificateRotationRequested", "CertificateRotated"] {
        assert!(events.iter().any(|e| e == reason), "{reason}: {events:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_near_expiry_are_renewed() {
    let op = start().await;
    op.create(
        "renewing",
        json!({"certificates": {"agentDuration": "24h"}}),
    )
    .await;
    op.wait_ready("renewing").await;
    // Swap in a certificate from the same CA, for the same request, that is
    // two thirds through its life in two seconds.
    let ca_secret = op.secret("tether-system", "tether-ca").expect("CA");
    let ca =
        CertificateAuthority::from_pem(&data(&ca_secret, "tls.crt"), &data(&ca_secret, "tls.key"))
            .expect("CA");
    let old = ca
        .issue(&LeafRequest::agent("renewing", Duration::from_secs(3)))
        .expect("leaf");
    let secrets: Api<Secret> = Api::namespaced(op.client.clone(), NS);
    let mut current = secrets
        .get("renewing-tether-agent-tls")
        .await
        .expect("cert Secret");
    let data_map = current.data.as_mut().expect("data");
    data_map.insert(
        "tls.crt".into(),
        k8s_openapi::ByteString(old.cert_pem.clone().into_bytes()),
    );
    data_map.insert(
        "tls.key".into(),
        k8s_openapi::ByteString(old.key_pem.clone().into_bytes()),
    );
    secrets
        .replace(
            "renewing-tether-agent-tls",
            &PostParams::default(),
            &current,
        )
        .await
        .expect("replace");
    let renewed = op
        .wait_for("renewing", "renewed", |pc| {
            pc.status
                .as_ref()
                .and_then(|s| s.certificates.as_ref())
                .and_then(|c| c.agent_not_after.as_ref())
                .is_some_and(|t| {
                    SystemTime::from(t.0) > SystemTime::now() + Duration::from_secs(3600 * 20)
                })
                && data(
                    &op.secret(NS, "renewing-tether-agent-tls").expect("cert"),
                    "tls.crt",
                ) != old.cert_pem
        })
        .await;
    assert_eq!(
        condition(&renewed, "CertificatesIssued").map(|c| c.0),
        Some("True".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brought_certificates_are_used_instead_of_the_ca() {
    let op = start().await;
    let byo_ca = CertificateAuthority::generate("cert-manager CA", Duration::from_secs(3600 * 24))
        .expect("CA");
    let issued = byo_ca
        .issue(&LeafRequest::agent("byo", Duration::from_secs(3600 * 24)))
        .expect("leaf");
    let secrets: Api<Secret> = Api::namespaced(op.client.clone(), NS);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "byo-agent-cert"}, "type": "kubernetes.io/tls",
        "data": {"tls.crt": STANDARD.encode(&issued.cert_pem), "tls.key": STANDARD.encode(&issued.key_pem),
                 "ca.crt": STANDARD.encode(byo_ca.cert_pem())}
    }))
    .expect("secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create");
    op.create(
        "byo",
        json!({"certificates": {"agentSecretRef": {"name": "byo-agent-cert"}}}),
    )
    .await;
    op.wait_ready("byo").await;
    assert!(
        op.secret(NS, "byo-tether-agent-tls").is_none(),
        "nothing issued from the operator CA"
    );
    let bundle = data(
        &op.secret(NS, "byo-tether-bundle").expect("bundle"),
        "bundle.yaml",
    );
    assert!(
        bundle.contains(&STANDARD.encode(&issued.cert_pem)),
        "the brought certificate is in the bundle"
    );

    op.create(
        "byo-missing",
        json!({"certificates": {"agentSecretRef": {"name": "nope"}}}),
    )
    .await;
    let pc = op
        .wait_for("byo-missing", "not ready", |pc| {
            condition(pc, "Ready").is_some_and(|(s, _)| s == "False")
        })
        .await;
    assert_eq!(
        condition(&pc, "CertificatesIssued"),
        Some(("False".into(), "SecretInvalid".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_cleans_up_across_namespaces() {
    let op = start().await;
    op.create("leaving", json!({})).await;
    op.create("staying", json!({})).await;
    op.wait_ready("leaving").await;
    op.wait_ready("staying").await;
    op.clusters()
        .delete("leaving", &DeleteParams::default())
        .await
        .expect("delete");
    let deadline = tokio::time::Instant::now() + WAIT;
    while op
        .clusters()
        .get_opt("leaving")
        .await
        .expect("get")
        .is_some()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "finalizer never completed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        op.secret("argocd", "tether-leaving").is_none(),
        "ArgoCD Secret removed"
    );
    for owned in [
        "leaving-tether-token",
        "leaving-tether-agent-tls",
        "leaving-tether-bundle",
    ] {
        assert!(op.secret(NS, owned).is_none(), "{owned} garbage-collected");
    }
    let ids: Vec<Value> = op
        .clusters_config()
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(ids, [json!("staying")]);
    assert!(op.secret("argocd", "tether-staying").is_some());
    assert!(op.events().iter().any(|e| e == "Deleted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_get_a_readable_false_condition() {
    let op = start().await;
    op.create("bad-url", json!({"publicUrl": "https://not-a-websocket"}))
        .await;
    let pc = op
        .wait_for("bad-url", "invalid", |pc| {
            reason(pc, "Ready") == "InvalidSpec"
        })
        .await;
    let message = ready_message(pc);
    assert!(message.contains("not ws(s)://"), "{message}");

    op.create(
        "bad-duration",
        json!({"certificates": {"agentDuration": "10m"}}),
    )
    .await;
    op.wait_for("bad-duration", "invalid", |pc| {
        reason(pc, "Ready") == "InvalidSpec"
    })
    .await;

    op.create("first", json!({"clusterId": "shared-id"})).await;
    op.wait_ready("first").await;
    op.create("second", json!({"clusterId": "shared-id"})).await;
    let pc = op
        .wait_for("second", "duplicate", |pc| {
            reason(pc, "Ready") == "InvalidSpec"
        })
        .await;
    let message = ready_message(pc);
    assert!(
        message.contains("already used by tenants/first"),
        "{message}"
    );
    assert!(op.events().iter().any(|e| e == "InvalidSpec"));
    // Nothing was issued for invalid objects.
    assert!(op.secret(NS, "second-tether-token").is_none());
    assert_eq!(op.clusters_config().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_and_server_errors_are_retried() {
    let op = start().await;
    // A conflict on a Secret and a server error on the status: each costs
    // one retry (5 s, then 10 s), and the object still converges.
    op.api.fail_next_writes("/secrets", &[409]);
    op.api.fail_next_writes("/status", &[500]);
    op.create("flaky", json!({})).await;
    op.wait_ready("flaky").await;
    assert_eq!(op.clusters_config().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clusters_share_one_server_config_without_losing_entries() {
    let op = start().await;
    for i in 0..20 {
        op.create(&format!("c{i:02}"), json!({})).await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let config = op
            .secret("tether-system", "tether-clusters")
            .map(|_| op.clusters_config())
            .unwrap_or_default();
        if config.len() == 20 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} entries",
            config.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_certificates_verify_with_rustls() {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let op = start().await;
    op.create("verify", json!({})).await;
    op.wait_ready("verify").await;
    let ca_pem = data(
        &op.secret("tether-system", "tether-ca").expect("CA"),
        "tls.crt",
    );
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("pem"))
        .expect("root");
    let roots = std::sync::Arc::new(roots);
    let der = |namespace: &str, name: &str| {
        let pem = data(&op.secret(namespace, name).expect(name), "tls.crt");
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem")
    };
    let clients = rustls::server::WebPkiClientVerifier::builder(roots.clone())
        .build()
        .expect("client verifier");
    for (namespace, name) in [
        (NS, "verify-tether-agent-tls"),
        ("tether-system", "tether-argocd-client-tls"),
    ] {
        clients
            .verify_client_cert(&der(namespace, name), &[], UnixTime::now())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let agent_info = CertInfo::from_pem(&data(
        &op.secret(NS, "verify-tether-agent-tls").expect("cert"),
        "tls.crt",
    ))
    .expect("info");
    assert_eq!(agent_info.cluster.as_deref(), Some("verify"));
    let servers = rustls::client::WebPkiServerVerifier::builder(roots)
        .build()
        .expect("server verifier");
    for host in [
        "tether-server-internal.tether-system.svc",
        "tether-server.tether-system.svc.cluster.local",
        "tether.example.com",
    ] {
        servers
            .verify_server_cert(
                &der("tether-system", "tether-server-tls"),
                &[],
                &ServerName::try_from(host).expect("name"),
                &[],
                UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("server cert for {host}: {e}"));
    }
    // Key usage is right: the agent's client certificate is no server certificate.
    let misuse = servers.verify_server_cert(
        &der(NS, "verify-tether-agent-tls"),
        &[],
        &ServerName::try_from("verify").expect("name"),
        &[],
        UnixTime::now(),
    );
    assert!(misuse.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_reconciles_and_a_successor_takes_over() {
    let mut leader_settings = settings();
    leader_settings.leader_election = true;
    leader_settings.lease_duration = Duration::from_secs(2);
    leader_settings.identity = Some("replica-a".into());
    let op = start_with(leader_settings.clone()).await;
    op.create("led", json!({})).await;
    op.wait_ready("led").await;
    let lease = op
        .api
        .get("/apis/coordination.k8s.io/v1/namespaces/tether-system/leases/tether-operator")
        .expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "replica-a");

    // A second replica waits while the first holds the lease.
    let mut second = leader_settings;
    second.identity = Some("replica-b".into());
    let stop_b = CancellationToken::new();
    let replica_b = tokio::spawn(tether_operator::run(
        op.client.clone(),
        second,
        stop_b.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lease = op
        .api
        .get("/apis/coordination.k8s.io/v1/namespaces/tether-system/leases/tether-operator")
        .expect("lease");
    assert_eq!(
        lease["spec"]["holderIdentity"], "replica-a",
        "no takeover while renewed"
    );

    // The first stops; the second takes over after the lease expires and reconciles.
    op.stop.cancel();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let lease = op
            .api
            .get("/apis/coordination.k8s.io/v1/namespaces/tether-system/leases/tether-operator")
            .expect("lease");
        if lease["spec"]["holderIdentity"] == "replica-b" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica-b never became leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    op.create("after-failover", json!({})).await;
    op.wait_ready("after-failover").await;
    stop_b.cancel();
    let _ = replica_b.await;
}
