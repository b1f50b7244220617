//! The attribute map: the shared/private state of every page of a file,
//! stored as runs.
//!
//! The map owns the state and nothing else: it knows nothing of allocation,
//! references or mappings. Its runs partition `[0, pages)` and adjacent runs
//! always differ (the maple-tree invariant of the kernel), so two states
//! alternate. Updates are split into [`AttributeMap::prepare`], which may fail
//! for lack of memory, and [`AttributeMap::set`], which cannot.

use std::collections::TryReserveError;
use std::ops::Range;

/// The state of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Attribute {
    /// The host may read and write the page.
    Shared,
    /// Only the guest may touch the page.
    Private,
}

/// A maximal run of pages with one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub(crate) pages: (u64, u64),
    pub(crate) attr: Attribute,
}

impl Run {
    /// The pages of the run.
    pub(crate) fn range(&self) -> Range<u64> {
        self.pages.0..self.pages.1
    }
}

/// Per-page state of one file, as merged runs sorted by page index.
#[derive(Debug)]
pub(crate) struct AttributeMap {
    runs: Vec<Run>,
}

impl AttributeMap {
    /// A map of `pages` pages (at least one), all in state `initial`.
    pub(crate) fn new(pages: u64, initial: Attribute) -> AttributeMap {
        debug_assert!(pages > 0);
        AttributeMap {
            runs: vec![Run {
                pages: (0, pages),
                attr: initial,
            }],
        }
    }

    fn pages(&self) -> u64 {
        self.runs.last().map_or(0, |run| run.pages.1)
    }

    /// The index of the run holding `page`.
    fn run_index(&self, page: u64) -> usize {
        debug_assert!(page < self.pages());
        self.runs.partition_point(|run| run.pages.1 <= page)
    }

    /// The state of `page`, which must be inside the file.
    pub(crate) fn get(&self, page: u64) -> Attribute {
        self.runs[self.run_index(page)].attr
    }

