//! What the host's KVM offers, probed.

use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kvm_bindings::{
    KVM_CAP_EXIT_HYPERCALL, KVM_CAP_GUEST_MEMFD, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_USER_MEMORY2,
    KVM_CAP_VM_TYPES,
};
use vmm_sys_util::signal::SIGRTMIN;

use super::uapi::{KVM_CAP_GUEST_MEMFD_FLAGS, KVM_HC_MAP_GPA_RANGE};
use super::{AttributeSyncMode, GuestIo, KvmError, MemslotFlags, Vcpu, VcpuStop, Vm, ioctl};
use crate::{BackingKind, Flags, Options, PAGE_SIZE};

/// What the host supports, for `gmem info` and for choosing paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSupport {
    /// `KVM_GET_API_VERSION`.
    pub api_version: i32,
    /// `KVM_CAP_GUEST_MEMFD`.
    pub guest_memfd: bool,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS`: the guest_memfd flags the host takes.
    pub guest_memfd_flags: u64,
    /// `KVM_CAP_MEMORY_ATTRIBUTES`: VM-wide attributes the host takes.
    pub memory_attributes: u64,
    /// `KVM_CAP_VM_TYPES`: a mask of the VM types.
    pub vm_types: u64,
    /// `KVM_CAP_USER_MEMORY2`.
    pub user_memory2: bool,
    /// `KVM_CAP_EXIT_HYPERCALL`: hypercalls that may exit to userspace.
    pub exit_hypercall: u64,
    /// Whether the guest_memfd takes per-page attributes in place
    /// (`KVM_SET_MEMORY_ATTRIBUTES2`), found by probing the ioctl.
    pub per_page_attributes: bool,
    /// Whether a guest's `vmcall` of `KVM_HC_MAP_GPA_RANGE` really reaches
    /// userspace, found by running one under a timeout.
    pub hypercall_exit_delivered: bool,
    /// `KVM_CAP_NR_VCPUS`: the recommended vCPU count.
    pub recommended_vcpus: usize,
}

impl HostSupport {
    /// Probes the host, once a process (later calls return the first
    /// result).
    ///
    /// Where the host offers `KVM_HC_MAP_GPA_RANGE` exits, the probe runs a
    /// one-vCPU guest on a thread of its own for at most a few hundred
    /// milliseconds. **Signals:** while that guest runs, a no-op handler for
    /// the real-time signal [`kick_signal`](Self::kick_signal) (`SIGRTMIN + 7`) is installed
    /// process-wide, so that a vCPU stuck in `KVM_RUN` can be kicked out;
    /// the previous disposition is restored before `probe` returns. Do not
    /// use that signal elsewhere during the first call. The probe's thread
    /// is always joined: a stuck vCPU gets `kvm_run.immediate_exit` and the
    /// signal again every 10 ms until it has left `KVM_RUN`.
    pub fn probe() -> Result<HostSupport, KvmError> {
        static PROBED: OnceLock<Result<HostSupport, KvmError>> = OnceLock::new();
        PROBED.get_or_init(Self::probe_now).clone()
    }

    fn probe_now() -> Result<HostSupport, KvmError> {
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| KvmError::Open {
            errno: rustix::io::Errno::from_raw_os_error(e.errno()),
        })?;
        let fd = kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
        let vm = Vm::from_vm_fd(Arc::new(fd))?;
        let fd = vm.vm_fd();
        let cap = |c: u32| fd.check_extension_raw(c.into()).max(0) as u64;
        let mut support = HostSupport {
            api_version: kvm.get_api_version(),
            guest_memfd: cap(KVM_CAP_GUEST_MEMFD) != 0,
            guest_memfd_flags: cap(KVM_CAP_GUEST_MEMFD_FLAGS),
            memory_attributes: cap(KVM_CAP_MEMORY_ATTRIBUTES),
            vm_types: cap(KVM_CAP_VM_TYPES),
            user_memory2: cap(KVM_CAP_USER_MEMORY2) != 0,
            exit_hypercall: cap(KVM_CAP_EXIT_HYPERCALL),
            per_page_attributes: false,
            hypercall_exit_delivered: false,
            recommended_vcpus: kvm.get_nr_vcpus(),
        };
        // Kernel guest_memfd where the host has one, else a memfd slot.
        let mem = vm
            .create_memory(
                16 * PAGE_SIZE,
                Flags::MMAP | Flags::INIT_SHARED,
                Options::default(),
            )
            .map_err(|e| KvmError::Ioctl {
                call: "creating the probe's guest memory",
                errno: rustix::io::Errno::from_raw_os_error(e.errno()),
            })?;
        if mem.backing_kind() == BackingKind::KernelGuestMemfd {
            support.per_page_attributes = ioctl::has_memory_attributes2(mem.as_fd());
        }
        if support.exit_hypercall & (1 << KVM_HC_MAP_GPA_RANGE) != 0 {
            support.hypercall_exit_delivered = probe_hypercall(&vm, Arc::new(mem))?;
        }
        Ok(support)
    }
}

impl HostSupport {
    /// What [`Vm::create_memory`] backs guest memory with on this host: a
    /// kernel guest_memfd where it has one with `MMAP | INIT_SHARED`, else
    /// a memfd-backed file bound as a memfd slot ([`Vm::bind`]).
    pub fn memory_backing(&self) -> BackingKind {
        let needed = (Flags::MMAP | Flags::INIT_SHARED).bits();
        if self.guest_memfd && self.guest_memfd_flags & needed == needed {
            BackingKind::KernelGuestMemfd
        } else {
            BackingKind::Memfd
        }
    }

    /// How conversions keep KVM's own memory attributes in step on this
    /// host: in place on the guest_memfd where it takes
    /// `KVM_SET_MEMORY_ATTRIBUTES2`, else per VM where
    /// `KVM_CAP_MEMORY_ATTRIBUTES` has `KVM_MEMORY_ATTRIBUTE_PRIVATE`, else
    /// not at all (gmem's attribute map alone).
    pub fn attribute_sync(&self) -> AttributeSyncMode {
        AttributeSyncMode::choose(self.memory_attributes, self.per_page_attributes)
    }
}

/// 32-bit code: `mov eax, 12; mov ebx, 0x2000; mov ecx, 1; mov esi, 0;
/// vmcall; hlt` — ask for page 2 to become shared.
const VMCALL_PROBE: [u8; 24] = [
    0xb8, 0x0c, 0, 0, 0, 0xbb, 0x00, 0x20, 0, 0, 0xb9, 0x01, 0, 0, 0, 0xbe, 0, 0, 0, 0, 0x0f, 0x01,
    0xc1, 0xf4,
];
/// How long the probe's guest may take before it is kicked out.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// How often a kicked vCPU is signalled again until it leaves `KVM_RUN`.
const KICK_INTERVAL: Duration = Duration::from_millis(10);

