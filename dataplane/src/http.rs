//! HTTP pieces both sides share: bodies, error responses, header hygiene.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// `body`, adding the length of each data frame to `counter` as it passes
/// (bytes through a tunnel, counted without buffering).
pub fn counted<B>(
    body: B,
    counter: prometheus::IntCounter,
) -> http_body_util::combinators::MapFrame<
    B,
    impl FnMut(hyper::body::Frame<Bytes>) -> hyper::body::Frame<Bytes>,
>
where
    B: hyper::body::Body<Data = Bytes>,
{
    body.map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            counter.inc_by(data.len() as u64);
        }
        frame
    })
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = Response::new(full(format!("{message}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// An error as a Kubernetes `Status` object, which kubectl and client-go
/// print as a readable message instead of a decoding failure.
pub fn kube_status(status: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": status.as_u16(),
    });
    let mut response = Response::new(full(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Whether a comma-separated header (such as `Connection`) lists `token`,
/// in any case and position: `keep-alive, Upgrade` lists `upgrade`.
pub fn header_has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

/// The protocol asked for, when the request is an HTTP/1.1 upgrade
/// (`Connection: upgrade` plus an `Upgrade` header).
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    if header_has_token(headers, &header::CONNECTION, "upgrade") {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those the
/// `Connection` header names. An upgrade is carried again by the caller.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Removes every header that carries a caller's identity or credentials:
/// `Authorization`, `Proxy-Authorization`, the front-proxy `X-Remote-*`
/// headers, and (unless `keep_impersonation`) `Impersonate-*`.
pub fn strip_credentials(headers: &mut HeaderMap, keep_impersonation: bool) {
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::PROXY_AUTHORIZATION);
    let identity: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            name.starts_with("x-remote-")
                || (!keep_impersonation && name.starts_with("impersonate-"))
        })
        .cloned()
        .collect();
    for name in identity {
        headers.remove(name);
    }
}

/// Sets `Connection: Upgrade` and `Upgrade` after hop-by-hop stripping.
pub fn restore_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// An error with its whole cause chain (`a: b: c`): the bottom cause is
/// often the one that says why (a stream reset, a refused certificate).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The token of an `Authorization: Bearer` header.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn finds_upgrade_in_any_form() {
        for connection in [
            "Upgrade",
            "upgrade",
            "keep-alive, Upgrade",
            "UPGRADE ,close",
        ] {
            let map = headers(&[("connection", connection), ("upgrade", "SPDY/3.1")]);
            assert_eq!(upgrade_protocol(&map).expect("upgrade"), "SPDY/3.1");
        }
        let map = headers(&[("connection", "keep-alive"), ("upgrade", "websocket")]);
        assert!(upgrade_protocol(&map).is_none());
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut map = headers(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("accept", "application/json"),
        ]);
        strip_hop_by_hop(&mut map);
        assert_eq!(map.len(), 1);
        assert!(map.contains_key("accept"));
    }

    #[test]
    fn strips_credentials_and_identity() {
        let mut map = headers(&[
            ("authorization", "Bearer caller"),
            ("proxy-authorization", "Basic x"),
            ("impersonate-user", "admin"),
            ("impersonate-group", "system:masters"),
            ("x-remote-user", "admin"),
            ("accept", "*/*"),
        ]);
        strip_credentials(&mut map, false);
        assert_eq!(
            map.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["accept"]
        );

        let mut map = headers(&[("impersonate-user", "dev"), ("authorization", "Bearer x")]);
        strip_credentials(&mut map, true);
        assert!(map.contains_key("impersonate-user"));
        assert!(!map.contains_key("authorization"));
    }

    #[test]
    fn parses_bearer_tokens() {
        assert_eq!(
            bearer_token(&headers(&[("authorization", "Bearer abc")])),
            Some("abc")
        );
        assert_eq!(
            bearer_token(&headers(&[("authorization", "bearer  abc ")])),
            Some("abc")
        );
        assert_eq!(
            bearer_token(&headers(&[("authorization", "Basic abc")])),
            None
        );
        assert_eq!(
            bearer_token(&headers(&[("authorization", "Bearer ")])),
            None
        );
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }
}

