//! tether-server and tether-agent end to end on 127.0.0.1: real TLS, real
//! WebSocket, the kube-apiserver double behind the agent.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use support::{Env, Security, TestClient, WAIT, cluster_json, eventually};
use tether::agent::{Agent, AgentError};
use tether::protocol::{Frame, FrameType};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_and_strips_every_caller_credential() {
    let env = Env::start(Security::Mtls).await;
    let _agent = env.connected_agent().await;
    let url = format!(
        "{}/tunnel/dev/echo/a%2Fb?q=%20x&labelSelector=app%3Dweb",
        env.internal_url()
    );
    let answer = env
        .argocd()
        .get_with(
            &url,
            &[
                ("authorization", "Bearer caller-secret-token"),
                ("proxy-authorization", "Basic caller-secret-basic"),
                ("impersonate-user", "system:admin"),
                ("impersonate-group", "system:masters"),
                ("x-remote-user", "admin"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "hop-value"),
                ("accept", "application/json"),
            ],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let echo = answer.json();
    assert_eq!(
        echo["pathAndQuery"],
        "/echo/a%2Fb?q=%20x&labelSelector=app%3Dweb"
    );
    let seen = env.backend.seen();
    let last = seen.last().expect("backend saw the request");
    assert!(
        last.authorized,
        "the agent's ServiceAccount token was injected"
    );
    for (name, value) in &last.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(
            !value.contains("caller-secret"),
            "{name} leaked a caller credential"
        );
        assert!(
            !name.as_str().starts_with("impersonate-"),
            "{name} forwarded"
        );
        assert!(!name.as_str().starts_with("x-remote-"), "{name} forwarded");
        assert_ne!(name.as_str(), "x-hop", "Connection-named header forwarded");
    }
    assert_eq!(
        last.headers.get("accept").map(|v| v.as_bytes()),
        Some(&b"application/json"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonation_passes_only_when_allowed() {
    let env = Env::start_with(Security::Plain, &["--allow-impersonation"]).await;
    let _agent = env.connected_agent().await;
    let url = format!("{}/tunnel/dev/echo", env.internal_url());
    let answer = env
        .argocd()
        .get_with(&url, &[("impersonate-user", "dev-user")])
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen = env.backend.seen();
    assert_eq!(
        seen.last()
            .and_then(|r| r.headers.get("impersonate-user"))
            .map(|v| v.as_bytes()),
        Some(&b"dev-user"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_service_account_token_is_followed() {
    let env = Env::start(Security::Tls).await;
    let _agent = env.connected_agent().await;
    let client = env.argocd();
    let url = format!("{}/tunnel/dev/api/v1/namespaces", env.internal_url());
    assert_eq!(client.get(&url).await.status, StatusCode::OK);
    // The agent reads its token again once the one in hand is a second
    // old: within that second the old token (still valid in a real
    // cluster) is used.
    // Rotate: the backend now only accepts the new token.
    std::fs::write(&env.sa_token, "agent-sa-token-2").expect("rotate");
    eventually(
        async || client.get(&url).await.status == StatusCode::OK,
        "the rotated token is used",
    )
    .await;
    let answer = client.get(&url).await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "rotated token used: {}",
        answer.text()
    );
    // An unreadable token is a clear error, not a forwarded anonymous request.
    std::fs::remove_file(&env.sa_token).expect("remove");
    eventually(
        async || client.get(&url).await.status == StatusCode::BAD_GATEWAY,
        "the removed token is noticed",
    )
    .await;
    let answer = client.get(&url).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(
        answer
            .text()
            .contains("cannot read its ServiceAccount token"),
        "{}",
        answer.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_agent_tokens_are_refused_and_counted() {
    let env = Env::start(Security::Tls).await;
    let _bad = env.agent("dev", "not-the-token", &[]).await;
    eventually(
        async || {
            env.server()
                .metrics_text()
                .contains("auth_failures_total{endpoint=\"connect\",reason=\"token\"}")
        },
        "failure counted",
    )
    .await;
    assert!(!env.server().is_connected("dev"));
    // A raw client with a wrong token gets 401.
    let client = TestClient::new(Some(&env.pki.path("ca.crt")), None);
    let answer = client
        .get_with(
            &format!("{}/connect", env.public_url()),
            &[("authorization", "Bearer nope")],
        )
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let answer = client.get(&format!("{}/connect", env.public_url())).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "no token at all");
    // A right token without a WebSocket upgrade is a bad request, not a session.
    let answer = client
        .get_with(
            &format!("{}/connect", env.public_url()),
            &[("authorization", "Bearer dev-token")],
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_disconnected_clusters_get_the_same_502() {
    let env = Env::start(Security::Plain).await;
    let client = env.argocd();
    let unknown = client
        .get(&format!(
            "{}/tunnel/secret-customer-x/api",
            env.internal_url()
        ))
        .await;
    let disconnected = client
        .get(&format!("{}/tunnel/dev/api", env.internal_url()))
        .await;
    assert_eq!(unknown.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        unknown.body, disconnected.body,
        "no way to tell unknown from disconnected"
    );
    assert!(!unknown.text().contains("secret-customer-x"));
    assert!(!disconnected.text().contains("dev"));
    // Metrics do not grow a label per unknown id.
    assert!(!env.server().metrics_text().contains("secret-customer-x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_and_port_separation() {
    let env = Env::start(Security::Plain).await;
    let client = env.argocd();
    let internal = env.internal_url();
    let public = env.public_url();
    assert_eq!(
        client.get(&format!("{internal}/healthz")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        client.get(&format!("{public}/healthz")).await.status,
        StatusCode::OK
    );
    // Ready without agents: a replica without sessions serves every
    // cluster through its peers, and agents reach it only once it is ready.
    assert_eq!(
        client.get(&format!("{internal}/readyz")).await.status,
        StatusCode::OK
    );
    let agent = env.connected_agent().await;
    let metrics = client.get(&env.metrics_url()).await;
    assert!(
        metrics.text().contains("agents_connected 1"),
        "{}",
        metrics.text()
    );
    // Metrics have their own port: neither tunnel port serves them.
    assert_eq!(
        client.get(&format!("{internal}/metrics")).await.status,
        StatusCode::NOT_FOUND
    );
    for path in ["/tunnel/dev/api", "/metrics", "/readyz"] {
        assert_eq!(
            client.get(&format!("{public}{path}")).await.status,
            StatusCode::NOT_FOUND,
            "public {path}"
        );
    }
    assert_eq!(
        client.get(&format!("{internal}/connect")).await.status,
        StatusCode::NOT_FOUND
    );

    let health = format!("http://{}", agent.health_addr);
    assert_eq!(
        client.get(&format!("{health}/healthz")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        client.get(&format!("{health}/readyz")).await.status,
        StatusCode::OK
    );
    let agent_metrics = format!(
        "http://{}/metrics",
        agent.metrics_addr.expect("metrics port")
    );
    let agent_metrics = client.get(&agent_metrics).await.text();
    assert!(
        agent_metrics.contains("agent_connected 1"),
        "{agent_metrics}"
    );
    assert_eq!(
        client.get(&format!("{health}/metrics")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        client.get(&format!("{health}/tunnel/dev")).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_targets_other_than_its_own() {
    let env = Env::start(Security::Plain).await;
    // The server (or someone who took it over) asks for another address.
    std::fs::write(
        &env.clusters_file,
        cluster_json(&[("dev", "dev-token", "10.0.0.1:22")]),
    )
    .expect("write");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let agent = env.connected_agent().await;
    let answer = env
        .argocd()
        .get(&format!("{}/tunnel/dev/api", env.internal_url()))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(
        answer.text().contains("target not allowed"),
        "{}",
        answer.text()
    );
    assert_eq!(agent.metrics.upstream_errors.get(), 1);
    assert!(env.backend.seen().is_empty(), "nothing reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_end_to_end_and_certless_clients_refused_on_both_ports() {
    let env = Env::start(Security::Mtls).await;
    let _agent = env.connected_agent().await;
    let answer = env
        .argocd()
        .get(&format!("{}/tunnel/dev/version", env.internal_url()))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["gitVersion"], "v1.33.0-tether-fake");

    let certless = TestClient::new(Some(&env.pki.path("ca.crt")), None);
    for url in [
        format!("{}/healthz", env.internal_url()),
        format!("{}/healthz", env.public_url()),
    ] {
        let result = certless.request(Method::GET, &url, &[], Bytes::new()).await;
        assert!(
            result.is_err(),
            "{url} served a client without a certificate"
        );
    }
    // An agent without a client certificate cannot connect either.
    let mut args = env.agent_args("dev", "dev-token", &[]);
    args.client_cert = None;
    args.client_key = None;
    let certless_agent = Agent::start(args).await.expect("starts");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!certless_agent.is_connected());
}

#[tokio::test]
async fn agent_refuses_plaintext_servers() {
    let env_args = |server: &str, allow: bool| {
        let mut args = vec![
            "tether-agent",
            "--server",
            server,
            "--token",
            "t",
            "--ca-cert",
            "/dev/null",
        ];
        if allow {
            args.push("--allow-insecure-server");
        }
        <tether::agent::AgentArgs as clap::Parser>::parse_from(args)
    };
    match Agent::start(env_args("ws://127.0.0.1:1", false)).await {
        Err(AgentError::PlaintextServer) => {}
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("accepted ws:// without --allow-insecure-server"),
    }
    match Agent::start(env_args("https://127.0.0.1:1", false)).await {
        Err(AgentError::BadServerUrl(_)) => {}
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("accepted an https:// server URL"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_after_the_server_restarts() {
    let mut env = Env::start(Security::Tls).await;
    let agent = env.connected_agent().await;
    env.stop_server().await;
    eventually(async || !agent.is_connected(), "agent notices").await;
    env.start_server().await;
    env.wait_connected("dev").await;
    let answer = env
        .argocd()
        .get(&format!("{}/tunnel/dev/version", env.internal_url()))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(agent.metrics.reconnects.get() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_replaces_the_old_and_survives_its_teardown() {
    let env = Env::start(Security::Plain).await;
    let first = env.connected_agent().await;
    let mut args = env.agent_args("dev", "dev-token", &[]);
    args.max_retry = Duration::from_secs(30);
    let second = Agent::start(args).await.expect("second agent");
    eventually(async || second.is_connected(), "second agent connects").await;
    // The first session was replaced; its teardown must not unregister the
    // second. The first agent's own reconnect would replace it again, so
    // stop it before it retries.
    first.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        env.server().is_connected("dev"),
        "the newer session is still registered"
    );
    let answer = env
        .argocd()
        .get(&format!("{}/tunnel/dev/version", env.internal_url()))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_file_changes_apply_live() {
    let env = Env::start(Security::Plain).await;
    let dev = env.connected_agent().await;
    let prod = env.agent("prod", "prod-token", &[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !env.server().is_connected("prod"),
        "unknown cluster refused"
    );

    env.set_clusters(&[("dev", "dev-token"), ("prod", "prod-token")]);
    env.wait_connected("prod").await;
    let answer = env
        .argocd()
        .get(&format!("{}/tunnel/prod/version", env.internal_url()))
        .await;
    assert_eq!(answer.status, StatusCode::OK);

    // A broken file keeps the last good configuration.
    std::fs::write(&env.clusters_file, "[{not json").expect("break");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(env.server().is_connected("dev") && env.server().is_connected("prod"));

    env.set_clusters(&[("prod", "prod-token")]);
    eventually(
        async || !env.server().is_connected("dev"),
        "dev's session closed",
    )
    .await;
    eventually(async || !dev.is_connected(), "dev agent sees the close").await;
    let answer = env
        .argocd()
        .get(&format!("{}/tunnel/dev/version", env.internal_url()))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(prod.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_capped() {
    let env = Env::start_with(Security::Plain, &["--max-body-bytes", "1024"]).await;
    let _agent = env.connected_agent().await;
    let client = env.argocd();
    let url = format!("{}/tunnel/dev/sink", env.internal_url());
    let ok = client
        .request(Method::PUT, &url, &[], Bytes::from(vec![7u8; 1000]))
        .await
        .expect("put");
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.json()["bytes"], 1000);
    let big = client
        .request(Method::PUT, &url, &[], Bytes::from(vec![7u8; 5000]))
        .await
        .expect("put");
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_refuses_and_counts() {
    let env = Env::start_with(Security::Plain, &["--rate-limit", "3"]).await;
    let _agent = env.connected_agent().await;
    let client = env.argocd();
    let url = format!("{}/tunnel/dev/version", env.internal_url());
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(client.get(&url).await.status);
    }
    assert!(statuses.contains(&StatusCode::OK));
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    assert!(
        env.server()
            .metrics_text()
            .contains("proxy_rate_limited_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_agent_works_against_the_server() {
    let env = Env::start(Security::Tls).await;
    let _agent = env.agent("dev", "dev-token", &["--protocol", "v1"]).await;
    env.wait_connected("dev").await;
    let client = env.argocd();
    let url = format!("{}/tunnel/dev/bytes?n=3000000", env.internal_url());
    let answer = client.get(&url).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body.len(), 3_000_000);
}

/// A v1 server that knows nothing of tether (the Go design: ignores the
/// subprotocol offer, opens streams, sends two requests on one stream)
/// drives a tether agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::result_large_err)] // the error type is tungstenite's callback signature
async fn v1_server_drives_the_agent_with_keepalive_requests() {
    let env = Env::start(Security::Plain).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut args = env.agent_args("dev", "dev-token", &[]);
    args.server = format!("ws://127.0.0.1:{port}/connect");
    let _agent = Agent::start(args).await.expect("agent");

    let (tcp, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("agent dials")
        .expect("accept");
    let ws = tokio_tungstenite::accept_hdr_async(
        tcp,
        |request: &tokio_tungstenite::tungstenite::handshake::server::Request, response| {
            assert_eq!(
                request.headers().get("authorization").map(|v| v.as_bytes()),
                Some(&b"Bearer dev-token"[..])
            );
            Ok(response)
        },
    )
    .await
    .expect("handshake without a subprotocol");
    let (mut sink, mut source) = ws.split();
    let target = env.target();
    sink.send(tokio_tungstenite::tungstenite::Message::Binary(
        Frame::new(FrameType::Connect, 1, Bytes::from(target.clone())).encode(),
    ))
    .await
    .expect("connect");
    let mut next_frame = async || loop {
        match source.next().await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(bytes))) => {
                let frame = Frame::decode(bytes).expect("valid frame");
                if frame.kind != FrameType::Ping {
                    return frame;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("tunnel ended: {other:?}"),
        }
    };
    assert_eq!(next_frame().await.kind, FrameType::Connected);
    let request = format!(
        "GET /version HTTP/1.1\r\nHost: {target}\r\n\r\nGET /api HTTP/1.1\r\nHost: {target}\r\n\r\n"
    );
    sink.send(tokio_tungstenite::tungstenite::Message::Binary(
        Frame::new(FrameType::Data, 1, Bytes::from(request)).encode(),
    ))
    .await
    .expect("data");
    let mut response = Vec::new();
    while !(String::from_utf8_lossy(&response)
        .matches("HTTP/1.1 200 OK")
        .count()
        == 2
        && String::from_utf8_lossy(&response).contains("APIVersions"))
    {
        let frame = tokio::time::timeout(WAIT, next_frame())
            .await
            .expect("response in time");
        assert_eq!(frame.kind, FrameType::Data, "{frame:?}");
        response.extend_from_slice(&frame.payload);
    }
    let seen = env.backend.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|r| r.authorized),
        "token injected on every request of the stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_and_curl_through_the_tunnel() {
    let env = Env::start(Security::Plain).await;
    let _agent = env.connected_agent().await;
    let server = format!("http://127.0.0.1:{}/tunnel/dev", env.internal_addr.port());
    if support::kubectl_available() {
        let out = tokio::process::Command::new("kubectl")
            .args([
                "--server",
                &server,
                "--token",
                "caller-token-never-forwarded",
                "version",
                "-o",
                "json",
            ])
            .env("KUBECONFIG", "/dev/null")
            .output()
            .await
            .expect("kubectl runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "kubectl version failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let version: serde_json::Value = serde_json::from_str(&stdout).expect("json");
        assert_eq!(
            version["serverVersion"]["gitVersion"],
            "v1.33.0-tether-fake"
        );

        let out = tokio::process::Command::new("kubectl")
            .args(["--server", &server, "get", "namespaces", "-o", "name"])
            .env("KUBECONFIG", "/dev/null")
            .output()
            .await
            .expect("kubectl runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("namespace/kube-system"),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-H",
            "Authorization: Bearer caller",
            &format!("{server}/api/v1/namespaces"),
        ])
        .output()
        .await
        .expect("curl runs");
    assert!(String::from_utf8_lossy(&out.stdout).contains("NamespaceList"));
    assert!(env.backend.seen().iter().all(|r| r.authorized));
}

/// Streams are released after each request: nothing piles up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_released_after_requests_and_cancellations() {
    let env = Env::start(Security::Plain).await;
    let _agent = env.connected_agent().await;
    let client = env.argocd();
    let url = format!("{}/tunnel/dev/version", env.internal_url());
    for _ in 0..200 {
        assert_eq!(client.get(&url).await.status, StatusCode::OK);
    }
    // Cancelled mid-watch: a caller that goes away.
    for _ in 0..20 {
        let mut tcp = tokio::net::TcpStream::connect(env.internal_addr)
            .await
            .expect("connect");
        tcp.write_all(
            b"GET /tunnel/dev/api/v1/namespaces/default/pods?watch=1 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .expect("write");
        let mut buf = [0u8; 256];
        let n = tcp.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        drop(tcp);
    }
    eventually(
        async || {
            env.server()
                .metrics_text()
                .contains("tunnel_active_connections{cluster=\"dev\"} 0")
        },
        "every stream released",
    )
    .await;
}

/// `kubectl exec`-style upgrades: 101 through the tunnel, then raw bytes
/// both ways, with the agent's token on the upgrade request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_pass_through_as_raw_bytes() {
    let env = Env::start(Security::Plain).await;
    let _agent = env.connected_agent().await;
    let upgrades = [
        "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n",
        "Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: v5.channel.k8s.io\r\n",
    ];
    for headers in upgrades {
        let mut tcp = tokio::net::TcpStream::connect(env.internal_addr)
            .await
            .expect("connect");
        let request = format!(
            "POST /tunnel/dev/api/v1/namespaces/default/pods/web/portforward?ports=8080 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer caller\r\n{headers}\r\n"
        );
        tcp.write_all(request.as_bytes()).await.expect("write");
        let head = support::read_head(&mut tcp).await.to_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade:"), "{head}");
        if headers.contains("websocket") {
            assert!(
                head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
                "{head}"
            );
            assert!(
                head.contains("sec-websocket-protocol: v5.channel.k8s.io"),
                "{head}"
            );
        }
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let (mut reader, mut writer) = tcp.into_split();
        let sent = payload.clone();
        let writing = tokio::spawn(async move { writer.write_all(&sent).await.map(|_| writer) });
        let mut echoed = vec![0u8; payload.len()];
        tokio::time::timeout(WAIT, reader.read_exact(&mut echoed))
            .await
            .expect("echo in time")
            .expect("read");
        assert!(echoed == payload, "upgraded bytes differ");
        drop(writing.await);
    }
    let seen = env.backend.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|r| r.authorized),
        "agent token injected into upgrade requests"
    );
}

/// Rotated certificates (cert-manager, projected Secrets) apply to new
/// connections without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificates_reload_from_disk() {
    let env = Env::start(Security::Tls).await;
    let presented = || async {
        let config = tether::tls::client_config(
            tether::tls::load_roots(&env.pki.path("ca.crt")).expect("roots"),
            None,
        )
        .expect("config");
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(env.internal_addr)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = connector.connect(name, tcp).await.expect("handshake");
        tls.get_ref().1.peer_certificates().expect("certs")[0]
            .clone()
            .into_owned()
    };
    let before = presented().await;
    let loopback = ["127.0.0.1".parse().expect("ip")];
    env.pki.issue(
        "server",
        &tether::pki::LeafRequest::server(
            "tether-server-rotated",
            &["localhost"],
            &loopback,
            Duration::from_secs(600),
        ),
    );
    eventually(
        async || presented().await != before,
        "the new certificate is served",
    )
    .await;
}

/// Real `kubectl exec -i` (WebSocket, v5.channel.k8s.io) and `kubectl logs
/// -f` through the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_and_follow_logs_through_the_tunnel() {
    if !support::kubectl_available() {
        return;
    }
    let env = Env::start(Security::Plain).await;
    let _agent = env.connected_agent().await;
    let server = format!("http://127.0.0.1:{}/tunnel/dev", env.internal_addr.port());
    let out = support::kubectl_exec_cat(
        &["kubectl"],
        &["--server", &server],
        std::path::Path::new("/dev/null"),
        "web",
        b"hello through the tunnel\n",
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello through the tunnel\n"
    );

    let mut logs = tokio::process::Command::new("kubectl")
        .args(["--server", &server, "logs", "-f", "web"])
        .env("KUBECONFIG", "/dev/null")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl runs");
    let mut lines = tokio::io::BufReader::new(logs.stdout.take().expect("stdout")).lines();
    for n in 1..=5 {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("line in time")
            .expect("read");
        assert_eq!(line.as_deref(), Some(format!("web log line {n}").as_str()));
    }
    let _ = logs.kill().await;
    assert!(env.backend.seen().iter().all(|r| r.authorized));
}

/// A valid certificate of cluster A with the token of cluster B is refused
/// and counted; each agent with its own pair connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_identity_must_match_the_token() {
    let env = Env::start(Security::Mtls).await;
    env.set_clusters(&[("dev", "dev-token"), ("prod", "prod-token")]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // prod's token with dev's certificate.
    let mut args = env.agent_args("dev", "prod-token", &[]);
    args.max_retry = Duration::from_secs(30);
    let crossed = Agent::start(args).await.expect("agent");
    eventually(
        async || {
            let metrics = env.server().metrics_text();
            metrics.contains("tunnel_identity_mismatch_total 1")
                && metrics.contains("auth_failures_total{endpoint=\"connect\",reason=\"identity\"}")
        },
        "mismatch counted",
    )
    .await;
    assert!(!env.server().is_connected("prod") && !env.server().is_connected("dev"));
    assert!(!crossed.is_connected());
    let _prod = env.agent("prod", "prod-token", &[]).await;
    env.wait_connected("prod").await;
}

/// A source spraying wrong tokens is slowed to cheap 429s and counted;
/// once its budget refills, a correct agent from it connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_rate_limited_per_source() {
    let env = Env::start_with(Security::Tls, &["--auth-failure-rate", "20"]).await;
    let client = TestClient::new(Some(&env.pki.path("ca.crt")), None);
    let url = format!("{}/connect", env.public_url());
    let mut statuses = Vec::new();
    for i in 0..200 {
        let token = format!("Bearer wrong-{i}");
        statuses.push(
            client
                .get_with(&url, &[("authorization", &token)])
                .await
                .status,
        );
    }
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    let limited = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(
        (80..200).contains(&refused),
        "{refused} checked, {limited} limited"
    );
    assert!(limited > 0);
    let metrics = env.server().metrics_text();
    assert!(
        metrics.contains(&format!("auth_rate_limited_total {limited}")),
        "{metrics}"
    );
    // The budget refills (80 failures at 20/s: four seconds).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let _agent = env.connected_agent().await;
}

/// Two clusters on one server: cluster "a" has a caller that stopped
/// reading a huge download (its tunnel's flow control stalls that stream),
/// a flood of failing requests, and then loses its agent. Cluster "b"
/// meanwhile downloads 32 MiB intact at full speed and every request of it
/// succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_failing_cluster_never_shows_on_another() {
    let env = Env::start(Security::Plain).await;
    env.set_clusters(&[("a", "a-token"), ("b", "b-token")]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let agent_a = env.agent("a", "a-token", &[]).await;
    let _agent_b = env.agent("b", "b-token", &[]).await;
    env.wait_connected("a").await;
    env.wait_connected("b").await;
    let client = env.argocd();
    let base = env.internal_url();

    // b's speed on an idle server, for comparison.
    let size = 32usize << 20;
    let download_b = || async {
        let started = std::time::Instant::now();
        let answer = client.get(&format!("{base}/tunnel/b/bytes?n={size}")).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body.len(), size, "b's body arrived whole");
        started.elapsed()
    };
    let alone = download_b().await;

    // a: a caller that asks for 1 GiB and never reads it.
    let mut stalled = tokio::net::TcpStream::connect(env.internal_addr)
        .await
        .expect("connect");
    stalled
        .write_all(b"GET /tunnel/a/bytes?n=1073741824 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    eventually(
        async || {
            env.server()
                .metrics_text()
                .contains("tunnel_active_connections{cluster=\"a\"} 1")
        },
        "a's stalled stream is open",
    )
    .await;
    // a: requests that fail.
    let nope = format!("{base}/tunnel/a/nope");
    let failing = (0..200).map(|_| client.get(&nope));
    let failures = futures_util::future::join_all(failing).await;
    assert!(failures.iter().all(|a| a.status == StatusCode::NOT_FOUND));

    let beside = download_b().await;
    // a loses its agent; b is untouched.
    agent_a.shutdown().await;
    let answer = client.get(&format!("{base}/tunnel/a/version")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let after = download_b().await;
    eprintln!("b's 32 MiB: alone {alone:?}, beside stalled a {beside:?}, after a left {after:?}");
    for elapsed in [beside, after] {
        assert!(
            elapsed < alone * 4 + Duration::from_millis(500),
            "b slowed from {alone:?} to {elapsed:?}"
        );
    }
    drop(stalled);
}

/// Sequential requests share one tunnel stream, kept open between them as
/// a client keeps a TCP connection; each still carries the agent's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_stream() {
    let env = Env::start(Security::Mtls).await;
    let _agent = env.connected_agent().await;
    let client = env.argocd();
    let url = format!("{}/tunnel/dev/api/v1/namespaces", env.internal_url());
    let mut received = 0;
    for _ in 0..20 {
        let answer = client.get(&url).await;
        assert_eq!(answer.status, StatusCode::OK);
        received += answer.text().len();
    }
    let metrics = client.get(&env.metrics_url()).await.text();
    // Bytes each way are counted as they stream.
    let received = format!("proxy_response_bytes_total{{cluster=\"dev\"}} {received}");
    for expected in [
        "tunnel_agent_connected{cluster=\"dev\"} 1",
        "tunnel_active_connections{cluster=\"dev\"} 1",
        "tunnel_idle_connections{cluster=\"dev\"} 1",
        "proxy_request_bytes_total{cluster=\"dev\"} 0",
        received.as_str(),
    ] {
        assert!(
            metrics.lines().any(|l| l == expected),
            "{expected} in\n{metrics}"
        );
    }
    let seen = env.backend.seen();
    assert!(seen.len() >= 20);
    assert!(
        seen.iter().all(|r| r.authorized),
        "every request has the token"
    );
    // The agent keeps its TLS connection to the API server too.
    let connections: std::collections::HashSet<_> = seen.iter().map(|r| r.remote).collect();
    assert_eq!(
        connections.len(),
        1,
        "one upstream connection: {connections:?}"
    );
}
