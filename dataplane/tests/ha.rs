//! High availability with real processes: three tether-server replicas
//! behind a real TCP load balancer (Debian's haproxy, started here with its
//! own config, health-checking each replica's /readyz) on both ports, mTLS
//! everywhere, and real agents. Skipped with a clear message when haproxy
//! is missing (`.ci/run` installs it).

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use sha2::{Digest, Sha256};
use support::procs::{Proc, agent_flags, free_ports, log_file, signal, wait_agents};
use support::{Pki, TestClient, WAIT, cluster_json};
use tether::fake_apiserver::FakeApiServer;
use tokio::net::TcpListener;

const DEV_TOKEN: &str = "dev-agent-token-5e1f";
const PIN_TOKEN: &str = "pinned-agent-token-a7c2";
const SA_TOKEN: &str = "ha-sa-token-19b4";
const REPLICAS: usize = 3;
const LOG_LEVEL: &str = "debug,hyper_util=info,rustls=info";

fn haproxy_available() -> bool {
    let found = Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!(
            "SKIP: haproxy not found (apt-get install haproxy); the HA tests need a real load balancer"
        );
    }
    found
}

/// One replica's ports; the same on every restart.
#[derive(Clone, Copy)]
struct Ports {
    public: u16,
    internal: u16,
    health: u16,
    metrics: u16,
}

struct Cluster {
    pki: Pki,
    backend: FakeApiServer,
    replicas: Vec<Ports>,
    servers: Vec<Option<Proc>>,
    lb_public: u16,
    lb_internal: u16,
    _haproxy: Proc,
}

impl Cluster {
    async fn start() -> Self {
        let pki = Pki::new();
        let backend = pki
            .apiserver(
                TcpListener::bind("127.0.0.1:0").await.expect("bind"),
                SA_TOKEN,
            )
            .await;
        let target = backend.addr.to_string();
        std::fs::write(
            pki.path("clusters.json"),
            cluster_json(&[("dev", DEV_TOKEN, &target), ("pin", PIN_TOKEN, &target)]),
        )
        .expect("clusters");
        pki.agent_identity("dev");
        pki.agent_identity("pin");
        let ports = free_ports(REPLICAS * 4 + 2);
        let replicas: Vec<Ports> = ports
            .chunks(4)
            .take(REPLICAS)
            .map(|p| Ports {
                public: p[0],
                internal: p[1],
                health: p[2],
                metrics: p[3],
            })
            .collect();
        let (lb_public, lb_internal) = (ports[REPLICAS * 4], ports[REPLICAS * 4 + 1]);
        let haproxy = haproxy(&pki, &replicas, lb_public, lb_internal);
        let mut cluster = Self {
            pki,
            backend,
            replicas,
            servers: (0..REPLICAS).map(|_| None).collect(),
            lb_public,
            lb_internal,
            _haproxy: haproxy,
        };
        for i in 0..REPLICAS {
            cluster.start_server(i);
        }
        cluster
    }

    fn name(i: usize) -> String {
        format!("replica-{i}")
    }

