//! vCPUs: the run loop, and the guest's conversion requests.
//!
//! A guest asks for a conversion with the semantics of `KVM_HC_MAP_GPA_RANGE`:
//! a guest-physical address, a number of pages, and attributes whose bit 4
//! (`KVM_MAP_GPA_RANGE_ENCRYPTED`) means private. Where the host delivers the
//! hypercall to userspace (`KVM_EXIT_HYPERCALL`), the guest uses `vmcall`;
//! otherwise it writes any byte to [`CONVERSION_PORT`] with the three values
//! in `ebx`, `ecx` and `esi`. Either way the result is in `rax` when the
//! guest resumes: 0, or the errno of the failure.

use std::ops::ControlFlow;
use std::sync::Arc;

use kvm_bindings::{KVM_SYNC_X86_REGS, kvm_segment};
use kvm_ioctls::{VcpuExit, VcpuFd};
use rustix::io::Errno;

use super::uapi::{
    KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_PAGE_SZ_MASK,
};
use super::vm::VmShared;
use super::{KvmError, VcpuError, ioctl};
use crate::{Attribute, ConversionError};

/// The I/O port of the port-I/O conversion request: `ebx` = gpa, `ecx` =
/// pages, `esi` = attributes; the result comes back in `eax`.
pub const CONVERSION_PORT: u16 = 0x4d47;

/// How a conversion request reached the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestChannel {
    /// `KVM_EXIT_HYPERCALL` with `KVM_HC_MAP_GPA_RANGE`.
    Hypercall,
    /// A write to [`CONVERSION_PORT`].
    PortIo,
    /// A `KVM_EXIT_MEMORY_FAULT`: the guest touched a page in the other state.
    MemoryFault,
}

/// A conversion the guest asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversionRequest {
    /// The vCPU that asked.
    pub vcpu: u64,
    /// The guest-physical start.
    pub gpa: u64,
    /// The number of pages.
    pub pages: u64,
    /// The state asked for.
    pub to: Attribute,
    /// How the request arrived.
    pub channel: RequestChannel,
}

/// What became of a conversion request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversionOutcome {
    /// The final result, returned to the guest as 0 or its errno.
    pub result: Result<(), ConversionError>,
    /// Attempts made (more than one after `EAGAIN`).
    pub attempts: u32,
}

/// General registers at an exit (from `kvm_run`'s synced registers), so that
/// a port write can carry more than its data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitRegs {
    /// `rax`.
    pub rax: u64,
    /// `rbx`.
    pub rbx: u64,
    /// `rcx`.
    pub rcx: u64,
    /// `rdx`.
    pub rdx: u64,
    /// `rsi`.
    pub rsi: u64,
    /// `rdi`.
    pub rdi: u64,
}

/// The VMM's side of a guest's port I/O, and a witness of its conversions.
pub trait GuestIo {
    /// The guest wrote `data` to `port`, with `regs` at the time of the
    /// write. `Break` stops the vCPU.
    fn io_out(&mut self, vcpu: u64, port: u16, data: &[u8], regs: &ExitRegs) -> ControlFlow<()>;

    /// The guest reads `data.len()` bytes from `port`; fill `data`.
    fn io_in(&mut self, vcpu: u64, port: u16, data: &mut [u8]) {
        let _ = (vcpu, port);
        data.fill(0xff);
    }

    /// A conversion request was served.
    fn converted(&mut self, request: &ConversionRequest, outcome: &ConversionOutcome) {
        let _ = (request, outcome);
    }
}

/// Why [`Vcpu::run`] returned without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest executed `hlt`.
    Halted,
    /// [`GuestIo::io_out`] asked to stop.
    Stopped,
}