    /// The runs overlapping `pages`, clipped to it.
    pub(crate) fn runs_in(&self, pages: Range<u64>) -> impl Iterator<Item = Run> + '_ {
        let first = if pages.is_empty() {
            self.runs.len()
        } else {
            self.run_index(pages.start)
        };
        self.runs[first..]
            .iter()
            .take_while(move |run| run.pages.0 < pages.end)
            .map(move |run| Run {
                pages: (run.pages.0.max(pages.start), run.pages.1.min(pages.end)),
                attr: run.attr,
            })
    }

    /// The first page in `pages` whose state is not `attr`.
    pub(crate) fn first_not(&self, pages: Range<u64>, attr: Attribute) -> Option<u64> {
        self.runs_in(pages)
            .find(|run| run.attr != attr)
            .map(|run| run.pages.0)
    }

    /// Whether every page of `pages` (non-empty, inside the file) has one state.
    pub(crate) fn is_uniform(&self, pages: Range<u64>) -> bool {
        self.first_not(pages.clone(), self.get(pages.start))
            .is_none()
    }

    /// How many pages are in state `attr`.
    pub(crate) fn count(&self, attr: Attribute) -> u64 {
        self.runs
            .iter()
            .filter(|run| run.attr == attr)
            .map(|run| run.pages.1 - run.pages.0)
            .sum()
    }

    /// How many runs are private.
    pub(crate) fn private_runs(&self) -> u64 {
        self.runs
            .iter()
            .filter(|run| run.attr == Attribute::Private)
            .count() as u64
    }

    /// What [`private_runs`](Self::private_runs) would be after `set(pages, attr)`.
    pub(crate) fn private_runs_after(&self, pages: Range<u64>, attr: Attribute) -> u64 {
        let mut copy = AttributeMap {
            runs: self.runs.clone(),
        };
        copy.set(pages, attr);
        copy.private_runs()
    }

    /// Reserves what one [`set`](Self::set) may need, so that it cannot fail.
    pub(crate) fn prepare(&mut self) -> Result<(), TryReserveError> {
        // One set replaces at least one run by at most three.
        self.runs.try_reserve(2)
    }

    /// Sets `pages` (non-empty, inside the file) to `attr`, merging runs.
    /// Does not allocate after a successful [`prepare`](Self::prepare).
    pub(crate) fn set(&mut self, pages: Range<u64>, attr: Attribute) {
        debug_assert!(!pages.is_empty() && pages.end <= self.pages());
        let mut first = self.run_index(pages.start);
        let mut last = self.run_index(pages.end - 1);
        let mut new = Run {
            pages: (pages.start, pages.end),
            attr,
        };
        let mut left = None;
        let mut right = None;
        // Left neighbour: keep the head of the first run, or merge into it.
        let head = self.runs[first];
        if head.attr == attr {
            new.pages.0 = head.pages.0;
        } else if head.pages.0 < pages.start {
            left = Some(Run {
                pages: (head.pages.0, pages.start),
                attr: head.attr,
            });
        } else if first > 0 {
            // The run before differs from `head`, so it has state `attr`.
            first -= 1;
            new.pages.0 = self.runs[first].pages.0;
        }
        // Right neighbour, symmetrically.
        let tail = self.runs[last];
        if tail.attr == attr {
            new.pages.1 = tail.pages.1;
        } else if tail.pages.1 > pages.end {
            right = Some(Run {
                pages: (pages.end, tail.pages.1),
                attr: tail.attr,
            });
        } else if last + 1 < self.runs.len() {
            last += 1;
            new.pages.1 = self.runs[last].pages.1;
        }
        let replacement = [left, Some(new), right].into_iter().flatten();
        self.runs.splice(first..=last, replacement);
        debug_assert!(self.is_merged());
    }

    fn is_merged(&self) -> bool {
        self.runs.first().is_some_and(|run| run.pages.0 == 0)
            && self.runs.iter().all(|run| !run.range().is_empty())
            && self
                .runs
                .windows(2)
                .all(|w| w[0].pages.1 == w[1].pages.0 && w[0].attr != w[1].attr)
    }

    /// The number of runs (for tests and statistics).
    #[cfg(test)]
    pub(crate) fn run_count(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Attribute::{Private, Shared};
    use proptest::prelude::*;

    #[test]
    fn set_merges_neighbours() {
        let mut map = AttributeMap::new(16, Private);
        map.set(4..8, Shared);
        assert_eq!(map.run_count(), 3);
        map.set(8..12, Shared);
        assert_eq!(map.run_count(), 3);
        map.set(4..12, Private);
        assert_eq!(map.run_count(), 1);
        assert_eq!(map.first_not(0..16, Private), None);
        map.set(0..16, Shared);
        assert_eq!(map.run_count(), 1);
        assert_eq!(map.count(Shared), 16);
    }

    #[test]
    fn first_not_reports_the_first_page() {
        let mut map = AttributeMap::new(16, Shared);
        map.set(5..6, Private);
        map.set(9..10, Private);
        assert_eq!(map.first_not(0..16, Shared), Some(5));
        assert_eq!(map.first_not(6..16, Shared), Some(9));
        assert_eq!(map.first_not(6..9, Shared), None);
        assert_eq!(map.get(5), Private);
        assert_eq!(map.get(6), Shared);
    }

    proptest! {
        #[test]
        fn behaves_like_a_page_array(ops in prop::collection::vec((0u64..32, 1u64..32, any::<bool>()), 1..64)) {
            let mut map = AttributeMap::new(32, Private);
            let mut model = [Private; 32];
            for (start, len, shared) in ops {
                let end = (start + len).min(32);
                let attr = if shared { Shared } else { Private };
                map.prepare().unwrap();
                let capacity = map.runs.capacity();
                map.set(start..end, attr);
                prop_assert_eq!(capacity, map.runs.capacity(), "set allocated after prepare");
                model[start as usize..end as usize].fill(attr);
                prop_assert!(map.is_merged());
                for (page, want) in model.iter().enumerate() {
                    prop_assert_eq!(map.get(page as u64), *want);
                }
                prop_assert_eq!(map.count(Shared), model.iter().filter(|a| **a == Shared).count() as u64);
            }
        }
    }
}
