//! Replays the `proxied_cluster` fuzzer's corpus (`fuzz/corpus/`) through
//! the driver the fuzz target uses: every kept input, and every crash found
//! and fixed, stays a regression test without fuzzing time in CI.

use tether::harness::corpus;
use tether_operator::harness::proxied_cluster;

#[test]
fn proxied_cluster_corpus() {
    for (path, input) in corpus("proxied_cluster") {
        if std::panic::catch_unwind(|| proxied_cluster(&input)).is_err() {
            panic!("{}", path.display());
        }
    }
}
