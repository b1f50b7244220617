//! A test machine: a VM whose memory is one gmem file at guest address 0,
//! the interpreter loaded, and vCPUs that run command lists.
//!
//! The file is a kernel guest_memfd where the host has one, and a
//! memfd-backed file bound as a memfd slot where not
//! ([`Vm::create_memory`]): the guest then reaches every page and gmem's
//! map decides what the host may touch ([`Machine::backing`] says which).
//!
//! Guest memory layout: the first [`FIRMWARE_SIZE`] bytes hold the code
//! (at [`CODE_GPA`]), the stacks, one virtqueue per vCPU ([`queue_layout`])
//! and one command area per vCPU; they stay shared. The rest is the guest's
//! to convert.

use std::ops::ControlFlow;
use std::sync::Arc;

use anyhow::{Context, bail};
use gmem::kvm::{
    ConversionOutcome, ConversionRequest, ExitRegs, GuestIo, HostSupport, Memslot, MemslotFlags,
    Vcpu, VcpuStop, Vm,
};
use gmem::{Attribute, BackingKind, Flags, GuestMemfd, HostMapping, Options, PAGE_SIZE};

use crate::guest::{
    CHECK_PORT, CODE_GPA, Command, NOTIFY_PORT, REPORT_PORT, RESULT_PORT, RequestPath, STACK_TOP,
    interpreter,
};
use crate::virtio::{QUEUE_PAGES, QueueLayout};

/// Bytes at the start of guest memory for code, stacks and command lists.
pub const FIRMWARE_SIZE: u64 = 4 << 20;
/// The most vCPUs a machine runs.
pub const MAX_VCPUS: u64 = 4;
const COMMANDS_GPA: u64 = 0x10000;
/// Where the vCPUs' virtqueues begin, past the stacks.
const QUEUES_GPA: u64 = STACK_TOP;
const _: () = assert!(QUEUES_GPA + MAX_VCPUS * QUEUE_PAGES * PAGE_SIZE <= COMMANDS_GPA);
const COMMAND_AREA: u64 = (FIRMWARE_SIZE - COMMANDS_GPA) / MAX_VCPUS;

/// The most commands one vCPU's list may hold, `Halt` included.
pub const MAX_COMMANDS: usize = (COMMAND_AREA / 16) as usize;

/// Where vCPU `id`'s virtqueue lives (the interpreter gets its base in
/// `esi`).
pub fn queue_layout(id: u64) -> QueueLayout {
    QueueLayout {
        base: QUEUES_GPA + id * QUEUE_PAGES * PAGE_SIZE,
    }
}

/// A VM with one gmem file as its memory and the interpreter loaded.
pub struct Machine {
    /// The VM.
    pub vm: Vm,
    /// Guest memory: `[0, size)` of the guest.
    pub mem: Arc<GuestMemfd>,
    /// The VMM's mapping of guest memory.
    pub map: HostMapping,
    /// How the guest asks for conversions on this host.
    pub path: RequestPath,
    /// vCPU 0 between runs of [`Machine::run`] (KVM never frees a vCPU id).
    first: std::sync::Mutex<Option<Vcpu>>,
    _slot: Memslot,
}

impl Machine {
    /// A machine with `size` bytes of guest memory (at least the firmware
    /// area plus a page), every page initially `initial` but the firmware
    /// area, which is shared.
    pub fn new(size: u64, initial: Attribute) -> anyhow::Result<Machine> {
        Self::with_options(size, initial, Options::default())
    }

    /// [`new`](Self::new) with gmem's file options (huge folios).
    pub fn with_options(
        size: u64,
        initial: Attribute,
        options: Options,
    ) -> anyhow::Result<Machine> {
        if size <= FIRMWARE_SIZE {
            bail!("guest memory must exceed the {FIRMWARE_SIZE:#x} bytes of firmware area");
        }
        let path = request_path()?;
        let vm = Vm::new().context("creating a VM")?;
        let flags = match initial {
            Attribute::Shared => Flags::MMAP | Flags::INIT_SHARED,
            Attribute::Private => Flags::MMAP,
        };
        let backing = backing_name(vm.memory_backing());
        let mem = vm
            .create_memory(size, flags, options)
            .with_context(|| format!("creating guest memory ({backing})"))?;
        mem.set_attributes(0, FIRMWARE_SIZE, Attribute::Shared)
            .context("sharing the firmware area")?;
        Self::assemble(vm, mem, path)
    }

    /// A machine around `mem`, guest memory restored from a snapshot (a
    /// memfd-backed file, bound as a memfd slot), its firmware area shared
    /// and the interpreter loaded again (for this host's request path).
    pub fn restored(mem: GuestMemfd) -> anyhow::Result<Machine> {
        if mem.size() <= FIRMWARE_SIZE {
            bail!("guest memory must exceed the {FIRMWARE_SIZE:#x} bytes of firmware area");
        }
        let private = (0..FIRMWARE_SIZE)
            .step_by(PAGE_SIZE as usize)
            .find(|&gpa| mem.attribute(gpa).ok() != Some(Attribute::Shared));
        if let Some(gpa) = private {
            bail!("the firmware area of restored guest memory is private at {gpa:#x}");
        }
        let path = request_path()?;
        let vm = Vm::new().context("creating a VM")?;
        Self::assemble(vm, mem, path)
    }

