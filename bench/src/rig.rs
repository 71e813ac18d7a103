//! The benchmark's setup: certificates, the API server double, tether-server
//! and tether-agent on loopback, and clients for both paths.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tether::agent::{Agent, AgentArgs};
use tether::fake_apiserver::FakeApiServer;
use tether::pki::{CertificateAuthority, LeafRequest};
use tether::server::{RunningServer, ServerArgs};
use tether::tls::{self, ServerTlsFiles};

pub const SA_TOKEN: &str = "bench-serviceaccount-token";
const AGENT_TOKEN: &str = "bench-agent-token";
const HOUR: Duration = Duration::from_secs(3600);
/// tether-server's name when the agent reaches it through a proxy: the
/// agent never proxies loopback, and the proxy resolves this name itself.
pub const PROXIED_SERVER_NAME: &str = "tether-bench.test";

/// CPU time (user + system) this process has used, in seconds.
pub fn cpu_seconds() -> f64 {
    let (user, system) = cpu_times_of("self");
    user + system
}

/// User and system CPU time of process `pid` ("self" for this one), in
/// seconds.
fn cpu_times_of(pid: &str) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

/// A child process whose memory the benchmark reads; killed on drop.
pub struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    /// Its user and system CPU time so far, in seconds.
    pub fn cpu_times(&self) -> (f64, f64) {
        cpu_times_of(&self.0.id().to_string())
    }

    /// Starts one of tether's binaries, found beside this one.
    pub fn tether(binary: &str, args: &[String]) -> Result<Self> {
        let child = Command::new(sibling(binary)?)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        Ok(Self(child))
    }

    pub fn from_child(child: Child) -> Self {
        Self(child)
    }

    fn status_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.0.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The most resident memory the process has had, in KiB.
    pub fn peak_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }
}

/// One of tether's binaries, beside the benchmark's own (`make bench`
/// builds them).
fn sibling(name: &str) -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: build the binaries (cargo build --bins)",
        path.display()
    );
    Ok(path)
}

/// A free loopback port, for a child process to listen on.
/// `n` distinct free ports, all held while chosen: ports picked one by
/// one can repeat.
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let held = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&held) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// An HTTP/1.1 client with keep-alive, TLS when the URL says https.
#[derive(Clone)]
pub struct Client(HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>);

impl Client {
    pub fn new(roots: rustls::RootCertStore, identity: Option<(PathBuf, PathBuf)>) -> Result<Self> {
        let identity = match identity {
            Some((cert, key)) => Some((tls::load_certs(&cert)?, tls::load_key(&key)?)),
            None => None,
        };
        let config = tls::client_config(roots, identity)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Self(
            HyperClient::builder(TokioExecutor::new())
                .pool_max_idle_per_host(256)
                .build(connector),
        ))
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Response<Incoming>> {
        let mut request = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Ok(self.0.request(request.body(Full::new(body))?).await?)
    }
}

/// Certificates, tokens and the clusters file of one benchmark setup, in a
/// temporary directory, and the flags that start tether on them.
pub struct Setup {
    dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub sa_token: PathBuf,
    server: (PathBuf, PathBuf),
    pub api: (PathBuf, PathBuf),
    agent: (PathBuf, PathBuf),
    pub argocd: (PathBuf, PathBuf),
}

