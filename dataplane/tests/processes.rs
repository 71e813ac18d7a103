//! The real binaries as processes: SIGTERM drain and restart, SIGHUP
//! reload, and logs that never contain a secret, even at debug level.

mod support;

use std::time::Duration;

use support::procs::{AGENT_TOKEN, CALLER_TOKEN, SA_TOKEN, WRONG_TOKEN, World, signal};
use support::{WAIT, cluster_json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// SIGTERM: /readyz fails at once while new requests are still served for
/// --shutdown-delay; then new requests are refused, a watch in flight
/// completes, and the agent is back on the restarted server at once, not
/// after its backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_agents_return_at_once() {
    let world = World::new().await;
    let health = world.health;
    let server = world.server(&[
        "--shutdown-grace",
        "10s",
        "--shutdown-delay",
        "1s",
        "--health-addr",
        &format!("127.0.0.1:{health}"),
    ]);
    let _agent = world.agent(AGENT_TOKEN);
    world.wait_ready().await;

    // A 3-second watch over TLS, read by a raw client.
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        tether::tls::client_config(
            tether::tls::load_roots(&world.pki.path("ca.crt")).expect("roots"),
            None,
        )
        .expect("config"),
    ));
    let tcp = TcpStream::connect(("127.0.0.1", world.internal))
        .await
        .expect("connect");
    let mut stream = tls
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").expect("name"),
            tcp,
        )
        .await
        .expect("tls");
    stream
        .write_all(b"GET /tunnel/dev/api/v1/namespaces/default/pods?watch=1&events=30&intervalMs=100 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut watch = BufReader::new(stream);
    let mut status = String::new();
    watch.read_line(&mut status).await.expect("status");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut body = status.clone();

    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&server.0, "TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = world.client();
    let probe = client
        .get(&format!("http://127.0.0.1:{health}/readyz"))
        .await;
    assert_eq!(probe.status, http::StatusCode::SERVICE_UNAVAILABLE);
    let served = client.get(&world.url("/tunnel/dev/version")).await;
    assert_eq!(
        served.status,
        http::StatusCode::OK,
        "served during the delay"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let refused = world
        .client()
        .request(
            http::Method::GET,
            &world.url("/tunnel/dev/version"),
            &[],
            Default::default(),
        )
        .await;
    match refused {
        Err(_) => {}
        Ok(answer) => assert_eq!(
            answer.status,
            http::StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            answer.text()
        ),
    }
    tokio::time::timeout(WAIT, watch.read_to_string(&mut body))
        .await
        .expect("watch ends")
        .expect("read");
    // The watch (30 events over 3 s) ended when draining did, cleanly: a
    // complete chunked body of whole events, which client-go re-opens.
    let events = dechunk(&body).expect("a complete chunked body");
    let events: Vec<&str> = events.lines().collect();
    assert!(
        (3..30).contains(&events.len()),
        "ended early, at an event: {} events",
        events.len()
    );
    for event in events {
        serde_json::from_str::<serde_json::Value>(event).expect("whole events only");
    }

    let mut server = server;
    let exit = tokio::task::spawn_blocking(move || {
        let status = server.0.wait();
        (server, status)
    });
    let (_old, status) = tokio::time::timeout(WAIT, exit)
        .await
        .expect("server exits")
        .expect("join");
    assert!(status.is_ok_and(|s| s.success()), "clean exit after drain");

    let _restarted = world.server(&[]);
    let back = world.wait_ready().await;
    assert!(back < Duration::from_secs(3), "agent back after {back:?}");
}

/// The payload of an HTTP/1.1 chunked body, or `None` if it is not complete
/// (no last chunk): how a client tells a finished stream from a cut one.
fn dechunk(raw: &str) -> Option<String> {
    let mut rest = raw.split_once("\r\n\r\n")?.1;
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// SIGHUP re-reads the clusters file even when polling would not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_clusters() {
    let world = World::new().await;
    std::fs::write(
        &world.clusters,
        cluster_json(&[("other", "other-token", "127.0.0.1:1")]),
    )
    .expect("write");
    let server = world.server(&["--reload-interval", "1h"]);
    let _agent = world.agent(AGENT_TOKEN);
    tokio::time::sleep(Duration::from_millis(700)).await;
    std::fs::write(
        &world.clusters,
        cluster_json(&[("dev", AGENT_TOKEN, &world.backend.addr.to_string())]),
    )
    .expect("write");
    signal(&server.0, "HUP");
    let after = world.wait_ready().await;
    assert!(
        after < Duration::from_secs(5),
        "agent accepted {after:?} after SIGHUP"
    );
}

/// Logs at trace level, across successes, failures and a hostile caller,
/// never contain a token, a key or an Authorization value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_secrets() {
    let world = World::new().await;
    let _server = world.server(&[]);
    let _agent = world.agent(AGENT_TOKEN);
    let _wrong = world.agent(WRONG_TOKEN);
    world.wait_ready().await;
    let client = world.client();
    let auth = format!("Bearer {CALLER_TOKEN}");
    for path in [
        "/tunnel/dev/version",
        "/tunnel/dev/api/v1/namespaces",
        "/tunnel/unknown/api",
        "/tunnel/dev/nope",
    ] {
        let _ = client
            .get_with(
                &world.url(path),
                &[("authorization", &auth), ("impersonate-user", "admin")],
            )
            .await;
    }
    let _ = client
        .get_with(
            &format!("https://localhost:{}/connect", world.public),
            &[("authorization", &auth)],
        )
        .await;
    std::fs::write(world.pki.path("sa-token"), format!("{SA_TOKEN}-rotated")).expect("rotate");
    let _ = client
        .get_with(
            &world.url("/tunnel/dev/version"),
            &[("authorization", &auth)],
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let keys: Vec<String> = ["server.key", "apiserver.key"]
        .iter()
        .map(|k| std::fs::read_to_string(world.pki.path(k)).expect("key"))
        .collect();
    for name in ["server", "agent"] {
        let log = std::fs::read_to_string(world.log(name)).expect("log");
        assert!(log.lines().count() > 5, "{name} logged at trace level");
        for secret in [
            AGENT_TOKEN,
            SA_TOKEN,
            CALLER_TOKEN,
            WRONG_TOKEN,
            "Bearer ",
            "PRIVATE KEY",
        ] {
            assert!(!log.contains(secret), "{name} log contains {secret:?}");
        }
        for key in &keys {
            let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
            assert!(
                !log.contains(&body[..40]),
                "{name} log contains key material"
            );
        }
    }
}

/// The agent runs its tasks on one thread unless told otherwise, the
/// server on as many as it is given, and a request crosses both; zero
/// threads is refused before anything starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_are_as_configured() {
    let world = World::new().await;
    let server = world.server(&["--worker-threads", "3"]);
    let agent = world.agent(AGENT_TOKEN);
    world.wait_ready().await;
    let answer = world
        .client()
        .get_with(
            &world.url("/tunnel/dev/api/v1/namespaces"),
            &[("authorization", &format!("Bearer {CALLER_TOKEN}"))],
        )
        .await;
    assert_eq!(answer.status, http::StatusCode::OK, "{}", answer.text());
    for (name, threads) in [("server", 3), ("agent", 1)] {
        let log = std::fs::read_to_string(world.log(name)).expect("log");
        let started = log.lines().find(|l| l.contains("runtime started"));
        assert!(
            started.is_some_and(|l| l.contains(&format!("worker_threads={threads}"))),
            "{name}: {started:?}"
        );
    }
    drop((server, agent));

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_tether-agent"))
        .args(["--server", "wss://localhost:1", "--token", "x"])
        .env("WORKER_THREADS", "0")
        .output()
        .expect("tether-agent runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--worker-threads"), "{stderr}");
}
