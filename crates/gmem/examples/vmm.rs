//! A VMM that owns its KVM objects and its run loop, with gmem as the guest
//! memory: the example to copy when adopting gmem.
//!
//! * The VMM opens `/dev/kvm`, makes the VM, the guest_memfd and the vCPU
//!   with `kvm-ioctls`, and gmem adopts the VM (`Vm::from_vm_fd`) and the
//!   guest_memfd (`GuestMemfd::from_kernel_guest_memfd`), then binds it.
//!   On a host without a guest_memfd (with `MMAP | INIT_SHARED`) it says so
//!   and binds a memfd-backed `GuestMemfd` instead, as a memfd slot: the
//!   guest reaches every page, gmem's map still decides the host's.
//! * The VMM's own `VcpuFd::run()` loop gives every exit to
//!   `Vm::handle_exit` first (conversion hypercalls, memory faults); it
//!   serves the port-I/O conversion request itself through the `GpaMap`.
//! * A device thread serves a virtio split queue with `virtio-queue` over
//!   `GuestMemoryGmem`: it pins each chain's buffers once
//!   (`GuestMemoryGmem::pin_ranges`, a `PinnedChain`), copies through them,
//!   and keeps the set between requests for the same buffers, as a device
//!   keeps a DMA mapping. When the guest converts that page to private, the
//!   conversion meets `EAGAIN`; the let-go callback asks the device to drop
//!   the set, and gmem retries.
//! * The guest (32-bit, no paging) posts a request, waits for the used
//!   entry, checks the reply, converts the buffer private and back, and
//!   repeats; then it halts.
//!
//! Run: `cargo run -p gmem --example vmm --features vm-memory`. Exit code 0
//! when every request and conversion succeeded; 1 on any data error. On a
//! host without KVM it says why on stderr and exits 0, unless
//! `GMEM_REQUIRE_KVM` is set; without a guest_memfd it runs on a memfd
//! slot, unless `GMEM_REQUIRE_GUEST_MEMFD` is set (then it fails).

use std::error::Error;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::Duration;

