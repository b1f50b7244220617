//! The attribute map: the shared/private state of every page of a file,
//! stored as runs.
//!
//! The map owns the state and nothing else: it knows nothing of allocation,
//! references or mappings. Its runs partition `[0, pages)` and adjacent runs
//! always differ (the maple-tree invariant of the kernel), so the two states
//! alternate. Beside the runs it keeps three totals up to date: the runs, the
//! private runs and the private pages.
//!
//! # Structure
//!
//! A run is stored as its *boundary*: its first page, with its state in the
//! low bit (a file has at most 2^52 pages). A run ends where the next one
//! starts, the last one at the end of the file. The boundaries live in a
//! B+tree whose nodes sit in two arenas, one of leaves and one of branches,
//! addressed by index, each with a free list:
//!
//! * a leaf holds up to `L` boundaries, sorted, and is linked to the leaves
//!   before and after it, so a walk over runs needs no stack;
//! * a branch holds up to `B` children with a lower bound for each: page `p`
//!   belongs to the last child whose bound is at most `p`, or to the first.
//!   Bounds only have to partition the pages: when boundaries go, a bound
//!   may stay below the first boundary left under it, which misroutes nothing;
//! * every node knows its parent, so a split or a removal walks up without a
//!   stack.
//!
//! A lookup descends to the leaf for a page and steps at most once to the
//! leaf before. [`set`](AttributeMap::set) replaces the boundaries in
//! `[pages.start, pages.end]` by at most two: one where the new run starts
//! unless it merges with the run before, one where the run after starts
//! unless it merges with the new one. One walk over the k runs overlapping
//! `pages` finds these and counts what changes. If all of it lies in the leaf
//! for `pages.start` and fits there, the set is one splice in that leaf (the
//! common case); else the old boundaries go in one walk along the leaves, a
//! leaf that empties leaving the tree, and the new ones are inserted from the
//! root, a full leaf splitting and, up the tree, full branches with it.
//!
//! Nothing is rebalanced: a node goes only when empty, and a root branch left
//! with one child gives way to it. A split halves a full node, so splits are
//! amortized O(1) per insert, and every node that goes was made by an earlier
//! split: a set costs O(depth + k) amortized, a lookup O(depth). The depth is
//! at most that of a packed tree of the runs at the last rebuild (below), plus
//! one, plus one per factor of B/2 in the inserts since: a level is added only
//! when a root full of children splits, and a node fills up again only after
//! B/2 splits below it. So a lookup is O(log runs), plus a logarithm of the
//! updates in base B/2 = 15, whatever their order: no order makes it linear.
//!
//! Memory follows the live runs: when an arena holds four times the nodes a
//! packed tree of the runs needs, [`prepare`](AttributeMap::prepare) rebuilds
//! the tree packed. That costs O(runs), and as many updates made the tree
//! sparse since it was last packed (its runs fell to a quarter, or an arena
//! grew fourfold), so it is O(1) amortized.
//!
//! # Fallible prepare, infallible set
//!
//! One `set` inserts at most two boundaries (a splice in a leaf needs no
//! node). An insert splits at most one leaf and each branch above it and may
//! add a root, so with `d` levels of branches the two need at most 2 new
//! leaves and `2d + 3` new branches. `prepare` reserves, with `try_reserve`, room for that many new nodes in
//! each arena and room in each free list for every node of its arena. `set`
//! then takes nodes from a free list or pushes them within capacity and frees
//! them onto a free list within capacity: it does not allocate.

use std::collections::TryReserveError;
use std::iter;
use std::ops::{Index, IndexMut, Range, RangeInclusive};
use std::sync::atomic::{AtomicUsize, Ordering};

mod plan;

pub(crate) use plan::Planned;

/// The state of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Attribute {
    /// The host may read and write the page.
    Shared,
    /// Only the guest may touch the page.
    Private,
}

impl Attribute {
    /// The other state, that of a run's neighbours.
    pub(crate) fn other(self) -> Attribute {
        match self {
            Attribute::Shared => Attribute::Private,
            Attribute::Private => Attribute::Shared,
        }
    }
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

/// Boundaries per leaf: a leaf is 504 bytes.
const LEAF_BOUNDARIES: usize = 56;
/// Children per branch: a branch is 512 bytes.
const BRANCH_CHILDREN: usize = 30;
/// The most pages of a file: 2^64 bytes in pages of 4 KiB.
const MAX_PAGES: u64 = 1 << 52;
/// An arena holding more than this many times the nodes of a packed tree
/// (plus [`SLACK`]) is compacted.
const SPARSE: usize = 4;
/// Nodes an arena may hold beyond [`SPARSE`] times the packed need.
const SLACK: usize = 16;
/// How often `prepare` checks whether the tree became sparse.
const SPARSE_CHECK_EVERY: u32 = 64;

/// Where a run starts, with the run's state in the low bit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Boundary(u64);

impl Boundary {
    fn new(start: u64, attr: Attribute) -> Boundary {
        Boundary(start << 1 | u64::from(attr == Attribute::Private))
    }

    fn start(self) -> u64 {
        self.0 >> 1
    }

    fn attr(self) -> Attribute {
        if self.0 & 1 == 1 {
            Attribute::Private
        } else {
            Attribute::Shared
        }
    }
}

/// Up to `L` boundaries, sorted, in a doubly linked list of leaves.
#[derive(Debug)]
struct Leaf<const L: usize> {
    len: usize,
    boundaries: [Boundary; L],
    prev: Option<usize>,
    next: Option<usize>,
    parent: Option<usize>,
}

impl<const L: usize> Leaf<L> {
    fn empty() -> Self {
        Leaf {
            len: 0,
            boundaries: [Boundary::default(); L],
            prev: None,
            next: None,
            parent: None,
        }
    }

