//! How the demo runs things and shows them: kubectl as a user types it,
//! tether's processes with their logs, and waiting for a condition.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Starts a step. Also where Ctrl-C is noticed: most of a step is kubectl
/// run to completion, so the demo yields here to let its signal handler in.
pub async fn step(number: usize, text: &str) {
    tokio::task::yield_now().await;
    println!("\n==> {number}. {text}");
}

pub fn say(text: &str) {
    println!("    {text}");
}

/// A check the demo makes; the test of the demo looks for these lines.
pub fn verdict(text: &str) {
    println!("    ok: {text}");
}

/// kubectl with one kubeconfig, shown as the user would type it.
#[derive(Debug, Clone)]
pub struct Kubectl {
    /// `None`: whatever `$KUBECONFIG` says.
    pub kubeconfig: Option<PathBuf>,
    /// How the command line shows the kubeconfig (`--kubeconfig argocd.kubeconfig`), if at all.
    pub shown_as: Option<String>,
    /// Extra directory searched first for plugins (`kubectl tether`).
    pub plugin_dir: Option<PathBuf>,
}

impl Kubectl {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("kubectl");
        command.args(args).stdin(Stdio::null());
        if let Some(kubeconfig) = &self.kubeconfig {
            command.env("KUBECONFIG", kubeconfig);
        }
        if let Some(dir) = &self.plugin_dir {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let mut dirs = vec![dir.clone()];
            dirs.extend(std::env::split_paths(&path));
            if let Ok(joined) = std::env::join_paths(dirs) {
                command.env("PATH", joined);
            }
        }
        command
    }

    /// Runs quietly; the error carries kubectl's message.
    pub fn output(&self, args: &[&str]) -> Result<String> {
        let output = self
            .command(args)
            .output()
            .context("running kubectl (is it installed?)")?;
        if !output.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs, printing the command line and what kubectl printed.
    pub fn show(&self, args: &[&str]) -> Result<String> {
        let shown = self
            .shown_as
            .iter()
            .flat_map(|shown| shown.split(' '))
            .chain(args.iter().copied())
            .map(|arg| {
                if arg.contains([' ', '{', '"']) {
                    format!("'{arg}'")
                } else {
                    arg.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        println!("    $ kubectl {shown}");
        let output = self.output(args)?;
        for line in output.lines() {
            println!("      {line}");
        }
        Ok(output)
    }

    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        let text = self.output(&args)?;
        serde_json::from_str(&text).with_context(|| format!("kubectl {}: not JSON", args.join(" ")))
    }
}

/// tether's processes, stopped when the demo ends however it ends.
#[derive(Default)]
pub struct Processes(Vec<(String, Child, PathBuf)>);

impl Processes {
    /// Starts `binary` (next to this one) with its output in `log`.
    pub fn spawn(
        &mut self,
        binary: &str,
        args: &[String],
        env: &[(&str, &Path)],
        log: PathBuf,
    ) -> Result<()> {
        let path = sibling_binary(binary)?;
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(&path);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        say(&format!("$ {binary} {}", args.join(" ")));
        self.0.push((binary.to_owned(), child, log));
        Ok(())
    }

    /// Fails when a process has exited: a demo step must not wait for it.
    pub fn check_running(&mut self) -> Result<()> {
        for (name, child, log) in &mut self.0 {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{name} exited ({status}); its log: {}", log.display());
            }
        }
        Ok(())
    }

    /// The last lines of each log, for a demo that failed.
    pub fn print_log_tails(&self) {
        for (name, _, log) in &self.0 {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- last lines of {name}'s log ---");
            for line in &lines[lines.len().saturating_sub(15)..] {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating tether-demo")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found next to tether-demo: build every binary first (cargo build --workspace --bins, or make demo)",
            path.display()
        );
    }
    Ok(path)
}

/// Distinct free loopback ports, all held while chosen (ports picked one
/// by one can repeat).
pub fn free_ports<const N: usize>() -> Result<[SocketAddr; N]> {
    let held = (0..N)
        .map(|_| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut addrs = [SocketAddr::from((Ipv4Addr::LOCALHOST, 0)); N];
    for (addr, listener) in addrs.iter_mut().zip(&held) {
        *addr = listener.local_addr()?;
    }
    Ok(addrs)
}

pub fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Polls `check` until it gives a value, checking that tether's processes
/// still run; fails after `timeout` naming what it waited for.
pub async fn eventually<T, F, Fut>(
    processes: &mut Processes,
    timeout: Duration,
    what: &str,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        tokio::task::yield_now().await;
        if let Some(value) = check().await {
            return Ok(value);
        }
        processes.check_running()?;
        if started.elapsed() > timeout {
            bail!("waited {timeout:?} for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