use gmem::kvm::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED,
};
use gmem::kvm::{
    CONVERSION_PORT, ConversionExit, ConversionPolicy, HostSupport, MemslotFlags, RequestChannel,
    Vm,
};
use gmem::vm_memory::{GuestMemoryGmem, PinnedChain};
use gmem::{Flags, GuestMemfd, Options, PAGE_SIZE};
use iced_x86::IcedError;
use iced_x86::code_asm::{
    CodeAssembler, CodeLabel, al, bx, dword_ptr, dx, eax, ebp, ebx, ecx, edi, edx, esi, word_ptr,
};
use kvm_bindings::{kvm_create_guest_memfd, kvm_segment};
use kvm_ioctls::{Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestAddress;

type BoxError = Box<dyn Error + Send + Sync>;

// Guest-physical layout: one file of 16 pages bound at 0.
const MEM_SIZE: u64 = 16 * PAGE_SIZE;
const CODE_GPA: u64 = 0x1000;
/// The ring page (never converted): descriptor table, avail and used rings.
const DESC_TABLE: u64 = 0x2000;
const AVAIL_RING: u64 = 0x2100;
const USED_RING: u64 = 0x2200;
const QUEUE_SIZE: u16 = 4;
/// The page the guest converts: a request buffer and a reply buffer.
const BUFFER_GPA: u64 = 0x3000;
const REQUEST_GPA: u64 = BUFFER_GPA;
const REPLY_GPA: u64 = BUFFER_GPA + 0x800;
const PAYLOAD: u32 = 256;
const ROUNDS: u32 = 8;

// The guest's ports: the queue notification, and a failure report
// (`reason << 16 | round`).
const NOTIFY_PORT: u16 = 0x10;
const FAILURE_PORT: u16 = 0x11;
const REASON_BAD_REPLY: u32 = 1;
const REASON_TIMEOUT: u32 = 2;
/// Polls of the used index before the guest gives up on the device.
const SPIN_LIMIT: u32 = 1 << 24;

fn main() -> ExitCode {
    match run_vmm() {
        Ok(Some(summary)) => summary.report(),
        Ok(None) if std::env::var_os("GMEM_REQUIRE_KVM").is_some() => {
            eprintln!("vmm: GMEM_REQUIRE_KVM is set, so not running is a failure");
            ExitCode::FAILURE
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sets up the VM, runs the guest and the device; `None` if this host
/// cannot (the reason printed).
fn run_vmm() -> Result<Option<Summary>, BoxError> {
    let vm_fd = match open_vm() {
        Ok(fd) => Arc::new(fd),
        Err(why) => {
            eprintln!("vmm: not run: {why}");
            return Ok(None);
        }
    };
    // Adopt the VM before making vCPUs: gmem enables the KVM_HC_MAP_GPA_RANGE
    // exit, which KVM takes only while the VM has none.
    let vm = Vm::from_vm_fd(Arc::clone(&vm_fd))?;
    let mem = Arc::new(guest_memory(&vm_fd)?);
    let _slot = vm.bind(0, 0, &mem, 0, MEM_SIZE, MemslotFlags::empty())?;
    let channel = request_channel(&vm);
    mem.mmap()?.write(CODE_GPA, &guest_program(channel)?)?;

    // The device thread, and the let-go that asks it to drop its pins.
    // The view over the VM's slots, with the ring page resident: pinned once
    // for the view's life instead of at every ring access (the guest never
    // converts it; a conversion of it would fail with EAGAIN until the view
    // goes, at device reset).
    let view = vm
        .gpa_map()
        .guest_memory([(GuestAddress(DESC_TABLE), PAGE_SIZE)])?;
    let device = Device::new(Arc::new(view))?;
    let (to_device, inbox) = mpsc::channel();
    let let_go = to_device.clone();
    vm.set_let_go(Arc::new(move |gpa, len| {
        // If the device has stopped, there is nobody left to ask.
        let _ = let_go.send(DeviceMsg::LetGo { gpa, len });
    }));
    // The device thread must be scheduled between two attempts: give it
    // up to half a second in all.
    vm.set_conversion_policy(ConversionPolicy {
        max_attempts: 50,
        first_backoff: Duration::from_micros(50),
        max_backoff: Duration::from_millis(10),
    });
    let device = thread::spawn(move || device.serve(inbox));

    let mut vcpu = vm_fd.create_vcpu(0)?;
    enter_protected_mode(&vcpu, CODE_GPA, CODE_GPA)?;
    let run = run_loop(&vm, &mut vcpu, &to_device);
    // The device stops whether or not the guest finished.
    let _ = to_device.send(DeviceMsg::Stop);
    let device = device.join().map_err(|_| "the device thread panicked")?;
    let run = run?;
    let totals = vm.conversion_totals();
    Ok(Some(Summary {
        channel,
        run,
        device,
        eagain_retries: totals.eagain_retries,
    }))
}

/// The VMM's VM, or why this host cannot run the example.
fn open_vm() -> Result<VmFd, String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    kvm.create_vm()
        .map_err(|e| format!("KVM_CREATE_VM failed: {e}"))
}

/// Guest memory: an adopted kernel guest_memfd where KVM offers one with
/// `MMAP | INIT_SHARED`, else (said on stderr) a memfd-backed file.
fn guest_memory(vm_fd: &VmFd) -> Result<GuestMemfd, BoxError> {
    let needed = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    let offered = vm_fd
        .check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS.into())
        .max(0) as u64;
    if offered & needed == needed {
        return adopt_guest_memfd(vm_fd);
    }
    let why = format!(
        "KVM's guest_memfd lacks MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS = {offered:#x})"
    );
    if std::env::var_os("GMEM_REQUIRE_GUEST_MEMFD").is_some() {
        return Err(format!("{why}, and GMEM_REQUIRE_GUEST_MEMFD is set").into());
    }
    eprintln!("vmm: {why}: running on a memfd slot");
    Ok(GuestMemfd::new(MEM_SIZE, Flags::MMAP | Flags::INIT_SHARED)?)
}

/// Makes the guest_memfd with `kvm-ioctls` and hands it to gmem.
fn adopt_guest_memfd(vm_fd: &VmFd) -> Result<GuestMemfd, BoxError> {
    let request = kvm_create_guest_memfd {
        size: MEM_SIZE,
        flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        reserved: [0; 6],
    };
    let raw = vm_fd.create_guest_memfd(request)?;
    // KVM_CREATE_GUEST_MEMFD just returned this descriptor: take it over.
    // SAFETY: nothing else owns the descriptor or will close it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let flags = Flags::MMAP | Flags::INIT_SHARED;
    Ok(GuestMemfd::from_kernel_guest_memfd(
        fd,
        MEM_SIZE,
        flags,
        Options::default(),
    )?)
}

/// How the guest asks for conversions: `vmcall` where KVM delivers
/// `KVM_HC_MAP_GPA_RANGE` to userspace, else gmem's port-I/O request.
/// (gmem's probe runs a one-`vmcall` guest once a process to find out.)
fn request_channel(vm: &Vm) -> RequestChannel {
    let delivered = HostSupport::probe().is_ok_and(|s| s.hypercall_exit_delivered);
    if vm.hypercall_exits() && delivered {
        RequestChannel::Hypercall
    } else {
        RequestChannel::PortIo
    }
}

/// 32-bit protected mode, flat 4 GiB segments, no paging; at `entry`.
fn enter_protected_mode(vcpu: &VcpuFd, entry: u64, stack: u64) -> Result<(), BoxError> {
    let mut sregs = vcpu.get_sregs()?;
    let flat = |selector, type_| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        db: 1,
        s: 1,
        g: 1,
        ..Default::default()
    };
    sregs.cs = flat(0x08, 0xb);
    let data = flat(0x10, 0x3);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr0 |= 1;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    (regs.rip, regs.rsp, regs.rflags) = (entry, stack, 2);
    Ok(vcpu.set_regs(&regs)?)
}

// ---------------------------------------------------------------- the guest

/// The guest: describe the request and reply buffers once, then per round
/// fill the request, post it, wait for the reply, check it, convert the
/// buffer page private and back to shared.
fn guest_program(channel: RequestChannel) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let (mut round, mut bad_reply, mut timeout) =
        (a.create_label(), a.create_label(), a.create_label());
    // Descriptor 0: the request (device-readable), chained to 1: the reply
    // (device-writable). Layout: addr u64, len u32, flags u16, next u16.
    for (index, gpa, flags_next) in [(0, REQUEST_GPA, 1 << 16 | 1), (1, REPLY_GPA, 2)] {
        let desc = (DESC_TABLE + 16 * index) as u32;
        a.mov(dword_ptr(desc), gpa as u32)?;
        a.mov(dword_ptr(desc + 4), 0)?;
        a.mov(dword_ptr(desc + 8), PAYLOAD)?;
        a.mov(dword_ptr(desc + 12), flags_next)?;
    }
    a.mov(ebp, 1)?; // The round, and the request's byte.
    a.set_label(&mut round)?;
    a.imul_3(eax, ebp, 0x0101_0101)?;
    a.mov(edi, REQUEST_GPA as u32)?;
    a.mov(ecx, PAYLOAD / 4)?;
    a.rep().stosd()?;
    emit_post_and_wait(&mut a, timeout)?;
    // The device's reply is the request's bytes inverted.
    a.imul_3(eax, ebp, 0x0101_0101)?;
    a.not(eax)?;
    a.mov(edi, REPLY_GPA as u32)?;
    a.mov(ecx, PAYLOAD / 4)?;
    a.repe().scasd()?;
    a.jne(bad_reply)?;
    emit_convert(&mut a, channel, KVM_MAP_GPA_RANGE_ENCRYPTED)?;
    emit_convert(&mut a, channel, 0)?;
    a.inc(ebp)?;
    a.cmp(ebp, ROUNDS)?;
    a.jbe(round)?;
    a.hlt()?;
    for (label, reason) in [
        (&mut bad_reply, REASON_BAD_REPLY),
        (&mut timeout, REASON_TIMEOUT),
    ] {
        a.set_label(label)?;
        a.mov(eax, reason << 16)?;
        a.or(eax, ebp)?;
        a.mov(dx, u32::from(FAILURE_PORT))?;
        a.out(dx, eax)?;
        a.hlt()?;
    }
    a.assemble(CODE_GPA)
}

