//! Helpers shared by the integration tests.
#![allow(dead_code)] // Each test binary uses a different subset.

use gmem::ProbeOutcome;

/// Whether a raw read of the byte at `offset` of `mapping` completes in a
/// child process (false: it died of `SIGBUS`).
pub fn reads_ok(mapping: &gmem::HostMapping, offset: u64) -> bool {
    match mapping.probe(offset, false).expect("probe") {
        ProbeOutcome::Completed => true,
        ProbeOutcome::Signal(libc::SIGBUS) => false,
        other => panic!("unexpected end of the child: {other:?}"),
    }
}
