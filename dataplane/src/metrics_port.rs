//! The metrics port every tether binary serves: `/metrics` on an address
//! of its own, never behind a tunnel credential. Secure by default, as
//! controller-runtime's metrics server: HTTPS, and the caller's bearer token
//! checked with a TokenReview and a SubjectAccessReview for `get` on the
//! non-resource URL `/metrics` (what the chart's `tether-metrics-reader`
//! ClusterRole grants). Verdicts are cached per token, so a scrape every
//! 15 s costs no API call. `--metrics-auth none` serves plain HTTP to
//! whoever can reach the port (the NetworkPolicy decides then).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::http::{Body, bearer_token, full, text};
use crate::pki::{CertificateAuthority, LeafRequest, PkiError};
use crate::tls::{ReloadingServerConfig, ServerTlsFiles, TlsError};

/// How long an allowed token is trusted without asking again.
const ALLOWED_FOR: Duration = Duration::from_secs(60);
/// How long a refused token stays refused (shorter: a new RoleBinding
/// should take effect soon).
const REFUSED_FOR: Duration = Duration::from_secs(10);
/// Distinct tokens remembered at most; a flood of made-up tokens cannot
/// grow memory (they still cost a TokenReview each).
const CACHE_ENTRIES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsAuth {
    /// HTTPS; the bearer token must pass a TokenReview and a
    /// SubjectAccessReview for `get` on `/metrics`.
    Kubernetes,
    /// Plain HTTP, no authentication.
    None,
}

#[derive(Debug, Clone, clap::Args)]
pub struct MetricsArgs {
    /// Where `/metrics` is served, on a port of its own (off when unset).
    #[arg(long, env = "METRICS_ADDR", value_parser = crate::server::parse_listen_addr)]
    pub metrics_addr: Option<SocketAddr>,
    /// Who may read the metrics: `kubernetes` (HTTPS, the caller's token
    /// reviewed by the API server) or `none` (plain HTTP, anyone who can
    /// reach the port).
    #[arg(long, env = "METRICS_AUTH", value_enum, default_value_t = MetricsAuth::Kubernetes)]
    pub metrics_auth: MetricsAuth,
    /// Certificate for the HTTPS metrics port (reloaded when it changes);
    /// without it a self-signed one is made at start.
    #[arg(long, env = "METRICS_CERT", requires = "metrics_key")]
    pub metrics_cert: Option<PathBuf>,
    #[arg(long, env = "METRICS_KEY", requires = "metrics_cert")]
    pub metrics_key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsPortError {
    #[error("metrics port {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics port TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("metrics port certificate: {0}")]
    Pki(#[from] PkiError),
    #[error(
        "--metrics-auth kubernetes needs the Kubernetes API (in a pod, or KUBECONFIG): {0}; use --metrics-auth none to serve metrics without authentication"
    )]
    NoApi(kube::Error),
}

/// What the metrics text is made from, called at every scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// A registry in Prometheus's text format, as every binary renders it.
pub fn text_format(registry: &prometheus::Registry) -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    // Encoding into a Vec cannot fail for well-formed metrics.
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// What a token may do, as the API server said.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Allowed,
    /// The token authenticated no one.
    Unauthenticated,
    /// Authenticated, but not allowed to `get /metrics`.
    Forbidden(String),
}

/// Reviews callers' tokens with the API server and remembers the answers.
pub struct Reviewer {
    client: kube::Client,
    cache: Mutex<HashMap<[u8; 32], (Instant, Verdict)>>,
    /// Reviews sent to the API server (TokenReviews and SubjectAccessReviews).
    api_calls: std::sync::atomic::AtomicU64,
}

impl Reviewer {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache: Mutex::new(HashMap::new()),
            api_calls: Default::default(),
        }
    }

    /// How many reviews went to the API server so far.
    pub fn api_calls(&self) -> u64 {
        self.api_calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Verdict> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let (at, verdict) = cache.get(key)?;
        let ttl = match verdict {
            Verdict::Allowed => ALLOWED_FOR,
            _ => REFUSED_FOR,
        };
        (at.elapsed() < ttl).then(|| verdict.clone())
    }

    fn remember(&self, key: [u8; 32], verdict: &Verdict) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (at, _)| at.elapsed() < ALLOWED_FOR);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), verdict.clone()));
    }

    async fn review(&self, token: &str) -> Result<Verdict, kube::Error> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(verdict) = self.cached(&key) {
            return Ok(verdict);
        }
        let count = || {
            self.api_calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        };
        count();
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: None,
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let status = reviewed.status.unwrap_or_default();
        let verdict = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => {
                count();
                let access = SubjectAccessReview {
                    spec: SubjectAccessReviewSpec {
                        user: user.username.clone(),
                        groups: user.groups,
                        uid: user.uid,
                        extra: user.extra,
                        non_resource_attributes: Some(NonResourceAttributes {
                            path: Some("/metrics".into()),
                            verb: Some("get".into()),
                        }),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let decided = Api::<SubjectAccessReview>::all(self.client.clone())
                    .create(&PostParams::default(), &access)
                    .await?;
                match decided.status.is_some_and(|s| s.allowed) {
                    true => Verdict::Allowed,
                    false => Verdict::Forbidden(user.username.unwrap_or_default()),
                }
            }
            _ => Verdict::Unauthenticated,
        };
        self.remember(key, &verdict);
        Ok(verdict)
    }
}

