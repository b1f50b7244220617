//! Batches of released pins: the analogue of the kernel's per-CPU `lru_add`
//! folio batches, kept per thread and per file.
//!
//! Dropping a [`Pin`](crate::Pin) does not drop its page references at once:
//! it parks them in the releasing thread's [`PinBatch`], which is flushed when
//! full, when the thread exits, and by any thread's conversion through
//! [`References::drain_all`]. A parked release is a transient reference, so
//! the conversion's safety check sees it until a drain.
//!
//! The owner thread fills slots with plain stores; emptying them (the owner's
//! flush of a full batch, or another thread's drain) takes the batch's
//! `draining` flag, so one emptier runs at a time. The owner writes each slot
//! at most once between two of its flushes, and an emptier zeroes only a slot
//! it has read non-zero, so every parked release is released exactly once.
//! Emptying coalesces equal neighbouring releases into one decrement.

use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};

use crate::refs::References;
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Slots per batch (the kernel's `PAGEVEC_SIZE` is 31).
#[cfg(not(loom))]
pub(crate) const BATCH_SLOTS: usize = 31;
#[cfg(loom)]
pub(crate) const BATCH_SLOTS: usize = 2;

/// Bits of a slot that hold the number of pages; the rest hold the first page.
const LEN_BITS: u32 = 24;
const MAX_LEN: u64 = (1 << LEN_BITS) - 1;

fn encode(first: u64, len: u64) -> u64 {
    debug_assert!((1..=MAX_LEN).contains(&len) && first < 1 << (64 - LEN_BITS));
    first << LEN_BITS | len
}

fn decode(slot: u64) -> Range<u64> {
    let first = slot >> LEN_BITS;
    first..first + (slot & MAX_LEN)
}

/// One thread's parked pin releases for one file. Cache-line aligned, with
/// the fill point, the flag and the first slots in the first line, so that a
/// drain from another CPU of a batch holding a few releases misses on one
/// line; two threads' batches never share a line.
#[derive(Debug)]
#[repr(C, align(64))]
pub(crate) struct PinBatch {
    /// Slots the owner filled since its last flush. Owner-only.
    filled: AtomicUsize,
    /// Held by the one thread emptying slots.
    draining: AtomicBool,
    /// Parked releases; 0 is an empty slot (a release always has pages).
    slots: [AtomicU64; BATCH_SLOTS],
    /// Pins taken and released by the owner thread (statistics). Written by
    /// the owner only, read by anyone.
    taken: std::sync::atomic::AtomicU64,
    released: std::sync::atomic::AtomicU64,
}

impl PinBatch {
    pub(crate) fn new() -> PinBatch {
        PinBatch {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            filled: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            taken: Default::default(),
            released: Default::default(),
        }
    }

    /// Parks the release of `pages` (owner thread only); flushes the batch
    /// through `put` first when it is full.
    #[inline(always)]
    pub(crate) fn push(&self, pages: Range<u64>, put: impl FnMut(Range<u64>, u64)) {
        // Relaxed: only the owner reads or writes `filled`.
        let slot = self.filled.load(Ordering::Relaxed);
        let len = pages.end - pages.start;
        if slot < BATCH_SLOTS && len <= MAX_LEN {
            // As in `push_slow`: the slot is empty. Release pairs with the
            // Acquire load in `drain`.
            self.slots[slot].store(encode(pages.start, len), Ordering::Release);
            self.filled.store(slot + 1, Ordering::Relaxed);
            return;
        }
        self.push_slow(pages, put);
    }

    /// `push` of a full batch, or of a range longer than a slot holds.
    #[cold]
    #[inline(never)]
    fn push_slow(&self, pages: Range<u64>, mut put: impl FnMut(Range<u64>, u64)) {
        let mut first = pages.start;
        while first < pages.end {
            let len = (pages.end - first).min(MAX_LEN);
            // Relaxed: only the owner reads or writes `filled`.
            let mut slot = self.filled.load(Ordering::Relaxed);
            if slot == BATCH_SLOTS {
                self.drain(&mut put);
                slot = 0;
            }
            // The slot is empty: the owner filled only slots below `filled`
            // since its last flush emptied them all, and emptiers only zero.
            // Release pairs with the Acquire load in `drain`: the owner's
            // accesses under the pin happen before the reference is dropped.
            self.slots[slot].store(encode(first, len), Ordering::Release);
            self.filled.store(slot + 1, Ordering::Relaxed);
            first += len;
        }
    }

    /// Empties every slot, handing the parked releases to `put(pages,
    /// times)`, equal neighbours coalesced. Any thread.
    pub(crate) fn drain(&self, mut put: impl FnMut(Range<u64>, u64)) {
        // Acquire pairs with the Release that ends the previous emptier's
        // drain: its zeroing of slots happens before our reads.
        while self
            .draining
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            crate::sync::yield_now();
        }
        // Slots at and past the owner's fill point are empty, but for
        // releases racing with this drain (which need not be drained).
        // Relaxed: a release that happens before this drain also made its
        // `filled` store happen before this load.
        let filled = self.filled.load(Ordering::Relaxed);
        // The run of equal releases being coalesced: its slot value, and how
        // many (0: none yet).
        let (mut value, mut times) = (0, 0);
        for slot in &self.slots[..filled.min(BATCH_SLOTS)] {
            // Acquire pairs with the Release store in `push`.
            let parked = slot.load(Ordering::Acquire);
            if parked == 0 {
                continue;
            }
            // Relaxed: only an emptier (we, under the flag) writes zero, and
            // the owner does not write this slot again before its next flush,
            // which needs the flag.
            slot.store(0, Ordering::Relaxed);
            if parked != value {
                if times != 0 {
                    put(decode(value), times);
                }
                (value, times) = (parked, 0);
            }
            times += 1;
        }
        if times != 0 {
            put(decode(value), times);
        }
        // Release pairs with the Acquire of the next emptier.
        self.draining.store(false, Ordering::Release);
        // `filled` is left alone: only the owner moves it. Slots emptied by
        // another thread are reused after the owner's next flush.
    }

    /// Counts a pin taken by the owner.
    #[inline(always)]
    pub(crate) fn count_taken(&self) {
        bump_owned(&self.taken);
    }

    /// Parks the release of `pages` (owner thread only).
    #[inline(always)]
    pub(crate) fn release(&self, refs: &References, pages: Range<u64>) {
        self.push(pages, |parked, times| refs.put_now(parked, times));
    }

    /// Counts a pin released by the owner.
    #[inline(always)]
    pub(crate) fn count_released(&self) {
        bump_owned(&self.released);
    }

    /// Forgets the counts and the fill point of an emptied batch that no
    /// other thread can reach (before it is made spare).
    pub(crate) fn reset(&self) {
        // Relaxed: no other thread reaches the batch; the next owner gets it
        // through the spare list's lock.
        self.filled.store(0, Ordering::Relaxed);
        self.taken.store(0, std::sync::atomic::Ordering::Relaxed);
        self.released.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// (pins taken, pins released) by the owner.
    pub(crate) fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.taken.load(Relaxed), self.released.load(Relaxed))
    }
}

