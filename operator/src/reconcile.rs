//! The ProxiedCluster reconciler: token, agent certificate, the server's
//! clusters configuration, ArgoCD registration, the agent bundle, status.
//! Idempotent: with nothing to change it reads and writes nothing new.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use rand::RngCore;
use serde_json::json;
use sha2::{Digest, Sha256};
use tether::pki::{CertInfo, LeafRequest};
use tracing::{info, warn};

use crate::argocd;
use crate::bundle::{self, BundleInput};
use crate::connection;
use crate::crd::{
    BundleRef, CertificatesStatus, ConnectionStatus, ProxiedCluster, ProxiedClusterSpec,
    ProxiedClusterStatus,
};
use crate::objects::{Applied, delete_secret, ensure_secret, secret_text};
use crate::pki::{GlobalPki, GlobalPkiError, LeafSecret, ensure_leaf, issued_from};
use crate::settings::{Settings, url_host};

pub const FINALIZER: &str = "tether.dev/cleanup";
const CREDENTIALS_EXPIRED: &str = "AgentCredentialsExpired";
const ROTATION_ANNOTATION: &str = "tether.dev/token-rotation";
/// On the token Secret during a rotation's overlap: the previous token's
/// SHA-256 and until when it is accepted.
const PREVIOUS_TOKEN_ANNOTATION: &str = "tether.dev/previous-token-sha256";
const OVERLAP_UNTIL_ANNOTATION: &str = "tether.dev/previous-token-until";
pub use tether::server::kubernetes::CLUSTERS_KEY;
pub const BUNDLE_KEY: &str = "bundle.yaml";
/// Longest time between two reconciles of a healthy object.
const RESYNC: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Pki(#[from] GlobalPkiError),
    #[error("bundle: {0}")]
    Bundle(#[from] bundle::BundleError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),
    #[error("signing: {0}")]
    Sign(#[from] tether::pki::PkiError),
}

impl Error {
    /// A bounded label for metrics (controller-rs's pattern): the kind,
    /// never the message.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Pki(_) => "pki",
            Error::Bundle(_) => "bundle",
            Error::Finalizer(_) => "finalizer",
            Error::MissingObjectKey(_) => "missing_key",
            Error::Sign(_) => "signing",
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pki: RwLock<Arc<GlobalPki>>,
    pub recorder: Recorder,
    /// All ProxiedClusters, to find duplicate cluster ids.
    pub store: Store<ProxiedCluster>,
    failures: Mutex<HashMap<String, u32>>,
    /// Serialises writes of the shared clusters Secret: concurrent
    /// reconciles would otherwise conflict on it endlessly. (Leader election
    /// makes this process its only writer.)
    server_config: tokio::sync::Mutex<()>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        pki: GlobalPki,
        recorder: Recorder,
        store: Store<ProxiedCluster>,
    ) -> Self {
        Self {
            client,
            settings,
            pki: RwLock::new(Arc::new(pki)),
            recorder,
            store,
            failures: Mutex::new(HashMap::new()),
            server_config: tokio::sync::Mutex::new(()),
        }
    }

    pub fn pki(&self) -> Arc<GlobalPki> {
        self.pki.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_pki(&self, pki: GlobalPki) {
        *self.pki.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(pki);
    }

    async fn publish(&self, pc: &ProxiedCluster, type_: EventType, reason: &str, note: String) {
        let event = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &pc.object_ref(&())).await {
            warn!(error = %err, reason, "cannot record event");
        }
    }
}

pub async fn reconcile(pc: Arc<ProxiedCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = pc.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
    let api: Api<ProxiedCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = format!("{namespace}/{}", pc.name_any());
    let result = finalizer(&api, FINALIZER, pc, |event| async {
        match event {
            Event::Apply(pc) => apply(&pc, &ctx).await,
            Event::Cleanup(pc) => cleanup(&pc, &ctx).await,
        }
    })
    .await
    .map_err(|err| Error::Finalizer(Box::new(err)));
    if result.is_ok() {
        ctx.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }
    result
}

/// Failed reconciles retry with exponential backoff per object: 5 s, 10 s,
/// ... up to 5 minutes.
pub fn error_policy(pc: Arc<ProxiedCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", pc.namespace().unwrap_or_default(), pc.name_any());
    let mut failures = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
    let count = failures.entry(key.clone()).or_insert(0);
    *count += 1;
    let delay = retry_delay(*count);
    warn!(object = %key, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The wait before retry number `failures` (1-based) of one object.
pub fn retry_delay(failures: u32) -> Duration {
    Duration::from_secs(5)
        .saturating_mul(1 << failures.saturating_sub(1).min(6))
        .min(Duration::from_secs(300))
}

/// Names of the objects a ProxiedCluster owns in its namespace.
pub fn token_secret_name(pc: &ProxiedCluster) -> String {
    format!("{}-tether-token", pc.name_any())
}

pub fn agent_tls_secret_name(pc: &ProxiedCluster) -> String {
    format!("{}-tether-agent-tls", pc.name_any())
}

pub fn bundle_secret_name(pc: &ProxiedCluster) -> String {
    format!("{}-tether-bundle", pc.name_any())
}

fn owned_meta(
    pc: &ProxiedCluster,
    name: &str,
    annotations: BTreeMap<String, String>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: pc.namespace(),
        labels: Some(BTreeMap::from([
            (
                "app.kubernetes.io/managed-by".to_owned(),
                "tether-operator".to_owned(),
            ),
            ("tether.dev/cluster".to_owned(), pc.name_any()),
        ])),
        annotations: (!annotations.is_empty()).then_some(annotations),
        owner_references: pc.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// What a spec that passes [`validate_spec`] settles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSpec {
    pub cluster_id: String,
    pub agent_cert_lifetime: Duration,
    /// The agent dials this: the spec's, else the operator's default.
    pub public_url: String,
}

/// Spec problems the schema cannot catch, in one place for the reconciler
/// and `kubectl tether bundle render`. `Err` carries a message for the
/// Ready condition.
pub fn validate_spec(
    pc: &ProxiedCluster,
    default_public_url: Option<&str>,
    min_cert_duration: Duration,
) -> Result<ValidSpec, String> {
    let id = pc.cluster_id();
    if !tether::clusters::is_dns_label(&id) {
        return Err(format!(
            "cluster id {id:?} is not a DNS label; set spec.clusterId"
        ));
    }
    // The schema says as much, but `kubectl tether bundle render` reads
    // files no API server has validated, and a control character would make
    // the rendered bundle unparseable YAML (found by fuzzing).
    if let Some(field) = field_with_control_character(&pc.spec) {
        return Err(format!("{field} contains a control character"));
    }
    let namespace = &pc.spec.agent.namespace;
    if !tether::clusters::is_dns_label(namespace) {
        return Err(format!(
            "spec.agent.namespace {namespace:?} is not a DNS label"
        ));
    }
    let target = &pc.spec.target_address;
    if !tether::clusters::is_host_port(target) {
        return Err(format!("spec.targetAddress {target:?} is not host:port"));
    }
    let lifetime = agent_cert_lifetime(pc, min_cert_duration)?;
    let url = pc
        .spec
        .public_url
        .as_deref()
        .or(default_public_url)
        .ok_or("no public URL: set spec.publicUrl or the operator's --public-url")?;
    if !(url.starts_with("wss://") || url.starts_with("ws://")) || url_host(url).is_none() {
        return Err(format!("public URL {url:?} is not ws(s)://host[:port]"));
    }
    if let Some(proxy) = &pc.spec.agent.proxy {
        check_proxy(proxy)?;
    }
    if let Some(metrics) = &pc.spec.agent.metrics {
        if !matches!(metrics.auth.as_str(), "kubernetes" | "none") {
            return Err(format!(
                "spec.agent.metrics.auth {:?} is neither kubernetes nor none",
                metrics.auth
            ));
        }
        if let Some(bad) = metrics
            .allowed_namespaces
            .iter()
            .find(|ns| !tether::clusters::is_dns_label(ns))
        {
            return Err(format!(
                "spec.agent.metrics.allowedNamespaces: {bad:?} is not a namespace name"
            ));
        }
    }
    Ok(ValidSpec {
        cluster_id: id,
        agent_cert_lifetime: lifetime,
        public_url: url.to_owned(),
    })
}

/// `spec.agent.proxy`: a URL the agent accepts, without credentials, and a
/// CA that holds a certificate.
pub fn check_proxy(proxy: &crate::crd::AgentProxySpec) -> Result<(), String> {
    if proxy.url.contains('@') {
        return Err("spec.agent.proxy.url must not hold credentials: name a Secret the customer creates in spec.agent.proxy.credentialsSecretName".into());
    }
    tether::agent::check_proxy_url(&proxy.url)
        .map_err(|err| format!("spec.agent.proxy.url: {err}"))?;
    if let Some(pem) = &proxy.ca_cert
        && tether::tls::certs_from_pem(pem.as_bytes()).is_empty()
    {
        return Err("spec.agent.proxy.caCert holds no PEM certificate".into());
    }
    Ok(())
}

/// `spec.certificates.agentDuration`, at least `min_cert_duration`.
pub fn agent_cert_lifetime(
    pc: &ProxiedCluster,
    min_cert_duration: Duration,
) -> Result<Duration, String> {
    let lifetime = humantime::parse_duration(&pc.spec.certificates.agent_duration)
        .map_err(|err| format!("spec.certificates.agentDuration: {err}"))?;
    if lifetime < min_cert_duration {
        return Err(format!(
            "spec.certificates.agentDuration must be at least {}",
            humantime::format_duration(min_cert_duration)
        ));
    }
    Ok(lifetime)
}

/// The path of the first string in `spec` (keys included) that holds a
/// control character, as `spec.agent.image`.
fn field_with_control_character(spec: &ProxiedClusterSpec) -> Option<String> {
    /// PEM text: lines are its form.
    const MULTI_LINE: &[&str] = &["spec.agent.proxy.caCert"];
    fn walk(value: &serde_json::Value, path: &str) -> Option<String> {
        let bad = |s: &str| s.chars().any(char::is_control);
        match value {
            serde_json::Value::String(s) if MULTI_LINE.contains(&path) => s
                .chars()
                .any(|c| c.is_control() && c != '\n')
                .then(|| path.to_owned()),
            serde_json::Value::String(s) if bad(s) => Some(path.to_owned()),
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, item)| walk(item, &format!("{path}[{i}]"))),
            serde_json::Value::Object(fields) => fields.iter().find_map(|(key, item)| {
                let path = format!("{path}.{key}");
                if bad(key) {
                    Some(path)
                } else {
                    walk(item, &path)
                }
            }),
            _ => None,
        }
    }
    walk(&serde_json::to_value(spec).ok()?, "spec")
}

/// [`validate_spec`], and the cluster id is not already taken by an older
/// ProxiedCluster.
fn validate(pc: &ProxiedCluster, ctx: &Context) -> Result<ValidSpec, String> {
    let valid = validate_spec(
        pc,
        ctx.settings.public_url.as_deref(),
        ctx.settings.min_cert_duration,
    )?;
    if let Some(other) = ctx.store.state().iter().find(|other| {
        other.cluster_id() == valid.cluster_id
            && other.uid() != pc.uid()
            && (
                other.creation_timestamp(),
                other.namespace(),
                other.name_any(),
            ) < (pc.creation_timestamp(), pc.namespace(), pc.name_any())
    }) {
        return Err(format!(
            "cluster id {:?} is already used by {}/{}",
            valid.cluster_id,
            other.namespace().unwrap_or_default(),
            other.name_any()
        ));
    }
    Ok(valid)
}

fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn argocd_namespace<'a>(pc: &'a ProxiedCluster, settings: &'a Settings) -> &'a str {
    pc.spec
        .argocd
        .namespace
        .as_deref()
        .unwrap_or(&settings.argocd_namespace)
}

/// The conditions this reconcile decided, in a stable order.
struct Conditions {
    previous: Vec<Condition>,
    generation: Option<i64>,
    now: Timestamp,
    list: Vec<Condition>,
}

impl Conditions {
    fn new(pc: &ProxiedCluster) -> Self {
        Self {
            previous: pc
                .status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default(),
            generation: pc.metadata.generation,
            now: Timestamp::now(),
            list: Vec::new(),
        }
    }

    fn set(&mut self, type_: &str, ok: bool, reason: &str, message: impl Into<String>) {
        let status = if ok { "True" } else { "False" };
        // The transition time moves only when the status does.
        let since = self
            .previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(self.now));
        self.list.push(Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.into(),
            observed_generation: self.generation,
            last_transition_time: since,
        });
    }

    /// AgentCredentialsExpired: the certificate the agent uses has expired
    /// and no session is up (tether-server refuses it). Returns how long
    /// until it expires, `None` once it has.
    fn set_credentials_expiry(
        &mut self,
        certificates: Option<&CertificatesStatus>,
        connection: Option<&ConnectionStatus>,
        now: SystemTime,
    ) -> Option<Duration> {
        let Some(not_after) = certificates
            .and_then(|c| c.agent_not_after.as_ref())
            .map(|t| SystemTime::from(t.0))
        else {
            self.set(
                CREDENTIALS_EXPIRED,
                false,
                "NoCertificate",
                "no agent certificate yet",
            );
            return Some(RESYNC);
        };
        let connected = connection.is_some_and(|c| c.connected);
        match not_after.duration_since(now) {
            Ok(left) => {
                self.set(
                    CREDENTIALS_EXPIRED,
                    false,
                    "Valid",
                    "the agent's certificate is valid; it renews itself at two thirds of its life",
                );
                Some(left)
            }
            Err(_) if connected => {
                // A newer certificate is in use than the last one seen.
                self.set(
                    CREDENTIALS_EXPIRED,
                    false,
                    "Valid",
                    "the agent is connected",
                );
                Some(RESYNC)
            }
            Err(_) => {
                self.set(
                    CREDENTIALS_EXPIRED,
                    true,
                    "Expired",
                    "the agent's client certificate expired and tether-server refuses it: \
                     export a new bundle (kubectl tether bundle export) and apply it in the customer cluster",
                );
                None
            }
        }
    }

    /// AgentConnected mirrors the sessions the tether-server replicas
    /// reported.
    fn set_connected(&mut self, connection: Option<&ConnectionStatus>) {
        match connection {
            Some(c) if c.connected => self.set(
                "AgentConnected",
                true,
                "Connected",
                format!(
                    "the agent's tunnel is up ({} replicas)",
                    c.replicas.as_deref().unwrap_or("?")
                ),
            ),
            Some(_) => self.set(
                "AgentConnected",
                false,
                "Disconnected",
                "no tether-server replica holds a live session of the agent",
            ),
            None => self.set(
                "AgentConnected",
                false,
                "NeverConnected",
                "no agent has connected yet",
            ),
        }
    }
}

