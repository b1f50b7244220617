//! Snapshots: a file's size, flags, per-page state and populated contents
//! written to a stream or a file, and a new file restored from one.
//!
//! This module owns the snapshot format (below, version 1) and its two
//! forms: the stream form, [`GuestMemfd::snapshot`] and
//! [`GuestMemfd::restore`] (any `Write`/`Read`), and the file form,
//! [`GuestMemfd::snapshot_to_file`] and [`GuestMemfd::restore_from_file`]
//! (any `AsFd`). It also probes whether this host could restore lazily
//! ([`probe_lazy_restore`]; gmem does not yet).
//!
//! **A snapshot holds the guest's private pages in clear.** Whoever can
//! read it reads the guest's private memory: store and send it as you would
//! the guest itself.
//!
//! # Consistency
//!
//! A snapshot is taken under the file's invalidate lock held shared: no
//! conversion or punch runs in the middle of it, so the states and the set
//! of populated extents are those of one instant. It waits for no pin, and
//! nothing stops the guest, a device or the VMM from writing shared (or,
//! through KVM, private) pages meanwhile: the contents of a page are
//! whatever they are when it is copied. Pause the vCPUs and quiesce the
//! devices first. It reads the backing with `pread(2)` and finds its
//! populated extents with `SEEK_DATA`/`SEEK_HOLE`, so it needs a backing
//! that has both (a memfd does; Linux 6.18's kernel guest_memfd has no
//! `read`, and fails with its errno).
//!
//! A restore makes a new memfd-backed file with the saved size, flags and
//! states and the caller's [`Options`], with no pin and no mapping; host
//! mappings made from it hide its private pages as usual. It is returned
//! only once every byte has been read and checked: on any error the file
//! being filled is dropped, and nothing is left.
//!
//! # Forms
//!
//! Both forms write and read the same bytes: a snapshot written by one
//! restores by the other. The stream form moves each extent through a
//! buffer of [`CHUNK`] bytes, checksumming it there. The file form, for a
//! regular file, writes and reads at explicit offsets from the file's
//! position; it copies each extent of more than 64 KiB in the kernel
//! (`copy_file_range(2)`, else `sendfile(2)` where that is refused, as from
//! a memfd to a file on another file system, else a buffer:
//! [`CopyMethod`], reported in [`Saved::method`]) while a helper thread
//! reads the same bytes with `pread(2)` to checksum them, and moves smaller
//! extents through a buffer, several to a write. A restore compares every
//! checksum before it returns. Anything but a regular file (a pipe, a
//! socket), and a file opened with `O_APPEND`, goes through the stream form.
//! Why so, and what it costs, is in the design note below.
//!
//! # Design note: the file form's speed
//!
//! Measured on the development host (2 vCPUs, shared), for 64 MiB in 32
//! extents of 2 MiB between memfds: the floor, `copy_file_range` of the
//! extents, takes 22 to 28 ms (about 2.6 GB/s: the kernel's splice copy,
//! page by page, not the allocation of the destination, which costs the
//! same into a file already allocated). A checksum has to read the same
//! 64 MiB once more. crc32fast runs its AVX-512 `VPCLMULQDQ` kernel here
//! (chosen at run time), 70 to 80 GB/s on bytes in cache but 9 to 12 GB/s
//! on 64 MiB not in cache: 6 to 7 ms, a quarter of the floor, whether it
//! reads a mapping of the extent, a buffer filled by `pread`, or the
//! destination right after the copy. Mapping the extent costs another 4 ms
//! in page faults (16,384 small pages), so a mapping buys nothing over
//! `pread` into a buffer that stays in cache. Done on the copying thread,
//! every variant measured was 1.2 to 1.4 times the floor; the stream form
//! (`pread`, checksum, write) is 1.2 to 1.4 too.
//!
//! So the checksum runs beside the copy, on a helper thread that reads the
//! same extents with `pread` into its own 256 KiB buffer, taking them in
//! order; the caller takes any extent the helper has not started when it
//! gets there (just after copying it, so partly from cache), and does all
//! of them if no thread can be started. With a second CPU free (a VMM
//! snapshotting a paused guest has its vCPUs' CPUs) the file form measured
//! 0.97 to 1.16 times the floor; with both CPUs taken by other work, 1.26
//! to 1.58, no better than the stream form (1.18 to 1.42): the CPU time is
//! still about 1.3 times the floor's, and the two threads contend.
//!
//! The helper reads the source, so the checksum is of the bytes as read at
//! about the instant the kernel copies them: in a snapshot, a page a device
//! writes meanwhile can make its extent fail its checksum (the restore then
//! refuses it instead of restoring torn contents); in a restore, the
//! snapshot file must not change while it is read, as with any input (a
//! CRC guards against corruption, not against a writer who can forge it).
//! Extents of up to 64 KiB skip both the kernel copy and the helper: for
//! them the system calls and wake-ups cost more than a copy through a
//! buffer, which also lets several go to one `pwrite`.
//!
//! # Format (version 1)
//!
//! All integers are little-endian; checksums are CRC-32 (IEEE, the
//! `crc32fast` crate).
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `GMEMSNAP` |
//! | 8..12 | version, 1 |
//! | 12..16 | state of the first run: 0 shared, 1 private |
//! | 16..24 | file size in bytes (a non-zero multiple of 4096, at most `isize::MAX`) |
//! | 24..32 | creation flags ([`Flags`] bits; unknown bits are refused) |
//! | 32..40 | number of runs (1 to the file's pages) |
//! | 40..48 | bytes of the run lengths (from the number of runs to ten times it) |
//! | 48..56 | number of extents (at most the file's pages) |
//! | 56..60 | reserved, zero |
//! | 60..64 | CRC-32 of bytes 0..60 |
//!
//! Then the **runs**: each run's length in pages as an unsigned LEB128
//! number, in order from page 0; the states alternate, starting with the
//! header's. A run starts where the previous one ends, so a length of zero
//! would make two runs start at one page (overlap) and is refused; the
//! lengths must add up to the file's pages exactly. A CRC-32 of the
//! section's bytes follows (4 bytes). A file whose 131,072 pages alternate
//! takes one byte a run.
//!
//! Then each **extent** of populated pages, in increasing order of offset,
//! none overlapping another: its offset and length in bytes (8 bytes each,
//! page multiples, the length non-zero, the end inside the file), its
//! contents (shared and private pages alike), and a CRC-32 of the offset,
//! length and contents (4 bytes). Pages in no extent are holes: they read
//! zero after a restore and take no memory.
//!
//! Last, the trailer `GMEMEND\0`. A restore reads exactly the snapshot's
//! bytes from its input and nothing past the trailer.
//!
//! # Bad input
//!
//! A restore checks every field before it acts on it, and never allocates
//! or loops by a count it has not bounded: counts are checked against the
//! file's pages, and every run or extent read consumes input, so a hostile
//! count costs only the input given. Contents are read in chunks of
//! [`CHUNK`] bytes. The errors: [`SnapshotError::Truncated`],
//! [`BadMagic`](SnapshotError::BadMagic),
//! [`UnsupportedVersion`](SnapshotError::UnsupportedVersion) and
//! [`Malformed`](SnapshotError::Malformed) (all `EINVAL`);
//! [`Checksum`](SnapshotError::Checksum) (`EBADMSG`); the stream's errno
//! ([`Stream`](SnapshotError::Stream)) or the new file's
//! ([`File`](SnapshotError::File)).

