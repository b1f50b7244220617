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
//! `PageRef`s live in a two-level table of 2 MiB chunks made on first pin, so
//! an idle file costs one pointer per 2 MiB and every scan skips chunks that
//! were never pinned: the cost of a check follows pinned memory, not size.

use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use crate::batch::{self, PinBatch};
use crate::sync::{AtomicU64, Ordering};

/// Set while the pin fast path may reference the page.
const MAPPED: u64 = 1 << 63;
/// Set once gmem knows the page is allocated (a hint for the pin slow path).
const ALLOCATED: u64 = 1 << 62;
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
        // Back off: the contents were not touched. Release as in `put`.
        self.0.fetch_sub(1, Ordering::Release);
        if old & MAPPED == 0 {
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
    pub(crate) fn put(&self, n: u64) {
        // Release pairs with the Acquire of `count` in a conversion's check:
        // every access made under the reference happens before the page
        // changes state.
        let old = self.0.fetch_sub(n, Ordering::Release);
        debug_assert!(old & COUNT_MASK >= n, "page reference underflow");
    }

    /// Clears MAPPED so that no new fast-path reference succeeds.
    pub(crate) fn unmap(&self) {
        // AcqRel: the clear is ordered against `try_get` by the word's
        // modification order (see there); Acquire also pairs with `put`.
        self.0.fetch_and(!MAPPED, Ordering::AcqRel);
    }

    /// The current number of references.
    pub(crate) fn count(&self) -> u64 {
        // Acquire pairs with `put`'s Release: accesses made under a dropped
        // reference happen before the caller's state change.
        self.0.load(Ordering::Acquire) & COUNT_MASK
    }

    fn is_allocated(&self) -> bool {
        // Relaxed: a hint only; a stale answer costs one fallocate.
        self.0.load(Ordering::Relaxed) & ALLOCATED != 0
    }

    fn clear_allocated(&self) {
        // Relaxed: a hint only, changed under the exclusive lock.
        self.0.fetch_and(!ALLOCATED, Ordering::Relaxed);
    }
}

/// Pages per chunk of the table: one 2 MiB huge folio.
pub(crate) const CHUNK_PAGES: u64 = 512;

type Chunk = Box<[PageRef; CHUNK_PAGES as usize]>;

/// The `PageRef`s of one file, made 2 MiB at a time on first pin.
#[derive(Debug)]
pub(crate) struct PageRefTable {
    chunks: Box<[OnceLock<Chunk>]>,
}

impl PageRefTable {
    fn new(pages: u64) -> PageRefTable {
        let chunks = pages.div_ceil(CHUNK_PAGES) as usize;
        PageRefTable {
            chunks: (0..chunks).map(|_| OnceLock::new()).collect(),
        }
    }

    fn split(page: u64) -> (usize, usize) {
        ((page / CHUNK_PAGES) as usize, (page % CHUNK_PAGES) as usize)
    }

    /// The page's `PageRef`, if its chunk exists.
    pub(crate) fn get(&self, page: u64) -> Option<&PageRef> {
        let (chunk, index) = Self::split(page);
        self.chunks[chunk].get().map(|chunk| &chunk[index])
    }

    fn get_or_make(&self, page: u64) -> &PageRef {
        let (chunk, index) = Self::split(page);
        let chunk = self.chunks[chunk].get_or_init(|| {
            let refs: Box<[PageRef]> = (0..CHUNK_PAGES).map(|_| PageRef::new()).collect();
            refs.try_into().expect("a chunk has CHUNK_PAGES entries")
        });
        &chunk[index]
    }

    /// Calls `f` on each existing `PageRef` in `pages` until it returns true;
    /// returns that page.
    fn find(&self, pages: Range<u64>, mut f: impl FnMut(&PageRef) -> bool) -> Option<u64> {
        let mut page = pages.start;
        while page < pages.end {
            let (chunk, index) = Self::split(page);
            let chunk_end = ((chunk as u64 + 1) * CHUNK_PAGES).min(pages.end);
            if let Some(refs) = self.chunks[chunk].get() {
                let count = (chunk_end - page) as usize;
                if let Some(hit) = refs[index..index + count].iter().position(&mut f) {
                    return Some(page + hit as u64);
                }
            }
            page = chunk_end;
        }
        None
    }

    /// Bytes of metadata this table holds.
    fn footprint(&self) -> u64 {
        let made = self.chunks.iter().filter(|c| c.get().is_some()).count();
        (std::mem::size_of_val(&*self.chunks)
            + made * std::mem::size_of::<[PageRef; CHUNK_PAGES as usize]>()) as u64
    }
}

/// Pin counts of threads that are gone, and of releases made without a batch.
#[derive(Debug, Default)]
struct Retired {
    taken: std::sync::atomic::AtomicU64,
    released: std::sync::atomic::AtomicU64,
}

