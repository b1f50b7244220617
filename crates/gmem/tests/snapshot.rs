//! Snapshots and restores: round trips (sparse, private runs, huge folios,
//! a file with nothing populated), what a restored file allows, a
//! model-based proptest (random conversions, writes through a mapping,
//! punches and pins, then snapshot, restore and every page compared), and a
//! proptest of corrupted and truncated snapshots, which must be refused by
//! the stream and file forms alike; snapshots written by one form restored
//! by the other.
//!
//! `PROPTEST_CASES` sets the number of cases (256 by default).

use std::io::{Seek, SeekFrom, Write};

use gmem::{Attribute, Error, Flags, GuestMemfd, Options, PAGE_SIZE, SnapshotError};
use proptest::prelude::*;

const P: u64 = PAGE_SIZE;
const MIB: u64 = 1 << 20;

fn snapshot(mem: &GuestMemfd) -> Vec<u8> {
    let mut out = Vec::new();
    let saved = mem.snapshot(&mut out).unwrap();
    assert_eq!(saved.bytes, out.len() as u64);
    out
}

/// Every page's state and contents (read after taking a copy's pages
/// shared, so private ones can be compared too).
fn pages_of(mem: &GuestMemfd) -> (Vec<Attribute>, Vec<u8>) {
    let pages = mem.size() / P;
    let states = (0..pages).map(|p| mem.attribute(p * P).unwrap()).collect();
    let copy = GuestMemfd::restore(&snapshot(mem)[..], Options::new()).unwrap();
    copy.set_attributes(0, copy.size(), Attribute::Shared)
        .unwrap();
    let mut bytes = vec![0u8; copy.size() as usize];
    copy.mmap().unwrap().read(0, &mut bytes).unwrap();
    (states, bytes)
}

fn fill(page: u64, seed: u8) -> Vec<u8> {
    (0..P).map(|i| seed ^ (i as u8) ^ (page as u8)).collect()
}

#[test]
fn a_sparse_file_with_private_runs_round_trips() {
    let size = 64 * MIB;
    let mem = GuestMemfd::new(size, Flags::MMAP | Flags::INIT_SHARED).unwrap();
    let map = mem.mmap().unwrap();
    let written: Vec<u64> = (0..size / P)
        .filter(|p| p % 97 == 3 || p % 1024 == 0)
        .collect();
    for page in &written {
        map.write(page * P, &fill(*page, 7)).unwrap();
    }
    mem.set_attributes(4 * MIB, 8 * MIB, Attribute::Private)
        .unwrap();
    mem.set_attributes(40 * MIB, P, Attribute::Private).unwrap();
    let bytes = snapshot(&mem);
    // Only the populated pages are in it.
    let populated = mem.stats().pages_allocated.unwrap() * P;
    assert!(
        (bytes.len() as u64) < populated + 64 * 1024,
        "{}",
        bytes.len()
    );

    let copy = GuestMemfd::restore(&bytes[..], Options::new()).unwrap();
    assert_eq!((copy.size(), copy.flags()), (mem.size(), mem.flags()));
    assert_eq!(copy.shared_runs(), mem.shared_runs());
    assert_eq!(copy.stats().pages_allocated, mem.stats().pages_allocated);
    assert_eq!(copy.stats().pins_live, 0);
    // Private pages are hidden in a new mapping; shared ones read back.
    let copy_map = copy.mmap().unwrap();
    let mut page = vec![0u8; P as usize];
    assert!(matches!(
        copy_map.read(4 * MIB, &mut page),
        Err(Error::Private { offset }) if offset == 4 * MIB
    ));
    copy_map.read(3 * P, &mut page).unwrap();
    assert_eq!(page, fill(3, 7));
    assert_eq!(pages_of(&copy), pages_of(&mem));
}

#[test]
fn a_file_with_nothing_populated_round_trips() {
    let mem = GuestMemfd::new(16 * MIB, Flags::MMAP).unwrap();
    let mut out = Vec::new();
    let saved = mem.snapshot(&mut out).unwrap();
    assert_eq!((saved.extents, saved.data_bytes, saved.runs), (0, 0, 1));
    let copy = GuestMemfd::restore(&out[..], Options::new()).unwrap();
    assert_eq!(copy.flags(), Flags::MMAP);
    assert_eq!(copy.stats().pages_private, 16 * MIB / P);
    assert_eq!(copy.stats().pages_allocated, Some(0));
}