mod copy;
mod error;
mod file;
#[cfg(test)]
mod file_tests;
mod format;
mod lazy;
#[cfg(test)]
mod tests;

use std::io::{Read, Write};
use std::ops::Range;
use std::os::fd::BorrowedFd;

use rustix::fs::SeekFrom;
use rustix::io::Errno;

pub use copy::CopyMethod;
pub use error::SnapshotError;
use format::{Cursor, EXTENT_HEAD_LEN, HEADER_LEN, Header, TRAILER};
pub use lazy::{FaultsUnavailable, LazyRestoreProbe, probe_lazy_restore};

use crate::attributes::{Attribute, AttributeMap};
use crate::file::FileState;
use crate::{Error, Flags, GuestMemfd, Options, PAGE_SHIFT, PAGE_SIZE};

/// Bytes of contents copied at a time, by snapshots and restores alike.
pub const CHUNK: usize = 256 << 10;

/// What a snapshot wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Saved {
    /// Bytes written to the stream, all told.
    pub bytes: u64,
    /// Runs of one state.
    pub runs: u64,
    /// Extents of populated pages.
    pub extents: u64,
    /// Bytes of contents in those extents.
    pub data_bytes: u64,
    /// How the contents were moved: [`CopyMethod::Buffered`] for the
    /// stream form, a kernel copy where the file form could use one.
    pub method: CopyMethod,
}

