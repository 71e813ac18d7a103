//! Network namespaces for tests of firewalls, partitions and proxies: a
//! "management" namespace runs tether-server, a "customer" namespace runs
//! tether-agent and the kube-apiserver double behind a firewall that admits
//! no inbound connection. Either a veth pair joins them directly, or a
//! third "proxy" namespace sits between them and the customer has no route
//! to the management side but through it (198.18.0.0/15, the range RFC 2544
//! sets aside for such tests). curl is the client; its exit code tells a
//! complete response from a visible error.
//!
//! Needs root, `ip netns` and `nft`; without them the tests say SKIP and
//! pass. CI installs nftables and runs them as root.

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::procs::{Proc, agent_flags};
use super::{Pki, cluster_json};
use tether::fake_apiserver::FakeApiServer;
use tether::pki::LeafRequest;

pub const AGENT_TOKEN: &str = "netns-agent-token-5e1f";
pub const SA_TOKEN: &str = "netns-sa-token-c2d4";
pub const PUBLIC_PORT: u16 = 8443;
pub const INTERNAL_PORT: u16 = 8080;
pub const HEALTH_PORT: u16 = 8081;
/// Metrics ports (server and agent, each in its own namespace; loopback).
pub const METRICS_PORT: u16 = 8082;
pub const KEEPALIVE: &str = "1s";
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
pub const WAIT: Duration = Duration::from_secs(20);

/// The direct topology: management and customer on one link.
pub const DIRECT: Addresses = Addresses {
    server: "198.18.0.1",
    customer: "198.18.0.2",
    proxy_customer_side: None,
};
/// The proxied topology: customer 198.18.1.2 – 198.18.1.1 proxy
/// 198.18.2.1 – 198.18.2.2 management. The proxy namespace does not
/// forward packets, so only a proxy process there joins the two.
pub const PROXIED: Addresses = Addresses {
    server: "198.18.2.2",
    customer: "198.18.1.2",
    proxy_customer_side: Some("198.18.1.1"),
};
const PROXY_SERVER_SIDE: &str = "198.18.2.1";

#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    pub server: &'static str,
    pub customer: &'static str,
    /// The proxy's address as the customer sees it.
    pub proxy_customer_side: Option<&'static str>,
}

/// Why these tests cannot run here, if they cannot.
pub fn unavailable(tools: &[&str]) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    let checks = [("ip", "netns"), ("nft", "--version"), ("curl", "--version")];
    let extra = tools.iter().map(|tool| (*tool, "-v"));
    for (tool, arg) in checks.into_iter().chain(extra) {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!("`{tool} {arg}` is unavailable"));
        }
    }
    None
}

/// True (after a SKIP line) when namespaces, or `tools`, are unavailable.
pub fn skip(tools: &[&str]) -> bool {
    match unavailable(tools) {
        Some(why) => {
            eprintln!("SKIP: network-namespace test: {why}");
            true
        }
        None => false,
    }
}

pub fn run(args: &[&str]) {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|err| panic!("{args:?}: {err}"));
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The namespaces of one test, joined by veth pairs; removed on drop.
pub struct Net {
    pub management: String,
    pub customer: String,
    pub proxy: Option<String>,
    pub addresses: Addresses,
}

impl Net {
    /// Management and customer joined directly.
    pub fn new(test: &str) -> Self {
        Self::build(test, DIRECT)
    }

    /// Customer and management joined only through a proxy namespace; the
    /// server's firewall admits the proxy's address alone.
    pub fn with_proxy(test: &str) -> Self {
        Self::build(test, PROXIED)
    }

