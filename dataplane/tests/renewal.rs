//! Agent certificate renewal over the tunnel, with real tether-server and
//! tether-agent processes and mTLS: an agent whose certificate is about to
//! expire renews it, keeps its tunnel past the old expiry, and reconnects
//! with the new certificate after the server restarts; requests for
//! another cluster's identity are refused.

mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use support::procs::{AGENT_TOKEN, Proc, World, log_file, wait_agents};
use support::{TestClient, WAIT, cluster_json};
use tether::credentials::{CA_FILE, CERT_FILE, KEY_FILE, Message, TOKEN_FILE};
use tether::mux::{Role, Session, SessionConfig};
use tether::pki::{AgentRequest, CertInfo, LeafRequest};
use tether::protocol::Version;
use tokio::net::TcpStream;

/// The agent's first certificate lives this long (issued 5 minutes
/// back-dated, so renewal is due at once).
const SHORT_LIFE: Duration = Duration::from_secs(20);

struct Renewing {
    world: World,
    server: Proc,
    dir: std::path::PathBuf,
    first: CertInfo,
}

impl Renewing {
    async fn start() -> (Self, Proc) {
        Self::start_with_life(SHORT_LIFE).await
    }

    /// As [`Renewing::start`], the agent's first certificate living `life`.
    async fn start_with_life(life: Duration) -> (Self, Proc) {
        let world = World::new().await;
        std::fs::write(world.pki.path("ca.key"), world.pki.ca.key_pem()).expect("ca key");
        let dir = world.pki.path("credentials");
        std::fs::create_dir(&dir).expect("dir");
        let issued = world
            .pki
            .ca
            .issue(&LeafRequest::agent("dev", life))
            .expect("agent certificate");
        for (name, contents) in [
            (TOKEN_FILE, AGENT_TOKEN.to_owned()),
            (CA_FILE, world.pki.ca.cert_pem().to_owned()),
            (CERT_FILE, issued.cert_pem.clone()),
            (KEY_FILE, issued.key_pem.clone()),
        ] {
            std::fs::write(dir.join(name), contents).expect("write");
        }
        let first = CertInfo::from_pem(&issued.cert_pem).expect("info");
        let server = Self::server(&world);
        let log = log_file(&world.log("agent"));
        let agent = Proc(
            Command::new(env!("CARGO_BIN_EXE_tether-agent"))
                .args(["--server", &format!("wss://localhost:{}", world.public)])
                .arg("--credentials-dir")
                .arg(&dir)
                .args(["--target", &world.backend.addr.to_string()])
                .arg("--sa-token-path")
                .arg(world.pki.path("sa-token"))
                .arg("--ca-cert")
                .arg(world.pki.path("ca.crt"))
                .args(["--health-addr", "127.0.0.1:0", "--log-level", "debug"])
                .args(["--max-retry", "1s", "--keepalive-interval", "1s"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("tether-agent starts"),
        );
        (
            Self {
                world,
                server,
                dir,
                first,
            },
            agent,
        )
    }

    /// tether-server with mTLS, signing renewals with the test CA.
    fn server(world: &World) -> Proc {
        let ca = world.pki.path("ca.crt");
        let key = world.pki.path("ca.key");
        world.server(&[
            "--tls-client-ca",
            ca.to_str().expect("utf-8"),
            "--signer-ca-cert",
            ca.to_str().expect("utf-8"),
            "--signer-ca-key",
            key.to_str().expect("utf-8"),
            "--agent-cert-duration",
            "1h",
        ])
    }

    /// ArgoCD's side, with its client certificate (mTLS on both ports).
    fn argocd(&self) -> TestClient {
        TestClient::new(
            Some(&self.world.pki.path("ca.crt")),
            Some((
                &self.world.pki.path("argocd.crt"),
                &self.world.pki.path("argocd.key"),
            )),
        )
    }

    async fn wait_connected(&self) {
        wait_agents(&self.argocd(), &self.world.metrics_url(), 1).await;
    }

    /// As [`Renewing::assert_served`], allowing the agent a moment to
    /// reconnect after its session was ended.
    async fn assert_served_soon(&self, url: &str) {
        let started = std::time::Instant::now();
        while self.argocd().get(url).await.status != StatusCode::OK {
            assert!(started.elapsed() < WAIT, "not served\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn assert_served(&self, url: &str) {
        let answer = self.argocd().get(url).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{}\n{}",
            answer.text(),
            self.logs()
        );
    }

    /// Rewrites the clusters file: cluster "dev" with `extra` fields.
    fn configure_dev(&self, token: &str, extra: serde_json::Value) {
        let mut entry = serde_json::json!({
            "id": "dev", "token": token, "targetAddr": self.world.backend.addr.to_string(),
        });
        if let (Some(entry), Some(extra)) = (entry.as_object_mut(), extra.as_object()) {
            entry.extend(extra.clone());
        }
        std::fs::write(&self.world.clusters, serde_json::json!([entry]).to_string())
            .expect("clusters");
    }

    /// Waits until `what` holds, showing the logs if it never does.
    async fn eventually(&self, what: &str, mut check: impl FnMut() -> bool) {
        let started = std::time::Instant::now();
        while !check() {
            assert!(started.elapsed() < WAIT, "never: {what}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A raw agent handshake with `token` and the identity in `cert`/`key`:
    /// the status the server answers.
    async fn handshake(
        &self,
        token: &str,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> String {
        let roots = tether::tls::load_roots(&self.world.pki.path("ca.crt")).expect("roots");
        let identity = (
            tether::tls::load_certs(cert).expect("cert"),
            tether::tls::load_key(key).expect("key"),
        );
        let config = tether::tls::client_config(roots, Some(identity)).expect("tls");
        let tcp = TcpStream::connect(("127.0.0.1", self.world.public))
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let Ok(tls) = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
        else {
            return "TLS refused".into();
        };
        let authority = format!("localhost:{}", self.world.public);
        match tether::websocket::connect(tls, &authority, "/connect", token, true, None).await {
            Ok(_) => "accepted".into(),
            Err(err) => err.to_string(),
        }
    }

    fn current(&self) -> CertInfo {
        let pem = std::fs::read_to_string(self.dir.join(CERT_FILE)).expect("tls.crt");
        CertInfo::from_pem(&pem).expect("a certificate")
    }

    fn logs(&self) -> String {
        ["server", "agent"]
            .iter()
            .map(|name| {
                format!(
                    "--- {name} ---\n{}",
                    std::fs::read_to_string(self.world.log(name)).unwrap_or_default()
                )
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_renews_over_the_tunnel_and_outlives_its_first_certificate() {
    let (env, _agent) = Renewing::start().await;
    env.wait_connected().await;
    let started = std::time::Instant::now();
    while env.current().not_after <= env.first.not_after {
        assert!(
            started.elapsed() < WAIT,
            "no renewed certificate in the credentials directory\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let renewed = env.current();
    println!(
        "renewed {:?} after the agent connected; new certificate valid until {:?}",
        started.elapsed(),
        renewed.not_after
    );
    assert_eq!(renewed.cluster.as_deref(), Some("dev"));
    assert!(renewed.not_after > SystemTime::now() + Duration::from_secs(50 * 60));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(env.dir.join(KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key is private");
    }
    // The new private key exists only in the agent's directory.
    let key = std::fs::read_to_string(env.dir.join(KEY_FILE)).expect("key");
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(key_body.len() > 40);
    let server_log = std::fs::read_to_string(env.world.log("server")).expect("log");
    let agent_log = std::fs::read_to_string(env.world.log("agent")).expect("log");
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(
            !server_log.contains(line) && !agent_log.contains(line),
            "a line of the private key is in a log"
        );
    }
    let metrics = env.argocd().get(&env.world.metrics_url()).await.text();
    assert!(
        metrics.contains("agent_certificate_requests_total{result=\"signed\"} 1"),
        "{metrics}"
    );

    // Past the first certificate's expiry the tunnel still serves.
    let expired_at = env.first.not_after + Duration::from_secs(2);
    if let Ok(wait) = expired_at.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    let url = env.world.url("/tunnel/dev/api/v1/namespaces");
    env.assert_served(&url).await;

    // A restarted server accepts only valid certificates: the agent comes
    // back with the renewed one.
    let mut env = env;
    env.server.kill();
    env.server = Renewing::server(&env.world);
    env.wait_connected().await;
    env.assert_served(&url).await;
}

/// A session of cluster "rogue", made by hand, asking for things it must
/// not get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_another_identity_or_usage_are_refused_and_counted() {
    const ROGUE_TOKEN: &str = "rogue-token-5b1d0c";
    let (env, _agent) = Renewing::start().await;
    let backend = env.world.backend.addr.to_string();
    std::fs::write(
        &env.world.clusters,
        cluster_json(&[
            ("dev", AGENT_TOKEN, &backend),
            ("rogue", ROGUE_TOKEN, &backend),
        ]),
    )
    .expect("clusters");
    env.wait_connected().await;
    let roots = tether::tls::load_roots(&env.world.pki.path("ca.crt")).expect("roots");
    let (rogue_cert, rogue_key) = env.world.pki.agent_identity("rogue");
    let identity = (
        tether::tls::load_certs(&rogue_cert).expect("cert"),
        tether::tls::load_key(&rogue_key).expect("key"),
    );
    let config = tether::tls::client_config(roots, Some(identity)).expect("tls");
    let session = loop {
        let tcp = TcpStream::connect(("127.0.0.1", env.world.public))
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config.clone()))
            .connect(name, tcp)
            .await
            .expect("tls");
        let authority = format!("localhost:{}", env.world.public);
        // The clusters file is reloaded within a second.
        match tether::websocket::connect(tls, &authority, "/connect", ROGUE_TOKEN, true, None).await
        {
            Ok((socket, Version::V2, _)) => {
                break Session::start(
                    socket,
                    SessionConfig::new(Version::V2, Role::Acceptor, "rogue"),
                )
                .0;
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let mut answers = session.take_credentials().expect("receiver");
    let mut ask = async |payload: bytes::Bytes| {
        session.send_credentials(payload);
        let answer = tokio::time::timeout(WAIT, answers.recv())
            .await
            .expect("answered")
            .expect("message");
        Message::decode(&answer).expect("decodes")
    };
    let (for_dev, _) = AgentRequest::create("dev").expect("csr");
    let answer = ask(Message::CertificateRequest { csr: for_dev }.encode()).await;
    assert!(
        matches!(&answer, Message::Refused { reason } if reason.contains("identity \"dev\"")),
        "{answer:?}"
    );
    let answer = ask(bytes::Bytes::from_static(
        b"{\"kind\":\"certificate\",\"certificate\":\"x\"}",
    ))
    .await;
    assert!(matches!(answer, Message::Refused { .. }), "{answer:?}");
    let answer = ask(bytes::Bytes::from_static(b"\x00garbage")).await;
    assert!(
        matches!(&answer, Message::Refused { reason } if reason.contains("malformed")),
        "{answer:?}"
    );
    let metrics = env.argocd().get(&env.world.metrics_url()).await.text();
    assert!(
        metrics.contains("agent_certificate_requests_total{result=\"refused\"} 1")
            && metrics.contains("agent_certificate_requests_total{result=\"malformed\"} 2"),
        "{metrics}"
    );
    // "dev" is untouched, and still served.
    let answer = env
        .argocd()
        .get(&env.world.url("/tunnel/dev/api/v1/namespaces"))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
}

fn rfc3339(at: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(at)
        .expect("time")
        .to_string()
}

/// The operator rotated the token: tether-server hands the new one to the
/// agent, which stores it and reconnects with it; the old token works for
/// the overlap only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_reaches_the_agent_and_the_old_one_expires() {
    const NEW_TOKEN: &str = "rotated-token-0c8e51a9";
    let (env, _agent) = Renewing::start_with_life(Duration::from_secs(3600)).await;
    env.wait_connected().await;
    // Requests all along: the switch to the new token fails none.
    let url = env.world.url("/tunnel/dev/api/v1/namespaces");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let (client, url, stop) = (env.argocd(), url.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut sent, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let answer = client.get(&url).await;
                sent += 1;
                if answer.status != StatusCode::OK {
                    failed.push(format!("{}: {}", answer.status, answer.text()));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (sent, failed)
        })
    };
    let until = SystemTime::now() + Duration::from_secs(6);
    env.configure_dev(
        NEW_TOKEN,
        serde_json::json!({
            "previousTokenSha256": hex::encode(tether::clusters::token_sha256(AGENT_TOKEN)),
            "previousTokenExpires": rfc3339(until),
            "pendingToken": NEW_TOKEN,
        }),
    );
    let token_file = env.dir.join(TOKEN_FILE);
    env.eventually("the agent stored the new token", || {
        std::fs::read_to_string(&token_file).is_ok_and(|t| t == NEW_TOKEN)
    })
    .await;
    // The agent reconnected with the new token (a server replaced the
    // session: the log says so).
    env.eventually("the agent reconnected with the new token", || {
        std::fs::read_to_string(env.world.log("server"))
            .is_ok_and(|log| log.matches("agent connected").count() >= 2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, failed) = probe.await.expect("probe");
    println!(
        "{sent} requests across the token switch, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}\n{}", env.logs());
    let (cert, key) = (env.dir.join(CERT_FILE), env.dir.join(KEY_FILE));
    assert_eq!(
        env.handshake(AGENT_TOKEN, &cert, &key).await,
        "accepted",
        "within the overlap"
    );
    if let Ok(left) = (until + Duration::from_secs(1)).duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    let refused = env.handshake(AGENT_TOKEN, &cert, &key).await;
    assert!(refused.contains("401"), "after the overlap: {refused}");
    env.assert_served(&url).await;
    let logs = env.logs();
    let leaks: Vec<&str> = logs.lines().filter(|l| l.contains(NEW_TOKEN)).collect();
    assert!(leaks.is_empty(), "the token is never logged: {leaks:#?}");
}

/// A requested certificate rotation: every replica asks, the agent renews
/// once with a new key; once the rotation is complete, the old certificate
/// is refused while the agent carries on with the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_rotation_replaces_the_certificate_and_retires_the_old_one() {
    let (env, _agent) = Renewing::start_with_life(Duration::from_secs(3600)).await;
    env.wait_connected().await;
    // Keep the first identity, to knock with it later.
    let old_cert = env.world.pki.path("old.crt");
    let old_key = env.world.pki.path("old.key");
    std::fs::copy(env.dir.join(CERT_FILE), &old_cert).expect("copy");
    std::fs::copy(env.dir.join(KEY_FILE), &old_key).expect("copy");
    // Validity times have one-second resolution: a certificate issued in
    // the second of the request cannot be told from one issued after it
    // (both are kept, so the agent is never cut off). Ask a second later.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // In whole seconds, as the operator records it (status times).
    let requested = SystemTime::UNIX_EPOCH
        + Duration::from_secs(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs(),
        );
    env.configure_dev(
        AGENT_TOKEN,
        serde_json::json!({"certificateRotation": "leak-1"}),
    );
    env.eventually("the agent renewed for the rotation", || {
        env.current().fingerprint != env.first.fingerprint
    })
    .await;
    // What the operator writes once it signed after the request.
    env.configure_dev(
        AGENT_TOKEN,
        serde_json::json!({"certificatesNotBefore": rfc3339(requested - tether::pki::BACKDATE)}),
    );
    // Once the server has the configuration (reloaded within a second), the
    // old certificate is refused.
    let started = std::time::Instant::now();
    loop {
        let answer = env.handshake(AGENT_TOKEN, &old_cert, &old_key).await;
        if answer.contains("403") {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "the old certificate still works: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The agent's sessions with the old certificate were ended; it is back
    // with the new one.
    env.wait_connected().await;
    let url = env.world.url("/tunnel/dev/api/v1/namespaces");
    env.assert_served_soon(&url).await;
    let (cert, key) = (env.dir.join(CERT_FILE), env.dir.join(KEY_FILE));
    assert_eq!(env.handshake(AGENT_TOKEN, &cert, &key).await, "accepted");
    let metrics = env.argocd().get(&env.world.metrics_url()).await.text();
    assert!(
        metrics.contains("agent_certificate_requests_total{result=\"signed\"} 1"),
        "renewed once however often asked: {metrics}"
    );
    assert!(
        metrics
            .contains("auth_failures_total{endpoint=\"connect\",reason=\"retired_certificate\"}"),
        "the old certificate's refusals are counted by reason: {metrics}"
    );
}