/// What a snapshot writes, found under the invalidate lock: the header and
/// the runs section (with its checksum), and the populated extents.
struct Plan {
    head: Vec<u8>,
    runs: u64,
    extents: Vec<Range<u64>>,
}

impl Plan {
    fn new(state: &FileState, attrs: &AttributeMap) -> Result<Plan, SnapshotError> {
        let (first, runs, run_count) = encode_runs(attrs, state.size >> PAGE_SHIFT);
        let extents = data_extents(state.backing_fd(), state.size)?;
        let header = Header {
            first,
            size: state.size,
            flags: state.flags.bits(),
            run_count,
            runs_len: runs.len() as u64,
            extent_count: extents.len() as u64,
        };
        let mut head = header.encode().to_vec();
        head.extend_from_slice(&runs);
        head.extend_from_slice(&crc32fast::hash(&runs).to_le_bytes());
        Ok(Plan {
            head,
            runs: run_count,
            extents,
        })
    }

    /// What writing the plan wrote.
    fn saved(&self, method: CopyMethod) -> Saved {
        let data_bytes = self.extents.iter().map(|e| e.end - e.start).sum();
        let extents = self.extents.len() as u64;
        Saved {
            bytes: (self.head.len() + TRAILER.len()) as u64
                + extents * (EXTENT_HEAD_LEN as u64 + 4)
                + data_bytes,
            runs: self.runs,
            extents,
            data_bytes,
            method,
        }
    }
}

/// An extent's offset and length, as the snapshot holds them.
fn extent_head(extent: &Range<u64>) -> [u8; EXTENT_HEAD_LEN] {
    let mut head = [0u8; EXTENT_HEAD_LEN];
    head[..8].copy_from_slice(&extent.start.to_le_bytes());
    head[8..].copy_from_slice(&(extent.end - extent.start).to_le_bytes());
    head
}

impl GuestMemfd {
    /// Writes a snapshot of the file to `to`: its size, flags, the state of
    /// every page and the contents of its populated extents, in the format
    /// of the [module documentation](crate::snapshot). Each extent goes
    /// through a buffer of [`CHUNK`] bytes; [`snapshot_to_file`] copies
    /// them in the kernel.
    ///
    /// Taken under the invalidate lock held shared (no conversion or punch
    /// runs meanwhile); it waits for no pin, and pages written meanwhile are
    /// copied as they are at that instant: pause the guest and quiesce
    /// devices first. The snapshot holds private contents in clear.
    ///
    /// Errors: the stream's errno ([`SnapshotError::Stream`]); the errno of
    /// `lseek` or `pread` on the backing ([`SnapshotError::File`]).
    ///
    /// [`snapshot_to_file`]: GuestMemfd::snapshot_to_file
    pub fn snapshot(&self, mut to: impl Write) -> Result<Saved, SnapshotError> {
        let state = &*self.state;
        state.with_attrs(|attrs| {
            let plan = Plan::new(state, attrs)?;
            let mut write =
                |bytes: &[u8]| to.write_all(bytes).map_err(SnapshotError::stream("write"));
            write(&plan.head)?;
            let mut buf = vec![0u8; CHUNK];
            for extent in &plan.extents {
                copy_extent_out(state.backing_fd(), extent.clone(), &mut buf, &mut write)?;
            }
            write(&TRAILER)?;
            Ok(plan.saved(CopyMethod::Buffered))
        })
    }

