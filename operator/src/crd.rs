//! The `ProxiedCluster` custom resource: one customer cluster reached
//! through tether.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::api::rbac::v1::PolicyRule;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "tether.dev";
pub const DEFAULT_TARGET: &str = tether::clusters::DEFAULT_TARGET;
pub const DEFAULT_AGENT_NAMESPACE: &str = "tether-agent";

/// A customer cluster that tether-agent connects from, and how the
/// management side should reach and register it.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tether.dev",
    version = "v1alpha1",
    kind = "ProxiedCluster",
    plural = "proxiedclusters",
    singular = "proxiedcluster",
    shortname = "pcl",
    category = "tether",
    namespaced,
    status = "ProxiedClusterStatus",
    printcolumn = r#"{"name":"ID","type":"string","jsonPath":".status.clusterId"}"#,
    printcolumn = r#"{"name":"CONNECTED","type":"boolean","jsonPath":".status.connection.connected"}"#,
    printcolumn = r#"{"name":"REPLICAS","type":"string","jsonPath":".status.connection.replicas"}"#,
    printcolumn = r#"{"name":"AGENT","type":"string","jsonPath":".status.connection.agentVersion"}"#,
    printcolumn = r#"{"name":"LAST SEEN","type":"date","jsonPath":".status.connection.lastSeen"}"#,
    // A string, not a date: kubectl shows date columns as an age, and a
    // future time has none (it prints <invalid>).
    printcolumn = r#"{"name":"CERT EXPIRES","type":"string","jsonPath":".status.certificates.agentNotAfter"}"#,
    printcolumn = r#"{"name":"READY","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status","priority":1}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.clusterId) == has(oldSelf.clusterId) && (!has(self.clusterId) || self.clusterId == oldSelf.clusterId)",
    "message": "spec.clusterId is immutable: create a new ProxiedCluster for a new id"
}]))]
pub struct ProxiedClusterSpec {
    /// The id in tunnel URLs (`/tunnel/{id}`). Defaults to metadata.name.
    /// Unique across all ProxiedClusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub cluster_id: Option<String>,

    /// The only host:port the agent may dial in the customer cluster.
    #[serde(default = "default_target")]
    #[schemars(regex(pattern = r"^[^\s:/]+:[0-9]{1,5}$"))]
    pub target_address: String,

    /// The URL agents dial (wss://host:port). Defaults to the operator's
    /// `--public-url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^wss?://[^\s/]+(/.*)?$"))]
    pub public_url: Option<String>,

    #[serde(default)]
    pub argocd: ArgoCdSpec,

    #[serde(default)]
    pub agent: AgentSpec,

    #[serde(default)]
    pub certificates: CertificatesSpec,

    /// Changing this value (any string, e.g. a date) issues a new agent
    /// token and delivers it to the connected agent over the tunnel; the
    /// old one is accepted until the agent uses the new one, at most for
    /// the operator's `--token-overlap` (10 minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_rotation: Option<String>,
}

fn default_target() -> String {
    DEFAULT_TARGET.to_owned()
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArgoCdSpec {
    /// Register the cluster with ArgoCD (a cluster Secret).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// ArgoCD's namespace. Defaults to the operator's `--argocd-namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// ArgoCD project the cluster is scoped to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Extra labels on the cluster Secret (ApplicationSet cluster generators select on them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Default for ArgoCdSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            namespace: None,
            project: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Agent image. Defaults to the operator's `--agent-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Namespace the bundle installs into, in the customer cluster.
    #[serde(default = "default_agent_namespace")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: String,
    /// 0 or 1: a cluster has one tunnel; a second agent would take it over
    /// (the newest session wins), so more replicas only flap.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1))]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// What the agent's ServiceAccount may do in the customer cluster, and so
    /// what ArgoCD can do through tether. Default: everything (as ArgoCD's
    /// own `argocd-manager`); narrow it to what you deploy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<PolicyRule>>,
    /// The customer's HTTP proxy, when their cluster reaches tether-server
    /// only through one (CONNECT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<AgentProxySpec>,
    /// A metrics port for the customer's own Prometheus. Off by default:
    /// the agent then listens on nothing but its health port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<AgentMetricsSpec>,
}

/// The agent's `/metrics` port (8082) in the customer cluster.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentMetricsSpec {
    pub enabled: bool,
    /// `kubernetes`: HTTPS, the scraper's token reviewed by the customer's
    /// API server (bind the ClusterRole `tether-agent-metrics-reader` to
    /// it); `none`: plain HTTP.
    #[serde(default = "default_metrics_auth")]
    #[schemars(regex(pattern = r"^(kubernetes|none)$"))]
    pub auth: String,
    /// Namespaces whose pods may reach the port (the bundle's NetworkPolicy).
    #[serde(default = "default_metrics_namespaces")]
    #[schemars(inner(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")))]
    pub allowed_namespaces: Vec<String>,
}

