//! KVM test helpers: whether KVM tests may run here, and small guests.

use gmem::kvm::HostSupport;

/// The host's support, or `None` with the reason printed when the KVM tests
/// must skip. Panics instead of skipping where `GMEM_REQUIRE_KVM` is set
/// (CI on a host with `/dev/kvm`).
pub fn host() -> Option<HostSupport> {
    let why = match HostSupport::probe() {
        Ok(support) if support.guest_memfd && support.guest_memfd_flags & 3 == 3 => {
            return Some(support);
        }
        Ok(support) => format!("the host's guest_memfd lacks MMAP | INIT_SHARED ({support:?})"),
        Err(e) => format!("KVM unavailable: {e}"),
    };
    assert!(
        std::env::var_os("GMEM_REQUIRE_KVM").is_none(),
        "KVM test would skip on a KVM host: {why}"
    );
    eprintln!("skipped: {why}");
    None
}
