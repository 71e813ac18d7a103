//! The multiplexer against itself and against a raw, hostile WebSocket peer.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tether::mux::{IncomingStream, OpenError, Role, Session, SessionConfig};
use tether::protocol::{Frame, FrameType, MAX_FRAME_PAYLOAD, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc::Receiver;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;

const WAIT: Duration = Duration::from_secs(10);

async fn sockets() -> (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let config = Some(tether::mux::websocket_config());
    let client = WebSocketStream::from_raw_socket(a, WsRole::Client, config).await;
    let server = WebSocketStream::from_raw_socket(b, WsRole::Server, config).await;
    (client, server)
}

fn config(version: Version, role: Role) -> SessionConfig {
    SessionConfig::new(version, role, format!("{role:?}"))
}

/// A server-side (opener) and agent-side (acceptor) session joined in memory.
async fn pair_with(
    version: Version,
    tune: impl Fn(&mut SessionConfig),
) -> (Session, Session, Receiver<IncomingStream>) {
    let (client, server) = sockets().await;
    let mut opener = config(version, Role::Opener);
    let mut acceptor = config(version, Role::Acceptor);
    tune(&mut opener);
    tune(&mut acceptor);
    let (server_session, _) = Session::start(server, opener);
    let (agent_session, incoming) = Session::start(client, acceptor);
    (
        server_session,
        agent_session,
        incoming.expect("acceptor gets incoming streams"),
    )
}

async fn pair(version: Version) -> (Session, Session, Receiver<IncomingStream>) {
    pair_with(version, |_| {}).await
}

/// Accepts every stream and echoes its bytes, half-closing when the peer does.
fn spawn_echo(mut incoming: Receiver<IncomingStream>) {
    tokio::spawn(async move {
        while let Some(stream) = incoming.recv().await {
            tokio::spawn(async move {
                let Ok(stream) = stream.accept().await else {
                    return;
                };
                let (mut reader, mut writer) = tokio::io::split(stream);
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            });
        }
    });
}

/// Sends `payload` through an echoing stream and returns what came back.
/// v2 half-closes and expects EOF; v1 has no half-close, so it reads the
/// payload's length and then closes.
async fn echo_round_trip(session: &Session, payload: &[u8]) -> Vec<u8> {
    let stream = session.open("target:443").await.expect("open");
    let (mut reader, mut writer) = tokio::io::split(stream);
    let data = payload.to_vec();
    let half_close = session.version() == Version::V2;
    let writing = tokio::spawn(async move {
        writer.write_all(&data).await.expect("write");
        if half_close {
            writer.shutdown().await.expect("shutdown");
        }
        writer
    });
    let mut received = vec![0u8; payload.len()];
    tokio::time::timeout(WAIT, reader.read_exact(&mut received))
        .await
        .expect("echo in time")
        .expect("read");
    if half_close {
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, reader.read_to_end(&mut rest))
            .await
            .expect("EOF in time")
            .expect("clean EOF after half-close");
        assert!(rest.is_empty(), "nothing after the echo");
    }
    drop(writing.await);
    received
}

#[tokio::test]
async fn dial_and_pipe_both_versions() {
    for version in [Version::V1, Version::V2] {
        let (server, _agent, incoming) = pair(version).await;
        let mut incoming = incoming;
        let opener = tokio::spawn({
            let server = server.clone();
            async move {
                let mut stream = server
                    .open("kubernetes.default.svc:443")
                    .await
                    .expect("open");
                stream.write_all(b"ping").await.expect("write");
                let mut answer = [0u8; 4];
                stream.read_exact(&mut answer).await.expect("read");
                answer
            }
        });
        let accepted = tokio::time::timeout(WAIT, incoming.recv())
            .await
            .expect("in time")
            .expect("stream");
        assert_eq!(accepted.target(), "kubernetes.default.svc:443");
        let mut stream = accepted.accept().await.expect("accept");
        let mut got = [0u8; 4];
        stream.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");
        stream.write_all(b"pong").await.expect("write");
        assert_eq!(&opener.await.expect("task"), b"pong", "{version:?}");
    }
}

#[tokio::test]
async fn large_payloads_arrive_intact_in_both_versions() {
    for version in [Version::V1, Version::V2] {
        let (server, _agent, incoming) = pair(version).await;
        spawn_echo(incoming);
        // Larger than one frame, one v2 window and the v1 buffer.
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let received = echo_round_trip(&server, &payload).await;
        assert_eq!(received.len(), payload.len(), "{version:?}");
        assert!(received == payload, "{version:?}: bytes differ");
    }
}