/// A vCPU of a [`Vm`](super::Vm).
pub struct Vcpu {
    fd: VcpuFd,
    vm: Arc<VmShared>,
    id: u64,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// One exit, copied out of `kvm_run` so the vCPU can be borrowed again.
enum Exit {
    Out(u16, [u8; 8], usize),
    Done(VcpuStop),
    Served,
    MemoryFault { gpa: u64, len: u64, private: bool },
}

impl Vcpu {
    pub(super) fn new(vm: Arc<VmShared>, id: u64) -> Result<Vcpu, KvmError> {
        let mut fd = vm
            .fd
            .create_vcpu(id)
            .map_err(KvmError::ioctl("KVM_CREATE_VCPU"))?;
        // Registers travel in kvm_run at every exit: no GET/SET_REGS ioctls
        // on the conversion path.
        fd.get_kvm_run().kvm_valid_regs = KVM_SYNC_X86_REGS.into();
        Ok(Vcpu { fd, vm, id })
    }

    /// The vCPU's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The underlying `kvm-ioctls` vCPU, for set-up gmem does not cover.
    pub fn fd(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Puts the vCPU in 32-bit protected mode with flat 4 GiB segments and no
    /// paging, at `entry` with stack pointer `stack`.
    pub fn enter_protected_mode(&mut self, entry: u64, stack: u64) -> Result<(), KvmError> {
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(KvmError::ioctl("KVM_GET_SREGS"))?;
        let flat = |selector, type_| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.cs = flat(0x08, 0xb);
        let data = flat(0x10, 0x3);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.cr0 |= 1; // PE; paging stays off.
        self.fd
            .set_sregs(&sregs)
            .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
        let mut regs = self
            .fd
            .get_regs()
            .map_err(KvmError::ioctl("KVM_GET_REGS"))?;
        (regs.rip, regs.rsp, regs.rflags) = (entry, stack, 2);
        self.fd
            .set_regs(&regs)
            .map_err(KvmError::ioctl("KVM_SET_REGS"))
    }

    /// Sets general registers before the first run (`rdi`, `rsi`: the
    /// guest program's arguments).
    pub fn set_arguments(&mut self, rdi: u64, rsi: u64) -> Result<(), KvmError> {
        let mut regs = self
            .fd
            .get_regs()
            .map_err(KvmError::ioctl("KVM_GET_REGS"))?;
        (regs.rdi, regs.rsi) = (rdi, rsi);
        self.fd
            .set_regs(&regs)
            .map_err(KvmError::ioctl("KVM_SET_REGS"))
    }

    /// Runs the guest until it halts, `io` stops it, or an error. Serves
    /// conversion requests and memory-fault exits on the way.
    pub fn run(&mut self, io: &mut dyn GuestIo) -> Result<VcpuStop, VcpuError> {
        loop {
            match self.run_once(io)? {
                Exit::Done(stop) => return Ok(stop),
                Exit::Served => {}
                Exit::Out(port, bytes, len) if port == CONVERSION_PORT => {
                    let _ = (bytes, len);
                    self.serve_port_request(io);
                }
                Exit::Out(port, bytes, len) => {
                    let r = ioctl::sync_regs(&mut self.fd);
                    let regs = ExitRegs {
                        rax: r.rax,
                        rbx: r.rbx,
                        rcx: r.rcx,
                        rdx: r.rdx,
                        rsi: r.rsi,
                        rdi: r.rdi,
                    };
                    if io.io_out(self.id, port, &bytes[..len], &regs).is_break() {
                        return Ok(VcpuStop::Stopped);
                    }
                }
                Exit::MemoryFault { gpa, len, private } => {
                    self.serve_memory_fault(io, gpa, len, private)?
                }
            }
        }
    }

    fn run_once(&mut self, io: &mut dyn GuestIo) -> Result<Exit, VcpuError> {
        let (id, vm) = (self.id, &self.vm);
        let exit = match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut bytes = [0u8; 8];
                let len = data.len().min(8);
                bytes[..len].copy_from_slice(&data[..len]);
                Exit::Out(port, bytes, len)
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                io.io_in(id, port, data);
                Exit::Served
            }
            Ok(VcpuExit::Hypercall(call)) if call.nr == KVM_HC_MAP_GPA_RANGE => {
                let [gpa, pages, attrs, ..] = call.args;
                *call.ret = serve(vm, io, id, gpa, pages, attrs, RequestChannel::Hypercall);
                Exit::Served
            }
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => Exit::MemoryFault {
                gpa,
                len: size,
                private: flags & u64::from(kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE) != 0,
            },
            Ok(VcpuExit::Hlt) => Exit::Done(VcpuStop::Halted),
            Ok(VcpuExit::Shutdown) => return Err(VcpuError::Shutdown { rip: self.rip() }),
            Ok(VcpuExit::InternalError) => {
                let suberror = ioctl::internal_suberror(&mut self.fd);
                return Err(VcpuError::Internal {
                    suberror,
                    rip: self.rip(),
                });
            }
            Ok(other) => {
                let exit = format!("{other:?}");
                return Err(VcpuError::UnexpectedExit {
                    exit,
                    rip: self.rip(),
                });
            }
            Err(e) if e.errno() == Errno::INTR.raw_os_error() => {
                return Err(VcpuError::Interrupted);
            }
            Err(e) if e.errno() == Errno::AGAIN.raw_os_error() => Exit::Served,
            Err(e) => return Err(KvmError::ioctl("KVM_RUN")(e).into()),
        };
        Ok(exit)
    }

