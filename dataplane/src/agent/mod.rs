//! tether-agent: dials out to tether-server, and serves each stream the
//! server opens as HTTP/1.1 towards the local kube-apiserver, with the
//! agent's own ServiceAccount token.

mod egress;
mod health;
mod no_proxy;
mod renewal;
mod store;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use http::Uri;
use rand::Rng;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::mux::{Role, Session, SessionConfig};
use crate::protocol::Version;
use crate::server::{parse_duration, parse_listen_addr};
use crate::tls::{self, TlsError};
use crate::websocket;
pub use egress::{ProxyArgs, check_proxy_url};
pub use health::AgentMetrics;
pub use no_proxy::NoProxy;

use egress::CONNECT_TIMEOUT;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// A session that lasted this long was healthy: the next reconnect starts
/// from the first backoff step again.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// After GoAway the server is restarting or rolling: retry quickly (with
/// jitter, up to `FAST_RETRY_MAX` apart) for this long instead of backing off.
const FAST_RETRY_WINDOW: Duration = Duration::from_secs(30);
const FAST_RETRY_MAX: Duration = Duration::from_millis(500);
/// Dials that reach a replica the agent already holds are retried quickly
/// this many times per live replica before backing off: through a balancer
/// that spreads connections evenly, the chance of still missing the one
/// replica not held after that is under 1% (two of three held: (2/3)^12).
const QUICK_REDIALS_PER_REPLICA: u32 = 4;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "tether-agent",
    version,
    about = "tether's customer-side agent: dials out, never listens for tunnel traffic"
)]
pub struct AgentArgs {
    /// tether-server's public URL, e.g. wss://tether.example.com:8443 (path defaults to /connect).
    #[arg(long, env = "SERVER_URL")]
    pub server: String,
    /// Agent token (prefer --token-file: arguments are visible in the process list).
    #[arg(
        long,
        env = "TOKEN",
        hide_env_values = true,
        conflicts_with_all = ["token_file", "credentials_dir"]
    )]
    pub token: Option<String>,
    /// Directory holding `token`, `tls.crt`, `tls.key` and `ca.crt` (a
    /// mounted Secret, or files). With it the agent renews its certificate
    /// over the tunnel and, unless --credentials-secret is given, rewrites
    /// the directory atomically.
    #[arg(long, env = "CREDENTIALS_DIR", conflicts_with_all = ["token_file", "client_cert", "client_key"])]
    pub credentials_dir: Option<PathBuf>,
    /// In a cluster: the Secret (in --credentials-secret-namespace) the
    /// credentials directory is mounted from; renewed credentials are
    /// written to it through the API, so a restarted pod starts with them.
    #[arg(long, env = "CREDENTIALS_SECRET", requires = "credentials_dir")]
    pub credentials_secret: Option<String>,
    #[arg(long, env = "POD_NAMESPACE", default_value = "tether-agent")]
    pub credentials_secret_namespace: String,
    /// File holding the agent token; re-read at every connection attempt.
    #[arg(long, env = "TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The only host:port this agent forwards to.
    #[arg(long, env = "TARGET", default_value = crate::clusters::DEFAULT_TARGET)]
    pub target: String,
    /// ServiceAccount token, checked for every request and read again when
    /// it changed (projected tokens rotate).
    #[arg(
        long,
        env = "SA_TOKEN_PATH",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub sa_token_path: PathBuf,
    /// CA that signed the target's certificate.
    #[arg(
        long,
        env = "CA_CERT",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    )]
    pub ca_cert: PathBuf,
    /// Do not verify the target's certificate (testing only).
    #[arg(long, env = "INSECURE")]
    pub insecure: bool,
    /// Speak plain HTTP to the target (testing only).
    #[arg(long, env = "PLAIN_TARGET")]
    pub plain_target: bool,
    /// Allow a ws:// server URL (testing only).
    #[arg(long, env = "ALLOW_INSECURE_SERVER")]
    pub allow_insecure_server: bool,
    /// CA for tether-server's certificate (default: the public web roots).
    #[arg(long, env = "SERVER_CA_CERT")]
    pub server_ca_cert: Option<PathBuf>,
    /// Client certificate for mTLS to tether-server.
    #[arg(long, env = "CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    #[arg(long, env = "CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Longest wait between reconnection attempts.
    #[arg(long, env = "MAX_RETRY", default_value = "30s", value_parser = parse_duration)]
    pub max_retry: Duration,
    /// Streams served at once; more are refused with an Error frame.
    #[arg(long, env = "MAX_CONNS", default_value_t = 1024)]
    pub max_conns: usize,
    /// /healthz and /readyz (cluster-internal; probes only; metrics have a
    /// port of their own, `--metrics-addr`).
    #[arg(long, env = "HEALTH_ADDR", default_value = ":8081", value_parser = parse_listen_addr)]
    pub health_addr: SocketAddr,
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Threads running the agent's tasks. One: the agent carries one
    /// cluster's traffic and keeps to one core of the customer's node
    /// (small requests measured the same at two threads, BENCHMARKS.md).
    #[arg(long, env = "WORKER_THREADS", default_value = "1")]
    pub worker_threads: std::num::NonZeroUsize,
    #[arg(long, env = "KEEPALIVE_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,
    #[arg(long, env = "KEEPALIVE_TIMEOUT", default_value = "45s", value_parser = parse_duration)]
    pub keepalive_timeout: Duration,
    /// Highest tunnel protocol to offer (v1 makes this agent a plain v1 peer).
    #[arg(long, env = "PROTOCOL", default_value = "v2", value_parser = ["v1", "v2"])]
    pub protocol: String,
    #[command(flatten)]
    pub proxy: ProxyArgs,
    #[command(flatten)]
    pub metrics_port: crate::metrics_port::MetricsArgs,
}

