//! `kubectl tether ...`: kubectl runs `kubectl-tether` found on the PATH.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tether::install_crypto_provider();
    tether_operator::cli::run(tether_operator::cli::Cli::parse()).await
}
