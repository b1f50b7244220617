//! Helpers shared by the integration tests.
#![allow(dead_code)] // Each test binary uses a different subset.

use gmem::{Hiding, HostMapping, ProbeOutcome};

/// The signal a raw access to a private page of `mapping` raises, in a run
/// shorter than 2 MiB (guard-marker mappings remap longer runs: `SIGBUS`).
pub fn private_fault(mapping: &HostMapping) -> i32 {
    match mapping.hiding() {
        Hiding::GuardMarkers => libc::SIGSEGV,
        Hiding::EmptyFileRemap => libc::SIGBUS,
    }
}

/// The signal a raw read of the byte at `offset` of `mapping` raises in a
/// child process, or `None` if the read completes.
pub fn read_fault(mapping: &HostMapping, offset: u64) -> Option<i32> {
    match mapping.probe(offset, false).expect("probe") {
        ProbeOutcome::Completed => None,
        ProbeOutcome::Signal(signal) => Some(signal),
    }
}

/// Whether a raw read of the byte at `offset` of `mapping` completes in a
/// child process (false: it died of the fault of a private page, or of
/// `SIGBUS` past the end of the file).
pub fn reads_ok(mapping: &HostMapping, offset: u64) -> bool {
    match read_fault(mapping, offset) {
        None => true,
        Some(signal) if signal == libc::SIGBUS || signal == private_fault(mapping) => false,
        Some(other) => panic!("unexpected signal {other} at {offset:#x}"),
    }
}