impl AgentArgs {
    fn in_credentials_dir(&self, file: &str) -> Option<PathBuf> {
        self.credentials_dir
            .as_ref()
            .map(|dir| crate::credentials::CredentialsDir::new(dir).path(file))
    }

    fn token_path(&self) -> Option<PathBuf> {
        self.token_file
            .clone()
            .or_else(|| self.in_credentials_dir(crate::credentials::TOKEN_FILE))
    }

    /// The CA of tether-server's certificate: `--server-ca-cert`, else the
    /// credentials directory's `ca.crt` when there is one.
    fn server_ca(&self) -> Option<PathBuf> {
        self.server_ca_cert.clone().or_else(|| {
            self.in_credentials_dir(crate::credentials::CA_FILE)
                .filter(|path| path.exists())
        })
    }

    /// The client certificate and key files.
    fn client_identity(&self) -> Option<(PathBuf, PathBuf)> {
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            _ => Some((
                self.in_credentials_dir(crate::credentials::CERT_FILE)?,
                self.in_credentials_dir(crate::credentials::KEY_FILE)?,
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("--server {0:?} is not a ws:// or wss:// URL")]
    BadServerUrl(String),
    #[error("--target {0:?} is not a host:port")]
    BadTarget(String),
    #[error("refusing plaintext ws:// to the server; pass --allow-insecure-server to allow it")]
    PlaintextServer,
    #[error("no agent token: pass --token or --token-file")]
    NoToken,
    #[error("cannot read token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    MetricsPort(#[from] crate::metrics_port::MetricsPortError),
    #[error("client certificate: {0}")]
    Certificate(String),
    #[error("{0}")]
    Egress(#[from] egress::EgressError),
}

/// Where and how to reach tether-server.
struct ServerEndpoint {
    host: String,
    port: u16,
    path: String,
    tls: Option<EndpointTls>,
    route: egress::Route,
}

struct EndpointTls {
    roots: rustls::RootCertStore,
    name: ServerName<'static>,
    /// Replaced when the client certificate is renewed.
    connector: std::sync::RwLock<TlsConnector>,
}

fn tls_connector(
    roots: rustls::RootCertStore,
    identity: Option<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<TlsConnector, TlsError> {
    let mut config = tls::client_config(roots, identity)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

impl ServerEndpoint {
    fn from_args(args: &AgentArgs) -> Result<Self, AgentError> {
        let bad = || AgentError::BadServerUrl(args.server.clone());
        let uri: Uri = args.server.parse().map_err(|_| bad())?;
        let secure = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") if args.allow_insecure_server => false,
            Some("ws") => return Err(AgentError::PlaintextServer),
            _ => return Err(bad()),
        };
        let host = uri
            .host()
            .ok_or_else(bad)?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let path = match uri.path() {
            "" | "/" => "/connect".to_owned(),
            path => path.to_owned(),
        };
        let tls = if secure {
            let roots = match args.server_ca() {
                Some(path) => tls::load_roots(&path)?,
                None => rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                },
            };
            let identity = match args.client_identity() {
                Some((cert, key)) => Some((tls::load_certs(&cert)?, tls::load_key(&key)?)),
                None => None,
            };
            let connector = tls_connector(roots.clone(), identity)?;
            let name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
            Some(EndpointTls {
                roots,
                name,
                connector: std::sync::RwLock::new(connector),
            })
        } else {
            None
        };
        let (route, why) = egress::Route::choose(&args.proxy, secure, &host, port, |name| {
            std::env::var(name).ok()
        })?;
        info!(server = %args.server, route = %why, "reaching tether-server");
        Ok(Self {
            host,
            port,
            path,
            tls,
            route,
        })
    }

    /// Presents this certificate and key from the next connection on.
    fn set_identity(&self, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        let identity = tls::identity_from_pem(cert_pem.as_bytes(), key_pem.as_bytes())?;
        let connector = tls_connector(tls.roots.clone(), Some(identity))?;
        *tls.connector.write().unwrap_or_else(|p| p.into_inner()) = connector;
        Ok(())
    }

    async fn dial(
        &self,
        token: &str,
        offer_v2: bool,
        instance: Option<&str>,
        metrics: &AgentMetrics,
    ) -> Result<(websocket::TunnelSocket, Version, websocket::ReplicaInfo), DialError> {
        let proxy = self.route.proxy();
        // Each dial through a proxy counts once, by how far it got.
        let count = |result: &str| {
            if proxy.is_some() {
                metrics.proxy_connects.with_label_values(&[result]).inc();
            }
        };
        let transport = self
            .route
            .connect(&self.host, self.port)
            .await
            .map_err(|err| {
                count(err.kind());
                DialError::Failed {
                    persistent: err.is_persistent(),
                    message: err.to_string(),
                }
            })?;
        let io = match &self.tls {
            Some(tls) => {
                let connector = tls
                    .connector
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let handshake = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    connector.connect(tls.name.clone(), transport),
                )
                .await;
                // The usual cause of a certificate that verifies directly
                // but not through the proxy.
                let intercepted = proxy.is_some()
                    && matches!(&handshake, Ok(Err(err)) if certificate_rejected(err));
                count(if intercepted { "intercepted" } else { "ok" });
                let stream = handshake
                    .map_err(|_| DialError::failed("TLS handshake timed out".to_owned()))?
                    .map_err(|err| match proxy {
                        Some(proxy) if intercepted => DialError::Failed {
                            message: format!(
                                "tether-server's certificate does not verify through proxy {}: {err}; \
                                 the proxy may be intercepting TLS: tether needs it to pass {}:{} through untouched \
                                 (exempt it from TLS inspection)",
                                proxy.display, self.host, self.port
                            ),
                            persistent: true,
                        },
                        _ => DialError::failed(format!("TLS handshake failed: {err}")),
                    })?;
                Either::Left(stream)
            }
            None => {
                count("ok");
                Either::Right(transport)
            }
        };
        let authority = format!("{}:{}", self.host, self.port);
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            websocket::connect(io, &authority, &self.path, token, offer_v2, instance),
        )
        .await
        .map_err(|_| DialError::failed("WebSocket handshake timed out".to_owned()))?
        .map_err(|err| match err {
            websocket::HandshakeError::AlreadyHeld(replica) => DialError::AlreadyHeld(replica),
            other => DialError::failed(other.to_string()),
        })
    }
}

/// Whether a TLS handshake failed on the peer's certificate.
fn certificate_rejected(err: &std::io::Error) -> bool {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)))
}

