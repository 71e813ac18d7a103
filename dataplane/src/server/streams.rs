//! HTTP/1.1 over a tunnel session's streams, kept open between requests as
//! a client keeps TCP connections: a request on an idle stream skips
//! opening a stream and both ends' connection set-up (a spawned task on
//! each side). A stream goes back to the pool when its response body has
//! been read to the end; an upgraded one (exec, port-forward) never does.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::http::Body;
use crate::mux::{OpenError, Session};

/// Idle streams kept per session: ArgoCD's concurrency to one cluster
/// rarely exceeds it, and each idle stream holds a task and buffers on
/// both ends.
const MAX_IDLE: usize = 64;
/// Idle streams older than this are closed when the pool is next used (a
/// burst's leftovers do not stay open on both ends for ever).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One session's idle HTTP/1.1 connections, most recently used last.
#[derive(Default)]
pub struct StreamPool {
    idle: Mutex<Vec<(SendRequest<Body>, Instant)>>,
}

/// Why a request was not answered.
pub enum SendError {
    /// No stream could be opened: nothing was sent.
    Open(OpenError, Box<Request<Body>>),
    /// The request went out (or may have): its answer failed.
    Failed(hyper::Error),
}

impl StreamPool {
    /// Drops every idle stream (the session is draining or replaced: its
    /// streams must end so it can close).
    pub fn clear(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn idle(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(SendRequest<Body>, Instant)>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Most recently used last, so the expired ones are a prefix: one
        // clock read, not one per idle stream (that was 4% of the server's
        // CPU at concurrency 64).
        let now = Instant::now();
        let expired = idle
            .iter()
            .position(|(_, since)| now.duration_since(*since) < IDLE_TIMEOUT)
            .unwrap_or(idle.len());
        idle.drain(..expired);
        idle.retain(|(sender, _)| !sender.is_closed());
        idle
    }

    /// The most recently used idle connection still open.
    fn take(&self) -> Option<SendRequest<Body>> {
        self.lock().pop().map(|(sender, _)| sender)
    }

    fn put(&self, sender: SendRequest<Body>) {
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE && !sender.is_closed() {
            idle.push((sender, Instant::now()));
        }
    }

    /// Sends `request` on an idle stream of `session`, else on a new one.
    pub async fn send(
        self: &Arc<Self>,
        session: &Session,
        target: &str,
        mut request: Request<Body>,
        label: &str,
    ) -> Result<Response<Body>, SendError> {
        // An idle stream the agent closed meanwhile gives the request back
        // unsent: it then goes on a new stream.
        while let Some(mut sender) = self.take() {
            // Ready once its connection task has seen the last response
            // end; an error means the agent closed it.
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.returning(sender, response)),
                Err(mut err) => match err.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(SendError::Failed(err.into_error())),
                },
            }
        }
        let stream = match session.open(target).await {
            Ok(stream) => stream,
            Err(err) => return Err(SendError::Open(err, Box::new(request))),
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Failed)?;
        let label = label.to_owned();
        tokio::spawn(async move {
            if let Err(err) = connection.with_upgrades().await {
                debug!(cluster = %label, error = %err, "tunnel stream ended with an error");
            }
        });
        let response = sender
            .send_request(request)
            .await
            .map_err(SendError::Failed)?;
        Ok(self.returning(sender, response))
    }

    /// The response, its body handing `sender` back to the pool once read
    /// to the end. A 101 keeps its stream for the upgraded connection.
    fn returning(
        self: &Arc<Self>,
        sender: SendRequest<Body>,
        response: Response<Incoming>,
    ) -> Response<Body> {
        let (parts, body) = response.into_parts();
        let sender = (parts.status != StatusCode::SWITCHING_PROTOCOLS).then_some(sender);
        let body = Returning {
            body,
            sender,
            pool: Arc::downgrade(self),
        };
        Response::from_parts(parts, http_body_util::BodyExt::boxed(body))
    }
}

/// A response body that returns its connection to the pool at its end.
/// Dropped before the end, it drops the connection (and its stream).
struct Returning {
    body: Incoming,
    sender: Option<SendRequest<Body>>,
    pool: Weak<StreamPool>,
}

impl Returning {
    fn give_back(&mut self) {
        if let (Some(sender), Some(pool)) = (self.sender.take(), self.pool.upgrade()) {
            pool.put(sender);
        }
    }
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.sender = None,
            // A reader that stops at the declared length never asks for
            // the end.
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.give_back(),
            _ => {}
        }
        polled.map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