/// Writes the operator's part of the status (never an `agentSessions`
/// entry, which its replica writes, except to forget one long stale) when it
/// differs from what is there.
async fn write_status(
    pc: &ProxiedCluster,
    ctx: &Context,
    desired: ProxiedClusterStatus,
    forget: &[String],
) -> Result<(), Error> {
    let current = pc.status.clone().unwrap_or_default();
    let comparable = ProxiedClusterStatus {
        agent_sessions: current.agent_sessions.clone(),
        ..desired.clone()
    };
    if comparable == current && forget.is_empty() {
        return Ok(());
    }
    let api: Api<ProxiedCluster> =
        Api::namespaced(ctx.client.clone(), &pc.namespace().unwrap_or_default());
    let forgotten: serde_json::Map<String, serde_json::Value> = forget
        .iter()
        .map(|name| (name.clone(), serde_json::Value::Null))
        .collect();
    // Explicit nulls clear fields that no longer apply (merge patch).
    let mut certificates = serde_json::to_value(&desired.certificates).unwrap_or_default();
    if let Some(fields) = certificates.as_object_mut() {
        for key in ["rotationPending", "rotationRequested"] {
            fields.entry(key).or_insert(serde_json::Value::Null);
        }
    }
    let patch = json!({
        "status": {
            "clusterId": desired.cluster_id,
            "observedGeneration": desired.observed_generation,
            "conditions": desired.conditions,
            "tokenRotation": desired.token_rotation,
            "certificates": certificates,
            "tokenOverlapUntil": desired.token_overlap_until,
            "bundle": desired.bundle,
            "argocdSecret": desired.argocd_secret,
            "connection": desired.connection,
            "agentSessions": forgotten,
        }
    });
    api.patch_status(
        &pc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

async fn apply(pc: &ProxiedCluster, ctx: &Context) -> Result<Action, Error> {
    let namespace = pc.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
    let id = pc.cluster_id();
    let mut conditions = Conditions::new(pc);
    let sessions = connection::summarize(
        &pc.status
            .as_ref()
            .map(|s| s.agent_sessions.clone())
            .unwrap_or_default(),
        SystemTime::now(),
    );
    let lifetime = match validate(pc, ctx) {
        Ok(valid) => valid.agent_cert_lifetime,
        Err(problem) => {
            let was_invalid = conditions
                .previous
                .iter()
                .any(|c| c.type_ == "Ready" && c.reason == "InvalidSpec" && c.message == problem);
            conditions.set("Ready", false, "InvalidSpec", problem.clone());
            conditions.set_connected(sessions.connection.as_ref());
            let status = ProxiedClusterStatus {
                cluster_id: Some(id),
                observed_generation: pc.metadata.generation,
                conditions: conditions.list,
                connection: sessions.connection.clone(),
                ..Default::default()
            };
            write_status(pc, ctx, status, &sessions.forget).await?;
            if !was_invalid {
                ctx.publish(pc, EventType::Warning, "InvalidSpec", problem)
                    .await;
            }
            return Ok(Action::await_change());
        }
    };
    let settings = &ctx.settings;
    let pki = ctx.pki();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);

    // The agent token: issued once, replaced when the rotation trigger
    // changes. The server side sees its SHA-256, and the token itself only
    // while a rotation delivers it over the tunnel.
    let token_name = token_secret_name(pc);
    let trigger = pc.spec.token_rotation.clone().unwrap_or_default();
    let current = secrets.get_opt(&token_name).await?;
    let kept = current
        .as_ref()
        .filter(|s| s.annotations().get(ROTATION_ANNOTATION) == Some(&trigger))
        .and_then(|s| secret_text(s, "token"));
    let rotated_out = current
        .as_ref()
        .filter(|_| kept.is_none())
        .and_then(|s| secret_text(s, "token"));
    let token = kept.unwrap_or_else(new_token);
    let token_sha256 = hex::encode(Sha256::digest(token.as_bytes()));
    let now = Timestamp::now();
    let overlap = match &rotated_out {
        Some(previous) => Some(TokenOverlap {
            previous_sha256: hex::encode(Sha256::digest(previous.as_bytes())),
            until: Timestamp::try_from(SystemTime::from(now) + ctx.settings.token_overlap)
                .unwrap_or(now),
        }),
        None => current.as_ref().and_then(token_overlap),
    };
    let overlap = match overlap {
        Some(_) if agent_uses_token(pc, &token_sha256) => {
            ctx.publish(
                pc,
                EventType::Normal,
                "TokenRotationConfirmed",
                "the agent connects with the new token; the previous one is refused from now on"
                    .into(),
            )
            .await;
            None
        }
        Some(o) if o.until <= now => {
            ctx.publish(
                pc,
                EventType::Warning,
                "TokenOverlapEnded",
                "the agent did not take up the new token in time; the previous one is refused: \
                 apply a new install bundle in the customer cluster"
                    .into(),
            )
            .await;
            None
        }
        other => other,
    };
    let mut annotations = BTreeMap::from([(ROTATION_ANNOTATION.to_owned(), trigger.clone())]);
    if let Some(o) = &overlap {
        annotations.insert(
            PREVIOUS_TOKEN_ANNOTATION.to_owned(),
            o.previous_sha256.clone(),
        );
        annotations.insert(OVERLAP_UNTIL_ANNOTATION.to_owned(), o.until.to_string());
    }
    let desired = Secret {
        metadata: owned_meta(pc, &token_name, annotations),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            "token".to_owned(),
            ByteString(token.clone().into_bytes()),
        )])),
        ..Default::default()
    };
    if ensure_secret(&secrets, current, desired).await? == Applied::Created {
        ctx.publish(
            pc,
            EventType::Normal,
            "TokenIssued",
            format!("issued the agent token in Secret {token_name}"),
        )
        .await;
    } else if rotated_out.is_some() {
        ctx.publish(
            pc,
            EventType::Normal,
            "TokenRotated",
            format!(
                "rotated the agent token (tokenRotation={trigger:?}); delivering it to the agent, \
                 the previous one is accepted for {}",
                humantime::format_duration(ctx.settings.token_overlap)
            ),
        )
        .await;
    }
    conditions.set(
        "TokenIssued",
        true,
        "Issued",
        format!("agent token in Secret {token_name}"),
    );

    // The agent's client certificate: from the operator CA, or brought.
    let agent = match &pc.spec.certificates.agent_secret_ref {
        Some(reference) => match secrets
            .get_opt(&reference.name)
            .await?
            .as_ref()
            .and_then(issued_from)
        {
            Some((issued, info, _)) => Some((issued, info)),
            None => {
                conditions.set(
                    "CertificatesIssued",
                    false,
                    "SecretInvalid",
                    format!(
                        "Secret {} is missing or lacks a PEM tls.crt and tls.key",
                        reference.name
                    ),
                );
                None
            }
        },
        None => {
            let request = LeafRequest::agent(&id, lifetime);
            let name = agent_tls_secret_name(pc);
            let leaf = LeafSecret {
                api: &secrets,
                name: &name,
                namespace: &namespace,
                request: &request,
                owner: pc.controller_owner_ref(&()),
            };
            let (issued, info, applied) = ensure_leaf(leaf, &pki.ca).await?;
            if applied.changed() {
                ctx.publish(
                    pc,
                    EventType::Normal,
                    "CertificateIssued",
                    format!("issued the agent certificate for {id} in Secret {name}"),
                )
                .await;
            }
            Some((issued, info))
        }
    };
    if agent.is_some() {
        conditions.set(
            "CertificatesIssued",
            true,
            "Issued",
            "agent client certificate is valid",
        );
    }

    // A certificate rotation: asked of the agent until it has renewed,
    // then certificates from before it are refused.
    let previous_certificates = pc.status.as_ref().and_then(|s| s.certificates.as_ref());
    let (rotation, rotation_event) = certificate_rotation(
        pc.spec.certificates.rotation.as_deref(),
        previous_certificates,
        Timestamp::now(),
    );
    if let Some((reason, note)) = rotation_event {
        ctx.publish(pc, EventType::Normal, reason, note).await;
    }

    // tether-server learns the cluster from the clusters Secret.
    let resource = format!("{namespace}/{}", pc.name_any());
    let entry = ServerEntry {
        token_sha256: &token_sha256,
        target: &pc.spec.target_address,
        resource: &resource,
        token: &token,
        overlap: overlap.as_ref(),
        certificate_rotation: rotation.pending.as_deref(),
        certificates_not_before: rotation.not_before.as_ref().map(|t| t.0),
    };
    upsert_server_entry(ctx, &id, Some(&entry)).await?;

    // ArgoCD registration (a Secret in ArgoCD's namespace: no owner
    // reference across namespaces, so the finalizer removes it).
    let argocd_ns = argocd_namespace(pc, settings).to_owned();
    let argocd_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &argocd_ns);
    let argocd_name = argocd::secret_name(&id);
    let argocd_secret = if pc.spec.argocd.enabled {
        let registration = argocd::secret_for(
            pc,
            settings,
            &argocd_ns,
            settings.tls.then_some(&pki.argocd),
        );
        let current = argocd_api.get_opt(&argocd_name).await?;
        if ensure_secret(&argocd_api, current, registration)
            .await?
            .changed()
        {
            ctx.publish(
                pc,
                EventType::Normal,
                "ArgoCDRegistered",
                format!("registered with ArgoCD as Secret {argocd_ns}/{argocd_name}"),
            )
            .await;
        }
        conditions.set(
            "ArgoCDRegistered",
            true,
            "Registered",
            format!("Secret {argocd_ns}/{argocd_name}"),
        );
        Some(format!("{argocd_ns}/{argocd_name}"))
    } else {
        delete_secret(&argocd_api, &argocd_name).await?;
        conditions.set(
            "ArgoCDRegistered",
            false,
            "Disabled",
            "spec.argocd.enabled is false",
        );
        None
    };

    // The agent bundle, stored for export.
    let mut bundle_ref = None;
    if let Some((issued, _)) = &agent {
        let input = BundleInput::for_cluster(
            pc,
            &settings.agent_image,
            settings.public_url.as_deref(),
            &token,
            issued,
            &pki.server_ca_pem,
        );
        let rendered = bundle::render(&input)?;
        let name = bundle_secret_name(pc);
        let current = secrets.get_opt(&name).await?;
        let desired = Secret {
            metadata: owned_meta(
                pc,
                &name,
                BTreeMap::from([(
                    "tether.dev/bundle-sha256".to_owned(),
                    rendered.sha256.clone(),
                )]),
            ),
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                BUNDLE_KEY.to_owned(),
                ByteString(rendered.yaml.into_bytes()),
            )])),
            ..Default::default()
        };
        if ensure_secret(&secrets, current, desired).await?.changed() {
            ctx.publish(
                pc,
                EventType::Normal,
                "BundleRendered",
                format!("agent bundle in Secret {name} (sha256 {})", rendered.sha256),
            )
            .await;
        }
        conditions.set(
            "BundleReady",
            true,
            "Rendered",
            format!("kubectl tether bundle export {}", pc.name_any()),
        );
        bundle_ref = Some(BundleRef {
            secret_name: name,
            sha256: rendered.sha256,
        });
    } else {
        conditions.set(
            "BundleReady",
            false,
            "NoCertificate",
            "the bundle needs the agent certificate",
        );
    }

    let ready = agent.is_some();
    conditions.set(
        "Ready",
        ready,
        if ready {
            "Reconciled"
        } else {
            "CertificateMissing"
        },
        if ready {
            "token, certificates, server configuration and bundle are in place"
        } else {
            "see CertificatesIssued"
        },
    );
    conditions.set_connected(sessions.connection.as_ref());
    let certificates = agent.as_ref().map(|(_, info)| {
        let bundle_not_after = Timestamp::try_from(info.not_after).ok().map(Time);
        CertificatesStatus {
            agent_not_after: agent_not_after(pc, sessions.connection.as_ref())
                .or_else(|| bundle_not_after.clone()),
            bundle_not_after,
            rotation: rotation.rotation.clone(),
            rotation_pending: rotation.pending.clone(),
            rotation_requested: rotation.requested.clone(),
            last_signed: previous_certificates.and_then(|c| c.last_signed.clone()),
            not_before: rotation.not_before.clone(),
        }
    });
    let expires_in = conditions.set_credentials_expiry(
        certificates.as_ref(),
        sessions.connection.as_ref(),
        SystemTime::now(),
    );
    if expires_in.is_none()
        && !conditions
            .previous
            .iter()
            .any(|c| c.type_ == CREDENTIALS_EXPIRED && c.status == "True")
    {
        ctx.publish(
            pc,
            EventType::Warning,
            CREDENTIALS_EXPIRED,
            "the agent's client certificate expired; apply a new install bundle in the customer cluster".into(),
        )
        .await;
    }
    let status = ProxiedClusterStatus {
        cluster_id: Some(id),
        observed_generation: pc.metadata.generation,
        conditions: conditions.list,
        token_rotation: Some(trigger),
        token_overlap_until: overlap.as_ref().map(|o| Time(o.until)),
        certificates,
        bundle: bundle_ref,
        argocd_secret,
        connection: sessions.connection.clone(),
        agent_sessions: Default::default(),
    };
    write_status(pc, ctx, status, &sessions.forget).await?;

    let renew_in = agent
        .as_ref()
        .map(|(_, info)| renew_delay(info))
        .unwrap_or(Duration::from_secs(30));
    // A live session that stops being refreshed must turn into
    // "disconnected" even if nothing else changes; an expiry must show.
    let recheck = sessions.recheck_in.unwrap_or(RESYNC);
    let expiry = expires_in.unwrap_or(RESYNC).max(Duration::from_secs(1));
    // An overlap ends on time even if nothing else happens.
    let overlap_ends = overlap
        .as_ref()
        .and_then(|o| {
            SystemTime::from(o.until)
                .duration_since(SystemTime::now())
                .ok()
        })
        .map_or(RESYNC, |d| d + Duration::from_secs(1));
    Ok(Action::requeue(
        renew_in
            .min(recheck)
            .min(expiry)
            .min(overlap_ends)
            .min(RESYNC),
    ))
}

