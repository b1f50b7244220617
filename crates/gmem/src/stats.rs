//! Counters of a file, for the command line and benchmarks.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a file's counters and state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Completed shared to private conversions.
    pub conversions_to_private: u64,
    /// Completed private to shared conversions.
    pub conversions_to_shared: u64,
    /// Conversions that failed with `EAGAIN`.
    pub eagain: u64,
    /// Conversions refused by a listener.
    pub refused: u64,
    /// Drains of every thread's batch of released pins.
    pub drains: u64,
    /// Pins taken and not yet dropped.
    pub pins_live: u64,
    /// Pages allocated in the backing, where the backing accounts them.
    pub pages_allocated: Option<u64>,
    /// Pages in the private state.
    pub pages_private: u64,
    /// Pages in the shared state.
    pub pages_shared: u64,
    /// Bytes of gmem's own metadata for the file (reference table).
    pub metadata_bytes: u64,
    /// 2 MiB chunks counted as one huge folio now.
    pub huge_folios: u64,
    /// Huge folios split before a partial conversion or punch.
    pub folio_splits: u64,
    /// Chunks merged back into a huge folio.
    pub folio_merges: u64,
    /// Live host mappings that hide private pages with guard markers.
    pub mappings_guarded: u64,
    /// Live host mappings on the remap fallback (one VMA per private run).
    pub mappings_remapped: u64,
    /// The VMAs the fallback mappings of the file may spend.
    pub vma_budget: u64,
    /// The VMAs they are charged now (`2 * private runs + 1` each).
    pub vmas_spent: u64,
}

/// Event counters, bumped under the invalidate lock.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) to_private: AtomicU64,
    pub(crate) to_shared: AtomicU64,
    pub(crate) eagain: AtomicU64,
    pub(crate) refused: AtomicU64,
}

impl Counters {
    /// Adds one to a counter. Relaxed: statistics order nothing.
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
