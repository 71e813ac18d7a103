//! An HTTPS server that behaves like a kube-apiserver where tether cares:
//! it checks the bearer token, answers discovery and `/version` as kubectl
//! expects, streams chunked watch events, serves and swallows large
//! bodies, and accepts SPDY/WebSocket upgrades (then echoes bytes). Used by
//! the tests, `make demo` and the benchmarks; never by production code.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http::{Body, BoxError, empty, full, header_has_token, kube_status, upgrade_protocol};
use crate::listen;
use crate::tls::{ReloadingServerConfig, ServerTlsFiles, TlsError};

/// One request as the backend saw it (the Authorization value is not kept).
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    /// Whether the bearer token was the expected one.
    pub authorized: bool,
}

struct State {
    /// The valid token is whatever this file holds at request time, so a
    /// test rotating the agent's token file rotates the backend's too.
    token_file: PathBuf,
    seen: Mutex<Vec<SeenRequest>>,
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

impl FakeApiServer {
    /// Serves on `listener`; TLS when `tls` is given (as kube-apiserver).
    pub async fn start(
        listener: TcpListener,
        tls: Option<ServerTlsFiles>,
        token_file: PathBuf,
    ) -> Result<Self, TlsError> {
        let addr = listener.local_addr().map_err(|source| TlsError::Read {
            path: "listener".into(),
            source,
        })?;
        let stop = CancellationToken::new();
        let tls = match tls {
            Some(files) => Some(ReloadingServerConfig::load(
                files,
                &[b"http/1.1"],
                Duration::from_secs(3600),
                stop.clone(),
            )?),
            None => None,
        };
        let state = Arc::new(State {
            token_file,
            seen: Mutex::new(Vec::new()),
        });
        let service_state = state.clone();
        let make = move |_conn| {
            let state = service_state.clone();
            hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, request).await) }
            })
        };
        tokio::spawn(listen::serve(
            listener,
            tls,
            make,
            stop.clone(),
            Duration::from_secs(1),
        ));
        Ok(Self { addr, state, stop })
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.state
            .seen
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn json_response(value: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

async fn handle(state: &State, request: Request<Incoming>) -> Response<Body> {
    let expected = std::fs::read_to_string(&state.token_file).unwrap_or_default();
    let presented = crate::http::bearer_token(request.headers());
    let authorized = !expected.trim().is_empty() && presented == Some(expected.trim());
    let mut headers = request.headers().clone();
    headers.remove(header::AUTHORIZATION);
    let path_and_query = request
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |pq| pq.as_str().to_owned());
    if let Ok(mut seen) = state.seen.lock() {
        seen.push(SeenRequest {
            method: request.method().clone(),
            path_and_query: path_and_query.clone(),
            headers: headers.clone(),
            authorized,
        });
    }
    if !authorized {
        return kube_status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    if let Some(protocol) = upgrade_protocol(request.headers()) {
        return upgrade(request, protocol);
    }
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    match (request.method().clone(), path.as_str()) {
        (Method::GET, "/version") => json_response(json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-tether-fake",
            "gitCommit": "0000000", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"
        })),
        (Method::GET, "/api") => json_response(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]
        })),
        (Method::GET, "/apis") => {
            json_response(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}))
        }
        (Method::GET, "/api/v1") => json_response(json!({
            "kind": "APIResourceList", "groupVersion": "v1",
            "resources": [
                {"name": "namespaces", "singularName": "namespace", "namespaced": false, "kind": "Namespace",
                 "verbs": ["get", "list", "watch"], "shortNames": ["ns"]},
                {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
                 "verbs": ["get", "list", "watch"], "shortNames": ["po"]}
            ]
        })),
        (Method::GET, "/api/v1/namespaces") => {
            let items: Vec<_> = ["default", "kube-system", "tether-demo"]
                .iter()
                .map(|name| json!({
                    "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "1",
                                 "creationTimestamp": "2026-01-01T00:00:00Z"},
                    "status": {"phase": "Active"}
                }))
                .collect();
            json_response(json!({
                "kind": "NamespaceList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                "items": items
            }))
        }
        (Method::GET, p) if p.starts_with("/api/v1/namespaces/") && p.ends_with("/pods") => {
            if query_param(&query, "watch").is_some_and(|v| v == "1" || v == "true") {
                let count = query_param(&query, "events").and_then(|v| v.parse().ok());
                let interval = query_param(&query, "intervalMs")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(100);
                watch_stream(count, Duration::from_millis(interval))
            } else {
                json_response(json!({
                    "kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []
                }))
            }
        }
        (Method::GET, "/bytes") => {
            let total = query_param(&query, "n")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1024);
            byte_stream(total)
        }
        (Method::PUT | Method::POST, "/sink") => sink(request).await,
        (_, p) if p.starts_with("/echo") => json_response(json!({
            "method": request.method().as_str(),
            "pathAndQuery": path_and_query,
            "headers": headers.iter().map(|(k, v)| (k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned())).collect::<Vec<_>>(),
        })),
        _ => kube_status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

/// A watch: one JSON event per chunk, `count` of them (or forever).
fn watch_stream(count: Option<u64>, interval: Duration) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    tokio::spawn(async move {
        let mut n: u64 = 0;
        while count.is_none_or(|c| n < c) {
            n += 1;
            let event = json!({"type": "ADDED", "object": {"kind": "Pod", "apiVersion": "v1",
                "metadata": {"name": format!("pod-{n}"), "namespace": "default", "resourceVersion": n.to_string()}}});
            if tx
                .send(Ok(Frame::data(Bytes::from(format!("{event}\n")))))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    });
    let body = StreamBody::new(tokio_stream_from(rx));
    let mut response = Response::new(BodyExt::boxed(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `total` bytes of a repeating pattern, in 64 KiB chunks, streamed.
fn byte_stream(total: u64) -> Response<Body> {
    let chunk: Bytes = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(8);
    tokio::spawn(async move {
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if tx.send(Ok(Frame::data(chunk.slice(..n)))).await.is_err() {
                return;
            }
            left -= n as u64;
        }
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))));
    if let Ok(len) = HeaderValue::from_str(&total.to_string()) {
        response.headers_mut().insert(header::CONTENT_LENGTH, len);
    }
    response
}

async fn sink(request: Request<Incoming>) -> Response<Body> {
    let mut body = request.into_body();
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                    total += data.len() as u64;
                }
            }
            Err(_) => {
                return kube_status(StatusCode::BAD_REQUEST, "BadRequest", "body ended early");
            }
        }
    }
    json_response(json!({"bytes": total, "sha256": hex::encode(hasher.finalize())}))
}

/// Accepts any upgrade (SPDY/3.1, websocket) with 101, then echoes bytes
/// until the client half-closes, then closes.
fn upgrade(mut request: Request<Incoming>, protocol: HeaderValue) -> Response<Body> {
    let on_upgrade = hyper::upgrade::on(&mut request);
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if header_has_token(request.headers(), &header::UPGRADE, "websocket") {
        if let Some(key) = request.headers().get(header::SEC_WEBSOCKET_KEY) {
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            if let Ok(value) = HeaderValue::from_str(&accept) {
                headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
            }
        }
        if let Some(first) = request
            .headers()
            .get(header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| HeaderValue::from_str(v.trim()).ok())
        {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, first);
        }
    }
    headers.insert(header::UPGRADE, protocol);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if io.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = io.shutdown().await;
    });
    response
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
