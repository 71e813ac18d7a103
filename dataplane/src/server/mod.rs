//! tether-server: accepts agent tunnels on the public port and proxies
//! `/tunnel/{cluster}/...` from the internal port through them.

mod agents;
mod config;
pub mod kubernetes;
pub mod metrics;
pub mod peers;
mod proxy;
mod ratelimit;
pub mod registry;
pub mod signing;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clap::Parser;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::clusters::Clusters;
use crate::http::{Body, full, text};
use crate::listen::{self, ConnInfo};
use crate::tls::{ReloadingServerConfig, ServerTlsFiles, TlsError};
pub use config::{ClustersSource, LoadError};
use metrics::ServerMetrics;
use registry::Registry;

/// Parses `:8443`, `0.0.0.0:8443` or `[::1]:8443`.
pub fn parse_listen_addr(value: &str) -> Result<SocketAddr, String> {
    let full = if value.starts_with(':') {
        format!("0.0.0.0{value}")
    } else {
        value.to_owned()
    };
    full.parse()
        .map_err(|_| format!("{value:?} is not an address like :8443 or 127.0.0.1:8443"))
}

pub fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|err| format!("{value:?}: {err}"))
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "tether-server",
    version,
    about = "tether's management-side tunnel server"
)]
pub struct ServerArgs {
    /// Public address: agents connect here (`/connect`, `/healthz`).
    #[arg(long, env = "ADDR", default_value = ":8443", value_parser = parse_listen_addr)]
    pub addr: SocketAddr,
    /// Internal address: `/tunnel/{id}/...`, `/healthz`, `/readyz` (metrics
    /// have a port of their own, `--metrics-addr`).
    #[arg(long, env = "INTERNAL_ADDR", default_value = ":8080", value_parser = parse_listen_addr)]
    pub internal_addr: SocketAddr,
    /// JSON file `[{"id","token"|"tokenSha256","targetAddr"}]`, reloaded when it changes or on SIGHUP.
    #[arg(long, env = "CLUSTERS_FILE")]
    pub clusters: Option<PathBuf>,
    /// The same JSON inline (used when --clusters is not given).
    #[arg(long = "clusters-json", env = "CLUSTERS", hide_env_values = true)]
    pub clusters_json: Option<String>,
    /// `namespace/name` of the Secret tether-operator publishes (key
    /// clusters.json), watched through the Kubernetes API: changes apply
    /// within a second. Also turns on connection status reporting.
    #[arg(long, env = "CLUSTERS_SECRET", value_parser = kubernetes::parse_secret_ref, conflicts_with = "clusters")]
    pub clusters_secret: Option<kubernetes::SecretRef>,
    /// This replica's name in reported status (the pod name).
    #[arg(long, env = "POD_NAME", default_value = "tether-server")]
    pub replica_name: String,
    /// Requests per second allowed per cluster through the tunnel; 0 = unlimited.
    #[arg(long, env = "RATE_LIMIT", default_value_t = 0.0)]
    pub rate_limit: f64,
    /// PEM certificate chain; enables TLS on both ports.
    #[arg(long, env = "TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA; clients on both ports must present a certificate it signed.
    #[arg(long, env = "TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Threads running the server's tasks (default: one per CPU the
    /// process may use, its cgroup's quota included).
    #[arg(long, env = "WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,
    /// Largest request body forwarded, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 32 << 20)]
    pub max_body_bytes: u64,
    /// Failed agent authentications allowed per second from one source
    /// address (bursts of four seconds' worth); beyond it /connect answers
    /// 429 without checking the token. 0 disables the limit.
    #[arg(long, env = "AUTH_FAILURE_RATE", default_value_t = 20.0)]
    pub auth_failure_rate: f64,
    /// Forward `Impersonate-*` headers instead of stripping them.
    #[arg(long, env = "ALLOW_IMPERSONATION")]
    pub allow_impersonation: bool,
    /// Streams open at once on one tunnel.
    #[arg(long, env = "MAX_STREAMS_PER_TUNNEL", default_value_t = 10_000)]
    pub max_streams_per_tunnel: usize,
    #[arg(long, env = "KEEPALIVE_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,
    /// A tunnel silent for this long is closed.
    #[arg(long, env = "KEEPALIVE_TIMEOUT", default_value = "45s", value_parser = parse_duration)]
    pub keepalive_timeout: Duration,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// On SIGTERM, how long this replica keeps serving new requests after
    /// failing /readyz: the time a Service or load balancer takes to stop
    /// sending it traffic.
    #[arg(long, env = "SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
    /// The other replicas' internal base URLs, comma-separated (standalone
    /// high availability), e.g. `https://10.0.0.2:8080,https://10.0.0.3:8080`.
    #[arg(long, env = "PEERS", value_parser = peers::parse_peer_urls, conflicts_with = "peer_service")]
    pub peers: Option<peers::PeerUrls>,
    /// Headless Service whose EndpointSlices list the replicas (in
    /// Kubernetes; the namespace is --peer-namespace).
    #[arg(long, env = "PEER_SERVICE")]
    pub peer_service: Option<String>,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub peer_namespace: String,
    /// How often each peer is asked which clusters it holds.
    #[arg(long, env = "PEER_SYNC_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub peer_sync_interval: Duration,
    /// DNS name every replica's certificate carries, checked when one
    /// replica connects to another (default: the first DNS name of this
    /// replica's own certificate, which all replicas share).
    #[arg(long, env = "PEER_TLS_NAME")]
    pub peer_tls_name: Option<String>,
    /// Plain-HTTP `/healthz` and `/readyz` for kubelet probes (the tunnel
    /// ports require client certificates). Off when unset.
    #[arg(long, env = "HEALTH_ADDR", value_parser = parse_listen_addr)]
    pub health_addr: Option<SocketAddr>,
    /// How often the clusters file and TLS files are checked for changes.
    #[arg(long, env = "RELOAD_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub reload_interval: Duration,
    /// Standalone renewal of agent certificates: the CA that signs them
    /// (PEM). In Kubernetes, leave unset: tether-operator signs
    /// CertificateSigningRequests this server creates.
    #[arg(long, env = "SIGNER_CA_CERT", requires = "signer_ca_key")]
    pub signer_ca_cert: Option<PathBuf>,
    /// The signing CA's private key (PEM).
    #[arg(long, env = "SIGNER_CA_KEY", requires = "signer_ca_cert")]
    pub signer_ca_key: Option<PathBuf>,
    /// Lifetime of agent certificates signed with --signer-ca-cert.
    #[arg(long, env = "AGENT_CERT_DURATION", default_value = "2160h", value_parser = parse_duration)]
    pub agent_cert_duration: Duration,
    /// How long to wait for tether-operator to sign a renewal.
    #[arg(long, env = "SIGNING_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub signing_timeout: Duration,
    #[command(flatten)]
    pub metrics: crate::metrics_port::MetricsArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("clusters: {0}")]
    Clusters(#[from] LoadError),
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
    #[error("Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("peers: {0}")]
    Peers(#[from] peers::PeerError),
    #[error("signer CA: {0}")]
    SignerCa(String),
}

/// State shared by both ports.
pub(crate) struct ServerState {
    args: ServerArgs,
    clusters: RwLock<Arc<Clusters>>,
    tunnels: Registry,
    metrics: ServerMetrics,
    /// Requests per second per cluster (`--rate-limit`).
    limiter: ratelimit::RateLimiter<String>,
    /// Failed agent authentications per source address.
    auth_failures: ratelimit::RateLimiter<std::net::IpAddr>,
    /// Set on SIGTERM: /readyz fails and no new tunnels are accepted;
    /// requests are still served (locally or by a peer) until the end.
    draining: CancellationToken,
    /// The other replicas (high availability).
    peers: Arc<peers::Peers>,
    /// Set when draining ends: agents get GoAway, ports stop accepting,
    /// watches end at their next event boundary.
    stopping: CancellationToken,
    mtls: bool,
    /// Where connection changes go, when status reporting is on.
    reporter: Option<tokio::sync::mpsc::UnboundedSender<kubernetes::ConnectionEvent>>,
    /// Who signs agent certificate renewals.
    signer: signing::Signer,
}

impl ServerState {
    fn clusters(&self) -> Arc<Clusters> {
        self.clusters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies a new cluster list: new clusters are accepted from now on,
    /// removed ones (or ones with a new token) lose their session.
    fn set_clusters(&self, clusters: Clusters) {
        let count = clusters.len();
        let clusters = Arc::new(clusters);
        *self.clusters.write().unwrap_or_else(|p| p.into_inner()) = clusters.clone();
        let closed = self.close_unaccepted(&clusters);
        info!(clusters = count, closed = ?closed, "clusters configuration applied");
        for (id, tunnel) in self.tunnels.snapshot() {
            if let Some(cluster) = clusters.get(&id) {
                agents::offer_credentials(cluster, &tunnel.session, &tunnel.token_sha256);
            }
        }
    }

    /// Ends the sessions the configuration no longer accepts.
    fn close_unaccepted(&self, clusters: &Clusters) -> Vec<String> {
        let closed = self.tunnels.retain_configured(clusters);
        for cluster in &closed {
            self.report(kubernetes::ConnectionEvent::Down {
                cluster: cluster.clone(),
            });
        }
        closed
    }

    /// At a previous token's expiry: ends the sessions that used it.
    fn apply_token_expiry(&self) {
        let closed = self.close_unaccepted(&self.clusters());
        if !closed.is_empty() {
            info!(closed = ?closed, "sessions on an expired previous token ended");
        }
    }

    /// What this replica tells its peers.
    fn replica_state(&self) -> peers::ReplicaState {
        let mut clusters: Vec<String> = self
            .tunnels
            .snapshot()
            .into_iter()
            .filter(|(_, t)| !t.session.is_draining())
            .map(|(id, _)| id)
            .collect();
        clusters.sort();
        peers::ReplicaState {
            replica: self.peers.me().to_owned(),
            clusters,
            draining: self.draining.is_cancelled(),
        }
    }

    fn report(&self, event: kubernetes::ConnectionEvent) {
        if let Some(reporter) = &self.reporter {
            let _ = reporter.send(event);
        }
    }
}

/// A running server; dropping it does not stop it, [`RunningServer::shutdown`] does.
pub struct RunningServer {
    pub public_addr: SocketAddr,
    pub internal_addr: SocketAddr,
    /// The plain-HTTP probe port, when `--health-addr` is set.
    pub health_addr: Option<SocketAddr>,
    /// The metrics port, when `--metrics-addr` is set.
    pub metrics_addr: Option<SocketAddr>,
    state: Arc<ServerState>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl RunningServer {
    /// Binds both ports and starts serving. With `--clusters-secret` or
    /// `--peer-service`, the Kubernetes client comes from the environment
    /// (in-cluster or KUBECONFIG).
    pub async fn start(args: ServerArgs) -> Result<Self, StartError> {
        let needs_api = args.clusters_secret.is_some() || args.peer_service.is_some();
        let client = if needs_api {
            Some(kube::Client::try_default().await?)
        } else {
            None
        };
        Self::start_with_client(args, client).await
    }

    /// As [`RunningServer::start`], with a given Kubernetes client (for
    /// `--clusters-secret` and `--peer-service`).
    pub async fn start_with_client(
        args: ServerArgs,
        client: Option<kube::Client>,
    ) -> Result<Self, StartError> {
        let metrics_client = client.clone();
        let source = ClustersSource::from_args(&args);
        let clusters = source.load()?;
        let stop = CancellationToken::new();
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => {
                let files = ServerTlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: args.tls_client_ca.clone(),
                };
                let public = ReloadingServerConfig::load(
                    files.clone(),
                    &[b"http/1.1"],
                    args.reload_interval,
                    stop.clone(),
                )?;
                let internal = ReloadingServerConfig::load(
                    files,
                    &[b"h2", b"http/1.1"],
                    args.reload_interval,
                    stop.clone(),
                )?;
                Some((public, internal))
            }
            _ => None,
        };
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let public = bind(args.addr).await?;
        let internal = bind(args.internal_addr).await?;
        let public_addr = public.local_addr().map_err(|source| StartError::Bind {
            addr: args.addr,
            source,
        })?;
        let internal_addr = internal.local_addr().map_err(|source| StartError::Bind {
            addr: args.internal_addr,
            source,
        })?;

        let has_peers = args.peers.is_some() || args.peer_service.is_some();
        let peer_tls = match (&args.tls_cert, &args.tls_key) {
            // The peer client is built only where there are peers: its TLS
            // name comes from the certificate, which may have none.
            _ if !has_peers => None,
            (Some(cert), Some(key)) => Some(peers::PeerTls {
                files: ServerTlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: args.tls_client_ca.clone(),
                },
                name: args.peer_tls_name.clone(),
            }),
            _ => None,
        };
        let peer_scheme = if peer_tls.is_some() { "https" } else { "http" };
        let peer_set = Arc::new(peers::Peers::new(
            args.replica_name.clone(),
            args.peer_sync_interval,
            peer_tls,
            args.peer_service.is_none(),
        )?);
        if let Some(urls) = &args.peers {
            peer_set.set_targets(
                urls.0
                    .iter()
                    .map(|url| peers::PeerTarget {
                        url: url.clone(),
                        expected_name: None,
                    })
                    .collect(),
            );
        }
        let discovery = match (&args.peer_service, &client) {
            (Some(service), Some(client)) => Some((service.clone(), client.clone())),
            _ => None,
        };
        let signer = signer(&args, client.as_ref())?;
        let kube = match (&args.clusters_secret, client) {
            (Some(secret), Some(client)) => Some((secret.clone(), client)),
            _ => None,
        };
        let (reporter, reports) = match &kube {
            Some(_) => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let state = Arc::new(ServerState {
            reporter,
            signer,
            limiter: ratelimit::RateLimiter::new(args.rate_limit, args.rate_limit),
            auth_failures: ratelimit::RateLimiter::new(
                args.auth_failure_rate,
                args.auth_failure_rate * 4.0,
            ),
            mtls: args.tls_client_ca.is_some(),
            args,
            clusters: RwLock::new(Arc::new(clusters)),
            tunnels: Registry::default(),
            metrics: ServerMetrics::new()?,
            draining: CancellationToken::new(),
            peers: peer_set.clone(),
            stopping: stop.clone(),
        });
        info!(clusters = state.clusters().len(), %public_addr, %internal_addr,
            tls = tls.is_some(), mtls = state.mtls, "tether-server listening");

        let mut tasks = JoinSet::new();
        let grace = state.args.shutdown_grace;
        let (public_tls, internal_tls) = match tls {
            Some((public, internal)) => (Some(public), Some(internal)),
            None => (None, None),
        };
        let ports: [(TcpListener, _, Routes); 2] = [
            (public, public_tls, public_routes),
            (internal, internal_tls, internal_routes),
        ];
        for (listener, tls, routes) in ports {
            let state = state.clone();
            tasks.spawn(listen::serve(
                listener,
                tls,
                move |conn| service(state.clone(), conn, routes),
                stop.clone(),
                grace,
            ));
        }
        tasks.spawn(config::watch(source, state.clone(), stop.clone()));
        tasks.spawn(peer_set.clone().run(state.draining.clone(), stop.clone()));
        tasks.spawn(agents::announce_replicas(state.clone(), stop.clone()));
        if let Some((service, client)) = discovery {
            tasks.spawn(peers::discover_endpoint_slices(
                client,
                state.args.peer_namespace.clone(),
                service,
                peer_scheme,
                internal_addr.port(),
                peer_set.clone(),
                stop.clone(),
            ));
        }
        let health_addr = match state.args.health_addr {
            Some(addr) => {
                let listener = bind(addr).await?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?;
                let health_state = state.clone();
                tasks.spawn(listen::serve(
                    listener,
                    None,
                    move |conn| service(health_state.clone(), conn, health_routes),
                    stop.clone(),
                    grace,
                ));
                Some(bound)
            }
            None => None,
        };
        let metrics_state = state.clone();
        let metrics_addr = crate::metrics_port::serve(
            &state.args.metrics,
            Arc::new(move || metrics_state.metrics.render(&metrics_state.tunnels)),
            metrics_client,
            stop.clone(),
        )
        .await?
        .map(|port| port.addr);
        if let (Some((secret, client)), Some(reports)) = (kube, reports) {
            tasks.spawn(kubernetes::watch_clusters(
                client.clone(),
                secret,
                state.clone(),
                stop.clone(),
            ));
            let replica = state.args.replica_name.clone();
            tasks.spawn(kubernetes::report_status(
                client,
                replica,
                state.clone(),
                reports,
                stop.clone(),
            ));
        }
        Ok(Self {
            public_addr,
            internal_addr,
            health_addr,
            metrics_addr,
            state,
            stop,
            tasks,
        })
    }

    /// Agents connected right now.
    pub fn connected_agents(&self) -> usize {
        self.state.tunnels.len()
    }

    /// Whether `cluster` has a live session.
    pub fn is_connected(&self, cluster: &str) -> bool {
        self.state.tunnels.get(cluster).is_some()
    }

    /// The metrics text, as `/metrics` serves it.
    pub fn metrics_text(&self) -> String {
        self.state.metrics.render(&self.state.tunnels)
    }

    /// The replicas this one counts as live (itself included).
    pub fn live_replicas(&self) -> Vec<String> {
        self.state
            .peers
            .live_replicas(self.state.draining.is_cancelled())
    }

    /// Drains and stops without failing a request: /readyz fails at once
    /// and peers and agents are told this replica is leaving, while new
    /// requests are still served for `--shutdown-delay` (the time load
    /// balancers take to stop sending them). Then agents get GoAway, idle
    /// client connections are closed, requests in flight finish within
    /// `--shutdown-grace` (new ones find a peer), and every session closes.
    pub async fn shutdown(mut self) {
        let args = &self.state.args;
        info!(delay = ?args.shutdown_delay, grace = ?args.shutdown_grace, "draining");
        self.state.draining.cancel();
        tokio::time::sleep(args.shutdown_delay).await;
        self.state.tunnels.go_away_all();
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.state.tunnels.close_all("server shutting down");
    }
}

type Routes = fn(Arc<ServerState>, Arc<ConnInfo>, Request<Incoming>) -> proxy::BoxFuture;

/// The signer of agent certificate renewals: a CA on disk when given, else
/// tether-operator through the Kubernetes API when there is one, else none
/// (agents are told, and keep their certificate until it expires).
fn signer(args: &ServerArgs, client: Option<&kube::Client>) -> Result<signing::Signer, StartError> {
    if let (Some(cert), Some(key)) = (&args.signer_ca_cert, &args.signer_ca_key) {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path)
                .map_err(|err| StartError::SignerCa(format!("{}: {err}", path.display())))
        };
        let ca = crate::pki::CertificateAuthority::from_pem(&read(cert)?, &read(key)?)
            .map_err(|err| StartError::SignerCa(err.to_string()))?;
        return Ok(signing::Signer::Local {
            ca: Box::new(ca),
            validity: args.agent_cert_duration,
        });
    }
    Ok(match client {
        Some(client) => signing::Signer::Kubernetes {
            client: client.clone(),
            timeout: args.signing_timeout,
        },
        None => signing::Signer::None,
    })
}

