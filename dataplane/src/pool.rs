//! HTTP/1.1 client connections kept open between requests, as a client
//! keeps TCP connections, and driven by the request that uses them instead
//! of a task of their own. tether-server keeps them over its tunnel
//! streams, tether-agent over TLS to its API server.
//!
//! A connection task would cost every request two hand-offs between tasks
//! on each side of the tunnel: to the connection's task and back. Here the
//! task serving the request polls the connection while it waits for the
//! response, and the response body polls it while it is read.
//!
//! A large body is the exception: read in one task, each chunk would wait
//! for the previous one to be passed on before the socket is read again, and
//! downloads ran at half their rate. Once a body has carried
//! [`DETACH_AFTER`] bytes, its connection gets a task of its own, as hyper
//! runs it by default, and keeps it for the rest of its life.
//!
//! A connection goes back to its pool when its response body has been read
//! to the end. An upgraded one (exec, port-forward) never does: its driver
//! runs on in a task of its own until it has handed the connection over.
//!
//! While a pool holds idle connections, a task looks at them every
//! [`REAP_EVERY`]: those the peer closed are let go at once, and those idle
//! for [`IDLE_TIMEOUT`] are closed, whether or not another request comes.

use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{Request, Response, StatusCode};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::rt::{Read, Write};
use sync_wrapper::SyncWrapper;
use tokio::time::Instant;
use tracing::debug;

use crate::http::{Body, BoxError};

/// Idle connections older than this are closed (a burst's leftovers do not
/// stay open on both ends for ever), as hyper-util's pool does by default.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How often a pool's idle connections are looked at while it has any: an
/// idle connection is closed at most this long after its timeout, and one
/// the peer closed is let go (its socket no longer waits in CLOSE_WAIT for
/// the next request).
const REAP_EVERY: Duration = Duration::from_secs(30);

/// Rounds of driving a connection in one poll before other tasks get a
/// turn (hyper's own connection loop yields after 16 too).
const DRIVEN_ROUNDS: usize = 16;

/// Bytes a response body carries, driven by the task reading it, before
/// its connection gets a task of its own: far above a small request's
/// answer, a few reads of the socket into a large one.
const DETACH_AFTER: usize = 64 * 1024;

/// Runs one connection's protocol: writes requests, reads responses.
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// One HTTP/1.1 client connection and the future that runs it.
struct Connection {
    sender: SendRequest<Body>,
    /// `None` once it has finished (the peer closed) or runs in a task of
    /// its own (a large body, an upgrade). Polled only through `&mut`, so
    /// it need not be `Sync` itself.
    driver: Option<SyncWrapper<Driver>>,
    /// What the driver, the response and its body are polled with.
    waker: Arc<InnerWaker>,
    inner_waker: Waker,
}

impl Connection {
    /// HTTP/1.1 over `io`, with upgrades. Nothing is sent yet.
    async fn handshake<T>(io: T) -> hyper::Result<Self>
    where
        T: Read + Write + Unpin + Send + 'static,
    {
        let (sender, connection) = http1::handshake(io).await?;
        let driver: Driver = Box::pin(connection.with_upgrades());
        let waker = Arc::new(InnerWaker::default());
        Ok(Self {
            sender,
            driver: Some(SyncWrapper::new(driver)),
            inner_waker: Waker::from(waker.clone()),
            waker,
        })
    }

    /// Runs the protocol as far as it can go now; an error here also
    /// reaches the response or its body, which report it. Takes the field,
    /// not `self`, so the connection's own waker can be borrowed beside it.
    fn drive(driver: &mut Option<SyncWrapper<Driver>>, cx: &mut Context<'_>) {
        if let Some(running) = driver
            && let Poll::Ready(ended) = running.get_mut().as_mut().poll(cx)
        {
            if let Err(err) = ended {
                debug!(error = %err, "HTTP/1.1 connection ended with an error");
            }
            *driver = None;
        }
    }

