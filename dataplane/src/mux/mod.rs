//! The stream multiplexer: many byte streams over one WebSocket.
//!
//! A session owns three tasks: a reader that dispatches incoming frames to
//! streams, a writer that is the only owner of the socket's sending half,
//! and a keepalive. Streams never touch the socket; they queue encoded
//! frames, so a slow stream cannot hold a lock that others need.
//!
//! Two queues feed the writer. Data, Connect, Fin and Close of all streams
//! share one bounded FIFO queue (a stream's frames stay in order, and the
//! bound is the session's send buffer). Control frames (Ping, Pong,
//! WindowUpdate, GoAway, Error replies) have their own queue and go first,
//! so credit and keepalives are never stuck behind bulk data.

mod stream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use stream::Stream;
use stream::{Failure, StreamInner};

use crate::protocol::{
    Frame, FrameError, FrameType, HEADER_LEN, MAX_FRAME_PAYLOAD, SESSION_STREAM, Version,
};

/// Frames (of at most 64 KiB) the shared data queue holds: with the control
/// queue limit this bounds what a session buffers for sending.
const DATA_QUEUE_FRAMES: usize = 64;

/// Credentials messages (of at most 1 MiB) received and not yet handled.
const CREDENTIALS_QUEUE: usize = 4;
/// Control frames queued for a peer that does not read: past this the peer
/// is flooding us without consuming replies, and the session is closed.
const CONTROL_QUEUE_LIMIT: usize = 4096;
/// Malformed frames tolerated from one peer before it counts as broken.
const PROTOCOL_ERROR_BUDGET: u32 = 64;
/// Replica names kept from one announcement: a bound, not a limit a real
/// deployment comes near.
const MAX_ANNOUNCED_REPLICAS: usize = 64;
/// Frames the writer sends before it flushes the socket.
const WRITE_BATCH: usize = 32;
/// Frames under this size on average (small requests and responses) are
/// worth gathering into fewer writes.
const SMALL_FRAME: usize = 4096;

/// Which side of the tunnel a session is. Only the server opens streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// tether-server: sends Connect.
    Opener,
    /// tether-agent: receives Connect.
    Acceptor,
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub version: Version,
    pub role: Role,
    /// Streams open at once; a Connect beyond it is refused with an Error.
    pub max_streams: usize,
    pub keepalive_interval: Duration,
    /// The session ends when nothing arrived from the peer for this long.
    pub keepalive_timeout: Duration,
    /// A socket write that takes longer than this means the peer is gone.
    pub write_timeout: Duration,
    /// v1: how long an opener waits for Connected.
    pub open_timeout: Duration,
    /// v1 (no flow control): bytes buffered for one stream before the reader
    /// stops reading the socket until that stream's consumer catches up.
    pub v1_recv_buffer: usize,
    /// For logs: which cluster or peer this session serves.
    pub label: String,
}

impl SessionConfig {
    pub fn new(version: Version, role: Role, label: impl Into<String>) -> Self {
        Self {
            version,
            role,
            max_streams: 1024,
            keepalive_interval: Duration::from_secs(15),
            keepalive_timeout: Duration::from_secs(45),
            write_timeout: Duration::from_secs(30),
            open_timeout: Duration::from_secs(30),
            v1_recv_buffer: 1 << 20,
            label: label.into(),
        }
    }
}

/// WebSocket limits for a tunnel: one frame per message, so a message can
/// never exceed the largest frame. The read buffer starts small (tungstenite
/// allocates it up front, 128 KiB by default): it grows for large frames,
/// and an idle agent costs the server little. 4 KiB against 8 KiB measured
/// the same throughput and 19.4 against 23.3 KiB per idle agent.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .max_message_size(Some(HEADER_LEN + MAX_FRAME_PAYLOAD))
        .max_frame_size(Some(HEADER_LEN + MAX_FRAME_PAYLOAD))
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("tunnel session is closed")]
    Closed,
    #[error("tunnel session is draining and accepts no new streams")]
    Draining,
    #[error("tunnel has {0} streams open, the most it allows")]
    TooManyStreams(usize),
    #[error("agent refused the stream: {0}")]
    Refused(String),
    #[error("agent did not answer Connect within {0:?}")]
    Timeout(Duration),
}

/// A stream the peer opened, waiting for this side to accept or refuse it.
pub struct IncomingStream {
    stream: Stream,
    target: String,
}

