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

use std::cell::RefCell;
use std::ops::Range;
use std::sync::{Arc, Weak};

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
    pub(crate) fn push(&self, pages: Range<u64>, mut put: impl FnMut(Range<u64>, u64)) {
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
        let mut run: Option<(u64, u64)> = None;
        for slot in &self.slots[..filled] {
            // Acquire pairs with the Release store in `push`.
            let parked = slot.load(Ordering::Acquire);
            if parked == 0 {
                continue;
            }
            // Relaxed: only an emptier (we, under the flag) writes zero, and
            // the owner does not write this slot again before its next flush,
            // which needs the flag.
            slot.store(0, Ordering::Relaxed);
            match run {
                Some((value, times)) if value == parked => run = Some((value, times + 1)),
                Some((value, times)) => {
                    put(decode(value), times);
                    run = Some((parked, 1));
                }
                None => run = Some((parked, 1)),
            }
        }
        if let Some((value, times)) = run {
            put(decode(value), times);
        }
        // Release pairs with the Acquire of the next emptier.
        self.draining.store(false, Ordering::Release);
        // `filled` is left alone: only the owner moves it. Slots emptied by
        // another thread are reused after the owner's next flush.
    }

    /// Counts a pin taken by the owner.
    pub(crate) fn count_taken(&self) {
        bump_owned(&self.taken);
    }

    /// Parks the release of `pages` (owner thread only).
    pub(crate) fn release(&self, refs: &References, pages: Range<u64>) {
        self.push(pages, |parked, times| refs.put_now(parked, times));
    }

    /// Counts a pin released by the owner.
    pub(crate) fn count_released(&self) {
        bump_owned(&self.released);
    }

    /// (pins taken, pins released) by the owner.
    pub(crate) fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.taken.load(Relaxed), self.released.load(Relaxed))
    }
}

/// Adds one to a counter that only the owner thread writes: a plain load and
/// store, no locked instruction. Relaxed: a statistic; readers may see it late.
fn bump_owned(counter: &std::sync::atomic::AtomicU64) {
    use std::sync::atomic::Ordering::Relaxed;
    counter.store(counter.load(Relaxed) + 1, Relaxed);
}

thread_local! {
    static LOCAL: RefCell<LocalBatches> = const { RefCell::new(LocalBatches(Vec::new())) };
}

/// This thread's batch for one file.
struct LocalBatch {
    file: u64,
    refs: Weak<References>,
    batch: Arc<PinBatch>,
}

/// This thread's batches, one per file it released pins of.
struct LocalBatches(Vec<LocalBatch>);

impl LocalBatches {
    fn get_or_make(&mut self, refs: &Arc<References>) -> &PinBatch {
        let file = refs.id();
        if let Some(index) = self.0.iter().position(|local| local.file == file) {
            return &self.0[index].batch;
        }
        // Forget the batches of files that are gone.
        self.0.retain(|local| local.refs.strong_count() > 0);
        let batch = Arc::new(PinBatch::new());
        refs.register(batch.clone());
        self.0.push(LocalBatch {
            file,
            refs: Arc::downgrade(refs),
            batch,
        });
        &self.0.last().expect("just pushed").batch
    }
}

impl Drop for LocalBatches {
    /// The thread exits: flush its batches and retire them.
    fn drop(&mut self) {
        for local in self.0.drain(..) {
            if let Some(refs) = local.refs.upgrade() {
                local.batch.drain(|pages, times| refs.put_now(pages, times));
                refs.retire(&local.batch);
            }
        }
    }
}

/// Runs `f` on this thread's batch for `refs`'s file. Returns false, without
/// running it, when the thread's batches are gone (the thread is exiting).
pub(crate) fn with_local(refs: &Arc<References>, f: impl FnOnce(&PinBatch)) -> bool {
    LOCAL
        .try_with(|local| match local.try_borrow_mut() {
            Ok(mut local) => {
                f(local.get_or_make(refs));
                true
            }
            Err(_) => false,
        })
        .unwrap_or(false)
}
