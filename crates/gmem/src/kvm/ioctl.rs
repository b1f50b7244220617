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

/// `kvm_run.immediate_exit` of a vCPU, to be set from another thread: once
/// set, every `KVM_RUN` of the vCPU returns `EINTR` at once, and a signal
/// ends a `KVM_RUN` in progress.
pub(super) struct ImmediateExit(std::ptr::NonNull<u8>);

// The pointer is only used for atomic stores to a byte of the shared
// `kvm_run` mapping.
// SAFETY: any thread may make those stores.
unsafe impl Send for ImmediateExit {}

impl ImmediateExit {
    /// The flag of `vcpu`. The value must not outlive the vCPU: `kvm_run` is
    /// unmapped when its `VcpuFd` is dropped.
    pub(super) fn of(vcpu: &mut VcpuFd) -> ImmediateExit {
        ImmediateExit(std::ptr::NonNull::from(
            &mut vcpu.get_kvm_run().immediate_exit,
        ))
    }

    /// Sets the flag.
    ///
    /// # Safety
    ///
    /// The vCPU this came from is still alive (its `kvm_run` still mapped).
    pub(super) unsafe fn set(&self) {
        // The vCPU's thread makes no non-atomic access to the byte: only the
        // kernel reads it, at `KVM_RUN`.
        // SAFETY: the caller keeps the mapping alive; a byte is always aligned.
        let flag = unsafe { std::sync::atomic::AtomicU8::from_ptr(self.0.as_ptr()) };
        flag.store(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A no-op handler for `signal`, installed process-wide while this value
/// lives, so that the signal interrupts `KVM_RUN` without killing the
/// process; the previous disposition comes back when it is dropped.
pub(super) struct KickHandler {
    signal: libc::c_int,
    previous: libc::sigaction,
}

impl KickHandler {
    /// Installs the handler; the errno of `sigaction` if it fails.
    pub(super) fn install(signal: libc::c_int) -> Result<KickHandler, Errno> {
        extern "C" fn ignore(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        // SAFETY: `sigaction` is plain old data: all zeroes is a valid value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = ignore as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `sa_mask` is a valid `sigset_t` to initialise.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: as above.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid `sigaction`s; the handler is async-signal-safe (it does nothing).
        if unsafe { libc::sigaction(signal, &action, &mut previous) } != 0 {
            return Err(Errno::from_raw_os_error(
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            ));
        }
        Ok(KickHandler { signal, previous })
    }
}

impl Drop for KickHandler {
    fn drop(&mut self) {
        // SAFETY: `previous` is the disposition `sigaction` returned for this signal.
        if unsafe { libc::sigaction(self.signal, &self.previous, std::ptr::null_mut()) } != 0 {
            tracing::error!(
                signal = self.signal,
                "restoring the previous handler of the vCPU kick signal failed"
            );
        }
    }
}
