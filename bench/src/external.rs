//! Small requests measured from outside, as a user would: tether-server and
//! tether-agent as separate release processes, Debian's nginx with TLS as
//! the upstream (it checks the bearer token the agent injects), and `wrk`
//! as the load. Direct is wrk to nginx. Each figure is run twice and both
//! results are shown: the machine is noisy, and only same-run ratios count.
//!
//! wrk cannot present a client certificate, so the wss+mTLS setup (whose
//! internal port requires ArgoCD's certificate) is driven by the
//! benchmark's own client; a calibration row runs both clients against
//! nginx directly to show that client is not the bottleneck.
//!
//! With `TETHER_BENCH_RATHOLE` naming a rathole binary, the plain ws runs
//! also carry the same load through rathole's plain TCP tunnel, the peer
//! the targets were set against, so its figures come from the same run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::rig::{Process, SA_TOKEN, Setup, free_ports};
use crate::{Row, latency, us};

/// What one load run measured.
#[derive(Clone, Copy)]
struct Load {
    p50: Duration,
    p99: Duration,
    rate: f64,
    requests: f64,
}

fn installed(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// nginx on 127.0.0.1 with the API server's certificate: 1 KiB for a
/// request with the agent's token, 401 otherwise.
struct Nginx {
    _process: Process,
    port: u16,
}

impl Nginx {
    fn start(setup: &Setup) -> Result<Self> {
        let [port] = free_ports::<1>()?;
        let dir = setup.path("nginx");
        std::fs::create_dir_all(&dir)?;
        let body = "x".repeat(1023);
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\n\
                 pid {dir}/nginx.pid;\n\
                 error_log {dir}/error.log;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{\n\
                   access_log off;\n\
                   client_body_temp_path {dir};\n\
                   keepalive_requests 1000000;\n\
                   server {{\n\
                     listen 127.0.0.1:{port} ssl;\n\
                     ssl_certificate {cert};\n\
                     ssl_certificate_key {key};\n\
                     location / {{\n\
                       if ($http_authorization != \"Bearer {SA_TOKEN}\") {{ return 401; }}\n\
                       default_type application/json;\n\
                       return 200 \"{body}\\n\";\n\
                     }}\n\
                   }}\n\
                 }}\n",
                dir = dir.display(),
                cert = setup.api.0.display(),
                key = setup.api.1.display(),
            ),
        )?;
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off; master_process off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("nginx")?;
        let process = Process::from_child(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            _process: process,
            port,
        })
    }
}

/// `wrk` against `url`: its p50, p99 and request rate.
fn wrk(url: &str, connections: usize, seconds: u64, bearer: bool) -> Result<Load> {
    let mut command = Command::new("wrk");
    command
        .args(["-t", if connections > 1 { "2" } else { "1" }])
        .args(["-c", &connections.to_string()])
        .args(["-d", &format!("{seconds}s"), "--latency"]);
    if bearer {
        command.args(["-H", &format!("Authorization: Bearer {SA_TOKEN}")]);
    }
    let output = command.arg(url).output().context("wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success() && !text.contains("Non-2xx"),
        "wrk {url}: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let percentile = |label: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|v| parse_wrk_duration(v.trim()))
            .with_context(|| format!("wrk printed no {label} latency: {text}"))
    };
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("wrk printed no rate: {text}"))?;
    // "  123456 requests in 5.00s, 140.23MB read"
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(count, _)| count.parse().ok())
        .with_context(|| format!("wrk printed no request count: {text}"))?;
    Ok(Load {
        p50: percentile("50%")?,
        p99: percentile("99%")?,
        rate,
        requests,
    })
}

/// wrk's `123.45us`, `1.20ms`, `2.00s`.
fn parse_wrk_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "us" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

/// What every request asks nginx for (1 KiB), directly or through a
/// tunnel.
const PATH: &str = "/api/v1/namespaces/default";

/// A tunnel's two processes in front of nginx: the management side
/// (tether-server, or rathole's server) and the customer side
/// (tether-agent, or rathole's client), and the URL that reaches `PATH`
/// through them.
struct Tunnel {
    server: Process,
    agent: Process,
    url: String,
}

/// CPU time per request of a tunnel's two processes over a run: all of
/// it, and the part spent in the kernel.
#[derive(Clone, Copy)]
struct Cost {
    server: (Duration, Duration),
    agent: (Duration, Duration),
}

impl Tunnel {
    /// Runs `load` through the tunnel: what it measured and what each of
    /// the tunnel's processes spent per request.
    async fn measure(&self, load: impl Future<Output = Result<Load>>) -> Result<(Load, Cost)> {
        let before = (self.server.cpu_times(), self.agent.cpu_times());
        let load = load.await?;
        let per_request = |process: &Process, (user, system): (f64, f64)| {
            let (user_now, system_now) = process.cpu_times();
            let per = |seconds: f64| Duration::from_secs_f64(seconds / load.requests.max(1.0));
            (
                per(user_now - user + system_now - system),
                per(system_now - system),
            )
        };
        let cost = Cost {
            server: per_request(&self.server, before.0),
            agent: per_request(&self.agent, before.1),
        };
        Ok((load, cost))
    }
}

async fn tunnel(setup: &Setup, tls: bool, nginx: u16) -> Result<Tunnel> {
    let [public, internal, metrics] = free_ports::<3>()?;
    let backend = format!("127.0.0.1:{nginx}").parse()?;
    let mut server_args = setup.server_args(
        tls,
        &format!("127.0.0.1:{public}"),
        &format!("127.0.0.1:{internal}"),
        backend,
    )?;
    server_args.extend(crate::streams::metrics_flags(metrics));
    let server = Process::tether("tether-server", &server_args)?;
    let agent = Process::tether("tether-agent", &setup.agent_args(tls, public, backend))?;
    let scheme = if tls { "https" } else { "http" };
    let url = format!("{scheme}://localhost:{internal}/tunnel/dev{PATH}");
    crate::streams::wait_ready(&setup.client(tls)?, &crate::streams::metrics_url(metrics)).await?;
    Ok(Tunnel { server, agent, url })
}

/// Names the rathole binary that the plain ws runs compare against.
const RATHOLE: &str = "TETHER_BENCH_RATHOLE";

/// rathole's server and client, its plain TCP transport carrying wrk's
/// TLS connections to nginx byte for byte: no HTTP, no token injection.
async fn rathole(setup: &Setup, binary: &Path, nginx: u16) -> Result<Tunnel> {
    let [control, visitor] = free_ports::<2>()?;
    let dir = setup.path("rathole");
    std::fs::create_dir_all(&dir)?;
    let token = "bench-rathole-token";
    // Writes one side's configuration and starts it.
    let start = |name: &str, conf: String| -> Result<Process> {
        let path = dir.join(name);
        std::fs::write(&path, conf)?;
        let child = Command::new(binary)
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} ({RATHOLE})", binary.display()))?;
        Ok(Process::from_child(child))
    };
    let server = start(
        "server.toml",
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\n\
             [server.services.api]\ntoken = \"{token}\"\nbind_addr = \"127.0.0.1:{visitor}\"\n"
        ),
    )?;
    let agent = start(
        "client.toml",
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{control}\"\n\
             [client.services.api]\ntoken = \"{token}\"\nlocal_addr = \"127.0.0.1:{nginx}\"\n"
        ),
    )?;
    let url = format!("https://localhost:{visitor}{PATH}");
    // Ready once a request reaches nginx through it.
    let client = setup.client(true)?;
    let auth = format!("Bearer {SA_TOKEN}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answered = client
            .send(
                http::Method::GET,
                &url,
                &[("authorization", &auth)],
                Default::default(),
            )
            .await
            .is_ok_and(|r| r.status().is_success());
        if answered {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "rathole did not start carrying requests"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Tunnel { server, agent, url })
}