impl IncomingStream {
    /// The `host:port` the peer asked for.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Confirms the stream with Connected.
    pub async fn accept(self) -> Result<Stream, OpenError> {
        let shared = self.stream.session();
        shared
            .data_tx
            .send(Frame::empty(FrameType::Connected, self.stream.id()).encode())
            .await
            .map_err(|_| OpenError::Closed)?;
        self.stream.inner().state().connected = true;
        Ok(self.stream)
    }

    /// Refuses the stream with an Error frame carrying `message`.
    pub fn refuse(self, message: &str) {
        let id = self.stream.id();
        self.stream.inner().mark_locally_closed();
        self.stream.session().send_control(Frame::new(
            FrameType::Error,
            id,
            Bytes::copy_from_slice(message.as_bytes()),
        ));
    }
}

pub(crate) struct Shared {
    cfg: SessionConfig,
    streams: Mutex<HashMap<u32, Arc<StreamInner>>>,
    next_id: AtomicU32,
    control_tx: mpsc::UnboundedSender<Bytes>,
    control_queued: AtomicUsize,
    data_tx: mpsc::Sender<Bytes>,
    closed: CancellationToken,
    close_reason: Mutex<Option<String>>,
    local_going_away: AtomicBool,
    peer_going_away: CancellationToken,
    /// The replicas the server last announced (agent side).
    replicas: tokio::sync::watch::Sender<Option<Vec<String>>>,
    /// Credentials messages from the peer, for whoever took the receiver.
    /// Credentials messages from the peer not yet handled. A queue and a
    /// `Notify` rather than a channel: nothing is allocated for the many
    /// sessions that never see one.
    credentials: Mutex<std::collections::VecDeque<Bytes>>,
    credentials_ready: tokio::sync::Notify,
    credentials_taken: std::sync::atomic::AtomicBool,
    protocol_errors: AtomicU32,
    epoch: Instant,
    last_seen_ms: AtomicU64,
}

/// A handle to a running session; cheap to clone.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