    /// A new memfd-backed file in the state a snapshot read from `from`
    /// saved: size, flags, every page's state, and the populated contents,
    /// each extent's checksum verified; with `options` (huge folios, hiding,
    /// VMA budget), which snapshots do not hold. The file has no pin and no
    /// mapping. Reads exactly the snapshot's bytes from `from`.
    /// [`restore_from_file`](GuestMemfd::restore_from_file) copies the
    /// contents in the kernel.
    ///
    /// Nothing is made unless it all succeeds: on error the file being
    /// filled is dropped. See the [module documentation](crate::snapshot)
    /// for the checks.
    ///
    /// Errors: `EINVAL` for a truncated, malformed or foreign snapshot or
    /// another version; `EBADMSG` for a checksum mismatch; the stream's
    /// errno; the errno of making or writing the file (`ENOMEM`, `ENOSPC`).
    pub fn restore(from: impl Read, options: Options) -> Result<GuestMemfd, SnapshotError> {
        restore_with(&mut Cursor::new(from), options, read_extents)
    }
}

/// A restore: the header and runs read from `input` and checked, the new
/// file made, its extents filled by `extents` (given their number), and the
/// trailer checked. The file is dropped on any error.
fn restore_with<R: Read>(
    input: &mut Cursor<R>,
    options: Options,
    extents: impl FnOnce(&mut Cursor<R>, &GuestMemfd, u64) -> Result<(), SnapshotError>,
) -> Result<GuestMemfd, SnapshotError> {
    let mut bytes = [0u8; HEADER_LEN];
    input.read_exact(&mut bytes)?;
    let header = Header::decode(&bytes)?;
    let flags = check_header(&header)?;
    let attrs = read_runs(input, &header)?;
    let file = GuestMemfd::with_options(header.size, flags, options)?;
    // Nothing else has seen the file: no mapping, pin or folio chunk was
    // made from the map being replaced.
    *file.state.write_attrs() = attrs;
    extents(input, &file, header.extent_count)?;
    let at = input.at;
    let mut trailer = [0u8; 8];
    input.read_exact(&mut trailer)?;
    if trailer != TRAILER {
        return Err(malformed(at, "the trailer is missing"));
    }
    Ok(file)
}

fn malformed(at: u64, reason: &'static str) -> SnapshotError {
    SnapshotError::Malformed { at, reason }
}

/// The first run's state, the run lengths as LEB128, and their number.
fn encode_runs(attrs: &AttributeMap, pages: u64) -> (Attribute, Vec<u8>, u64) {
    let mut out = Vec::new();
    let mut first = None;
    let mut count = 0;
    for run in attrs.runs_in(0..pages) {
        first.get_or_insert(run.attr);
        format::push_varint(&mut out, run.pages.1 - run.pages.0);
        count += 1;
    }
    (first.unwrap_or(Attribute::Shared), out, count)
}

/// The populated extents of the backing's `[0, size)`, by `SEEK_DATA` and
/// `SEEK_HOLE`.
fn data_extents(fd: BorrowedFd<'_>, size: u64) -> Result<Vec<Range<u64>>, SnapshotError> {
    let mut extents = Vec::new();
    let mut at = 0;
    while at < size {
        let start = match rustix::fs::seek(fd, SeekFrom::Data(at)) {
            Ok(start) => start,
            Err(Errno::NXIO) => break,
            Err(errno) => return Err(Error::os("lseek(SEEK_DATA)")(errno).into()),
        };
        let end = rustix::fs::seek(fd, SeekFrom::Hole(start))
            .map_err(Error::os("lseek(SEEK_HOLE)"))?
            .min(size);
        if end <= start {
            break;
        }
        extents.push(start..end);
        at = end;
    }
    Ok(extents)
}

