//! Hostile agents and callers against a real tether-server process, while a
//! well-behaved cluster ("dev") is used beside them: the rogue is cut off,
//! "dev" stays responsive and intact, and the server's memory stays bounded.

mod support;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use support::procs::{AGENT_TOKEN, Proc, World};
use support::{TestClient, cluster_json};
use tether::protocol::{Frame, FrameType, Version};
use tether::websocket::TunnelSocket;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const ROGUE_TOKEN: &str = "rogue-token-91c2e7";
/// Frames the rogue agent throws at the server in all.
const FLOOD_FRAMES: usize = 100_000;
/// Growth of the server's resident memory the floods may cause.
const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

/// A server with clusters "dev" (a real agent) and "rogue" (the test).
async fn world() -> (World, Proc, Proc) {
    let world = World::new().await;
    let backend = world.backend.addr.to_string();
    std::fs::write(
        &world.clusters,
        cluster_json(&[
            ("dev", AGENT_TOKEN, &backend),
            ("rogue", ROGUE_TOKEN, &backend),
        ]),
    )
    .expect("clusters");
    let server = world.server(&[]);
    let agent = world.agent(AGENT_TOKEN);
    world.wait_ready().await;
    (world, server, agent)
}

/// The rogue agent's tunnel: a real TLS WebSocket with cluster "rogue"'s
/// valid token, speaking v2.
async fn rogue_socket(world: &World) -> TunnelSocket {
    let roots = tether::tls::load_roots(&world.pki.path("ca.crt")).expect("roots");
    let config = tether::tls::client_config(roots, None).expect("tls config");
    let tcp = TcpStream::connect(("127.0.0.1", world.public))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("tls");
    let authority = format!("localhost:{}", world.public);
    let (socket, version, _) =
        tether::websocket::connect(tls, &authority, "/connect", ROGUE_TOKEN, true, None)
            .await
            .expect("rogue handshake");
    assert_eq!(version, Version::V2);
    socket
}

/// Requests to "dev" every 20 ms until stopped: (requests, slowest, failures).
fn probe_dev(
    world: &World,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Duration, Vec<String>)> {
    let client = world.client();
    let url = world.url("/tunnel/dev/bytes?n=65536");
    tokio::spawn(async move {
        let (mut count, mut slowest, mut failures) = (0, Duration::ZERO, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            match client
                .request(http::Method::GET, &url, &[], Bytes::new())
                .await
            {
                Ok(answer) if answer.status == StatusCode::OK && answer.body.len() == 65536 => {}
                Ok(answer) => {
                    failures.push(format!("{} ({} bytes)", answer.status, answer.body.len()))
                }
                Err(err) => failures.push(err),
            }
            slowest = slowest.max(started.elapsed());
            count += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (count, slowest, failures)
    })
}

/// Stops the probe of "dev" and checks what the attack left: every request
/// answered, and the server's memory within bounds. Returns the probe count.
async fn check_dev_unaffected(
    stop: &AtomicBool,
    probe: tokio::task::JoinHandle<(usize, Duration, Vec<String>)>,
    server: &Proc,
    baseline_kib: u64,
    attack: &str,
) -> usize {
    stop.store(true, Ordering::Relaxed);
    let (requests, slowest, failures) = probe.await.expect("probe");
    let grown = server.rss_kib().saturating_sub(baseline_kib);
    eprintln!(
        "dev during {attack}: {requests} requests, slowest {slowest:?}; server RSS +{grown} KiB"
    );
    assert!(
        failures.is_empty(),
        "dev failed during {attack}: {failures:?}"
    );
    assert!(
        grown < RSS_GROWTH_LIMIT_KIB,
        "server RSS grew by {grown} KiB"
    );
    requests
}

/// The rogue's flood, frame `i`: Connects it may not send, Data for
/// streams it does not have (including ids "dev" uses on its own tunnel),
/// unknown types and runts.
fn hostile_frame(i: usize) -> Bytes {
    let id = (i % 200) as u32 + 1;
    match i % 5 {
        0 => Frame::new(
            FrameType::Connect,
            id,
            Bytes::from_static(b"kubernetes.default.svc:443"),
        )
        .encode(),
        1 => Frame::new(
            FrameType::Data,
            id,
            Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"),
        )
        .encode(),
        2 => Frame::window_update(id, u32::MAX).encode(),
        3 => Bytes::from_static(&[0x7f, 0, 0, 0, 1, 0xde, 0xad]),
        _ => Bytes::from_static(&[0x03, 0]),
    }
}

/// A rogue agent floods the server with 100,000 frames it must not send,
/// over as many sessions as it takes (each is cut off after its error
/// budget), then with Pings it never reads the answers to, then with one
/// oversized frame. It never receives a byte of anyone's stream data; "dev"
/// answers every request meanwhile; the server's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_agent_floods_are_cut_off_and_other_clusters_unaffected() {
    let (world, server, _agent) = world().await;
    let baseline = server.rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let probe = probe_dev(&world, stop.clone());

    // 1. Frames it must not send, reading whatever the server answers.
    let (mut sent, mut sessions, mut received_data) = (0, 0, 0);
    let started = Instant::now();
    while sent < FLOOD_FRAMES {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "flood stalled at {sent}"
        );
        let (mut sink, mut source) = rogue_socket(&world).await.split();
        sessions += 1;
        let reader = tokio::spawn(async move {
            let mut data = 0;
            while let Some(Ok(message)) = source.next().await {
                if let Message::Binary(bytes) = message
                    && Frame::decode(bytes).is_ok_and(|f| f.kind == FrameType::Data)
                {
                    data += 1;
                }
            }
            data
        });
        let mut cut_off = false;
        while sent < FLOOD_FRAMES {
            if sink
                .send(Message::Binary(hostile_frame(sent)))
                .await
                .is_err()
            {
                cut_off = true;
                break;
            }
            sent += 1;
        }
        // The last session may end with the flood before its error budget
        // does; the rogue closes that one itself.
        if !cut_off {
            let _ = sink.close().await;
        }
        received_data += tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the server ends the rogue's session")
            .expect("reader");
    }
    eprintln!(
        "{sent} hostile frames over {sessions} sessions in {:?}",
        started.elapsed()
    );
    assert!(
        sessions > 1,
        "the server cut off a session that broke the protocol"
    );
    assert_eq!(received_data, 0, "the rogue received stream data");

    // 2. Pings whose Pongs it never reads. The Pongs wait in kernel socket
    // buffers and, once those are full, in a control queue capped at 4,096
    // frames (past that the session is cut): memory stays bounded.
    let mut socket = rogue_socket(&world).await;
    let ping = Frame::empty(FrameType::Ping, 0).encode();
    let mut pings = 0;
    while pings < FLOOD_FRAMES {
        let send = socket.send(Message::Binary(ping.clone()));
        match tokio::time::timeout(Duration::from_secs(5), send).await {
            Ok(Ok(())) => pings += 1,
            _ => break,
        }
    }
    eprintln!("{pings} pings sent, no Pong read");

    // 3. One frame far over the size limit.
    let mut socket = rogue_socket(&world).await;
    let _ = socket
        .send(Message::Binary(Bytes::from(vec![3u8; 4 << 20])))
        .await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "an oversized frame ends the session");

    let requests = check_dev_unaffected(&stop, probe, &server, baseline, "the floods").await;
    assert!(requests >= 10, "dev was probed");
    let metrics = world.client().get(&world.metrics_url()).await.text();
    assert!(metrics.contains("agents_connected 1"), "{metrics}");
}

