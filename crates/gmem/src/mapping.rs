//! Host mappings: the VMM's `MAP_SHARED` views of a file, and how private
//! pages are hidden in them.
//!
//! A shared page of a mapping is the file's page. A private page is hidden
//! by one of two mechanisms, chosen per mapping when it is made:
//!
//! * [`Hiding::GuardMarkers`]: `MADV_GUARD_INSTALL` over the page (Linux
//!   6.15+ on shared file mappings). No VMA is split however many runs there
//!   are; a raw access raises `SIGSEGV`; the runs of one conversion go to the
//!   kernel in batches of 1024 through `process_madvise`.
//! * [`Hiding::EmptyFileRemap`], the fallback where the kernel refuses guards
//!   (mlocked mappings, older kernels): an empty file mapped over the run, so
//!   a raw access raises `SIGBUS`. Each run is a VMA, so these mappings spend
//!   the file's VMA budget (`budget.rs`).
//!
//! Every live mapping is registered with its file, so a conversion changes
//! all of them and a new mapping starts from the current state. Work is
//! clipped to the pages each mapping covers (it may be shorter or longer
//! than the file). A change that fails part-way is undone; a mapping whose
//! undo fails too is poisoned: unregistered (no conversion touches it
//! again), its checked accessors fail, and the conversion says so.

use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::io::Errno;

use crate::attributes::{Attribute, AttributeMap};
use crate::budget::{self, Charge, OverBudget};
use crate::file::{FileState, page_range};
use crate::sys::{MappedRegion, ProbeOutcome};
use crate::{Error, PAGE_SHIFT};

/// How a host mapping hides private pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hiding {
    /// Guard markers (`MADV_GUARD_INSTALL`): no VMA per run; a raw access to
    /// a private page raises `SIGSEGV`.
    GuardMarkers,
    /// An empty file mapped over each private run: one VMA per run, within
    /// the file's VMA budget; a raw access to a private page raises `SIGBUS`.
    EmptyFileRemap,
}

/// A `MAP_SHARED` mapping of a [`GuestMemfd`](crate::GuestMemfd) from offset
/// 0. Dropping it unmaps it.
///
/// Raw accesses through [`as_ptr`](Self::as_ptr) to a private page fault
/// (`SIGSEGV` under [`Hiding::GuardMarkers`], `SIGBUS` under
/// [`Hiding::EmptyFileRemap`]), and past the end of the file raise `SIGBUS`;
/// [`read`](Self::read) and [`write`](Self::write) check the state first and
/// fail with `EFAULT`.
#[derive(Debug)]
pub struct HostMapping {
    file: Arc<FileState>,
    live: Arc<LiveMapping>,
}

/// A mapping as the file's registry keeps it.
#[derive(Debug)]
pub(crate) struct LiveMapping {
    region: MappedRegion,
    hiding: Hiding,
    /// The file pages the mapping covers: its length clipped to the file.
    pages: u64,
    /// Set once an undo failed: the mapping no longer matches the state.
    poisoned: AtomicBool,
}

impl HostMapping {
    pub(crate) fn new(file: &Arc<FileState>, len: u64) -> Result<HostMapping, Error> {
        // A fault: the state cannot change while the mapping is set up.
        let attrs = file.read_attrs();
        let region = MappedRegion::map_shared(file.backing.as_fd(), len as usize)
            .map_err(Error::os("mmap"))?;
        let hiding = match file.hiding {
            Some(Hiding::EmptyFileRemap) => Hiding::EmptyFileRemap,
            _ if region.supports_guards() => Hiding::GuardMarkers,
            Some(Hiding::GuardMarkers) => return Err(Error::GuardsRefused),
            None => Hiding::EmptyFileRemap,
        };
        let live = Arc::new(LiveMapping {
            region,
            hiding,
            pages: (len.min(file.size)) >> PAGE_SHIFT,
            poisoned: AtomicBool::new(false),
        });
        let mut registry = file.mappings.lock();
        let charge = registry
            .reserve(file, || attrs.private_runs(), Some(hiding))
            .map_err(|OverBudget { needed, budget }| Error::VmaBudget { needed, budget })?;
        // Freshly mapped shared throughout: hide the private runs.
        let private = || private_runs(&attrs, 0..live.pages);
        if let Err((call, errno)) = live.apply(file, private, Attribute::Private) {
            // The region is dropped unregistered; a remap that failed
            // may have left a gap, which `forsake` keeps us out of.
            if live.hiding == Hiding::EmptyFileRemap {
                live.region.forsake();
            }
            return Err(Error::Os { call, errno });
        }
        charge.commit();
        registry.register(live.clone());
        Ok(HostMapping {
            file: file.clone(),
            live,
        })
    }

