//! Network faults across real network namespaces: a "management" namespace
//! runs tether-server, a "customer" namespace runs tether-agent and the
//! kube-apiserver double behind a firewall that admits no inbound
//! connection. A veth pair joins them (198.18.0.0/30, the range RFC 2544
//! sets aside for such tests). curl is the client, run in the management
//! namespace; its exit code tells a complete response from a visible error.
//!
//! Needs root, `ip netns` and `nft`; without them every test says SKIP and
//! passes. CI installs nftables and runs them as root.

mod support;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::procs::{Proc, agent_flags};
use support::{Pki, cluster_json};
use tether::fake_apiserver::FakeApiServer;
use tether::pki::LeafRequest;
use tether::tls::ServerTlsFiles;

const AGENT_TOKEN: &str = "netns-agent-token-5e1f";
const SA_TOKEN: &str = "netns-sa-token-c2d4";
const SERVER_IP: &str = "198.18.0.1";
const CUSTOMER_IP: &str = "198.18.0.2";
const PUBLIC_PORT: u16 = 8443;
const INTERNAL_PORT: u16 = 8080;
const HEALTH_PORT: u16 = 8081;
const KEEPALIVE: &str = "1s";
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(20);

/// Why these tests cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for (tool, arg) in [("ip", "netns"), ("nft", "--version"), ("curl", "--version")] {
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

macro_rules! require_netns {
    () => {
        if let Some(why) = unavailable() {
            eprintln!("SKIP: network-namespace test: {why}");
            return;
        }
    };
}

