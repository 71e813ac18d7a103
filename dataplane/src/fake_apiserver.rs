//! An HTTPS server that behaves like a kube-apiserver where tether cares:
//! it checks the bearer token, answers discovery and `/version` as kubectl
//! expects, streams chunked watch events, serves and swallows large
//! bodies, and accepts SPDY/WebSocket upgrades (then echoes bytes). Used by
//! the tests and the benchmarks; never by production code.

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
    /// The client's address: requests on one connection share it.
    pub remote: SocketAddr,
}

struct State {
    /// The valid token is whatever this file holds at request time, so a
    /// test rotating the agent's token file rotates the backend's too.
    token_file: PathBuf,
    seen: Mutex<Vec<SeenRequest>>,
    /// Tokens TokenReviews authenticate: (token, user, may get /metrics).
    reviewed: Mutex<Vec<(String, String, bool)>>,
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
            reviewed: Mutex::new(Vec::new()),
        });
        let service_state = state.clone();
        let make = move |conn: Arc<listen::ConnInfo>| {
            let state = service_state.clone();
            hyper::service::service_fn(move |request| {
                let state = state.clone();
                let remote = conn.remote;
                async move { Ok::<_, Infallible>(handle(&state, remote, request).await) }
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

    /// A kube client of this double, started without TLS, authenticating
    /// with the token its file holds (as a binary calling its API server).
    pub async fn kube_client(&self) -> Result<kube::Client, BoxError> {
        let token = std::fs::read_to_string(&self.state.token_file)?;
        let kubeconfig = serde_json::json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "double", "cluster": {"server": format!("http://{}", self.addr)}}],
            "users": [{"name": "double", "user": {"token": token.trim()}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "double"}}],
            "current-context": "double",
        });
        let kubeconfig: kube::config::Kubeconfig = serde_json::from_value(kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// From now on a TokenReview of `token` authenticates `user`, and a
    /// SubjectAccessReview lets that user `get /metrics` when `may_read`.
    pub fn review_token(&self, token: &str, user: &str, may_read: bool) {
        if let Ok(mut reviewed) = self.state.reviewed.lock() {
            reviewed.push((token.to_owned(), user.to_owned(), may_read));
        }
    }
}

/// TokenReview and SubjectAccessReview, for callers of a metrics port.
async fn review(state: &State, path: &str, request: Request<Incoming>) -> Response<Body> {
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return kube_status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body"),
    };
    let Ok(mut object) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return kube_status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
    };
    let reviewed = state.reviewed.lock().map(|r| r.clone()).unwrap_or_default();
    object["status"] = if path.ends_with("/tokenreviews") {
        let token = object["spec"]["token"].as_str().unwrap_or_default();
        match reviewed.iter().find(|(t, _, _)| t == token) {
            Some((_, user, _)) => json!({"authenticated": true,
                "user": {"username": user, "groups": ["system:authenticated"]}}),
            None => json!({"authenticated": false}),
        }
    } else {
        let spec = &object["spec"];
        let asks_metrics =
            spec["nonResourceAttributes"] == json!({"path": "/metrics", "verb": "get"});
        let allowed = asks_metrics
            && reviewed
                .iter()
                .any(|(_, user, may_read)| *may_read && spec["user"] == user.as_str());
        json!({"allowed": allowed})
    };
    let mut response = json_response(object);
    *response.status_mut() = StatusCode::CREATED;
    response
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

async fn handle(state: &State, remote: SocketAddr, request: Request<Incoming>) -> Response<Body> {
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
            remote,
        });
    }
    if !authorized {
        return kube_status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    if request.method() == Method::POST
        && matches!(
            path.as_str(),
            "/apis/authentication.k8s.io/v1/tokenreviews"
                | "/apis/authorization.k8s.io/v1/subjectaccessreviews"
        )
    {
        return review(state, &path, request).await;
    }
    let pod = pod_path(&path);
    if let Some(protocol) = upgrade_protocol(request.headers()) {
        let offers_v5 = header_has_token(
            request.headers(),
            &header::SEC_WEBSOCKET_PROTOCOL,
            EXEC_PROTOCOL,
        );
        if matches!(pod, Some((_, _, Some("exec")))) && offers_v5 {
            return exec(request);
        }
        return upgrade(request, protocol);
    }
    match pod {
        Some((namespace, name, None)) if request.method() == Method::GET => {
            return json_response(pod_object(namespace, name));
        }
        Some((_, name, Some("log"))) if request.method() == Method::GET => {
            let follow = query_param(&query, "follow").is_some_and(|v| v == "true");
            return log_stream(name, if follow { None } else { Some(3) });
        }
        _ => {}
    }
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

const EXEC_PROTOCOL: &str = "v5.channel.k8s.io";

/// `/api/v1/namespaces/{ns}/pods/{name}[/{subresource}]`.
fn pod_path(path: &str) -> Option<(&str, &str, Option<&str>)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let mut parts = rest.split('/');
    let namespace = parts.next()?;
    if parts.next()? != "pods" {
        return None;
    }
    let name = parts.next().filter(|n| !n.is_empty())?;
    let sub = parts.next();
    parts.next().is_none().then_some((namespace, name, sub))
}

