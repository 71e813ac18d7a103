//! Test harness: a fresh CA per test, the kube-apiserver double over TLS,
//! and real tether-server / tether-agent instances on 127.0.0.1.
#![allow(dead_code)] // each test binary uses its own subset

pub mod netns;
pub mod procs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tempfile::TempDir;
use tether::agent::{Agent, AgentArgs};
use tether::fake_apiserver::FakeApiServer;
use tether::pki::{CertificateAuthority, LeafRequest};
use tether::server::{RunningServer, ServerArgs};
use tether::tls::{self, ServerTlsFiles};
use tokio::net::TcpListener;

pub const WAIT: Duration = Duration::from_secs(15);
const HOUR: Duration = Duration::from_secs(3600);

/// Certificates for every party, written as PEM files into a temp dir.
pub struct Pki {
    pub dir: TempDir,
    pub ca: CertificateAuthority,
}

impl Pki {
    pub fn new() -> Self {
        tether::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = CertificateAuthority::generate("tether test CA", HOUR).expect("CA");
        let pki = Self { dir, ca };
        std::fs::write(pki.path("ca.crt"), pki.ca.cert_pem()).expect("write CA");
        let loopback = ["127.0.0.1".parse().expect("ip")];
        pki.issue(
            "server",
            &LeafRequest::server("tether-server", &["localhost"], &loopback, HOUR),
        );
        pki.issue(
            "apiserver",
            &LeafRequest::server("kube-apiserver", &["localhost"], &loopback, HOUR),
        );
        pki.issue("argocd", &LeafRequest::client("argocd", HOUR));
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The kube-apiserver double on `listener`, over TLS with this CA's
    /// `apiserver` certificate, accepting `sa_token` (written to `sa-token`).
    pub async fn apiserver(&self, listener: TcpListener, sa_token: &str) -> FakeApiServer {
        std::fs::write(self.path("sa-token"), sa_token).expect("write sa token");
        FakeApiServer::start(
            listener,
            Some(ServerTlsFiles {
                cert: self.path("apiserver.crt"),
                key: self.path("apiserver.key"),
                client_ca: None,
            }),
            self.path("sa-token"),
        )
        .await
        .expect("backend")
    }

    /// Writes `{name}.crt` and `{name}.key`.
    pub fn issue(&self, name: &str, request: &LeafRequest) {
        let issued = self.ca.issue(request).expect("issue");
        std::fs::write(self.path(&format!("{name}.crt")), issued.cert_pem).expect("write cert");
        std::fs::write(self.path(&format!("{name}.key")), issued.key_pem).expect("write key");
    }

    /// An agent client certificate naming `cluster`, as `agent-{cluster}.crt/.key`.
    pub fn agent_identity(&self, cluster: &str) -> (PathBuf, PathBuf) {
        let name = format!("agent-{cluster}");
        self.issue(&name, &LeafRequest::agent(cluster, HOUR));
        (
            self.path(&format!("{name}.crt")),
            self.path(&format!("{name}.key")),
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// ws:// and http:// (the agent needs --allow-insecure-server).
    Plain,
    /// TLS on both ports, no client certificates.
    Tls,
    /// TLS with client certificates required on both ports.
    Mtls,
}

/// One management side (server) and the customer side it reaches (the
/// API server double), plus a clusters file the test can rewrite.
pub struct Env {
    pub pki: Pki,
    pub security: Security,
    pub backend: FakeApiServer,
    /// The agent's ServiceAccount token; the backend accepts what it holds.
    pub sa_token: PathBuf,
    pub clusters_file: PathBuf,
    pub server: Option<RunningServer>,
    pub public_addr: SocketAddr,
    pub internal_addr: SocketAddr,
    server_extra: Vec<String>,
}

pub fn cluster_json(entries: &[(&str, &str, &str)]) -> String {
    let items: Vec<_> = entries
        .iter()
        .map(|(id, token, target)| serde_json::json!({"id": id, "token": token, "targetAddr": target}))
        .collect();
    serde_json::Value::Array(items).to_string()
}

impl Env {
    pub async fn start(security: Security) -> Self {
        Self::start_with(security, &[]).await
    }

    /// Starts the backend and a server knowing cluster `dev` (token
    /// `dev-token`) whose target is the backend.
    pub async fn start_with(security: Security, server_extra: &[&str]) -> Self {
        let pki = Pki::new();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let backend = pki.apiserver(listener, "agent-sa-token-1").await;
        let sa_token = pki.path("sa-token");
        let clusters_file = pki.path("clusters.json");
        let target = backend.addr.to_string();
        std::fs::write(
            &clusters_file,
            cluster_json(&[("dev", "dev-token", &target)]),
        )
        .expect("clusters");
        let mut env = Self {
            pki,
            security,
            backend,
            sa_token,
            clusters_file,
            server: None,
            public_addr: "127.0.0.1:0".parse().expect("addr"),
            internal_addr: "127.0.0.1:0".parse().expect("addr"),
            server_extra: server_extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        env.start_server().await;
        env
    }

    pub fn target(&self) -> String {
        self.backend.addr.to_string()
    }

    /// Rewrites the clusters file: each (id, token), targeting the backend.
    pub fn set_clusters(&self, clusters: &[(&str, &str)]) {
        let target = self.target();
        let entries: Vec<_> = clusters
            .iter()
            .map(|(id, token)| (*id, *token, target.as_str()))
            .collect();
        std::fs::write(&self.clusters_file, cluster_json(&entries)).expect("clusters file");
    }

    pub fn server_args(&self) -> ServerArgs {
        let mut args: Vec<String> = vec![
            "tether-server".into(),
            "--addr".into(),
            self.public_addr.to_string(),
            "--internal-addr".into(),
            self.internal_addr.to_string(),
            "--clusters".into(),
            self.clusters_file.display().to_string(),
            "--reload-interval".into(),
            "100ms".into(),
            "--keepalive-interval".into(),
            "1s".into(),
            "--shutdown-grace".into(),
            "2s".into(),
            // No load balancer to wait for here (tests of the delay set it).
            "--shutdown-delay".into(),
            "0s".into(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--metrics-auth".into(),
            "none".into(),
        ];
        if self.security != Security::Plain {
            args.extend([
                "--tls-cert".into(),
                self.pki.path("server.crt").display().to_string(),
                "--tls-key".into(),
                self.pki.path("server.key").display().to_string(),
            ]);
        }
        if self.security == Security::Mtls {
            args.extend([
                "--tls-client-ca".into(),
                self.pki.path("ca.crt").display().to_string(),
            ]);
        }
        args.extend(self.server_extra.iter().cloned());
        ServerArgs::parse_from(args)
    }

    /// (Re)starts the server on the same ports as before.
    pub async fn start_server(&mut self) {
        let server = RunningServer::start(self.server_args())
            .await
            .expect("server starts");
        self.public_addr = server.public_addr;
        self.internal_addr = server.internal_addr;
        self.server = Some(server);
    }

    pub async fn stop_server(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }

    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("server running")
    }

    /// Agent flags for `cluster` with `token`, matching the server's security.
    pub fn agent_args(&self, cluster: &str, token: &str, extra: &[&str]) -> AgentArgs {
        let scheme = if self.security == Security::Plain {
            "ws"
        } else {
            "wss"
        };
        let mut args: Vec<String> = vec![
            "tether-agent".into(),
            "--server".into(),
            format!("{scheme}://localhost:{}", self.public_addr.port()),
            "--token".into(),
            token.into(),
            "--target".into(),
            self.target(),
            "--sa-token-path".into(),
            self.sa_token.display().to_string(),
            "--ca-cert".into(),
            self.pki.path("ca.crt").display().to_string(),
            "--health-addr".into(),
            "127.0.0.1:0".into(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--metrics-auth".into(),
            "none".into(),
            "--max-retry".into(),
            "1s".into(),
            "--keepalive-interval".into(),
            "1s".into(),
        ];
        match self.security {
            Security::Plain => args.push("--allow-insecure-server".into()),
            Security::Tls | Security::Mtls => {
                args.extend([
                    "--server-ca-cert".into(),
                    self.pki.path("ca.crt").display().to_string(),
                ]);
            }
        }
        if self.security == Security::Mtls {
            let (cert, key) = self.pki.agent_identity(cluster);
            args.extend([
                "--client-cert".into(),
                cert.display().to_string(),
                "--client-key".into(),
                key.display().to_string(),
            ]);
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        AgentArgs::parse_from(args)
    }

    pub async fn agent(&self, cluster: &str, token: &str, extra: &[&str]) -> Agent {
        Agent::start(self.agent_args(cluster, token, extra))
            .await
            .expect("agent starts")
    }

    /// A started agent for `dev`, connected.
    pub async fn connected_agent(&self) -> Agent {
        let agent = self.agent("dev", "dev-token", &[]).await;
        self.wait_connected("dev").await;
        agent
    }

    pub async fn wait_connected(&self, cluster: &str) {
        eventually(
            async || self.server().is_connected(cluster),
            "agent connects",
        )
        .await;
    }

    /// The server's metrics (its own port, plain HTTP in tests).
    pub fn metrics_url(&self) -> String {
        let addr = self.server().metrics_addr.expect("metrics port");
        format!("http://{addr}/metrics")
    }

    /// Base URL of the internal port.
    pub fn internal_url(&self) -> String {
        let scheme = if self.security == Security::Plain {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://localhost:{}", self.internal_addr.port())
    }

    pub fn public_url(&self) -> String {
        let scheme = if self.security == Security::Plain {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://localhost:{}", self.public_addr.port())
    }

    /// A client as ArgoCD would be: with the ArgoCD certificate under mTLS.
    pub fn argocd(&self) -> TestClient {
        match self.security {
            Security::Plain => TestClient::new(None, None),
            Security::Tls => TestClient::new(Some(&self.pki.path("ca.crt")), None),
            Security::Mtls => TestClient::new(
                Some(&self.pki.path("ca.crt")),
                Some((&self.pki.path("argocd.crt"), &self.pki.path("argocd.key"))),
            ),
        }
    }
}

/// Polls `condition` until it holds, or panics naming `what`.
pub async fn eventually(mut condition: impl AsyncFnMut() -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

pub struct TestClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl TestClient {
    pub fn new(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Self {
        Self::from_source(ca, identity, None)
    }

    /// A client whose connections come from `source` (any 127.0.0.0/8
    /// address is this machine), to play another host.
    pub fn from_source(
        ca: Option<&Path>,
        identity: Option<(&Path, &Path)>,
        source: Option<std::net::IpAddr>,
    ) -> Self {
        tether::install_crypto_provider();
        let roots = match ca {
            Some(ca) => tls::load_roots(ca).expect("roots"),
            None => rustls::RootCertStore::empty(),
        };
        let identity = identity.map(|(cert, key)| {
            (
                tls::load_certs(cert).expect("cert"),
                tls::load_key(key).expect("key"),
            )
        });
        let config = tls::client_config(roots, identity).expect("client config");
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_local_address(source);
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    pub async fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, String> {
        let mut builder = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(body)).map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(WAIT, self.client.request(request))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| format!("{e:?}"))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    pub async fn get(&self, url: &str) -> Answer {
        self.request(Method::GET, url, &[], Bytes::new())
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }

    pub async fn get_with(&self, url: &str, headers: &[(&str, &str)]) -> Answer {
        self.request(Method::GET, url, headers, Bytes::new())
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }
}

/// Whether kubectl can be run; tests that drive it say SKIP otherwise.
pub fn kubectl_available() -> bool {
    let found = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok();
    if !found {
        eprintln!("SKIP: kubectl is not installed");
    }
    found
}

/// `kubectl exec -i <pod> -- cat` with `args` (a `--server`, or a
/// kubeconfig through `KUBECONFIG`), stdin `input`: the echoed output.
/// `kubectl` is how to run it: `["kubectl"]`, or behind `ip netns exec`.
pub async fn kubectl_exec_cat(
    kubectl: &[&str],
    args: &[&str],
    kubeconfig: &Path,
    pod: &str,
    input: &[u8],
) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    let mut exec = tokio::process::Command::new(kubectl[0])
        .args(&kubectl[1..])
        .args(args)
        .args(["exec", "-i", pod, "--", "cat"])
        .env("KUBECONFIG", kubeconfig)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    let mut stdin = exec.stdin.take().expect("stdin");
    stdin.write_all(input).await.expect("stdin");
    drop(stdin);
    let out = tokio::time::timeout(WAIT, exec.wait_with_output())
        .await
        .expect("exec ends")
        .expect("output");
    assert!(
        out.status.success(),
        "kubectl exec failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Reads an HTTP/1.1 response head (through the blank line) from a raw
/// connection, leaving whatever follows (an upgraded stream) unread.
pub async fn read_head(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(WAIT, io.read_exact(&mut byte))
            .await
            .expect("response head in time")
            .expect("read");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}
