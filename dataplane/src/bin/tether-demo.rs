//! `make demo`: tether's main job on one machine, no cluster needed.
//!
//! Makes a fresh CA, starts a kube-apiserver double (HTTPS, bearer-token
//! checked), then tether-server and tether-agent as real processes joined
//! by an mTLS WebSocket tunnel, and drives kubectl through the tunnel the
//! way ArgoCD would, printing what each side saw.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tether::fake_apiserver::FakeApiServer;
use tether::pki::{CertificateAuthority, LeafRequest};
use tether::tls::ServerTlsFiles;
use tokio::net::TcpListener;

const CLUSTER: &str = "demo";
/// What the demo creates in a real cluster (and removes when it ends).
const DEMO_NAMESPACE: &str = "tether-demo";
const DEMO_ACCOUNT: &str = "tether-demo-agent";

/// The customer cluster of the demo.
enum Customer {
    /// The kube-apiserver double, with the agent's token in a file.
    Double {
        api: FakeApiServer,
        sa_token: PathBuf,
        ca: PathBuf,
    },
    /// The API server of $KUBECONFIG.
    Real(RealCluster),
}

impl Customer {
    fn target(&self) -> String {
        match self {
            Customer::Double { api, .. } => api.addr.to_string(),
            Customer::Real(real) => real.target.clone(),
        }
    }

    fn sa_token(&self) -> &Path {
        match self {
            Customer::Double { sa_token, .. } => sa_token,
            Customer::Real(real) => &real.sa_token,
        }
    }

    fn ca(&self) -> &Path {
        match self {
            Customer::Double { ca, .. } => ca,
            Customer::Real(real) => &real.ca,
        }
    }
}

/// A reachable cluster from $KUBECONFIG: a ServiceAccount bound to `view`
/// whose token the agent uses, removed again on drop.
struct RealCluster {
    target: String,
    ca: PathBuf,
    sa_token: PathBuf,
}

/// kubectl as the user of $KUBECONFIG; the error carries kubectl's message.
fn admin_kubectl(args: &[&str]) -> Result<String> {
    let output = Command::new("kubectl")
        .arg("--request-timeout=10s")
        .args(args)
        .output()
        .context("running kubectl")?;
    if !output.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

impl RealCluster {
    fn detect(dir: &Path) -> Result<Option<Self>> {
        if std::env::var_os("KUBECONFIG").is_none()
            || admin_kubectl(&["get", "--raw", "/readyz"]).is_err()
        {
            return Ok(None);
        }
        let config: serde_json::Value = serde_json::from_str(&admin_kubectl(&[
            "config", "view", "--raw", "--minify", "-o", "json",
        ])?)?;
        let cluster = &config["clusters"][0]["cluster"];
        let server = cluster["server"]
            .as_str()
            .context("no server in $KUBECONFIG")?;
        let target = server
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned();
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
        let manifest = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {DEMO_NAMESPACE}}}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {DEMO_ACCOUNT}, namespace: {DEMO_NAMESPACE}}}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {DEMO_ACCOUNT}}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}}\nsubjects: [{{kind: ServiceAccount, name: {DEMO_ACCOUNT}, namespace: {DEMO_NAMESPACE}}}]\n"
        );
        let file = write(dir, "demo-account.yaml", &manifest)?;
        // A previous run's namespace may still be terminating.
        let namespace = format!("namespace/{DEMO_NAMESPACE}");
        let _ = admin_kubectl(&["wait", "--for=delete", &namespace, "--timeout=120s"]);
        admin_kubectl(&["apply", "-f", &file.display().to_string()])?;
        let token = admin_kubectl(&[
            "create",
            "token",
            DEMO_ACCOUNT,
            "-n",
            DEMO_NAMESPACE,
            "--duration",
            "1h",
        ])?;
        let sa_token = write(dir, "sa-token", token.trim())?;
        Ok(Some(Self {
            target,
            ca,
            sa_token,
        }))
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        let _ = admin_kubectl(&[
            "delete",
            "clusterrolebinding",
            DEMO_ACCOUNT,
            "--ignore-not-found",
        ]);
        let _ = admin_kubectl(&[
            "delete",
            "namespace",
            DEMO_NAMESPACE,
            "--ignore-not-found",
            "--wait=false",
        ]);
    }
}
const VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// Child processes are killed when the demo ends, however it ends.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn write(dir: &Path, name: &str, contents: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Distinct free loopback ports, all held while chosen (ports picked one
/// by one can repeat).
fn free_ports<const N: usize>() -> Result<[SocketAddr; N]> {
    let held = (0..N)
        .map(|_| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut addrs = [SocketAddr::from((Ipv4Addr::LOCALHOST, 0)); N];
    for (addr, listener) in addrs.iter_mut().zip(&held) {
        *addr = listener.local_addr()?;
    }
    Ok(addrs)
}

fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found next to tether-demo: build all binaries (cargo build --bins)",
            path.display()
        );
    }
    Ok(path)
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .context("running kubectl (is it installed?)")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "kubectl {} failed: {}{}",
            args.join(" "),
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(stdout)
}

