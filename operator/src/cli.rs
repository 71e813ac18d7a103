//! `kubectl tether`: export a cluster's agent bundle, render one offline
//! (no cluster, no operator), and show clusters at a glance.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use sha2::{Digest, Sha256};
use tether::pki::{CertInfo, CertificateAuthority, Issued, LeafRequest};

use crate::argocd::{self, ClientTls};
use crate::bundle::{self, BundleInput};
use crate::crd::ProxiedCluster;
use crate::pki::tls_secret;
use crate::reconcile::{
    BUNDLE_KEY, CLUSTERS_KEY, ServerEntry, ValidSpec, bundle_secret_name, server_entry,
    validate_spec,
};
use crate::settings::{Settings, url_host};

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-tether",
    version,
    about = "tether's kubectl plugin: bundles and status"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The agent install bundle of a ProxiedCluster.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Clusters, their connection and certificate expiry.
    Status(StatusArgs),
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Writes the bundle the operator rendered, for `kubectl apply -f` in the customer cluster.
    Export(ExportArgs),
    /// Renders a bundle offline from a ProxiedCluster manifest, with a CA kept in a directory.
    Render(RenderArgs),
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    pub name: String,
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Output file (`-` for stdout). Required: the bundle contains secrets.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// The customer's HTTP proxy (`http://host:port` or `https://…`), set
    /// in this export only: for a customer who tells it after the
    /// ProxiedCluster was written. Replaces spec.agent.proxy.url.
    #[arg(long)]
    pub proxy: Option<String>,
    /// Hosts the agent reaches without the proxy (comma-separated NO_PROXY
    /// entries), in this export only. Replaces spec.agent.proxy.noProxy.
    #[arg(long)]
    pub no_proxy: Option<String>,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// ProxiedCluster manifest (YAML; `-` reads standard input). A file of
    /// several documents gives one bundle per ProxiedCluster in it.
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// Holds the CA (ca.crt, ca.key) and each cluster's token (tokens/<id>);
    /// created on first use, reused after.
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// Output file for the agent bundle; with several ProxiedClusters, a
    /// directory that gets `<cluster-id>.yaml` for each.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Where the server side goes: clusters.json (merged across renders),
    /// tls.crt/tls.key/ca.crt for tether-server, argocd.crt/argocd.key, and
    /// server-objects.yaml with the same as Kubernetes Secrets.
    /// Default: `tether-server/` beside the bundle.
    #[arg(long)]
    pub server_dir: Option<PathBuf>,
    /// Agent image (default: the operator's default).
    #[arg(long)]
    pub image: Option<String>,
    /// URL agents dial when the manifest has no spec.publicUrl.
    #[arg(long)]
    pub public_url: Option<String>,
    /// Extra DNS names for tether-server's certificate.
    #[arg(long = "server-hostname")]
    pub server_hostnames: Vec<String>,
    /// Namespace tether-server runs in (for its certificate and Secrets).
    #[arg(long, default_value = "tether-system")]
    pub server_namespace: String,
    #[arg(long, default_value = "argocd")]
    pub argocd_namespace: String,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    pub name: Option<String>,
    #[arg(short, long)]
    pub namespace: Option<String>,
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bundle(BundleCommand::Export(args)) => export(args).await,
        Command::Bundle(BundleCommand::Render(args)) => render(args),
        Command::Status(args) => status(args).await,
    }
}

async fn client_and_namespace(namespace: Option<String>) -> anyhow::Result<(Client, String)> {
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration (KUBECONFIG or in-cluster)")?;
    let namespace = namespace.unwrap_or_else(|| config.default_namespace.clone());
    Ok((Client::try_from(config)?, namespace))
}

/// Writes secret material to `output`: a file (mode 0600) or, only when
/// asked with `-`, stdout.
fn write_secret_output(output: &Path, contents: &str) -> anyhow::Result<()> {
    if output == Path::new("-") {
        std::io::stdout().write_all(contents.as_bytes())?;
        return Ok(());
    }
    write_private(output, contents.as_bytes())
}

fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents)?;
    Ok(())
}