    fn boundaries(&self) -> &[Boundary] {
        &self.boundaries[..self.len]
    }

    /// How many boundaries start before `page`.
    fn count_before(&self, page: u64) -> usize {
        self.boundaries().partition_point(|b| b.start() < page)
    }

    /// How many boundaries start at or before `page`.
    fn count_up_to(&self, page: u64) -> usize {
        self.boundaries().partition_point(|b| b.start() <= page)
    }

    /// Replaces the boundaries at `indices` by `new`, which must fit.
    #[inline]
    fn splice(&mut self, indices: Range<usize>, new: &[Boundary]) {
        let tail = indices.end..self.len;
        let len = self.len - indices.len() + new.len();
        self.boundaries.copy_within(tail, indices.start + new.len());
        // A set puts in at most two: stored one by one, not by `memcpy`.
        let at = indices.start;
        match *new {
            [] => {}
            [one] => self.boundaries[at] = one,
            [one, two] => (self.boundaries[at], self.boundaries[at + 1]) = (one, two),
            _ => self.boundaries[at..][..new.len()].copy_from_slice(new),
        }
        self.len = len;
    }

    /// Moves the upper half of the boundaries to the empty `right`.
    fn move_upper_half(&mut self, right: &mut Self) {
        let kept = self.len / 2;
        let moved = self.len - kept;
        right.boundaries[..moved].copy_from_slice(&self.boundaries[kept..self.len]);
        right.len = moved;
        self.len = kept;
    }
}

/// Up to `B` children, each with the lowest page it may hold.
#[derive(Debug)]
struct Branch<const B: usize> {
    len: usize,
    lows: [u64; B],
    children: [usize; B],
    /// Whether the children are leaves (else branches).
    of_leaves: bool,
    parent: Option<usize>,
}

impl<const B: usize> Branch<B> {
    fn empty(of_leaves: bool) -> Self {
        Branch {
            len: 0,
            lows: [0; B],
            children: [0; B],
            of_leaves,
            parent: None,
        }
    }

    fn child(&self, index: usize) -> Node {
        let child = self.children[index];
        if self.of_leaves {
            Node::Leaf(child)
        } else {
            Node::Branch(child)
        }
    }

    /// The child whose pages hold `page`.
    fn child_for(&self, page: u64) -> Node {
        let after = self.lows[..self.len].partition_point(|&low| low <= page);
        self.child(after.saturating_sub(1))
    }

    /// The index of `child`, which must be a child.
    fn index_of(&self, child: usize) -> usize {
        let index = self.children[..self.len].iter().position(|&c| c == child);
        index.expect("a node is among its parent's children")
    }

    fn insert(&mut self, index: usize, low: u64, child: usize) {
        self.lows.copy_within(index..self.len, index + 1);
        self.children.copy_within(index..self.len, index + 1);
        self.lows[index] = low;
        self.children[index] = child;
        self.len += 1;
    }

    fn remove(&mut self, index: usize) {
        self.lows.copy_within(index + 1..self.len, index);
        self.children.copy_within(index + 1..self.len, index);
        self.len -= 1;
    }

    /// Moves the upper half of the children to the empty `right`.
    fn move_upper_half(&mut self, right: &mut Self) {
        let kept = self.len / 2;
        let moved = self.len - kept;
        right.lows[..moved].copy_from_slice(&self.lows[kept..self.len]);
        right.children[..moved].copy_from_slice(&self.children[kept..self.len]);
        right.len = moved;
        self.len = kept;
    }
}

/// A node of the tree: an index into the leaves or into the branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Leaf(usize),
    Branch(usize),
}

impl Node {
    fn index(self) -> usize {
        match self {
            Node::Leaf(index) | Node::Branch(index) => index,
        }
    }
}

/// Nodes addressed by index, with the indices of the free ones.
#[derive(Debug)]
struct Arena<T> {
    nodes: Vec<T>,
    free: Vec<usize>,
}

impl<T> Arena<T> {
    fn try_with_capacity(nodes: usize) -> Result<Self, TryReserveError> {
        let mut arena = Arena {
            nodes: Vec::new(),
            free: Vec::new(),
        };
        arena.nodes.try_reserve_exact(nodes)?;
        arena.free.try_reserve_exact(nodes)?;
        Ok(arena)
    }

    fn alloc(&mut self, node: T) -> usize {
        match self.free.pop() {
            Some(index) => {
                self.nodes[index] = node;
                index
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        }
    }

    fn release(&mut self, index: usize) {
        self.free.push(index);
    }

    /// Makes room for `more` nodes, and in the free list for every node, so
    /// that neither [`alloc`](Self::alloc) of that many nor any
    /// [`release`](Self::release) allocates.
    fn reserve(&mut self, more: usize) -> Result<(), TryReserveError> {
        let most_free = self.nodes.len() + more;
        if self.nodes.capacity() >= most_free && self.free.capacity() >= most_free {
            // The common case: the room is there from the last time.
            return Ok(());
        }
        self.grow(more)
    }

    /// [`reserve`](Self::reserve) where the room is not there yet.
    #[cold]
    #[inline(never)]
    fn grow(&mut self, more: usize) -> Result<(), TryReserveError> {
        self.nodes.try_reserve(more)?;
        let most_free = self.nodes.len() + more;
        self.free.try_reserve(most_free - self.free.len())
    }

    fn capacity(&self) -> usize {
        self.nodes.capacity()
    }
}

impl<T> Index<usize> for Arena<T> {
    type Output = T;

    fn index(&self, index: usize) -> &T {
        &self.nodes[index]
    }
}

impl<T> IndexMut<usize> for Arena<T> {
    fn index_mut(&mut self, index: usize) -> &mut T {
        &mut self.nodes[index]
    }
}

/// A boundary's place: its leaf, and its index in the leaf.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    leaf: usize,
    index: usize,
}

