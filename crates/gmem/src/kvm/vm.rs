//! The VM: a `kvm-ioctls` `VmFd` (made here or adopted), its guest_memfd
//! files, memslots and vCPUs, and the front of its [`GpaMap`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{KVM_CAP_EXIT_HYPERCALL, KVM_CAP_MEMORY_ATTRIBUTES, kvm_enable_cap};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use rustix::io::Errno;

use super::attributes::{AttributeSync, AttributeSyncMode};
use super::exit::ConversionExit;
use super::gpa_map::{ConversionOutcome, ConversionPolicy, ConversionTotals, GpaMap, LetGo};
use super::ioctl::RegionSpec;
use super::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_HC_MAP_GPA_RANGE,
};
use super::{KernelFlags, KvmError, Memslot, MemslotError, MemslotFlags, Vcpu, ioctl};
use crate::backing::{Backing, BackingKind};
use crate::{Attribute, Error, Flags, GuestMemfd, Options};

/// Shared by the VM handle and its memslots (vCPUs hold the map only).
pub(super) struct VmShared {
    pub(super) fd: Arc<VmFd>,
    id: u64,
    map: Arc<GpaMap>,
    /// Whether `KVM_HC_MAP_GPA_RANGE` exits to userspace.
    hypercall_exits: bool,
}

/// A KVM VM whose memory is gmem files.
#[derive(Clone)]
pub struct Vm {
    pub(super) shared: Arc<VmShared>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Opens `/dev/kvm` and creates a VM of the default type; then as
    /// [`from_vm_fd`](Self::from_vm_fd).
    pub fn new() -> Result<Vm, KvmError> {
        let kvm = Kvm::new().map_err(|e| KvmError::Open {
            errno: Errno::from_raw_os_error(e.errno()),
        })?;
        let fd = kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
        Vm::from_vm_fd(Arc::new(fd))
    }

    /// Adopts a VM the VMM made with `kvm-ioctls` (any VM type); the VMM
    /// keeps its own handle for what gmem does not cover (irqchip, irqfd,
    /// ioeventfd, other memslots).
    ///
    /// Where the host can deliver `KVM_HC_MAP_GPA_RANGE` to userspace,
    /// enables that exit (`KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)`; it is the
    /// only hypercall that capability covers, so nothing the VMM enabled is
    /// lost). If enabling fails (say the kernel refuses once vCPUs exist)
    /// the VM is still adopted; [`hypercall_exits`](Self::hypercall_exits)
    /// says whether the exit is on. Probes which of KVM's memory attribute
    /// interfaces conversions keep in step ([`attribute_sync`](Self::attribute_sync)).
    pub fn from_vm_fd(fd: Arc<VmFd>) -> Result<Vm, KvmError> {
        let hypercall_exits = enable_hypercall_exits(&fd);
        let vm_attributes = fd
            .check_extension_raw(KVM_CAP_MEMORY_ATTRIBUTES.into())
            .max(0) as u64;
        let in_place = in_place_attributes(&fd);
        let sync = match AttributeSyncMode::choose(vm_attributes, in_place) {
            AttributeSyncMode::GmemOnly => AttributeSync::GmemOnly,
            AttributeSyncMode::VmAttributes => AttributeSync::VmAttributes(fd.clone()),
            AttributeSyncMode::InPlaceAttributes => AttributeSync::InPlaceAttributes,
        };
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(Vm {
            shared: Arc::new(VmShared {
                fd,
                // Relaxed: a unique number is all that is needed.
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                map: Arc::new(GpaMap::new(sync)),
                hypercall_exits,
            }),
        })
    }

