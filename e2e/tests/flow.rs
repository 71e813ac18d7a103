//! The whole path against a real kube-apiserver: CRD, operator, server,
//! bundle, agent, ArgoCD's view, deletion. Skipped unless
//! TETHER_E2E_KUBECONFIG names a cluster.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Kubectl, Process, eventually, free_port};

const CRD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../crds/proxiedclusters.tether.dev.yaml"
);

/// Short enough to watch the agent renew its certificate (at two thirds)
/// during the run; the operator's `--min-cert-duration` is lowered for it.
const AGENT_CERT_LIFETIME: &str = "90s";

fn proxied_cluster(
    name: &str,
    namespace: &str,
    target: &str,
    public_port: u16,
    agent_namespace: &str,
) -> String {
    format!(
        "apiVersion: tether.dev/v1alpha1\nkind: ProxiedCluster\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  targetAddress: \"{target}\"\n  publicUrl: wss://localhost:{public_port}\n  agent:\n    namespace: {agent_namespace}\n  certificates:\n    agentDuration: {AGENT_CERT_LIFETIME}\n"
    )
}

/// The documents of a YAML stream that are not Deployments.
fn without_deployments(manifests: &str) -> String {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(manifests)
        .filter_map(|doc| serde_json::Value::deserialize(doc).ok())
        .filter(|doc| !doc.is_null() && doc["kind"] != "Deployment")
        .map(|doc| format!("---\n{}", serde_yaml_ng::to_string(&doc).expect("YAML")))
        .collect()
}

/// One key of a Secret, decoded; `None` while it is missing or not text.
fn secret_text(k: &Kubectl, namespace: &str, name: &str, key: &str) -> Option<String> {
    let escaped = key.replace('.', "\\.");
    let data = k.field("secret", name, namespace, &format!("{{.data.{escaped}}}"));
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .ok()?;
    String::from_utf8(bytes).ok()
}

fn secret_file(k: &Kubectl, namespace: &str, name: &str, key: &str, path: &Path) {
    let text = secret_text(k, namespace, name, key).expect("a Secret key holding text");
    std::fs::write(path, text).expect("write");
}

/// Removes what a run created, also when it fails half-way. The operator
/// is gone by then, so finalizers are cleared first.
struct Cleanup {
    kubectl: Kubectl,
    proxied: (String, String),
    namespaces: Vec<String>,
    cluster_scoped: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (namespace, name) = &self.proxied;
        let _ = self.kubectl.run(&[
            "patch",
            "proxiedcluster",
            name,
            "-n",
            namespace,
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ]);
        for namespace in &self.namespaces {
            let _ = self.kubectl.run(&[
                "delete",
                "namespace",
                namespace,
                "--wait=false",
                "--ignore-not-found",
            ]);
        }
        for name in &self.cluster_scoped {
            let _ = self.kubectl.run(&[
                "delete",
                "clusterrole,clusterrolebinding",
                name,
                "--ignore-not-found",
            ]);
        }
    }
}

