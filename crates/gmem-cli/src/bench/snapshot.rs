//! The snapshot rows of `gmem bench`: a sparse 4 GiB file saved and
//! restored, by the file form and by the stream form, against
//! `copy_file_range` of the same populated extents, the
//! snapshot's size against the populated bytes, and the state of a file of
//! 131,072 runs saved and loaded.

use std::cell::RefCell;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::fd::AsFd;

use gmem::{Attribute, Flags, GuestMemfd, Options, PAGE_SIZE};
use rustix::fs::MemfdFlags;

use super::{CaseResult, GIB, Goal, MIB, measure_prepared};

/// A 4 GiB file with 64 MiB populated in 32 scattered 2 MiB extents and a
/// quarter of its pages private (512 KiB runs, one in every 2 MiB), and
/// the files both sides write to and read from.
struct Sparse {
    mem: GuestMemfd,
    extents: Vec<Range<u64>>,
    /// Where the snapshot goes, and is restored from.
    snapshot: File,
    /// Where the floor copies the extents to, back to back.
    packed: File,
}

fn memfd(name: &str) -> File {
    File::from(rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC).expect("memfd_create"))
}

/// Empties `file` for a new sample (untimed).
fn reset(file: &mut File) {
    file.set_len(0).expect("truncate");
    file.seek(SeekFrom::Start(0)).expect("seek");
}

/// Copies `len` bytes from `from` at `from_at` to `to` at `to_at` with
/// `copy_file_range`.
fn copy_range(from: impl AsFd, mut from_at: u64, to: impl AsFd, mut to_at: u64, len: u64) {
    let end = from_at + len;
    while from_at < end {
        let left = (end - from_at) as usize;
        let done =
            rustix::fs::copy_file_range(&from, Some(&mut from_at), &to, Some(&mut to_at), left)
                .expect("copy_file_range");
        assert!(done > 0, "copy_file_range stopped short");
    }
}

impl Sparse {
    fn new() -> Sparse {
        let size = 4 * GIB;
        let mem = GuestMemfd::new(size, Flags::MMAP | Flags::INIT_SHARED).expect("memfd");
        // 32 extents in 2048 slots of 2 MiB, scattered by a fixed stride.
        let mut extents: Vec<_> = (0..32u64)
            .map(|i| (i * 1237 % 2048) * 2 * MIB)
            .map(|start| start..start + 2 * MIB)
            .collect();
        extents.sort_by_key(|e| e.start);
        let map = mem.mmap().expect("mmap");
        let pattern: Vec<u8> = (0..2 * MIB).map(|i| (i % 251) as u8).collect();
        for extent in &extents {
            map.write(extent.start, &pattern).expect("populate");
        }
        drop(map);
        for run in (0..size).step_by(2 * MIB as usize) {
            mem.set_attributes(run + MIB, MIB / 2, Attribute::Private)
                .expect("to private");
        }
        Sparse {
            mem,
            extents,
            snapshot: memfd("snapshot"),
            packed: memfd("packed"),
        }
    }

    fn populated(&self) -> u64 {
        self.extents.iter().map(|e| e.end - e.start).sum()
    }

    /// The floor of a snapshot: the extents, back to back, into a file.
    fn copy_out(&self) {
        let mut at = 0;
        for extent in &self.extents {
            let len = extent.end - extent.start;
            copy_range(self.mem.as_fd(), extent.start, &self.packed, at, len);
            at += len;
        }
    }

    /// The floor of a restore: a new 4 GiB memfd, and the packed extents
    /// copied into it at their places.
    fn copy_in(&self) -> File {
        let file = memfd("restored");
        file.set_len(self.mem.size()).expect("ftruncate");
        let mut at = 0;
        for extent in &self.extents {
            let len = extent.end - extent.start;
            copy_range(&self.packed, at, &file, extent.start, len);
            at += len;
        }
        file
    }
}

