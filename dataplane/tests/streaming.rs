//! Streaming through the tunnel: flow control under a stalled reader,
//! long watches, half-closed upgrades, and no leaks.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::{Env, Security, WAIT, eventually};
use tether::protocol::V2_INITIAL_WINDOW;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Sends a raw HTTP/1.1 GET on a new connection and returns it after the
/// response head, so the test decides how (and whether) to read the body.
async fn raw_get(env: &Env, path: &str) -> BufReader<TcpStream> {
    let mut tcp = TcpStream::connect(env.internal_addr)
        .await
        .expect("connect");
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: tether\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut reader = BufReader::new(tcp);
    let mut status = String::new();
    reader.read_line(&mut status).await.expect("status line");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.expect("header");
        if line == "\r\n" {
            return reader;
        }
    }
}

fn buffered_bytes(env: &Env) -> u64 {
    env.server()
        .metrics_text()
        .lines()
        .find(|l| l.starts_with("tunnel_buffered_bytes{cluster=\"dev\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One caller stops reading a 1 GiB download; a second download of 10 MiB
/// on the same tunnel still completes, and the stalled stream holds no
/// more than its window in the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_does_not_block_the_others() {
    let env = Env::start(Security::Plain).await;
    let _agent = env.connected_agent().await;
    let _stalled = raw_get(&env, "/tunnel/dev/bytes?n=1073741824").await;
    // Let the stalled stream fill every buffer on its path.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let answer = env
        .argocd()
        .get(&format!(
            "{}/tunnel/dev/bytes?n={}",
            env.internal_url(),
            10 << 20
        ))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body.len(), 10 << 20);
    assert!(started.elapsed() < WAIT, "second stream finished");

    let buffered = buffered_bytes(&env);
    assert!(
        buffered <= u64::from(V2_INITIAL_WINDOW),
        "server buffers {buffered} bytes for the stalled stream, more than one window"
    );
}

/// A watch streams event after event, byte for byte, with no stall; a quiet
/// watch (events seconds apart) is not cut by any idle timeout.
/// `TETHER_SOAK_SECS` makes it run longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_stream_without_stalls() {
    let env = Env::start(Security::Plain).await;
    let _agent = env.connected_agent().await;
    let soak: u64 = std::env::var("TETHER_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let events = if soak > 0 { soak * 50 } else { 100 };
    let mut watch = raw_get(
        &env,
        &format!(
            "/tunnel/dev/api/v1/namespaces/default/pods?watch=1&events={events}&intervalMs=20"
        ),
    )
    .await;
    let mut body = String::new();
    tokio::time::timeout(
        Duration::from_secs(30 + soak * 2),
        watch.read_to_string(&mut body),
    )
    .await
    .expect("watch ended in time")
    .expect("read");
    // Chunked framing around newline-delimited JSON events.
    let names: Vec<String> = body
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("event")["object"]["metadata"]["name"].to_string())
        .collect();
    assert_eq!(names.len() as u64, events);
    assert_eq!(names.first().map(String::as_str), Some("\"pod-1\""));
    assert_eq!(names.last().cloned(), Some(format!("\"pod-{events}\"")));

    let mut quiet = raw_get(
        &env,
        "/tunnel/dev/api/v1/namespaces/default/pods?watch=1&events=3&intervalMs=1500",
    )
    .await;
    let mut body = String::new();
    tokio::time::timeout(WAIT, quiet.read_to_string(&mut body))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(body.lines().filter(|l| l.starts_with('{')).count(), 3);
    eventually(async || buffered_bytes(&env) == 0, "nothing left buffered").await;
}

/// An upgraded connection whose client finished sending (half-close) still
/// receives everything the other side sends, then a clean EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connections_support_half_close() {
    let env = Env::start(Security::Plain).await;
    let _agent = env.connected_agent().await;
    let mut tcp = TcpStream::connect(env.internal_addr)
        .await
        .expect("connect");
    tcp.write_all(b"POST /tunnel/dev/api/v1/namespaces/default/pods/web/portforward HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n")
        .await
        .expect("write");
    let head = support::read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let payload: Vec<u8> = (0..1_500_000u32).map(|i| (i % 241) as u8).collect();
    let (mut reader, mut writer) = tcp.into_split();
    let sent = payload.clone();
    let writing = tokio::spawn(async move {
        writer.write_all(&sent).await.expect("write");
        writer.shutdown().await.expect("half-close");
        writer
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(WAIT, reader.read_to_end(&mut echoed))
        .await
        .expect("EOF in time")
        .expect("clean EOF");
    assert_eq!(
        echoed.len(),
        payload.len(),
        "everything echoed after the client's half-close"
    );
    assert!(echoed == payload);
    drop(writing.await);
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// After 10,000 short requests and 1,000 cancelled ones, streams, tasks
/// and file descriptors are back where they started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_leaks_after_many_short_and_cancelled_requests() {
    let env = Env::start(Security::Plain).await;
    let _agent = env.connected_agent().await;
    let client = std::sync::Arc::new(env.argocd());
    let url = format!("{}/tunnel/dev/version", env.internal_url());
    let burst = |per_worker: usize| {
        let workers: Vec<_> = (0..16)
            .map(|_| {
                let client = client.clone();
                let url = url.clone();
                tokio::spawn(async move {
                    for _ in 0..per_worker {
                        assert_eq!(client.get(&url).await.status, StatusCode::OK);
                    }
                })
            })
            .collect();
        async move {
            for worker in workers {
                worker.await.expect("worker");
            }
        }
    };
    // Warm up at the same concurrency so connection pools (test client to
    // server, agent to API server) reach their steady size, then measure.
    burst(20).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();
    let fds_before = open_fds();

    burst(625).await;
    let watch = "/tunnel/dev/api/v1/namespaces/default/pods?watch=1&intervalMs=50";
    let mut cancelled = Vec::new();
    for i in 0..1000 {
        let reader = raw_get(&env, watch).await;
        cancelled.push(reader);
        if i % 50 == 49 {
            cancelled.clear(); // the callers go away mid-watch
        }
    }
    drop(cancelled);
    let expected = "tunnel_active_connections{cluster=\"dev\"} 0";
    eventually(
        async || env.server().metrics_text().contains(expected),
        "every stream released",
    )
    .await;
    let settled = tokio::time::timeout(WAIT, async {
        while metrics.num_alive_tasks() > tasks_before || open_fds() > fds_before {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "tasks {} (baseline {tasks_before}), fds {} (baseline {fds_before})",
        metrics.num_alive_tasks(),
        open_fds()
    );
    let seen = env.backend.seen().len();
    assert!(seen >= 11_000, "backend saw {seen} requests");
}