/// The expiry of the certificate the agent presented last: from its newest
/// session, else as recorded before (sessions are forgotten after a while).
fn agent_not_after(pc: &ProxiedCluster, connection: Option<&ConnectionStatus>) -> Option<Time> {
    connection
        .and_then(|c| c.certificate_not_after.clone())
        .or_else(|| {
            let previous = pc.status.as_ref()?.certificates.as_ref()?;
            // Recorded from a session only if it differs from the bundle's.
            (previous.agent_not_after != previous.bundle_not_after)
                .then(|| previous.agent_not_after.clone())
                .flatten()
        })
}

/// Where a requested certificate rotation stands.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RotationState {
    /// The last rotation completed.
    pub rotation: Option<String>,
    /// The rotation the agent is asked to make, and since when.
    pub pending: Option<String>,
    pub requested: Option<Time>,
    /// Certificates starting before this are refused.
    pub not_before: Option<Time>,
}

/// Advances `spec.certificates.rotation`: requested, then completed once
/// the operator signed a renewal after the request. Certificates are
/// back-dated by [`tether::pki::BACKDATE`], so those starting before the
/// request minus that were all issued before it. (Validity times have
/// one-second resolution: one issued in the very second of the request is
/// kept, as the agent's new one may be.) Returns the Event to record, if
/// the state moved.
pub fn certificate_rotation(
    wanted: Option<&str>,
    previous: Option<&CertificatesStatus>,
    now: Timestamp,
) -> (RotationState, Option<(&'static str, String)>) {
    let previous = previous.cloned().unwrap_or_default();
    let done = RotationState {
        rotation: previous.rotation.clone(),
        not_before: previous.not_before.clone(),
        ..Default::default()
    };
    let Some(wanted) = wanted.filter(|w| !w.is_empty() && Some(*w) != previous.rotation.as_deref())
    else {
        return (done, None);
    };
    let (requested, event) = match previous.rotation_requested {
        Some(at) if previous.rotation_pending.as_deref() == Some(wanted) => (at, None),
        _ => (
            Time(now),
            Some((
                "CertificateRotationRequested",
                format!("asked the agent to renew its certificate now (rotation={wanted:?})"),
            )),
        ),
    };
    // Status times have one-second resolution: a renewal signed in the
    // second of the request counts (it was made with a new key at that
    // moment), else a quick agent would leave the rotation pending for good.
    if previous
        .last_signed
        .as_ref()
        .is_some_and(|signed| signed.0 >= requested.0)
    {
        let not_before = Timestamp::try_from(SystemTime::from(requested.0) - tether::pki::BACKDATE)
            .ok()
            .map(Time);
        return (
            RotationState {
                rotation: Some(wanted.to_owned()),
                not_before,
                ..Default::default()
            },
            Some((
                "CertificateRotated",
                format!(
                    "the agent renewed its certificate (rotation={wanted:?}); older certificates are refused"
                ),
            )),
        );
    }
    (
        RotationState {
            pending: Some(wanted.to_owned()),
            requested: Some(requested),
            ..done
        },
        event,
    )
}

/// The overlap recorded on the token Secret, if any.
fn token_overlap(secret: &Secret) -> Option<TokenOverlap> {
    let annotations = secret.annotations();
    Some(TokenOverlap {
        previous_sha256: annotations.get(PREVIOUS_TOKEN_ANNOTATION)?.clone(),
        until: annotations.get(OVERLAP_UNTIL_ANNOTATION)?.parse().ok()?,
    })
}

/// Whether a replica reports a live session authenticated with the token
/// whose SHA-256 is `token_sha256`: the agent took up a rotated token.
fn agent_uses_token(pc: &ProxiedCluster, token_sha256: &str) -> bool {
    let now = SystemTime::now();
    pc.status
        .iter()
        .flat_map(|s| s.agent_sessions.values())
        .any(|session| {
            session.connected
                && connection::is_fresh(session, now)
                && session
                    .token_sha256_prefix
                    .as_deref()
                    .is_some_and(|prefix| prefix.len() == 12 && token_sha256.starts_with(prefix))
        })
}

fn renew_delay(info: &CertInfo) -> Duration {
    info.renew_at()
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .max(Duration::from_secs(1))
}

async fn cleanup(pc: &ProxiedCluster, ctx: &Context) -> Result<Action, Error> {
    let id = pc.cluster_id();
    let argocd_ns = argocd_namespace(pc, &ctx.settings).to_owned();
    let argocd_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &argocd_ns);
    let name = argocd::secret_name(&id);
    // Only delete the ArgoCD Secret this object created.
    if let Some(secret) = argocd_api.get_opt(&name).await? {
        let labels = secret.labels();
        if labels.get(argocd::OWNER_NAMESPACE_LABEL) == pc.namespace().as_ref()
            && labels.get(argocd::OWNER_NAME_LABEL) == Some(&pc.name_any())
        {
            delete_secret(&argocd_api, &name).await?;
        }
    }
    upsert_server_entry(ctx, &id, None).await?;
    ctx.publish(
        pc,
        EventType::Normal,
        "Deleted",
        format!("removed cluster {id} from tether-server and ArgoCD"),
    )
    .await;
    info!(cluster = %id, "cleaned up");
    Ok(Action::await_change())
}