#[derive(Debug)]
enum DialError {
    /// The load balancer chose a replica this agent already holds.
    AlreadyHeld(String),
    Failed {
        message: String,
        /// Retrying soon will not help (credentials, a proxy's policy).
        persistent: bool,
    },
}

impl DialError {
    fn failed(message: String) -> Self {
        Self::Failed {
            message,
            persistent: false,
        }
    }
}

fn read_token(args: &AgentArgs) -> Result<String, AgentError> {
    if let Some(token) = &args.token {
        return Ok(token.trim().to_owned());
    }
    let path = args.token_path().ok_or(AgentError::NoToken)?;
    let token =
        std::fs::read_to_string(&path).map_err(|source| AgentError::TokenFile { path, source })?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(AgentError::NoToken);
    }
    Ok(token)
}

/// Full-jitter exponential backoff: a random wait up to
/// `min(cap, first * 2^attempt)`, never under `MIN_BACKOFF` so a fleet of
/// agents cannot spin against a server that refuses them.
fn backoff(attempt: u32, cap: Duration) -> Duration {
    let ceiling = FIRST_BACKOFF
        .saturating_mul(1u32 << attempt.min(16))
        .min(cap)
        .max(MIN_BACKOFF);
    rand::rng().random_range(MIN_BACKOFF..=ceiling)
}

