//! The public `/connect` endpoint: authenticates an agent and turns its
//! WebSocket into the cluster's tunnel session.

use std::sync::Arc;
use std::time::SystemTime;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::{info, warn};

use super::ServerState;
use super::kubernetes::ConnectionEvent;
use super::peers::{REPLICA_HEADER, REPLICAS_HEADER};
use super::registry::{self, Tunnel};
use crate::clusters::Cluster;
use crate::credentials::Message;
use crate::http::{Body, bearer_token, text};
use crate::listen::ConnInfo;
use crate::mux::{Role, Session, SessionConfig};
use crate::pool::Pool;
use crate::websocket::{self, AGENT_INSTANCE_HEADER, AGENT_VERSION_HEADER};

/// Counts a refused authentication, by why (`token`: missing or unknown;
/// `identity`: the certificate names another cluster; `retired_certificate`:
/// older than the cluster's certificate rotation), in the metrics and
/// against the source's budget of failures.
fn authentication_failed(state: &ServerState, source: std::net::IpAddr, reason: &str) {
    state
        .metrics
        .auth_failures
        .with_label_values(&["connect", reason])
        .inc();
    state.auth_failures.allow(&source);
}

pub(super) async fn connect(
    state: Arc<ServerState>,
    conn: Arc<ConnInfo>,
    request: Request<Incoming>,
) -> Response<Body> {
    if state.draining.is_cancelled() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "server is shutting down");
    }
    // A source that keeps failing is refused before any token work.
    let source = conn.remote.ip();
    if state.auth_failures.exhausted(&source) {
        state.metrics.auth_rate_limited.inc();
        return text(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed authentications",
        );
    }
    let clusters = state.clusters();
    // The hash of the token presented: current or, during a rotation, the
    // previous one.
    let Some((token_sha256, (cluster, token_use))) = bearer_token(request.headers())
        .map(crate::clusters::token_sha256)
        .and_then(|hash| Some((hash, clusters.authenticate(&hash, SystemTime::now())?)))
    else {
        authentication_failed(&state, source, "token");
        warn!(remote = %conn.remote, "agent authentication failed");
        return text(StatusCode::UNAUTHORIZED, "invalid agent token");
    };
    // With mTLS, the certificate must name the same cluster as the token:
    // a stolen token is useless without that cluster's key, and one
    // cluster's certificate cannot carry another cluster's token.
    // The certificate the agent presented, read once: `Some(None)` when it
    // cannot be read (refused below like one naming another cluster).
    let presented = conn
        .client_certificate
        .as_ref()
        .map(|cert| crate::pki::CertInfo::from_der(cert).ok());
    if let Some(info) = &presented {
        let identity = info.as_ref().and_then(|info| info.cluster.clone());
        if identity.as_deref() != Some(cluster.id.as_str()) {
            state.metrics.identity_mismatches.inc();
            authentication_failed(&state, source, "identity");
            warn!(remote = %conn.remote, cluster = %cluster.id, certificate = ?identity,
                "agent certificate names another cluster than its token");
            return text(
                StatusCode::FORBIDDEN,
                "client certificate does not match the agent token",
            );
        }
    }
    // A certificate older than a completed rotation is refused: it may be
    // the one whose key leaked.
    let certificate = presented.flatten();
    if let (Some(cert), Some(not_before)) = (&certificate, cluster.certificates_not_before)
        && cert.not_before < not_before
    {
        authentication_failed(&state, source, "retired_certificate");
        warn!(remote = %conn.remote, cluster = %cluster.id,
            "agent certificate predates the cluster's certificate rotation");
        return text(
            StatusCode::FORBIDDEN,
            "client certificate was replaced by a rotation; use the renewed one or a new bundle",
        );
    }
    let me = state.peers.me().to_owned();
    let instance = request
        .headers()
        .get(AGENT_INSTANCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(64).collect::<String>());
    if let Some(instance) = &instance
        && state
            .tunnels
            .holds_instance(&cluster.id, instance, &token_sha256, certificate.as_ref())
    {
        // The agent reached a replica it already holds (the load balancer
        // chose it again): refuse before upgrading, the first session stays.
        let mut refused = text(
            StatusCode::CONFLICT,
            "this agent already holds a session here",
        );
        if let Ok(name) = http::HeaderValue::from_str(&me) {
            refused.headers_mut().insert(REPLICA_HEADER, name);
        }
        return refused;
    }
    let (mut response, version) = match websocket::accept(&request) {
        Ok(accepted) => accepted,
        Err(err) => return text(StatusCode::BAD_REQUEST, &err.to_string()),
    };
    let live = state.peers.live_replicas(false).join(",");
    for (name, value) in [(REPLICA_HEADER, &me), (REPLICAS_HEADER, &live)] {
        if let Ok(value) = http::HeaderValue::from_str(value) {
            response.headers_mut().insert(name, value);
        }
    }
    let agent_version = request
        .headers()
        .get(AGENT_VERSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(64).collect())
        .unwrap_or_else(|| "unknown".to_owned());
    let cluster_id = cluster.id.clone();
    let remote = conn.remote;
    tokio::spawn(async move {
        let socket = match websocket::server_socket(request).await {
            Ok(socket) => socket,
            Err(err) => {
                warn!(cluster = %cluster_id, error = %err, "agent upgrade failed");
                return;
            }
        };
        let mut config = SessionConfig::new(version, Role::Opener, cluster_id.clone());
        config.max_streams = state.args.max_streams_per_tunnel;
        config.keepalive_interval = state.args.keepalive_interval;
        config.keepalive_timeout = state.args.keepalive_timeout;
        let (session, _) = Session::start(socket, config);
        let generation = state.tunnels.next_generation();
        let reported_version = agent_version.clone();
        info!(cluster = %cluster_id, %remote, protocol = version.as_str(),
            agent_version = %agent_version, instance = ?instance, "agent connected");
        state.tunnels.insert(
            &cluster_id,
            Tunnel {
                generation,
                session: session.clone(),
                agent_version,
                remote,
                since: SystemTime::now(),
                token_sha256,
                instance,
                certificate: certificate.clone(),
                streams: Arc::new(Pool::new(registry::MAX_IDLE_STREAMS)),
            },
        );
        if let Some(cluster) = state.clusters().get(&cluster_id) {
            offer_credentials(cluster, &session, &token_sha256);
        }
        if let crate::clusters::TokenUse::Previous(until) = token_use {
            // The previous token stops at its expiry even without a new
            // configuration (an operator that is down).
            let state = state.clone();
            tokio::spawn(async move {
                let left = until.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(left).await;
                state.apply_token_expiry();
            });
        }
        state.report(ConnectionEvent::Up {
            cluster: cluster_id.clone(),
            agent_version: reported_version,
            remote: remote.to_string(),
            since: SystemTime::now(),
            certificate_not_after: certificate.map(|c| c.not_after),
            token_sha256_prefix: hex::encode(&token_sha256[..6]),
        });
        // Certificate requests are answered in this task, the one that
        // waits for the session's end: no second task idles per agent.
        tokio::select! {
            _ = session.closed() => {}
            _ = super::signing::serve(state.clone(), cluster_id.clone(), session.clone()) => {
                session.closed().await;
            }
        }
        if state.tunnels.remove_if_current(&cluster_id, generation) {
            info!(cluster = %cluster_id, reason = session.close_reason().unwrap_or_default(),
                "agent disconnected");
            state.report(ConnectionEvent::Down {
                cluster: cluster_id,
            });
        }
    });
    response
}