impl Session {
    /// Starts the session's tasks on `ws`. An acceptor also gets the
    /// streams its peer opens.
    pub fn start<S>(
        ws: WebSocketStream<S>,
        cfg: SessionConfig,
    ) -> (Session, Option<mpsc::Receiver<IncomingStream>>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE_FRAMES);
        let (incoming_tx, incoming_rx) = match cfg.role {
            Role::Acceptor => {
                let (tx, rx) = mpsc::channel(cfg.max_streams.max(1));
                (Some(tx), Some(rx))
            }
            Role::Opener => (None, None),
        };
        let shared = Arc::new(Shared {
            cfg,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            control_tx,
            control_queued: AtomicUsize::new(0),
            data_tx,
            closed: CancellationToken::new(),
            close_reason: Mutex::new(None),
            local_going_away: AtomicBool::new(false),
            peer_going_away: CancellationToken::new(),
            replicas: tokio::sync::watch::channel(None).0,
            credentials: Mutex::new(std::collections::VecDeque::new()),
            credentials_ready: tokio::sync::Notify::new(),
            credentials_taken: std::sync::atomic::AtomicBool::new(false),
            protocol_errors: AtomicU32::new(0),
            epoch: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
        });
        let (sink, source) = ws.split();
        tokio::spawn(write_loop(sink, control_rx, data_rx, shared.clone()));
        tokio::spawn(read_loop(source, shared.clone(), incoming_tx));
        tokio::spawn(keepalive_loop(shared.clone()));
        (Session { shared }, incoming_rx)
    }

    pub fn version(&self) -> Version {
        self.shared.cfg.version
    }

    /// Opens a stream to `target`. v2 returns at once (0-RTT: Data may
    /// follow Connect immediately); v1 waits for the peer's Connected.
    pub async fn open(&self, target: &str) -> Result<Stream, OpenError> {
        let shared = &self.shared;
        if shared.closed.is_cancelled() {
            return Err(OpenError::Closed);
        }
        if self.is_draining() {
            return Err(OpenError::Draining);
        }
        let (opened_tx, opened_rx) = oneshot::channel();
        let inner = {
            let mut streams = shared.streams();
            if streams.len() >= shared.cfg.max_streams {
                return Err(OpenError::TooManyStreams(shared.cfg.max_streams));
            }
            let id = loop {
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                if id != SESSION_STREAM && !streams.contains_key(&id) {
                    break id;
                }
            };
            let opener = (shared.cfg.version == Version::V1).then_some(opened_tx);
            let inner = Arc::new(StreamInner::new(id, opener));
            streams.insert(id, inner.clone());
            inner
        };
        // From here on, dropping `stream` (error or cancellation) closes it.
        let stream = Stream::new(inner, shared.clone());
        let connect = Frame::new(
            FrameType::Connect,
            stream.id(),
            Bytes::copy_from_slice(target.as_bytes()),
        );
        shared
            .data_tx
            .send(connect.encode())
            .await
            .map_err(|_| OpenError::Closed)?;
        if shared.cfg.version == Version::V1 {
            match tokio::time::timeout(shared.cfg.open_timeout, opened_rx).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(message))) => return Err(OpenError::Refused(message)),
                Ok(Err(_)) => return Err(OpenError::Closed),
                Err(_) => return Err(OpenError::Timeout(shared.cfg.open_timeout)),
            }
        }
        Ok(stream)
    }

    /// Streams currently open (handles alive or not yet handed out).
    pub fn open_streams(&self) -> usize {
        self.shared.streams().len()
    }

    /// Bytes received on this session's streams and not yet read by their
    /// consumers: what flow control (v2) or the v1 buffer limit bounds.
    pub fn buffered_bytes(&self) -> usize {
        self.shared
            .streams()
            .values()
            .map(|s| s.state().recv_len)
            .sum()
    }

    /// Ends the session: every stream fails, the socket is closed.
    pub fn close(&self, reason: &str) {
        self.shared.close(reason);
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// Resolves when the session has ended.
    pub async fn closed(&self) {
        self.shared.closed.cancelled().await;
    }

    pub fn close_reason(&self) -> Option<String> {
        self.shared.close_reason.lock().ok().and_then(|r| r.clone())
    }

    /// Stops opening streams and, on v2, tells the peer to reconnect now.
    /// Streams already open keep working until the session is closed.
    pub fn go_away(&self) {
        if !self.shared.local_going_away.swap(true, Ordering::SeqCst)
            && self.shared.cfg.version == Version::V2
        {
            self.shared
                .send_control(Frame::empty(FrameType::GoAway, SESSION_STREAM));
        }
    }

    /// Whether either side has announced that the session is ending.
    pub fn is_draining(&self) -> bool {
        self.shared.local_going_away.load(Ordering::SeqCst)
            || self.shared.peer_going_away.is_cancelled()
    }

    /// Resolves when the peer sends GoAway.
    pub async fn peer_going_away(&self) {
        self.shared.peer_going_away.cancelled().await;
    }

    /// Server side, v2: announces the live replicas to the agent.
    pub fn send_replicas(&self, replicas: &[String]) {
        if self.shared.cfg.version == Version::V2 && self.shared.cfg.role == Role::Opener {
            self.shared.send_control(Frame::new(
                FrameType::Replicas,
                SESSION_STREAM,
                Bytes::from(replicas.join(",")),
            ));
        }
    }

    /// v2: sends a credentials message (see `credentials::Message`).
    pub fn send_credentials(&self, message: Bytes) {
        if self.shared.cfg.version == Version::V2 {
            self.shared
                .send_control(Frame::new(FrameType::Credentials, SESSION_STREAM, message));
        }
    }

    /// The credentials messages the peer sends; `None` after the first call.
    pub fn take_credentials(&self) -> Option<CredentialsReceiver> {
        let taken = self.shared.credentials_taken.swap(true, Ordering::AcqRel);
        (!taken).then(|| CredentialsReceiver {
            shared: self.shared.clone(),
        })
    }

    /// Agent side: the replicas the server announced last (`None` until it
    /// announces any).
    pub fn replicas(&self) -> tokio::sync::watch::Receiver<Option<Vec<String>>> {
        self.shared.replicas.subscribe()
    }

    /// Malformed or out-of-place frames received so far.
    pub fn protocol_errors(&self) -> u32 {
        self.shared.protocol_errors.load(Ordering::Relaxed)
    }
}