fn service(
    state: Arc<ServerState>,
    conn: Arc<ConnInfo>,
    routes: Routes,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Send
+ 'static {
    hyper::service::service_fn(move |request| {
        let response = routes(state.clone(), conn.clone(), request);
        async move { Ok::<_, Infallible>(response.await) }
    })
}

fn public_routes(
    state: Arc<ServerState>,
    conn: Arc<ConnInfo>,
    request: Request<Incoming>,
) -> proxy::BoxFuture {
    match request.uri().path() {
        "/connect" => Box::pin(agents::connect(state, conn, request)),
        "/healthz" => ready(text(StatusCode::OK, "ok")),
        _ => ready(text(StatusCode::NOT_FOUND, "not found")),
    }
}

fn internal_routes(
    state: Arc<ServerState>,
    conn: Arc<ConnInfo>,
    request: Request<Incoming>,
) -> proxy::BoxFuture {
    let path = request.uri().path();
    if path.starts_with("/tunnel/") {
        return Box::pin(proxy::proxy(state, conn, request));
    }
    match path {
        "/healthz" | "/readyz" => health_routes(state, conn, request),
        peers::STATE_PATH => ready(replica_state(&state, &conn)),
        _ => ready(text(StatusCode::NOT_FOUND, "not found")),
    }
}

