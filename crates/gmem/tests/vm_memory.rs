//! The vm-memory view: `Bytes` across regions and files, slices that pin
//! their pages (and their clones), private pages as errors, the builder's
//! refusals, and accesses racing conversions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gmem::vm_memory::{GuestMemoryGmem, ViewError};
use gmem::{Attribute, Flags, GuestMemfd, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

const P: u64 = PAGE_SIZE;
const EAGAIN: i32 = 11;

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
    drop(sub);
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
