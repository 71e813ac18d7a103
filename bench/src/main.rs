//! `make bench`: what the tunnel costs, measured side by side with the
//! direct path in the same run, on loopback, with TLS on every hop as in
//! production. Prints a table and writes BENCHMARKS.md.

mod external;
mod metrics;
mod proxy;
mod rig;
mod scale;
mod streams;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use clap::Parser;
use http::Method;
use http_body_util::BodyExt;

use rig::{Client, Rig, cpu_seconds};

#[derive(Debug, Parser)]
#[command(name = "tether-bench")]
struct Args {
    /// A few seconds instead of minutes: checks that the benchmark runs (CI).
    #[arg(long)]
    quick: bool,
    /// Where to write the report (default: BENCHMARKS.md; `-` for none).
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: String,
    /// Run only these groups of figures (default: all).
    #[arg(long, value_delimiter = ',', value_parser = GROUPS)]
    only: Vec<String>,
    /// Internal: run only the API server double, on the certificates in
    /// this directory (the concurrency benchmark's backend process).
    #[arg(long, hide = true)]
    serve_backend: Option<std::path::PathBuf>,
}

/// The groups of figures, in the order they run.
const GROUPS: [&str; 11] = [
    "throughput",
    "latency",
    "external",
    "proxy",
    "ha",
    "head-of-line",
    "concurrency",
    "idle-agents",
    "reconnect",
    "operator",
    "metrics",
];

/// One measured figure: the direct path, the tunnel, and what they mean.
struct Row {
    name: String,
    direct: String,
    tunnel: String,
    ratio: String,
    target: String,
}

fn mib_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}

/// Streams a download to the end; returns (bytes, wall time, CPU seconds of this process).
async fn download(
    client: &Client,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(u64, Duration, f64)> {
    let cpu = cpu_seconds();
    let started = Instant::now();
    let response = client.send(Method::GET, url, headers, Bytes::new()).await?;
    anyhow::ensure!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    let mut body = response.into_body();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            total += data.len() as u64;
        }
    }
    Ok((total, started.elapsed(), cpu_seconds() - cpu))
}

async fn upload(
    client: &Client,
    url: &str,
    headers: &[(&str, &str)],
    size: usize,
) -> Result<(Duration, f64)> {
    let body = Bytes::from(vec![0x5a; size]);
    let cpu = cpu_seconds();
    let started = Instant::now();
    let response = client.send(Method::PUT, url, headers, body).await?;
    anyhow::ensure!(
        response.status().is_success(),
        "PUT {url}: {}",
        response.status()
    );
    let _ = response.into_body().collect().await?;
    Ok((started.elapsed(), cpu_seconds() - cpu))
}

/// Latencies of `total` small GETs at `concurrency`; returns (p50, p99, requests/s).
async fn latency(
    client: &Client,
    url: &str,
    headers: &[(&str, &str)],
    concurrency: usize,
    total: usize,
) -> Result<(Duration, Duration, f64)> {
    let per_task = total / concurrency;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let url = url.to_owned();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        tasks.push(tokio::spawn(async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let mut samples = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let t = Instant::now();
                let response = client
                    .send(Method::GET, &url, &headers, Bytes::new())
                    .await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "status {}",
                    response.status()
                );
                let _ = response.into_body().collect().await?;
                samples.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(samples)
        }));
    }
    let mut all = Vec::with_capacity(total);
    for task in tasks {
        all.extend(task.await??);
    }
    let elapsed = started.elapsed();
    all.sort();
    let pick = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Ok((
        pick(0.50),
        pick(0.99),
        all.len() as f64 / elapsed.as_secs_f64(),
    ))
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