fn pod_object(namespace: &str, name: &str) -> serde_json::Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                     "resourceVersion": "1", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
        "status": {"phase": "Running", "containerStatuses": [{"name": "main", "ready": true,
            "restartCount": 0, "image": "busybox", "imageID": "", "state": {"running": {}}}]}
    })
}

/// Container logs: `count` lines, or one line every 50 ms while followed.
fn log_stream(pod: &str, count: Option<u64>) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    let pod = pod.to_owned();
    tokio::spawn(async move {
        let mut n: u64 = 0;
        while count.is_none_or(|c| n < c) {
            n += 1;
            if tx
                .send(Ok(Frame::data(Bytes::from(format!(
                    "{pod} log line {n}\n"
                )))))
                .await
                .is_err()
            {
                return;
            }
            if count.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    Response::new(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))))
}

/// `kubectl exec -i ... -- cat` over WebSocket (`v5.channel.k8s.io`): stdin
/// (channel 0) comes back on stdout (channel 1); when the client closes
/// stdin (255, 0) the "process" exits with a Success status (channel 3).
fn exec(mut request: Request<Incoming>) -> Response<Body> {
    use tokio_tungstenite::tungstenite::Message;
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let (mut sink, mut source) = futures_util::StreamExt::split(ws);
        use futures_util::SinkExt;
        while let Some(Ok(message)) = futures_util::StreamExt::next(&mut source).await {
            let Message::Binary(data) = message else {
                continue;
            };
            match data.first() {
                Some(0) => {
                    let mut out = vec![1u8];
                    out.extend_from_slice(&data[1..]);
                    if sink.send(Message::Binary(out.into())).await.is_err() {
                        return;
                    }
                }
                Some(255) if data.get(1) == Some(&0) => break,
                _ => {}
            }
        }
        let mut status = vec![3u8];
        status.extend_from_slice(br#"{"metadata":{},"status":"Success"}"#);
        let _ = sink.send(Message::Binary(status.into())).await;
        // client-go reads the status channel to EOF, which only a normal
        // (1000) close gives.
        let normal = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "".into(),
        };
        let _ = sink.send(Message::Close(Some(normal))).await;
    });
    switching_protocols(
        request.headers(),
        HeaderValue::from_static("websocket"),
        Some(EXEC_PROTOCOL),
    )
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
/// The pattern `/bytes` repeats, made once: building it per request showed
/// as a sixth of the CPU of the small-request benchmark.
static BYTE_PATTERN: std::sync::LazyLock<Bytes> =
    std::sync::LazyLock::new(|| (0..65536u32).map(|i| (i % 251) as u8).collect());

fn byte_stream(total: u64) -> Response<Body> {
    let chunk = BYTE_PATTERN.clone();
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

/// The 101 answer to an upgrade: `Sec-WebSocket-Accept` for WebSocket, and
/// the chosen subprotocol (the first offered, unless `subprotocol` says).
fn switching_protocols(
    headers: &HeaderMap,
    protocol: HeaderValue,
    subprotocol: Option<&'static str>,
) -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let answer = response.headers_mut();
    answer.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if header_has_token(headers, &header::UPGRADE, "websocket") {
        if let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) {
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            if let Ok(value) = HeaderValue::from_str(&accept) {
                answer.insert(header::SEC_WEBSOCKET_ACCEPT, value);
            }
        }
        let chosen = match subprotocol {
            Some(chosen) => Some(HeaderValue::from_static(chosen)),
            None => headers
                .get(header::SEC_WEBSOCKET_PROTOCOL)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .and_then(|v| HeaderValue::from_str(v.trim()).ok()),
        };
        if let Some(chosen) = chosen {
            answer.insert(header::SEC_WEBSOCKET_PROTOCOL, chosen);
        }
    }
    answer.insert(header::UPGRADE, protocol);
    response
}

/// Accepts any upgrade (SPDY/3.1, websocket) with 101, then echoes bytes
/// until the client half-closes, then closes.
fn upgrade(mut request: Request<Incoming>, protocol: HeaderValue) -> Response<Body> {
    let on_upgrade = hyper::upgrade::on(&mut request);
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
    switching_protocols(request.headers(), protocol, None)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