#[test]
fn a_proxied_cluster_end_to_end() {
    let Some(kubeconfig) = support::cluster() else {
        return;
    };
    let k = Kubectl {
        kubeconfig: kubeconfig.clone(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let run = std::process::id();
    let (tenants, argocd, system, agent_ns) = (
        format!("tenants-{run}"),
        format!("argocd-{run}"),
        format!("tether-{run}"),
        format!("tether-agent-{run}"),
    );
    let id = format!("acme-{run}");
    let _cleanup = Cleanup {
        kubectl: Kubectl {
            kubeconfig: kubeconfig.clone(),
        },
        proxied: (tenants.clone(), id.clone()),
        namespaces: vec![
            tenants.clone(),
            argocd.clone(),
            system.clone(),
            agent_ns.clone(),
        ],
        cluster_scoped: vec![
            "tether-agent".into(),
            format!("tether-{run}-operator"),
            format!("tether-{run}-server"),
        ],
    };

    // The CRD applies, is structural and explains itself.
    k.ok(&["apply", "--server-side", "-f", CRD]);
    k.ok(&[
        "wait",
        "--for",
        "condition=established",
        "crd/proxiedclusters.tether.dev",
        "--timeout=60s",
    ]);
    // The OpenAPI document follows the CRD by a few seconds.
    let explained = eventually(Duration::from_secs(60), "kubectl explain", || {
        let out = k.run(&["explain", "proxiedcluster.spec"]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    assert!(
        explained.contains("targetAddress") && explained.contains("tokenRotation"),
        "{explained}"
    );
    for namespace in [&tenants, &argocd, &system] {
        k.ok(&["create", "namespace", namespace]);
    }

    // Invalid specs are refused by the schema with readable messages.
    let bad = "apiVersion: tether.dev/v1alpha1\nkind: ProxiedCluster\nmetadata:\n  name: bad\nspec:\n  clusterId: Not_A_Label\n  agent:\n    replicas: 3\n";
    let refused = k.apply_stdin(bad, &["-n", &tenants]);
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "invalid ProxiedCluster accepted");
    assert!(
        message.contains("spec.clusterId") && message.contains("spec.agent.replicas"),
        "{message}"
    );

    // The operator, as a process with this kubeconfig.
    // The management chart, as `helm install` would apply it (server-side
    // dry run first); the operator and the server then run with exactly the
    // chart's RBAC: tokens of its ServiceAccounts, not admin.
    let [public, internal, public_2, internal_2] = support::free_ports();
    // public_2, internal_2: a second replica. It holds no session of the
    // agent (which dials the first only) and serves ArgoCD by forwarding.
    let release = format!("tether-{run}");
    let values = serde_json::json!({"argocd": {"namespace": argocd}, "publicUrl": format!("wss://localhost:{public}")});
    let chart = support::render_chart(&release, &system, &values);
    k.apply_ok(&chart, &["--dry-run=server"]);
    // Everything but the Deployments: the operator and the servers run
    // here as processes (on a cluster with a node, the chart's own pods
    // would run beside them and act on the same objects).
    k.apply_ok(&without_deployments(&chart), &[]);
    let operator_kubeconfig =
        support::service_account_kubeconfig(&k, &system, "tether-operator", d);
    let server_kubeconfig = support::service_account_kubeconfig(&k, &system, "tether-server", d);
    let operator_env = [("KUBECONFIG", operator_kubeconfig.as_path())];
    let server_env = [("KUBECONFIG", server_kubeconfig.as_path())];
    let _operator = Process::spawn(
        "tether-operator",
        &[
            "--namespace",
            &system,
            "--argocd-namespace",
            &argocd,
            "--public-url",
            &format!("wss://localhost:{public}"),
            "--server-hostnames",
            "localhost",
            "--lease-name",
            &format!("tether-operator-{run}"),
            "--lease-duration",
            "5s",
            "--min-cert-duration",
            "60s",
        ]
        .map(str::to_owned),
        &operator_env,
        d.join("operator.log"),
    );

    let (api_server, api_ca) = k.server_and_ca(d);
    let target = api_server
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned();
    let pc = proxied_cluster(&id, &tenants, &target, public, &agent_ns);
    k.apply_ok(&pc, &[]);
    eventually(Duration::from_secs(60), "ProxiedCluster Ready", || {
        let pc = k.json(&["get", "proxiedcluster", &id, "-n", &tenants]);
        let ready = pc["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        ready.then_some(())
    });
    let argocd_secret = k.json(&["get", "secret", &format!("tether-{id}"), "-n", &argocd]);
    assert_eq!(
        argocd_secret["metadata"]["labels"]["argocd.argoproj.io/secret-type"],
        "cluster"
    );
    let events = k.ok(&[
        "get",
        "events",
        "-n",
        &tenants,
        "--field-selector",
        &format!("involvedObject.name={id}"),
        "-o",
        "name",
    ]);
    let reasons = k.ok(&[
        "get",
        "events",
        "-n",
        &tenants,
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(
        !events.is_empty() && reasons.contains("TokenIssued") && reasons.contains("BundleRendered"),
        "{reasons}"
    );

    // tether-server with the operator's certificate, learning clusters from the API.
    for (key, file) in [
        ("tls.crt", "server.crt"),
        ("tls.key", "server.key"),
        ("ca.crt", "ca.crt"),
    ] {
        secret_file(&k, &system, "tether-server-tls", key, &d.join(file));
    }
    let server = |name: &str, public: u16, internal: u16, peer: u16| {
        Process::spawn(
            "tether-server",
            &[
                "--addr".to_owned(),
                format!("127.0.0.1:{public}"),
                "--internal-addr".to_owned(),
                format!("127.0.0.1:{internal}"),
                "--clusters-secret".to_owned(),
                format!("{system}/tether-clusters"),
                "--replica-name".to_owned(),
                name.to_owned(),
                "--peers".to_owned(),
                format!("https://127.0.0.1:{peer}"),
                "--tls-cert".to_owned(),
                d.join("server.crt").display().to_string(),
                "--tls-key".to_owned(),
                d.join("server.key").display().to_string(),
                "--tls-client-ca".to_owned(),
                d.join("ca.crt").display().to_string(),
            ],
            &server_env,
            d.join(format!("{name}.log")),
        )
    };
    let _server = server("e2e-server-0", public, internal, internal_2);
    let _server_2 = server("e2e-server-1", public_2, internal_2, internal);

    // The bundle leaves as one file and applies cleanly.
    let bundle = d.join("agent.yaml");
    support::export_bundle(&kubeconfig, &id, &tenants, &bundle);
    // A server-side dry run creates nothing, so the bundle's namespace must
    // exist for its namespaced objects to be checked.
    k.ok(&["create", "namespace", &agent_ns]);
    k.ok(&[
        "apply",
        "--dry-run=server",
        "-f",
        &bundle.display().to_string(),
    ]);
    k.ok(&["apply", "-f", &bundle.display().to_string()]);

    // The agent, as the bundle runs it: its Secret as a credentials
    // directory (what the kubelet mounts), renewals written back to that
    // Secret with the bundle's RBAC and a real ServiceAccount token.
    let credentials = d.join("agent-credentials");
    std::fs::create_dir(&credentials).expect("dir");
    for key in ["token", "tls.crt", "tls.key", "ca.crt"] {
        secret_file(&k, &agent_ns, "tether-agent", key, &credentials.join(key));
    }
    let handed_over = std::fs::read_to_string(credentials.join("tls.crt")).expect("tls.crt");
    let sa_token = k.ok(&[
        "create",
        "token",
        "tether-agent",
        "-n",
        &agent_ns,
        "--duration",
        "1h",
    ]);
    std::fs::write(d.join("sa-token"), sa_token.trim()).expect("write");
    let _agent = Process::spawn(
        "tether-agent",
        &[
            "--server".to_owned(),
            format!("wss://localhost:{public}"),
            "--credentials-dir".to_owned(),
            credentials.display().to_string(),
            "--credentials-secret".to_owned(),
            "tether-agent".to_owned(),
            "--target".to_owned(),
            target.clone(),
            "--ca-cert".to_owned(),
            api_ca.display().to_string(),
            "--sa-token-path".to_owned(),
            d.join("sa-token").display().to_string(),
            "--health-addr".to_owned(),
            format!("127.0.0.1:{}", free_port()),
        ],
        &[("POD_NAMESPACE", Path::new(&agent_ns))],
        d.join("agent.log"),
    );
    eventually(
        Duration::from_secs(30),
        "CONNECTED in kubectl get proxiedclusters",
        || {
            let table = k.ok(&["get", "proxiedclusters", "-n", &tenants]);
            let row = table
                .lines()
                .find(|l| l.starts_with(id.as_str()))?
                .to_owned();
            row.contains("true").then_some(row)
        },
    );
    let table = k.ok(&["get", "proxiedclusters", "-n", &tenants]);
    for column in [
        "ID",
        "CONNECTED",
        "REPLICAS",
        "AGENT",
        "LAST SEEN",
        "CERT EXPIRES",
        "AGE",
    ] {
        assert!(table.contains(column), "{table}");
    }
    // Each replica reports only its own session: the agent dials replica 0
    // alone, so one of the two live replicas holds it.
    eventually(Duration::from_secs(30), "REPLICAS 1/2", || {
        let replicas = k.field(
            "proxiedcluster",
            &id,
            &tenants,
            "{.status.connection.replicas}",
        );
        (replicas == "1/2").then_some(())
    });
    let status = Command::new(support::binary("kubectl-tether"))
        .args(["status", "-n", &tenants])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("kubectl-tether runs");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("e2e-server-0") && status.contains("1/2"),
        "per-replica view: {status}"
    );

    // ArgoCD's view: only its client certificate, through the tunnel (and
    // through the replica that does not hold it: forwarded to its peer).
    for (key, file) in [("tls.crt", "argocd.crt"), ("tls.key", "argocd.key")] {
        secret_file(&k, &system, "tether-argocd-client-tls", key, &d.join(file));
    }
    let argocd_kubeconfig = d.join("argocd.kubeconfig");
    std::fs::write(
        &argocd_kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: acme\n  cluster:\n    server: https://localhost:{internal_2}/tunnel/{id}\n    certificate-authority: {}\nusers:\n- name: argocd\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: acme\n  context: {{cluster: acme, user: argocd}}\ncurrent-context: acme\n",
            d.join("ca.crt").display(),
            d.join("argocd.crt").display(),
            d.join("argocd.key").display()
        ),
    )
    .expect("kubeconfig");
    let through = Kubectl {
        kubeconfig: argocd_kubeconfig,
    };
    let namespaces = through.ok(&["get", "namespaces", "-o", "name"]);
    assert!(
        namespaces.contains(&format!("namespace/{tenants}")),
        "{namespaces}"
    );
    // The actor in the customer cluster is the agent's ServiceAccount.
    let whoami = through.json(&["auth", "whoami"]);
    let user = whoami["status"]["userInfo"]["username"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        user,
        format!("system:serviceaccount:{agent_ns}:tether-agent")
    );

    let work = format!("work-{run}");
    through.ok(&["create", "namespace", &work]);
    let manifests = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: {work}\ndata:\n  color: blue\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: {work}\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: web\n        image: registry.example/web:1\n"
    );
    through.apply_ok(&manifests, &[]);
    // A large object (600 KB) written through the tunnel, then read back
    // through it (an answer past the size at which a pooled connection gets
    // a task of its own, on both sides of the tunnel) and directly: whole
    // and the same.
    let large = "x".repeat(600 << 10);
    through.apply_ok(
        &format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: large\n  namespace: {work}\ndata:\n  blob: {large}\n"),
        &["--server-side"],
    );
    let read = ["get", "configmap", "large", "-n", &work];
    let (tunneled, direct) = (through.json(&read), k.json(&read));
    assert_eq!(tunneled["data"]["blob"].as_str(), Some(large.as_str()));
    assert_eq!(tunneled, direct);

    // A watch through the tunnel sees a change.
    let mut watch = Command::new("kubectl")
        .args([
            "--kubeconfig",
            &through.kubeconfig.display().to_string(),
            "get",
            "configmap",
            "settings",
            "-n",
            &work,
            "--watch",
            "--output-watch-events",
            "-o",
            "jsonpath={.type} {.object.data.color}{\"\\n\"}",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("watch starts");
    std::thread::sleep(Duration::from_secs(2));
    through.ok(&[
        "patch",
        "configmap",
        "settings",
        "-n",
        &work,
        "--type",
        "merge",
        "-p",
        r#"{"data":{"color":"green"}}"#,
    ]);
    let stdout = watch.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let saw = eventually(Duration::from_secs(20), "watch sees the change", || {
        rx.try_recv()
            .ok()
            .filter(|line| line.contains("MODIFIED green"))
    });
    assert!(saw.contains("green"));
    let _ = watch.kill();
    let _ = watch.wait();
    through.ok(&["delete", "namespace", &work, "--wait=false"]);

    // The agent renews its certificate over the tunnel: a real
    // CertificateSigningRequest, approved and signed by the operator, the
    // new certificate in the agent's Secret (through the API, with the
    // bundle's RBAC), presented, and shown by `kubectl get proxiedclusters`.
    let handed_over_expiry = tether::pki::CertInfo::from_pem(&handed_over)
        .expect("certificate")
        .not_after;
    let renewed = eventually(
        Duration::from_secs(150),
        "the agent's Secret holds a renewed certificate",
        || {
            let pem = secret_text(&k, &agent_ns, "tether-agent", "tls.crt")?;
            (pem != handed_over).then_some(pem)
        },
    );
    let renewed = tether::pki::CertInfo::from_pem(&renewed).expect("certificate");
    assert_eq!(renewed.cluster.as_deref(), Some(id.as_str()));
    assert!(renewed.not_after > handed_over_expiry);
    let requests = k.json(&[
        "get",
        "certificatesigningrequests",
        "-l",
        &format!("tether.dev/cluster={id}"),
    ]);
    let signed = requests["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|csr| {
            csr["spec"]["signerName"] == "tether.dev/agent"
                && csr["status"]["certificate"].is_string()
                && csr["status"]["conditions"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["type"] == "Approved"))
        })
        .count();
    assert!(signed >= 1, "an approved and signed CSR: {requests}");
    let shown = eventually(
        Duration::from_secs(60),
        "CERT EXPIRES shows the renewed certificate",
        || {
            let shown = k.field(
                "proxiedcluster",
                &id,
                &tenants,
                "{.status.certificates.agentNotAfter}",
            );
            let at: std::time::SystemTime = shown.parse::<jiff::Timestamp>().ok()?.into();
            (at > handed_over_expiry).then_some(shown)
        },
    );
    println!("renewed over the tunnel; CERT EXPIRES now {shown}");
    through.ok(&["get", "namespaces", "-o", "name"]);
    // The new private key exists in the customer cluster's Secret only.
    let key = secret_text(&k, &agent_ns, "tether-agent", "tls.key").expect("the agent's key");
    let outside = [
        k.ok(&["get", "certificatesigningrequests", "-o", "json"]),
        k.ok(&["get", "proxiedcluster", &id, "-n", &tenants, "-o", "json"]),
        std::fs::read_to_string(d.join("operator.log")).unwrap_or_default(),
        std::fs::read_to_string(d.join("e2e-server-0.log")).unwrap_or_default(),
        std::fs::read_to_string(d.join("e2e-server-1.log")).unwrap_or_default(),
    ];
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(
            outside.iter().all(|text| !text.contains(line)),
            "a line of the agent's private key is outside the customer cluster"
        );
    }

    // Deleting the ProxiedCluster removes what it owned, and the agent is cut off.
    k.ok(&[
        "delete",
        "proxiedcluster",
        &id,
        "-n",
        &tenants,
        "--wait=true",
        "--timeout=60s",
    ]);
    let gone = k.run(&["get", "secret", &format!("tether-{id}"), "-n", &argocd]);
    assert!(
        !gone.status.success(),
        "ArgoCD Secret removed by the finalizer"
    );
    eventually(
        Duration::from_secs(20),
        "tunnel closed after deletion",
        || {
            through
                .run(&["get", "namespaces"])
                .status
                .success()
                .then_some(())
                .is_none()
                .then_some(())
        },
    );
    // The garbage collector rediscovers new CRDs about every 30 s.
    eventually(
        Duration::from_secs(120),
        "owned Secrets garbage-collected",
        || {
            let left = k.ok(&["get", "secrets", "-n", &tenants, "-o", "name"]);
            (!left.contains(&format!("{id}-tether"))).then_some(())
        },
    );
}
