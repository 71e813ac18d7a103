//! The metrics port every binary serves: HTTPS with the caller's token
//! reviewed by the API server (a TokenReview, then a SubjectAccessReview for
//! `get /metrics`), verdicts cached so repeated scrapes cost no API call;
//! plain HTTP with `--metrics-auth none`. Scraped with curl, as Prometheus
//! would (it skips verification of the self-signed certificate).

use std::sync::Arc;

use clap::Parser;
use tether::fake_apiserver::FakeApiServer;
use tether::metrics_port::{self, MetricsArgs, MetricsPort};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    metrics: MetricsArgs,
}

fn args(extra: &[&str]) -> MetricsArgs {
    let mut argv = vec!["test", "--metrics-addr", "127.0.0.1:0"];
    argv.extend(extra);
    Flags::parse_from(argv).metrics
}

const PROMETHEUS: &str = "system:serviceaccount:monitoring:prometheus";

/// An API server that reviews tokens, and a client of it as the binary
/// would have (its own token).
async fn api(dir: &std::path::Path) -> (FakeApiServer, kube::Client) {
    let own_token = dir.join("token");
    std::fs::write(&own_token, "the-binary's-own-token").expect("write");
    let api = FakeApiServer::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        None,
        own_token,
    )
    .await
    .expect("fake API");
    api.review_token("prometheus-token", PROMETHEUS, true);
    api.review_token("someone-else", "system:serviceaccount:default:other", false);
    let client = api.kube_client().await.expect("client");
    (api, client)
}

fn render() -> metrics_port::Render {
    Arc::new(|| "tether_example_metric 1\n".to_owned())
}

/// (status code, body) of a GET with curl.
async fn scrape(url: &str, token: Option<&str>) -> (u16, String) {
    let mut command = tokio::process::Command::new("curl");
    command.args(["-sk", "-w", "\n%{http_code}", url]);
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let output = command.output().await.expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[tokio::test]
async fn tokens_are_reviewed_once_and_refusals_say_why() {
    tether::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let (api, client) = api(dir.path()).await;
    let stop = CancellationToken::new();
    let MetricsPort { addr, reviewer } =
        metrics_port::serve(&args(&[]), render(), Some(client), stop.clone())
            .await
            .expect("serves")
            .expect("enabled");
    let reviewer = reviewer.expect("kubernetes auth reviews tokens");
    let url = format!("https://{addr}/metrics");

    let (code, body) = scrape(&url, None).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("bearer token is required"), "{body}");

    for _ in 0..10 {
        let (code, body) = scrape(&url, Some("prometheus-token")).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body, "tether_example_metric 1\n");
    }
    // One TokenReview and one SubjectAccessReview for ten scrapes.
    assert_eq!(reviewer.api_calls(), 2);
    let reviews = api
        .seen()
        .iter()
        .filter(|r| r.path_and_query.contains("reviews"))
        .count();
    assert_eq!(reviews, 2);

    let (code, body) = scrape(&url, Some("someone-else")).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("system:serviceaccount:default:other may not get /metrics")
            && body.contains("tether-metrics-reader"),
        "{body}"
    );
    let (code, _) = scrape(&url, Some("made-up")).await;
    assert_eq!(code, 401);
    let (code, _) = scrape(&format!("https://{addr}/other"), Some("prometheus-token")).await;
    assert_eq!(code, 404);
    // The port speaks TLS only.
    let (code, _) = scrape(&format!("http://{addr}/metrics"), Some("prometheus-token")).await;
    assert_ne!(code, 200);
    // Every request the reviews made carried the binary's own token, and
    // no reviewed token ever went anywhere but into a review's body.
    assert!(api.seen().iter().all(|r| r.authorized));
    stop.cancel();
}

#[tokio::test]
async fn without_auth_the_port_is_plain_http() {
    tether::install_crypto_provider();
    let stop = CancellationToken::new();
    let port = metrics_port::serve(
        &args(&["--metrics-auth", "none"]),
        render(),
        None,
        stop.clone(),
    )
    .await
    .expect("serves")
    .expect("enabled");
    assert!(port.reviewer.is_none());
    let (code, body) = scrape(&format!("http://{}/metrics", port.addr), None).await;
    assert_eq!((code, body.as_str()), (200, "tether_example_metric 1\n"));
    stop.cancel();
}

#[tokio::test]
async fn unset_means_off() {
    let flags = Flags::parse_from(["test"]);
    let port = metrics_port::serve(&flags.metrics, render(), None, CancellationToken::new())
        .await
        .expect("nothing to fail");
    assert!(port.is_none());
}
