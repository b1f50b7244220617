//! One test per rule of sections 3 to 5 of the specification
//! (`guest_memfd.md`): creation and file operations, conversion, references.

mod common;

use std::sync::{Arc, Mutex};

use Attribute::{Private, Shared};
use common::{read_fault, reads_ok};
use gmem::{Attribute, ConversionListener, Flags, GuestMemfd, PAGE_SIZE, Refusal};

const P: u64 = PAGE_SIZE;

fn shared(pages: u64) -> GuestMemfd {
    GuestMemfd::new(pages * P, Flags::MMAP | Flags::INIT_SHARED).unwrap()
}

// ---- 3. Creation and file operations ----

#[test]
fn size_must_be_nonzero_and_page_aligned() {
    for size in [0, 1, P - 1, P + 1, 3 * P + 17] {
        let err = GuestMemfd::new(size, Flags::MMAP).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "size {size}");
    }
    assert_eq!(GuestMemfd::new(P, Flags::empty()).unwrap().size(), P);
}

#[test]
fn unknown_flag_is_einval() {
    for bits in [1 << 2, 1 << 63, 0x7] {
        let err = GuestMemfd::new(P, Flags::from_bits_retain(bits)).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "flags {bits:#x}");
    }
    assert_eq!(Flags::MMAP.bits(), 1);
    assert_eq!(Flags::INIT_SHARED.bits(), 2);
}

#[test]
fn initial_state_is_private_unless_init_shared() {
    let private = GuestMemfd::new(4 * P, Flags::MMAP).unwrap();
    let shared = shared(4);
    for page in 0..4 {
        assert_eq!(private.attribute(page * P).unwrap(), Private);
        assert_eq!(shared.attribute(page * P + 5).unwrap(), Shared);
    }
    assert_eq!(private.stats().pages_private, 4);
    assert_eq!(shared.stats().pages_shared, 4);
    assert_eq!(shared.attribute(4 * P).unwrap_err().errno(), libc::EINVAL);
}

#[test]
fn mmap_needs_the_mmap_flag() {
    let mem = GuestMemfd::new(P, Flags::INIT_SHARED).unwrap();
    assert_eq!(mem.mmap().unwrap_err().errno(), libc::ENODEV);
    assert_eq!(mem.mmap_len(2 * P).unwrap_err().errno(), libc::ENODEV);
    assert_eq!(shared(1).mmap_len(0).unwrap_err().errno(), libc::EINVAL);
}