/// The references of one file: its page table of counts and the registry of
/// every thread's batch of released pins.
#[derive(Debug)]
pub(crate) struct References {
    id: u64,
    table: PageRefTable,
    batches: Mutex<Vec<Arc<PinBatch>>>,
    retired: Retired,
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

impl References {
    pub(crate) fn new(pages: u64) -> References {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        References {
            // Relaxed: a unique number is all that is needed.
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            table: PageRefTable::new(pages),
            batches: Mutex::new(Vec::new()),
            retired: Retired::default(),
            drains: Default::default(),
        }
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The lock-free pin: a speculative reference on every page, or none.
    pub(crate) fn try_pin_fast(self: &Arc<Self>, pages: Range<u64>) -> Result<(), PinMiss> {
        for page in pages.clone() {
            let outcome = match self.table.get(page) {
                Some(page_ref) => page_ref.try_get(),
                None => TryGet::NotMapped,
            };
            if outcome != TryGet::Got {
                self.put_now(pages.start..page, 1);
                return Err(match outcome {
                    TryGet::Overflow => PinMiss::Overflow(page),
                    _ => PinMiss::NotMapped,
                });
            }
        }
        self.count_pin();
        Ok(())
    }

    /// The slow-path pin, with the invalidate lock held shared and every page
    /// known shared and allocated. Returns the page whose count is full, if any
    /// (then nothing is held).
    pub(crate) fn pin_mapped(self: &Arc<Self>, pages: Range<u64>) -> Result<(), u64> {
        for page in pages.clone() {
            if !self.table.get_or_make(page).get_mapped() {
                self.put_now(pages.start..page, 1);
                return Err(page);
            }
        }
        self.count_pin();
        Ok(())
    }

    fn count_pin(self: &Arc<Self>) {
        if !batch::with_local(self, PinBatch::count_taken) {
            // Relaxed: a statistic.
            self.retired
                .taken
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Releases a pin of `pages` through this thread's batch.
    pub(crate) fn unpin(self: &Arc<Self>, pages: Range<u64>) {
        let batched = batch::with_local(self, |local| local.release(self, pages.clone()));
        if !batched {
            // The thread is exiting and its batch is gone: release at once.
            self.put_now(pages, 1);
            // Relaxed: a statistic.
            self.retired
                .released
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Drops `times` references on each page at once (a backed-off pin, or
    /// parked releases being flushed).
    pub(crate) fn put_now(&self, pages: Range<u64>, times: u64) {
        for page in pages {
            if let Some(page_ref) = self.table.get(page) {
                page_ref.put(times);
            }
        }
    }

    /// Clears MAPPED on every page of `pages`: no fast-path pin succeeds there
    /// until the slow path maps it again.
    pub(crate) fn unmap(&self, pages: Range<u64>) {
        self.table.find(pages, |page_ref| {
            page_ref.unmap();
            false
        });
    }

    /// The first page in `pages` that holds a reference.
    pub(crate) fn first_referenced(&self, pages: Range<u64>) -> Option<u64> {
        self.table.find(pages, |page_ref| page_ref.count() > 0)
    }

    /// The safety check of a conversion or punch, after `unmap`: every page
    /// must hold no reference. On the first page that does, drain every
    /// thread's batch once and check that page again; returns the page that is
    /// still referenced after that.
    pub(crate) fn check_unreferenced(&self, pages: Range<u64>) -> Result<(), u64> {
        let Some(page) = self.first_referenced(pages.clone()) else {
            return Ok(());
        };
        // Only small folios sit in batches; every folio is small here.
        self.drain_all();
        match self.first_referenced(page..pages.end) {
            None => Ok(()),
            Some(page) => Err(page),
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

    /// True if some page of `pages` is not known to be allocated.
    pub(crate) fn may_need_allocation(&self, pages: Range<u64>) -> bool {
        pages
            .into_iter()
            .any(|page| !self.table.get(page).is_some_and(PageRef::is_allocated))
    }

    /// Forgets that `pages` are allocated (after a punch).
    pub(crate) fn mark_unallocated(&self, pages: Range<u64>) {
        self.table.find(pages, |page_ref| {
            page_ref.clear_allocated();
            false
        });
    }

    pub(crate) fn register(&self, batch: Arc<PinBatch>) {
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(batch);
    }

    /// Removes a dead thread's (already drained) batch, keeping its counts.
    pub(crate) fn retire(&self, batch: &Arc<PinBatch>) {
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
            .retain(|b| !Arc::ptr_eq(b, batch));
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

    /// Bytes of reference metadata.
    pub(crate) fn footprint(&self) -> u64 {
        self.table.footprint()
    }
}
