//! Serving one tunnel stream: HTTP/1.1 requests from tether-server,
//! forwarded to the configured target with the agent's own credentials.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::Service;
use tracing::{debug, warn};

use super::{AgentArgs, AgentError, AgentMetrics};
use crate::forward;
use crate::http::{Body, BoxError, kube_status};
use crate::mux::IncomingStream;
use crate::pool::{Pool, RequestError};
use crate::tls;

/// The agent's own `Authorization` value. Projected tokens are rotated on
/// disk: the kubelet writes a new one at 80% of the old one's lifetime,
/// which stays valid until it expires. So the file is read again once the
/// value in hand is a second old, well inside that overlap (client-go
/// re-reads its token file once a minute). A `stat` for every request cost
/// 6% of the agent's CPU at concurrency 64 (BENCHMARKS.md).
struct ServiceAccountToken {
    path: PathBuf,
    cached: std::sync::Mutex<Option<CachedToken>>,
}

struct CachedToken {
    read_at: Instant,
    value: HeaderValue,
}

const TOKEN_MAX_AGE: Duration = Duration::from_secs(1);

impl ServiceAccountToken {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            cached: std::sync::Mutex::new(None),
        }
    }

    fn bearer(&self) -> Result<HeaderValue, &'static str> {
        self.bearer_at(Instant::now())
    }

    // Rarely a read of a small local file: cheaper on the runtime thread
    // than a round trip through the blocking pool.
    fn bearer_at(&self, now: Instant) -> Result<HeaderValue, &'static str> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(token) = cached.as_ref()
            && now.saturating_duration_since(token.read_at) < TOKEN_MAX_AGE
        {
            return Ok(token.value.clone());
        }
        *cached = None;
        let token = match std::fs::read_to_string(&self.path) {
            Ok(token) if !token.trim().is_empty() => token,
            _ => {
                warn!(path = %self.path.display(), "cannot read the ServiceAccount token");
                return Err("tether-agent cannot read its ServiceAccount token");
            }
        };
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| "tether-agent's ServiceAccount token is not a valid header value")?;
        value.set_sensitive(true);
        *cached = Some(CachedToken {
            read_at: now,
            value: value.clone(),
        });
        Ok(value)
    }
}

/// Idle connections kept to the API server: each holds a TLS session on
/// both ends, and the tunnel's streams bound how many requests are in
/// flight at once.
const MAX_IDLE_UPSTREAM: usize = 256;

pub(super) struct Upstream {
    target: String,
    /// `scheme://target`, what the connector dials.
    base: Uri,
    /// The `Host` of every request: the target.
    host: HeaderValue,
    sa_token: ServiceAccountToken,
    connector: HttpsConnector<HttpConnector>,
    /// Keep-alive connections to the target: no TLS handshake per request.
    pool: Arc<Pool>,
    metrics: Arc<AgentMetrics>,
}

