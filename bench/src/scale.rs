//! Many agents on one server: idle memory per agent, and how fast a fleet
//! comes back after the server restarts. tether-server runs as its own
//! process so its memory is its own; the agents are lightweight in-process
//! clients speaking the real protocol (tether's own WebSocket handshake and
//! session), one TCP connection each.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use rustls::pki_types::ServerName;
use tether::mux::{Role, Session, SessionConfig};
use tether::pki::{CertificateAuthority, LeafRequest};
use tokio_rustls::TlsConnector;

use crate::rig::{Process, free_ports};

pub struct Fleet {
    dir: tempfile::TempDir,
    port: u16,
    pub internal_port: u16,
    connector: TlsConnector,
    pub count: usize,
}

fn token(i: usize) -> String {
    format!("fleet-token-{i:06}")
}

impl Fleet {
    pub fn new(count: usize) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = CertificateAuthority::generate("fleet CA", Duration::from_secs(3600))?;
        let server = ca.issue(&LeafRequest::server(
            "tether-server",
            &["localhost"],
            &[],
            Duration::from_secs(3600),
        ))?;
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem())?;
        std::fs::write(dir.path().join("server.crt"), &server.cert_pem)?;
        std::fs::write(dir.path().join("server.key"), &server.key_pem)?;
        let clusters: Vec<_> = (0..count)
            .map(|i| serde_json::json!({"id": format!("c{i}"), "token": token(i), "targetAddr": "127.0.0.1:1"}))
            .collect();
        std::fs::write(
            dir.path().join("clusters.json"),
            serde_json::to_string(&clusters)?,
        )?;
        let roots = tether::tls::load_roots(&dir.path().join("ca.crt"))?;
        let mut config = tether::tls::client_config(roots, None)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let [port, internal_port] = free_ports()?;
        Ok(Self {
            dir,
            port,
            internal_port,
            connector: TlsConnector::from(std::sync::Arc::new(config)),
            count,
        })
    }

    /// A client for the server's internal port (TLS, trusting this fleet's CA).
    pub fn client(&self) -> Result<crate::rig::Client> {
        crate::rig::Client::new(tether::tls::load_roots(&self.path("ca.crt"))?, None)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts tether-server (TLS, token auth) as a child process.
    pub fn start_server(&self) -> Result<Process> {
        let path = |name: &str| self.path(name).display().to_string();
        let args = [
            "--addr".into(),
            format!("127.0.0.1:{}", self.port),
            "--internal-addr".into(),
            format!("127.0.0.1:{}", self.internal_port),
            "--clusters".into(),
            path("clusters.json"),
            "--tls-cert".into(),
            path("server.crt"),
            "--tls-key".into(),
            path("server.key"),
            "--log-level".into(),
            "error".into(),
            "--keepalive-interval".into(),
            "15s".into(),
        ];
        let server = Process::tether("tether-server", &args)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "tether-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// Connects agent `i` once: TLS, WebSocket handshake with its token, a session.
    pub async fn connect(&self, i: usize) -> Result<Session> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let tls = self
            .connector
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        let authority = format!("localhost:{}", self.port);
        let (socket, version, _) =
            tether::websocket::connect(tls, &authority, "/connect", &token(i), true, None).await?;
        let (session, incoming) = Session::start(
            socket,
            SessionConfig::new(version, Role::Acceptor, format!("c{i}")),
        );
        if let Some(mut incoming) = incoming {
            // Answer every request with a small 200, as an API server would.
            tokio::spawn(async move {
                while let Some(stream) = incoming.recv().await {
                    tokio::spawn(async move {
                        let Ok(stream) = stream.accept().await else {
                            return;
                        };
                        let service = hyper::service::service_fn(|_request| async {
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                            ))
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        }
        Ok(session)
    }

    /// Connects every agent, `parallel` at a time, retrying failures until `deadline`.
    pub async fn connect_all(&self, parallel: usize, deadline: Duration) -> Result<Vec<Session>> {
        let started = Instant::now();
        let mut sessions: Vec<Option<Session>> = (0..self.count).map(|_| None).collect();
        loop {
            let missing: Vec<usize> = (0..self.count)
                .filter(|i| sessions[*i].as_ref().is_none_or(|s| s.is_closed()))
                .collect();
            if missing.is_empty() {
                return Ok(sessions.into_iter().flatten().collect());
            }
            anyhow::ensure!(
                started.elapsed() < deadline,
                "{} agents not connected after {deadline:?}",
                missing.len()
            );
            for chunk in missing.chunks(parallel) {
                let attempts =
                    futures::future::join_all(chunk.iter().map(|i| self.connect(*i))).await;
                for (i, attempt) in chunk.iter().zip(attempts) {
                    if let Ok(session) = attempt {
                        sessions[*i] = Some(session);
                    }
                }
            }
            if (0..self.count).any(|i| sessions[i].as_ref().is_none_or(|s| s.is_closed())) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
