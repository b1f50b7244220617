//! References: the per-page reference counts that a conversion checks, and
//! the lock-free pin protocol around them.
//!
//! Each page that was ever pinned has a [`PageRef`]: one 64-bit word holding
//! the page's reference count and a `MAPPED` bit. `MAPPED` is this layer's
//! page-table entry: the pin fast path may only take a reference on a page
//! whose `MAPPED` bit is set, and a conversion (or punch) clears it before it
//! checks the count, exactly as the kernel zaps PTEs before its refcount
//! check. The pin slow path sets it again under the invalidate lock, after it
//! has checked the page's state, as a fault would map the page back in.
//!
//! `PageRef`s live in the folio table (`folios.rs`) of 2 MiB chunks made on
//! first pin, so an idle file costs one pointer per 2 MiB and every scan
//! skips chunks that were never pinned: the cost of a check follows pinned
//! memory, not size. A huge folio is counted in one `PageRef` for its chunk.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::batch::{self, PinBatch};
use crate::folios::FolioTable;
use crate::sync::{AtomicU64, Ordering};

/// Set while the pin fast path may reference the page.
const MAPPED: u64 = 1 << 63;
/// Set once gmem knows the page is allocated (a hint for the pin slow path).
const ALLOCATED: u64 = 1 << 62;
/// In a chunk's folio word: the chunk is one huge folio, counted here.
const HUGE: u64 = 1 << 61;
const COUNT_MASK: u64 = (1 << 32) - 1;
/// A count at which a new reference is refused rather than risk overflow.
const MAX_COUNT: u64 = 1 << 31;

/// The outcome of a speculative reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TryGet {
    /// The reference is held.
    Got,
    /// The page is not mapped for the fast path; nothing is held.
    NotMapped,
    /// The count is at its limit; nothing is held.
    Overflow,
}

/// The reference count and fast-path mapping bit of one page.
#[derive(Debug)]
pub(crate) struct PageRef(AtomicU64);

impl PageRef {
    pub(crate) fn new() -> PageRef {
        PageRef(AtomicU64::new(0))
    }

    /// The pin fast path: take a speculative reference, then recheck that the
    /// page is still mapped, and back off if a conversion got there first.
    #[inline(always)]
    pub(crate) fn try_get(&self) -> TryGet {
        // The increment and the recheck are one read-modify-write of the
        // word that `unmap` clears with another, so the two are totally
        // ordered: either this increment comes first and the conversion's
        // `unmap`/`count` sees it (it then fails or drains), or `unmap` comes
        // first and this sees MAPPED clear and backs off. Acquire pairs with
        // the Release in `get_mapped` (the slow path mapped the page after
        // checking its state) and with `put`'s Release (the previous holder's
        // accesses happen before ours).
        let old = self.0.fetch_add(1, Ordering::Acquire);
        if old & MAPPED != 0 && old & COUNT_MASK < MAX_COUNT {
            return TryGet::Got;
        }
        self.back_off(old, 0)
    }

    /// [`try_get`](Self::try_get) that leaves a failed increment in place
    /// for the caller to undo with [`put`](Self::put).
    #[inline(always)]
    pub(crate) fn try_get_plain(&self) -> bool {
        // As in `try_get`.
        let old = self.0.fetch_add(1, Ordering::Acquire);
        old & MAPPED != 0 && old & COUNT_MASK < MAX_COUNT
    }

    /// Undoes a failed speculative reference whose increment returned `old`;
    /// `need` is a mode bit the word must have had too (HUGE, or 0).
    #[cold]
    #[inline(never)]
    fn back_off(&self, old: u64, need: u64) -> TryGet {
        // The contents were not touched. Release as in `put`.
        self.0.fetch_sub(1, Ordering::Release);
        if old & MAPPED == 0 || old & need != need {
            TryGet::NotMapped
        } else {
            TryGet::Overflow
        }
    }

