//! Drivers for the fuzz targets in `fuzz/` and for the test that replays
//! their corpus in CI: one piece of code per kind of input, so the
//! regression test checks exactly what the fuzzer explored. Each driver
//! panics when an invariant breaks; that is what the fuzzer reports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;

use crate::clusters::{Clusters, is_dns_label};
use crate::mux::{Role, Session, SessionConfig, websocket_config};
use crate::protocol::Version;

/// How long (in the runtime's clock; the callers pause it, so this costs no
/// wall time) the session may take to notice that its peer hung up.
const CLOSE_DEADLINE: Duration = Duration::from_secs(120);

/// One hostile peer's side of a tunnel, decoded from fuzz input.
///
/// Byte 0 picks the local session: bit 0 = role (0 opener, i.e. the server;
/// 1 acceptor, i.e. the agent), bit 1 = protocol (0 v1, 1 v2). Then records
/// of `[op:1][len:2 big-endian][len bytes]`; `op % 4`:
/// 0 = a binary message from the peer (a frame, well-formed or not),
/// 1 = a text message from the peer,
/// 2 = the local side opens a stream and writes the bytes (opener only),
/// 3 = time passes: the first byte, in seconds.
///
/// Invariants: no panic; once the peer hangs up the session closes within
/// [`CLOSE_DEADLINE`]; after it closed, no stream stays registered and no
/// received byte stays buffered.
pub async fn tunnel_session(input: &[u8]) {
    let Some((&mode, mut rest)) = input.split_first() else {
        return;
    };
    let role = if mode & 1 == 0 {
        Role::Opener
    } else {
        Role::Acceptor
    };
    let version = if mode & 2 == 0 {
        Version::V1
    } else {
        Version::V2
    };
    let (local, remote) = tokio::io::duplex(64 * 1024);
    let config = Some(websocket_config());
    let local_ws = WebSocketStream::from_raw_socket(local, WsRole::Server, config).await;
    let mut peer = WebSocketStream::from_raw_socket(remote, WsRole::Client, config).await;
    let mut cfg = SessionConfig::new(version, role, "fuzz");
    cfg.max_streams = 16;
    let (session, incoming) = Session::start(local_ws, cfg);
    if let Some(mut incoming) = incoming {
        // The agent's side: accept every stream, read a little, answer, close.
        tokio::spawn(async move {
            while let Some(stream) = incoming.recv().await {
                tokio::spawn(async move {
                    let Ok(mut stream) = stream.accept().await else {
                        return;
                    };
                    let mut buf = [0u8; 256];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
                    let _ = stream.shutdown().await;
                });
            }
        });
    }
    while rest.len() >= 3 {
        let op = rest[0];
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let body = &rest[3..3 + len];
        rest = &rest[3 + len..];
        match op % 4 {
            0 => {
                let message = Message::Binary(Bytes::copy_from_slice(body));
                if peer.send(message).await.is_err() {
                    break;
                }
            }
            1 => {
                let text = String::from_utf8_lossy(body).into_owned();
                if peer.send(Message::text(text)).await.is_err() {
                    break;
                }
            }
            2 if role == Role::Opener => {
                let session = session.clone();
                let body = body.to_vec();
                tokio::spawn(async move {
                    if let Ok(mut stream) = session.open("target:443").await {
                        let _ = stream.write_all(&body).await;
                        let mut buf = [0u8; 256];
                        let _ = stream.read(&mut buf).await;
                    }
                });
            }
            2 => {}
            _ => {
                let seconds = body.first().copied().unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(u64::from(seconds))).await;
            }
        }
        tokio::task::yield_now().await;
    }
    drop(peer);
    assert!(
        tokio::time::timeout(CLOSE_DEADLINE, session.closed())
            .await
            .is_ok(),
        "the session outlived its peer by {CLOSE_DEADLINE:?}"
    );
    // Stream handles held by local tasks see the failure and drop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(session.open_streams(), 0, "streams left after close");
    assert_eq!(session.buffered_bytes(), 0, "bytes left after close");
}

/// tether-server's clusters configuration (file or Secret), as JSON.
///
/// Invariants: no panic; whatever parses has valid, unique ids, each found
/// by `get`; parsing is deterministic.
pub fn clusters_config(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(clusters) = Clusters::parse(text) else {
        return;
    };
    for cluster in clusters.iter() {
        assert!(is_dns_label(&cluster.id), "accepted id {:?}", cluster.id);
        let found = clusters.get(&cluster.id).map(|c| c.token_sha256());
        assert_eq!(found, Some(cluster.token_sha256()), "ids are not unique");
    }
    assert_eq!(
        Clusters::parse(text).ok(),
        Some(clusters),
        "not deterministic"
    );
}

/// The corpus a fuzz target kept, `fuzz/corpus/<target>/`, as (path, bytes)
/// in file-name order, for the tests that replay it.
pub fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let bytes = std::fs::read(&path).expect("corpus file");
            (path, bytes)
        })
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} is empty", dir.display());
    inputs
}