    /// The start of the mapping. A raw access to a private page faults
    /// (see [`hiding`](Self::hiding)), and past the end of the file raises
    /// `SIGBUS`.
    pub fn as_ptr(&self) -> *mut u8 {
        self.live.region.as_ptr()
    }

    /// The length of the mapping in bytes.
    pub fn len(&self) -> u64 {
        self.live.region.len() as u64
    }

    /// Whether the mapping is empty (it never is).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How this mapping hides private pages.
    pub fn hiding(&self) -> Hiding {
        self.live.hiding
    }

    /// Whether the mapping is poisoned: a conversion could not undo its
    /// changes here, so the mapping no longer follows the file's state.
    /// [`read`](Self::read) and [`write`](Self::write) then fail with `EIO`;
    /// drop it and map the file again.
    pub fn is_poisoned(&self) -> bool {
        // Acquire pairs with the Release in `poison`.
        self.live.poisoned.load(Ordering::Acquire)
    }

    /// Touches the byte at `offset` of the mapping with a raw access in a
    /// forked child, and reports how the child ended:
    /// [`ProbeOutcome::Signal`] with `SIGSEGV` or `SIGBUS` for a private page
    /// (by [`hiding`](Self::hiding)), `SIGBUS` for a page past the end of the
    /// file. For tests and diagnostics.
    ///
    /// A read probe loads the byte. A write probe **stores nothing**: it
    /// faults the page in writable (`MADV_POPULATE_WRITE`, which allocates
    /// it as a store would) and reports the signal a store would raise, so
    /// the file's contents never change and writes the process makes
    /// meanwhile are never lost.
    ///
    /// Errors: `EINVAL` if `offset` is not inside the mapping; `EOPNOTSUPP`
    /// for a write probe on a kernel without `MADV_POPULATE_WRITE` (before
    /// 5.14); the errno of `fork` or `waitpid`.
    pub fn probe(&self, offset: u64, write: bool) -> Result<ProbeOutcome, Error> {
        if offset >= self.len() {
            return Err(Error::OutOfRange {
                offset,
                len: 1,
                limit: self.len(),
            });
        }
        // Offset in bounds: the pointer stays inside the region.
        let ptr = self.as_ptr().wrapping_add(offset as usize);
        crate::sys::probe_in_child(ptr, write).map_err(Error::os("probe"))
    }

    /// Copies from file offset `offset` into `buf`.
    ///
    /// Errors: `EINVAL` if the range is not inside the mapping and the file;
    /// `EFAULT` with the offset of the first private page; `EIO` if the
    /// mapping is poisoned.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let _faults = self.check_shared(offset, buf.len() as u64)?;
        self.live.region.read(offset, buf);
        Ok(())
    }

    /// Copies `data` to file offset `offset`; errors as [`read`](Self::read).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let _faults = self.check_shared(offset, data.len() as u64)?;
        self.live.region.write(offset, data);
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
        // Checked under the lock: a conversion poisons with it held.
        if self.is_poisoned() {
            return Err(Error::MappingPoisoned);
        }
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
        self.file.mappings.unregister(&self.file, &self.live);
    }
}

impl LiveMapping {
    /// Hides (`to` private) or shows (`to` shared) the page runs `runs` in
    /// this mapping, clipped to the pages it covers. Returns the failing call.
    fn apply<I: Iterator<Item = Range<u64>>>(
        &self,
        file: &FileState,
        runs: impl Fn() -> I,
        to: Attribute,
    ) -> Result<(), (&'static str, Errno)> {
        let covered = runs().filter_map(|run| {
            let run = run.start..run.end.min(self.pages);
            (!run.is_empty()).then_some((run.start << PAGE_SHIFT)..(run.end << PAGE_SHIFT))
        });
        match self.hiding {
            Hiding::GuardMarkers => self
                .region
                .set_guards(covered, to == Attribute::Private)
                .map_err(|errno| ("process_madvise(MADV_GUARD_*)", errno)),
            Hiding::EmptyFileRemap => covered
                .into_iter()
                .try_for_each(|bytes| {
                    let (start, len) = (bytes.start, bytes.end - bytes.start);
                    match to {
                        Attribute::Shared => self.region.remap(start, len, file.backing.as_fd()),
                        Attribute::Private => self.region.remap(start, len, file.hole.as_fd()),
                    }
                })
                .map_err(|errno| ("mmap(MAP_FIXED)", errno)),
        }
    }

