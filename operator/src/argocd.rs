//! The ArgoCD cluster Secret that makes a ProxiedCluster a deploy target.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;

pub const SECRET_TYPE_LABEL: &str = "argocd.argoproj.io/secret-type";
/// Labels that tie a Secret in another namespace back to its ProxiedCluster
/// (owner references cannot cross namespaces; the finalizer uses these).
pub const OWNER_NAMESPACE_LABEL: &str = "tether.dev/owner-namespace";
pub const OWNER_NAME_LABEL: &str = "tether.dev/owner-name";

/// ArgoCD's client credentials for the internal port.
#[derive(Clone)]
pub struct ClientTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct ClusterRegistration<'a> {
    pub secret_name: &'a str,
    pub namespace: &'a str,
    /// Name ArgoCD shows (and Applications may select by).
    pub display_name: &'a str,
    pub server: &'a str,
    pub project: Option<&'a str>,
    pub extra_labels: &'a BTreeMap<String, String>,
    pub annotations: &'a BTreeMap<String, String>,
    pub owner: (&'a str, &'a str),
    /// `None` when tether-server runs without TLS.
    pub tls: Option<&'a ClientTls>,
}

/// The cluster Secret of a ProxiedCluster, in `namespace`, as the operator
/// registers it (and `kubectl tether bundle render` writes it).
pub fn secret_for(
    pc: &crate::crd::ProxiedCluster,
    settings: &crate::settings::Settings,
    namespace: &str,
    tls: Option<&ClientTls>,
) -> Secret {
    use kube::ResourceExt;
    let id = pc.cluster_id();
    let owner_namespace = pc.namespace().unwrap_or_else(|| "default".into());
    let owner_name = pc.name_any();
    cluster_secret(&ClusterRegistration {
        secret_name: &secret_name(&id),
        namespace,
        display_name: &id,
        server: &settings.tunnel_url(&id),
        project: pc.spec.argocd.project.as_deref(),
        extra_labels: &pc.spec.argocd.labels,
        annotations: &pc.spec.argocd.annotations,
        owner: (&owner_namespace, &owner_name),
        tls,
    })
}

pub fn secret_name(cluster_id: &str) -> String {
    format!("tether-{cluster_id}")
}

pub fn cluster_secret(reg: &ClusterRegistration<'_>) -> Secret {
    let tls_config = match reg.tls {
        // mTLS: ArgoCD verifies tether-server and presents its certificate;
        // never `insecure: true`.
        Some(tls) => json!({
            "insecure": false,
            "caData": STANDARD.encode(&tls.ca_pem),
            "certData": STANDARD.encode(&tls.cert_pem),
            "keyData": STANDARD.encode(&tls.key_pem),
        }),
        None => json!({ "insecure": false }),
    };
    let config = json!({ "tlsClientConfig": tls_config });
    let mut data = BTreeMap::from([
        (
            "name".to_owned(),
            ByteString(reg.display_name.as_bytes().to_vec()),
        ),
        (
            "server".to_owned(),
            ByteString(reg.server.as_bytes().to_vec()),
        ),
        (
            "config".to_owned(),
            ByteString(config.to_string().into_bytes()),
        ),
    ]);
    if let Some(project) = reg.project {
        data.insert(
            "project".to_owned(),
            ByteString(project.as_bytes().to_vec()),
        );
    }
    let mut labels = reg.extra_labels.clone();
    labels.insert(SECRET_TYPE_LABEL.to_owned(), "cluster".to_owned());
    labels.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        "tether-operator".to_owned(),
    );
    labels.insert(OWNER_NAMESPACE_LABEL.to_owned(), reg.owner.0.to_owned());
    labels.insert(OWNER_NAME_LABEL.to_owned(), reg.owner.1.to_owned());
    Secret {
        metadata: ObjectMeta {
            name: Some(reg.secret_name.to_owned()),
            namespace: Some(reg.namespace.to_owned()),
            labels: Some(labels),
            annotations: (!reg.annotations.is_empty()).then(|| reg.annotations.clone()),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtls_registration_carries_client_credentials_and_never_insecure() {
        let tls = ClientTls {
            ca_pem: "CA".into(),
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
        };
        let labels = BTreeMap::from([("env".to_owned(), "prod".to_owned())]);
        let none = BTreeMap::new();
        let secret = cluster_secret(&ClusterRegistration {
            secret_name: "tether-a",
            namespace: "argocd",
            display_name: "a",
            server: "https://tether-server-internal.tether-system.svc:8080/tunnel/a",
            project: Some("customers"),
            extra_labels: &labels,
            annotations: &none,
            owner: ("tenants", "a"),
            tls: Some(&tls),
        });
        let data = secret.data.expect("data");
        let config: serde_json::Value = serde_json::from_slice(&data["config"].0).expect("json");
        assert_eq!(config["tlsClientConfig"]["insecure"], false);
        assert_eq!(
            config["tlsClientConfig"]["certData"],
            STANDARD.encode("CERT")
        );
        assert_eq!(&data["project"].0, b"customers");
        let labels = secret.metadata.labels.expect("labels");
        assert_eq!(labels[SECRET_TYPE_LABEL], "cluster");
        assert_eq!(labels["env"], "prod");
    }
}
