//! Where the server's clusters come from, and applying changes live.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::{ServerArgs, ServerState};
use crate::clusters::{Clusters, ConfigError};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {source}")]
    Invalid { origin: String, source: ConfigError },
    #[error(
        "no clusters configured: pass --clusters FILE or --clusters-secret NAMESPACE/NAME, or set CLUSTERS"
    )]
    Missing,
}

#[derive(Debug, Clone)]
pub enum ClustersSource {
    File(PathBuf),
    Inline(String),
    /// Watched through the API (see `kubernetes`); starts empty.
    Kubernetes,
    None,
}

impl ClustersSource {
    pub fn from_args(args: &ServerArgs) -> Self {
        match (&args.clusters, &args.clusters_secret, &args.clusters_json) {
            (Some(path), _, _) => Self::File(path.clone()),
            (None, Some(_), _) => Self::Kubernetes,
            (None, None, Some(json)) => Self::Inline(json.clone()),
            (None, None, None) => Self::None,
        }
    }

    pub fn load(&self) -> Result<Clusters, LoadError> {
        match self {
            Self::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
                    path: path.clone(),
                    source,
                })?;
                Clusters::parse(&text).map_err(|source| LoadError::Invalid {
                    origin: path.display().to_string(),
                    source,
                })
            }
            Self::Inline(json) => Clusters::parse(json).map_err(|source| LoadError::Invalid {
                origin: "CLUSTERS".into(),
                source,
            }),
            Self::Kubernetes => Ok(Clusters::default()),
            Self::None => Err(LoadError::Missing),
        }
    }
}

/// Re-reads a clusters file when its content changes (checked every
/// reload interval, which also catches Kubernetes' symlink-swapped Secret
/// volumes) or on SIGHUP. A broken file is logged and the last good
/// configuration stays in force.
pub(super) async fn watch(
    source: ClustersSource,
    state: Arc<ServerState>,
    stop: CancellationToken,
) {
    let ClustersSource::File(path) = &source else {
        return;
    };
    // No snapshot yet: the first tick compares the file with the clusters in
    // force, so a change made before this task first ran is not missed.
    let mut last: Option<Vec<u8>> = None;
    let mut ticker = tokio::time::interval(state.args.reload_interval);
    let mut hangup = hangup_signal();
    loop {
        let forced = tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => false,
            _ = recv_hangup(&mut hangup) => true,
        };
        let Ok(bytes) = std::fs::read(path) else {
            if forced {
                error!(path = %path.display(), "SIGHUP: clusters file unreadable; keeping the current clusters");
            }
            continue;
        };
        if !forced && last.as_ref() == Some(&bytes) {
            continue;
        }
        last = Some(bytes);
        match source.load() {
            Ok(clusters) if *state.clusters() == clusters => {}
            Ok(clusters) => state.set_clusters(clusters),
            Err(err) => {
                error!(error = %err, "clusters reload failed; keeping the current clusters")
            }
        }
        if forced {
            info!("SIGHUP: clusters reloaded");
        }
    }
}

#[cfg(unix)]
fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(unix)]
async fn recv_hangup(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
fn hangup_signal() -> Option<()> {
    None
}

#[cfg(not(unix))]
async fn recv_hangup(_: &mut Option<()>) {
    std::future::pending().await
}
