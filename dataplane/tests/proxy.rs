//! tether-agent behind a corporate HTTP proxy. Debian's squid, started by
//! each test with its own configuration, runs in a proxy namespace between
//! the customer and the management namespaces (`Net::with_proxy`): the
//! customer has no route to tether-server, and tether-server's firewall
//! admits the proxy's address alone. One in-process test plays a
//! TLS-intercepting proxy on loopback.
//!
//! The namespace tests need root, `ip netns`, `nft` and `squid`; without
//! them they say SKIP and pass. CI installs squid.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::netns::{self, AGENT_TOKEN, Net, SA_TOKEN, WAIT, World};
use support::procs::{Proc, signal};
use tether::pki::LeafRequest;

const PROXY_USER: &str = "alice";
const PROXY_PASSWORD: &str = "s3cret-proxy-pw";
const HTTP_PORT: u16 = 3128;
const HTTPS_PORT: u16 = 3129;

/// squid in the proxy namespace: basic auth against an htpasswd file,
/// CONNECT to tether-server's port only, a host named `blocked.test`
/// denied (`-n`: without a reverse lookup of IP destinations, which has
/// no DNS server to ask here), and an access log with every request header.
struct Squid {
    dir: tempfile::TempDir,
    namespace: String,
    address: &'static str,
    process: Option<Proc>,
}

impl Squid {
    fn start(world: &World, tls: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // squid drops to its own user: its files must be reachable.
        chmod(dir.path(), 0o777);
        let address = world
            .net
            .addresses
            .proxy_customer_side
            .expect("a proxied topology");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let hash = Command::new("openssl")
            .args(["passwd", "-apr1", PROXY_PASSWORD])
            .output()
            .expect("openssl passwd");
        std::fs::write(
            path("passwd"),
            format!(
                "{PROXY_USER}:{}",
                String::from_utf8_lossy(&hash.stdout).trim()
            ),
        )
        .expect("passwd");
        let https = if tls {
            let ip = address.parse().expect("ip");
            world.pki.issue(
                "proxy",
                &LeafRequest::server("proxy", &[], &[ip], Duration::from_secs(3600)),
            );
            for file in ["proxy.crt", "proxy.key"] {
                std::fs::copy(world.pki.path(file), path(file)).expect("copy");
                chmod(&dir.path().join(file), 0o644);
            }
            format!(
                "https_port {address}:{HTTPS_PORT} tls-cert={} tls-key={}\n",
                path("proxy.crt"),
                path("proxy.key")
            )
        } else {
            String::new()
        };
        std::fs::write(
            path("squid.conf"),
            format!(
                "http_port {address}:{HTTP_PORT}\n\
                 {https}\
                 pid_filename {pid}\n\
                 cache_log {cache_log}\n\
                 logformat tether %>a %un %rm %ru %>Hs %Ss [%>h]\n\
                 access_log stdio:{access_log} tether\n\
                 cache deny all\n\
                 auth_param basic program /usr/lib/squid/basic_ncsa_auth {passwd}\n\
                 auth_param basic realm tether-test\n\
                 acl authed proxy_auth REQUIRED\n\
                 acl tunnel_port port {port}\n\
                 acl blocked dstdomain -n blocked.test\n\
                 http_access deny CONNECT !tunnel_port\n\
                 http_access deny blocked\n\
                 http_access allow authed\n\
                 http_access deny all\n\
                 shutdown_lifetime 0 seconds\n",
                pid = path("squid.pid"),
                cache_log = path("cache.log"),
                access_log = path("access.log"),
                passwd = path("passwd"),
                port = netns::PUBLIC_PORT,
            ),
        )
        .expect("squid.conf");
        let mut squid = Self {
            dir,
            namespace: world.net.proxy.clone().expect("proxy namespace"),
            address,
            process: None,
        };
        squid.launch(world);
        squid
    }