/// The metrics port once it listens.
pub struct MetricsPort {
    /// Where it listens (port 0 in `--metrics-addr` picks one).
    pub addr: SocketAddr,
    /// With `kubernetes` auth, what reviews the callers' tokens.
    pub reviewer: Option<Arc<Reviewer>>,
}

/// Starts the metrics port when `--metrics-addr` is set. `client` reaches
/// the API server for reviews; without one the default configuration (in
/// a pod, or KUBECONFIG) is used.
pub async fn serve(
    args: &MetricsArgs,
    render: Render,
    client: Option<kube::Client>,
    shutdown: CancellationToken,
) -> Result<Option<MetricsPort>, MetricsPortError> {
    let Some(addr) = args.metrics_addr else {
        return Ok(None);
    };
    let (tls, reviewer) = match args.metrics_auth {
        MetricsAuth::None => (None, None),
        MetricsAuth::Kubernetes => {
            let client = match client {
                Some(client) => client,
                None => kube::Client::try_default()
                    .await
                    .map_err(MetricsPortError::NoApi)?,
            };
            (
                Some(tls_config(args, shutdown.clone())?),
                Some(Arc::new(Reviewer::new(client))),
            )
        }
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsPortError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsPortError::Bind { addr, source })?;
    let serving = reviewer.clone();
    let make = move |_conn| {
        let (render, reviewer) = (render.clone(), serving.clone());
        hyper::service::service_fn(move |request| {
            let (render, reviewer) = (render.clone(), reviewer.clone());
            async move { Ok::<_, Infallible>(handle(request, &render, reviewer.as_deref()).await) }
        })
    };
    tokio::spawn(crate::listen::serve(
        listener,
        tls,
        make,
        shutdown,
        Duration::from_secs(1),
    ));
    info!(addr = %bound, auth = ?args.metrics_auth, "metrics port listening");
    Ok(Some(MetricsPort {
        addr: bound,
        reviewer,
    }))
}

fn tls_config(
    args: &MetricsArgs,
    shutdown: CancellationToken,
) -> Result<ReloadingServerConfig, MetricsPortError> {
    const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];
    if let (Some(cert), Some(key)) = (&args.metrics_cert, &args.metrics_key) {
        let files = ServerTlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
        };
        return Ok(ReloadingServerConfig::load(
            files,
            ALPN,
            Duration::from_secs(10),
            shutdown,
        )?);
    }
    // Self-signed, as controller-runtime does without a certificate:
    // scrapers skip verification and the token check is the guard.
    let validity = Duration::from_secs(10 * 365 * 24 * 3600);
    let issuer = CertificateAuthority::generate("tether metrics (self-signed)", validity)?;
    let issued = issuer.issue(&LeafRequest::server(
        "tether-metrics",
        &["localhost"],
        &[],
        validity,
    ))?;
    let (certs, key) =
        crate::tls::identity_from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::from)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(ReloadingServerConfig::fixed(config))
}

async fn handle(
    request: Request<Incoming>,
    render: &Render,
    reviewer: Option<&Reviewer>,
) -> Response<Body> {
    if request.method() != Method::GET || request.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "only GET /metrics is served here");
    }
    if let Some(reviewer) = reviewer {
        let Some(token) = bearer_token(request.headers()) else {
            return text(StatusCode::UNAUTHORIZED, "a bearer token is required");
        };
        match reviewer.review(token).await {
            Ok(Verdict::Allowed) => {}
            Ok(Verdict::Unauthenticated) => {
                return text(StatusCode::UNAUTHORIZED, "the token authenticates no one");
            }
            Ok(Verdict::Forbidden(user)) => {
                warn!(%user, "metrics scrape refused: no get on /metrics");
                return text(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "{user} may not get /metrics (bind the tether-metrics-reader ClusterRole)"
                    ),
                );
            }
            Err(err) => {
                warn!(error = %err, "metrics scrape: the token could not be reviewed");
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the token could not be reviewed; try again",
                );
            }
        }
    }
    let mut response = Response::new(full(render()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}
