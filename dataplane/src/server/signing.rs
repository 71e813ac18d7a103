//! Agent certificate renewal, server side: a request arrives over an
//! agent's authenticated session, is checked against that session's
//! cluster, and is signed by tether-operator (a Kubernetes
//! CertificateSigningRequest for signer `tether.dev/agent`) or, standalone,
//! by a CA on disk. The agent's private key never comes here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use super::ServerState;
use crate::credentials::Message;
use crate::mux::Session;
use crate::pki::{AgentRequest, CertificateAuthority, RequestRefusal};

/// The signer name of agent certificates in the Kubernetes CSR API.
pub const SIGNER_NAME: &str = "tether.dev/agent";
/// Label on a CertificateSigningRequest: the cluster whose session asked.
pub const CLUSTER_LABEL: &str = "tether.dev/cluster";
/// One request per session this often at most: each may create an API
/// object, and a well-behaved agent asks once in months.
const MIN_REQUEST_GAP: Duration = Duration::from_secs(5);
const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{0}")]
    Refused(#[from] RequestRefusal),
    #[error("this tether-server does not sign agent certificates")]
    Unavailable,
    #[error("the signer denied the request: {0}")]
    Denied(String),
    #[error("not signed within {0:?}")]
    Timeout(Duration),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("signing failed: {0}")]
    Pki(#[from] crate::pki::PkiError),
}

impl SignError {
    /// The metric label of this outcome.
    fn result(&self) -> &'static str {
        match self {
            SignError::Refused(_) => "refused",
            SignError::Unavailable => "unavailable",
            SignError::Denied(_) => "denied",
            SignError::Timeout(_) | SignError::Kube(_) | SignError::Pki(_) => "failed",
        }
    }
}

/// Who signs agent certificates.
pub enum Signer {
    /// Standalone: a CA on disk (`--signer-ca-cert`, `--signer-ca-key`).
    Local {
        ca: Box<CertificateAuthority>,
        validity: Duration,
    },
    /// In Kubernetes: tether-operator, through a CertificateSigningRequest.
    Kubernetes {
        client: Client,
        timeout: Duration,
    },
    None,
}

impl Signer {
    async fn sign(&self, request: &AgentRequest, csr_pem: &str) -> Result<String, SignError> {
        match self {
            Signer::Local { ca, validity } => Ok(ca.sign_agent_request(request, *validity)?),
            Signer::Kubernetes { client, timeout } => {
                sign_with_kubernetes(client, &request.cluster_id, csr_pem, *timeout).await
            }
            Signer::None => Err(SignError::Unavailable),
        }
    }
}

/// The condition `type_` of a CertificateSigningRequest, when it is true.
pub fn condition<'a>(
    csr: &'a CertificateSigningRequest,
    type_: &str,
) -> Option<&'a CertificateSigningRequestCondition> {
    csr.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
}

async fn sign_with_kubernetes(
    client: &Client,
    cluster: &str,
    csr_pem: &str,
    timeout: Duration,
) -> Result<String, SignError> {
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let object = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(format!("tether-agent-{cluster}-")),
            labels: Some([(CLUSTER_LABEL.to_owned(), cluster.to_owned())].into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr_pem.as_bytes().to_vec()),
            signer_name: SIGNER_NAME.to_owned(),
            usages: Some(vec!["digital signature".into(), "client auth".into()]),
            ..Default::default()
        },
        status: None,
    };
    let name = api
        .create(&PostParams::default(), &object)
        .await?
        .name_any();
    info!(cluster, csr = %name, "certificate signing request created");
    let deadline = Instant::now() + timeout;
    loop {
        let current = api.get(&name).await?;
        if let Some(refusal) =
            condition(&current, "Denied").or_else(|| condition(&current, "Failed"))
        {
            return Err(SignError::Denied(
                refusal
                    .message
                    .clone()
                    .unwrap_or_else(|| refusal.type_.clone()),
            ));
        }
        let status = current.status.unwrap_or_default();
        if let Some(certificate) = status.certificate.filter(|c| !c.0.is_empty()) {
            return String::from_utf8(certificate.0)
                .map_err(|_| SignError::Denied("the signed certificate is not PEM".into()));
        }
        if Instant::now() >= deadline {
            return Err(SignError::Timeout(timeout));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Answers the credentials messages of one agent session of `cluster`.
pub(super) async fn serve(state: Arc<ServerState>, cluster: String, session: Session) {
    let Some(mut messages) = session.take_credentials() else {
        return;
    };
    let mut last_request: Option<Instant> = None;
    while let Some(payload) = messages.recv().await {
        let answer = match Message::decode(&payload) {
            Ok(Message::CertificateRequest { csr }) => {
                if last_request.is_some_and(|at| at.elapsed() < MIN_REQUEST_GAP) {
                    count(&state, "throttled");
                    Message::Refused {
                        reason: format!("at most one request every {MIN_REQUEST_GAP:?}"),
                    }
                } else {
                    last_request = Some(Instant::now());
                    // Boxed: signing's state (API calls) is large, and this
                    // task idles beside every session until a request comes.
                    Box::pin(renew(&state, &cluster, &csr)).await
                }
            }
            Ok(other) => {
                warn!(%cluster, kind = other.kind(), "agent sent a message only servers send");
                count(&state, "malformed");
                Message::Refused {
                    reason: "agents may only send certificate requests".into(),
                }
            }
            Err(err) => {
                warn!(%cluster, error = %err, "malformed credentials message");
                count(&state, "malformed");
                Message::Refused {
                    reason: "malformed credentials message".into(),
                }
            }
        };
        session.send_credentials(answer.encode());
    }
}

async fn renew(state: &ServerState, cluster: &str, csr: &str) -> Message {
    let signed = match AgentRequest::check(csr, cluster) {
        Ok(request) => state.signer.sign(&request, csr).await,
        Err(refusal) => Err(SignError::Refused(refusal)),
    };
    match signed {
        Ok(certificate) => {
            count(state, "signed");
            info!(%cluster, "agent certificate renewed");
            Message::Certificate { certificate }
        }
        Err(err) => {
            count(state, err.result());
            warn!(%cluster, error = %err, "agent certificate request not signed");
            Message::Refused {
                reason: err.to_string(),
            }
        }
    }
}

fn count(state: &ServerState, result: &str) {
    state
        .metrics
        .certificate_requests
        .with_label_values(&[result])
        .inc();
}
