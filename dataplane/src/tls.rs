//! rustls configuration for every hop: PEM loading, server configs that
//! follow their files on disk, and client configs.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoPrivateKey { path: PathBuf },
    #[error("{path}: {source}")]
    BadCertificate {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS configuration rejected: {0}")]
    Config(#[from] rustls::Error),
    #[error("client CA unusable: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    #[error("not a PEM certificate and private key")]
    BadIdentity,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The certificates in PEM text; blocks that are not certificates are skipped.
pub fn certs_from_pem(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = certs_from_pem(&read(path)?);
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoPrivateKey {
        path: path.to_owned(),
    })
}

/// A certificate chain and its key from PEM text (a renewed identity).
pub fn identity_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = certs_from_pem(cert_pem);
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::BadIdentity)?;
    if certs.is_empty() {
        return Err(TlsError::BadIdentity);
    }
    Ok((certs, key))
}

pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|source| TlsError::BadCertificate {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// Where a server's TLS material lives.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.cert, &self.key]
            .into_iter()
            .chain(self.client_ca.as_ref())
    }

    /// When each file last changed: a change means a reload.
    pub(crate) fn modified(&self) -> Vec<Option<SystemTime>> {
        self.paths()
            .map(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    /// Builds a config offering `alpn` (most preferred first). TLS 1.2 is
    /// the floor: rustls implements nothing older.
    pub fn build(&self, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
        let certs = load_certs(&self.cert)?;
        let key = load_key(&self.key)?;
        let builder = ServerConfig::builder();
        let builder = match &self.client_ca {
            Some(ca) => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder(Arc::new(load_roots(ca)?)).build()?,
            ),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

/// A server config that is rebuilt when its files change, so rotated
/// certificates (cert-manager, projected Secrets) apply without a restart.
/// New connections use the newest config; a broken update is logged and the
/// last good config stays in use.
#[derive(Clone)]
pub struct ReloadingServerConfig {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ReloadingServerConfig {
    pub fn load(
        files: ServerTlsFiles,
        alpn: &'static [&'static [u8]],
        poll: Duration,
        shutdown: CancellationToken,
    ) -> Result<Self, TlsError> {
        let mut stamp = files.modified();
        let current = Arc::new(RwLock::new(Arc::new(files.build(alpn)?)));
        let this = Self { current };
        let watcher = this.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(poll);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let now = files.modified();
                if now == stamp {
                    continue;
                }
                stamp = now;
                match files.build(alpn) {
                    Ok(config) => {
                        info!(cert = %files.cert.display(), "TLS certificates reloaded");
                        *watcher.current.write().unwrap_or_else(|p| p.into_inner()) =
                            Arc::new(config);
                    }
                    Err(err) => {
                        warn!(error = %err, "TLS reload failed; keeping the previous certificates")
                    }
                }
            }
        });
        Ok(this)
    }

    /// A config that never changes (a certificate made in memory).
    pub fn fixed(config: ServerConfig) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(config))),
        }
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A client config trusting `roots`, presenting `identity` when given.
pub fn client_config(
    roots: RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder().with_root_certificates(roots);
    Ok(match identity {
        Some((certs, key)) => builder.with_client_auth_cert(certs, key)?,
        None => builder.with_no_client_auth(),
    })
}

/// A client config that accepts any server certificate. Only for
/// `--insecure` targets; it still checks the handshake signatures.
pub fn insecure_client_config() -> ClientConfig {
    let provider = rustls::crypto::ring::default_provider();
    ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider)))
        .with_no_client_auth()
}

#[derive(Debug)]
struct AcceptAnyServerCert(rustls::crypto::CryptoProvider);

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
