//! The file form of snapshots: [`GuestMemfd::snapshot_to_file`] and
//! [`GuestMemfd::restore_from_file`], the same format written and read at
//! explicit offsets of a regular file, large extents copied in the kernel
//! and checksummed by a helper thread ([`super::copy`]), small ones through
//! a buffer. Anything but a regular file (a pipe, a socket, a terminal)
//! goes through the stream form instead.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{FileType, OFlags, SeekFrom};
use rustix::io::Errno;

use super::copy::{Checksums, CopyMethod, Job, Mover};
use super::format::{Cursor, TRAILER};
use super::{
    CHUNK, Plan, Saved, SnapshotError, extent_head, read_extent, read_extent_head, read_guest,
    restore_with, write_at,
};
use crate::{Error, GuestMemfd, Options};

impl GuestMemfd {
    /// [`snapshot`](GuestMemfd::snapshot) to a file, written at its
    /// position, which is left at the snapshot's end. Each extent's
    /// contents are copied in the kernel (`copy_file_range(2)`, else
    /// `sendfile(2)` where that is refused, as between file systems, else
    /// through a buffer), while a helper thread reads the same pages of
    /// guest memory to checksum them; [`Saved::method`] says which copy was
    /// used. The bytes are those [`snapshot`](GuestMemfd::snapshot) writes.
    ///
    /// `to` that is not a regular file (a pipe, a socket) or was opened
    /// with `O_APPEND` is written as a stream, by `write(2)`.
    ///
    /// The checksum and the copy read guest memory at two instants: a page
    /// written meanwhile (by a device not quiesced) can leave its extent
    /// failing its checksum, so a restore refuses it rather than restoring
    /// torn contents. On error the file holds part of a snapshot and its
    /// position is unspecified.
    ///
    /// Errors: those of [`snapshot`](GuestMemfd::snapshot); a kernel copy's
    /// errno as [`SnapshotError::Stream`].
    pub fn snapshot_to_file(&self, to: impl AsFd) -> Result<Saved, SnapshotError> {
        self.snapshot_file_by(to.as_fd(), CopyMethod::CopyFileRange)
    }

    /// [`restore`](GuestMemfd::restore) from a file, read at its position,
    /// which is left just past the snapshot's trailer (unchanged on error).
    /// Each extent's contents are copied into the new file in the kernel
    /// (`copy_file_range(2)`, else `sendfile(2)`, else through a buffer),
    /// and a helper thread reads back what landed to checksum it: every
    /// checksum is verified before the file is returned. The header, the
    /// runs and each extent's offset and length are read into memory and
    /// checked as the stream form does, with the same errors; nothing is
    /// allocated or copied by a count before it is checked against the
    /// file's size, and an extent is copied only up to the end of the
    /// input.
    ///
    /// `from` that is not a regular file (a pipe, a socket) is read as a
    /// stream, by `read(2)`.
    pub fn restore_from_file(
        from: impl AsFd,
        options: Options,
    ) -> Result<GuestMemfd, SnapshotError> {
        restore_file_by(from.as_fd(), options, CopyMethod::CopyFileRange).map(|(file, _)| file)
    }

    /// [`snapshot_to_file`](GuestMemfd::snapshot_to_file), trying `method`
    /// first.
    pub(super) fn snapshot_file_by(
        &self,
        to: BorrowedFd<'_>,
        method: CopyMethod,
    ) -> Result<Saved, SnapshotError> {
        let Some(start) = position(to, true)? else {
            return self.snapshot(Fd(to));
        };
        let state = &*self.state;
        state.with_attrs(|attrs| {
            let plan = Plan::new(state, attrs)?;
            let method = write_plan(state.backing_fd(), &plan, to, start, method)?;
            let saved = plan.saved(method);
            rustix::fs::seek(to, SeekFrom::Start(start + saved.bytes)).map_err(stream("lseek"))?;
            Ok(saved)
        })
    }
}

/// [`GuestMemfd::restore_from_file`], trying `method` first: the file and
/// the method used.
pub(super) fn restore_file_by(
    from: BorrowedFd<'_>,
    options: Options,
    method: CopyMethod,
) -> Result<(GuestMemfd, CopyMethod), SnapshotError> {
    let Some(start) = position(from, false)? else {
        let file = GuestMemfd::restore(Fd(from), options)?;
        return Ok((file, CopyMethod::Buffered));
    };
    let mut input = Cursor::new(Positioned {
        fd: from,
        at: start,
    });
    let mut used = method;
    let file = restore_with(&mut input, options, |input, file, count| {
        used = copy_extents_in(input, file, count, method)?;
        Ok(())
    })?;
    rustix::fs::seek(from, SeekFrom::Start(input.inner.at)).map_err(stream("lseek"))?;
    Ok((file, used))
}

fn stream(call: &'static str) -> impl FnOnce(Errno) -> SnapshotError {
    move |errno| SnapshotError::Stream { call, errno }
}

/// The position of `fd` if the file form can use it: a regular file (and
/// for writing, not opened with `O_APPEND`, which `pwrite` would ignore);
/// `None` otherwise.
fn position(fd: BorrowedFd<'_>, writing: bool) -> Result<Option<u64>, SnapshotError> {
    let stat = rustix::fs::fstat(fd).map_err(stream("fstat"))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Ok(None);
    }
    if writing {
        let flags = rustix::fs::fcntl_getfl(fd).map_err(stream("fcntl"))?;
        if flags.contains(OFlags::APPEND) {
            return Ok(None);
        }
    }
    match rustix::fs::seek(fd, SeekFrom::Current(0)) {
        Ok(at) => Ok(Some(at)),
        Err(Errno::SPIPE) => Ok(None),
        Err(errno) => Err(stream("lseek")(errno)),
    }
}

