//! The real tether-server and tether-agent binaries as child processes
//! against the API server double, for tests that signal, kill or measure
//! them.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tether::fake_apiserver::FakeApiServer;
use tokio::net::TcpListener;

use super::{Pki, TestClient, WAIT, cluster_json};

pub const AGENT_TOKEN: &str = "agent-token-4f9a1c0e7d";
pub const SA_TOKEN: &str = "sa-token-b83e22d1f6";
pub const CALLER_TOKEN: &str = "caller-token-77ac0b9e";
pub const WRONG_TOKEN: &str = "wrong-token-3d1e5f02";

pub struct Proc(pub Child);

impl Proc {
    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Resident memory (VmRSS) in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id()))
            .expect("process status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A log file a child process appends its stderr to.
pub fn log_file(path: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("log")
}

pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{name}");
}

/// `n` distinct free ports: all held at once while chosen, so the kernel
/// cannot hand the same one out twice.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

pub struct World {
    pub pki: Pki,
    pub backend: FakeApiServer,
    pub clusters: PathBuf,
    pub public: u16,
    pub internal: u16,
    /// Free for a probe port (`--health-addr`).
    pub health: u16,
    /// The server's metrics port (`--metrics-addr`).
    pub metrics: u16,
}

impl World {
    pub async fn new() -> Self {
        let pki = Pki::new();
        let backend = pki
            .apiserver(
                TcpListener::bind("127.0.0.1:0").await.expect("bind"),
                SA_TOKEN,
            )
            .await;
        let clusters = pki.path("clusters.json");
        std::fs::write(
            &clusters,
            cluster_json(&[("dev", AGENT_TOKEN, &backend.addr.to_string())]),
        )
        .expect("clusters");
        // One batch: ports picked one by one can repeat.
        let ports = free_ports(4);
        Self {
            pki,
            backend,
            clusters,
            public: ports[0],
            internal: ports[1],
            health: ports[2],
            metrics: ports[3],
        }
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.pki.path(&format!("{name}.log"))
    }

    pub fn server(&self, extra: &[&str]) -> Proc {
        let log = log_file(&self.log("server"));
        Proc(
            Command::new(env!("CARGO_BIN_EXE_tether-server"))
                .args(["--addr", &format!("127.0.0.1:{}", self.public)])
                .args(["--internal-addr", &format!("127.0.0.1:{}", self.internal)])
                .args(["--metrics-addr", &format!("127.0.0.1:{}", self.metrics)])
                .args(["--metrics-auth", "none"])
                .arg("--clusters")
                .arg(&self.clusters)
                .arg("--tls-cert")
                .arg(self.pki.path("server.crt"))
                .arg("--tls-key")
                .arg(self.pki.path("server.key"))
                .args(["--log-level", "trace", "--keepalive-interval", "1s"])
                .args(extra)
                .env("CLUSTERS", "[]")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("tether-server starts"),
        )
    }

    pub fn agent(&self, token: &str) -> Proc {
        let log = log_file(&self.log("agent"));
        let token_file = self.pki.path(&format!("token-{token}"));
        std::fs::write(&token_file, token).expect("token");
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether-agent"));
        agent_flags(
            &mut command,
            &self.pki,
            &format!("wss://localhost:{}", self.public),
            &token_file,
            &self.backend.addr.to_string(),
        )
        .args(["--health-addr", "127.0.0.1:0"])
        .args(["--log-level", "trace", "--max-retry", "30s"])
        .args(["--keepalive-interval", "1s"]);
        Proc(
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("tether-agent starts"),
        )
    }

    pub fn client(&self) -> TestClient {
        TestClient::new(Some(&self.pki.path("ca.crt")), None)
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.internal)
    }

    /// The server's metrics port (plain HTTP in tests).
    pub fn metrics_url(&self) -> String {
        format!("http://localhost:{}/metrics", self.metrics)
    }

    /// Waits until the server reports an agent connected (its metrics).
    pub async fn wait_ready(&self) -> Duration {
        wait_agents(&self.client(), &self.metrics_url(), 1).await
    }
}

/// Waits until the server whose metrics are at `metrics_url` has `count`
/// agents connected.
pub async fn wait_agents(client: &TestClient, metrics_url: &str, count: usize) -> Duration {
    let started = Instant::now();
    let expected = format!("agents_connected {count}");
    loop {
        if let Ok(answer) = client
            .request(http::Method::GET, metrics_url, &[], Default::default())
            .await
            && answer.text().lines().any(|l| l == expected)
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < WAIT,
            "{metrics_url} never showed {expected}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// tether-agent's flags for a test: its server, token file and target, and
/// the test CA (which signed both the server and the API server double).
pub fn agent_flags<'a>(
    command: &'a mut Command,
    pki: &Pki,
    server: &str,
    token_file: &std::path::Path,
    target: &str,
) -> &'a mut Command {
    command
        .args(["--server", server])
        .arg("--token-file")
        .arg(token_file)
        .args(["--target", target])
        .arg("--sa-token-path")
        .arg(pki.path("sa-token"))
        .arg("--ca-cert")
        .arg(pki.path("ca.crt"))
        .arg("--server-ca-cert")
        .arg(pki.path("ca.crt"))
}