impl Shared {
    fn streams(&self) -> MutexGuard<'_, HashMap<u32, Arc<StreamInner>>> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stream(&self, id: u32) -> Option<Arc<StreamInner>> {
        self.streams().get(&id).cloned()
    }

    /// Removes a stream whose handle is gone, unless the id already names a
    /// newer stream.
    pub(crate) fn forget_stream(&self, inner: &Arc<StreamInner>) {
        let mut streams = self.streams();
        if streams
            .get(&inner.id)
            .is_some_and(|current| Arc::ptr_eq(current, inner))
        {
            streams.remove(&inner.id);
        }
    }

    pub(crate) fn send_control(&self, frame: Frame) {
        if self.closed.is_cancelled() {
            return;
        }
        let queued = self.control_queued.fetch_add(1, Ordering::Relaxed) + 1;
        if queued > CONTROL_QUEUE_LIMIT {
            self.close("peer does not read: control queue full");
            return;
        }
        if self.control_tx.send(frame.encode()).is_err() {
            self.control_queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Queues a frame behind the stream's Data, without waiting: used from
    /// `Drop`, where awaiting is impossible.
    pub(crate) fn send_ordered(&self, frame: Frame) {
        if self.closed.is_cancelled() {
            return;
        }
        match self.data_tx.try_send(frame.encode()) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(bytes)) => {
                let data_tx = self.data_tx.clone();
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        let _ = data_tx.send(bytes).await;
                    });
                }
            }
        }
    }

    fn close(&self, reason: &str) {
        {
            let mut slot = self
                .close_reason
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if slot.is_some() {
                return;
            }
            *slot = Some(reason.to_owned());
        }
        info!(session = %self.cfg.label, reason, "tunnel session closed");
        self.closed.cancel();
        let streams: Vec<_> = self.streams().drain().map(|(_, s)| s).collect();
        for stream in streams {
            stream.fail(Failure::SessionClosed(reason.to_owned()), true);
        }
    }

    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_seen_ms.store(now, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = self.last_seen_ms.load(Ordering::Relaxed);
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }

    /// Records a protocol violation; a stream it names is reset on both sides.
    fn protocol_error(&self, stream: Option<u32>, error: &str) {
        let count = self.protocol_errors.fetch_add(1, Ordering::Relaxed) + 1;
        warn!(session = %self.cfg.label, stream, error, "protocol error from peer");
        if let Some(id) = stream.filter(|id| *id != SESSION_STREAM) {
            if let Some(inner) = self.stream(id) {
                inner.fail(Failure::Reset(format!("protocol error: {error}")), false);
                inner.mark_locally_closed();
            }
            self.send_control(Frame::new(
                FrameType::Error,
                id,
                Bytes::from(format!("protocol error: {error}")),
            ));
        }
        if count > PROTOCOL_ERROR_BUDGET {
            self.close("peer sent too many malformed frames");
        }
    }

    async fn handle(
        self: &Arc<Self>,
        frame: Frame,
        incoming: Option<&mpsc::Sender<IncomingStream>>,
    ) {
        if !frame.kind.allowed_in(self.cfg.version) {
            let error = format!("{:?} frame is not part of protocol v1", frame.kind);
            self.protocol_error(Some(frame.stream), &error);
            return;
        }
        let id = frame.stream;
        let session_level = matches!(
            frame.kind,
            FrameType::Ping
                | FrameType::Pong
                | FrameType::GoAway
                | FrameType::Replicas
                | FrameType::Credentials
        );
        if session_level != (id == SESSION_STREAM) {
            let error = format!("{:?} frame on stream {id}", frame.kind);
            self.protocol_error(Some(id), &error);
            return;
        }
        match frame.kind {
            FrameType::Ping => self.send_control(Frame::empty(FrameType::Pong, SESSION_STREAM)),
            FrameType::Pong => {}
            FrameType::GoAway => {
                info!(session = %self.cfg.label, "peer is going away");
                self.peer_going_away.cancel();
            }
            FrameType::Replicas if self.cfg.role == Role::Opener => {
                self.protocol_error(None, "only the server announces replicas");
            }
            FrameType::Replicas => {
                let names: Vec<String> = frame
                    .text()
                    .split(',')
                    .filter(|name| !name.is_empty())
                    .map(|name| name.chars().take(253).collect())
                    .take(MAX_ANNOUNCED_REPLICAS)
                    .collect();
                debug!(session = %self.cfg.label, replicas = ?names, "server announced replicas");
                self.replicas.send_replace(Some(names));
            }
            FrameType::Credentials => {
                // Bounded: a peer flooding credentials messages loses them,
                // never grows our memory.
                let mut queue = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
                if queue.len() < CREDENTIALS_QUEUE {
                    queue.push_back(frame.payload);
                    self.credentials_ready.notify_one();
                } else {
                    warn!(session = %self.cfg.label, "credentials message dropped: too many pending");
                }
            }
            FrameType::Connect => self.on_connect(frame, incoming),
            FrameType::Connected => self.on_connected(id),
            FrameType::Data => self.on_data(id, frame.payload).await,
            FrameType::Error => {
                if let Some(inner) = self.stream(id) {
                    let message = frame.text();
                    debug!(session = %self.cfg.label, stream = id, message, "stream reset by peer");
                    inner.fail(Failure::Reset(message), true);
                }
            }
            FrameType::Close => {
                if let Some(inner) = self.stream(id) {
                    inner.peer_finished(true);
                }
            }
            FrameType::Fin => {
                if let Some(inner) = self.stream(id) {
                    inner.peer_finished(false);
                }
            }
            FrameType::WindowUpdate => {
                if let Some(Err(error)) = self.stream(id).map(|s| s.grant(frame.window_increment()))
                {
                    self.protocol_error(Some(id), &error);
                }
            }
        }
    }

    fn on_connect(self: &Arc<Self>, frame: Frame, incoming: Option<&mpsc::Sender<IncomingStream>>) {
        let id = frame.stream;
        let Some(incoming) = incoming else {
            self.protocol_error(Some(id), "only the server opens streams");
            return;
        };
        let refuse = |message: &str| {
            self.send_control(Frame::new(
                FrameType::Error,
                id,
                Bytes::copy_from_slice(message.as_bytes()),
            ));
        };
        if self.local_going_away.load(Ordering::SeqCst) {
            refuse("agent is shutting down");
            return;
        }
        let inner = {
            let mut streams = self.streams();
            if let Some(existing) = streams.remove(&id) {
                drop(streams);
                existing.fail(Failure::Reset("duplicate stream id".into()), false);
                existing.mark_locally_closed();
                self.protocol_error(None, &format!("Connect for stream {id}, which is open"));
                refuse("duplicate stream id");
                return;
            }
            if streams.len() >= self.cfg.max_streams {
                drop(streams);
                warn!(session = %self.cfg.label, stream = id, max = self.cfg.max_streams,
                    "refusing stream: max connections reached");
                refuse(&format!(
                    "max connections reached ({})",
                    self.cfg.max_streams
                ));
                return;
            }
            let inner = Arc::new(StreamInner::new(id, None));
            streams.insert(id, inner.clone());
            inner
        };
        let target = frame.text();
        // The handle is built only once it is certain to be delivered, so
        // a refused stream never sends Close after its Error.
        match incoming.try_reserve() {
            Ok(permit) => {
                permit.send(IncomingStream {
                    stream: Stream::new(inner, self.clone()),
                    target,
                });
            }
            Err(_) => {
                self.streams().remove(&id);
                refuse("agent is not accepting streams");
            }
        }
    }

    fn on_connected(&self, id: u32) {
        let Some(inner) = self.stream(id) else {
            // Late answer for a stream that timed out or was cancelled.
            debug!(session = %self.cfg.label, stream = id, "Connected for a stream that is gone");
            return;
        };
        let mut st = inner.state();
        if st.connected {
            drop(st);
            self.protocol_error(Some(id), "duplicate Connected");
            return;
        }
        if st.failure.is_some() {
            debug!(session = %self.cfg.label, stream = id, "Connected after Error ignored");
            return;
        }
        st.connected = true;
        if let Some(opener) = st.opener.take() {
            let _ = opener.send(Ok(()));
        }
    }

    async fn on_data(&self, id: u32, payload: Bytes) {
        let Some(inner) = self.stream(id) else {
            // Normal after a local close races in-flight Data; not an error.
            debug!(session = %self.cfg.label, stream = id, "Data for an unknown stream dropped");
            return;
        };
        match self.cfg.version {
            Version::V2 => {
                let violation = {
                    let mut st = inner.state();
                    if st.recv_fin {
                        Some("Data after Fin".to_owned())
                    } else if payload.len() > st.recv_window as usize {
                        Some(format!(
                            "{} bytes of Data exceed the {}-byte window",
                            payload.len(),
                            st.recv_window
                        ))
                    } else {
                        st.recv_window -= payload.len() as u32;
                        None
                    }
                };
                match violation {
                    Some(error) => self.protocol_error(Some(id), &error),
                    None => inner.push(payload),
                }
            }
            Version::V1 => {
                // No flow control in v1: like TCP, a full buffer stops the
                // reader (and so the whole session) until the consumer reads.
                loop {
                    let notified = inner.space.notified();
                    {
                        let st = inner.state();
                        if st.recv_len < self.cfg.v1_recv_buffer
                            || st.handle_dropped
                            || st.failure.is_some()
                        {
                            break;
                        }
                    }
                    tokio::select! {
                        _ = notified => {}
                        _ = self.closed.cancelled() => return,
                    }
                }
                inner.push(payload);
            }
        }
    }
}