    /// The `kvm-ioctls` VM, for what gmem does not cover. Memslots made
    /// with it directly are not in gmem's [`GpaMap`].
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.shared.fd
    }

    /// Whether gmem enabled the guest's `KVM_HC_MAP_GPA_RANGE` exits to
    /// userspace (else KVM returns `-KVM_ENOSYS` to the guest, unless the
    /// VMM enabled them itself; gmem's guests then use the port-I/O
    /// request). Where the host offers the exit, enabling it succeeds.
    pub fn hypercall_exits(&self) -> bool {
        self.shared.hypercall_exits
    }

    /// How conversions keep KVM's own memory attributes in step.
    pub fn attribute_sync(&self) -> AttributeSyncMode {
        self.shared.map.sync().mode()
    }

    /// The guest-physical map of the VM's gmem slots, and its conversion
    /// service (share the `Arc` with vCPU threads).
    pub fn gpa_map(&self) -> &Arc<GpaMap> {
        &self.shared.map
    }

    /// Guest memory for this VM: a kernel guest_memfd of it where the host
    /// has one gmem can use (`KVM_CAP_GUEST_MEMFD_FLAGS` with `MMAP |
    /// INIT_SHARED`), else a memfd-backed file ([`GuestMemfd::with_options`]),
    /// which [`bind`](Self::bind) binds as a memfd slot. Which one it gives
    /// is [`memory_backing`](Self::memory_backing); `flags` and `options`
    /// mean the same for both. Errors as
    /// [`create_guest_memfd`](Self::create_guest_memfd) or
    /// [`GuestMemfd::new`].
    pub fn create_memory(
        &self,
        size: u64,
        flags: Flags,
        options: Options,
    ) -> Result<GuestMemfd, Error> {
        match self.memory_backing() {
            BackingKind::KernelGuestMemfd => self.create_guest_memfd_with(size, flags, options),
            BackingKind::Memfd => GuestMemfd::with_options(size, flags, options),
        }
    }

    /// What [`create_memory`](Self::create_memory) backs guest memory with
    /// on this VM.
    pub fn memory_backing(&self) -> BackingKind {
        let needed = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
        if self.guest_memfd_flags() & needed == needed {
            BackingKind::KernelGuestMemfd
        } else {
            BackingKind::Memfd
        }
    }

    /// `KVM_CAP_GUEST_MEMFD_FLAGS` of the VM (0 where it has no guest_memfd).
    fn guest_memfd_flags(&self) -> u64 {
        self.shared
            .fd
            .check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS.into())
            .max(0) as u64
    }

    /// A gmem file backed by a kernel guest_memfd of this VM.
    ///
    /// The kernel file is created `MMAP | INIT_SHARED` (the host maps every
    /// page, and gmem's attribute map decides what it may touch); `flags`
    /// are gmem's: `INIT_SHARED` sets the initial state and `MMAP` whether
    /// the host may map it.
    ///
    /// Errors: `EOPNOTSUPP` ([`Error::Os`]) where the host has no
    /// guest_memfd, or one without `MMAP | INIT_SHARED` (use
    /// [`create_memory`](Self::create_memory) to fall back to a memfd);
    /// `EINVAL` for a bad size or flag; else the kernel's errno.
    pub fn create_guest_memfd(&self, size: u64, flags: Flags) -> Result<GuestMemfd, Error> {
        self.create_guest_memfd_with(size, flags, Options::default())
    }

    /// [`create_guest_memfd`](Self::create_guest_memfd) with gmem's options.
    pub fn create_guest_memfd_with(
        &self,
        size: u64,
        flags: Flags,
        options: Options,
    ) -> Result<GuestMemfd, Error> {
        self.create_guest_memfd_with_kernel_flags(size, flags, options, KernelFlags::empty())
    }

    /// [`create_guest_memfd_with`](Self::create_guest_memfd_with), passing
    /// `kernel_flags` to `KVM_CREATE_GUEST_MEMFD` as they are.
    ///
    /// Errors: `EOPNOTSUPP` ([`Error::Os`], naming the flag) for a flag that
    /// `KVM_CAP_GUEST_MEMFD_FLAGS` does not report, `EINVAL`
    /// ([`Error::UnknownFlags`]) for bits gmem does not know; else as
    /// [`create_guest_memfd`](Self::create_guest_memfd).
    pub fn create_guest_memfd_with_kernel_flags(
        &self,
        size: u64,
        flags: Flags,
        options: Options,
        kernel_flags: KernelFlags,
    ) -> Result<GuestMemfd, Error> {
        GuestMemfd::validate(size, flags)?;
        let unknown = kernel_flags.bits() & !KernelFlags::all().bits();
        if unknown != 0 {
            return Err(Error::UnknownFlags { bits: unknown });
        }
        let needed = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
        let supported = self.guest_memfd_flags();
        if supported & needed != needed {
            return Err(Error::Os {
                call: "KVM_CREATE_GUEST_MEMFD (needs GUEST_MEMFD_FLAG_MMAP | INIT_SHARED)",
                errno: Errno::OPNOTSUPP,
            });
        }
        let missing = KernelFlags::from_bits_retain(kernel_flags.bits() & !supported);
        if let Some(flag) = missing.iter().next() {
            return Err(Error::Os {
                call: unsupported_flag_call(flag),
                errno: Errno::OPNOTSUPP,
            });
        }
        let fd = ioctl::create_guest_memfd(&self.shared.fd, size, needed | kernel_flags.bits())
            .map_err(|e| Error::Os {
                call: "KVM_CREATE_GUEST_MEMFD",
                errno: Errno::from_raw_os_error(e.errno()),
            })?;
        let backing = Backing::from_fd(fd, BackingKind::KernelGuestMemfd, Some(self.shared.id));
        GuestMemfd::with_backing(backing, size, flags, options)
    }

    /// Binds `[offset, offset + len)` of `mem` at guest-physical `gpa` as
    /// slot `slot`, and enters it in the [`GpaMap`].
    ///
    /// A kernel guest_memfd is bound with `KVM_SET_USER_MEMORY_REGION2`,
    /// `flags` and `KVM_MEM_GUEST_MEMFD`; a memfd-backed file as a **memfd
    /// slot**: `KVM_SET_USER_MEMORY_REGION2` (or `KVM_SET_USER_MEMORY_REGION`
    /// where the host lacks 2) with `flags` alone. Either way `userspace_addr`
    /// is gmem's own mapping of the whole file at `offset`. Every guest
    /// access to the range is served from the file, shared or private; in a
    /// memfd slot the guest reaches every page, and gmem's map decides only
    /// what the host may touch (see the module documentation).
    ///
    /// Errors mirror the kernel's checks: alignment, a range inside the
    /// file, no overlap with another binding of the file (`EINVAL`), a free
    /// slot and guest range among gmem's slots (`EEXIST`), and, for a kernel
    /// guest_memfd, one of this VM (one gmem made on another VM is `EINVAL`;
    /// for an adopted guest_memfd the kernel judges). Where KVM's memory
    /// attributes are kept in step, a guest_memfd slot's range is set to
    /// gmem's state first.
    pub fn bind(
        &self,
        slot: u32,
        gpa: u64,
        mem: &Arc<GuestMemfd>,
        offset: u64,
        len: u64,
        flags: MemslotFlags,
    ) -> Result<Memslot, MemslotError> {
        let spec = RegionSpec {
            slot,
            flags: flags.bits(),
            gpa,
            offset,
            len,
        };
        let shared = &self.shared;
        Memslot::bind(&shared.fd, shared.id, &shared.map, mem, spec)
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu, KvmError> {
        Vcpu::new(&self.shared.fd, self.shared.map.clone(), id)
    }

    /// Sets how guest conversions that meet `EAGAIN` are retried
    /// ([`GpaMap::set_policy`]).
    pub fn set_conversion_policy(&self, policy: ConversionPolicy) {
        self.shared.map.set_policy(policy);
    }

    /// Sets what is called on `EAGAIN` before a retry ([`GpaMap::set_let_go`]).
    pub fn set_let_go(&self, let_go: Arc<LetGo>) {
        self.shared.map.set_let_go(let_go);
    }

    /// Counts of the conversion requests served so far.
    pub fn conversion_totals(&self) -> ConversionTotals {
        self.shared.map.totals()
    }

    /// Converts the guest-physical range `[gpa, gpa + pages * 4096)` to `to`
    /// ([`GpaMap::convert`]).
    pub fn convert(&self, gpa: u64, pages: u64, to: Attribute) -> ConversionOutcome {
        self.shared.map.convert(gpa, pages, to)
    }

    /// Serves a conversion exit of the VMM's own `VcpuFd::run()` loop
    /// ([`GpaMap::handle_exit`]): `KVM_HC_MAP_GPA_RANGE` hypercalls (with
    /// `*ret` set) and memory faults; `None` for other exits.
    pub fn handle_exit(&self, exit: &mut VcpuExit<'_>) -> Option<ConversionExit> {
        self.shared.map.handle_exit(exit)
    }
}

