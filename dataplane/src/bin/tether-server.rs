use clap::Parser;
use tether::server::{RunningServer, ServerArgs};

fn main() -> anyhow::Result<()> {
    let args = ServerArgs::parse();
    tether::logging::init(&args.log_level);
    tether::install_crypto_provider();
    tether::runtime(args.worker_threads)?.block_on(async {
        let server = RunningServer::start(args).await?;
        tether::wait_for_termination().await;
        server.shutdown().await;
        Ok(())
    })
}
