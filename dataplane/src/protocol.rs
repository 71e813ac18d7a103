//! The tunnel's wire format: one binary WebSocket message per frame,
//! `[type:1][stream id:4, big-endian][payload]`. See `docs/protocol.md`.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes before the payload: the type and the stream id.
pub const HEADER_LEN: usize = 5;

/// Largest payload accepted from a peer. A message larger than this is
/// refused by the WebSocket layer and ends the session (the peer is broken).
pub const MAX_FRAME_PAYLOAD: usize = 1 << 20;

/// Largest Data payload tether sends. Large enough to amortise per-frame
/// work, small enough that one stream cannot monopolise the socket.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;

/// Stream id reserved for session-level frames (keepalive, GoAway).
pub const SESSION_STREAM: u32 = 0;

/// The WebSocket subprotocol that selects protocol v2. A peer that offers
/// nothing, or whose server answers with nothing, speaks v1.
pub const V2_SUBPROTOCOL: &str = "tether.v2";

/// Credit each side of a v2 stream starts with, per direction. A sender may
/// have at most this many unacknowledged Data bytes in flight on one stream.
pub const V2_INITIAL_WINDOW: u32 = 512 * 1024;

/// Protocol version of a session, fixed at the WebSocket handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The original design: no flow control, Close ends both directions.
    V1,
    /// Adds per-stream credit, 0-RTT open, half-close and GoAway.
    V2,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// server → agent: open a stream; payload is the UTF-8 `host:port` to reach.
    Connect = 0x01,
    /// agent → server: the stream is open.
    Connected = 0x02,
    /// Stream bytes.
    Data = 0x03,
    /// The stream failed; payload is a UTF-8 message. Ends the stream.
    Error = 0x04,
    /// The stream is closed in both directions.
    Close = 0x05,
    /// Keepalive request (stream 0).
    Ping = 0x06,
    /// Keepalive answer (stream 0).
    Pong = 0x07,
    /// v2: grants the peer more send credit; payload is a big-endian u32 increment.
    WindowUpdate = 0x08,
    /// v2: the sender accepts no new streams and the session will end; reconnect now.
    GoAway = 0x09,
    /// v2: the sender will send no more Data on this stream (half-close).
    Fin = 0x0a,
    /// v2, server → agent, stream 0: the live tether-server replicas, UTF-8
    /// names separated by commas. Sent only to agents that announced
    /// themselves with an instance id (they hold one session per replica).
    Replicas = 0x0b,
    /// v2, both ways, stream 0: a credentials message (JSON, see
    /// `credentials::Message`): the agent's certificate request, the
    /// signed certificate, a refusal, or a request to renew now.
    Credentials = 0x0c,
}

impl FrameType {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0x01 => Self::Connect,
            0x02 => Self::Connected,
            0x03 => Self::Data,
            0x04 => Self::Error,
            0x05 => Self::Close,
            0x06 => Self::Ping,
            0x07 => Self::Pong,
            0x08 => Self::WindowUpdate,
            0x09 => Self::GoAway,
            0x0a => Self::Fin,
            0x0b => Self::Replicas,
            0x0c => Self::Credentials,
            _ => return None,
        })
    }

    /// Whether a peer speaking `version` may send this type at all.
    pub fn allowed_in(self, version: Version) -> bool {
        match self {
            Self::WindowUpdate | Self::GoAway | Self::Fin | Self::Replicas | Self::Credentials => {
                version == Version::V2
            }
            _ => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameType,
    pub stream: u32,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    TooShort(usize),
    #[error("unknown frame type 0x{kind:02x} on stream {stream}")]
    UnknownType { kind: u8, stream: u32 },
    #[error("frame payload of {0} bytes exceeds the {MAX_FRAME_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("{kind:?} frame has a malformed payload of {len} bytes")]
    BadPayload { kind: FrameType, len: usize },
}

impl Frame {
    pub fn new(kind: FrameType, stream: u32, payload: Bytes) -> Self {
        Self {
            kind,
            stream,
            payload,
        }
    }

    pub fn empty(kind: FrameType, stream: u32) -> Self {
        Self::new(kind, stream, Bytes::new())
    }

    pub fn window_update(stream: u32, increment: u32) -> Self {
        Self::new(
            FrameType::WindowUpdate,
            stream,
            Bytes::copy_from_slice(&increment.to_be_bytes()),
        )
    }

    /// Encodes header and payload into one buffer (one copy of the payload).
    pub fn encode(&self) -> Bytes {
        encode_parts(self.kind, self.stream, &self.payload)
    }

    /// Decodes one WebSocket message. The payload shares the message buffer.
    pub fn decode(message: Bytes) -> Result<Self, FrameError> {
        if message.len() < HEADER_LEN {
            return Err(FrameError::TooShort(message.len()));
        }
        let payload_len = message.len() - HEADER_LEN;
        if payload_len > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLarge(payload_len));
        }
        let stream = u32::from_be_bytes([message[1], message[2], message[3], message[4]]);
        let kind = FrameType::from_byte(message[0]).ok_or(FrameError::UnknownType {
            kind: message[0],
            stream,
        })?;
        let payload = message.slice(HEADER_LEN..);
        if kind == FrameType::WindowUpdate && payload.len() != 4 {
            return Err(FrameError::BadPayload {
                kind,
                len: payload.len(),
            });
        }
        Ok(Self {
            kind,
            stream,
            payload,
        })
    }

    /// The credit carried by a WindowUpdate (validated to be 4 bytes by `decode`).
    pub fn window_increment(&self) -> u32 {
        match self.payload[..] {
            [a, b, c, d] => u32::from_be_bytes([a, b, c, d]),
            _ => 0,
        }
    }

    /// The payload as text, for Connect targets and Error messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// Encodes a frame from borrowed payload bytes, so a writer can frame its
