//! The registry of a file's live host mappings: what a conversion changes
//! and what the VMA budget charges, locked from a change's budget check to
//! its settling; the undo of a change, and the poisoned and forsaken
//! mappings that stay charged.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::io::Errno;

use super::{Hiding, LiveMapping};
use crate::attributes::Attribute;
use crate::budget::{self, OverBudget};
use crate::file::FileState;

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
    state: Mutex<RegistryState>,
}

#[derive(Debug, Default)]
pub(crate) struct RegistryState {
    pub(super) live: Vec<Arc<LiveMapping>>,
    /// Poisoned mappings, no longer changed by conversions but still
    /// charged for their VMAs until dropped (and for good if forsaken).
    poisoned: Vec<Arc<LiveMapping>>,
    /// What each fallback mapping is charged: `2 * private runs + 1` at the
    /// last change (kept only while there are fallback mappings).
    fallback_cost: u64,
}

/// The registry, locked: a conversion holds it from its budget check to its
/// commit, so the set of mappings it changes is the set it charged for.
pub(crate) struct Registry<'a> {
    state: MutexGuard<'a, RegistryState>,
}

impl std::ops::Deref for Registry<'_> {
    type Target = RegistryState;

    fn deref(&self) -> &RegistryState {
        &self.state
    }
}

impl std::ops::DerefMut for Registry<'_> {
    fn deref_mut(&mut self) -> &mut RegistryState {
        &mut self.state
    }
}

impl Mappings {
    #[inline]
    pub(crate) fn lock(&self) -> Registry<'_> {
        Registry {
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    pub(super) fn unregister(&self, file: &FileState, mapping: &Arc<LiveMapping>) {
        let mut registry = self.lock();
        let other = |other: &Arc<LiveMapping>| !Arc::ptr_eq(other, mapping);
        registry.live.retain(other);
        registry.poisoned.retain(other);
        if mapping.region.is_forsaken() {
            // Never unmapped: its VMAs stay in the process.
            file.vma_budget
                .leak(mapping.leaked_vmas(registry.fallback_cost));
        }
        registry.settle(file, None);
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

    /// Takes the VMAs a new mapping hiding by `hiding` needs before it
    /// hides anything: a fallback mapping's cost for `private_runs()` runs.
    /// (A guard-marker mapping takes its remapped runs' VMAs as it goes.)
    /// Returns what a fallback mapping costs from now on.
    pub(super) fn take_for_mapping(
        &self,
        file: &FileState,
        hiding: Hiding,
        private_runs: impl FnOnce() -> u64,
    ) -> Result<u64, OverBudget> {
        if hiding == Hiding::GuardMarkers {
            return Ok(self.fallback_cost);
        }
        let cost = budget::mapping_cost(private_runs());
        // Fallback mappings already charged are at `cost` (no conversion
        // since their last change); the new one comes on top.
        file.vma_budget.take(cost)?;
        Ok(cost)
    }

    /// Takes the VMAs changing the file's runs may need, before anything
    /// changes: the fallback mappings' growth once the file has
    /// `private_runs_after()` private runs (asked only if there are any).
    /// Guard-marker mappings take what their remaps need as they go, and
    /// hide or show without a VMA when the budget is spent. Returns what a
    /// fallback mapping will cost; settle with it once the change is made.
    #[inline]
    pub(crate) fn take_for_change(
        &self,
        file: &FileState,
        private_runs_after: impl FnOnce() -> u64,
    ) -> Result<u64, OverBudget> {
        let fallbacks = self.remapped();
        let cost = match fallbacks {
            0 => self.fallback_cost,
            _ => budget::mapping_cost(private_runs_after()),
        };
        let needed = fallbacks * cost.saturating_sub(self.fallback_cost);
        if needed > 0 {
            file.vma_budget.take(needed)?;
        }
        Ok(cost)
    }

    /// What a fallback mapping is charged now.
    pub(crate) fn fallback_cost(&self) -> u64 {
        self.fallback_cost
    }

    /// Puts back a change the listeners refused: applies `to` to `runs` in
    /// every mapping; one where that fails is poisoned and unregistered.
    pub(crate) fn undo<I: Iterator<Item = Range<u64>>>(
        &mut self,
        file: &FileState,
        runs: impl Fn() -> I,
        to: Attribute,
    ) -> Result<(), MappingFailure> {
        let mut failed = None;
        for mapping in &self.live {
            if let Err((call, errno)) = mapping.apply(file, &runs, to) {
                tracing::error!(call, %errno, "undoing a host mapping change failed; the mapping is poisoned");
                mapping.poison();
                failed.get_or_insert((call, errno));
            }
        }
        self.set_aside_poisoned();
        match failed {
            None => Ok(()),
            Some((call, errno)) => Err(MappingFailure {
                call,
                errno,
                poisoned: true,
            }),
        }
    }

    /// Moves the mappings just poisoned out of the live ones: conversions no
    /// longer change them, but they stay charged.
    fn set_aside_poisoned(&mut self) {
        let state = &mut *self.state;
        // Relaxed: set by this thread, under the registry lock.
        let (poisoned, live) = std::mem::take(&mut state.live)
            .into_iter()
            .partition(|mapping| mapping.poisoned.load(Ordering::Relaxed));
        state.live = live;
        state.poisoned.extend::<Vec<_>>(poisoned);
    }

    /// Makes the file's charge what its mappings need now, with fallback
    /// mappings at `fallback_cost` (`None`: as before, the change failed).
    #[inline]
    pub(crate) fn settle(&mut self, file: &FileState, fallback_cost: Option<u64>) {
        if let Some(cost) = fallback_cost {
            self.fallback_cost = cost;
        }
        if file.vma_budget.spent() == 0 {
            // Nothing taken, nothing to give back.
            return;
        }
        let cost = self.fallback_cost;
        let mappings = self.live.iter().chain(&self.poisoned);
        let charge = mappings.map(|mapping| mapping.charge(cost)).sum();
        file.vma_budget.settle(charge);
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
        // A lone run (a single-page conversion) goes a way without
        // iterators, and no walk is repeated for each mapping.
        let mut first = runs();
        match (first.next(), first.next()) {
            (None, _) => Ok(()),
            (Some(run), None) => self.apply_each(|m, to| m.apply_one(file, run.clone(), to), to),
            _ => self.apply_each(|m, to| m.apply(file, &runs, to), to),
        }
    }

    /// [`apply`](Self::apply) to each live mapping in turn: `change` makes
    /// a mapping's change to a state, and puts it back to the other.
    fn apply_each(
        &mut self,
        change: impl Fn(&LiveMapping, Attribute) -> Result<(), (&'static str, Errno)>,
        to: Attribute,
    ) -> Result<(), MappingFailure> {
        let back = to.other();
        for (done, mapping) in self.live.iter().enumerate() {
            let Err((call, errno)) = change(mapping, to) else {
                continue;
            };
            // Put back every mapping changed so far, the failed one
            // included (advice and remaps are idempotent, and a run shown
            // or hidden by halves is whole again after the other way).
            let mut poisoned = false;
            for mapping in &self.live[..=done] {
                if let Err((call, errno)) = change(mapping, back) {
                    tracing::error!(call, %errno, "undoing a host mapping change failed; the mapping is poisoned");
                    mapping.poison();
                    poisoned = true;
                }
            }
            self.set_aside_poisoned();
            return Err(MappingFailure {
                call,
                errno,
                poisoned,
            });
        }
        Ok(())
    }
}