/// One cluster as tether-server's clusters configuration lists it.
pub fn server_entry(id: &str, entry: &ServerEntry<'_>) -> serde_json::Value {
    let mut value = json!({
        "id": id,
        "tokenSha256": entry.token_sha256,
        "targetAddr": entry.target,
        "resource": entry.resource,
    });
    if let Some(overlap) = entry.overlap {
        value["previousTokenSha256"] = json!(overlap.previous_sha256);
        value["previousTokenExpires"] = json!(overlap.until.to_string());
        value["pendingToken"] = json!(entry.token);
    }
    if let Some(rotation) = entry.certificate_rotation {
        value["certificateRotation"] = json!(rotation);
    }
    if let Some(not_before) = entry.certificates_not_before {
        value["certificatesNotBefore"] = json!(not_before.to_string());
    }
    value
}

/// Conflicts on the shared clusters Secret retried at once before the
/// reconcile fails over to the error backoff.
const CONFLICT_RETRIES: usize = 16;

/// A cluster's entry for tether-server: token hash, target, the
/// ProxiedCluster to report connection status to, and rotations in progress.
pub struct ServerEntry<'a> {
    pub token_sha256: &'a str,
    pub target: &'a str,
    /// `namespace/name` of the ProxiedCluster.
    pub resource: &'a str,
    /// The token itself: written only during a rotation's overlap, for
    /// the servers to hand to an agent still on the previous one.
    pub token: &'a str,
    pub overlap: Option<&'a TokenOverlap>,
    pub certificate_rotation: Option<&'a str>,
    pub certificates_not_before: Option<Timestamp>,
}