fn run(args: &[&str]) {
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

/// Two namespaces joined by a veth pair; removed on drop.
struct Net {
    management: String,
    customer: String,
}

impl Net {
    fn new(test: &str) -> Self {
        // Short names: an interface name has at most 15 bytes.
        let tag = format!("{}{}", std::process::id() % 100_000, test);
        let net = Self {
            management: format!("tm{tag}"),
            customer: format!("tc{tag}"),
        };
        let (m, c) = (net.management.as_str(), net.customer.as_str());
        let (veth_m, veth_c) = (format!("vm{tag}"), format!("vc{tag}"));
        run(&["ip", "netns", "add", m]);
        run(&["ip", "netns", "add", c]);
        run(&[
            "ip", "link", "add", &veth_m, "netns", m, "type", "veth", "peer", "name", &veth_c,
            "netns", c,
        ]);
        for (ns, dev, ip) in [(m, &veth_m, SERVER_IP), (c, &veth_c, CUSTOMER_IP)] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
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

    fn nft(&self, ns: &str, ruleset: &str) {
        run(&["ip", "netns", "exec", ns, "nft", ruleset]);
    }

    /// Drops every packet between the namespaces, both ways.
    fn cut(&self) {
        self.nft(
            &self.customer,
            "table inet cut {
                chain input { type filter hook input priority -10; iifname != \"lo\" drop; }
                chain output { type filter hook output priority -10; oifname != \"lo\" drop; }
            }",
        );
    }

    fn heal(&self) {
        self.nft(&self.customer, "delete table inet cut");
    }

    fn command(&self, ns: &str, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns, program]);
        command
    }

    /// A listener created inside `ns`: a socket keeps the namespace it was
    /// made in, so the test's runtime can serve it from any thread.
    fn listener(&self, ns: &str, addr: &str) -> std::net::TcpListener {
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

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.management, &self.customer] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// Server in the management namespace, agent and API server double in the
/// customer namespace.
struct World {
    net: Net,
    pki: Pki,
    backend: FakeApiServer,
}

impl World {
    async fn new(test: &str) -> Self {
        let net = Net::new(test);
        let pki = Pki::new();
        let ips = [SERVER_IP, "127.0.0.1"].map(|ip| ip.parse().expect("ip"));
        pki.issue(
            "public",
            &LeafRequest::server("tether-server", &[], &ips, Duration::from_secs(3600)),
        );
        std::fs::write(pki.path("sa-token"), SA_TOKEN).expect("sa token");
        std::fs::write(pki.path("agent-token"), AGENT_TOKEN).expect("agent token");
        let listener = net.listener(&net.customer, "127.0.0.1:0");
        let backend = FakeApiServer::start(
            tokio::net::TcpListener::from_std(listener).expect("listener"),
            Some(ServerTlsFiles {
                cert: pki.path("apiserver.crt"),
                key: pki.path("apiserver.key"),
                client_ca: None,
            }),
            pki.path("sa-token"),
        )
        .await
        .expect("backend");
        std::fs::write(
            pki.path("clusters.json"),
            cluster_json(&[("dev", AGENT_TOKEN, &backend.addr.to_string())]),
        )
        .expect("clusters");
        Self { net, pki, backend }
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.pki.path(&format!("{name}.log")))
            .expect("log")
    }

    /// The last lines of each process's log, for a failure message.
    fn logs(&self) -> String {
        ["server", "agent"]
            .iter()
            .map(|name| {
                let log = std::fs::read_to_string(self.pki.path(&format!("{name}.log")))
                    .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                format!("--- {name} log:\n{tail}\n")
            })
            .collect()
    }

    fn server(&self) -> Proc {
        let mut command = self
            .net
            .command(&self.net.management, env!("CARGO_BIN_EXE_tether-server"));
        command
            .args(["--addr", &format!("{SERVER_IP}:{PUBLIC_PORT}")])
            .args(["--internal-addr", &format!("127.0.0.1:{INTERNAL_PORT}")])
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

    fn agent(&self) -> Proc {
        let mut command = self
            .net
            .command(&self.net.customer, env!("CARGO_BIN_EXE_tether-agent"));
        agent_flags(
            &mut command,
            &self.pki,
            &format!("wss://{SERVER_IP}:{PUBLIC_PORT}"),
            &self.pki.path("agent-token"),
            &self.backend.addr.to_string(),
        )
        // As in a pod: the health port on every address of the namespace.
        .args(["--health-addr", &format!("0.0.0.0:{HEALTH_PORT}")])
        .args(["--keepalive-interval", KEEPALIVE])
        .args([
            "--keepalive-timeout",
            &format!("{}s", KEEPALIVE_TIMEOUT.as_secs()),
        ])
        .args(["--max-retry", "1s", "--log-level", "debug"]);
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
    async fn curl(&self, ns: &str, url: &str, extra: &[&str]) -> (i32, String, Vec<u8>) {
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

    async fn management(&self, path: &str, extra: &[&str]) -> (i32, String, Vec<u8>) {
        let url = format!("https://127.0.0.1:{INTERNAL_PORT}{path}");
        let ca = self.pki.path("ca.crt");
        let mut args = vec!["--cacert", ca.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        self.curl(&self.net.management, &url, &args).await
    }

    /// Polls the server's metrics until the agent is (or is not)
    /// connected; the time it took.
    async fn wait_connected(&self, connected: bool) -> Duration {
        let started = Instant::now();
        let expected = format!("agents_connected {}", u8::from(connected));
        loop {
            let (_, _, body) = self.management("/metrics", &["--max-time", "2"]).await;
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

/// The agent connects out of a customer namespace that admits no inbound
/// connection, and requests reach its API server; from the management side
/// nothing in the customer namespace can be reached, not even the agent's
/// health port, which answers inside the namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_only_customer_namespace() {
    require_netns!();
    let world = World::new("o").await;
    let _server = world.server();
    let _agent = world.agent();
    world.wait_connected(true).await;

    let (code, status, body) = world.management("/tunnel/dev/version", &[]).await;
    assert_eq!(
        (code, status.as_str()),
        (0, "200"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    let inside = format!("http://127.0.0.1:{HEALTH_PORT}/healthz");
    let (code, status, _) = world.curl(&world.net.customer, &inside, &[]).await;
    assert_eq!(
        (code, status.as_str()),
        (0, "200"),
        "health port inside the namespace"
    );
    for port in [HEALTH_PORT, world.backend.addr.port()] {
        let url = format!("http://{CUSTOMER_IP}:{port}/");
        let (code, _, _) = world
            .curl(&world.net.management, &url, &["--connect-timeout", "2"])
            .await;
        assert_eq!(
            code, 28,
            "connecting in to port {port} must time out (curl exit 28)"
        );
    }
}

/// Packets dropped both ways: the server notices within the keepalive
/// timeout, and the agent is back soon after the link returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_is_detected_and_the_agent_reconnects() {
    require_netns!();
    let world = World::new("l").await;
    let _server = world.server();
    let _agent = world.agent();
    world.wait_connected(true).await;

    world.net.cut();
    let noticed = world.wait_connected(false).await;
    eprintln!("server noticed the cut link after {noticed:?}");
    assert!(
        noticed <= KEEPALIVE_TIMEOUT + Duration::from_secs(2),
        "noticed after {noticed:?}"
    );
    let (code, status, _) = world.management("/tunnel/dev/version", &[]).await;
    assert_eq!(code, 0);
    assert!(
        status.starts_with('5'),
        "a request while cut fails visibly: {status}"
    );

    world.net.heal();
    let back = world.wait_connected(true).await;
    eprintln!("agent reconnected {back:?} after the link returned");
    let (code, status, _) = world.management("/tunnel/dev/version", &[]).await;
    assert_eq!((code, status.as_str()), (0, "200"));
}

/// The server killed mid-watch: curl reports an error (never a clean end of
/// a truncated stream); the agent reconnects to the restarted server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_watch_is_a_visible_error() {
    require_netns!();
    let world = World::new("s").await;
    let mut server = world.server();
    let _agent = world.agent();
    world.wait_connected(true).await;

    let path = "/tunnel/dev/api/v1/namespaces/default/pods?watch=1&events=100&intervalMs=100";
    let watch = world.management(path, &[]);
    let killing = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        server.kill();
    };
    let ((code, status, body), ()) = tokio::join!(watch, killing);
    let events = body
        .split(|&b| b == b'\n')
        .filter(|l| l.starts_with(b"{"))
        .count();
    assert_eq!(status, "200", "the watch had started");
    assert!(
        (1..100).contains(&events),
        "{events} events before the kill"
    );
    eprintln!("watch cut after {events} events: curl exit {code}");
    assert_ne!(code, 0, "curl must see the broken watch as an error");

    let _restarted = world.server();
    world.wait_connected(true).await;
    let (code, status, _) = world.management("/tunnel/dev/version", &[]).await;
    assert_eq!((code, status.as_str()), (0, "200"));
}

/// The agent killed mid-response: the caller sees an error, never a short
/// body presented as complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_request_is_a_visible_error() {
    require_netns!();
    let world = World::new("a").await;
    let _server = world.server();
    let mut agent = world.agent();
    world.wait_connected(true).await;

    let total = 64u64 << 20;
    let path = format!("/tunnel/dev/bytes?n={total}");
    let download = world.management(&path, &["--limit-rate", "4M", "-o", "/dev/null"]);
    let killing = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        agent.kill();
    };
    let ((code, status, _), ()) = tokio::join!(download, killing);
    eprintln!("download cut: curl exit {code}, status {status}");
    assert_ne!(
        code, 0,
        "curl must see the cut response as an error ({status})"
    );
    world.wait_connected(false).await;
}

/// The namespaces and veth pair are gone once a test ends.
#[test]
fn namespaces_are_removed() {
    require_netns!();
    let name = {
        let net = Net::new("r");
        net.customer.clone()
    };
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(&name));
    assert!(!Path::new(&format!("/var/run/netns/{name}")).exists());
}
