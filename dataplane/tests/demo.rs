//! The README's demo command keeps working: run the demo binary itself.

mod support;

#[test]
fn demo_runs_end_to_end() {
    if !support::kubectl_available() {
        return;
    }
    // The double, whatever the environment: KUBECONFIG would switch to a real cluster.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tether-demo"))
        .env_remove("KUBECONFIG")
        .output()
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("v1.33.0-tether-fake"), "{stdout}");
    assert!(stdout.contains("kube-system"), "{stdout}");
    assert!(
        stdout.contains("a management-side token reached the API server: false"),
        "{stdout}"
    );
}