#[test]
fn a_restore_takes_the_options_given() {
    let mem = GuestMemfd::new(8 * MIB, Flags::MMAP | Flags::INIT_SHARED).unwrap();
    mem.set_attributes(2 * MIB, 2 * MIB, Attribute::Private)
        .unwrap();
    let bytes = snapshot(&mem);
    let copy = GuestMemfd::restore(&bytes[..], Options::new().huge_folios(true)).unwrap();
    assert!(copy.options().huge_folios);
    // Pins make the uniform chunks' huge folios: every 2 MiB is uniform.
    for chunk in [0, 4 * MIB, 6 * MIB] {
        drop(copy.pin(chunk, P).unwrap());
    }
    assert_eq!(copy.stats().huge_folios, 3);
    assert_eq!(copy.shared_runs(), mem.shared_runs());
}

/// A snapshot waits for no pin, and a file and stream on disk work as well
/// as a `Vec`; the restore reads from the file's position.
#[test]
fn pins_do_not_block_a_snapshot_and_files_serve_as_streams() {
    let mem = GuestMemfd::new(4 * MIB, Flags::MMAP | Flags::INIT_SHARED).unwrap();
    let pin = mem.pin(0, 4 * P).unwrap();
    pin.write(0, b"pinned").unwrap();
    let fd = rustix::fs::memfd_create("snapshot", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let mut file = std::fs::File::from(fd);
    file.write_all(b"prefix").unwrap();
    mem.snapshot(&mut file).unwrap();
    file.seek(SeekFrom::Start(6)).unwrap();
    let copy = GuestMemfd::restore(&mut file, Options::new()).unwrap();
    assert_eq!(copy.stats().pins_live, 0);
    let mut buf = [0u8; 6];
    copy.mmap().unwrap().read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"pinned");
    drop(pin);
}

fn memfd(name: &str) -> std::fs::File {
    std::fs::File::from(rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC).unwrap())
}

/// A snapshot written by either form restores by either form, to the same
/// states and contents.
#[test]
fn the_stream_and_file_forms_restore_each_others_snapshots() {
    let mem = GuestMemfd::new(16 * MIB, Flags::MMAP | Flags::INIT_SHARED).unwrap();
    let map = mem.mmap().unwrap();
    for page in [0, 1, 2, 700, 2048, 4095] {
        map.write(page * P, &fill(page, 9)).unwrap();
    }
    mem.set_attributes(MIB, 3 * MIB, Attribute::Private)
        .unwrap();
    let expected = pages_of(&mem);
    let by_stream = snapshot(&mem);
    let mut by_file = memfd("by-file");
    let saved = mem.snapshot_to_file(&by_file).unwrap();
    assert_eq!(saved.bytes, by_stream.len() as u64);
    by_file.seek(SeekFrom::Start(0)).unwrap();

    let from_file = GuestMemfd::restore(&mut by_file, Options::new()).unwrap();
    assert_eq!(pages_of(&from_file), expected);
    let stream_file = memfd("by-stream");
    (&stream_file).write_all(&by_stream).unwrap();
    (&stream_file).seek(SeekFrom::Start(0)).unwrap();
    let from_stream = GuestMemfd::restore_from_file(&stream_file, Options::new()).unwrap();
    assert_eq!(pages_of(&from_stream), expected);
    assert_eq!(
        from_stream.stats().pages_allocated,
        mem.stats().pages_allocated
    );
}

/// One operation of the model test.
#[derive(Debug, Clone)]
enum Op {
    Convert(u64, u64, Attribute),
    Write(u64, u8),
    Punch(u64, u64),
    Pin(u64),
    Unpin,
}

const PAGES: u64 = 32;

