//! KVM test helpers: whether KVM tests may run here, and small guests.

use std::sync::Arc;

use gmem::kvm::{HostSupport, Vm};

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

/// A VM with one guest_memfd of `size` bytes bound at guest address 0.
pub struct TestVm {
    pub vm: Vm,
    pub mem: Arc<gmem::GuestMemfd>,
    pub slot: gmem::kvm::Memslot,
}

pub fn test_vm(size: u64, flags: gmem::Flags) -> TestVm {
    let vm = Vm::new().expect("VM");
    let mem = Arc::new(vm.create_guest_memfd(size, flags).expect("guest_memfd"));
    let slot = vm.bind(0, 0, &mem, 0, size).expect("memslot");
    TestVm { vm, mem, slot }
}
