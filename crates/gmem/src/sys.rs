//! The leaf of system calls that need `unsafe`: shared mappings of a file and
//! raw copies through them. Nothing above this module dereferences a pointer
//! into guest memory.

use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;

use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};

/// An owned `MAP_SHARED` mapping of a file; `Drop` unmaps it.
///
/// The mapping may be longer than the file (pages past the end raise
/// `SIGBUS`). Parts of it can be replaced in place by [`remap`](Self::remap),
/// which keeps the address range owned by this value throughout.
#[derive(Debug)]
pub(crate) struct MappedRegion {
    addr: NonNull<u8>,
    len: usize,
}

// The region is plain memory owned by this value; every access goes through
// raw copies whose bounds are checked, and remaps are serialised by the owner
// (the conversion holds the mapping registry's lock).
// SAFETY: nothing in the region is tied to the creating thread.
unsafe impl Send for MappedRegion {}
// SAFETY: as for Send; `&MappedRegion` only allows bounded raw copies.
unsafe impl Sync for MappedRegion {}

impl MappedRegion {
    /// Maps `len` bytes (page-aligned, non-zero) of `fd` from offset 0, shared.
    pub(crate) fn map_shared(fd: BorrowedFd<'_>, len: usize) -> Result<MappedRegion, Errno> {
        // SAFETY: a new mapping at an address the kernel picks overlaps nothing we own.
        let addr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::NORESERVE,
                fd,
                0,
            )?
        };
        let addr = NonNull::new(addr.cast::<u8>()).ok_or(Errno::NOMEM)?;
        Ok(MappedRegion { addr, len })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Replaces `[start, start + len)` of this region with a shared mapping
    /// of `fd` at file offset `start`. Mapping the real file there makes the
    /// pages accessible; mapping an empty file makes every access `SIGBUS`
    /// (the offset is past its end), and keeps offsets contiguous so that the
    /// kernel merges neighbouring pieces into one VMA.
    pub(crate) fn remap(&self, start: u64, len: u64, fd: impl AsFd) -> Result<(), Errno> {
        let end = start.checked_add(len).ok_or(Errno::INVAL)?;
        if end > self.len as u64 || len == 0 {
            return Err(Errno::INVAL);
        }
        // Nobody holds a Rust reference into the region (raw copies only).
        // SAFETY: the range lies inside this region, so MAP_FIXED replaces only our own pages.
        unsafe {
            rustix::mm::mmap(
                self.as_ptr().add(start as usize).cast(),
                len as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED | MapFlags::NORESERVE,
                fd.as_fd(),
                start,
            )?;
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes from `offset` of the region into `buf`.
    ///
    /// The caller has checked that the pages are mapped to the file (shared
    /// and inside it); a page that is not raises `SIGBUS`, as a raw access
    /// would. Panics if the range is outside the region.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) {
        let offset = self.check(offset, buf.len());
        // Guest memory may change under the copy: we copy bytes, never form
        // references.
        // SAFETY: the source is inside the region (checked) and readable; `buf` is distinct.
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), buf.as_mut_ptr(), buf.len())
        }
    }

    /// Copies `data` to `offset` of the region; as [`read`](Self::read).
    pub(crate) fn write(&self, offset: u64, data: &[u8]) {
        let offset = self.check(offset, data.len());
        // SAFETY: the destination is inside the region (checked) and writable; `data` is distinct.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len())
        }
    }

    fn check(&self, offset: u64, len: usize) -> usize {
        let end = offset.checked_add(len as u64);
        assert!(
            end.is_some_and(|end| end <= self.len as u64),
            "copy of {len} bytes at {offset:#x} outside a region of {:#x}",
            self.len
        );
        offset as usize
    }
}

/// How a raw access made by [`HostMapping::probe`](crate::HostMapping::probe) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The access completed.
    Completed,
    /// The child died of this signal (`SIGBUS` = 7 for a private page).
    Signal(i32),
}

/// Reads (or writes) the byte at `ptr` in a forked child and reports how the
/// child ended. The child touches nothing else and exits at once, so forking
/// a multi-threaded process is sound; a write reaches the parent only through
/// a shared mapping.
pub(crate) fn probe_in_child(ptr: *mut u8, write: bool) -> Result<ProbeOutcome, Errno> {
    // SAFETY: the child only performs one access and `_exit`s: no allocation, no locks.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ));
    }
    if pid == 0 {
        // SAFETY: a fault is what is being observed; the child exits right after either way.
        unsafe {
            if write {
                std::ptr::write_volatile(ptr, std::ptr::read_volatile(ptr));
            } else {
                std::ptr::read_volatile(ptr);
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child with a valid status pointer.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        if waited == pid {
            break;
        }
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if errno != libc::EINTR {
            return Err(Errno::from_raw_os_error(errno));
        }
    }
    if libc::WIFSIGNALED(status) {
        Ok(ProbeOutcome::Signal(libc::WTERMSIG(status)))
    } else {
        Ok(ProbeOutcome::Completed)
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // SAFETY: this value owns the mapping; after drop no copy can reach it.
        if let Err(errno) = unsafe { rustix::mm::munmap(self.as_ptr().cast(), self.len) } {
            tracing::error!(%errno, len = self.len, "munmap of a guest memory mapping failed");
        }
    }
}
