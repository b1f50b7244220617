//! The leaf of KVM calls that need `unsafe`: adopting the fd that
//! `KVM_CREATE_GUEST_MEMFD` returns, memslot ioctls (the kernel keeps a
//! pointer), the `kvm_run` unions, and the attribute probe.

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};

use kvm_bindings::{kvm_create_guest_memfd, kvm_regs, kvm_userspace_memory_region2};
use kvm_ioctls::{VcpuFd, VmFd};
use rustix::io::Errno;

use super::KvmError;
use super::uapi::{KVM_SET_MEMORY_ATTRIBUTES2, KvmMemoryAttributes2};

/// `KVM_CREATE_GUEST_MEMFD`, adopting the new fd at once.
pub(super) fn create_guest_memfd(vm: &VmFd, size: u64, flags: u64) -> Result<OwnedFd, KvmError> {
    let request = kvm_create_guest_memfd {
        size,
        flags,
        reserved: [0; 6],
    };
    let fd = vm
        .create_guest_memfd(request)
        .map_err(KvmError::ioctl("KVM_CREATE_GUEST_MEMFD"))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `KVM_SET_USER_MEMORY_REGION2`.
///
/// # Safety
///
/// For a non-empty region, `userspace_addr` must stay mapped for as long as
/// the slot exists (KVM keeps the pointer), and `guest_memfd` must be an open
/// guest_memfd of `vm` for as long too.
pub(super) unsafe fn set_memslot(
    vm: &VmFd,
    region: kvm_userspace_memory_region2,
) -> Result<(), Errno> {
    // SAFETY: the caller upholds the lifetime of the mapping and the fd.
    unsafe { vm.set_user_memory_region2(region) }.map_err(|e| Errno::from_raw_os_error(e.errno()))
}

/// The vCPU's general registers in `kvm_run.s.regs`, valid after an exit
/// when `KVM_SYNC_X86_REGS` is in `kvm_valid_regs`.
pub(super) fn sync_regs(vcpu: &mut VcpuFd) -> &mut kvm_regs {
    let run = vcpu.get_kvm_run();
    // `s` is a union of the synced register sets; `Vcpu::new` asks for
    // KVM_SYNC_X86_REGS at every exit. Plain integers: any bits are valid.
    // SAFETY: on x86, `regs` is the active member of `s` when the regs are synced.
    unsafe { &mut run.s.regs.regs }
}

/// `kvm_run.internal.suberror`, after a `KVM_EXIT_INTERNAL_ERROR`.
pub(super) fn internal_suberror(vcpu: &mut VcpuFd) -> u32 {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason said `internal` is the active member; plain integers.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

/// Whether the host's guest_memfd takes `KVM_SET_MEMORY_ATTRIBUTES2`: an
/// empty request is `EINVAL` where the ioctl exists and `ENOTTY` where not.
pub(super) fn has_memory_attributes2(guest_memfd: BorrowedFd<'_>) -> bool {
    let mut request = KvmMemoryAttributes2::default();
    // A size of zero changes nothing.
    // SAFETY: `request` is a writable `kvm_memory_attributes2` of the size the ioctl number encodes.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(
            &guest_memfd,
            KVM_SET_MEMORY_ATTRIBUTES2 as _,
            &mut request,
        )
    };
    ret == 0
        || Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
            != Errno::NOTTY
}
