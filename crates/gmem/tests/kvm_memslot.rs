//! Kernel guest_memfd backing and memslot bindings on the real `/dev/kvm`:
//! the bindings' checks and a guest on the VM's guest memory (memfd slots
//! where the host has no guest_memfd), and the kernel backing itself (which
//! skips without one).

#[path = "common/kvm.rs"]
mod kvm_common;

use std::sync::Arc;

use std::ops::ControlFlow;

use gmem::kvm::{ExitRegs, GuestIo, MemslotError, MemslotFlags, VcpuStop, Vm};
use gmem::{Attribute, BackingKind, Flags, GuestMemfd, Options, PAGE_SIZE};
use iced_x86::code_asm::{CodeAssembler, dword_ptr, eax};

const MIB: u64 = 1 << 20;
const NONE: MemslotFlags = MemslotFlags::empty();

#[test]
fn kernel_backing_follows_gmem_state() {
    let Some(_) = kvm_common::guest_memfd_host() else {
        return;
    };
    let vm = Vm::new().unwrap();
    let mem = vm.create_guest_memfd(4 * PAGE_SIZE, Flags::MMAP).unwrap();
    assert_eq!(mem.backing_kind(), BackingKind::KernelGuestMemfd);
    assert_eq!(
        mem.attribute(0).unwrap(),
        Attribute::Private,
        "gmem's INIT_SHARED decides"
    );
    let map = mem.mmap().unwrap();
    assert_eq!(map.write(0, b"x").unwrap_err().errno(), libc::EFAULT);
    mem.set_attributes(0, PAGE_SIZE, Attribute::Shared).unwrap();
    map.write(0, b"kernel").unwrap();
    mem.punch_hole(0, PAGE_SIZE).unwrap();
    let mut buf = [1u8; 6];
    map.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0; 6], "a punch reaches the kernel file");
    let without_mmap = vm.create_guest_memfd(PAGE_SIZE, Flags::empty()).unwrap();
    assert_eq!(without_mmap.mmap().unwrap_err().errno(), libc::ENODEV);
    assert_eq!(
        vm.create_guest_memfd(PAGE_SIZE + 1, Flags::MMAP)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
}

#[test]
fn bindings_are_checked_like_the_kernel() {
    let Some(_) = kvm_common::host() else { return };
    let vm = Vm::new().unwrap();
    let flags = Flags::MMAP | Flags::INIT_SHARED;
    let mem = Arc::new(
        vm.create_memory(16 * MIB, flags, Options::default())
            .unwrap(),
    );
    let errno = |r: Result<gmem::kvm::Memslot, MemslotError>| r.unwrap_err().errno();
    assert_eq!(errno(vm.bind(0, 0, &mem, 1, MIB, NONE)), libc::EINVAL);
    assert_eq!(errno(vm.bind(0, 1, &mem, 0, MIB, NONE)), libc::EINVAL);
    assert_eq!(errno(vm.bind(0, 0, &mem, 0, 0, NONE)), libc::EINVAL);
    assert_eq!(
        errno(vm.bind(0, 0, &mem, 12 * MIB, 8 * MIB, NONE)),
        libc::EINVAL
    );
    let first = vm.bind(0, 0, &mem, 0, 8 * MIB, NONE).unwrap();
    assert_eq!(
        errno(vm.bind(0, 64 * MIB, &mem, 8 * MIB, MIB, NONE)),
        libc::EEXIST,
        "slot in use"
    );
    assert_eq!(
        errno(vm.bind(1, 4 * MIB, &mem, 8 * MIB, MIB, NONE)),
        libc::EEXIST,
        "guest range in use"
    );
    assert!(matches!(
        vm.bind(1, 64 * MIB, &mem, 4 * MIB, 8 * MIB, NONE),
        Err(MemslotError::FileRangeBound { slot: 0, .. })
    ));
    let second = vm.bind(1, 64 * MIB, &mem, 8 * MIB, 8 * MIB, NONE).unwrap();
    // A guest_memfd of another VM cannot be bound; a memfd-backed file,
    // which belongs to no VM, binds as a memfd slot on any host.
    if vm.memory_backing() == BackingKind::KernelGuestMemfd {
        let other = Vm::new().unwrap();
        let foreign = Arc::new(other.create_guest_memfd(MIB, Flags::MMAP).unwrap());
        let refused = vm.bind(2, 128 * MIB, &foreign, 0, MIB, NONE);
        assert_eq!(refused.unwrap_err(), MemslotError::ForeignFile);
    }
    let memfd = Arc::new(GuestMemfd::new(MIB, Flags::MMAP).unwrap());
    let memfd_slot = vm.bind(2, 128 * MIB, &memfd, 0, MIB, NONE).unwrap();
    assert_eq!(
        errno(vm.bind(3, 130 * MIB, &memfd, 0, MIB, NONE)),
        libc::EINVAL,
        "a memfd slot's file range is taken too"
    );
    drop(memfd_slot);
    // Deleting a slot frees its guest and file ranges.
    drop(first);
    let again = vm.bind(0, 0, &mem, 0, 8 * MIB, NONE).unwrap();
    assert_eq!((again.slot(), second.gpa()), (0, 64 * MIB));
}