impl HostSupport {
    /// The real-time signal that kicks the probe's vCPU out of `KVM_RUN`
    /// (`SIGRTMIN + 7`); see [`probe`](Self::probe).
    pub fn kick_signal() -> i32 {
        SIGRTMIN() + 7
    }
}

/// Runs a `vmcall` guest on a thread; kicks it out if it has not exited in
/// time (seen here: `vmcall` can hang `KVM_RUN`), and always joins it.
/// Where the host delivers the exit, the request is served by
/// [`GpaMap::handle_exit`](super::GpaMap::handle_exit) in `Vcpu::run`.
fn probe_hypercall(vm: &Vm, mem: Arc<crate::GuestMemfd>) -> Result<bool, KvmError> {
    struct Quiet;
    impl GuestIo for Quiet {
        fn io_out(&mut self, _: u64, _: u16, _: &[u8], _: &super::ExitRegs) -> ControlFlow<()> {
            ControlFlow::Break(())
        }
    }
    let map = mem.mmap().map_err(|_| KvmError::Unsupported {
        what: "mmap of the probe's guest memory",
    })?;
    map.write(0x1000, &VMCALL_PROBE)
        .map_err(|_| KvmError::Unsupported {
            what: "writing the probe guest",
        })?;
    let _slot = vm
        .bind(0, 0, &mem, 0, mem.size(), MemslotFlags::empty())
        .map_err(|e| KvmError::Ioctl {
            call: "KVM_SET_USER_MEMORY_REGION(2)",
            errno: rustix::io::Errno::from_raw_os_error(e.errno()),
        })?;
    let mut vcpu: Vcpu = vm.create_vcpu(0)?;
    vcpu.enter_protected_mode(0x1000, 0x8000)?;
    // Without a handler the kick would kill the process: then no probe.
    let Ok(_handler) = ioctl::KickHandler::install(HostSupport::kick_signal()) else {
        tracing::warn!("cannot install the vCPU kick handler; not probing hypercall exits");
        return Ok(false);
    };
    let kick = ioctl::Kick {
        after: PROBE_TIMEOUT,
        every: KICK_INTERVAL,
        signal: HostSupport::kick_signal(),
    };
    // Joined before the handler is restored: no kick can be pending after.
    let stop = ioctl::run_kicked(&mut vcpu, Vcpu::fd, |vcpu| vcpu.run(&mut Quiet), kick).ok_or(
        KvmError::Unsupported {
            what: "the hypercall probe",
        },
    )?;
    // The request converted page 2 to shared (it already was) and the guest
    // halted: the hypercall reached userspace and came back.
    Ok(matches!(stop, Ok(VcpuStop::Halted)) && vm.conversion_totals().requests == 1)
}
