//! The signer of `tether.dev/agent` CertificateSigningRequests: agents
//! renew their client certificates over the tunnel; tether-server turns
//! each request into a CSR labelled with the cluster whose authenticated
//! session asked; this approves and signs it with the operator's CA, only
//! when everything about it is exactly that cluster's.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;
use tether::pki::AgentRequest;
use tether::server::signing::{CLUSTER_LABEL, SIGNER_NAME, condition};
use tracing::{info, warn};

use crate::crd::ProxiedCluster;
use crate::reconcile::{Context, Error, agent_cert_lifetime};

/// The usages an agent certificate may have; "client auth" is required.
const ALLOWED_USAGES: [&str; 3] = ["digital signature", "key encipherment", "client auth"];
/// The API server refuses `spec.expirationSeconds` below this.
const MIN_EXPIRATION: Duration = Duration::from_secs(600);

/// What to do with a CertificateSigningRequest.
#[derive(Debug)]
pub enum Decision {
    /// Not ours (another signer, or not requested by this installation's
    /// tether-server), or already decided and signed.
    Ignore,
    Deny(String),
    /// Approve (if not yet) and sign the checked request, valid for
    /// `lifetime`; `owner` is the ProxiedCluster (namespace, name).
    Sign {
        request: Box<AgentRequest>,
        lifetime: Duration,
        owner: (String, String),
    },
}

/// Decides on `csr` given the ProxiedClusters there are. Pure, so every
/// branch is tested without an API server.
pub fn decide(
    csr: &CertificateSigningRequest,
    clusters: &[Arc<ProxiedCluster>],
    server_username: &str,
    min_cert_duration: Duration,
) -> Decision {
    let spec = &csr.spec;
    if spec.signer_name != SIGNER_NAME
        || condition(csr, "Denied").is_some()
        || condition(csr, "Failed").is_some()
        || csr
            .status
            .as_ref()
            .and_then(|s| s.certificate.as_ref())
            .is_some_and(|c| !c.0.is_empty())
    {
        return Decision::Ignore;
    }
    // Not this installation's server: another tether (or someone with
    // create rights) made it. Never approved here, and not denied either,
    // in case it is another installation's to sign.
    if spec.username.as_deref() != Some(server_username) {
        return Decision::Ignore;
    }
    let Some(id) = csr.labels().get(CLUSTER_LABEL) else {
        return Decision::Deny(format!("no {CLUSTER_LABEL} label"));
    };
    let Some(pc) = clusters
        .iter()
        .find(|pc| pc.cluster_id() == *id && pc.metadata.deletion_timestamp.is_none())
    else {
        return Decision::Deny(format!("no ProxiedCluster has cluster id {id:?}"));
    };
    if pc.spec.certificates.agent_secret_ref.is_some() {
        return Decision::Deny(format!(
            "cluster {id:?} brings its own agent certificate (spec.certificates.agentSecretRef)"
        ));
    }
    let Ok(pem) = std::str::from_utf8(&spec.request.0) else {
        return Decision::Deny("the request is not PEM".into());
    };
    let request = match AgentRequest::check(pem, id) {
        Ok(request) => request,
        Err(refusal) => return Decision::Deny(refusal.to_string()),
    };
    let usages = spec.usages.clone().unwrap_or_default();
    if !usages.iter().any(|u| u == "client auth")
        || usages.iter().any(|u| !ALLOWED_USAGES.contains(&u.as_str()))
    {
        return Decision::Deny(format!(
            "usages {usages:?}: an agent certificate is for client authentication only"
        ));
    }
    // The spec's lifetime, or the request's if shorter (the CSR API's
    // expirationSeconds), never under the minimum.
    let lifetime = match agent_cert_lifetime(pc, min_cert_duration) {
        Ok(lifetime) => lifetime,
        Err(problem) => return Decision::Deny(format!("ProxiedCluster is invalid: {problem}")),
    };
    let requested = spec
        .expiration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs);
    let lifetime = requested.map_or(lifetime, |r| r.max(MIN_EXPIRATION).min(lifetime));
    Decision::Sign {
        request: Box::new(request),
        lifetime,
        owner: (pc.namespace().unwrap_or_default(), pc.name_any()),
    }
}

fn approval_condition(type_: &str, reason: &str, message: &str) -> serde_json::Value {
    json!({
        "type": type_,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastUpdateTime": Time(Timestamp::now()),
    })
}