async fn export(args: ExportArgs) -> anyhow::Result<()> {
    let Some(output) = args.output else {
        bail!("the bundle contains the agent token and key: pass -o FILE (or -o - for stdout)");
    };
    let (client, namespace) = client_and_namespace(args.namespace).await?;
    let clusters: Api<ProxiedCluster> = Api::namespaced(client.clone(), &namespace);
    let pc = clusters
        .get_opt(&args.name)
        .await?
        .with_context(|| format!("no ProxiedCluster {namespace}/{}", args.name))?;
    let secrets: Api<Secret> = Api::namespaced(client, &namespace);
    let name = bundle_secret_name(&pc);
    let secret = secrets.get_opt(&name).await?.with_context(|| {
        format!(
            "no bundle yet (Secret {namespace}/{name}); see `kubectl describe proxiedcluster {}`",
            args.name
        )
    })?;
    let yaml = secret
        .data
        .as_ref()
        .and_then(|d| d.get(BUNDLE_KEY))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .with_context(|| format!("Secret {name} has no {BUNDLE_KEY}"))?;
    let mut sha256 = bundle::verify(&yaml)?;
    let yaml = match with_export_proxy(&yaml, args.proxy, args.no_proxy)? {
        Some(rendered) => {
            sha256 = rendered.sha256;
            rendered.yaml
        }
        None => yaml,
    };
    write_secret_output(&output, &yaml)?;
    eprintln!(
        "bundle for cluster {} written to {} (sha256 {sha256}); it contains secrets: hand it over as one",
        pc.cluster_id(),
        output.display()
    );
    Ok(())
}

/// The bundle re-rendered with the proxy given at export time, if any was;
/// the ProxiedCluster and the operator's copy stay as they are.
pub fn with_export_proxy(
    yaml: &str,
    proxy: Option<String>,
    no_proxy: Option<String>,
) -> anyhow::Result<Option<bundle::Bundle>> {
    if proxy.is_none() && no_proxy.is_none() {
        return Ok(None);
    }
    let mut input = BundleInput::from_bundle(yaml)?;
    let mut spec = match (input.proxy.take(), proxy) {
        (current, Some(url)) => crate::crd::AgentProxySpec {
            url,
            ..current.unwrap_or(crate::crd::AgentProxySpec {
                url: String::new(),
                no_proxy: Vec::new(),
                ca_cert: None,
                credentials_secret_name: None,
            })
        },
        (Some(current), None) => current,
        (None, None) => bail!(
            "--no-proxy needs a proxy: pass --proxy too (this ProxiedCluster has no spec.agent.proxy)"
        ),
    };
    if let Some(list) = no_proxy {
        spec.no_proxy = list
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
    }
    crate::reconcile::check_proxy(&spec).map_err(|problem| anyhow::anyhow!("{problem}"))?;
    eprintln!(
        "proxy {} set in this export only (spec.agent.proxy is unchanged)",
        spec.url
    );
    input.proxy = Some(spec);
    Ok(Some(bundle::render(&input)?))
}

/// A CA in a directory: ca.crt, ca.key; created when absent.
fn load_or_create_ca(dir: &Path) -> anyhow::Result<CertificateAuthority> {
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    if cert.exists() && key.exists() {
        let ca = CertificateAuthority::from_pem(
            &std::fs::read_to_string(&cert)?,
            &std::fs::read_to_string(&key)?,
        )
        .with_context(|| format!("loading the CA from {}", dir.display()))?;
        return Ok(ca);
    }
    let ca =
        CertificateAuthority::generate("tether CA", Duration::from_secs(10 * 365 * 24 * 3600))?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(&cert, ca.cert_pem())?;
    write_private(&key, ca.key_pem().as_bytes())?;
    eprintln!("created a new CA in {}", dir.display());
    Ok(ca)
}

/// A leaf kept as `<stem>.crt`/`<stem>.key`, reissued when missing or due.
fn load_or_issue(
    dir: &Path,
    stem: &str,
    ca: &CertificateAuthority,
    request: &LeafRequest,
) -> anyhow::Result<Issued> {
    let (cert, key) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    if let (Ok(cert_pem), Ok(key_pem)) = (
        std::fs::read_to_string(&cert),
        std::fs::read_to_string(&key),
    ) && let Ok(info) = CertInfo::from_pem(&cert_pem)
        && !info.due(std::time::SystemTime::now())
    {
        return Ok(Issued {
            cert_pem,
            key_pem,
            not_after: info.not_after,
        });
    }
    let issued = ca.issue(request)?;
    std::fs::write(&cert, &issued.cert_pem)?;
    write_private(&key, issued.key_pem.as_bytes())?;
    Ok(issued)
}