    /// Drives the connection, then polls `what` (the sender, the response
    /// or its body, which only the driver serves), going round again while
    /// either woke the other.
    fn poll_driven<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut what: impl FnMut(&mut SendRequest<Body>, &mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        if self.driver.is_none() {
            return what(&mut self.sender, cx);
        }
        self.waker.task.register(cx.waker());
        let mut inner = Context::from_waker(&self.inner_waker);
        for _ in 0..DRIVEN_ROUNDS {
            self.waker.state.store(POLLING, Ordering::SeqCst);
            Self::drive(&mut self.driver, &mut inner);
            let polled = what(&mut self.sender, &mut inner);
            let woken = self.waker.state.swap(IDLE, Ordering::SeqCst) == WOKEN;
            if polled.is_ready() || !woken {
                return polled;
            }
        }
        // Still waking each other: other tasks get their turn first.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Resolves once the connection can take a request; an error means the
    /// peer closed it.
    ///
    /// An idle connection is ready at once, and is asked without a waker:
    /// the driver would keep one for its request queue, to be woken by the
    /// request this task is about to queue.
    async fn ready(&mut self) -> hyper::Result<()> {
        poll_fn(|cx| {
            let mut quiet = Context::from_waker(Waker::noop());
            Self::drive(&mut self.driver, &mut quiet);
            match self.sender.poll_ready(&mut quiet) {
                Poll::Ready(ready) => Poll::Ready(ready),
                Poll::Pending => self.poll_driven(cx, |sender, inner| sender.poll_ready(inner)),
            }
        })
        .await
    }

    /// Sends `request` and drives the connection until its response head
    /// arrives. A request that never went out comes back in the error.
    async fn send(
        &mut self,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<Body>>> {
        let mut response = pin!(self.sender.try_send_request(request));
        poll_fn(|cx| self.poll_driven(cx, |_, inner| response.as_mut().poll(inner))).await
    }

    /// Runs the driver in a task of its own from now on.
    fn detach(&mut self) {
        if let Some(driver) = self.driver.take() {
            tokio::spawn(driver.into_inner());
        }
    }

    /// Whether the connection has ended; the sender knows, wherever its
    /// driver runs (dropping the driver closes it).
    fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN: u8 = 2;

/// The waker inside a connection. A wake while this task itself polls the
/// connection (the body taking a chunk frees the driver waiting for room,
/// the driver hands over the response) is noted, and the poll goes round
/// again: passed on, it would wake this task from inside its own poll, a
/// spurious re-poll that tokio schedules as a yield, waking another worker
/// to look for work. Any other wake goes to the task.
#[derive(Default)]
struct InnerWaker {
    state: AtomicU8,
    task: AtomicWaker,
}

impl Wake for InnerWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) | Err(WOKEN) => {}
            Err(_) => self.task.wake(),
        }
    }
}

/// Why a request was not answered.
pub enum RequestError<E> {
    /// No connection could be made: nothing was sent.
    Connect(E, Box<Request<Body>>),
    /// The request went out (or may have): its answer failed.
    Failed(hyper::Error),
}

/// Idle connections to one place, most recently used last.
pub struct Pool {
    idle: Mutex<Idle>,
    max_idle: usize,
}

#[derive(Default)]
struct Idle {
    connections: Vec<(Connection, Instant)>,
    /// Whether a task looks after them: one runs while any is idle, so a
    /// pool that is never used (an idle agent's) costs no task.
    reaper: bool,
}

impl Pool {
    /// A pool keeping at most `max_idle` idle connections.
    pub fn new(max_idle: usize) -> Self {
        Self {
            idle: Mutex::default(),
            max_idle,
        }
    }

    /// Closes every idle connection (the session below them is draining or
    /// replaced: they must end so it can close).
    pub fn clear(&self) {
        self.lock().connections.clear();
    }

