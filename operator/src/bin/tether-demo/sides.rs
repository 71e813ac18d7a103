//! The two clusters of the story. By default both are embedded API servers
//! (HTTPS, bearer tokens checked) in this process; with a reachable
//! `$KUBECONFIG`, that one cluster plays both, as in the e2e tests.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tether::pki::{CertificateAuthority, LeafRequest};
use tether::tls::ServerTlsFiles;
use tether_operator::fake_api::{FakeApi, Options};
use tokio::net::TcpListener;

use crate::shell::{Kubectl, write};

/// The management-side namespaces and the workload's namespace. A real
/// cluster gets names of the demo's own, so nothing of a real install
/// (an `argocd` namespace, say) is touched.
#[derive(Debug, Clone)]
pub struct Names {
    pub system: String,
    pub argocd: String,
    pub workload: String,
}

pub struct Sides {
    /// kubectl as the platform team, on the management cluster.
    pub management: Kubectl,
    /// What tether-operator and tether-server run with.
    pub management_kubeconfig: PathBuf,
    /// kubectl as the customer's administrator, on the customer cluster.
    pub customer: Kubectl,
    /// The customer's API server as the agent reaches it (`host:port`) and its CA.
    pub customer_target: String,
    pub customer_ca: PathBuf,
    pub names: Names,
    pub kind: Kind,
}

pub enum Kind {
    Embedded {
        management: FakeApi,
        customer: FakeApi,
        /// The agent's ServiceAccount token, and who it authenticates.
        agent_token: PathBuf,
        agent_user: String,
    },
    /// The cluster of `$KUBECONFIG`; what the demo creates there is
    /// listed in a [`RealCleanup`].
    Real,
}

fn kubeconfig(server: &str, ca: &Path, token: &str, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: {name}-admin\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context: {{cluster: {name}, user: {name}-admin}}\ncurrent-context: {name}\n",
        ca.display()
    )
}

fn random_token() -> String {
    let mut bytes = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    hex::encode(bytes)
}

/// Two embedded API servers on loopback with certificates of a fresh CA.
pub async fn embedded(dir: &Path, agent_user: &str) -> Result<Sides> {
    let validity = Duration::from_secs(24 * 3600);
    let ca = CertificateAuthority::generate("embedded API servers' CA", validity)?;
    let ca_path = write(dir, "apiservers-ca.crt", ca.cert_pem())?;
    let issued = ca.issue(&LeafRequest::server(
        "kube-apiserver",
        &["localhost"],
        &[Ipv4Addr::LOCALHOST.into()],
        validity,
    ))?;
    let tls = ServerTlsFiles {
        cert: write(dir, "apiserver.crt", &issued.cert_pem)?,
        key: write(dir, "apiserver.key", &issued.key_pem)?,
        client_ca: None,
    };
    let start = |users: Vec<(String, String)>| {
        let tls = tls.clone();
        async move {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
            let options = Options {
                tls: Some(tls),
                users,
            };
            anyhow::Ok(FakeApi::start_with(listener, options).await?)
        }
    };
    let (platform_token, customer_admin_token, agent_token) =
        (random_token(), random_token(), random_token());
    let management = start(vec![(platform_token.clone(), "platform-admin".into())]).await?;
    let customer = start(vec![
        (customer_admin_token.clone(), "customer-admin".into()),
        (agent_token.clone(), agent_user.to_owned()),
    ])
    .await?;
    let kubeconfig_for = |api: &FakeApi, token: &str, name: &str| {
        let text = kubeconfig(&format!("https://{}", api.addr), &ca_path, token, name);
        write(dir, &format!("{name}.kubeconfig"), text)
    };
    let management_kubeconfig = kubeconfig_for(&management, &platform_token, "management")?;
    let customer_kubeconfig = kubeconfig_for(&customer, &customer_admin_token, "customer")?;
    Ok(Sides {
        management: Kubectl {
            kubeconfig: Some(management_kubeconfig.clone()),
            shown_as: None,
            plugin_dir: None,
        },
        management_kubeconfig,
        customer: Kubectl {
            kubeconfig: Some(customer_kubeconfig),
            shown_as: Some("--kubeconfig customer.kubeconfig".into()),
            plugin_dir: None,
        },
        customer_target: customer.addr.to_string(),
        customer_ca: ca_path,
        names: Names {
            system: "tether-system".into(),
            argocd: "argocd".into(),
            workload: "demo-app".into(),
        },
        kind: Kind::Embedded {
            management,
            customer,
            agent_token: write(dir, "agent-serviceaccount-token", agent_token)?,
            agent_user: agent_user.to_owned(),
        },
    })
}

