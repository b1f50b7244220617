//! Floors for the benchmarks: the raw work gmem cannot avoid, done directly.
//! Written apart from gmem's own `sys.rs` on purpose: a floor must not run
//! gmem's code.
//! One of the two modules of the command with `unsafe` (with `counter.rs`).

use std::ffi::{c_int, c_long, c_void};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::MemfdFlags;
use rustix::mm::{MapFlags, ProtFlags};

/// `MADV_GUARD_INSTALL` (Linux 6.13): accesses to the range fault with
/// `SIGSEGV`; the file's contents are kept and the VMA is not split.
const MADV_GUARD_INSTALL: c_int = 102;
/// `MADV_GUARD_REMOVE`: the range is accessible again.
const MADV_GUARD_REMOVE: c_int = 103;
/// `pidfd_open` and `process_madvise`: numbers from the table shared by every
/// architecture since 5.1 (`asm-generic/unistd.h`, 434 and 440).
const SYS_PIDFD_OPEN: c_long = 434;
const SYS_PROCESS_MADVISE: c_long = 440;
/// The most ranges one `process_madvise` takes (`UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// `struct iovec`. Not `IoSlice`: the ranges may be inaccessible, so no
/// slice may be formed over them.
#[repr(C)]
struct Iovec {
    base: *mut c_void,
    len: usize,
}

// glibc's entry points, declared here rather than through a crate: the
// command's dependencies offer neither guard advice nor `process_madvise`.
// SAFETY: the signatures are glibc's (`sys/mman.h`, `unistd.h`).
unsafe extern "C" {
    fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
    fn syscall(number: c_long, ...) -> c_long;
}

/// A memfd mapped shared, whose ranges can be hidden and shown again: by
/// remapping them to an empty file and back, or by guard markers. The
/// page-table work of a conversion, without gmem.
pub struct RawMapping {
    file: OwnedFd,
    hole: OwnedFd,
    /// A pidfd of this process, for `process_madvise`; `None` where the
    /// kernel has no `pidfd_open`.
    pidfd: Option<OwnedFd>,
    addr: NonNull<u8>,
    len: usize,
}

