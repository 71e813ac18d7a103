//! The tunnel's WebSocket handshake on both sides, done over hyper so the
//! negotiated subprotocol (and so the protocol version) is ours to read: a
//! v1 server that ignores the v2 offer must still be accepted.

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;

use crate::http::{Body, empty, header_has_token};
use crate::mux::websocket_config;
use crate::protocol::{V2_SUBPROTOCOL, Version};
use crate::server::peers::{REPLICA_HEADER, REPLICAS_HEADER};

pub type TunnelSocket = WebSocketStream<TokioIo<Upgraded>>;

/// Header the agent sends with its version; the server records it.
pub const AGENT_VERSION_HEADER: &str = "x-tether-agent-version";
/// Header with the agent process's random instance id: an agent that sends
/// it holds one session per server replica and understands `Replicas`.
pub const AGENT_INSTANCE_HEADER: &str = "x-tether-agent-instance";

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("not a WebSocket upgrade request")]
    NotWebSocket,
    #[error("unsupported WebSocket version (13 required)")]
    BadVersion,
    #[error("server answered {0} instead of switching protocols")]
    Refused(StatusCode),
    #[error("replica {0:?} already holds a session of this agent")]
    AlreadyHeld(String),
    #[error("server's Sec-WebSocket-Accept does not match the key sent")]
    BadAccept,
    #[error("server selected unknown subprotocol {0:?}")]
    UnknownSubprotocol(String),
    #[error("HTTP error during the handshake: {0}")]
    Http(#[from] hyper::Error),
    #[error("invalid handshake request: {0}")]
    Request(#[from] http::Error),
}

/// Server side: checks an upgrade request and builds the 101 answer. The
/// caller sends the response, then calls [`server_socket`] on the request.
pub fn accept<B>(request: &Request<B>) -> Result<(Response<Body>, Version), HandshakeError> {
    let headers = request.headers();
    if request.method() != http::Method::GET
        || !header_has_token(headers, &header::CONNECTION, "upgrade")
        || !header_has_token(headers, &header::UPGRADE, "websocket")
    {
        return Err(HandshakeError::NotWebSocket);
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION) != Some(&HeaderValue::from_static("13")) {
        return Err(HandshakeError::BadVersion);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or(HandshakeError::NotWebSocket)?;
    let version = if header_has_token(headers, &header::SEC_WEBSOCKET_PROTOCOL, V2_SUBPROTOCOL) {
        Version::V2
    } else {
        Version::V1
    };
    let mut builder = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        );
    if version == Version::V2 {
        builder = builder.header(header::SEC_WEBSOCKET_PROTOCOL, V2_SUBPROTOCOL);
    }
    Ok((builder.body(empty())?, version))
}

/// Server side: the WebSocket once the 101 has been sent.
pub async fn server_socket<B>(request: Request<B>) -> Result<TunnelSocket, hyper::Error> {
    let upgraded = hyper::upgrade::on(request).await?;
    Ok(WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        WsRole::Server,
        Some(websocket_config()),
    )
    .await)
}

/// What the handshake says about the server replicas (high availability).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaInfo {
    /// The replica reached; `None` from a server without replica support.
    pub replica: Option<String>,
    /// Every live replica, as that replica sees them.
    pub replicas: Vec<String>,
}

/// Client side: performs the handshake on an established (TLS) connection.
/// `offer_v2` false makes the agent a pure v1 peer; `instance` (this agent
/// process's id) asks for one session per replica.
pub async fn connect<IO>(
    io: IO,
    host: &str,
    path: &str,
    bearer: &str,
    offer_v2: bool,
    instance: Option<&str>,
) -> Result<(TunnelSocket, Version, ReplicaInfo), HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(io)).await?;
    let driver = tokio::spawn(connection.with_upgrades());

    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    let mut builder = Request::builder()
        .method(http::Method::GET)
        .uri(path)
        .header(header::HOST, host)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, &key)
        .header(header::AUTHORIZATION, format!("Bearer {bearer}"))
        .header(AGENT_VERSION_HEADER, env!("CARGO_PKG_VERSION"));
    if offer_v2 {
        builder = builder.header(header::SEC_WEBSOCKET_PROTOCOL, V2_SUBPROTOCOL);
    }
    if let Some(instance) = instance {
        builder = builder.header(AGENT_INSTANCE_HEADER, instance);
    }
    let response = sender.send_request(builder.body(empty())?).await;
    let response = match response {
        Ok(response) => response,
        Err(err) => {
            driver.abort();
            return Err(err.into());
        }
    };
    let header_text = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let replica = header_text(REPLICA_HEADER);
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        driver.abort();
        return Err(match (response.status(), replica) {
            (StatusCode::CONFLICT, Some(replica)) => HandshakeError::AlreadyHeld(replica),
            (status, _) => HandshakeError::Refused(status),
        });
    }
    let info = ReplicaInfo {
        replica,
        replicas: header_text(REPLICAS_HEADER)
            .map(|list| {
                list.split(',')
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
    };
    let expected = derive_accept_key(key.as_bytes());
    if response
        .headers()
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .map(|v| v.as_bytes())
        != Some(expected.as_bytes())
    {
        return Err(HandshakeError::BadAccept);
    }
    let version = match response.headers().get(header::SEC_WEBSOCKET_PROTOCOL) {
        None => Version::V1,
        Some(value) if offer_v2 && value == V2_SUBPROTOCOL => Version::V2,
        Some(value) => {
            return Err(HandshakeError::UnknownSubprotocol(
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            ));
        }
    };
    let upgraded = hyper::upgrade::on(response).await?;
    let socket = WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        WsRole::Client,
        Some(websocket_config()),
    )
    .await;
    Ok((socket, version, info))
}
