//! The agent install bundle: every object a customer applies in the
//! air-gapped cluster, as one deterministic multi-document YAML file.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, Namespace, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource, SecurityContext,
    Service, ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tether::pki::Issued;

use crate::crd::{AgentMetricsSpec, AgentProxySpec, ProxiedCluster};

/// Name of every object the bundle creates in the customer cluster.
pub const AGENT_NAME: &str = "tether-agent";
const HEALTH_PORT: i32 = 8081;
const SECRET_MOUNT: &str = "/etc/tether";
/// The Role letting the agent update its own Secret (renewed credentials).
const CREDENTIALS_ROLE: &str = "tether-agent-credentials";
/// tether-agent's path in the all-in-one image.
const AGENT_COMMAND: &str = "/usr/local/bin/tether-agent";
/// The ConfigMap with an https:// proxy's CA, and where it is mounted.
const PROXY_CA_NAME: &str = "tether-agent-proxy-ca";
const PROXY_CA_MOUNT: &str = "/etc/tether-proxy-ca";
/// Where the customer's proxy credentials Secret is mounted, and its key.
const PROXY_CREDENTIALS_MOUNT: &str = "/etc/tether-proxy";
pub const PROXY_CREDENTIALS_KEY: &str = "credentials";
/// The opt-in metrics port, as in the management chart.
const METRICS_PORT: i32 = 8082;
/// Its Service, the ClusterRole a customer binds to their scraper, and the
/// binding that lets the agent review scrapers' tokens.
const METRICS_NAME: &str = "tether-agent-metrics";
const METRICS_READER: &str = "tether-agent-metrics-reader";
const METRICS_AUTH_BINDING: &str = "tether-agent-metrics-auth";
/// The label every namespace carries with its own name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Everything a bundle is made from. Same input, same bytes.
#[derive(Debug, Clone)]
pub struct BundleInput {
    pub cluster_id: String,
    pub namespace: String,
    pub image: String,
    pub replicas: i32,
    pub resources: Option<ResourceRequirements>,
    pub rules: Option<Vec<PolicyRule>>,
    /// wss:// URL of tether-server's public port.
    pub server_url: String,
    pub target: String,
    /// Secret material (agent token, client key): never logged.
    pub token: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    /// CA that signed tether-server's certificate.
    pub server_ca_pem: String,
    /// The customer's HTTP proxy towards tether-server.
    pub proxy: Option<AgentProxySpec>,
    /// The agent's metrics port, when the customer asked for one.
    pub metrics: Option<AgentMetricsSpec>,
}

impl BundleInput {
    /// A ProxiedCluster's bundle input: its spec, with `default_image` and
    /// `default_public_url` where the spec leaves them out.
    pub fn for_cluster(
        pc: &ProxiedCluster,
        default_image: &str,
        default_public_url: Option<&str>,
        token: &str,
        client: &Issued,
        server_ca_pem: &str,
    ) -> Self {
        Self {
            cluster_id: pc.cluster_id(),
            namespace: pc.spec.agent.namespace.clone(),
            image: pc
                .spec
                .agent
                .image
                .clone()
                .unwrap_or_else(|| default_image.to_owned()),
            replicas: pc.spec.agent.replicas,
            resources: pc.spec.agent.resources.clone(),
            rules: pc.spec.agent.rules.clone(),
            server_url: pc
                .spec
                .public_url
                .clone()
                .or_else(|| default_public_url.map(str::to_owned))
                .unwrap_or_default(),
            target: pc.spec.target_address.clone(),
            token: token.to_owned(),
            client_cert_pem: client.cert_pem.clone(),
            client_key_pem: client.key_pem.clone(),
            server_ca_pem: server_ca_pem.to_owned(),
            proxy: pc.spec.agent.proxy.clone(),
            metrics: pc.spec.agent.metrics.clone().filter(|m| m.enabled),
        }
    }