    fn launch(&mut self, world: &World) {
        let conf = self.dir.path().join("squid.conf");
        let log = std::fs::File::create(self.dir.path().join("squid.out")).expect("log");
        let child = world
            .net
            .command(&self.namespace, "squid")
            .arg("-N")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("squid starts");
        self.process = Some(Proc(child));
        // Up once it answers anything from the customer side.
        let started = Instant::now();
        let url = format!("http://{}:{HTTP_PORT}/", self.address);
        while Command::new("ip")
            .args(["netns", "exec", &world.net.customer, "curl", "-s", "-o"])
            .args(["/dev/null", "--max-time", "1", &url])
            .status()
            .map_or(true, |s| !s.success())
        {
            assert!(
                started.elapsed() < WAIT,
                "squid did not start: {}",
                self.file("cache.log")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops squid as a service manager does (SIGTERM: it closes every
    /// tunnel and writes their log lines) and starts it again.
    fn restart(&mut self, world: &World) {
        self.stop();
        self.launch(world);
    }

    fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            signal(&process.0, "TERM");
            let _ = process.0.wait();
        }
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn url(&self, scheme: &str, port: u16) -> String {
        format!("{scheme}://{}:{port}", self.address)
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn skip() -> bool {
    netns::skip(&["squid"])
}

/// Waits until the agent's log has `needle`; the log.
async fn wait_for_log(world: &World, needle: &str) -> String {
    let started = Instant::now();
    loop {
        let log = std::fs::read_to_string(world.log_path("agent")).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(
            started.elapsed() < WAIT,
            "the agent never logged {needle:?}\n{}",
            world.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of an agent metric line that starts with `prefix`.
async fn agent_metric(world: &World, prefix: &str) -> f64 {
    world
        .agent_metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn version(world: &World) -> (i32, String) {
    let (code, status, _) = world.management("/tunnel/dev/version", &[]).await;
    (code, status)
}

/// The issue's case: configured by `HTTPS_PROXY` alone, the agent reaches
/// tether-server through squid with basic auth, serves a GET, a long watch
/// and `kubectl exec`, comes back after squid restarts, and squid's log
/// shows one CONNECT per tunnel session and no credential of the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_squid_with_basic_auth_get_watch_exec_and_a_proxy_restart() {
    if skip() {
        return;
    }
    let world = World::new(Net::with_proxy("p")).await;
    let _server = world.server();
    let mut squid = Squid::start(&world, false);
    let proxy = format!(
        "http://{PROXY_USER}:{PROXY_PASSWORD}@{}:{HTTP_PORT}",
        squid.address
    );
    let mut agent = world.agent(
        &[],
        &[
            ("HTTPS_PROXY", &proxy),
            (
                "NO_PROXY",
                "kubernetes.default.svc,.cluster.local,10.96.0.0/12",
            ),
        ],
    );
    world.wait_connected(true).await;
    assert_eq!(version(&world).await, (0, "200".into()));

    let (status, body) = world.agent_health("/readyz").await;
    assert_eq!(status, "200");
    assert_eq!(
        body.trim(),
        format!(
            "ok: connected through proxy {}",
            squid.url("http", HTTP_PORT)
        )
    );

    // A long watch: every event arrives, and the stream ends cleanly.
    let (code, status, body) = world
        .management(
            "/tunnel/dev/api/v1/namespaces/default/pods?watch=1&events=30&intervalMs=100",
            &[],
        )
        .await;
    let events = body
        .split(|&b| b == b'\n')
        .filter(|l| l.starts_with(b"{"))
        .count();
    assert_eq!((code, status.as_str(), events), (0, "200", 30));

    if support::kubectl_available() {
        let server = format!("https://127.0.0.1:{}/tunnel/dev", netns::INTERNAL_PORT);
        let ca = world.pki.path("ca.crt");
        let out = support::kubectl_exec_cat(
            &["ip", "netns", "exec", &world.net.management, "kubectl"],
            &[
                "--server",
                &server,
                "--certificate-authority",
                ca.to_str().expect("utf-8"),
                // Keeps kubectl from prompting for a password; the server
                // strips it.
                "--token",
                "management-side-token",
            ],
            Path::new("/dev/null"),
            "web",
            b"exec through the proxy\n",
        )
        .await;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "exec through the proxy\n"
        );
    }

    squid.restart(&world);
    // squid closed the tunnel: the agent dials again, through the new squid.
    let started = Instant::now();
    let mut served = version(&world).await;
    while served != (0, "200".into()) {
        assert!(started.elapsed() < WAIT, "{served:?}\n{}", world.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
        served = version(&world).await;
    }
    eprintln!("served again {:?} after squid restarted", started.elapsed());
    let sessions = agent_metric(&world, "agent_proxy_connects_total{result=\"ok\"}").await;
    assert!(sessions >= 2.0, "{sessions} tunnels through squid");

    // Stopping the agent closes its tunnel; squid logs a CONNECT when a
    // tunnel closes.
    signal(&agent.0, "TERM");
    let _ = agent.0.wait();
    squid.stop();
    let log = squid.file("access.log");
    let tunnels: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" CONNECT ") && l.contains(" 200 "))
        .collect();
    eprintln!(
        "{sessions} tunnel sessions through squid; its log:\n{}",
        tunnels.join("\n")
    );
    assert_eq!(
        tunnels.len() as f64,
        sessions,
        "one CONNECT per tunnel session:\n{log}"
    );
    let target = format!(
        "CONNECT {}:{}",
        world.net.addresses.server,
        netns::PUBLIC_PORT
    );
    for line in &tunnels {
        assert!(line.contains(&format!(" {PROXY_USER} {target} ")), "{line}");
        assert!(line.contains("Proxy-Authorization: Basic"), "{line}");
    }
    for secret in [
        AGENT_TOKEN,
        SA_TOKEN,
        "management-side-token",
        "Bearer",
        "Authorization: B",
    ] {
        let leaked = log
            .lines()
            .find(|l| l.replace("Proxy-Authorization: B", "").contains(secret));
        assert!(leaked.is_none(), "{secret:?} reached the proxy: {leaked:?}");
    }
    let agent_log = std::fs::read_to_string(world.log_path("agent")).unwrap_or_default();
    assert!(
        !agent_log.contains(PROXY_PASSWORD),
        "the agent logged the proxy password"
    );
}

/// 407 without credentials and with wrong ones, each said as such on
/// /readyz and in the log; the credentials file is read at every attempt,
/// so fixing it needs no restart. A host the proxy denies is a 403 with
/// squid's status line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refusals_are_clear_and_fixed_credentials_are_picked_up() {
    if skip() {
        return;
    }
    let world = World::new(Net::with_proxy("r")).await;
    let _server = world.server();
    let squid = Squid::start(&world, false);
    let credentials = world.pki.path("proxy-credentials");
    let flags = [
        "--proxy",
        &squid.url("http", HTTP_PORT),
        "--proxy-credentials-file",
        credentials.to_str().expect("utf-8"),
    ];
    let mut agent = world.agent(&flags, &[]);
    wait_for_log(&world, "the proxy credentials file does not exist").await;
    let (status, body) = world.agent_health("/readyz").await;
    assert_eq!(status, "503");
    assert!(body.contains("requires authentication (407"), "{body}");

    std::fs::write(&credentials, format!("{PROXY_USER}:wrong\n")).expect("write");
    wait_for_log(&world, "the proxy refused the credentials sent").await;
    std::fs::write(&credentials, format!("{PROXY_USER}:{PROXY_PASSWORD}\n")).expect("write");
    world.wait_connected(true).await;
    assert_eq!(version(&world).await, (0, "200".into()));
    let refused = agent_metric(
        &world,
        "agent_proxy_connects_total{result=\"auth_required\"}",
    )
    .await;
    assert!(refused >= 2.0, "{refused} refusals counted");
    agent.kill();

    let url = format!("wss://blocked.test:{}", netns::PUBLIC_PORT);
    let _agent = world.agent_with(&url, &flags, &[]);
    wait_for_log(
        &world,
        &format!(
            "proxy {} refused CONNECT to blocked.test:{}: 403 Forbidden",
            squid.url("http", HTTP_PORT),
            netns::PUBLIC_PORT
        ),
    )
    .await;
    let log = std::fs::read_to_string(world.log_path("agent")).unwrap_or_default();
    assert!(
        !log.contains(PROXY_PASSWORD),
        "the agent logged the proxy password"
    );
}

/// An https:// proxy whose certificate comes from a private CA: refused
/// without `--proxy-ca-cert` (said as such), used with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_with_a_private_ca() {
    if skip() {
        return;
    }
    let world = World::new(Net::with_proxy("h")).await;
    let _server = world.server();
    let squid = Squid::start(&world, true);
    let credentials = world.pki.path("proxy-credentials");
    std::fs::write(&credentials, format!("{PROXY_USER}:{PROXY_PASSWORD}")).expect("write");
    let proxy = squid.url("https", HTTPS_PORT);
    let flags = [
        "--proxy-credentials-file",
        credentials.to_str().expect("utf-8"),
    ];
    let mut agent = world.agent(&flags, &[("ALL_PROXY", &proxy)]);
    wait_for_log(&world, &format!("TLS to proxy {proxy} failed")).await;
    agent.kill();

    let ca = world.pki.path("ca.crt");
    let mut with_ca = flags.to_vec();
    with_ca.extend(["--proxy-ca-cert", ca.to_str().expect("utf-8")]);
    let _agent = world.agent(&with_ca, &[("ALL_PROXY", &proxy)]);
    world.wait_connected(true).await;
    assert_eq!(version(&world).await, (0, "200".into()));
    let (_, body) = world.agent_health("/readyz").await;
    assert!(body.contains(&format!("through proxy {proxy}")), "{body}");
}

/// NO_PROXY (lower-case here) sends the server past a proxy that does not
/// exist: the agent connects directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_bypasses_the_proxy() {
    if netns::skip(&[]) {
        return;
    }
    let world = World::new(Net::new("n")).await;
    let _server = world.server();
    let _agent = world.agent(
        &[],
        &[
            ("HTTPS_PROXY", "http://192.0.2.1:3128"),
            ("no_proxy", "example.com, 198.18.0.0/16"),
        ],
    );
    world.wait_connected(true).await;
    let (_, body) = world.agent_health("/readyz").await;
    assert_eq!(body.trim(), "ok: connected directly");
}

/// A proxy that answers CONNECT and then presents its own certificate (TLS
/// inspection): the agent refuses it and says the proxy may be
/// intercepting TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_intercepting_proxy_is_named() {
    let pki = support::Pki::new();
    let other_ca = tether::pki::CertificateAuthority::generate(
        "corporate inspection CA",
        Duration::from_secs(3600),
    )
    .expect("CA");
    let forged = other_ca
        .issue(&LeafRequest::server(
            "tether.test",
            &["tether.test"],
            &[],
            Duration::from_secs(3600),
        ))
        .expect("leaf");
    std::fs::write(pki.path("forged.crt"), &forged.cert_pem).expect("write");
    std::fs::write(pki.path("forged.key"), &forged.key_pem).expect("write");
    let config = tether::tls::ServerTlsFiles {
        cert: pki.path("forged.crt"),
        key: pki.path("forged.key"),
        client_ca: None,
    }
    .build(&[])
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut io, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                support::read_head(&mut io).await;
                let _ = io
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = acceptor.accept(io).await;
            });
        }
    });
    let token = pki.path("agent-token");
    std::fs::write(&token, "intercepted-token").expect("token");
    let args: Vec<String> = [
        "tether-agent",
        "--server",
        "wss://tether.test:8443",
        "--token-file",
        path(&token),
        "--server-ca-cert",
        path(&pki.path("ca.crt")),
        "--ca-cert",
        path(&pki.path("ca.crt")),
        "--health-addr",
        "127.0.0.1:0",
        "--max-retry",
        "1s",
        "--proxy",
        &format!("http://127.0.0.1:{port}"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    use clap::Parser;
    let agent = tether::agent::Agent::start(tether::agent::AgentArgs::parse_from(args))
        .await
        .expect("agent starts");
    let client = support::TestClient::new(None, None);
    let readyz = format!("http://{}/readyz", agent.health_addr);
    let started = Instant::now();
    loop {
        let answer = client.get(&readyz).await;
        let text = answer.text();
        if text.contains("may be intercepting TLS") {
            assert!(
                text.contains("pass tether.test:8443 through untouched"),
                "{text}"
            );
            break;
        }
        assert!(started.elapsed() < WAIT, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = agent.metrics.render();
    assert!(metrics.contains("agent_proxy_connects_total{result=\"intercepted\"}"));
    assert!(
        !metrics.contains("agent_proxy_connects_total{result=\"ok\"}"),
        "an intercepted connection counts once, as intercepted"
    );
    agent.shutdown().await;
}

fn path(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}
