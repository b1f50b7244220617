//! vCPUs: the run loop, and the guest's conversion requests.
//!
//! A guest asks for a conversion with the semantics of `KVM_HC_MAP_GPA_RANGE`:
//! a guest-physical address, a number of pages, and attributes whose bit 4
//! (`KVM_MAP_GPA_RANGE_ENCRYPTED`) means private. Where the host delivers the
//! hypercall to userspace (`KVM_EXIT_HYPERCALL`), the guest uses `vmcall`;
//! otherwise it writes any byte to [`CONVERSION_PORT`] with the three values
//! in `ebx`, `ecx` and `esi`. Either way the result is in `rax` when the
//! guest resumes: 0, or the negative errno of the failure (KVM's convention
//! for `hypercall.ret`; a 32-bit guest sees its low 32 bits in `eax`).
//! Both, and memory-fault exits, are served by the code a VMM's own run loop
//! calls ([`GpaMap::handle_exit`](super::GpaMap::handle_exit)).

use std::ops::ControlFlow;
use std::sync::Arc;

use kvm_bindings::{KVM_SYNC_X86_REGS, kvm_segment};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use rustix::io::Errno;

use super::exit::{ConversionExit, ConversionRequest, RequestChannel};
use super::gpa_map::{ConversionOutcome, GpaMap};
use super::{KvmError, VcpuError, ioctl};

/// The I/O port of the port-I/O conversion request: `ebx` = gpa, `ecx` =
/// pages, `esi` = attributes; the result comes back in `eax`.
pub const CONVERSION_PORT: u16 = 0x4d47;

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
    map: Arc<GpaMap>,
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
    Converted(ConversionExit),
}

impl Vcpu {
    pub(super) fn new(vm: &VmFd, map: Arc<GpaMap>, id: u64) -> Result<Vcpu, KvmError> {
        let mut fd = vm
            .create_vcpu(id)
            .map_err(KvmError::ioctl("KVM_CREATE_VCPU"))?;
        // Registers travel in kvm_run at every exit: no GET/SET_REGS ioctls
        // on the conversion path.
        fd.get_kvm_run().kvm_valid_regs = KVM_SYNC_X86_REGS.into();
        Ok(Vcpu { fd, map, id })
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
                Exit::Converted(served) => {
                    io.converted(&served.request, &served.outcome);
                    let ConversionExit { request, outcome } = served;
                    if let (RequestChannel::MemoryFault, Err(source)) =
                        (request.channel, outcome.result)
                    {
                        let len = request.pages * crate::PAGE_SIZE;
                        let gpa = request.gpa;
                        return Err(VcpuError::MemoryFault { gpa, len, source });
                    }
                }
            }
        }
    }

    fn run_once(&mut self, io: &mut dyn GuestIo) -> Result<Exit, VcpuError> {
        let id = self.id;
        let mut exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == Errno::INTR.raw_os_error() => {
                return Err(VcpuError::Interrupted);
            }
            Err(e) if e.errno() == Errno::AGAIN.raw_os_error() => return Ok(Exit::Served),
            Err(e) => return Err(KvmError::ioctl("KVM_RUN")(e).into()),
        };
        if let Some(served) = self.map.handle_exit(&mut exit) {
            return Ok(Exit::Converted(served));
        }
        let exit = match exit {
            VcpuExit::IoOut(port, data) => {
                let mut bytes = [0u8; 8];
                let len = data.len().min(8);
                bytes[..len].copy_from_slice(&data[..len]);
                Exit::Out(port, bytes, len)
            }
            VcpuExit::IoIn(port, data) => {
                io.io_in(id, port, data);
                Exit::Served
            }
            VcpuExit::Hlt => Exit::Done(VcpuStop::Halted),
            VcpuExit::Shutdown => return Err(VcpuError::Shutdown { rip: self.rip() }),
            VcpuExit::InternalError => {
                let suberror = ioctl::internal_suberror(&mut self.fd);
                return Err(VcpuError::Internal {
                    suberror,
                    rip: self.rip(),
                });
            }
            other => {
                let exit = format!("{other:?}");
                return Err(VcpuError::UnexpectedExit {
                    exit,
                    rip: self.rip(),
                });
            }
        };
        Ok(exit)
    }

    fn rip(&mut self) -> u64 {
        ioctl::sync_regs(&mut self.fd).rip
    }

    /// A port-I/O request: the values are in the synced registers, and the
    /// result goes back in `rax` as a hypercall's would.
    fn serve_port_request(&mut self, io: &mut dyn GuestIo) {
        let regs = ioctl::sync_regs(&mut self.fd);
        let (gpa, pages, attrs) = (
            regs.rbx & 0xffff_ffff,
            regs.rcx & 0xffff_ffff,
            regs.rsi & 0xffff_ffff,
        );
        let served = self
            .map
            .serve_map_gpa_range(gpa, pages, attrs, RequestChannel::PortIo);
        io.converted(&served.request, &served.outcome);
        ioctl::sync_regs(&mut self.fd).rax = served.outcome.guest_ret();
        self.fd.get_kvm_run().kvm_dirty_regs = KVM_SYNC_X86_REGS.into();
    }
}