    /// Whether the agent reaches tether-server through the proxy (not
    /// excluded by its no-proxy list), as the agent itself will decide.
    fn proxied(&self) -> Option<&AgentProxySpec> {
        let proxy = self.proxy.as_ref()?;
        let (no_proxy, _) = tether::agent::NoProxy::parse(&proxy.no_proxy.join(","));
        let host = crate::settings::url_host(&self.server_url).unwrap_or_default();
        let port = u16::try_from(port_of_url(&self.server_url)).unwrap_or_default();
        (!no_proxy.matches(host, port)).then_some(proxy)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub yaml: String,
    /// SHA-256 (hex) of the bundle's body: its lines that are not comments.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot serialize {kind}: {source}")]
    Serialize {
        kind: &'static str,
        source: serde_yaml_ng::Error,
    },
    #[error("the bundle has no sha256 header")]
    NoHashHeader,
    #[error("the bundle's body does not match its sha256 header ({declared}); it was altered")]
    Altered { declared: String },
    #[error("the bundle cannot be read back: {0}")]
    Unreadable(String),
}

/// The header's first line, which names the cluster.
const TITLE: &str = "# tether agent bundle for cluster ";

impl BundleInput {
    /// What a bundle was rendered from, read back from its (verified) text:
    /// `render` gives the same bytes again, so an exported bundle can be
    /// re-rendered with a change (the proxy) without its secrets ever
    /// leaving the file.
    pub fn from_bundle(yaml: &str) -> Result<Self, BundleError> {
        verify(yaml)?;
        let unreadable = |what: &str| BundleError::Unreadable(what.to_owned());
        let cluster_id = yaml
            .lines()
            .find_map(|l| l.strip_prefix(TITLE))
            .ok_or_else(|| unreadable("no title line"))?
            .to_owned();
        let mut documents: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for document in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value = serde_json::Value::deserialize(document)
                .map_err(|err| BundleError::Unreadable(err.to_string()))?;
            let kind = value["kind"].as_str().unwrap_or_default().to_owned();
            let name = value["metadata"]["name"].as_str().unwrap_or_default();
            let key = match kind.as_str() {
                "Role" | "RoleBinding" | "Service" => continue,
                "ConfigMap" if name != PROXY_CA_NAME => continue,
                "ClusterRole" | "ClusterRoleBinding" if name != AGENT_NAME => continue,
                _ => kind.clone(),
            };
            documents.insert(key, value);
        }
        fn take<T: serde::de::DeserializeOwned>(
            documents: &BTreeMap<String, serde_json::Value>,
            kind: &str,
        ) -> Result<T, BundleError> {
            let value = documents
                .get(kind)
                .ok_or_else(|| BundleError::Unreadable(format!("no {kind}")))?;
            serde_json::from_value(value.clone())
                .map_err(|err| BundleError::Unreadable(format!("{kind}: {err}")))
        }
        let secret: Secret = take(&documents, "Secret")?;
        let data = secret.data.unwrap_or_default();
        let field = |key: &str| {
            data.get(key)
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .ok_or_else(|| BundleError::Unreadable(format!("Secret has no {key}")))
        };
        let deployment: Deployment = take(&documents, "Deployment")?;
        let spec = deployment
            .spec
            .ok_or_else(|| unreadable("Deployment has no spec"))?;
        let pod = spec
            .template
            .spec
            .ok_or_else(|| unreadable("Deployment has no pod"))?;
        let container = pod
            .containers
            .into_iter()
            .next()
            .ok_or_else(|| unreadable("Deployment has no container"))?;
        let args = container.args.unwrap_or_default();
        let flag = |name: &str| {
            args.iter()
                .find_map(|a| a.strip_prefix(&format!("--{name}=")))
                .map(str::to_owned)
        };
        let proxy = match flag("proxy") {
            None => None,
            Some(url) => Some(AgentProxySpec {
                url,
                no_proxy: flag("no-proxy")
                    .map(|list| {
                        list.split(',')
                            .filter(|e| !e.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
                ca_cert: match documents.contains_key("ConfigMap") {
                    true => take::<ConfigMap>(&documents, "ConfigMap")?
                        .data
                        .and_then(|mut d| d.remove("ca.crt")),
                    false => None,
                },
                credentials_secret_name: pod.volumes.unwrap_or_default().into_iter().find_map(
                    |v| {
                        (v.name == "proxy-credentials")
                            .then(|| v.secret.and_then(|s| s.secret_name))
                            .flatten()
                    },
                ),
            }),
        };
        let metrics = match flag("metrics-auth") {
            None => None,
            Some(auth) => Some(AgentMetricsSpec {
                enabled: true,
                auth,
                allowed_namespaces: take::<NetworkPolicy>(&documents, "NetworkPolicy")?
                    .spec
                    .and_then(|spec| spec.ingress)
                    .unwrap_or_default()
                    .into_iter()
                    .find(|rule| {
                        rule.ports
                            .iter()
                            .flatten()
                            .any(|p| p.port == Some(IntOrString::Int(METRICS_PORT)))
                    })
                    .and_then(|rule| rule.from)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|peer| {
                        peer.namespace_selector?
                            .match_labels?
                            .remove(NAMESPACE_NAME_LABEL)
                    })
                    .collect(),
            }),
        };
        Ok(Self {
            cluster_id,
            namespace: take::<Namespace>(&documents, "Namespace")?
                .metadata
                .name
                .ok_or_else(|| unreadable("Namespace has no name"))?,
            image: container.image.ok_or_else(|| unreadable("no image"))?,
            replicas: spec.replicas.unwrap_or(1),
            resources: container.resources,
            rules: take::<ClusterRole>(&documents, "ClusterRole")?.rules,
            server_url: flag("server").ok_or_else(|| unreadable("no --server"))?,
            target: flag("target").ok_or_else(|| unreadable("no --target"))?,
            token: field("token")?,
            client_cert_pem: field("tls.crt")?,
            client_key_pem: field("tls.key")?,
            server_ca_pem: field("ca.crt")?,
            proxy,
            metrics,
        })
    }
}

/// The header line that carries the hash of the bundle's body.
const HASH_HEADER: &str = "# sha256 of the non-comment lines: ";

/// Checks a bundle against its own hash header, as a reviewer would with
/// `grep -v '^#' | sha256sum`; returns the hash.
pub fn verify(yaml: &str) -> Result<String, BundleError> {
    let declared = yaml
        .lines()
        .find_map(|l| l.strip_prefix(HASH_HEADER))
        .ok_or(BundleError::NoHashHeader)?;
    let body: String = yaml
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let actual = hex::encode(Sha256::digest(body.as_bytes()));
    if actual != declared {
        return Err(BundleError::Altered {
            declared: declared.to_owned(),
        });
    }
    Ok(actual)
}

/// Broad by default, as ArgoCD's own `argocd-manager` ClusterRole: ArgoCD
/// deploys arbitrary resources. `spec.agent.rules` narrows it.
pub fn default_rules() -> Vec<PolicyRule> {
    vec![
        PolicyRule {
            api_groups: Some(vec!["*".into()]),
            resources: Some(vec!["*".into()]),
            verbs: vec!["*".into()],
            ..Default::default()
        },
        PolicyRule {
            non_resource_urls: Some(vec!["*".into()]),
            verbs: vec!["*".into()],
            ..Default::default()
        },
    ]
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), AGENT_NAME.to_owned()),
        ("app.kubernetes.io/part-of".to_owned(), "tether".to_owned()),
    ])
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some(labels()),
        ..Default::default()
    }
}