    fn start_server(&mut self, i: usize) {
        let ports = self.replicas[i];
        let peers: Vec<String> = self
            .replicas
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| format!("https://127.0.0.1:{}", p.internal))
            .collect();
        let log = log_file(&self.pki.path(&format!("server-{i}.log")));
        let child = Command::new(env!("CARGO_BIN_EXE_tether-server"))
            .args(["--addr", &format!("127.0.0.1:{}", ports.public)])
            .args(["--internal-addr", &format!("127.0.0.1:{}", ports.internal)])
            .args(["--health-addr", &format!("127.0.0.1:{}", ports.health)])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", ports.metrics)])
            .args(["--metrics-auth", "none"])
            .args(["--replica-name", &Self::name(i)])
            .args(["--peers", &peers.join(",")])
            .args(["--peer-sync-interval", "200ms"])
            .arg("--clusters")
            .arg(self.pki.path("clusters.json"))
            .arg("--tls-cert")
            .arg(self.pki.path("server.crt"))
            .arg("--tls-key")
            .arg(self.pki.path("server.key"))
            .arg("--tls-client-ca")
            .arg(self.pki.path("ca.crt"))
            .args(["--shutdown-delay", "1s", "--shutdown-grace", "5s"])
            .args(["--keepalive-interval", "1s", "--log-level", LOG_LEVEL])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tether-server starts");
        self.servers[i] = Some(Proc(child));
    }

    /// The cluster with agent "dev" dialing through the load balancer,
    /// once it holds a session with every replica.
    async fn with_agent() -> (Self, Proc) {
        let cluster = Self::start().await;
        let agent = cluster.agent("dev", DEV_TOKEN, cluster.lb_public);
        for i in 0..REPLICAS {
            cluster.wait_sessions(i, 1).await;
        }
        (cluster, agent)
    }

    /// SIGTERM, and waits for a clean exit.
    async fn stop_server(&mut self, i: usize) {
        let mut server = self.servers[i].take().expect("running");
        signal(&server.0, "TERM");
        let exited = tokio::task::spawn_blocking(move || {
            let status = server.0.wait();
            (server, status)
        });
        let (_, status) = tokio::time::timeout(Duration::from_secs(20), exited)
            .await
            .expect("replica exits within delay + grace")
            .expect("join");
        assert!(status.is_ok_and(|s| s.success()), "clean exit");
    }

    fn kill_server(&mut self, i: usize) {
        if let Some(mut server) = self.servers[i].take() {
            server.kill();
        }
    }

    fn agent(&self, cluster: &str, token: &str, server_port: u16) -> Proc {
        let token_file = self.pki.path(&format!("token-{cluster}"));
        std::fs::write(&token_file, token).expect("token");
        let (cert, key) = (
            self.pki.path(&format!("agent-{cluster}.crt")),
            self.pki.path(&format!("agent-{cluster}.key")),
        );
        let log = log_file(&self.pki.path(&format!("agent-{cluster}.log")));
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether-agent"));
        agent_flags(
            &mut command,
            &self.pki,
            &format!("wss://localhost:{server_port}"),
            &token_file,
            &self.backend.addr.to_string(),
        )
        .arg("--client-cert")
        .arg(cert)
        .arg("--client-key")
        .arg(key)
        .args(["--health-addr", "127.0.0.1:0"])
        .args([
            "--keepalive-interval",
            "1s",
            "--max-retry",
            "2s",
            "--log-level",
            LOG_LEVEL,
        ]);
        Proc(
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("tether-agent starts"),
        )
    }

    /// ArgoCD: the CA and its client certificate.
    fn argocd(&self) -> TestClient {
        TestClient::new(
            Some(&self.pki.path("ca.crt")),
            Some((&self.pki.path("argocd.crt"), &self.pki.path("argocd.key"))),
        )
    }

    fn replica_url(&self, i: usize, path: &str) -> String {
        format!("https://localhost:{}{path}", self.replicas[i].internal)
    }

    fn metrics_url(&self, i: usize) -> String {
        format!("http://localhost:{}/metrics", self.replicas[i].metrics)
    }

    fn lb_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.lb_internal)
    }

    /// Waits until replica `i` holds `count` agent sessions.
    async fn wait_sessions(&self, i: usize, count: usize) -> Duration {
        let waited = tokio::time::timeout(
            WAIT - Duration::from_secs(1),
            wait_agents(&self.argocd(), &self.metrics_url(i), count),
        )
        .await;
        waited
            .unwrap_or_else(|_| panic!("replica {i} never held {count} sessions\n{}", self.logs()))
    }

    async fn wait_healthy(&self, i: usize) -> Instant {
        let client = TestClient::new(None, None);
        let url = format!("http://127.0.0.1:{}/readyz", self.replicas[i].health);
        let started = Instant::now();
        loop {
            if client
                .request(Method::GET, &url, &[], Bytes::new())
                .await
                .is_ok_and(|a| a.status == StatusCode::OK)
            {
                return Instant::now();
            }
            assert!(
                started.elapsed() < WAIT,
                "replica {i} never ready\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for name in ["server-0", "server-1", "server-2", "agent-dev", "agent-pin"] {
            let text =
                std::fs::read_to_string(self.pki.path(&format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            all.push_str(&format!("--- {name} ---\n"));
            for line in tail.iter().rev() {
                all.push_str(line);
                all.push('\n');
            }
        }
        all
    }
}

/// haproxy in TCP mode in front of both ports, routing only to replicas
/// whose /readyz answers (checked every 200 ms on the health port).
fn haproxy(pki: &Pki, replicas: &[Ports], public: u16, internal: u16) -> Proc {
    let servers = |port: fn(&Ports) -> u16| {
        replicas
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "  server r{i} 127.0.0.1:{} check port {}\n",
                    port(p),
                    p.health
                )
            })
            .collect::<String>()
    };
    let backend = "  balance roundrobin\n  option httpchk GET /readyz\n  default-server inter 200ms fall 1 rise 1\n";
    let config = format!(
        "global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 120s\n  timeout server 120s\n  retries 3\n  option redispatch\n\
         frontend public\n  bind 127.0.0.1:{public}\n  default_backend public\n\
         backend public\n{backend}{}\
         frontend internal\n  bind 127.0.0.1:{internal}\n  default_backend internal\n\
         backend internal\n{backend}{}",
        servers(|p| p.public),
        servers(|p| p.internal),
    );
    let path: PathBuf = pki.path("haproxy.cfg");
    std::fs::write(&path, config).expect("haproxy config");
    let log = std::fs::File::create(pki.path("haproxy.log")).expect("log");
    let check = Command::new("haproxy")
        .args(["-c", "-f"])
        .arg(&path)
        .output()
        .expect("haproxy -c");
    assert!(
        check.status.success(),
        "haproxy refuses its config: {}",
        String::from_utf8_lossy(&check.stdout) + String::from_utf8_lossy(&check.stderr)
    );
    Proc(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("haproxy starts"),
    )
}