    fn build(test: &str, addresses: Addresses) -> Self {
        // Short names: an interface name has at most 15 bytes.
        let tag = format!("{}{}", std::process::id() % 100_000, test);
        let net = Self {
            management: format!("tm{tag}"),
            customer: format!("tc{tag}"),
            proxy: addresses.proxy_customer_side.map(|_| format!("tp{tag}")),
            addresses,
        };
        for ns in net.namespaces() {
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let (m, c) = (net.management.as_str(), net.customer.as_str());
        match (&net.proxy, addresses.proxy_customer_side) {
            (Some(p), Some(proxy_ip)) => {
                link(&format!("a{tag}"), (c, addresses.customer), (p, proxy_ip));
                link(
                    &format!("b{tag}"),
                    (p, PROXY_SERVER_SIDE),
                    (m, addresses.server),
                );
                // Only the proxy reaches tether-server's public port.
                net.nft(
                    m,
                    &format!(
                        "table inet management {{
                            chain input {{
                                type filter hook input priority 0; policy accept;
                                tcp dport {PUBLIC_PORT} ip saddr != {PROXY_SERVER_SIDE} drop
                            }}
                        }}"
                    ),
                );
            }
            _ => link(&tag, (m, addresses.server), (c, addresses.customer)),
        }
        // The customer's firewall: replies to its own outbound connections
        // come in; nothing else does.
        net.nft(
            c,
            "table inet customer {
                chain input {
                    type filter hook input priority 0; policy drop;
                    iifname \"lo\" accept
                    ct state established,related accept
                }
            }",
        );
        net
    }

    fn namespaces(&self) -> impl Iterator<Item = &str> {
        [
            Some(&self.management),
            Some(&self.customer),
            self.proxy.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(String::as_str)
    }

    pub fn nft(&self, ns: &str, ruleset: &str) {
        run(&["ip", "netns", "exec", ns, "nft", ruleset]);
    }

    /// Drops every packet to and from the customer namespace.
    pub fn cut(&self) {
        self.nft(
            &self.customer,
            "table inet cut {
                chain input { type filter hook input priority -10; iifname != \"lo\" drop; }
                chain output { type filter hook output priority -10; oifname != \"lo\" drop; }
            }",
        );
    }

    pub fn heal(&self) {
        self.nft(&self.customer, "delete table inet cut");
    }

    pub fn command(&self, ns: &str, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns, program]);
        command
    }

    /// A listener created inside `ns`: a socket keeps the namespace it was
    /// made in, so the test's runtime can serve it from any thread.
    pub fn listener(&self, ns: &str, addr: &str) -> std::net::TcpListener {
        let path = format!("/var/run/netns/{ns}");
        let addr = addr.to_owned();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("namespace file");
            // SAFETY: a valid namespace fd, and this thread is ours alone.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            let listener = std::net::TcpListener::bind(addr).expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            listener
        })
        .join()
        .expect("listener thread")
    }
}

