//! Host mappings: the VMM's `MAP_SHARED` views of a file, and how private
//! pages are hidden in them.
//!
//! A shared page of a mapping is the file's page. A private page is hidden
//! by one of two mechanisms, chosen per mapping when it is made:
//!
//! * [`Hiding::GuardMarkers`]: `MADV_GUARD_INSTALL` over the page (Linux
//!   6.15+ on shared file mappings). No VMA is split however many runs there
//!   are; a raw access raises `SIGSEGV`; the runs of one conversion go to the
//!   kernel in batches of 1024 through `process_madvise`. Guards need a page
//!   table entry for every page they mark, so a run of 2 MiB or more is
//!   hidden by the remap below instead, while the VMA budget gives the 2
//!   VMAs it may take (else by guards too).
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

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::io::Errno;

use crate::attributes::{Attribute, AttributeMap};
use crate::budget::OverBudget;
use crate::file::{FileState, page_range};
use crate::sys::{MappedRegion, ProbeOutcome};
use crate::{Error, PAGE_SHIFT};

mod registry;

pub(crate) use registry::{MappingFailure, Mappings};

/// How a host mapping hides private pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hiding {
    /// Guard markers (`MADV_GUARD_INSTALL`): no VMA per run; a raw access to
    /// a private page raises `SIGSEGV`. Runs of 2 MiB and more are remapped
    /// to an empty file while the VMA budget allows (`SIGBUS` there): guards
    /// would cost a page table entry a page.
    GuardMarkers,
    /// An empty file mapped over each private run: one VMA per run, within
    /// the file's VMA budget; a raw access to a private page raises `SIGBUS`.
    EmptyFileRemap,
}

/// A `MAP_SHARED` mapping of a [`GuestMemfd`](crate::GuestMemfd) from offset
/// 0. Dropping it unmaps it.
///
/// It is the VMM's own view, for its own accesses: never give its address to
/// KVM (as a memslot's `userspace_addr`) or to a device. Its private pages
/// are hidden, so KVM would turn the guest's accesses to them into MMIO
/// exits. Bind guest memory with `gmem::kvm::Vm::bind` instead (a VMM that
/// owns its `VmFd` adopts it first with `Vm::from_vm_fd`): it passes the
/// guest_memfd and gmem's own mapping of the whole file, which conversions
/// never change. Devices take pins.
///
/// Raw accesses through [`as_ptr`](Self::as_ptr) to a private page fault
/// (`SIGSEGV` under [`Hiding::GuardMarkers`], or `SIGBUS` in a run of 2 MiB
/// or more; `SIGBUS` under [`Hiding::EmptyFileRemap`]), and past the end of
/// the file raise `SIGBUS`;
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
    /// In a guard-marker mapping, the runs of at least `LARGE_RUN` pages
    /// hidden by the remap instead (start page to end page), each charged
    /// 2 VMAs. Changed under the registry lock.
    remapped: Mutex<BTreeMap<u64, u64>>,
    /// Whether `remapped` has any run, so that the common path (small runs,
    /// none remapped) takes no lock. Relaxed: changed and read under the
    /// registry lock, which orders them.
    any_remapped: AtomicBool,
}

/// Runs of this many pages (2 MiB) and more are hidden by the remap in
/// guard-marker mappings too, where the VMA budget allows: guards would need
/// a page table for every page of them (0.2% of the run), and take time in
/// proportion; a remap takes one VMA whatever the length.
const LARGE_RUN: u64 = 512;