/// buffer without first copying it into a `Bytes`.
pub fn encode_parts(kind: FrameType, stream: u32, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + payload.len());
    buf.put_u8(kind as u8);
    buf.put_u32(stream);
    buf.put_slice(payload);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_type() {
        for byte in 0x01..=0x0c {
            let kind = FrameType::from_byte(byte).expect("known type");
            let payload = if kind == FrameType::WindowUpdate {
                Bytes::from_static(&[0, 0, 1, 0])
            } else {
                Bytes::from_static(b"hello")
            };
            let frame = Frame::new(kind, 0xdead_beef, payload);
            assert_eq!(Frame::decode(frame.encode()), Ok(frame));
        }
    }

    #[test]
    fn wire_layout_is_type_then_big_endian_id() {
        let bytes = Frame::new(FrameType::Data, 258, Bytes::from_static(b"x")).encode();
        assert_eq!(&bytes[..], &[0x03, 0, 0, 1, 2, b'x']);
    }

    #[test]
    fn round_trips_a_64k_payload() {
        let payload: Bytes = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let frame = Frame::new(FrameType::Data, 7, payload);
        let decoded = Frame::decode(frame.encode()).expect("decodes");
        assert_eq!(decoded.payload.len(), 65536);
        assert_eq!(decoded, frame);
    }

    #[test]
    fn header_only_frame_has_empty_payload() {
        let decoded = Frame::decode(Bytes::from_static(&[0x05, 0, 0, 0, 9])).expect("decodes");
        assert_eq!(decoded, Frame::empty(FrameType::Close, 9));
    }

    #[test]
    fn rejects_short_frames() {
        for len in 0..HEADER_LEN {
            let message = Bytes::from(vec![0x03; len]);
            assert_eq!(Frame::decode(message), Err(FrameError::TooShort(len)));
        }
    }

    #[test]
    fn rejects_unknown_types_naming_the_stream() {
        let err = Frame::decode(Bytes::from_static(&[0x7f, 0, 0, 0, 3])).unwrap_err();
        assert_eq!(
            err,
            FrameError::UnknownType {
                kind: 0x7f,
                stream: 3
            }
        );
        assert!(Frame::decode(Bytes::from_static(&[0x00, 0, 0, 0, 3])).is_err());
    }

    #[test]
    fn rejects_oversized_payloads() {
        let message = Bytes::from(vec![0x03; HEADER_LEN + MAX_FRAME_PAYLOAD + 1]);
        assert_eq!(
            Frame::decode(message),
            Err(FrameError::TooLarge(MAX_FRAME_PAYLOAD + 1))
        );
    }

    #[test]
    fn rejects_malformed_window_updates() {
        let err = Frame::decode(Bytes::from_static(&[0x08, 0, 0, 0, 1, 0, 1])).unwrap_err();
        assert!(matches!(err, FrameError::BadPayload { len: 2, .. }));
    }

    #[test]
    fn v2_types_are_not_v1() {
        assert!(!FrameType::WindowUpdate.allowed_in(Version::V1));
        assert!(!FrameType::Fin.allowed_in(Version::V1));
        assert!(!FrameType::GoAway.allowed_in(Version::V1));
        assert!(FrameType::Data.allowed_in(Version::V1));
        assert!(FrameType::Fin.allowed_in(Version::V2));
    }
}