/// Every ProxiedCluster in a YAML stream of one or more documents (a GitOps
/// file may hold other objects beside them). Says which kinds it found when
/// there is none.
pub fn proxied_clusters_in(manifest: &str, source: &str) -> anyhow::Result<Vec<ProxiedCluster>> {
    use serde::Deserialize;
    let mut found = Vec::new();
    let mut kinds = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(manifest).enumerate() {
        let value = serde_json::Value::deserialize(document)
            .with_context(|| format!("{source}: document {} is not valid YAML", index + 1))?;
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or("(no kind)").to_owned();
        if kind == "ProxiedCluster" {
            let pc: ProxiedCluster = serde_json::from_value(value).with_context(|| {
                format!(
                    "{source}: document {} is not a valid ProxiedCluster",
                    index + 1
                )
            })?;
            found.push(pc);
        } else {
            kinds.push(kind);
        }
    }
    if found.is_empty() {
        anyhow::bail!(
            "{source} holds no ProxiedCluster (found: {})",
            if kinds.is_empty() {
                "nothing".to_owned()
            } else {
                kinds.join(", ")
            }
        );
    }
    Ok(found)
}

fn render(args: RenderArgs) -> anyhow::Result<()> {
    tether::install_crypto_provider();
    let (manifest, source) = if args.file == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("reading standard input")?;
        (text, "standard input".to_owned())
    } else {
        let text = std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?;
        (text, args.file.display().to_string())
    };
    let clusters = proxied_clusters_in(&manifest, &source)?;
    let several = clusters.len() > 1;
    for pc in clusters {
        let output = if several {
            args.output.join(format!("{}.yaml", pc.cluster_id()))
        } else {
            args.output.clone()
        };
        render_one(&args, &pc, &source, &output)?;
    }
    Ok(())
}