async fn throughput_rows(rows: &mut Vec<Row>, quick: bool) -> Result<()> {
    let size: u64 = if quick { 16 << 20 } else { 256 << 20 };
    let label = format!("{} MiB", size >> 20);
    for (tls, name, target) in [
        (false, "plain ws tunnel, plain client hop", "≥ 0.6×"),
        (true, "wss+mTLS tunnel, mTLS client hop", "≥ 0.45×"),
    ] {
        let rig = Rig::start(tls).await?;
        let direct_url = format!("{}/bytes?n={size}", rig.backend_url());
        let tunnel_url = format!("{}/tunnel/dev/bytes?n={size}", rig.internal_url());
        // Warm both paths (pools, TLS sessions).
        download(
            &rig.direct,
            &format!("{}/bytes?n=1048576", rig.backend_url()),
            &rig.direct_auth(),
        )
        .await?;
        download(
            &rig.client,
            &format!("{}/tunnel/dev/bytes?n=1048576", rig.internal_url()),
            &[],
        )
        .await?;
        let (bytes_d, time_d, cpu_d) =
            download(&rig.direct, &direct_url, &rig.direct_auth()).await?;
        let (bytes_t, time_t, cpu_t) = download(&rig.client, &tunnel_url, &[]).await?;
        anyhow::ensure!(bytes_d == size && bytes_t == size, "short download");
        let (rate_d, rate_t) = (mib_s(size, time_d), mib_s(size, time_t));
        let gib = size as f64 / (1u64 << 30) as f64;
        rows.push(Row {
            name: format!("GET {label} ({name})"),
            direct: format!("{rate_d:.0} MiB/s, {:.2} CPU-s/GiB", cpu_d / gib),
            tunnel: format!("{rate_t:.0} MiB/s, {:.2} CPU-s/GiB", cpu_t / gib),
            ratio: format!(
                "{:.2}× throughput, {:.2}× CPU/GiB",
                rate_t / rate_d,
                (cpu_t / gib) / (cpu_d / gib)
            ),
            target: format!("{target} throughput; CPU/GiB ≤ 2.2×"),
        });
        let (time_d, cpu_d) = upload(
            &rig.direct,
            &format!("{}/sink", rig.backend_url()),
            &rig.direct_auth(),
            size as usize,
        )
        .await?;
        let (time_t, cpu_t) = upload(
            &rig.client,
            &format!("{}/tunnel/dev/sink", rig.internal_url()),
            &[],
            size as usize,
        )
        .await?;
        let (rate_d, rate_t) = (mib_s(size, time_d), mib_s(size, time_t));
        rows.push(Row {
            name: format!("PUT {label} ({name})"),
            direct: format!("{rate_d:.0} MiB/s, {:.2} CPU-s/GiB", cpu_d / gib),
            tunnel: format!("{rate_t:.0} MiB/s, {:.2} CPU-s/GiB", cpu_t / gib),
            ratio: format!("{:.2}× throughput", rate_t / rate_d),
            target: "-".into(),
        });
        rig.stop().await;
    }
    Ok(())
}

async fn latency_rows(rows: &mut Vec<Row>, quick: bool) -> Result<()> {
    let rig = Rig::start(true).await?;
    let direct_url = format!("{}/bytes?n=1024", rig.backend_url());
    let tunnel_url = format!("{}/tunnel/dev/bytes?n=1024", rig.internal_url());
    let (single, many) = if quick { (200, 640) } else { (3000, 32000) };
    latency(&rig.direct, &direct_url, &rig.direct_auth(), 1, 50).await?;
    latency(&rig.client, &tunnel_url, &[], 1, 50).await?;
    let (d50, d99, _) = latency(&rig.direct, &direct_url, &rig.direct_auth(), 1, single).await?;
    let (t50, t99, _) = latency(&rig.client, &tunnel_url, &[], 1, single).await?;
    rows.push(Row {
        name: "GET 1 KiB, concurrency 1 (p50 / p99)".into(),
        direct: format!("{} / {}", us(d50), us(d99)),
        tunnel: format!("{} / {}", us(t50), us(t99)),
        ratio: format!("+{} p50", us(t50.saturating_sub(d50))),
        target: "added p50 ≤ 150 µs".into(),
    });
    let (d50, d99, drps) = latency(&rig.direct, &direct_url, &rig.direct_auth(), 64, many).await?;
    let (t50, t99, trps) = latency(&rig.client, &tunnel_url, &[], 64, many).await?;
    rows.push(Row {
        name: "GET 1 KiB, concurrency 64 (p50 / p99, req/s)".into(),
        direct: format!("{} / {}, {drps:.0}/s", us(d50), us(d99)),
        tunnel: format!("{} / {}, {trps:.0}/s", us(t50), us(t99)),
        ratio: format!("{:.2}× request rate", trps / drps),
        target: "≥ 0.4× request rate".into(),
    });
    rig.stop().await;
    Ok(())
}

