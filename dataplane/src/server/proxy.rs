//! The internal `/tunnel/{cluster}/...` endpoint: carries a caller's
//! request over a new stream of the cluster's tunnel.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version as HttpVersion};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use super::ServerState;
use super::metrics::UNKNOWN_CLUSTER;
use crate::forward;
use crate::http::{Body, kube_status};
use crate::listen::ConnInfo;
use crate::mux::OpenError;

pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// Same answer for unknown and disconnected clusters, naming neither: the
/// caller learns nothing about which ids exist.
const UNAVAILABLE: &str = "cluster is not connected";

/// Splits `/tunnel/{id}/rest` into the id and the path to forward, keeping
/// the path exactly as escaped by the caller.
fn split_tunnel_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/tunnel/")?;
    match rest.find('/') {
        Some(slash) => Some((&rest[..slash], &rest[slash..])),
        None => Some((rest, "/")),
    }
}

pub(super) async fn proxy(
    state: Arc<ServerState>,
    conn: Arc<ConnInfo>,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let Some((id, path)) = split_tunnel_path(request.uri().path()) else {
        return kube_status(StatusCode::NOT_FOUND, "NotFound", "not found");
    };
    let clusters = state.clusters();
    let method = request.method().clone();
    let (cluster, tunnel) = match clusters.get(id) {
        Some(cluster) => (Some(cluster), state.tunnels.get(&cluster.id)),
        None => (None, None),
    };
    let label = cluster
        .map_or(UNKNOWN_CLUSTER, |c| c.id.as_str())
        .to_owned();
    let response = match (cluster, tunnel) {
        _ if state.draining.is_cancelled() => kube_status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "tether-server is shutting down",
        ),
        (Some(cluster), Some(tunnel)) => {
            if !state.limiter.allow(&cluster.id.clone()) {
                state.metrics.rate_limited.inc();
                kube_status(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TooManyRequests",
                    "rate limit exceeded for this cluster",
                )
            } else {
                let path_and_query = match request.uri().query() {
                    Some(query) => format!("{path}?{query}"),
                    None => path.to_owned(),
                };
                match Uri::try_from(path_and_query) {
                    Ok(uri) => {
                        *request.uri_mut() = uri;
                        send(
                            &state,
                            &cluster.target_addr,
                            &tunnel.session,
                            request,
                            &label,
                        )
                        .await
                    }
                    Err(_) => kube_status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "malformed request path",
                    ),
                }
            }
        }
        _ => kube_status(StatusCode::BAD_GATEWAY, "ServiceUnavailable", UNAVAILABLE),
    };
    state
        .metrics
        .requests
        .with_label_values(&[label.as_str(), method.as_str(), response.status().as_str()])
        .inc();
    state
        .metrics
        .duration
        .with_label_values(&[label.as_str()])
        .observe(started.elapsed().as_secs_f64());
    debug!(remote = %conn.remote, cluster = %label, %method, status = response.status().as_u16(), "proxied");
    response
}

async fn send(
    state: &ServerState,
    target: &str,
    session: &crate::mux::Session,
    mut request: Request<Incoming>,
    label: &str,
) -> Response<Body> {
    let max = state.args.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return kube_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            &format!("request body exceeds {max} bytes"),
        );
    }
    let prepared = forward::prepare(&mut request, state.args.allow_impersonation);
    let (mut parts, body) = request.into_parts();
    parts.version = HttpVersion::HTTP_11;
    if let Ok(host) = HeaderValue::from_str(target) {
        parts.headers.insert(header::HOST, host);
    }
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let outgoing = Request::from_parts(parts, Limited::new(body, limit).boxed());

    let stream = match session.open(target).await {
        Ok(stream) => stream,
        Err(err) => return open_failure(err),
    };
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
            Ok(pair) => pair,
            Err(err) => return tunnel_failure(&err),
        };
    let label_owned = label.to_owned();
    tokio::spawn(async move {
        if let Err(err) = connection.with_upgrades().await {
            debug!(cluster = %label_owned, error = %err, "tunnel stream ended with an error");
        }
    });
    match sender.send_request(outgoing).await {
        Ok(response) => forward::relay(prepared, response, label),
        Err(err) => tunnel_failure(&err),
    }
}

fn open_failure(err: OpenError) -> Response<Body> {
    let status = match err {
        OpenError::TooManyStreams(_) | OpenError::Draining => StatusCode::SERVICE_UNAVAILABLE,
        OpenError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        OpenError::Closed | OpenError::Refused(_) => StatusCode::BAD_GATEWAY,
    };
    warn!(error = %err, "cannot open a tunnel stream");
    kube_status(status, "ServiceUnavailable", &format!("tunnel: {err}"))
}

/// The full cause chain of a hyper error (the stream's reset reason is at
/// the bottom), so a caller sees why, e.g. that the agent refused.
fn tunnel_failure(err: &hyper::Error) -> Response<Body> {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    warn!(error = %message, "tunnel request failed");
    kube_status(
        StatusCode::BAD_GATEWAY,
        "ServiceUnavailable",
        &format!("tunnel: {message}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_tunnel_paths_keeping_escapes() {
        assert_eq!(
            split_tunnel_path("/tunnel/dev/api/v1/pods"),
            Some(("dev", "/api/v1/pods"))
        );
        assert_eq!(split_tunnel_path("/tunnel/dev"), Some(("dev", "/")));
        assert_eq!(split_tunnel_path("/tunnel/dev/"), Some(("dev", "/")));
        assert_eq!(
            split_tunnel_path("/tunnel/dev/api/v1/namespaces/a%2Fb"),
            Some(("dev", "/api/v1/namespaces/a%2Fb"))
        );
        assert_eq!(split_tunnel_path("/other"), None);
    }
}