    pub fn idle(&self) -> usize {
        self.lock().connections.len()
    }

    /// The idle connections, without those that timed out or that are
    /// known to have closed.
    fn lock(&self) -> MutexGuard<'_, Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Most recently used last, so the expired ones are a prefix: one
        // clock read, not one per idle connection (that was 4% of the
        // server's CPU at concurrency 64).
        let now = Instant::now();
        let connections = &mut idle.connections;
        let expired = connections
            .iter()
            .position(|(_, since)| now.duration_since(*since) < IDLE_TIMEOUT)
            .unwrap_or(connections.len());
        connections.drain(..expired);
        connections.retain(|(connection, _)| !connection.is_closed());
        idle
    }

    fn take(&self) -> Option<Connection> {
        self.lock()
            .connections
            .pop()
            .map(|(connection, _)| connection)
    }

    fn put(self: &Arc<Self>, connection: Connection) {
        let mut idle = self.lock();
        if idle.connections.len() >= self.max_idle || connection.is_closed() {
            return;
        }
        if !idle.reaper {
            // Dropped outside any runtime (at exit), the connection has
            // nobody to look after it: it is closed.
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            runtime.spawn(reap(Arc::downgrade(self)));
            idle.reaper = true;
        }
        idle.connections.push((connection, Instant::now()));
    }

    /// Sends `request` on the most recently used idle connection that is
    /// still open, else on a new one over what `connect` opens.
    pub async fn request<T, E, Connecting>(
        self: &Arc<Self>,
        mut request: Request<Body>,
        connect: impl FnOnce() -> Connecting,
    ) -> Result<Response<Body>, RequestError<E>>
    where
        T: Read + Write + Unpin + Send + 'static,
        Connecting: Future<Output = Result<T, E>>,
    {
        // An idle connection the peer closed meanwhile gives the request
        // back unsent: it then goes on the next one.
        while let Some(mut connection) = self.take() {
            if connection.ready().await.is_err() {
                continue;
            }
            match connection.send(request).await {
                Ok(response) => return Ok(self.returning(connection, response)),
                Err(mut err) => match err.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(RequestError::Failed(err.into_error())),
                },
            }
        }
        let io = match connect().await {
            Ok(io) => io,
            Err(err) => return Err(RequestError::Connect(err, Box::new(request))),
        };
        let mut connection = Connection::handshake(io)
            .await
            .map_err(RequestError::Failed)?;
        match connection.send(request).await {
            Ok(response) => Ok(self.returning(connection, response)),
            Err(err) => Err(RequestError::Failed(err.into_error())),
        }
    }

    /// The response, its body driving `connection` and handing it back to
    /// the pool once read to the end. A 101 leaves the connection to its
    /// driver, which hands it over to the upgrade.
    fn returning(
        self: &Arc<Self>,
        mut connection: Connection,
        response: Response<Incoming>,
    ) -> Response<Body> {
        let (parts, body) = response.into_parts();
        let connection = if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            connection.detach();
            None
        } else {
            Some(connection)
        };
        let body = Returning {
            body,
            connection,
            read: 0,
            pool: Arc::downgrade(self),
        };
        Response::from_parts(parts, http_body_util::BodyExt::boxed(body))
    }
}

/// Looks after a pool's idle connections while it has any (see the module's
/// documentation); ends when none is left or the pool is gone.
async fn reap(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(REAP_EVERY).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut idle = pool.lock();
        // An idle connection's driver is polled by nobody: this poll is
        // what reads a close the peer sent meanwhile, and ends it.
        let mut quiet = Context::from_waker(Waker::noop());
        for (connection, _) in &mut idle.connections {
            Connection::drive(&mut connection.driver, &mut quiet);
        }
        idle.connections
            .retain(|(connection, _)| !connection.is_closed());
        if idle.connections.is_empty() {
            idle.reaper = false;
            return;
        }
    }
}

