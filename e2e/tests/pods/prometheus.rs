//! A real Prometheus (Debian's, started here with its own configuration)
//! scraping every tether pod as the chart's ServiceMonitor says: Endpoints
//! of Services labelled `tether.dev/metrics`, port `metrics`, HTTPS, the
//! token of a ServiceAccount bound to `<release>-metrics-reader`, and the
//! chart's alert rules. Debian builds Prometheus without Kubernetes service
//! discovery, so the test does the discovery the Prometheus Operator's
//! `role: endpoints` would (the same selection) and hands Prometheus the
//! targets through `file_sd_configs`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Kubectl, free_port};

/// A Prometheus process, stopped when dropped.
pub struct Prometheus {
    child: Child,
    pub url: String,
    log: std::path::PathBuf,
    targets: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// `None` (and a SKIP line) without Debian's prometheus.
    pub fn start(dir: &Path, token: &str, rules: &str) -> Option<Self> {
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
        std::fs::write(dir.join("targets.json"), "[]").expect("targets");
        // The ServiceMonitor's settings, as the Prometheus Operator would
        // write them; targets from `discover`.
        let config = format!(
            r#"global: {{scrape_interval: 2s, evaluation_interval: 2s}}
rule_files: [rules.yaml]
scrape_configs:
  - job_name: tether
    file_sd_configs:
      - files: [targets.json]
        refresh_interval: 2s
    scheme: https
    tls_config: {{insecure_skip_verify: true}}
    authorization: {{credentials_file: {token}}}
"#,
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
            log: dir.join("prometheus.log"),
            targets: dir.join("targets.json"),
        })
    }

    /// What `role: endpoints` with the ServiceMonitor's selector finds: the
    /// Endpoints of Services labelled `tether.dev/metrics=true` (Endpoints
    /// carry their Service's labels), port `metrics`, one target per pod
    /// address with the labels the Prometheus Operator adds. Written for
    /// Prometheus's file discovery (atomically: it watches the file).
    pub fn discover(&self, k: &Kubectl, namespaces: &[&str]) {
        let mut groups = Vec::new();
        for namespace in namespaces {
            let endpoints = k.json(&[
                "get",
                "endpoints",
                "-n",
                namespace,
                "-l",
                "tether.dev/metrics=true",
            ]);
            for item in endpoints["items"].as_array().cloned().unwrap_or_default() {
                let service = item["metadata"]["name"].clone();
                for subset in item["subsets"].as_array().cloned().unwrap_or_default() {
                    let ports = subset["ports"].as_array().cloned().unwrap_or_default();
                    let Some(port) = ports.iter().find(|p| p["name"] == "metrics") else {
                        continue;
                    };
                    for address in subset["addresses"].as_array().cloned().unwrap_or_default() {
                        groups.push(serde_json::json!({
                            "targets": [format!("{}:{}", address["ip"].as_str().unwrap_or_default(), port["port"])],
                            "labels": {"namespace": namespace, "service": service,
                                "pod": address["targetRef"]["name"]},
                        }));
                    }
                }
            }
        }
        let staged = self.targets.with_extension("json.new");
        std::fs::write(&staged, serde_json::to_string(&groups).expect("JSON")).expect("targets");
        std::fs::rename(&staged, &self.targets).expect("targets");
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

/// Every expected target up: `count` of them, each healthy. On timeout the
/// message holds what Prometheus saw and its log's end.
pub fn wait_all_up(
    prometheus: &Prometheus,
    k: &Kubectl,
    namespaces: &[&str],
    count: usize,
) -> Vec<(String, String, String)> {
    let started = Instant::now();
    loop {
        prometheus.discover(k, namespaces);
        let targets = prometheus.targets();
        if targets.len() == count && targets.iter().all(|(_, health, _)| health == "up") {
            println!(
                "MEASURE: Prometheus scraped all {count} tether pods {:.1} s after it started",
                started.elapsed().as_secs_f64()
            );
            return targets;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let log = std::fs::read_to_string(&prometheus.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!(
                "not {count} tether targets up after 90 s: {targets:?}\nprometheus log (last lines first):\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
