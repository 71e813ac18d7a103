//! N streams open at once on one tunnel. tether-server, tether-agent and
//! the API server double each run as a process of their own, so each one's
//! peak memory is its own (and so no process needs a descriptor for every
//! connection of every hop). Every hop is TLS, as in production.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use tether::fake_apiserver::FakeApiServer;

use crate::rig::{Client, Process, Setup, free_ports};

/// Events each watch delivers. They are spaced 1 ms per stream (at least a
/// second) apart, so every watch outlasts the time it takes to open all N
/// (each a TLS connection to the server, and one from agent to backend).
const EVENTS: usize = 3;

/// `tether-bench --serve-backend DIR`: the API server double on its own,
/// with the certificates of a [`Setup`] in DIR. Prints its address, then
/// serves until killed.
pub async fn serve_backend(dir: &std::path::Path) -> Result<()> {
    let backend = FakeApiServer::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        Some(tether::tls::ServerTlsFiles {
            cert: dir.join("api.crt"),
            key: dir.join("api.key"),
            client_ca: None,
        }),
        dir.join("sa-token"),
    )
    .await?;
    println!("{}", backend.addr);
    tether::wait_for_termination().await;
    Ok(())
}

pub struct Outcome {
    pub elapsed: Duration,
    /// The most streams the server reported open at once.
    pub peak_open: usize,
    pub server_peak_kib: u64,
    pub agent_peak_kib: u64,
    pub backend_peak_kib: u64,
}

/// Opens `count` watches at once through one tunnel and waits until every
/// one has delivered all its events.
pub async fn open_at_once(count: usize) -> Result<Outcome> {
    let setup = Setup::new()?;
    let mut backend = Command::new(std::env::current_exe()?)
        .arg("--serve-backend")
        .arg(setup.path(""))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the API server double")?;
    let mut line = String::new();
    BufReader::new(backend.stdout.take().context("backend stdout")?).read_line(&mut line)?;
    let backend = Process::from_child(backend);
    let backend_addr: SocketAddr = line.trim().parse().context("backend address")?;

    let [public, internal, metrics] = free_ports()?;
    let mut server_args = setup.server_args(
        true,
        &format!("127.0.0.1:{public}"),
        &format!("127.0.0.1:{internal}"),
        backend_addr,
    )?;
    server_args.extend(metrics_flags(metrics));
    let server = Process::tether("tether-server", &server_args)?;
    let agent = Process::tether(
        "tether-agent",
        &setup.agent_args(true, public, backend_addr),
    )?;
    let client = setup.client(true)?;
    let base = format!("https://localhost:{internal}");
    let metrics = metrics_url(metrics);
    wait_ready(&client, &metrics).await?;

    let interval_ms = count.max(1000);
    let url = format!(
        "{base}/tunnel/dev/api/v1/namespaces/default/pods?watch=1&events={EVENTS}&intervalMs={interval_ms}"
    );
    let started = Instant::now();
    let watches: Vec<_> = (0..count)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { watch(&client, &url).await })
        })
        .collect();
    let mut peak_open = 0;
    while !watches.iter().all(|w| w.is_finished()) {
        peak_open = peak_open.max(open_streams(&client, &metrics).await.unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    let mut failures = 0;
    for watch in watches {
        if !matches!(watch.await, Ok(Ok(()))) {
            failures += 1;
        }
    }
    anyhow::ensure!(failures == 0, "{failures} of {count} watches failed");
    Ok(Outcome {
        elapsed,
        peak_open,
        server_peak_kib: server.peak_kib(),
        agent_peak_kib: agent.peak_kib(),
        backend_peak_kib: backend.peak_kib(),
    })
}

/// One watch: a 200 and every event.
async fn watch(client: &Client, url: &str) -> Result<()> {
    let response = client.send(Method::GET, url, &[], Bytes::new()).await?;
    anyhow::ensure!(response.status().is_success(), "{}", response.status());
    let body = response.into_body().collect().await?.to_bytes();
    let events = body
        .split(|b| *b == b'\n')
        .filter(|l| l.starts_with(b"{"))
        .count();
    anyhow::ensure!(events == EVENTS, "{events} of {EVENTS} events");
    Ok(())
}

/// tether-server's flags for a metrics port at `port` (plain HTTP: the
/// benchmark's own scraper).
pub fn metrics_flags(port: u16) -> [String; 4] {
    [
        "--metrics-addr".into(),
        format!("127.0.0.1:{port}"),
        "--metrics-auth".into(),
        "none".into(),
    ]
}

pub fn metrics_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/metrics")
}

/// Waits until the agent holds its session (the server's metrics at
/// `metrics`): the server is ready before any agent connects.
pub async fn wait_ready(client: &Client, metrics: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let connected = match client.send(Method::GET, metrics, &[], Bytes::new()).await {
            Ok(response) => {
                let text = response.into_body().collect().await?.to_bytes();
                String::from_utf8_lossy(&text)
                    .lines()
                    .any(|l| l == "agents_connected 1")
            }
            Err(_) => false,
        };
        if connected {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the agent did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn open_streams(client: &Client, metrics: &str) -> Result<usize> {
    let response = client.send(Method::GET, metrics, &[], Bytes::new()).await?;
    let text = response.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&text);
    Ok(text
        .lines()
        .filter(|l| l.starts_with("tunnel_active_connections{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as usize)
}