impl RawMapping {
    /// A memfd of `len` bytes, allocated, mapped shared.
    pub fn new(len: usize) -> std::io::Result<RawMapping> {
        let size = u64::try_from(len).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let file = rustix::fs::memfd_create("floor", MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&file, size)?;
        rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::KEEP_SIZE, 0, size)?;
        let hole = rustix::fs::memfd_create("floor-hole", MemfdFlags::CLOEXEC)?;
        // SAFETY: a new mapping at an address the kernel chooses.
        let addr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::NORESERVE,
                &file,
                0,
            )?
        };
        let addr = NonNull::new(addr.cast::<u8>()).ok_or(std::io::ErrorKind::OutOfMemory)?;
        Ok(RawMapping {
            file,
            hole,
            pidfd: open_own_pidfd().ok(),
            addr,
            len,
        })
    }

    /// The address of `offset`, after checking that `[offset, offset + len)`
    /// lies inside the mapping (without wrapping).
    fn at(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "{len} bytes at {offset:#x} outside a mapping of {:#x}",
            self.len
        );
        // SAFETY: `offset <= self.len` (checked): at most one past the end.
        unsafe { self.addr.as_ptr().add(offset) }
    }

    fn remap(&self, offset: usize, len: usize, fd: impl AsFd) {
        let addr = self.at(offset, len);
        // The range is inside this mapping (checked), which this value owns,
        // and nothing holds a reference into it.
        // SAFETY: MAP_FIXED replaces only pages this value owns.
        unsafe {
            rustix::mm::mmap(
                addr.cast(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED | MapFlags::NORESERVE,
                fd.as_fd(),
                offset as u64,
            )
            .expect("remap inside our own mapping");
        }
    }

    /// Replaces the range with the empty file's pages (what a conversion to
    /// private does to one host mapping in the remap design).
    pub fn hide(&self, offset: usize, len: usize) {
        self.remap(offset, len, &self.hole);
    }

    /// Maps the range to the file again (a conversion to shared in the remap
    /// design).
    pub fn show(&self, offset: usize, len: usize) {
        self.remap(offset, len, &self.file);
    }

    fn guard(&self, offset: usize, len: usize, advice: c_int) -> std::io::Result<()> {
        let addr = self.at(offset, len);
        // Guard markers change which accesses fault, never a byte, and
        // nothing holds a reference into the mapping.
        // SAFETY: the range is inside the mapping this value owns (checked).
        let ret = unsafe { madvise(addr.cast(), len, advice) };
        if ret == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Hides the range behind guard markers (`MADV_GUARD_INSTALL`): what a
    /// conversion to private does to one host mapping in the guard design.
    pub fn guard_install(&self, offset: usize, len: usize) -> std::io::Result<()> {
        self.guard(offset, len, MADV_GUARD_INSTALL)
    }

    /// Removes the range's guard markers (`MADV_GUARD_REMOVE`).
    pub fn guard_remove(&self, offset: usize, len: usize) -> std::io::Result<()> {
        self.guard(offset, len, MADV_GUARD_REMOVE)
    }

    /// [`guard_install`](Self::guard_install) of every `(offset, len)` range,
    /// by `process_madvise` calls of up to [`MAX_IOVECS`] ranges each.
    pub fn guard_install_ranges(&self, ranges: &[(usize, usize)]) -> std::io::Result<()> {
        self.guard_ranges(ranges, MADV_GUARD_INSTALL)
    }

    /// [`guard_remove`](Self::guard_remove) of every range, batched as
    /// [`guard_install_ranges`](Self::guard_install_ranges).
    pub fn guard_remove_ranges(&self, ranges: &[(usize, usize)]) -> std::io::Result<()> {
        self.guard_ranges(ranges, MADV_GUARD_REMOVE)
    }

    fn guard_ranges(&self, ranges: &[(usize, usize)], advice: c_int) -> std::io::Result<()> {
        let pidfd = self.pidfd.as_ref().ok_or(std::io::ErrorKind::Unsupported)?;
        let mut iovecs = Vec::with_capacity(ranges.len().min(MAX_IOVECS));
        for chunk in ranges.chunks(MAX_IOVECS) {
            iovecs.clear();
            iovecs.extend(
                chunk
                    .iter()
                    .filter(|(_, len)| *len > 0)
                    .map(|&(offset, len)| Iovec {
                        base: self.at(offset, len).cast(),
                        len,
                    }),
            );
            let mut rest = &mut iovecs[..];
            while !rest.is_empty() {
                let advised = process_madvise(pidfd, rest, advice)?;
                rest = advance(rest, advised)?;
            }
        }
        Ok(())
    }

    /// Faults in every page of the range for writing (`MADV_POPULATE_WRITE`).
    pub fn touch(&self, offset: usize, len: usize) {
        let addr = self.at(offset, len);
        // SAFETY: inside the mapping (checked), mapped to the file; no byte changes.
        unsafe {
            rustix::mm::madvise(addr.cast(), len, rustix::mm::Advice::LinuxPopulateWrite)
                .expect("populate our own mapping");
        }
    }

    /// `copy_nonoverlapping` from the mapping into `dst`: the floor of a copy.
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        let src = self.at(offset, dst.len());
        // SAFETY: the source is inside the mapping (checked), mapped to the file; `dst` is distinct.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) }
    }

    /// `copy_nonoverlapping` from `src` into the mapping.
    pub fn copy_in(&self, offset: usize, src: &[u8]) {
        let dst = self.at(offset, src.len());
        // SAFETY: the destination is inside the mapping (checked); `src` is distinct.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) }
    }
}