async fn read_loop<S>(
    mut source: SplitStream<WebSocketStream<S>>,
    shared: Arc<Shared>,
    incoming: Option<mpsc::Sender<IncomingStream>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    shared.touch();
    loop {
        let message = tokio::select! {
            _ = shared.closed.cancelled() => return,
            message = source.next() => message,
        };
        match message {
            None => return shared.close("peer closed the connection"),
            Some(Err(err)) => return shared.close(&format!("read failed: {err}")),
            Some(Ok(Message::Binary(bytes))) => {
                shared.touch();
                match Frame::decode(bytes) {
                    Ok(frame) => shared.handle(frame, incoming.as_ref()).await,
                    Err(err) => {
                        let stream = match err {
                            FrameError::UnknownType { stream, .. } => Some(stream),
                            _ => None,
                        };
                        shared.protocol_error(stream, &err.to_string());
                    }
                }
            }
            Some(Ok(Message::Text(_))) => {
                shared.touch();
                shared.protocol_error(None, "text message on a binary tunnel");
            }
            Some(Ok(Message::Close(_))) => return shared.close("peer closed the tunnel"),
            // WebSocket-level pings are answered by tungstenite itself.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => shared.touch(),
        }
    }
}

/// The credentials messages a session receives, in order.
pub struct CredentialsReceiver {
    shared: Arc<Shared>,
}