    fn rip(&mut self) -> u64 {
        ioctl::sync_regs(&mut self.fd).rip
    }

    /// A port-I/O request: the values are in the synced registers, and the
    /// result goes back in `rax`.
    fn serve_port_request(&mut self, io: &mut dyn GuestIo) {
        let regs = ioctl::sync_regs(&mut self.fd);
        let (gpa, pages, attrs) = (
            regs.rbx & 0xffff_ffff,
            regs.rcx & 0xffff_ffff,
            regs.rsi & 0xffff_ffff,
        );
        let result = serve(
            &self.vm,
            io,
            self.id,
            gpa,
            pages,
            attrs,
            RequestChannel::PortIo,
        );
        ioctl::sync_regs(&mut self.fd).rax = result;
        self.fd.get_kvm_run().kvm_dirty_regs = KVM_SYNC_X86_REGS.into();
    }

    /// A memory fault: convert the range to what the access expected.
    fn serve_memory_fault(
        &mut self,
        io: &mut dyn GuestIo,
        gpa: u64,
        len: u64,
        private: bool,
    ) -> Result<(), VcpuError> {
        let to = if private {
            Attribute::Private
        } else {
            Attribute::Shared
        };
        let pages = len.div_ceil(crate::PAGE_SIZE);
        let request = ConversionRequest {
            vcpu: self.id,
            gpa,
            pages,
            to,
            channel: RequestChannel::MemoryFault,
        };
        let (result, attempts) = self.vm.convert(gpa, pages, to);
        let outcome = ConversionOutcome { result, attempts };
        io.converted(&request, &outcome);
        outcome
            .result
            .map_err(|source| VcpuError::MemoryFault { gpa, len, source })
    }
}

/// Validates and performs a `KVM_HC_MAP_GPA_RANGE` request; returns what the
/// guest gets in `rax`.
fn serve(
    vm: &VmShared,
    io: &mut dyn GuestIo,
    vcpu: u64,
    gpa: u64,
    pages: u64,
    attrs: u64,
    channel: RequestChannel,
) -> u64 {
    let to = if attrs & KVM_MAP_GPA_RANGE_ENCRYPTED != 0 {
        Attribute::Private
    } else {
        Attribute::Shared
    };
    let request = ConversionRequest {
        vcpu,
        gpa,
        pages,
        to,
        channel,
    };
    let known = KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_MASK;
    let (result, attempts) = if attrs & !known != 0 || pages == 0 || gpa % crate::PAGE_SIZE != 0 {
        let invalid = ConversionError::Invalid {
            offset: gpa,
            len: pages.saturating_mul(crate::PAGE_SIZE),
            reason: "malformed KVM_HC_MAP_GPA_RANGE request",
        };
        (Err(invalid), 0)
    } else {
        vm.convert(gpa, pages, to)
    };
    let outcome = ConversionOutcome { result, attempts };
    io.converted(&request, &outcome);
    match &outcome.result {
        Ok(()) => 0,
        Err(e) => e.errno() as u64,
    }
}
