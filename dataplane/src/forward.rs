//! Forwarding one HTTP request a hop further, shared by tether-server
//! (caller → tunnel) and tether-agent (tunnel → kube-apiserver): header
//! hygiene on the way in, and relaying the answer, including upgrades
//! (`kubectl exec`, `port-forward`), whose bytes are spliced both ways.

use http::header::HeaderValue;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::http::{
    Body, empty, restore_upgrade, strip_credentials, strip_hop_by_hop, upgrade_protocol,
};

/// A request's head prepared for the next hop, and its upgrade (if any).
#[derive(Default)]
pub struct Prepared {
    /// The protocol of an upgrade request (`SPDY/3.1`, `websocket`).
    pub upgrade: Option<HeaderValue>,
    /// Resolves to the caller's connection once we answered 101.
    pub caller_upgrade: Option<OnUpgrade>,
}

/// Strips hop-by-hop headers and the caller's credentials from `request`,
/// keeping an upgrade intact. Returns what relaying the answer needs.
pub fn prepare<B>(request: &mut Request<B>, keep_impersonation: bool) -> Prepared {
    let upgrade = upgrade_protocol(request.headers());
    let caller_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut *request));
    let headers = request.headers_mut();
    strip_hop_by_hop(headers);
    strip_credentials(headers, keep_impersonation);
    if let Some(protocol) = &upgrade {
        restore_upgrade(headers, protocol.clone());
    }
    Prepared {
        upgrade,
        caller_upgrade,
    }
}

/// Turns the next hop's answer into ours. Bodies stream through untouched
/// (watches, long LISTs). A 101 to an upgrade splices the two connections
/// until either side closes.
pub fn relay<B>(prepared: Prepared, mut response: Response<B>, label: &str) -> Response<Body>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<crate::http::BoxError>,
{
    if let (StatusCode::SWITCHING_PROTOCOLS, Some(protocol), Some(caller)) =
        (response.status(), prepared.upgrade, prepared.caller_upgrade)
    {
        let upstream = hyper::upgrade::on(&mut response);
        let label = label.to_owned();
        tokio::spawn(async move { splice(caller, upstream, &label).await });
        let mut answer = Response::new(empty());
        *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *answer.headers_mut() = end_to_end(response.headers());
        restore_upgrade(answer.headers_mut(), protocol);
        return answer;
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.map_err(Into::into).boxed())
}

fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut headers = headers.clone();
    strip_hop_by_hop(&mut headers);
    headers
}

async fn splice(caller: OnUpgrade, upstream: OnUpgrade, label: &str) {
    let (caller, upstream) = match tokio::try_join!(caller, upstream) {
        Ok(pair) => pair,
        Err(err) => {
            debug!(label, error = %err, "upgrade did not complete");
            return;
        }
    };
    let mut caller = TokioIo::new(caller);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut caller, &mut upstream).await {
        Ok((up, down)) => debug!(label, up, down, "upgraded connection closed"),
        Err(err) => debug!(label, error = %err, "upgraded connection failed"),
    }
}
