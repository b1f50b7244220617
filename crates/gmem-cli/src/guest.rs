//! The guest program: a small command interpreter in 32-bit protected mode,
//! assembled at run time with `iced-x86`, that the host drives with command
//! lists in guest memory.
//!
//! Guest code at CPL0 is emulated instruction by instruction on some hosts
//! (seen: about 0.4 µs an instruction), so the interpreter touches two
//! dwords a page: the first and the last.
//!
//! The interpreter starts with `edi` at its command list and `esi` at its
//! vCPU's virtqueue ([`crate::virtio`]), which it keeps at the top of its
//! stack for [`Command::Post`].

use gmem::kvm::CONVERSION_PORT;
use gmem::kvm::uapi::{KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED};
use gmem::{Attribute, PAGE_SIZE};
use iced_x86::code_asm::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use crate::virtio::{
    CHAIN_LEN, HEADER_LEN, QUEUE_SIZE, QueueLayout, SLOT_SIZE, SLOT_STATUS, SLOTS, STATUS_LEN,
};

/// Offsets in a queue's pages, as the interpreter addresses them from `ebp`.
const AVAIL_IDX: i32 = QueueLayout::AVAIL_RING as i32 + 2;
const USED_IDX: i32 = QueueLayout::USED_RING as i32 + 2;
const SLOT_AREA: i32 = QueueLayout::SLOTS as i32;

/// Where the interpreter's code is loaded.
pub const CODE_GPA: u64 = 0x1000;
/// Where each vCPU's stack ends (`STACK_TOP - vcpu * 0x1000`).
pub const STACK_TOP: u64 = 0x8000;
/// The port of a conversion's result: `eax` = 0 or the negative errno, `ebx` = gpa.
pub const RESULT_PORT: u16 = 0x4d50;
/// The port of a check's result: `eax` = mismatches, `ebx` = gpa, `ecx` = pages.
pub const CHECK_PORT: u16 = 0x4d51;
/// The port of a notification to the VMM's device model: `ebx`, `ecx`, `esi`.
pub const NOTIFY_PORT: u16 = 0x4d52;
/// The port of a read's report: `eax` = the value, `ebx` = gpa.
pub const REPORT_PORT: u16 = 0x4d53;

/// The port of a virtqueue notification: `eax` = the new available index,
/// `ebx` = the buffer's gpa, `ecx` = its bytes.
pub const VIRTIO_NOTIFY_PORT: u16 = 0x4d54;
/// The port of a virtio request that did not complete well: `eax` = its
/// status (or [`VIRTIO_WAIT_GAVE_UP`]), `ebx` = the buffer's gpa.
pub const VIRTIO_STATUS_PORT: u16 = 0x4d55;
/// The port a vCPU writes while it waits for its virtio device: the VMM may
/// hold it there until the device makes progress, or
/// [`VIRTIO_WAIT_SLICE`].
pub const VIRTIO_WAIT_PORT: u16 = 0x4d56;

/// One command of the interpreter (16 bytes in guest memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Stop (`hlt`).
    Halt,
    /// Ask for `[gpa, gpa + pages * 4 KiB)` to become `to`; the result goes
    /// to [`RESULT_PORT`].
    Convert {
        /// Guest-physical start.
        gpa: u32,
        /// Pages.
        pages: u32,
        /// The state asked for.
        to: Attribute,
    },
    /// Write the pattern of `seed` to each page (first and last dword).
    Fill {
        /// Guest-physical start.
        gpa: u32,
        /// Pages.
        pages: u32,
        /// The pattern's seed.
        seed: u32,
    },
    /// Compare each page with the pattern of `seed`; the mismatch count goes
    /// to [`CHECK_PORT`].
    Check {
        /// Guest-physical start.
        gpa: u32,
        /// Pages.
        pages: u32,
        /// The pattern's seed.
        seed: u32,
    },
    /// Tell the VMM something through [`NOTIFY_PORT`].
    Notify {
        /// First value (`ebx`).
        a: u32,
        /// Second value (`ecx`).
        b: u32,
        /// Third value (`esi`).
        c: u32,
    },
    /// Report the dword at `gpa` through [`REPORT_PORT`].
    Read {
        /// Guest-physical address.
        gpa: u32,
    },
    /// Store `value` at `gpa`.
    Write {
        /// Guest-physical address.
        gpa: u32,
        /// The value.
        value: u32,
    },
    /// Post a virtio request for `[gpa, gpa + pages * 4 KiB)` on the vCPU's
    /// queue (payload and reply both those pages, header `seed`) once a slot
    /// is free, and notify on [`VIRTIO_NOTIFY_PORT`]. A bad status of the
    /// slot's last request goes to [`VIRTIO_STATUS_PORT`].
    Post {
        /// Guest-physical start of the buffer.
        gpa: u32,
        /// Pages.
        pages: u32,
        /// The payload pattern's seed.
        seed: u32,
    },
    /// Wait until every posted virtio request is used, and report the bad
    /// statuses not reported yet on [`VIRTIO_STATUS_PORT`].
    Complete,
}