    /// The pin slow path, with the invalidate lock held shared and the page
    /// known shared and allocated: map the page for the fast path and take a
    /// reference. Returns false (holding nothing) if the count is at its limit.
    pub(crate) fn get_mapped(&self) -> bool {
        // No conversion can run (we hold the lock shared), so MAPPED cannot
        // be cleared under us. Release pairs with `try_get`'s Acquire;
        // Acquire pairs with `put`'s Release.
        let old = self.0.fetch_or(MAPPED | ALLOCATED, Ordering::AcqRel);
        if old & COUNT_MASK >= MAX_COUNT {
            return false;
        }
        self.0.fetch_add(1, Ordering::Acquire);
        true
    }

    /// Drops `n` references.
    #[inline(always)]
    pub(crate) fn put(&self, n: u64) {
        // Release pairs with the Acquire of `count` in a conversion's check:
        // every access made under the reference happens before the page
        // changes state.
        let old = self.0.fetch_sub(n, Ordering::Release);
        debug_assert!(old & COUNT_MASK >= n, "page reference underflow");
    }

    /// Clears MAPPED so that no new fast-path reference succeeds. Called
    /// with the invalidate lock held exclusively.
    pub(crate) fn unmap(&self) {
        // Only the slow path sets MAPPED, under the lock held shared, so it
        // cannot be set concurrently, and a Relaxed load that sees it clear is
        // up to date (the lock orders the slow path's set before us).
        if self.0.load(Ordering::Relaxed) & MAPPED != 0 {
            // AcqRel: the clear is ordered against `try_get` by the word's
            // modification order (see there); Acquire also pairs with `put`.
            self.0.fetch_and(!MAPPED, Ordering::AcqRel);
        }
    }

    /// Whether this folio word holds a huge folio.
    #[inline(always)]
    pub(crate) fn is_huge(&self) -> bool {
        // Acquire pairs with the Release in `set_huge`: a pinner that sees the
        // mode sees the split or merge that set it.
        self.0.load(Ordering::Acquire) & HUGE != 0
    }

    /// Makes this folio word hold a huge folio, or not. Called with the
    /// invalidate lock held exclusively, on a folio with no references.
    pub(crate) fn set_huge(&self, huge: bool) {
        // Release pairs with the Acquire in `is_huge` and `try_get_huge`.
        if huge {
            self.0.fetch_or(HUGE, Ordering::AcqRel);
        } else {
            self.0.fetch_and(!HUGE, Ordering::AcqRel);
        }
    }

    /// The fast path on a huge folio: as [`try_get`](Self::try_get), and the
    /// recheck also requires the folio to be huge still (a split clears it).
    #[inline(always)]
    pub(crate) fn try_get_huge(&self) -> TryGet {
        // Same argument as `try_get`: one RMW on the word a split or
        // conversion changes with another.
        let old = self.0.fetch_add(1, Ordering::Acquire);
        if old & MAPPED != 0 && old & HUGE != 0 && old & COUNT_MASK < MAX_COUNT {
            return TryGet::Got;
        }
        self.back_off(old, HUGE)
    }

    /// The current number of references.
    pub(crate) fn count(&self) -> u64 {
        // Acquire pairs with `put`'s Release: accesses made under a dropped
        // reference happen before the caller's state change.
        self.0.load(Ordering::Acquire) & COUNT_MASK
    }

    pub(crate) fn is_allocated(&self) -> bool {
        // Relaxed: a hint only; a stale answer costs one fallocate.
        self.0.load(Ordering::Relaxed) & ALLOCATED != 0
    }

    pub(crate) fn clear_allocated(&self) {
        // Relaxed: a hint only, changed under the exclusive lock.
        self.0.fetch_and(!ALLOCATED, Ordering::Relaxed);
    }
}