/// Whether a request is a long-running stream of lines: a watch
/// (`?watch=true`/`1`, or the legacy `/watch/` paths) or a followed log.
pub fn is_line_stream(uri: &http::Uri) -> bool {
    let flag = |name: &str| {
        uri.query().is_some_and(|q| {
            q.split('&')
                .any(|pair| pair == format!("{name}=true") || pair == format!("{name}=1"))
        })
    };
    flag("watch") || flag("follow") || uri.path().contains("/watch/")
}

/// A body that, once `stop` fires, ends cleanly at the next line boundary:
/// the client gets a complete response made of whole lines (whole watch
/// events), which client-go takes as a watch ended by the server and
/// re-establishes, instead of a connection cut mid-event.
pub struct EndsAtLineAfter {
    inner: Body,
    stop: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    stopping: bool,
    at_line_start: bool,
    done: bool,
}

impl EndsAtLineAfter {
    pub fn new(inner: Body, stop: tokio_util::sync::CancellationToken) -> Self {
        Self {
            inner,
            stop: Box::pin(stop.cancelled_owned()),
            stopping: false,
            at_line_start: true,
            done: false,
        }
    }
}

impl hyper::body::Body for EndsAtLineAfter {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.stopping && this.stop.as_mut().poll(cx).is_ready() {
            this.stopping = true;
        }
        if this.stopping && this.at_line_start {
            this.done = true;
            return Poll::Ready(None);
        }
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(mut data) => {
                    if this.stopping
                        && let Some(end) = data.iter().position(|b| *b == b'\n')
                    {
                        this.done = true;
                        data.truncate(end + 1);
                    }
                    this.at_line_start = data.last().is_none_or(|b| *b == b'\n');
                    Poll::Ready(Some(Ok(hyper::body::Frame::data(data))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod line_stream_tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn watches_and_followed_logs_are_line_streams() {
        for uri in [
            "/api/v1/pods?watch=true",
            "/api/v1/pods?labelSelector=a&watch=1",
            "/api/v1/watch/namespaces",
            "/api/v1/namespaces/d/pods/p/log?follow=true",
        ] {
            assert!(is_line_stream(&uri.parse().expect("uri")), "{uri}");
        }
        for uri in [
            "/api/v1/pods",
            "/api/v1/pods?watch=false",
            "/api/v1/pods?xwatch=1",
        ] {
            assert!(!is_line_stream(&uri.parse().expect("uri")), "{uri}");
        }
    }

    #[tokio::test]
    async fn a_stopped_stream_ends_after_its_current_line() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, BoxError>>(8);
        let inner = http_body_util::StreamBody::new(tokio_stream_like(rx)).boxed();
        let stop = tokio_util::sync::CancellationToken::new();
        let mut body = EndsAtLineAfter::new(inner, stop.clone());
        for chunk in ["{\"a\":1}\n{\"b\"", ":2}\n{\"c\":3}\n{\"d", "\":4}\n"] {
            tx.send(Ok(hyper::body::Frame::data(Bytes::from(chunk))))
                .await
                .expect("send");
        }
        let first = body.frame().await.expect("frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "{\"a\":1}\n{\"b\"");
        // Stopped in the middle of an event: it is completed, then the
        // body ends cleanly; nothing after it is sent.
        stop.cancel();
        let rest = body.collect().await.expect("clean end").to_bytes();
        assert_eq!(&rest[..], b":2}\n");
        let stopped_at_a_boundary = EndsAtLineAfter::new(crate::http::full("x\n"), stop);
        assert!(
            stopped_at_a_boundary
                .collect()
                .await
                .expect("end")
                .to_bytes()
                .is_empty()
        );
    }

    fn tokio_stream_like<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