/// Adds one to a counter that only the owner thread writes: a plain load and
/// store, no locked instruction. Relaxed: a statistic; readers may see it late.
#[inline(always)]
fn bump_owned(counter: &std::sync::atomic::AtomicU64) {
    use std::sync::atomic::Ordering::Relaxed;
    counter.store(counter.load(Relaxed) + 1, Relaxed);
}

/// Batches no thread or file uses any more, emptied, for the next thread
/// that needs one. Batches are made once and never freed, so that the fast
/// path can cache a plain `&'static` reference; there are never more than the
/// most (thread, file) pairs that were live at once.
static SPARE: Mutex<Vec<&'static PinBatch>> = Mutex::new(Vec::new());

/// A spare batch, or a new one.
fn new_batch() -> &'static PinBatch {
    let spare = SPARE.lock().unwrap_or_else(|e| e.into_inner()).pop();
    spare.unwrap_or_else(|| Box::leak(Box::new(PinBatch::new())))
}

/// Makes `batch` spare. Only once no other thread can reach it: it is not (or
/// no longer) in its file's registry, and its owner thread forgets it.
fn recycle(batch: &'static PinBatch) {
    // A dead file's parked releases go with it.
    batch.drain(|_, _| {});
    batch.reset();
    SPARE.lock().unwrap_or_else(|e| e.into_inner()).push(batch);
}