    /// Binds `mem` at guest address 0 of `vm`, maps it and loads the
    /// interpreter.
    fn assemble(vm: Vm, mem: GuestMemfd, path: RequestPath) -> anyhow::Result<Machine> {
        let size = mem.size();
        let mem = Arc::new(mem);
        let slot = vm
            .bind(0, 0, &mem, 0, size, MemslotFlags::empty())
            .context("binding guest memory")?;
        let map = mem.mmap().context("mapping guest memory")?;
        map.write(
            CODE_GPA,
            &interpreter(path).context("assembling the guest")?,
        )?;
        Ok(Machine {
            vm,
            mem,
            map,
            path,
            first: std::sync::Mutex::new(None),
            _slot: slot,
        })
    }

    /// The guest memory size.
    pub fn size(&self) -> u64 {
        self.mem.size()
    }

    /// What backs guest memory: `"kernel-guest-memfd"` or `"memfd"`.
    pub fn backing(&self) -> &'static str {
        backing_name(self.mem.backing_kind())
    }

    /// Creates vCPU `id` (each id once per machine), set up to run `commands`.
    pub fn vcpu(&self, id: u64, commands: &[Command]) -> anyhow::Result<Vcpu> {
        if id >= MAX_VCPUS {
            bail!("at most {MAX_VCPUS} vCPUs");
        }
        let mut vcpu = self.vm.create_vcpu(id)?;
        self.reload(&mut vcpu, commands)?;
        Ok(vcpu)
    }

    /// Sets `vcpu` up to run `commands` from the start of the interpreter.
    pub fn reload(&self, vcpu: &mut Vcpu, commands: &[Command]) -> anyhow::Result<()> {
        if commands.len() >= MAX_COMMANDS {
            bail!(
                "{} commands exceed the {} a vCPU's area holds",
                commands.len(),
                MAX_COMMANDS - 1
            );
        }
        let id = vcpu.id();
        let list = COMMANDS_GPA + id * COMMAND_AREA;
        self.map.write(list, &Command::encode_list(commands))?;
        vcpu.enter_protected_mode(CODE_GPA, STACK_TOP - id * 0x1000)?;
        vcpu.set_arguments(list, queue_layout(id).base)?;
        Ok(())
    }

    /// Runs `commands` on vCPU 0 until it halts, recording what the guest
    /// reports. May be called again: vCPU 0 is kept between runs.
    pub fn run(&self, commands: &[Command]) -> anyhow::Result<Record> {
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        let mut vcpu = match first.take() {
            Some(mut vcpu) => {
                self.reload(&mut vcpu, commands)?;
                vcpu
            }
            None => self.vcpu(0, commands)?,
        };
        let mut record = Record::default();
        let stop = vcpu.run(&mut record);
        *first = Some(vcpu);
        anyhow::ensure!(
            stop? == VcpuStop::Halted,
            "the guest stopped without halting"
        );
        Ok(record)
    }
}

/// How the guest asks for conversions on this host.
fn request_path() -> anyhow::Result<RequestPath> {
    let support = HostSupport::probe().context("probing KVM")?;
    Ok(if support.hypercall_exit_delivered {
        RequestPath::Hypercall
    } else {
        RequestPath::PortIo
    })
}

/// The name of a backing in summaries: `"kernel-guest-memfd"` or `"memfd"`.
pub fn backing_name(kind: BackingKind) -> &'static str {
    match kind {
        BackingKind::KernelGuestMemfd => "kernel-guest-memfd",
        BackingKind::Memfd => "memfd",
    }
}

/// What a guest reported while running a command list.
#[derive(Debug, Default)]
pub struct Record {
    /// Results of conversions: (gpa, 0 or errno).
    pub results: Vec<(u32, u32)>,
    /// Results of checks: (gpa, pages, mismatching dwords).
    pub checks: Vec<(u32, u32, u32)>,
    /// Values read: (gpa, value).
    pub reads: Vec<(u32, u32)>,
    /// Notifications: (a, b, c).
    pub notifies: Vec<(u32, u32, u32)>,
    /// Conversion requests served, with their outcomes.
    pub conversions: Vec<(ConversionRequest, ConversionOutcome)>,
    /// Writes to ports the interpreter does not use.
    pub unknown: Vec<u16>,
}

impl GuestIo for Record {
    fn io_out(&mut self, _vcpu: u64, port: u16, _data: &[u8], regs: &ExitRegs) -> ControlFlow<()> {
        let (a, b, c) = (regs.rbx as u32, regs.rcx as u32, regs.rsi as u32);
        match port {
            // 0, or the negative errno in the guest's 32 bits.
            RESULT_PORT => self.results.push((a, regs.rax as u32)),
            CHECK_PORT => self.checks.push((a, b, regs.rax as u32)),
            REPORT_PORT => self.reads.push((a, regs.rax as u32)),
            NOTIFY_PORT => self.notifies.push((a, b, c)),
            other => self.unknown.push(other),
        }
        ControlFlow::Continue(())
    }

    fn converted(&mut self, request: &ConversionRequest, outcome: &ConversionOutcome) {
        self.conversions.push((*request, outcome.clone()));
    }
}
