//! The internal `/tunnel/{cluster}/...` endpoint: carries a caller's
//! request over a stream of the cluster's tunnel (an idle one kept open
//! from an earlier request, else a new one).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version as HttpVersion};
use http_body_util::{BodyExt, Limited};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use super::ServerState;
use super::metrics::UNKNOWN_CLUSTER;
use super::peers::FORWARDED_HEADER;
use crate::clusters::Cluster;
use crate::forward;
use crate::http::{Body, kube_status};
use crate::listen::ConnInfo;
use crate::mux::OpenError;
use crate::pool::RequestError;

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
    let Some((id, path)) =
        split_tunnel_path(request.uri().path()).map(|(id, path)| (id.to_owned(), path.to_owned()))
    else {
        return kube_status(StatusCode::NOT_FOUND, "NotFound", "not found");
    };
    let clusters = state.clusters();
    let method = request.method().clone();
    let cluster = clusters.get(&id);
    let label = cluster
        .map_or(UNKNOWN_CLUSTER, |c| c.id.as_str())
        .to_owned();
    // A request a peer forwarded is served here or not at all: never
    // forwarded again, so forwarding cannot loop. The mark stays out of the
    // tunnel.
    let forwarded = request.headers_mut().remove(FORWARDED_HEADER).is_some();
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path.clone(),
    };
    let line_stream = crate::http::is_line_stream(request.uri());
    let response = match cluster {
        None => kube_status(StatusCode::BAD_GATEWAY, "ServiceUnavailable", UNAVAILABLE),
        Some(cluster) if !state.limiter.allow(&cluster.id) => {
            state.metrics.rate_limited.inc();
            kube_status(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "rate limit exceeded for this cluster",
            )
        }
        Some(cluster) => match Uri::try_from(path_and_query.as_str()) {
            Err(_) => kube_status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "malformed request path",
            ),
            Ok(uri) => {
                *request.uri_mut() = uri;
                dispatch(&state, cluster, &path_and_query, request, forwarded, &label).await
            }
        },
    };
    // A watch or followed log on a replica that is going away ends cleanly
    // at an event boundary when it stops; the client re-establishes it on
    // a replica that stays.
    let (parts, body) = response.into_parts();
    let body = if line_stream && parts.status == StatusCode::OK {
        crate::http::EndsAtLineAfter::new(body, state.stopping.clone()).boxed()
    } else {
        body
    };
    let received = state
        .metrics
        .response_bytes
        .with_label_values(&[label.as_str()]);
    let response = Response::from_parts(parts, crate::http::counted(body, received).boxed());
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
    debug!(remote = %conn.remote, cluster = %label, %method, status = response.status().as_u16(),
        forwarded, "proxied");
    response
}

/// A declared body over `--max-body-bytes` (the limit).
struct BodyTooLarge(u64);

impl BodyTooLarge {
    fn response(&self) -> Response<Body> {
        kube_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            &format!("request body exceeds {} bytes", self.0),
        )
    }
}

/// Refuses a body larger than `--max-body-bytes` by its declared length,
/// strips the caller's credentials and hop-by-hop headers, and bounds the
/// body as it streams: what every hop of a request gets.
fn prepare_outgoing(
    state: &ServerState,
    mut request: Request<Incoming>,
    label: &str,
) -> Result<(forward::Prepared, Request<Body>), BodyTooLarge> {
    let max = state.args.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(BodyTooLarge(max));
    }
    let prepared = forward::prepare(&mut request, state.args.allow_impersonation);
    let (mut parts, body) = request.into_parts();
    parts.version = HttpVersion::HTTP_11;
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let sent = state.metrics.request_bytes.with_label_values(&[label]);
    let body = Limited::new(crate::http::counted(body, sent), limit).boxed();
    Ok((prepared, Request::from_parts(parts, body)))
}

/// What one hop made of a request.
enum Hop {
    Answered(Response<Body>),
    /// Refused after it carried the request, or before without a way to
    /// hand it on: the caller gets this.
    Failed(Response<Body>),
    /// Not carried (the session began draining or closed since it was
    /// chosen): the request comes back for the next hop, with this answer
    /// if there is none.
    Unserved(Box<(Request<Body>, Response<Body>)>),
}