fn pair(a: Load, b: Load, show: impl Fn(Load) -> String) -> String {
    format!("{}; {}", show(a), show(b))
}

fn latency_text(load: Load) -> String {
    format!("{} / {}", us(load.p50), us(load.p99))
}

fn rate_text(load: Load) -> String {
    format!("{:.0}/s", load.rate)
}

/// What a tunnel measured in one run, at concurrency 1 and 64.
#[derive(Clone, Copy)]
struct Through {
    c1: (Load, Cost),
    c64: (Load, Cost),
}

/// One run of a setup: direct, and through one tunnel.
#[derive(Clone, Copy)]
struct Compared {
    direct_1: Load,
    direct_64: Load,
    tunnel: Through,
}

/// One run of the plain ws setup: tether, and the peer (when there is
/// one) against the same direct figures.
#[derive(Clone, Copy)]
struct Run {
    tether: Compared,
    peer: Option<Through>,
}

fn cost_text(cost: Cost) -> String {
    let part = |(all, kernel)| format!("{} ({} kernel)", us(all), us(kernel));
    format!("{} + {}", part(cost.server), part(cost.agent))
}

/// Two runs each of direct and a tunnel: the rows for concurrency 1 and
/// 64, and what the tunnel's processes spent. `targets` are tether's; a
/// peer has none.
fn push_rows(
    rows: &mut Vec<Row>,
    setup_name: &str,
    client: &str,
    runs: [Compared; 2],
    targets: Option<(&str, &str)>,
) {
    let [a, b] = runs;
    let added = |run: Compared| us(run.tunnel.c1.0.p50.saturating_sub(run.direct_1.p50));
    let ratio = |run: Compared| run.tunnel.c64.0.rate / run.direct_64.rate;
    let target = |pick: fn((&str, &str)) -> String| {
        targets.map_or_else(|| "reference, no target".to_owned(), pick)
    };
    rows.push(Row {
        name: format!("{setup_name}: GET 1 KiB c=1, {client}, two runs (p50 / p99)"),
        direct: pair(a.direct_1, b.direct_1, latency_text),
        tunnel: pair(a.tunnel.c1.0, b.tunnel.c1.0, latency_text),
        ratio: format!("+{} and +{} p50", added(a), added(b)),
        target: target(|t| format!("added p50 ≤ {}", t.0)),
    });
    rows.push(Row {
        name: format!("{setup_name}: GET 1 KiB c=64, {client}, two runs (req/s)"),
        direct: pair(a.direct_64, b.direct_64, rate_text),
        tunnel: pair(a.tunnel.c64.0, b.tunnel.c64.0, rate_text),
        ratio: format!("{:.2}× and {:.2}×", ratio(a), ratio(b)),
        target: target(|t| format!("≥ {} request rate", t.1)),
    });
    rows.push(Row {
        name: format!(
            "{setup_name}: CPU per request, management side + customer side, c=1 and c=64, two runs"
        ),
        direct: "-".into(),
        tunnel: format!(
            "c=1: {}; {} · c=64: {}; {}",
            cost_text(a.tunnel.c1.1),
            cost_text(b.tunnel.c1.1),
            cost_text(a.tunnel.c64.1),
            cost_text(b.tunnel.c64.1)
        ),
        ratio: "-".into(),
        target: "-".into(),
    });
}

