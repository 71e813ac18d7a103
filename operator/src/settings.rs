//! The operator's configuration: flags and environment.

use std::time::Duration;

use clap::Parser;
use tether::server::parse_duration;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "tether-operator",
    version,
    about = "Reconciles ProxiedCluster resources for tether"
)]
pub struct Settings {
    /// Namespace of the operator and tether-server: the CA, server
    /// certificate and clusters configuration live here.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tether-system")]
    pub namespace: String,
    /// Namespace ArgoCD watches for cluster Secrets.
    #[arg(long, env = "ARGOCD_NAMESPACE", default_value = "argocd")]
    pub argocd_namespace: String,
    /// tether-server's internal Service (ArgoCD's side).
    #[arg(
        long,
        env = "INTERNAL_SERVICE",
        default_value = "tether-server-internal"
    )]
    pub internal_service: String,
    #[arg(long, env = "INTERNAL_PORT", default_value_t = 8080)]
    pub internal_port: u16,
    /// tether-server's public Service (agents' side, usually behind a load balancer).
    #[arg(long, env = "PUBLIC_SERVICE", default_value = "tether-server")]
    pub public_service: String,
    /// URL agents dial, e.g. wss://tether.example.com:8443 (per-cluster spec.publicUrl overrides).
    #[arg(long, env = "PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Extra DNS names for the server certificate (comma-separated).
    #[arg(long, env = "SERVER_HOSTNAMES", value_delimiter = ',')]
    pub server_hostnames: Vec<String>,
    /// Whether tether-server runs TLS with client certificates (mTLS) on both
    /// ports. Off only for local experiments.
    #[arg(long, env = "TLS", default_value_t = true, action = clap::ArgAction::Set)]
    pub tls: bool,
    #[arg(long, env = "AGENT_IMAGE", default_value = concat!("ghcr.io/tether-dev/tether:", env!("CARGO_PKG_VERSION")))]
    pub agent_image: String,
    #[arg(long, env = "CA_SECRET", default_value = "tether-ca")]
    pub ca_secret: String,
    /// Server certificate Secret (kubernetes.io/tls). With
    /// --byo-server-certificate the operator only reads it (cert-manager owns it).
    #[arg(long, env = "SERVER_TLS_SECRET", default_value = "tether-server-tls")]
    pub server_tls_secret: String,
    #[arg(long, env = "BYO_SERVER_CERTIFICATE")]
    pub byo_server_certificate: bool,
    /// ArgoCD's client certificate Secret, in this namespace.
    #[arg(
        long,
        env = "ARGOCD_TLS_SECRET",
        default_value = "tether-argocd-client-tls"
    )]
    pub argocd_tls_secret: String,
    /// The clusters configuration tether-server loads (token hashes only).
    #[arg(long, env = "CLUSTERS_SECRET", default_value = "tether-clusters")]
    pub clusters_secret: String,
    /// tether-server's ServiceAccount (in --namespace): the only requester
    /// whose agent certificate requests (signer tether.dev/agent) are signed.
    #[arg(long, env = "SERVER_SERVICE_ACCOUNT", default_value = "tether-server")]
    pub server_service_account: String,
    /// Shortest agent certificate lifetime a ProxiedCluster may ask for
    /// (spec.certificates.agentDuration). Lower it only to watch renewal
    /// happen in a test.
    #[arg(long, env = "MIN_CERT_DURATION", default_value = "1h", value_parser = parse_duration)]
    pub min_cert_duration: Duration,
    /// How long a rotated-out agent token is still accepted, at most: until
    /// the agent connects with the new one it was sent over the tunnel.
    #[arg(long, env = "TOKEN_OVERLAP", default_value = "10m", value_parser = parse_duration)]
    pub token_overlap: Duration,
    #[arg(long, env = "CA_DURATION", default_value = "87600h", value_parser = parse_duration)]
    pub ca_duration: Duration,
    #[arg(long, env = "SERVER_CERT_DURATION", default_value = "2160h", value_parser = parse_duration)]
    pub server_cert_duration: Duration,
    #[arg(long, env = "ARGOCD_CERT_DURATION", default_value = "2160h", value_parser = parse_duration)]
    pub argocd_cert_duration: Duration,
    /// Run only while holding the Lease (two replicas never both reconcile).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    #[arg(long, env = "LEASE_NAME", default_value = "tether-operator")]
    pub lease_name: String,
    /// How long a leader's lease lasts without renewal (renewed every third of it).
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// `/healthz` and `/readyz` for the kubelet's probes.
    #[arg(long, env = "HEALTH_ADDR", default_value = ":8081", value_parser = tether::server::parse_listen_addr)]
    pub health_addr: std::net::SocketAddr,
    #[command(flatten)]
    pub metrics: tether::metrics_port::MetricsArgs,
}

impl Settings {
    /// Defaults, as a fresh install would have them (also for tests).
    pub fn defaults() -> Self {
        Self::parse_from(["tether-operator"])
    }

    /// The server URL ArgoCD uses for a cluster.
    pub fn tunnel_url(&self, cluster_id: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!(
            "{scheme}://{}.{}.svc:{}/tunnel/{cluster_id}",
            self.internal_service, self.namespace, self.internal_port
        )
    }

    /// The user tether-server's requests are made as.
    pub fn server_username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.server_service_account
        )
    }

    /// DNS names tether-server's certificate must carry.
    pub fn server_dns_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for service in [&self.internal_service, &self.public_service] {
            names.push(service.clone());
            names.push(format!("{service}.{}", self.namespace));
            names.push(format!("{service}.{}.svc", self.namespace));
            names.push(format!("{service}.{}.svc.cluster.local", self.namespace));
        }
        if let Some(host) = self.public_url.as_deref().and_then(url_host) {
            names.push(host.to_owned());
        }
        names.extend(
            self.server_hostnames
                .iter()
                .filter(|h| !h.is_empty())
                .cloned(),
        );
        names.sort();
        names.dedup();
        names
    }
}

/// The host of a ws(s):// URL.
pub fn url_host(url: &str) -> Option<&str> {
    let authority = url.split_once("://")?.1.split('/').next()?;
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => authority,
    };
    (!host.is_empty()).then_some(host.trim_matches(['[', ']']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_urls_and_server_names() {
        let mut settings = Settings::defaults();
        settings.public_url = Some("wss://tether.example.com:8443".into());
        assert_eq!(
            settings.tunnel_url("customer-a"),
            "https://tether-server-internal.tether-system.svc:8080/tunnel/customer-a"
        );
        let names = settings.server_dns_names();
        assert!(names.contains(&"tether-server-internal.tether-system.svc".to_owned()));
        assert!(names.contains(&"tether-server.tether-system.svc.cluster.local".to_owned()));
        assert!(names.contains(&"tether.example.com".to_owned()));
        settings.tls = false;
        assert!(settings.tunnel_url("a").starts_with("http://"));
        assert_eq!(url_host("wss://[::1]:8443/connect"), Some("::1"));
        assert_eq!(url_host("wss://host"), Some("host"));
    }
}
