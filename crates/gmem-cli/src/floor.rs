//! Floors for the benchmarks: the raw work gmem cannot avoid, done directly.
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
                MapFlags::SHARED,
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
        // SAFETY: the range is inside this mapping, which this value owns;
        // nothing holds a reference into it.
        unsafe {
            rustix::mm::mmap(
                self.addr.as_ptr().add(offset).cast(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
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

    /// Touches every page of the range (populates the page tables).
    pub fn touch(&self, offset: usize, len: usize) {
        for at in (offset..offset + len).step_by(4096) {
            // SAFETY: inside the mapping, mapped to the file.
            unsafe { self.addr.as_ptr().add(at).write_volatile(1) };
        }
    }

    /// `copy_nonoverlapping` from the mapping into `dst`: the floor of a copy.
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        assert!(offset + dst.len() <= self.len);
        // SAFETY: the source is inside the mapping, mapped to the file; the
        // destination is a distinct Rust buffer.
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
        // SAFETY: as `copy_out`, the other way.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.addr.as_ptr().add(offset), src.len())
        }
    }
}

impl Drop for RawMapping {
    fn drop(&mut self) {
        // SAFETY: this value owns the mapping.
        let _ = unsafe { rustix::mm::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}
