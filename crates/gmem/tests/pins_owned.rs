//! Owned pins and the accessors both pin types share: `as_ptr`, volatile
//! copies at every alignment, `read_from`/`write_to` on a file descriptor,
//! and `as_volatile_slice`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use gmem::{Attribute, Flags, GuestMemfd, OwnedPin, PAGE_SIZE};

const P: u64 = PAGE_SIZE;
const EAGAIN: i32 = 11;
const EINVAL: i32 = 22;
const EFAULT: i32 = 14;
const EBADF: i32 = 9;

fn shared(pages: u64) -> Arc<GuestMemfd> {
    Arc::new(GuestMemfd::new(pages * P, Flags::MMAP | Flags::INIT_SHARED).expect("memfd"))
}

fn assert_send_sync_static<T: Send + Sync + 'static>() {}

#[test]
fn an_owned_pin_outlives_the_borrow_and_crosses_threads() {
    assert_send_sync_static::<OwnedPin>();
    let mem = shared(4);
    let pin = mem.pin_owned(P + 8, 100).expect("pin");
    assert_eq!(
        (pin.offset(), pin.len(), pin.is_empty()),
        (P + 8, 100, false)
    );
    let pin = std::thread::spawn(move || {
        pin.write(0, b"from another thread").unwrap();
        pin
    })
    .join()
    .unwrap();
    let err = mem.set_attributes(P, P, Attribute::Private).unwrap_err();
    assert_eq!((err.errno(), err.error_offset()), (EAGAIN, P));
    let mut back = [0u8; 19];
    mem.pin(P + 8, 19).unwrap().read(0, &mut back).unwrap();
    assert_eq!(&back, b"from another thread");
    // The pin keeps the file alive after the last other handle goes.
    let weak = Arc::downgrade(&mem);
    drop(mem);
    assert!(weak.upgrade().is_some());
    drop(pin);
    assert!(weak.upgrade().is_none());
}

#[test]
fn an_owned_pin_fails_as_a_pin_does() {
    let mem = shared(4);
    for (offset, len) in [(0, 0), (0, 4 * P + 1), (4 * P, 1), (u64::MAX, 2)] {
        let owned = mem.pin_owned(offset, len).unwrap_err();
        let borrowed = mem.pin(offset, len).unwrap_err();
        assert_eq!(owned, borrowed);
        assert_eq!(owned.errno(), EINVAL);
    }
    mem.set_attributes(2 * P, P, Attribute::Private).unwrap();
    let err = mem.pin_owned(P, 2 * P).unwrap_err();
    assert_eq!(err, gmem::Error::Private { offset: 2 * P });
    assert_eq!(err.errno(), EFAULT);
    drop(mem.pin_owned(0, 2 * P).expect("shared pages"));
    mem.set_attributes(0, P, Attribute::Private)
        .expect("released");
}

#[test]
fn as_ptr_points_into_one_mapping_of_the_file() {
    let mem = shared(4);
    let a = mem.pin(0, 4 * P).unwrap();
    let b = mem.pin_owned(3 * P + 5, 10).unwrap();
    assert_eq!(b.as_ptr(), a.as_ptr().wrapping_add(3 * P as usize + 5));
    b.write(0, b"x").unwrap();
    // SAFETY: the byte lies inside a live pin of shared pages; the load is volatile.
    let byte = unsafe { b.as_ptr().read_volatile() };
    assert_eq!(byte, b'x');
}

/// Copies at every head and tail alignment of the volatile word loop agree
/// with a byte model of the memory.
#[test]
fn copies_at_every_alignment() {
    let mem = shared(1);
    let pin = mem.pin_owned(0, 256).unwrap();
    let mut model = vec![0u8; 256];
    pin.write(0, &model).unwrap();
    let mut stamp = 1u8;
    for offset in 0..17u64 {
        for len in 0..41usize {
            let data: Vec<u8> = (0..len).map(|i| stamp.wrapping_add(i as u8)).collect();
            stamp = stamp.wrapping_add(7);
            pin.write(offset, &data).unwrap();
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
            let mut whole = vec![0u8; 256];
            pin.read(0, &mut whole).unwrap();
            assert_eq!(whole, model, "write of {len} at {offset}");
            let mut part = vec![0u8; len];
            pin.read(offset + 1, &mut part).unwrap();
            assert_eq!(
                part[..],
                model[offset as usize + 1..][..len],
                "read of {len}"
            );
        }
    }
    // Long copies (the string copy on x86-64) at odd offsets.
    let long = mem.pin_owned(0, P).unwrap();
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
    long.write(3, &data).unwrap();
    let mut back = vec![0u8; 998];
    long.read(5, &mut back).unwrap();
    assert_eq!(back[..], data[2..]);
    assert_eq!(pin.read(250, &mut [0u8; 7]).unwrap_err().errno(), EINVAL);
    assert_eq!(pin.write(u64::MAX, &[0u8; 2]).unwrap_err().errno(), EINVAL);
}

#[test]
fn read_from_and_write_to_a_descriptor() {
    let mem = shared(4);
    let pin = mem.pin_owned(P - 3, P).unwrap();
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    ours.write_all(b"request body").unwrap();
    assert_eq!(pin.read_from(&theirs, 1, 12).unwrap(), 12);
    let mut back = [0u8; 12];
    mem.pin(P - 2, 12).unwrap().read(0, &mut back).unwrap();
    assert_eq!(&back, b"request body");
    // Out of the pages through the borrowed pin type too.
    let borrowed = mem.pin(P - 2, 12).unwrap();
    assert_eq!(borrowed.write_to(&theirs, 0, 7).unwrap(), 7);
    let mut got = [0u8; 7];
    ours.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"request");
    // Outside the pin, and a descriptor that refuses.
    assert_eq!(
        pin.read_from(&theirs, P - 1, 2).unwrap_err().errno(),
        EINVAL
    );
    let read_only = std::fs::File::open("/dev/null").unwrap();
    let err = pin.write_to(&read_only, 0, 1).unwrap_err();
    assert_eq!(err.errno(), EBADF);
    // End of file reads nothing.
    assert_eq!(pin.read_from(&read_only, 0, 8).unwrap(), 0);
}

#[test]
fn a_volatile_slice_of_a_pin() {
    use vm_memory::Bytes;
    let mem = shared(2);
    let pin = mem.pin_owned(100, 50).unwrap();
    pin.write(10, b"seen").unwrap();
    let slice = pin.as_volatile_slice();
    assert_eq!(slice.len(), 50);
    let mut got = [0u8; 4];
    slice.read_slice(&mut got, 10).unwrap();
    assert_eq!(&got, b"seen");
    slice.write_slice(b"back", 20).unwrap();
    pin.read(20, &mut got).unwrap();
    assert_eq!(&got, b"back");
}