/// Stops at the first port write.
struct Quiet;

impl GuestIo for Quiet {
    fn io_out(&mut self, _: u64, _: u16, _: &[u8], _: &ExitRegs) -> ControlFlow<()> {
        ControlFlow::Break(())
    }
}

/// In a memfd slot the guest reaches every page, private ones too, while
/// gmem's map keeps the host off them until the guest shares them again.
#[test]
fn a_memfd_slot_serves_the_guest_and_guards_the_host() {
    let Some(_) = kvm_common::host() else { return };
    let vm = Vm::new().unwrap();
    let mem = Arc::new(GuestMemfd::new(16 * PAGE_SIZE, Flags::MMAP | Flags::INIT_SHARED).unwrap());
    let _slot = vm.bind(0, 0, &mem, 0, 16 * PAGE_SIZE, NONE).unwrap();
    // 32-bit code: write a marker to page 8, read page 9's into eax, halt.
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(dword_ptr(0x8000u32), 0x676d_656du32).unwrap();
    a.mov(eax, dword_ptr(0x9000u32)).unwrap();
    a.hlt().unwrap();
    let map = mem.mmap().unwrap();
    map.write(0x1000, &a.assemble(0x1000).unwrap()).unwrap();
    map.write(0x9000, b"host").unwrap();
    let outcome = vm.convert(0x8000, 2, Attribute::Private);
    assert_eq!(outcome.result, Ok(()));
    assert_eq!(mem.pin(0x8000, 4).unwrap_err().errno(), libc::EFAULT);
    assert_eq!(map.write(0x9000, b"x").unwrap_err().errno(), libc::EFAULT);

    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.enter_protected_mode(0x1000, 0x1000).unwrap();
    assert_eq!(vcpu.run(&mut Quiet).unwrap(), VcpuStop::Halted);
    let regs = vcpu.fd().get_regs().unwrap();
    assert_eq!(
        &(regs.rax as u32).to_le_bytes(),
        b"host",
        "a private page, read"
    );
    let mut marker = [0u8; 4];
    assert_eq!(
        map.read(0x8000, &mut marker).unwrap_err().errno(),
        libc::EFAULT
    );
    assert_eq!(vm.convert(0x8000, 1, Attribute::Shared).result, Ok(()));
    map.read(0x8000, &mut marker).unwrap();
    assert_eq!(u32::from_le_bytes(marker), 0x676d_656d, "the guest's write");
}

/// A confidential guest's 16 GiB, created private and bound as one slot;
/// the guest asks to share one page in every 2 MiB (8,192 requests through
/// the `GpaMap`, as `KVM_HC_MAP_GPA_RANGE` brings them) while the VMM keeps
/// two host mappings. Every request gets 0: a share is never refused for
/// VMAs under guard markers.
#[test]
fn a_guest_sharing_one_page_in_every_2_mib_of_16_gib_is_never_refused() {
    if kvm_common::host().is_none() {
        return;
    }
    const GIB: u64 = 1 << 30;
    const CHUNK: u64 = 2 << 20;
    let vm = Vm::new().unwrap();
    let mem = Arc::new(
        vm.create_memory(16 * GIB, Flags::MMAP, Options::new())
            .unwrap(),
    );
    let _maps = [mem.mmap().unwrap(), mem.mmap().unwrap()];
    let _slot = vm
        .bind(0, 4 * GIB, &mem, 0, 16 * GIB, MemslotFlags::empty())
        .unwrap();
    let mut refused = Vec::new();
    for chunk in 0..16 * GIB / CHUNK {
        let gpa = 4 * GIB + chunk * CHUNK + (1 + chunk % 500) * PAGE_SIZE;
        let outcome = vm.convert(gpa, 1, Attribute::Shared);
        if outcome.guest_ret() != 0 {
            refused.push((gpa, outcome.errno()));
        }
    }
    assert!(
        refused.is_empty(),
        "{} refused, first {:?}",
        refused.len(),
        refused.first()
    );
    assert_eq!(mem.stats().pages_shared, 16 * GIB / CHUNK);
    assert!(mem.stats().vmas_spent <= mem.options().vma_budget.unwrap());
}
