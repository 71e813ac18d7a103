use clap::Parser;
use tether_operator::settings::Settings;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    tether::logging::init(&settings.log_level);
    tether::install_crypto_provider();
    let client = kube::Client::try_default().await?;
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        tether::wait_for_termination().await;
        on_signal.cancel();
    });
    tether_operator::run(client, settings, stop).await
}
