//! Where the agent keeps renewed credentials: its own Secret in a cluster
//! (so a restarted pod starts with them), or its credentials directory.

use std::sync::Arc;

use base64::Engine;
use http::{Method, StatusCode};

use super::ServerEndpoint;
use super::renewal::Keeper;
use super::upstream::Upstream;
use crate::credentials::{CERT_FILE, CredentialsDir, KEY_FILE};

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

/// Stores renewed credentials and has the connection loop present them.
pub(super) struct AgentKeeper {
    pub store: Store,
    pub endpoint: Arc<ServerEndpoint>,
}

impl Keeper for AgentKeeper {
    async fn save(&self, cert_pem: &str, key_pem: &str) -> Result<(), String> {
        match &self.store {
            Store::Dir(dir) => {
                let dir = dir.clone();
                let (cert, key) = (cert_pem.to_owned(), key_pem.to_owned());
                tokio::task::spawn_blocking(move || {
                    dir.save(&[(CERT_FILE, cert.as_bytes()), (KEY_FILE, key.as_bytes())])
                })
                .await
                .map_err(|err| err.to_string())?
                .map_err(|err| format!("credentials directory: {err}"))
            }
            Store::Secret {
                upstream,
                namespace,
                name,
            } => update_secret(upstream, namespace, name, cert_pem, key_pem).await,
        }
    }

    fn install(&self, cert_pem: &str, key_pem: &str) -> Result<(), String> {
        self.endpoint
            .set_identity(cert_pem, key_pem)
            .map_err(|err| err.to_string())
    }
}

/// Read, change two keys, write back with the version read: a concurrent
/// change makes the update fail (409) and the caller retry.
async fn update_secret(
    upstream: &Upstream,
    namespace: &str,
    name: &str,
    cert_pem: &str,
    key_pem: &str,
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
    let encode = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
    data.insert(CERT_FILE.into(), encode(cert_pem).into());
    data.insert(KEY_FILE.into(), encode(key_pem).into());
    let body = serde_json::to_vec(&secret).map_err(|err| err.to_string())?;
    let (status, _) = upstream.call(Method::PUT, &path, Some(body)).await?;
    if status != StatusCode::OK {
        return Err(format!("updating Secret {namespace}/{name}: {status}"));
    }
    Ok(())
}
