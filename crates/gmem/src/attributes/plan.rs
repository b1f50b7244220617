//! A set planned before it is made. One walk over the runs from the one
//! holding the first page to the one holding the end finds all a conversion
//! asks of the map before it changes it: whether any page changes, the runs
//! that change (to hide or show them), the private runs after, and the
//! boundaries to put in and take out. The set then makes that edit where
//! the walk started, without looking anything up again.
//!
//! A plan holds a place in the tree, so it is valid only while the map does
//! not change: the conversion holds the invalidate lock from the plan to
//! the set, and [`AttributeMap::prepare_for`] plans again if it compacted
//! the tree.

use std::collections::TryReserveError;
use std::iter;
use std::ops::Range;

use super::{Attribute, AttributeMap, Boundary, Cursor, Finger, Run, RunCount, Runs};

/// What a set does, found without changing anything.
#[derive(Debug, Default)]
struct Edit {
    /// The boundaries the set adds, in order, the first `added_len` of: one
    /// at the start of the pages unless the new run merges with the one
    /// before, one at their end unless the run after merges with the new one.
    added: [Boundary; 2],
    added_len: usize,
    /// The runs whose boundaries the set removes: those from the start to
    /// the end of the pages, both included.
    removed: RunCount,
    /// The private pages among the pages, before.
    private_pages: u64,
    /// The runs of the pages (clipped to them) not in the new state: those
    /// the set changes.
    changing: u64,
    /// The first of them, if any.
    first_changing: Range<u64>,
}

impl Edit {
    /// Counts what the set of `pages` to `attr` changes in `run`, one of the
    /// runs from the one holding `pages.start` to the one holding
    /// `pages.end`. Without branches: a batched conversion counts every
    /// run of its range here.
    fn count(&mut self, run: Run, pages: &Range<u64>, attr: Attribute) {
        let private = u64::from(run.attr == Attribute::Private);
        let removed = u64::from(run.pages.0 >= pages.start);
        self.removed.all += removed;
        self.removed.private += removed & private;
        // The run holding `pages.end` may hold none of them: then its
        // clipped length is zero.
        let clipped = run.pages.1.min(pages.end) - run.pages.0.max(pages.start);
        self.changing += u64::from(run.attr != attr && clipped > 0);
        self.private_pages += private * clipped;
    }

    /// Counts, as [`count`](Self::count) does, the runs from where `runs`
    /// is that end in its leaf at or before `end` (so lie inside the pages,
    /// after the first run), reading the leaf's boundaries in one loop;
    /// leaves `runs` at the first run it did not count. A batched
    /// conversion counts most of its runs here.
    fn count_inside<const L: usize, const B: usize>(
        &mut self,
        runs: &mut Runs<'_, L, B>,
        end: u64,
        attr: Attribute,
    ) {
        let boundaries = runs.leaf.boundaries();
        let mut index = runs.index;
        while let [run, next, ..] = boundaries[index..] {
            let len = next.start() - run.start();
            if next.start() > end {
                break;
            }
            let private = u64::from(run.attr() == Attribute::Private);
            self.removed.all += 1;
            self.removed.private += private;
            self.changing += u64::from(run.attr() != attr);
            self.private_pages += private * len;
            index += 1;
        }
        runs.index = index;
        runs.next = Some(boundaries[index]);
    }

    fn add(&mut self, boundary: Boundary) {
        self.added[self.added_len] = boundary;
        self.added_len += 1;
    }

    fn added(&self) -> &[Boundary] {
        &self.added[..self.added_len]
    }
}

/// A set of some pages to a state, planned by [`AttributeMap::plan`] and
/// made by [`AttributeMap::apply`]; valid while the map does not change.
#[derive(Debug)]
pub(crate) struct Planned {
    /// The boundary of the run holding `pages.start`.
    at: Cursor,
    pages: Range<u64>,
    attr: Attribute,
    edit: Edit,
}

impl Planned {
    /// Whether the set changes any page.
    pub(crate) fn changes(&self) -> bool {
        self.edit.changing > 0
    }
}

/// The runs a planned set changes ([`AttributeMap::changing_runs`]): a
/// walk over the runs from the one holding the first page, giving those not
/// in the new state, which stops after the last of them.
pub(crate) struct ChangingRuns<'a, const L: usize, const B: usize> {
    /// The one run, where the set changes one: no walk.
    one: Option<Range<u64>>,
    runs: Runs<'a, L, B>,
    pages: Range<u64>,
    to: Attribute,
    /// The runs still to walk to.
    left: u64,
}