impl Upstream {
    pub(super) fn new(args: &AgentArgs, metrics: Arc<AgentMetrics>) -> Result<Self, AgentError> {
        let config = if args.insecure {
            warn!("--insecure: the API server's certificate is NOT verified");
            tls::insecure_client_config()
        } else {
            tls::client_config(tls::load_roots(&args.ca_cert)?, None)?
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        // HTTP/1.1 only: upgrades (exec, port-forward) need it, and the
        // pool gives the reuse HTTP/2 would.
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let scheme = if args.plain_target { "http" } else { "https" };
        let base = Uri::try_from(format!("{scheme}://{}/", args.target))
            .map_err(|_| AgentError::BadTarget(args.target.clone()))?;
        let host = HeaderValue::from_str(&args.target)
            .map_err(|_| AgentError::BadTarget(args.target.clone()))?;
        Ok(Self {
            target: args.target.clone(),
            base,
            host,
            sa_token: ServiceAccountToken::new(args.sa_token_path.clone()),
            connector,
            pool: Arc::new(Pool::new(MAX_IDLE_UPSTREAM)),
            metrics,
        })
    }

    /// A new connection to the API server (TLS unless `--plain-target`).
    async fn connect(&self) -> Result<MaybeHttpsStream<TokioIo<TcpStream>>, BoxError> {
        let mut connector = self.connector.clone();
        match std::future::poll_fn(|cx| connector.poll_ready(cx)).await {
            Ok(()) => connector.call(self.base.clone()).await,
            Err(err) => Err(err),
        }
    }

    /// Sends `request` (its URI in origin form) to the API server on an
    /// idle connection, else a new one.
    async fn send(&self, request: Request<Body>) -> Result<Response<Body>, String> {
        match self.pool.request(request, || self.connect()).await {
            Ok(response) => Ok(response),
            Err(RequestError::Connect(err, _)) => Err(crate::http::error_chain(&*err)),
            Err(RequestError::Failed(err)) => Err(crate::http::error_chain(&err)),
        }
    }

    pub(super) async fn serve(self: Arc<Self>, incoming: IncomingStream) {
        if incoming.target() != self.target {
            // The server (or whoever holds its session) asked for another
            // address: this agent reaches its API server and nothing else.
            warn!(requested = %incoming.target(), allowed = %self.target, "refusing stream to a target that is not allowed");
            self.count_error();
            incoming.refuse("target not allowed");
            return;
        }
        let Ok(stream) = incoming.accept().await else {
            return;
        };
        let id = stream.id();
        let this = self.clone();
        let service = hyper::service::service_fn(move |request| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.forward(request).await) }
        });
        let served = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades()
            .await;
        if let Err(err) = served {
            debug!(stream = id, error = %err, "tunnel stream ended with an error");
        }
    }

    fn count_error(&self) {
        self.metrics.upstream_errors.inc();
    }

    /// A request of the agent's own to its API server (storing renewed
    /// credentials): the status and the whole body, at most 1 MiB.
    pub(super) async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, bytes::Bytes), String> {
        let bearer = self.sa_token.bearer()?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.host.clone())
            .header(header::AUTHORIZATION, bearer)
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(match body {
                Some(body) => crate::http::full(body),
                None => crate::http::empty(),
            })
            .map_err(|err| err.to_string())?;
        let response = self.send(request).await?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), 1 << 20);
        // Boxed as `Send` here: through `Limited`'s `Into<BoxError>` bound
        // rustc cannot prove the caller's future `Send` (rust-lang/rust#102211).
        let collecting: std::pin::Pin<Box<dyn Future<Output = _> + Send>> =
            Box::pin(body.collect());
        let body = collecting.await.map_err(|err| err.to_string())?.to_bytes();
        Ok((status, body))
    }

    async fn forward(&self, mut request: Request<Incoming>) -> Response<Body> {
        self.metrics.upstream_requests.inc();
        let bearer = match self.sa_token.bearer() {
            Ok(bearer) => bearer,
            Err(message) => {
                self.count_error();
                return kube_status(StatusCode::BAD_GATEWAY, "ServiceUnavailable", message);
            }
        };
        // Impersonation was already allowed or stripped by tether-server.
        let prepared = forward::prepare(&mut request, true);
        let (mut parts, body) = request.into_parts();
        // Origin form, as the connection to the API server is already made.
        parts.uri = match parts.uri.path_and_query() {
            Some(path_and_query) => Uri::from(path_and_query.clone()),
            None => Uri::from_static("/"),
        };
        parts.version = http::Version::HTTP_11;
        parts.headers.insert(header::AUTHORIZATION, bearer);
        parts.headers.insert(header::HOST, self.host.clone());
        let outgoing = Request::from_parts(parts, body.map_err(Into::into).boxed());
        match self.send(outgoing).await {
            Ok(response) => forward::relay(prepared, response, &self.target),
            Err(err) => {
                self.count_error();
                warn!(target = %self.target, error = %err, "API server request failed");
                kube_status(
                    StatusCode::BAD_GATEWAY,
                    "ServiceUnavailable",
                    &format!("tether-agent cannot reach the API server: {err}"),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer_text(token: &ServiceAccountToken, at: Instant) -> Result<String, &'static str> {
        token
            .bearer_at(at)
            .map(|v| v.to_str().unwrap_or_default().to_owned())
    }

    /// A change the kubelet makes (an atomic swap of a new file, as
    /// projected volumes do, or a rewrite) is used once the token in hand
    /// is a second old; an emptied or removed file is refused then.
    #[test]
    fn a_rotated_token_is_used_within_a_second() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        let token = ServiceAccountToken::new(path.clone());
        let start = Instant::now();
        let later = |seconds: u64| start + Duration::from_secs(seconds);
        assert!(
            bearer_text(&token, start).is_err(),
            "a missing token is refused"
        );
        std::fs::write(&path, "first-token\n").expect("write");
        assert_eq!(bearer_text(&token, start), Ok("Bearer first-token".into()));
        let staged = dir.path().join("staged");
        std::fs::write(&staged, "other-token\n").expect("write");
        std::fs::rename(&staged, &path).expect("swap");
        assert_eq!(
            bearer_text(&token, start + Duration::from_millis(999)),
            Ok("Bearer first-token".into()),
            "within a second the token in hand is used"
        );
        assert_eq!(
            bearer_text(&token, later(1)),
            Ok("Bearer other-token".into())
        );
        std::fs::write(&path, "a-longer-rewritten-token").expect("rewrite");
        assert_eq!(
            bearer_text(&token, later(2)),
            Ok("Bearer a-longer-rewritten-token".into())
        );
        std::fs::write(&path, "  \n").expect("empty");
        assert!(
            bearer_text(&token, later(3)).is_err(),
            "an empty token is refused"
        );
        std::fs::remove_file(&path).expect("remove");
        assert!(
            bearer_text(&token, later(4)).is_err(),
            "a missing token is refused"
        );
    }
}
