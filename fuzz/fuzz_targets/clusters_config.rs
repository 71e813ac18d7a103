//! tether-server's clusters configuration. Driver and invariants:
//! `tether::harness::clusters_config`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tether::harness::clusters_config(data));