impl Setup {
    pub fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = CertificateAuthority::generate("bench CA", HOUR)?;
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let path = dir.path().join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        let ca_path = write("ca.crt", ca.cert_pem())?;
        let loopback = ["127.0.0.1".parse()?];
        let issue = |name: &str, request: LeafRequest| -> Result<(PathBuf, PathBuf)> {
            let issued = ca.issue(&request)?;
            Ok((
                write(&format!("{name}.crt"), &issued.cert_pem)?,
                write(&format!("{name}.key"), &issued.key_pem)?,
            ))
        };
        let server = issue(
            "server",
            LeafRequest::server(
                "tether-server",
                &["localhost", PROXIED_SERVER_NAME],
                &loopback,
                HOUR,
            ),
        )?;
        let api = issue(
            "api",
            LeafRequest::server("api", &["localhost"], &loopback, HOUR),
        )?;
        let agent = issue("agent", LeafRequest::agent("dev", HOUR))?;
        let argocd = issue("argocd", LeafRequest::client("argocd", HOUR))?;
        let sa_token = write("sa-token", SA_TOKEN)?;
        Ok(Self {
            ca: ca_path,
            sa_token,
            server,
            api,
            agent,
            argocd,
            dir,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The API server double's TLS files.
    pub fn api_tls(&self) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: self.api.0.clone(),
            key: self.api.1.clone(),
            client_ca: None,
        }
    }

    /// tether-server's flags (after the program name) for cluster "dev"
    /// behind `backend`. `tls`: mTLS on both ports; otherwise plain.
    pub fn server_args(
        &self,
        tls: bool,
        public: &str,
        internal: &str,
        backend: SocketAddr,
    ) -> Result<Vec<String>> {
        let clusters = self.path("clusters.json");
        std::fs::write(
            &clusters,
            serde_json::json!([{"id": "dev", "token": AGENT_TOKEN, "targetAddr": backend.to_string()}])
                .to_string(),
        )?;
        let mut args = vec![
            "--addr".into(),
            public.into(),
            "--internal-addr".into(),
            internal.into(),
            "--clusters".into(),
            clusters.display().to_string(),
            "--log-level".into(),
            "error".into(),
            "--max-streams-per-tunnel".into(),
            "20000".into(),
            // Uploads of the size measured here, not the 32 MiB default cap.
            "--max-body-bytes".into(),
            (1u64 << 30).to_string(),
            // No load balancer to wait for when a benchmark stops a server.
            "--shutdown-delay".into(),
            "0s".into(),
        ];
        if tls {
            args.extend([
                "--tls-cert".into(),
                self.server.0.display().to_string(),
                "--tls-key".into(),
                self.server.1.display().to_string(),
                "--tls-client-ca".into(),
                self.ca.display().to_string(),
            ]);
        }
        Ok(args)
    }

    /// tether-agent's flags (after the program name) for cluster "dev".
    pub fn agent_args(&self, tls: bool, server_port: u16, backend: SocketAddr) -> Vec<String> {
        let scheme = if tls { "wss" } else { "ws" };
        let mut args = vec![
            "--server".into(),
            format!("{scheme}://localhost:{server_port}"),
            "--token".into(),
            AGENT_TOKEN.into(),
            "--target".into(),
            backend.to_string(),
            "--sa-token-path".into(),
            self.sa_token.display().to_string(),
            "--ca-cert".into(),
            self.ca.display().to_string(),
            "--health-addr".into(),
            "127.0.0.1:0".into(),
            "--log-level".into(),
            "error".into(),
            "--max-conns".into(),
            "20000".into(),
        ];
        if tls {
            args.extend([
                "--server-ca-cert".into(),
                self.ca.display().to_string(),
                "--client-cert".into(),
                self.agent.0.display().to_string(),
                "--client-key".into(),
                self.agent.1.display().to_string(),
            ]);
        } else {
            args.push("--allow-insecure-server".into());
        }
        args
    }

    /// A client for tether-server's internal port (ArgoCD's certificate
    /// when `tls`).
    pub fn client(&self, tls: bool) -> Result<Client> {
        Client::new(tls::load_roots(&self.ca)?, tls.then(|| self.argocd.clone()))
    }
}

/// Server, agent and API server double in this process.
pub struct Rig {
    _setup: Setup,
    backend: FakeApiServer,
    server: RunningServer,
    agent: Agent,
    tls: bool,
    /// To tether-server's internal port (mTLS with ArgoCD's certificate when `tls`).
    pub client: Client,
    /// To the API server double directly.
    pub direct: Client,
}