impl HostMapping {
    pub(crate) fn new(file: &Arc<FileState>, len: u64) -> Result<HostMapping, Error> {
        // A listener's callback: its conversion is changing the mappings.
        if crate::held::is_held(file.refs.id()) {
            return Err(Error::WouldDeadlock);
        }
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
            remapped: Mutex::default(),
            any_remapped: AtomicBool::new(false),
        });
        let mut registry = file.mappings.lock();
        let fallback_cost = registry
            .take_for_mapping(file, hiding, || attrs.private_runs())
            .map_err(|OverBudget { needed, budget }| Error::VmaBudget { needed, budget })?;
        // Freshly mapped shared throughout: hide the private runs.
        let private = || private_runs(&attrs, 0..live.pages);
        let hidden = live.apply(file, private, Attribute::Private);
        if hidden.is_ok() {
            registry.live.push(live.clone());
        } else if live.region.is_forsaken() {
            // Dropped unregistered, but a failed remap left its VMAs to the
            // process for good.
            file.vma_budget.leak(live.leaked_vmas(fallback_cost));
        }
        registry.settle(file, hidden.is_ok().then_some(fallback_cost));
        hidden.map_err(|(call, errno)| Error::Os { call, errno })?;
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
        self.while_shared(offset, buf.len() as u64, || {
            self.live.region.read(offset, buf)
        })
    }

    /// Copies `data` to file offset `offset`; errors as [`read`](Self::read).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.while_shared(offset, data.len() as u64, || {
            self.live.region.write(offset, data)
        })
    }

    /// Checks the range and runs `copy` under the invalidate lock held
    /// shared, so that no page of it turns private during the copy.
    fn while_shared(&self, offset: u64, len: u64, copy: impl FnOnce()) -> Result<(), Error> {
        let limit = self.len().min(self.file.size);
        if offset.checked_add(len).is_none_or(|end| end > limit) {
            return Err(Error::OutOfRange { offset, len, limit });
        }
        self.file.with_view(|view| {
            // Checked under the lock: a conversion poisons with it held.
            if self.is_poisoned() {
                return Err(Error::MappingPoisoned);
            }
            if len > 0 {
                let pages = page_range(offset, offset + len);
                if let Some(page) = view.first_hidden(pages) {
                    return Err(Error::Private {
                        offset: page << PAGE_SHIFT,
                    });
                }
            }
            copy();
            Ok(())
        })
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
    pub(super) fn apply<I: Iterator<Item = Range<u64>>>(
        &self,
        file: &FileState,
        runs: impl Fn() -> I,
        to: Attribute,
    ) -> Result<(), (&'static str, Errno)> {
        let covered = || {
            runs().filter_map(|run| {
                let run = run.start..run.end.min(self.pages);
                (!run.is_empty()).then_some(run)
            })
        };
        match (self.hiding, to) {
            (Hiding::EmptyFileRemap, _) => covered().try_for_each(|run| self.remap(file, run, to)),
            (Hiding::GuardMarkers, Attribute::Private) => self.hide_guarded(file, covered),
            (Hiding::GuardMarkers, Attribute::Shared) => self.show_guarded(file, covered),
        }
    }

    /// [`apply`](Self::apply) of the lone run `run`: the common small run
    /// of a guard-marker mapping straight to one guard advice; any other
    /// the general way.
    #[inline]
    pub(super) fn apply_one(
        &self,
        file: &FileState,
        run: Range<u64>,
        to: Attribute,
    ) -> Result<(), (&'static str, Errno)> {
        let clipped = run.start..run.end.min(self.pages);
        if clipped.is_empty() {
            // Past the pages the mapping covers.
            return Ok(());
        }
        let small = clipped.end - clipped.start < LARGE_RUN;
        let guards = match (self.hiding, to) {
            (Hiding::GuardMarkers, Attribute::Private) => small,
            // Relaxed: changed and read under the registry lock, held here.
            (Hiding::GuardMarkers, Attribute::Shared) => !self.any_remapped.load(Ordering::Relaxed),
            (Hiding::EmptyFileRemap, _) => false,
        };
        match guards {
            true => self.set_guards(std::iter::once(clipped), to == Attribute::Private),
            false => self.apply(file, || std::iter::once(run.clone()), to),
        }
    }

    /// Hides `runs` in a guard-marker mapping: each run of `LARGE_RUN` pages
    /// or more by the remap while the file's VMA budget gives 2 VMAs for it,
    /// the others with guard markers in batches.
    fn hide_guarded<I: Iterator<Item = Range<u64>>>(
        &self,
        file: &FileState,
        runs: impl Fn() -> I,
    ) -> Result<(), (&'static str, Errno)> {
        let large = |run: &Range<u64>| run.end - run.start >= LARGE_RUN;
        // The small runs get guards in one walk, which notes any large one.
        let saw_large = std::cell::Cell::new(false);
        let small = runs().filter(|run| {
            let is_large = large(run);
            saw_large.set(saw_large.get() || is_large);
            !is_large
        });
        self.set_guards(small, true)?;
        if !saw_large.get() {
            return Ok(());
        }
        let mut remapped = self.remapped();
        for run in runs().filter(large) {
            if file.vma_budget.take(2).is_ok() {
                self.remap(file, run.clone(), Attribute::Private)?;
                remapped.insert(run.start, run.end);
                self.any_remapped.store(true, Ordering::Relaxed);
            } else {
                self.set_guards(std::iter::once(run), true)?;
            }
        }
        Ok(())
    }

    /// Shows `runs` in a guard-marker mapping: the remapped parts are mapped
    /// to the file again, then the guards go from the runs not wholly
    /// remapped (the walk over a large run costs as much as the remap).
    /// A share that cuts a remapped run in two takes 2 VMAs from the budget
    /// for the halves; when it cannot, the whole run goes back to the file
    /// and its remnants get guards, which take no VMA. So a share never
    /// fails for VMAs here.
    fn show_guarded<I: Iterator<Item = Range<u64>>>(
        &self,
        file: &FileState,
        runs: impl Fn() -> I,
    ) -> Result<(), (&'static str, Errno)> {
        if !self.any_remapped.load(Ordering::Relaxed) {
            return self.set_guards(runs(), false);
        }
        let mut remapped = self.remapped();
        // The runs wholly shown by remaps, by their start.
        let mut wholly = std::collections::BTreeSet::new();
        for run in runs() {
            let mut shown_pages = 0;
            while let Some((start, end)) = overlapping(&remapped, &run) {
                let cuts = start < run.start && run.end < end;
                if cuts && file.vma_budget.take(2).is_err() {
                    self.dissolve(file, start..end, &run)?;
                    remapped.remove(&start);
                    shown_pages = run.end - run.start;
                    continue;
                }
                let shown = start.max(run.start)..end.min(run.end);
                self.remap(file, shown.clone(), Attribute::Shared)?;
                shown_pages += shown.end - shown.start;
                remapped.remove(&start);
                if start < shown.start {
                    remapped.insert(start, shown.start);
                }
                if shown.end < end {
                    remapped.insert(shown.end, end);
                }
            }
            if shown_pages == run.end - run.start {
                wholly.insert(run.start);
            }
        }
        self.any_remapped
            .store(!remapped.is_empty(), Ordering::Relaxed);
        self.set_guards(runs().filter(|run| !wholly.contains(&run.start)), false)
    }

    /// Shows `run`, inside the remapped run `remapped`, with no VMA more:
    /// the whole remapped run goes back to the file with guards on the
    /// remnants either side, in one move (no private page is reachable at
    /// any moment).
    fn dissolve(
        &self,
        file: &FileState,
        remapped: Range<u64>,
        run: &Range<u64>,
    ) -> Result<(), (&'static str, Errno)> {
        let bytes = |pages: Range<u64>| (pages.start << PAGE_SHIFT)..(pages.end << PAGE_SHIFT);
        let remnants = [remapped.start..run.start, run.end..remapped.end].map(bytes);
        let whole = bytes(remapped);
        let fd = file.backing.as_fd();
        self.region
            .remap_guarded(
                whole.start,
                whole.end - whole.start,
                fd,
                remnants.into_iter(),
            )
            .map_err(|errno| ("mremap(MREMAP_FIXED)", errno))
    }

    /// Maps the pages `run` as `to` says: the file, or the empty file.
    fn remap(
        &self,
        file: &FileState,
        run: Range<u64>,
        to: Attribute,
    ) -> Result<(), (&'static str, Errno)> {
        let (start, len) = (run.start << PAGE_SHIFT, (run.end - run.start) << PAGE_SHIFT);
        let fd = match to {
            Attribute::Shared => file.backing.as_fd(),
            Attribute::Private => file.hole.as_fd(),
        };
        self.region
            .remap(start, len, fd)
            .map_err(|errno| ("mmap(MAP_FIXED)", errno))
    }

    /// Installs or removes guard markers over page runs.
    fn set_guards(
        &self,
        runs: impl Iterator<Item = Range<u64>>,
        install: bool,
    ) -> Result<(), (&'static str, Errno)> {
        let bytes = runs.map(|run| (run.start << PAGE_SHIFT)..(run.end << PAGE_SHIFT));
        self.region
            .set_guards(bytes, install)
            .map_err(|errno| ("process_madvise(MADV_GUARD_*)", errno))
    }

    fn remapped(&self) -> MutexGuard<'_, BTreeMap<u64, u64>> {
        self.remapped.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The VMAs this mapping is charged, given what a fallback mapping costs.
    fn charge(&self, fallback_cost: u64) -> u64 {
        match self.hiding {
            Hiding::EmptyFileRemap => fallback_cost,
            Hiding::GuardMarkers if !self.any_remapped.load(Ordering::Relaxed) => 0,
            Hiding::GuardMarkers => 2 * self.remapped().len() as u64,
        }
    }

    /// The VMAs this mapping keeps for good once forsaken: a fallback
    /// mapping's charge; a guard-marker mapping's remapped runs, its own
    /// VMA and the 2 a failed remap may have cut out.
    fn leaked_vmas(&self, fallback_cost: u64) -> u64 {
        match self.hiding {
            Hiding::EmptyFileRemap => fallback_cost,
            Hiding::GuardMarkers => self.charge(fallback_cost) + 3,
        }
    }

    /// Marks the mapping as no longer following the file's state.
    fn poison(&self) {
        // Release pairs with the Acquire in `HostMapping::is_poisoned`.
        self.poisoned.store(true, Ordering::Release);
        if self.hiding == Hiding::EmptyFileRemap || self.any_remapped.load(Ordering::Relaxed) {
            self.region.forsake();
        }
    }
}

/// The last remapped run that overlaps `run`, if any: of the disjoint
/// remapped runs, the last one starting before `run` ends, if it ends after
/// `run` starts.
fn overlapping(remapped: &BTreeMap<u64, u64>, run: &Range<u64>) -> Option<(u64, u64)> {
    let (&start, &end) = remapped.range(..run.end).next_back()?;
    (end > run.start).then_some((start, end))
}

/// The private runs of `pages`, as page ranges.
fn private_runs(attrs: &AttributeMap, pages: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
    attrs
        .runs_in(pages)
        .filter(|run| run.attr == Attribute::Private)
        .map(|run| run.range())
}
