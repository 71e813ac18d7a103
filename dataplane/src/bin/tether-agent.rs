use clap::Parser;
use tether::agent::{Agent, AgentArgs};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = AgentArgs::parse();
    tether::logging::init(&args.log_level);
    tether::install_crypto_provider();
    let agent = Agent::start(args).await?;
    tether::wait_for_termination().await;
    agent.shutdown().await;
    Ok(())
}
