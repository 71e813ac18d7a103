//! Which agent session serves each cluster.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::clusters::Clusters;
use crate::mux::Session;

/// One connected agent.
#[derive(Clone)]
pub struct Tunnel {
    /// Distinguishes this session from earlier and later ones of the cluster.
    pub generation: u64,
    pub session: Session,
    pub agent_version: String,
    pub remote: SocketAddr,
    pub since: SystemTime,
    /// The token hash the agent authenticated with; a config change that
    /// alters it ends the session.
    pub token_sha256: [u8; 32],
    /// The agent process's instance id, from agents that hold a session
    /// per replica (they receive `Replicas` frames); `None` for older ones.
    pub instance: Option<String>,
    /// The client certificate the agent presented (mTLS).
    pub certificate: Option<crate::pki::CertInfo>,
    /// Idle HTTP/1.1 connections over this session's streams.
    pub streams: std::sync::Arc<crate::pool::Pool>,
}

/// Idle streams kept per session: ArgoCD's concurrency to one cluster
/// rarely exceeds it, and each idle stream holds buffers on both ends.
pub const MAX_IDLE_STREAMS: usize = 64;

#[derive(Default)]
pub struct Registry {
    tunnels: Mutex<HashMap<String, Tunnel>>,
    next_generation: AtomicU64,
}

impl Registry {
    fn tunnels(&self) -> MutexGuard<'_, HashMap<String, Tunnel>> {
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn next_generation(&self) -> u64 {
        self.next_generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Makes `tunnel` the cluster's session (last writer wins) and retires
    /// the one it replaces: no new streams, the open ones may finish (an
    /// agent reconnecting with a rotated token loses no request), then it
    /// is closed.
    pub fn insert(&self, cluster: &str, tunnel: Tunnel) {
        let replaced = self.tunnels().insert(cluster.to_owned(), tunnel);
        if let Some(old) = replaced {
            old.streams.clear();
            retire(old.session);
        }
    }

    /// Removes the cluster's session only if it is still `generation`: an
    /// old session's teardown must never remove its successor.
    pub fn remove_if_current(&self, cluster: &str, generation: u64) -> bool {
        let mut tunnels = self.tunnels();
        if tunnels
            .get(cluster)
            .is_some_and(|t| t.generation == generation)
        {
            tunnels.remove(cluster);
            return true;
        }
        false
    }

    pub fn get(&self, cluster: &str) -> Option<Tunnel> {
        self.tunnels().get(cluster).cloned()
    }

    /// Whether the same agent process already holds a live session here
    /// with the same credentials: its second one is refused so the first is
    /// never disturbed. With a new token or another certificate (a renewal)
    /// it replaces the first.
    pub fn holds_instance(
        &self,
        cluster: &str,
        instance: &str,
        token_sha256: &[u8; 32],
        certificate: Option<&crate::pki::CertInfo>,
    ) -> bool {
        let fingerprint = |c: Option<&crate::pki::CertInfo>| c.map(|c| c.fingerprint);
        self.tunnels().get(cluster).is_some_and(|t| {
            t.instance.as_deref() == Some(instance)
                && t.token_sha256 == *token_sha256
                && fingerprint(certificate) == fingerprint(t.certificate.as_ref())
                && !t.session.is_closed()
                && !t.session.is_draining()
        })
    }

    pub fn len(&self) -> usize {
        self.tunnels().len()
    }

    pub fn is_empty(&self) -> bool {
        self.tunnels().is_empty()
    }

    pub fn snapshot(&self) -> Vec<(String, Tunnel)> {
        self.tunnels()
            .iter()
            .map(|(id, t)| (id.clone(), t.clone()))
            .collect()
    }

    /// Closes the sessions of clusters that `clusters` no longer lists,
    /// whose token is no longer accepted (changed, or a previous one past
    /// its overlap), or whose certificate predates a completed rotation.
    /// Returns the ids closed.
    pub fn retain_configured(&self, clusters: &Clusters) -> Vec<String> {
        let now = SystemTime::now();
        let stale: Vec<(String, Tunnel)> = {
            let mut tunnels = self.tunnels();
            let ids: Vec<String> = tunnels
                .iter()
                .filter(|(id, tunnel)| {
                    clusters.get(id).is_none_or(|c| {
                        !c.token_matches(&tunnel.token_sha256, now)
                            || c.certificates_not_before.is_some_and(|limit| {
                                tunnel
                                    .certificate
                                    .as_ref()
                                    .is_some_and(|cert| cert.not_before < limit)
                            })
                    })
                })
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| tunnels.remove(&id).map(|t| (id, t)))
                .collect()
        };
        for (_, tunnel) in &stale {
            tunnel
                .session
                .close("cluster removed from configuration, or its token or certificate replaced");
        }
        stale.into_iter().map(|(id, _)| id).collect()
    }