/// The peer's rows, and tether beside it in the same runs; a row saying
/// why not when it did not run.
fn push_peer_rows(rows: &mut Vec<Row>, [a, b]: [Run; 2]) {
    let (Some(peer_a), Some(peer_b)) = (a.peer, b.peer) else {
        rows.push(Row {
            name: "peer: rathole, plain TCP tunnel".into(),
            direct: "-".into(),
            tunnel: "-".into(),
            ratio: format!("skipped: set {RATHOLE} to a rathole binary"),
            target: "-".into(),
        });
        return;
    };
    push_rows(
        rows,
        "peer: rathole, plain TCP tunnel",
        "wrk",
        [
            Compared {
                tunnel: peer_a,
                ..a.tether
            },
            Compared {
                tunnel: peer_b,
                ..b.tether
            },
        ],
        None,
    );
    let slower =
        |run: Run, peer: Through| us(run.tether.tunnel.c1.0.p50.saturating_sub(peer.c1.0.p50));
    let share = |run: Run, peer: Through| run.tether.tunnel.c64.0.rate / peer.c64.0.rate;
    rows.push(Row {
        name: "tether (plain ws) against rathole, the same runs: c=1 p50, c=64 req/s".into(),
        direct: "-".into(),
        tunnel: "-".into(),
        ratio: format!(
            "+{} and +{} p50; {:.2}× and {:.2}× the rate",
            slower(a, peer_a),
            slower(b, peer_b),
            share(a, peer_a),
            share(b, peer_b)
        ),
        target: "-".into(),
    });
}

/// wrk at `connections` against nginx directly, through the peer (when
/// there is one) and through tether, back to back.
async fn side_by_side(
    direct: &str,
    peer: Option<&Tunnel>,
    tether: &Tunnel,
    connections: usize,
    seconds: u64,
) -> Result<(Load, Option<(Load, Cost)>, (Load, Cost))> {
    let direct = wrk(direct, connections, seconds, true)?;
    let peer = match peer {
        Some(peer) => Some(
            peer.measure(async { wrk(&peer.url, connections, seconds, true) })
                .await?,
        ),
        None => None,
    };
    let tether = tether
        .measure(async { wrk(&tether.url, connections, seconds, false) })
        .await?;
    Ok((direct, peer, tether))
}

