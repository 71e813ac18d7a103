//! High availability: the other tether-server replicas, which clusters each
//! one holds a tunnel for, and the client that forwards a request to them.
//!
//! Every replica serves every cluster. Agents hold a session with every live
//! replica (they learn the set at handshake time and in `Replicas` frames);
//! where a replica has no session for a cluster (an agent that can reach
//! only one replica, or the seconds after a replica starts), it forwards the
//! request over the internal port to a replica that has one. A forwarded
//! request carries [`FORWARDED_HEADER`] and is never forwarded again, so a
//! loop is impossible by construction.
//!
//! Peers are found through the EndpointSlices of a headless Service
//! (`--peer-service`) in Kubernetes, or listed by `--peers` otherwise. Each
//! peer is asked for its [`ReplicaState`] every `--peer-sync-interval`; a
//! peer that does not answer, answers with another name than discovery
//! gave, or presents a certificate that is not a tether-server's, is logged
//! and left out: never trusted with a request.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::seq::IndexedRandom;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::http::{Body, error_chain};
use crate::tls::{self, TlsError};

/// Set on a request one replica forwards to another; such a request is
/// served from a local session or not at all.
pub const FORWARDED_HEADER: &str = "x-tether-forwarded-by";
/// The replica an agent reached (handshake answer).
pub const REPLICA_HEADER: &str = "x-tether-replica";
/// Every live replica, comma-separated (handshake answer).
pub const REPLICAS_HEADER: &str = "x-tether-replicas";
/// Path of a replica's state on the internal port.
pub const STATE_PATH: &str = "/replica";
/// A peer that has not answered for this many sync intervals is gone.
const STALE_AFTER_INTERVALS: u32 = 3;

/// What a replica tells its peers about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    pub replica: String,
    /// Clusters it holds a session for.
    pub clusters: Vec<String>,
    /// It is shutting down: it still serves what it holds, but agents
    /// should not count on it.
    pub draining: bool,
}

/// A peer as discovery found it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerTarget {
    /// `scheme://host:port` of its internal port.
    pub url: String,
    /// The name it must answer with (its pod name), when discovery knows it.
    pub expected_name: Option<String>,
}

#[derive(Debug, Clone)]
struct PeerView {
    state: ReplicaState,
    seen: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{0:?} is not a DNS name to check peers' certificates against")]
    BadName(String),
    #[error("TLS for peers: {0}")]
    Tls(#[from] TlsError),
    #[error("own certificate has no DNS name to check peers against; set --peer-tls-name")]
    NoPeerName,
}

/// `--peers`: the other replicas' internal base URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUrls(pub Vec<String>);

/// Parses `--peers`: comma-separated internal base URLs.
pub fn parse_peer_urls(value: &str) -> Result<PeerUrls, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|url| {
            let uri: Uri = url
                .parse()
                .map_err(|_| format!("{url:?} is not a URL like http://10.0.0.2:8080"))?;
            match (uri.scheme_str(), uri.authority()) {
                (Some("http" | "https"), Some(authority)) => Ok(format!(
                    "{}://{authority}",
                    uri.scheme_str().unwrap_or("http")
                )),
                _ => Err(format!(
                    "{url:?} is not an http:// or https:// URL with a host"
                )),
            }
        })
        .collect::<Result<_, _>>()
        .map(PeerUrls)
}

/// How this replica reaches its peers: a pooled HTTP/1.1 client, with mTLS
/// (its own certificate as the client certificate, the peer's checked
/// against the CA and the name every replica's certificate carries) when
/// the internal port has TLS.
pub(crate) type PeerClient = Client<HttpsConnector<HttpConnector>, Body>;

/// TLS material for talking to peers: this replica's own certificate and
/// key (presented as its client certificate), the CA peers' certificates
/// chain to, and the DNS name every replica's certificate carries.
pub(crate) struct PeerTls {
    pub files: crate::tls::ServerTlsFiles,
    pub name: Option<String>,
}

