//! What users install, as real pods: the image (`make image`, imported with
//! `make image-import`), the management chart as `helm install` renders it,
//! and the agent bundle as the customer applies it, on a cluster whose node
//! runs pods. Skipped unless TETHER_E2E_POD_KUBECONFIG names such a cluster
//! (README, "On a real cluster": realk8s-up + realk8s-node-up).
//!
//! The same cluster plays the customer: the bundle goes into its own
//! namespace and the agent's target is `kubernetes.default.svc:443`.
//! Figures (pod start to Ready, failed requests in a rolling restart,
//! reconnect times) are printed as `MEASURE:` lines.

#[path = "pods/prometheus.rs"]
mod prometheus;
mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;
use support::{Kubectl, eventually};

const ENV: &str = "TETHER_E2E_POD_KUBECONFIG";
/// The chart's default image (`image.repository:appVersion`), as `make
/// image` names it.
const IMAGE: &str = "ghcr.io/tether-dev/tether:0.1.0";
const PODS_READY: Duration = Duration::from_secs(180);

/// Removes what the run created, also when it fails half-way.
struct Cleanup {
    kubectl: Kubectl,
    manifests: Vec<PathBuf>,
    namespaces: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for file in self.manifests.iter().rev() {
            let _ = self.kubectl.run(&[
                "delete",
                "--ignore-not-found",
                "--wait=false",
                "-f",
                &file.display().to_string(),
            ]);
        }
        for namespace in &self.namespaces {
            let _ = self.kubectl.run(&[
                "delete",
                "namespace",
                namespace,
                "--ignore-not-found",
                "--wait=false",
            ]);
        }
    }
}

