//! tether-server's Prometheus metrics, named as in the Go implementation so
//! existing dashboards keep working.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use super::registry::Registry as Tunnels;

/// Label for requests whose cluster id is not configured: the id itself is
/// caller input and must not create label values.
pub const UNKNOWN_CLUSTER: &str = "_unknown";

pub struct ServerMetrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    /// Request body bytes sent into tunnels, by cluster.
    pub request_bytes: IntCounterVec,
    /// Response body bytes received from tunnels, by cluster.
    pub response_bytes: IntCounterVec,
    pub active_streams: IntGaugeVec,
    /// 1 for each cluster whose agent holds a session with this replica.
    sessions: IntGaugeVec,
    idle_streams: IntGaugeVec,
    pub buffered_bytes: IntGaugeVec,
    pub agents_connected: IntGauge,
    pub rate_limited: IntCounter,
    pub auth_failures: IntCounterVec,
    pub identity_mismatches: IntCounter,
    pub auth_rate_limited: IntCounter,
    /// Requests this replica sent to a peer, by result (`ok`, `error`).
    pub forwarded: IntCounterVec,
    /// Agent certificate requests, by result.
    pub certificate_requests: IntCounterVec,
}

impl ServerMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "proxy_requests_total",
                "Requests proxied, by cluster, method and status code.",
            ),
            &["cluster", "method", "code"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "proxy_request_duration_seconds",
                "Time until the response headers of a proxied request arrived.",
            ),
            &["cluster"],
        )?;
        let request_bytes = IntCounterVec::new(
            Opts::new(
                "proxy_request_bytes_total",
                "Request body bytes sent through each cluster's tunnel (upgraded connections not included).",
            ),
            &["cluster"],
        )?;
        let response_bytes = IntCounterVec::new(
            Opts::new(
                "proxy_response_bytes_total",
                "Response body bytes received through each cluster's tunnel (upgraded connections not included).",
            ),
            &["cluster"],
        )?;
        let active_streams = IntGaugeVec::new(
            Opts::new(
                "tunnel_active_connections",
                "Streams open on each cluster's tunnel (idle kept-alive ones included).",
            ),
            &["cluster"],
        )?;
        let sessions = IntGaugeVec::new(
            Opts::new(
                "tunnel_agent_connected",
                "1 for each cluster whose agent holds a session with this replica (absent otherwise).",
            ),
            &["cluster"],
        )?;
        let idle_streams = IntGaugeVec::new(
            Opts::new(
                "tunnel_idle_connections",
                "Streams of each cluster's tunnel kept open for the next request.",
            ),
            &["cluster"],
        )?;
        let buffered_bytes = IntGaugeVec::new(
            Opts::new(
                "tunnel_buffered_bytes",
                "Bytes received from each cluster's agent and not yet consumed.",
            ),
            &["cluster"],
        )?;
        let agents_connected =
            IntGauge::new("agents_connected", "Agents connected to this server.")?;
        let rate_limited = IntCounter::new(
            "proxy_rate_limited_total",
            "Requests refused by the per-cluster rate limit.",
        )?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "auth_failures_total",
                "Refused agent authentications, by endpoint and reason: token (missing or unknown), identity (the certificate names another cluster), retired_certificate (older than the cluster's certificate rotation).",
            ),
            &["endpoint", "reason"],
        )?;
        let identity_mismatches = IntCounter::new(
            "tunnel_identity_mismatch_total",
            "Agents whose client certificate names another cluster than their token.",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(request_bytes.clone()))?;
        registry.register(Box::new(response_bytes.clone()))?;
        registry.register(Box::new(active_streams.clone()))?;
        registry.register(Box::new(idle_streams.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(buffered_bytes.clone()))?;
        registry.register(Box::new(agents_connected.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(auth_failures.clone()))?;
        let auth_rate_limited = IntCounter::new(
            "auth_rate_limited_total",
            "Agent connections refused because their source failed authentication too often.",
        )?;
        registry.register(Box::new(identity_mismatches.clone()))?;
        registry.register(Box::new(auth_rate_limited.clone()))?;
        let forwarded = IntCounterVec::new(
            Opts::new(
                "peer_forwarded_requests_total",
                "Requests forwarded to the replica holding the cluster's tunnel, by result: ok, error, or unserved (its session was draining; handed on).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(forwarded.clone()))?;
        let certificate_requests = IntCounterVec::new(
            Opts::new(
                "agent_certificate_requests_total",
                "Agent certificate renewals asked over a tunnel, by result: signed, refused (identity or usage not the cluster's), denied (by the signer), throttled, malformed, unavailable (no signer), failed.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(certificate_requests.clone()))?;
        Ok(Self {
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
            active_streams,
            sessions,
            idle_streams,
            buffered_bytes,
            agents_connected,
            rate_limited,
            auth_failures,
            identity_mismatches,
            auth_rate_limited,
            forwarded,
            certificate_requests,
        })
    }

    /// The text exposition, with tunnel gauges read from the live sessions.
    pub fn render(&self, tunnels: &Tunnels) -> String {
        self.active_streams.reset();
        self.sessions.reset();
        self.idle_streams.reset();
        self.buffered_bytes.reset();
        let snapshot = tunnels.snapshot();
        for (id, tunnel) in &snapshot {
            self.sessions.with_label_values(&[id.as_str()]).set(1);
            self.active_streams
                .with_label_values(&[id.as_str()])
                .set(tunnel.session.open_streams() as i64);
            self.idle_streams
                .with_label_values(&[id.as_str()])
                .set(tunnel.streams.idle() as i64);
            self.buffered_bytes
                .with_label_values(&[id.as_str()])
                .set(tunnel.session.buffered_bytes() as i64);
        }
        self.agents_connected.set(snapshot.len() as i64);
        crate::metrics_port::text_format(&self.registry)
    }
}