fn op() -> impl Strategy<Value = Op> {
    let attr = prop_oneof![Just(Attribute::Shared), Just(Attribute::Private)];
    prop_oneof![
        3 => (0..PAGES, 1..8u64, attr).prop_map(|(p, n, a)| Op::Convert(p, n, a)),
        4 => (0..PAGES, any::<u8>()).prop_map(|(p, s)| Op::Write(p, s)),
        1 => (0..PAGES, 1..6u64).prop_map(|(p, n)| Op::Punch(p, n)),
        1 => (0..PAGES).prop_map(Op::Pin),
        1 => Just(Op::Unpin),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random conversions, whole-page writes through a mapping, punches and
    /// pins against a model of every page's state and contents; then a
    /// snapshot (with the pins still held) and a restore whose every page
    /// must match the model.
    #[test]
    fn snapshots_restore_every_page(ops in proptest::collection::vec(op(), 1..40),
                                    init_shared in any::<bool>()) {
        let flags = if init_shared { Flags::MMAP | Flags::INIT_SHARED } else { Flags::MMAP };
        let mem = GuestMemfd::new(PAGES * P, flags).unwrap();
        let map = mem.mmap().unwrap();
        let initial = if init_shared { Attribute::Shared } else { Attribute::Private };
        let mut states = vec![initial; PAGES as usize];
        let mut contents: Vec<Option<(u64, u8)>> = vec![None; PAGES as usize];
        let mut pins = Vec::new();
        for op in ops {
            match op {
                Op::Convert(page, n, to) => {
                    let end = (page + n).min(PAGES);
                    if mem.set_attributes(page * P, (end - page) * P, to).is_ok() {
                        states[page as usize..end as usize].fill(to);
                    }
                }
                Op::Write(page, seed) => {
                    let done = map.write(page * P, &fill(page, seed));
                    prop_assert_eq!(done.is_ok(), states[page as usize] == Attribute::Shared);
                    if done.is_ok() {
                        contents[page as usize] = Some((page, seed));
                    }
                }
                Op::Punch(page, n) => {
                    let end = (page + n).min(PAGES);
                    if mem.punch_hole(page * P, (end - page) * P).is_ok() {
                        contents[page as usize..end as usize].fill(None);
                    }
                }
                Op::Pin(page) => pins.extend(mem.pin(page * P, P).ok()),
                Op::Unpin => drop(pins.pop()),
            }
        }
        let copy = GuestMemfd::restore(&snapshot(&mem)[..], Options::new()).unwrap();
        for page in 0..PAGES {
            prop_assert_eq!(copy.attribute(page * P).unwrap(), states[page as usize]);
        }
        copy.set_attributes(0, PAGES * P, Attribute::Shared).unwrap();
        let copy_map = copy.mmap().unwrap();
        let mut buf = vec![0u8; P as usize];
        for page in 0..PAGES {
            copy_map.read(page * P, &mut buf).unwrap();
            let expected = contents[page as usize]
                .map_or_else(|| vec![0u8; P as usize], |(page, seed)| fill(page, seed));
            prop_assert!(buf == expected, "page {}", page);
        }
    }

    /// A snapshot cut short, with bytes changed, or both, is refused with a
    /// typed error (`EINVAL` or `EBADMSG`), never a panic; unchanged, it
    /// restores.
    #[test]
    fn corrupted_snapshots_are_refused(
        cut in proptest::option::of(any::<prop::sample::Index>()),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1..=255u8), 0..4),
        private_pages in proptest::collection::vec(0..PAGES, 0..8),
    ) {
        let mem = GuestMemfd::new(PAGES * P, Flags::MMAP | Flags::INIT_SHARED).unwrap();
        let map = mem.mmap().unwrap();
        for page in [0, 1, 5, 20, 31] {
            map.write(page * P, &fill(page, 3)).unwrap();
        }
        for page in private_pages {
            mem.set_attributes(page * P, P, Attribute::Private).unwrap();
        }
        let good = snapshot(&mem);
        let mut bad = good.clone();
        for (index, xor) in flips {
            bad[index.index(good.len())] ^= xor;
        }
        if let Some(cut) = cut {
            bad.truncate(cut.index(good.len()));
        }
        let file = memfd("bad");
        (&file).write_all(&bad).unwrap();
        (&file).seek(SeekFrom::Start(0)).unwrap();
        let by_file = GuestMemfd::restore_from_file(&file, Options::new());
        prop_assert_eq!(
            by_file.as_ref().map(GuestMemfd::shared_runs).map_err(Clone::clone),
            GuestMemfd::restore(&bad[..], Options::new()).map(|f| f.shared_runs())
        );
        match by_file {
            Ok(copy) => {
                prop_assert_eq!(&bad, &good);
                prop_assert_eq!(copy.shared_runs(), mem.shared_runs());
            }
            Err(error) => {
                prop_assert!(bad != good);
                prop_assert!([libc::EINVAL, libc::EBADMSG].contains(&error.errno()), "{}", error);
                if bad.len() < good.len() && good.starts_with(&bad) {
                    prop_assert_eq!(error, SnapshotError::Truncated { at: bad.len() as u64 });
                }
            }
        }
    }

    /// Arbitrary bytes, after a valid magic or not, are refused.
    #[test]
    fn arbitrary_bytes_are_refused(
        magic in any::<bool>(),
        tail in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut bytes = if magic { b"GMEMSNAP\x01\0\0\0".to_vec() } else { Vec::new() };
        bytes.extend_from_slice(&tail);
        let error = GuestMemfd::restore(&bytes[..], Options::new()).unwrap_err();
        prop_assert!([libc::EINVAL, libc::EBADMSG].contains(&error.errno()), "{}", error);
    }
}