/// The agent reaches every replica through the load balancer; every
/// replica serves its cluster; an agent pinned to one replica is served by
/// all of them, with its own token, full bodies, a watch and `kubectl exec`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_serves_every_cluster() {
    if !haproxy_available() {
        return;
    }
    let cluster = Cluster::start().await;
    for i in 0..REPLICAS {
        cluster.wait_healthy(i).await;
    }
    let started = Instant::now();
    let _dev = cluster.agent("dev", DEV_TOKEN, cluster.lb_public);
    for i in 0..REPLICAS {
        cluster.wait_sessions(i, 1).await;
    }
    println!(
        "agent holds a session with all {REPLICAS} replicas {:?} after start",
        started.elapsed()
    );
    // The pinned agent dials replica 0 only (a NAT or sticky balancer).
    let _pinned = cluster.agent("pin", PIN_TOKEN, cluster.replicas[0].public);
    cluster.wait_sessions(0, 2).await;

    let client = cluster.argocd();
    for i in 0..REPLICAS {
        for id in ["dev", "pin"] {
            let answer = client
                .get_with(
                    &cluster.replica_url(i, &format!("/tunnel/{id}/version")),
                    &[("authorization", "Bearer argocd-must-not-pass")],
                )
                .await;
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "{id} via replica {i}: {}\n{}",
                answer.text(),
                cluster.logs()
            );
        }
    }
    assert!(
        cluster.backend.seen().iter().all(|r| r.authorized),
        "every request, forwarded or not, carried the agent's token and never the caller's"
    );
    for i in 1..REPLICAS {
        let metrics = client.get(&cluster.metrics_url(i)).await.text();
        assert!(
            metrics.contains("peer_forwarded_requests_total{result=\"ok\"}"),
            "replica {i} forwarded the pinned cluster's requests"
        );
    }

    // Full bodies both ways through a forwarding replica.
    let upload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let answer = client
        .request(
            Method::PUT,
            &cluster.replica_url(2, "/tunnel/pin/sink"),
            &[],
            Bytes::from(upload.clone()),
        )
        .await
        .expect("upload");
    let json = answer.json();
    assert_eq!(json["bytes"], upload.len());
    assert_eq!(json["sha256"], hex::encode(Sha256::digest(&upload)));
    let download = client
        .get(&cluster.replica_url(1, "/tunnel/pin/bytes?n=5000000"))
        .await;
    assert_eq!(download.body.len(), 5_000_000);

    // A watch, forwarded, streams every event.
    let watch = client
        .get(&cluster.replica_url(
            1,
            "/tunnel/pin/api/v1/namespaces/default/pods?watch=1&events=25&intervalMs=20",
        ))
        .await;
    assert_eq!(
        watch.text().lines().filter(|l| l.starts_with('{')).count(),
        25
    );

    // kubectl exec -i through a forwarding replica.
    if support::kubectl_available() {
        let kubeconfig = cluster.pki.path("argocd.kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://localhost:{}/tunnel/pin\n    certificate-authority: {}\nusers:\n- name: argocd\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: c\n  context: {{cluster: c, user: argocd}}\ncurrent-context: c\n",
                cluster.replicas[2].internal,
                cluster.pki.path("ca.crt").display(),
                cluster.pki.path("argocd.crt").display(),
                cluster.pki.path("argocd.key").display(),
            ),
        )
        .expect("kubeconfig");
        let out =
            support::kubectl_exec_cat(&["kubectl"], &[], &kubeconfig, "web", b"forwarded exec\n")
                .await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "forwarded exec\n");
    }

    // Only a replica may read another's state; ArgoCD's certificate may not.
    let state = client.get(&cluster.replica_url(0, "/replica")).await;
    assert_eq!(state.status, StatusCode::FORBIDDEN);
    // A forwarded request is never forwarded again: replica 1 has no
    // session of "pin" and must not pass it on.
    let once = client
        .get_with(
            &cluster.replica_url(1, "/tunnel/pin/version"),
            &[("x-tether-forwarded-by", "replica-0")],
        )
        .await;
    assert_eq!(once.status, StatusCode::BAD_GATEWAY, "{}", once.text());
}

