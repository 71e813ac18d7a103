use clap::Parser;
use tether::agent::{Agent, AgentArgs};

fn main() -> anyhow::Result<()> {
    let args = AgentArgs::parse();
    tether::logging::init(&args.log_level);
    tether::install_crypto_provider();
    tether::runtime(Some(args.worker_threads))?.block_on(async {
        let agent = Agent::start(args).await?;
        tether::wait_for_termination().await;
        agent.shutdown().await;
        Ok(())
    })
}