/// Pin counts of threads that are gone, and of releases made without a batch.
#[derive(Debug, Default)]
struct Retired {
    taken: std::sync::atomic::AtomicU64,
    released: std::sync::atomic::AtomicU64,
}

/// Counts of folio mode changes.
#[derive(Debug, Default)]
struct Reshapes {
    splits: std::sync::atomic::AtomicU64,
    merges: std::sync::atomic::AtomicU64,
}

/// The references of one file: its folio table of counts and the registry
/// of every thread's batch of released pins.
#[derive(Debug)]
pub(crate) struct References {
    id: u64,
    table: FolioTable,
    batches: Mutex<Vec<&'static PinBatch>>,
    retired: Retired,
    reshapes: Reshapes,
    drains: std::sync::atomic::AtomicU64,
}

/// Why a pin could not be taken on the fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PinMiss {
    /// Some page is not mapped for the fast path: take the slow path.
    NotMapped,
    /// The page's count is at its limit.
    Overflow(u64),
}

/// The first referenced folio found by a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Referenced {
    /// A small folio: this page.
    Small(u64),
    /// A huge folio starting at this page.
    Huge(u64),
}

impl References {
    /// The references of a file of `pages` pages; `None` if the table cannot
    /// be allocated.
    pub(crate) fn new(pages: u64, huge_folios: bool) -> Option<References> {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Some(References {
            // Relaxed: a unique number is all that is needed.
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            table: FolioTable::new(pages, huge_folios)?,
            batches: Mutex::new(Vec::new()),
            retired: Retired::default(),
            reshapes: Reshapes::default(),
            drains: Default::default(),
        })
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The pin fast path of the common pin (a few small folios of one 2 MiB
    /// chunk): a speculative reference on each page and nothing else, with
    /// no call, so that the caller's hot path needs no saved registers.
    /// `false` when the pin could not be taken this way; then nothing is
    /// held and the caller goes to [`try_pin_fast`](Self::try_pin_fast).
    /// The caller counts the pin in its batch.
    #[inline(always)]
    pub(crate) fn try_pin_small(&self, pages: Range<u64>) -> bool {
        let Some(run) = self.table.small_run(pages) else {
            return false;
        };
        for (taken, page) in run.iter().enumerate() {
            if !page.try_get_plain() {
                // Back off from this page and the ones before it.
                for held in &run[..=taken] {
                    held.put(1);
                }
                return false;
            }
        }
        true
    }

    /// The lock-free pin of any range: a speculative reference on every
    /// folio (chunk by chunk, a huge folio once), or none; counted in the
    /// thread's batch.
    pub(crate) fn try_pin_fast(self: &Arc<Self>, pages: Range<u64>) -> Result<(), PinMiss> {
        let mut page = pages.start;
        while page < pages.end {
            let end = FolioTable::chunk_end(page).min(pages.end);
            let Some(chunk) = self.table.chunk(page) else {
                return Err(self.undo_fast(pages.start..page, TryGet::NotMapped, page));
            };
            if self.table.is_huge(chunk) {
                let outcome = chunk.folio.try_get_huge();
                if outcome != TryGet::Got {
                    return Err(self.undo_fast(pages.start..page, outcome, page));
                }
            } else if let Err((taken, outcome)) = try_get_run(chunk.pages(page..end)) {
                let at = page + taken as u64;
                return Err(self.undo_fast(pages.start..at, outcome, at));
            }
            page = end;
        }
        self.count_pin();
        Ok(())
    }

    /// A fast-path pin failed at `page` with `outcome`: drop the references
    /// taken on `held`.
    #[cold]
    #[inline(never)]
    fn undo_fast(&self, held: Range<u64>, outcome: TryGet, page: u64) -> PinMiss {
        self.put_now(held, 1);
        miss(outcome, page)
    }

    /// The slow-path pin, with the invalidate lock held shared and every page
    /// known shared and allocated. `uniform` tells whether a range of pages
    /// has one state (a new chunk over such a range starts huge). Returns the
    /// page whose count is full, if any (then nothing is held).
    pub(crate) fn pin_mapped(
        self: &Arc<Self>,
        pages: Range<u64>,
        uniform: impl Fn(Range<u64>) -> bool,
    ) -> Result<(), u64> {
        for (_, segment) in FolioTable::segments(pages.clone()) {
            let chunk = self.table.chunk_or_make(segment.start, &uniform);
            if self.table.is_huge(chunk) {
                if !chunk.folio.get_mapped() {
                    self.put_now(pages.start..segment.start, 1);
                    return Err(segment.start);
                }
                continue;
            }
            for (page, page_ref) in segment.clone().zip(chunk.pages(segment)) {
                if !page_ref.get_mapped() {
                    self.put_now(pages.start..page, 1);
                    return Err(page);
                }
            }
        }
        self.count_pin();
        Ok(())
    }

    #[inline(always)]
    pub(crate) fn count_pin(self: &Arc<Self>) {
        if batch::with_local(self, PinBatch::count_taken).is_none() {
            self.count_unbatched(&self.retired.taken);
        }
    }

    /// Counts a pin taken or released without a batch (the thread exits).
    #[cold]
    #[inline(never)]
    fn count_unbatched(&self, counter: &std::sync::atomic::AtomicU64) {
        // Relaxed: a statistic.
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Releases a pin of `pages`: huge folios at once (they never sit in a
    /// batch), small ones through this thread's batch.
    #[inline(always)]
    pub(crate) fn unpin(self: &Arc<Self>, pages: Range<u64>) {
        let batched = batch::with_local(self, |local| {
            if self.table.has_huge_folios() {
                self.release(pages.clone(), |small| local.release(self, small));
            } else {
                // Every folio is small: park the whole range.
                local.release(self, pages.clone());
            }
            local.count_released();
        });
        if batched.is_none() {
            self.unpin_unbatched(pages);
        }
    }

    /// `unpin` when the thread is exiting and its batches are gone: release
    /// at once.
    #[cold]
    #[inline(never)]
    fn unpin_unbatched(&self, pages: Range<u64>) {
        self.release(pages, |small| self.put_now(small, 1));
        self.count_unbatched(&self.retired.released);
    }

    /// Drops the references of huge folios in `pages` and hands each run of
    /// small folios to `park`.
    fn release(&self, pages: Range<u64>, mut park: impl FnMut(Range<u64>)) {
        let mut small = pages.start..pages.start;
        for (_, segment) in FolioTable::segments(pages) {
            // A pinned folio keeps its mode (module doc of `folios`).
            let chunk = self
                .table
                .chunk(segment.start)
                .expect("a pinned chunk exists");
            if self.table.is_huge(chunk) {
                chunk.folio.put(1);
                continue;
            }
            if small.end != segment.start {
                if !small.is_empty() {
                    park(small);
                }
                small = segment.start..segment.start;
            }
            small.end = segment.end;
        }
        if !small.is_empty() {
            park(small);
        }
    }

    /// Drops `times` references on each folio of `pages` at once (a
    /// backed-off pin, a huge folio's release, or flushed batches).
    pub(crate) fn put_now(&self, pages: Range<u64>, times: u64) {
        for (_, chunk, segment) in self.table.made(pages) {
            if self.table.is_huge(chunk) {
                chunk.folio.put(times);
            } else {
                chunk.pages(segment).iter().for_each(|page| page.put(times));
            }
        }
    }

    /// Clears MAPPED on every folio touching `pages` (a huge folio as a
    /// whole): no fast-path pin succeeds there until the slow path maps it.
    pub(crate) fn unmap(&self, pages: Range<u64>) {
        for (_, chunk, segment) in self.table.made(pages) {
            if self.table.is_huge(chunk) {
                chunk.folio.unmap();
            } else {
                chunk.pages(segment).iter().for_each(PageRef::unmap);
            }
        }
    }

    /// The first folio touching `pages` that holds a reference.
    fn first_referenced(&self, pages: Range<u64>) -> Option<Referenced> {
        for (index, chunk, segment) in self.table.made(pages) {
            if self.table.is_huge(chunk) {
                if chunk.folio.count() > 0 {
                    return Some(Referenced::Huge(FolioTable::chunk_range(index).start));
                }
                continue;
            }
            let pages = chunk.pages(segment.clone());
            if let Some(hit) = pages.iter().position(|page| page.count() > 0) {
                return Some(Referenced::Small(segment.start + hit as u64));
            }
        }
        None
    }

    /// The safety check of a conversion or punch, after `unmap`: no folio
    /// touching `pages` may hold a reference. On the first small folio that
    /// does, drain every thread's batch once and check again from there; a
    /// huge folio with a reference fails at once (it is never in a batch).
    /// Returns the first page of the folio still referenced.
    pub(crate) fn check_unreferenced(&self, pages: Range<u64>) -> Result<(), u64> {
        let mut from = pages.start;
        let mut drained = false;
        loop {
            match self.first_referenced(from..pages.end) {
                None => return Ok(()),
                Some(Referenced::Huge(start)) => return Err(start),
                Some(Referenced::Small(page)) if drained => return Err(page),
                Some(Referenced::Small(page)) => {
                    self.drain_all();
                    drained = true;
                    from = page;
                }
            }
        }
    }

    /// After `pages` changed state (or were punched), under the exclusive
    /// lock and after a successful check: split the huge folios that now have
    /// two states, and merge the chunks whose range is one state again and
    /// that hold no reference. `uniform` tells whether a range has one state.
    #[inline]
    pub(crate) fn reshape(&self, pages: Range<u64>, uniform: impl Fn(Range<u64>) -> bool) {
        if self.table.has_huge_folios() {
            self.reshape_huge(pages, uniform);
        }
    }

    /// [`reshape`](Self::reshape) of a file with huge folios.
    fn reshape_huge(&self, pages: Range<u64>, uniform: impl Fn(Range<u64>) -> bool) {
        use std::sync::atomic::Ordering::Relaxed;
        for (index, chunk, _) in self.table.made(pages) {
            let range = FolioTable::chunk_range(index);
            let whole = self.table.may_be_huge(index) && uniform(range.clone());
            if chunk.folio.is_huge() && !whole {
                // No reference: the check passed over the whole folio.
                chunk.folio.set_huge(false);
                // Relaxed: statistics, here and below.
                self.reshapes.splits.fetch_add(1, Relaxed);
            } else if !chunk.folio.is_huge() && whole {
                chunk.pages.iter().for_each(PageRef::unmap);
                if chunk.pages.iter().all(|page| page.count() == 0) {
                    chunk.folio.unmap();
                    chunk.folio.set_huge(true);
                    self.reshapes.merges.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// Flushes every thread's batch of released pins (`lru_add_drain_all`).
    pub(crate) fn drain_all(&self) {
        // Relaxed: a statistic.
        self.drains
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let batches = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        for batch in batches.iter() {
            batch.drain(|pages, times| self.put_now(pages, times));
        }
    }

    /// The range to allocate before pinning `pages`: empty if every folio is
    /// known allocated; a huge folio (existing, or about to be made because
    /// `uniform` says its range has one state) is allocated whole.
    pub(crate) fn to_allocate(
        &self,
        pages: Range<u64>,
        uniform: impl Fn(Range<u64>) -> bool,
    ) -> Range<u64> {
        let mut need = pages.end..pages.start;
        for (index, segment) in FolioTable::segments(pages) {
            let missing = match self.table.chunk(segment.start) {
                Some(chunk) if self.table.is_huge(chunk) => {
                    (!chunk.folio.is_allocated()).then(|| FolioTable::chunk_range(index))
                }
                Some(chunk) => {
                    let pages = chunk.pages(segment.clone());
                    (!pages.iter().all(PageRef::is_allocated)).then_some(segment)
                }
                None if self.table.may_be_huge(index)
                    && uniform(FolioTable::chunk_range(index)) =>
                {
                    Some(FolioTable::chunk_range(index))
                }
                None => Some(segment),
            };
            if let Some(missing) = missing {
                need = need.start.min(missing.start)..need.end.max(missing.end);
            }
        }
        need
    }

    /// Forgets that the folios of `pages` are allocated (after a punch).
    pub(crate) fn mark_unallocated(&self, pages: Range<u64>) {
        for (_, chunk, segment) in self.table.made(pages) {
            chunk.folio.clear_allocated();
            chunk
                .pages(segment)
                .iter()
                .for_each(PageRef::clear_allocated);
        }
    }

    pub(crate) fn register(&self, batch: &'static PinBatch) {
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(batch);
    }

    /// Removes a dead thread's (already drained) batch, keeping its counts.
    pub(crate) fn retire(&self, batch: &PinBatch) {
        let (taken, released) = batch.counts();
        // Relaxed: statistics.
        self.retired
            .taken
            .fetch_add(taken, std::sync::atomic::Ordering::Relaxed);
        self.retired
            .released
            .fetch_add(released, std::sync::atomic::Ordering::Relaxed);
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|b| !std::ptr::eq(*b, batch));
    }

    /// Pins taken and not yet dropped, over every thread.
    pub(crate) fn pins_live(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let batches = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        let (mut taken, mut released) = (
            self.retired.taken.load(Relaxed),
            self.retired.released.load(Relaxed),
        );
        for batch in batches.iter() {
            let (t, r) = batch.counts();
            taken += t;
            released += r;
        }
        taken.saturating_sub(released)
    }

    /// How many drains ran.
    pub(crate) fn drains(&self) -> u64 {
        self.drains.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// (huge folios now, splits so far, merges so far).
    pub(crate) fn folio_counts(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.table.huge_count(),
            self.reshapes.splits.load(Relaxed),
            self.reshapes.merges.load(Relaxed),
        )
    }

    /// Whether the file counts references per huge folio.
    pub(crate) fn has_huge_folios(&self) -> bool {
        self.table.has_huge_folios()
    }

    /// The pages of the folio holding `page`: its 2 MiB chunk while that is
    /// a huge folio, else the page alone.
    pub(crate) fn folio_of(&self, page: u64) -> Range<u64> {
        match self.table.chunk(page) {
            Some(chunk) if self.table.is_huge(chunk) => {
                FolioTable::chunk_range(page / crate::folios::CHUNK_PAGES)
            }
            _ => page..page + 1,
        }
    }

    /// The pages of the folios holding the first and last page of `pages`
    /// (non-empty), and all between.
    pub(crate) fn folios_around(&self, pages: Range<u64>) -> Range<u64> {
        self.folio_of(pages.start).start..self.folio_of(pages.end - 1).end
    }

    /// Bytes of reference metadata.
    pub(crate) fn footprint(&self) -> u64 {
        self.table.footprint()
    }
}

/// The fast path over a run of small folios: a speculative reference on
/// each in turn. On the first that fails, returns how many were taken (the
/// caller drops them) and the outcome.
#[inline(always)]
pub(crate) fn try_get_run(pages: &[PageRef]) -> Result<(), (usize, TryGet)> {
    for (taken, page) in pages.iter().enumerate() {
        let outcome = page.try_get();
        if outcome != TryGet::Got {
            return Err((taken, outcome));
        }
    }
    Ok(())
}

fn miss(outcome: TryGet, page: u64) -> PinMiss {
    match outcome {
        TryGet::Overflow => PinMiss::Overflow(page),
        _ => PinMiss::NotMapped,
    }
}