impl Rig {
    /// Server, agent and API server on loopback. `tls`: mTLS on both server
    /// ports and wss between agent and server; otherwise plain ws and http
    /// (the API server hop is TLS either way, as in production).
    pub async fn start(tls: bool) -> Result<Self> {
        Self::start_with(tls, None).await
    }

    /// As [`Rig::start`], the agent reaching tether-server through the
    /// HTTP proxy at `proxy` (as `PROXIED_SERVER_NAME`).
    pub async fn start_with(tls: bool, proxy: Option<&str>) -> Result<Self> {
        let setup = Setup::new()?;
        let backend = FakeApiServer::start(
            tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            Some(setup.api_tls()),
            setup.sa_token.clone(),
        )
        .await?;
        let server_args = setup.server_args(tls, "127.0.0.1:0", "127.0.0.1:0", backend.addr)?;
        let server = RunningServer::start(ServerArgs::parse_from(
            std::iter::once("tether-server".to_owned()).chain(server_args),
        ))
        .await?;
        let mut agent_args = setup.agent_args(tls, server.public_addr.port(), backend.addr);
        if let Some(proxy) = proxy {
            let url = agent_args
                .iter()
                .position(|a| a == "--server")
                .map(|flag| flag + 1)
                .context("agent flags without --server")?;
            agent_args[url] = format!(
                "{}://{PROXIED_SERVER_NAME}:{}",
                if tls { "wss" } else { "ws" },
                server.public_addr.port()
            );
            agent_args.extend(["--proxy".to_owned(), proxy.to_owned()]);
        }
        let agent = Agent::start(AgentArgs::parse_from(
            std::iter::once("tether-agent".to_owned()).chain(agent_args),
        ))
        .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.is_connected("dev") {
            anyhow::ensure!(Instant::now() < deadline, "agent did not connect");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let client = setup.client(tls)?;
        let direct = setup.client(false)?;
        Ok(Self {
            _setup: setup,
            backend,
            server,
            agent,
            tls,
            client,
            direct,
        })
    }

    pub fn backend_url(&self) -> String {
        format!("https://localhost:{}", self.backend.addr.port())
    }

    pub fn internal_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://localhost:{}", self.server.internal_addr.port())
    }

    /// The direct path presents the token the agent would inject.
    pub fn direct_auth(&self) -> [(&'static str, &'static str); 1] {
        [("authorization", "Bearer bench-serviceaccount-token")]
    }

    pub async fn stop(self) {
        self.agent.shutdown().await;
        self.server.shutdown().await;
    }
}

/// Creates `count` ProxiedClusters in the in-memory API, then starts the
/// operator and times until all are Ready.
pub async fn reconcile_many(count: usize) -> Result<Duration> {
    use kube::Api;
    use kube::api::{ListParams, PostParams};
    use tether_operator::crd::ProxiedCluster;
    let api = tether_operator::fake_api::FakeApi::start().await?;
    let client = api.client();
    let clusters: Api<ProxiedCluster> = Api::namespaced(client.clone(), "tenants");
    for i in 0..count {
        let pc: ProxiedCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "tether.dev/v1alpha1", "kind": "ProxiedCluster",
            "metadata": {"name": format!("c{i:05}"), "namespace": "tenants"}, "spec": {}
        }))?;
        clusters.create(&PostParams::default(), &pc).await?;
    }
    let mut settings = tether_operator::settings::Settings::defaults();
    settings.leader_election = false;
    settings.public_url = Some("wss://tether.example.com:8443".into());
    settings.health_addr = "127.0.0.1:0".parse()?;
    settings.log_level = "error".into();
    let stop = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let operator = tokio::spawn(tether_operator::run(client, settings, stop.clone()));
    loop {
        let ready = clusters
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|pc| {
                pc.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count();
        if ready == count {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "only {ready} of {count} Ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    let _ = operator.await.context("operator task")?;
    Ok(elapsed)
}