/// Puts descriptor 0 on the avail ring, notifies, and polls the used index
/// until the device has caught up (or jumps to `timeout`).
fn emit_post_and_wait(a: &mut CodeAssembler, timeout: CodeLabel) -> Result<(), IcedError> {
    let (mut poll, mut done) = (a.create_label(), a.create_label());
    a.movzx(ebx, word_ptr(AVAIL_RING as u32 + 2))?;
    a.mov(eax, ebx)?;
    a.and(eax, u32::from(QUEUE_SIZE) - 1)?;
    a.mov(word_ptr(eax * 2 + (AVAIL_RING as i32 + 4)), 0)?;
    a.inc(ebx)?;
    // x86 keeps stores in order: the ring entry is visible before the index.
    a.mov(word_ptr(AVAIL_RING as u32 + 2), bx)?;
    a.mov(dx, u32::from(NOTIFY_PORT))?;
    a.out(dx, al)?;
    a.mov(ecx, SPIN_LIMIT)?;
    a.set_label(&mut poll)?;
    a.pause()?;
    a.cmp(word_ptr(USED_RING as u32 + 2), bx)?;
    a.je(done)?;
    a.dec(ecx)?;
    a.jnz(poll)?;
    a.jmp(timeout)?;
    a.set_label(&mut done)?;
    a.nop() // A label marks an instruction.
}