#[test]
fn mapping_past_the_end_sigbuses_without_disturbing_pages_inside() {
    let mem = shared(2);
    let map = mem.mmap_len(4 * P).unwrap();
    assert_eq!(map.len(), 4 * P);
    map.write(P, b"inside").unwrap();
    assert_eq!(
        read_fault(&map, 2 * P),
        Some(libc::SIGBUS),
        "page at the end of the file must SIGBUS"
    );
    assert_eq!(read_fault(&map, 4 * P - 1), Some(libc::SIGBUS));
    assert!(reads_ok(&map, P));
    let mut buf = [0u8; 6];
    map.read(P, &mut buf).unwrap();
    assert_eq!(&buf, b"inside");
    // Copies past the file are EINVAL, not a fault.
    assert_eq!(map.read(2 * P, &mut buf).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(
        map.write(2 * P - 3, b"abcd").unwrap_err().errno(),
        libc::EINVAL
    );
}

#[test]
fn fallocate_modes_follow_guest_memfd() {
    use gmem::falloc::{KEEP_SIZE, PUNCH_HOLE};
    let mem = shared(4);
    assert_eq!(
        mem.fallocate(0, 0, P).unwrap_err().errno(),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        mem.fallocate(PUNCH_HOLE, 0, P).unwrap_err().errno(),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        mem.fallocate(KEEP_SIZE | 0x8, 0, P).unwrap_err().errno(),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        mem.fallocate(KEEP_SIZE, 1, P).unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(
        mem.fallocate(KEEP_SIZE, 0, P + 1).unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(
        mem.fallocate(KEEP_SIZE, 0, 0).unwrap_err().errno(),
        libc::EINVAL
    );
    mem.fallocate(KEEP_SIZE, 0, P).unwrap();
    mem.fallocate(KEEP_SIZE | PUNCH_HOLE, 0, P).unwrap();
}

#[test]
fn fallocate_ending_past_the_largest_offset_is_efbig() {
    use gmem::falloc::{KEEP_SIZE, PUNCH_HOLE};
    let mem = shared(4);
    let max = i64::MAX as u64;
    // offset + len > i64::MAX (both non-negative): EFBIG, as vfs_fallocate.
    for (offset, len) in [
        (P, max - P + 1),
        (max - P + 1, 2 * P),
        (max / 2 + 1, max / 2 + 1),
    ] {
        for mode in [KEEP_SIZE, KEEP_SIZE | PUNCH_HOLE] {
            let err = mem.fallocate(mode, offset, len).unwrap_err();
            assert_eq!(err.errno(), libc::EFBIG, "{mode} {offset:#x}+{len:#x}");
        }
    }
    // A negative offset or length is EINVAL; an end up to i64::MAX is no
    // EFBIG (past this file: EINVAL to allocate, a no-op to punch).
    assert_eq!(mem.allocate(max + 1, P).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(mem.allocate(0, 1 << 63).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(mem.allocate(P, max - P).unwrap_err().errno(), libc::EINVAL);
    mem.punch_hole(4 * P, (max - 4 * P) & !(P - 1)).unwrap();
}

#[test]
fn allocate_past_the_end_is_einval_punch_past_the_end_is_a_noop() {
    let mem = shared(4);
    assert_eq!(mem.allocate(4 * P, P).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(
        mem.allocate(3 * P, 2 * P).unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(
        mem.allocate(u64::MAX - P + 1, P).unwrap_err().errno(),
        libc::EINVAL
    );
    mem.punch_hole(4 * P, P).unwrap();
    mem.punch_hole(100 * P, 8 * P).unwrap();
    assert_eq!(mem.punch_hole(P, 0).unwrap_err().errno(), libc::EINVAL);
}

#[test]
fn allocate_and_punch_change_allocation() {
    let mem = shared(8);
    assert_eq!(mem.stats().pages_allocated, Some(0));
    mem.allocate(0, 8 * P).unwrap();
    assert_eq!(mem.stats().pages_allocated, Some(8));
    // A punch straddling the end frees the part inside.
    mem.punch_hole(6 * P, 4 * P).unwrap();
    assert_eq!(mem.stats().pages_allocated, Some(6));
}

#[test]
fn punch_zeroes_and_keeps_state() {
    let mem = shared(4);
    let map = mem.mmap().unwrap();
    map.write(0, &[7u8; 2 * P as usize]).unwrap();
    mem.set_attributes(P, P, Private).unwrap();
    mem.punch_hole(0, 2 * P).unwrap();
    assert_eq!(mem.attribute(0).unwrap(), Shared);
    assert_eq!(
        mem.attribute(P).unwrap(),
        Private,
        "a punch keeps a private page private"
    );
    let mut buf = [1u8; 16];
    map.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0; 16]);
    mem.set_attributes(P, P, Shared).unwrap();
    map.read(P + 100, &mut buf).unwrap();
    assert_eq!(buf, [0; 16], "the private page was freed too");
}

// ---- 4. Conversion ----

#[test]
fn malformed_requests_are_einval_and_change_nothing() {
    let mem = shared(4);
    let cases = [
        (0, 0),
        (1, P),
        (0, P + 1),
        (P, u64::MAX - P + 1),
        (4 * P, P),
        (3 * P, 2 * P),
    ];
    for (offset, len) in cases {
        let err = mem.set_attributes(offset, len, Private).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "{offset:#x}+{len:#x}");
        assert_eq!(err.error_offset(), offset);
    }
    assert_eq!(mem.stats().pages_shared, 4);
}

#[test]
fn nothing_to_change_succeeds_at_once_without_a_check() {
    let mem = shared(4);
    let pin = mem.pin(0, 4 * P).unwrap();
    // Every page is already shared: no unmap, no check, no drain, despite the pin.
    mem.set_attributes(0, 4 * P, Shared).unwrap();
    let stats = mem.stats();
    assert_eq!(
        (stats.conversions_to_shared, stats.drains, stats.eagain),
        (0, 0, 0)
    );
    drop(pin);
    mem.set_attributes(0, P, Private).unwrap();
    mem.set_attributes(0, P, Private).unwrap();
    assert_eq!(mem.stats().conversions_to_private, 1);
}

#[test]
fn to_private_unmaps_every_live_mapping_and_later_ones() {
    let mem = shared(4);
    let first = mem.mmap().unwrap();
    let second = mem.mmap_len(8 * P).unwrap();
    assert!(reads_ok(&first, P) && reads_ok(&second, P));
    mem.set_attributes(P, 2 * P, Private).unwrap();
    for map in [&first, &second] {
        assert!(reads_ok(map, 0));
        assert!(!reads_ok(map, P));
        assert!(!reads_ok(map, 3 * P - 1));
        assert!(reads_ok(map, 3 * P));
    }
    let later = mem.mmap().unwrap();
    assert!(!reads_ok(&later, 2 * P));
    assert!(reads_ok(&later, 3 * P));
    mem.set_attributes(P, 2 * P, Shared).unwrap();
    for map in [&first, &second, &later] {
        assert!(reads_ok(map, 2 * P));
    }
}

#[test]
fn private_pages_are_efault_for_copies_and_pins() {
    let mem = shared(4);
    let map = mem.mmap().unwrap();
    mem.set_attributes(2 * P, P, Private).unwrap();
    let mut buf = vec![0u8; 3 * P as usize];
    let err = map.read(P + 10, &mut buf[..2 * P as usize]).unwrap_err();
    assert_eq!((err.errno(), err_offset(&err)), (libc::EFAULT, 2 * P));
    assert_eq!(
        map.write(2 * P + 5, b"x").unwrap_err().errno(),
        libc::EFAULT
    );
    let err = mem.pin(P, 2 * P).unwrap_err();
    assert_eq!((err.errno(), err_offset(&err)), (libc::EFAULT, 2 * P));
    map.read(0, &mut buf[..2 * P as usize]).unwrap();
    assert_eq!(mem.pin(4 * P, 1).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(mem.pin(0, 0).unwrap_err().errno(), libc::EINVAL);
}

fn err_offset(err: &gmem::Error) -> u64 {
    match err {
        gmem::Error::Private { offset } | gmem::Error::Pinned { offset } => *offset,
        other => panic!("no offset in {other:?}"),
    }
}

#[test]
fn a_live_pin_makes_the_conversion_eagain_and_nothing_changes() {
    let mem = shared(8);
    let map = mem.mmap().unwrap();
    let pin = mem.pin(5 * P + 100, 2 * P).unwrap(); // pages 5, 6 and 7
    let err = mem.set_attributes(2 * P, 6 * P, Private).unwrap_err();
    assert_eq!((err.errno(), err.error_offset()), (libc::EAGAIN, 5 * P));
    // All or nothing: every page is still shared and mapped.
    for page in 0..8 {
        assert_eq!(mem.attribute(page * P).unwrap(), Shared);
    }
    assert!(reads_ok(&map, 2 * P) && reads_ok(&map, 5 * P));
    // The check drained once, since the pin could have been a parked release.
    let stats = mem.stats();
    assert_eq!((stats.eagain, stats.drains, stats.pins_live), (1, 1, 1));
    // The error offset is clamped to the start of the request.
    let err = mem.set_attributes(6 * P, P, Private).unwrap_err();
    assert_eq!(err.error_offset(), 6 * P);
    drop(pin);
    mem.set_attributes(2 * P, 6 * P, Private).unwrap();
    assert_eq!(mem.stats().pins_live, 0);
}

#[test]
fn a_dropped_pin_converts_at_the_first_attempt_through_one_drain() {
    let mem = shared(4);
    drop(mem.pin(P, P).unwrap());
    assert_eq!(mem.stats().drains, 0);
    mem.set_attributes(0, 4 * P, Private).unwrap();
    assert_eq!(
        mem.stats().drains,
        1,
        "the parked release needed exactly one drain"
    );
    // Another thread's parked release is drained too, the thread still alive.
    mem.set_attributes(0, 4 * P, Shared).unwrap();
    let (parked, proceed) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
    std::thread::scope(|s| {
        s.spawn(|| {
            drop(mem.pin(2 * P, P).unwrap());
            parked.wait();
            proceed.wait();
        });
        parked.wait();
        mem.set_attributes(2 * P, P, Private).unwrap();
        proceed.wait();
    });
    assert_eq!(mem.stats().drains, 2);
}

#[test]
fn to_shared_has_no_reference_check() {
    let mem = shared(4);
    mem.set_attributes(2 * P, 2 * P, Private).unwrap();
    let pin = mem.pin(0, 2 * P).unwrap();
    // Pinned shared pages in the range do not stop a conversion to shared.
    mem.set_attributes(0, 4 * P, Shared).unwrap();
    assert_eq!(mem.stats().drains, 0);
    assert_eq!(mem.attribute(3 * P).unwrap(), Shared);
    drop(pin);
}

#[test]
fn contents_survive_both_ways() {
    let mem = shared(4);
    let map = mem.mmap().unwrap();
    let pattern: Vec<u8> = (0..4 * P).map(|i| (i * 7 % 251) as u8).collect();
    map.write(0, &pattern).unwrap();
    mem.set_attributes(0, 4 * P, Private).unwrap();
    mem.set_attributes(0, 4 * P, Shared).unwrap();
    let mut back = vec![0u8; pattern.len()];
    map.read(0, &mut back).unwrap();
    assert_eq!(back, pattern);
    let pin = mem.pin(P, 10).unwrap();
    let mut ten = [0u8; 10];
    pin.read(0, &mut ten).unwrap();
    assert_eq!(&ten, &pattern[P as usize..P as usize + 10]);
}

#[test]
fn punching_a_pinned_page_is_ebusy() {
    let mem = shared(4);
    let map = mem.mmap().unwrap();
    map.write(0, &[3u8; 4 * P as usize]).unwrap();
    let pin = mem.pin(2 * P, 1).unwrap();
    let err = mem.punch_hole(0, 4 * P).unwrap_err();
    assert_eq!((err.errno(), err_offset(&err)), (libc::EBUSY, 2 * P));
    let mut buf = [0u8; 1];
    map.read(0, &mut buf).unwrap();
    assert_eq!(buf, [3], "a failed punch frees nothing");
    drop(pin);
    mem.punch_hole(0, 4 * P).unwrap();
    map.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0]);
}

#[test]
fn pinning_allocates_and_pins_copy_within_their_range() {
    let mem = shared(4);
    let pin = mem.pin(P + 8, 2 * P).unwrap();
    assert_eq!(mem.stats().pages_allocated, Some(3));
    assert_eq!((pin.offset(), pin.len()), (P + 8, 2 * P));
    pin.write(2 * P - 4, b"tail").unwrap();
    assert_eq!(
        pin.write(2 * P - 3, b"tail").unwrap_err().errno(),
        libc::EINVAL
    );
    let mut buf = [0u8; 4];
    mem.mmap().unwrap().read(3 * P + 4, &mut buf).unwrap();
    assert_eq!(&buf, b"tail");
}

#[derive(Default)]
struct Recorder {
    refuse: Mutex<bool>,
    events: Mutex<Vec<String>>,
}

impl ConversionListener for Recorder {
    fn before_private(&self, offset: u64, len: u64) -> Result<(), Refusal> {
        self.events
            .lock()
            .unwrap()
            .push(format!("before {offset:#x}+{len:#x}"));
        if *self.refuse.lock().unwrap() {
            return Err(Refusal::new("device busy"));
        }
        Ok(())
    }

    fn converted(&self, offset: u64, len: u64, to: Attribute) {
        self.events
            .lock()
            .unwrap()
            .push(format!("{to:?} {offset:#x}+{len:#x}"));
    }
}

#[test]
fn listeners_hear_conversions_and_may_refuse() {
    let mem = shared(4);
    let map = mem.mmap().unwrap();
    let recorder = Arc::new(Recorder::default());
    let id = mem.add_listener(recorder.clone());
    *recorder.refuse.lock().unwrap() = true;
    let err = mem.set_attributes(0, P, Private).unwrap_err();
    assert_eq!((err.errno(), err.error_offset()), (libc::EBUSY, 0));
    assert!(reads_ok(&map, 0), "a refused conversion changes nothing");
    assert_eq!(mem.attribute(0).unwrap(), Shared);
    *recorder.refuse.lock().unwrap() = false;
    mem.set_attributes(0, P, Private).unwrap();
    mem.set_attributes(0, P, Shared).unwrap();
    assert!(mem.remove_listener(id));
    mem.set_attributes(P, P, Private).unwrap();
    let events = recorder.events.lock().unwrap().clone();
    assert_eq!(
        events,
        [
            "before 0x0+0x1000",
            "before 0x0+0x1000",
            "Private 0x0+0x1000",
            "Shared 0x0+0x1000"
        ]
    );
    assert_eq!(mem.stats().refused, 1);
}

#[test]
fn a_listener_may_drop_pins_before_the_check() {
    struct DropPins<'a>(Mutex<Vec<gmem::Pin<'a>>>);
    impl ConversionListener for DropPins<'static> {
        fn before_private(&self, _: u64, _: u64) -> Result<(), Refusal> {
            self.0.lock().unwrap().clear();
            Ok(())
        }
    }
    let mem: &'static GuestMemfd = Box::leak(Box::new(shared(2)));
    let listener = Arc::new(DropPins(Mutex::new(vec![mem.pin(0, 2 * P).unwrap()])));
    mem.add_listener(listener);
    mem.set_attributes(0, 2 * P, Private).unwrap();
}

#[test]
fn a_size_past_the_address_space_is_an_error_not_an_abort() {
    for size in [1 << 50, 1 << 62, u64::MAX - P + 1] {
        let err = GuestMemfd::new(size, Flags::MMAP).unwrap_err();
        assert!(
            [libc::EINVAL, libc::ENOMEM, libc::EFBIG].contains(&err.errno()),
            "{size:#x}: {err}"
        );
    }
}
