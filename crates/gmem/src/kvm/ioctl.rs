//! The leaf of KVM calls that need `unsafe`: adopting the fd that
//! `KVM_CREATE_GUEST_MEMFD` returns, the owner of a memslot (the kernel
//! keeps a pointer; guest_memfd and memfd slots alike), the `kvm_run` unions, and `KVM_SET_MEMORY_ATTRIBUTES2`
//! with its probe. The rest of `kvm/` is safe code.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, mpsc};

use std::sync::atomic::{AtomicU8, Ordering};

use kvm_bindings::{
    KVM_CAP_USER_MEMORY2, KVM_MEM_GUEST_MEMFD, kvm_create_guest_memfd, kvm_regs, kvm_run,
    kvm_userspace_memory_region, kvm_userspace_memory_region2,
};
use kvm_ioctls::{VcpuFd, VmFd};
use rustix::io::Errno;

use super::KvmError;
use super::uapi::{KVM_SET_MEMORY_ATTRIBUTES2, KvmMemoryAttributes2};
use crate::sys::MappedRegion;
use crate::{BackingKind, GuestMemfd};

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

/// A range of a gmem file bound to guest-physical memory: the owner of a
/// KVM memslot. A kernel guest_memfd is bound with
/// `KVM_SET_USER_MEMORY_REGION2` and `KVM_MEM_GUEST_MEMFD`; a memfd-backed
/// file without that flag, by `KVM_SET_USER_MEMORY_REGION2` where the host
/// has it and `KVM_SET_USER_MEMORY_REGION` where not.
///
/// KVM keeps of a slot `userspace_addr`, a pointer into gmem's own mapping
/// of the whole file (never changed by conversions), and for a guest_memfd
/// slot the guest_memfd. The region holds the file (so the mapping and the
/// fd) and the VM, and deletes the slot before it lets them go; if the
/// deletion fails, the file is leaked rather than unmapped under the guest.
pub(super) struct BoundRegion {
    vm: Arc<VmFd>,
    mem: Arc<GuestMemfd>,
    slot: u32,
    /// Whether the slot was made with `KVM_SET_USER_MEMORY_REGION2` (and is
    /// deleted with it).
    region2: bool,
    deleted: bool,
}

/// Where a region goes: slot number, flags (without `KVM_MEM_GUEST_MEMFD`),
/// guest-physical address, and the file range.
#[derive(Debug, Clone, Copy)]
pub(super) struct RegionSpec {
    pub(super) slot: u32,
    pub(super) flags: u32,
    pub(super) gpa: u64,
    pub(super) offset: u64,
    pub(super) len: u64,
}

impl BoundRegion {
    /// Binds `spec`'s range of `mem`; `EINVAL` for an empty range or one
    /// not inside the file (what the safety of the pointer rests on), else
    /// what the kernel says.
    pub(super) fn bind(
        vm: &Arc<VmFd>,
        mem: &Arc<GuestMemfd>,
        spec: RegionSpec,
    ) -> Result<BoundRegion, Errno> {
        let kernel = mem.backing_kind() == BackingKind::KernelGuestMemfd;
        Self::bind_with(vm, mem, spec, kernel || has_user_memory2(vm))
    }

