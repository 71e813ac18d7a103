//! tether's dataplane: the tunnel protocol, its stream multiplexer,
//! tether-server (management side) and tether-agent (customer side).

pub mod agent;
pub mod clusters;
pub mod credentials;
pub mod fake_apiserver;
pub mod forward;
#[doc(hidden)]
pub mod harness;
pub mod http;
pub mod listen;
pub mod logging;
pub mod metrics_port;
pub mod mux;
pub mod pki;
pub mod pool;
pub mod protocol;
pub mod server;
#[cfg(test)]
mod test_support;
pub mod tls;
pub mod websocket;

/// Installs ring as rustls's process-wide crypto provider. Every binary calls
/// this first: rustls refuses to pick one itself when it cannot tell which.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The binaries' tokio runtime: `worker_threads` threads, or one per CPU
/// the process may use.
pub fn runtime(
    worker_threads: Option<std::num::NonZeroUsize>,
) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = worker_threads {
        builder.worker_threads(threads.get());
    }
    let runtime = builder.enable_all().build()?;
    tracing::info!(
        worker_threads = runtime.metrics().num_workers(),
        "runtime started"
    );
    Ok(runtime)
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
pub async fn wait_for_termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