/// High availability: a request to a replica that does not hold the
/// cluster's session is forwarded to one that does; what that hop adds, at
/// concurrency 1, with mTLS on every hop (two in-process replicas, the agent
/// on the first).
async fn forwarding_row(rows: &mut Vec<Row>, quick: bool) -> Result<()> {
    let setup = rig::Setup::new()?;
    let backend = tether::fake_apiserver::FakeApiServer::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        Some(setup.api_tls()),
        setup.sa_token.clone(),
    )
    .await?;
    let internal: [u16; 2] = rig::free_ports()?;
    let mut replicas = Vec::new();
    for (i, port) in internal.iter().enumerate() {
        let mut args = setup.server_args(
            true,
            "127.0.0.1:0",
            &format!("127.0.0.1:{port}"),
            backend.addr,
        )?;
        args.extend([
            "--replica-name".into(),
            format!("bench-{i}"),
            "--peers".into(),
            format!("https://127.0.0.1:{}", internal[1 - i]),
        ]);
        replicas.push(
            tether::server::RunningServer::start(tether::server::ServerArgs::parse_from(
                std::iter::once("tether-server".to_owned()).chain(args),
            ))
            .await?,
        );
    }
    let agent = tether::agent::Agent::start(tether::agent::AgentArgs::parse_from(
        std::iter::once("tether-agent".to_owned()).chain(setup.agent_args(
            true,
            replicas[0].public_addr.port(),
            backend.addr,
        )),
    ))
    .await?;
    let client = setup.client(true)?;
    let url = |i: usize| format!("https://localhost:{}/tunnel/dev/bytes?n=1024", internal[i]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while latency(&client, &url(1), &[], 1, 1).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "replica 1 never forwarded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = if quick { 200 } else { 3000 };
    latency(&client, &url(0), &[], 1, 50).await?;
    latency(&client, &url(1), &[], 1, 50).await?;
    let (l50, l99, _) = latency(&client, &url(0), &[], 1, total).await?;
    let (f50, f99, _) = latency(&client, &url(1), &[], 1, total).await?;
    rows.push(Row {
        name: "GET 1 KiB through a replica without the session, c=1 (p50 / p99; direct = the replica holding it)".into(),
        direct: format!("{} / {}", us(l50), us(l99)),
        tunnel: format!("{} / {}", us(f50), us(f99)),
        ratio: format!("+{} p50", us(f50.saturating_sub(l50))),
        target: "≤ +150 µs p50".into(),
    });
    agent.shutdown().await;
    for replica in replicas {
        replica.shutdown().await;
    }
    Ok(())
}