impl Command {
    /// The command's 16 bytes: op, then three arguments, little-endian.
    pub fn encode(&self) -> [u8; 16] {
        let attr = |to: &Attribute| match to {
            Attribute::Private => KVM_MAP_GPA_RANGE_ENCRYPTED as u32,
            Attribute::Shared => 0,
        };
        let words: [u32; 4] = match self {
            Command::Halt => [0, 0, 0, 0],
            Command::Convert { gpa, pages, to } => [1, *gpa, *pages, attr(to)],
            Command::Fill { gpa, pages, seed } => [2, *gpa, *pages, *seed],
            Command::Check { gpa, pages, seed } => [3, *gpa, *pages, *seed],
            Command::Notify { a, b, c } => [4, *a, *b, *c],
            Command::Read { gpa } => [5, *gpa, 0, 0],
            Command::Write { gpa, value } => [6, *gpa, *value, 0],
            Command::Post { gpa, pages, seed } => [7, *gpa, *pages, *seed],
            Command::Complete => [8, 0, 0, 0],
        };
        let mut bytes = [0u8; 16];
        for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    /// A list of commands as guest memory, ending with `Halt`.
    pub fn encode_list(commands: &[Command]) -> Vec<u8> {
        commands
            .iter()
            .chain(std::iter::once(&Command::Halt))
            .flat_map(|c| c.encode())
            .collect()
    }
}

/// The first dword of a page under the pattern of `seed`; the last dword is
/// its complement.
pub fn pattern_word(seed: u32, page_gpa: u64) -> u32 {
    seed ^ page_gpa as u32
}

/// Writes the pattern of `seed` into `page` (4 KiB), as the guest's `Fill`.
pub fn fill_page(page: &mut [u8], seed: u32, page_gpa: u64) {
    let word = pattern_word(seed, page_gpa);
    page[..4].copy_from_slice(&word.to_le_bytes());
    page[PAGE_SIZE as usize - 4..].copy_from_slice(&(!word).to_le_bytes());
}

/// Whether `page` holds the pattern of `seed`, as the guest's `Check`.
pub fn page_matches(page: &[u8], seed: u32, page_gpa: u64) -> bool {
    let word = pattern_word(seed, page_gpa);
    let first = u32::from_le_bytes(page[..4].try_into().expect("4 bytes"));
    let last = u32::from_le_bytes(page[PAGE_SIZE as usize - 4..].try_into().expect("4 bytes"));
    first == word && last == !word
}

/// How the guest asks for conversions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestPath {
    /// `vmcall` of `KVM_HC_MAP_GPA_RANGE`.
    Hypercall,
    /// A write to [`CONVERSION_PORT`].
    PortIo,
}

/// Assembles the interpreter. It starts with `edi` pointing at its command
/// list and `esi` at its virtqueue, and runs commands until `Halt`.
pub fn interpreter(path: RequestPath) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut top = a.create_label();
    let mut ops = [(); 9].map(|()| a.create_label());
    let mut next = a.create_label();
    // The queue's base, for `Post`.
    a.push(esi)?;
    // Dispatch on the op of the command at `edi`.
    a.set_label(&mut top)?;
    a.mov(eax, dword_ptr(edi))?;
    for (op, label) in ops.iter().enumerate() {
        a.cmp(eax, op as u32)?;
        a.je(*label)?;
    }
    a.hlt()?; // An unknown op.
    a.set_label(&mut ops[0])?;
    a.hlt()?; // Halt.
    let bodies: [Emitter; 8] = [
        emit_convert,
        emit_fill,
        emit_check,
        emit_notify,
        emit_read,
        emit_write,
        emit_post,
        emit_complete,
    ];
    for (label, body) in ops[1..].iter_mut().zip(bodies) {
        a.set_label(label)?;
        body(&mut a, path)?;
        a.jmp(next)?;
    }
    // Next command.
    a.set_label(&mut next)?;
    a.add(edi, 16)?;
    a.jmp(top)?;
    a.assemble(CODE_GPA)
}