/// How many runs there are, and how many of them are private.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RunCount {
    all: u64,
    private: u64,
}

impl RunCount {
    /// The runs starting at `boundaries`.
    fn of(boundaries: impl Iterator<Item = Boundary>) -> RunCount {
        let mut count = RunCount::default();
        for boundary in boundaries {
            count.all += 1;
            count.private += u64::from(boundary.attr() == Attribute::Private);
        }
        count
    }
}

/// The numbers of nodes of a tree.
#[derive(Debug, Clone, Copy)]
struct Shape {
    leaves: usize,
    branches: usize,
    /// Levels of branches.
    depth: usize,
}

impl Shape {
    /// The shape of a tree of `runs` runs with full nodes.
    fn packed<const L: usize, const B: usize>(runs: u64) -> Shape {
        let runs = usize::try_from(runs).expect("runs fit in memory");
        let leaves = runs.div_ceil(L);
        let mut shape = Shape {
            leaves,
            branches: 0,
            depth: 0,
        };
        let mut level = leaves;
        while level > 1 {
            level = level.div_ceil(B);
            shape.branches += level;
            shape.depth += 1;
        }
        shape
    }

    /// The most nodes one set may add to a tree of `depth` levels of
    /// branches, and the most levels it may leave.
    fn one_set(depth: usize) -> Shape {
        Shape {
            leaves: 2,
            branches: 2 * depth + 3,
            depth: depth + 2,
        }
    }
}

/// Per-page state of one file, as merged runs in a B+tree (see the module
/// documentation) of up to `L` boundaries per leaf and `B` children per
/// branch.
#[derive(Debug)]
pub(crate) struct AttributeMap<const L: usize = LEAF_BOUNDARIES, const B: usize = BRANCH_CHILDREN> {
    pages: u64,
    root: Node,
    leaves: Arena<Leaf<L>>,
    branches: Arena<Branch<B>>,
    runs: RunCount,
    private_pages: u64,
    /// Where the last lookup ended (leaf, and boundary in it, packed by
    /// [`Finger`]), tried first by the next one: a guest converts near where
    /// it last did, and one conversion looks up the same page a few times.
    /// Always a live leaf: reset where a leaf is freed or the tree rebuilt;
    /// the boundary index is checked. Relaxed: the map sits behind the
    /// invalidate lock, so only lookups under the shared lock race to store
    /// it, each storing a live place, and a lookup checks what it loads.
    finger: AtomicUsize,
    /// `prepare` calls, for checking sparseness now and then.
    prepares: u32,
    /// The levels of branches, kept as the root grows and shrinks.
    depth: usize,
}

/// The packing of a cursor into the finger: the leaf above `SHIFT` bits of
/// boundary index.
struct Finger;

impl Finger {
    /// No place to try first.
    const NONE: usize = usize::MAX;
    /// Bits of boundary index (leaves hold at most `1 << SHIFT`).
    const SHIFT: u32 = 8;

    fn pack(at: Cursor) -> usize {
        debug_assert!(at.index < 1 << Self::SHIFT);
        at.leaf << Self::SHIFT | at.index
    }

    fn unpack(finger: usize) -> Option<Cursor> {
        (finger != Self::NONE).then_some(Cursor {
            leaf: finger >> Self::SHIFT,
            index: finger & ((1 << Self::SHIFT) - 1),
        })
    }
}

/// The runs of a map from a boundary on, in order: a place in a leaf
/// stepped through the leaves, reading each boundary once.
struct Runs<'a, const L: usize, const B: usize> {
    map: &'a AttributeMap<L, B>,
    /// The leaf of the next run's boundary, and its index there.
    leaf: &'a Leaf<L>,
    index: usize,
    /// The next run's boundary; `None` once the walk is over.
    next: Option<Boundary>,
}

impl<const L: usize, const B: usize> Runs<'_, L, B> {
    /// Ends the walk: no run after the one last given.
    fn stop(&mut self) {
        self.next = None;
    }
}

impl<const L: usize, const B: usize> Iterator for Runs<'_, L, B> {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        let boundary = self.next?;
        self.index += 1;
        if self.index >= self.leaf.len {
            match self.leaf.next {
                Some(next) => (self.leaf, self.index) = (&self.map.leaves[next], 0),
                None => self.next = None,
            }
        }
        if self.next.is_some() {
            self.next = Some(self.leaf.boundaries[self.index]);
        }
        let end = self.next.map_or(self.map.pages, Boundary::start);
        Some(Run {
            pages: (boundary.start(), end),
            attr: boundary.attr(),
        })
    }
}

impl AttributeMap {
    /// A map of `pages` pages (at least one), all in state `initial`.
    pub(crate) fn new(pages: u64, initial: Attribute) -> Self {
        Self::with_fanout(pages, initial)
    }
}

impl<const L: usize, const B: usize> AttributeMap<L, B> {
    /// [`new`](AttributeMap::new), with nodes of `L` boundaries and `B`
    /// children.
    fn with_fanout(pages: u64, initial: Attribute) -> Self {
        const { assert!(L >= 2 && B >= 2 && L <= 1 << Finger::SHIFT) };
        debug_assert!(pages > 0 && pages <= MAX_PAGES);
        let first = Boundary::new(0, initial);
        let mut leaf = Leaf::empty();
        leaf.splice(0..0, &[first]);
        let private = initial == Attribute::Private;
        AttributeMap {
            pages,
            root: Node::Leaf(0),
            leaves: Arena {
                nodes: vec![leaf],
                free: Vec::new(),
            },
            branches: Arena {
                nodes: Vec::new(),
                free: Vec::new(),
            },
            runs: RunCount::of(iter::once(first)),
            private_pages: if private { pages } else { 0 },
            finger: AtomicUsize::new(Finger::NONE),
            prepares: 0,
            depth: 0,
        }
    }

