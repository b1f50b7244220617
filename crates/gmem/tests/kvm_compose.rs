//! gmem inside a VMM's own KVM code: an adopted `VmFd` and kernel
//! guest_memfd, memslot and kernel flags, the guest-physical map's
//! conversions across slots, and `handle_exit` on synthesized exits.
//!
//! The tests of slots and conversions run on the VM's guest memory
//! (`Vm::create_memory`: memfd slots where the host has no guest_memfd);
//! those of the kernel guest_memfd itself skip without one.

#[path = "common/kvm.rs"]
mod kvm_common;

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::ops::ControlFlow;

use gmem::kvm::{
    CONVERSION_PORT, ConversionOutcome, ConversionPolicy, ConversionRequest, ExitRegs, GuestIo,
    KernelFlags, MemslotError, MemslotFlags, RequestChannel, VcpuStop, Vm,
    uapi::KVM_HC_MAP_GPA_RANGE, uapi::KVM_MAP_GPA_RANGE_ENCRYPTED,
};
use gmem::{
    Attribute, ConversionError, ConversionListener, Flags, GuestMemfd, Options, PAGE_SIZE, Pin,
    Refusal,
};
use iced_x86::code_asm::{CodeAssembler, al, dx, eax, ebx, ecx, esi};
use kvm_bindings::{KVM_MEMORY_EXIT_FLAG_PRIVATE, kvm_create_guest_memfd};
use kvm_ioctls::{HypercallExit, Kvm, VcpuExit, VmFd};

const P: u64 = PAGE_SIZE;
const NONE: MemslotFlags = MemslotFlags::empty();
const SHARED: Flags = Flags::MMAP.union(Flags::INIT_SHARED);

fn vm_fd() -> Arc<VmFd> {
    Arc::new(Kvm::new().unwrap().create_vm().unwrap())
}

/// A kernel guest_memfd made with raw `kvm-ioctls`, as a VMM would.
fn raw_guest_memfd(vm: &VmFd, size: u64) -> OwnedFd {
    raw_guest_memfd_with(vm, size, 3) // GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
}