/// `pidfd_open(getpid(), 0)`.
fn open_own_pidfd() -> std::io::Result<OwnedFd> {
    let pid = c_long::from(std::process::id());
    // SAFETY: pidfd_open takes two integers and touches no memory of ours.
    let fd = unsafe { syscall(SYS_PIDFD_OPEN, pid, 0 as c_long) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = c_int::try_from(fd).map_err(|_| std::io::ErrorKind::InvalidData)?;
    // SAFETY: the kernel just returned this descriptor, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One `process_madvise(pidfd, iovecs, advice, 0)`: the bytes advised.
fn process_madvise(pidfd: &OwnedFd, iovecs: &[Iovec], advice: c_int) -> std::io::Result<usize> {
    let count = iovecs.len().min(MAX_IOVECS) as c_long;
    // Every iovec was built by `RawMapping::at` over a range of a mapping the
    // caller owns (so the advice changes only its pages); the kernel reads
    // the array and writes nothing of ours.
    // SAFETY: `iovecs` holds `count` initialised `struct iovec`s.
    let advised = unsafe {
        syscall(
            SYS_PROCESS_MADVISE,
            c_long::from(pidfd.as_raw_fd()),
            iovecs.as_ptr(),
            count,
            c_long::from(advice),
            0 as c_long,
        )
    };
    usize::try_from(advised).map_err(|_| std::io::Error::last_os_error())
}

/// `iovecs` without the first `advised` bytes (a short `process_madvise`
/// stops at a range it could not advise; the next call reports why).
fn advance(iovecs: &mut [Iovec], mut advised: usize) -> std::io::Result<&mut [Iovec]> {
    if advised == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    let mut done = 0;
    while let Some(iovec) = iovecs.get_mut(done) {
        if advised < iovec.len {
            iovec.base = iovec.base.wrapping_byte_add(advised);
            iovec.len -= advised;
            break;
        }
        advised -= iovec.len;
        done += 1;
    }
    Ok(&mut iovecs[done..])
}

/// Faults in every page of `map` for writing, in one call
/// (`MADV_POPULATE_WRITE`), as touching each page would.
pub fn populate(map: &gmem::HostMapping, len: u64) -> std::io::Result<()> {
    assert!(len <= map.len());
    let len = usize::try_from(len).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // Populating faults pages in and changes no byte; a private page would
    // fail with EFAULT.
    // SAFETY: the range is inside the mapping `map` owns (asserted).
    unsafe {
        rustix::mm::madvise(
            map.as_ptr().cast(),
            len,
            rustix::mm::Advice::LinuxPopulateWrite,
        )?
    };
    Ok(())
}

impl Drop for RawMapping {
    fn drop(&mut self) {
        // SAFETY: this value owns the mapping.
        let _ = unsafe { rustix::mm::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    /// A range past the end is refused even where `offset + len` wraps.
    #[test]
    #[should_panic(expected = "outside a mapping")]
    fn bounds_do_not_wrap() {
        let raw = RawMapping::new(2 * PAGE).unwrap();
        raw.copy_in(usize::MAX - (PAGE - 1), &[0u8; PAGE]);
    }

    #[test]
    #[should_panic(expected = "outside a mapping")]
    fn bounds_refuse_the_end() {
        let raw = RawMapping::new(2 * PAGE).unwrap();
        raw.copy_in(PAGE + 1, &[0u8; PAGE]);
    }

    /// Guards, single and batched (over more than one call), keep contents.
    #[test]
    fn guards_keep_contents() {
        let pages = 2 * MAX_IOVECS + 3;
        let raw = RawMapping::new(2 * pages * PAGE).unwrap();
        if raw.guard_install(0, PAGE).is_err() {
            eprintln!("no guard markers on this kernel; skipped");
            return;
        }
        raw.guard_remove(0, PAGE).unwrap();
        raw.copy_in(2 * PAGE, b"kept");
        let odd: Vec<_> = (0..pages).map(|i| ((2 * i + 1) * PAGE, PAGE)).collect();
        let even: Vec<_> = (0..pages).map(|i| (2 * i * PAGE, PAGE)).collect();
        let populates = |offset: usize| {
            // SAFETY: inside the mapping `raw` owns; populating changes no byte.
            unsafe {
                rustix::mm::madvise(
                    raw.at(offset, PAGE).cast(),
                    PAGE,
                    rustix::mm::Advice::LinuxPopulateWrite,
                )
            }
            .is_ok()
        };
        raw.guard_install_ranges(&even).unwrap();
        raw.guard_install_ranges(&odd).unwrap();
        assert!(!populates(0) && !populates((2 * pages - 1) * PAGE));
        raw.guard_remove_ranges(&even).unwrap();
        assert!(populates(0) && !populates((2 * pages - 1) * PAGE));
        raw.guard_remove_ranges(&odd).unwrap();
        let mut out = [0u8; 4];
        raw.copy_out(2 * PAGE, &mut out);
        assert_eq!(&out, b"kept");
        raw.touch(0, 2 * pages * PAGE);
    }

    /// A short `process_madvise` resumes inside or after a range.
    #[test]
    fn advance_skips_what_was_advised() {
        let base = std::ptr::null_mut::<c_void>();
        let mut iovecs = [
            Iovec { base, len: 8 },
            Iovec {
                base: base.wrapping_byte_add(100),
                len: 8,
            },
        ];
        let rest = advance(&mut iovecs, 12).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].base.addr(), rest[0].len), (104, 4));
        assert!(advance(rest, 4).unwrap().is_empty());
        assert!(advance(&mut iovecs, 0).is_err());
    }
}