/// A fresh download while another stream on the same tunnel has stopped
/// reading (a paused watch holding its window), against the same download
/// on an idle tunnel.
async fn head_of_line_row(rows: &mut Vec<Row>, quick: bool) -> Result<()> {
    let rig = Rig::start(true).await?;
    let size: u64 = if quick { 16 << 20 } else { 128 << 20 };
    let url = format!("{}/tunnel/dev/bytes?n={size}", rig.internal_url());
    download(&rig.client, &url, &[]).await?;
    let (_, alone, _) = download(&rig.client, &url, &[]).await?;
    let stalled = rig
        .client
        .send(
            Method::GET,
            &format!("{}/tunnel/dev/bytes?n={}", rig.internal_url(), 1u64 << 34),
            &[],
            Bytes::new(),
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, beside, _) = download(&rig.client, &url, &[]).await?;
    drop(stalled);
    let (rate_alone, rate_beside) = (mib_s(size, alone), mib_s(size, beside));
    rows.push(Row {
        name: format!("GET {} MiB beside a stalled stream", size >> 20),
        direct: format!("{rate_alone:.0} MiB/s (idle tunnel)"),
        tunnel: format!("{rate_beside:.0} MiB/s"),
        ratio: format!("{:.2}×", rate_beside / rate_alone),
        target: "≥ 0.8×".into(),
    });
    rig.stop().await;
    Ok(())
}

/// N watches open at once through one tunnel, every party its own process.
async fn concurrency_rows(rows: &mut Vec<Row>, quick: bool) -> Result<()> {
    let sizes: &[usize] = if quick { &[100] } else { &[1000, 10000] };
    for &count in sizes {
        let outcome = streams::open_at_once(count).await?;
        rows.push(Row {
            name: format!("{count} streams at once on one tunnel (3-event watches, mTLS)"),
            direct: "-".into(),
            tunnel: format!(
                "all {count} complete in {:.1} s ({} open at the peak); peak RSS: server {} MiB, agent {} MiB (API server double {} MiB)",
                outcome.elapsed.as_secs_f64(),
                outcome.peak_open,
                outcome.server_peak_kib / 1024,
                outcome.agent_peak_kib / 1024,
                outcome.backend_peak_kib / 1024,
            ),
            ratio: "-".into(),
            target: "10,000 streams on one tunnel".into(),
        });
    }
    Ok(())
}

fn kib(rss_before: u64, rss_after: u64, agents: usize) -> f64 {
    rss_after.saturating_sub(rss_before) as f64 / agents as f64
}

/// Idle agents on one tether-server process: its memory per agent.
async fn idle_agents_rows(rows: &mut Vec<Row>, quick: bool) -> Result<()> {
    let sizes: &[usize] = if quick { &[100] } else { &[1000, 10000] };
    for &count in sizes {
        let fleet = scale::Fleet::new(count)?;
        let server = fleet.start_server()?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = server.rss_kib();
        let sessions = fleet.connect_all(64, Duration::from_secs(300)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = server.rss_kib();
        rows.push(Row {
            name: format!("{count} idle agents on one server (TLS, token auth)"),
            direct: "-".into(),
            tunnel: format!(
                "{:.1} KiB server memory per agent (RSS {} → {} MiB)",
                kib(before, after, count),
                before / 1024,
                after / 1024
            ),
            ratio: "-".into(),
            target: "≤ 20 KiB per idle agent".into(),
        });
        drop(sessions);
    }
    Ok(())
}

/// The server is killed and restarted: time until every agent is back and
/// a request through each of them succeeds.
async fn reconnect_row(rows: &mut Vec<Row>, quick: bool) -> Result<()> {
    let count = if quick { 100 } else { 1000 };
    let fleet = scale::Fleet::new(count)?;
    let server = fleet.start_server()?;
    let sessions = fleet.connect_all(64, Duration::from_secs(120)).await?;
    drop(server);
    let started = Instant::now();
    let _server = fleet.start_server()?;
    drop(sessions);
    let _sessions = fleet.connect_all(64, Duration::from_secs(120)).await?;
    let client = fleet.client()?;
    let ids: Vec<usize> = (0..count).collect();
    for chunk in ids.chunks(64) {
        let requests = chunk.iter().map(|i| {
            let url = format!(
                "https://localhost:{}/tunnel/c{i}/version",
                fleet.internal_port
            );
            let client = client.clone();
            async move {
                let response = client.send(Method::GET, &url, &[], Bytes::new()).await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "{url}: {}",
                    response.status()
                );
                Ok(())
            }
        });
        for result in futures::future::join_all(requests).await {
            result?;
        }
    }
    let elapsed = started.elapsed();
    rows.push(Row {
        name: format!("server restart: {count} agents back, one request through each"),
        direct: "-".into(),
        tunnel: format!("{:.2} s", elapsed.as_secs_f64()),
        ratio: "-".into(),
        target: "≤ 2 s for 1,000 agents".into(),
    });
    Ok(())
}