impl CredentialsReceiver {
    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        self.shared
            .credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    /// The next message; `None` once the session has closed.
    pub async fn recv(&mut self) -> Option<Bytes> {
        loop {
            let next = self.try_recv();
            if next.is_some() {
                return next;
            }
            if self.shared.closed.is_cancelled() {
                return None;
            }
            // notify_one keeps a permit when nobody waits: a message queued
            // between the check above and this wait is not missed.
            tokio::select! {
                _ = self.shared.credentials_ready.notified() => {}
                _ = self.shared.closed.cancelled() => {}
            }
        }
    }
}

async fn write_loop<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    mut control: mpsc::UnboundedReceiver<Bytes>,
    mut data: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let write_timeout = shared.cfg.write_timeout;
    // Whether the last write carried several small data frames: many
    // streams are busy with small requests, and a frame is worth waiting a
    // scheduler turn for. Bulk frames fill a write on their own, and the
    // receiver of a download writes only control frames (window updates):
    // a turn for those cost a download a third of its throughput.
    let mut small_and_busy = false;
    loop {
        let first = tokio::select! {
            biased;
            _ = shared.closed.cancelled() => break,
            Some(bytes) = control.recv() => {
                shared.control_queued.fetch_sub(1, Ordering::Relaxed);
                (bytes, false)
            }
            Some(bytes) = data.recv() => (bytes, true),
            else => break,
        };
        let batch = async {
            let (first, first_is_data) = first;
            let (mut data_frames, mut data_bytes) = if first_is_data {
                (1, first.len())
            } else {
                (0, 0)
            };
            sink.feed(Message::Binary(first)).await?;
            let mut fed = 1;
            let mut yielded = !small_and_busy;
            while fed < WRITE_BATCH {
                let next = match control.try_recv() {
                    Ok(frame) => {
                        shared.control_queued.fetch_sub(1, Ordering::Relaxed);
                        frame
                    }
                    Err(_) => match data.try_recv() {
                        Ok(frame) => {
                            data_frames += 1;
                            data_bytes += frame.len();
                            frame
                        }
                        // Under load, once, let the tasks already woken
                        // queue their frames: they share one write (and the
                        // peer one wakeup) instead of a syscall each. A
                        // lone request does not pay for the extra turn.
                        Err(_) if !yielded => {
                            yielded = true;
                            tokio::task::yield_now().await;
                            continue;
                        }
                        Err(_) => break,
                    },
                };
                sink.feed(Message::Binary(next)).await?;
                fed += 1;
            }
            sink.flush().await.map(|()| (data_frames, data_bytes))
        };
        match tokio::time::timeout(write_timeout, batch).await {
            Ok(Ok((frames, bytes))) => {
                small_and_busy = frames > 1 && bytes / frames < SMALL_FRAME;
                forget_socket_waker(&mut sink);
            }
            Ok(Err(err)) => return shared.close(&format!("write failed: {err}")),
            Err(_) => {
                return shared.close(&format!("write stalled for {write_timeout:?}"));
            }
        }
    }
    // Send what was queued before the close (final Close/Error frames), then
    // end the WebSocket politely; a peer that stopped reading gets a second.
    let farewell = async {
        while let Ok(bytes) = control.try_recv().or_else(|_| data.try_recv()) {
            sink.feed(Message::Binary(bytes)).await?;
        }
        sink.close().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), farewell).await;
}

