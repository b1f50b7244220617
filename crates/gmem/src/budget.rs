//! The VMA budget of the remap fallback.
//!
//! Where the kernel refuses guard markers on a host mapping, each private run
//! of the file is an empty file mapped over the run: one VMA per run, and a
//! process may have only `vm.max_map_count` VMAs (65,530 by default) before
//! `mmap`, thread creation and `malloc` start failing. So every file has a
//! budget of VMAs for its fallback mappings, and all files together have a
//! process-wide one; a conversion or a new mapping that would exceed either
//! fails with `ENOMEM` before anything changed, and the rest of the process is
//! never starved. Guard-marker mappings spend nothing.
//!
//! A fallback mapping's cost is counted as `2 * private runs + 1`, the most
//! VMAs a mapping with that many private runs can have (the runs of one state
//! alternate with the other's). A guard-marker mapping hides runs of 2 MiB
//! and more by the remap too, where the budget allows (guards would need a
//! page table for every page of them), and is charged 2 for each. A change
//! takes what it may need first and settles at what the mappings need after
//! it, under the file's registry of mappings, so one file's charge is never
//! changed by two threads at once.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// VMAs charged by every file's fallback mappings in this process.
static PROCESS_SPENT: AtomicU64 = AtomicU64::new(0);

/// `vm.max_map_count`, read once (its default where it cannot be read).
pub(crate) fn max_map_count() -> u64 {
    static MAX: OnceLock<u64> = OnceLock::new();
    *MAX.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(65_530)
    })
}

/// The VMAs all of gmem's fallback mappings may spend: a quarter of
/// `vm.max_map_count`.
pub(crate) fn process_limit() -> u64 {
    max_map_count() / 4
}

/// A file's budget when its options name none: an eighth of
/// `vm.max_map_count`.
pub(crate) fn default_file_budget() -> u64 {
    max_map_count() / 8
}

/// The VMA limits of the remap fallback in this process, for diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmaLimits {
    /// `vm.max_map_count`: the VMAs the process may have.
    pub max_map_count: u64,
    /// What all of gmem's fallback mappings may spend: a quarter of it.
    pub process_budget: u64,
    /// A file's budget when its options name none: an eighth of it.
    pub default_file_budget: u64,
    /// What gmem's fallback mappings are charged now, over all files.
    pub process_spent: u64,
}

/// The VMA limits of the remap fallback (see [`Options::vma_budget`](crate::Options::vma_budget)).
pub fn vma_limits() -> VmaLimits {
    VmaLimits {
        max_map_count: max_map_count(),
        process_budget: process_limit(),
        default_file_budget: default_file_budget(),
        // Relaxed: a statistic.
        process_spent: PROCESS_SPENT.load(Ordering::Relaxed),
    }
}

/// What one fallback mapping costs with `private_runs` private runs.
pub(crate) fn mapping_cost(private_runs: u64) -> u64 {
    private_runs.saturating_mul(2).saturating_add(1)
}

/// A request that would exceed a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OverBudget {
    /// The VMAs the file's fallback mappings would need.
    pub(crate) needed: u64,
    /// The budget that would be exceeded (the file's, or what is left of the
    /// process's for it).
    pub(crate) budget: u64,
}

/// One file's budget and what its mappings are charged.
#[derive(Debug)]
pub(crate) struct VmaBudget {
    limit: u64,
    /// Changed only under the file's registry lock; Relaxed throughout (the
    /// lock orders the changes, the process counter is its own).
    spent: AtomicU64,
    /// VMAs of forsaken mappings (a failed remap may have left a gap, so
    /// they are never unmapped): charged for good, to the file while it
    /// lives and to the process after.
    leaked: AtomicU64,
}

impl VmaBudget {
    pub(crate) fn new(limit: u64) -> VmaBudget {
        VmaBudget {
            limit,
            spent: AtomicU64::new(0),
            leaked: AtomicU64::new(0),
        }
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    pub(crate) fn spent(&self) -> u64 {
        self.spent.load(Ordering::Relaxed)
    }

    /// Takes `vmas` more if neither the file's budget nor the process's
    /// would be exceeded; else takes nothing.
    pub(crate) fn take(&self, vmas: u64) -> Result<(), OverBudget> {
        let spent = self.spent();
        let needed = spent.saturating_add(vmas);
        if needed > self.limit {
            return Err(OverBudget {
                needed,
                budget: self.limit,
            });
        }
        let limit = process_limit();
        // Relaxed: a counter whose only invariant (never above the limit)
        // the compare-exchange itself keeps.
        PROCESS_SPENT
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |total| {
                total.checked_add(vmas).filter(|total| *total <= limit)
            })
            .map_err(|total| OverBudget {
                needed,
                budget: spent + limit.saturating_sub(total),
            })?;
        self.spent.store(needed, Ordering::Relaxed);
        Ok(())
    }

    /// Charges `vmas` of a forsaken mapping for good: every later settle
    /// keeps them. They were spent already (the mapping was charged).
    pub(crate) fn leak(&self, vmas: u64) {
        // Relaxed: see `spent`.
        self.leaked.fetch_add(vmas, Ordering::Relaxed);
    }

    /// Makes the file's charge `to`, what its mappings need now, plus what
    /// forsaken mappings leaked, giving back the rest. Everything a mapping
    /// needs was taken first, so that is never more than what is spent.
    pub(crate) fn settle(&self, to: u64) {
        // Relaxed: see `spent`.
        let leaked = self.leaked.load(Ordering::Relaxed);
        let spent = self.spent();
        debug_assert!(to <= spent, "settling at {to} with {spent} taken");
        // Leaked VMAs exist whatever the budget says: they may push the
        // charge past what was taken (a remap that took 2 failed and left
        // the region's own VMA too).
        let to = to.min(spent) + leaked;
        self.spent.store(to, Ordering::Relaxed);
        // Relaxed: see `take`.
        if to >= spent {
            PROCESS_SPENT.fetch_add(to - spent, Ordering::Relaxed);
        } else {
            PROCESS_SPENT.fetch_sub(spent - to, Ordering::Relaxed);
        }
    }
}

impl Drop for VmaBudget {
    /// Gives back all but the leaked VMAs, which the process keeps.
    fn drop(&mut self) {
        self.settle(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_never_exceeds_its_budget_and_gives_back_what_it_settles() {
        let budget = VmaBudget::new(10);
        budget.take(7).unwrap();
        assert_eq!(budget.spent(), 7);
        assert_eq!(
            budget.take(4).unwrap_err(),
            OverBudget {
                needed: 11,
                budget: 10
            }
        );
        assert_eq!(budget.spent(), 7, "a refused take takes nothing");
        budget.settle(3);
        assert_eq!(budget.spent(), 3);
        budget.take(7).unwrap();
    }

    #[test]
    fn the_process_limit_holds_over_files() {
        let limit = process_limit();
        let files: Vec<_> = (0..4).map(|_| VmaBudget::new(limit)).collect();
        // Other tests of this process may hold a little of the limit.
        assert!(files[0].take(limit / 2).is_ok());
        let over = files[1].take(limit / 2 + limit / 4 + 1);
        assert!(over.is_err(), "two files got more than the process limit");
    }
}