    /// The leaf whose pages hold `page`.
    fn leaf_for(&self, page: u64) -> usize {
        let mut node = self.root;
        loop {
            match node {
                Node::Leaf(leaf) => return leaf,
                Node::Branch(branch) => node = self.branches[branch].child_for(page),
            }
        }
    }

    /// Whether the run holding `page` starts in live leaf `leaf`: its first
    /// boundary is at or before `page`, the next leaf's after it.
    fn leaf_holds(&self, leaf: usize, page: u64) -> bool {
        let leaf = &self.leaves[leaf];
        let starts_before =
            |leaf: &Leaf<L>| leaf.boundaries().first().is_some_and(|b| b.start() <= page);
        starts_before(leaf)
            && leaf
                .next
                .is_none_or(|next| !starts_before(&self.leaves[next]))
    }

    /// The boundary of the run holding `page`: in the finger's leaf if it
    /// holds it (no descent), else found from the root. Only lookups use the
    /// finger: an insert must go where the bounds route it.
    fn floor(&self, page: u64) -> Cursor {
        let finger = Finger::unpack(self.finger.load(Ordering::Relaxed));
        let at = match finger {
            Some(at) if self.run_holds(at, page) => return at,
            Some(at) if self.leaf_holds(at.leaf, page) => self.floor_from(at.leaf, page),
            _ => self.floor_from(self.leaf_for(page), page),
        };
        self.finger.store(Finger::pack(at), Ordering::Relaxed);
        at
    }

    /// Whether `page` is in the run whose boundary is at `at` (in a live
    /// leaf, at an index that may be past its end).
    fn run_holds(&self, at: Cursor, page: u64) -> bool {
        let leaf = &self.leaves[at.leaf];
        at.index < leaf.len
            && leaf.boundaries[at.index].start() <= page
            && self
                .step(at)
                .is_none_or(|next| page < self.boundary(next).start())
    }

    /// The boundary of the run holding `page`, from the leaf for `page`.
    fn floor_from(&self, leaf: usize, page: u64) -> Cursor {
        debug_assert!(page < self.pages);
        match self.leaves[leaf].count_up_to(page) {
            // All of the leaf is after `page`: the run starts in the leaf
            // before (the first leaf holds page 0).
            0 => {
                let prev = self.leaves[leaf].prev.expect("a leaf before");
                let index = self.leaves[prev].len - 1;
                Cursor { leaf: prev, index }
            }
            up_to => Cursor {
                leaf,
                index: up_to - 1,
            },
        }
    }

    fn boundary(&self, at: Cursor) -> Boundary {
        self.leaves[at.leaf].boundaries[at.index]
    }

    /// The place of the boundary after the one at `at`.
    fn step(&self, at: Cursor) -> Option<Cursor> {
        let leaf = &self.leaves[at.leaf];
        if at.index + 1 < leaf.len {
            Some(Cursor {
                leaf: at.leaf,
                index: at.index + 1,
            })
        } else {
            leaf.next.map(|next| Cursor {
                leaf: next,
                index: 0,
            })
        }
    }

