//! The agent's probes port (and its metrics, which the opt-in metrics port
//! serves), inside its own cluster. Tunnel traffic never arrives here.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::AgentError;
use crate::http::text;
use crate::listen;

pub struct AgentMetrics {
    registry: Registry,
    pub connected: IntGauge,
    /// Sessions held: one per tether-server replica reached.
    pub sessions: IntGauge,
    pub reconnects: IntCounter,
    pub upstream_requests: IntCounter,
    pub upstream_errors: IntCounter,
    /// Expiry (Unix seconds) of the client certificate in use.
    pub certificate_not_after: IntGauge,
    pub certificate_renewals: IntCounterVec,
    pub token_rotations: IntCounter,
    /// The proxy in use (label `proxy`, without credentials), or none.
    proxy_info: IntGaugeVec,
    pub proxy_connects: IntCounterVec,
    proxy: std::sync::OnceLock<Option<String>>,
    /// Why the last connection attempt failed, for /readyz; secret-free
    /// (errors name hosts and proxies, never credentials).
    last_dial_error: std::sync::Mutex<Option<String>>,
}

impl AgentMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let connected = IntGauge::new(
            "agent_connected",
            "1 while at least one tunnel session to tether-server is up.",
        )?;
        let sessions = IntGauge::new(
            "agent_sessions",
            "Tunnel sessions held, one per tether-server replica.",
        )?;
        let reconnects = IntCounter::new(
            "agent_reconnects_total",
            "Tunnel sessions ended or failed to start.",
        )?;
        let upstream_requests = IntCounter::new(
            "agent_upstream_requests_total",
            "Requests forwarded to the API server.",
        )?;
        let upstream_errors = IntCounter::new(
            "agent_upstream_errors_total",
            "Requests that could not be forwarded (unreadable token, target unreachable, refused target).",
        )?;
        let certificate_not_after = IntGauge::new(
            "agent_certificate_not_after_seconds",
            "Expiry of the client certificate the agent presents, in Unix seconds.",
        )?;
        let certificate_renewals = IntCounterVec::new(
            Opts::new(
                "agent_certificate_renewals_total",
                "Certificate renewals over the tunnel, by result: renewed, refused, failed (no answer, unusable certificate), unsaved (in use, not yet stored).",
            ),
            &["result"],
        )?;
        let token_rotations = IntCounter::new(
            "agent_token_rotations_total",
            "New agent tokens received over the tunnel and taken into use.",
        )?;
        let proxy_info = IntGaugeVec::new(
            Opts::new(
                "agent_proxy_info",
                "1 for the HTTP proxy the agent reaches tether-server through (absent when direct).",
            ),
            &["proxy"],
        )?;
        let proxy_connects = IntCounterVec::new(
            Opts::new(
                "agent_proxy_connects_total",
                "Connections to tether-server through the proxy, each counted once by how far it got: unreachable, timeout, proxy_tls, closed, auth_required (407), refused (the CONNECT failed); intercepted (tether-server's certificate did not verify through the tunnel); ok.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(proxy_info.clone()))?;
        registry.register(Box::new(proxy_connects.clone()))?;
        registry.register(Box::new(token_rotations.clone()))?;
        registry.register(Box::new(certificate_not_after.clone()))?;
        registry.register(Box::new(certificate_renewals.clone()))?;
        registry.register(Box::new(connected.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(reconnects.clone()))?;
        registry.register(Box::new(upstream_requests.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        Ok(Self {
            registry,
            connected,
            sessions,
            reconnects,
            certificate_not_after,
            certificate_renewals,
            token_rotations,
            upstream_requests,
            upstream_errors,
            proxy_info,
            proxy_connects,
            proxy: std::sync::OnceLock::new(),
            last_dial_error: std::sync::Mutex::new(None),
        })
    }

    /// Records the route to tether-server, once, at start-up.
    pub fn set_proxy(&self, proxy: Option<&str>) {
        if let Some(proxy) = proxy {
            self.proxy_info.with_label_values(&[proxy]).set(1);
        }
        let _ = self.proxy.set(proxy.map(str::to_owned));
    }

    pub fn set_last_dial_error(&self, error: Option<String>) {
        *self
            .last_dial_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = error;
    }

    /// The /readyz answer: ready while a session is up; the body says how
    /// tether-server is reached and, when down, why the last attempt failed.
    fn readiness(&self) -> (StatusCode, String) {
        let route = match self.proxy.get().cloned().flatten() {
            Some(proxy) => format!("through proxy {proxy}"),
            None => "directly".to_owned(),
        };
        if self.connected.get() == 1 {
            return (StatusCode::OK, format!("ok: connected {route}"));
        }
        let error = self
            .last_dial_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let message = match error {
            Some(error) => format!("tunnel is down ({route}): {error}"),
            None => format!("tunnel is down ({route})"),
        };
        (StatusCode::SERVICE_UNAVAILABLE, message)
    }

    pub fn render(&self) -> String {
        crate::metrics_port::text_format(&self.registry)
    }
}

pub(super) async fn serve(
    addr: SocketAddr,
    metrics: Arc<AgentMetrics>,
    stop: CancellationToken,
) -> Result<SocketAddr, AgentError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AgentError::Bind { addr, source })?;
    let make = move |_conn| {
        let metrics = metrics.clone();
        hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let response = match request.uri().path() {
                "/healthz" => text(StatusCode::OK, "ok"),
                "/readyz" => {
                    let (status, message) = metrics.readiness();
                    text(status, &message)
                }
                _ => text(StatusCode::NOT_FOUND, "not found"),
            };
            std::future::ready(Ok::<_, Infallible>(response))
        })
    };
    tokio::spawn(listen::serve(
        listener,
        None,
        make,
        stop,
        Duration::from_secs(1),
    ));
    Ok(bound)
}