/// Asks for the buffer page to get `attrs` (`KVM_HC_MAP_GPA_RANGE`'s
/// arguments); the result lands in `eax` (0 or the negative errno).
fn emit_convert(
    a: &mut CodeAssembler,
    channel: RequestChannel,
    attrs: u64,
) -> Result<(), IcedError> {
    a.mov(ebx, BUFFER_GPA as u32)?;
    a.mov(ecx, 1)?;
    if channel == RequestChannel::Hypercall {
        a.mov(edx, attrs as u32)?;
        a.mov(eax, KVM_HC_MAP_GPA_RANGE as u32)?;
        a.vmcall()
    } else {
        a.mov(esi, attrs as u32)?;
        a.mov(dx, u32::from(CONVERSION_PORT))?;
        a.out(dx, al)
    }
}

// ------------------------------------------------------------- the run loop

/// What the run loop saw.
#[derive(Debug, Default)]
struct RunTally {
    notifications: u64,
    conversions: u64,
    conversion_errors: u64,
    /// The guest's failure report (`reason << 16 | round`).
    guest_failure: Option<u32>,
}

impl RunTally {
    fn record(&mut self, served: &ConversionExit) -> Result<(), BoxError> {
        self.conversions += 1;
        let Err(e) = &served.outcome.result else {
            return Ok(());
        };
        self.conversion_errors += 1;
        let r = &served.request;
        eprintln!(
            "vmm: converting {:#x} (+{} pages) to {:?} failed: {e}",
            r.gpa, r.pages, r.to
        );
        if r.channel == RequestChannel::MemoryFault {
            // Re-entering would fault again: stop the guest.
            return Err(format!("memory fault at {:#x} not served: {e}", r.gpa).into());
        }
        Ok(())
    }
}