/// Writes one extent: offset, length, contents (read with `pread` a chunk
/// at a time through `buf`) and checksum.
fn copy_extent_out(
    fd: BorrowedFd<'_>,
    extent: Range<u64>,
    buf: &mut [u8],
    write: &mut impl FnMut(&[u8]) -> Result<(), SnapshotError>,
) -> Result<(), SnapshotError> {
    let head = extent_head(&extent);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    write(&head)?;
    let mut at = extent.start;
    while at < extent.end {
        let chunk = &mut buf[..(extent.end - at).min(CHUNK as u64) as usize];
        read_guest(fd, chunk, at)?;
        crc.update(chunk);
        write(chunk)?;
        at += chunk.len() as u64;
    }
    write(&crc.finalize().to_le_bytes())
}

/// The flags, after checking the header's values against each other.
fn check_header(header: &Header) -> Result<Flags, SnapshotError> {
    let flags =
        Flags::from_bits(header.flags).ok_or_else(|| malformed(24, "unknown creation flags"))?;
    GuestMemfd::validate(header.size, flags).map_err(|_| {
        malformed(
            16,
            "the size is zero, not a multiple of the page size, or above isize::MAX",
        )
    })?;
    let pages = header.size >> PAGE_SHIFT;
    if header.run_count == 0 || header.run_count > pages {
        return Err(malformed(
            32,
            "the number of runs is zero or above the pages",
        ));
    }
    // At most 2^51 runs, so ten times that does not overflow.
    if header.runs_len < header.run_count || header.runs_len > 10 * header.run_count {
        return Err(malformed(40, "the runs' length does not fit their number"));
    }
    if header.extent_count > pages {
        return Err(malformed(48, "more extents than pages"));
    }
    Ok(flags)
}

/// Reads the runs section, a chunk at a time (so what it holds grows only
/// with the input given), checks its checksum, and decodes it into a new
/// attribute map.
fn read_runs(
    input: &mut Cursor<impl Read>,
    header: &Header,
) -> Result<AttributeMap, SnapshotError> {
    let start_at = input.at;
    let mut section: Vec<u8> = Vec::new();
    while (section.len() as u64) < header.runs_len {
        let old = section.len();
        let n = (header.runs_len - old as u64).min(CHUNK as u64) as usize;
        section.resize(old + n, 0);
        input.read_exact(&mut section[old..])?;
    }
    let at = input.at;
    if input.read_u32()? != crc32fast::hash(&section) {
        return Err(SnapshotError::Checksum {
            section: "runs",
            at,
        });
    }
    decode_runs(&section, header, start_at)
}

/// The attribute map of the run lengths in `section` (which starts at byte
/// `start_at` of the snapshot).
fn decode_runs(
    section: &[u8],
    header: &Header,
    start_at: u64,
) -> Result<AttributeMap, SnapshotError> {
    let pages = header.size >> PAGE_SHIFT;
    let mut attrs = AttributeMap::new(pages, header.first);
    let (mut used, mut runs, mut start, mut attr) = (0, 0, 0u64, header.first);
    while used < section.len() {
        let at = start_at + used as u64;
        let (len, took) = format::take_varint(&section[used..])
            .map_err(|reason| malformed(at, reason))?
            .ok_or_else(|| malformed(at, "the runs end inside a run's length"))?;
        used += took;
        if runs == header.run_count {
            return Err(malformed(at, "more runs than the header says"));
        }
        if len == 0 {
            return Err(malformed(at, "two runs start at one page (they overlap)"));
        }
        let end = start
            .checked_add(len)
            .filter(|end| *end <= pages)
            .ok_or_else(|| malformed(at, "a run reaches past the end of the file"))?;
        if attr != header.first {
            attrs.prepare().map_err(|_| Error::Os {
                call: "allocating the attribute map",
                errno: Errno::NOMEM,
            })?;
            attrs.set(start..end, attr);
        }
        (start, attr, runs) = (end, attr.other(), runs + 1);
    }
    if runs != header.run_count || start != pages {
        let at = start_at + section.len() as u64;
        return Err(malformed(at, "the runs do not cover the file"));
    }
    Ok(attrs)
}

