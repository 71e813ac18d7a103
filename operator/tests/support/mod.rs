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

/// A GET through tether-server's internal port as ArgoCD makes it: mTLS
/// with `cert`/`key`, trusting `ca`; returns the raw HTTP/1.1 answer.
pub async fn argocd_get(
    internal: std::net::SocketAddr,
    ca: &Path,
    cert: &Path,
    key: &Path,
    path: &str,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let identity = (
        tether::tls::load_certs(cert).expect("cert"),
        tether::tls::load_key(key).expect("key"),
    );
    let roots = tether::tls::load_roots(ca).expect("roots");
    let config = tether::tls::client_config(roots, Some(identity)).expect("config");
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(internal)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("tether-server-internal.tether-system.svc")
        .expect("name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("mTLS to the internal port");
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.expect("read");
    answer
}
