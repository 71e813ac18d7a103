//! Accept loop shared by every HTTP port: optional TLS (with client
//! certificates), HTTP/1.1 with upgrades and HTTP/2, graceful drain.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::http::Body;
use crate::tls::ReloadingServerConfig;

/// A TLS handshake slower than this is dropped, so idle sockets cannot pin
/// connection tasks forever.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request headers must arrive within this (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What the listener knows about a connection; each request carries it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// The client's leaf certificate, when it presented one (mTLS).
    pub client_certificate: Option<CertificateDer<'static>>,
}

/// Serves `listener` until `shutdown`, then lets open requests finish for
/// at most `grace`. `make_service` builds the service for one connection.
pub async fn serve<F, S>(
    listener: TcpListener,
    tls: Option<ReloadingServerConfig>,
    make_service: F,
    shutdown: CancellationToken,
    grace: Duration,
) where
    F: Fn(Arc<ConnInfo>) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let make_service = Arc::new(make_service);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let builder = Arc::new(builder);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    debug!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tls.as_ref().map(|t| TlsAcceptor::from(t.current()));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let make_service = make_service.clone();
        tokio::spawn(async move {
            let (io, client_certificate) = match acceptor {
                None => (Either::Right(tcp), None),
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let cert = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|chain| chain.first())
                                .map(|cert| cert.clone().into_owned());
                            (Either::Left(stream), cert)
                        }
                        Ok(Err(err)) => {
                            debug!(%remote, error = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let service = make_service(Arc::new(ConnInfo {
                remote,
                client_certificate,
            }));
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            if let Err(err) = watcher.watch(conn.into_owned()).await {
                debug!(%remote, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        debug!("grace period over; closing remaining connections");
    }
}
