//! KVM: kernel `guest_memfd` backings (or memfd-backed files where the
//! kernel has none), memslot bindings, vCPUs and the guest's conversion
//! requests.
//!
//! * [`Vm`] owns a KVM VM, made by [`Vm::new`] or adopted from the VMM's
//!   `kvm-ioctls` `VmFd` by [`Vm::from_vm_fd`] ([`Vm::vm_fd`] gives it back).
//!   [`Vm::create_guest_memfd`] makes a [`GuestMemfd`](crate::GuestMemfd)
//!   whose backing is a kernel guest_memfd of that VM (created `MMAP |
//!   INIT_SHARED`, plus any [`KernelFlags`]; gmem's attribute map decides
//!   what the host may touch);
//!   [`GuestMemfd::from_kernel_guest_memfd`](crate::GuestMemfd::from_kernel_guest_memfd)
//!   adopts one the VMM made.
//!   Where the host has no such guest_memfd, [`Vm::create_memory`] gives a
//!   memfd-backed file instead ([`HostSupport::memory_backing`] says which).
//! * [`Vm::bind`] binds a range of such a file to guest-physical memory with
//!   `KVM_SET_USER_MEMORY_REGION2` and [`MemslotFlags`]; the returned
//!   [`Memslot`] owns what KVM uses and deletes the slot on drop. A
//!   memfd-backed file binds as a **memfd slot** (no `KVM_MEM_GUEST_MEMFD`;
//!   `KVM_SET_USER_MEMORY_REGION` where 2 is missing): the guest reaches
//!   every page, gmem's attribute map decides what the host may touch, and
//!   conversions are the guest's requests by port I/O or hypercall exits,
//!   served as for a guest_memfd slot.
//! * [`GpaMap`] ([`Vm::gpa_map`]) is the guest-physical map of the slots and
//!   the conversion service: [`GpaMap::convert`] (slot by slot, with
//!   rollback, under the `EAGAIN` policy and let-go callback) and
//!   [`GpaMap::handle_exit`], which a VMM calls from its own
//!   `VcpuFd::run()` loop for `KVM_HC_MAP_GPA_RANGE` hypercall exits and
//!   `KVM_EXIT_MEMORY_FAULT` exits. Where the host has them, KVM's own
//!   memory attributes follow every conversion ([`AttributeSyncMode`]).
//! * [`Vcpu::run`] is gmem's own run loop on the same code, adding a
//!   port-I/O request (the same three values) where the host does not
//!   deliver the hypercall.
//!
//! [`HostSupport::probe`] tells what the host offers.

mod attributes;
mod caps;
mod error;
mod exit;
mod flags;
mod gpa_map;
#[allow(unsafe_code)] // KVM ioctls: the kernel keeps pointers, and kvm_run unions.
mod ioctl;
mod memslot;
pub mod uapi;
mod vcpu;
mod vm;

pub use attributes::AttributeSyncMode;
pub use caps::HostSupport;
pub use error::{KvmError, MemslotError, VcpuError};
pub use exit::{ConversionExit, ConversionRequest, RequestChannel, map_gpa_range_target};
pub use flags::{KernelFlags, MemslotFlags};
pub use gpa_map::{
    ConversionOutcome, ConversionPolicy, ConversionTotals, GpaMap, LetGo, RollbackFailure,
};
pub use memslot::Memslot;
pub use vcpu::{CONVERSION_PORT, ExitRegs, GuestIo, Vcpu, VcpuStop};
pub use vm::Vm;