/// Assembles the body of one op.
type Emitter = fn(&mut CodeAssembler, RequestPath) -> Result<(), IcedError>;

/// Op 1: ask for a conversion; report the result on [`RESULT_PORT`].
fn emit_convert(a: &mut CodeAssembler, path: RequestPath) -> Result<(), IcedError> {
    a.mov(ebx, dword_ptr(edi + 4))?;
    a.mov(ecx, dword_ptr(edi + 8))?;
    match path {
        RequestPath::PortIo => {
            a.mov(esi, dword_ptr(edi + 12))?;
            a.mov(dx, CONVERSION_PORT as u32)?;
            a.out(dx, al)?;
        }
        RequestPath::Hypercall => {
            a.mov(edx, dword_ptr(edi + 12))?;
            a.mov(eax, KVM_HC_MAP_GPA_RANGE as u32)?;
            a.vmcall()?;
        }
    }
    a.mov(dx, RESULT_PORT as u32)?;
    a.out(dx, eax)
}

/// Op 2: write the pattern to the first and last dword of each page.
fn emit_fill(a: &mut CodeAssembler, _: RequestPath) -> Result<(), IcedError> {
    load_range(a)?;
    let mut page = a.create_label();
    a.set_label(&mut page)?;
    a.mov(eax, esi)?;
    a.xor(eax, ebx)?;
    a.mov(dword_ptr(ebx), eax)?;
    a.not(eax)?;
    a.mov(dword_ptr(ebx + (PAGE_SIZE as i32 - 4)), eax)?;
    a.add(ebx, PAGE_SIZE as u32)?;
    a.dec(ecx)?;
    a.jnz(page)
}

/// Op 3: count the dwords that differ from the pattern; report on
/// [`CHECK_PORT`].
fn emit_check(a: &mut CodeAssembler, _: RequestPath) -> Result<(), IcedError> {
    load_range(a)?;
    a.xor(ebp, ebp)?;
    let mut page = a.create_label();
    let mut first_ok = a.create_label();
    let mut last_ok = a.create_label();
    a.set_label(&mut page)?;
    a.mov(eax, esi)?;
    a.xor(eax, ebx)?;
    a.cmp(dword_ptr(ebx), eax)?;
    a.je(first_ok)?;
    a.inc(ebp)?;
    a.set_label(&mut first_ok)?;
    a.not(eax)?;
    a.cmp(dword_ptr(ebx + (PAGE_SIZE as i32 - 4)), eax)?;
    a.je(last_ok)?;
    a.inc(ebp)?;
    a.set_label(&mut last_ok)?;
    a.add(ebx, PAGE_SIZE as u32)?;
    a.dec(ecx)?;
    a.jnz(page)?;
    a.mov(eax, ebp)?;
    a.mov(ebx, dword_ptr(edi + 4))?;
    a.mov(ecx, dword_ptr(edi + 8))?;
    a.mov(dx, CHECK_PORT as u32)?;
    a.out(dx, eax)
}

/// Op 4: pass three values to the VMM on [`NOTIFY_PORT`].
fn emit_notify(a: &mut CodeAssembler, _: RequestPath) -> Result<(), IcedError> {
    load_range(a)?;
    a.mov(dx, NOTIFY_PORT as u32)?;
    a.out(dx, al)
}

/// Op 5: report a dword on [`REPORT_PORT`].
fn emit_read(a: &mut CodeAssembler, _: RequestPath) -> Result<(), IcedError> {
    a.mov(ebx, dword_ptr(edi + 4))?;
    a.mov(eax, dword_ptr(ebx))?;
    a.mov(dx, REPORT_PORT as u32)?;
    a.out(dx, eax)
}

/// Op 6: store a dword.
fn emit_write(a: &mut CodeAssembler, _: RequestPath) -> Result<(), IcedError> {
    a.mov(ebx, dword_ptr(edi + 4))?;
    a.mov(eax, dword_ptr(edi + 8))?;
    a.mov(dword_ptr(ebx), eax)
}