/// A response body that drives its connection while it is read and returns
/// it to the pool at its end. Dropped before the end, it closes it.
struct Returning {
    body: Incoming,
    connection: Option<Connection>,
    /// Data bytes read so far, until the connection is detached.
    read: usize,
    pool: Weak<Pool>,
}

impl Returning {
    fn give_back(&mut self) {
        if let (Some(connection), Some(pool)) = (self.connection.take(), self.pool.upgrade()) {
            pool.put(connection);
        }
    }
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.connection {
            Some(connection) => {
                let polled = connection
                    .poll_driven(cx, |_, inner| Pin::new(&mut this.body).poll_frame(inner));
                if let Poll::Ready(Some(Ok(frame))) = &polled
                    && this.read <= DETACH_AFTER
                {
                    this.read += frame.data_ref().map_or(0, Bytes::len);
                    if this.read > DETACH_AFTER {
                        connection.detach();
                    }
                }
                polled
            }
            None => Pin::new(&mut this.body).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.connection = None,
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

impl Drop for Returning {
    /// A body known to be empty (204, HEAD, `Content-Length: 0`) is often
    /// never polled: its connection is still fit for the next request.
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt, StreamBody};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::test_support::CountingWaker;

    /// A hyper server at the other end of every connection the pool makes.
    #[derive(Default)]
    struct Peer {
        connects: AtomicUsize,
        servers: Mutex<Vec<JoinHandle<()>>>,
    }

    impl Peer {
        async fn connect(&self) -> Result<TokioIo<DuplexStream>, Infallible> {
            self.connects.fetch_add(1, Ordering::SeqCst);
            let (client, server) = tokio::io::duplex(64 * 1024);
            let served = tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(server), service_fn(answer))
                    .with_upgrades()
                    .await;
            });
            self.servers.lock().expect("lock").push(served);
            Ok(TokioIo::new(client))
        }

        fn connects(&self) -> usize {
            self.connects.load(Ordering::SeqCst)
        }

        /// Connections whose peer end is still being served.
        fn open(&self) -> usize {
            let servers = self.servers.lock().expect("lock");
            servers.iter().filter(|s| !s.is_finished()).count()
        }

        /// The peer goes away: its ends of the connections are closed.
        async fn close_all(&self) {
            let servers: Vec<_> = self.servers.lock().expect("lock").drain(..).collect();
            for server in servers {
                server.abort();
                let _ = server.await;
            }
        }
    }

    async fn answer(request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let chunks = |chunks: Vec<&'static str>, then_stall: bool| {
            let frames = futures_util::stream::iter(
                chunks
                    .into_iter()
                    .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from(c)))),
            );
            let stall = futures_util::stream::pending();
            if then_stall {
                BodyExt::boxed(StreamBody::new(futures_util::StreamExt::chain(
                    frames, stall,
                )))
            } else {
                BodyExt::boxed(StreamBody::new(frames))
            }
        };
        let mut response = Response::new(crate::http::empty());
        match request.uri().path() {
            "/small" => *response.body_mut() = crate::http::full("hello"),
            "/large" => *response.body_mut() = crate::http::full(vec![b'x'; 4 * DETACH_AFTER]),
            "/empty" => *response.status_mut() = StatusCode::NO_CONTENT,
            "/two" => *response.body_mut() = chunks(vec!["one", "two"], false),
            "/stalls" => *response.body_mut() = chunks(vec!["one"], true),
            "/upgrade" => {
                let upgrade = hyper::upgrade::on(request);
                tokio::spawn(async move {
                    if let Ok(upgraded) = upgrade.await {
                        let mut io = TokioIo::new(upgraded);
                        let mut buf = [0u8; 4];
                        if io.read_exact(&mut buf).await.is_ok() {
                            let _ = io.write_all(&buf).await;
                        }
                    }
                });
                *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                let headers = response.headers_mut();
                headers.insert(http::header::CONNECTION, "upgrade".parse().expect("value"));
                headers.insert(http::header::UPGRADE, "echo".parse().expect("value"));
            }
            _ => *response.status_mut() = StatusCode::NOT_FOUND,
        }
        Ok(response)
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path)
            .header(http::header::HOST, "peer")
            .body(crate::http::empty())
            .expect("request")
    }

    async fn send(pool: &Arc<Pool>, peer: &Peer, request: Request<Body>) -> Response<Body> {
        match pool.request(request, || peer.connect()).await {
            Ok(response) => response,
            Err(RequestError::Failed(err)) => panic!("request failed: {err}"),
            Err(RequestError::Connect(never, _)) => match never {},
        }
    }

    async fn text(response: Response<Body>) -> String {
        let body = response.into_body().collect().await.expect("body");
        String::from_utf8_lossy(&body.to_bytes()).into_owned()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (pool, peer) = (Arc::new(Pool::new(8)), Peer::default());
        for _ in 0..5 {
            assert_eq!(text(send(&pool, &peer, get("/small")).await).await, "hello");
            assert_eq!(text(send(&pool, &peer, get("/two")).await).await, "onetwo");
        }
        assert_eq!(peer.connects(), 1);
        assert_eq!(pool.idle(), 1);
    }

    /// Tasks alive on the test's runtime: the peer's servers, and any
    /// connection driver running on its own.
    fn tasks() -> usize {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    }

    #[tokio::test]
    async fn a_large_body_gets_its_connection_a_task_and_the_pool_keeps_it() {
        let (pool, peer) = (Arc::new(Pool::new(8)), Peer::default());
        assert_eq!(text(send(&pool, &peer, get("/small")).await).await, "hello");
        let (peers_only, connections) = (tasks(), peer.connects());
        assert_eq!(connections, 1);

        let body = send(&pool, &peer, get("/large")).await.into_body();
        let read = body.collect().await.expect("body").to_bytes();
        assert_eq!(read.len(), 4 * DETACH_AFTER);
        assert_eq!(tasks(), peers_only + 1, "the driver runs in its own task");

        // Still the same connection, now driven by its task, for what follows.
        for _ in 0..3 {
            assert_eq!(text(send(&pool, &peer, get("/small")).await).await, "hello");
        }
        assert_eq!((peer.connects(), pool.idle()), (1, 1));
        pool.clear();
        tokio::time::timeout(Duration::from_secs(5), async {
            while tasks() > peers_only - 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("closing the pool ends the connection and its task");
    }

    #[tokio::test]
    async fn small_bodies_spawn_nothing() {
        let (pool, peer) = (Arc::new(Pool::new(8)), Peer::default());
        assert_eq!(text(send(&pool, &peer, get("/small")).await).await, "hello");
        let peers_only = tasks();
        for _ in 0..100 {
            assert_eq!(text(send(&pool, &peer, get("/two")).await).await, "onetwo");
        }
        assert_eq!(tasks(), peers_only);
    }

    #[tokio::test]
    async fn a_connection_the_peer_closed_while_idle_is_passed_over() {
        let (pool, peer) = (Arc::new(Pool::new(8)), Peer::default());
        assert_eq!(text(send(&pool, &peer, get("/small")).await).await, "hello");
        peer.close_all().await;
        assert_eq!(text(send(&pool, &peer, get("/small")).await).await, "hello");
        assert_eq!(peer.connects(), 2);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (pool, peer) = (Arc::new(Pool::new(8)), Peer::default());
        let mut body = send(&pool, &peer, get("/stalls")).await.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok(), Some(Bytes::from("one")));
        drop(body);
        assert_eq!(pool.idle(), 0);
        assert_eq!(text(send(&pool, &peer, get("/small")).await).await, "hello");
        assert_eq!(peer.connects(), 2);
    }

    #[tokio::test]
    async fn an_empty_body_left_unread_keeps_its_connection() {
        let (pool, peer) = (Arc::new(Pool::new(8)), Peer::default());
        let response = send(&pool, &peer, get("/empty")).await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        drop(response);
        assert_eq!(pool.idle(), 1);
        assert_eq!(text(send(&pool, &peer, get("/small")).await).await, "hello");
        assert_eq!(peer.connects(), 1);
    }

    #[tokio::test]
    async fn idle_connections_beyond_the_limit_are_closed() {
        let (pool, peer) = (Arc::new(Pool::new(1)), Peer::default());
        let first = send(&pool, &peer, get("/small")).await;
        let second = send(&pool, &peer, get("/small")).await;
        assert_eq!(text(first).await, "hello");
        assert_eq!(text(second).await, "hello");
        assert_eq!((peer.connects(), pool.idle()), (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_after_its_timeout_without_another_request() {
        let (pool, peer) = (Arc::new(Pool::new(8)), Peer::default());
        assert_eq!(text(send(&pool, &peer, get("/small")).await).await, "hello");
        tokio::time::sleep(IDLE_TIMEOUT - Duration::from_secs(1)).await;
        assert_eq!(peer.open(), 1, "kept while it may be used again");
        tokio::time::sleep(REAP_EVERY + Duration::from_secs(1)).await;
        tokio::task::yield_now().await;
        assert_eq!(peer.open(), 0, "closed once idle for {IDLE_TIMEOUT:?}");
        assert_eq!(tasks(), 0, "nothing left running for an empty pool");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_the_peer_closed_while_idle_is_let_go_without_another_request() {
        let (pool, peer) = (Arc::new(Pool::new(8)), Peer::default());
        assert_eq!(text(send(&pool, &peer, get("/small")).await).await, "hello");
        peer.close_all().await;
        assert_eq!(pool.idle(), 1, "not known to be closed before anyone looks");
        tokio::time::sleep(REAP_EVERY + Duration::from_secs(1)).await;
        assert_eq!(pool.idle(), 0);
        assert_eq!(tasks(), 0);
    }

    #[tokio::test]
    async fn a_pool_never_used_runs_nothing() {
        let before = tasks();
        let pool = Arc::new(Pool::new(8));
        assert_eq!((pool.idle(), tasks()), (0, before));
    }

    #[tokio::test]
    async fn an_upgrade_takes_its_connection_over() {
        let (pool, peer) = (Arc::new(Pool::new(8)), Peer::default());
        let mut request = get("/upgrade");
        let headers = request.headers_mut();
        headers.insert(http::header::CONNECTION, "upgrade".parse().expect("value"));
        headers.insert(http::header::UPGRADE, "echo".parse().expect("value"));
        let mut response = send(&pool, &peer, request).await;
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        let upgraded = hyper::upgrade::on(&mut response).await.expect("upgraded");
        let mut io = TokioIo::new(upgraded);
        io.write_all(b"ping").await.expect("write");
        let mut echoed = [0u8; 4];
        io.read_exact(&mut echoed).await.expect("read");
        assert_eq!(&echoed, b"ping");
        assert_eq!(pool.idle(), 0);
    }

    /// Taking a chunk frees the driver, which waited for room in the body:
    /// that must not wake the task from inside its own poll.
    #[tokio::test]
    async fn reading_a_body_does_not_wake_its_own_task() {
        let (pool, peer) = (Arc::new(Pool::new(8)), Peer::default());
        let mut body = send(&pool, &peer, get("/two")).await.into_body();
        // Let the peer write both chunks before the body is read.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut read = Vec::new();
        for _ in 0..3 {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => read.extend(frame.into_data().ok()),
                Poll::Ready(None) => break,
                other => panic!("body not ready at once: {:?}", other.map(|_| ())),
            }
            assert_eq!(counter.wakes(), 0, "woken by its own poll");
        }
        assert_eq!(read.concat(), b"onetwo");
    }
}
