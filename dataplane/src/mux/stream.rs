//! One multiplexed stream: a bidirectional byte pipe (`AsyncRead` +
//! `AsyncWrite`) whose bytes travel as Data frames of its session.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::PollSender;

use super::Shared;
use crate::protocol::{Frame, FrameType, MAX_DATA_CHUNK, V2_INITIAL_WINDOW, Version, encode_parts};

/// Why a stream can no longer be used.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// The peer sent Error, or broke the protocol on this stream.
    Reset(String),
    /// The whole session ended.
    SessionClosed(String),
}

impl Failure {
    fn to_io(&self) -> io::Error {
        match self {
            Failure::Reset(msg) => io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("stream reset: {msg}"),
            ),
            Failure::SessionClosed(msg) => io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("tunnel closed: {msg}"),
            ),
        }
    }
}

pub(crate) struct StreamState {
    /// Bytes received and not yet read, in arrival order.
    recv: VecDeque<Bytes>,
    pub(crate) recv_len: usize,
    /// v2: bytes the peer may still send before it needs more credit.
    pub(crate) recv_window: u32,
    /// v2: bytes read by the consumer and not yet granted back to the peer.
    unacked: u32,
    /// The peer will send no more Data (Fin or Close).
    pub(crate) recv_fin: bool,
    read_waker: Option<Waker>,
    /// v2: bytes this side may still send.
    pub(crate) send_credit: u64,
    write_waker: Option<Waker>,
    /// This side sent Fin or Close; writes now fail.
    send_fin: bool,
    /// The peer sent Close or Error: nothing more to tell it about this stream.
    pub(crate) peer_closed: bool,
    /// This side sent Close or Error.
    local_closed: bool,
    /// The handle is gone; late Data is discarded.
    pub(crate) handle_dropped: bool,
    pub(crate) failure: Option<Failure>,
    /// Set while an opener (v1) waits for Connected or Error.
    pub(crate) opener: Option<oneshot::Sender<Result<(), String>>>,
    pub(crate) connected: bool,
}

pub(crate) struct StreamInner {
    pub(crate) id: u32,
    state: Mutex<StreamState>,
    /// v1: the session reader waits here while this stream's buffer is full.
    pub(crate) space: Notify,
}

impl StreamInner {
    pub(crate) fn new(id: u32, opener: Option<oneshot::Sender<Result<(), String>>>) -> Self {
        Self {
            id,
            state: Mutex::new(StreamState {
                recv: VecDeque::new(),
                recv_len: 0,
                recv_window: V2_INITIAL_WINDOW,
                unacked: 0,
                recv_fin: false,
                read_waker: None,
                send_credit: u64::from(V2_INITIAL_WINDOW),
                write_waker: None,
                send_fin: false,
                peer_closed: false,
                local_closed: false,
                handle_dropped: false,
                failure: None,
                opener,
                connected: false,
            }),
            space: Notify::new(),
        }
    }

    /// Locks the state. A panic while holding the lock cannot leave the
    /// plain-data state inconsistent, so a poisoned lock is still usable.
    pub(crate) fn state(&self) -> MutexGuard<'_, StreamState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues received bytes for the consumer.
    pub(crate) fn push(&self, data: Bytes) {
        let mut st = self.state();
        if st.handle_dropped || st.recv_fin {
            return;
        }
        st.recv_len += data.len();
        st.recv.push_back(data);
        wake(&mut st.read_waker);
    }

    /// The peer will send nothing more; if `both` it also takes nothing more.
    pub(crate) fn peer_finished(&self, both: bool) {
        let mut st = self.state();
        st.recv_fin = true;
        if both {
            st.peer_closed = true;
            wake(&mut st.write_waker);
        }
        wake(&mut st.read_waker);
        drop(st);
        self.space.notify_one();
    }

    /// Ends the stream with an error seen by both halves. `peer_knows` means
    /// no Close needs to be sent for it.
    pub(crate) fn fail(&self, failure: Failure, peer_knows: bool) {
        let mut st = self.state();
        if let Some(opener) = st.opener.take() {
            let message = match &failure {
                Failure::Reset(msg) | Failure::SessionClosed(msg) => msg.clone(),
            };
            let _ = opener.send(Err(message));
        }
        if st.failure.is_none() {
            st.failure = Some(failure);
        }
        st.peer_closed |= peer_knows;
        wake(&mut st.read_waker);
        wake(&mut st.write_waker);
        drop(st);
        self.space.notify_one();
    }

    pub(crate) fn grant(&self, increment: u32) -> Result<(), String> {
        let mut st = self.state();
        let credit = st.send_credit + u64::from(increment);
        if credit > u64::from(u32::MAX) {
            return Err(format!("window overflow to {credit} bytes"));
        }
        st.send_credit = credit;
        wake(&mut st.write_waker);
        Ok(())
    }

    /// Marks the stream as refused by this side (an Error is being sent).
    pub(crate) fn mark_locally_closed(&self) {
        let mut st = self.state();
        st.local_closed = true;
        st.send_fin = true;
    }
}