/// A running agent.
pub struct Agent {
    pub health_addr: SocketAddr,
    /// The metrics port, when `--metrics-addr` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub metrics: Arc<AgentMetrics>,
    args: AgentArgs,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// Validates the configuration, binds the health port and starts the
    /// connection loop.
    pub async fn start(args: AgentArgs) -> Result<Self, AgentError> {
        let endpoint = Arc::new(ServerEndpoint::from_args(&args)?);
        read_token(&args)?;
        let metrics = Arc::new(AgentMetrics::new()?);
        metrics.set_proxy(endpoint.route.proxy().map(|p| p.display.as_str()));
        let upstream = Arc::new(upstream::Upstream::new(&args, metrics.clone())?);
        let stop = CancellationToken::new();
        let health_addr = health::serve(args.health_addr, metrics.clone(), stop.clone()).await?;
        let rendered = metrics.clone();
        let metrics_addr = crate::metrics_port::serve(
            &args.metrics_port,
            Arc::new(move || rendered.render()),
            None,
            stop.clone(),
        )
        .await?
        .map(|port| port.addr);
        let (credentials_tx, messages) = tokio::sync::mpsc::channel(8);
        let (sessions_tx, sessions) = tokio::sync::watch::channel(Vec::new());
        let credentials = Arc::new(store::Credentials::new());
        if let Some(renewal) = renewal(&args, &endpoint, &upstream, &metrics, &credentials)? {
            tokio::spawn(renewal.run(renewal::Channel { messages, sessions }, stop.clone()));
        }
        let task = tokio::spawn(run(
            args.clone(),
            endpoint,
            upstream,
            metrics.clone(),
            Links {
                sessions: sessions_tx,
                credentials: credentials_tx,
                in_use: credentials,
            },
            stop.clone(),
        ));
        Ok(Self {
            health_addr,
            metrics_addr,
            metrics,
            args,
            stop,
            task,
        })
    }

    pub fn is_connected(&self) -> bool {
        self.metrics.connected.get() == 1
    }

