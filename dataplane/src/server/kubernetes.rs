//! tether-server's Kubernetes side: it learns its clusters by watching the
//! Secret tether-operator publishes (token hashes only), and reports each
//! agent's session with this replica into
//! `ProxiedCluster.status.agentSessions.<replica>`: every replica writes only
//! its own entry, so replicas never overwrite each other, and the operator
//! sums the entries up into `status.connection`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{Timestamp, Unit};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::ServerState;
use crate::clusters::Clusters;

/// Key of the clusters JSON in the operator's Secret.
pub const CLUSTERS_KEY: &str = "clusters.json";
/// Pending status changes are written at most this often.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// On shutdown, how long the last reports may take.
const FINAL_REPORT_WITHIN: Duration = Duration::from_secs(2);
/// While connected, `lastSeen` is refreshed this often (not per ping).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(30);

/// `namespace/name` of a Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

pub fn parse_secret_ref(value: &str) -> Result<SecretRef, String> {
    match value.split_once('/') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
        {
            Ok(SecretRef {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
        }
        _ => Err(format!("{value:?} is not namespace/name")),
    }
}

/// Follows the clusters Secret. Errors and deletions keep the last known
/// clusters: a brief API outage must not disconnect anyone.
pub(super) async fn watch_clusters(
    client: Client,
    secret: SecretRef,
    state: Arc<ServerState>,
    stop: CancellationToken,
) {
    let api: Api<Secret> = Api::namespaced(client, &secret.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", secret.name));
    let mut events = watcher(api, config).default_backoff().boxed();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = events.next() => event,
        };
        match event {
            Some(Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object))) => {
                apply_secret(&object, &secret, &state);
            }
            Some(Ok(watcher::Event::Delete(_))) => {
                warn!(secret = %secret.name, "clusters Secret deleted; keeping the last known clusters");
            }
            Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
            Some(Err(err)) => {
                warn!(error = %err, "watching the clusters Secret failed; keeping the last known clusters");
            }
            None => return,
        }
    }
}

fn apply_secret(object: &Secret, secret: &SecretRef, state: &ServerState) {
    let Some(bytes) = object.data.as_ref().and_then(|d| d.get(CLUSTERS_KEY)) else {
        warn!(secret = %secret.name, key = CLUSTERS_KEY, "clusters Secret lacks its key; keeping the last known clusters");
        return;
    };
    match Clusters::parse(&String::from_utf8_lossy(&bytes.0)) {
        Ok(clusters) if *state.clusters() == clusters => {}
        Ok(clusters) => state.set_clusters(clusters),
        Err(err) => {
            warn!(secret = %secret.name, error = %err, "clusters Secret is invalid; keeping the last known clusters")
        }
    }
}

/// A change in an agent's connection, as the reporter is told of it.
#[derive(Debug, Clone)]
pub(crate) enum ConnectionEvent {
    Up {
        cluster: String,
        agent_version: String,
        remote: String,
        since: SystemTime,
        /// Expiry of the client certificate the agent presented.
        certificate_not_after: Option<SystemTime>,
        /// The first 12 hex digits of the presented token's SHA-256.
        token_sha256_prefix: String,
    },
    Down {
        cluster: String,
    },
}

impl ConnectionEvent {
    fn cluster(&self) -> &str {
        match self {
            ConnectionEvent::Up { cluster, .. } | ConnectionEvent::Down { cluster } => cluster,
        }
    }
}