    /// Tells every agent to go away (v2 reconnects at once) and stops new
    /// streams.
    pub fn go_away_all(&self) {
        for tunnel in self.tunnels().values() {
            tunnel.session.go_away();
            tunnel.streams.clear();
        }
    }

    pub fn close_all(&self, reason: &str) {
        let all: Vec<Tunnel> = self.tunnels().drain().map(|(_, t)| t).collect();
        for tunnel in all {
            tunnel.session.close(reason);
        }
    }
}

/// How long a replaced session's open streams may take to finish.
const RETIRE_GRACE: Duration = Duration::from_secs(30);

fn retire(session: Session) {
    session.go_away();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + RETIRE_GRACE;
        while session.open_streams() > 0 && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = session.closed() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        session.close("replaced by a newer session of the same cluster");
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mux::{Role, SessionConfig};
    use crate::protocol::Version;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role as WsRole;

    async fn session() -> Session {
        let (a, _b) = tokio::io::duplex(1024);
        let ws = WebSocketStream::from_raw_socket(a, WsRole::Server, None).await;
        Session::start(ws, SessionConfig::new(Version::V2, Role::Opener, "test")).0
    }

    fn tunnel(generation: u64, session: Session) -> Tunnel {
        Tunnel {
            generation,
            session,
            agent_version: "test".into(),
            remote: "127.0.0.1:1".parse().expect("addr"),
            since: SystemTime::now(),
            token_sha256: crate::clusters::token_sha256("t"),
            instance: None,
            certificate: None,
            streams: std::sync::Arc::new(crate::pool::Pool::new(MAX_IDLE_STREAMS)),
        }
    }

    #[tokio::test]
    async fn an_old_sessions_teardown_never_removes_its_successor() {
        let registry = Registry::default();
        let old = session().await;
        let new = session().await;
        let (g1, g2) = (registry.next_generation(), registry.next_generation());
        registry.insert("dev", tunnel(g1, old.clone()));
        registry.insert("dev", tunnel(g2, new.clone()));
        assert!(
            old.is_draining(),
            "the replaced session takes no new streams"
        );
        tokio::time::timeout(Duration::from_secs(1), old.closed())
            .await
            .expect("and with none open, it is closed at once");
        assert!(
            !registry.remove_if_current("dev", g1),
            "stale teardown is a no-op"
        );
        assert_eq!(registry.get("dev").map(|t| t.generation), Some(g2));
        assert!(registry.remove_if_current("dev", g2));
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn removed_clusters_and_changed_tokens_lose_their_session() {
        let registry = Registry::default();
        let kept = session().await;
        let removed = session().await;
        let rotated = session().await;
        let mut t = tunnel(registry.next_generation(), kept.clone());
        registry.insert("kept", t.clone());
        t = tunnel(registry.next_generation(), removed.clone());
        registry.insert("gone", t);
        let mut r = tunnel(registry.next_generation(), rotated.clone());
        r.token_sha256 = crate::clusters::token_sha256("old");
        registry.insert("rotated", r);
        let clusters =
            Clusters::parse(r#"[{"id":"kept","token":"t"},{"id":"rotated","token":"new"}]"#)
                .expect("valid");
        let mut closed = registry.retain_configured(&clusters);
        closed.sort();
        assert_eq!(closed, ["gone", "rotated"]);
        assert!(!kept.is_closed() && removed.is_closed() && rotated.is_closed());
    }
}