#[tokio::main]
async fn main() -> Result<()> {
    tether::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let d = dir.path();

    step(
        "Fresh CA (ECDSA P-256) and certificates for tether-server, the agent, ArgoCD and the API server",
    );
    let ca = CertificateAuthority::generate("tether demo CA", VALIDITY)?;
    let ca_path = write(d, "ca.crt", ca.cert_pem())?;
    let loopback = [Ipv4Addr::LOCALHOST.into()];
    let issue = |name: &str, request: LeafRequest| -> Result<(PathBuf, PathBuf)> {
        let issued = ca.issue(&request)?;
        Ok((
            write(d, &format!("{name}.crt"), &issued.cert_pem)?,
            write(d, &format!("{name}.key"), &issued.key_pem)?,
        ))
    };
    let (server_cert, server_key) = issue(
        "server",
        LeafRequest::server("tether-server", &["localhost"], &loopback, VALIDITY),
    )?;
    let (agent_cert, agent_key) = issue("agent", LeafRequest::agent(CLUSTER, VALIDITY))?;
    let (argocd_cert, argocd_key) = issue("argocd", LeafRequest::client("argocd", VALIDITY))?;
    let (api_cert, api_key) = issue(
        "apiserver",
        LeafRequest::server("kube-apiserver", &["localhost"], &loopback, VALIDITY),
    )?;
    println!("    CA and 4 leaf certificates in {}", d.display());

    let customer = match RealCluster::detect(d)? {
        Some(real) => {
            step(
                "Customer side: the API server of $KUBECONFIG, reached as a throwaway ServiceAccount bound to `view`",
            );
            println!(
                "    API server at https://{} (ServiceAccount {}/{})",
                real.target, DEMO_NAMESPACE, DEMO_ACCOUNT
            );
            Customer::Real(real)
        }
        None => {
            step(
                "Customer side: a kube-apiserver double on HTTPS that only accepts the agent's ServiceAccount token",
            );
            let sa_token = write(d, "sa-token", "demo-serviceaccount-token")?;
            let api = FakeApiServer::start(
                TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?,
                Some(ServerTlsFiles {
                    cert: api_cert,
                    key: api_key,
                    client_ca: None,
                }),
                sa_token.clone(),
            )
            .await?;
            println!(
                "    API server at https://{} ($KUBECONFIG unset or unreachable)",
                api.addr
            );
            Customer::Double {
                api,
                sa_token,
                ca: ca_path.clone(),
            }
        }
    };

    step("Management side: tether-server with mTLS on both ports");
    let agent_token = "demo-agent-token";
    let clusters = write(
        d,
        "clusters.json",
        &serde_json::json!([{"id": CLUSTER, "token": agent_token, "targetAddr": customer.target()}]).to_string(),
    )?;
    let [public, internal, health] = free_ports()?;
    let mut processes = Processes(Vec::new());
    processes.0.push(
        Command::new(sibling_binary("tether-server")?)
            .args([
                "--addr",
                &public.to_string(),
                "--internal-addr",
                &internal.to_string(),
            ])
            .arg("--clusters")
            .arg(&clusters)
            .arg("--tls-cert")
            .arg(&server_cert)
            .arg("--tls-key")
            .arg(&server_key)
            .arg("--tls-client-ca")
            .arg(&ca_path)
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .spawn()
            .context("starting tether-server")?,
    );
    println!("    public (agents) https://{public}   internal (ArgoCD) https://{internal}");

    step(
        "Customer side: tether-agent dials OUT to the server (it listens on nothing but its health port)",
    );
    let token_file = write(d, "agent-token", agent_token)?;
    processes.0.push(
        Command::new(sibling_binary("tether-agent")?)
            .args(["--server", &format!("wss://localhost:{}", public.port())])
            .arg("--token-file")
            .arg(&token_file)
            .args(["--target", &customer.target()])
            .arg("--sa-token-path")
            .arg(customer.sa_token())
            .arg("--ca-cert")
            .arg(customer.ca())
            .arg("--server-ca-cert")
            .arg(&ca_path)
            .arg("--client-cert")
            .arg(&agent_cert)
            .arg("--client-key")
            .arg(&agent_key)
            .args(["--health-addr", &health.to_string(), "--log-level", "warn"])
            .stdin(Stdio::null())
            .spawn()
            .context("starting tether-agent")?,
    );
    let started = Instant::now();
    loop {
        let ready = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", &format!("http://{health}/readyz")])
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("the agent did not connect within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("    tunnel up after {:?}", started.elapsed());

    step(
        "ArgoCD's view: a kubeconfig that points at the tunnel and holds only ArgoCD's client certificate",
    );
    let kubeconfig = write(
        d,
        "argocd.kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {CLUSTER}\n  cluster:\n    server: https://localhost:{port}/tunnel/{CLUSTER}\n    certificate-authority: {ca}\nusers:\n- name: argocd\n  user:\n    client-certificate: {cert}\n    client-key: {key}\ncontexts:\n- name: {CLUSTER}\n  context: {{cluster: {CLUSTER}, user: argocd}}\ncurrent-context: {CLUSTER}\n",
            port = internal.port(),
            ca = ca_path.display(),
            cert = argocd_cert.display(),
            key = argocd_key.display(),
        ),
    )?;
    println!(
        "    server: https://localhost:{}/tunnel/{CLUSTER}",
        internal.port()
    );

    step("kubectl version (through the tunnel)");
    // Read the JSON even when kubectl exits non-zero: it also complains about
    // server versions it cannot parse (unstamped builds), after printing them.
    let output = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["version", "-o", "json"])
        .output()
        .context("running kubectl")?;
    let version: serde_json::Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "kubectl version: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    println!(
        "    server version: {}",
        version["serverVersion"]["gitVersion"]
    );

    step("kubectl get namespaces (through the tunnel)");
    print!("{}", kubectl(&kubeconfig, &["get", "namespaces"])?);

    step("A caller's own credentials never cross the tunnel");
    kubectl(
        &kubeconfig,
        &[
            "--token",
            "management-side-secret",
            "get",
            "namespaces",
            "-o",
            "name",
        ],
    )?;
    match &customer {
        Customer::Double { api, .. } => {
            let seen = api.seen();
            let all_agent = seen.iter().all(|r| r.authorized);
            let leaked = seen.iter().any(|r| {
                r.headers.values().any(|v| {
                    v.as_bytes()
                        .windows(22)
                        .any(|w| w == b"management-side-secret")
                })
            });
            println!(
                "    API server received {} requests; every one carried the agent's ServiceAccount token: {all_agent}",
                seen.len()
            );
            println!("    a management-side token reached the API server: {leaked}");
            if !all_agent || leaked {
                bail!("credential isolation violated");
            }
        }
        Customer::Real(_) => {
            // The caller sends a token of its own; the API server sees the agent.
            let whoami: serde_json::Value = serde_json::from_str(&kubectl(
                &kubeconfig,
                &[
                    "--token",
                    "management-side-secret",
                    "auth",
                    "whoami",
                    "-o",
                    "json",
                ],
            )?)?;
            let user = whoami["status"]["userInfo"]["username"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            println!("    the API server saw the request as: {user}");
            println!(
                "    a management-side token reached the API server: {}",
                user != format!("system:serviceaccount:{DEMO_NAMESPACE}:{DEMO_ACCOUNT}")
            );
            if user != format!("system:serviceaccount:{DEMO_NAMESPACE}:{DEMO_ACCOUNT}") {
                bail!("credential isolation violated");
            }
        }
    }

    step("Done. Stopping tether-agent and tether-server.");
    drop(processes);
    Ok(())
}
