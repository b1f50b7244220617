//! `HostMapping::probe`: a raw access in a forked child, reporting how it
//! ended. A write probe checks that the page takes a write without storing
//! anything, so it never loses a write the parent makes meanwhile.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::private_fault;
use gmem::{Attribute, Flags, GuestMemfd, Hiding, Options, PAGE_SIZE, ProbeOutcome};

const P: u64 = PAGE_SIZE;

fn file(pages: u64, hiding: Option<Hiding>) -> GuestMemfd {
    let options = Options::new().hiding(hiding);
    GuestMemfd::with_options(pages * P, Flags::MMAP | Flags::INIT_SHARED, options).unwrap()
}

#[test]
fn a_write_probe_faults_where_a_write_would_and_stores_nothing() {
    for hiding in [None, Some(Hiding::EmptyFileRemap)] {
        let mem = file(4, hiding);
        // Two pages past the end of the file.
        let map = mem.mmap_len(6 * P).unwrap();
        map.write(0, b"probe me").unwrap();
        mem.set_attributes(2 * P, P, Attribute::Private).unwrap();
        assert_eq!(map.probe(3, true).unwrap(), ProbeOutcome::Completed);
        let mut back = [0u8; 8];
        map.read(0, &mut back).unwrap();
        assert_eq!(&back, b"probe me");
        // A page never touched takes the write (the probe allocates it, as a
        // write would) and stays zero.
        assert_eq!(map.probe(P + 17, true).unwrap(), ProbeOutcome::Completed);
        map.read(P, &mut back).unwrap();
        assert_eq!(back, [0; 8]);
        let private = ProbeOutcome::Signal(private_fault(&map));
        assert_eq!(map.probe(2 * P + 5, true).unwrap(), private, "{hiding:?}");
        assert_eq!(map.probe(2 * P + 5, false).unwrap(), private, "{hiding:?}");
        let past_end = ProbeOutcome::Signal(libc::SIGBUS);
        assert_eq!(map.probe(4 * P, true).unwrap(), past_end, "{hiding:?}");
        assert_eq!(map.probe(5 * P + 9, false).unwrap(), past_end, "{hiding:?}");
        assert_eq!(map.probe(6 * P, true).unwrap_err().errno(), libc::EINVAL);
    }
}

/// The old write probe stored the byte's own value back from the child: a
/// write the parent made between the child's read and its store was lost.
#[test]
fn a_write_probe_never_loses_a_concurrent_write() {
    let mem = file(1, None);
    let map = mem.mmap().unwrap();
    let addr = map.as_ptr() as usize;
    let stop = AtomicBool::new(false);
    let lost = AtomicU32::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            // The mapping is shared, page-aligned and outlives the scope.
            // SAFETY: a live, aligned word only accessed atomically here.
            let word = unsafe { AtomicU32::from_ptr(addr as *mut u32) };
            let mut value = 0u32;
            while !stop.load(Ordering::Relaxed) {
                value = value.wrapping_add(1);
                word.store(value, Ordering::SeqCst);
                // Hold the value a while: a store from the child of what it
                // read before shows as a change.
                for _ in 0..64 {
                    if word.load(Ordering::SeqCst) != value {
                        lost.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        });
        let started = Instant::now();
        let mut probes = 0;
        while probes < 2000 && started.elapsed() < Duration::from_secs(3) {
            assert_eq!(map.probe(0, true).unwrap(), ProbeOutcome::Completed);
            probes += 1;
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(lost.load(Ordering::Relaxed), 0, "writes lost to the probe");
}