fn default_metrics_auth() -> String {
    "kubernetes".into()
}

fn default_metrics_namespaces() -> Vec<String> {
    vec!["monitoring".into()]
}

/// A corporate HTTP proxy between the agent and tether-server. Its
/// credentials never appear here: they belong to the customer, who puts
/// them in a Secret in their own cluster.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentProxySpec {
    /// `http://host:port`, or `https://host:port` for TLS to the proxy;
    /// no user or password in it.
    #[schemars(regex(pattern = r"^https?://[^\s@/]+/?$"))]
    pub url: String,
    /// Hosts the agent reaches without the proxy (NO_PROXY entries: names,
    /// .domains, IPs, CIDRs, host:port). The agent's own API server is
    /// never proxied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub no_proxy: Vec<String>,
    /// PEM CA of an https:// proxy's certificate, when a private CA signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
    /// A Secret the customer creates in the agent's namespace, with key
    /// `credentials` holding `user:password` for the proxy's Basic
    /// authentication. Optional in the bundle: the agent connects without
    /// credentials until it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub credentials_secret_name: Option<String>,
}

fn default_agent_namespace() -> String {
    DEFAULT_AGENT_NAMESPACE.to_owned()
}

fn default_replicas() -> i32 {
    1
}

impl Default for AgentSpec {
    fn default() -> Self {
        Self {
            image: None,
            namespace: default_agent_namespace(),
            replicas: default_replicas(),
            resources: None,
            rules: None,
            proxy: None,
            metrics: None,
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificatesSpec {
    /// Lifetime of the agent's client certificate (Go-style duration, e.g.
    /// `2160h`). Renewed at two thirds of it.
    #[serde(default = "default_agent_duration")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    pub agent_duration: String,
    /// Changing this value (any string, e.g. a date) makes the agent renew
    /// its certificate now, with a new key (a suspected key leak); once it
    /// has, certificates issued before are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<String>,
    /// Bring your own agent certificate: a `kubernetes.io/tls` Secret in
    /// this namespace (cert-manager's format: tls.crt, tls.key, ca.crt)
    /// used instead of the operator's CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_secret_ref: Option<SecretRef>,
}

fn default_agent_duration() -> String {
    "2160h".to_owned()
}

impl Default for CertificatesSpec {
    fn default() -> Self {
        Self {
            agent_duration: default_agent_duration(),
            rotation: None,
            agent_secret_ref: None,
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretRef {
    pub name: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxiedClusterStatus {
    /// The effective cluster id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, TokenIssued, CertificatesIssued, ArgoCDRegistered, BundleReady,
    /// AgentConnected, AgentCredentialsExpired.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `tokenRotation` value the current token was issued for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_rotation: Option<String>,
    /// Until when the previous token is still accepted (a rotation the
    /// agent has not taken up yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_overlap_until: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<CertificatesStatus>,
    /// Where the agent install bundle is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<BundleRef>,
    /// The ArgoCD cluster Secret (namespace/name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argocd_secret: Option<String>,
    /// The agent's connection, summed up by the operator from
    /// `agentSessions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionStatus>,
    /// The agent's session with each tether-server replica, keyed by
    /// replica (pod) name. Each replica writes only its own entry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub agent_sessions: BTreeMap<String, AgentSession>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificatesStatus {
    /// Expiry of the agent's certificate in use: the one it presented
    /// last (it renews over the tunnel), or the bundle's until it connects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_not_after: Option<Time>,
    /// Expiry of the certificate in the bundle the operator keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_not_after: Option<Time>,
    /// The last `spec.certificates.rotation` the agent completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<String>,
    /// A rotation asked for and not completed yet, and since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_pending: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_requested: Option<Time>,
    /// When the operator last signed a renewal of this agent's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_signed: Option<Time>,
    /// Agent certificates starting before this are refused (set when a
    /// rotation completes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Time>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BundleRef {
    /// Secret in this namespace holding the bundle under `bundle.yaml`.
    pub secret_name: String,
    /// SHA-256 of the bundle, as in its header.
    pub sha256: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStatus {
    /// At least one replica holds a live session of the agent.
    pub connected: bool,
    /// Replicas holding a session, of the live replicas: `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<String>,
    /// When the oldest live session started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// Expiry of the client certificate the agent presented in its newest
    /// session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_not_after: Option<Time>,
}

/// One replica's session with the agent, written by that replica.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSession {
    pub connected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_address: Option<String>,
    /// Expiry of the client certificate the agent presented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_not_after: Option<Time>,
    /// The first 12 hex digits of the SHA-256 of the token the agent
    /// presented: tells a rotated token from the previous one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256_prefix: Option<String>,
    /// Refreshed every 30 s while connected: an entry that stops being
    /// refreshed belongs to a replica that died without saying so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// The replicas live when this one wrote the entry (itself included
    /// unless it is leaving).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub live_replicas: Vec<String>,
}

impl ProxiedCluster {
    /// The effective cluster id: spec.clusterId or metadata.name.
    pub fn cluster_id(&self) -> String {
        self.spec
            .cluster_id
            .clone()
            .or_else(|| self.metadata.name.clone())
            .unwrap_or_default()
    }
}

/// The CRD as YAML, exactly as `crds/` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    use kube::CustomResourceExt;
    serde_yaml_ng::to_string(&ProxiedCluster::crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_crd_matches_crds_directory() {
        let generated = crd_yaml().expect("serializes");
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../crds/proxiedclusters.tether.dev.yaml"
        );
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "crds/ is stale: run `make crds` (cargo run -p tether-operator --bin crdgen)"
        );
    }

    #[test]
    fn example_manifests_are_valid_proxied_clusters() {
        use serde::Deserialize;
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
        let mut found = 0;
        for entry in std::fs::read_dir(dir).expect("examples/") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("read");
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                let value = serde_json::Value::deserialize(doc).expect("YAML");
                if value["kind"] == "ProxiedCluster" {
                    let pc: ProxiedCluster = serde_json::from_value(value)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    assert!(tether::clusters::is_dns_label(&pc.cluster_id()));
                    found += 1;
                }
            }
        }
        assert!(found >= 2, "examples hold ProxiedClusters");
    }

    #[test]
    fn defaults_fill_an_empty_spec() {
        let pc: ProxiedCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "tether.dev/v1alpha1", "kind": "ProxiedCluster",
            "metadata": {"name": "customer-a", "namespace": "tenants"},
            "spec": {}
        }))
        .expect("parses");
        assert_eq!(pc.cluster_id(), "customer-a");
        assert_eq!(pc.spec.target_address, DEFAULT_TARGET);
        assert!(pc.spec.argocd.enabled);
        assert_eq!(pc.spec.agent.namespace, "tether-agent");
        assert_eq!(pc.spec.agent.replicas, 1);
        assert_eq!(pc.spec.certificates.agent_duration, "2160h");
    }

    #[test]
    fn cluster_id_is_immutable_in_the_schema() {
        let crd =
            serde_json::to_value(<ProxiedCluster as kube::CustomResourceExt>::crd()).expect("json");
        let rules = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["x-kubernetes-validations"];
        assert!(
            rules[0]["rule"]
                .as_str()
                .is_some_and(|r| r.contains("oldSelf.clusterId")),
            "{rules}"
        );
    }

    #[test]
    fn conditions_merge_by_type_under_server_side_apply() {
        let crd =
            serde_json::to_value(<ProxiedCluster as kube::CustomResourceExt>::crd()).expect("json");
        let conditions = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
            ["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(conditions["x-kubernetes-list-map-keys"][0], "type");
    }
}