/// The VMM's own run loop: conversion exits go to gmem first, then the
/// guest's port I/O is served here, until the guest halts.
fn run_loop(vm: &Vm, vcpu: &mut VcpuFd, device: &Sender<DeviceMsg>) -> Result<RunTally, BoxError> {
    // Registers travel in kvm_run at each exit (for the port request).
    vcpu.set_sync_valid_reg(SyncReg::Register);
    let mut tally = RunTally::default();
    loop {
        let (port, value) = match vcpu.run() {
            Ok(mut exit) => {
                if let Some(served) = vm.handle_exit(&mut exit) {
                    tally.record(&served)?;
                    continue;
                }
                match exit {
                    VcpuExit::IoOut(port, data) => (port, first_u32(data)),
                    VcpuExit::Hlt => return Ok(tally),
                    other => return Err(format!("unexpected exit: {other:?}").into()),
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(format!("KVM_RUN: {e}").into()),
        };
        match port {
            NOTIFY_PORT => {
                tally.notifications += 1;
                device
                    .send(DeviceMsg::Notify)
                    .map_err(|_| "the device thread has stopped")?;
            }
            CONVERSION_PORT => {
                let served = serve_port_request(vm, vcpu);
                tally.record(&served)?;
            }
            FAILURE_PORT => tally.guest_failure = Some(value),
            other => return Err(format!("write to unknown port {other:#x}").into()),
        }
    }
}

/// gmem's port-I/O conversion request: `ebx` = gpa, `ecx` = pages, `esi` =
/// attributes; the result goes back in `rax`, as a hypercall's would.
fn serve_port_request(vm: &Vm, vcpu: &mut VcpuFd) -> ConversionExit {
    let regs = vcpu.sync_regs().regs;
    let low = |r: u64| r & 0xffff_ffff; // A 32-bit guest.
    let (gpa, pages, attrs) = (low(regs.rbx), low(regs.rcx), low(regs.rsi));
    let served = vm
        .gpa_map()
        .serve_map_gpa_range(gpa, pages, attrs, RequestChannel::PortIo);
    vcpu.sync_regs_mut().regs.rax = served.outcome.guest_ret();
    vcpu.set_sync_dirty_reg(SyncReg::Register);
    served
}

fn first_u32(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let len = data.len().min(4);
    bytes[..len].copy_from_slice(&data[..len]);
    u32::from_le_bytes(bytes)
}

// --------------------------------------------------------------- the device

/// What the run loop and the let-go tell the device thread.
enum DeviceMsg {
    /// The guest notified the queue.
    Notify,
    /// A conversion of `[gpa, gpa + len)` met `EAGAIN`: drop pins there.
    LetGo { gpa: u64, len: u64 },
    /// The guest is done.
    Stop,
}

/// What the device did.
#[derive(Debug, Default)]
struct DeviceReport {
    requests: u64,
    bytes: u64,
    data_errors: u64,
    chains_dropped: u64,
}

/// A virtio device: one split queue over the gmem view.
struct Device {
    view: Arc<GuestMemoryGmem>,
    queue: Queue,
    report: DeviceReport,
}

/// The chain a device keeps pinned between requests (as a device keeps a
/// DMA mapping): it borrows the device thread's view, and drops at a let-go
/// over its pages or when a request needs other buffers.
type Held<'v> = Option<PinnedChain<'v>>;

impl Device {
    /// The queue as the driver set it up (a VMM learns the addresses from
    /// the transport; this guest uses fixed ones).
    fn new(view: Arc<GuestMemoryGmem>) -> Result<Device, BoxError> {
        let mut queue = Queue::new(QUEUE_SIZE)?;
        queue.try_set_desc_table_address(GuestAddress(DESC_TABLE))?;
        queue.try_set_avail_ring_address(GuestAddress(AVAIL_RING))?;
        queue.try_set_used_ring_address(GuestAddress(USED_RING))?;
        queue.set_ready(true);
        if !queue.is_valid(&*view) {
            return Err("the queue does not fit in guest memory".into());
        }
        let report = DeviceReport::default();
        Ok(Device {
            view,
            queue,
            report,
        })
    }

    fn serve(mut self, inbox: Receiver<DeviceMsg>) -> DeviceReport {
        // The pinned chain borrows this view (the thread's own handle), so
        // it lives beside the device, not in it.
        let view = Arc::clone(&self.view);
        let mut held: Held<'_> = None;
        for msg in inbox {
            match msg {
                DeviceMsg::Notify => self.serve_queue(&view, &mut held),
                DeviceMsg::LetGo { gpa, len } => self.let_go(&mut held, gpa, len),
                DeviceMsg::Stop => break,
            }
        }
        drop(held);
        self.report
    }

    /// Pops every available chain, serves it, and adds its used entry.
    fn serve_queue<'v>(&mut self, view: &'v GuestMemoryGmem, held: &mut Held<'v>) {
        while let Some(chain) = self.queue.pop_descriptor_chain(view) {
            let head = chain.head_index();
            let written = self.serve_chain(chain, view, held).unwrap_or_else(|e| {
                eprintln!("device: request at descriptor {head}: {e}");
                self.report.data_errors += 1;
                0
            });
            if let Err(e) = self.queue.add_used(view, head, written) {
                eprintln!("device: adding the used entry: {e}");
                self.report.data_errors += 1;
            }
        }
    }

    /// Checks the request (the n-th carries byte n) and writes the reply
    /// (its bytes inverted), through the chain pinned once; the bytes
    /// written.
    fn serve_chain<'v>(
        &mut self,
        chain: DescriptorChain<&GuestMemoryGmem>,
        view: &'v GuestMemoryGmem,
        held: &mut Held<'v>,
    ) -> Result<u32, BoxError> {
        let descriptors: Vec<Descriptor> = chain.collect();
        let [request, reply] = descriptors[..] else {
            return Err("expected a request and a reply descriptor".into());
        };
        if request.is_write_only() || !reply.is_write_only() || reply.len() < request.len() {
            return Err("malformed request/reply descriptors".into());
        }
        let len = request.len() as usize;
        let pinned = Self::pinned(view, held, [(request.addr(), len), (reply.addr(), len)])?;
        let mut payload = vec![0; len];
        pinned.read(0, 0, &mut payload)?;
        let expected = (self.report.requests + 1) as u8;
        if let Some(bad) = payload.iter().position(|&b| b != expected) {
            let got = payload[bad];
            return Err(format!("request byte {bad} is {got:#x}, not {expected:#x}").into());
        }
        let inverted: Vec<u8> = payload.iter().map(|b| !b).collect();
        pinned.write(1, 0, &inverted)?;
        self.report.requests += 1;
        self.report.bytes += payload.len() as u64;
        Ok(request.len())
    }

    /// The chain of `ranges`, pinned once: the one kept from an earlier
    /// request if it has the same buffers, else pinned now (fails, holding
    /// nothing, if the guest made a page private).
    fn pinned<'h, 'v>(
        view: &'v GuestMemoryGmem,
        held: &'h mut Held<'v>,
        ranges: [(GuestAddress, usize); 2],
    ) -> Result<&'h PinnedChain<'v>, BoxError> {
        let same = held
            .as_ref()
            .is_some_and(|chain| (0..ranges.len()).all(|i| chain.range(i).ok() == Some(ranges[i])));
        if !same {
            *held = None;
            *held = Some(view.pin_ranges(ranges)?);
        }
        held.as_ref().ok_or_else(|| "no chain held".into())
    }

    /// Drops the held chain if a buffer of it overlaps `[gpa, gpa + len)`.
    fn let_go(&mut self, held: &mut Held<'_>, gpa: u64, len: u64) {
        let end = gpa.saturating_add(len);
        let overlaps = held.as_ref().is_some_and(|chain| {
            (0..chain.len()).any(|i| {
                chain
                    .range(i)
                    .is_ok_and(|(GuestAddress(at), n)| at < end && gpa < at + n as u64)
            })
        });
        if overlaps {
            *held = None;
            self.report.chains_dropped += 1;
        }
    }
}

