//! Replays the fuzzers' corpora (`fuzz/corpus/`) through the same drivers
//! the fuzz targets use: every input the fuzzer kept, and every crash it
//! found and we fixed, stays a regression test without fuzzing time in CI.

use tether::harness::{clusters_config, corpus, tunnel_session};

#[tokio::test(start_paused = true)]
async fn tunnel_session_corpus() {
    for (path, input) in corpus("tunnel_session") {
        let run = tokio::spawn(async move { tunnel_session(&input).await });
        if let Err(err) = run.await {
            panic!("{}: {err}", path.display());
        }
    }
}

#[test]
fn clusters_config_corpus() {
    for (path, input) in corpus("clusters_config") {
        if std::panic::catch_unwind(|| clusters_config(&input)).is_err() {
            panic!("{}", path.display());
        }
    }
}