/// The `out`s to [`VIRTIO_WAIT_PORT`] a virtio wait makes before it gives
/// up (the VMM waits up to [`VIRTIO_WAIT_SLICE`] at each).
pub const VIRTIO_WAIT_LIMIT: u32 = 1000;
/// The longest the VMM holds a vCPU at one `out` to [`VIRTIO_WAIT_PORT`].
pub const VIRTIO_WAIT_SLICE: std::time::Duration = std::time::Duration::from_millis(10);
/// The status a virtio wait reports when it gave up.
pub const VIRTIO_WAIT_GAVE_UP: u32 = 0x200;

/// Op 7: wait for a free slot, post a virtio request in it, and notify.
///
/// Ordering: the descriptors, header and status are stored before the
/// available entry, and the entry before the available index; x86 keeps
/// stores in program order (TSO), so a device that reads the index with
/// Acquire sees them all. The device stores a request's status before its
/// used entry and the used index (Release), so the guest, which reads the
/// used index first, sees the status of every request it counts as used.
fn emit_post(a: &mut CodeAssembler, _: RequestPath) -> Result<(), IcedError> {
    let mut done = a.create_label();
    a.mov(ebp, dword_ptr(esp))?;
    // A slot is free when fewer than SLOTS requests are unused.
    emit_wait(a, done, |a, free| {
        a.movzx(eax, word_ptr(ebp + AVAIL_IDX))?;
        a.movzx(edx, word_ptr(ebp + USED_IDX))?;
        a.sub(eax, edx)?;
        a.and(eax, 0xffff)?;
        a.cmp(eax, u32::from(SLOTS))?;
        a.jb(free)
    })?;
    // edx = the slot's offset, in the descriptor table and in the slots.
    a.movzx(edx, word_ptr(ebp + AVAIL_IDX))?;
    a.and(edx, u32::from(SLOTS) - 1)?;
    a.shl(edx, SLOT_SIZE.trailing_zeros())?;
    emit_slot_status(a, false)?;
    load_range(a)?;
    a.shl(ecx, 12)?;
    a.mov(dword_ptr(ebp + edx + SLOT_AREA), esi)?; // The header: the seed.
    a.mov(
        dword_ptr(ebp + edx + (SLOT_AREA + SLOT_STATUS as i32)),
        0xffu32,
    )?;
    emit_chain(a)?;
    // Publish: the entry (the head, slot * CHAIN_LEN), then the index.
    a.movzx(eax, word_ptr(ebp + AVAIL_IDX))?;
    a.mov(esi, eax)?;
    a.and(esi, u32::from(QUEUE_SIZE) - 1)?;
    a.shr(edx, (SLOT_SIZE / u64::from(CHAIN_LEN)).trailing_zeros())?;
    a.mov(word_ptr(ebp + esi * 2 + (AVAIL_IDX + 2)), dx)?;
    a.inc(eax)?;
    a.mov(word_ptr(ebp + AVAIL_IDX), ax)?;
    a.mov(dx, VIRTIO_NOTIFY_PORT as u32)?;
    a.out(dx, eax)?;
    a.set_label(&mut done)?;
    a.nop()
}

/// Op 8: wait until every posted request is used, then report each slot's
/// bad status once.
fn emit_complete(a: &mut CodeAssembler, _: RequestPath) -> Result<(), IcedError> {
    let mut done = a.create_label();
    let mut slot = a.create_label();
    a.mov(ebp, dword_ptr(esp))?;
    emit_wait(a, done, |a, all_used| {
        a.mov(ax, word_ptr(ebp + AVAIL_IDX))?;
        a.cmp(ax, word_ptr(ebp + USED_IDX))?;
        a.je(all_used)
    })?;
    a.xor(edx, edx)?;
    a.set_label(&mut slot)?;
    emit_slot_status(a, true)?;
    a.add(edx, SLOT_SIZE as u32)?;
    a.cmp(edx, (u64::from(SLOTS) * SLOT_SIZE) as u32)?;
    a.jb(slot)?;
    a.set_label(&mut done)?;
    a.nop()
}

