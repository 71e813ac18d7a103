//! A real Prometheus (Debian's, started here with its own configuration)
//! scraping every tether pod as the chart's ServiceMonitor says: Endpoints
//! of Services labelled `tether.dev/metrics`, port `metrics`, HTTPS, the
//! token of a ServiceAccount bound to `<release>-metrics-reader`, and the
//! chart's alert rules.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Kubectl, eventually, free_port};

/// A Prometheus process, stopped when dropped.
pub struct Prometheus {
    child: Child,
    pub url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// `None` (and a SKIP line) without Debian's prometheus.
    pub fn start(
        dir: &Path,
        kubeconfig: &Path,
        namespaces: &[&str],
        token: &str,
        rules: &str,
    ) -> Option<Self> {
        if Command::new("prometheus")
            .arg("--version")
            .output()
            .is_err()
        {
            println!("SKIP: prometheus is not installed (Debian: prometheus); no scrape test");
            return None;
        }
        let token_file = dir.join("prometheus-token");
        std::fs::write(&token_file, token).expect("token");
        std::fs::write(dir.join("rules.yaml"), rules).expect("rules");
        // The ServiceMonitor's selection and settings, as the Prometheus
        // Operator would write them (it also adds the pod label).
        let config = format!(
            r#"global: {{scrape_interval: 2s, evaluation_interval: 2s}}
rule_files: [rules.yaml]
scrape_configs:
  - job_name: tether
    kubernetes_sd_configs:
      - role: endpoints
        kubeconfig_file: {kubeconfig}
        namespaces: {{names: [{namespaces}]}}
    scheme: https
    tls_config: {{insecure_skip_verify: true}}
    authorization: {{credentials_file: {token}}}
    relabel_configs:
      - {{source_labels: [__meta_kubernetes_service_label_tether_dev_metrics], regex: "true", action: keep}}
      - {{source_labels: [__meta_kubernetes_endpoint_port_name], regex: metrics, action: keep}}
      - {{source_labels: [__meta_kubernetes_namespace], target_label: namespace}}
      - {{source_labels: [__meta_kubernetes_pod_name], target_label: pod}}
      - {{source_labels: [__meta_kubernetes_service_name], target_label: service}}
"#,
            kubeconfig = kubeconfig.display(),
            namespaces = namespaces.join(", "),
            token = token_file.display(),
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("config");
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .current_dir(dir)
            .arg("--config.file=prometheus.yml")
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        Some(Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    /// A GET of Prometheus's HTTP API; `None` until it answers.
    pub fn api(&self, path: &str) -> Option<Value> {
        let output = Command::new("curl")
            .args(["-sf", "--max-time", "5", &format!("{}{path}", self.url)])
            .output()
            .ok()?;
        let value: Value = serde_json::from_slice(&output.stdout).ok()?;
        (value["status"] == "success").then_some(value)
    }

    /// The value of an instant query that returns one sample.
    pub fn scalar(&self, query: &str) -> Option<f64> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let answer = self.api(&format!("/api/v1/query?query={encoded}"))?;
        answer["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    }

    /// Active scrape targets: (pod, health, last error).
    pub fn targets(&self) -> Vec<(String, String, String)> {
        let Some(answer) = self.api("/api/v1/targets?state=active") else {
            return Vec::new();
        };
        answer["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|t| {
                let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
                (
                    text(&t["labels"]["pod"]),
                    text(&t["health"]),
                    text(&t["lastError"]),
                )
            })
            .collect()
    }

    /// The state (pending, firing) of alert `name`, if it is active.
    pub fn alert_state(&self, name: &str) -> Option<String> {
        let answer = self.api("/api/v1/alerts")?;
        answer["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .and_then(|a| a["state"].as_str().map(str::to_owned))
    }
}

/// The ServiceAccount Prometheus scrapes as, bound to the chart's reader
/// ClusterRole (both written to `manifest`, for the caller's cleanup); its
/// token.
pub fn scraper_token(k: &Kubectl, manifest: &Path, namespace: &str, reader_role: &str) -> String {
    std::fs::write(
        manifest,
        format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: prometheus, namespace: {namespace}}}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {namespace}-prometheus}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {reader_role}}}\nsubjects: [{{kind: ServiceAccount, name: prometheus, namespace: {namespace}}}]\n"
        ),
    )
    .expect("manifest");
    k.ok(&["apply", "-f", &manifest.display().to_string()]);
    k.ok(&[
        "create",
        "token",
        "prometheus",
        "-n",
        namespace,
        "--duration",
        "1h",
    ])
    .trim()
    .to_owned()
}

/// Every expected target up: `count` of them, each healthy.
pub fn wait_all_up(prometheus: &Prometheus, count: usize) -> Vec<(String, String, String)> {
    let started = Instant::now();
    let targets = eventually(
        Duration::from_secs(90),
        &format!("{count} tether targets up"),
        || {
            let targets = prometheus.targets();
            (targets.len() == count && targets.iter().all(|(_, health, _)| health == "up"))
                .then_some(targets)
        },
    );
    println!(
        "MEASURE: Prometheus scraped all {count} tether pods {:.1} s after it started",
        started.elapsed().as_secs_f64()
    );
    targets
}