thread_local! {
    /// The fast path's cache: the id of the file whose batch this thread used
    /// last, and that batch (0, no file's id: none). It has no destructor, so
    /// reading it is a plain load; it is set only while `LOCAL` is alive,
    /// whose destructor clears it.
    static HOT: Cell<(u64, Option<&'static PinBatch>)> = const { Cell::new((0, None)) };
    /// Every batch of this thread, flushed and retired when it exits.
    static LOCAL: RefCell<LocalBatches> = const { RefCell::new(LocalBatches(Vec::new())) };
}

/// This thread's batch for one file.
struct LocalBatch {
    file: u64,
    refs: Weak<References>,
    batch: &'static PinBatch,
}

/// This thread's batches, one per file it pinned.
///
/// Every batch here is registered with its file and stays so until the
/// thread exits, so the batch cached in `HOT` under a file's id is the one
/// that file's drains empty: ids are never reused, and the caller holds the
/// file alive. Batches of files that are gone are made spare whenever a new
/// batch is made, so the list holds at most the files alive at the last
/// making, plus one.
struct LocalBatches(Vec<LocalBatch>);

impl LocalBatches {
    fn get_or_make(&mut self, refs: &Arc<References>) -> &'static PinBatch {
        let file = refs.id();
        if let Some(local) = self.0.iter().find(|local| local.file == file) {
            return local.batch;
        }
        // Forget the batches of files that are gone: their registries went
        // with them, so nothing else reaches them.
        self.0.retain(|local| {
            let live = local.refs.strong_count() > 0;
            if !live {
                recycle(local.batch);
            }
            live
        });
        let batch = new_batch();
        refs.register(batch);
        self.0.push(LocalBatch {
            file,
            refs: Arc::downgrade(refs),
            batch,
        });
        batch
    }
}

impl Drop for LocalBatches {
    /// The thread exits: flush its batches, retire them, and make them spare.
    fn drop(&mut self) {
        // From here on the fast path misses, and the slow path finds `LOCAL`
        // gone: releases are made at once.
        HOT.set((0, None));
        for local in self.0.drain(..) {
            if let Some(refs) = local.refs.upgrade() {
                local.batch.drain(|pages, times| refs.put_now(pages, times));
                // After this no drain of the file reaches the batch.
                refs.retire(local.batch);
            }
            recycle(local.batch);
        }
    }
}

/// Runs `f` on this thread's batch for `refs`'s file. Returns `None`, without
/// running it, when the thread's batches are gone (the thread is exiting).
///
/// The fast path is two loads from a thread-local cell and a compare of the
/// file's id with the cached one.
#[inline(always)]
pub(crate) fn with_local<R>(refs: &Arc<References>, f: impl FnOnce(&PinBatch) -> R) -> Option<R> {
    match cached(refs) {
        Some(batch) => Some(f(batch)),
        None => miss(refs, f),
    }
}

/// Counts a pin taken on this thread's batch for `refs`'s file if it is the
/// cached one; `false` (counting nothing) otherwise.
#[inline(always)]
pub(crate) fn count_taken_cached(refs: &References) -> bool {
    cached(refs).map(PinBatch::count_taken).is_some()
}

/// This thread's batch for `refs`'s file, if it is the one cached in `HOT`.
#[inline(always)]
fn cached(refs: &References) -> Option<&'static PinBatch> {
    match HOT.with(Cell::get) {
        (file, Some(batch)) if file == refs.id() => Some(batch),
        _ => None,
    }
}

/// The slow lookup: finds or makes this thread's batch for `refs`'s file,
/// caches it in `HOT`, and runs `f` on it.
#[cold]
#[inline(never)]
fn miss<R>(refs: &Arc<References>, f: impl FnOnce(&PinBatch) -> R) -> Option<R> {
    let batch = LOCAL
        .try_with(|local| Some(local.try_borrow_mut().ok()?.get_or_make(refs)))
        .ok()
        .flatten()?;
    HOT.set((refs.id(), Some(batch)));
    Some(f(batch))
}