fn wake(waker: &mut Option<Waker>) {
    if let Some(waker) = waker.take() {
        waker.wake();
    }
}

/// A stream handle. Dropping it closes the stream on both sides.
pub struct Stream {
    inner: Arc<StreamInner>,
    session: Arc<Shared>,
    sender: PollSender<Bytes>,
}

impl Stream {
    pub(crate) fn new(inner: Arc<StreamInner>, session: Arc<Shared>) -> Self {
        let sender = PollSender::new(session.data_tx.clone());
        Self {
            inner,
            session,
            sender,
        }
    }

    pub fn id(&self) -> u32 {
        self.inner.id
    }

    pub(crate) fn session(&self) -> &Arc<Shared> {
        &self.session
    }

    pub(crate) fn inner(&self) -> &Arc<StreamInner> {
        &self.inner
    }

    fn version(&self) -> Version {
        self.session.cfg.version
    }

    fn closed_error(&self) -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "tunnel session is closed")
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = this.inner.state();
        if st.recv_len > 0 {
            let mut copied = 0;
            while buf.remaining() > 0 {
                let Some(front) = st.recv.front_mut() else {
                    break;
                };
                let take = front.len().min(buf.remaining());
                buf.put_slice(&front[..take]);
                front.advance(take);
                if front.is_empty() {
                    st.recv.pop_front();
                }
                copied += take;
            }
            st.recv_len -= copied;
            match this.version() {
                Version::V2 => {
                    // Grant credit back in batches of half a window: one
                    // WindowUpdate per 256 KiB read keeps the pipe full
                    // without a control frame per Data frame.
                    st.unacked += copied as u32;
                    if st.unacked >= V2_INITIAL_WINDOW / 2 && !st.recv_fin && !st.local_closed {
                        let increment = std::mem::take(&mut st.unacked);
                        st.recv_window += increment;
                        drop(st);
                        this.session
                            .send_control(Frame::window_update(this.inner.id, increment));
                    }
                }
                Version::V1 => {
                    let below_limit = st.recv_len < this.session.cfg.v1_recv_buffer;
                    drop(st);
                    if below_limit {
                        this.inner.space.notify_one();
                    }
                }
            }
            return Poll::Ready(Ok(()));
        }
        if st.recv_fin {
            return Poll::Ready(Ok(()));
        }
        if let Some(failure) = &st.failure {
            return Poll::Ready(Err(failure.to_io()));
        }
        st.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        {
            let mut st = this.inner.state();
            if let Some(failure) = &st.failure {
                return Poll::Ready(Err(failure.to_io()));
            }
            if st.send_fin || st.peer_closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "stream is closed for writing",
                )));
            }
            if this.version() == Version::V2 && st.send_credit == 0 {
                st.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        // Waiting here is the session's fair queue: tokio's bounded channel
        // hands out slots first come, first served across all streams.
        if ready!(this.sender.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(this.closed_error()));
        }
        let mut st = this.inner.state();
        if let Some(failure) = &st.failure {
            let err = failure.to_io();
            drop(st);
            this.sender.abort_send();
            return Poll::Ready(Err(err));
        }
        let mut len = buf.len().min(MAX_DATA_CHUNK);
        if this.version() == Version::V2 {
            // Only this handle spends credit, so it cannot have shrunk.
            len = len.min(st.send_credit as usize);
            st.send_credit -= len as u64;
        }
        drop(st);
        let frame = encode_parts(FrameType::Data, this.inner.id, &buf[..len]);
        if this.sender.send_item(frame).is_err() {
            return Poll::Ready(Err(this.closed_error()));
        }
        Poll::Ready(Ok(len))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The session writer flushes the socket whenever its queue drains.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        {
            let st = this.inner.state();
            if st.send_fin || st.peer_closed || st.failure.is_some() {
                return Poll::Ready(Ok(()));
            }
        }
        if ready!(this.sender.poll_reserve(cx)).is_err() {
            return Poll::Ready(Ok(()));
        }
        let kind = {
            let mut st = this.inner.state();
            st.send_fin = true;
            match this.version() {
                Version::V2 => FrameType::Fin,
                // v1 has no half-close: Close ends both directions, and a
                // v1 peer never answers it, so reading ends here too.
                Version::V1 => {
                    st.local_closed = true;
                    st.recv_fin = true;
                    wake(&mut st.read_waker);
                    FrameType::Close
                }
            }
        };
        let _ = this
            .sender
            .send_item(Frame::empty(kind, this.inner.id).encode());
        Poll::Ready(Ok(()))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let must_close = {
            let mut st = self.inner.state();
            st.handle_dropped = true;
            st.recv.clear();
            st.recv_len = 0;
            let must_close = !st.local_closed && !st.peer_closed;
            st.local_closed = true;
            must_close
        };
        self.inner.space.notify_one();
        self.session.forget_stream(&self.inner);
        if must_close {
            self.session
                .send_ordered(Frame::empty(FrameType::Close, self.inner.id));
        }
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.inner.id)
            .finish()
    }
}
