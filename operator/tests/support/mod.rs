//! Shared by the operator's integration tests.
#![allow(dead_code)] // each test binary uses a subset

use std::path::{Path, PathBuf};
use std::time::Duration;

use tether::fake_apiserver::FakeApiServer;
use tether::pki::{CertificateAuthority, LeafRequest};
use tether::tls::ServerTlsFiles;

/// The customer cluster's API server: the double over TLS, with its own CA.
pub struct CustomerApi {
    pub backend: FakeApiServer,
    /// `customer-ca.crt` in the test's directory: what the agent trusts.
    pub ca: PathBuf,
    /// `sa-token` in the test's directory: the agent's ServiceAccount token.
    pub sa_token: PathBuf,
}

pub async fn customer_api_server(dir: &Path) -> CustomerApi {
    let ca = CertificateAuthority::generate("customer cluster CA", Duration::from_secs(3600))
        .expect("CA");
    let leaf = ca
        .issue(&LeafRequest::server(
            "kube-apiserver",
            &["localhost"],
            &["127.0.0.1".parse().expect("ip")],
            Duration::from_secs(3600),
        ))
        .expect("leaf");
    let write = |name: &str, contents: &str| {
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write");
        path
    };
    let tls = ServerTlsFiles {
        cert: write("apiserver.crt", &leaf.cert_pem),
        key: write("apiserver.key", &leaf.key_pem),
        client_ca: None,
    };
    let sa_token = write("sa-token", "customer-sa-token");
    let backend = FakeApiServer::start(
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        Some(tls),
        sa_token.clone(),
    )
    .await
    .expect("API server double");
    CustomerApi {
        backend,
        ca: write("customer-ca.crt", ca.cert_pem()),
        sa_token,
    }
}