/// A rotated-out token still accepted, until the agent uses the new one or
/// the overlap ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenOverlap {
    pub previous_sha256: String,
    pub until: Timestamp,
}

/// Adds, updates (`Some`) or removes (`None`) one cluster in the clusters
/// Secret tether-server loads: `[{"id","tokenSha256","targetAddr","resource"}]`,
/// sorted by id. Written with the resourceVersion read, so concurrent
/// reconciles cannot lose each other's entries: a conflict re-reads and
/// tries again.
async fn upsert_server_entry(
    ctx: &Context,
    id: &str,
    entry: Option<&ServerEntry<'_>>,
) -> Result<(), Error> {
    let _only_writer = ctx.server_config.lock().await;
    let mut attempt = 0;
    loop {
        match try_upsert_server_entry(ctx, id, entry).await {
            Err(Error::Kube(kube::Error::Api(status)))
                if status.code == 409 && attempt < CONFLICT_RETRIES =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

async fn try_upsert_server_entry(
    ctx: &Context,
    id: &str,
    entry: Option<&ServerEntry<'_>>,
) -> Result<(), Error> {
    let settings = &ctx.settings;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &settings.namespace);
    let current = api.get_opt(&settings.clusters_secret).await?;
    let mut entries: Vec<serde_json::Value> = current
        .as_ref()
        .and_then(|s| secret_text(s, CLUSTERS_KEY))
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    entries.retain(|e| e["id"] != id);
    if let Some(entry) = entry {
        entries.push(server_entry(id, entry));
    }
    entries.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    let text = serde_json::to_string_pretty(&entries).unwrap_or_else(|_| "[]".into());
    let desired = Secret {
        metadata: ObjectMeta {
            name: Some(settings.clusters_secret.clone()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "tether-operator".to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            CLUSTERS_KEY.to_owned(),
            ByteString(text.into_bytes()),
        )])),
        ..Default::default()
    };
    ensure_secret(&api, current, desired).await?;
    Ok(())
}

