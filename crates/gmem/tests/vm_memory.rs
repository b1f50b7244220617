//! The vm-memory view: `Bytes` across regions and files, slices that pin
//! their pages (and their clones), resident ranges pinned for the view's
//! life, private pages as errors, the builder's refusals, and accesses
//! racing conversions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gmem::vm_memory::{GuestMemoryGmem, ViewError};
use gmem::{Attribute, Flags, GuestMemfd, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

const P: u64 = PAGE_SIZE;
const EAGAIN: i32 = 11;
const EFAULT: i32 = 14;
const EINVAL: i32 = 22;

fn shared(pages: u64) -> Arc<GuestMemfd> {
    Arc::new(GuestMemfd::new(pages * P, Flags::MMAP | Flags::INIT_SHARED).expect("memfd"))
}

/// Guest `[0, 4P)` is file `a`'s `[0, 4P)`; guest `[4P, 6P)` is file `b`'s
/// `[P, 3P)`.
fn two_files() -> (Arc<GuestMemfd>, Arc<GuestMemfd>, GuestMemoryGmem) {
    let (a, b) = (shared(4), shared(4));
    let view = GuestMemoryGmem::from_regions([
        (GuestAddress(4 * P), b.clone(), P, 2 * P),
        (GuestAddress(0), a.clone(), 0, 4 * P),
    ])
    .expect("view");
    (a, b, view)
}

fn to_private(mem: &GuestMemfd, offset: u64) -> Result<(), gmem::ConversionError> {
    mem.set_attributes(offset, P, Attribute::Private)
}

#[test]
fn bytes_cross_regions_and_files() {
    let (a, b, view) = two_files();
    assert_eq!(view.num_regions(), 2);
    let data: Vec<u8> = (0..64u8).collect();
    let at = GuestAddress(4 * P - 32);
    view.write_slice(&data, at).expect("write across");
    let mut back = [0u8; 64];
    view.read_slice(&mut back, at).expect("read across");
    assert_eq!(&back[..], &data[..]);
    // The bytes landed in the two files where the regions say.
    let mut half = [0u8; 32];
    a.pin(4 * P - 32, 32).unwrap().read(0, &mut half).unwrap();
    assert_eq!(&half[..], &data[..32]);
    b.pin(P, 32).unwrap().read(0, &mut half).unwrap();
    assert_eq!(&half[..], &data[32..]);
    // Objects and atomics.
    view.write_obj(0x1122_3344_5566_7788u64, GuestAddress(5 * P + 8))
        .unwrap();
    assert_eq!(
        view.read_obj::<u64>(GuestAddress(5 * P + 8)).unwrap(),
        0x1122_3344_5566_7788
    );
    view.store(7u16, GuestAddress(8), Ordering::Release)
        .unwrap();
    assert_eq!(
        view.load::<u16>(GuestAddress(8), Ordering::Acquire)
            .unwrap(),
        7
    );
    assert_eq!(view.translate(GuestAddress(4 * P + 5)).unwrap().1, P + 5);
    // Past the last region: the part before it is copied, then the error.
    let err = view.read_slice(&mut [0u8; 16], GuestAddress(6 * P - 8));
    assert!(matches!(err, Err(GuestMemoryError::PartialBuffer { .. })));
    let err = view.read_obj::<u64>(GuestAddress(6 * P)).unwrap_err();
    assert!(matches!(err, GuestMemoryError::InvalidGuestAddress(GuestAddress(a)) if a == 6 * P));
}

#[test]
fn a_slice_keeps_its_page_pinned() {
    let (a, _b, view) = two_files();
    let mut slices = view
        .get_slices(GuestAddress(P + 100), 16, Permissions::Read)
        .unwrap();
    let slice = slices.next().unwrap().expect("slice");
    assert!(slices.next().is_none());
    drop(slices);
    let pin = slice.bitmap().pin().expect("a pin");
    assert_eq!((pin.offset(), pin.len()), (P + 100, 16));
    let err = to_private(&a, P).unwrap_err();
    assert_eq!((err.errno(), err.error_offset()), (EAGAIN, P));
    // The neighbour page is not pinned.
    to_private(&a, 2 * P).expect("unpinned page");
    drop(slice);
    to_private(&a, P).expect("after the slice is dropped");
}

#[test]
fn a_clone_keeps_the_pin_after_the_original_drops() {
    let (a, _b, view) = two_files();
    let slice = view
        .get_slices(GuestAddress(3 * P), 8, Permissions::Write)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let clone = slice.clone();
    let sub = slice.subslice(4, 4).expect("subslice");
    drop(slice);
    assert_eq!(to_private(&a, 3 * P).unwrap_err().errno(), EAGAIN);
    drop(clone);
    assert_eq!(to_private(&a, 3 * P).unwrap_err().errno(), EAGAIN);
    // The failed conversions unmapped the page for the fast path: a clone
    // now takes the general path, and holds the page as well.
    let late = sub.clone();
    drop(sub);
    assert_eq!(to_private(&a, 3 * P).unwrap_err().errno(), EAGAIN);
    drop(late);
    to_private(&a, 3 * P).expect("every copy dropped");
}

#[test]
fn private_pages_are_errors_not_faults() {
    let (a, b, view) = two_files();
    to_private(&b, 2 * P).unwrap(); // guest 5P
    let err = view.read_obj::<[u8; 16]>(GuestAddress(5 * P)).unwrap_err();
    assert!(matches!(err, GuestMemoryError::HostAddressNotAvailable));
    let err = view.write_obj(1u32, GuestAddress(5 * P + 4)).unwrap_err();
    assert!(matches!(err, GuestMemoryError::HostAddressNotAvailable));
    // An access that starts on the shared page before it stops there.
    let mut buf = [0u8; 32];
    let err = view.read_slice(&mut buf, GuestAddress(5 * P - 16));
    assert!(err.is_err());
    assert!(!view.check_range(GuestAddress(5 * P), 1, Permissions::Read));
    assert!(view.check_range(GuestAddress(0), (5 * P) as usize, Permissions::ReadWrite));
    assert!(!view.check_range(GuestAddress(6 * P), 1, Permissions::Read));
    assert!(view.physical_memory().is_none());
    // The rest still works, and converting back shows the page again.
    view.write_obj(9u8, GuestAddress(0)).unwrap();
    b.set_attributes(2 * P, P, Attribute::Shared).unwrap();
    view.write_obj(1u32, GuestAddress(5 * P + 4))
        .expect("shared again");
    assert_eq!(a.stats().pins_live, 0);
}

#[test]
fn the_builder_refuses_bad_regions() {
    let a = shared(4);
    let region = |guest, offset, len| (GuestAddress(guest), a.clone(), offset, len);
    let err =
        GuestMemoryGmem::from_regions([region(0, 0, 2 * P), region(P, 2 * P, P)]).unwrap_err();
    assert_eq!(
        err,
        ViewError::Overlap {
            first: 0,
            second: P
        }
    );
    assert_eq!(err.errno(), 17); // EEXIST
    let err = GuestMemoryGmem::from_regions([region(0, 3 * P, 2 * P)]).unwrap_err();
    assert!(matches!(err, ViewError::OutsideFile { file_size, .. } if file_size == 4 * P));
    assert_eq!(err.errno(), 22); // EINVAL
    let err = GuestMemoryGmem::from_regions([region(0, u64::MAX, 2)]).unwrap_err();
    assert!(matches!(err, ViewError::OutsideFile { .. }));
    let err = GuestMemoryGmem::from_regions([region(0, 0, 0)]).unwrap_err();
    assert_eq!(err, ViewError::EmptyRegion { guest_addr: 0 });
    let err = GuestMemoryGmem::from_regions([region(u64::MAX - P + 2, 0, P)]).unwrap_err();
    assert!(matches!(err, ViewError::AddressOverflow { .. }));
    // Adjacent regions of one file, unaligned ones included, are fine.
    let view = GuestMemoryGmem::from_regions([region(0, 0, P + 1), region(P + 1, P + 1, 10)]);
    assert_eq!(view.expect("adjacent").num_regions(), 2);
}

/// Guest `[0, 4P)` in file `a` and `[4P, 6P)` in file `b`, as `two_files`,
/// with `resident` pinned for the view's life.
fn two_files_resident(
    resident: &[(u64, u64)],
) -> Result<(Arc<GuestMemfd>, Arc<GuestMemfd>, GuestMemoryGmem), ViewError> {
    let (a, b) = (shared(4), shared(4));
    let view = GuestMemoryGmem::from_regions_with_resident(
        [
            (GuestAddress(4 * P), b.clone(), P, 2 * P),
            (GuestAddress(0), a.clone(), 0, 4 * P),
        ],
        resident.iter().map(|&(at, len)| (GuestAddress(at), len)),
    )?;
    Ok((a, b, view))
}

/// The pin a slice of `count` bytes at guest `at` holds, as (offset, len).
fn slice_pin(view: &GuestMemoryGmem, at: u64, count: usize) -> Option<(u64, u64)> {
    let slice = view
        .get_slices(GuestAddress(at), count, Permissions::Read)
        .unwrap()
        .next()
        .unwrap()
        .expect("slice");
    slice.bitmap().pin().map(|pin| (pin.offset(), pin.len()))
}

#[test]
fn resident_pages_refuse_conversion_until_the_view_drops() {
    // Two ranges that overlap, and one that crosses from file a into b.
    let (a, b, view) = two_files_resident(&[(0, 100), (50, P + 8), (3 * P + 8, P)]).unwrap();
    // The first two merge into [0, P + 58).
    assert!(view.is_resident(GuestAddress(0), P + 58));
    assert!(!view.is_resident(GuestAddress(0), P + 59));
    assert!(view.is_resident(GuestAddress(3 * P + 8), P - 8));
    assert!(view.is_resident(GuestAddress(4 * P), 8));
    assert!(
        !view.is_resident(GuestAddress(4 * P - 8), 16),
        "cut at the region end"
    );
    assert!(!view.is_resident(GuestAddress(2 * P), 1));
    for (file, offset) in [(&a, 0), (&a, P), (&a, 3 * P), (&b, P)] {
        let err = to_private(file, offset).unwrap_err();
        assert_eq!((err.errno(), err.error_offset()), (EAGAIN, offset));
    }
    // Accesses there work and their slices hold no pin; outside, they pin.
    view.write_obj(0x55aa_u16, GuestAddress(P + 2)).unwrap();
    assert_eq!(view.read_obj::<u16>(GuestAddress(P + 2)).unwrap(), 0x55aa);
    view.write_slice(&[7u8; 32], GuestAddress(4 * P - 16))
        .unwrap();
    assert_eq!(slice_pin(&view, 8, 16), None);
    assert_eq!(slice_pin(&view, 4 * P, 8), None);
    assert_eq!(slice_pin(&view, 2 * P + 8, 16), Some((2 * P + 8, 16)));
    assert_eq!(
        slice_pin(&view, 4 * P + 8, 16),
        Some((P + 8, 16)),
        "past the range"
    );
    // A slice that starts inside a resident range and leaves it pins.
    assert_eq!(slice_pin(&view, P + 50, 16), Some((P + 50, 16)));
    to_private(&a, 2 * P).expect("a page outside the resident ranges");
    // A clone of the view keeps the pins after the original drops.
    let clone = view.clone();
    drop(view);
    assert_eq!(to_private(&a, 0).unwrap_err().errno(), EAGAIN);
    assert_eq!(clone.read_obj::<u16>(GuestAddress(P + 2)).unwrap(), 0x55aa);
    drop(clone);
    for (file, offset) in [(&a, 0), (&a, P), (&a, 3 * P), (&b, P)] {
        to_private(file, offset).expect("the view is gone");
    }
}

#[test]
fn the_builder_refuses_bad_resident_ranges() {
    let refused = |resident: &[(u64, u64)]| two_files_resident(resident).unwrap_err();
    for (at, len) in [(6 * P, 1), (5 * P, 2 * P), (P, 0), (u64::MAX, 2)] {
        let err = refused(&[(at, len)]);
        assert_eq!(
            err,
            ViewError::ResidentOutside {
                guest_addr: at,
                len
            }
        );
        assert_eq!(err.errno(), EINVAL);
    }
    // Over a private page: the files and a view without resident ranges.
    let (a, b, _) = two_files_resident(&[]).unwrap();
    to_private(&b, 2 * P).unwrap(); // guest 5P
    let regions = [
        (GuestAddress(0), a.clone(), 0, 4 * P),
        (GuestAddress(4 * P), b.clone(), P, 2 * P),
    ];
    let resident = [(GuestAddress(0), P), (GuestAddress(4 * P + 8), 2 * P - 8)];
    let err = GuestMemoryGmem::from_regions_with_resident(regions, resident).unwrap_err();
    assert_eq!(err, ViewError::ResidentPrivate { guest_addr: 5 * P });
    assert_eq!(err.errno(), EFAULT);
    // Nothing stays pinned: the range pinned before the refusal went too.
    to_private(&a, 0).expect("no resident pin left");
    to_private(&b, P).expect("no resident pin left");
}

/// A device thread copies through the view while another converts the
/// page under it: every access either copies or reports the private page,
/// and every conversion either happens or fails with `EAGAIN`.
#[test]
fn accesses_race_conversions() {
    let (a, _b, view) = two_files();
    let view = Arc::new(view);
    let stop = Arc::new(AtomicBool::new(false));
    let device = {
        let (view, stop) = (view.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut copied, mut refused) = (0u64, 0u64);
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) || copied == 0 {
                round += 1;
                let at = GuestAddress(2 * P + (round % 64) * 16);
                match view
                    .write_obj(round, at)
                    .and_then(|()| view.read_obj::<u64>(at))
                {
                    Ok(_) => copied += 1,
                    Err(GuestMemoryError::HostAddressNotAvailable) => refused += 1,
                    Err(other) => panic!("unexpected error {other}"),
                }
            }
            (copied, refused)
        })
    };
    let (mut converted, mut again) = (0u64, 0u64);
    for _ in 0..2000 {
        match to_private(&a, 2 * P) {
            Ok(()) => {
                converted += 1;
                a.set_attributes(2 * P, P, Attribute::Shared).expect("back");
            }
            Err(err) if err.errno() == EAGAIN => again += 1,
            Err(err) => panic!("unexpected conversion error {err}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (copied, refused) = device.join().expect("device thread");
    assert!(copied > 0 && converted + again == 2000);
    eprintln!("copied {copied}, refused {refused}, converted {converted}, EAGAIN {again}");
    a.drain_pin_batches();
    assert_eq!(a.stats().pins_live, 0);
}
