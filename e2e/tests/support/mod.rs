//! Shared by the real-cluster tests: the cluster from TETHER_E2E_KUBECONFIG,
//! kubectl, tether's binaries as processes.
#![allow(dead_code)] // each test binary uses a subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const ENV: &str = "TETHER_E2E_KUBECONFIG";

/// The kubeconfig of the cluster under test, or `None` (and a SKIP line)
/// when the variable is unset.
pub fn cluster() -> Option<PathBuf> {
    cluster_from(
        ENV,
        "a kubeconfig of a real cluster to run the e2e suite (see README)",
    )
}

/// The kubeconfig named by `variable`, or `None` with a SKIP line saying
/// what to set it to.
pub fn cluster_from(variable: &str, what: &str) -> Option<PathBuf> {
    match std::env::var_os(variable) {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            eprintln!("SKIP: set {variable} to {what}");
            None
        }
    }
}

/// Where tether's binaries are: TETHER_BIN_DIR, or this workspace's
/// target/debug (`make e2e` builds them first).
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("TETHER_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` (make e2e does)",
        path.display()
    );
    path
}

pub struct Kubectl {
    pub kubeconfig: PathBuf,
}

impl Kubectl {
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl runs")
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn apply_stdin(&self, yaml: &str, extra: &[&str]) -> Output {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["apply", "-f", "-"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(yaml.as_bytes())
            .expect("write");
        child.wait_with_output().expect("kubectl ends")
    }

    /// One field of a namespaced object, by JSONPath.
    pub fn field(&self, kind: &str, name: &str, namespace: &str, path: &str) -> String {
        self.ok(&[
            "get",
            kind,
            name,
            "-n",
            namespace,
            "-o",
            &format!("jsonpath={path}"),
        ])
    }

    /// `kubectl apply -f -` that must succeed.
    pub fn apply_ok(&self, yaml: &str, extra: &[&str]) {
        let applied = self.apply_stdin(yaml, extra);
        assert!(
            applied.status.success(),
            "kubectl apply {}: {}",
            extra.join(" "),
            String::from_utf8_lossy(&applied.stderr)
        );
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&all)).expect("JSON from kubectl")
    }

    /// The API server URL and CA file of the current context.
    pub fn server_and_ca(&self, dir: &Path) -> (String, PathBuf) {
        let config = self.json(&["config", "view", "--raw", "--minify"]);
        let cluster = &config["clusters"][0]["cluster"];
        let server = cluster["server"].as_str().expect("server").to_owned();
        let ca = dir.join("apiserver-ca.crt");
        match cluster["certificate-authority-data"].as_str() {
            Some(data) => {
                use base64::Engine;
                let pem = base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .expect("base64");
                std::fs::write(&ca, pem).expect("write CA");
            }
            None => {
                let file = cluster["certificate-authority"]
                    .as_str()
                    .expect("a CA for the API server");
                std::fs::copy(file, &ca).expect("copy CA");
            }
        }
        (server, ca)
    }
}

/// A process that is killed when dropped; its stderr goes to a file.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(binary: &str, args: &[String], envs: &[(&str, &Path)], log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(self::binary(binary));
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        for (key, value) in envs {
            command.env(key, value);
        }
        Self {
            child: command.spawn().expect("process starts"),
            log,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what its processes said.
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(25).collect();
            eprintln!("--- last lines of {} ---", self.log.display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct free ports, all held while chosen: ports picked one by one
/// can repeat.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("addr").port())
}

/// Polls `check` until it returns `Some`, or panics after `limit`.
pub fn eventually<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A kubeconfig for `namespace/service_account`, with a token from the
/// TokenRequest API: the process using it has exactly that account's RBAC.
pub fn service_account_kubeconfig(
    admin: &Kubectl,
    namespace: &str,
    service_account: &str,
    dir: &Path,
) -> PathBuf {
    let token = admin.ok(&[
        "create",
        "token",
        service_account,
        "-n",
        namespace,
        "--duration",
        "1h",
    ]);
    let (server, ca) = admin.server_and_ca(dir);
    let path = dir.join(format!("{namespace}-{service_account}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: {service_account}\n  user:\n    token: {}\ncontexts:\n- name: c\n  context: {{cluster: c, user: {service_account}, namespace: {namespace}}}\ncurrent-context: c\n",
            ca.display(),
            token.trim()
        ),
    )
    .expect("write kubeconfig");
    path
}

/// The management chart rendered with Helm's SDK (the chart-test virtualenv).
pub fn render_chart(release: &str, namespace: &str, values: &serde_json::Value) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: `make e2e` (or `make chart-test`) creates it",
        python.display()
    );
    let out = Command::new(python)
        .arg(root.join("charts/tests/render.py"))
        .arg(root.join("charts/tether"))
        .args([
            "--release",
            release,
            "--namespace",
            namespace,
            "--values",
            &values.to_string(),
        ])
        .output()
        .expect("render runs");
    assert!(
        out.status.success(),
        "render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `kubectl tether bundle export` of a ProxiedCluster into `out`, as the
/// platform team hands it over.
pub fn export_bundle(kubeconfig: &Path, name: &str, namespace: &str, out: &Path) {
    let export = Command::new(binary("kubectl-tether"))
        .args(["bundle", "export", name, "-n", namespace, "-o"])
        .arg(out)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("kubectl-tether runs");
    assert!(
        export.status.success(),
        "bundle export: {}",
        String::from_utf8_lossy(&export.stderr)
    );
}
