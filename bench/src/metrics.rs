//! What a scrape costs: tether-server's metrics port with token review on
//! (the chart's default), scraped as Prometheus would (a new connection per
//! scrape here, which is the worst case), with the series of 100 clusters.
//! The CPU time is this process's (the server; curl runs apart), and the
//! API calls are counted by the API server double that reviews the token.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use tether::fake_apiserver::FakeApiServer;
use tether::server::{RunningServer, ServerArgs};

use crate::Row;
use crate::rig::cpu_seconds;

const CLUSTERS: usize = 100;
const SCRAPER_TOKEN: &str = "prometheus-token";

pub async fn rows(rows: &mut Vec<Row>, quick: bool) -> Result<()> {
    let scrapes = if quick { 20 } else { 300 };
    let dir = tempfile::tempdir()?;
    let own_token = dir.path().join("token");
    std::fs::write(&own_token, "server-token")?;
    let api = FakeApiServer::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        None,
        own_token,
    )
    .await?;
    api.review_token(
        SCRAPER_TOKEN,
        "system:serviceaccount:monitoring:prometheus",
        true,
    );
    let client = api
        .kube_client()
        .await
        .map_err(|err| anyhow::anyhow!(err))?;
    let clusters = dir.path().join("clusters.json");
    let entries: Vec<_> = (0..CLUSTERS)
        .map(|i| serde_json::json!({"id": format!("c{i}"), "token": format!("token-{i}")}))
        .collect();
    std::fs::write(&clusters, serde_json::to_string(&entries)?)?;
    let server = RunningServer::start_with_client(
        ServerArgs::parse_from([
            "tether-server",
            "--addr",
            "127.0.0.1:0",
            "--internal-addr",
            "127.0.0.1:0",
            "--clusters",
            &clusters.display().to_string(),
            "--metrics-addr",
            "127.0.0.1:0",
            "--log-level",
            "error",
        ]),
        Some(client),
    )
    .await?;
    // A request for every cluster (no agents: each answers 502) gives each
    // its counter and histogram series.
    for i in 0..CLUSTERS {
        curl(&[&format!(
            "http://{}/tunnel/c{i}/version",
            server.internal_addr
        )])
        .await?;
    }
    let url = format!(
        "https://{}/metrics",
        server.metrics_addr.context("no metrics port")?
    );
    let auth = format!("Authorization: Bearer {SCRAPER_TOKEN}");
    let first = curl(&["-k", "-H", &auth, &url]).await?;
    let (cpu, started) = (cpu_seconds(), Instant::now());
    for _ in 0..scrapes {
        curl(&["-k", "-H", &auth, &url]).await?;
    }
    let (cpu, wall) = (cpu_seconds() - cpu, started.elapsed());
    let reviews = api
        .seen()
        .iter()
        .filter(|r| r.path_and_query.contains("reviews"))
        .count();
    server.shutdown().await;
    rows.push(Row {
        name: format!(
            "metrics: one scrape of tether-server ({CLUSTERS} clusters' series, {} KiB, HTTPS, token reviewed)",
            first.len() / 1024
        ),
        direct: "-".into(),
        tunnel: format!(
            "{:.2} ms CPU (server side), {:.1} ms wall with curl; {reviews} API calls in {} scrapes",
            cpu * 1000.0 / scrapes as f64,
            wall.as_secs_f64() * 1000.0 / scrapes as f64,
            scrapes + 1
        ),
        ratio: "-".into(),
        target: "no API call per scrape once the token is cached".into(),
    });
    Ok(())
}

/// curl's output; an error if it fails.
async fn curl(args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new("curl")
        .arg("-s")
        .args(args)
        .output()
        .await
        .context("running curl")?;
    anyhow::ensure!(output.status.success(), "curl {args:?} failed");
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
