//! The operator's certificate authority and the certificates shared by all
//! clusters: tether-server's and ArgoCD's. Kept in Secrets in the operator's
//! namespace; created once, reused, renewed at two thirds of their life.

use std::collections::BTreeMap;
use std::time::SystemTime;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Api, Client};
use tether::pki::{CertInfo, CertificateAuthority, Issued, LeafRequest, PkiError};
use tracing::{info, warn};

use crate::argocd::ClientTls;
use crate::objects::{Applied, ensure_secret, secret_text};
use crate::settings::Settings;

pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";
/// What a certificate was issued for (names, cluster, lifetime): when the
/// desired value differs, the certificate is reissued.
const ISSUED_FOR_ANNOTATION: &str = "tether.dev/issued-for";

#[derive(Debug, thiserror::Error)]
pub enum GlobalPkiError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("certificate: {0}")]
    Pki(#[from] PkiError),
    #[error("Secret {0} lacks {1}")]
    Missing(String, &'static str),
}

/// What every reconcile needs from the shared PKI.
pub struct GlobalPki {
    pub ca: CertificateAuthority,
    /// The CA that signed tether-server's certificate (agents trust it).
    pub server_ca_pem: String,
    /// ArgoCD's client credentials for the internal port.
    pub argocd: ClientTls,
    /// The earliest renewal time among the shared certificates.
    pub renew_at: SystemTime,
}

/// A `kubernetes.io/tls` Secret (plus `ca.crt`), as cert-manager writes them.
pub fn tls_secret(name: &str, namespace: &str, issued: &Issued, ca_pem: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "tether-operator".to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some(TLS_SECRET_TYPE.to_owned()),
        data: Some(BTreeMap::from([
            ("ca.crt".to_owned(), ByteString(ca_pem.as_bytes().to_vec())),
            (
                "tls.crt".to_owned(),
                ByteString(issued.cert_pem.as_bytes().to_vec()),
            ),
            (
                "tls.key".to_owned(),
                ByteString(issued.key_pem.as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    }
}

/// Reads an issued certificate back from a TLS Secret.
pub fn issued_from(secret: &Secret) -> Option<(Issued, CertInfo, Option<String>)> {
    let cert_pem = secret_text(secret, "tls.crt")?;
    let key_pem = secret_text(secret, "tls.key")?;
    let info = CertInfo::from_pem(&cert_pem).ok()?;
    let ca = secret_text(secret, "ca.crt");
    Some((
        Issued {
            cert_pem,
            key_pem,
            not_after: info.not_after,
        },
        info,
        ca,
    ))
}

/// A CA that expires ends every agent's tunnel: its expiry is logged at
/// every load, as a warning in its last year.
fn announce_ca_expiry(cert_pem: &str) {
    let Ok(info) = CertInfo::from_pem(cert_pem) else {
        return;
    };
    const YEAR: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
    match info.not_after.duration_since(SystemTime::now()) {
        Ok(left) if left > YEAR => info!(not_after = ?info.not_after, "tether CA loaded"),
        _ => warn!(not_after = ?info.not_after,
            "the tether CA expires within a year: every bundle will need replacing (README: The CA)"),
    }
}

/// Loads the CA, or creates it on first start. A concurrent creator (another
/// replica) wins cleanly: its CA is read back.
async fn ensure_ca(
    api: &Api<Secret>,
    settings: &Settings,
) -> Result<CertificateAuthority, GlobalPkiError> {
    let name = &settings.ca_secret;
    if let Some(existing) = api.get_opt(name).await? {
        let cert = secret_text(&existing, "tls.crt")
            .ok_or_else(|| GlobalPkiError::Missing(name.clone(), "tls.crt"))?;
        let key = secret_text(&existing, "tls.key")
            .ok_or_else(|| GlobalPkiError::Missing(name.clone(), "tls.key"))?;
        announce_ca_expiry(&cert);
        return Ok(CertificateAuthority::from_pem(&cert, &key)?);
    }
    let ca = CertificateAuthority::generate("tether operator CA", settings.ca_duration)?;
    let as_issued = Issued {
        cert_pem: ca.cert_pem().to_owned(),
        key_pem: ca.key_pem().to_owned(),
        not_after: SystemTime::now() + settings.ca_duration,
    };
    let secret = tls_secret(name, &settings.namespace, &as_issued, ca.cert_pem());
    match ensure_secret(api, None, secret).await {
        Ok(_) => {
            info!(secret = %name, "created the tether CA");
            Ok(ca)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            Box::pin(ensure_ca(api, settings)).await
        }
        Err(err) => Err(err.into()),
    }
}

/// Where a leaf certificate lives and what it must say.
pub struct LeafSecret<'a> {
    pub api: &'a Api<Secret>,
    pub name: &'a str,
    pub namespace: &'a str,
    pub request: &'a LeafRequest,
    /// Owner references for the Secret (a ProxiedCluster owns its agent's).
    pub owner: Option<OwnerReference>,
}

/// Issues (or keeps) a leaf in a TLS Secret. Reissued when missing, due for
/// renewal, signed by another CA, or issued for something else.
pub async fn ensure_leaf(
    leaf: LeafSecret<'_>,
    ca: &CertificateAuthority,
) -> Result<(Issued, CertInfo, Applied), GlobalPkiError> {
    let request = leaf.request;
    let issued_for = format!(
        "cn={};dns={};uri={};validity={}s",
        request.common_name,
        request.dns_names.join(","),
        request.uris.join(","),
        request.validity.as_secs()
    );
    let current = leaf.api.get_opt(leaf.name).await?;
    if let Some(existing) = &current
        && let Some((issued, info, existing_ca)) = issued_from(existing)
    {
        let same_request = existing
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ISSUED_FOR_ANNOTATION))
            == Some(&issued_for);
        if same_request
            && existing_ca.as_deref() == Some(ca.cert_pem())
            && !info.due(SystemTime::now())
        {
            return Ok((issued, info, Applied::Unchanged));
        }
    }
    let issued = ca.issue(request)?;
    let info = CertInfo::from_pem(&issued.cert_pem)?;
    let mut secret = tls_secret(leaf.name, leaf.namespace, &issued, ca.cert_pem());
    secret.metadata.annotations = Some(BTreeMap::from([(
        ISSUED_FOR_ANNOTATION.to_owned(),
        issued_for,
    )]));
    secret.metadata.owner_references = leaf.owner.map(|o| vec![o]);
    let applied = ensure_secret(leaf.api, current, secret).await?;
    info!(secret = %leaf.name, namespace = %leaf.namespace, not_after = ?info.not_after, "issued certificate");
    Ok((issued, info, applied))
}

/// Ensures the CA, tether-server's certificate (unless brought by the user)
/// and ArgoCD's client certificate.
pub async fn ensure_global(
    client: &Client,
    settings: &Settings,
) -> Result<GlobalPki, GlobalPkiError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let ca = ensure_ca(&api, settings).await?;
    let mut renew_at = SystemTime::now() + std::time::Duration::from_secs(24 * 3600);
    let server_ca_pem = if settings.byo_server_certificate {
        let secret = api
            .get_opt(&settings.server_tls_secret)
            .await?
            .ok_or_else(|| {
                GlobalPkiError::Missing(settings.server_tls_secret.clone(), "the Secret itself")
            })?;
        secret_text(&secret, "ca.crt")
            .ok_or_else(|| GlobalPkiError::Missing(settings.server_tls_secret.clone(), "ca.crt"))?
    } else {
        let mut request =
            LeafRequest::server("tether-server", &[], &[], settings.server_cert_duration);
        request.dns_names = settings.server_dns_names();
        let leaf = LeafSecret {
            api: &api,
            name: &settings.server_tls_secret,
            namespace: &settings.namespace,
            request: &request,
            owner: None,
        };
        let (_, info, _) = ensure_leaf(leaf, &ca).await?;
        renew_at = renew_at.min(info.renew_at());
        ca.cert_pem().to_owned()
    };
    let request = LeafRequest::client("argocd", settings.argocd_cert_duration);
    let leaf = LeafSecret {
        api: &api,
        name: &settings.argocd_tls_secret,
        namespace: &settings.namespace,
        request: &request,
        owner: None,
    };
    let (issued, info, _) = ensure_leaf(leaf, &ca).await?;
    renew_at = renew_at.min(info.renew_at());
    let argocd = ClientTls {
        ca_pem: server_ca_pem.clone(),
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
    };
    Ok(GlobalPki {
        ca,
        server_ca_pem,
        argocd,
        renew_at,
    })
}