/// What the configuration asks of an agent's session: the new token, if it
/// authenticated with the previous one; a certificate renewal, while a
/// rotation is pending. Repeats are harmless: the agent ignores what it has.
pub(super) fn offer_credentials(cluster: &Cluster, session: &Session, token_sha256: &[u8; 32]) {
    if let (Some(token), Some(crate::clusters::TokenUse::Previous(_))) = (
        cluster.pending_token(),
        cluster.token_use(token_sha256, SystemTime::now()),
    ) {
        session.send_credentials(
            Message::Token {
                token: token.to_owned(),
            }
            .encode(),
        );
    }
    if let Some(rotation) = &cluster.certificate_rotation {
        session.send_credentials(
            Message::Renew {
                rotation: rotation.clone(),
            }
            .encode(),
        );
    }
}

/// Tells every agent that holds a session per replica when the set of live
/// replicas changes, so it dials the new ones and stops counting on those
/// that left.
pub(super) async fn announce_replicas(
    state: Arc<ServerState>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut live = state.peers.subscribe();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = live.changed() => if changed.is_err() { return },
        }
        let replicas = live.borrow_and_update().clone();
        for (_, tunnel) in state.tunnels.snapshot() {
            if tunnel.instance.is_some() {
                tunnel.session.send_replicas(&replicas);
            }
        }
    }
}