    /// Marks the mapping as no longer following the file's state.
    fn poison(&self) {
        // Release pairs with the Acquire in `HostMapping::is_poisoned`.
        self.poisoned.store(true, Ordering::Release);
        if self.hiding == Hiding::EmptyFileRemap {
            self.region.forsake();
        }
    }
}

/// The private runs of `pages`, as page ranges.
fn private_runs(attrs: &AttributeMap, pages: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
    attrs
        .runs_in(pages)
        .filter(|run| run.attr == Attribute::Private)
        .map(|run| run.range())
}

/// Why changing the host mappings failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MappingFailure {
    pub(crate) call: &'static str,
    pub(crate) errno: Errno,
    /// Some mapping could not be put back and was poisoned.
    pub(crate) poisoned: bool,
}

/// The live host mappings of one file.
#[derive(Debug, Default)]
pub(crate) struct Mappings {
    live: Mutex<Vec<Arc<LiveMapping>>>,
}

/// The registry, locked: a conversion holds it from its budget check to its
/// commit, so the set of mappings it changes is the set it charged for.
pub(crate) struct Registry<'a> {
    live: MutexGuard<'a, Vec<Arc<LiveMapping>>>,
}

impl Mappings {
    pub(crate) fn lock(&self) -> Registry<'_> {
        Registry {
            live: self.live.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    fn unregister(&self, file: &FileState, mapping: &Arc<LiveMapping>) {
        let mut registry = self.lock();
        registry.remove(file, |other| Arc::ptr_eq(other, mapping));
    }

    /// (guard-marker mappings, fallback mappings).
    pub(crate) fn counts(&self) -> (u64, u64) {
        let registry = self.lock();
        let remapped = registry.remapped();
        (registry.live.len() as u64 - remapped, remapped)
    }
}

impl Registry<'_> {
    /// The live fallback mappings.
    fn remapped(&self) -> u64 {
        let remapped = self
            .live
            .iter()
            .filter(|m| m.hiding == Hiding::EmptyFileRemap);
        remapped.count() as u64
    }

    /// Reserves the VMA budget that the fallback mappings need once the file
    /// has `private_runs()` private runs (asked only if there are fallback
    /// mappings), with one more fallback mapping if `adding` one. Commit it
    /// once the change is made.
    pub(crate) fn reserve<'f>(
        &self,
        file: &'f FileState,
        private_runs: impl FnOnce() -> u64,
        adding: Option<Hiding>,
    ) -> Result<Charge<'f>, OverBudget> {
        let remapped = self.remapped() + u64::from(adding == Some(Hiding::EmptyFileRemap));
        let needed = match remapped {
            0 => 0,
            n => n.saturating_mul(budget::mapping_cost(private_runs())),
        };
        file.vma_budget.reserve(needed)
    }

    /// Changes the runs `runs` to `to` in every live mapping. On failure,
    /// every mapping is put back; one that cannot be is poisoned and
    /// unregistered.
    pub(crate) fn apply<I: Iterator<Item = Range<u64>>>(
        &mut self,
        file: &FileState,
        runs: impl Fn() -> I,
        to: Attribute,
    ) -> Result<(), MappingFailure> {
        let back = to.other();
        for (done, mapping) in self.live.iter().enumerate() {
            let Err((call, errno)) = mapping.apply(file, &runs, to) else {
                continue;
            };
            // Put back every mapping changed so far, the failed one
            // included (advice and remaps are idempotent).
            let mut poisoned = false;
            for mapping in &self.live[..=done] {
                if let Err((call, errno)) = mapping.apply(file, &runs, back) {
                    tracing::error!(call, %errno, "undoing a host mapping change failed; the mapping is poisoned");
                    mapping.poison();
                    poisoned = true;
                }
            }
            // Relaxed: set by this thread just above.
            self.remove(file, |mapping| mapping.poisoned.load(Ordering::Relaxed));
            return Err(MappingFailure {
                call,
                errno,
                poisoned,
            });
        }
        Ok(())
    }

    /// Registers a new mapping (its charge was committed under this lock).
    fn register(&mut self, mapping: Arc<LiveMapping>) {
        self.live.push(mapping);
    }

    /// Unregisters the mappings `gone` selects, and gives back the budget
    /// of the fallback mappings among them.
    fn remove(&mut self, file: &FileState, gone: impl Fn(&Arc<LiveMapping>) -> bool) {
        let before = self.remapped();
        self.live.retain(|mapping| !gone(mapping));
        let now = self.remapped();
        if now < before {
            // Each fallback mapping is charged the same (module `budget`).
            let per_mapping = file.vma_budget.spent() / before;
            if let Ok(charge) = file.vma_budget.reserve(per_mapping * now) {
                charge.commit();
            }
        }
    }
}
