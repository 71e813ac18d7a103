//! A hostile peer's frames against one tunnel session (server or agent
//! side, v1 or v2). Driver and invariants: `tether::harness::tunnel_session`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A paused clock: keepalive and open timeouts elapse without wall time.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("tokio runtime");
    runtime.block_on(tether::harness::tunnel_session(data));
});