/// Enables `KVM_HC_MAP_GPA_RANGE` exits where the host offers them; whether
/// they are on.
fn enable_hypercall_exits(fd: &VmFd) -> bool {
    let offered = fd.check_extension_raw(KVM_CAP_EXIT_HYPERCALL.into()).max(0) as u64;
    if offered & (1 << KVM_HC_MAP_GPA_RANGE) == 0 {
        return false;
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_EXIT_HYPERCALL,
        ..Default::default()
    };
    cap.args[0] = 1 << KVM_HC_MAP_GPA_RANGE;
    match fd.enable_cap(&cap) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                errno = e.errno(),
                "enabling KVM_HC_MAP_GPA_RANGE exits failed"
            );
            false
        }
    }
}

/// Whether the VM's guest_memfds take `KVM_SET_MEMORY_ATTRIBUTES2`, probed
/// on a one-page guest_memfd (false where none can be made).
fn in_place_attributes(fd: &VmFd) -> bool {
    let flags = fd
        .check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS.into())
        .max(0) as u64;
    let flags = flags & (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED);
    ioctl::create_guest_memfd(fd, crate::PAGE_SIZE, flags)
        .is_ok_and(|probe| ioctl::has_memory_attributes2(std::os::fd::AsFd::as_fd(&probe)))
}

/// The `Error::Os` call naming an unsupported kernel flag.
fn unsupported_flag_call(flag: KernelFlags) -> &'static str {
    if flag == KernelFlags::NO_DIRECT_MAP {
        "KVM_CREATE_GUEST_MEMFD: GUEST_MEMFD_FLAG_NO_DIRECT_MAP is not in KVM_CAP_GUEST_MEMFD_FLAGS"
    } else {
        "KVM_CREATE_GUEST_MEMFD: GUEST_MEMFD_FLAG_WRITE is not in KVM_CAP_GUEST_MEMFD_FLAGS"
    }
}