/// How many batches this thread holds, over every file (tests).
#[cfg(all(test, not(loom)))]
pub(crate) fn local_batches() -> usize {
    LOCAL.with(|local| local.borrow().0.len())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::local_batches;
    use crate::{Attribute, Flags, GuestMemfd, PAGE_SIZE};

    fn file() -> GuestMemfd {
        GuestMemfd::new(1024 * PAGE_SIZE, Flags::MMAP | Flags::INIT_SHARED).expect("memfd")
    }

    /// A thread pinning A, B and A again keeps one batch per file, and each
    /// file's drain finds its own parked releases.
    #[test]
    fn files_a_b_a_keep_their_batches() {
        std::thread::spawn(|| {
            let (a, b) = (file(), file());
            for mem in [&a, &b, &a, &b, &a] {
                drop(mem.pin(0, PAGE_SIZE).expect("pin"));
            }
            assert_eq!(local_batches(), 2);
            for mem in [&a, &b] {
                assert_eq!(mem.stats().pins_live, 0);
                // Parked releases are still counted: the conversion drains
                // this thread's batch for that file once and passes.
                let drains = mem.stats().drains;
                mem.set_attributes(0, PAGE_SIZE, Attribute::Private)
                    .expect("drained");
                assert_eq!(mem.stats().drains, drains + 1);
            }
            let held = a.pin(PAGE_SIZE, PAGE_SIZE).expect("pin");
            assert_eq!((a.stats().pins_live, b.stats().pins_live), (1, 0));
            drop(held);
        })
        .join()
        .unwrap();
    }

    /// A file dropped while another thread's cache points at its batch:
    /// that thread's next pin of another file forgets the batch, and its
    /// exit flushes only live files.
    #[test]
    fn a_file_dropped_under_another_threads_cache() {
        let a = std::sync::Arc::new(file());
        let (to_main, from_worker) = std::sync::mpsc::channel();
        let (to_worker, from_main) = std::sync::mpsc::channel::<()>();
        let worker = {
            let a = a.clone();
            std::thread::spawn(move || {
                // Parked releases for A stay in this thread's batch.
                for _ in 0..3 {
                    drop(a.pin(0, 2 * PAGE_SIZE).expect("pin"));
                }
                drop(a);
                to_main.send(()).unwrap();
                from_main.recv().unwrap();
                let b = file();
                drop(b.pin(0, PAGE_SIZE).expect("pin"));
                assert_eq!(local_batches(), 1, "A's batch forgotten");
                drop(b.pin(PAGE_SIZE, PAGE_SIZE).expect("pin"));
                assert_eq!(b.stats().pins_live, 0);
            })
        };
        from_worker.recv().unwrap();
        // The last owner of A: the file goes while the worker caches it.
        drop(std::sync::Arc::into_inner(a).expect("last reference"));
        to_worker.send(()).unwrap();
        worker.join().unwrap();
    }

    /// Batches of dead files do not pile up in a thread that keeps pinning
    /// new files; their memory is reused.
    #[test]
    fn dead_files_do_not_accumulate() {
        std::thread::spawn(|| {
            for _ in 0..64 {
                let mem = file();
                drop(mem.pin(0, PAGE_SIZE).expect("pin"));
                assert!(local_batches() <= 2, "{} batches", local_batches());
            }
        })
        .join()
        .unwrap();
    }

    /// A thread's exit flushes its batch: no drain is needed afterwards, and
    /// a recycled batch starts empty for the next thread.
    #[test]
    fn thread_exit_flushes_and_recycles() {
        let mem = std::sync::Arc::new(file());
        for round in 0..4 {
            // `join` (unlike the end of a scope) waits for the thread's
            // thread-local destructors.
            let worker = mem.clone();
            std::thread::spawn(move || {
                for _ in 0..5 {
                    drop(worker.pin(round * PAGE_SIZE, PAGE_SIZE).expect("pin"));
                }
            })
            .join()
            .unwrap();
            assert_eq!(mem.stats().pins_live, 0);
            let drains = mem.stats().drains;
            mem.set_attributes(round * PAGE_SIZE, PAGE_SIZE, Attribute::Private)
                .expect("flushed at exit");
            assert_eq!(mem.stats().drains, drains, "no drain needed");
        }
    }
}