    /// [`bind`](Self::bind) with `KVM_SET_USER_MEMORY_REGION2` if `region2`,
    /// else `KVM_SET_USER_MEMORY_REGION` (`EINVAL` for a guest_memfd, which
    /// only 2 can bind).
    fn bind_with(
        vm: &Arc<VmFd>,
        mem: &Arc<GuestMemfd>,
        spec: RegionSpec,
        region2: bool,
    ) -> Result<BoundRegion, Errno> {
        let kernel = mem.backing_kind() == BackingKind::KernelGuestMemfd;
        let inside = spec
            .offset
            .checked_add(spec.len)
            .is_some_and(|end| end <= mem.size());
        if spec.len == 0 || !inside || (kernel && !region2) {
            return Err(Errno::INVAL);
        }
        let mut region = kvm_userspace_memory_region2 {
            slot: spec.slot,
            flags: spec.flags,
            guest_phys_addr: spec.gpa,
            memory_size: spec.len,
            // Inside the direct mapping: the range is inside the file.
            userspace_addr: mem.direct_map_ptr() as u64 + spec.offset,
            ..Default::default()
        };
        if kernel {
            region.flags |= KVM_MEM_GUEST_MEMFD;
            region.guest_memfd_offset = spec.offset;
            region.guest_memfd = mem.as_fd().as_raw_fd() as u32;
        }
        // `userspace_addr..+len` lies in gmem's mapping of the whole file and
        // the fd (if any) is the file's: the region returned holds both
        // (through `mem`) until the slot is deleted, or forever if that fails.
        let made = if region2 {
            // SAFETY: the mapping and the fd outlive the slot (see above).
            unsafe { vm.set_user_memory_region2(region) }
        } else {
            // SAFETY: as above; a memfd slot has no fd for KVM to keep.
            unsafe { vm.set_user_memory_region(region1(&region)) }
        };
        made.map_err(|e| Errno::from_raw_os_error(e.errno()))?;
        Ok(BoundRegion {
            vm: vm.clone(),
            mem: mem.clone(),
            slot: spec.slot,
            region2,
            deleted: false,
        })
    }

    /// Deletes the slot. On failure KVM may still use the mapping: the file
    /// is leaked (never unmapped) and the errno returned.
    pub(super) fn delete(mut self) -> Result<(), Errno> {
        self.delete_slot()
    }

    fn delete_slot(&mut self) -> Result<(), Errno> {
        self.deleted = true;
        let delete = kvm_userspace_memory_region2 {
            slot: self.slot,
            ..Default::default()
        };
        let deleted = if self.region2 {
            // SAFETY: a size of zero deletes the slot; the kernel keeps no pointer.
            unsafe { self.vm.set_user_memory_region2(delete) }
        } else {
            // SAFETY: as above.
            unsafe { self.vm.set_user_memory_region(region1(&delete)) }
        };
        deleted.map_err(|e| {
            std::mem::forget(self.mem.clone());
            Errno::from_raw_os_error(e.errno())
        })
    }
}

impl Drop for BoundRegion {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        if let Err(errno) = self.delete_slot() {
            tracing::error!(slot = self.slot, %errno, "deleting a memslot failed; its memory is leaked");
        }
    }
}

/// Whether the VM takes `KVM_SET_USER_MEMORY_REGION2`.
fn has_user_memory2(vm: &VmFd) -> bool {
    vm.check_extension_raw(KVM_CAP_USER_MEMORY2.into()) > 0
}