fn rfc3339(time: SystemTime) -> String {
    Timestamp::try_from(time)
        .ok()
        .and_then(|t| t.round(Unit::Second).ok())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn proxied_clusters(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("tether.dev", "v1alpha1", "ProxiedCluster"),
        "proxiedclusters",
    );
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// Writes connection changes into ProxiedCluster status: coalesced per
/// cluster (the newest state wins), flushed every second, with a heartbeat
/// of `lastSeen` while connected, and again when the set of live replicas
/// changes (the entry lists them). Failed writes stay pending and
/// retry.
pub(super) async fn report_status(
    client: Client,
    replica: String,
    state: Arc<ServerState>,
    mut events: mpsc::UnboundedReceiver<ConnectionEvent>,
    stop: CancellationToken,
) {
    let mut pending: HashMap<String, ConnectionEvent> = HashMap::new();
    let mut connected: HashMap<String, ConnectionEvent> = HashMap::new();
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    let mut live_replicas = state.peers.subscribe();
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                // Leaving: this replica's sessions end with it; say so
                // rather than let the entries expire.
                let (client, replica, state) = (&client, &replica, &state);
                let leaving = connected.keys().map(|cluster| async move {
                    let down = ConnectionEvent::Down { cluster: cluster.clone() };
                    if let Err(err) = write(client, replica, state, &down).await {
                        warn!(%cluster, error = %err, "cannot report the session's end");
                    }
                });
                let _ = tokio::time::timeout(FINAL_REPORT_WITHIN, futures_util::future::join_all(leaving)).await;
                return;
            }
            changed = live_replicas.changed() => {
                if changed.is_err() {
                    return;
                }
                for (cluster, event) in &connected {
                    pending.insert(cluster.clone(), event.clone());
                }
            }
            event = events.recv() => match event {
                Some(event) => {
                    match &event {
                        ConnectionEvent::Up { cluster, .. } => connected.insert(cluster.clone(), event.clone()),
                        ConnectionEvent::Down { cluster } => connected.remove(cluster),
                    };
                    pending.insert(event.cluster().to_owned(), event);
                }
                None => return,
            },
            _ = heartbeat.tick() => {
                for (cluster, event) in &connected {
                    pending.entry(cluster.clone()).or_insert_with(|| event.clone());
                }
            }
            _ = flush.tick() => {
                let due: Vec<ConnectionEvent> = pending.drain().map(|(_, e)| e).collect();
                for event in due {
                    if let Err(err) = write(&client, &replica, &state, &event).await {
                        warn!(cluster = %event.cluster(), error = %err, "cannot report connection status; retrying");
                        pending.entry(event.cluster().to_owned()).or_insert(event);
                    }
                }
            }
        }
    }
}

async fn write(
    client: &Client,
    replica: &str,
    state: &ServerState,
    event: &ConnectionEvent,
) -> Result<(), kube::Error> {
    let Some((namespace, name)) = state
        .clusters()
        .get(event.cluster())
        .and_then(|c| c.resource.clone())
    else {
        debug!(cluster = %event.cluster(), "no ProxiedCluster to report to");
        return Ok(());
    };
    let api = proxied_clusters(client, &namespace);
    let now = rfc3339(SystemTime::now());
    let session = match event {
        ConnectionEvent::Up {
            agent_version,
            remote,
            since,
            certificate_not_after,
            token_sha256_prefix,
            ..
        } => json!({
            "tokenSha256Prefix": token_sha256_prefix,
            "connected": true,
            "since": rfc3339(*since),
            "agentVersion": agent_version,
            "remoteAddress": remote,
            "certificateNotAfter": certificate_not_after.map(rfc3339),
            "lastSeen": now,
            "liveReplicas": state.peers.live_replicas(state.draining.is_cancelled()),
        }),
        ConnectionEvent::Down { .. } => json!({"connected": false, "lastSeen": now}),
    };
    let patch = json!({"status": {"agentSessions": {replica: session}}});
    match api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            info!(cluster = %event.cluster(), resource = %format!("{namespace}/{name}"),
                connected = matches!(event, ConnectionEvent::Up { .. }), "connection status reported");
            Ok(())
        }
        // The ProxiedCluster is gone (being deleted): nothing to report.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_refs() {
        assert_eq!(
            parse_secret_ref("tether-system/tether-clusters"),
            Ok(SecretRef {
                namespace: "tether-system".into(),
                name: "tether-clusters".into()
            })
        );
        for bad in ["", "x", "/x", "x/", "a/b/c"] {
            assert!(parse_secret_ref(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times_are_whole_seconds_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_600);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:21Z");
    }
}