impl<const L: usize, const B: usize> Iterator for ChangingRuns<'_, L, B> {
    type Item = Range<u64>;

    #[inline]
    fn next(&mut self) -> Option<Range<u64>> {
        if let Some(one) = self.one.take() {
            return Some(one);
        }
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // States alternate: of two runs in a row, one changes.
        let run = self.runs.next()?;
        let run = match run.attr == self.to {
            true => self.runs.next()?,
            false => run,
        };
        Some(run.pages.0.max(self.pages.start)..run.pages.1.min(self.pages.end))
    }
}

impl<const L: usize, const B: usize> AttributeMap<L, B> {
    /// Plans the set of `pages` (non-empty, inside the file) to `attr`.
    pub(crate) fn plan(&self, pages: Range<u64>, attr: Attribute) -> Planned {
        debug_assert!(!pages.is_empty() && pages.end <= self.pages);
        // The leaf holding the run of `pages.start`, through the finger: a
        // splice there keeps every boundary between two the leaf already
        // holds (or in the last leaf), so inside its bounds; inserts that
        // split nodes go from the root.
        let at = self.floor(pages.start);
        let edit = self.edit(at, &pages, attr);
        Planned {
            at,
            pages,
            attr,
            edit,
        }
    }

    /// [`prepare`](Self::prepare), planning `planned` again if that moved
    /// the tree's nodes.
    #[inline]
    pub(crate) fn prepare_for(&mut self, planned: &mut Planned) -> Result<(), TryReserveError> {
        if self.prepare_compacting()? {
            *planned = self.plan(planned.pages.clone(), planned.attr);
        }
        Ok(())
    }