/// `snapshot-4g-sparse` (the file form, the stream form, and the size) and
/// `restore-4g-sparse` (both forms), each timed row against its own floor
/// measured in the same run, samples interleaved.
pub(super) fn sparse_4g() -> Vec<CaseResult> {
    let fixture = Sparse::new();
    let runs = fixture.mem.shared_runs().len() as u64 * 2;
    // Untimed first passes, which also leave a snapshot and a packed copy.
    let saved = fixture
        .mem
        .snapshot_to_file(&fixture.snapshot)
        .expect("snapshot");
    fixture.copy_out();
    let size_goal = 1.01 * fixture.populated() as f64 + 1024.0 * runs as f64 / 1000.0;
    let size_row = CaseResult::value(
        "snapshot-4g-sparse-size",
        saved.bytes as f64,
        Goal::BytesAtMost(size_goal),
    );
    assert_eq!(saved.data_bytes, fixture.populated(), "the extents saved");

    let snapshot = RefCell::new(fixture.snapshot.try_clone().expect("dup"));
    let packed = RefCell::new(fixture.packed.try_clone().expect("dup"));
    let save = |name: &str, stream: bool| {
        let (o, f) = measure_prepared(
            &mut || {
                let to = &*snapshot.borrow();
                if stream {
                    fixture.mem.snapshot(to).expect("snapshot");
                } else {
                    fixture.mem.snapshot_to_file(to).expect("snapshot");
                }
            },
            &mut || reset(&mut snapshot.borrow_mut()),
            &mut || fixture.copy_out(),
            &mut || reset(&mut packed.borrow_mut()),
        );
        CaseResult::timed(name, o, Some(f), Goal::RatioAtMost(1.2))
            .against("floor: copy_file_range of the extents")
    };
    let save_rows = [
        save("snapshot-4g-sparse", false),
        save("snapshot-4g-sparse-stream", true),
    ];

    // Restores: the snapshot and packed copy were written by the last
    // samples; each sample's file is dropped before the next (untimed).
    let restored = RefCell::new(None::<GuestMemfd>);
    let copied = RefCell::new(None::<File>);
    let restore = |name: &str, stream: bool| {
        let (o, f) = measure_prepared(
            &mut || {
                let from = &*snapshot.borrow();
                *restored.borrow_mut() = Some(if stream {
                    GuestMemfd::restore(from, Options::new()).expect("restore")
                } else {
                    GuestMemfd::restore_from_file(from, Options::new()).expect("restore")
                });
            },
            &mut || {
                restored.borrow_mut().take();
                let mut from = snapshot.borrow_mut();
                from.seek(SeekFrom::Start(0)).expect("seek");
            },
            &mut || *copied.borrow_mut() = Some(fixture.copy_in()),
            &mut || drop(copied.borrow_mut().take()),
        );
        let check = restored.borrow_mut().take().expect("a restored file");
        assert_eq!(check.shared_runs(), fixture.mem.shared_runs());
        CaseResult::timed(name, o, Some(f), Goal::RatioAtMost(1.2))
            .against("floor: copy_file_range into a new memfd")
    };
    let restore_rows = [
        restore("restore-4g-sparse", false),
        restore("restore-4g-sparse-stream", true),
    ];
    let mut rows = Vec::from(save_rows);
    rows.push(size_row);
    rows.extend(restore_rows);
    rows
}

/// `snapshot-fragmented-1g`: the state of a 1 GiB file of 131,072 runs
/// (two pages each, alternating), nothing populated, saved to memory and
/// loaded from it; each within 50 ms (medians of the prepared samples).
pub(super) fn fragmented_1g() -> Vec<CaseResult> {
    let size = GIB;
    let mem = GuestMemfd::new(size, Flags::MMAP | Flags::INIT_SHARED).expect("memfd");
    for run in (0..size).step_by(4 * PAGE_SIZE as usize) {
        mem.set_attributes(run + 2 * PAGE_SIZE, 2 * PAGE_SIZE, Attribute::Private)
            .expect("to private");
    }
    let bytes = RefCell::new(Vec::new());
    let saved = mem.snapshot(&mut *bytes.borrow_mut()).expect("snapshot");
    assert_eq!(saved.runs, 131_072, "the runs of the fixture");
    let restored = RefCell::new(None::<GuestMemfd>);
    let (save, load) = measure_prepared(
        &mut || {
            mem.snapshot(&mut *bytes.borrow_mut()).expect("snapshot");
        },
        &mut || bytes.borrow_mut().clear(),
        &mut || {
            let from = bytes.borrow();
            *restored.borrow_mut() =
                Some(GuestMemfd::restore(&from[..], Options::new()).expect("restore"));
        },
        &mut || drop(restored.borrow_mut().take()),
    );
    let loaded = restored.borrow_mut().take().expect("a restored file");
    assert_eq!(loaded.shared_runs().len(), 65_536);
    vec![
        CaseResult::timed(
            "snapshot-fragmented-1g-save",
            save,
            None,
            Goal::NanosAtMost(50e6),
        ),
        CaseResult::timed(
            "snapshot-fragmented-1g-load",
            load,
            None,
            Goal::NanosAtMost(50e6),
        ),
    ]
}