fn render_one(
    args: &RenderArgs,
    pc: &ProxiedCluster,
    source: &str,
    output: &Path,
) -> anyhow::Result<()> {
    let ValidSpec {
        cluster_id: id,
        agent_cert_lifetime: lifetime,
        public_url,
    } = validate_spec(
        pc,
        args.public_url.as_deref(),
        crate::settings::Settings::defaults().min_cert_duration,
    )
    .map_err(|problem| anyhow::anyhow!("{source}: {}: {problem}", pc.name_any()))?;
    let ca = load_or_create_ca(&args.ca_dir)?;

    // The token is kept beside the CA so a re-render reuses it.
    let token_path = args.ca_dir.join("tokens").join(&id);
    let token = match std::fs::read_to_string(&token_path) {
        Ok(token) if !token.trim().is_empty() => token.trim().to_owned(),
        _ => {
            let mut bytes = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
            let token = hex::encode(bytes);
            write_private(&token_path, token.as_bytes())?;
            token
        }
    };
    let agent = ca.issue(&LeafRequest::agent(&id, lifetime))?;

    // The server side: what tether-server and ArgoCD need.
    let mut settings = Settings::defaults();
    settings.namespace = args.server_namespace.clone();
    settings.argocd_namespace = args.argocd_namespace.clone();
    settings.public_url = Some(public_url.clone());
    settings.server_hostnames = args.server_hostnames.clone();
    let server_dir = args.server_dir.clone().unwrap_or_else(|| {
        output
            .parent()
            .unwrap_or(Path::new("."))
            .join("tether-server")
    });
    std::fs::create_dir_all(&server_dir)?;
    let mut server_request =
        LeafRequest::server("tether-server", &[], &[], settings.server_cert_duration);
    server_request.dns_names = settings.server_dns_names();
    let server_cert = load_or_issue(&server_dir, "tls", &ca, &server_request)?;
    let argocd_cert = load_or_issue(
        &server_dir,
        "argocd",
        &ca,
        &LeafRequest::client("argocd", settings.argocd_cert_duration),
    )?;
    std::fs::write(server_dir.join("ca.crt"), ca.cert_pem())?;

    let clusters_path = server_dir.join(CLUSTERS_KEY);
    let mut entries: Vec<serde_json::Value> = std::fs::read_to_string(&clusters_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    entries.retain(|e| e["id"] != id.as_str());
    let token_sha256 = hex::encode(Sha256::digest(token.as_bytes()));
    let resource = format!(
        "{}/{}",
        pc.namespace().unwrap_or_else(|| "default".into()),
        pc.name_any()
    );
    entries.push(server_entry(
        &id,
        &ServerEntry {
            token_sha256: &token_sha256,
            target: &pc.spec.target_address,
            resource: &resource,
            token: &token,
            overlap: None,
            certificate_rotation: None,
            certificates_not_before: None,
        },
    ));
    entries.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    let clusters_json = serde_json::to_string_pretty(&entries)?;
    std::fs::write(&clusters_path, &clusters_json)?;

    let argocd_tls = ClientTls {
        ca_pem: ca.cert_pem().to_owned(),
        cert_pem: argocd_cert.cert_pem.clone(),
        key_pem: argocd_cert.key_pem.clone(),
    };
    let server_url = settings.tunnel_url(&id);
    let registration = argocd::secret_for(pc, &settings, &args.argocd_namespace, Some(&argocd_tls));
    let mut clusters_secret = Secret::default();
    clusters_secret.metadata.name = Some(settings.clusters_secret.clone());
    clusters_secret.metadata.namespace = Some(settings.namespace.clone());
    clusters_secret.data = Some(
        [(
            CLUSTERS_KEY.to_owned(),
            k8s_openapi::ByteString(clusters_json.into_bytes()),
        )]
        .into(),
    );
    let objects = [
        clusters_secret,
        tls_secret(
            &settings.server_tls_secret,
            &settings.namespace,
            &server_cert,
            ca.cert_pem(),
        ),
        tls_secret(
            &settings.argocd_tls_secret,
            &settings.namespace,
            &argocd_cert,
            ca.cert_pem(),
        ),
        registration,
    ];
    let mut server_objects = String::from(
        "# tether server-side objects for the management cluster (contains secrets)\n",
    );
    for object in &objects {
        server_objects.push_str("---\n");
        server_objects.push_str(&serde_yaml_ng::to_string(object)?);
    }
    write_private(
        &server_dir.join("server-objects.yaml"),
        server_objects.as_bytes(),
    )?;

    let input = BundleInput::for_cluster(
        pc,
        &settings.agent_image,
        Some(&public_url),
        &token,
        &agent,
        ca.cert_pem(),
    );
    let input = BundleInput {
        image: args.image.clone().unwrap_or(input.image.clone()),
        ..input
    };
    let rendered = bundle::render(&input)?;
    write_secret_output(output, &rendered.yaml)?;
    eprintln!(
        "bundle for cluster {id} written to {} (sha256 {}); server side in {}; url for {}: {}",
        output.display(),
        rendered.sha256,
        server_dir.display(),
        url_host(&public_url).unwrap_or("?"),
        server_url,
    );
    Ok(())
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let (client, namespace) = client_and_namespace(args.namespace).await?;
    let api: Api<ProxiedCluster> = if args.all_namespaces {
        Api::all(client)
    } else {
        Api::namespaced(client, &namespace)
    };
    let mut items = match &args.name {
        Some(name) => vec![api.get(name).await?],
        None => api.list(&ListParams::default()).await?.items,
    };
    items.sort_by_key(|pc| (pc.namespace(), pc.name_any()));
    print!("{}", status_table(&items));
    Ok(())
}

/// The `kubectl tether status` tables: one row per ProxiedCluster, then
/// one per (cluster, tether-server replica) session.
pub fn status_table(items: &[ProxiedCluster]) -> String {
    let mut clusters = vec![
        [
            "NAMESPACE",
            "NAME",
            "ID",
            "READY",
            "CONNECTED",
            "REPLICAS",
            "AGENT",
            "LAST SEEN",
            "CERT EXPIRES",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    let mut sessions = vec![
        [
            "NAMESPACE",
            "NAME",
            "REPLICA",
            "CONNECTED",
            "SINCE",
            "AGENT",
            "REMOTE",
            "LAST SEEN",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    let time = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.as_ref().map_or("-".into(), |t| t.0.to_string())
    };
    let text = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    for pc in items {
        let status = pc.status.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map_or("Unknown".to_owned(), |c| {
                if c.status == "True" {
                    "True".into()
                } else {
                    format!("False ({})", c.reason)
                }
            });
        let connection = status.connection.clone().unwrap_or_default();
        clusters.push(vec![
            pc.namespace().unwrap_or_default(),
            pc.name_any(),
            status.cluster_id.clone().unwrap_or_else(|| pc.cluster_id()),
            ready,
            if status.connection.is_some() {
                connection.connected.to_string()
            } else {
                "never".into()
            },
            text(&connection.replicas),
            text(&connection.agent_version),
            time(&connection.last_seen),
            time(&status.certificates.and_then(|c| c.agent_not_after)),
        ]);
        for (replica, session) in &status.agent_sessions {
            sessions.push(vec![
                pc.namespace().unwrap_or_default(),
                pc.name_any(),
                replica.clone(),
                session.connected.to_string(),
                time(&session.since),
                text(&session.agent_version),
                text(&session.remote_address),
                time(&session.last_seen),
            ]);
        }
    }
    let mut out = table(&clusters);
    if sessions.len() > 1 {
        out.push('\n');
        out.push_str(&table(&sessions));
    }
    out
}

/// Left-aligned columns, three spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            format!("{}\n", cells.join("   ").trim_end())
        })
        .collect()
}
