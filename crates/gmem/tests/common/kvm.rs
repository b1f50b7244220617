//! KVM test helpers: whether KVM tests may run here.
//!
//! Two tiers: tests that run guests or bind memslots need KVM only (on a
//! host without guest_memfd they run on memfd slots, [`host`]); tests of the
//! kernel guest_memfd itself (adoption, kernel flags) need one
//! ([`guest_memfd_host`]).

#![allow(dead_code)] // Each test binary uses part of it.

use gmem::BackingKind;
use gmem::conformance::{self, NO_GUEST_MEMFD};
use gmem::kvm::HostSupport;

/// The host's support, or `None` with the reason printed when KVM tests
/// must skip (no usable `/dev/kvm`). Panics instead of skipping where
/// `GMEM_REQUIRE_KVM` is set (CI on a host with `/dev/kvm`).
pub fn host() -> Option<HostSupport> {
    match conformance::kvm_support() {
        Ok(support) => Some(support),
        Err(why) => skip(&why),
    }
}

/// The host's support where it has a kernel guest_memfd with `MMAP |
/// INIT_SHARED`, or `None` with the reason printed. Without one the test
/// skips even where `GMEM_REQUIRE_KVM` is set; `GMEM_REQUIRE_GUEST_MEMFD`
/// (CI on a host with guest_memfd) turns that skip into a failure.
pub fn guest_memfd_host() -> Option<HostSupport> {
    let support = host()?;
    if support.memory_backing() == BackingKind::KernelGuestMemfd {
        return Some(support);
    }
    let why = format!(
        "{NO_GUEST_MEMFD} (guest_memfd: {}, flags: {:#x}): this test is about the kernel guest_memfd",
        support.guest_memfd, support.guest_memfd_flags
    );
    skip(&why)
}

/// Prints why the test skips, or panics where an environment variable
/// forbids the skip.
fn skip(why: &str) -> Option<HostSupport> {
    if let Some(variable) = conformance::skip_forbidden_by(why) {
        panic!("KVM test would skip with {variable} set: {why}");
    }
    eprintln!("skipped: {why}");
    None
}
