//! The file form: the same bytes as the stream form by each copy method,
//! restores across the two forms, the same error as the stream form for
//! every cut and every changed byte, positions kept, and pipes and
//! `O_APPEND` files taken as streams.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;

use super::copy::CopyMethod;
use super::file::restore_file_by;
use super::tests::Parts;
use super::*;

const P: u64 = PAGE_SIZE;
const METHODS: [CopyMethod; 3] = [
    CopyMethod::CopyFileRange,
    CopyMethod::Sendfile,
    CopyMethod::Buffered,
];

fn memfd() -> File {
    File::from(rustix::fs::memfd_create("snapshot", rustix::fs::MemfdFlags::CLOEXEC).unwrap())
}

/// A file on the file system of the temporary directory, unlinked.
fn disk_file() -> File {
    let dir = std::env::temp_dir();
    let fd = rustix::fs::open(
        &dir,
        rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
    File::from(fd)
}

/// 8 MiB, a private run and three populated extents, one of them 3 MiB
/// (more than a chunk, so copies and checksums take several).
fn sample() -> GuestMemfd {
    let mem = GuestMemfd::new(8 << 20, Flags::MMAP | Flags::INIT_SHARED).unwrap();
    let map = mem.mmap().unwrap();
    let bytes: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 253) as u8).collect();
    map.write(P, &bytes).unwrap();
    map.write(5 << 20, b"five").unwrap();
    map.write(7 << 20, b"seven").unwrap();
    mem.set_attributes(2 << 20, 1 << 20, Attribute::Private)
        .unwrap();
    mem
}

fn contents(file: &mut File) -> Vec<u8> {
    let mut out = Vec::new();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_to_end(&mut out).unwrap();
    out
}

#[test]
fn every_method_writes_the_stream_forms_bytes_and_restores_them() {
    let mem = sample();
    let mut stream = Vec::new();
    mem.snapshot(&mut stream).unwrap();
    for method in METHODS {
        for mut out in [memfd(), disk_file()] {
            out.write_all(b"prefix").unwrap();
            let saved = mem.snapshot_file_by(out.as_fd(), method).unwrap();
            assert_eq!(out.stream_position().unwrap(), 6 + saved.bytes);
            assert_eq!(&contents(&mut out)[6..], &stream[..], "{method:?}");
            out.write_all(b"suffix").unwrap();
            out.seek(SeekFrom::Start(6)).unwrap();
            let (copy, used) = restore_file_by(out.as_fd(), Options::new(), method).unwrap();
            assert_eq!(out.stream_position().unwrap(), 6 + saved.bytes);
            assert_eq!(copy.shared_runs(), mem.shared_runs());
            let mut again = Vec::new();
            copy.snapshot(&mut again).unwrap();
            assert_eq!(again, stream, "{method:?} then {used:?}");
        }
    }
}

/// `copy_file_range` works between two memfds; from a memfd to a file on
/// another file system it is refused (`EXDEV`) and `sendfile` copies.
#[test]
fn copy_file_range_falls_back_to_sendfile_across_file_systems() {
    let mem = sample();
    let saved = mem.snapshot_to_file(memfd()).unwrap();
    assert_eq!(saved.method, CopyMethod::CopyFileRange);
    let disk = disk_file();
    let across = mem.snapshot_to_file(&disk).unwrap();
    let same_fs = rustix::fs::fstatfs(&disk).unwrap().f_type == libc::TMPFS_MAGIC as _;
    if !same_fs {
        assert_eq!(across.method, CopyMethod::Sendfile);
    }
    (&disk).seek(SeekFrom::Start(0)).unwrap();
    let (_, used) =
        restore_file_by(disk.as_fd(), Options::new(), CopyMethod::CopyFileRange).unwrap();
    assert_eq!(used, across.method);
}

/// For each cut and each changed byte of a small snapshot, the file form
/// fails as the stream form does, and leaves the position alone.
#[test]
fn the_file_form_refuses_what_the_stream_form_does() {
    let bytes = Parts::valid().bytes();
    let check = |bad: &[u8]| {
        let mut file = memfd();
        file.write_all(bad).unwrap();
        file.seek(SeekFrom::Start(0)).unwrap();
        let stream = GuestMemfd::restore(bad, Options::new()).map(|f| f.shared_runs());
        let by_file = GuestMemfd::restore_from_file(&file, Options::new()).map(|f| f.shared_runs());
        assert_eq!(by_file, stream, "{} bytes", bad.len());
        if stream.is_err() {
            assert_eq!(file.stream_position().unwrap(), 0);
        }
    };
    for len in 0..=bytes.len() {
        check(&bytes[..len]);
    }
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x04;
        check(&bad);
    }
}

/// A pipe is read and written as a stream, with the same bytes.
#[test]
fn pipes_are_streams() {
    let mem = sample();
    let (reader, writer) = std::io::pipe().unwrap();
    let saved = std::thread::scope(|scope| {
        let restored = scope.spawn(|| GuestMemfd::restore_from_file(&reader, Options::new()));
        let saved = mem.snapshot_to_file(&writer).unwrap();
        drop(writer);
        let copy = restored.join().unwrap().unwrap();
        assert_eq!(copy.shared_runs(), mem.shared_runs());
        saved
    });
    assert_eq!(saved.method, CopyMethod::Buffered);
}

/// A file opened to append is written as a stream: `pwrite` would append.
#[test]
fn append_only_files_are_streams() {
    let mem = sample();
    let mut file = disk_file();
    file.write_all(b"x").unwrap();
    let fd = rustix::fs::openat(
        rustix::fs::CWD,
        format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file)),
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::APPEND | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let saved = mem.snapshot_to_file(&fd).unwrap();
    assert_eq!(saved.method, CopyMethod::Buffered);
    let mut stream = Vec::new();
    mem.snapshot(&mut stream).unwrap();
    assert_eq!(&contents(&mut file)[1..], &stream[..]);
}

/// The same for a snapshot with an extent copied in the kernel (larger
/// than [`SMALL`](super::file::SMALL)): cuts and changed bytes in its head,
/// its contents and its checksum, and in the extents after it.
#[test]
fn kernel_copied_extents_are_refused_as_the_stream_form_does() {
    let mut good = Vec::new();
    sample().snapshot(&mut good).unwrap();
    let file = memfd();
    // The header, the runs, then the 3 MiB extent's head from `head`.
    let head = good.len() - 2 * (16 + 4096 + 4) - 8 - (16 + (3 << 20) + 4);
    let big_crc = head + 16 + (3 << 20);
    let places = [
        head,
        head + 9,
        head + 16,
        head + 20_000,
        big_crc - 1,
        big_crc,
        big_crc + 3,
    ];
    for place in places
        .into_iter()
        .chain([big_crc + 4, big_crc + 30, good.len() - 1])
    {
        for (cut, flip) in [(Some(place), None), (None, Some(place))] {
            let mut bad = good.clone();
            if let Some(at) = flip {
                bad[at] ^= 0x40;
            }
            bad.truncate(cut.unwrap_or(bad.len()));
            file.set_len(0).unwrap();
            (&file).write_all(&bad).unwrap();
            (&file).seek(SeekFrom::Start(0)).unwrap();
            let stream = GuestMemfd::restore(&bad[..], Options::new()).map(|f| f.size());
            for method in METHODS {
                (&file).seek(SeekFrom::Start(0)).unwrap();
                let by_file = restore_file_by(file.as_fd(), Options::new(), method);
                assert_eq!(by_file.map(|f| f.0.size()), stream, "{place} {method:?}");
            }
            assert!(stream.is_err(), "{place}");
        }
    }
}
