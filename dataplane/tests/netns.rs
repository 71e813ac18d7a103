//! Network faults across real network namespaces (see `support::netns`):
//! tether-server in a management namespace, tether-agent and the
//! kube-apiserver double in a customer namespace whose firewall admits no
//! inbound connection.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::netns::{self, HEALTH_PORT, KEEPALIVE_TIMEOUT, Net, World};

/// The agent connects out of a customer namespace that admits no inbound
/// connection, and requests reach its API server; from the management side
/// nothing in the customer namespace can be reached, not even the agent's
/// health port, which answers inside the namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_only_customer_namespace() {
    if netns::skip(&[]) {
        return;
    }
    let world = World::new(Net::new("o")).await;
    let _server = world.server();
    let _agent = world.agent(&[], &[]);
    world.wait_connected(true).await;

    let (code, status, body) = world.management("/tunnel/dev/version", &[]).await;
    assert_eq!(
        (code, status.as_str()),
        (0, "200"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    let inside = format!("http://127.0.0.1:{HEALTH_PORT}/healthz");
    let (code, status, _) = world.curl(&world.net.customer, &inside, &[]).await;
    assert_eq!(
        (code, status.as_str()),
        (0, "200"),
        "health port inside the namespace"
    );
    for port in [HEALTH_PORT, world.backend.addr.port()] {
        let url = format!("http://{}:{port}/", world.net.addresses.customer);
        let (code, _, _) = world
            .curl(&world.net.management, &url, &["--connect-timeout", "2"])
            .await;
        assert_eq!(
            code, 28,
            "connecting in to port {port} must time out (curl exit 28)"
        );
    }
}

/// Packets dropped both ways: the server notices within the keepalive
/// timeout, and the agent is back soon after the link returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_is_detected_and_the_agent_reconnects() {
    if netns::skip(&[]) {
        return;
    }
    let world = World::new(Net::new("l")).await;
    let _server = world.server();
    let _agent = world.agent(&[], &[]);
    world.wait_connected(true).await;

    world.net.cut();
    let noticed = world.wait_connected(false).await;
    eprintln!("server noticed the cut link after {noticed:?}");
    assert!(
        noticed <= KEEPALIVE_TIMEOUT + Duration::from_secs(2),
        "noticed after {noticed:?}"
    );
    let (code, status, _) = world.management("/tunnel/dev/version", &[]).await;
    assert_eq!(code, 0);
    assert!(
        status.starts_with('5'),
        "a request while cut fails visibly: {status}"
    );

    world.net.heal();
    let back = world.wait_connected(true).await;
    eprintln!("agent reconnected {back:?} after the link returned");
    let (code, status, _) = world.management("/tunnel/dev/version", &[]).await;
    assert_eq!((code, status.as_str()), (0, "200"));
}

/// The server killed mid-watch: curl reports an error (never a clean end of
/// a truncated stream); the agent reconnects to the restarted server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_watch_is_a_visible_error() {
    if netns::skip(&[]) {
        return;
    }
    let world = World::new(Net::new("s")).await;
    let mut server = world.server();
    let _agent = world.agent(&[], &[]);
    world.wait_connected(true).await;

    let path = "/tunnel/dev/api/v1/namespaces/default/pods?watch=1&events=100&intervalMs=100";
    let watch = world.management(path, &[]);
    let killing = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        server.kill();
    };
    let ((code, status, body), ()) = tokio::join!(watch, killing);
    let events = body
        .split(|&b| b == b'\n')
        .filter(|l| l.starts_with(b"{"))
        .count();
    assert_eq!(status, "200", "the watch had started");
    assert!(
        (1..100).contains(&events),
        "{events} events before the kill"
    );
    eprintln!("watch cut after {events} events: curl exit {code}");
    assert_ne!(code, 0, "curl must see the broken watch as an error");

    let _restarted = world.server();
    world.wait_connected(true).await;
    let (code, status, _) = world.management("/tunnel/dev/version", &[]).await;
    assert_eq!((code, status.as_str()), (0, "200"));
}

/// The agent killed mid-response: the caller sees an error, never a short
/// body presented as complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_request_is_a_visible_error() {
    if netns::skip(&[]) {
        return;
    }
    let world = World::new(Net::new("a")).await;
    let _server = world.server();
    let mut agent = world.agent(&[], &[]);
    world.wait_connected(true).await;

    let total = 64u64 << 20;
    let path = format!("/tunnel/dev/bytes?n={total}");
    let download = world.management(&path, &["--limit-rate", "4M", "-o", "/dev/null"]);
    let killing = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        agent.kill();
    };
    let ((code, status, _), ()) = tokio::join!(download, killing);
    eprintln!("download cut: curl exit {code}, status {status}");
    assert_ne!(
        code, 0,
        "curl must see the cut response as an error ({status})"
    );
    world.wait_connected(false).await;
}

/// The namespaces and veth pair are gone once a test ends.
#[test]
fn namespaces_are_removed() {
    if netns::skip(&[]) {
        return;
    }
    let name = {
        let net = Net::new("r");
        net.customer.clone()
    };
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(&name));
    assert!(!Path::new(&format!("/var/run/netns/{name}")).exists());
}
