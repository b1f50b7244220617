//! Kernel guest_memfd backing and memslot bindings on the real `/dev/kvm`.

#[path = "common/kvm.rs"]
mod kvm_common;

use std::sync::Arc;

use gmem::kvm::{MemslotError, MemslotFlags, Vm};
use gmem::{Attribute, BackingKind, Flags, GuestMemfd, PAGE_SIZE};

const MIB: u64 = 1 << 20;
const NONE: MemslotFlags = MemslotFlags::empty();

#[test]
fn kernel_backing_follows_gmem_state() {
    let Some(_) = kvm_common::host() else { return };
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
    let mem = Arc::new(
        vm.create_guest_memfd(16 * MIB, Flags::MMAP | Flags::INIT_SHARED)
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
    // A file of another VM, or a plain memfd, cannot be bound.
    let other = Vm::new().unwrap();
    let foreign = Arc::new(other.create_guest_memfd(MIB, Flags::MMAP).unwrap());
    assert_eq!(
        errno(vm.bind(2, 128 * MIB, &foreign, 0, MIB, NONE)),
        libc::EINVAL
    );
    let memfd = Arc::new(GuestMemfd::new(MIB, Flags::MMAP).unwrap());
    assert_eq!(
        errno(vm.bind(2, 128 * MIB, &memfd, 0, MIB, NONE)),
        libc::EINVAL
    );
    // Deleting a slot frees its guest and file ranges.
    drop(first);
    let again = vm.bind(0, 0, &mem, 0, 8 * MIB, NONE).unwrap();
    assert_eq!((again.slot(), second.gpa()), (0, 64 * MIB));
}