// -------------------------------------------------------------- the summary

struct Summary {
    channel: RequestChannel,
    run: RunTally,
    device: DeviceReport,
    eagain_retries: u64,
}

impl Summary {
    fn report(&self) -> ExitCode {
        let (run, device) = (&self.run, &self.device);
        println!(
            "vmm: {} requests served ({} bytes), {} conversions by {:?} \
             ({} EAGAIN retries after the device let go of {} pinned chains), errors: {} conversion, {} data",
            device.requests,
            device.bytes,
            run.conversions,
            self.channel,
            self.eagain_retries,
            device.chains_dropped,
            run.conversion_errors,
            device.data_errors,
        );
        if let Some(failure) = run.guest_failure {
            let (reason, round) = (failure >> 16, failure & 0xffff);
            eprintln!("vmm: the guest failed in round {round} (reason {reason})");
        }
        let clean = device.requests == u64::from(ROUNDS)
            && run.notifications == u64::from(ROUNDS)
            && run.conversions == 2 * u64::from(ROUNDS)
            && run.conversion_errors == 0
            && device.data_errors == 0
            && run.guest_failure.is_none();
        if clean {
            ExitCode::SUCCESS
        } else {
            eprintln!("vmm: FAILED: {run:?} {device:?}");
            ExitCode::FAILURE
        }
    }
}
