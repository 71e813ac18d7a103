//! `make demo`: tether's story with the real kubectl and tether's real
//! processes, no cluster needed. A platform team applies a ProxiedCluster,
//! tether-operator issues its credentials, the bundle is exported and the
//! customer runs the agent from it, ArgoCD deploys through the cluster
//! Secret the operator wrote, and deleting the ProxiedCluster cuts the
//! tunnel. Both clusters are embedded API servers unless `$KUBECONFIG` names
//! a reachable cluster, which then plays both.

mod shell;
mod sides;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::Parser;
use serde::Deserialize;
use shell::{Kubectl, Processes, eventually, free_ports, say, step, verdict, write};
use sides::Kind;
use tether_operator::bundle::{self, BundleInput};
use tether_operator::crd::ProxiedCluster;

#[derive(Debug, Parser)]
#[command(name = "tether-demo", about = "tether's story on one machine")]
struct Args {
    /// The ProxiedCluster to apply (a file of one or more documents).
    #[arg(long, default_value = "examples/proxiedcluster.yaml")]
    example: PathBuf,
    /// The CRD to install first.
    #[arg(long, default_value = "crds/proxiedclusters.tether.dev.yaml")]
    crd: PathBuf,
    /// Use the embedded API servers even when `$KUBECONFIG` is set.
    #[arg(long)]
    embedded: bool,
}

/// What the workload ArgoCD deploys looks like.
fn workload(namespace: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: {namespace}\ndata:\n  color: blue\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: {namespace}\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: web\n        image: registry.example/web:1\n"
    )
}

/// The example's one ProxiedCluster, checked as the operator would check it.
fn read_example(path: &Path) -> Result<ProxiedCluster> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the example {}", path.display()))?;
    let source = path.display().to_string();
    let mut found = tether_operator::cli::proxied_clusters_in(&text, &source)?;
    if found.len() != 1 {
        bail!(
            "{source} holds {} ProxiedClusters; the demo tells the story of one",
            found.len()
        );
    }
    let pc = found.remove(0);
    tether_operator::reconcile::validate_spec(&pc, None, Duration::from_secs(3600))
        .map_err(|reason| anyhow::anyhow!("{source}: {reason}"))?;
    if pc.metadata.namespace.is_none() {
        bail!("{source}: the ProxiedCluster names no namespace");
    }
    Ok(pc)
}

fn kubectl_installed() -> Result<()> {
    let found = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        bail!(
            "kubectl is not on the PATH: install it (https://kubernetes.io/docs/tasks/tools/) and run the demo again"
        );
    }
    Ok(())
}

/// These keys of a Secret, decoded, from one read of it.
fn secret_keys<const N: usize>(
    k: &Kubectl,
    namespace: &str,
    name: &str,
    keys: [&str; N],
) -> Result<[Vec<u8>; N]> {
    let secret = k.json(&["get", "secret", name, "-n", namespace])?;
    let mut values: [Vec<u8>; N] = std::array::from_fn(|_| Vec::new());
    for (value, key) in values.iter_mut().zip(keys) {
        let data = secret["data"][key]
            .as_str()
            .with_context(|| format!("Secret {namespace}/{name} has no {key}"))?;
        *value = base64::engine::general_purpose::STANDARD.decode(data)?;
    }
    Ok(values)
}

/// What the demo started and made; dropped in this order: processes,
/// then what it made in a real cluster, then its files.
struct Demo {
    processes: Processes,
    cleanup: Option<sides::RealCleanup>,
    dir: tempfile::TempDir,
}