/// 10,000 wrong tokens from one source (127.0.0.2), as fast as it can send
/// them: the server counts them and answers 429 before any token work once
/// that source's budget is spent; an agent from another source connects
/// meanwhile, and "dev" keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_spray_is_rate_limited_per_source() {
    let (world, server, _agent) = world().await;
    let baseline = server.rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let probe = probe_dev(&world, stop.clone());

    let attacker: IpAddr = "127.0.0.2".parse().expect("ip");
    let client = Arc::new(TestClient::from_source(
        Some(&world.pki.path("ca.crt")),
        None,
        Some(attacker),
    ));
    let url = format!("https://localhost:{}/connect", world.public);
    const ATTEMPTS: usize = 10_000;
    const WORKERS: usize = 32;
    let started = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|worker| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for i in (worker..ATTEMPTS).step_by(WORKERS) {
                    let token = format!("Bearer wrong-token-{i}");
                    let answer = client
                        .request(
                            http::Method::GET,
                            &url,
                            &[("authorization", &token)],
                            Bytes::new(),
                        )
                        .await;
                    statuses.push(answer.map(|a| a.status).ok());
                }
                statuses
            })
        })
        .collect();
    // Meanwhile an agent for the second cluster connects from 127.0.0.1.
    let mut second = world.agent(ROGUE_TOKEN);
    let client = world.client();
    let connected = Instant::now();
    while !client
        .get(&world.metrics_url())
        .await
        .text()
        .contains("agents_connected 2")
    {
        assert!(
            connected.elapsed() < support::WAIT,
            "second agent locked out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "an agent from another source connected in {:?} during the spray",
        connected.elapsed()
    );

    let mut statuses = Vec::new();
    for worker in workers {
        statuses.extend(worker.await.expect("worker"));
    }
    let elapsed = started.elapsed();
    let count = |want: StatusCode| statuses.iter().filter(|s| **s == Some(want)).count();
    let (refused, limited) = (
        count(StatusCode::UNAUTHORIZED),
        count(StatusCode::TOO_MANY_REQUESTS),
    );
    eprintln!(
        "{ATTEMPTS} wrong tokens in {elapsed:?} ({:.0}/s): {refused} checked (401), {limited} limited (429)",
        ATTEMPTS as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(
        refused + limited,
        ATTEMPTS,
        "every attempt was answered 401 or 429"
    );
    assert!(
        limited > ATTEMPTS * 9 / 10,
        "most attempts were refused before token work"
    );

    check_dev_unaffected(&stop, probe, &server, baseline, "the spray").await;
    let metrics = world.client().get(&world.metrics_url()).await.text();
    assert!(
        metrics.contains(&format!("auth_rate_limited_total {limited}")),
        "{metrics}"
    );
    second.kill();
}