/// The port of a ws(s):// or http(s):// URL (its host: `url_host`).
fn port_of_url(url: &str) -> i32 {
    let authority = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or("");
    let default = if url.starts_with("ws://") || url.starts_with("http://") {
        80
    } else {
        443
    };
    // A colon after the last `]` separates the port (IPv6 hosts are bracketed).
    match authority.rsplit_once(':') {
        Some((_, port)) if !port.contains(']') => port.parse().unwrap_or(default),
        _ => default,
    }
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some("TCP".into()),
        port: Some(IntOrString::Int(port)),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(HEALTH_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period),
        ..Default::default()
    }
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity("20m".into())),
            ("memory".to_owned(), Quantity("32Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            Quantity("256Mi".into()),
        )])),
        ..Default::default()
    }
}

fn deployment(input: &BundleInput) -> Deployment {
    // The agent reads token, ca.crt, tls.crt and tls.key from the mounted
    // Secret, and writes renewed certificates back to that Secret.
    let mut args = vec![
        format!("--server={}", input.server_url),
        format!("--credentials-dir={SECRET_MOUNT}"),
        format!("--credentials-secret={AGENT_NAME}"),
        format!("--target={}", input.target),
        format!("--health-addr=:{HEALTH_PORT}"),
    ];
    let mut ports = vec![ContainerPort {
        name: Some("health".into()),
        container_port: HEALTH_PORT,
        protocol: Some("TCP".into()),
        ..Default::default()
    }];
    if let Some(metrics) = &input.metrics {
        args.push(format!("--metrics-addr=:{METRICS_PORT}"));
        args.push(format!("--metrics-auth={}", metrics.auth));
        ports.push(ContainerPort {
            name: Some("metrics".into()),
            container_port: METRICS_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        });
    }
    let mut volumes = vec![Volume {
        name: "credentials".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(AGENT_NAME.into()),
            default_mode: Some(0o440),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "credentials".into(),
        mount_path: SECRET_MOUNT.into(),
        read_only: Some(true),
        ..Default::default()
    }];
    if let Some(proxy) = &input.proxy {
        // The flag, not HTTPS_PROXY: the agent's NO_PROXY defaults must not
        // depend on what else the pod's environment holds.
        args.push(format!("--proxy={}", proxy.url));
        args.push(format!("--no-proxy={}", proxy.no_proxy.join(",")));
        if proxy.ca_cert.is_some() {
            args.push(format!("--proxy-ca-cert={PROXY_CA_MOUNT}/ca.crt"));
            volumes.push(Volume {
                name: "proxy-ca".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: PROXY_CA_NAME.into(),
                    ..Default::default()
                }),
                ..Default::default()
            });
            mounts.push(VolumeMount {
                name: "proxy-ca".into(),
                mount_path: PROXY_CA_MOUNT.into(),
                read_only: Some(true),
                ..Default::default()
            });
        }
        if let Some(secret) = &proxy.credentials_secret_name {
            args.push(format!(
                "--proxy-credentials-file={PROXY_CREDENTIALS_MOUNT}/{PROXY_CREDENTIALS_KEY}"
            ));
            volumes.push(Volume {
                name: "proxy-credentials".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.clone()),
                    default_mode: Some(0o440),
                    // The customer creates it; until then the agent tries
                    // without credentials and says so when the proxy asks.
                    optional: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            });
            mounts.push(VolumeMount {
                name: "proxy-credentials".into(),
                mount_path: PROXY_CREDENTIALS_MOUNT.into(),
                read_only: Some(true),
                ..Default::default()
            });
        }
    }
    let container = Container {
        name: "agent".into(),
        image: Some(input.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        // The image holds every tether binary and its entrypoint is
        // tether-server: the agent must name its program.
        command: Some(vec![AGENT_COMMAND.into()]),
        args: Some(args),
        env: Some(vec![EnvVar {
            name: "POD_NAMESPACE".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.namespace".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ports: Some(ports),
        liveness_probe: Some(http_probe("/healthz", 20)),
        readiness_probe: Some(http_probe("/readyz", 10)),
        resources: Some(input.resources.clone().unwrap_or_else(default_resources)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    Deployment {
        metadata: meta(AGENT_NAME, Some(&input.namespace)),
        spec: Some(DeploymentSpec {
            replicas: Some(input.replicas),
            selector: LabelSelector {
                match_labels: Some(labels()),
                ..Default::default()
            },
            // One tunnel per cluster: never run two agents side by side.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels()),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(AGENT_NAME.into()),
                    // The agent's own token, rotated by the kubelet and
                    // re-read by the agent for every request.
                    automount_service_account_token: Some(true),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        // The credentials volume is root-owned, mode 0440:
                        // the pod reads it through its fsGroup.
                        fs_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn network_policy(input: &BundleInput) -> NetworkPolicy {
    let dns = NetworkPolicyEgressRule {
        ports: Some(vec![
            NetworkPolicyPort {
                protocol: Some("UDP".into()),
                port: Some(IntOrString::Int(53)),
                ..Default::default()
            },
            tcp(53),
        ]),
        ..Default::default()
    };
    let target_port = input
        .target
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(443);
    // NetworkPolicy cannot name hosts, only ports: egress is limited to DNS,
    // tether-server's port and the API server's ports (443 for the Service,
    // 6443 for the endpoints it is rewritten to).
    let mut api_ports: Vec<i32> = vec![443, 6443, target_port];
    api_ports.sort_unstable();
    api_ports.dedup();
    let server = NetworkPolicyEgressRule {
        // Through a proxy, the agent connects to the proxy alone.
        ports: Some(vec![tcp(match input.proxied() {
            Some(proxy) => port_of_url(&proxy.url),
            None => port_of_url(&input.server_url),
        })]),
        ..Default::default()
    };
    let api = NetworkPolicyEgressRule {
        ports: Some(api_ports.into_iter().map(tcp).collect()),
        ..Default::default()
    };
    NetworkPolicy {
        metadata: meta(AGENT_NAME, Some(&input.namespace)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(labels()),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            // Only probes and metrics reach the agent; tunnel traffic
            // arrives over the connection the agent dialed.
            ingress: Some(
                std::iter::once(NetworkPolicyIngressRule {
                    ports: Some(vec![tcp(HEALTH_PORT)]),
                    ..Default::default()
                })
                .chain(input.metrics.as_ref().and_then(metrics_ingress))
                .collect(),
            ),
            egress: Some(vec![dns, server, api]),
        }),
    }
}

/// The metrics port admits the namespaces the customer named, and only
/// them. None named: no rule (an empty `from` would admit everyone).
fn metrics_ingress(metrics: &AgentMetricsSpec) -> Option<NetworkPolicyIngressRule> {
    if metrics.allowed_namespaces.is_empty() {
        return None;
    }
    let peers = metrics
        .allowed_namespaces
        .iter()
        .map(|namespace| NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    NAMESPACE_NAME_LABEL.to_owned(),
                    namespace.clone(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    Some(NetworkPolicyIngressRule {
        from: Some(peers),
        ports: Some(vec![tcp(METRICS_PORT)]),
    })
}

/// The Service a customer's ServiceMonitor selects, the ClusterRole to
/// bind to their scraper, and (token review) the agent's delegation.
fn metrics_objects(
    input: &BundleInput,
    metrics: &AgentMetricsSpec,
) -> Result<Vec<String>, BundleError> {
    let mut service_labels = labels();
    service_labels.insert("tether.dev/metrics".into(), "true".into());
    let service = Service {
        metadata: ObjectMeta {
            labels: Some(service_labels),
            ..meta(METRICS_NAME, Some(&input.namespace))
        },
        spec: Some(ServiceSpec {
            selector: Some(labels()),
            ports: Some(vec![ServicePort {
                name: Some("metrics".into()),
                port: METRICS_PORT,
                target_port: Some(IntOrString::String("metrics".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut documents = vec![document("Service", &service)?];
    if metrics.auth == "kubernetes" {
        let reader = ClusterRole {
            metadata: meta(METRICS_READER, None),
            rules: Some(vec![PolicyRule {
                non_resource_urls: Some(vec!["/metrics".into()]),
                verbs: vec!["get".into()],
                ..Default::default()
            }]),
            ..Default::default()
        };
        let delegation = ClusterRoleBinding {
            metadata: meta(METRICS_AUTH_BINDING, None),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: "system:auth-delegator".into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: AGENT_NAME.into(),
                namespace: Some(input.namespace.clone()),
                ..Default::default()
            }]),
        };
        documents.push(document("ClusterRole", &reader)?);
        documents.push(document("ClusterRoleBinding", &delegation)?);
    }
    Ok(documents)
}

fn secret(input: &BundleInput) -> Secret {
    let data = BTreeMap::from([
        (
            "ca.crt".to_owned(),
            ByteString(input.server_ca_pem.clone().into_bytes()),
        ),
        (
            "tls.crt".to_owned(),
            ByteString(input.client_cert_pem.clone().into_bytes()),
        ),
        (
            "tls.key".to_owned(),
            ByteString(input.client_key_pem.clone().into_bytes()),
        ),
        (
            "token".to_owned(),
            ByteString(input.token.clone().into_bytes()),
        ),
    ]);
    Secret {
        metadata: meta(AGENT_NAME, Some(&input.namespace)),
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// The header lines about the proxy: where the agent goes, and the Secret
/// only the customer can create.
fn proxy_header(input: &BundleInput) -> String {
    let Some(proxy) = &input.proxy else {
        return String::new();
    };
    let route = match input.proxied() {
        Some(_) => format!(
            "# The agent reaches tether-server through HTTP proxy {}.\n",
            proxy.url
        ),
        None => format!(
            "# HTTP proxy {} is configured, but tether-server is in its no-proxy list.\n",
            proxy.url
        ),
    };
    let credentials = match &proxy.credentials_secret_name {
        Some(secret) => format!(
            "# Proxy credentials stay in your cluster: create them before or after applying:\n\
             #   kubectl -n {ns} create secret generic {secret} --from-literal={PROXY_CREDENTIALS_KEY}='user:password'\n\
             # The bundle mounts that Secret as optional: until it exists, the agent\n\
             # connects without credentials and its /readyz says the proxy wants them.\n",
            ns = input.namespace,
        ),
        None => String::new(),
    };
    format!("{route}{credentials}")
}

fn document<T: Serialize>(kind: &'static str, object: &T) -> Result<String, BundleError> {
    serde_yaml_ng::to_string(object).map_err(|source| BundleError::Serialize { kind, source })
}

/// Renders the bundle. Deterministic: the same input gives the same bytes.
pub fn render(input: &BundleInput) -> Result<Bundle, BundleError> {
    let namespace = Namespace {
        metadata: meta(&input.namespace, None),
        ..Default::default()
    };
    let service_account = ServiceAccount {
        metadata: meta(AGENT_NAME, Some(&input.namespace)),
        ..Default::default()
    };
    let role = ClusterRole {
        metadata: meta(AGENT_NAME, None),
        rules: Some(input.rules.clone().unwrap_or_else(default_rules)),
        ..Default::default()
    };
    let binding = ClusterRoleBinding {
        metadata: meta(AGENT_NAME, None),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: AGENT_NAME.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: AGENT_NAME.into(),
            namespace: Some(input.namespace.clone()),
            ..Default::default()
        }]),
    };
    // Renewed credentials go to the agent's own Secret, and only there.
    let credentials_role = Role {
        metadata: meta(CREDENTIALS_ROLE, Some(&input.namespace)),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            resource_names: Some(vec![AGENT_NAME.into()]),
            verbs: vec!["get".into(), "update".into()],
            ..Default::default()
        }]),
    };
    let credentials_binding = RoleBinding {
        metadata: meta(CREDENTIALS_ROLE, Some(&input.namespace)),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: CREDENTIALS_ROLE.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: AGENT_NAME.into(),
            namespace: Some(input.namespace.clone()),
            ..Default::default()
        }]),
    };
    let mut documents = vec![
        document("Namespace", &namespace)?,
        document("ServiceAccount", &service_account)?,
        document("ClusterRole", &role)?,
        document("ClusterRoleBinding", &binding)?,
        document("Role", &credentials_role)?,
        document("RoleBinding", &credentials_binding)?,
        document("Secret", &secret(input))?,
    ];
    if let Some(ca) = input.proxy.as_ref().and_then(|p| p.ca_cert.as_ref()) {
        let config_map = ConfigMap {
            metadata: meta(PROXY_CA_NAME, Some(&input.namespace)),
            data: Some(BTreeMap::from([("ca.crt".to_owned(), ca.clone())])),
            ..Default::default()
        };
        documents.push(document("ConfigMap", &config_map)?);
    }
    documents.push(document("Deployment", &deployment(input))?);
    documents.push(document("NetworkPolicy", &network_policy(input))?);
    if let Some(metrics) = &input.metrics {
        documents.extend(metrics_objects(input, metrics)?);
    }
    let body: String = documents.iter().map(|doc| format!("---\n{doc}")).collect();
    let sha256 = hex::encode(Sha256::digest(body.as_bytes()));
    let header = format!(
        "{TITLE}{id}\n\
         # Apply in the customer cluster: kubectl apply -f <this file>\n\
         # It creates namespace {ns}, a ServiceAccount with a ClusterRole, and\n\
         # tether-agent, which dials out to {server} and listens on nothing\n\
         # but its health port ({health}){metrics}.\n\
         # SECRET: contains the agent token and client key. Handle as a secret.\n\
         {proxy}\
         # Images to mirror: {image}\n\
         {HASH_HEADER}{sha256}\n\
         #   check: grep -v '^#' <this file> | sha256sum\n",
        id = input.cluster_id,
        ns = input.namespace,
        server = input.server_url,
        health = HEALTH_PORT,
        metrics = match &input.metrics {
            Some(m) => format!(
                "\n# and its metrics port ({METRICS_PORT}, auth {}, from namespaces: {})",
                m.auth,
                m.allowed_namespaces.join(", ")
            ),
            None => String::new(),
        },
        proxy = proxy_header(input),
        image = input.image,
    );
    Ok(Bundle {
        yaml: format!("{header}{body}"),
        sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn input() -> BundleInput {
        BundleInput {
            cluster_id: "customer-a".into(),
            namespace: "tether-agent".into(),
            image: "ghcr.io/tether-dev/tether:0.1.0".into(),
            replicas: 1,
            resources: None,
            rules: None,
            server_url: "wss://tether.example.com:8443".into(),
            target: "kubernetes.default.svc:443".into(),
            token: "secret-token".into(),
            client_cert_pem: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"
                .into(),
            client_key_pem: "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n".into(),
            server_ca_pem: "-----BEGIN CERTIFICATE-----\nAQ==\n-----END CERTIFICATE-----\n".into(),
            proxy: None,
            metrics: None,
        }
    }

    fn proxied_input() -> BundleInput {
        BundleInput {
            proxy: Some(AgentProxySpec {
                url: "http://proxy.corp.example:3128".into(),
                no_proxy: vec![".corp.example".into(), "10.0.0.0/8".into()],
                ca_cert: Some(
                    "-----BEGIN CERTIFICATE-----\nAg==\n-----END CERTIFICATE-----\n".into(),
                ),
                credentials_secret_name: Some("corp-proxy".into()),
            }),
            ..input()
        }
    }

    fn egress_ports(bundle: &Bundle) -> Vec<i32> {
        let policy: NetworkPolicy = serde_yaml_ng::Deserializer::from_str(&bundle.yaml)
            .map(|doc| serde_json::Value::deserialize(doc).expect("yaml"))
            .find(|d| d["kind"] == "NetworkPolicy")
            .map(|d| serde_json::from_value(d).expect("NetworkPolicy"))
            .expect("a NetworkPolicy");
        policy
            .spec
            .expect("spec")
            .egress
            .expect("egress")
            .iter()
            .flat_map(|r| r.ports.clone().unwrap_or_default())
            .filter_map(|p| match p.port {
                Some(IntOrString::Int(port)) => Some(port),
                _ => None,
            })
            .collect()
    }

    /// The proxy reaches the pod as flags and volumes; the credentials
    /// Secret is the customer's (optional, named in the header); egress
    /// goes to the proxy's port instead of tether-server's.
    #[test]
    fn a_proxied_bundle_mounts_the_customers_secret_and_allows_the_proxy() {
        let bundle = render(&proxied_input()).expect("renders");
        let deployment: Deployment = serde_yaml_ng::Deserializer::from_str(&bundle.yaml)
            .map(|doc| serde_json::Value::deserialize(doc).expect("yaml"))
            .find(|d| d["kind"] == "Deployment")
            .map(|d| serde_json::from_value(d).expect("Deployment"))
            .expect("a Deployment");
        let pod = deployment.spec.expect("spec").template.spec.expect("pod");
        let args = pod.containers[0].args.clone().expect("args");
        for expected in [
            "--proxy=http://proxy.corp.example:3128",
            "--no-proxy=.corp.example,10.0.0.0/8",
            "--proxy-ca-cert=/etc/tether-proxy-ca/ca.crt",
            "--proxy-credentials-file=/etc/tether-proxy/credentials",
        ] {
            assert!(
                args.contains(&expected.to_owned()),
                "{expected} in {args:?}"
            );
        }
        let volumes = pod.volumes.expect("volumes");
        let credentials = volumes
            .iter()
            .find(|v| v.name == "proxy-credentials")
            .and_then(|v| v.secret.clone())
            .expect("credentials volume");
        assert_eq!(credentials.secret_name.as_deref(), Some("corp-proxy"));
        assert_eq!(credentials.optional, Some(true));
        assert!(bundle.yaml.contains("kind: ConfigMap"));
        assert!(bundle.yaml.contains(
            "#   kubectl -n tether-agent create secret generic corp-proxy --from-literal=credentials='user:password'"
        ));
        assert!(
            !bundle
                .yaml
                .contains("kind: Secret\nmetadata:\n  name: corp-proxy"),
            "never the customer's Secret"
        );
        assert_eq!(egress_ports(&bundle), [53, 53, 3128, 443, 6443]);

        // tether-server in the no-proxy list: the agent goes direct, and so
        // does the policy.
        let mut direct = proxied_input();
        if let Some(proxy) = direct.proxy.as_mut() {
            proxy.no_proxy.push("tether.example.com".into());
        }
        let bundle = render(&direct).expect("renders");
        assert_eq!(egress_ports(&bundle), [53, 53, 8443, 443, 6443]);
        assert!(bundle.yaml.contains("is in its no-proxy list"));
    }

    /// A bundle read back renders to the same bytes: what `bundle export
    /// --proxy` builds on.
    fn metrics_input(auth: &str) -> BundleInput {
        BundleInput {
            metrics: Some(AgentMetricsSpec {
                enabled: true,
                auth: auth.into(),
                allowed_namespaces: vec!["monitoring".into(), "observability".into()],
            }),
            ..input()
        }
    }

    fn documents(bundle: &Bundle) -> Vec<serde_json::Value> {
        serde_yaml_ng::Deserializer::from_str(&bundle.yaml)
            .map(|doc| serde_json::Value::deserialize(doc).expect("yaml"))
            .collect()
    }

    #[test]
    fn metrics_are_opt_in_and_admitted_from_the_named_namespaces_only() {
        let plain = documents(&render(&input()).expect("renders"));
        assert!(!plain.iter().any(|d| d["kind"] == "Service"));
        let bundle = render(&metrics_input("kubernetes")).expect("renders");
        assert!(
            bundle
                .yaml
                .contains("and its metrics port (8082, auth kubernetes")
        );
        let docs = documents(&bundle);
        let find = |kind: &str, name: &str| {
            docs.iter()
                .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("{kind}/{name}"))
        };
        let container =
            &find("Deployment", AGENT_NAME)["spec"]["template"]["spec"]["containers"][0];
        let args = container["args"].as_array().expect("args");
        assert!(args.contains(&serde_json::json!("--metrics-addr=:8082")));
        assert!(args.contains(&serde_json::json!("--metrics-auth=kubernetes")));
        assert_eq!(container["ports"][1]["name"], "metrics");
        let ingress = &find("NetworkPolicy", AGENT_NAME)["spec"]["ingress"];
        assert_eq!(ingress[1]["ports"][0]["port"], 8082);
        assert_eq!(
            ingress[1]["from"][1]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            "observability"
        );
        assert_eq!(
            find("Service", METRICS_NAME)["spec"]["ports"][0]["port"],
            8082
        );
        assert_eq!(
            find("ClusterRole", METRICS_READER)["rules"][0]["nonResourceURLs"][0],
            "/metrics"
        );
        assert_eq!(
            find("ClusterRoleBinding", METRICS_AUTH_BINDING)["roleRef"]["name"],
            "system:auth-delegator"
        );
        // Without token review there is nothing to delegate.
        let open = documents(&render(&metrics_input("none")).expect("renders"));
        assert!(
            !open
                .iter()
                .any(|d| d["metadata"]["name"] == METRICS_AUTH_BINDING)
        );
        // No namespace named: no rule, rather than one admitting everyone.
        let mut nobody = metrics_input("none");
        if let Some(m) = nobody.metrics.as_mut() {
            m.allowed_namespaces.clear();
        }
        let docs = documents(&render(&nobody).expect("renders"));
        let policy = docs
            .iter()
            .find(|d| d["kind"] == "NetworkPolicy")
            .expect("policy");
        assert_eq!(policy["spec"]["ingress"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn a_bundle_reads_back_to_what_rendered_it() {
        for input in [
            input(),
            proxied_input(),
            metrics_input("kubernetes"),
            metrics_input("none"),
        ] {
            let bundle = render(&input).expect("renders");
            let read = BundleInput::from_bundle(&bundle.yaml).expect("reads back");
            assert_eq!(render(&read).expect("renders").yaml, bundle.yaml);
        }
        let bundle = render(&input()).expect("renders");
        let altered = bundle.yaml.replace("replicas: 1", "replicas: 0");
        assert!(matches!(
            BundleInput::from_bundle(&altered),
            Err(BundleError::Altered { .. })
        ));
    }

    #[test]
    fn rendering_is_deterministic_and_hashes_its_body() {
        let a = render(&input()).expect("renders");
        let b = render(&input()).expect("renders");
        assert_eq!(a, b);
        let body: String = a
            .yaml
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(hex::encode(Sha256::digest(body.as_bytes())), a.sha256);
        assert!(
            a.yaml
                .contains(&format!("# sha256 of the non-comment lines: {}", a.sha256))
        );
        let mut rotated = input();
        rotated.token = "another".into();
        assert_ne!(render(&rotated).expect("renders").sha256, a.sha256);
    }

    #[test]
    fn every_document_parses_and_is_locked_down() {
        let bundle = render(&input()).expect("renders");
        let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&bundle.yaml)
            .map(|doc| serde_json::Value::deserialize(doc).expect("yaml"))
            .collect();
        let kinds: Vec<&str> = docs
            .iter()
            .map(|d| d["kind"].as_str().expect("kind"))
            .collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "Secret",
                "Deployment",
                "NetworkPolicy"
            ]
        );
        // The agent may write its own Secret (renewed credentials) and no other.
        let role: Role = serde_json::from_value(docs[4].clone()).expect("Role");
        let rules = role.rules.expect("rules");
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["secrets".to_owned()][..])
        );
        assert_eq!(
            rules[0].resource_names.as_deref(),
            Some(&[AGENT_NAME.to_owned()][..])
        );
        assert_eq!(rules[0].verbs, ["get", "update"]);
        let deployment: Deployment = serde_json::from_value(docs[7].clone()).expect("Deployment");
        let pod = deployment.spec.expect("spec").template.spec.expect("pod");
        let security = pod.containers[0]
            .security_context
            .clone()
            .expect("security context");
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(
            security.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_owned()])
        );
        assert_eq!(
            security.seccomp_profile.map(|s| s.type_),
            Some("RuntimeDefault".to_owned())
        );
        let args = pod.containers[0].args.clone().expect("args");
        assert!(args.contains(&"--target=kubernetes.default.svc:443".to_owned()));
        assert!(
            !args.iter().any(|a| a.contains("secret-token")),
            "token only in the Secret"
        );
        assert!(args.contains(&format!("--credentials-secret={AGENT_NAME}")));
        let policy: NetworkPolicy = serde_json::from_value(docs[8].clone()).expect("NetworkPolicy");
        let egress = policy.spec.expect("spec").egress.expect("egress");
        let ports: Vec<i32> = egress
            .iter()
            .flat_map(|r| r.ports.clone().unwrap_or_default())
            .filter_map(|p| match p.port {
                Some(IntOrString::Int(port)) => Some(port),
                _ => None,
            })
            .collect();
        assert_eq!(ports, [53, 53, 8443, 443, 6443]);
    }

    #[test]
    fn tampered_bundles_are_detected() {
        let yaml = "# sha256 of the non-comment lines: x\n---\nkind: Namespace\n";
        assert!(verify(yaml).is_err());
        let body = "---\nkind: Namespace\n";
        let good = format!(
            "# sha256 of the non-comment lines: {}\n{body}",
            hex::encode(Sha256::digest(body))
        );
        assert!(verify(&good).is_ok());
        assert!(verify(&good.replace("Namespace", "Nemaspace")).is_err());
    }
}
