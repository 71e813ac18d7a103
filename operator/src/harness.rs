//! The driver of the `proxied_cluster` fuzz target (`fuzz/`), shared with
//! the test that replays its corpus in CI. It panics when an invariant
//! breaks; that is what the fuzzer reports.

use std::time::SystemTime;

use serde::Deserialize;

use tether::pki::Issued;

use crate::argocd::{self, ClientTls};
use crate::bundle::{self, BundleInput};
use crate::crd::ProxiedCluster;
use crate::reconcile::validate_spec;
use crate::settings::Settings;

/// A ProxiedCluster as the API server hands it to the operator (JSON) and
/// as a user hands it to `kubectl tether bundle render` (YAML): the input is
/// tried as both.
///
/// Invariants: no panic; a spec that validates renders a bundle that passes
/// its own hash check and parses back as YAML documents, and an ArgoCD
/// cluster Secret whose server URL names its cluster.
pub fn proxied_cluster(input: &[u8]) {
    let parsed = [
        serde_json::from_slice::<ProxiedCluster>(input).ok(),
        serde_yaml_ng::from_slice::<ProxiedCluster>(input).ok(),
    ];
    for pc in parsed.iter().flatten() {
        let Ok(valid) = validate_spec(
            pc,
            Some("wss://tether.example.com:443"),
            crate::settings::Settings::defaults().min_cert_duration,
        ) else {
            continue;
        };
        let client = Issued {
            cert_pem: "client certificate".into(),
            key_pem: "client key".into(),
            not_after: SystemTime::UNIX_EPOCH,
        };
        let input = BundleInput::for_cluster(
            pc,
            "tether:fuzz",
            Some(&valid.public_url),
            "token",
            &client,
            "server ca",
        );
        let rendered = bundle::render(&input).expect("a valid spec renders");
        let hash = bundle::verify(&rendered.yaml).expect("a fresh bundle verifies");
        assert_eq!(hash, rendered.sha256);
        for document in serde_yaml_ng::Deserializer::from_str(&rendered.yaml) {
            serde_yaml_ng::Value::deserialize(document).expect("bundle documents parse");
        }
        let tls = ClientTls {
            ca_pem: "ca".into(),
            cert_pem: "cert".into(),
            key_pem: "key".into(),
        };
        let secret = argocd::secret_for(pc, &Settings::defaults(), "argocd", Some(&tls));
        let data = secret.data.unwrap_or_default();
        let server = data
            .get("server")
            .expect("the ArgoCD secret names a server");
        let server = String::from_utf8_lossy(&server.0);
        assert!(
            server.ends_with(&format!("/tunnel/{}", valid.cluster_id)),
            "{server} does not name cluster {}",
            valid.cluster_id
        );
        let labels = secret.metadata.labels.unwrap_or_default();
        assert_eq!(
            labels.get(argocd::SECRET_TYPE_LABEL).map(String::as_str),
            Some("cluster"),
            "spec labels must not override ArgoCD's secret type"
        );
    }
}