/// Reads the extents into `file`, a chunk at a time, checking each one's
/// place and checksum.
fn read_extents(
    input: &mut Cursor<impl Read>,
    file: &GuestMemfd,
    count: u64,
) -> Result<(), SnapshotError> {
    let mut buf = Vec::new();
    let mut previous_end = 0;
    for _ in 0..count {
        let (head, extent) = read_extent_head(input, previous_end, file.size())?;
        previous_end = extent.end;
        read_extent(input, head, extent, file.state.backing_fd(), &mut buf)?;
    }
    Ok(())
}

/// Reads the contents of the extent whose `head` was just read, a chunk at
/// a time through `buf`, into `to`, then its checksum, and compares it.
fn read_extent(
    input: &mut Cursor<impl Read>,
    head: [u8; EXTENT_HEAD_LEN],
    extent: Range<u64>,
    to: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
) -> Result<(), SnapshotError> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    let most = (extent.end - extent.start).min(CHUNK as u64) as usize;
    if buf.len() < most {
        buf.resize(most, 0);
    }
    let mut pos = extent.start;
    while pos < extent.end {
        let chunk = &mut buf[..(extent.end - pos).min(CHUNK as u64) as usize];
        input.read_exact(chunk)?;
        crc.update(chunk);
        write_at(to, chunk, pos).map_err(Error::os("pwrite"))?;
        pos += chunk.len() as u64;
    }
    check_extent_crc(input, crc.finalize())
}

/// Reads an extent's offset and length and checks them: page-aligned,
/// non-empty, after `previous_end` and inside a file of `size` bytes.
fn read_extent_head(
    input: &mut Cursor<impl Read>,
    previous_end: u64,
    size: u64,
) -> Result<([u8; EXTENT_HEAD_LEN], Range<u64>), SnapshotError> {
    let at = input.at;
    let mut head = [0u8; EXTENT_HEAD_LEN];
    input.read_exact(&mut head)?;
    let offset = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
    if offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
        return Err(malformed(at, "an extent is empty or not page-aligned"));
    }
    if offset < previous_end {
        return Err(malformed(at, "extents overlap or are out of order"));
    }
    let end = offset
        .checked_add(len)
        .filter(|end| *end <= size)
        .ok_or_else(|| malformed(at, "an extent reaches past the end of the file"))?;
    Ok((head, offset..end))
}

/// Reads an extent's checksum and compares it with `crc`.
fn check_extent_crc(input: &mut Cursor<impl Read>, crc: u32) -> Result<(), SnapshotError> {
    let at = input.at;
    if input.read_u32()? != crc {
        return Err(SnapshotError::Checksum {
            section: "extent",
            at,
        });
    }
    Ok(())
}

/// `pread(2)` into all of `buf` at `offset`, or up to the end of the file:
/// the bytes read.
fn read_at(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<usize, Errno> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(errno) => return Err(errno),
        }
    }
    Ok(done)
}

/// `pread(2)` of all of `buf` at `offset` of guest memory; its end is `EIO`.
fn read_guest(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<(), SnapshotError> {
    match read_at(fd, buf, offset).map_err(Error::os("pread"))? {
        n if n == buf.len() => Ok(()),
        _ => Err(Error::os("pread")(Errno::IO).into()),
    }
}

/// `pwrite(2)` of all of `data` at `offset`.
fn write_at(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> Result<(), Errno> {
    let mut done = 0;
    while done < data.len() {
        match rustix::io::pwrite(fd, &data[done..], offset + done as u64) {
            Ok(0) => return Err(Errno::NOSPC),
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(errno) => return Err(errno),
        }
    }
    Ok(())
}
