//! A descriptor chain pinned once (`GuestMemoryGmem::pin_ranges`): buffers
//! over two regions and files, a private page refused with nothing held,
//! conversions refused with `EAGAIN` while the set lives and done after it
//! drops, and accesses checked against each buffer's bounds.

use std::sync::Arc;

use gmem::vm_memory::{ChainError, GuestMemoryGmem};
use gmem::{Attribute, Flags, GuestMemfd, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, VolatileMemory};

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
        (GuestAddress(0), a.clone(), 0, 4 * P),
        (GuestAddress(4 * P), b.clone(), P, 2 * P),
    ])
    .expect("view");
    (a, b, view)
}

fn live(a: &GuestMemfd, b: &GuestMemfd) -> (u64, u64) {
    (a.stats().pins_live, b.stats().pins_live)
}

#[test]
fn a_chain_over_two_regions_is_pinned_once_and_served() {
    let (a, b, view) = two_files();
    // A header in a, a buffer across the regions' boundary, a status in b.
    let across = (GuestAddress(4 * P - 64), 128);
    let chain = view
        .pin_ranges([(GuestAddress(16), 16), across, (GuestAddress(5 * P), 4)])
        .expect("pin the chain");
    assert_eq!(chain.len(), 3);
    assert_eq!(chain.range(1).unwrap(), across);
    // One pin per piece: the header, the buffer's two halves, the status.
    assert_eq!(live(&a, &b), (2, 2));

    let data: Vec<u8> = (0..128u8).collect();
    chain.write(1, 0, &data).expect("write across the regions");
    let mut back = [0u8; 128];
    view.read_slice(&mut back, across.0).unwrap();
    assert_eq!(&back[..], &data[..]);
    let mut part = [0u8; 8];
    chain
        .read(1, 60, &mut part)
        .expect("read across the boundary");
    assert_eq!(part, [60, 61, 62, 63, 64, 65, 66, 67]);
    chain.write_obj(0, 0, 0xabcd_u32).unwrap();
    assert_eq!(view.read_obj::<u32>(GuestAddress(16)).unwrap(), 0xabcd);
    assert_eq!(chain.read_obj::<u32>(0, 0).unwrap(), 0xabcd);
    chain.write_obj(2, 0, 7u32).unwrap();
    let mut status = [0u8; 4];
    b.pin(2 * P, 4).unwrap().read(0, &mut status).unwrap();
    assert_eq!(u32::from_le_bytes(status), 7);

    // A buffer inside one region is one slice; one across two is two.
    let header = chain.slice(0).expect("one slice");
    assert_eq!(header.len(), 16);
    assert_eq!(header.read_obj::<u32>(0).unwrap(), 0xabcd);
    assert_eq!(
        chain.slice(1).unwrap_err(),
        ChainError::NotOneSlice {
            index: 1,
            pieces: 2
        }
    );
    let lens: Vec<usize> = chain.slices(1).unwrap().map(|s| s.len()).collect();
    assert_eq!(lens, [64, 64]);
    drop(chain);
    assert_eq!(live(&a, &b), (0, 0), "the set released every pin");
}

#[test]
fn a_private_page_anywhere_is_refused_with_nothing_held() {
    let (a, b, view) = two_files();
    b.set_attributes(2 * P, P, Attribute::Private).unwrap();
    // The last range reaches guest 5P, file b's private page 2P.
    let ranges = [
        (GuestAddress(0), 64),
        (GuestAddress(P), 2 * P as usize),
        (GuestAddress(4 * P), 2 * P as usize),
    ];
    let err = view.pin_ranges(ranges).unwrap_err();
    assert!(
        matches!(err, GuestMemoryError::HostAddressNotAvailable),
        "{err}"
    );
    assert_eq!(live(&a, &b), (0, 0), "nothing held after the refusal");
    // Outside every region, and wrapping the address space.
    let err = view.pin_ranges([(GuestAddress(0), 16), (GuestAddress(6 * P), 1)]);
    assert!(
        matches!(err, Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(a))) if a == 6 * P),
        "{err:?}"
    );
    let err = view.pin_ranges([(GuestAddress(u64::MAX), 2)]);
    assert!(
        matches!(err, Err(GuestMemoryError::GuestAddressOverflow)),
        "{err:?}"
    );
    assert_eq!(live(&a, &b), (0, 0));
    b.set_attributes(2 * P, P, Attribute::Shared).unwrap();
    let chain = view.pin_ranges(ranges).expect("shared again");
    assert_eq!(live(&a, &b), (2, 1));
    drop(chain);
}

#[test]
fn conversions_fail_with_eagain_while_the_set_lives() {
    let (a, b, view) = two_files();
    let chain = view
        .pin_ranges([(GuestAddress(P), 16), (GuestAddress(4 * P), 2 * P as usize)])
        .unwrap();
    for (file, offset) in [(&a, P), (&b, P), (&b, 2 * P)] {
        let err = file
            .set_attributes(offset, P, Attribute::Private)
            .unwrap_err();
        assert_eq!(err.errno(), EAGAIN, "{err}");
    }
    // Pages outside the set convert.
    a.set_attributes(2 * P, P, Attribute::Private).unwrap();
    a.set_attributes(2 * P, P, Attribute::Shared).unwrap();
    drop(chain);
    a.set_attributes(P, P, Attribute::Private).unwrap();
    b.set_attributes(P, 2 * P, Attribute::Private).unwrap();
}

#[test]
fn accesses_are_checked_against_each_buffer() {
    let (_a, _b, view) = two_files();
    let chain = view
        .pin_ranges([(GuestAddress(0x10), 16), (GuestAddress(P), 0)])
        .unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        chain.read(0, 9, &mut buf).unwrap_err(),
        ChainError::OutOfBounds {
            index: 0,
            offset: 9,
            len: 8,
            buffer_len: 16
        }
    );
    assert!(chain.read(0, 8, &mut buf).is_ok());
    assert!(matches!(
        chain.write(0, u64::MAX, &buf),
        Err(ChainError::OutOfBounds { .. })
    ));
    assert!(matches!(
        chain.read_obj::<u64>(1, 0),
        Err(ChainError::OutOfBounds { index: 1, .. })
    ));
    assert_eq!(
        chain.write(2, 0, &buf).unwrap_err(),
        ChainError::NoBuffer {
            index: 2,
            buffers: 2
        }
    );
    // An empty buffer: no slice, no slices, empty copies only.
    assert!(matches!(
        chain.slice(1),
        Err(ChainError::NotOneSlice { pieces: 0, .. })
    ));
    assert_eq!(chain.slices(1).unwrap().count(), 0);
    assert!(chain.write(1, 0, &[]).is_ok());
    // A slice is bounded by its buffer.
    let slice = chain.slice(0).unwrap();
    assert!(slice.get_slice(8, 16).is_err());
    assert!(slice.get_slice(8, 8).is_ok());
    let err: GuestMemoryError = chain.read(3, 0, &mut buf).unwrap_err().into();
    assert!(matches!(err, GuestMemoryError::InvalidBackendAddress));
}