/// Extents of at most this many bytes go through a buffer in both
/// directions: for them a kernel copy and a helper's checksum cost more in
/// system calls and wake-ups than the copy they save.
pub(super) const SMALL: u64 = 64 << 10;

/// Writes `plan` to `to` from `start`: the header and runs, then each
/// extent's head, contents and checksum; then the trailer. A large
/// extent's contents are copied from guest memory (`from`) in the kernel
/// and its checksum comes from the helper thread, which reads the same
/// pages meanwhile; small extents are read into the buffer of bytes
/// written between two copies. The method the copies ended with.
fn write_plan(
    from: BorrowedFd<'_>,
    plan: &Plan,
    to: BorrowedFd<'_>,
    start: u64,
    method: CopyMethod,
) -> Result<CopyMethod, SnapshotError> {
    std::thread::scope(|scope| {
        let mut sums = Checksums::new(scope, from, |errno| Error::os("pread")(errno).into());
        for extent in plan.extents.iter().filter(|e| e.end - e.start > SMALL) {
            let (head, len) = (extent_head(extent), extent.end - extent.start);
            sums.push(Job {
                head,
                at: extent.start,
                len,
            });
        }
        let mut mover = Mover::new(method);
        let mut between = plan.head.clone();
        let (mut at, mut large) = (start, 0);
        let flush = |between: &mut Vec<u8>, at: &mut u64| {
            write_at(to, between, *at).map_err(stream("pwrite"))?;
            *at += between.len() as u64;
            between.clear();
            Ok::<_, SnapshotError>(())
        };
        for extent in &plan.extents {
            let (head, len) = (extent_head(extent), extent.end - extent.start);
            between.extend_from_slice(&head);
            if len <= SMALL {
                let old = between.len();
                between.resize(old + len as usize, 0);
                read_guest(from, &mut between[old..], extent.start)?;
                let crc = crc32fast::hash(&between[old - head.len()..]);
                between.extend_from_slice(&crc.to_le_bytes());
                if between.len() >= CHUNK {
                    flush(&mut between, &mut at)?;
                }
                continue;
            }
            flush(&mut between, &mut at)?;
            if mover.copy(from, extent.start, to, at, len)? < len {
                // Guest memory is never shorter than its extents.
                return Err(Error::os("copying guest memory")(Errno::IO).into());
            }
            at += len;
            between.extend_from_slice(&sums.take(large)?.to_le_bytes());
            large += 1;
        }
        between.extend_from_slice(&TRAILER);
        flush(&mut between, &mut at)?;
        Ok(mover.method)
    })
}

/// Copies `count` extents from the snapshot into `file` in the kernel,
/// checking each one's place as the stream form does, and then every
/// checksum, computed by the helper thread from the same bytes of the
/// snapshot, read while the kernel copies them. The method the copies
/// ended with.
fn copy_extents_in(
    input: &mut Cursor<Positioned<'_>>,
    file: &GuestMemfd,
    count: u64,
    method: CopyMethod,
) -> Result<CopyMethod, SnapshotError> {
    let (from, to) = (input.inner.fd, file.state.backing_fd());
    std::thread::scope(|scope| {
        let mut sums = Checksums::new(scope, from, |errno| stream("pread")(errno));
        let mut mover = Mover::new(method);
        let mut buf = Vec::new();
        // Each large extent's job, and where its checksum is in the
        // snapshot, and its value.
        let mut expected = VecDeque::new();
        let copied = (|| {
            let mut previous_end = 0;
            for _ in 0..count {
                let (head, extent) = read_extent_head(input, previous_end, file.size())?;
                previous_end = extent.end;
                if extent.end - extent.start <= SMALL {
                    read_extent(input, head, extent, to, &mut buf)?;
                    continue;
                }
                let (at, len) = (input.inner.at, extent.end - extent.start);
                let k = sums.push(Job { head, at, len });
                let n = mover.copy(from, at, to, extent.start, len)?;
                input.inner.at += n;
                input.at += n;
                if n < len {
                    return Err(SnapshotError::Truncated { at: input.at });
                }
                sums.help(k);
                expected.push_back((k, input.at, input.read_u32()?));
            }
            Ok(())
        })();
        // Every checksum taken is compared even after an error: a mismatch
        // comes before it in the snapshot, so it is the one reported, as in
        // the stream form.
        for (k, at, crc) in expected {
            if sums.take(k)? != crc {
                let section = "extent";
                return Err(SnapshotError::Checksum { section, at });
            }
        }
        copied.map(|()| mover.method)
    })
}

/// A file read with `pread(2)` from a position it keeps (the file's own
/// position is left alone).
pub(super) struct Positioned<'fd> {
    fd: BorrowedFd<'fd>,
    at: u64,
}

impl Read for Positioned<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = rustix::io::pread(self.fd, buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// A file descriptor read and written as a stream, by `read(2)` and
/// `write(2)`.
struct Fd<'fd>(BorrowedFd<'fd>);

impl Read for Fd<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Ok(rustix::io::read(self.0, buf)?)
    }
}

impl Write for Fd<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(rustix::io::write(self.0, buf)?)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