/// Re-checks the shared certificates until `stop`, renewing them when due.
pub async fn refresh_pki(ctx: Arc<Context>, stop: tokio_util::sync::CancellationToken) {
    loop {
        let wait = ctx
            .pki()
            .renew_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .clamp(Duration::from_secs(60), RESYNC);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match crate::pki::ensure_global(&ctx.client, &ctx.settings).await {
            Ok(pki) => ctx.set_pki(pki),
            Err(err) => warn!(error = %err, "cannot refresh the shared certificates"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn time(at: SystemTime) -> Option<Time> {
        Timestamp::try_from(at).ok().map(Time)
    }

    #[test]
    fn expired_credentials_show_only_while_the_agent_cannot_connect() {
        let pc: ProxiedCluster = serde_json::from_value(json!({
            "apiVersion": "tether.dev/v1alpha1", "kind": "ProxiedCluster",
            "metadata": {"name": "a", "namespace": "t"}, "spec": {},
        }))
        .expect("a ProxiedCluster");
        let now = SystemTime::now();
        let certificates = |not_after| CertificatesStatus {
            agent_not_after: time(not_after),
            bundle_not_after: time(now + 90 * 24 * HOUR),
            ..Default::default()
        };
        let connected = |up| ConnectionStatus {
            connected: up,
            ..Default::default()
        };
        let verdict = |certs: &CertificatesStatus, up: bool| {
            let mut conditions = Conditions::new(&pc);
            let left = conditions.set_credentials_expiry(Some(certs), Some(&connected(up)), now);
            let condition = conditions.list.pop().expect("set");
            (left, condition.status, condition.reason)
        };
        let valid = certificates(now + HOUR);
        let (left, status, reason) = verdict(&valid, true);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Valid"));
        assert!(left.is_some_and(|l| l <= HOUR && l > HOUR - Duration::from_secs(5)));
        let expired = certificates(now - HOUR);
        assert_eq!(
            verdict(&expired, false),
            (None, "True".to_owned(), "Expired".to_owned()),
            "expired and refused"
        );
        assert_eq!(
            verdict(&expired, true).1,
            "False",
            "connected: it presents a newer certificate than the one recorded"
        );
    }

    #[test]
    fn a_certificate_rotation_is_requested_then_completed_by_a_later_signature() {
        let t0 = Timestamp::from_second(2_000_000_000).expect("time");
        let later = |s: i64| Timestamp::from_second(2_000_000_000 + s).expect("time");
        let (state, event) = certificate_rotation(Some("r1"), None, t0);
        assert_eq!(state.pending.as_deref(), Some("r1"));
        assert_eq!(state.requested, Some(Time(t0)));
        assert_eq!(event.map(|e| e.0), Some("CertificateRotationRequested"));
        let mut status = CertificatesStatus {
            rotation_pending: state.pending.clone(),
            rotation_requested: state.requested.clone(),
            // A renewal signed before the request does not count.
            last_signed: Some(Time(later(-1))),
            ..Default::default()
        };
        let mut same_second = status.clone();
        same_second.last_signed = Some(Time(t0));
        assert!(
            certificate_rotation(Some("r1"), Some(&same_second), later(1))
                .0
                .rotation
                .is_some(),
            "signed in the second of the request: counts"
        );
        let (again, event) = certificate_rotation(Some("r1"), Some(&status), later(30));
        assert_eq!(again, state, "still pending, same request time");
        assert!(event.is_none(), "no repeated event");
        status.last_signed = Some(Time(later(20)));
        let (done, event) = certificate_rotation(Some("r1"), Some(&status), later(30));
        assert_eq!(done.rotation.as_deref(), Some("r1"));
        assert_eq!(done.pending, None);
        assert_eq!(
            done.not_before,
            Some(Time(later(-(tether::pki::BACKDATE.as_secs() as i64)))),
            "what was issued before the request is refused"
        );
        assert_eq!(event.map(|e| e.0), Some("CertificateRotated"));
        let status = CertificatesStatus {
            rotation: done.rotation.clone(),
            not_before: done.not_before.clone(),
            ..Default::default()
        };
        let (settled, event) = certificate_rotation(Some("r1"), Some(&status), later(60));
        assert_eq!(settled, done, "a completed rotation stays completed");
        assert!(event.is_none());
        let (none, _) = certificate_rotation(None, None, t0);
        assert_eq!(none, RotationState::default());
    }

    #[test]
    fn the_presented_expiry_outlives_the_session_that_reported_it() {
        // Whole seconds, as the API keeps times.
        let seconds = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(seconds);
        let presented = time(now + 2 * HOUR);
        let bundle = time(now + 90 * 24 * HOUR);
        let pc: ProxiedCluster = serde_json::from_value(json!({
            "apiVersion": "tether.dev/v1alpha1", "kind": "ProxiedCluster",
            "metadata": {"name": "a", "namespace": "t"}, "spec": {},
            "status": {"certificates": {"agentNotAfter": presented, "bundleNotAfter": bundle}},
        }))
        .expect("a ProxiedCluster");
        let session = ConnectionStatus {
            certificate_not_after: time(now + 3 * HOUR),
            ..Default::default()
        };
        assert_eq!(
            agent_not_after(&pc, Some(&session)),
            time(now + 3 * HOUR),
            "the newest session's"
        );
        assert_eq!(
            agent_not_after(&pc, None),
            presented,
            "kept once the sessions are forgotten"
        );
    }

    #[test]
    fn retries_back_off_exponentially_up_to_five_minutes() {
        let delays: Vec<u64> = (1..=9).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    /// What the API server's schema would refuse, refused again here for
    /// files that never passed through it.
    #[test]
    fn spec_validation_catches_what_would_break_the_bundle() {
        let pc = |spec: serde_json::Value| -> ProxiedCluster {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "tether.dev/v1alpha1", "kind": "ProxiedCluster",
                "metadata": {"name": "a", "namespace": "t"}, "spec": spec,
            }))
            .expect("a ProxiedCluster")
        };
        let url = Some("wss://tether.example.com");
        let valid =
            validate_spec(&pc(serde_json::json!({})), url, HOUR).expect("defaults are valid");
        assert_eq!(valid.cluster_id, "a");
        assert_eq!(valid.public_url, "wss://tether.example.com");
        for (spec, problem) in [
            (
                serde_json::json!({"agent": {"image": "x\u{1b}r"}}),
                "spec.agent.image contains a control character",
            ),
            (
                serde_json::json!({"argocd": {"labels": {"a\nb": "c"}}}),
                "spec.argocd.labels.a\nb contains a control character",
            ),
            (
                serde_json::json!({"agent": {"namespace": "Agent NS"}}),
                "spec.agent.namespace \"Agent NS\" is not a DNS label",
            ),
            (
                serde_json::json!({"targetAddress": "kubernetes"}),
                "spec.targetAddress \"kubernetes\" is not host:port",
            ),
            (
                serde_json::json!({"agent": {"metrics": {"enabled": true, "auth": "basic"}}}),
                "spec.agent.metrics.auth \"basic\" is neither kubernetes nor none",
            ),
            (
                serde_json::json!({"agent": {"metrics": {"enabled": true, "allowedNamespaces": ["Mon"]}}}),
                "spec.agent.metrics.allowedNamespaces: \"Mon\" is not a namespace name",
            ),
            (
                serde_json::json!({"publicUrl": "https://x"}),
                "public URL \"https://x\" is not ws(s)://host[:port]",
            ),
            (
                serde_json::json!({"certificates": {"agentDuration": "10m"}}),
                "spec.certificates.agentDuration must be at least 1h",
            ),
            (
                serde_json::json!({"agent": {"proxy": {"url": "http://u:pw@proxy:3128"}}}),
                "spec.agent.proxy.url must not hold credentials: name a Secret the customer creates in spec.agent.proxy.credentialsSecretName",
            ),
            (
                serde_json::json!({"agent": {"proxy": {"url": "socks5://proxy:1080"}}}),
                "spec.agent.proxy.url: proxy URL scheme \"socks5\" is not supported: tether-agent speaks HTTP CONNECT to http:// and https:// proxies",
            ),
            (
                serde_json::json!({"agent": {"proxy": {"url": "https://proxy:3129", "caCert": "not PEM"}}}),
                "spec.agent.proxy.caCert holds no PEM certificate",
            ),
        ] {
            assert_eq!(validate_spec(&pc(spec), url, HOUR), Err(problem.to_owned()));
        }
    }
}