    /// The runs `planned` changes, as page ranges, in order: one without a
    /// walk where it changes one, else walked from where it starts to the
    /// last of them.
    pub(crate) fn changing_runs<'a>(&'a self, planned: &Planned) -> ChangingRuns<'a, L, B> {
        let one = planned.edit.changing == 1;
        ChangingRuns {
            one: one.then(|| planned.edit.first_changing.clone()),
            runs: self.runs_from(Some(planned.at).filter(|_| !one)),
            pages: planned.pages.clone(),
            to: planned.attr,
            left: if one { 0 } else { planned.edit.changing },
        }
    }

    /// How many runs will be private once `planned` is made.
    pub(crate) fn private_runs_after(&self, planned: &Planned) -> u64 {
        let added = RunCount::of(planned.edit.added().iter().copied());
        self.runs.private - planned.edit.removed.private + added.private
    }

    /// Sets `pages` (non-empty, inside the file) to `attr`, merging runs.
    /// Does not allocate after a successful [`prepare`](Self::prepare).
    pub(crate) fn set(&mut self, pages: Range<u64>, attr: Attribute) {
        let planned = self.plan(pages, attr);
        self.apply(&planned);
    }

    /// Makes the set `planned` (the map unchanged since it was planned).
    /// Does not allocate after a successful [`prepare`](Self::prepare).
    pub(crate) fn apply(&mut self, planned: &Planned) {
        let Planned {
            at,
            ref pages,
            attr,
            ref edit,
        } = *planned;
        if !self.splice_in_leaf(at, pages, edit) {
            self.remove_boundaries(at.leaf, pages.start..=pages.end);
            edit.added()
                .iter()
                .for_each(|&boundary| self.insert(boundary));
        }
        let added = RunCount::of(edit.added().iter().copied());
        self.runs.all = self.runs.all - edit.removed.all + added.all;
        self.runs.private = self.runs.private - edit.removed.private + added.private;
        self.private_pages -= edit.private_pages;
        if attr == Attribute::Private {
            self.private_pages += pages.end - pages.start;
        }
        debug_assert!(self.is_merged_near(pages));
    }

    /// What the set of `pages` to `attr` does, in one walk over the runs
    /// from the one holding `pages.start` (whose boundary is at `at`) to
    /// the one holding `pages.end`.
    fn edit(&self, at: Cursor, pages: &Range<u64>, attr: Attribute) -> Edit {
        let first = self.boundary(at);
        // The state of the page before: the first run's, or the other one if
        // that run starts at `pages.start`.
        let before = match pages.start {
            0 => None,
            start if first.start() < start => Some(first.attr()),
            _ => Some(first.attr().other()),
        };
        let mut edit = Edit::default();
        let mut runs = self.runs_from(Some(at));
        let mut next = || {
            runs.next()
                .expect("a run holds pages.end or reaches the end")
        };
        // The next run starts after `pages.end`: the walk is over.
        let last_one = |run: &Run| run.pages.1 > pages.end || run.pages.1 == self.pages;
        // The first two runs apart: states alternate, so the first run that
        // changes is one of them.
        let first = next();
        edit.count(first, pages, attr);
        let (mut last, mut second) = (first, None);
        if !last_one(&first) {
            last = next();
            edit.count(last, pages, attr);
            second = Some(last);
            if !last_one(&last) {
                last = self.count_rest(runs, pages, attr, &mut edit);
            }
        }
        let clip = |run: Run| run.pages.0.max(pages.start)..run.pages.1.min(pages.end);
        edit.first_changing = match (first.attr != attr, second) {
            (true, _) => clip(first),
            (false, Some(second)) => clip(second),
            (false, None) => pages.start..pages.start,
        };
        if before != Some(attr) {
            edit.add(Boundary::new(pages.start, attr));
        }
        if pages.end < self.pages && last.attr != attr {
            edit.add(Boundary::new(pages.end, last.attr));
        }
        edit
    }

    /// Counts into `edit` the runs from `runs` on to the one holding
    /// `pages.end` (or the last), and returns that one: the walk of a
    /// conversion of more than two runs, out of line so that the common one
    /// carries none of it.
    #[inline(never)]
    fn count_rest(
        &self,
        mut runs: Runs<'_, L, B>,
        pages: &Range<u64>,
        attr: Attribute,
        edit: &mut Edit,
    ) -> Run {
        loop {
            edit.count_inside(&mut runs, pages.end, attr);
            let run = runs
                .next()
                .expect("a run holds pages.end or reaches the end");
            edit.count(run, pages, attr);
            if run.pages.1 > pages.end || run.pages.1 == self.pages {
                return run;
            }
        }
    }

    /// Replaces the boundaries starting in `pages` (those `edit` removes)
    /// by those it adds if all of them are in the leaf of `at` (the boundary
    /// of the run holding `pages.start`), and the result fits and is not
    /// empty; returns whether it did.
    fn splice_in_leaf(&mut self, at: Cursor, pages: &Range<u64>, edit: &Edit) -> bool {
        let added = edit.added();
        let node = &mut self.leaves[at.leaf];
        // The boundary at `at` is the last one at or before `pages.start`;
        // the boundaries in `pages.start..=pages.end` follow it, as many as
        // the walk counted (some may be in the leaves after).
        let from = at.index + usize::from(node.boundaries[at.index].start() < pages.start);
        let to = from + edit.removed.all as usize;
        // A boundary after `pages.end` in the leaf, or no leaf after it:
        // the leaf holds the boundaries of `pages` and may hold `pages.end`.
        let holds_end = to < node.len || (to == node.len && node.next.is_none());
        if !holds_end {
            return false;
        }
        let len = node.len - (to - from) + added.len();
        if len == 0 || len > L {
            return false;
        }
        node.splice(from..to, added);
        // The finger to the run holding `pages.end`: the last boundary put
        // in, else the one before the range; a set is often followed by one
        // just after it.
        if let Some(index) = (from + added.len()).checked_sub(1) {
            let at = Cursor {
                leaf: at.leaf,
                index,
            };
            *self.finger.get_mut() = Finger::pack(at);
        }
        true
    }

    /// The runs overlapping `pages` from the one whose boundary is at
    /// `first` (the run holding `pages.start`), clipped to `pages`.
    pub(super) fn runs_in_from(
        &self,
        first: Cursor,
        pages: Range<u64>,
    ) -> impl Iterator<Item = Run> + '_ {
        let mut runs = self.runs_from(Some(first));
        iter::from_fn(move || {
            let run = runs.next().filter(|run| run.pages.0 < pages.end)?;
            if run.pages.1 >= pages.end {
                runs.stop();
            }
            Some(Run {
                pages: (run.pages.0.max(pages.start), run.pages.1.min(pages.end)),
                attr: run.attr,
            })
        })
    }
}