/// A veth pair `v{tag}`/`w{tag}` from `a` to `b`, with a /30 on each end.
fn link(tag: &str, (a, ip_a): (&str, &str), (b, ip_b): (&str, &str)) {
    let (veth_a, veth_b) = (format!("v{tag}"), format!("w{tag}"));
    run(&[
        "ip", "link", "add", &veth_a, "netns", a, "type", "veth", "peer", "name", &veth_b, "netns",
        b,
    ]);
    for (ns, dev, ip) in [(a, &veth_a, ip_a), (b, &veth_b, ip_b)] {
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ip}/30"),
            "dev",
            dev,
        ]);
        run(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.namespaces() {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// Server in the management namespace, agent and API server double in the
/// customer namespace.
pub struct World {
    pub net: Net,
    pub pki: Pki,
    pub backend: FakeApiServer,
}

impl World {
    pub async fn new(net: Net) -> Self {
        let pki = Pki::new();
        let ips = [net.addresses.server, "127.0.0.1"].map(|ip| ip.parse().expect("ip"));
        pki.issue(
            "public",
            &LeafRequest::server("tether-server", &[], &ips, Duration::from_secs(3600)),
        );
        std::fs::write(pki.path("agent-token"), AGENT_TOKEN).expect("agent token");
        let listener = net.listener(&net.customer, "127.0.0.1:0");
        let backend = pki
            .apiserver(
                tokio::net::TcpListener::from_std(listener).expect("listener"),
                SA_TOKEN,
            )
            .await;
        std::fs::write(
            pki.path("clusters.json"),
            cluster_json(&[("dev", AGENT_TOKEN, &backend.addr.to_string())]),
        )
        .expect("clusters");
        Self { net, pki, backend }
    }

    pub fn log_path(&self, name: &str) -> std::path::PathBuf {
        self.pki.path(&format!("{name}.log"))
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .expect("log")
    }

    /// The last lines of each process's log, for a failure message.
    pub fn logs(&self) -> String {
        ["server", "agent"]
            .iter()
            .map(|name| {
                let log = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                format!("--- {name} log:\n{tail}\n")
            })
            .collect()
    }

    pub fn server(&self) -> Proc {
        let mut command = self
            .net
            .command(&self.net.management, env!("CARGO_BIN_EXE_tether-server"));
        command
            .args([
                "--addr",
                &format!("{}:{PUBLIC_PORT}", self.net.addresses.server),
            ])
            .args(["--internal-addr", &format!("127.0.0.1:{INTERNAL_PORT}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{METRICS_PORT}")])
            .args(["--metrics-auth", "none"])
            .arg("--clusters")
            .arg(self.pki.path("clusters.json"))
            .arg("--tls-cert")
            .arg(self.pki.path("public.crt"))
            .arg("--tls-key")
            .arg(self.pki.path("public.key"))
            .args(["--keepalive-interval", KEEPALIVE])
            .args([
                "--keepalive-timeout",
                &format!("{}s", KEEPALIVE_TIMEOUT.as_secs()),
            ])
            .args(["--log-level", "debug"])
            .env("CLUSTERS", "[]");
        self.spawn(command, "server")
    }

    /// tether-agent in the customer namespace, dialing the server's address;
    /// `extra` flags and `env` on top (the proxy settings under test).
    pub fn agent(&self, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        let url = format!("wss://{}:{PUBLIC_PORT}", self.net.addresses.server);
        self.agent_with(&url, extra, env)
    }

    /// tether-agent dialing `server_url`.
    pub fn agent_with(&self, server_url: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut command = self
            .net
            .command(&self.net.customer, env!("CARGO_BIN_EXE_tether-agent"));
        agent_flags(
            &mut command,
            &self.pki,
            server_url,
            &self.pki.path("agent-token"),
            &self.backend.addr.to_string(),
        )
        // As in a pod: the health port on every address of the namespace.
        .args(["--health-addr", &format!("0.0.0.0:{HEALTH_PORT}")])
        .args(["--metrics-addr", &format!("127.0.0.1:{METRICS_PORT}")])
        .args(["--metrics-auth", "none"])
        .args(["--keepalive-interval", KEEPALIVE])
        .args([
            "--keepalive-timeout",
            &format!("{}s", KEEPALIVE_TIMEOUT.as_secs()),
        ])
        .args(["--max-retry", "1s", "--log-level", "debug"])
        .args(extra)
        .envs(env.iter().copied());
        self.spawn(command, "agent")
    }

    fn spawn(&self, mut command: Command, name: &str) -> Proc {
        Proc(
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(self.log(name))
                .spawn()
                .unwrap_or_else(|err| panic!("{name}: {err}")),
        )
    }

    /// curl in `ns`: (exit code, HTTP status, body).
    pub async fn curl(&self, ns: &str, url: &str, extra: &[&str]) -> (i32, String, Vec<u8>) {
        let output = tokio::process::Command::new("ip")
            .args(["netns", "exec", ns, "curl", "-sS", "--max-time", "30"])
            .args(["-w", "\n%{http_code}"])
            .args(extra)
            .arg(url)
            .output()
            .await
            .expect("curl");
        let mut body = output.stdout;
        let split = body.iter().rposition(|&b| b == b'\n').unwrap_or(0);
        let status = String::from_utf8_lossy(&body[split..]).trim().to_owned();
        body.truncate(split);
        (output.status.code().unwrap_or(-1), status, body)
    }

    /// A request to the server's internal port, from the management side.
    pub async fn management(&self, path: &str, extra: &[&str]) -> (i32, String, Vec<u8>) {
        let url = format!("https://127.0.0.1:{INTERNAL_PORT}{path}");
        let ca = self.pki.path("ca.crt");
        let mut args = vec!["--cacert", ca.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        self.curl(&self.net.management, &url, &args).await
    }

    /// The agent's health port, from inside the customer namespace.
    pub async fn agent_health(&self, path: &str) -> (String, String) {
        let url = format!("http://127.0.0.1:{HEALTH_PORT}{path}");
        let (_, status, body) = self
            .curl(&self.net.customer, &url, &["--max-time", "2"])
            .await;
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// The agent's metrics, from inside the customer namespace.
    pub async fn agent_metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{METRICS_PORT}/metrics");
        let (_, _, body) = self
            .curl(&self.net.customer, &url, &["--max-time", "2"])
            .await;
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Polls the server's metrics until the agent is (or is not)
    /// connected; the time it took.
    pub async fn wait_connected(&self, connected: bool) -> Duration {
        let started = Instant::now();
        let expected = format!("agents_connected {}", u8::from(connected));
        loop {
            let url = format!("http://127.0.0.1:{METRICS_PORT}/metrics");
            let (_, _, body) = self
                .curl(&self.net.management, &url, &["--max-time", "2"])
                .await;
            if String::from_utf8_lossy(&body)
                .lines()
                .any(|l| l == expected)
            {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < WAIT,
                "the agent never became {}connected\n{}",
                if connected { "" } else { "dis" },
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