/// The benchmark's own client at `connections` concurrency for about
/// `seconds`, in wrk's terms.
async fn own_client(
    client: &crate::rig::Client,
    url: &str,
    bearer: bool,
    connections: usize,
    seconds: u64,
) -> Result<Load> {
    let auth = [("authorization", &*format!("Bearer {SA_TOKEN}"))];
    let headers: &[(&str, &str)] = if bearer { &auth } else { &[] };
    // Requests for about the time asked at the rate of a short probe.
    let (_, _, probe) = latency(client, url, headers, connections, connections * 50).await?;
    let total = ((probe * seconds as f64) as usize).max(connections * 100);
    let (p50, p99, rate) = latency(client, url, headers, connections, total).await?;
    Ok(Load {
        p50,
        p99,
        rate,
        // The probe's requests too: a caller's CPU figures cover both.
        requests: (connections * 50 + total / connections * connections) as f64,
    })
}

pub async fn rows(rows: &mut Vec<Row>, quick: bool) -> Result<()> {
    if !installed("nginx", "-v") || !installed("wrk", "-v") {
        rows.push(Row {
            name: "external: tether processes, nginx upstream, wrk load".into(),
            direct: "-".into(),
            tunnel: "-".into(),
            ratio: "skipped: nginx or wrk is not installed (apt install nginx wrk)".into(),
            target: "-".into(),
        });
        return Ok(());
    }
    let seconds = if quick { 1 } else { 5 };
    let setup = Setup::new()?;
    let nginx = Nginx::start(&setup)?;
    let direct = format!("https://localhost:{}{PATH}", nginx.port);

    // Plain ws tunnel, plain internal port: wrk on both paths.
    let plain = tunnel(&setup, false, nginx.port).await?;
    let peer = match std::env::var_os(RATHOLE) {
        Some(binary) => Some(rathole(&setup, Path::new(&binary), nginx.port).await?),
        None => None,
    };
    let run = async || -> Result<Run> {
        let (direct_1, peer_1, tether_1) =
            side_by_side(&direct, peer.as_ref(), &plain, 1, seconds).await?;
        let (direct_64, peer_64, tether_64) =
            side_by_side(&direct, peer.as_ref(), &plain, 64, seconds).await?;
        Ok(Run {
            tether: Compared {
                direct_1,
                direct_64,
                tunnel: Through {
                    c1: tether_1,
                    c64: tether_64,
                },
            },
            peer: peer_1.zip(peer_64).map(|(c1, c64)| Through { c1, c64 }),
        })
    };
    let runs = [run().await?, run().await?];
    drop((plain, peer));
    push_rows(
        rows,
        "external, plain ws",
        "wrk",
        runs.map(|r| r.tether),
        Some(("100 µs", "0.6×")),
    );
    push_peer_rows(rows, runs);

    // wss+mTLS: the internal port wants ArgoCD's certificate.
    let secure = tunnel(&setup, true, nginx.port).await?;
    let client = setup.client(true)?;
    let run = async || -> Result<Compared> {
        let direct_1 = own_client(&client, &direct, true, 1, seconds).await?;
        let c1 = secure
            .measure(own_client(&client, &secure.url, false, 1, seconds))
            .await?;
        let direct_64 = own_client(&client, &direct, true, 64, seconds).await?;
        let c64 = secure
            .measure(own_client(&client, &secure.url, false, 64, seconds))
            .await?;
        Ok(Compared {
            direct_1,
            direct_64,
            tunnel: Through { c1, c64 },
        })
    };
    let runs = [run().await?, run().await?];
    drop(secure);
    push_rows(
        rows,
        "external, wss+mTLS",
        "bench client",
        runs,
        Some(("150 µs", "0.45×")),
    );

    // Is the bench client the bottleneck? Both clients against nginx.
    let by_wrk = wrk(&direct, 64, seconds, true)?;
    let by_ours = own_client(&client, &direct, true, 64, seconds).await?;
    rows.push(Row {
        name: "calibration: nginx direct at c=64, wrk; bench client".into(),
        direct: pair(by_wrk, by_ours, rate_text),
        tunnel: "-".into(),
        ratio: format!("bench client at {:.2}× wrk", by_ours.rate / by_wrk.rate),
        target: "-".into(),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_durations() {
        assert_eq!(
            parse_wrk_duration("123.45us"),
            Some(Duration::from_secs_f64(123.45e-6))
        );
        assert_eq!(
            parse_wrk_duration("1.50ms"),
            Some(Duration::from_micros(1500))
        );
        assert_eq!(parse_wrk_duration("2.00s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_wrk_duration("fast"), None);
    }
}
