//! tether-server: accepts agent tunnels on the public port and proxies
//! `/tunnel/{cluster}/...` from the internal port through them.

mod agents;
mod config;
pub mod kubernetes;
pub mod metrics;
mod proxy;
mod ratelimit;
pub mod registry;

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
    /// Internal address: `/tunnel/{id}/...`, `/healthz`, `/readyz`, `/metrics`.
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
    /// How often the clusters file and TLS files are checked for changes.
    #[arg(long, env = "RELOAD_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub reload_interval: Duration,
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
    #[error("Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
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
    /// Set on SIGTERM: no new tunnels or requests.
    draining: CancellationToken,
    mtls: bool,
    /// Where connection changes go, when status reporting is on.
    reporter: Option<tokio::sync::mpsc::UnboundedSender<kubernetes::ConnectionEvent>>,
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
        let closed = self.tunnels.retain_configured(&clusters);
        info!(clusters = count, closed = ?closed, "clusters configuration applied");
        for cluster in closed {
            self.report(kubernetes::ConnectionEvent::Down { cluster });
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
    state: Arc<ServerState>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl RunningServer {
    /// Binds both ports and starts serving. With `--clusters-secret`, the
    /// Kubernetes client comes from the environment (in-cluster or KUBECONFIG).
    pub async fn start(args: ServerArgs) -> Result<Self, StartError> {
        let client = match &args.clusters_secret {
            Some(_) => Some(kube::Client::try_default().await?),
            None => None,
        };
        Self::start_with_client(args, client).await
    }

    /// As [`RunningServer::start`], with a given Kubernetes client.
    pub async fn start_with_client(
        args: ServerArgs,
        client: Option<kube::Client>,
    ) -> Result<Self, StartError> {
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

    /// Drains and stops: refuses new tunnels and requests, tells agents to
    /// reconnect elsewhere, lets in-flight requests finish within the grace
    /// period, then closes every session.
    pub async fn shutdown(mut self) {
        info!(grace = ?self.state.args.shutdown_grace, "draining");
        self.state.draining.cancel();
        self.state.tunnels.go_away_all();
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.state.tunnels.close_all("server shutting down");
    }
}

type Routes = fn(Arc<ServerState>, Arc<ConnInfo>, Request<Incoming>) -> proxy::BoxFuture;

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
        "/healthz" => ready(text(StatusCode::OK, "ok")),
        "/readyz" if state.draining.is_cancelled() => {
            ready(text(StatusCode::SERVICE_UNAVAILABLE, "draining"))
        }
        "/readyz" if state.tunnels.is_empty() => {
            ready(text(StatusCode::SERVICE_UNAVAILABLE, "no agent connected"))
        }
        "/readyz" => ready(text(StatusCode::OK, "ok")),
        "/metrics" => {
            let mut response = Response::new(full(state.metrics.render(&state.tunnels)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            ready(response)
        }
        _ => ready(text(StatusCode::NOT_FOUND, "not found")),
    }
}

fn ready(response: Response<Body>) -> proxy::BoxFuture {
    Box::pin(std::future::ready(response))
}