    /// The configuration it runs with.
    pub fn args(&self) -> &AgentArgs {
        &self.args
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Certificate renewal, when the agent has a credentials directory with a
/// client certificate in it.
fn renewal(
    args: &AgentArgs,
    endpoint: &Arc<ServerEndpoint>,
    upstream: &Arc<upstream::Upstream>,
    metrics: &Arc<AgentMetrics>,
    credentials: &Arc<store::Credentials>,
) -> Result<Option<renewal::Renewal<store::AgentKeeper>>, AgentError> {
    let Some(dir) = &args.credentials_dir else {
        if args.client_cert.is_some() {
            info!(
                "certificate renewal needs --credentials-dir; this certificate is used until it expires"
            );
        }
        return Ok(None);
    };
    let dir = crate::credentials::CredentialsDir::new(dir);
    let Ok(pem) = std::fs::read_to_string(dir.path(crate::credentials::CERT_FILE)) else {
        return Ok(None);
    };
    let current = crate::pki::CertInfo::from_pem(&pem)
        .map_err(|err| AgentError::Certificate(err.to_string()))?;
    let cluster = current
        .cluster
        .clone()
        .ok_or_else(|| AgentError::Certificate("it names no cluster".into()))?;
    if current.not_after <= std::time::SystemTime::now() {
        tracing::error!(not_after = ?current.not_after, "{}", renewal::EXPIRED);
    }
    let store = match &args.credentials_secret {
        Some(name) => store::Store::Secret {
            upstream: upstream.clone(),
            namespace: args.credentials_secret_namespace.clone(),
            name: name.clone(),
        },
        None => store::Store::Dir(dir),
    };
    Ok(Some(renewal::Renewal {
        cluster,
        current,
        keeper: store::AgentKeeper {
            store,
            endpoint: endpoint.clone(),
            credentials: credentials.clone(),
            args: args.clone(),
        },
        metrics: metrics.clone(),
        clock: renewal::Clock::System,
        rotation: None,
        rotated: None,
    }))
}

/// What the connection loop shares with credentials renewal: the sessions
/// it holds, the credentials messages they receive, and the credentials to
/// connect with.
struct Links {
    sessions: tokio::sync::watch::Sender<Vec<Session>>,
    credentials: tokio::sync::mpsc::Sender<crate::credentials::Message>,
    in_use: Arc<store::Credentials>,
}

/// A session's end, as its task reports it to the connection loop.
struct SessionEnd {
    replica: String,
    generation: u64,
    /// The server sent GoAway (restarting or rolling).
    going_away: bool,
    healthy: bool,
}

/// What the connection loop learns from its sessions.
enum SessionNews {
    Ended(SessionEnd),
    /// A replica announced the live replicas.
    Replicas(Vec<String>),
    /// A credentials message from a server (for certificate renewal).
    Credentials(crate::credentials::Message),
}

/// A random id for this agent process: servers refuse its second session
/// to a replica it already holds.
fn new_instance_id() -> String {
    hex::encode(rand::rng().random::<[u8; 8]>())
}

/// Keeps one session with every live tether-server replica (one session
/// to a server without replica support, or with `--protocol v1`). Dials
/// through the same URL, with backoff and jitter, until the replicas the
/// servers announce are all held; a session that ends is replaced.
async fn run(
    args: AgentArgs,
    endpoint: Arc<ServerEndpoint>,
    upstream: Arc<upstream::Upstream>,
    metrics: Arc<AgentMetrics>,
    links: Links,
    stop: CancellationToken,
) {
    let publish = |held: &std::collections::HashMap<String, (u64, Session)>| {
        links
            .sessions
            .send_replace(held.values().map(|(_, s)| s.clone()).collect());
    };
    let offer_v2 = args.protocol == "v2";
    // Replicas frames are v2: a v1 agent holds a single session.
    let instance = offer_v2.then(new_instance_id);
    let (news_tx, mut news) = tokio::sync::mpsc::unbounded_channel();
    let mut held: std::collections::HashMap<String, (u64, Session)> = Default::default();
    // Replicas whose session presents a token or certificate since
    // replaced: each is dialed again and the new session takes its place,
    // so the old one serves until then.
    let mut stale: std::collections::HashSet<String> = Default::default();
    let mut wanted: Vec<String> = Vec::new();
    let mut generation: u64 = 0;
    let mut attempt: u32 = 0;
    let mut already_held: u32 = 0;
    let mut fast_retry_until: Option<Instant> = None;
    let mut next_dial = tokio::time::Instant::now();
    let mut renewed = links.in_use.subscribe();
    loop {
        let missing =
            held.is_empty() || wanted.iter().any(|r| !held.contains_key(r)) || !stale.is_empty();
        metrics.connected.set(i64::from(!held.is_empty()));
        metrics.sessions.set(held.len() as i64);
        tokio::select! {
            _ = stop.cancelled() => {
                for (_, session) in held.values() {
                    session.close("agent shutting down");
                }
                return;
            }
            // A new token or certificate: every session is dialed again
            // with it (a replica lets the same agent replace a session when
            // it presents a new token or another certificate).
            Ok(()) = renewed.changed() => {
                stale = held.keys().cloned().collect();
                fast_retry_until = Some(Instant::now() + FAST_RETRY_WINDOW);
                next_dial = tokio::time::Instant::now();
            }
            Some(event) = news.recv() => match event {
                // Without renewal nobody listens: the message is dropped.
                SessionNews::Credentials(message) => {
                    let _ = links.credentials.try_send(message);
                }
                SessionNews::Replicas(replicas) => {
                    if replicas != wanted {
                        info!(replicas = ?replicas, held = ?held.keys().collect::<Vec<_>>(), "server replicas changed");
                        wanted = replicas;
                    }
                }
                SessionNews::Ended(end) => {
                    if held.get(&end.replica).is_some_and(|(g, _)| *g == end.generation) {
                        held.remove(&end.replica);
                        stale.remove(&end.replica);
                        publish(&held);
                    }
                    metrics.reconnects.inc();
                    if end.healthy || end.going_away {
                        attempt = 0;
                    }
                    if end.going_away {
                        // The server is rolling: come back quickly.
                        fast_retry_until = Some(Instant::now() + FAST_RETRY_WINDOW);
                        next_dial = tokio::time::Instant::now();
                        wanted.retain(|r| *r != end.replica);
                    } else if held.is_empty() {
                        next_dial = tokio::time::Instant::now() + retry_wait(&mut attempt, fast_retry_until, args.max_retry);
                    }
                }
            },
            _ = tokio::time::sleep_until(next_dial), if missing => {
                let token = match links.in_use.current(&args) {
                    Ok(token) => token,
                    Err(err) => {
                        warn!(error = %err, "cannot read the agent token");
                        next_dial = tokio::time::Instant::now() + retry_wait(&mut attempt, fast_retry_until, args.max_retry);
                        continue;
                    }
                };
                let dialed = tokio::select! {
                    _ = stop.cancelled() => continue,
                    dialed = endpoint.dial(&token, offer_v2, instance.as_deref(), &metrics) => dialed,
                };
                match dialed {
                    Ok((socket, version, info)) => {
                        already_held = 0;
                        metrics.set_last_dial_error(None);
                        let replica = info.replica.clone().unwrap_or_else(|| args.server.clone());
                        if instance.is_some() && !info.replicas.is_empty() {
                            wanted = info.replicas.clone();
                        }
                        let mut config = SessionConfig::new(version, Role::Acceptor, format!("server {replica}"));
                        config.max_streams = args.max_conns;
                        config.keepalive_interval = args.keepalive_interval;
                        config.keepalive_timeout = args.keepalive_timeout;
                        let (session, incoming) = Session::start(socket, config);
                        info!(server = %args.server, %replica, protocol = version.as_str(), "tunnel connected");
                        generation += 1;
                        if let Some((_, replaced)) = held.insert(replica.clone(), (generation, session.clone())) {
                            // The server retires it once its streams end.
                            replaced.go_away();
                        }
                        stale.remove(&replica);
                        publish(&held);
                        tokio::spawn(serve_session(
                            replica,
                            generation,
                            session,
                            incoming,
                            upstream.clone(),
                            news_tx.clone(),
                            stop.clone(),
                        ));
                        // More replicas to reach: dial again soon, jittered
                        // so a fleet spreads over the load balancer.
                        next_dial = tokio::time::Instant::now() + backoff(0, FAST_RETRY_MAX);
                    }
                    Err(DialError::AlreadyHeld(replica)) => {
                        already_held = already_held.saturating_add(1);
                        debug!(%replica, "reached a replica this agent already holds; dialing again");
                        // A balancer spreading connections gets there in a
                        // few tries; one that pins this agent gets the full
                        // backoff after that, so a fleet does not spin.
                        let quick = QUICK_REDIALS_PER_REPLICA * wanted.len().max(1) as u32;
                        let wait = if already_held <= quick {
                            backoff(0, FAST_RETRY_MAX)
                        } else {
                            backoff(already_held - quick, args.max_retry)
                        };
                        next_dial = tokio::time::Instant::now() + wait;
                    }
                    Err(DialError::Failed { message, persistent }) => {
                        warn!(server = %args.server, error = %message, "cannot connect to tether-server");
                        metrics.set_last_dial_error(Some(message));
                        if held.is_empty() {
                            metrics.reconnects.inc();
                        }
                        // Wrong credentials or a proxy's refusal: the full
                        // backoff, even in the quick window after a GoAway.
                        let fast = if persistent { None } else { fast_retry_until };
                        next_dial = tokio::time::Instant::now() + retry_wait(&mut attempt, fast, args.max_retry);
                    }
                }
            }
        }
    }
}

/// The wait before the next attempt after a failure: quick (jittered, up to
/// `FAST_RETRY_MAX`) during the window after a GoAway, else exponential.
fn retry_wait(attempt: &mut u32, fast_retry_until: Option<Instant>, cap: Duration) -> Duration {
    let wait = match fast_retry_until {
        Some(until) if Instant::now() < until => backoff(0, FAST_RETRY_MAX),
        _ => {
            *attempt = attempt.saturating_add(1);
            backoff(*attempt - 1, cap)
        }
    };
    info!(wait = ?wait, "reconnecting after backoff");
    wait
}

/// One session's life: serves its streams, passes on the replicas the
/// server announces, and reports how it ended. A GoAway is reported at once
/// (the agent dials a replacement), but the session keeps serving: Connect
/// frames the server sent before its GoAway can arrive after it (GoAway
/// goes ahead of queued data), and streams in flight finish.
async fn serve_session(
    replica: String,
    generation: u64,
    session: Session,
    incoming: Option<tokio::sync::mpsc::Receiver<crate::mux::IncomingStream>>,
    upstream: Arc<upstream::Upstream>,
    news: tokio::sync::mpsc::UnboundedSender<SessionNews>,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let mut replicas = session.replicas();
    let mut credential_messages = session.take_credentials();
    let mut incoming = incoming;
    let mut going_away = false;
    let report = |going_away: bool| {
        let _ = news.send(SessionNews::Ended(SessionEnd {
            replica: replica.clone(),
            generation,
            going_away,
            healthy: started.elapsed() >= HEALTHY_SESSION,
        }));
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                session.close("agent shutting down");
                return;
            }
            _ = session.peer_going_away(), if !going_away => {
                going_away = true;
                info!(%replica, "server going away; dialing a replacement while this session drains");
                report(true);
            }
            changed = replicas.changed() => {
                if changed.is_err() {
                    break;
                }
                if let Some(list) = replicas.borrow_and_update().clone() {
                    let _ = news.send(SessionNews::Replicas(list));
                }
            }
            Some(payload) = async {
                match credential_messages.as_mut() {
                    Some(messages) => messages.recv().await,
                    None => None,
                }
            } => match crate::credentials::Message::decode(&payload) {
                Ok(message) => { let _ = news.send(SessionNews::Credentials(message)); }
                Err(err) => warn!(%replica, error = %err, "malformed credentials message from the server"),
            },
            next = async {
                match incoming.as_mut() {
                    Some(streams) => streams.recv().await,
                    None => None,
                }
            } => match next {
                Some(stream) => {
                    let upstream = upstream.clone();
                    tokio::spawn(async move { upstream.serve(stream).await });
                }
                None => break,
            },
        }
    }
    session.closed().await;
    info!(%replica,
        reason = session.close_reason().unwrap_or_default(),
        "tunnel disconnected"
    );
    if !going_away {
        report(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let cap = Duration::from_secs(30);
        for attempt in 0..40 {
            let ceiling = FIRST_BACKOFF.saturating_mul(1 << attempt.min(16)).min(cap);
            for _ in 0..50 {
                let wait = backoff(attempt, cap);
                assert!(
                    wait <= ceiling && wait >= MIN_BACKOFF,
                    "{attempt}: {wait:?}"
                );
            }
        }
        let samples: std::collections::HashSet<_> = (0..50).map(|_| backoff(5, cap)).collect();
        assert!(samples.len() > 1, "backoff is jittered");
        for _ in 0..50 {
            let fast = backoff(0, FAST_RETRY_MAX);
            assert!(fast <= FAST_RETRY_MAX && fast >= MIN_BACKOFF, "{fast:?}");
            assert!(
                backoff(3, Duration::ZERO) == MIN_BACKOFF,
                "a zero cap still waits"
            );
        }
    }
}