    /// The whole runs from the one whose boundary is at `first` on.
    fn runs_from(&self, first: Option<Cursor>) -> Runs<'_, L, B> {
        let at = first.unwrap_or(Cursor { leaf: 0, index: 0 });
        Runs {
            map: self,
            leaf: &self.leaves[at.leaf],
            index: at.index,
            next: first.map(|at| self.boundary(at)),
        }
    }

    /// The state of `page`, which must be inside the file.
    pub(crate) fn get(&self, page: u64) -> Attribute {
        self.boundary(self.floor(page)).attr()
    }

    /// The runs overlapping `pages`, clipped to it. Stops at the run holding
    /// the last page, without looking at the one after.
    pub(crate) fn runs_in(&self, pages: Range<u64>) -> impl Iterator<Item = Run> + '_ {
        let first = (!pages.is_empty()).then(|| self.floor(pages.start));
        first
            .map(|first| self.runs_in_from(first, pages))
            .into_iter()
            .flatten()
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
        match attr {
            Attribute::Private => self.private_pages,
            Attribute::Shared => self.pages - self.private_pages,
        }
    }

    /// How many runs are private.
    pub(crate) fn private_runs(&self) -> u64 {
        self.runs.private
    }

    /// Reserves what one [`set`](Self::set) may need, so that it cannot fail
    /// or allocate; first compacts the tree if it is sparse.
    pub(crate) fn prepare(&mut self) -> Result<(), TryReserveError> {
        self.prepare_compacting().map(drop)
    }

    /// [`prepare`](Self::prepare); `true` if it compacted the tree (every
    /// place in it moved).
    #[inline]
    fn prepare_compacting(&mut self) -> Result<bool, TryReserveError> {
        // Sparseness is checked every `SPARSE_CHECK_EVERY` prepares: memory
        // still follows the runs (a map left sparse is compacted within that
        // many sets), and most prepares cost a few compares.
        self.prepares = self.prepares.wrapping_add(1);
        let compacted = self.prepares % SPARSE_CHECK_EVERY == 0 && self.compact_if_sparse();
        let need = Shape::one_set(self.depth);
        self.leaves.reserve(need.leaves)?;
        self.branches.reserve(need.branches)?;
        Ok(compacted)
    }

    /// Removes the boundaries starting in `pages`, from `leaf`, the leaf for
    /// `pages.start`, on; leaves that empty go.
    fn remove_boundaries(&mut self, mut leaf: usize, pages: RangeInclusive<u64>) {
        loop {
            let node = &mut self.leaves[leaf];
            let len = node.len;
            let from = node.count_before(*pages.start());
            let to = node.count_up_to(*pages.end());
            node.splice(from..to, &[]);
            let next = node.next;
            if node.len == 0 {
                self.remove_leaf(leaf);
            }
            match next {
                // The rest of the leaf went: the next may hold more.
                Some(next) if to == len => leaf = next,
                _ => return,
            }
        }
    }

    /// Takes the empty `leaf` out of the tree, unless it is the root.
    fn remove_leaf(&mut self, leaf: usize) {
        let node = &self.leaves[leaf];
        let (prev, next) = (node.prev, node.next);
        // An empty root stays, for the boundaries the set inserts next.
        let Some(parent) = node.parent else { return };
        if let Some(prev) = prev {
            self.leaves[prev].next = next;
        }
        if let Some(next) = next {
            self.leaves[next].prev = prev;
        }
        self.leaves.release(leaf);
        *self.finger.get_mut() = Finger::NONE;
        self.remove_child(parent, leaf);
    }

    /// Removes `child` from `branch`, and `branch` too if that empties it.
    fn remove_child(&mut self, branch: usize, child: usize) {
        let node = &mut self.branches[branch];
        let index = node.index_of(child);
        node.remove(index);
        match (node.len, node.parent) {
            (0, Some(parent)) => {
                self.branches.release(branch);
                self.remove_child(parent, branch);
            }
            (1, None) => self.shrink_root(),
            _ => debug_assert!(node.len > 0, "a root branch keeps two children"),
        }
    }

    /// While the root is a branch of one child, the child takes its place.
    fn shrink_root(&mut self) {
        while let Node::Branch(root) = self.root {
            let node = &self.branches[root];
            if node.len > 1 {
                return;
            }
            let child = node.child(0);
            self.set_parent(child, None);
            self.branches.release(root);
            self.root = child;
            self.depth -= 1;
        }
    }

    /// Inserts `boundary`, whose start is no boundary yet, splitting full
    /// nodes on its way.
    fn insert(&mut self, boundary: Boundary) {
        let leaf = self.leaf_for(boundary.start());
        let index = self.leaves[leaf].count_before(boundary.start());
        if self.leaves[leaf].len < L {
            self.leaves[leaf].splice(index..index, &[boundary]);
            return;
        }
        let right = self.split_leaf(leaf);
        let kept = self.leaves[leaf].len;
        if index <= kept {
            self.leaves[leaf].splice(index..index, &[boundary]);
        } else {
            let index = index - kept;
            self.leaves[right].splice(index..index, &[boundary]);
        }
        let low = self.leaves[right].boundaries[0].start();
        self.add_sibling(Node::Leaf(leaf), Node::Leaf(right), low);
    }

    /// Moves the upper half of `leaf` to a new leaf after it, which still
    /// has to be added to a parent.
    fn split_leaf(&mut self, leaf: usize) -> usize {
        let mut right = Leaf::empty();
        let node = &mut self.leaves[leaf];
        node.move_upper_half(&mut right);
        right.prev = Some(leaf);
        right.next = node.next;
        let next = node.next;
        let right = self.leaves.alloc(right);
        self.leaves[leaf].next = Some(right);
        if let Some(next) = next {
            self.leaves[next].prev = Some(right);
        }
        right
    }

    /// Moves the upper half of `branch` to a new branch, which still has to
    /// be added to a parent.
    fn split_branch(&mut self, branch: usize) -> usize {
        let mut right = Branch::empty(self.branches[branch].of_leaves);
        self.branches[branch].move_upper_half(&mut right);
        let right = self.branches.alloc(right);
        for index in 0..self.branches[right].len {
            let child = self.branches[right].child(index);
            self.set_parent(child, Some(right));
        }
        right
    }

    /// Adds `right`, just split off `left`, after it in `left`'s parent,
    /// splitting that if full; `low` is the first page `right` holds.
    fn add_sibling(&mut self, left: Node, right: Node, low: u64) {
        let Some(parent) = self.parent(left) else {
            return self.grow_root(left, right, low);
        };
        let mut holder = parent;
        let mut index = self.branches[parent].index_of(left.index()) + 1;
        if self.branches[parent].len == B {
            let sibling = self.split_branch(parent);
            let kept = self.branches[parent].len;
            if index > kept {
                (holder, index) = (sibling, index - kept);
            }
            // `right` goes after the sibling's first child: its low stays.
            let sibling_low = self.branches[sibling].lows[0];
            self.add_sibling(Node::Branch(parent), Node::Branch(sibling), sibling_low);
        }
        self.branches[holder].insert(index, low, right.index());
        self.set_parent(right, Some(holder));
    }

    /// Puts a new root above the old root `left` and its new sibling.
    fn grow_root(&mut self, left: Node, right: Node, low: u64) {
        let mut root = Branch::empty(matches!(left, Node::Leaf(_)));
        root.insert(0, 0, left.index());
        root.insert(1, low, right.index());
        let root = self.branches.alloc(root);
        self.set_parent(left, Some(root));
        self.set_parent(right, Some(root));
        self.root = Node::Branch(root);
        self.depth += 1;
    }

    fn parent(&self, node: Node) -> Option<usize> {
        match node {
            Node::Leaf(leaf) => self.leaves[leaf].parent,
            Node::Branch(branch) => self.branches[branch].parent,
        }
    }

    fn set_parent(&mut self, node: Node, parent: Option<usize>) {
        match node {
            Node::Leaf(leaf) => self.leaves[leaf].parent = parent,
            Node::Branch(branch) => self.branches[branch].parent = parent,
        }
    }

    /// The levels of branches, counted from the root (the tests check the
    /// kept `depth` against it).
    #[cfg(test)]
    fn depth(&self) -> usize {
        let mut depth = 0;
        let mut node = self.root;
        while let Node::Branch(branch) = node {
            node = self.branches[branch].child(0);
            depth += 1;
        }
        depth
    }

    /// Whether an arena holds many more nodes than a packed tree needs.
    fn is_sparse(&self) -> bool {
        let packed = Shape::packed::<L, B>(self.runs.all);
        self.leaves.capacity() > SPARSE * packed.leaves + SLACK
            || self.branches.capacity() > SPARSE * packed.branches + SLACK
    }

    /// [`compact`](Self::compact) if the tree is sparse; whether it did.
    /// Apart from `prepare`, which checks now and then.
    #[cold]
    #[inline(never)]
    fn compact_if_sparse(&mut self) -> bool {
        self.is_sparse() && self.compact()
    }

    /// Replaces the tree by a packed copy, if there is memory for one;
    /// returns whether it did.
    fn compact(&mut self) -> bool {
        let packed = self.packed();
        if let Ok(packed) = packed {
            *self = packed;
            return true;
        }
        false
    }

    /// A copy with full nodes, and room for one set.
    fn packed(&self) -> Result<Self, TryReserveError> {
        let shape = Shape::packed::<L, B>(self.runs.all);
        let spare = Shape::one_set(shape.depth);
        let mut packed = AttributeMap {
            pages: self.pages,
            root: Node::Leaf(0),
            leaves: Arena::try_with_capacity(shape.leaves + spare.leaves)?,
            branches: Arena::try_with_capacity(shape.branches + spare.branches)?,
            runs: self.runs,
            private_pages: self.private_pages,
            finger: AtomicUsize::new(Finger::NONE),
            prepares: 0,
            depth: shape.depth,
        };
        packed.push_leaves(self, self.floor(0).leaf);
        let mut level = 0..shape.leaves;
        for depth in 0..shape.depth {
            level = packed.push_parents(level, depth == 0);
        }
        // The last branch pushed, else the only leaf.
        packed.root = match packed.branches.nodes.len() {
            0 => Node::Leaf(0),
            branches => Node::Branch(branches - 1),
        };
        Ok(packed)
    }

    /// Pushes full leaves of the boundaries of `old`'s leaves, from `first`
    /// (its first leaf) on, into the empty arena: slices copied leaf by
    /// leaf, so a compaction costs a few instructions a boundary.
    fn push_leaves(&mut self, old: &Self, first: usize) {
        let mut last: Option<usize> = None;
        let mut from = Some(first);
        while let Some(leaf) = from {
            let mut boundaries = old.leaves[leaf].boundaries();
            while !boundaries.is_empty() {
                let target = match last {
                    Some(target) if self.leaves[target].len < L => target,
                    _ => {
                        let mut new = Leaf::empty();
                        new.prev = last;
                        let new = self.leaves.alloc(new);
                        if let Some(prev) = last {
                            self.leaves[prev].next = Some(new);
                        }
                        last = Some(new);
                        new
                    }
                };
                let node = &mut self.leaves[target];
                let moved = (L - node.len).min(boundaries.len());
                node.boundaries[node.len..node.len + moved].copy_from_slice(&boundaries[..moved]);
                node.len += moved;
                boundaries = &boundaries[moved..];
            }
            from = old.leaves[leaf].next;
        }
    }

    /// Pushes full parents for the nodes at `level`, leaves or branches,
    /// and returns the indices of the parents.
    fn push_parents(&mut self, level: Range<usize>, of_leaves: bool) -> Range<usize> {
        let first = self.branches.nodes.len();
        for index in level.clone().step_by(B) {
            let mut parent = Branch::empty(of_leaves);
            for child in index..(index + B).min(level.end) {
                parent.insert(parent.len, 0, child);
            }
            let parent = self.branches.alloc(parent);
            for child_index in 0..self.branches[parent].len {
                let child = self.branches[parent].child(child_index);
                self.branches[parent].lows[child_index] = self.low(child);
                self.set_parent(child, Some(parent));
            }
        }
        first..self.branches.nodes.len()
    }

    /// The first page `node` holds, in a packed tree.
    fn low(&self, node: Node) -> u64 {
        match node {
            Node::Leaf(leaf) => self.leaves[leaf].boundaries[0].start(),
            Node::Branch(branch) => self.branches[branch].lows[0],
        }
    }

    /// Whether `runs` are all non-empty and alternate.
    fn alternate(mut runs: impl Iterator<Item = Run>) -> bool {
        let Some(mut prev) = runs.next() else {
            return true;
        };
        runs.all(|run| {
            let merged = !prev.range().is_empty() && prev.attr != run.attr;
            prev = run;
            merged
        }) && !prev.range().is_empty()
    }

    /// Whether the runs around `pages` are merged.
    fn is_merged_near(&self, pages: &Range<u64>) -> bool {
        let first = self.floor(pages.start.saturating_sub(1));
        let end = pages.end;
        Self::alternate(
            self.runs_from(Some(first))
                .take_while(|run| run.pages.0 <= end),
        )
    }

    /// Whether all runs are merged, start at page 0 and are counted right.
    #[cfg(test)]
    fn is_merged(&self) -> bool {
        let runs = || self.runs_from(Some(self.floor(0)));
        let boundaries = runs().map(|run| Boundary::new(run.pages.0, run.attr));
        runs().next().is_some_and(|run| run.pages.0 == 0)
            && Self::alternate(runs())
            && RunCount::of(boundaries) == self.runs
    }

    /// The number of runs (for tests and statistics).
    #[cfg(test)]
    pub(crate) fn run_count(&self) -> usize {
        self.runs_in(0..self.pages).count()
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

    /// The capacities of the arenas and their free lists.
    fn capacities<const L: usize, const B: usize>(map: &AttributeMap<L, B>) -> [usize; 4] {
        [
            map.leaves.nodes.capacity(),
            map.leaves.free.capacity(),
            map.branches.nodes.capacity(),
            map.branches.free.capacity(),
        ]
    }

    /// The bytes the arenas hold.
    fn footprint<const L: usize, const B: usize>(map: &AttributeMap<L, B>) -> usize {
        let [leaves, free_leaves, branches, free_branches] = capacities(map);
        leaves * size_of::<Leaf<L>>()
            + branches * size_of::<Branch<B>>()
            + (free_leaves + free_branches) * size_of::<usize>()
    }

    /// Checks the tree below `node`, whose pages are `bounds`: parents,
    /// bounds, non-empty nodes, and leaves in the order of their links
    /// (`leaves` so far). Returns the nodes seen: leaves, branches.
    fn check_node<const L: usize, const B: usize>(
        map: &AttributeMap<L, B>,
        node: Node,
        parent: Option<usize>,
        bounds: Range<u64>,
        leaves: &mut Vec<usize>,
    ) -> (usize, usize) {
        assert_eq!(map.parent(node), parent, "parent of {node:?}");
        match node {
            Node::Leaf(index) => {
                let leaf = &map.leaves[index];
                assert!(
                    leaf.len > 0 && leaf.len <= L,
                    "leaf {index} holds {}",
                    leaf.len
                );
                assert!(
                    leaf.boundaries()
                        .iter()
                        .all(|b| bounds.contains(&b.start()))
                );
                assert!(
                    leaf.boundaries()
                        .windows(2)
                        .all(|w| w[0].start() < w[1].start())
                );
                assert_eq!(leaf.prev, leaves.last().copied(), "prev of leaf {index}");
                if let Some(&prev) = leaves.last() {
                    assert_eq!(map.leaves[prev].next, Some(index), "next of leaf {prev}");
                }
                leaves.push(index);
                (1, 0)
            }
            Node::Branch(index) => {
                let branch = &map.branches[index];
                assert!(branch.len > 0 && branch.len <= B, "branch {index}");
                assert!(
                    parent.is_some() || branch.len > 1,
                    "a root branch of one child"
                );
                let mut seen = (0, 1);
                for child in 0..branch.len {
                    let low = if child == 0 {
                        bounds.start
                    } else {
                        branch.lows[child]
                    };
                    let high = branch
                        .lows
                        .get(child + 1)
                        .filter(|_| child + 1 < branch.len);
                    let high = high.copied().unwrap_or(bounds.end);
                    assert!(bounds.start <= low && low <= high && high <= bounds.end);
                    let below =
                        check_node(map, branch.child(child), Some(index), low..high, leaves);
                    seen = (seen.0 + below.0, seen.1 + below.1);
                }
                seen
            }
        }
    }

    /// Checks the structure, the totals and that no node leaked.
    fn check_tree<const L: usize, const B: usize>(map: &AttributeMap<L, B>) {
        let mut leaves = Vec::new();
        let (live_leaves, live_branches) =
            check_node(map, map.root, None, 0..map.pages, &mut leaves);
        assert_eq!(map.leaves[*leaves.last().unwrap()].next, None);
        assert_eq!(
            live_leaves + map.leaves.free.len(),
            map.leaves.nodes.len(),
            "leaked leaves"
        );
        assert_eq!(
            live_branches + map.branches.free.len(),
            map.branches.nodes.len(),
            "leaked branches"
        );
        assert!(map.is_merged());
        assert_eq!(map.depth, map.depth(), "the depth kept");
        let private_pages: u64 = map
            .runs_in(0..map.pages)
            .filter(|run| run.attr == Private)
            .map(|run| run.range().count() as u64)
            .sum();
        assert_eq!(map.count(Private), private_pages);
    }

    /// Checks `map` against the state of each page.
    fn check_against_model<const L: usize, const B: usize>(
        map: &AttributeMap<L, B>,
        model: &[Attribute],
    ) {
        check_tree(map);
        let pages: Vec<Attribute> = map
            .runs_in(0..map.pages)
            .flat_map(|run| run.range().map(move |_| run.attr))
            .collect();
        assert_eq!(pages, model);
        let runs = model.chunk_by(|a, b| a == b);
        let private_runs = runs.filter(|run| run[0] == Private).count() as u64;
        assert_eq!(map.private_runs(), private_runs);
        let shared = model.iter().filter(|a| **a == Shared).count() as u64;
        assert_eq!(map.count(Shared), shared);
    }

    /// Checks the queries on `pages` against `model`.
    fn check_queries<const L: usize, const B: usize>(
        map: &AttributeMap<L, B>,
        model: &[Attribute],
        pages: Range<u64>,
    ) {
        let slice = &model[pages.start as usize..pages.end as usize];
        let mut start = pages.start;
        let want: Vec<Run> = slice
            .chunk_by(|a, b| a == b)
            .map(|run| {
                start += run.len() as u64;
                Run {
                    pages: (start - run.len() as u64, start),
                    attr: run[0],
                }
            })
            .collect();
        assert_eq!(map.runs_in(pages.clone()).collect::<Vec<_>>(), want);
        if !pages.is_empty() {
            assert_eq!(map.get(pages.start), model[pages.start as usize]);
            assert_eq!(map.is_uniform(pages.clone()), want.len() == 1);
            for attr in [Private, Shared] {
                let first = slice
                    .iter()
                    .position(|a| *a != attr)
                    .map(|i| pages.start + i as u64);
                assert_eq!(map.first_not(pages.clone(), attr), first);
            }
        }
    }

    /// Applies `ops` to a map of `pages` pages in state `initial` and to a
    /// model of it, checking everything after each.
    fn run_ops<const L: usize, const B: usize>(
        pages: u64,
        initial: Attribute,
        ops: &[(u64, u64, bool)],
    ) {
        let mut map = AttributeMap::<L, B>::with_fanout(pages, initial);
        let mut model = vec![initial; pages as usize];
        for &(start, len, shared) in ops {
            let start = start % pages;
            let end = (start + len).min(pages);
            let attr = if shared { Shared } else { Private };
            // As a conversion does: plan, prepare (which may compact the
            // tree and plan again), then make the plan.
            let mut planned = map.plan(start..end, attr);
            let changing = changing_in_model(&model, start..end, attr);
            assert_eq!(map.changing_runs(&planned).collect::<Vec<_>>(), changing);
            assert_eq!(planned.changes(), !changing.is_empty());
            map.prepare_for(&mut planned).unwrap();
            assert_eq!(map.changing_runs(&planned).collect::<Vec<_>>(), changing);
            let reserved = capacities(&map);
            let predicted = map.private_runs_after(&planned);
            map.apply(&planned);
            assert_eq!(capacities(&map), reserved, "set allocated after prepare");
            assert_eq!(
                map.private_runs(),
                predicted,
                "private_runs_after({start}..{end}, {attr:?})"
            );
            model[start as usize..end as usize].fill(attr);
            check_against_model(&map, &model);
            check_queries(&map, &model, start.saturating_sub(len)..end);
            check_queries(&map, &model, start..start);
        }
    }

    /// The runs of `pages` not in state `attr`, by `model`.
    fn changing_in_model(
        model: &[Attribute],
        pages: Range<u64>,
        attr: Attribute,
    ) -> Vec<Range<u64>> {
        let mut start = pages.start;
        let slice = &model[pages.start as usize..pages.end as usize];
        let mut runs = Vec::new();
        for run in slice.chunk_by(|a, b| a == b) {
            let len = run.len() as u64;
            if run[0] != attr {
                runs.push(start..start + len);
            }
            start += len;
        }
        runs
    }

    fn ops(pages: u64, count: usize) -> impl Strategy<Value = Vec<(u64, u64, bool)>> {
        let len = prop_oneof![3 => 1..4u64, 1 => 1..pages];
        prop::collection::vec((0..pages, len, any::<bool>()), 1..count)
    }

    proptest! {
        #[test]
        fn behaves_like_a_page_array(ops in ops(32, 64)) {
            run_ops::<LEAF_BOUNDARIES, BRANCH_CHILDREN>(32, Private, &ops);
        }

        #[test]
        fn behaves_like_a_page_array_in_a_deep_tree(ops in ops(600, 300)) {
            run_ops::<3, 3>(600, Private, &ops);
        }

        #[test]
        fn behaves_like_a_page_array_with_the_smallest_nodes(ops in ops(300, 200)) {
            run_ops::<2, 2>(300, Shared, &ops);
        }
    }

    /// Every index of `0..n` once, scattered, for `n` prime to 7919.
    fn scattered(n: u64) -> impl Iterator<Item = u64> {
        (0..n).map(move |i| (i * 7919 + 12345) % n)
    }

    #[test]
    fn scattered_runs_then_uniform_give_memory_back() {
        const PAGES: u64 = 100_000;
        let mut map = AttributeMap::new(PAGES, Private);
        let mut model = vec![Private; PAGES as usize];
        let small = footprint(&map);
        for page in scattered(PAGES / 2).map(|i| 2 * i + 1) {
            map.prepare().unwrap();
            map.set(page..page + 1, Shared);
            model[page as usize] = Shared;
        }
        assert_eq!(map.run_count(), PAGES as usize);
        assert!(map.depth() >= 3, "depth {}", map.depth());
        check_against_model(&map, &model);
        let fragmented = footprint(&map);
        assert!(fragmented > PAGES as usize * size_of::<Boundary>());
        // One set removes all of it, freeing every node but the root.
        map.prepare().unwrap();
        let reserved = capacities(&map);
        map.set(0..PAGES, Private);
        assert_eq!(capacities(&map), reserved, "set allocated after prepare");
        assert_eq!(map.run_count(), 1);
        // Prepares give the memory back within `SPARSE_CHECK_EVERY`.
        for _ in 0..SPARSE_CHECK_EVERY {
            map.prepare().unwrap();
        }
        check_against_model(&map, &vec![Private; PAGES as usize]);
        let uniform = footprint(&map);
        assert!(uniform <= 8 * small, "{uniform} bytes left of {fragmented}");
    }

    #[test]
    fn private_runs_after_predicts_the_set() {
        let mut map = AttributeMap::new(16, Shared);
        assert_eq!(map.private_runs(), 0);
        assert_eq!(map.private_runs_after(&map.plan(4..6, Private)), 1);
        map.set(4..6, Private);
        map.set(8..10, Private);
        assert_eq!(map.private_runs(), 2);
        // Filling the gap joins two runs; splitting one adds one.
        assert_eq!(map.private_runs_after(&map.plan(6..8, Private)), 1);
        assert_eq!(map.private_runs_after(&map.plan(5..6, Shared)), 2);
        assert_eq!(map.private_runs_after(&map.plan(8..9, Shared)), 2);
        assert_eq!(map.private_runs_after(&map.plan(4..5, Shared)), 2);
        assert_eq!(map.private_runs_after(&map.plan(2..3, Private)), 3);
        assert_eq!(map.private_runs_after(&map.plan(0..16, Shared)), 0);
        assert_eq!(map.private_runs_after(&map.plan(0..16, Private)), 1);
        assert_eq!(map.private_runs(), 2, "nothing changed");
    }
}