pub(crate) fn peer_client(tls: Option<&PeerTls>) -> Result<PeerClient, PeerError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(3)));
    let connector = match tls {
        Some(tls) => {
            let certs = tls::load_certs(&tls.files.cert)?;
            let key = tls::load_key(&tls.files.key)?;
            let name = match &tls.name {
                Some(name) => name.clone(),
                None => certs
                    .first()
                    .and_then(|c| crate::pki::dns_names(c).ok())
                    .and_then(|names| names.into_iter().next())
                    .ok_or(PeerError::NoPeerName)?,
            };
            let server_name =
                ServerName::try_from(name.clone()).map_err(|_| PeerError::BadName(name))?;
            let roots = match &tls.files.client_ca {
                Some(ca) => tls::load_roots(ca)?,
                None => web_roots(),
            };
            let config = tls::client_config(roots, Some((certs, key)))?;
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(config)
                .https_or_http()
                .with_server_name_resolver(FixedServerNameResolver::new(server_name))
                .enable_http1()
                .wrap_connector(http)
        }
        None => hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls::client_config(web_roots(), None)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http),
    };
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector))
}

fn web_roots() -> rustls::RootCertStore {
    rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// The peers of this replica and what each holds.
pub(crate) struct Peers {
    me: String,
    interval: Duration,
    /// Rebuilt when the certificate files change (renewals), like the
    /// server's own TLS configuration.
    client: RwLock<PeerClient>,
    tls: Option<PeerTls>,
    tls_stamp: std::sync::Mutex<Vec<Option<std::time::SystemTime>>>,
    targets: RwLock<Vec<PeerTarget>>,
    views: RwLock<HashMap<String, PeerView>>,
    live: watch::Sender<Vec<String>>,
    /// Set after the first round of asking the peers that discovery had
    /// found: until then this replica cannot forward, so it is not ready.
    synced: std::sync::atomic::AtomicBool,
    /// Whether discovery has delivered the peer set at least once (static
    /// peers, or none, are known from the start).
    discovered: std::sync::atomic::AtomicBool,
    /// One round at a time; when the last one started.
    last_round: tokio::sync::Mutex<Option<Instant>>,
}

impl Peers {
    /// `discovered`: the peer set is known now (static or none); otherwise
    /// it arrives through [`Peers::set_targets`] from discovery.
    pub fn new(
        me: String,
        interval: Duration,
        tls: Option<PeerTls>,
        discovered: bool,
    ) -> Result<Self, PeerError> {
        let (live, _) = watch::channel(vec![me.clone()]);
        let client = peer_client(tls.as_ref())?;
        let tls_stamp = tls.as_ref().map(|t| t.files.modified()).unwrap_or_default();
        Ok(Self {
            me,
            interval,
            client: RwLock::new(client),
            tls,
            tls_stamp: std::sync::Mutex::new(tls_stamp),
            targets: RwLock::new(Vec::new()),
            views: RwLock::new(HashMap::new()),
            live,
            synced: std::sync::atomic::AtomicBool::new(false),
            discovered: std::sync::atomic::AtomicBool::new(discovered),
            last_round: tokio::sync::Mutex::new(None),
        })
    }

    fn client(&self) -> PeerClient {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rebuilds the peer client when the certificate files changed; a
    /// broken update is logged and the last good client stays.
    fn reload_tls(&self) {
        let Some(tls) = &self.tls else { return };
        let now = tls.files.modified();
        {
            let mut stamp = self.tls_stamp.lock().unwrap_or_else(|p| p.into_inner());
            if *stamp == now {
                return;
            }
            *stamp = now;
        }
        match peer_client(Some(tls)) {
            Ok(client) => {
                info!("peer TLS certificates reloaded");
                *self.client.write().unwrap_or_else(|p| p.into_inner()) = client;
            }
            Err(err) => {
                warn!(error = %err, "peer TLS reload failed; keeping the previous certificates")
            }
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// Whether the peers have been asked at least once.
    pub fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Replaces the peers discovery found.
    pub fn set_targets(&self, mut targets: Vec<PeerTarget>) {
        targets.sort();
        targets.dedup();
        self.discovered
            .store(true, std::sync::atomic::Ordering::Release);
        let mut current = self.targets.write().unwrap_or_else(|p| p.into_inner());
        if *current != targets {
            info!(peers = ?targets.iter().map(|t| t.url.as_str()).collect::<Vec<_>>(), "peers discovered");
            *current = targets;
        }
    }

    fn targets(&self) -> Vec<PeerTarget> {
        self.targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn fresh(&self, view: &PeerView) -> bool {
        view.seen.elapsed() < self.interval * STALE_AFTER_INTERVALS
    }

    /// A peer URL to forward `cluster`'s request to, other than those in
    /// `tried`: one that holds a session and is not draining, else one that
    /// is draining (it still serves what it holds). Random among equals, to
    /// spread the load.
    pub fn holder_of(&self, cluster: &str, tried: &[String]) -> Option<String> {
        let views = self.views.read().unwrap_or_else(|p| p.into_inner());
        let holders: Vec<(&String, bool)> = views
            .iter()
            .filter(|(url, v)| {
                self.fresh(v)
                    && !tried.contains(url)
                    && v.state.clusters.iter().any(|c| c == cluster)
            })
            .map(|(url, v)| (url, v.state.draining))
            .collect();
        let pick = |draining: bool| {
            let urls: Vec<&String> = holders
                .iter()
                .filter(|(_, d)| *d == draining)
                .map(|(u, _)| *u)
                .collect();
            urls.choose(&mut rand::rng()).map(|u| (*u).clone())
        };
        pick(false).or_else(|| pick(true))
    }

    /// As [`Peers::holder_of`], asking the peers first when none is known
    /// to hold the cluster: the answer then reflects every session
    /// registered before the request arrived, however recent. Lookups made
    /// while a round runs share the next one, so a burst of requests for a
    /// cluster nobody holds costs two rounds, not one per request.
    pub async fn find_holder(
        &self,
        cluster: &str,
        me_draining: bool,
        tried: &[String],
    ) -> Option<String> {
        if let Some(url) = self.holder_of(cluster, tried) {
            return Some(url);
        }
        if self
            .targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return None;
        }
        let asked = Instant::now();
        let mut last = self.last_round.lock().await;
        if last.is_none_or(|started| started < asked) {
            self.round(&mut last, me_draining).await;
        }
        drop(last);
        self.holder_of(cluster, tried)
    }

    /// Every live replica, this one included unless it is draining; sorted.
    pub fn live_replicas(&self, me_draining: bool) -> Vec<String> {
        let views = self.views.read().unwrap_or_else(|p| p.into_inner());
        let mut names: BTreeSet<String> = views
            .values()
            .filter(|v| self.fresh(v) && !v.state.draining)
            .map(|v| v.state.replica.clone())
            .collect();
        if !me_draining {
            names.insert(self.me.clone());
        }
        names.into_iter().collect()
    }

    /// Follows changes of [`Peers::live_replicas`].
    pub fn subscribe(&self) -> watch::Receiver<Vec<String>> {
        self.live.subscribe()
    }

    async fn fetch(&self, target: &PeerTarget) -> Result<ReplicaState, String> {
        let uri: Uri = format!("{}{STATE_PATH}", target.url)
            .parse()
            .map_err(|_| "bad peer URL".to_owned())?;
        let request = Request::get(uri)
            .header(FORWARDED_HEADER, self.me.as_str())
            .body(crate::http::empty())
            .map_err(|err| err.to_string())?;
        let response = tokio::time::timeout(self.interval.max(Duration::from_secs(1)) * 2, async {
            let response = self
                .client()
                .request(request)
                .await
                .map_err(|err| error_chain(&err))?;
            if response.status() != StatusCode::OK {
                return Err(format!("answered {}", response.status()));
            }
            let body = http_body_util::Limited::new(response.into_body(), 4 << 20)
                .collect()
                .await
                .map_err(|err| err.to_string())?
                .to_bytes();
            serde_json::from_slice::<ReplicaState>(&body).map_err(|err| format!("bad state: {err}"))
        })
        .await
        .map_err(|_| "timed out".to_owned())??;
        Ok(response)
    }

    /// One round: asks every peer for its state and publishes the live set.
    pub async fn sync(&self, me_draining: bool) {
        let mut last = self.last_round.lock().await;
        self.round(&mut last, me_draining).await;
    }

    async fn round(&self, last: &mut Option<Instant>, me_draining: bool) {
        *last = Some(Instant::now());
        self.reload_tls();
        let targets = self.targets();
        let results = futures_util::future::join_all(
            targets
                .iter()
                .map(|t| async move { (t, self.fetch(t).await) }),
        )
        .await;
        {
            let mut views = self.views.write().unwrap_or_else(|p| p.into_inner());
            views.retain(|url, _| targets.iter().any(|t| &t.url == url));
            for (target, result) in results {
                match result {
                    Ok(state) if state.replica == self.me => {
                        debug!(peer = %target.url, "peer URL is this replica; skipped");
                        views.remove(&target.url);
                    }
                    Ok(state)
                        if target
                            .expected_name
                            .as_ref()
                            .is_some_and(|name| *name != state.replica) =>
                    {
                        warn!(peer = %target.url, expected = ?target.expected_name, answered = %state.replica,
                            "peer answered with another replica name; not trusted");
                        views.remove(&target.url);
                    }
                    Ok(state) => {
                        views.insert(
                            target.url.clone(),
                            PeerView {
                                state,
                                seen: Instant::now(),
                            },
                        );
                    }
                    Err(err) => {
                        // Kept until stale: one lost answer is no departure.
                        debug!(peer = %target.url, error = %err, "peer did not answer");
                        if !views.get(&target.url).is_some_and(|v| self.fresh(v)) {
                            warn!(peer = %target.url, error = %err, "peer unreachable");
                        }
                    }
                }
            }
        }
        if self.discovered.load(std::sync::atomic::Ordering::Acquire) {
            self.synced
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let live = self.live_replicas(me_draining);
        self.live.send_if_modified(|current| {
            if *current == live {
                return false;
            }
            info!(replicas = ?live, "live replicas changed");
            *current = live;
            true
        });
    }

    /// Syncs every interval until `stop`; `draining` reports this replica's own state.
    pub async fn run(self: Arc<Self>, draining: CancellationToken, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
                // Tell agents at once that this replica is leaving.
                _ = draining.cancelled(), if !draining.is_cancelled() => {}
            }
            self.sync(draining.is_cancelled()).await;
        }
    }

    /// Forwards a prepared request to `peer_url`, marked as forwarded.
    pub async fn forward(
        &self,
        peer_url: &str,
        path_and_query: &str,
        mut request: Request<Body>,
    ) -> Result<Response<Incoming>, String> {
        let uri: Uri = format!("{peer_url}{path_and_query}")
            .parse()
            .map_err(|_| "malformed forwarded path".to_owned())?;
        *request.uri_mut() = uri;
        request.headers_mut().remove(http::header::HOST);
        request.headers_mut().insert(
            FORWARDED_HEADER,
            http::HeaderValue::from_str(&self.me).map_err(|_| "bad replica name".to_owned())?,
        );
        *request.version_mut() = http::Version::HTTP_11;
        self.client()
            .request(request)
            .await
            .map_err(|err| error_chain(&err))
    }
}

/// Kubernetes discovery: the ready or still serving endpoints of the
/// headless Service `service`, from its EndpointSlices. Why EndpointSlices
/// and not a Lease per replica: Kubernetes already keeps them current with
/// each pod's readiness and termination, so replicas write nothing, need
/// only read RBAC, and a crashed pod leaves the set without any expiry
/// logic of ours.
pub(crate) async fn discover_endpoint_slices(
    client: kube::Client,
    namespace: String,
    service: String,
    scheme: &'static str,
    port: u16,
    peers: Arc<Peers>,
    stop: CancellationToken,
) {
    use futures_util::StreamExt;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::runtime::{WatchStreamExt, reflector, watcher};

    let api: kube::Api<EndpointSlice> = kube::Api::namespaced(client, &namespace);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let (reader, writer) = reflector::store();
    let mut events = reflector(writer, watcher(api, config).default_backoff()).boxed();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = events.next() => event,
        };
        match event {
            // The initial list counts once complete (InitDone), even when
            // it holds no slice at all.
            Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
            Some(Ok(_)) => {}
            Some(Err(err)) => {
                warn!(error = %err, %service, "watching the peer Service's EndpointSlices failed; keeping the last known peers");
                continue;
            }
            None => return,
        }
        let mut targets = Vec::new();
        for slice in reader.state() {
            // The Service's `internal` port; replicas of one Deployment
            // share it, so this replica's own is the fallback.
            let port = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some("internal"))
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(port);
            for endpoint in &slice.endpoints {
                let conditions = endpoint.conditions.as_ref();
                // A terminating pod still serves the tunnels it holds.
                let serving = conditions
                    .and_then(|c| c.serving.or(c.ready))
                    .unwrap_or(true);
                let name = endpoint.target_ref.as_ref().and_then(|r| r.name.clone());
                if !serving || name.as_deref() == Some(peers.me()) {
                    continue;
                }
                for address in &endpoint.addresses {
                    let host = if address.contains(':') {
                        format!("[{address}]")
                    } else {
                        address.clone()
                    };
                    targets.push(PeerTarget {
                        url: format!("{scheme}://{host}:{port}"),
                        expected_name: name.clone(),
                    });
                }
            }
        }
        peers.set_targets(targets);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn not_ready_until_discovery_has_answered() {
        crate::install_crypto_provider();
        let peers = Peers::new("a".into(), Duration::from_secs(1), None, false).expect("peers");
        peers.sync(false).await;
        assert!(!peers.synced(), "no peer set yet: cannot forward");
        peers.set_targets(Vec::new());
        peers.sync(false).await;
        assert!(peers.synced(), "discovery answered (no peers): ready");
        let standalone = Peers::new("a".into(), Duration::from_secs(1), None, true).expect("peers");
        standalone.sync(false).await;
        assert!(standalone.synced());
    }

    /// A peer answering `/replica` with whatever `state` holds now.
    async fn peer_serving(state: Arc<std::sync::Mutex<ReplicaState>>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let state = state.clone();
                let service = hyper::service::service_fn(move |_| {
                    let body = serde_json::to_vec(&*state.lock().expect("lock")).expect("json");
                    async move {
                        Ok::<_, std::convert::Infallible>(Response::new(crate::http::full(body)))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(socket), service),
                );
            }
        });
        url
    }

    /// The lookup a request makes sees a session registered on a peer just
    /// before, even right after a periodic round (CI once caught the window
    /// a minimum gap between rounds left open).
    #[tokio::test]
    async fn a_lookup_sees_sessions_registered_before_it() {
        crate::install_crypto_provider();
        let state = Arc::new(std::sync::Mutex::new(ReplicaState {
            replica: "b".into(),
            clusters: Vec::new(),
            draining: false,
        }));
        let url = peer_serving(state.clone()).await;
        let peers = Peers::new("a".into(), Duration::from_secs(60), None, true).expect("peers");
        peers.set_targets(vec![PeerTarget {
            url: url.clone(),
            expected_name: None,
        }]);
        peers.sync(false).await;
        assert_eq!(peers.find_holder("dev", false, &[]).await, None);
        state.lock().expect("lock").clusters.push("dev".into());
        assert_eq!(
            peers.find_holder("dev", false, &[]).await.as_deref(),
            Some(url.as_str())
        );
        assert_eq!(
            peers.find_holder("dev", false, &[url]).await,
            None,
            "a holder that refused is not chosen again"
        );
    }

    #[test]
    fn peer_urls_parse_and_refuse_mistakes() {
        assert_eq!(
            parse_peer_urls("http://10.0.0.2:8080, https://peer.example:8080/")
                .expect("valid")
                .0,
            ["http://10.0.0.2:8080", "https://peer.example:8080"]
        );
        assert!(parse_peer_urls("").expect("empty is none").0.is_empty());
        for bad in ["10.0.0.2:8080", "ftp://x:1", "http://"] {
            assert!(parse_peer_urls(bad).is_err(), "{bad}");
        }
    }

    fn view(peers: &Peers, url: &str, replica: &str, clusters: &[&str], draining: bool) {
        peers.views.write().expect("lock").insert(
            url.to_owned(),
            PeerView {
                state: ReplicaState {
                    replica: replica.to_owned(),
                    clusters: clusters.iter().map(|c| (*c).to_owned()).collect(),
                    draining,
                },
                seen: Instant::now(),
            },
        );
    }

    #[tokio::test]
    async fn holders_prefer_replicas_that_are_not_draining() {
        crate::install_crypto_provider();
        let peers = Peers::new("a".into(), Duration::from_secs(1), None, true).expect("peers");
        view(&peers, "http://b", "b", &["dev"], true);
        assert_eq!(peers.holder_of("dev", &[]).as_deref(), Some("http://b"));
        view(&peers, "http://c", "c", &["dev", "prod"], false);
        for _ in 0..20 {
            assert_eq!(peers.holder_of("dev", &[]).as_deref(), Some("http://c"));
        }
        assert_eq!(
            peers.holder_of("dev", &["http://c".to_owned()]).as_deref(),
            Some("http://b"),
            "a holder that refused is not asked again"
        );
        assert_eq!(peers.holder_of("none", &[]), None);
        assert_eq!(peers.live_replicas(false), ["a", "c"]);
        assert_eq!(
            peers.live_replicas(true),
            ["c"],
            "a draining replica leaves the set"
        );
        peers
            .views
            .write()
            .expect("lock")
            .get_mut("http://c")
            .expect("c")
            .seen = Instant::now() - Duration::from_secs(10);
        assert_eq!(peers.holder_of("prod", &[]), None, "a silent peer is gone");
    }
}