/// Leaves a no-op waker where the writer's was, once everything is flushed.
///
/// tokio-tungstenite wakes the task that last flushed whenever the socket
/// turns readable (its waker proxy wakes readers and writers alike: a TLS or
/// WebSocket read may have to write, and the reverse). A writer that has
/// flushed everything waits on its queues, not on the socket, so that wake
/// only runs it for nothing; and on a multi-thread runtime, the reader and
/// the writer woken together by one readable socket are two runnable tasks,
/// for which tokio wakes a second worker thread: a futex call and two
/// context switches per frame received. A flush that finds nothing to write
/// only registers the waker it is given, and the next write that has to wait
/// for the socket registers the writer's own again.
fn forget_socket_waker<S>(sink: &mut SplitSink<WebSocketStream<S>, Message>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut no_op = std::task::Context::from_waker(std::task::Waker::noop());
    // Ready, Pending (the reader holds the socket, or a pong it queued has to
    // wait) and errors all leave the writer as it was; the next write sees an
    // error again.
    let _ = futures_util::Sink::poll_flush(std::pin::Pin::new(sink), &mut no_op);
}

async fn keepalive_loop(shared: Arc<Shared>) {
    let period = shared.cfg.keepalive_interval;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = shared.closed.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let silent = shared.silent_for();
        if silent > shared.cfg.keepalive_timeout {
            return shared.close(&format!("peer silent for {silent:?}"));
        }
        shared.send_control(Frame::empty(FrameType::Ping, SESSION_STREAM));
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};

    use futures_util::{Sink, SinkExt, Stream, StreamExt};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role as WsRole;

    use super::forget_socket_waker;
    use crate::test_support::CountingWaker;

    #[tokio::test]
    async fn a_frame_received_does_not_wake_a_writer_that_has_flushed() {
        let (local, remote) = tokio::io::duplex(64 * 1024);
        let local = WebSocketStream::from_raw_socket(local, WsRole::Server, None).await;
        let mut peer = WebSocketStream::from_raw_socket(remote, WsRole::Client, None).await;
        let (mut sink, mut source) = local.split();

        // The writer task sends a frame and flushes it.
        let writer = Arc::new(CountingWaker::default());
        let writer_waker = Waker::from(writer.clone());
        let mut writer_cx = Context::from_waker(&writer_waker);
        assert!(Pin::new(&mut sink).poll_ready(&mut writer_cx).is_ready());
        Pin::new(&mut sink)
            .start_send(Message::Binary("out".into()))
            .expect("queue a frame");
        assert!(matches!(
            Pin::new(&mut sink).poll_flush(&mut writer_cx),
            Poll::Ready(Ok(()))
        ));
        forget_socket_waker(&mut sink);

        // The reader task waits for a frame, and the peer sends one.
        let reader = Arc::new(CountingWaker::default());
        let reader_waker = Waker::from(reader.clone());
        let mut reader_cx = Context::from_waker(&reader_waker);
        assert!(Pin::new(&mut source).poll_next(&mut reader_cx).is_pending());
        assert_eq!(
            peer.next().await.and_then(Result::ok),
            Some(Message::Binary("out".into()))
        );
        peer.send(Message::Binary("in".into()))
            .await
            .expect("peer sends");

        assert!(reader.wakes() > 0, "the reader is woken");
        assert_eq!(writer.wakes(), 0, "the idle writer is not");
        assert!(matches!(
            Pin::new(&mut source).poll_next(&mut reader_cx),
            Poll::Ready(Some(Ok(Message::Binary(bytes)))) if bytes == "in"
        ));
    }
}