/// What the demo made in a real cluster, removed when it ends (after
/// tether's processes stopped, so the operator cannot add a finalizer
/// back): finalizers first, then namespaces and the cluster-scoped
/// objects, the CRD only if the demo installed it.
pub struct RealCleanup {
    kubectl: Kubectl,
    pub namespaces: Vec<String>,
    /// Files of objects to delete (`kubectl delete -f`).
    pub manifests: Vec<PathBuf>,
    pub crd_installed: bool,
    pub proxied: Option<(String, String)>,
}

impl Drop for RealCleanup {
    fn drop(&mut self) {
        let k = &self.kubectl;
        if let Some((namespace, name)) = &self.proxied {
            let _ = k.output(&[
                "patch",
                "proxiedcluster",
                name,
                "-n",
                namespace,
                "--type=merge",
                "-p",
                r#"{"metadata":{"finalizers":null}}"#,
            ]);
        }
        for manifest in &self.manifests {
            let file = manifest.display().to_string();
            let _ = k.output(&["delete", "-f", &file, "--ignore-not-found", "--wait=false"]);
        }
        for namespace in &self.namespaces {
            let _ = k.output(&[
                "delete",
                "namespace",
                namespace,
                "--ignore-not-found",
                "--wait=false",
            ]);
        }
        if self.crd_installed {
            let _ = k.output(&[
                "delete",
                "crd",
                "proxiedclusters.tether.dev",
                "--ignore-not-found",
                "--wait=false",
            ]);
        }
        println!("    removed what the demo created in the cluster of $KUBECONFIG");
    }
}

/// Whether `$KUBECONFIG` is set; then it must answer.
pub fn kubeconfig_cluster() -> Result<Option<Kubectl>> {
    let Some(path) = std::env::var_os("KUBECONFIG") else {
        return Ok(None);
    };
    let kubectl = Kubectl {
        kubeconfig: None,
        shown_as: None,
        plugin_dir: None,
    };
    if let Err(err) = kubectl.output(&["--request-timeout=5s", "get", "--raw", "/readyz"]) {
        let reason = err.to_string();
        let reason = reason.lines().last().unwrap_or_default();
        bail!(
            "$KUBECONFIG ({}) names a cluster that does not answer ({reason}); unset KUBECONFIG to run the demo on its embedded API servers",
            PathBuf::from(path).display()
        );
    }
    Ok(Some(kubectl))
}

/// The cluster of `$KUBECONFIG` as both sides. Refuses when any namespace
/// the demo would create exists already.
pub fn real(
    kubectl: Kubectl,
    dir: &Path,
    tenants: &str,
    agent_namespace: &str,
) -> Result<(Sides, RealCleanup)> {
    let names = Names {
        system: "tether-demo-system".into(),
        argocd: "tether-demo-argocd".into(),
        workload: "tether-demo-app".into(),
    };
    let namespaces = [
        tenants,
        agent_namespace,
        &names.system,
        &names.argocd,
        &names.workload,
    ]
    .map(str::to_owned);
    for namespace in &namespaces {
        if kubectl
            .output(&[
                "get",
                "namespace",
                namespace,
                "--ignore-not-found",
                "-o",
                "name",
            ])?
            .trim()
            .starts_with("namespace/")
        {
            bail!(
                "the cluster of $KUBECONFIG already has namespace {namespace}; the demo only works in namespaces it creates and removes (unset KUBECONFIG to use the embedded API servers)"
            );
        }
    }
    let config: serde_json::Value = serde_json::from_str(
        &kubectl.output(&["config", "view", "--raw", "--minify", "-o", "json"])?,
    )?;
    let cluster = &config["clusters"][0]["cluster"];
    let server = cluster["server"]
        .as_str()
        .context("no server in $KUBECONFIG")?;
    let ca = dir.join("cluster-ca.crt");
    match (
        cluster["certificate-authority-data"].as_str(),
        cluster["certificate-authority"].as_str(),
    ) {
        (Some(data), _) => {
            use base64::Engine;
            std::fs::write(&ca, base64::engine::general_purpose::STANDARD.decode(data)?)?;
        }
        (None, Some(file)) => {
            std::fs::copy(file, &ca)?;
        }
        (None, None) => bail!("$KUBECONFIG names no CA for its API server"),
    }
    let management_kubeconfig = PathBuf::from(std::env::var_os("KUBECONFIG").unwrap_or_default());
    let sides = Sides {
        management: kubectl.clone(),
        management_kubeconfig,
        customer: kubectl.clone(),
        customer_target: server
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned(),
        customer_ca: ca,
        names,
        kind: Kind::Real,
    };
    let cleanup = RealCleanup {
        kubectl,
        namespaces: namespaces.to_vec(),
        manifests: Vec::new(),
        crd_installed: false,
        proxied: None,
    };
    Ok((sides, cleanup))
}