/// The `KVM_SET_USER_MEMORY_REGION` form of a region without a guest_memfd.
fn region1(region: &kvm_userspace_memory_region2) -> kvm_userspace_memory_region {
    kvm_userspace_memory_region {
        slot: region.slot,
        flags: region.flags,
        guest_phys_addr: region.guest_phys_addr,
        memory_size: region.memory_size,
        userspace_addr: region.userspace_addr,
    }
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

/// `KVM_SET_MEMORY_ATTRIBUTES2` on a guest_memfd.
pub(super) fn set_memory_attributes2(
    guest_memfd: BorrowedFd<'_>,
    mut request: KvmMemoryAttributes2,
) -> Result<(), Errno> {
    // SAFETY: `request` is a writable `kvm_memory_attributes2` of the size the ioctl number encodes.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(
            &guest_memfd,
            KVM_SET_MEMORY_ATTRIBUTES2 as _,
            &mut request,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    Err(Errno::from_raw_os_error(
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
    ))
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

/// When and how [`run_kicked`] kicks a vCPU out of `KVM_RUN`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Kick {
    /// How long the run may take before the first kick.
    pub(super) after: std::time::Duration,
    /// How often the kick is repeated until the run returns.
    pub(super) every: std::time::Duration,
    /// The signal sent to the running thread (a handler must be installed).
    pub(super) signal: libc::c_int,
}

/// Runs `run(target)` on a scoped thread. If it has not returned after
/// `kick.after`, sets the vCPU's `kvm_run.immediate_exit` (every later
/// `KVM_RUN` returns `EINTR` at once, so a kick landing between two runs is
/// not lost) and signals the thread every `kick.every` until it returns.
/// Always joins; `None` if the thread panicked, or if the `kvm_run` page
/// could not be mapped for the kick (then `run` is not called).
pub(super) fn run_kicked<V: Send, R: Send>(
    target: &mut V,
    vcpu_of: fn(&mut V) -> &mut VcpuFd,
    run: impl FnOnce(&mut V) -> R + Send,
    kick: Kick,
) -> Option<R> {
    let flag = match ImmediateExit::map(vcpu_of(target)) {
        Ok(flag) => flag,
        Err(errno) => {
            tracing::warn!(%errno, "cannot map the vCPU's kvm_run page to kick it; not running");
            return None;
        }
    };
    std::thread::scope(|scope| {
        let (started_tx, started_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let runner = scope.spawn(move || {
            // SAFETY: `pthread_self` has no preconditions.
            let _ = started_tx.send(unsafe { libc::pthread_self() });
            let result = run(target);
            let _ = done_tx.send(());
            result
        });
        let thread = started_rx.recv().ok();
        if let (Some(thread), Err(mpsc::RecvTimeoutError::Timeout)) =
            (thread, done_rx.recv_timeout(kick.after))
        {
            flag.set();
            loop {
                // The thread is not joined before the scope ends, so its id is valid.
                // SAFETY: `thread` names a live or unjoined thread of this process.
                unsafe { libc::pthread_kill(thread, kick.signal) };
                match done_rx.recv_timeout(kick.every) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    // Sent, or the runner panicked (the join reports it).
                    _ => break,
                }
            }
        }
        runner.join().ok()
    })
}

/// The kicking side's own mapping of a vCPU's `kvm_run` page, through which
/// it sets `immediate_exit` while the vCPU's thread holds the `VcpuFd` for
/// `KVM_RUN` (and `kvm-ioctls` makes a `&mut kvm_run` of its own mapping at
/// every exit). A pointer derived from that `&mut` would be invalidated by
/// the next one; this mapping is a separate allocation that no Rust
/// reference ever covers, and it holds the vCPU file, so it stays valid
/// whatever becomes of the `VcpuFd`.
struct ImmediateExit(MappedRegion);

/// `kvm_run.immediate_exit` lies in the first page of the structure.
const IMMEDIATE_EXIT: usize = std::mem::offset_of!(kvm_run, immediate_exit);
const _: () = assert!(IMMEDIATE_EXIT < crate::PAGE_SIZE as usize);

impl ImmediateExit {
    /// Maps the first page of `vcpu`'s `kvm_run` (offset 0 of its fd).
    fn map(vcpu: &VcpuFd) -> Result<ImmediateExit, Errno> {
        // SAFETY: `vcpu` owns the fd and is borrowed for this call; the mapping takes its own reference to the file.
        let fd = unsafe { BorrowedFd::borrow_raw(vcpu.as_raw_fd()) };
        MappedRegion::map_shared(fd, crate::PAGE_SIZE as usize).map(ImmediateExit)
    }

    /// Sets `immediate_exit` to 1.
    fn set(&self) {
        let byte = self.0.as_ptr().wrapping_add(IMMEDIATE_EXIT);
        // No Rust access other than this store reaches the byte through
        // this mapping; the kernel reads it at `KVM_RUN`. `kvm-ioctls`
        // never writes `immediate_exit` in `run`.
        // SAFETY: the byte is inside the page this value maps (asserted above) and lives as long as `self`; a byte is always aligned.
        let flag = unsafe { AtomicU8::from_ptr(byte) };
        // SeqCst: pairs with nothing in Rust; the vCPU thread's next
        // `KVM_RUN` reads it in the kernel, after the signal that follows.
        flag.store(1, Ordering::SeqCst);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;
    use std::os::fd::AsFd;
    use std::time::Duration;

    /// A VM whose one vCPU spins (`jmp $` in real mode at 0x1000) in a
    /// memfd slot; `None`, with the reason printed, where KVM is missing
    /// (a failure instead where `GMEM_REQUIRE_KVM` is set).
    fn spinning_vcpu() -> Option<(VmFd, VcpuFd, MappedRegion)> {
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                let why = format!("KVM unavailable: {e}");
                assert!(std::env::var_os("GMEM_REQUIRE_KVM").is_none(), "{why}");
                eprintln!("skipped: {why}");
                return None;
            }
        };
        let vm = kvm.create_vm().unwrap();
        let file = crate::backing::Backing::memfd(16 * PAGE_SIZE).unwrap();
        let memory = MappedRegion::map_shared(file.as_fd(), 16 * PAGE_SIZE as usize).unwrap();
        memory.write(0x1000, &[0xeb, 0xfe]);
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: 16 * PAGE_SIZE,
            userspace_addr: memory.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `memory` is returned with the VM and outlives its use by the guest.
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        (sregs.cs.base, sregs.cs.selector) = (0, 0);
        vcpu.set_sregs(&sregs).unwrap();
        let regs = kvm_regs {
            rip: 0x1000,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).unwrap();
        Some((vm, vcpu, memory))
    }

    fn itself(vcpu: &mut VcpuFd) -> &mut VcpuFd {
        vcpu
    }

    /// A vCPU that never exits is kicked out of `KVM_RUN` with `EINTR`
    /// (through the kicking side's own mapping of `kvm_run`), and every
    /// later run returns at once.
    #[test]
    fn a_spinning_vcpu_is_kicked_out() {
        let Some((_vm, mut vcpu, _memory)) = spinning_vcpu() else {
            return;
        };
        // Not the probe's signal: unit tests run in parallel.
        let signal = libc::SIGRTMIN() + 8;
        let _handler = KickHandler::install(signal).unwrap();
        let kick = Kick {
            after: Duration::from_millis(50),
            every: Duration::from_millis(10),
            signal,
        };
        let run = |vcpu: &mut VcpuFd| vcpu.run().map(|_| ()).map_err(|e| e.errno());
        let stopped = run_kicked(&mut vcpu, itself, run, kick);
        assert_eq!(stopped, Some(Err(libc::EINTR)));
        assert_eq!(vcpu.get_kvm_run().immediate_exit, 1);
        assert_eq!(run(&mut vcpu), Err(libc::EINTR), "immediate_exit stays set");
    }

    /// Both ways of binding a memfd slot (`KVM_SET_USER_MEMORY_REGION` for
    /// hosts without 2) make a slot in KVM, and the deletion frees it: KVM
    /// refuses to move an existing slot to another host address (`EINVAL`),
    /// so each new file binds only once the last one's slot is gone.
    #[test]
    fn a_memfd_slot_binds_with_either_ioctl_and_is_deleted() {
        let Some((vm, _vcpu, _memory)) = spinning_vcpu() else {
            return;
        };
        let vm = Arc::new(vm);
        let file = || {
            let flags = crate::Flags::MMAP | crate::Flags::INIT_SHARED;
            Arc::new(GuestMemfd::new(16 * PAGE_SIZE, flags).unwrap())
        };
        let spec = RegionSpec {
            slot: 1,
            flags: 0,
            gpa: 1 << 20,
            offset: 0,
            len: 16 * PAGE_SIZE,
        };
        for region2 in [false, true, false] {
            let bound = BoundRegion::bind_with(&vm, &file(), spec, region2).unwrap();
            assert_eq!(bound.region2, region2);
            let moved = BoundRegion::bind_with(&vm, &file(), spec, region2);
            assert_eq!(moved.err(), Some(Errno::INVAL), "the slot exists in KVM");
            bound.delete().unwrap();
        }
    }
}