fn pods(k: &Kubectl, namespace: &str, selector: &str) -> Vec<Value> {
    k.json(&["get", "pods", "-n", namespace, "-l", selector])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn is_ready(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn restarts(pod: &Value) -> u64 {
    pod["status"]["containerStatuses"]
        .as_array()
        .map(|s| s.iter().filter_map(|c| c["restartCount"].as_u64()).sum())
        .unwrap_or(0)
}

fn name(pod: &Value) -> String {
    pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Waits until `count` pods match and all are Ready; fails at once on a
/// restart (a crash loop never becomes Ready).
fn wait_ready(k: &Kubectl, namespace: &str, selector: &str, count: usize) -> Vec<Value> {
    eventually(
        PODS_READY,
        &format!("{count} Ready pods {selector}"),
        || {
            let found = pods(k, namespace, selector);
            for pod in &found {
                assert_eq!(
                    restarts(pod),
                    0,
                    "pod {} restarted: {}\n{}",
                    name(pod),
                    pod["status"]["containerStatuses"],
                    k.run(&["logs", "-n", namespace, &name(pod), "--previous"])
                        .stdout
                        .escape_ascii()
                );
            }
            let live: Vec<Value> = found
                .into_iter()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .collect();
            (live.len() == count && live.iter().all(is_ready)).then_some(live)
        },
    )
}

/// Seconds from a pod's start to its Ready condition, as the API recorded them.
fn start_to_ready(pod: &Value) -> i64 {
    let time = |s: &Value| {
        s.as_str()
            .and_then(|s| s.parse::<jiff::Timestamp>().ok())
            .map_or(0, |t| t.as_second())
    };
    let ready = pod["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .map_or(0, |c| time(&c["lastTransitionTime"]));
    ready - time(&pod["status"]["startTime"])
}

fn connected(k: &Kubectl, namespace: &str, name: &str) -> bool {
    let pc = k.json(&["get", "proxiedcluster", name, "-n", namespace]);
    pc["status"]["connection"]["connected"] == true
}

/// A kubeconfig made from nothing but the ArgoCD cluster Secret the operator
/// wrote: its server URL and `tlsClientConfig`, as ArgoCD reads them.
/// `server_override` reaches the same Service from the node (by ClusterIP,
/// with the Service's name for TLS).
fn argocd_kubeconfig(secret: &Value, server_override: Option<(&str, &str)>) -> String {
    let data = |key: &str| {
        let encoded = secret["data"][key].as_str().expect("ArgoCD Secret key");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("base64");
        String::from_utf8(bytes).expect("utf-8")
    };
    let server = data("server");
    let config: Value = serde_json::from_str(&data("config")).expect("config JSON");
    let tls = &config["tlsClientConfig"];
    assert_eq!(tls["insecure"], false, "ArgoCD is never told to skip TLS");
    let (server, tls_name) = match server_override {
        Some((url, name)) => (url.to_owned(), format!("    tls-server-name: {name}\n")),
        None => (server, String::new()),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n{tls_name}    certificate-authority-data: {}\nusers:\n- name: argocd\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: c\n  context: {{cluster: c, user: argocd}}\ncurrent-context: c\n",
        tls["caData"].as_str().expect("caData"),
        tls["certData"].as_str().expect("certData"),
        tls["keyData"].as_str().expect("keyData"),
    )
}

/// An image holding only a static kubectl, for a pod that sees the cluster
/// as ArgoCD does. Built with realk8s-image-import (the node tools).
fn kubectl_image(dir: &Path) -> String {
    let tool = std::env::var_os("REALK8S_IMAGE_IMPORT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/realk8s-image-import")
        });
    let kubectl = which("kubectl");
    let root = dir.join("kubectl-root/bin");
    std::fs::create_dir_all(&root).expect("mkdir");
    std::fs::copy(&kubectl, root.join("kubectl")).expect("copy kubectl");
    let name = "localhost/tether-e2e/kubectl:1";
    let out = Command::new(&tool)
        .args([name, &dir.join("kubectl-root").display().to_string()])
        .env("REALK8S_IMAGE_ENTRYPOINT", r#"["/bin/kubectl"]"#)
        .output()
        .unwrap_or_else(|err| panic!("{}: {err} (set REALK8S_IMAGE_IMPORT)", tool.display()));
    assert!(
        out.status.success(),
        "image import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    name.to_owned()
}

fn which(program: &str) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("readlink -f \"$(command -v {program})\"")])
        .output()
        .expect("sh");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Requests through the tunnel in a loop, from the node, until stopped:
/// (sent, failed).
fn steady_load(kubeconfig: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u32, u32)> {
    std::thread::spawn(move || {
        let (sent, failed) = (AtomicU32::new(0), AtomicU32::new(0));
        while !stop.load(Ordering::Relaxed) {
            let out = Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["get", "namespaces", "-o", "name", "--request-timeout=10s"])
                .output()
                .expect("kubectl");
            sent.fetch_add(1, Ordering::Relaxed);
            if !out.status.success() {
                failed.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "request failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (sent.into_inner(), failed.into_inner())
    })
}

/// Time until requests through the tunnel succeed again, three in a row.
fn until_served(through: &Kubectl, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut streak = 0;
    while streak < 3 {
        assert!(
            started.elapsed() < limit,
            "not served again within {limit:?}"
        );
        if through
            .run(&["get", "namespaces", "-o", "name", "--request-timeout=5s"])
            .status
            .success()
        {
            streak += 1;
        } else {
            streak = 0;
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    started.elapsed()
}

/// The capability and root-filesystem state of a container's main process,
/// read on the node from /proc: (CapEff, root mounted read-only).
fn process_confinement(program: &str) -> Vec<(String, bool)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let path = entry.path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        if argv0 != program.as_bytes() {
            continue;
        }
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let mounts = std::fs::read_to_string(path.join("mountinfo")).unwrap_or_default();
        let root_ro = mounts.lines().any(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            fields.get(4) == Some(&"/")
                && fields
                    .get(5)
                    .is_some_and(|o| o.split(',').any(|o| o == "ro"))
        });
        found.push((cap_eff, root_ro));
    }
    found
}

fn follow_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn chart_and_bundle_run_as_pods() {
    let Some(kubeconfig) = support::cluster_from(
        ENV,
        "the kubeconfig of a cluster whose node runs pods, with tether's image imported \
         (make image image-import), to run the pods e2e (see README)",
    ) else {
        return;
    };
    let k = Kubectl {
        kubeconfig: kubeconfig.clone(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let run = std::process::id();
    let (system, argocd, tenants, agent_ns, monitoring) = (
        format!("tether-pods-{run}"),
        format!("argocd-pods-{run}"),
        format!("tenants-pods-{run}"),
        format!("tether-agent-pods-{run}"),
        format!("monitoring-pods-{run}"),
    );
    let release = format!("tether-pods-{run}");
    let id = format!("pods-{run}");
    let chart_file = d.join("chart.yaml");
    let bundle_file = d.join("agent.yaml");
    let mut cleanup = Cleanup {
        kubectl: Kubectl {
            kubeconfig: kubeconfig.clone(),
        },
        manifests: vec![],
        namespaces: vec![
            tenants.clone(),
            argocd.clone(),
            system.clone(),
            agent_ns.clone(),
            monitoring.clone(),
        ],
    };
    for namespace in [&system, &argocd, &tenants, &monitoring] {
        k.ok(&["create", "namespace", namespace]);
    }

    // The management chart as `helm install` renders it: defaults, but for
    // the URL agents dial (the public Service, in-cluster) and ArgoCD's
    // namespace.
    let public_url = format!("wss://tether-server.{system}.svc:8443");
    let values = serde_json::json!({"publicUrl": public_url, "argocd": {"namespace": argocd},
        "metrics": {"allowedNamespaces": [monitoring]}});
    let chart = support::render_chart(&release, &system, &values);
    assert!(
        chart.contains(IMAGE),
        "the chart's default image is {IMAGE}"
    );
    // `helm install` applies the chart's crds/ first (and leaves them on
    // uninstall); rendering does not include them.
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/tether/crds");
    k.ok(&["apply", "--server-side", "-f", &crds.display().to_string()]);
    k.ok(&[
        "wait",
        "--for=condition=established",
        "crd/proxiedclusters.tether.dev",
        "--timeout=60s",
    ]);
    std::fs::write(&chart_file, &chart).expect("write chart");
    cleanup.manifests.push(chart_file.clone());
    k.ok(&[
        "apply",
        "--server-side",
        "-f",
        &chart_file.display().to_string(),
    ]);

    let operators = wait_ready(&k, &system, "app.kubernetes.io/name=tether-operator", 2);
    let servers = wait_ready(&k, &system, "app.kubernetes.io/name=tether-server", 3);
    for pod in operators.iter().chain(&servers) {
        println!(
            "MEASURE: pod {} start to Ready {} s",
            name(pod),
            start_to_ready(pod)
        );
    }

    // A ProxiedCluster; its bundle leaves as one file whose hash checks.
    let pc = format!(
        "apiVersion: tether.dev/v1alpha1\nkind: ProxiedCluster\nmetadata:\n  name: {id}\n  namespace: {tenants}\nspec:\n  agent:\n    namespace: {agent_ns}\n    metrics: {{enabled: true, allowedNamespaces: [{monitoring}]}}\n"
    );
    k.apply_ok(&pc, &[]);
    eventually(Duration::from_secs(60), "bundle rendered", || {
        let pc = k.json(&["get", "proxiedcluster", &id, "-n", &tenants]);
        pc["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "BundleReady" && c["status"] == "True")
            .then_some(())
    });
    support::export_bundle(&kubeconfig, &id, &tenants, &bundle_file);
    let bundle = std::fs::read_to_string(&bundle_file).expect("bundle");
    let declared = bundle
        .lines()
        .find_map(|l| l.strip_prefix("# sha256 of the non-comment lines: "))
        .expect("hash header");
    let check = Command::new("sh")
        .args(["-c", "grep -v '^#' \"$1\" | sha256sum", "sh"])
        .arg(&bundle_file)
        .output()
        .expect("sha256sum");
    assert!(
        String::from_utf8_lossy(&check.stdout).starts_with(declared),
        "the receiver's check: grep -v '^#' | sha256sum"
    );

    // The customer applies it as it is.
    cleanup.manifests.push(bundle_file.clone());
    k.ok(&["apply", "-f", &bundle_file.display().to_string()]);
    let mut agents = wait_ready(&k, &agent_ns, "app.kubernetes.io/name=tether-agent", 1);
    println!(
        "MEASURE: pod {} start to Ready {} s",
        name(&agents[0]),
        start_to_ready(&agents[0])
    );
    eventually(Duration::from_secs(30), "ProxiedCluster connected", || {
        connected(&k, &tenants, &id).then_some(())
    });
    // The agent holds a session with each of the three replicas.
    let started = Instant::now();
    eventually(Duration::from_secs(60), "REPLICAS 3/3", || {
        let replicas = k.field(
            "proxiedcluster",
            &id,
            &tenants,
            "{.status.connection.replicas}",
        );
        (replicas == "3/3").then_some(())
    });
    println!(
        "MEASURE: agent on all 3 replicas {:.1} s after it connected",
        started.elapsed().as_secs_f64()
    );
    println!("{}", k.ok(&["get", "proxiedclusters", "-n", &tenants]));

    // A real Prometheus, configured as the chart's ServiceMonitor, with the
    // chart's alert rules: every tether pod scraped, a scrape without a
    // token refused, and the disconnect alert pending once the agent goes,
    // then firing (its `for` shortened from the chart's 5m to 15s here).
    let scraper = d.join("prometheus-account.yaml");
    cleanup.manifests.push(scraper.clone());
    let token = prometheus::scraper_token(
        &k,
        &scraper,
        &monitoring,
        &format!("{release}-metrics-reader"),
    );
    let rules = support::render_chart(
        &release,
        &system,
        &serde_json::json!({"publicUrl": public_url,
            "prometheusRule": {"enabled": true, "agentDisconnectedFor": "15s"}}),
    );
    let rules = rules
        .split("\n---\n")
        .find(|doc| doc.contains("kind: PrometheusRule"))
        .and_then(|doc| serde_yaml_ng::from_str::<Value>(doc).ok())
        .map(|rule| serde_yaml_ng::to_string(&rule["spec"]).expect("rules YAML"))
        .expect("the chart's PrometheusRule");
    if let Some(prom) = prometheus::Prometheus::start(d, &token, &rules) {
        // Two operators, three servers, one agent.
        let targets = prometheus::wait_all_up(&prom, &k, &[&system, &agent_ns], 6);
        println!("scrape targets: {targets:?}");
        eventually(Duration::from_secs(30), "tether's series", || {
            (prom.scalar("sum(tether_operator_leader)") == Some(1.0)
                && prom.scalar("count(agents_connected)") == Some(3.0)
                && prom.scalar("sum(agent_connected)") == Some(1.0)
                && prom.scalar(&format!(
                    "max(tether_operator_agent_connected{{cluster=\"{id}\"}})"
                )) == Some(1.0))
            .then_some(())
        });
        if let Some(seconds) = prom.scalar(r#"avg(scrape_duration_seconds{job="tether"})"#) {
            println!(
                "MEASURE: one scrape of a tether pod takes {:.1} ms on average (Prometheus's scrape_duration_seconds)",
                seconds * 1000.0
            );
        }
        let server_ip = servers[0]["status"]["podIP"]
            .as_str()
            .expect("pod IP")
            .to_owned();
        for (header, expected) in [
            (None, "401"),
            (Some("Authorization: Bearer not-a-token"), "401"),
            (
                Some(format!("Authorization: Bearer {token}").as_str()),
                "200",
            ),
        ] {
            let mut curl = Command::new("curl");
            curl.args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"]);
            if let Some(header) = header {
                curl.args(["-H", header]);
            }
            let code = curl
                .arg(format!("https://{server_ip}:8082/metrics"))
                .output()
                .expect("curl");
            assert_eq!(
                String::from_utf8_lossy(&code.stdout),
                expected,
                "{header:?}"
            );
        }
        let scale_agent = |replicas: &str| {
            let replicas = format!("--replicas={replicas}");
            k.ok(&[
                "scale",
                "deployment/tether-agent",
                "-n",
                &agent_ns,
                &replicas,
            ]);
        };
        let started = Instant::now();
        scale_agent("0");
        for state in ["pending", "firing"] {
            eventually(
                Duration::from_secs(60),
                &format!("TetherAgentDisconnected {state}"),
                || {
                    prom.alert_state("TetherAgentDisconnected")
                        .filter(|now| now == state)
                },
            );
            println!(
                "MEASURE: TetherAgentDisconnected {state} {:.1} s after the agent went away",
                started.elapsed().as_secs_f64()
            );
        }
        scale_agent("1");
        agents = wait_ready(&k, &agent_ns, "app.kubernetes.io/name=tether-agent", 1);
        eventually(Duration::from_secs(60), "connected again", || {
            connected(&k, &tenants, &id).then_some(())
        });
        eventually(Duration::from_secs(30), "the alert resolved", || {
            prom.alert_state("TetherAgentDisconnected")
                .is_none()
                .then_some(())
        });
    }

    // ArgoCD's view, from a pod in ArgoCD's namespace that holds only a
    // kubeconfig made of the cluster Secret.
    let secret = k.json(&["get", "secret", &format!("tether-{id}"), "-n", &argocd]);
    let in_cluster = argocd_kubeconfig(&secret, None);
    k.ok(&[
        "create",
        "secret",
        "generic",
        "argocd-view",
        "-n",
        &argocd,
        &format!("--from-literal=config={in_cluster}"),
    ]);
    let kubectl_image = kubectl_image(d);
    let watch_pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: argocd-view\n  namespace: {argocd}\nspec:\n  automountServiceAccountToken: false\n  securityContext: {{runAsNonRoot: true, runAsUser: 65532, fsGroup: 65532}}\n  containers:\n  - name: kubectl\n    image: {kubectl_image}\n    imagePullPolicy: Never\n    command: [/bin/kubectl, --kubeconfig=/argocd/config, get, configmap, -n, {tenants}, --watch, --output-watch-events, -o, 'jsonpath={{.type}} {{.object.metadata.name}} {{.object.data.color}}{{\"\\n\"}}']\n    securityContext: {{readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}\n    volumeMounts: [{{name: argocd, mountPath: /argocd, readOnly: true}}]\n  volumes: [{{name: argocd, secret: {{secretName: argocd-view, defaultMode: 0440}}}}]\n"
    );
    k.apply_ok(&watch_pod, &[]);
    wait_ready(&k, &argocd, "!app.kubernetes.io/name", 1);
    let view = |args: &[&str]| {
        let mut all = vec![
            "exec",
            "-n",
            &argocd,
            "argocd-view",
            "--",
            "/bin/kubectl",
            "--kubeconfig=/argocd/config",
        ];
        all.extend_from_slice(args);
        k.ok(&all)
    };
    // get and list, as the agent's ServiceAccount.
    let namespaces = view(&["get", "namespaces", "-o", "name"]);
    assert!(
        namespaces.contains(&format!("namespace/{agent_ns}")),
        "{namespaces}"
    );
    let whoami = view(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(
        whoami,
        format!("system:serviceaccount:{agent_ns}:tether-agent")
    );
    // A watch that sees a change (the pod's own command is the watch).
    view(&[
        "create",
        "configmap",
        "settings",
        "-n",
        &tenants,
        "--from-literal=color=blue",
    ]);
    view(&[
        "patch",
        "configmap",
        "settings",
        "-n",
        &tenants,
        "-p",
        r#"{"data":{"color":"green"}}"#,
    ]);
    eventually(
        Duration::from_secs(30),
        "the watch in ArgoCD's pod sees the change",
        || {
            let logs = k.ok(&["logs", "-n", &argocd, "argocd-view"]);
            logs.contains("MODIFIED settings green").then_some(())
        },
    );
    // exec and logs -f into a pod of the customer's cluster, through the tunnel.
    let agent_pod = name(&agents[0]);
    let version = view(&[
        "exec",
        "-n",
        &agent_ns,
        &agent_pod,
        "--",
        "/usr/local/bin/tether-agent",
        "--version",
    ]);
    assert!(version.starts_with("tether-agent "), "{version}");
    let mut logs = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "exec",
            "-n",
            &argocd,
            "argocd-view",
            "--",
            "/bin/kubectl",
            "--kubeconfig=/argocd/config",
            "logs",
            "-f",
            "-n",
            &agent_ns,
            &agent_pod,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("logs -f");
    let lines = follow_lines(&mut logs);
    eventually(
        Duration::from_secs(30),
        "logs -f streams the agent's log",
        || {
            lines
                .try_recv()
                .ok()
                .filter(|l| l.contains("tunnel connected"))
        },
    );
    let _ = logs.kill();
    let _ = logs.wait();

    // From the node: the internal Service by ClusterIP, TLS checked against
    // its name, with the same ArgoCD credentials.
    let ip = k.field(
        "service",
        "tether-server-internal",
        &system,
        "{.spec.clusterIP}",
    );
    let node_kubeconfig = d.join("argocd-node.kubeconfig");
    std::fs::write(
        &node_kubeconfig,
        argocd_kubeconfig(
            &secret,
            Some((
                &format!("https://{ip}:8080/tunnel/{id}"),
                &format!("tether-server-internal.{system}.svc"),
            )),
        ),
    )
    .expect("write");
    let through = Kubectl {
        kubeconfig: node_kubeconfig.clone(),
    };
    through.ok(&["get", "namespaces", "-o", "name"]);

    // A rolling restart of tether-server under steady load.
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| steady_load(node_kubeconfig.clone(), stop.clone()))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    k.ok(&[
        "rollout",
        "restart",
        "deployment/tether-server",
        "-n",
        &system,
    ]);
    k.ok(&[
        "rollout",
        "status",
        "deployment/tether-server",
        "-n",
        &system,
        "--timeout=180s",
    ]);
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let (sent, failed) = load
        .into_iter()
        .map(|thread| thread.join().expect("load thread"))
        .fold((0, 0), |(s, f), (s2, f2)| (s + s2, f + f2));
    println!("MEASURE: rolling restart of tether-server: {failed} of {sent} requests failed");
    assert!(sent > 20, "the load ran ({sent} requests)");
    assert_eq!(
        failed, 0,
        "every replica serves every cluster: a rolling restart fails nothing"
    );
    wait_ready(&k, &system, "app.kubernetes.io/name=tether-server", 3);

    // Pods deleted: the cluster is served again within seconds.
    let agent_pod = name(&wait_ready(&k, &agent_ns, "app.kubernetes.io/name=tether-agent", 1)[0]);
    k.ok(&["delete", "pod", "-n", &agent_ns, &agent_pod, "--wait=false"]);
    let served = until_served(&through, Duration::from_secs(120));
    println!(
        "MEASURE: agent pod deleted: served again after {:.1} s",
        served.as_secs_f64()
    );
    eventually(
        Duration::from_secs(30),
        "connected after the agent's restart",
        || connected(&k, &tenants, &id).then_some(()),
    );
    let server_pod = name(&wait_ready(&k, &system, "app.kubernetes.io/name=tether-server", 3)[0]);
    k.ok(&["delete", "pod", "-n", &system, &server_pod, "--wait=false"]);
    let served = until_served(&through, Duration::from_secs(120));
    println!(
        "MEASURE: server pod {server_pod} deleted: served again after {:.1} s",
        served.as_secs_f64()
    );
    wait_ready(&k, &system, "app.kubernetes.io/name=tether-server", 3);
    wait_ready(&k, &agent_ns, "app.kubernetes.io/name=tether-agent", 1);

    // Confinement holds as run: no capabilities, read-only root, no crash.
    for program in [
        "/usr/local/bin/tether-server",
        "/usr/local/bin/tether-operator",
        "/usr/local/bin/tether-agent",
    ] {
        let found = process_confinement(program);
        assert!(!found.is_empty(), "no {program} process on the node");
        for (cap_eff, root_ro) in found {
            assert_eq!(cap_eff, "0000000000000000", "{program} has capabilities");
            assert!(root_ro, "{program}'s root filesystem is writable");
        }
    }
    for (namespace, selector) in [
        (&system, "app.kubernetes.io/part-of=tether"),
        (&agent_ns, "app.kubernetes.io/name=tether-agent"),
    ] {
        for pod in pods(&k, namespace, selector) {
            assert_eq!(restarts(&pod), 0, "{} restarted", name(&pod));
        }
    }

    // Deleting the ProxiedCluster removes its ArgoCD Secret and its bundle.
    k.ok(&[
        "delete",
        "proxiedcluster",
        &id,
        "-n",
        &tenants,
        "--timeout=60s",
    ]);
    let gone = k.run(&["get", "secret", &format!("tether-{id}"), "-n", &argocd]);
    assert!(!gone.status.success(), "ArgoCD Secret removed");
    eventually(
        Duration::from_secs(120),
        "bundle Secret garbage-collected",
        || {
            let left = k.ok(&["get", "secrets", "-n", &tenants, "-o", "name"]);
            (!left.contains(&format!("{id}-tether-bundle"))).then_some(())
        },
    );

    // Uninstall: nothing of the release is left.
    k.ok(&[
        "delete",
        "-f",
        &bundle_file.display().to_string(),
        "--wait=true",
        "--timeout=120s",
    ]);
    k.ok(&[
        "delete",
        "-f",
        &chart_file.display().to_string(),
        "--wait=true",
        "--timeout=120s",
    ]);
    let selector = format!("app.kubernetes.io/instance={release}");
    // Pods end after their grace period (delay + grace + margin).
    eventually(
        Duration::from_secs(120),
        "nothing of the release left",
        || {
            let left = k.ok(&[
            "get",
            "all,roles,rolebindings,clusterroles,clusterrolebindings,networkpolicies,poddisruptionbudgets,serviceaccounts",
            "-A",
            "-l",
            &selector,
            "-o",
            "name",
        ]);
            left.trim().is_empty().then_some(())
        },
    );
}
