//! A ProxiedCluster as the API server hands it to the operator (JSON) or a
//! user hands it to `kubectl tether bundle render` (YAML). Driver and
//! invariants: `tether_operator::harness::proxied_cluster`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tether_operator::harness::proxied_cluster(data));