/// Probes: live while the process runs; ready until it starts draining.
/// Readiness does not wait for agents: a replica without sessions serves
/// every cluster through its peers.
fn health_routes(
    state: Arc<ServerState>,
    _conn: Arc<ConnInfo>,
    request: Request<Incoming>,
) -> proxy::BoxFuture {
    match request.uri().path() {
        "/healthz" => ready(text(StatusCode::OK, "ok")),
        "/readyz" if state.draining.is_cancelled() => {
            ready(text(StatusCode::SERVICE_UNAVAILABLE, "draining"))
        }
        "/readyz" if !state.peers.synced() => {
            ready(text(StatusCode::SERVICE_UNAVAILABLE, "peers not asked yet"))
        }
        "/readyz" => ready(text(StatusCode::OK, "ok")),
        _ => ready(text(StatusCode::NOT_FOUND, "not found")),
    }
}

/// This replica's state for its peers. With mTLS only another replica (a
/// tether-server certificate) may ask.
fn replica_state(state: &ServerState, conn: &ConnInfo) -> Response<Body> {
    if state.mtls
        && !conn
            .client_certificate
            .as_ref()
            .is_some_and(crate::pki::is_server_identity)
    {
        return text(StatusCode::FORBIDDEN, "only tether-server replicas may ask");
    }
    let body = serde_json::to_vec(&state.replica_state()).unwrap_or_default();
    let mut response = Response::new(full(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn ready(response: Response<Body>) -> proxy::BoxFuture {
    Box::pin(std::future::ready(response))
}
