//! Where the agent keeps renewed credentials: its own Secret in a cluster
//! (so a restarted pod starts with them), or its credentials directory.

use std::sync::{Arc, RwLock};

use base64::Engine;
use http::{Method, StatusCode};
use tokio::sync::watch;

use super::renewal::Keeper;
use super::upstream::Upstream;
use super::{AgentArgs, AgentError, ServerEndpoint};
use crate::credentials::CredentialsDir;

/// The credentials the next connections use. The token is read from its
/// file at every dial, unless a new one arrived over the tunnel (a mounted
/// Secret shows an update only after a while). A new token or certificate
/// makes the connection loop replace its sessions.
pub(super) struct Credentials {
    received: RwLock<Option<String>>,
    changed: watch::Sender<u64>,
}

impl Credentials {
    pub fn new() -> Self {
        Self {
            received: RwLock::new(None),
            changed: watch::channel(0).0,
        }
    }

    pub fn current(&self, args: &AgentArgs) -> Result<String, AgentError> {
        match &*self.received.read().unwrap_or_else(|p| p.into_inner()) {
            Some(token) => Ok(token.clone()),
            None => super::read_token(args),
        }
    }

    pub fn set_token(&self, token: &str) {
        *self.received.write().unwrap_or_else(|p| p.into_inner()) = Some(token.to_owned());
        self.changed();
    }

    /// The sessions up present what is now outdated: replace them.
    pub fn changed(&self) {
        self.changed.send_modify(|generation| *generation += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

pub(super) enum Store {
    Dir(CredentialsDir),
    /// The Secret the credentials directory is mounted from, written
    /// through the API with the bundle's RBAC (get and update on this
    /// Secret only).
    Secret {
        upstream: Arc<Upstream>,
        namespace: String,
        name: String,
    },
}

/// Stores renewed credentials and has the connection loop use them.
pub(super) struct AgentKeeper {
    pub store: Store,
    pub endpoint: Arc<ServerEndpoint>,
    pub credentials: Arc<Credentials>,
    pub args: AgentArgs,
}

impl Keeper for AgentKeeper {
    async fn save(&self, files: &[(&'static str, &str)]) -> Result<(), String> {
        match &self.store {
            Store::Dir(dir) => {
                let dir = dir.clone();
                let files: Vec<(&'static str, String)> =
                    files.iter().map(|(f, c)| (*f, (*c).to_owned())).collect();
                tokio::task::spawn_blocking(move || {
                    let updates: Vec<(&str, &[u8])> =
                        files.iter().map(|(f, c)| (*f, c.as_bytes())).collect();
                    dir.save(&updates)
                })
                .await
                .map_err(|err| err.to_string())?
                .map_err(|err| format!("credentials directory: {err}"))
            }
            Store::Secret {
                upstream,
                namespace,
                name,
            } => update_secret(upstream, namespace, name, files).await,
        }
    }

    fn install(&self, cert_pem: &str, key_pem: &str) -> Result<(), String> {
        self.endpoint
            .set_identity(cert_pem, key_pem)
            .map_err(|err| err.to_string())?;
        // Present it now, not at the next disconnect: status shows the
        // certificate in use, and the old one is used nowhere.
        self.credentials.changed();
        Ok(())
    }

    fn install_token(&self, token: &str) {
        self.credentials.set_token(token);
    }

    fn token(&self) -> Option<String> {
        self.credentials.current(&self.args).ok()
    }
}

/// Read, change the keys, write back with the version read: a concurrent
/// change makes the update fail (409) and the caller retry.
async fn update_secret(
    upstream: &Upstream,
    namespace: &str,
    name: &str,
    files: &[(&'static str, &str)],
) -> Result<(), String> {
    let path = format!("/api/v1/namespaces/{namespace}/secrets/{name}");
    let (status, body) = upstream.call(Method::GET, &path, None).await?;
    if status != StatusCode::OK {
        return Err(format!("reading Secret {namespace}/{name}: {status}"));
    }
    let mut secret: serde_json::Value =
        serde_json::from_slice(&body).map_err(|_| "the Secret is not JSON".to_owned())?;
    let data = secret
        .as_object_mut()
        .ok_or("the Secret is not an object")?
        .entry("data")
        .or_insert_with(|| serde_json::json!({}));
    let data = data
        .as_object_mut()
        .ok_or("the Secret's data is not an object")?;
    for (file, contents) in files {
        let encoded = base64::engine::general_purpose::STANDARD.encode(contents);
        data.insert((*file).into(), encoded.into());
    }
    let body = serde_json::to_vec(&secret).map_err(|err| err.to_string())?;
    let (status, _) = upstream.call(Method::PUT, &path, Some(body)).await?;
    if status != StatusCode::OK {
        return Err(format!("updating Secret {namespace}/{name}: {status}"));
    }
    Ok(())
}
