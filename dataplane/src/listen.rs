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
/// After shutdown, how long HTTP/1.1 keep-alive connections stay open with
/// every response saying `Connection: close`, before idle ones are closed:
/// a client learns from a response that it must reconnect, instead of
/// racing a request against the close (the keep-alive race).
const KEEP_ALIVE_LINGER: Duration = Duration::from_secs(2);

/// What the listener knows about a connection; each request carries it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// The client's leaf certificate, when it presented one (mTLS).
    pub client_certificate: Option<CertificateDer<'static>>,
}

/// Serves `listener` until `shutdown`, then lets open requests finish for
/// at most `grace`: HTTP/1.1 connections first linger (their responses
/// carry `Connection: close`), then idle ones are closed and HTTP/2 ones get
/// GOAWAY. `make_service` builds the service for one connection.
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
        let shutdown = shutdown.clone();
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
            let service = close_after_shutdown(
                make_service(Arc::new(ConnInfo {
                    remote,
                    client_certificate,
                })),
                shutdown.clone(),
            );
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            if let Err(err) = watcher.watch(conn.into_owned()).await {
                debug!(%remote, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let deadline = tokio::time::Instant::now() + grace;
    let linger_until = tokio::time::Instant::now() + grace.min(KEEP_ALIVE_LINGER);
    while graceful.count() > 0 && tokio::time::Instant::now() < linger_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        debug!("grace period over; closing remaining connections");
    }
}

/// Once `shutdown` is signalled, HTTP/1 responses (but for upgrades) say
/// `Connection: close`, so hyper closes each connection after its answer.
fn close_after_shutdown<S>(
    inner: S,
    shutdown: CancellationToken,
) -> impl Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Send
+ 'static
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    hyper::service::service_fn(move |request: Request<Incoming>| {
        let http1 = request.version() < http::Version::HTTP_2;
        let answer = inner.call(request);
        let shutdown = shutdown.clone();
        async move {
            let mut response = answer.await?;
            if http1
                && shutdown.is_cancelled()
                && response.status() != http::StatusCode::SWITCHING_PROTOCOLS
            {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok(response)
        }
    })
}