impl Demo {
    fn d(&self) -> &Path {
        self.dir.path()
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    tether::install_crypto_provider();
    let mut demo = match tempfile::tempdir() {
        Ok(dir) => Demo {
            processes: Processes::default(),
            cleanup: None,
            dir,
        },
        Err(err) => {
            eprintln!("tether-demo: a temporary directory: {err}");
            std::process::exit(1);
        }
    };
    // Registered before anything starts (a signal future registers only
    // when first polled), so Ctrl-C always reaches the cleanup below.
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("tether-demo: cannot handle signals");
        std::process::exit(1);
    };
    let started = Instant::now();
    let outcome = tokio::select! {
        outcome = run(&args, &mut demo) => outcome,
        _ = interrupt.recv() => Err(anyhow::anyhow!("interrupted")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated")),
    };
    match outcome {
        Ok(()) => {
            drop(demo);
            println!(
                "\nDone in {:.1} s; stopped tether-operator, tether-server and tether-agent.",
                started.elapsed().as_secs_f64()
            );
        }
        Err(err) => {
            demo.processes.print_log_tails();
            eprintln!("tether-demo: {err:#}");
            drop(demo);
            std::process::exit(1);
        }
    }
}

async fn run(args: &Args, demo: &mut Demo) -> Result<()> {
    kubectl_installed()?;
    for binary in [
        "tether-operator",
        "tether-server",
        "tether-agent",
        "kubectl-tether",
    ] {
        shell::sibling_binary(binary)?;
    }
    let pc = read_example(&args.example)?;
    let (name, tenants) = (
        pc.metadata.name.clone().unwrap_or_default(),
        pc.metadata.namespace.clone().unwrap_or_default(),
    );
    let id = pc.cluster_id();
    let agent_namespace = pc.spec.agent.namespace.clone();
    let agent_user = format!("system:serviceaccount:{agent_namespace}:tether-agent");
    let d = demo.d().to_owned();

    step(
        1,
        "Two clusters: the management cluster (ArgoCD, tether) and an air-gapped customer cluster",
    )
    .await;
    let real = if args.embedded {
        None
    } else {
        sides::kubeconfig_cluster()?
    };
    let sides = match real {
        Some(kubectl) => {
            let (sides, cleanup) = sides::real(kubectl, &d, &tenants, &agent_namespace)?;
            demo.cleanup = Some(cleanup);
            say(&format!(
                "the cluster of $KUBECONFIG plays both (API server {}); the demo creates namespaces {}, {}, {}, {} and {} and removes them at the end",
                sides.customer_target,
                tenants,
                agent_namespace,
                sides.names.system,
                sides.names.argocd,
                sides.names.workload
            ));
            sides
        }
        None => {
            let sides = sides::embedded(&d, &agent_user).await?;
            if let Kind::Embedded {
                management,
                customer,
                ..
            } = &sides.kind
            {
                say(&format!(
                    "management: embedded API server at https://{} (HTTPS, bearer tokens checked)",
                    management.addr
                ));
                say(&format!(
                    "customer:   embedded API server at https://{} (it will only ever see the agent's ServiceAccount token and its own admin's)",
                    customer.addr
                ));
            }
            say(&format!(
                "kubectl below runs with KUBECONFIG={}",
                sides.management_kubeconfig.display()
            ));
            sides
        }
    };
    let names = sides.names.clone();
    let k = sides.management.clone();

    step(
        2,
        "The platform team installs the CRD and runs tether-operator",
    )
    .await;
    let crd_present = k
        .output(&[
            "get",
            "crd",
            "proxiedclusters.tether.dev",
            "--ignore-not-found",
            "-o",
            "name",
        ])?
        .contains("proxiedclusters");
    match (&mut demo.cleanup, crd_present) {
        (Some(_), true) => say("the ProxiedCluster CRD is installed already: left as it is"),
        (cleanup, _) => {
            k.show(&["apply", "-f", &args.crd.display().to_string()])?;
            if let Some(cleanup) = cleanup {
                cleanup.crd_installed = true;
            }
        }
    }
    if let Kind::Real = sides.kind {
        for namespace in [&names.system, &names.argocd] {
            k.show(&["create", "namespace", namespace])?;
        }
    }
    let [
        public,
        internal,
        operator_health,
        server_health,
        agent_health,
    ] = free_ports()?;
    let public_url = format!("wss://localhost:{}", public.port());
    let kubeconfig_env = [("KUBECONFIG", sides.management_kubeconfig.as_path())];
    demo.processes.spawn(
        "tether-operator",
        &[
            "--namespace".into(),
            names.system.clone(),
            "--argocd-namespace".into(),
            names.argocd.clone(),
            "--internal-port".into(),
            internal.port().to_string(),
            "--server-hostnames".into(),
            "localhost".into(),
            "--lease-name".into(),
            "tether-demo-operator".into(),
            "--health-addr".into(),
            operator_health.to_string(),
        ],
        &kubeconfig_env,
        d.join("operator.log"),
    )?;
    let server_tls = eventually(
        &mut demo.processes,
        Duration::from_secs(30),
        "the operator to issue tether-server's certificate",
        || async {
            let keys = ["tls.crt", "tls.key", "ca.crt"];
            secret_keys(&k, &names.system, "tether-server-tls", keys).ok()
        },
    )
    .await?;
    say(&format!(
        "the operator made its CA and issued tether-server's certificate (Secret {}/tether-server-tls)",
        names.system
    ));

    step(
        3,
        "tether-server: agents dial its public port, ArgoCD calls its internal port (mTLS on both)",
    )
    .await;
    let [server_crt, server_key, ca_crt] = ["server.crt", "server.key", "ca.crt"];
    for (file, contents) in [server_crt, server_key, ca_crt].iter().zip(&server_tls) {
        write(&d, file, contents)?;
    }
    demo.processes.spawn(
        "tether-server",
        &[
            "--addr".into(),
            public.to_string(),
            "--internal-addr".into(),
            internal.to_string(),
            "--clusters-secret".into(),
            format!("{}/tether-clusters", names.system),
            "--replica-name".into(),
            "tether-server-0".into(),
            "--tls-cert".into(),
            d.join(server_crt).display().to_string(),
            "--tls-key".into(),
            d.join(server_key).display().to_string(),
            "--tls-client-ca".into(),
            d.join(ca_crt).display().to_string(),
            "--health-addr".into(),
            server_health.to_string(),
        ],
        &kubeconfig_env,
        d.join("server.log"),
    )?;
    say("it learns clusters and their agent tokens from the Secret the operator keeps");

    step(4, "The platform team applies the ProxiedCluster").await;
    k.show(&["apply", "-f", &args.example.display().to_string()])?;
    if let Some(cleanup) = &mut demo.cleanup {
        cleanup.proxied = Some((tenants.clone(), name.clone()));
    }
    say(&format!(
        "the example names a real deployment's addresses; on this machine agents dial tether-server at {public_url}, and the customer's API server is {}:",
        sides.customer_target
    ));
    let patch = format!(
        r#"{{"spec":{{"publicUrl":"{public_url}","targetAddress":"{}"}}}}"#,
        sides.customer_target
    );
    k.show(&[
        "patch",
        "proxiedcluster",
        &name,
        "-n",
        &tenants,
        "--type=merge",
        "-p",
        &patch,
    ])?;
    let ready = |k: &Kubectl| {
        let pc = k
            .json(&["get", "proxiedcluster", &name, "-n", &tenants])
            .ok()?;
        let ready = pc["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        (ready && pc["status"]["observedGeneration"] == pc["metadata"]["generation"]).then_some(())
    };
    eventually(
        &mut demo.processes,
        Duration::from_secs(30),
        "the ProxiedCluster to be Ready",
        || async { ready(&k) },
    )
    .await?;
    k.show(&["get", "proxiedclusters", "-n", &tenants])?;
    let argocd_secret = format!("tether-{id}");
    k.show(&["get", "secrets", "-n", &names.argocd])?;

    step(
        5,
        "The platform team exports the agent bundle and hands it to the customer",
    )
    .await;
    let bundle_file = d.join(format!("{id}-agent.yaml"));
    let plugin = Kubectl {
        plugin_dir: Some(
            shell::sibling_binary("kubectl-tether")?
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        ),
        ..k.clone()
    };
    plugin.show(&[
        "tether",
        "bundle",
        "export",
        &name,
        "-n",
        &tenants,
        "-o",
        &bundle_file.display().to_string(),
    ])?;
    let bundle_text = std::fs::read_to_string(&bundle_file)?;
    let sha256 = bundle::verify(&bundle_text)?;
    verdict(&format!(
        "the bundle's body hashes to its header's sha256 {sha256} (grep -v '^#' {} | sha256sum)",
        bundle_file.display()
    ));
    let objects: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&bundle_text)
        .filter_map(|doc| serde_json::Value::deserialize(doc).ok())
        .filter(|doc| !doc.is_null())
        .collect();
    say(&format!(
        "it holds: {}",
        objects
            .iter()
            .map(|o| format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or("?"),
                o["metadata"]["name"].as_str().unwrap_or("?")
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    step(
        6,
        "The customer applies the bundle in the air-gapped cluster; tether-agent dials out",
    )
    .await;
    let without_deployment: String = objects
        .iter()
        .filter(|o| o["kind"] != "Deployment")
        .map(|o| Ok(format!("---\n{}", serde_yaml_ng::to_string(o)?)))
        .collect::<Result<_>>()?;
    let applied = write(&d, "bundle-without-deployment.yaml", without_deployment)?;
    if let Some(cleanup) = &mut demo.cleanup {
        cleanup.manifests.push(applied.clone());
    }
    sides
        .customer
        .show(&["apply", "-f", &applied.display().to_string()])?;
    let input = BundleInput::from_bundle(&bundle_text)?;
    let credentials = d.join("agent-credentials");
    std::fs::create_dir(&credentials)?;
    for (file, contents) in [
        ("token", &input.token),
        ("tls.crt", &input.client_cert_pem),
        ("tls.key", &input.client_key_pem),
        ("ca.crt", &input.server_ca_pem),
    ] {
        write(&credentials, file, contents)?;
    }
    let sa_token = match &sides.kind {
        Kind::Embedded { agent_token, .. } => agent_token.clone(),
        Kind::Real => {
            let token = sides.customer.output(&[
                "create",
                "token",
                "tether-agent",
                "-n",
                &agent_namespace,
                "--duration",
                "1h",
            ])?;
            write(&d, "agent-serviceaccount-token", token.trim())?
        }
    };
    say(&format!(
        "the bundle's Deployment would run the agent in a pod; here it runs as a process with the Deployment's --server {} and --target {}, and its Secret's token, certificate and key as files (the API server's CA and a ServiceAccount token stand in for what the kubelet mounts)",
        input.server_url, input.target
    ));
    demo.processes.spawn(
        "tether-agent",
        &[
            "--server".into(),
            input.server_url.clone(),
            "--credentials-dir".into(),
            credentials.display().to_string(),
            "--target".into(),
            input.target.clone(),
            "--ca-cert".into(),
            sides.customer_ca.display().to_string(),
            "--sa-token-path".into(),
            sa_token.display().to_string(),
            "--health-addr".into(),
            agent_health.to_string(),
        ],
        &[],
        d.join("agent.log"),
    )?;
    let connected_at = Instant::now();
    let connection = eventually(
        &mut demo.processes,
        Duration::from_secs(30),
        "CONNECTED true in kubectl get proxiedclusters",
        || async {
            let pc = k
                .json(&["get", "proxiedcluster", &name, "-n", &tenants])
                .ok()?;
            let connection = pc["status"]["connection"].clone();
            (connection["connected"] == true).then_some(connection)
        },
    )
    .await?;
    k.show(&["get", "proxiedclusters", "-n", &tenants])?;
    k.show(&[
        "events",
        "-n",
        &tenants,
        "--for",
        &format!("proxiedcluster/{name}"),
    ])?;
    verdict(&format!(
        "CONNECTED true after {:.1} s: agent {}, replicas {}",
        connected_at.elapsed().as_secs_f64(),
        connection["agentVersion"].as_str().unwrap_or("?"),
        connection["replicas"].as_str().unwrap_or("?")
    ));

    step(
        7,
        "ArgoCD's view: the cluster Secret the operator wrote, and a deployment through the tunnel",
    )
    .await;
    let [server, config] = secret_keys(&k, &names.argocd, &argocd_secret, ["server", "config"])?;
    let server = String::from_utf8(server)?;
    let config: serde_json::Value = serde_json::from_slice(&config)?;
    let tls = &config["tlsClientConfig"];
    say(&format!(
        "Secret {}/{argocd_secret}: server {server}, tlsClientConfig with caData, certData, keyData (insecure: {})",
        names.argocd, tls["insecure"]
    ));
    let service_host = server
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split([':', '/']).next())
        .context("the ArgoCD Secret's server has no host")?
        .to_owned();
    let local_server = server.replacen(&service_host, "127.0.0.1", 1);
    say(&format!(
        "{service_host} is tether-server's Service in a cluster; here it is 127.0.0.1, so the kubeconfig keeps the name for TLS (tls-server-name)"
    ));
    let argocd_kubeconfig = write(
        &d,
        "argocd.kubeconfig",
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {id}\n  cluster:\n    server: {local_server}\n    tls-server-name: {service_host}\n    certificate-authority-data: {}\nusers:\n- name: argocd\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: {id}\n  context: {{cluster: {id}, user: argocd}}\ncurrent-context: {id}\n",
            tls["caData"].as_str().context("no caData")?,
            tls["certData"].as_str().context("no certData")?,
            tls["keyData"].as_str().context("no keyData")?,
        ),
    )?;
    let argocd = Kubectl {
        kubeconfig: Some(argocd_kubeconfig),
        shown_as: Some("--kubeconfig argocd.kubeconfig".into()),
        plugin_dir: None,
    };
    let workload_file = write(&d, "workload.yaml", workload(&names.workload))?;
    argocd.show(&["apply", "-f", &workload_file.display().to_string()])?;
    argocd.show(&["get", "deployments,configmaps", "-n", &names.workload])?;
    argocd.show(&["auth", "whoami"])?;
    let whoami = argocd.json(&["--token", "a-management-side-token", "auth", "whoami"])?;
    let seen_as = whoami["status"]["userInfo"]["username"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if seen_as != agent_user {
        bail!("the customer's API server saw a tunnelled request as {seen_as:?}, not as the agent");
    }
    verdict(&format!(
        "the customer's API server sees ArgoCD as {agent_user}, even when the caller sends a token of its own"
    ));
    if let Kind::Embedded {
        management,
        customer,
        agent_user,
        ..
    } = &sides.kind
    {
        let deployment = format!(
            "/apis/apps/v1/namespaces/{}/deployments/web",
            names.workload
        );
        if customer.get(&deployment).is_none() || management.get(&deployment).is_some() {
            bail!("the Deployment is not where the tunnel should have put it");
        }
        verdict(&format!(
            "Deployment {}/web is in the customer cluster and not in the management cluster",
            names.workload
        ));
        let calls = customer.calls();
        let through_tunnel = calls
            .iter()
            .filter(|c| c.user.as_deref() != Some("customer-admin"))
            .count();
        let refused = calls.iter().filter(|c| c.user.is_none()).count();
        if refused > 0 {
            bail!(
                "{refused} requests reached the customer's API server with a token it does not know"
            );
        }
        verdict(&format!(
            "all {through_tunnel} requests through the tunnel carried {agent_user}'s token and nothing else (refused: {refused})"
        ));
    }

    step(8, "The platform team deletes the ProxiedCluster").await;
    k.show(&[
        "delete",
        "proxiedcluster",
        &name,
        "-n",
        &tenants,
        "--timeout=30s",
    ])?;
    let gone = k.output(&[
        "get",
        "secret",
        &argocd_secret,
        "-n",
        &names.argocd,
        "--ignore-not-found",
        "-o",
        "name",
    ])?;
    if !gone.trim().is_empty() {
        bail!("the ArgoCD Secret {argocd_secret} is still there");
    }
    verdict(&format!(
        "the ArgoCD Secret {}/{argocd_secret} is gone: ArgoCD no longer lists the cluster",
        names.argocd
    ));
    let cut = eventually(
        &mut demo.processes,
        Duration::from_secs(30),
        "the tunnel to close",
        || async {
            argocd
                .output(&["--request-timeout=5s", "get", "namespaces"])
                .err()
        },
    )
    .await?;
    let reason = cut.to_string();
    verdict(&format!(
        "the tunnel is closed: {}",
        reason.lines().last().unwrap_or_default().trim()
    ));
    Ok(())
}
