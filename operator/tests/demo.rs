//! `make demo` keeps telling the whole story: run the demo binary itself
//! (real kubectl, real tether processes, embedded API servers) and check
//! its verdicts, its one-line refusals of bad input, and that an
//! interrupted demo leaves nothing running.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn kubectl_available() -> bool {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIP: kubectl is not installed");
    }
    found
}

/// The demo as `make demo` runs it: from the repository, on its embedded
/// API servers whatever the environment says.
fn demo() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tether-demo"));
    command
        .current_dir(workspace())
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null());
    command
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_demo_tells_the_whole_story() {
    if !kubectl_available() {
        return;
    }
    let output = demo().output().expect("the demo runs");
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for expected in [
        "$ kubectl apply -f examples/proxiedcluster.yaml",
        "proxiedcluster.tether.dev/customer-a created",
        "$ kubectl tether bundle export customer-a -n tenants",
        "ok: the bundle's body hashes to its header's sha256",
        "Normal   TokenIssued",
        "ok: CONNECTED true after",
        "agent 0.1.0, replicas 1/1",
        "deployment.apps/web created",
        "ok: the customer's API server sees ArgoCD as system:serviceaccount:tether-agent:tether-agent",
        "ok: Deployment demo-app/web is in the customer cluster and not in the management cluster",
        "(refused: 0)",
        "ok: the ArgoCD Secret argocd/tether-customer-a is gone",
        "ok: the tunnel is closed",
        "Done in",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // The printer columns, filled in by the agent's connection.
    let connected_row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("customer-a   customer-a   true"))
        .unwrap_or_else(|| panic!("no CONNECTED row in:\n{stdout}"));
    assert!(connected_row.contains("1/1"), "{connected_row}");
    for token_line in ["token:", "Bearer"] {
        assert!(
            !stdout.contains(token_line),
            "a credential printed:\n{stdout}"
        );
    }
}

/// A demo that must refuse: exit 1 and exactly one line saying why.
fn refused(command: &mut Command) -> String {
    let output = command.output().expect("the demo runs");
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line, not:\n{stderr}");
    stderr
}

#[test]
fn bad_input_gets_one_clear_line() {
    if !kubectl_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: tether.dev/v1alpha1\nkind: ProxiedCluster\nmetadata:\n  name: bad\n  namespace: tenants\nspec:\n  clusterId: Not_A_Label\n",
    )
    .expect("write");
    let line = refused(demo().arg("--example").arg(&broken));
    assert!(
        line.contains("broken.yaml") && line.contains("not a DNS label"),
        "{line}"
    );

    let not_yaml = dir.path().join("not-yaml.yaml");
    std::fs::write(&not_yaml, "kind: [ProxiedCluster\n").expect("write");
    let line = refused(demo().arg("--example").arg(&not_yaml));
    assert!(line.contains("not valid YAML"), "{line}");

    let line = refused(demo().args(["--example", "examples/argocd-application.yaml"]));
    assert!(
        line.contains("holds no ProxiedCluster (found: Application)"),
        "{line}"
    );

    let unreachable = dir.path().join("unreachable.kubeconfig");
    std::fs::write(
        &unreachable,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: gone\n  cluster: {server: 'https://127.0.0.1:1'}\nusers:\n- name: u\n  user: {token: x}\ncontexts:\n- name: gone\n  context: {cluster: gone, user: u}\ncurrent-context: gone\n",
    )
    .expect("write");
    let line = refused(demo().env("KUBECONFIG", &unreachable));
    assert!(
        line.contains("does not answer") && line.contains("unset KUBECONFIG"),
        "{line}"
    );

    let empty_path = tempfile::tempdir().expect("tempdir");
    let line = refused(demo().env("PATH", empty_path.path()));
    assert!(line.contains("kubectl is not on the PATH"), "{line}");
}

#[test]
fn an_interrupted_demo_leaves_nothing_running() {
    if !kubectl_available() {
        return;
    }
    let mut child = demo()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the demo starts");
    // Read everything the demo prints (a closed pipe would fail its
    // printing), and pass the lines on.
    let stdout = child.stdout.take().expect("stdout");
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    // Interrupt once all three of tether's processes run.
    let dir = seen
        .iter()
        .find(|line| line.contains("$ tether-agent"))
        .and_then(|line| {
            line.split(' ')
                .find_map(|word| word.strip_suffix("/agent-credentials"))
                .map(str::to_owned)
        })
        .expect("the demo started tether-agent");
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(interrupted.success());
    let output = child.wait_with_output().expect("the demo ends");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tether-demo: interrupted"), "{stderr}");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(&dir))
        .collect();
    assert!(left.is_empty(), "still running: {left:?}");
    assert!(!Path::new(&dir).exists(), "{dir} left behind");
}