#[tokio::test]
async fn many_concurrent_streams_each_get_their_own_bytes() {
    let (server, _agent, incoming) = pair(Version::V2).await;
    spawn_echo(incoming);
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let payload: Vec<u8> = format!("stream-{i}-").repeat(500 + i as usize).into_bytes();
            let received = echo_round_trip(&server, &payload).await;
            assert!(received == payload, "stream {i} got someone else's bytes");
        }));
    }
    for task in tasks {
        task.await.expect("stream task");
    }
    assert_eq!(server.open_streams(), 0, "every stream was released");
}

#[tokio::test]
async fn max_streams_gives_a_clear_error_on_both_sides() {
    let (server, _agent, mut incoming) = pair_with(Version::V1, |c| c.max_streams = 2).await;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(stream) = incoming.recv().await {
            held.push(stream.accept().await.expect("accept"));
        }
    });
    let _a = server.open("t:1").await.expect("first");
    let _b = server.open("t:1").await.expect("second");
    match server.open("t:1").await {
        Err(OpenError::TooManyStreams(2)) => {}
        other => panic!("expected TooManyStreams, got {other:?}"),
    }

    // The agent enforces its own limit even if the server's is higher.
    let (server, _agent, mut incoming) = pair_with(Version::V1, |c| {
        c.max_streams = if c.role == Role::Opener { 10 } else { 1 };
    })
    .await;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(stream) = incoming.recv().await {
            held.push(stream.accept().await.expect("accept"));
        }
    });
    let _a = server.open("t:1").await.expect("first");
    match server.open("t:1").await {
        Err(OpenError::Refused(message)) => {
            assert!(message.contains("max connections"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn refused_streams_report_the_agents_reason() {
    for version in [Version::V1, Version::V2] {
        let (server, _agent, mut incoming) = pair(version).await;
        tokio::spawn(async move {
            while let Some(stream) = incoming.recv().await {
                stream.refuse("target not allowed");
            }
        });
        match server.open("evil:22").await {
            Err(OpenError::Refused(message)) => {
                assert_eq!(version, Version::V1);
                assert_eq!(message, "target not allowed");
            }
            Ok(mut stream) => {
                // v2 opens without a round trip; the refusal arrives as a reset.
                assert_eq!(version, Version::V2);
                let mut buf = [0u8; 1];
                let err = tokio::time::timeout(WAIT, stream.read(&mut buf))
                    .await
                    .expect("in time")
                    .expect_err("reset");
                assert!(err.to_string().contains("target not allowed"), "{err}");
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
        assert_eq!(server.protocol_errors(), 0);
    }
}

#[tokio::test]
async fn keepalive_answers_pings_and_detects_a_silent_peer() {
    let fast = |c: &mut SessionConfig| {
        c.keepalive_interval = Duration::from_millis(50);
        c.keepalive_timeout = Duration::from_millis(400);
    };
    let (server, agent, _incoming) = pair_with(Version::V2, fast).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !server.is_closed() && !agent.is_closed(),
        "pings keep a healthy session up"
    );

    // A raw peer that never answers anything.
    let (client, server_socket) = sockets().await;
    let mut cfg = config(Version::V2, Role::Opener);
    fast(&mut cfg);
    let (session, _) = Session::start(server_socket, cfg);
    let (_sink, mut source) = client.split();
    let mut saw_ping = false;
    let closed = tokio::time::timeout(WAIT, async {
        while let Some(Ok(message)) = source.next().await {
            if let Message::Binary(bytes) = message {
                saw_ping |= Frame::decode(bytes).is_ok_and(|f| f.kind == FrameType::Ping);
            }
        }
    });
    // Reading only (never writing) must not count as liveness.
    let _ = tokio::time::timeout(Duration::from_millis(800), closed).await;
    assert!(saw_ping, "session pings its peer");
    assert!(session.is_closed(), "silent peer detected");
    assert!(
        session
            .close_reason()
            .unwrap_or_default()
            .contains("silent")
    );
}

#[tokio::test]
async fn answers_pings_from_a_v1_peer() {
    let (client, server_socket) = sockets().await;
    let (_session, _) = Session::start(server_socket, config(Version::V1, Role::Opener));
    let (mut sink, mut source) = client.split();
    sink.send(Message::Binary(Frame::empty(FrameType::Ping, 0).encode()))
        .await
        .expect("send");
    let pong = tokio::time::timeout(WAIT, async {
        while let Some(Ok(message)) = source.next().await {
            if let Message::Binary(bytes) = message
                && let Ok(frame) = Frame::decode(bytes)
                && frame.kind == FrameType::Pong
            {
                return frame;
            }
        }
        panic!("no pong");
    })
    .await
    .expect("in time");
    assert_eq!(pong.stream, 0);
}

/// A hostile agent: garbage of every kind must be logged and survived,
/// and must not disturb a healthy stream on the same session.
#[tokio::test]
async fn survives_malformed_frames_without_disturbing_other_streams() {
    let (client, server_socket) = sockets().await;
    let (session, _) = Session::start(server_socket, config(Version::V1, Role::Opener));
    let (mut sink, mut source) = client.split();

    // Open a real stream first; the raw peer plays a v1 agent for it.
    let opener = tokio::spawn({
        let session = session.clone();
        async move { session.open("api:443").await }
    });
    let connect = loop {
        let Some(Ok(Message::Binary(bytes))) = source.next().await else {
            panic!("closed")
        };
        let frame = Frame::decode(bytes).expect("valid frame from tether");
        if frame.kind == FrameType::Connect {
            break frame;
        }
    };
    let id = connect.stream;
    sink.send(Message::Binary(
        Frame::empty(FrameType::Connected, id).encode(),
    ))
    .await
    .expect("send");
    let mut stream = opener.await.expect("task").expect("opened");

    let garbage: Vec<Message> = vec![
        Message::Binary(Bytes::from_static(&[])),
        Message::Binary(Bytes::from_static(&[0x03, 0, 0])),
        Message::Binary(Bytes::from_static(&[0x7f, 0, 0, 0, 99])),
        Message::Text("hello".into()),
        Message::Binary(Frame::new(FrameType::Data, 4242, Bytes::from_static(b"nobody")).encode()),
        Message::Binary(Frame::empty(FrameType::Connected, id).encode()),
        Message::Binary(Frame::empty(FrameType::Close, 777).encode()),
        Message::Binary(Frame::empty(FrameType::WindowUpdate, id).encode()),
        Message::Binary(Frame::new(FrameType::Connect, 5, Bytes::from_static(b"x:1")).encode()),
        Message::Binary(Frame::empty(FrameType::Connected, 9999).encode()),
    ];
    for message in garbage {
        sink.send(message).await.expect("send garbage");
    }
    // Still alive: data on the good stream flows.
    sink.send(Message::Binary(
        Frame::new(FrameType::Data, id, Bytes::from_static(b"ok")).encode(),
    ))
    .await
    .expect("send");
    let mut buf = [0u8; 2];
    let read = tokio::time::timeout(WAIT, stream.read_exact(&mut buf))
        .await
        .expect("in time");
    // The duplicate Connected and the v2-only frame reset this stream
    // (protocol errors on it), which is the specified outcome; other
    // garbage must not have closed the session.
    assert!(read.is_err() || &buf == b"ok");
    assert!(
        !session.is_closed(),
        "session survives: {:?}",
        session.close_reason()
    );
    assert!(
        session.protocol_errors() >= 5,
        "errors counted: {}",
        session.protocol_errors()
    );

    // A peer that keeps sending garbage is eventually cut off.
    for _ in 0..100 {
        if sink
            .send(Message::Binary(Bytes::from_static(&[1, 2])))
            .await
            .is_err()
        {
            break;
        }
    }
    tokio::time::timeout(WAIT, session.closed())
        .await
        .expect("broken peer disconnected");
    assert!(
        session
            .close_reason()
            .unwrap_or_default()
            .contains("malformed")
    );
}

#[tokio::test]
async fn oversized_messages_end_the_session_not_the_process() {
    let (client, server_socket) = sockets().await;
    let (session, _) = Session::start(server_socket, config(Version::V2, Role::Opener));
    let (mut sink, _source) = client.split();
    let huge = vec![0x03u8; MAX_FRAME_PAYLOAD + 64];
    let _ = sink.send(Message::Binary(Bytes::from(huge))).await;
    tokio::time::timeout(WAIT, session.closed())
        .await
        .expect("closed");
    assert!(
        session
            .close_reason()
            .unwrap_or_default()
            .contains("read failed")
    );
}

#[tokio::test]
async fn duplicate_connect_resets_the_stream_on_the_agent() {
    let (client, server_socket) = sockets().await;
    let (agent, incoming) = Session::start(client, config(Version::V1, Role::Acceptor));
    let mut incoming = incoming.expect("incoming");
    let (mut sink, mut source) = server_socket.split();
    let connect = Frame::new(FrameType::Connect, 1, Bytes::from_static(b"api:443")).encode();
    sink.send(Message::Binary(connect.clone()))
        .await
        .expect("send");
    let first = incoming.recv().await.expect("first");
    let mut stream = first.accept().await.expect("accept");
    sink.send(Message::Binary(connect))
        .await
        .expect("send duplicate");
    let mut buf = [0u8; 1];
    let err = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .expect("in time")
        .expect_err("reset");
    assert!(err.to_string().contains("duplicate"), "{err}");
    // The server is told with an Error frame for that id.
    let error = tokio::time::timeout(WAIT, async {
        while let Some(Ok(Message::Binary(bytes))) = source.next().await {
            let frame = Frame::decode(bytes).expect("valid");
            if frame.kind == FrameType::Error {
                return frame;
            }
        }
        panic!("no error frame")
    })
    .await
    .expect("in time");
    assert_eq!(error.stream, 1);
    assert!(!agent.is_closed());
}

#[tokio::test]
async fn a_session_never_accepts_connect_from_an_agent() {
    let (client, server_socket) = sockets().await;
    let (server, _) = Session::start(server_socket, config(Version::V2, Role::Opener));
    let (mut sink, mut source) = client.split();
    sink.send(Message::Binary(
        Frame::new(FrameType::Connect, 1, Bytes::from_static(b"db:5432")).encode(),
    ))
    .await
    .expect("send");
    let error = tokio::time::timeout(WAIT, async {
        while let Some(Ok(Message::Binary(bytes))) = source.next().await {
            let frame = Frame::decode(bytes).expect("valid");
            if frame.kind == FrameType::Error {
                return frame;
            }
        }
        panic!("no error frame")
    })
    .await
    .expect("in time");
    assert_eq!(error.stream, 1);
    assert_eq!(server.open_streams(), 0);
}

#[tokio::test]
async fn dropping_a_stream_closes_it_on_the_other_side() {
    for version in [Version::V1, Version::V2] {
        let (server, agent, mut incoming) = pair(version).await;
        let accepting = async {
            incoming
                .recv()
                .await
                .expect("incoming")
                .accept()
                .await
                .expect("accept")
        };
        let (stream, accepted) = tokio::join!(server.open("t:1"), accepting);
        drop(stream.expect("opened"));
        let mut accepted = accepted;
        let mut buf = Vec::new();
        let result = tokio::time::timeout(WAIT, accepted.read_to_end(&mut buf))
            .await
            .expect("in time");
        assert!(
            result.is_ok(),
            "{version:?}: clean EOF after Close: {result:?}"
        );
        drop(accepted);
        tokio::time::timeout(WAIT, async {
            while server.open_streams() + agent.open_streams() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("both sides released the stream");
    }
}

#[tokio::test]
async fn closing_the_session_fails_every_stream() {
    let (server, _agent, mut incoming) = pair(Version::V2).await;
    let mut stream = server.open("t:1").await.expect("open");
    let _held = incoming
        .recv()
        .await
        .expect("incoming")
        .accept()
        .await
        .expect("accept");
    server.close("test says so");
    let mut buf = [0u8; 1];
    let err = stream.read(&mut buf).await.expect_err("fails");
    assert!(err.to_string().contains("test says so"), "{err}");
    assert!(matches!(server.open("t:1").await, Err(OpenError::Closed)));
}

#[tokio::test]
async fn a_peer_that_stops_reading_is_cut_off_by_the_write_deadline() {
    let (client, server_socket) = sockets().await;
    let mut cfg = config(Version::V2, Role::Opener);
    cfg.write_timeout = Duration::from_millis(300);
    let (session, _) = Session::start(server_socket, cfg);
    // The peer holds the socket open but never reads from it.
    let _peer = client;
    let mut writers = Vec::new();
    for _ in 0..16 {
        // 0-RTT: each stream may send a full window before any answer; 16
        // windows (8 MiB) overflow the send queue and the peer's buffers, and
        // the second window waits for credit that never comes.
        let mut stream = session.open("t:1").await.expect("open");
        writers.push(tokio::spawn(async move {
            let chunk = vec![0u8; 2 * tether::protocol::V2_INITIAL_WINDOW as usize];
            stream.write_all(&chunk).await
        }));
    }
    tokio::time::timeout(WAIT, session.closed())
        .await
        .expect("dead peer detected");
    let reason = session.close_reason().unwrap_or_default();
    assert!(reason.contains("stalled"), "{reason}");
    // Writes that fit in the send queue finished before the stall (as
    // writes into a TCP buffer do); the ones still waiting must fail, not hang.
    let mut failed = 0;
    for writer in writers {
        let result = tokio::time::timeout(WAIT, writer)
            .await
            .expect("writer released")
            .expect("task");
        failed += usize::from(result.is_err());
    }
    assert!(
        failed > 0,
        "writers blocked on the dead socket got an error"
    );
}