/// Waits until `ready` jumps to the label it is given, asking the VMM to
/// wait for the device ([`VIRTIO_WAIT_PORT`]) between tries; after
/// [`VIRTIO_WAIT_LIMIT`] tries reports [`VIRTIO_WAIT_GAVE_UP`] and jumps to
/// `gave_up`. Uses `ecx`.
fn emit_wait(
    a: &mut CodeAssembler,
    gave_up: CodeLabel,
    ready: impl Fn(&mut CodeAssembler, CodeLabel) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    let mut again = a.create_label();
    let mut go_on = a.create_label();
    a.mov(ecx, VIRTIO_WAIT_LIMIT)?;
    a.set_label(&mut again)?;
    ready(a, go_on)?;
    a.mov(dx, VIRTIO_WAIT_PORT as u32)?;
    a.out(dx, al)?;
    a.dec(ecx)?;
    a.jnz(again)?;
    a.mov(eax, VIRTIO_WAIT_GAVE_UP)?;
    a.mov(ebx, dword_ptr(edi + 4))?;
    a.mov(dx, VIRTIO_STATUS_PORT as u32)?;
    a.out(dx, eax)?;
    a.jmp(gave_up)?;
    a.set_label(&mut go_on)?;
    Ok(())
}

/// Reports the status of the request last posted in the slot at `edx` on
/// [`VIRTIO_STATUS_PORT`] (with its buffer's gpa) unless it is 0; with
/// `clear`, then sets it to 0, so that it is reported once. Keeps `edx`.
fn emit_slot_status(a: &mut CodeAssembler, clear: bool) -> Result<(), IcedError> {
    let mut fine = a.create_label();
    let status = ebp + edx + (SLOT_AREA + SLOT_STATUS as i32);
    a.mov(eax, dword_ptr(status))?;
    a.test(eax, eax)?;
    a.jz(fine)?;
    a.mov(ebx, dword_ptr(ebp + edx + 16))?; // The payload's descriptor.
    a.mov(esi, edx)?;
    a.mov(dx, VIRTIO_STATUS_PORT as u32)?;
    a.out(dx, eax)?;
    a.mov(edx, esi)?;
    if clear {
        a.mov(
            dword_ptr(ebp + edx + (SLOT_AREA + SLOT_STATUS as i32)),
            0u32,
        )?;
    }
    a.set_label(&mut fine)?;
    a.nop()
}

/// Writes a request's chain in the slot at `edx` (descriptors from
/// `edx / 16`): header, payload (`ebx`, `ecx` bytes), reply (the same),
/// status. Uses `eax` and `esi`.
fn emit_chain(a: &mut CodeAssembler) -> Result<(), IcedError> {
    /// Where a descriptor points.
    enum Part {
        /// A part of the slot at this offset, of this length.
        Slot(u64, u32),
        /// The guest's buffer.
        Buffer,
    }
    let (next, write) = (VRING_DESC_F_NEXT, VRING_DESC_F_WRITE);
    // Flags in the low half of the last dword, the next index (from the
    // slot's first descriptor) in the high.
    let chain = [
        (Part::Slot(0, HEADER_LEN), next | 1 << 16),
        (Part::Buffer, next | 2 << 16),
        (Part::Buffer, next | write | 3 << 16),
        (Part::Slot(SLOT_STATUS, STATUS_LEN), write),
    ];
    // esi = the slot's first descriptor index, in the high half.
    a.mov(esi, edx)?;
    a.shl(
        esi,
        16 - (SLOT_SIZE / u64::from(CHAIN_LEN)).trailing_zeros(),
    )?;
    for (i, (part, flags)) in chain.into_iter().enumerate() {
        let at = ebp + edx + (QueueLayout::DESC_TABLE as i32 + 16 * i as i32);
        match part {
            Part::Buffer => {
                a.mov(dword_ptr(at), ebx)?;
                a.mov(dword_ptr(at + 8), ecx)?;
            }
            Part::Slot(offset, len) => {
                a.lea(eax, ptr(ebp + edx + (SLOT_AREA + offset as i32)))?;
                a.mov(dword_ptr(at), eax)?;
                a.mov(dword_ptr(at + 8), len)?;
            }
        }
        a.mov(dword_ptr(at + 4), 0u32)?;
        if flags & next != 0 {
            a.lea(eax, ptr(esi + flags))?;
            a.mov(dword_ptr(at + 12), eax)?;
        } else {
            a.mov(dword_ptr(at + 12), flags)?;
        }
    }
    Ok(())
}

/// `ebx` = gpa, `ecx` = pages, `esi` = seed, from the command at `edi`.
fn load_range(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(ebx, dword_ptr(edi + 4))?;
    a.mov(ecx, dword_ptr(edi + 8))?;
    a.mov(esi, dword_ptr(edi + 12))
}