/// Carries out [`decide`]'s decision on one CertificateSigningRequest.
pub async fn reconcile(
    csr: Arc<CertificateSigningRequest>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    // Deciding before every ProxiedCluster is known would deny a valid
    // request for good.
    if ctx.store.wait_until_ready().await.is_err() {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let decision = decide(
        &csr,
        &ctx.store.state(),
        &ctx.settings.server_username(),
        ctx.settings.min_cert_duration,
    );
    let name = csr.name_any();
    let api: Api<CertificateSigningRequest> = Api::all(ctx.client.clone());
    match decision {
        Decision::Ignore => {}
        Decision::Deny(reason) => {
            warn!(csr = %name, %reason, "agent certificate request denied");
            let patch = json!({"status": {"conditions": [
                approval_condition("Denied", "TetherAgentIdentity", &reason)
            ]}});
            api.patch_approval(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        Decision::Sign {
            request,
            lifetime,
            owner: (namespace, owner),
        } => {
            let cluster = &request.cluster_id;
            if condition(&csr, "Approved").is_none() {
                let patch = json!({"status": {"conditions": [approval_condition(
                    "Approved",
                    "TetherAgentIdentity",
                    &format!("the request is exactly cluster {cluster}'s agent identity"),
                )]}});
                api.patch_approval(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            let certificate = ctx.pki().ca.sign_agent_request(&request, lifetime)?;
            let patch = json!({"status": {"certificate": ByteString(certificate.into_bytes())}});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            info!(csr = %name, %cluster, lifetime = ?lifetime, "agent certificate signed");
            // Completes a pending rotation (see reconcile::certificate_rotation).
            let signed =
                json!({"status": {"certificates": {"lastSigned": Time(Timestamp::now())}}});
            Api::<ProxiedCluster>::namespaced(ctx.client.clone(), &namespace)
                .patch_status(&owner, &PatchParams::default(), &Patch::Merge(&signed))
                .await?;
        }
    }
    Ok(Action::await_change())
}

pub fn error_policy(
    csr: Arc<CertificateSigningRequest>,
    error: &Error,
    _ctx: Arc<Context>,
) -> Action {
    warn!(csr = %csr.name_any(), %error, "signing failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "system:serviceaccount:tether-system:tether-server";
    const HOUR: Duration = Duration::from_secs(3600);

    fn cluster(name: &str, spec: serde_json::Value) -> Arc<ProxiedCluster> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "tether.dev/v1alpha1", "kind": "ProxiedCluster",
                "metadata": {"name": name, "namespace": "t"}, "spec": spec,
            }))
            .expect("a ProxiedCluster"),
        )
    }

    fn csr(cluster: &str, pem: &str, patch: serde_json::Value) -> CertificateSigningRequest {
        let mut object = json!({
            "metadata": {"name": "r", "labels": {CLUSTER_LABEL: cluster}},
            "spec": {
                "request": ByteString(pem.as_bytes().to_vec()),
                "signerName": SIGNER_NAME,
                "usages": ["digital signature", "client auth"],
                "username": SERVER,
            },
        });
        json_patch(&mut object, patch);
        serde_json::from_value(object).expect("a CSR")
    }

    /// Merges `patch` into `target` (JSON merge patch semantics).
    fn json_patch(target: &mut serde_json::Value, patch: serde_json::Value) {
        match (target, patch) {
            (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
                for (key, value) in p {
                    if value.is_null() {
                        t.remove(&key);
                    } else {
                        json_patch(t.entry(key).or_insert(serde_json::Value::Null), value);
                    }
                }
            }
            (t, p) => *t = p,
        }
    }

    fn decision(csr: &CertificateSigningRequest) -> Decision {
        let clusters = [
            cluster("dev", json!({"certificates": {"agentDuration": "2h"}})),
            cluster(
                "byo",
                json!({"certificates": {"agentSecretRef": {"name": "mine"}}}),
            ),
        ];
        decide(csr, &clusters, SERVER, HOUR)
    }

    fn denied(decision: Decision) -> String {
        match decision {
            Decision::Deny(reason) => reason,
            other => panic!("not denied: {other:?}"),
        }
    }

    #[test]
    fn signs_exactly_the_clusters_identity_for_its_lifetime() {
        let (pem, _) = AgentRequest::create("dev").expect("csr");
        match decision(&csr("dev", &pem, json!({}))) {
            Decision::Sign {
                request,
                lifetime,
                owner,
            } => {
                assert_eq!(owner, ("t".to_owned(), "dev".to_owned()));
                assert_eq!(request.cluster_id, "dev");
                assert_eq!(lifetime, 2 * HOUR, "from the spec");
            }
            other => panic!("{other:?}"),
        }
        match decision(&csr(
            "dev",
            &pem,
            json!({"spec": {"expirationSeconds": 60}}),
        )) {
            Decision::Sign { lifetime, .. } => {
                assert_eq!(
                    lifetime, MIN_EXPIRATION,
                    "shorter on request, within the API's floor"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn denies_every_other_request() {
        let (dev, _) = AgentRequest::create("dev").expect("csr");
        let (byo, _) = AgentRequest::create("byo").expect("csr");
        let (prod, _) = AgentRequest::create("prod").expect("csr");
        for (request, expected) in [
            (csr("dev", &prod, json!({})), "identity \"prod\""),
            (
                csr("prod", &prod, json!({})),
                "no ProxiedCluster has cluster id \"prod\"",
            ),
            (
                csr("byo", &byo, json!({})),
                "brings its own agent certificate",
            ),
            (
                csr(
                    "dev",
                    &dev,
                    json!({"spec": {"usages": ["client auth", "server auth"]}}),
                ),
                "client authentication only",
            ),
            (
                csr(
                    "dev",
                    &dev,
                    json!({"spec": {"usages": ["digital signature"]}}),
                ),
                "client authentication only",
            ),
            (csr("dev", "junk", json!({})), "not a PKCS#10 request"),
            (
                csr("dev", &dev, json!({"metadata": {"labels": null}})),
                "no tether.dev/cluster label",
            ),
        ] {
            let reason = denied(decision(&request));
            assert!(reason.contains(expected), "{reason:?} lacks {expected:?}");
        }
    }

    #[test]
    fn ignores_other_signers_other_requesters_and_finished_requests() {
        let (dev, _) = AgentRequest::create("dev").expect("csr");
        for patch in [
            json!({"spec": {"username": "system:serviceaccount:x:y"}}),
            json!({"spec": {"signerName": "kubernetes.io/kube-apiserver-client"}}),
            json!({"status": {"conditions": [{"type": "Denied", "status": "True"}]}}),
            json!({"status": {"certificate": ByteString(b"pem".to_vec())}}),
        ] {
            assert!(matches!(
                decision(&csr("dev", &dev, patch)),
                Decision::Ignore
            ));
        }
    }
}