/// Carries the request on a live local session first; else through the
/// peer holding one (a forwarded request never goes on); else on a draining
/// local session, which refuses with a clear error. A hop that did not
/// carry the request hands it to the next, so a session that starts
/// draining between choice and use fails nothing.
async fn dispatch(
    state: &ServerState,
    cluster: &Cluster,
    path_and_query: &str,
    request: Request<Incoming>,
    forwarded: bool,
    label: &str,
) -> Response<Body> {
    let (prepared, mut outgoing) = match prepare_outgoing(state, request, label) {
        Ok(pair) => pair,
        Err(refused) => return refused.response(),
    };
    let forward_path = format!("/tunnel/{}{path_and_query}", cluster.id);
    let mut tried_local = false;
    let mut tried_peers = Vec::new();
    let mut refusal = None;
    loop {
        let local = if tried_local {
            None
        } else {
            state.tunnels.get(&cluster.id)
        };
        let usable = local
            .as_ref()
            .is_some_and(|t| !t.session.is_draining() && !t.session.is_closed());
        let peer = if usable || forwarded {
            None
        } else {
            state
                .peers
                .find_holder(&cluster.id, state.draining.is_cancelled(), &tried_peers)
                .await
        };
        let hop = match (peer, local) {
            (Some(peer), _) => {
                let hop = forward_to_peer(state, &peer, &forward_path, outgoing, label).await;
                tried_peers.push(peer);
                hop
            }
            (None, Some(tunnel)) => {
                tried_local = true;
                send(&cluster.target_addr, &tunnel, outgoing).await
            }
            (None, None) => {
                return refusal.unwrap_or_else(|| {
                    kube_status(StatusCode::BAD_GATEWAY, "ServiceUnavailable", UNAVAILABLE)
                });
            }
        };
        match hop {
            Hop::Answered(response) => return forward::relay(prepared, response, label),
            Hop::Failed(response) => return response,
            Hop::Unserved(unserved) => {
                let (request, why) = *unserved;
                outgoing = request;
                refusal = Some(why);
            }
        }
    }
}

/// Carries the request on an idle stream of the session, else a new one.
async fn send(target: &str, tunnel: &super::registry::Tunnel, mut outgoing: Request<Body>) -> Hop {
    if let Ok(host) = HeaderValue::from_str(target) {
        outgoing.headers_mut().insert(header::HOST, host);
    }
    let session = &tunnel.session;
    let open = || async move { session.open(target).await.map(TokioIo::new) };
    match tunnel.streams.request(outgoing, open).await {
        Ok(response) => Hop::Answered(response),
        Err(RequestError::Connect(err @ (OpenError::Draining | OpenError::Closed), outgoing)) => {
            Hop::Unserved(Box::new((*outgoing, open_failure(err))))
        }
        Err(RequestError::Connect(err, _)) => Hop::Failed(open_failure(err)),
        Err(RequestError::Failed(err)) => Hop::Failed(tunnel_failure(&err)),
    }
}

/// Carries the request to the replica that holds the cluster's tunnel;
/// streams, watches and upgrades relay as they would locally. A peer's
/// "not carried" answer hands a bodyless request on (a body, once sent,
/// cannot be sent again).
async fn forward_to_peer(
    state: &ServerState,
    peer: &str,
    path_and_query: &str,
    outgoing: Request<Body>,
    label: &str,
) -> Hop {
    let (parts, body) = outgoing.into_parts();
    let head = body.is_end_stream().then(|| parts.clone());
    let outgoing = Request::from_parts(parts, body);
    match state.peers.forward(peer, path_and_query, outgoing).await {
        Ok(response) if response.headers().contains_key(UNSERVED_HEADER) => {
            state
                .metrics
                .forwarded
                .with_label_values(&["unserved"])
                .inc();
            debug!(cluster = %label, %peer, "the peer's session was draining; trying the next");
            let refusal = forward::relay(forward::Prepared::default(), response, label);
            match head {
                Some(parts) => {
                    let request = Request::from_parts(parts, crate::http::empty());
                    Hop::Unserved(Box::new((request, refusal)))
                }
                None => Hop::Failed(refusal),
            }
        }
        Ok(response) => {
            state.metrics.forwarded.with_label_values(&["ok"]).inc();
            Hop::Answered(response.map(|body| body.map_err(Into::into).boxed()))
        }
        Err(err) => {
            state.metrics.forwarded.with_label_values(&["error"]).inc();
            warn!(cluster = %label, %peer, error = %err, "forwarding to a peer failed");
            Hop::Failed(kube_status(
                StatusCode::BAD_GATEWAY,
                "ServiceUnavailable",
                "tunnel: the replica holding this cluster did not answer",
            ))
        }
    }
}

/// Set on an answer whose request was not carried to the cluster, so a
/// forwarding replica may hand it to another holder.
const UNSERVED_HEADER: &str = "x-tether-unserved";

fn open_failure(err: OpenError) -> Response<Body> {
    let (status, unserved) = match err {
        OpenError::TooManyStreams(_) => (StatusCode::SERVICE_UNAVAILABLE, false),
        OpenError::Draining => (StatusCode::SERVICE_UNAVAILABLE, true),
        OpenError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, false),
        OpenError::Closed => (StatusCode::BAD_GATEWAY, true),
        OpenError::Refused(_) => (StatusCode::BAD_GATEWAY, false),
    };
    warn!(error = %err, "cannot open a tunnel stream");
    let mut response = kube_status(status, "ServiceUnavailable", &format!("tunnel: {err}"));
    if unserved {
        let headers = response.headers_mut();
        headers.insert(UNSERVED_HEADER, HeaderValue::from_static("1"));
        // client-go retries a 5xx that carries Retry-After; by then the
        // agent holds sessions with the replicas that stay.
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// The full cause chain of a hyper error (the stream's reset reason is at
/// the bottom), so a caller sees why, e.g. that the agent refused.
fn tunnel_failure(err: &hyper::Error) -> Response<Body> {
    let message = crate::http::error_chain(err);
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
