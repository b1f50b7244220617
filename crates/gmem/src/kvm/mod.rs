//! KVM: kernel `guest_memfd` backings, memslot bindings, vCPUs and the
//! guest's conversion requests.
//!
//! * [`Vm`] owns a KVM VM. [`Vm::create_guest_memfd`] makes a
//!   [`GuestMemfd`](crate::GuestMemfd) whose backing is a kernel guest_memfd of
//!   that VM (created `MMAP | INIT_SHARED`; gmem's attribute map decides what
//!   the host may touch).
//! * [`Vm::bind`] binds a range of such a file to guest-physical memory with
//!   `KVM_SET_USER_MEMORY_REGION2`; the returned [`Memslot`] owns what KVM
//!   uses and deletes the slot on drop.
//! * [`Vcpu::run`] runs a vCPU until it halts, serving the guest's
//!   `KVM_HC_MAP_GPA_RANGE` requests (by hypercall exit where the host
//!   delivers it, else by a port-I/O request carrying the same three values)
//!   and `KVM_EXIT_MEMORY_FAULT` exits with [`GuestMemfd::set_attributes`](crate::GuestMemfd::set_attributes).
//!
//! [`HostSupport::probe`] tells what the host offers.

mod caps;
mod error;
mod ioctl;
mod memslot;
pub mod uapi;
mod vcpu;
mod vm;

pub use caps::HostSupport;
pub use error::{KvmError, MemslotError, VcpuError};
pub use memslot::Memslot;
pub use vcpu::{
    CONVERSION_PORT, ConversionOutcome, ConversionRequest, ExitRegs, GuestIo, RequestChannel, Vcpu,
    VcpuStop,
};
pub use vm::{ConversionPolicy, ConversionTotals, Vm};
