//! The tunnel through a corporate HTTP proxy: Debian's squid on loopback,
//! between tether-agent and tether-server, beside the same tunnel without
//! it. squid resolves tether-server's test name from its own hosts file.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::rig::{self, PROXIED_SERVER_NAME, Rig};
use crate::{Row, download, latency, mib_s, us};

/// squid on 127.0.0.1, allowing CONNECT from loopback; killed on drop.
struct Squid {
    _dir: tempfile::TempDir,
    child: Child,
    url: String,
}

impl Squid {
    fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // squid may drop to its own user: its files must be reachable.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )?;
        let [port] = rig::free_ports::<1>()?;
        let path = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(path("hosts"), format!("127.0.0.1 {PROXIED_SERVER_NAME}\n"))?;
        std::fs::write(
            path("squid.conf"),
            format!(
                "http_port 127.0.0.1:{port}\n\
                 pid_filename {pid}\n\
                 cache_log {log}\n\
                 access_log none\n\
                 hosts_file {hosts}\n\
                 cache deny all\n\
                 http_access allow localhost\n\
                 http_access deny all\n\
                 shutdown_lifetime 0 seconds\n",
                pid = path("squid.pid"),
                log = path("cache.log"),
                hosts = path("hosts"),
            ),
        )?;
        let child = Command::new("squid")
            .args(["-N", "-f"])
            .arg(path("squid.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("squid")?;
        let cache_log = path("cache.log");
        let squid = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "squid did not start: {}",
                std::fs::read_to_string(Path::new(&cache_log)).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(squid)
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn squid_installed() -> bool {
    Command::new("squid")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A large GET and small-request latency through the wss+mTLS tunnel,
/// without and with squid between agent and server. "Direct" here is the
/// tunnel without the proxy.
pub async fn rows(rows: &mut Vec<Row>, quick: bool) -> Result<()> {
    if !squid_installed() {
        rows.push(Row {
            name: "tunnel through squid".into(),
            direct: "-".into(),
            tunnel: "-".into(),
            ratio: "skipped: squid is not installed".into(),
            target: "-".into(),
        });
        return Ok(());
    }
    let squid = Squid::start()?;
    let size: u64 = if quick { 16 << 20 } else { 256 << 20 };
    let (single, warm) = if quick { (200, 20) } else { (3000, 100) };
    let plain = Rig::start(true).await?;
    let proxied = Rig::start_with(true, Some(&squid.url)).await?;
    let mut measured = Vec::new();
    for rig in [&plain, &proxied] {
        let url = |path: &str| format!("{}/tunnel/dev{path}", rig.internal_url());
        download(&rig.client, &url("/bytes?n=1048576"), &[]).await?;
        let (bytes, time, _) =
            download(&rig.client, &url(&format!("/bytes?n={size}")), &[]).await?;
        anyhow::ensure!(bytes == size, "short download");
        latency(&rig.client, &url("/bytes?n=1024"), &[], 1, warm).await?;
        let (p50, p99, _) = latency(&rig.client, &url("/bytes?n=1024"), &[], 1, single).await?;
        measured.push((mib_s(size, time), p50, p99));
    }
    let [(rate_d, d50, d99), (rate_p, p50, p99)] = measured[..] else {
        anyhow::bail!("two measurements expected");
    };
    rows.push(Row {
        name: format!(
            "GET {} MiB, tunnel without / with squid (wss+mTLS)",
            size >> 20
        ),
        direct: format!("{rate_d:.0} MiB/s"),
        tunnel: format!("{rate_p:.0} MiB/s"),
        ratio: format!("{:.2}× throughput", rate_p / rate_d),
        target: "the proxy's copy cost only".into(),
    });
    rows.push(Row {
        name: "GET 1 KiB c=1, tunnel without / with squid (p50 / p99)".into(),
        direct: format!("{} / {}", us(d50), us(d99)),
        tunnel: format!("{} / {}", us(p50), us(p99)),
        ratio: format!("+{} p50", us(p50.saturating_sub(d50))),
        target: "-".into(),
    });
    plain.stop().await;
    proxied.stop().await;
    Ok(())
}
