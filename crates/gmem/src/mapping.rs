//! Host mappings: the VMM's `MAP_SHARED` views of a file.
//!
//! A shared page of a mapping is the file's page; a private page is an empty
//! file's page past its end, so any access raises `SIGBUS` as the kernel's
//! fault handler would. Every live mapping is registered with its file, so a
//! conversion changes all of them, and a new mapping starts from the current
//! state.

use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::io::Errno;

use crate::attributes::{Attribute, AttributeMap};
use crate::file::{FileState, page_range};
use crate::sys::{MappedRegion, ProbeOutcome};
use crate::{Error, PAGE_SHIFT};

/// A `MAP_SHARED` mapping of a [`GuestMemfd`](crate::GuestMemfd) from offset
/// 0. Dropping it unmaps it.
///
/// Raw accesses through [`as_ptr`](Self::as_ptr) to a private page or past
/// the end of the file raise `SIGBUS`; [`read`](Self::read) and
/// [`write`](Self::write) check the state first and fail with `EFAULT`.
#[derive(Debug)]
pub struct HostMapping {
    file: Arc<FileState>,
    region: Arc<MappedRegion>,
}

impl HostMapping {
    pub(crate) fn new(file: &Arc<FileState>, len: u64) -> Result<HostMapping, Error> {
        // A fault: the state cannot change while the mapping is set up.
        let attrs = file.read_attrs();
        let region = MappedRegion::map_shared(file.backing.as_fd(), len as usize)
            .map_err(Error::os("mmap"))?;
        // Freshly mapped shared throughout: hide the private runs.
        let pages = 0..(file.size >> PAGE_SHIFT);
        for run in attrs
            .runs_in(pages)
            .filter(|run| run.attr == Attribute::Private)
        {
            remap(file, &region, run.range(), run.attr).map_err(Error::os("mmap"))?;
        }
        let region = Arc::new(region);
        file.mappings.register(region.clone());
        Ok(HostMapping {
            file: file.clone(),
            region,
        })
    }

    /// The start of the mapping. Accessing a private page, or a page past the
    /// end of the file, through it raises `SIGBUS`.
    pub fn as_ptr(&self) -> *mut u8 {
        self.region.as_ptr()
    }

    /// The length of the mapping in bytes.
    pub fn len(&self) -> u64 {
        self.region.len() as u64
    }

    /// Whether the mapping is empty (it never is).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Touches the byte at `offset` of the mapping with a raw access (a read,
    /// or a write of the byte's own value) in a forked child, and reports how
    /// the child ended: [`ProbeOutcome::Signal`] with `SIGBUS` for a private
    /// page or a page past the end of the file. For tests and diagnostics.
    ///
    /// Errors: `EINVAL` if `offset` is not inside the mapping; the errno of
    /// `fork` or `waitpid`.
    pub fn probe(&self, offset: u64, write: bool) -> Result<ProbeOutcome, Error> {
        if offset >= self.len() {
            return Err(Error::OutOfRange {
                offset,
                len: 1,
                limit: self.len(),
            });
        }
        // Offset in bounds: the pointer stays inside the region.
        let ptr = self.region.as_ptr().wrapping_add(offset as usize);
        crate::sys::probe_in_child(ptr, write).map_err(Error::os("fork"))
    }

    /// Copies from file offset `offset` into `buf`.
    ///
    /// Errors: `EINVAL` if the range is not inside the mapping and the file;
    /// `EFAULT` with the offset of the first private page.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let _faults = self.check_shared(offset, buf.len() as u64)?;
        self.region.read(offset, buf);
        Ok(())
    }

    /// Copies `data` to file offset `offset`; errors as [`read`](Self::read).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let _faults = self.check_shared(offset, data.len() as u64)?;
        self.region.write(offset, data);
        Ok(())
    }

    /// Checks the range and takes the invalidate lock shared, so that no page
    /// of it turns private during the copy.
    fn check_shared(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<std::sync::RwLockReadGuard<'_, AttributeMap>, Error> {
        let limit = self.len().min(self.file.size);
        if offset.checked_add(len).is_none_or(|end| end > limit) {
            return Err(Error::OutOfRange { offset, len, limit });
        }
        let attrs = self.file.read_attrs();
        if len > 0 {
            let pages = page_range(offset, offset + len);
            if let Some(page) = attrs.first_not(pages, Attribute::Shared) {
                return Err(Error::Private {
                    offset: page << PAGE_SHIFT,
                });
            }
        }
        Ok(attrs)
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        self.file.mappings.unregister(&self.region);
    }
}

/// The live host mappings of one file.
#[derive(Debug, Default)]
pub(crate) struct Mappings {
    live: Mutex<Vec<Arc<MappedRegion>>>,
}

impl Mappings {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<MappedRegion>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, region: Arc<MappedRegion>) {
        self.lock().push(region);
    }

    fn unregister(&self, region: &Arc<MappedRegion>) {
        self.lock().retain(|other| !Arc::ptr_eq(other, region));
    }

    /// Maps the runs of `pages` that are not in state `to` as `to`, in every
    /// live mapping (runs already in state `to` are left mapped as they are).
    /// On failure, puts back what it changed.
    pub(crate) fn remap_all(
        &self,
        file: &FileState,
        attrs: &AttributeMap,
        pages: Range<u64>,
        to: Attribute,
    ) -> Result<(), Errno> {
        let live = self.lock();
        for (done, region) in live.iter().enumerate() {
            let mut changing = attrs.runs_in(pages.clone()).filter(|run| run.attr != to);
            if let Err(errno) = changing.try_for_each(|run| remap(file, region, run.range(), to)) {
                for region in &live[..=done] {
                    apply(file, region, attrs, pages.clone(), to);
                }
                return Err(errno);
            }
        }
        Ok(())
    }

    /// Undoes [`remap_all`](Self::remap_all)`(.., to)`: maps the runs of
    /// `pages` that are not in state `to` as their state says again.
    pub(crate) fn restore_all(
        &self,
        file: &FileState,
        attrs: &AttributeMap,
        pages: Range<u64>,
        to: Attribute,
    ) {
        for region in self.lock().iter() {
            apply(file, region, attrs, pages.clone(), to);
        }
    }
}

fn remap(
    file: &FileState,
    region: &MappedRegion,
    pages: Range<u64>,
    to: Attribute,
) -> Result<(), Errno> {
    let (start, len) = (
        pages.start << PAGE_SHIFT,
        (pages.end - pages.start) << PAGE_SHIFT,
    );
    match to {
        Attribute::Shared => region.remap(start, len, file.backing.as_fd()),
        Attribute::Private => region.remap(start, len, file.hole.as_fd()),
    }
}

/// Maps each run of `pages` whose state is not `mapped_as` as its state says,
/// in a region where the whole range is currently mapped as `mapped_as`.
fn apply(
    file: &FileState,
    region: &MappedRegion,
    attrs: &AttributeMap,
    pages: Range<u64>,
    mapped_as: Attribute,
) {
    for run in attrs.runs_in(pages).filter(|run| run.attr != mapped_as) {
        if let Err(errno) = remap(file, region, run.range(), run.attr) {
            // Nothing is left to fall back on (the usual cause is the VMA
            // limit, vm.max_map_count): report it loudly.
            tracing::error!(%errno, ?run, "restoring a host mapping failed");
        }
    }
}