/// Requests in a loop through the load balancer, each worker on its own
/// keep-alive client as client-go would be: (sent, failures).
fn steady_load(
    cluster: &Cluster,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(u64, Vec<String>)>> {
    (0..workers)
        .map(|w| {
            let client = cluster.argocd();
            let url = cluster.lb_url(if w % 2 == 0 {
                "/tunnel/dev/api/v1/namespaces"
            } else {
                "/tunnel/dev/version"
            });
            let stop = stop.clone();
            tokio::spawn(async move {
                let (sent, mut failures) = (AtomicU64::new(0), Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    sent.fetch_add(1, Ordering::Relaxed);
                    match client.request(Method::GET, &url, &[], Bytes::new()).await {
                        Ok(answer) if answer.status == StatusCode::OK => {}
                        Ok(answer) => {
                            failures.push(format!("{}: {}", answer.status, answer.text()))
                        }
                        Err(err) => failures.push(err),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (sent.into_inner(), failures)
            })
        })
        .collect()
}

/// Each replica in turn is stopped (SIGTERM) and started again while
/// keep-alive clients send requests through the load balancer: not one
/// request fails, and the agent holds a session on each new replica within
/// seconds of its becoming ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_fails_no_request() {
    if !haproxy_available() {
        return;
    }
    let (mut cluster, _dev) = Cluster::with_agent().await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(&cluster, 8, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..REPLICAS {
        cluster.stop_server(i).await;
        cluster.start_server(i);
        let ready = cluster.wait_healthy(i).await;
        cluster.wait_sessions(i, 1).await;
        println!(
            "replica {i} restarted: agent session {:?} after it became ready",
            ready.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut sent, mut failures) = (0, Vec::new());
    for worker in load {
        let (s, f) = worker.await.expect("worker");
        sent += s;
        failures.extend(f);
    }
    println!(
        "rolling restart of {REPLICAS} replicas: {} of {sent} requests failed",
        failures.len()
    );
    assert!(sent > 100, "the load ran ({sent} requests)");
    assert!(
        failures.is_empty(),
        "{} failed: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        cluster.logs()
    );
}

/// A replica killed outright: the others keep serving its cluster at once,
/// and it gets its sessions back when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_comes_back_to_its_sessions() {
    if !haproxy_available() {
        return;
    }
    let (mut cluster, _dev) = Cluster::with_agent().await;
    cluster.kill_server(1);
    let client = cluster.argocd();
    for i in [0, 2] {
        let answer = client
            .get(&cluster.replica_url(i, "/tunnel/dev/version"))
            .await;
        assert_eq!(answer.status, StatusCode::OK, "replica {i} serves on");
    }
    cluster.start_server(1);
    let ready = cluster.wait_healthy(1).await;
    cluster.wait_sessions(1, 1).await;
    println!(
        "killed replica back: agent session {:?} after it became ready",
        ready.elapsed()
    );
    let answer = client
        .get(&cluster.replica_url(1, "/tunnel/dev/version"))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
}
