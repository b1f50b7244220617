//! Floors for the benchmarks: the raw work gmem cannot avoid, done directly.
//! Written apart from gmem's own `sys.rs` on purpose: a floor must not run
//! gmem's code.
//! The one module of the command with `unsafe`.

use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::MemfdFlags;
use rustix::mm::{MapFlags, ProtFlags};

/// A memfd mapped shared, whose ranges can be remapped to an empty file and
/// back: the page-table work of a conversion without gmem.
pub struct RawMapping {
    file: OwnedFd,
    hole: OwnedFd,
    addr: NonNull<u8>,
    len: usize,
}

impl RawMapping {
    /// A memfd of `len` bytes, allocated, mapped shared.
    pub fn new(len: usize) -> std::io::Result<RawMapping> {
        let file = rustix::fs::memfd_create("floor", MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&file, len as u64)?;
        rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::KEEP_SIZE, 0, len as u64)?;
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
            addr,
            len,
        })
    }

    fn remap(&self, offset: usize, len: usize, fd: impl AsFd) {
        assert!(offset + len <= self.len);
        // The range is inside this mapping, which this value owns, and nothing
        // holds a reference into it.
        // SAFETY: MAP_FIXED replaces only pages this value owns.
        unsafe {
            rustix::mm::mmap(
                self.addr.as_ptr().add(offset).cast(),
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
    /// private does to one host mapping).
    pub fn hide(&self, offset: usize, len: usize) {
        self.remap(offset, len, &self.hole);
    }

    /// Maps the range to the file again (a conversion to shared).
    pub fn show(&self, offset: usize, len: usize) {
        self.remap(offset, len, &self.file);
    }

    /// Faults in every page of the range for writing (`MADV_POPULATE_WRITE`).
    pub fn touch(&self, offset: usize, len: usize) {
        assert!(offset + len <= self.len);
        // SAFETY: inside the mapping, mapped to the file; no byte changes.
        unsafe {
            rustix::mm::madvise(
                self.addr.as_ptr().add(offset).cast(),
                len,
                rustix::mm::Advice::LinuxPopulateWrite,
            )
            .expect("populate our own mapping");
        }
    }

    /// `copy_nonoverlapping` from the mapping into `dst`: the floor of a copy.
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        assert!(offset + dst.len() <= self.len);
        // SAFETY: the source is inside the mapping (asserted), mapped to the file; `dst` is distinct.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.addr.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        }
    }

    /// `copy_nonoverlapping` from `src` into the mapping.
    pub fn copy_in(&self, offset: usize, src: &[u8]) {
        assert!(offset + src.len() <= self.len);
        // SAFETY: the destination is inside the mapping (asserted); `src` is distinct.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.addr.as_ptr().add(offset), src.len())
        }
    }
}

/// Faults in every page of `map` for writing, in one call
/// (`MADV_POPULATE_WRITE`), as touching each page would.
pub fn populate(map: &gmem::HostMapping, len: u64) -> std::io::Result<()> {
    assert!(len <= map.len());
    // Populating faults pages in and changes no byte; a private page would
    // fail with EFAULT.
    // SAFETY: the range is inside the mapping `map` owns (asserted).
    unsafe {
        rustix::mm::madvise(
            map.as_ptr().cast(),
            len as usize,
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