/// A kernel guest_memfd made with raw `kvm-ioctls` and the kernel's `flags`.
fn raw_guest_memfd_with(vm: &VmFd, size: u64, flags: u64) -> OwnedFd {
    let request = kvm_create_guest_memfd {
        size,
        flags,
        reserved: [0; 6],
    };
    let fd = vm.create_guest_memfd(request).unwrap();
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The VM's guest memory: a kernel guest_memfd, or a memfd-backed file
/// where the host has none.
fn memory(vm: &Vm, size: u64, flags: Flags) -> GuestMemfd {
    let mem = vm.create_memory(size, flags, Options::default()).unwrap();
    assert_eq!(mem.backing_kind(), vm.memory_backing());
    mem
}

/// The states of the pages of `mem`.
fn states(mem: &GuestMemfd) -> Vec<Attribute> {
    (0..mem.size() / P)
        .map(|page| mem.attribute(page * P).unwrap())
        .collect()
}

/// A VM with two files of 4 pages, bound back to back at guest-physical 0
/// and 4 pages (slots 0 and 1).
fn two_slots(vm: &Vm, flags: Flags) -> [(Arc<GuestMemfd>, gmem::kvm::Memslot); 2] {
    [0, 1].map(|i| {
        let mem = Arc::new(memory(vm, 4 * P, flags));
        let slot = vm
            .bind(i, u64::from(i) * 4 * P, &mem, 0, 4 * P, NONE)
            .unwrap();
        (mem, slot)
    })
}

fn quick_policy(vm: &Vm, max_attempts: u32) {
    vm.set_conversion_policy(ConversionPolicy {
        max_attempts,
        first_backoff: Duration::from_micros(1),
        max_backoff: Duration::from_micros(1),
    });
}

#[test]
fn a_vm_fd_made_with_kvm_ioctls_is_adopted() {
    let Some(support) = kvm_common::host() else {
        return;
    };
    let fd = vm_fd();
    let vm = Vm::from_vm_fd(fd.clone()).unwrap();
    assert!(Arc::ptr_eq(vm.vm_fd(), &fd));
    let offered = support.exit_hypercall & (1 << KVM_HC_MAP_GPA_RANGE) != 0;
    assert_eq!(vm.hypercall_exits(), offered);
    assert_eq!(vm.attribute_sync(), support.attribute_sync());
    assert_eq!(vm.memory_backing(), support.memory_backing());
    let mem = Arc::new(memory(&vm, 4 * P, SHARED));
    let slot = vm.bind(3, 1 << 20, &mem, 0, 4 * P, NONE).unwrap();
    assert_eq!((slot.slot(), slot.flags()), (3, NONE));
    assert_eq!(
        vm.gpa_map().slots(),
        vec![(3, (1 << 20)..(1 << 20) + 4 * P, 0)]
    );
    // gmem passes the flags and reports the kernel's answer: Linux 6.18
    // refuses dirty logging and read-only with KVM_MEM_GUEST_MEMFD (the same
    // binding without them succeeds above, so the flags reached it), and
    // takes both on a memfd slot.
    let memfd_slots = vm.memory_backing() == gmem::BackingKind::Memfd;
    for (i, flags) in [MemslotFlags::LOG_DIRTY_PAGES, MemslotFlags::READONLY]
        .into_iter()
        .enumerate()
    {
        let other = Arc::new(memory(&vm, 4 * P, SHARED));
        let gpa = (2 + i as u64) << 20;
        match vm.bind(4 + i as u32, gpa, &other, 0, 4 * P, flags) {
            Ok(bound) => assert_eq!(bound.flags(), flags),
            Err(refused) => {
                assert!(!memfd_slots, "a memfd slot takes {flags:?}: {refused}");
                let errno = rustix::io::Errno::INVAL;
                assert_eq!(refused, MemslotError::Kernel { errno });
            }
        }
    }
    // The VMM's handle stays usable, and the VM outlives gmem's handle.
    drop(slot);
    drop(vm);
    let guest_memfd = fd.check_extension_raw(kvm_bindings::KVM_CAP_GUEST_MEMFD.into()) > 0;
    assert_eq!(guest_memfd, support.guest_memfd);
}

#[test]
fn a_kernel_guest_memfd_made_by_the_vmm_is_adopted_and_checked() {
    let Some(_) = kvm_common::guest_memfd_host() else {
        return;
    };
    let vm = Vm::from_vm_fd(vm_fd()).unwrap();
    let adopt =
        |fd, size| GuestMemfd::from_kernel_guest_memfd(fd, size, SHARED, Options::default());
    let wrong_size = adopt(raw_guest_memfd(vm.vm_fd(), 4 * P), 8 * P).unwrap_err();
    assert_eq!(wrong_size.errno(), libc::EINVAL);
    assert!(wrong_size.to_string().contains("size"), "{wrong_size}");
    // SAFETY: a plain memfd_create call; the name is a C string.
    let memfd = unsafe { libc::memfd_create(c"not-gmem".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(memfd >= 0);
    // SAFETY: the fd was just created and nothing else owns it.
    let memfd = unsafe { OwnedFd::from_raw_fd(memfd) };
    assert_eq!(rustix_size(&memfd, 4 * P), 4 * P);
    let not_gmem = adopt(memfd, 4 * P).unwrap_err();
    assert_eq!(not_gmem.errno(), libc::EINVAL);
    assert!(not_gmem.to_string().contains("kvm-gmem"), "{not_gmem}");

    let mem = Arc::new(adopt(raw_guest_memfd(vm.vm_fd(), 4 * P), 4 * P).unwrap());
    assert_eq!(mem.backing_kind(), gmem::BackingKind::KernelGuestMemfd);
    let map = mem.mmap().unwrap();
    map.write(0, b"adopted").unwrap();
    let _slot = vm.bind(0, 0, &mem, 0, 4 * P, NONE).unwrap();
    assert!(vm.convert(0, 1, Attribute::Private).result.is_ok());
    assert_eq!(map.write(0, b"x").unwrap_err().errno(), libc::EFAULT);
    // gmem does not know an adopted file's VM: the kernel refuses it here.
    let other = Vm::new().unwrap();
    let foreign = other.bind(0, 0, &mem, 0, 4 * P, NONE).unwrap_err();
    assert_eq!(
        foreign,
        MemslotError::Kernel {
            errno: rustix::io::Errno::INVAL
        }
    );
}

/// A guest_memfd made without `INIT_SHARED` is private to the kernel
/// throughout: adopting it would let the first pinned copy raise `SIGBUS`,
/// so adoption refuses it, whatever gmem's own flags say.
#[test]
fn a_kernel_guest_memfd_made_without_init_shared_is_refused() {
    let Some(_) = kvm_common::guest_memfd_host() else {
        return;
    };
    let vm = vm_fd();
    for flags in [SHARED, Flags::MMAP] {
        let fd = raw_guest_memfd_with(&vm, 4 * P, 1); // GUEST_MEMFD_FLAG_MMAP only
        let refused = GuestMemfd::from_kernel_guest_memfd(fd, 4 * P, flags, Options::default())
            .expect_err("a guest_memfd the host cannot fault in");
        assert_eq!(refused.errno(), libc::EINVAL, "{refused}");
        assert!(
            matches!(refused, gmem::Error::NotAdoptable { .. }),
            "{refused:?}"
        );
        assert!(refused.to_string().contains("INIT_SHARED"), "{refused}");
    }
    let fd = raw_guest_memfd_with(&vm, 4 * P, 3);
    let mem = GuestMemfd::from_kernel_guest_memfd(fd, 4 * P, SHARED, Options::default()).unwrap();
    let mut buf = [1u8; 4];
    mem.pin(0, 4).unwrap().read(0, &mut buf).unwrap();
    assert_eq!(buf, [0; 4], "the probe only faulted page 0 in");
}

/// Sets the size of a fresh memfd (so that only its kind is wrong).
fn rustix_size(fd: &OwnedFd, size: u64) -> u64 {
    use std::os::fd::AsRawFd;
    // SAFETY: `fd` is an open memfd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
    size
}

/// Where the host has no guest_memfd, `create_guest_memfd` says so with a
/// typed `EOPNOTSUPP` and `create_memory` gives a memfd-backed file, which
/// binds as a memfd slot; unknown kernel flags are `EINVAL` on every host.
#[test]
fn without_guest_memfd_create_memory_falls_back_to_a_memfd() {
    let Some(support) = kvm_common::host() else {
        return;
    };
    let vm = Vm::new().unwrap();
    let made = vm.create_guest_memfd(4 * P, SHARED);
    let mem = vm.create_memory(4 * P, SHARED, Options::default()).unwrap();
    if support.memory_backing() == gmem::BackingKind::KernelGuestMemfd {
        assert_eq!(made.unwrap().backing_kind(), mem.backing_kind());
    } else {
        let err = made.unwrap_err();
        assert!(matches!(err, gmem::Error::Os { .. }), "{err:?}");
        assert_eq!(err.errno(), libc::EOPNOTSUPP);
        assert_eq!(mem.backing_kind(), gmem::BackingKind::Memfd);
    }
    let mem = Arc::new(mem);
    let _slot = vm.bind(0, 0, &mem, 0, 4 * P, NONE).unwrap();
    assert_eq!(vm.gpa_map().slots(), vec![(0, 0..4 * P, 0)]);
    let unknown = KernelFlags::from_bits_retain(1 << 20);
    let err = vm.create_guest_memfd_with_kernel_flags(P, SHARED, Options::default(), unknown);
    assert_eq!(err.unwrap_err().errno(), libc::EINVAL);
}

#[test]
fn unsupported_kernel_flags_are_refused_by_name() {
    let Some(support) = kvm_common::guest_memfd_host() else {
        return;
    };
    let vm = Vm::new().unwrap();
    for flag in [KernelFlags::NO_DIRECT_MAP, KernelFlags::WRITE] {
        let made = vm.create_guest_memfd_with_kernel_flags(P, SHARED, Options::default(), flag);
        if support.guest_memfd_flags & flag.bits() != 0 {
            assert!(made.is_ok(), "{flag:?}: {made:?}");
            continue;
        }
        let err = made.unwrap_err();
        assert_eq!(err.errno(), libc::EOPNOTSUPP);
        let name = if flag == KernelFlags::WRITE {
            "FLAG_WRITE"
        } else {
            "NO_DIRECT_MAP"
        };
        assert!(err.to_string().contains(name), "{err}");
    }
    let unknown = KernelFlags::from_bits_retain(1 << 20);
    let err = vm.create_guest_memfd_with_kernel_flags(P, SHARED, Options::default(), unknown);
    assert_eq!(err.unwrap_err().errno(), libc::EINVAL);
}

#[test]
fn a_range_spanning_two_files_converts_slot_by_slot() {
    let Some(_) = kvm_common::host() else { return };
    let vm = Vm::new().unwrap();
    let [(a, _sa), (b, _sb)] = two_slots(&vm, SHARED);
    let (file, offset) = vm.gpa_map().translate(5 * P, 2 * P).unwrap();
    assert!(Arc::ptr_eq(&file, &b) && offset == P);
    assert!(
        vm.gpa_map().translate(3 * P, 2 * P).is_none(),
        "spans two slots"
    );
    let outcome = vm.convert(2 * P, 4, Attribute::Private);
    assert_eq!(
        (outcome.result, outcome.attempts, outcome.failed_gpa),
        (Ok(()), 1, None)
    );
    use Attribute::{Private as X, Shared as S};
    assert_eq!(states(&a), [S, S, X, X]);
    assert_eq!(states(&b), [X, X, S, S]);
    // Not fully covered: EINVAL at the first address outside, nothing changed.
    let outside = vm.convert(6 * P, 4, Attribute::Private);
    assert_eq!(outside.errno(), libc::EINVAL);
    assert_eq!(outside.failed_gpa, Some(8 * P));
    assert_eq!(states(&b), [X, X, S, S]);
}

#[test]
fn a_failure_in_the_second_file_rolls_the_first_back() {
    let Some(_) = kvm_common::host() else { return };
    let vm = Vm::new().unwrap();
    let [(a, _sa), (b, _sb)] = two_slots(&vm, SHARED);
    quick_policy(&vm, 3);
    let let_go = Arc::new(Mutex::new(Vec::new()));
    let heard = let_go.clone();
    vm.set_let_go(Arc::new(move |gpa, len| {
        heard.lock().unwrap().push((gpa, len))
    }));
    a.set_attributes(P, P, Attribute::Private).unwrap();
    let pin = b.pin(2 * P, 16).unwrap();
    let outcome = vm.convert(0, 8, Attribute::Private);
    assert_eq!(
        outcome.result,
        Err(ConversionError::Again {
            error_offset: 2 * P
        })
    );
    assert_eq!(
        outcome.failed_gpa,
        Some(6 * P),
        "the pinned page of the second slot"
    );
    assert_eq!(outcome.attempts, 3);
    assert!(outcome.rollback_failures.is_empty());
    use Attribute::{Private as X, Shared as S};
    assert_eq!(states(&a), [S, X, S, S], "rolled back to each page's state");
    assert_eq!(states(&b), [S, S, S, S]);
    assert_eq!(*let_go.lock().unwrap(), vec![(4 * P, 4 * P); 2]);
    drop(pin);
    assert!(vm.convert(0, 8, Attribute::Private).result.is_ok());
    assert_eq!(states(&b), [X, X, X, X]);
    let totals = vm.conversion_totals();
    assert_eq!(
        (totals.requests, totals.succeeded, totals.failed),
        (2, 1, 1)
    );
}

/// Refuses every commit of its file, and meanwhile pins a page of another
/// file, so that putting that one back to private fails.
struct RefuseAndPin {
    other: &'static GuestMemfd,
    pins: Mutex<Vec<Pin<'static>>>,
}

impl ConversionListener for RefuseAndPin {
    fn commit(&self, _: u64, _: u64, _: Attribute) -> Result<(), Refusal> {
        self.pins
            .lock()
            .unwrap()
            .push(self.other.pin(0, 8).unwrap());
        Err(Refusal::new("the test refuses"))
    }
}

#[test]
fn a_rollback_that_fails_is_reported() {
    let Some(_) = kvm_common::host() else { return };
    let vm = Vm::new().unwrap();
    let [(a, _sa), (b, _sb)] = two_slots(&vm, Flags::MMAP);
    quick_policy(&vm, 2);
    let other: &'static Arc<GuestMemfd> = Box::leak(Box::new(a.clone()));
    b.add_listener(Arc::new(RefuseAndPin {
        other,
        pins: Mutex::new(Vec::new()),
    }));
    let outcome = vm.convert(0, 8, Attribute::Shared);
    assert_eq!(outcome.errno(), libc::EBUSY);
    assert_eq!(outcome.failed_gpa, Some(4 * P));
    let [failure] = &outcome.rollback_failures[..] else {
        panic!("one part could not be put back: {outcome:?}")
    };
    assert_eq!((failure.gpa, failure.len), (0, 4 * P));
    assert_eq!(failure.error, ConversionError::Again { error_offset: 0 });
    assert_eq!(
        states(&a),
        [Attribute::Shared; 4],
        "left shared, and said so"
    );
    assert_eq!(vm.conversion_totals().rollback_failures, 1);
}

#[test]
fn handle_exit_serves_hypercalls_and_memory_faults() {
    let Some(_) = kvm_common::host() else { return };
    let vm = Vm::new().unwrap();
    let [(a, _sa), (b, _sb)] = two_slots(&vm, SHARED);
    quick_policy(&vm, 1);
    let enc = KVM_MAP_GPA_RANGE_ENCRYPTED;
    let hypercall = |gpa: u64, pages: u64, attrs: u64| {
        let mut ret = 7u64;
        let mut exit = VcpuExit::Hypercall(HypercallExit {
            nr: KVM_HC_MAP_GPA_RANGE,
            args: [gpa, pages, attrs, 0, 0, 0],
            ret: &mut ret,
            longmode: 1,
        });
        let served = vm.handle_exit(&mut exit).expect("a conversion exit");
        assert_eq!(served.request.channel, RequestChannel::Hypercall);
        assert_eq!(served.outcome.guest_ret(), ret);
        ret as i64
    };
    assert_eq!(hypercall(3 * P, 2, enc), 0);
    assert_eq!(
        (states(&a)[3], states(&b)[0]),
        (Attribute::Private, Attribute::Private)
    );
    assert_eq!(hypercall(3 * P, 2, 0), 0);
    let einval = -i64::from(libc::EINVAL);
    assert_eq!(hypercall(3 * P + 1, 1, enc), einval, "unaligned");
    assert_eq!(hypercall(0, 0, enc), einval, "no pages");
    assert_eq!(hypercall(0, u64::MAX, enc), einval, "wraps");
    assert_eq!(hypercall(0, 1, enc | 1 << 7), einval, "unknown attribute");
    assert_eq!(hypercall(0, 1, enc | 3), einval, "undefined page size");
    assert_eq!(hypercall(6 * P, 4, enc), einval, "past the slots");
    let pin = b.pin(0, 1).unwrap();
    assert_eq!(hypercall(3 * P, 2, enc), -i64::from(libc::EAGAIN));
    drop(pin);
    assert_eq!(
        states(&a)[3],
        Attribute::Shared,
        "nothing changed by failures"
    );

    let mut fault = VcpuExit::MemoryFault {
        flags: KVM_MEMORY_EXIT_FLAG_PRIVATE.into(),
        gpa: 5 * P,
        size: P,
    };
    let served = vm.handle_exit(&mut fault).unwrap();
    assert_eq!((served.request.gpa, served.request.pages), (5 * P, 1));
    assert!(served.outcome.result.is_ok());
    assert_eq!(states(&b)[1], Attribute::Private);
    let mut fault = VcpuExit::MemoryFault {
        flags: 0,
        gpa: 5 * P,
        size: P,
    };
    assert!(vm.handle_exit(&mut fault).unwrap().outcome.result.is_ok());
    assert_eq!(states(&b)[1], Attribute::Shared);

    // Not a conversion exit: untouched, for the VMM to handle.
    let mut ret = 7u64;
    let mut other_call = VcpuExit::Hypercall(HypercallExit {
        nr: 1,
        args: [0; 6],
        ret: &mut ret,
        longmode: 1,
    });
    assert!(vm.handle_exit(&mut other_call).is_none());
    assert_eq!(ret, 7);
    assert!(vm.handle_exit(&mut VcpuExit::Hlt).is_none());
}

/// Records the result port's `eax` and the conversions served.
#[derive(Default)]
struct Results {
    eax: Vec<u32>,
    served: Vec<(ConversionRequest, ConversionOutcome)>,
}

const RESULT_PORT: u16 = 0x99;

impl GuestIo for Results {
    fn io_out(&mut self, _: u64, port: u16, _: &[u8], regs: &ExitRegs) -> ControlFlow<()> {
        assert_eq!(port, RESULT_PORT);
        self.eax.push(regs.rax as u32);
        ControlFlow::Continue(())
    }

    fn converted(&mut self, request: &ConversionRequest, outcome: &ConversionOutcome) {
        self.served.push((*request, outcome.clone()));
    }
}

/// 32-bit code asking for each `(gpa, pages, attrs)` by port I/O and
/// reporting `eax` on [`RESULT_PORT`], then `hlt`.
fn port_requests(base: u64, requests: &[(u32, u32, u32)]) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    for &(gpa, pages, attrs) in requests {
        a.mov(ebx, gpa).unwrap();
        a.mov(ecx, pages).unwrap();
        a.mov(esi, attrs).unwrap();
        a.mov(dx, u32::from(CONVERSION_PORT)).unwrap();
        a.out(dx, al).unwrap();
        a.mov(dx, u32::from(RESULT_PORT)).unwrap();
        a.out(dx, eax).unwrap();
    }
    a.hlt().unwrap();
    a.assemble(base).unwrap()
}

#[test]
fn the_port_request_returns_the_negative_errno_to_the_guest() {
    let Some(_) = kvm_common::host() else { return };
    let vm = Vm::new().unwrap();
    let mem = Arc::new(memory(&vm, 16 * P, SHARED));
    let _slot = vm.bind(0, 0, &mem, 0, 16 * P, NONE).unwrap();
    let enc = KVM_MAP_GPA_RANGE_ENCRYPTED as u32;
    let code = port_requests(
        0x1000,
        &[
            (0x8000, 2, enc),
            (0x8001, 1, enc),
            (0xf000, 2, enc),
            (0x8000, 2, 0),
        ],
    );
    mem.mmap().unwrap().write(0x1000, &code).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.enter_protected_mode(0x1000, 0x1000).unwrap();
    let mut results = Results::default();
    assert_eq!(vcpu.run(&mut results).unwrap(), VcpuStop::Halted);
    let einval = (-libc::EINVAL) as u32;
    assert_eq!(results.eax, vec![0, einval, einval, 0]);
    let channels: Vec<_> = results.served.iter().map(|(r, _)| r.channel).collect();
    assert_eq!(channels, vec![RequestChannel::PortIo; 4]);
    assert_eq!(
        results.served[2].1.failed_gpa,
        Some(0x10000),
        "past the slot"
    );
    assert_eq!(
        vm.conversion_totals().requests,
        3,
        "the malformed one converts nothing"
    );
}

/// The VM's slots as a vm-memory view: one access across both files, and a
/// resident range that refuses conversion while the view lives.
#[test]
fn the_slots_as_a_vm_memory_view() {
    use vm_memory::{Bytes, GuestAddress};
    let Some(_) = kvm_common::host() else { return };
    let vm = Vm::new().unwrap();
    let [(a, _sa), (b, _sb)] = two_slots(&vm, SHARED);
    let view = vm
        .gpa_map()
        .guest_memory([(GuestAddress(7 * P), P)])
        .unwrap();
    assert_eq!(view.num_regions(), 2);
    // Across the two slots, so the two files.
    view.write_slice(b"gmem", GuestAddress(4 * P - 2)).unwrap();
    let (mut head, mut tail) = ([0u8; 2], [0u8; 2]);
    a.pin(4 * P - 2, 2).unwrap().read(0, &mut head).unwrap();
    b.pin(0, 2).unwrap().read(0, &mut tail).unwrap();
    assert_eq!((&head, &tail), (b"gm", b"em"));
    // The resident page (file b's last) is pinned for the view's life.
    let busy = vm.convert(7 * P, 1, Attribute::Private);
    assert_eq!(busy.errno(), libc::EAGAIN);
    drop(view);
    let done = vm.convert(7 * P, 1, Attribute::Private);
    assert_eq!(done.result, Ok(()));
}