async fn operator_row(rows: &mut Vec<Row>, quick: bool) -> Result<()> {
    let count = if quick { 50 } else { 1000 };
    let elapsed = rig::reconcile_many(count).await?;
    rows.push(Row {
        name: format!("operator: reconcile {count} ProxiedClusters from scratch"),
        direct: "-".into(),
        tunnel: format!(
            "{:.1} s ({:.1} ms each)",
            elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1000.0 / count as f64
        ),
        ratio: "-".into(),
        target: "-".into(),
    });
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
            })
        })
        .map(|kib| format!("{:.0} GiB", kib as f64 / (1 << 20) as f64))
        .unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {memory} RAM; loopback; one process (client, tether-server, tether-agent, API server double)"
    )
}

fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| figure | direct | through tether | tether / direct | target |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.name, r.direct, r.tunnel, r.ratio, r.target
        );
    }
    out
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tether::install_crypto_provider();
    if let Some(dir) = &args.serve_backend {
        return streams::serve_backend(dir).await;
    }
    let started = Instant::now();
    let mut rows = Vec::new();
    let run = |group: &str| args.only.is_empty() || args.only.iter().any(|g| g == group);
    if run("throughput") {
        throughput_rows(&mut rows, args.quick).await?;
    }
    if run("latency") {
        latency_rows(&mut rows, args.quick).await?;
    }
    if run("external") {
        external::rows(&mut rows, args.quick).await?;
    }
    if run("proxy") {
        proxy::rows(&mut rows, args.quick).await?;
    }
    if run("ha") {
        forwarding_row(&mut rows, args.quick).await?;
    }
    if run("head-of-line") {
        head_of_line_row(&mut rows, args.quick).await?;
    }
    if run("concurrency") {
        concurrency_rows(&mut rows, args.quick).await?;
    }
    if run("idle-agents") {
        idle_agents_rows(&mut rows, args.quick).await?;
    }
    if run("reconnect") {
        reconnect_row(&mut rows, args.quick).await?;
    }
    if run("operator") {
        operator_row(&mut rows, args.quick).await?;
    }
    if run("metrics") {
        metrics::rows(&mut rows, args.quick).await?;
    }
    let table = table(&rows);
    println!("{table}");
    println!(
        "(ran in {:.0} s{})",
        started.elapsed().as_secs_f64(),
        if args.quick { ", quick mode" } else { "" }
    );
    if args.output != "-" {
        let report = format!(
            "# tether benchmarks\n\nWritten by `make bench` (`tether-bench`){}; do not edit by hand.\n\n\
             Machine: {}.\n\n\
             Every figure is measured in the same run for the direct path (client → API server double over TLS)\n\
             and through tether (client → tether-server → WebSocket tunnel → tether-agent → API server double).\n\
             CPU-s/GiB is the CPU time of the whole process (all parties) per GiB moved: the machine-independent\n\
             cost; the tunnel path does the TLS and framing work of two more hops.\n\n{table}\n{}",
            if args.quick { " in quick mode" } else { "" },
            machine(),
            // Profiles taken by hand: kept beside the benchmark, shown with its figures.
            include_str!("../small-requests.md")
        );
        std::fs::write(&args.output, report)?;
        println!("wrote {}", args.output);
    }
    Ok(())
}
